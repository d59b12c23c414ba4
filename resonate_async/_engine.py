"""The engine: what exists between ``start()`` and ``aclose()``, and the tasks it owns.

``Resonate`` is the public face; the engine owns every task it starts: one
per run, the group-commit writer, the batcher workers and the lease
heartbeat. Shutdown stops them in order (runs, then batchers within the
grace period, then the writer once drained), so no task outlives
``async with resonate``. (A batcher or background task that ignores its
cancellation is logged and left behind after as long again as the grace
period, at least 5 s; a run body is waited for, as its ``finally`` may
need to finish.) Its halves, one idea each:

* ``RunDriver`` (``_runs``): root runs from admission to settle;
* ``Attempts`` (``_attempts``): a call under its retry policy;
* ``LeaseKeeper`` (``_leases``): claiming and renewing leases;
* ``SettleWatcher`` (``_waiting``): waiting on promises settled elsewhere.

This file keeps the lifecycle and reading a stored outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from ._batcher import Batcher
from ._coalesce import Coalescer
from ._handle import without_frames
from ._leases import LeaseKeeper, abandoned_workers
from ._runs import RunDriver, RunState
from ._stats import RunStats, StoreStats
from ._telemetry import Tracing
from ._waiting import SettleWatcher
from ._writer import GroupCommitWriter
from .errors import (
    CanceledError,
    EncodingError,
    NondeterminismError,
    NotFoundError,
    PromiseTimeoutError,
    StoredError,
    StoreError,
)
from .stores._base import Kind, PromiseRecord, State

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._clock import Clock
    from ._context import Context
    from ._encoding import Encoder
    from ._handle import Handle
    from ._registry import HandlerEntry, Registry
    from .retry import RetryPolicy
    from .stores._base import Store

__all__ = ("Engine", "argument_path")

log = logging.getLogger("resonate_async")

# How long shutdown waits for a background task it cancelled (at least).
_CANCEL_SECONDS = 5.0

# Read on every settled child: a module global is cheaper than an Enum class attribute.
_RESOLVED = State.RESOLVED


class Engine(RunDriver, LeaseKeeper, SettleWatcher):
    """Everything that lives between start and shutdown."""

    def __init__(
        self,
        *,
        store: Store,
        registry: Registry,
        encoder: Encoder,
        clock: Clock,
        dependencies: dict[str, Any],
        worker_id: str,
        step_retry_policy: RetryPolicy,
        lease_seconds: float,
        heartbeat_seconds: float,
        poll_seconds: float,
        grace_seconds: float,
        max_rows_per_transaction: int,
        replay_every_step: bool = False,
        tracing: bool = False,
        tracer_provider: Any = None,
    ) -> None:
        # Remote call targets not registered here, told once each (see note_remote_elsewhere).
        self._told_elsewhere: set[str] = set()
        # What becomes of a run left PENDING, as errors say it.
        self.resumes = "resumes at the next start"
        self.replay_every_step = replay_every_step
        # Replay-every-step mode: the bodies unwinding for a restart.
        self.restarting: set[Context] = set()
        self.tracing = Tracing(tracing, tracer_provider)
        self.store = store
        self.registry = registry
        self.encoder = encoder
        self.clock = clock
        self.dependencies = dependencies
        self.worker_id = worker_id
        self.step_retry_policy = step_retry_policy
        self.lease_seconds = lease_seconds
        self.leases_until = clock.now() + lease_seconds
        self._confirming: asyncio.Task[None] | None = None
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.store_stats = StoreStats()
        self.run_stats = RunStats()
        self.writer = GroupCommitWriter(
            store,
            self.store_stats,
            max_rows_per_transaction=max_rows_per_transaction,
            tracing=self.tracing,
        )
        self.batchers: dict[type, Batcher] = {}
        self.runs: dict[str, RunState] = {}
        self.encoded_none = encoder.encode(None)
        self.closing = False
        # The loop, kept: asyncio.get_running_loop() makes a getpid system call.
        self.loop = asyncio.get_running_loop()
        self._services: list[asyncio.Task[None]] = []
        self._batcher_tasks: list[asyncio.Task[None]] = []
        self._others: set[asyncio.Task[Any]] = set()  # watchers of get() handles
        self._waiters: dict[str, list[asyncio.Future[PromiseRecord]]] = {}
        self._watched: dict[str, Handle[Any]] = {}  # see SettleWatcher.watch
        # Ids of the last settle notices nobody waited for (see SettleWatcher.wait_settled).
        self._notified: dict[str, None] = {}
        self._someone_waits = asyncio.Event()
        # Runs stopped by nondeterminism: PENDING in the store, not retried here.
        self.stuck: dict[str, NondeterminismError] = {}
        # Runs stopped here by a store failure, whose leases the claim loop frees.
        self.store_failed: dict[str, float] = {}  # id -> when to free its lease
        # id -> (store failures of that run here, the time of the last one).
        self.store_failures: dict[str, tuple[int, float]] = {}
        # Held while leases are freed and claimed, so those never interleave.
        self.claiming = asyncio.Lock()
        self._claim_wakeup = asyncio.Event()
        self._claim_lost = False  # a claim failed: rows may be leased here, not running
        self._to_free: list[str] = []
        self._just_freed: set[str] = set()
        self._listening = False
        # Stores that only processes of this host can open (SQLite) let a dead
        # pid free its leases at once; networked stores wait for the lease.
        self._single_host = bool(getattr(store, "single_host", False))
        # The writer's callbacks, bound once rather than once per run.
        self._histories: Coalescer[list[PromiseRecord]] = Coalescer(
            self._read_trees, lambda root: [], self.spawn_other
        )
        self._records: Coalescer[PromiseRecord] = Coalescer(store.get_many, _gone, self.spawn_other)
        self._on_root_op = self._root_op
        self._on_root_created = self._root_created
        self._on_root_settled = self._root_settled

    def note_remote_elsewhere(self, name: str) -> None:
        """Say once per name that a remote call's function is not registered
        here: the call waits until a worker that registers it claims it."""
        if name not in self._told_elsewhere:
            self._told_elsewhere.add(name)
            log.info(
                "remote calls of %r wait for a worker that registers it: this one does "
                "not, and nothing runs them until one does",
                name,
            )

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer, the batchers and the heartbeat, then recover runs."""
        # A worker id that testing.crash abandoned is alive again once restarted
        # (its previous incarnation's leases are freed below, at start).
        abandoned_workers.discard(self.worker_id)
        self._services.append(self._spawn_service(self.writer.run(), "writer"))
        for entry in self.registry.handlers():
            self.add_batcher(entry)
        self._services.append(self._spawn_service(self._heartbeat(), "heartbeat"))
        listen = getattr(self.store, "listen", None)
        if listen is not None:  # PostgreSQL: woken by NOTIFY instead of polling
            await listen(self._on_settled_notice)
            self._listening = True
        try:
            await self._release_dead_owners(own=True)
            await self.recover()
        except StoreError as exc:
            # The store opened, so this is passing (another process's long
            # lock on a SQLite file, a backup, a VACUUM): start all the same,
            # and let the claim loop free this id's old leases and resume its
            # runs at its first poll, instead of failing (and crash-looping
            # under a supervisor) until the lock clears.
            log.warning("resuming pending runs at start failed: %s; retried at each poll", exc)
            self._claim_lost = True
        self._services.append(self._spawn_service(self._claim_loop(), "claims"))
        self._services.append(self._spawn_service(self.poll_waiters(), "waits"))

    def _spawn_service(self, coro: Any, name: str) -> asyncio.Task[None]:
        # An empty context: not the variables (an OpenTelemetry span, say)
        # of whoever called start(), which would reach every batch and commit.
        task: asyncio.Task[None] = self.loop.create_task(
            coro, name=f"resonate-{name}", context=contextvars.Context()
        )
        task.add_done_callback(self._service_done)
        return task

    @staticmethod
    def _service_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "resonate background task %s crashed", task.get_name(), exc_info=task.exception()
            )

    def add_batcher(self, entry: HandlerEntry) -> None:
        """Create the batcher of a handler registered before or after start."""
        batcher = Batcher(self, entry)
        self.batchers[entry.command_type] = batcher
        for n in range(entry.concurrency):
            self._batcher_tasks.append(
                self._spawn_service(batcher.run_worker(), f"batcher-{entry.name}-{n}")
            )

    async def shutdown(self) -> None:
        """Stop new work, cancel runs, finish batches in grace, drain the writer, close."""
        self.closing = True
        runs = [r._task for r in self.runs.values() if r._task is not None]
        others = list(self._others)
        for task in (*runs, *others):
            task.cancel()
        # A run whose cancel lands in a store write unwinds once that write
        # commits, which a store that hangs (a lock held elsewhere, a lost
        # connection) never does: not waited for past the bound. Stopping the
        # writer below answers its write with ShutdownError.
        waiting = [t for t in (*runs, *others) if not t.done()]
        if waiting:
            bound = max(self.grace_seconds, _CANCEL_SECONDS)
            _, still = await asyncio.wait(waiting, timeout=bound)
            if still:
                log.warning(
                    "%d tasks still wait for the store %.1fs after their cancellation; "
                    "stopping the writer under them",
                    len(still),
                    bound,
                )
        for batcher in self.batchers.values():
            batcher.close()
        await self._finish(self._batcher_tasks, self.grace_seconds)
        self.writer.close()
        await self._finish(self._services[:1], self.grace_seconds)
        await self._finish(self._services, 0)
        await self._finish(runs, 0)  # those the writer's end let go
        # A renewal the heartbeat or a batch started during the grace period.
        await self._finish([*self._others], 0)
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.cancel()
        self._waiters.clear()
        if self._listening:
            self._listening = False
            with contextlib.suppress(Exception):
                await self.store.unlisten(self._on_settled_notice)  # type: ignore[attr-defined]

    async def abandon(self) -> None:
        """Drop everything at once, as a crash would: nothing settled, nothing flushed."""
        tasks = self.drop()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.drop()

    def drop(self) -> list[asyncio.Task[Any]]:
        """Start a crash without waiting for it: discard what is queued to be
        written and cancel every task; return those tasks."""
        self.closing = True
        abandoned_workers.add(self.worker_id)
        self.writer.drop()
        tasks = [r._task for r in self.runs.values() if r._task is not None]
        tasks += [*self._others, *self._batcher_tasks, *self._services]
        for task in tasks:
            task.cancel()
        return tasks

    @staticmethod
    async def _finish(tasks: Sequence[asyncio.Task[None]], grace: float) -> None:
        pending = [t for t in tasks if not t.done()]
        if pending and grace > 0:
            _, still = await asyncio.wait(pending, timeout=grace)
            if still:
                log.warning("%d background tasks did not finish within %.1fs", len(still), grace)
            pending = list(still)
        for task in pending:
            task.cancel()
        if pending:
            # A cancel lands at once, unless the code it lands in ignores it
            # (a handler that catches CancelledError and goes on): after as long
            # again, such a task is left behind, not waited for for ever.
            bound = max(grace, _CANCEL_SECONDS)
            _, still = await asyncio.wait(pending, timeout=bound)
            for task in still:
                log.error(
                    "background task %s ignored its cancellation for %.1fs; left running",
                    task.get_name(),
                    bound,
                )
        await asyncio.gather(*(t for t in tasks if t.done()), return_exceptions=True)

    # -- encoding helpers ------------------------------------------------------

    async def _read_trees(self, roots: list[str]) -> dict[str, list[PromiseRecord] | BaseException]:
        """The trees of ``roots``: in one call where the store has ``trees``."""
        many = getattr(self.store, "trees", None)  # optional: see Store
        if many is not None:
            return cast("dict[str, list[PromiseRecord] | BaseException]", await many(roots))
        trees = await asyncio.gather(*(self.store.tree(r) for r in roots), return_exceptions=True)
        return {
            # A read that raised CancelledError on its own: an error, not a cancel.
            root: RuntimeError(f"reading {root!r} raised CancelledError")
            if isinstance(tree, asyncio.CancelledError)
            else tree
            for root, tree in zip(roots, trees, strict=True)
        }

    def encode_for(self, value: Any, where: str) -> bytes:
        """Encode ``value`` or raise ``EncodingError`` naming the call."""
        try:
            return self.encoder.encode(value)
        except EncodingError as exc:
            raise EncodingError(f"{where}: {exc}") from None

    def encode_args(self, args: Sequence[Any], kwargs: dict[str, Any], where: str) -> bytes:
        """Encode a call's arguments or raise ``EncodingError`` naming the call
        and the argument (not the ``[args, kwargs]`` list they are stored as)."""
        try:
            return self.encoder.encode([list(args), kwargs])
        except EncodingError as exc:
            raise EncodingError(f"{where}: {argument_path(str(exc))}") from None

    def try_encode_args(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bytes | None:
        """Encoded step arguments for inspection, or ``None`` when not encodable."""
        try:
            return self.encoder.encode([list(args), kwargs])
        except EncodingError:
            return None

    def outcome(self, record: PromiseRecord) -> Any:
        """The decoded value of a settled record, or raise its decoded error."""
        state = record.state
        if state is not _RESOLVED:
            state = self.effective_state(record)
        if state is _RESOLVED:  # stored RESOLVED: the hot path, no clock, no timeout rule
            value = record.value
            if value is None:
                return None
            try:
                return self.encoder.decode(value)
            except EncodingError as exc:
                raise EncodingError(
                    f"the value of {record.id!r} does not decode here: {exc}; make its "
                    "type importable where it is read (a class of the script run as "
                    "__main__ is not)"
                ) from None
        if record.value is not None and record.state is not State.PENDING:
            raise self.encoder.decode_error(record.value)
        if state is State.REJECTED_CANCELED:
            raise CanceledError(f"promise {record.id!r} was canceled")
        if state is State.REJECTED_TIMEDOUT:
            raise PromiseTimeoutError(f"promise {record.id!r} timed out")
        if state is State.REJECTED:
            raise StoredError("unknown", f"promise {record.id!r} was rejected")
        raise RuntimeError(f"promise {record.id!r} is still pending")

    def answer(self, handle: Handle[Any], record: PromiseRecord) -> Exception | None:
        """Answer ``handle`` with settled ``record``'s outcome; its error, if any.

        The error goes without the frames it was raised through (see
        ``without_frames``): the handle may be kept for long.
        """
        try:
            value = self.outcome(record)
        except Exception as exc:
            handle._set_exception(without_frames(exc))
            return exc
        handle._set_result(value)
        return None

    def effective_state(self, record: PromiseRecord) -> State:
        """The state a reader sees: a PENDING promise past ``timeout_at`` is timed out.

        A sleep's ``timeout_at`` is its wake time: past it, it reads RESOLVED.
        """
        if (
            record.state is State.PENDING
            and record.timeout_at is not None
            and self.clock.now() >= record.timeout_at
        ):
            return State.RESOLVED if record.kind is Kind.SLEEP else State.REJECTED_TIMEDOUT
        return record.state

    def effective(self, record: PromiseRecord) -> PromiseRecord:
        """``record`` as a reader sees it (see :meth:`effective_state`)."""
        state = self.effective_state(record)
        return record if state is record.state else replace(record, state=state)

    def effectively_settled(self, record: PromiseRecord) -> bool:
        """Whether a reader sees ``record`` as settled."""
        return self.effective_state(record) is not State.PENDING

    def settled_child(self, run: RunState | None, record: PromiseRecord) -> Any:
        """Remember a settled child for a retried body, and return its outcome."""
        if run is not None and run.replay is not None:
            run.replay[record.id] = record
        return self.outcome(record)


def argument_path(message: str) -> str:
    """``message`` with the path into ``[args, kwargs]`` told as the argument:
    ``value[0][1]`` is ``argument 2``, ``value[1]['y']`` ``keyword argument 'y'``."""
    message = re.sub(r"\bvalue\[0\]\[(\d+)\]", lambda m: f"argument {int(m[1]) + 1}", message)
    return re.sub(r"\bvalue\[1\]\[('[^']*'|\"[^\"]*\")\]", r"keyword argument \1", message)


def _gone(id: str) -> NotFoundError:
    return NotFoundError(f"no run or promise with id {id!r}; start it with resonate.run first")
