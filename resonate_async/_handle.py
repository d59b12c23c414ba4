"""``Handle``: what ``Resonate.run`` and ``Resonate.get`` return."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Generator

__all__ = ("Handle",)

T = TypeVar("T")


class Handle(Generic[T]):
    """The handle of a durable run. ``await handle`` gives its value or raises its error.

    Awaiting is shielded: a caller that stops waiting (a timeout, a cancelled
    web request) never cancels the durable run. To cancel the run itself, call
    :meth:`cancel` or ``resonate.promises.cancel(id)``.

    Attributes:
        id: the run's id.
    """

    __slots__ = ("_created", "_created_waiter", "_future", "_task", "id")

    def __init__(self, id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = id
        self._future: asyncio.Future[T] = loop.create_future()
        self._created = False
        self._created_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the run's task, when it executes here

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<Handle {self.id!r} {state}>"

    def __await__(self) -> Generator[Any, None, T]:
        future = self._future
        if future.done():
            return future.result()
        return (yield from asyncio.shield(future).__await__())

    async def result(self) -> T:
        """The run's value (same as ``await handle``)."""
        return await self

    def done(self) -> bool:
        """Whether the outcome is known to this process."""
        return self._future.done()

    async def created(self) -> None:
        """Return once the run's root promise is durable in the store.

        What a web handler awaits before answering ``202 Accepted``. Raises
        the run's error if it failed before being created (``ConflictError``,
        ``StoreError``).
        """
        if self._created:
            return
        if self._future.done():
            self._future.result()
            return
        if self._created_waiter is None:
            self._created_waiter = self._future.get_loop().create_future()
        waiter = self._created_waiter
        # asyncio.wait never cancels what it waits on, so no shield is needed.
        await asyncio.wait((waiter, self._future), return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            self._future.result()

    def cancel(self) -> bool:
        """Cancel the run if it executes in this process; it settles ``REJECTED_CANCELED``.

        Returns ``False`` when the run is already done or not executing here
        (use ``resonate.promises.cancel(id)`` to cancel it wherever it runs).
        """
        if self._future.done() or self._task is None or self._task.done():
            return False
        self._task.cancel()
        return True

    # -- engine side -----------------------------------------------------------

    def _set_created(self) -> None:
        self._created = True
        if self._created_waiter is not None and not self._created_waiter.done():
            self._created_waiter.set_result(None)

    def _set_result(self, value: T) -> None:
        if not self._future.done():
            self._set_created()
            self._future.set_result(value)

    def _set_exception(self, error: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(error)
            # Failures are durable outcomes; nobody is obliged to await them.
            self._future.exception()
