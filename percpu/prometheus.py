"""A percpu domain served through prometheus_client: :class:`PercpuCollector`.

::

    from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
    from percpu.prometheus import PercpuCollector

    registry = CollectorRegistry()
    registry.register(PercpuCollector(domain))   # or PercpuCollector(domain, registry=registry)
    app = make_wsgi_app(registry)                # or generate_latest(registry), ...

Invariant: each ``collect()`` reads the domain once and yields, as prometheus_client
``Metric`` families, exactly the families and samples of percpu's own exposition of that read
(:func:`percpu._exposition.collect_domain`): the same series left out (and counted in
``percpu_exposition_dropped_series``), the same help texts, the same health figures unless
``health=False``; families sorted by name and series by labels. prometheus_client writes every
value as a float, so an int beyond 2**53 comes out rounded there, where ``python -m percpu
serve`` writes it exactly.

``describe()`` names no series: a domain's series come and go while the service runs (and
other processes add them), so they cannot be claimed when the collector is registered; a
registry therefore does not check them against its other collectors' names.

Needs the optional extra ``prometheus`` (``pip install 'percpu-arena[prometheus]'``); the rest
of percpu never imports this module or prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._exposition import DomainLike, collect_domain

try:
    from prometheus_client.metrics_core import Metric
except ModuleNotFoundError as exc:  # the extra is not installed
    raise ModuleNotFoundError(
        "percpu.prometheus needs prometheus_client: pip install 'percpu-arena[prometheus]' "
        "(or pip install prometheus-client)", name=exc.name) from None

__all__ = ["PercpuCollector"]


class PercpuCollector:
    """A prometheus_client collector of every metric of ``domain``.

    ``health=False`` leaves out the ``percpu_domain_*`` health figures. With ``registry``,
    the collector registers itself there (as prometheus_client's own collectors do);
    otherwise pass it to ``registry.register`` yourself. Register one collector per domain
    per registry: two would write every series twice.
    """

    def __init__(self, domain: DomainLike, *, health: bool = True,
                 registry: Any | None = None) -> None:
        self.domain = domain
        self.health = health
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        """No names: the series change while the service runs (see the module docstring)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The domain's families, read now."""
        families: dict[str, Metric] = {}
        for sample in collect_domain(self.domain, health=self.health):
            family = families.get(sample.family)
            if family is None:
                family = families[sample.family] = Metric(sample.family, sample.help.strip(),
                                                          sample.kind)
            elif not family.documentation and sample.help.strip():
                family.documentation = sample.help.strip()  # the first help given wins
            labels = dict(sample.labels)
            if sample.kind == "counter":
                family.add_sample(sample.family + "_total", labels, sample.value)
            elif sample.kind == "gauge":
                family.add_sample(sample.family, labels, sample.value)
            else:
                family.add_sample(sample.family + "_count", labels, sample.count)
                family.add_sample(sample.family + "_sum", labels, sample.sum)
        for name in sorted(families):
            family = families[name]
            # Series in label order (a summary's _count before its _sum, as percpu writes).
            order = {"_count": 0, "_sum": 1}
            family.samples.sort(key=lambda s: (sorted(s.labels.items()),
                                               order.get(s.name[len(name):], 0)))
            yield family
