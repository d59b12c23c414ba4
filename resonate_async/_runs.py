"""Root runs executing in this process: start, body, settle, and attaching to a stored one.

A fresh run is admitted by the writer, which builds its root record as it
does so (:meth:`RunDriver._root_op`) and reports the committed create
(:meth:`RunDriver._root_created`); only then does the run get a task, whose
body runs with retries and whose outcome the writer settles. A run whose id
is already stored answers from that row, or takes the run over only through
an atomic claim. :class:`RunState` is both the engine's state of a run and
the caller's :class:`Handle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from contextvars import copy_context
from typing import TYPE_CHECKING, Any, cast

from ._attempts import LEAVE_PENDING, Attempts, unwrap_group
from ._context import Context
from ._encoding import same_params
from ._handle import Handle
from ._invoke import being_cancelled
from ._leases import LeaseLost
from ._promise import _NO_KWARGS
from ._registry import CallStyle
from .errors import (
    CanceledError,
    ConflictError,
    NondeterminismError,
    NotFoundError,
    NotRegisteredError,
    ShutdownError,
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
    from collections.abc import Callable, Coroutine, Sequence

    from ._coalesce import Coalescer
    from ._engine import Engine
    from ._registry import FunctionEntry
    from ._stats import RunStats
    from ._telemetry import Tracing
    from ._writer import GroupCommitWriter

__all__ = ("RunDriver", "RunState")

log = logging.getLogger("resonate_async")

# Members read on every run: a module global is cheaper than an Enum class attribute.
_PENDING, _RUN = State.PENDING, Kind.RUN
_ASYNC = CallStyle.ASYNC


class RunState(Handle[Any]):
    """One root run executing in this process; it is also the run's :class:`Handle`.

    One object per run instead of two: the handle a caller awaits carries the
    engine's state of the run while it executes, and drops it once done.
    """

    __slots__ = (
        "args",
        "attached",
        "cancel_requested",
        "context",
        "entry",
        "execution",
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
        context: contextvars.Context | None = None,
    ) -> None:
        super().__init__(id, loop)
        # The caller's context variables, which a fresh run's body starts
        # with (as a task does): its OpenTelemetry span, a request id.
        self.context = context
        self.entry = entry
        self.param = param
        self.timeout_at = timeout_at
        # The root as this run created (or claimed) it: what it settles. A
        # fresh run's is built when the writer admits it (see RunDriver._root_op).
        self.record = record
        self.args = args
        self.kwargs = kwargs
        # Settled children by id: the stored tree of a resumed run, and what
        # this run settled itself when its body may be retried.
        self.replay: dict[str, PromiseRecord] | None = None
        # What ends the body's run without settling it, even if the body
        # caught it: nondeterminism (the run is stuck), a store failure one
        # of its calls met (the run is resumed once the store answers), or a
        # command without a handler in this process (resumed later, here
        # or by a worker that registered one).
        self.fatal: NondeterminismError | StoreError | NotRegisteredError | None = None
        self.cancel_requested = False
        # The id was stored already: this handle answers from that run (and
        # does not execute it here, unless this worker claims it).
        self.attached = False
        # Once this worker claimed that run: its execution here, which cancel() cancels.
        self.execution: RunState | None = None

    def cancel(self) -> bool:
        """See :meth:`Handle.cancel`; before the root is durable, the run is
        settled ``REJECTED_CANCELED`` as soon as it is (and so is a run whose
        id turns out to be stored already, wherever it runs). A handle on a
        run that was stored before (``attached``) returns False, unless this
        worker has claimed that run and executes it: then that is cancelled."""
        if self.done():
            return False
        if self.attached:
            return False if self.execution is None else self.execution.cancel()
        task = self._task
        if task is None and self._created:
            return False  # its body is done: its root is being settled
        # Read as the task starts, and by Promise.__del__ (no never-awaited warning).
        self.cancel_requested = True
        if task is None or _not_started(task):
            # Its root is being created, or its task has not taken its first
            # step: a task cancelled then never runs its coroutine, handlers
            # included, so the coroutine checks this flag as it starts.
            return True
        return super().cancel()


def _strip(run: RunState) -> None:
    """Empty the slots of a finished run that nothing reads once it is done.

    A caller may hold many finished handles (the blog's benchmark holds all
    of them), and each full collection of the cyclic GC visits every slot of
    each: an emptied slot is skipped. Measured apart, 100,000 objects of 19
    slots took 17.7 ms a collection with the slots set to None, 9.0 ms
    emptied. (Kept: what a Handle answers from, and what a late Promise
    finalizer or a leaked Context reads: ``cancel_requested``, ``fatal``,
    ``replay``.)"""
    del run.args, run.kwargs, run.entry, run.param, run.record, run.timeout_at, run.context
    del run.attached, run.execution, run._task, run._waiters, run._created_waiters, run._loop


def _not_started(task: asyncio.Task[Any]) -> bool:
    coro = task.get_coro()
    return inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED


class RunDriver(Attempts):
    """The root runs of this process, from admission to settle (a mixin of ``Engine``)."""

    # Provided by Engine.
    writer: GroupCommitWriter
    _histories: Coalescer[list[PromiseRecord]]
    loop: asyncio.AbstractEventLoop
    tracing: Tracing
    run_stats: RunStats
    runs: dict[str, RunState]
    stuck: dict[str, NondeterminismError]
    store_failed: dict[str, float]
    store_failures: dict[str, tuple[int, float]]
    claiming: asyncio.Lock
    poll_seconds: float
    closing: bool
    resumes: str
    replay_every_step: bool
    worker_id: str
    lease_seconds: float
    _waiters: dict[str, list[asyncio.Future[PromiseRecord]]]
    _on_root_op: Callable[[RunState], Create]
    _on_root_created: Callable[[RunState, PromiseRecord | None, BaseException | None], None]
    _on_root_settled: Callable[[RunState, PromiseRecord | None, BaseException | None], None]

    if TYPE_CHECKING:

        def answer(self, handle: Handle[Any], record: PromiseRecord) -> Exception | None: ...

        def effectively_settled(self, record: PromiseRecord) -> bool: ...

        def wake(self, record: PromiseRecord) -> None: ...

        async def wait_settled(self, record: PromiseRecord) -> PromiseRecord: ...

        def spawn_other(
            self, coro: Coroutine[Any, Any, Any], context: contextvars.Context | None = None
        ) -> asyncio.Task[Any]: ...

        def _dead(self, owner: str) -> bool: ...

        async def recover(self, keys: Sequence[tuple[str, int]] | None = None) -> int: ...

        def free_later(self, id: str) -> float: ...

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
            # Only a context that holds variables is kept for the body: one
            # without runs the same in the writer's empty one, and a burst of
            # runs then holds no context objects while they wait to be admitted.
            context = copy_context()
            run = RunState(
                self.loop, id, entry, param, deadline, args, kwargs, None, context or None
            )
        else:
            run = RunState(
                self.loop, id, entry, stored.param, stored.timeout_at, args, kwargs, stored
            )
        self.runs[id] = run
        if stored is not None:
            run._set_created()
            self.run_stats.started += 1
            if stored.kind is _RUN:  # not a remote call another run made
                self.run_stats.recovered += 1
            # Resumed (here or from a claim): the caller's variables are
            # gone, and those of whoever started this engine are not its own.
            run._task = self.loop.create_task(
                self._execute(run, resumed=True), context=contextvars.Context()
            )
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
                self.run_stats.started += 1
                context, run.context = run.context, None
                run._task = self.loop.create_task(
                    self._execute(run, resumed=False), context=context
                )
        elif error is not None:
            self._forget(run)
            run._set_exception(error)
            # The create may have committed though its answer was lost: then
            # its row is PENDING under this worker's lease, to be resumed.
            self._abandon(run, error, created=False)
        else:  # the id was taken: a stored outcome, a conflict or a run elsewhere
            run.attached = True
            run._task = self.spawn_other(self._attach(run, stored))

    def _interrupted(self, run: RunState, why: str = "shutdown") -> ShutdownError:
        return ShutdownError(
            f"run {run.id!r} was interrupted by {why}; it stays PENDING and {self.resumes}"
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
                # cast: Engine is the one class that mixes this in.
                ctx = Context(cast("Engine", self), run, run.id, run.id, 1, leaf=False)
                try:
                    try:
                        value = await entry.fn(ctx, *run.args, **run.kwargs)
                    except Exception:
                        ctx._ended = True  # see Context._ended
                        raise
                    ctx._ended = True
                    if ctx._children:
                        await ctx._join_children()
                except LEAVE_PENDING:
                    await ctx._stop_children()
                    raise
                except BaseExceptionGroup as exc:  # an asyncio.TaskGroup in the body
                    state, data = await self._after_group(run, entry, ctx, exc)
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
                    call = self.tracing.traced(call, "resonate.run", attributes, settles=True)
                state, data, _ = await call
            # The task ends here; the writer reports the outcome once it commits.
            # `prior` lets the store answer without reading the row back.
            op = new_settle(run.id, state, data, self.clock.now(), run.record)
            self.writer.write_then(op, self._on_root_settled, run)
            settling = True
            # The body is done: its task, coroutine and context are freed as
            # this returns, not held (into the GC's oldest generation) until
            # the settle commits. cancel() reads a created run without a task
            # as one being settled.
            run._task = None
        except asyncio.CancelledError:
            if self.closing:
                run._set_exception(self._interrupted(run))
            elif isinstance(run.fatal, LeaseLost):
                self._follow(run, run.fatal.record)
            elif not run.cancel_requested and being_cancelled():
                # Not by cancel(): the event loop is ending (asyncio.run
                # returning, a test's loop torn down). Nothing is settled;
                # the writer may be gone already.
                run._set_exception(self._interrupted(run, "its event loop ended"))
            else:
                # Settling its cancel: a lease check must not cancel this too.
                run.cancel_requested = True
                await self._settle_canceled_through(run)
            raise
        except NondeterminismError as exc:
            # Where it first diverged, if the body caught that and went on.
            stopped = run.fatal if isinstance(run.fatal, NondeterminismError) else exc
            log.error("run %s stopped: %s", run.id, stopped)
            self.stuck[run.id] = stopped
            run._set_exception(stopped)
            for waiter in self._waiters.pop(run.id, ()):
                if not waiter.done():
                    waiter.set_exception(stopped)
        except ShutdownError:  # a body that caught the shutdown's cancellation, then called
            run._set_exception(self._interrupted(run))
        except LeaseLost as exc:  # a body that caught the cancellation
            if self.closing:
                run._set_exception(self._interrupted(run))
            else:
                self._follow(run, exc.record)
        except (StoreError, NotRegisteredError) as exc:
            # The root stays PENDING: resumed once the store answers (or, for a
            # command without a handler here, by a worker that has one).
            run._set_exception(exc)
            self._abandon(run, exc)
        except Exception as exc:  # a bug of ours: the run stays PENDING until the next start
            log.error("run %s stopped by an unexpected error", run.id, exc_info=exc)
            run._set_exception(exc)
        except BaseException as exc:  # not an Exception: the body's, or the process exiting
            log.error(
                "run %s stopped by %s, which is not an Exception: it stays PENDING "
                "until the next start",
                run.id,
                type(exc).__name__,
                exc_info=exc,
            )
            run._set_exception(exc)  # awaiters see it (pytest.fail(), say) instead of hanging
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        finally:
            if not settling:
                self._forget(run)

    def _abandon(self, run: RunState, error: BaseException, *, created: bool = True) -> None:
        """A run stopped here without settling its root (the store failed): its
        lease is freed by the claim loop's next poll, which then claims it
        again (or another worker does) and resumes it from its history once
        the store answers. Otherwise this worker's heartbeat would renew the
        lease for ever and nobody would resume the run. (``created``: whether
        its root is known to be stored; a create whose answer was lost may be.)"""
        if self.closing or isinstance(error, ShutdownError):
            return  # the next start resumes it (its leases are freed then)
        delay = self.free_later(run.id)
        log.warning(
            "run %s stopped without settling: %s; %s resumed in %.0fs",
            run.id,
            error,
            "it will be" if created else "if its root was stored after all, it will be",
            delay,
        )

    async def _after_group(
        self,
        run: RunState,
        entry: FunctionEntry,
        ctx: Context,
        group: BaseExceptionGroup[BaseException],
    ) -> tuple[State, bytes]:
        """The rest of a run's inline first attempt that raised ``group`` (an
        ``asyncio.TaskGroup``'s): an error in it that leaves the run PENDING
        (a store failure in one task, say) is raised instead; else the group
        is the body's failure. (Apart from ``_execute``: its locals are in
        every suspended run's frame.)"""
        inner = unwrap_group(group)
        if inner is not None:
            await ctx._stop_children()
            raise inner from None
        if not isinstance(group, Exception):
            raise group
        return await self._after_first_attempt(run, entry, ctx, group)

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

    def _follow(self, run: RunState, record: PromiseRecord | None) -> None:
        """The run is another worker's now, or settled (see ``LeaseLost``): it
        no longer executes here, and its handle answers from the store, as a
        handle on a run started elsewhere does (and should that worker die,
        the claim loop takes the run over again)."""
        self._forget(run)
        run.attached = True
        run._task = self.spawn_other(self._attach(run, record))

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
            self._abandon(run, error)
        else:
            if self.store_failures:
                self.store_failures.pop(run.id, None)
            self._finish_run(run, settled)
            _strip(run)

    async def _load_history(self, run: RunState) -> None:
        run.replay = {r.id: r for r in await self._histories.load(run.id)}

    async def _attach(self, run: RunState, stored: PromiseRecord | None) -> None:
        """The run's id already had a row: answer from it (a stored outcome, a
        conflict), or take the run over only through an atomic claim."""
        try:
            await self._attach_to(run, stored)
        except asyncio.CancelledError:
            if self.closing:
                run._set_exception(self._interrupted(run))
            else:  # not by cancel() (an attached handle does not cancel its wait)
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
        if stored.root_id != run.id:
            raise ConflictError(
                f"run id {run.id!r} is already the id of a call of run {stored.root_id!r}: "
                "a workflow's calls get the ids '<its id>.1', '<its id>.2', ..., so use a "
                "run id that is not another run's id plus '.<number>'"
            )
        # Another version of the same function is the same run: an id that
        # completed under version 1 still answers once version 2 is deployed
        # (and one pending there is resumed by a worker that has version 1).
        if stored.func is None:
            differs = f"a promise of kind {stored.kind.value!r} (not a run)"
        elif stored.func != entry.name:
            differs = f"{stored.func!r} version {stored.version}"
        elif not same_params(self.encoder, stored.param, run.param, entry.signature):
            differs = f"{stored.func!r} version {stored.version} with other arguments"
        else:
            differs = None
        if differs is not None:
            raise ConflictError(
                f"run id {run.id!r} is already used by {differs}; runs are idempotent by "
                "id, so use a new id (or the same function and arguments to attach to the "
                "existing run)"
            )
        run._set_created()
        if self.effectively_settled(stored):
            self._finish_run(run, stored, executed=False)
            return
        if run.cancel_requested:
            # cancel() was called before the id was known to be stored: it
            # cancels that run, wherever it runs (as promises.cancel(id) does).
            await self._settle_canceled(run)
            return
        # PENDING but not running here (a crashed run, or one another worker
        # runs): take it over only through an atomic claim, never by
        # assumption, so two workers never execute it at once.
        if self.runs.get(run.id) is run:
            del self.runs[run.id]
        self.stuck.pop(run.id, None)  # an explicit run() retries a stuck run
        owner = stored.owner
        lease = stored.lease_expires_at
        live_elsewhere = (
            owner is not None
            and owner != self.worker_id
            and lease is not None
            and lease > self.clock.now()
            and not self._dead(owner)
        )
        # A run a live worker holds: no claim could take it, so none is made
        # (a thousand run() calls of runs elsewhere made a thousand claims in
        # a row, which starved this worker's heartbeat). Otherwise under the
        # claim loop's lock, so that its releases and claims never interleave
        # with these.
        if not live_elsewhere:
            async with self.claiming:
                self.store_failed.pop(run.id, None)  # its lease is freed right here
                # Unless the claim loop has claimed it meanwhile and it executes
                # here, this worker's own lease on it (a stuck run, one stopped by
                # a store failure) is as free as a dead worker's.
                if run.id not in self.runs:
                    if owner is not None and (owner == self.worker_id or self._dead(owner)):
                        await self.store.release(owner, [run.id])
                    await self.recover([(entry.name, entry.version)])
        execution = self.runs.get(run.id)
        if execution is not None:  # claimed here: answer with that execution's outcome
            run.execution = execution  # cancelling this handle cancels the run now
            try:
                run._set_result(await execution)
            except Exception as exc:
                run._set_exception(exc)
            finally:
                run.execution = None
            return
        # A live worker elsewhere owns it: wait for its outcome (and should
        # that worker die, our claim loop takes the run over once its lease expires).
        self._finish_run(run, await self.wait_settled(stored), executed=False)

    def _finish_run(
        self, run: RunState, settled: PromiseRecord | None, *, executed: bool = True
    ) -> None:
        """Answer the handle from the settled root; ``executed``: this process
        settled it (what ``stats().runs`` counts), not another run's outcome."""
        if settled is None:
            run._set_exception(NotFoundError(f"run {run.id!r} disappeared from the store"))
            return
        self.wake(settled)
        error = self.answer(run, settled)
        if not executed:
            return
        if error is None:
            self.run_stats.completed += 1
        else:
            self.run_stats.failed += 1
            # Said once, here: a caller that answered 202 and dropped the
            # handle would otherwise learn of it only by asking.
            log.info("run %s settled %s: %r", run.id, settled.state.name, error)

    async def _settle_canceled_through(self, run: RunState) -> None:
        """Settle the run's cancel, whatever cancels this task meanwhile (a
        second ``cancel()``, a shutdown, the loop ending): otherwise its
        handle would never be answered, and its root could stay PENDING under
        this worker's renewed lease. Its own task, which a shutdown does not
        cancel (it waits for this one); the writer answers it either way."""
        settling = self.loop.create_task(self._settle_canceled(run))
        while not settling.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(settling)
        error = None if settling.cancelled() else settling.exception()
        if error is not None:  # (a ShutdownError, say): the root stays PENDING
            run._set_exception(error)
            self._abandon(run, error)

    async def _settle_canceled(self, run: RunState) -> None:
        await self.settle_cut_sleeps(run.id, run.id)
        error = self.encoder.encode_error(CanceledError(f"run {run.id!r} was canceled"))
        op = Settle(run.id, State.REJECTED_CANCELED, error, self.clock.now())
        try:
            settled = await asyncio.shield(self.writer.write(op))
        except Exception as exc:
            run._set_exception(exc)
            return
        finally:
            # A caller may keep the handle for long: not the task, whose
            # CancelledError holds the body's frame.
            run._task = None
        self._finish_run(run, settled)
