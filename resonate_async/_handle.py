"""``Handle``: what ``Resonate.run`` and ``Resonate.get`` return."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Generator
    from types import TracebackType

__all__ = ("Handle", "without_frames")

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

_PENDING, _RESULT, _ERROR = range(3)


class Handle(Generic[T]):
    """The handle of a durable run. ``await handle`` gives its value or raises its error.

    Awaiting is shielded: a caller that stops waiting (a timeout, a cancelled
    web request) never cancels the durable run. To cancel the run itself, call
    ``cancel()`` or ``resonate.promises.cancel(id)``.

    Attributes:
        id: the run's id.
    """

    # Each waiter gets its own future, so a waiter that is cancelled takes
    # nothing from the others and nothing from the run (no asyncio.shield,
    # which costs a future and a callback hop per waiter). A handle nobody
    # awaits yet holds no future at all.
    __slots__ = (
        "_created",
        "_created_waiters",
        "_loop",
        "_outcome",
        "_state",
        "_task",
        "_traceback",
        "_waiters",
        "id",
    )

    def __init__(self, id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = id
        self._loop = loop
        self._state = _PENDING
        self._outcome: Any = None
        self._created = False
        self._waiters: list[asyncio.Future[None]] | None = None
        self._created_waiters: list[asyncio.Future[None]] | None = None
        self._task: asyncio.Task[Any] | None = None  # the run's task, when it executes here
        self._traceback: TracebackType | None = None

    def __repr__(self) -> str:
        state = "pending" if self._state == _PENDING else "done"
        return f"<Handle {self.id!r} {state}>"

    def __await__(self) -> Generator[Any, None, T]:
        if self._state == _PENDING:
            yield from self._wait(created=False).__await__()
        return self._value()

    async def result(self) -> T:
        """The run's value (same as ``await handle``)."""
        return await self

    def done(self) -> bool:
        """Whether the outcome is known to this process."""
        return self._state != _PENDING

    async def created(self) -> None:
        """Return once the run's root promise is durable in the store.

        What a web handler awaits before answering ``202 Accepted``. Raises
        the run's error if it failed before being created (``ConflictError``,
        ``StoreError``).
        """
        if not self._created and self._state == _PENDING:
            await self._wait(created=True)
        if not self._created:
            self._value()  # done without being created: raise why

    def cancel(self) -> bool:
        """Request that the run be cancelled, if it executes in this process.

        ``True`` means the cancel was requested, not that the run is
        cancelled already: the handle is still pending and the stored
        promise still ``PENDING`` when this returns. The cancellation reaches
        the run's body as an ``asyncio.CancelledError`` at its next ``await``
        (or as it starts), and the run then settles ``REJECTED_CANCELED``,
        after which ``await handle`` raises ``CanceledError``. (A body that
        catches the ``CancelledError`` and returns settles with its value.)

        Returns ``False`` when the run is already done or not executing here
        (use ``resonate.promises.cancel(id)`` to cancel it wherever it runs).
        Right after ``resonate.run(id, ...)``, before the store has answered
        whether ``id`` was new, a cancel is recorded and applied to the run
        with that id when the answer comes, wherever it executes.
        """
        if self._state != _PENDING or self._task is None or self._task.done():
            return False
        self._task.cancel()
        return True

    def _value(self) -> T:
        if self._state == _ERROR:
            # From the traceback it was set with, as asyncio.Future.result
            # does: raising the one error object again would stack each
            # await's frames onto it, for as long as the handle lives.
            raise cast("BaseException", self._outcome).with_traceback(self._traceback)
        return cast("T", self._outcome)

    def _wait(self, *, created: bool) -> asyncio.Future[None]:
        """A future of this waiter alone, woken when the run is done (or created)."""
        if asyncio.get_running_loop() is not self._loop:  # asyncio would say less
            raise RuntimeError(
                f"the handle of run {self.id!r} belongs to another event loop: await it in "
                "the loop that started the run (in pytest-asyncio, give the tests that "
                "share it the loop scope of the fixture or module that started it)"
            )
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiters = self._created_waiters if created else self._waiters
        if waiters is None:
            waiters = []
            if created:
                self._created_waiters = waiters
            else:
                self._waiters = waiters
        elif len(waiters) >= 16:  # forget callers that stopped waiting
            waiters[:] = [w for w in waiters if not w.done()]
        waiters.append(waiter)
        return waiter

    # -- engine side -----------------------------------------------------------

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():  # a done one is a caller that stopped waiting
                waiter.set_result(None)

    def _set_created(self) -> None:
        if not self._created:
            self._created = True
            if self._created_waiters is not None:
                self._wake(self._created_waiters)
                self._created_waiters = None

    def _done(self, state: int, outcome: Any) -> None:
        self._outcome = outcome
        self._state = state
        if self._waiters is not None:
            self._wake(self._waiters)
            self._waiters = None
        if self._created_waiters is not None:
            self._wake(self._created_waiters)
            self._created_waiters = None

    def _set_result(self, value: T) -> None:
        if self._state == _PENDING:
            self._created = True
            self._done(_RESULT, value)

    def _set_exception(self, error: BaseException) -> None:
        # Failures are durable outcomes; nobody is obliged to await them.
        if self._state == _PENDING:
            self._traceback = error.__traceback__
            self._done(_ERROR, error)


def without_frames(error: E) -> E:
    """``error`` without the frames it was raised through, for a handle's outcome.

    A handle may be kept for long (a dict of started runs); a frame holds its
    caller's, and so on up: the error of a settled record read in the writer's
    report would pin the whole write batch. A context hidden by ``from None``
    goes too.
    """
    error.__traceback__ = None
    if error.__suppress_context__:
        error.__context__ = None
    return error
