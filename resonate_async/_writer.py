"""The group-commit writer: every durable write of a store goes through one task.

Callers submit operations and await their results; the writer takes everything
queued (up to ``max_rows_per_transaction``), applies it in one transaction,
commits, and only then resolves the callers. It flushes as soon as it is idle:
no linger, so a lone write costs one commit and a burst costs one commit per
few thousand rows. This is the batching idea applied to ourselves.

The transaction boundary lives in exactly one place, :meth:`_commit`, so a
later *transactional* batch handler can run inside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .errors import ShutdownError, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeAlias

    from ._stats import StoreStats
    from ._telemetry import Tracing
    from .stores._base import Op, PromiseRecord, Store

    #: ``done(arg, record, error)``: called by the writer once an op's transaction ends.
    Done: TypeAlias = Callable[[Any, PromiseRecord | None, BaseException | None], None]

__all__ = ("GroupCommitWriter",)

log = logging.getLogger("resonate_async")

Results = list["PromiseRecord | None"]


class _TransactionFuture(asyncio.Future[Results]):
    """A future that its waiters cannot cancel.

    Many callers await one transaction's future. Cancelling one caller must
    not cancel the future for the others, and a write already handed to the
    store is going to commit or fail anyway: so a cancelled caller unwinds as
    soon as its transaction is done (at most one commit later), without the
    per-caller cost of ``asyncio.shield``.
    """

    def cancel(self, msg: object = None) -> bool:
        return False


class _Transaction:
    """The ops of one future transaction, the one future that reports them, and
    the callbacks of ops whose writers did not wait (see ``write_then``)."""

    __slots__ = ("callbacks", "future", "ops")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ops: list[Op] = []
        self.future: asyncio.Future[Results] = _TransactionFuture(loop=loop)
        self.callbacks: list[tuple[int, Done, Any]] | None = None

    def report(self, results: Results | None, error: BaseException | None) -> None:
        """Resolve the future and run the callbacks; a failing callback is logged."""
        future = self.future
        if error is None:
            future.set_result(results)  # type: ignore[arg-type]
        else:
            future.set_exception(error)
            future.exception()  # retrieved: waiters may be gone already
        for index, done, arg in self.callbacks or ():
            try:
                done(arg, None if results is None else results[index], error)
            except Exception:
                log.exception("a store-write callback failed")


class GroupCommitWriter:
    """Commits queued operations in as few transactions as the backlog allows.

    One future per *transaction*, not per operation: a caller gets the shared
    future plus its index, which keeps 10,000 writes from costing 10,000
    futures. Waiters cannot cancel it (see ``_TransactionFuture``).
    """

    def __init__(
        self,
        store: Store,
        stats: StoreStats,
        *,
        max_rows_per_transaction: int = 5000,
        tracing: Tracing | None = None,
    ) -> None:
        if max_rows_per_transaction < 1:
            raise ValueError("max_rows_per_transaction must be at least 1")
        self._store = store
        self._stats = stats
        self._max_rows = max_rows_per_transaction
        self._tracing = tracing
        self._queue: deque[_Transaction] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._closed = False

    def submit(self, op: Op) -> tuple[asyncio.Future[Results], int]:
        """Queue ``op``; return the future of its transaction and its index in it."""
        if self._closed:
            raise ShutdownError("the store writer is closed; enter `async with resonate` again")
        queue = self._queue
        if not queue or len(queue[-1].ops) >= self._max_rows:
            queue.append(_Transaction(asyncio.get_running_loop()))
            self._wakeup.set()
        txn = queue[-1]
        txn.ops.append(op)
        return txn.future, len(txn.ops) - 1

    def write_then(self, op: Op, done: Done, arg: Any) -> None:
        """Queue ``op`` and return; the writer calls ``done(arg, record, error)`` once
        its transaction commits (``error`` is None) or fails.

        For a writer that has nothing left to do but report the outcome (a run
        settling its root): no task waits and no coroutine stays suspended.
        """
        _, index = self.submit(op)
        txn = self._queue[-1]
        if txn.callbacks is None:
            txn.callbacks = []
        txn.callbacks.append((index, done, arg))

    async def write(self, op: Op) -> PromiseRecord | None:
        """Write one op durably; return the record as stored after it."""
        future, index = self.submit(op)
        return (await future)[index]

    async def write_many(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        """Write several ops durably (in as few transactions as they fit)."""
        slots = [self.submit(op) for op in ops]
        out: list[PromiseRecord | None] = []
        last: asyncio.Future[Results] | None = None
        results: Results = []
        for future, index in slots:
            if future is not last:
                results = await future
                last = future
            out.append(results[index])
        return out

    def close(self) -> None:
        """Stop accepting writes once the queue is drained; :meth:`run` then returns."""
        self._closing = True
        self._wakeup.set()

    def drop(self) -> None:
        """Discard everything queued (a simulated crash); its writers get ShutdownError."""
        self._closed = True
        while self._queue:
            self._queue.popleft().report(None, ShutdownError("dropped by a simulated crash"))

    @property
    def idle(self) -> bool:
        """Whether nothing is queued."""
        return not self._queue

    async def run(self) -> None:
        """The writer loop. Never dies of a failed transaction; returns after close()."""
        queue = self._queue
        while True:
            while not queue:
                if self._closing:
                    self._closed = True
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._commit(queue.popleft())

    async def _commit(self, txn: _Transaction) -> None:
        started = time.perf_counter()
        try:
            write = self._store.write(txn.ops)
            tracing = self._tracing
            if tracing is not None and tracing.enabled:
                write = tracing.traced(
                    write, "resonate.store.commit", {"resonate.rows": len(txn.ops)}
                )
            results = await write
        except asyncio.CancelledError:
            txn.report(None, ShutdownError("shut down while writing; nothing is lost"))
            raise
        except Exception as exc:
            error = exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc}")
            if error is not exc:
                error.__cause__ = exc
            log.warning("store transaction of %d rows failed: %s", len(txn.ops), exc)
            self._stats.failed_transactions += 1
            txn.report(None, error)
            return
        self._stats.record_commit(len(txn.ops), time.perf_counter() - started)
        txn.report(results, None)
