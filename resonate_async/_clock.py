"""Time as the engine sees it: a wall clock for timestamps and timers.

Everything time-based in the engine (sleeps, retry back-off, timeouts, lease
heartbeats, ``max_wait`` lingering) goes through a :class:`Clock`, so tests can
swap in :class:`resonate_async.testing.VirtualClock` and take no wall time.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")

__all__ = ("Clock", "SystemClock", "with_deadline")


@runtime_checkable
class Clock(Protocol):
    """A source of time: seconds since the epoch and a cancellable sleep."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` of this clock's time have passed."""
        ...


class SystemClock:
    """The real clock: ``time.time()`` and ``asyncio.sleep``."""

    __slots__ = ()

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Sleep in wall time."""
        await asyncio.sleep(max(0.0, seconds))


async def with_deadline(awaitable: Awaitable[T], deadline: float, clock: Clock) -> T:
    """Await ``awaitable``, or raise ``TimeoutError`` once ``clock`` reaches ``deadline``.

    The awaitable is cancelled when the deadline passes first. Works with any
    clock (``asyncio.timeout`` only knows the loop's own time).
    """
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(deadline - clock.now()))
    try:
        await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        timer.cancel()
    if work.done():
        return work.result()
    work.cancel()
    # Let the cancelled work unwind before reporting the timeout.
    await asyncio.gather(work, return_exceptions=True)
    raise TimeoutError
