"""The engine: runs and their replay, and the owned background tasks.

``Resonate`` is the public face; the engine is what exists between
``start()`` and ``aclose()``. It owns every task it starts: one per run, the
group-commit writer, the batcher workers and the lease heartbeat. Shutdown
stops them in order (runs, then batchers within the grace period, then the
writer once drained), so no task outlives ``async with resonate``.
Claiming and renewing leases is the ``LeaseKeeper`` half (``_leases``);
waiting on promises settled elsewhere the ``SettleWatcher`` half (``_waiting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._batcher import Batcher
from ._clock import with_deadline
from ._context import Context
from ._handle import Handle
from ._invoke import invoke
from ._leases import LeaseKeeper, abandoned_workers
from ._promise import _NO_KWARGS, ReplayNow
from ._registry import CallStyle, FunctionEntry, HandlerEntry, Registry
from ._stats import RunStats, StoreStats
from ._telemetry import Tracing
from ._waiting import SettleWatcher
from ._writer import GroupCommitWriter
from .errors import (
    CanceledError,
    ConflictError,
    EncodingError,
    NondeterminismError,
    NotFoundError,
    PromiseTimeoutError,
    ShutdownError,
    StoredError,
    StoreError,
)
from .retry import Never
from .stores._base import (
    Create,
    Kind,
    PromiseRecord,
    Settle,
    State,
    new_create,
    new_record,
    new_settle,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._clock import Clock
    from ._encoding import Encoder
    from .retry import RetryPolicy
    from .stores._base import Store

__all__ = ("Engine", "RunState")

log = logging.getLogger("resonate_async")

# Errors that end a run without settling it: it stays PENDING for recovery.
_UNSETTLED = (NondeterminismError, StoreError, ShutdownError)
# What leaves a call's promise pending, after cancelling the call's children.
_LEAVE_PENDING = (asyncio.CancelledError, *_UNSETTLED)

# Members read on every run: a module global is cheaper than an Enum class attribute.
_PENDING, _RESOLVED, _RUN = State.PENDING, State.RESOLVED, Kind.RUN
_ASYNC, _SYNC = CallStyle.ASYNC, CallStyle.SYNC


class RunState(Handle[Any]):
    """One root run executing in this process; it is also the run's :class:`Handle`.

    One object per run instead of two: the handle a caller awaits carries the
    engine's state of the run while it executes, and drops it once done.
    """

    __slots__ = (
        "args",
        "cancel_requested",
        "entry",
        "fatal",
        "kwargs",
        "param",
        "record",
        "replay",
        "timeout_at",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        id: str,
        entry: FunctionEntry,
        param: bytes | None,
        timeout_at: float | None,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        record: PromiseRecord | None,
    ) -> None:
        super().__init__(id, loop)
        self.entry = entry
        self.param = param
        self.timeout_at = timeout_at
        # The root as this run created (or claimed) it: what it settles. A
        # fresh run's is built when the writer admits it (see Engine._root_op).
        self.record = record
        self.args = args
        self.kwargs = kwargs
        # Settled children by id: the stored tree of a resumed run, and what
        # this run settled itself when its body may be retried.
        self.replay: dict[str, PromiseRecord] | None = None
        self.fatal: NondeterminismError | None = None
        self.cancel_requested = False

    def cancel(self) -> bool:
        """See :meth:`Handle.cancel`; before the root is durable, the run is
        settled ``REJECTED_CANCELED`` as soon as it is."""
        if self.done():
            return False
        task = self._task
        if task is None or _not_started(task):
            # Its root is being created, or its task has not taken its first
            # step: a task cancelled then never runs its coroutine, handlers
            # included, so the coroutine checks this flag as it starts.
            self.cancel_requested = True
            return True
        return super().cancel()


def _not_started(task: asyncio.Task[Any]) -> bool:
    coro = task.get_coro()
    return inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED


class Engine(LeaseKeeper, SettleWatcher):
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
        self.replay_every_step = replay_every_step
        self.tracing = Tracing(tracing, tracer_provider)
        self.store = store
        self.registry = registry
        self.encoder = encoder
        self.clock = clock
        self.dependencies = dependencies
        self.worker_id = worker_id
        self.step_retry_policy = step_retry_policy
        self.lease_seconds = lease_seconds
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
        # Runs stopped by nondeterminism: PENDING in the store, not retried here.
        self.stuck: dict[str, NondeterminismError] = {}
        self._claim_wakeup = asyncio.Event()
        self._listening = False
        # Stores that only processes of this host can open (SQLite) let a dead
        # pid free its leases at once; networked stores wait for the lease.
        self._single_host = bool(getattr(store, "single_host", False))
        # The writer's callbacks, bound once rather than once per run.
        self._on_root_op = self._root_op
        self._on_root_created = self._root_created
        self._on_root_settled = self._root_settled

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer, the batchers and the heartbeat, then recover runs."""
        self._services.append(self._spawn_service(self.writer.run(), "writer"))
        for entry in self.registry.handlers():
            self.add_batcher(entry)
        self._services.append(self._spawn_service(self._heartbeat(), "heartbeat"))
        listen = getattr(self.store, "listen", None)
        if listen is not None:  # PostgreSQL: woken by NOTIFY instead of polling
            await listen(self._on_settled_notice)
            self._listening = True
        await self._release_dead_owners(at_start=True)
        await self.recover()
        self._services.append(self._spawn_service(self._claim_loop(), "claims"))

    def _spawn_service(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(coro, name=f"resonate-{name}")
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
        await asyncio.gather(*runs, *others, return_exceptions=True)
        for batcher in self.batchers.values():
            batcher.close()
        await self._finish(self._batcher_tasks, self.grace_seconds)
        self.writer.close()
        await self._finish(self._services[:1], self.grace_seconds)
        await self._finish(self._services, 0)
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
        self.closing = True
        abandoned_workers.add(self.worker_id)
        self.writer.drop()
        tasks = [r._task for r in self.runs.values() if r._task is not None]
        tasks += [*self._others, *self._batcher_tasks, *self._services]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.drop()

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
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- encoding helpers ------------------------------------------------------

    def encode_for(self, value: Any, where: str) -> bytes:
        """Encode ``value`` or raise ``EncodingError`` naming the call."""
        try:
            return self.encoder.encode(value)
        except EncodingError as exc:
            raise EncodingError(f"{where}: {exc}") from None

    def try_encode_args(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bytes | None:
        """Encoded step arguments for inspection, or ``None`` when not encodable."""
        try:
            return self.encoder.encode([list(args), kwargs])
        except EncodingError:
            return None

    def outcome(self, record: PromiseRecord) -> Any:
        """The decoded value of a settled record, or raise its decoded error."""
        state = record.state
        if state is _RESOLVED:  # the hot path: no clock, no timeout rule
            value = record.value
            return None if value is None else self.encoder.decode(value)
        state = self.effective_state(record)
        if state is State.RESOLVED:
            return None if record.value is None else self.encoder.decode(record.value)
        if record.value is not None and record.state is not State.PENDING:
            raise self.encoder.decode_error(record.value)
        if state is State.REJECTED_CANCELED:
            raise CanceledError(f"promise {record.id!r} was canceled")
        if state is State.REJECTED_TIMEDOUT:
            raise PromiseTimeoutError(f"promise {record.id!r} timed out")
        if state is State.REJECTED:
            raise StoredError("unknown", f"promise {record.id!r} was rejected")
        raise RuntimeError(f"promise {record.id!r} is still pending")

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

    # -- executing a function with retries -----------------------------------

    async def attempts(
        self,
        run: RunState | None,
        id: str,
        root_id: str,
        style: CallStyle,
        fn: Callable[..., Any],
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        policy: RetryPolicy,
        deadline: float | None,
        first: int = 1,
    ) -> tuple[State, bytes, int]:
        """Call ``fn`` until it succeeds or its policy gives up; encode the outcome.

        Returns the settled state, the encoded value or error, and the number
        of attempts. Raises the errors that must leave the promise PENDING
        (nondeterminism, store failure, shutdown, cancellation). ``first`` is
        the number of the first attempt made here (a caller that made the
        first attempt itself continues with 2).
        """
        clock = self.clock
        attempt = first
        while True:
            ctx = Context(self, run, id, root_id, attempt, leaf=style is _SYNC)
            try:
                # An async function is awaited directly: no wrapper coroutine on the hot path.
                call = (
                    fn(ctx, *args, **kwargs)
                    if style is _ASYNC
                    else invoke(style, fn, ctx, args, kwargs)
                )
                value = await (call if deadline is None else with_deadline(call, deadline, clock))
                if ctx._children:
                    await ctx._join_children()
            except ReplayNow:
                # Replay-every-step mode: a fresh call settled; re-run from the store.
                if ctx._children:
                    for child in ctx._children:
                        child._fresh = False  # the restart replays them all at once
                    await ctx._join_children()
                if run is not None:
                    run.replay = {r.id: r for r in await self.store.tree(run.id)}
                continue
            except _LEAVE_PENDING:
                ctx._cancel_children()
                raise
            except Exception as exc:
                final = await self._failed(run, id, ctx, exc, attempt, policy, deadline)
                if final is not None:
                    return final[0], final[1], attempt
                attempt += 1
                continue
            state, data = self._succeeded(run, id, value)
            return state, data, attempt

    async def _failed(
        self,
        run: RunState | None,
        id: str,
        ctx: Context,
        exc: Exception,
        attempt: int,
        policy: RetryPolicy,
        deadline: float | None,
    ) -> tuple[State, bytes] | None:
        """After attempt ``attempt`` raised ``exc``: the settled outcome if the
        policy gives up (or the deadline has come), else ``None`` once the
        retry delay has passed."""
        if ctx._children:
            await ctx._join_children()
        if run is not None and run.fatal is not None:
            raise run.fatal from None
        clock = self.clock
        if deadline is not None and clock.now() >= deadline:
            timeout = PromiseTimeoutError(f"{id} timed out on attempt {attempt}")
            return State.REJECTED_TIMEDOUT, self.encoder.encode_error(timeout)
        delay = policy.next_delay(attempt + 1) if policy.should_retry(exc) else None
        if delay is None or (deadline is not None and clock.now() + delay >= deadline):
            return State.REJECTED, self.encoder.encode_error(exc)
        log.info("%s failed on attempt %d (%r); retrying in %.3fs", id, attempt, exc, delay)
        await clock.sleep(delay)
        return None

    def _succeeded(self, run: RunState | None, id: str, value: Any) -> tuple[State, bytes]:
        """The settled outcome of a call that returned ``value``."""
        if run is not None and run.fatal is not None:
            raise run.fatal
        if value is None:
            return _RESOLVED, self.encoded_none
        try:
            return _RESOLVED, self.encoder.encode(value)
        except EncodingError as exc:
            error = EncodingError(f"{id}: the return value is not encodable: {exc}")
            return State.REJECTED, self.encoder.encode_error(error)

    # -- runs ------------------------------------------------------------------

    def start_run(
        self,
        id: str,
        entry: FunctionEntry,
        param: bytes,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        stored: PromiseRecord | None = None,
    ) -> RunState:
        """Start a run: fresh (``stored`` is None) or resumed from its stored root.

        A fresh run has no task until its root is durable: the writer reports
        the create to :meth:`_root_created`, which starts the body. So a burst
        of runs waiting for their creates holds no task or coroutine.
        """
        # A run without keyword arguments keeps the shared empty dict, not the
        # fresh one `**kwargs` made: one allocation less for the cyclic GC to
        # count per run (each 700 counted start a collection).
        kwargs = kwargs or _NO_KWARGS
        if stored is None:
            timeout = entry.timeout
            deadline = None if timeout is None else self.clock.now() + timeout
            run = RunState(self.loop, id, entry, param, deadline, args, kwargs, None)
        else:
            run = RunState(
                self.loop, id, entry, stored.param, stored.timeout_at, args, kwargs, stored
            )
        self.runs[id] = run
        self.run_stats.started += 1
        if stored is not None:
            run._set_created()
            self.run_stats.recovered += 1
            run._task = self.loop.create_task(self._execute(run, resumed=True))
            return run
        try:
            self.writer.admit_then(self._on_root_op, self._on_root_created, run)
        except ShutdownError as exc:
            self._forget(run)
            run._set_exception(exc)
        return run

    def _root_op(self, run: RunState) -> Create:
        """A fresh run's root create, built as the writer admits it, so that its
        lease starts when it is written however long the admission waited."""
        now = self.clock.now()
        entry = run.entry
        record = run.record = new_record(
            run.id,
            _PENDING,
            _RUN,
            run.id,
            now,
            entry.name,
            entry.version,
            run.param,
            None,
            None,
            run.timeout_at,
            None,
            1,
            self.worker_id,
            now + self.lease_seconds,
            None,
        )
        return new_create(record)

    def _root_created(
        self, run: RunState, stored: PromiseRecord | None, error: BaseException | None
    ) -> None:
        """The writer's report on a fresh run's root: start the body, or answer."""
        if error is None and stored is run.record:
            run._set_created()
            if self.closing:
                self._forget(run)
                run._set_exception(self._interrupted(run))
            else:  # a cancel requested meanwhile is settled by _execute as it starts
                run._task = self.loop.create_task(self._execute(run, resumed=False))
        elif error is not None:
            self._forget(run)
            run._set_exception(error)
        else:  # the id was taken: a stored outcome, a conflict or a run elsewhere
            run._task = self.spawn_other(self._attach(run, stored))

    @staticmethod
    def _interrupted(run: RunState) -> ShutdownError:
        return ShutdownError(
            f"run {run.id!r} was interrupted by shutdown; it stays PENDING and "
            "resumes at the next start"
        )

    async def _execute(self, run: RunState, *, resumed: bool) -> None:
        """A run's task: its body, with retries; the writer then settles its root."""
        entry = run.entry
        settling = False
        try:
            if run.cancel_requested:  # cancelled before this task took its first step
                raise asyncio.CancelledError
            if resumed:
                await self._load_history(run)
            if run.replay is None and entry.retry_policy.__class__ is not Never:
                run.replay = {}  # a retried body replays what its first attempt settled
            if (
                entry.style is _ASYNC
                and not resumed
                and run.timeout_at is None
                and not self.tracing.enabled
                and not self.replay_every_step
            ):
                # The first attempt is awaited right here, not in `attempts`:
                # one coroutine frame less per run, in memory and on every
                # resume. A failure the policy retries continues there.
                ctx = Context(self, run, run.id, run.id, 1, leaf=False)
                try:
                    value = await entry.fn(ctx, *run.args, **run.kwargs)
                    if ctx._children:
                        await ctx._join_children()
                except _LEAVE_PENDING:
                    ctx._cancel_children()
                    raise
                except Exception as exc:
                    state, data = await self._after_first_attempt(run, entry, ctx, exc)
                else:
                    state, data = self._succeeded(run, run.id, value)
            else:
                call = self.attempts(
                    run,
                    run.id,
                    run.id,
                    entry.style,
                    entry.fn,
                    run.args,
                    run.kwargs,
                    entry.retry_policy,
                    run.timeout_at,
                )
                if self.tracing.enabled:
                    attributes = {"resonate.id": run.id, "resonate.func": entry.name}
                    call = self.tracing.traced(call, "resonate.run", attributes)
                state, data, _ = await call
            # The task ends here; the writer reports the outcome once it commits.
            # `prior` lets the store answer without reading the row back.
            op = new_settle(run.id, state, data, self.clock.now(), run.record)
            self.writer.write_then(op, self._on_root_settled, run)
            settling = True
        except asyncio.CancelledError:
            if self.closing:
                run._set_exception(self._interrupted(run))
            else:
                await self._settle_canceled(run)
            raise
        except NondeterminismError as exc:
            log.error("run %s stopped: %s", run.id, exc)
            self.stuck[run.id] = exc
            run._set_exception(exc)
            for waiter in self._waiters.pop(run.id, ()):
                if not waiter.done():
                    waiter.set_exception(exc)
        except Exception as exc:
            run._set_exception(exc)
        finally:
            if not settling:
                self._forget(run)

    async def _after_first_attempt(
        self, run: RunState, entry: FunctionEntry, ctx: Context, exc: Exception
    ) -> tuple[State, bytes]:
        """The rest of ``attempts`` once a run's inline first attempt raised ``exc``."""
        policy = entry.retry_policy
        final = await self._failed(run, run.id, ctx, exc, 1, policy, None)
        if final is not None:
            return final
        args, kwargs = run.args, run.kwargs
        state, data, _ = await self.attempts(
            run, run.id, run.id, _ASYNC, entry.fn, args, kwargs, policy, None, first=2
        )
        return state, data

    def _forget(self, run: RunState) -> None:
        """The run no longer executes here: drop it and what only its body needed."""
        if self.runs.get(run.id) is run:
            del self.runs[run.id]
        run.args = ()
        run.kwargs = _NO_KWARGS
        run.replay = None

    def _root_settled(
        self, run: RunState, settled: PromiseRecord | None, error: BaseException | None
    ) -> None:
        """The writer's report on a run's settle (see ``GroupCommitWriter.write_then``)."""
        self._forget(run)
        # A caller may keep the handle for long: it keeps the outcome only.
        run._task = None
        run.record = None
        if error is not None:
            run._set_exception(error)
        else:
            self._finish_run(run, settled)

    async def _load_history(self, run: RunState) -> None:
        run.replay = {r.id: r for r in await self.store.tree(run.id)}

    async def _attach(self, run: RunState, stored: PromiseRecord | None) -> None:
        """The run's id already had a row: answer from it (a stored outcome, a
        conflict), or take the run over only through an atomic claim."""
        try:
            if run.cancel_requested:  # cancelled before this task took its first step
                raise asyncio.CancelledError
            await self._attach_to(run, stored)
        except asyncio.CancelledError:
            if self.closing:
                run._set_exception(self._interrupted(run))
            else:
                run._set_exception(CanceledError(f"stopped waiting for run {run.id!r}"))
            raise
        except Exception as exc:
            run._set_exception(exc)
        finally:
            self._forget(run)

    async def _attach_to(self, run: RunState, stored: PromiseRecord | None) -> None:
        if stored is None:  # pragma: no cover - a create always leaves a row
            raise StoreError(f"run {run.id!r} was not stored")
        entry = run.entry
        if (
            stored.func != entry.name
            or stored.version != entry.version
            or stored.param != run.param
        ):
            raise ConflictError(
                f"run id {run.id!r} is already used by {stored.func!r} version {stored.version} "
                "with other arguments; runs are idempotent by id, so use a new id (or the same "
                "function and arguments to attach to the existing run)"
            )
        run._set_created()
        if self.effectively_settled(stored):
            self._finish_run(run, stored)
            return
        # PENDING but not running here (a crashed run, or one another worker
        # runs): take it over only through an atomic claim, never by
        # assumption, so two workers never execute it at once.
        if self.runs.get(run.id) is run:
            del self.runs[run.id]
        self.stuck.pop(run.id, None)  # an explicit run() retries a stuck run
        if stored.owner is not None and self._dead(stored.owner):
            await self.store.release(stored.owner, [run.id])
        await self.recover([(entry.name, entry.version)])
        owner = self.runs.get(run.id)
        if owner is not None:  # claimed here: answer with that execution's outcome
            try:
                run._set_result(await owner)
            except Exception as exc:
                run._set_exception(exc)
            return
        # A live worker elsewhere owns it: wait for its outcome (and should
        # that worker die, our claim loop takes the run over once its lease expires).
        self._finish_run(run, await self.wait_settled(stored))

    def _finish_run(self, run: RunState, settled: PromiseRecord | None) -> None:
        if settled is None:
            run._set_exception(NotFoundError(f"run {run.id!r} disappeared from the store"))
            return
        self.wake(settled)
        try:
            value = self.outcome(settled)
        except Exception as exc:
            self.run_stats.failed += 1
            run._set_exception(exc)
        else:
            self.run_stats.completed += 1
            run._set_result(value)

    async def _settle_canceled(self, run: RunState) -> None:
        error = self.encoder.encode_error(CanceledError(f"run {run.id!r} was canceled"))
        op = Settle(run.id, State.REJECTED_CANCELED, error, self.clock.now())
        try:
            settled = await asyncio.shield(self.writer.write(op))
        except Exception as exc:
            run._set_exception(exc)
            return
        self._finish_run(run, settled)

    # -- recovery and leases -----------------------------------------------------
