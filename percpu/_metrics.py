"""Named metrics of one process of a domain: registering, finding and removing them.

The registry (``_registry``) is the shared table of names; the handle tables (``_bindings``)
are this process's. This part connects them: a name is looked up in this process first, then
registered (or found) in the shared table under the domain lock, and handed out as a handle.

Invariants
----------
1. A handle handed out is never stale: when the domain's epoch moved since this process last
   acknowledged, it acknowledges first (retiring the handles of removed metrics), so a name
   removed in another process gets a new handle, never the removed one.
2. A new metric's slot is taken from our id's cache under the domain lock and committed by
   the registry insert; a slot not committed (the name was found, refused, or the domain is
   full) goes back to the cache, so no ``check`` ever sees it in transit.
5. A name's family entry, made by its first registration, holds its kind (gauge mode
   included), help text, unit and bucket bounds (``_family``) for every process: a later
   registration of the name as another kind or with other buckets is refused
   (``KindMismatch``); its help text and unit are the first registration's.
4. A name's family entry counts its live series; a new series that would pass the series
   limit (``D_SERIES_LIMIT``, 0: none) is refused (``TooManySeries``) with nothing changed
   but the refusal count. The count is raised after the series' commit and lowered after its
   tombstone: a holder killed in between leaves it one off, at worst allowing one series more
   or one fewer.
3. ``remove`` never waits: room in the pending queue is made before the commit (``DomainFull``
   changes nothing), and the slot retired is the metric's current one (the registry word may
   lag a move whose publisher died).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from ._errors import InvalidArgument, InvalidType, KindMismatch, TooManySeries
from ._family import FamilyMeta
from ._family import decode as decode_family
from ._family import encode as encode_family
from ._handles import _Handle, _Removed, _Unbound
from ._layout import (
    D_EPOCH,
    D_SERIES_LIMIT,
    D_SERIES_REFUSED,
    KIND_FAMILY,
    KIND_NAMES,
    KIND_SIZES,
    MODE_OF,
    bump,
    class_index,
    histogram_size,
)
from ._names import decode_key, encode_key, family_key, validate_labels, validate_metric_name
from ._registry import Entry, Registry

H = TypeVar("H", bound=_Handle)


def _describe(meta: FamilyMeta) -> str:
    if meta.kind in MODE_OF:
        return f"a gauge of mode {MODE_OF[meta.kind]!r}"
    if meta.buckets:
        return f"a histogram with the buckets {meta.buckets}"
    return f"a {KIND_NAMES[meta.kind]}"


class Host(Protocol):
    """What the metrics part reads of the domain it belongs to (``Domain`` implements it)."""

    _root: memoryview[int]
    _lock: Any
    _plock: Any  # a threading.RLock, replaced in a forked child
    _registry: Registry
    _pagesets: Any
    _pending: Any
    _grace: Any
    _moves: Any
    _bindings: Any
    _lease: Any

    def vcpu_id(self) -> int: ...

    def _check_open(self) -> None: ...


class Metrics:
    """Registration and removal of the named metrics of one domain (see the module docstring)."""

    def __init__(self, dom: Host) -> None:
        self._dom = dom
        self._families: dict[bytes, FamilyMeta] = {}  # family key -> its metadata (immutable)

    def handle(self, cls_: type[H], name: str, labels: dict[str, str] | None,
               meta: FamilyMeta) -> H:
        """This process's handle of the metric ``name{labels}`` of ``meta.kind`` (invariants
        1 and 5; ``name`` already validated)."""
        dom = self._dom
        kind = meta.kind
        lab = validate_labels(labels)
        key = encode_key(name, lab)
        local = dom._bindings.local
        found = local.get((kind, key))
        if found is not None and meta.buckets and found._bounds != meta.buckets:
            raise InvalidArgument(f"histogram {name} has the buckets {found._bounds}, "
                                  f"not {meta.buckets}")
        if (found is not None and not isinstance(found, _Unbound)
                and dom._root[D_EPOCH] == dom._grace.ack):
            return found  # type: ignore[no-any-return]
        dom._check_open()
        with dom._plock:
            if dom._root[D_EPOCH] != dom._grace.ack:
                dom._grace.acknowledge()  # retire what was removed since
            found = local.get((kind, key))
            if found is not None and isinstance(found, _Unbound):
                dom._bindings.bind(found)  # checks the registry: it may have been removed
            if found is not None and not isinstance(found, _Removed):
                return found  # type: ignore[no-any-return]
            ref = self.register(key, name, meta)
            h: H = dom._bindings.make(dom, cls_, ref, name, lab, kind, meta.buckets)
            local[(kind, key)] = h
            return h

    def family(self, name: str) -> FamilyMeta | None:
        """The metadata the registry holds for the name ``name`` (None: not registered).
        Domain lock held."""
        fkey = family_key(name)
        meta = self._families.get(fkey)
        if meta is None:
            idx, _ = self._dom._registry.lookup(fkey)
            if idx < 0:
                return None
            meta = self._families[fkey] = decode_family(self._dom._registry.extra_at(idx))
        return meta

    def set_series_limit(self, limit: int | None) -> None:
        """See ``Domain.set_series_limit``: checked, then stored under the domain lock."""
        if limit is not None and limit.__class__ is not int:
            raise InvalidType(f"limit must be an int or None, got {type(limit).__name__}")
        if limit is not None and not 1 <= limit < 1 << 32:
            raise InvalidArgument(f"limit must be in 1..{(1 << 32) - 1} or None, got {limit}")
        with self._dom._lock:
            self._dom._root[D_SERIES_LIMIT] = limit or 0

    def families_of(self, names: list[str]) -> dict[str, FamilyMeta]:
        """The metadata of each of ``names`` that has a family (for snapshots)."""
        with self._dom._lock:
            found = {name: self.family(name) for name in names}
        return {name: meta for name, meta in found.items() if meta is not None}

    def register(self, key: bytes, name: str, meta: FamilyMeta) -> int:
        """The ref of the metric ``key`` (of the name ``name``, described by ``meta``),
        creating it if needed (invariants 2, 4 and 5)."""
        dom = self._dom
        kind = meta.kind
        cls = class_index(histogram_size(len(meta.buckets)) if meta.buckets
                          else KIND_SIZES[kind])
        reg = dom._registry
        r = dom._root
        with dom._lock:
            spare = dom._lease.cache_pop(cls)
            committed = False
            try:
                known = self.family(name)
                if known is not None and (known.kind != kind or known.buckets != meta.buckets):
                    raise KindMismatch(f"{name} is registered as {_describe(known)}, "
                                       f"not as {_describe(meta)}")
                idx, _ = reg.lookup(key)
                if idx >= 0:
                    found, ref = reg.kind_ref(idx)
                    if found != kind:
                        raise KindMismatch(f"{decode_key(key)[0]} is registered as a "
                                           f"{KIND_NAMES[found]}, not a {KIND_NAMES[kind]}")
                    return int(ref)
                fkey = family_key(name)
                family, _ = reg.lookup(fkey)
                if family < 0:
                    family = reg.insert(fkey, KIND_FAMILY, 0, 0, encode_family(meta))
                _kind, series = reg.kind_ref(family)
                limit = int(r[D_SERIES_LIMIT])
                if limit and series >= limit:
                    bump(r, D_SERIES_REFUSED)
                    raise TooManySeries(f"{name} has {series} series, the domain's limit "
                                        f"(Domain.set_series_limit): refused {decode_key(key)[1]}")
                reg.insert(key, kind, cls, spare)
                committed = True
                reg.add_to_ref(reg.lookup(fkey)[0], 1)  # the insert may have moved it
                return int(spare)
            finally:
                if not committed:
                    dom._lease.cache_push(cls, spare)

    def entries(self) -> list[Entry]:
        """(kind, class, ref, key) of every live metric; cached by registry generation."""
        return self.entries_at()[1]

    def entries_at(self) -> tuple[int, list[Entry]]:
        """The registry generation and the entries read at it (``Registry.entries_at``)."""
        with self._dom._lock:
            return self._dom._registry.entries_at()

    def remove(self, name: str, labels: dict[str, str] | None) -> bool:
        """Remove ``name{labels}`` in every process; False if it does not exist (invariant 3)."""
        dom = self._dom
        name = validate_metric_name(name)
        key = encode_key(name, validate_labels(labels))
        dom._check_open()
        dom.vcpu_id()
        with dom._plock, dom._lock:
            idx, _ = dom._registry.lookup(key)
            if idx < 0:
                return False
            _kind, ref = dom._registry.kind_ref(idx)
            # Its slot must be one of its entry's class: the grace period will zero it (and
            # checks the class again then: the pending entry records it).
            cls = dom._registry.class_of(idx)
            dom._pagesets.check_ref(dom._moves.current(ref), cls)
            dom._grace.reclaim()  # what is due makes room
            dom._pending.reserve()  # may raise DomainFull: nothing is changed yet
            ref = dom._moves.current(dom._registry.tombstone(idx))
            family, _ = dom._registry.lookup(family_key(name))
            if family >= 0:
                dom._registry.add_to_ref(family, -1)
            dom._grace.publish(ref, cls)
            dom._grace.acknowledge()
        return True
