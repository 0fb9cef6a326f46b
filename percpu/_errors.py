"""Every exception the ``percpu`` package raises.

One root, :class:`PercpuError`; each leaf also subclasses the builtin a caller would naturally
catch. Rule: an operation that raises one of these has changed nothing.
"""

from __future__ import annotations

import errno


class PercpuError(Exception):
    """Root of every error raised by the ``percpu`` package."""


class InvalidArgument(PercpuError, ValueError):
    """An argument has an unusable value (a negative add to a Counter, a metric name that is not
    a valid identifier, a size above the largest class...). The message names the argument, the
    value and what is accepted. Nothing was changed."""


class InvalidType(PercpuError, TypeError):
    """An argument has the wrong type (a float added to a Counter...). Nothing was changed."""


class MetricRemoved(PercpuError, LookupError):
    """The counter was removed with ``Domain.remove``; its handle no longer refers to a slot.
    Register it again with ``Domain.counter`` to count again (from zero)."""


class KindMismatch(PercpuError, ValueError):
    """A name and labels already registered as one kind (say a Gauge) were asked for as another
    (say a Counter)."""


class DomainFull(PercpuError, MemoryError):
    """The domain's arena has no room for another pageset, page or registry entry. Create the
    domain with a larger ``size``; the message gives what was asked and what is free."""


class TooManySeries(DomainFull):
    """A new label set of a metric name would pass the domain's series limit
    (``Domain.set_series_limit``): a label with unbounded values (a user id, a URL) would
    otherwise fill the domain. Counted in ``stats().series_refused``."""


class BadDomainFile(PercpuError, OSError):
    """A shared domain file was refused: on ``open``, its arena or its domain header does not
    validate (magic, version, sizes), or it is not owned by this user / is writable by others;
    in any later operation, a word of the file failed its bounds check before it was used
    (nothing was written through it)."""


def damaged(what: str) -> BadDomainFile:
    """The refusal of a shared word that fails its bounds check (``what`` says which)."""
    return BadDomainFile(errno.EINVAL, f"the domain file is damaged: {what}")


class DomainExists(PercpuError, FileExistsError):
    """``Domain.create`` found its path taken (a file, a symlink, a directory): nothing was
    changed. ``Domain.open`` attaches to an existing domain file."""


class DomainClosed(PercpuError, ValueError):
    """The domain was closed; its handles no longer refer to mapped memory."""
