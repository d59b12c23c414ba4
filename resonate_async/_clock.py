"""Time as the engine sees it: a wall clock for timestamps and timers.

Everything time-based in the engine (sleeps, retry back-off, timeouts, lease
heartbeats, ``max_wait`` lingering) goes through a :class:`Clock`, so tests can
swap in :class:`resonate_async.testing.VirtualClock` and take no wall time.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")

__all__ = ("Clock", "SystemClock", "check_seconds", "with_deadline")


def check_seconds(
    name: str,
    value: object,
    *,
    zero_ok: bool = False,
    inf_ok: bool = False,
    none_ok: bool = False,
) -> None:
    """Raise unless ``value`` is a finite number of seconds (not a bool) above
    0, or at least 0 with ``zero_ok``; infinity only with ``inf_ok``; NaN
    fails. The errors name ``name``; with ``none_ok`` (the caller takes
    ``None`` for no limit) the one for infinity says so."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not (value >= 0 if zero_ok else value > 0):  # `not`: NaN fails too
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else 'positive'}, got {value!r}")
    if value == math.inf and not inf_ok:
        hint = " (None means no limit)" if none_ok else ""
        raise ValueError(f"{name} must be finite, got {value!r}{hint}")


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

    The awaitable is cancelled when the deadline passes first, and never
    started when it has passed already (a run resumed after its deadline).
    Works with any clock (``asyncio.timeout`` only knows the loop's own time).
    """
    if clock.now() >= deadline:
        if inspect.iscoroutine(awaitable):
            awaitable.close()  # no "never awaited" warning
        raise TimeoutError
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(deadline - clock.now()))
    try:
        await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Cancelled (a cancel of the run, a shutdown): the work stops with
        # this, not after it (a body's `finally` still running past aclose()).
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    finally:
        timer.cancel()
    if work.done():
        return work.result()
    work.cancel()
    # Let the cancelled work unwind before reporting the timeout.
    await asyncio.gather(work, return_exceptions=True)
    raise TimeoutError
