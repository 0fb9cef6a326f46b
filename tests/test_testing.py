"""The shipped state machines (arena.testing, percpu.testing): run as they ship, run as the
documented examples subclass them, and shown to catch a bug in the code under test."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from arena import Arena, ArenaExhausted, Block
from arena.testing import ArenaMachine
from percpu import Domain
from percpu.testing import DomainMachine

ROOT = Path(__file__).resolve().parent.parent
QUICK = settings(max_examples=20, stateful_step_count=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
# For the machines that must find a planted bug: a fixed sequence of examples, no database.
# Shrinking is left out: the point is that the bug is found, and shrinking is the slow part.
HUNT = settings(max_examples=200, stateful_step_count=30, deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow], print_blob=False,
                phases=(Phase.explicit, Phase.reuse, Phase.generate), report_multiple_bugs=False)


# -- the machines as they ship ----------------------------------------------------------------

TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = QUICK

TestDomainMachine = DomainMachine.TestCase
TestDomainMachine.settings = QUICK


# -- the documented arena example: a FIFO of messages kept in arena blocks -----------------------


class MessageStore:
    """The code under test: messages copied into blocks of an arena, first in first out."""

    HEADER = 2  # bytes: each block starts with the message's length, big-endian

    def __init__(self, arena: Arena, header_bug: bool = False) -> None:
        self.arena = arena
        self.blocks: collections.deque[Block] = collections.deque()
        self.header_bug = header_bug  # the planted bug: no room allocated for the header

    def put(self, message: bytes) -> Block:
        size = len(message) + (0 if self.header_bug else self.HEADER)
        block = self.arena.alloc(size)
        record = len(message).to_bytes(self.HEADER, "big") + message
        heap = self.arena.heap  # writes through the heap, as code handing offsets around does
        end = min(block.offset + len(record), len(heap))
        heap[block.offset:end] = record[:end - block.offset]
        self.blocks.append(block)
        return block

    def _read(self, block: Block) -> bytes:
        heap = self.arena.heap
        n = int.from_bytes(heap[block.offset:block.offset + self.HEADER], "big")
        return bytes(heap[block.offset + self.HEADER:block.offset + self.HEADER + n])

    def pop(self) -> bytes:
        block = self.blocks.popleft()
        data = self._read(block)
        self.arena.free(block)
        return data

    def messages(self) -> list[bytes]:
        return [self._read(b) for b in self.blocks]


class MessageStoreMachine(ArenaMachine):
    ARENA_SIZE = 16 * 1024
    HEADER_BUG = False

    def setup(self) -> None:
        self.store = MessageStore(self.arena, header_bug=self.HEADER_BUG)
        self.expected: list[tuple[Block, bytes]] = []

    @rule(message=st.binary(min_size=1, max_size=500))
    def put(self, message: bytes) -> None:
        try:
            block = self.store.put(message)
        except ArenaExhausted:
            return
        self.track(block, fill=False)
        self.expected.append((block, message))

    @precondition(lambda self: self.expected)
    @rule()
    def pop(self) -> None:
        block, message = self.expected.pop(0)
        self.untrack(block)
        assert self.store.pop() == message

    @invariant()
    def same_messages(self) -> None:
        assert self.store.messages() == [m for _, m in self.expected]


TestMessageStore = MessageStoreMachine.TestCase
TestMessageStore.settings = QUICK


class HeaderBugMachine(MessageStoreMachine):
    BLOCK_SIZE = 16  # small granules: less padding to hide an overrun
    HEADER_BUG = True


def test_arena_machine_catches_a_write_past_a_block() -> None:
    with pytest.raises(AssertionError):
        run_state_machine_as_test(HeaderBugMachine, settings=HUNT)


def test_builtin_rules_can_be_switched_off() -> None:
    class OnlyMine(MessageStoreMachine):
        BUILTIN_RULES = False

    machine = OnlyMine()
    try:
        machine.put(b"hello")
        machine.arena_agrees_with_model()
        assert machine.failed_allocations == 0
        assert machine.arena.stats().used_bytes == machine.rounded(5)
    finally:
        machine.teardown()
    run_state_machine_as_test(OnlyMine, settings=QUICK)


# -- the documented percpu example: an application's request metrics -------------------------

ROUTES = ("/", "/api", "/login")


class RequestMetrics:
    """The code under test: the wrapper an application writes, one call per request."""

    def __init__(self, domain: Domain, errors_from: int = 500) -> None:
        self.requests = {r: domain.counter("http_requests", {"route": r}) for r in ROUTES}
        self.errors = domain.counter("http_errors")
        self.in_flight = domain.gauge("http_in_flight")
        self.latency = domain.summary("http_request_seconds")
        self.errors_from = errors_from  # the planted bug: counting 4xx as errors

    def start(self) -> None:
        self.in_flight.inc()

    def finish(self, route: str, status: int, seconds: float) -> None:
        self.in_flight.dec()
        self.requests[route].inc()
        if status >= self.errors_from:
            self.errors.inc()
        self.latency.observe(seconds)


class RequestMetricsMachine(DomainMachine):
    ERRORS_FROM = 500

    def setup(self) -> None:
        self.app = RequestMetrics(self.domain, errors_from=self.ERRORS_FROM)
        for route in ROUTES:
            self.expect_registered("counter", "http_requests", {"route": route})
        self.expect_registered("counter", "http_errors")
        self.expect_registered("gauge", "http_in_flight")
        self.expect_registered("summary", "http_request_seconds")
        self.open = 0

    @rule()
    def start(self) -> None:
        self.app.start()
        self.open += 1
        self.expect_add("http_in_flight", None, 1)

    @precondition(lambda self: self.open > 0)
    @rule(route=st.sampled_from(ROUTES), status=st.sampled_from([200, 204, 404, 500, 503]),
          seconds=st.floats(0, 30))
    def finish(self, route: str, status: int, seconds: float) -> None:
        self.app.finish(route, status, seconds)
        self.open -= 1
        self.expect_add("http_in_flight", None, -1)
        self.expect_add("http_requests", {"route": route}, 1)
        if status >= 500:
            self.expect_add("http_errors", None, 1)
        self.expect_observe("http_request_seconds", None, seconds)


TestRequestMetrics = RequestMetricsMachine.TestCase
TestRequestMetrics.settings = QUICK


class ClientErrorsCountedMachine(RequestMetricsMachine):
    ERRORS_FROM = 400


def test_domain_machine_catches_a_miscount() -> None:
    with pytest.raises(AssertionError, match="http_errors"):
        run_state_machine_as_test(ClientErrorsCountedMachine, settings=HUNT)


def test_domain_machine_catches_a_lost_removal() -> None:
    class ForgetfulMachine(DomainMachine):
        """A model that is told of a removal the code under test did not do."""

        @rule()
        def claim_removed(self) -> None:
            self.handle("counter", "ghost")
            self.expect_removed("ghost")

    with pytest.raises(AssertionError, match="ghost"):
        run_state_machine_as_test(ForgetfulMachine, settings=HUNT)


# -- without hypothesis ---------------------------------------------------------------------


@pytest.mark.parametrize("module", ["arena.testing", "percpu.testing"])
def test_import_without_hypothesis_names_the_extra(module: str) -> None:
    code = ("import sys\nsys.modules['hypothesis'] = None\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    print('imported')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert f"{module} needs hypothesis" in result.stdout
    assert "pip install 'percpu-arena[test]'" in result.stdout
