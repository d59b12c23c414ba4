"""Waiting for promises settled elsewhere: other workers, the promise API, timeouts.

A run's own children settle through this process's writer, which wakes
their waiters directly. A promise settled by another process (an external
promise resolved through the CLI, a remote call run by another worker, a run
another worker owns) is seen by polling the store every ``poll_seconds``,
or at once on PostgreSQL, whose NOTIFY wakes the waiters. One poll reads
every promise waited for at once (:meth:`SettleWatcher.poll_waiters`): a
thousand handles on runs of other workers cost one query a poll, not a
thousand. A PENDING promise past its ``timeout_at`` is settled as timed out
by the first waiter to see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ._clock import with_deadline
from ._handle import Handle
from .errors import NotFoundError, PromiseTimeoutError, ShutdownError, StoreError
from .stores._base import Kind, Settle, State

if TYPE_CHECKING:
    from contextvars import Context

    from ._clock import Clock
    from ._coalesce import Coalescer
    from ._encoding import Encoder
    from ._writer import GroupCommitWriter
    from .errors import NondeterminismError
    from .stores._base import PromiseRecord, Store

__all__ = ("SettleWatcher", "ignore_report")

log = logging.getLogger("resonate_async")

# How many awaited promises one poll reads per query.
_POLL_CHUNK = 500
# Settle notices kept for waiters still to register: each promise store
# notifies every settle of every worker, so only the latest few.
_NOTICES_KEPT = 1024


class SettleWatcher:
    """The waiting half of the engine: local waiters and watched handles (a mixin of ``Engine``)."""

    # Provided by Engine.
    store: Store
    encoder: Encoder
    clock: Clock
    writer: GroupCommitWriter
    loop: asyncio.AbstractEventLoop
    closing: bool
    poll_seconds: float
    stuck: dict[str, NondeterminismError]
    _others: set[asyncio.Task[Any]]
    _waiters: dict[str, list[asyncio.Future[PromiseRecord]]]
    _notified: dict[str, None]
    _someone_waits: asyncio.Event
    _watched: dict[str, Handle[Any]]
    _records: Coalescer[PromiseRecord]

    encoded_none: bytes

    if TYPE_CHECKING:

        def effective_state(self, record: PromiseRecord) -> State: ...

        def answer(self, handle: Handle[Any], record: PromiseRecord) -> Exception | None: ...

        async def settle_cut_sleeps(self, id: str, root_id: str) -> None: ...

    def overdue_settle(self, record: PromiseRecord, now: float) -> Settle:
        """The settle of a PENDING ``record`` past its ``timeout_at``: what every
        reader sees already (a sleep woken, any other promise timed out)."""
        if record.kind is Kind.SLEEP:
            return Settle(record.id, State.RESOLVED, self.encoded_none, now)
        error = self.encoder.encode_error(PromiseTimeoutError(f"{record.id} timed out"))
        return Settle(record.id, State.REJECTED_TIMEDOUT, error, now)

    async def settle_sleeps_of_timed_out_run(self, record: PromiseRecord) -> None:
        """A run's root that a reader settled timed out (its process was down
        past its deadline): settle the sleeps it was in, as its own timeout
        would have, rather than leave them PENDING under it for good."""
        if record.kind in _WITH_SLEEPS and record.state is State.REJECTED_TIMEDOUT:
            with contextlib.suppress(ShutdownError):  # the writer closed: the settle stands
                await self.settle_cut_sleeps(record.id, record.root_id)

    def record_overdue(self, record: PromiseRecord) -> None:
        """Write ``record``'s overdue settle without waiting for it: it came due
        while nobody waited (its process was down), and a replay reads it as
        settled already; its row must not stay PENDING under a settled run."""
        self.writer.write_then(self.overdue_settle(record, self.clock.now()), ignore_report, None)

    def wake(self, record: PromiseRecord) -> None:
        """Tell local waiters that ``record`` settled (after a durable settle)."""
        if self._waiters:
            for waiter in self._waiters.pop(record.id, ()):
                if not waiter.done():
                    waiter.set_result(record)

    def _on_settled_notice(self, id: str) -> None:
        """NOTIFY from the store: a promise settled somewhere; wake its local waiters.

        A notice for an id nobody waits for yet is remembered for a while: a
        waiter reads the promise before it registers, and a settle notified
        in between would otherwise wait for the next poll.
        """
        if self.closing:
            return
        if id in self._waiters:
            self.spawn_other(self._refresh(id))
            return
        notified = self._notified
        notified[id] = None
        if len(notified) > _NOTICES_KEPT:
            del notified[next(iter(notified))]

    async def _refresh(self, id: str) -> None:
        try:
            record = (await self.store.get_many([id])).get(id)
        except StoreError as exc:  # its waiters poll the store anyway
            log.debug("reading %s after its settle notice failed: %s", id, exc)
            return
        if record is not None and record.state is not State.PENDING:
            self.wake(record)

    async def wait_settled(self, record: PromiseRecord) -> PromiseRecord:
        """Wait until ``record`` settles: woken in-process, by a NOTIFY, or by
        :meth:`poll_waiters`.

        A pending promise past its ``timeout_at`` is settled as timed out here.
        """
        clock = self.clock
        while True:
            state = self.effective_state(record)
            if state is State.REJECTED_TIMEDOUT and record.state is State.PENDING:
                op = self.overdue_settle(record, clock.now())
                record = await self.writer.write(op) or record
                self.wake(record)
                await self.settle_sleeps_of_timed_out_run(record)
                return record
            if state is not State.PENDING:
                return record
            waiter: asyncio.Future[PromiseRecord] = self.loop.create_future()
            self._waiters.setdefault(record.id, []).append(waiter)
            self._someone_waits.set()
            if self._notified and record.id in self._notified:
                del self._notified[record.id]
                self.spawn_other(self._refresh(record.id))  # settled since it was read
            try:
                if record.timeout_at is None:
                    record = await waiter
                else:
                    record = await with_deadline(waiter, record.timeout_at, clock)
                continue
            except TimeoutError:  # due: read it once more, it may have settled in time
                pass
            finally:
                waiters = self._waiters.get(record.id)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[record.id]
            fresh = (await self.store.get_many([record.id])).get(record.id)
            if fresh is None:
                raise NotFoundError(f"promise {record.id!r} disappeared from the store")
            record = fresh

    async def poll_waiters(self) -> None:
        """Every ``poll_seconds``, read every promise waited for in one round
        and wake the waiters of those settled (or gone)."""
        # A timer of the clock's own, as each waiter had before they shared
        # one: virtual time stops every poll_seconds while someone waits.
        while True:
            if not self._waiters:
                self._someone_waits.clear()
                await self._someone_waits.wait()
            await self.clock.sleep(self.poll_seconds)
            ids = list(self._waiters)
            for start in range(0, len(ids), _POLL_CHUNK):
                try:
                    await self._poll(ids[start : start + _POLL_CHUNK])
                except StoreError as exc:  # the next poll tries again
                    log.warning("polling %d awaited promises failed: %s", len(ids), exc)
                    break

    async def _poll(self, ids: list[str]) -> None:
        """Wake the waiters of ``ids`` settled (or gone), read in one round
        through ``_records``, whose fallback confines a row that does not
        decode to its own waiters (a ``StoreError`` ends the poll)."""
        outcomes = await asyncio.gather(*map(self._records.load, ids), return_exceptions=True)
        for id, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                continue  # a watcher sharing the read was stopped: read again next poll
            if isinstance(outcome, StoreError):
                raise outcome
            if isinstance(outcome, BaseException):
                if isinstance(outcome, NotFoundError):
                    outcome = NotFoundError(f"promise {id!r} disappeared from the store")
                for waiter in self._waiters.pop(id, ()):
                    if not waiter.done():
                        waiter.set_exception(outcome)
            elif outcome.state is not State.PENDING:
                self.wake(outcome)

    def spawn_other(self, coro: Any, context: Context | None = None) -> asyncio.Task[Any]:
        """Start an owned task that shutdown cancels (watchers, late recoveries);
        in ``context``, else in a copy of the caller's."""
        task = self.loop.create_task(coro, context=context)
        self._others.add(task)
        task.add_done_callback(self._others.discard)
        return task

    def watch(self, id: str) -> Handle[Any]:
        """A handle on a run that this process is not executing.

        One per id while it waits: a status endpoint polling ``get(id)`` with
        a timeout would otherwise leave a watching task per request until the
        run settles (days, for one waiting on a person).
        """
        watched = self._watched.get(id)
        if watched is not None:
            return watched
        handle: Handle[Any] = Handle(id, self.loop)
        if id in self.stuck:
            handle._set_exception(self.stuck[id])
            return handle
        self._watched[id] = handle
        self.spawn_other(self._watch(handle))
        return handle

    async def _watch(self, handle: Handle[Any]) -> None:
        try:
            await self._watch_until_settled(handle)
        finally:
            if self._watched.get(handle.id) is handle:
                del self._watched[handle.id]

    async def _watch_until_settled(self, handle: Handle[Any]) -> None:
        try:
            try:
                record = await self._records.load(handle.id)  # read with the others now
            except NotFoundError as exc:  # one error object per handle, not per round
                raise NotFoundError(str(exc)) from None
            handle._set_created()
            record = await self.wait_settled(record)
            self.answer(handle, record)
        except asyncio.CancelledError:
            handle._set_exception(ShutdownError(f"stopped waiting for {handle.id!r}: shut down"))
            raise
        except Exception as exc:
            handle._set_exception(exc)


# Kinds of promise whose function may sleep: a run's root, a remote call.
_WITH_SLEEPS = frozenset((Kind.RUN, Kind.REMOTE))


def ignore_report(arg: Any, record: PromiseRecord | None, error: BaseException | None) -> None:
    """A write nobody waits for (a failed one is logged by the writer)."""
