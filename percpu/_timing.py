"""Timing and exception counting around a block or a call: ``time()``, ``track_inprogress()``
and ``count_exceptions()`` of the handles and of the prometheus_client drop-ins.

Each is a context manager and a decorator; a decorated function gets a new one per call, so
it is reentrant and safe across threads. Invariant: ``done`` runs once per block, after it,
whatever the block raised (the exception goes on); the duration is never negative.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from types import TracebackType
from typing import ParamSpec, Protocol, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Block:
    """``enter()`` before the block (or call), ``done(s)`` after it with its duration in
    seconds; ``duration`` keeps the last one."""

    __slots__ = ("_done", "_enter", "_start", "duration")

    def __init__(self, done: Callable[[float], None], enter: Callable[[], None] | None = None
                 ) -> None:
        self._done = done
        self._enter = enter
        self._start = 0.0
        self.duration: float | None = None

    def __enter__(self) -> Block:
        if self._enter is not None:
            self._enter()
        self._start = time.perf_counter()
        return self

    def __exit__(self, typ: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.duration = max(time.perf_counter() - self._start, 0.0)
        self._done(self.duration)

    def __call__(self, fn: Callable[_P, _R]) -> Callable[_P, _R]:
        done, enter = self._done, self._enter

        @functools.wraps(fn)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with Block(done, enter):
                return fn(*args, **kwargs)
        return wrapped


class _Incrementable(Protocol):
    def inc(self) -> None: ...


class CountExceptions:
    """One more on ``counter`` when the block or call raises ``exception``."""

    __slots__ = ("_counter", "_exception")

    def __init__(self, counter: _Incrementable,
                 exception: type[BaseException] | tuple[type[BaseException], ...]) -> None:
        self._counter = counter
        self._exception = exception

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if value is not None and isinstance(value, self._exception):
            self._counter.inc()

    def __call__(self, fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self:
                return fn(*args, **kwargs)
        return wrapped
