"""Tools for testing workflows: a virtual clock, a crash helper, pytest fixtures.

Also a pytest plugin (registered through the ``pytest11`` entry point), so the
fixtures ``virtual_clock`` and ``memory_store`` are available in any test of a
project that installs resonate_async.

Example:
    ```python
    async def test_reminder_fires_after_a_day(virtual_clock, memory_store):
        resonate = Resonate(memory_store, clock=virtual_clock)
        resonate.register(remind)
        async with resonate:
            handle = resonate.run("remind-1", remind, "pay rent")
            await virtual_clock.advance(86_400)
            assert await handle == "sent"
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from typing import TYPE_CHECKING

from .stores.memory import MemoryStore

if TYPE_CHECKING:
    from ._resonate import Resonate
    from ._store_suite import StoreConformance as StoreConformance


if not TYPE_CHECKING:  # type checkers see the import above, and no catch-all

    def __getattr__(name: str) -> object:
        # The conformance suite is imported on use, keeping plugin start-up light.
        if name == "StoreConformance":
            from ._store_suite import StoreConformance

            return StoreConformance
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ("MemoryStore", "StoreConformance", "VirtualClock", "crash", "quiesce")


async def quiesce(rounds: int = 1000) -> None:
    """Let the event loop run until nothing is ready to run (at most ``rounds`` steps).

    Work waiting on threads (aiosqlite) is not visible to this; use it with
    ``MemoryStore`` for exact, instant tests.
    """
    await _idle(rounds)


async def _idle(rounds: int) -> bool:
    """``quiesce``; whether the loop was seen idle (``False``: it ran
    ``rounds`` steps and was still busy, or this loop cannot tell)."""
    global _quiescing
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)  # CPython's loops; others fall back to rounds
    idle = 0
    _quiescing += 1
    try:
        for _ in range(rounds):
            await asyncio.sleep(0)
            # Idle: nothing ready but the other quiesce() calls' own next steps
            # (a test's and an autojump clock's would otherwise keep each other
            # from ever seeing an idle loop, and the clock would jump anyway).
            if ready is not None and len(ready) < _quiescing:
                idle += 1
                if idle >= 3:
                    return True
            else:
                idle = 0
        return False
    finally:
        _quiescing -= 1


async def _until_idle() -> None:
    """Before virtual time moves: let the loop run until it is idle, over more
    steps than one ``quiesce`` (a run of a thousand steps that await
    nothing takes several), up to 20,000: a task spinning on
    ``asyncio.sleep(0)`` (a test polling a flag) is never idle, and costs each
    move of time that many steps. On a loop that cannot tell (uvloop) it is
    one ``quiesce``."""
    if getattr(asyncio.get_running_loop(), "_ready", None) is None:
        await _idle(1000)
        return
    for _ in range(20):
        if await _idle(1000):
            return


# How many quiesce() calls are running now (a test's, an autojump clock's).
_quiescing = 0


class VirtualClock:
    """A clock whose time moves only when told: sleeps, retries and timeouts take no wall time.

    Pass it as ``Resonate(..., clock=clock)``; then ``await clock.advance(s)``
    moves time forward, firing due timers in order and letting the loop settle
    after each. With ``autojump=True`` time also jumps to the next timer
    whenever the loop is idle (like trio's autojump clock), so a test can just
    ``await handle``.

    Args:
        start: the initial time, in seconds since the epoch.
        autojump: jump to the next timer whenever the loop is idle.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, autojump: bool = False) -> None:
        self._now = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._pushed = 0  # sleeps since the timers were last purged
        self._autojump = autojump
        self._jumper: asyncio.Task[None] | None = None
        self._polls: list[tuple[float, asyncio.Future[None]]] = []
        # advance() calls running: an autojump clock waits for them to end
        # (time is theirs to move), on ``_resume``.
        self._advancing = 0
        self._resume: asyncio.Future[None] | None = None

    def now(self) -> float:
        """The virtual time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Return once virtual time has moved ``seconds`` forward."""
        _check_duration(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timers = self._timers
        self._pushed += 1
        # Amortized: once the sleeps since the last purge are half the heap.
        if len(timers) > 64 and 2 * self._pushed > len(timers):
            # Drop the timers nobody waits for any more (cut short when a
            # deadline's work ended first): a long test would pile them up.
            self._pushed = 0
            self._timers = timers = [t for t in timers if not t[2].done()]
            heapq.heapify(timers)
        heapq.heappush(timers, (self._now + seconds, next(self._seq), future))
        self._start_jumping()
        try:
            await future
        finally:
            future.cancel()

    async def poll(self, seconds: float) -> None:
        """Return once virtual time has moved ``seconds`` forward, at the next
        point where the clock stops anyway.

        For the engine's background polls (claiming free runs): unlike
        ``sleep``, a poll is not a timer that ``advance`` stops at,
        so advancing a virtual day does not stop at every second to poll. A
        due poll returns when a timer fires, when an ``advance`` ends, or
        when an autojump clock has no timer left to jump to.
        """
        _check_duration(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._now + seconds, future)
        self._polls.append(entry)
        self._start_jumping()
        try:
            await future
        finally:
            future.cancel()
            if future.cancelled():  # not released: the waiter left, so must its entry
                with contextlib.suppress(ValueError):
                    self._polls.remove(entry)

    def _start_jumping(self) -> None:
        """With autojump, make sure a task jumps time whenever the loop is idle."""
        if not self._autojump:
            return
        jumper, loop = self._jumper, asyncio.get_running_loop()
        # A jumper of another loop (a module-scoped test's, alive but not
        # running) would never jump for this one.
        if jumper is None or jumper.done() or jumper.get_loop() is not loop:
            self._jumper = loop.create_task(self._jump())

    def _release_polls(self) -> None:
        """Return from every poll that is due."""
        now = self._now
        due = [future for when, future in self._polls if when <= now or future.done()]
        if due:
            self._polls = [(w, f) for w, f in self._polls if w > now and not f.done()]
            for future in due:
                if not future.done():
                    future.set_result(None)

    @property
    def pending_timers(self) -> int:
        """How many ``sleep`` calls on this clock are waiting: every timer, not just a run's.

        That is durable sleeps (``ctx.sleep``), retry back-offs and timeout
        deadlines, and also the engine's own timers: while a ``Resonate`` on
        this clock is started, its lease heartbeat keeps one timer pending at
        all times, and polling promises settled elsewhere (a handle on a run
        another worker owns, an external promise) adds one while anything
        waits for them. So a started, idle ``Resonate`` counts 1, not 0, once
        its heartbeat task has run (after ``await quiesce()``; 0 right after
        ``start()``): compare with that count to tell whether a run is sleeping.
        """
        return sum(1 for _, _, f in self._timers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer due on the way."""
        if isinstance(seconds, int | float) and seconds < 0:
            raise ValueError("time only moves forward")
        _check_duration(seconds)
        target = self._now + seconds
        self._advancing += 1
        try:
            await _until_idle()
            while self._timers and self._timers[0][0] <= target:
                when, _, future = heapq.heappop(self._timers)
                if future.done():
                    continue
                self._now = max(self._now, when)
                future.set_result(None)
                self._release_polls()
                await _until_idle()
            # Never back: another advance may have gone further meanwhile.
            self._now = max(self._now, target)
            self._release_polls()
            await _until_idle()
        finally:
            self._advancing -= 1
            resume = self._resume
            if not self._advancing and resume is not None and not resume.done():
                resume.set_result(None)

    async def _jump(self) -> None:
        while True:
            await _until_idle()
            if self._advancing:  # an advance() moves time meanwhile
                self._resume = asyncio.get_running_loop().create_future()
                await self._resume
                continue
            while self._timers and self._timers[0][2].done():
                heapq.heappop(self._timers)
            polls = [when for when, future in self._polls if not future.done()]
            if not self._timers:
                if not polls:
                    return
                # Nothing else would move time: jump to the next poll.
                self._now = max(self._now, min(polls))
                self._release_polls()
                continue
            when, _, future = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            future.set_result(None)
            self._release_polls()


def _check_duration(seconds: float) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"a virtual duration must be a number of seconds, got {seconds!r}")
    if seconds != seconds:  # NaN: it would stop time, or break the timer heap
        raise ValueError("a virtual duration must be a number of seconds, not NaN")
    if seconds == math.inf:  # a timer no advance reaches, and autojump would try
        raise ValueError(
            "a virtual duration must be finite; to wait for ever, await a future that nothing sets"
        )


async def crash(resonate: Resonate) -> None:
    """Abandon ``resonate`` mid-run, as if its process had been killed.

    Every task is dropped at once: nothing queued is written, no run is
    settled, batches in flight are abandoned. The store is then closed
    (uncommitted work rolls back), so a test can start another ``Resonate`` on
    the same store and check recovery.
    """
    # An engine whose loop ended is dropped already, as a crash would drop it.
    engine = resonate._engine_to_stop(
        "crash it from that loop (a fixture of a wider loop scope started it?)"
    )
    if engine is None:
        return
    resonate._engine = None
    await engine.abandon()
    await engine.store.close()


try:  # the fixtures need pytest; the clock and crash helper do not
    import pytest
except ImportError:  # pragma: no cover
    pass
else:
    # Plain fixtures, not pytest-asyncio's: they work with any async plugin
    # (pytest-asyncio in any mode or loop scope, anyio) or none.

    @pytest.fixture
    def virtual_clock() -> VirtualClock:
        """A fresh ``VirtualClock`` (explicit ``advance``)."""
        return VirtualClock()

    @pytest.fixture
    def memory_store() -> MemoryStore:
        """A fresh ``MemoryStore`` (it needs no opening or closing)."""
        return MemoryStore()
