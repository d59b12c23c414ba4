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

from ._invoke import being_cancelled
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
            found: Mapping[str, T | BaseException] | BaseException = await self._read_many(
                list(wanted)
            )
        except asyncio.CancelledError:
            if being_cancelled():  # a shutdown: so are the callers waiting
                for future in wanted.values():
                    future.cancel()
                raise
            # A read that raised CancelledError on its own: an error of the
            # read, not a cancel of the runs waiting for it.
            found = RuntimeError("a store read raised CancelledError without being cancelled")
        except Exception as exc:
            found = exc
        if isinstance(found, BaseException):
            if len(wanted) > 1 and not isinstance(found, StoreError):
                # Not the store being down: one bad key (a row that does not
                # decode, say) fails only its own callers.
                await self._read_one_by_one(wanted)
            else:
                _fail(wanted, found)
            return
        try:
            for key, future in wanted.items():
                if future.done():  # its caller was cancelled meanwhile
                    continue
                value = found[key] if key in found else self._missing(key)
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except Exception as exc:  # a read_many that broke its contract (no mapping)
            _fail(wanted, exc)

    async def _read_one_by_one(self, wanted: dict[str, asyncio.Future[T]]) -> None:
        try:
            for key, future in wanted.items():
                if future.done():
                    continue
                await self._read({key: future})
                error = None if future.cancelled() else future.exception()
                if isinstance(error, StoreError):  # the store went down meanwhile
                    _fail(wanted, error)
                    return
        except BaseException:  # cancelled (a shutdown): so are the callers left
            for future in wanted.values():
                future.cancel()
            raise


def _fail(wanted: dict[str, asyncio.Future[Any]], error: BaseException) -> None:
    for future in wanted.values():
        if not future.done():
            future.set_exception(error)
