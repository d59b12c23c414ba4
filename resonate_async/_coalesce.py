"""Reads asked for in one loop iteration, made in one round and answered together.

Runs resumed by one claim start in the same iteration. Each reading its own
tree and going on as soon as it has it would replay them one by one, and
their first live command would reach an idle batcher alone (a thousand
recovered runs, a thousand batches of one); each handle reading its own row
costs a query apiece. Coalesced, a thousand reads are one round trip (see the
stores' optional ``trees``), and the runs replay together: their commands batch.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Mapping

__all__ = ("Coalescer",)

T = TypeVar("T")


class Coalescer(Generic[T]):
    """``load(key)`` returns a future; the keys asked for in one iteration are
    read by one call of ``read_many(keys)`` (a mapping to values or errors; a
    key it leaves out gets ``missing(key)``), in a task of ``spawn``'s."""

    __slots__ = ("_missing", "_read_many", "_spawn", "_wanted")

    def __init__(
        self,
        read_many: Callable[[list[str]], Awaitable[Mapping[str, T | BaseException]]],
        missing: Callable[[str], T | BaseException],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self._read_many = read_many
        self._missing = missing
        self._spawn = spawn
        self._wanted: dict[str, asyncio.Future[T]] | None = None

    def load(self, key: str) -> asyncio.Future[T]:
        """The value of ``key``, read with the others asked for now."""
        wanted = self._wanted
        loop = asyncio.get_running_loop()
        if wanted is None:
            wanted = self._wanted = {}
            # An empty context: the read is no caller's (not the first one's spans).
            loop.call_soon(self._flush, context=contextvars.Context())
        future = wanted.get(key)
        if future is None:
            future = wanted[key] = loop.create_future()
        return future

    def _flush(self) -> None:
        wanted, self._wanted = self._wanted, None
        if wanted:
            self._spawn(self._read(wanted))

    async def _read(self, wanted: dict[str, asyncio.Future[T]]) -> None:
        try:
            found = await self._read_many(list(wanted))
        except asyncio.CancelledError:  # a shutdown: so are the callers waiting
            for future in wanted.values():
                future.cancel()
            raise
        except Exception as exc:
            if len(wanted) > 1 and not isinstance(exc, StoreError):
                # Not the store being down: one bad key (a row that does not
                # decode, say) fails only its own callers.
                try:
                    for key, future in wanted.items():
                        await self._read({key: future})
                finally:
                    for future in wanted.values():
                        future.cancel()  # a no-op on those answered
                return
            for future in wanted.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for key, future in wanted.items():
            if future.done():  # its caller was cancelled meanwhile
                continue
            value = found[key] if key in found else self._missing(key)
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)
