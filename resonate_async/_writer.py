"""The group-commit writer: every durable write of a store goes through one task.

Callers submit operations and await their results; the writer takes everything
queued (up to ``max_rows_per_transaction``), applies it in one transaction,
commits, and only then resolves the callers. It flushes as soon as it is idle:
no linger, so a lone write costs one commit and a burst costs one commit per
few thousand rows. This is the batching idea applied to ourselves.

Admissions wait for progress. The root of a fresh run (``admit_then``) is not
written ahead of work already admitted: each transaction takes the writes of
running work first (child promises, settles, the promise API) and fills the
rest of its rows with admissions, oldest first. So a burst of 100,000
``resonate.run`` calls moves through the pipeline a few transactions at a
time instead of starting 100,000 bodies at once: the same commits, but only a
few thousand runs hold a task, coroutines and futures at any moment (memory,
and the cyclic GC's work, follow the runs in flight, not the runs submitted).
Admissions are delayed only while running work fills whole transactions.

The transaction boundary lives in exactly one place, :meth:`_write`, so a
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
    from collections.abc import Callable
    from typing import TypeAlias

    from ._stats import StoreStats
    from ._telemetry import Tracing
    from .stores._base import Op, PromiseRecord, Store

    #: ``done(arg, record, error)``: called by the writer once an op's transaction ends.
    Done: TypeAlias = Callable[[Any, PromiseRecord | None, BaseException | None], None]

__all__ = ("GroupCommitWriter",)

log = logging.getLogger("resonate_async")

Results = list["PromiseRecord | None"]
# A transaction's results, or the error that failed it.
Outcome = tuple["Results | None", "BaseException | None"]


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
    the callbacks of ops whose writers did not wait (see ``write_then``).

    A callback is three entries at one position of ``indexes``, ``dones`` and
    ``args``: no tuple per callback for the garbage collector to track.
    """

    __slots__ = ("args", "dones", "future", "indexes", "ops")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ops: list[Op] = []
        self.future: asyncio.Future[Results] = _TransactionFuture(loop=loop)
        self.indexes: list[int] = []
        self.dones: list[Done] = []
        self.args: list[Any] = []

    def report(self, results: Results | None, error: BaseException | None) -> None:
        """Resolve the future and run the callbacks; a failing callback is logged."""
        future = self.future
        if error is None:
            future.set_result(results)  # type: ignore[arg-type]
        else:
            future.set_exception(error)
            future.exception()  # retrieved: waiters may be gone already
        for index, done, arg in zip(self.indexes, self.dones, self.args, strict=True):
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
        max_rows_per_transaction: int = 1000,
        tracing: Tracing | None = None,
    ) -> None:
        if max_rows_per_transaction < 1:
            raise ValueError("max_rows_per_transaction must be at least 1")
        self._store = store
        self._stats = stats
        self._max_rows = max_rows_per_transaction
        self._tracing = tracing
        self._queue: deque[_Transaction] = deque()
        # Admissions waiting for a transaction, in three parallel queues.
        self._admit_makes: deque[Callable[[Any], Op]] = deque()
        self._admit_dones: deque[Done] = deque()
        self._admit_args: deque[Any] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        # How many transactions the store may hold at once (see run()).
        self._depth = 2 if getattr(store, "pipeline_depth", 1) >= 2 else 1

    def submit(self, op: Op) -> tuple[asyncio.Future[Results], int]:
        """Queue ``op``; return the future of its transaction and its index in it."""
        if self._closed:
            raise ShutdownError("the store writer is closed; enter `async with resonate` again")
        queue = self._queue
        if not queue or len(queue[-1].ops) >= self._max_rows:
            queue.append(_Transaction(self._loop))
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
        txn.indexes.append(index)
        txn.dones.append(done)
        txn.args.append(arg)

    def admit_then(self, make: Callable[[Any], Op], done: Done, arg: Any) -> None:
        """Like :meth:`write_then`, for the root of a fresh run: written once the
        writes of running work are (see the module's docstring).

        The op is ``make(arg)``, called when the admission enters a
        transaction, so what it records (a lease's start) is of that moment,
        however long the admission waited.
        """
        if self._closed:
            raise ShutdownError("the store writer is closed; enter `async with resonate` again")
        if not self._admit_makes:
            self._wakeup.set()
        self._admit_makes.append(make)
        self._admit_dones.append(done)
        self._admit_args.append(arg)

    async def write(self, op: Op) -> PromiseRecord | None:
        """Write one op durably; return the record as stored after it."""
        future, index = self.submit(op)
        return (await future)[index]

    async def write_for_caller(
        self, op: Op, then: Callable[[PromiseRecord], None] | None = None
    ) -> PromiseRecord | None:
        """:meth:`write` for a caller outside the engine (``promises.*``): one
        cancelled meanwhile unwinds at once, while the write goes on, instead
        of waiting for its commit (a store locked elsewhere may take seconds).
        ``then(record)`` runs once the op's record is committed, whether or
        not the caller still waits."""
        answer: asyncio.Future[PromiseRecord | None] = self._loop.create_future()
        self.write_then(op, _answer, (answer, then))
        return await answer

    def close(self) -> None:
        """Stop accepting writes once the queue is drained; :meth:`run` then returns."""
        self._closing = True
        self._wakeup.set()

    def drop(self) -> None:
        """Discard everything queued (a simulated crash); its writers get ShutdownError."""
        self._fail_queued("dropped by a simulated crash")

    def _fail_queued(self, why: str) -> None:
        """Close, and answer every queued write and admission with ``ShutdownError(why)``."""
        self._closed = True
        while self._queue or self._admit_makes:
            self._next().report(None, ShutdownError(why))

    @property
    def idle(self) -> bool:
        """Whether nothing is queued."""
        return not self._queue and not self._admit_makes

    def _next(self) -> _Transaction:
        """The next transaction: running work's oldest, topped up with admissions."""
        txn = self._queue.popleft() if self._queue else _Transaction(self._loop)
        ops, indexes, dones, args = txn.ops, txn.indexes, txn.dones, txn.args
        makes, admit_dones, admit_args = self._admit_makes, self._admit_dones, self._admit_args
        for _ in range(min(self._max_rows - len(ops), len(makes))):
            arg, make, done = admit_args.popleft(), makes.popleft(), admit_dones.popleft()
            try:
                op = make(arg)
            except Exception as exc:  # (an injected clock's error) fails this admission only
                done(arg, None, exc)
                continue
            indexes.append(len(ops))
            ops.append(op)
            dones.append(done)
            args.append(arg)
        return txn

    async def run(self) -> None:
        """The writer loop. Never dies of a failed transaction; returns after close().

        Under load it keeps the store busy. When a transaction ends and more
        writes are queued, the next transaction starts *before* the ended one
        is reported, so its rows are written while the event loop runs what
        the report wakes. A store that runs its writes one after another in
        the order they are queued (``pipeline_depth = 2``: SQLite, whose
        writes share one thread) gets the next transaction even sooner,
        while the last one is still being written: its thread then goes from
        one commit straight to the next instead of waiting for the event loop
        to hand it more. (So the work that a report wakes has its own writes
        in a later transaction: the order of running work and admissions
        holds, a transaction or two later.)
        """
        queue = self._queue
        admissions = self._admit_makes
        depth = self._depth
        # Transactions handed to the store, oldest first, with their writes.
        in_flight: deque[tuple[_Transaction, asyncio.Task[Outcome]]] = deque()
        try:
            while True:
                if not in_flight:
                    while not queue and not admissions:
                        if self._closing:
                            self._closed = True
                            return
                        self._wakeup.clear()
                        await self._wakeup.wait()
                self._hand_over(in_flight, depth)
                ended, writing = in_flight[0]
                results, error = await writing
                in_flight.popleft()
                self._hand_over(in_flight, depth)
                ended.report(results, error)
                del ended, writing, results  # its ops and records may go as their runs do
                if not in_flight:
                    # Let what the report woke queue its writes before the
                    # next transaction is formed: they are running work,
                    # which goes before admissions. (A store that answers
                    # without suspending would otherwise keep the loop.)
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            writes = [writing for _, writing in in_flight]
            for writing in writes:
                writing.cancel()
            cut = sum(len(txn.ops) for txn, _ in in_flight)
            for txn, _ in in_flight:
                txn.report(None, ShutdownError("shut down while writing; nothing is lost"))
            if not self._closing:
                self._dropped_by_cancel(cut)
            else:  # stopped by aclose() past its grace (a store that hangs)
                self._fail_queued("shut down before this was written")
            # No write waits on a writer that is gone (a run settling its
            # cancel as the event loop ends): it is refused at once.
            self._closed = True
            # Not left running past the writer (a store's commit under way
            # still finishes on its side: committed or not, nothing is lost).
            await asyncio.gather(*writes, return_exceptions=True)
            raise

    def _dropped_by_cancel(self, cut: int) -> None:
        """Say what a cancel without ``close()`` left unwritten (the event loop
        ended before ``aclose()``), and answer its writers. ``cut``: the writes
        of the transactions that were being written (committed or not)."""
        admitted = len(self._admit_makes)
        writes = cut + sum(len(txn.ops) for txn in self._queue)
        if not admitted and not writes:
            return
        log.warning(
            "the store writer was stopped without aclose() (the event loop ended while "
            "runs were in flight): %d runs waiting to be stored were dropped and never "
            "ran, and %d writes queued or being written may not have been made (runs "
            "already stored stay PENDING and resume at the next start)",
            admitted,
            writes,
        )
        self._fail_queued("the store writer was stopped before this was written")

    def _hand_over(
        self, in_flight: deque[tuple[_Transaction, asyncio.Task[Outcome]]], depth: int
    ) -> None:
        """Start writing queued transactions until ``depth`` are in flight."""
        while len(in_flight) < depth and (self._queue or self._admit_makes):
            txn = self._next()
            in_flight.append((txn, self._loop.create_task(self._write(txn.ops))))

    async def _write(self, ops: list[Op]) -> Outcome:
        """Write one transaction: its results, or the error that failed it."""
        started = time.perf_counter()
        try:
            write = self._store.write(ops)
            tracing = self._tracing
            if tracing is not None and tracing.enabled:
                write = tracing.traced(write, "resonate.store.commit", {"resonate.rows": len(ops)})
            results = await write
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc}")
            if error is not exc:
                error.__cause__ = exc
            log.warning("store transaction of %d rows failed: %s", len(ops), exc)
            self._stats.failed_transactions += 1
            return None, error
        self._stats.record_commit(len(ops), time.perf_counter() - started)
        return results, None


def _answer(
    arg: tuple[asyncio.Future[PromiseRecord | None], Callable[[PromiseRecord], None] | None],
    record: PromiseRecord | None,
    error: BaseException | None,
) -> None:
    """The report of a :meth:`GroupCommitWriter.write_for_caller`."""
    answer, then = arg
    if then is not None and error is None and record is not None:
        then(record)
    if answer.done():  # its caller stopped waiting
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(record)
