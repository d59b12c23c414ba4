"""``Promise``: one durable call of a workflow, awaited for its value.

A promise is created by a :class:`~resonate_async.Context` call (``lfi``,
``lfc``, ``rfi``, ``sleep``, ``promise``, ...) with its child id already
assigned. When started it either returns the outcome stored for that id (a
replay, checked to be the same call) or runs: an ``async def`` step inline
in the awaiting task, a command through its type's batcher, a sleep, an
external or a remote promise through the store. Its outcome is written once,
when settled, by the group-commit writer.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._clock import check_seconds
from ._leases import LeaseLost
from ._registry import call_style, check_count, function_name
from .errors import (
    ConflictError,
    EncodingError,
    NondeterminismError,
    NotFoundError,
    NotRegisteredError,
    PromiseTimeoutError,
    ShutdownError,
    StoreError,
    UsageError,
)
from .retry import checked_policy
from .stores._base import Create, Kind, PromiseRecord, State

if TYPE_CHECKING:
    from collections.abc import Generator

    from ._context import Context
    from .retry import RetryPolicy

__all__ = ("MAX_ID_BYTES", "Promise", "ReplayNow", "check_id")

T = TypeVar("T")

# What a Promise stands for.
_STEP, _COMMAND, _SLEEP, _EXTERNAL, _REMOTE = range(5)
_NOT_STARTED, _STARTED, _INLINE_DONE = range(3)
# A command's place once started (_STARTED: not queued, the queue being full or
# its awaiter having left it): queued, taken into a batch, recorded after its
# awaiter left (``_value`` holds the row).
_QUEUED, _IN_BATCH, _RECORDED = range(3, 6)
# Why with_options(retry_policy=) does not apply to a call other than a step.
_NO_RETRY_POLICY = {
    _COMMAND: "a command's retries follow its handler's retry_policy; "
    "set it in register_command_handler",
    _REMOTE: "a remote call's retries follow the retry_policy its function is "
    "registered with, in the worker that runs it",
    _SLEEP: "a sleep is not retried",
    _EXTERNAL: "an external promise is settled from outside, not retried",
}
#: The longest id, in UTF-8 bytes (Temporal's default limit too): a longer
#: one does not fit PostgreSQL's index rows, and an id is no payload.
MAX_ID_BYTES = 1000


def check_id(id: object, what: str) -> None:
    """Raise ``ValueError`` unless ``id`` is an id every store can keep: a
    non-empty string of at most ``MAX_ID_BYTES``, with no NUL and no lone
    surrogate. (One a store refuses would fail every write that carries it.)"""
    if not isinstance(id, str) or not id:
        raise ValueError(f"{what} must be a non-empty string, got {id!r}")
    if id.isascii():
        size = len(id)
    else:
        try:
            size = len(id.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"{what} must be valid Unicode text, got {id!r}") from None
    if size > MAX_ID_BYTES:
        raise ValueError(f"{what} must be at most {MAX_ID_BYTES} bytes of UTF-8, got {size}")
    if "\x00" in id:
        raise ValueError(f"{what} must not contain NUL characters, got {id!r}")


# The stored kind of each, and how a replay's error names it.
_KINDS = (Kind.STEP, Kind.COMMAND, Kind.SLEEP, Kind.EXTERNAL, Kind.REMOTE)
_KIND_NAMES = {
    Kind.STEP: "a local call (lfc/lfi)",
    Kind.COMMAND: "a command",
    Kind.SLEEP: "a sleep",
    Kind.EXTERNAL: "a promise (ctx.promise)",
    Kind.REMOTE: "a remote call (rfc/rfi)",
    Kind.RUN: "a run",
}

# What a user wrote to make a promise of each kind, for the never-awaited warning.
_CALLS = {_REMOTE: "ctx.rfc", _EXTERNAL: "ctx.promise", _SLEEP: "ctx.sleep"}
_NO_KWARGS: dict[str, Any] = {}  # shared by every command; never mutated


class ReplayNow(BaseException):
    """Replay-every-step mode: unwind the workflow so it re-runs from the store.

    A ``BaseException`` so that a workflow's own ``except Exception`` never
    swallows it.
    """


# Outcomes that are not settled promises: nothing to replay from.
_NOT_SETTLED = (asyncio.CancelledError, NondeterminismError, StoreError, ShutdownError)


class Promise(Generic[T]):
    """The promise of a durable call; ``await`` it for the value.

    Attributes:
        id: the promise's id in the store.
    """

    __slots__ = (
        "_args",
        "_awaited",
        "_ctx",
        "_custom_id",
        "_deadline",
        "_error",
        "_fresh",
        "_future",
        "_inline",
        "_kwargs",
        "_param",
        "_retry_policy",
        "_span",
        "_state",
        "_target",
        "_timeout",
        "_type",
        "_value",
        "_version",
        "_yielded",
        "id",
    )

    def __init__(
        self,
        ctx: Context,
        id: str,
        type: int,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.id = id
        self._ctx = ctx
        self._type = type
        self._target = target
        self._args = args
        self._kwargs = kwargs
        self._param: bytes | None = None
        self._span: Any = None
        self._retry_policy: RetryPolicy | None = None
        self._timeout: float | None = target if type == _EXTERNAL else None
        # A command's timeout, once it started: awaiting it again (after a
        # timeout around the await) does not move it.
        self._deadline: float | None = None
        self._future: asyncio.Future[T] | None = None
        self._state = _NOT_STARTED
        self._inline = False
        self._fresh = False  # executed now, not replayed from the store
        self._awaited = False
        self._yielded = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._version = 1
        self._custom_id = False

    def __repr__(self) -> str:
        return f"Promise(id={self.id!r})"

    def __del__(self) -> None:
        # Like a coroutine never awaited: `ctx.lfc(...)` without `await` did
        # nothing (an lfc starts when awaited) and only used up an id. Not
        # when a shutdown, a crash or replay-every-step cut the body short.
        if self._state == _NOT_STARTED and not self._awaited:
            engine = self._ctx._engine
            if engine.closing or engine.replay_every_step:
                return
            run = self._ctx._run
            if run is not None and (run.cancel_requested or run.fatal is not None):
                return  # the body was cancelled, or stopped by nondeterminism
            call = _CALLS.get(self._type, "ctx.lfc")
            warnings.warn(
                f"{self.id}: {call}(...) was never awaited, so it never ran; await it",
                RuntimeWarning,
                stacklevel=1,
            )

    def with_options(
        self,
        *,
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
        id: str | None = None,
        version: int | None = None,
    ) -> Promise[T]:
        """Set options of this call before it starts; returns this promise.

        Args:
            retry_policy: how a failing step is retried (steps only: a
                command's batch follows its handler's policy, a remote call
                its function's registered one).
            timeout: seconds from when the call starts (``lfi``: at once;
                ``lfc``: at its ``await``) after which it rejects with
                ``PromiseTimeoutError`` (``REJECTED_TIMEDOUT``). A command
                that times out may still be in a batch: whichever of its
                outcomes is recorded first (the handler's or the timeout) is
                its outcome.
            id: use this id instead of the child id (verbatim).
            version: the registered version of the function a remote call
                runs (remote calls only): only a worker that registers that
                version claims it. Default: the newest version registered in
                this process, or 1 when this process does not register the
                function.

        Raises:
            RuntimeError: the call has already been dispatched, a retry
                policy was given for a call other than a step, a timeout
                for a sleep, or a version for a call other than a remote one.
            TypeError: ``timeout`` is not a number, ``retry_policy`` not a
                policy, ``id`` not a str, or ``version`` not an int.
            ValueError: ``timeout`` is not finite and positive, ``id`` is
                not a valid id, or ``version`` is less than 1.
        """
        if self._state != _NOT_STARTED:
            raise UsageError(
                f"{self.id}: with_options must be called before the call starts "
                "(right after lfi/lfc, before the next await)"
            )
        try:
            if retry_policy is not None:
                retry_policy = checked_policy("retry_policy", retry_policy)
                if self._type != _STEP:
                    raise UsageError(f"{self.id}: {_NO_RETRY_POLICY[self._type]}")
            if timeout is not None:
                check_seconds("timeout", timeout, none_ok=True)
                if self._type == _SLEEP:
                    raise UsageError(f"{self.id}: a sleep takes no timeout; sleep less")
            if version is not None:
                check_count("version", version)
                if self._type != _REMOTE:
                    raise UsageError(
                        f"{self.id}: only a remote call (rfi/rfc) takes a version; a local "
                        "call runs the function it is given"
                    )
        except (TypeError, ValueError, RuntimeError):
            self._awaited = True  # the call is an error: no never-awaited warning on top
            raise
        if retry_policy is not None:
            self._retry_policy = retry_policy
        if timeout is not None:
            self._timeout = timeout
        if version is not None:
            self._version = version
        if id is not None:
            try:
                check_id(id, "id")
            except ValueError:
                self._awaited = True
                raise
            self.id = id
            self._custom_id = True
        return self

    # -- awaiting ------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, T]:
        if (
            self._type == _COMMAND
            and self._state == _NOT_STARTED
            and self._inline
            and not self._ctx._engine.replay_every_step
        ):
            # The hot path of `await ctx.lfc(Command(...))`: await the future
            # itself. (Not an lfi awaited before its start: a child, shielded below.)
            future = self._start()
            if self._state == _QUEUED or future.done():
                self._awaited = True
                return future.__await__()
        return self._await()

    def _await(self) -> Generator[Any, None, T]:
        self._awaited = True
        while self._inline and self._type != _COMMAND:
            state = self._state
            if state == _INLINE_DONE:
                return self._outcome()
            if state == _NOT_STARTED:
                return (yield from self._await_inline())
            # Another task is running this call inline: wait for it, then look
            # again (it may have been cancelled, and this task runs it instead).
            yield from self._inline_waiter().__await__()
        future = self._start()
        if self._type == _COMMAND and not future.done() and self._state == _STARTED:
            try:
                yield from self._ctx._engine.batchers[type(self._target)].put(self).__await__()
            except asyncio.CancelledError:
                # An lfc's awaiter stopped waiting for room in the queue: the
                # command stops, as one queued would (and so does its timeout).
                if self._inline:
                    self._cancel()
                raise
        # A child started with lfi (or rfi) is not stopped by its awaiter's
        # cancellation (an asyncio.timeout around the await, a TaskGroup
        # cancelling the awaiting task): the call goes on, and the run waits
        # for it before it settles, as for any child.
        child = not (self._inline or future.done() or self._type == _EXTERNAL)
        waited = asyncio.shield(future) if child else future
        try:
            value = yield from waited.__await__()
        except Exception as exc:
            self._store_failed(exc)
            self._replay_now(exc)
            raise
        self._replay_now(None)
        return value

    def _await_inline(self) -> Generator[Any, None, T]:
        """Run this call in the awaiting task (an lfc, rfc or sleep)."""
        self._state = _STARTED
        ctx = self._ctx
        if ctx._engine.replay_every_step and ctx._run is not None:
            # A sibling's replay restarts the body while this call may still
            # run in its own task (asyncio.gather): the restart waits for it.
            if ctx._children is None:
                ctx._children = []
            ctx._children.append(self)
        try:
            self._value = yield from self._run_inline().__await__()
        except (asyncio.CancelledError, ReplayNow):
            # The awaiter stopped waiting (a timeout, a cancelled task), or its
            # body is being restarted: the call did not finish, so awaiting it
            # again runs it again.
            self._state = _NOT_STARTED
            self._wake_inline_waiters()
            raise
        except BaseException as exc:
            self._error = exc
            self._state = _INLINE_DONE
            self._wake_inline_waiters()
            self._store_failed(exc)
            self._replay_now(exc)
            raise
        self._state = _INLINE_DONE
        self._wake_inline_waiters()
        self._replay_now(None)
        return cast("T", self._value)

    def _inline_waiter(self) -> asyncio.Future[None]:
        """A future of one more awaiter of a call running inline in another task."""
        if self._future is None:
            self._future = self._ctx._engine.loop.create_future()
        signal = cast("asyncio.Future[None]", self._future)  # it carries no value
        return asyncio.shield(signal)  # a waiter that stops waiting leaves the others be

    def _wake_inline_waiters(self) -> None:
        signal, self._future = self._future, None
        if signal is not None and not signal.done():
            signal.set_result(None)  # type: ignore[arg-type]

    def _store_failed(self, error: BaseException) -> None:
        """A store failure ends the run unsettled even if its body catches it:
        its outcome must not rest on a call whose row was not written."""
        if isinstance(error, StoreError):
            run = self._ctx._run
            if run is not None and run.fatal is None:
                run.fatal = error

    def _replay_now(self, error: BaseException | None) -> None:
        """In replay-every-step mode, restart the workflow once this fresh call settled."""
        if not self._fresh or not self._ctx._engine.replay_every_step or self._ctx._run is None:
            return
        if error is not None and isinstance(error, _NOT_SETTLED):
            return
        self._fresh = False
        self._ctx._engine.restarting.add(self._ctx)  # until the restart (see _replayed)
        raise ReplayNow

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return cast("T", self._value)

    def _cancel(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.cancel()

    def _start(self) -> asyncio.Future[T]:
        """Dispatch once (idempotent): replay from the store, or run.

        A command, or a wait for an external promise, whose awaiter was
        cancelled (a timeout around the await) starts again when awaited again.
        """
        future = self._future
        if future is not None:
            if not future.cancelled() or self._type == _STEP or self._type == _REMOTE:
                return future
            if self._type == _COMMAND:
                return self._restart_command()
        if self._state == _INLINE_DONE:  # an lfc already awaited inline
            future = self._ctx._engine.loop.create_future()
            if self._error is not None:
                future.set_exception(self._error)
            else:
                future.set_result(self._value)
            self._future = future
            return future
        self._state = _STARTED
        engine = self._ctx._engine
        loop = engine.loop
        stored = self._replayed()
        self._fresh = stored is None
        if stored is not None:
            future = loop.create_future()
            try:
                future.set_result(self._replayed_outcome(stored))
            except Exception as exc:
                future.set_exception(exc)
        elif (lost := self._lost()) is not None or engine.closing:
            future = loop.create_future()
            future.set_exception(lost or self._shutting_down())
            future.exception()  # retrieved: the body may be gone
        elif self._type == _COMMAND:
            future = loop.create_future()
            self._future = future
            engine.batchers[type(self._target)].offer(self)
            if self._timeout is not None:
                self._arm_timeout(future)
            return future
        elif self._type == _STEP:
            future = loop.create_task(self._execute_step())
        elif self._type == _EXTERNAL:
            future = loop.create_task(self._execute_external())
        elif self._type == _REMOTE:
            future = loop.create_task(self._execute_remote())
        else:  # sleeps are always inline
            future = cast("asyncio.Future[T]", loop.create_task(self._execute_sleep()))
        self._future = future
        return future

    def _arm_timeout(self, future: asyncio.Future[T]) -> None:
        """Time the command out at its deadline, set as it first started."""
        assert self._timeout is not None
        engine = self._ctx._engine
        if self._deadline is None:
            self._deadline = engine.clock.now() + self._timeout
        timer = engine.spawn_other(self._time_out_command(self._timeout, self._deadline))
        future.add_done_callback(lambda _: timer.cancel())

    def _restart_command(self) -> asyncio.Future[T]:
        """A command whose awaiter was cancelled (a timeout around the await),
        awaited again: it is not dispatched twice. Queued or in a batch, it
        keeps its place and the batch's outcome comes to the new future;
        recorded meanwhile, that row is the outcome; only a command that left
        the queue (or whose batch failed) is queued again."""
        engine = self._ctx._engine
        future: asyncio.Future[T] = engine.loop.create_future()
        self._future = future
        if self._state == _RECORDED:
            stored = cast("PromiseRecord", self._value)
            self._value = None
            try:
                future.set_result(engine.settled_child(self._ctx._run, self._own(stored)))
            except Exception as exc:
                future.set_exception(exc)
            return future
        if self._state == _STARTED:
            engine.batchers[type(self._target)].offer(self)
        if self._timeout is not None:
            self._arm_timeout(future)
        return future

    def _stored(self) -> PromiseRecord | None:
        """This call's row in the run's replay table, settled or not."""
        run = self._ctx._run
        return run.replay.get(self.id) if run is not None and run.replay else None

    def _replayed(self) -> PromiseRecord | None:
        """The stored, settled record of this call, checking it is the same call.

        ``None``: the call is to run now. Not in a body that replay-every-step
        mode is restarting (a ``finally`` awaiting a cleanup step as it
        unwinds): that call runs after the restart, in program order.
        """
        stored = self._stored()
        if stored is None:
            restarting = self._ctx._engine.restarting
            if restarting and self._ctx in restarting:
                raise ReplayNow
            return None
        # An id the caller gave is shared by whatever calls it: not checked.
        if not self._custom_id and not self._same_call(stored):
            raise self._fatal(self._diverged(stored))
        if stored.state is State.PENDING:
            engine = self._ctx._engine
            if not engine.effectively_settled(stored):
                return None
            engine.record_overdue(stored)  # a sleep that came due while the process was down
        return stored

    def _replayed_outcome(self, stored: PromiseRecord) -> Any:
        """The outcome of this call as its history stored it.

        A stored value that no longer decodes (its class was renamed since)
        stops the run as nondeterminism does: it stays PENDING until code
        that can read its history is deployed, instead of settling on a
        decoding error that is not the workflow's.
        """
        engine = self._ctx._engine
        try:
            return engine.outcome(stored)
        except EncodingError as exc:
            if engine.effective_state(stored) is not State.RESOLVED:
                raise  # the call's own stored error
            error = NondeterminismError(
                f"{self.id}: its stored value no longer decodes ({exc}); deploy code "
                "that can read the history"
            )
            raise self._fatal(error) from None

    def _fatal(self, error: NondeterminismError) -> NondeterminismError:
        """``error``, made fatal for the run: it ends unsettled even if the
        workflow catches it (see ``RunState.fatal``). The first one stays the
        run's: a workflow that caught it and diverged again is reported where
        it first did."""
        run = self._ctx._run
        if run is not None and run.fatal is None:
            run.fatal = error
        return error

    def _same_call(self, stored: PromiseRecord) -> bool:
        """Whether ``stored`` records this call: the same function, the same kind."""
        return stored.func == self._func_name() and stored.kind is _KINDS[self._type]

    def _diverged(self, stored: PromiseRecord) -> NondeterminismError:
        """The error of a replay whose call is not the one ``stored`` records."""
        expected = self._func_name()
        if stored.func != expected:
            what = f"calls {expected!r} here, but the stored history recorded {stored.func!r}"
        else:
            what = (
                f"makes {_KIND_NAMES[_KINDS[self._type]]} of {expected!r} here, but the "
                f"stored history recorded {_KIND_NAMES[stored.kind]}"
            )
        return NondeterminismError(
            f"{self.id}: the workflow now {what}; deploy code compatible with the history "
            "or register the changed workflow under a new version"
        )

    def _func_name(self) -> str | None:
        if self._type == _COMMAND:
            try:
                return self._ctx._engine.registry.handler(type(self._target)).name
            except NotRegisteredError:  # replayed from its history: the default name
                return type(self._target).__qualname__
        if self._type == _STEP:
            return function_name(self._target)
        if self._type == _SLEEP:
            return "resonate.sleep"
        if self._type == _REMOTE:
            return str(self._target)
        return None

    async def _run_inline(self) -> T:
        stored = self._replayed()
        self._fresh = stored is None
        if stored is not None:
            return cast("T", self._replayed_outcome(stored))
        if self._ctx._engine.closing:
            raise self._shutting_down()
        lost = self._lost()
        if lost is not None:
            raise lost
        if self._type == _STEP:
            return await self._execute_step()
        if self._type == _SLEEP:
            await self._execute_sleep()
            return cast("T", None)
        if self._type == _REMOTE:
            return await self._execute_remote()
        return await self._execute_external()

    def _lost(self) -> LeaseLost | None:
        """The run's lost lease, if it was lost: a body that caught the
        cancellation that stopped it starts no new call (another worker runs
        the run now)."""
        run = self._ctx._run
        fatal = None if run is None else run.fatal
        return fatal if isinstance(fatal, LeaseLost) else None

    def _shutting_down(self) -> ShutdownError:
        """A body that outlived its shutdown's cancellation starts no new call."""
        return ShutdownError(
            f"{self.id}: not started, this Resonate is shutting down; the run stays "
            f"PENDING and {self._ctx._engine.resumes}"
        )

    # -- executions ------------------------------------------------------------

    async def _execute_step(self) -> T:
        ctx = self._ctx
        engine = ctx._engine
        fn = self._target
        policy = self._retry_policy or engine.step_retry_policy
        deadline = None if self._timeout is None else engine.clock.now() + self._timeout
        call = engine.attempts(
            ctx._run,
            self.id,
            ctx.root_id,
            call_style(fn),
            fn,
            self._args,
            self._kwargs,
            policy,
            deadline,
        )
        if engine.tracing.enabled:
            attributes = {"resonate.id": self.id, "resonate.func": function_name(fn)}
            call = engine.tracing.traced(call, "resonate.step", attributes, settles=True)
        state, data, attempt = await call
        now = engine.clock.now()
        record = PromiseRecord(
            id=self.id,
            state=state,
            kind=Kind.STEP,
            root_id=ctx.root_id,
            created_at=now,
            func=function_name(fn),
            param=engine.try_encode_args(self._args, self._kwargs),
            value=data,
            parent_id=ctx.id,
            settled_at=now,
            attempt=attempt,
        )
        stored = await self._create(record)
        return cast("T", engine.settled_child(ctx._run, stored))

    async def _execute_sleep(self) -> None:
        ctx = self._ctx
        engine = ctx._engine
        run = ctx._run
        stored = self._stored()
        if stored is not None and stored.timeout_at is not None:
            wake = stored.timeout_at
        else:
            now = engine.clock.now()
            wake = now + float(self._target)
            record = PromiseRecord(
                id=self.id,
                state=State.PENDING,
                kind=Kind.SLEEP,
                root_id=ctx.root_id,
                created_at=now,
                func="resonate.sleep",
                parent_id=ctx.id,
                timeout_at=wake,
            )
            stored = await self._create(record)
            if stored.timeout_at is not None:
                wake = stored.timeout_at
        await engine.clock.sleep(wake - engine.clock.now())
        settled = await engine.writer.write(engine.overdue_settle(stored, engine.clock.now()))
        if settled is not None:
            engine.settled_child(run, settled)

    async def _execute_external(self) -> T:
        ctx = self._ctx
        engine = ctx._engine
        stored = self._stored()
        if stored is None:
            now = engine.clock.now()
            record = PromiseRecord(
                id=self.id,
                state=State.PENDING,
                kind=Kind.EXTERNAL,
                root_id=ctx.root_id,
                created_at=now,
                parent_id=ctx.id,
                timeout_at=None if self._timeout is None else now + self._timeout,
            )
            stored = await self._create(record)
        return await self._when_settled(stored)

    async def _execute_remote(self) -> T:
        ctx = self._ctx
        engine = ctx._engine
        now = engine.clock.now()
        record = PromiseRecord(
            id=self.id,
            state=State.PENDING,
            kind=Kind.REMOTE,
            # A remote call is the root of its own tree: whoever claims it
            # replays its children from there.
            root_id=self.id,
            created_at=now,
            func=str(self._target),
            version=self._version,
            param=self._param,
            parent_id=ctx.id,
            timeout_at=None if self._timeout is None else now + self._timeout,
        )
        stored = await self._create(record)
        if stored is record:
            engine.remote_created()
        return await self._when_settled(stored)

    async def _time_out_command(self, seconds: float, deadline: float) -> None:
        """Reject this command ``REJECTED_TIMEDOUT`` if it has no outcome in time.

        The command may be in a batch by then: its handler's outcome is not
        recorded if the timeout's row is written first (and the other way round:
        the row written first is the outcome, here and in every replay).
        """
        ctx = self._ctx
        engine = ctx._engine
        clock = engine.clock
        await clock.sleep(max(0.0, deadline - clock.now()))
        future = self._future
        if future is None or future.done():
            return
        now = clock.now()
        error = PromiseTimeoutError(f"{self.id} timed out after {seconds:g}s")
        record = PromiseRecord(
            id=self.id,
            state=State.REJECTED_TIMEDOUT,
            kind=Kind.COMMAND,
            root_id=ctx.root_id,
            created_at=now,
            func=self._func_name(),
            param=self._param,
            value=engine.encoder.encode_error(error),
            parent_id=ctx.id,
            timeout_at=deadline,
            settled_at=now,
        )
        try:
            stored = await self._create(record)
            # Raises the stored error (this timeout, usually): the except below.
            value = engine.settled_child(ctx._run, stored)
        except Exception as exc:
            if not future.done():
                self._store_failed(exc)  # awaited straight from the future
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(value)
        if self._state == _STARTED:  # its workflow waits for room in a full queue: no more
            engine.batchers[type(self._target)].wake_producers()

    async def _create(self, record: PromiseRecord) -> PromiseRecord:
        """Write this call's row unless its id is taken; the stored row, checked
        to be this call's (see :meth:`_own`)."""
        stored = await self._ctx._engine.writer.write(Create(record))
        if stored is None:  # pragma: no cover - a create always leaves a row
            raise NotFoundError(self.id)
        return self._own(stored)

    def _own(self, stored: PromiseRecord) -> PromiseRecord:
        """``stored``, the row found under this call's id, checked to be this call's.

        A call's id is its parent's plus ``.n``, so a run whose id is another
        run's plus ``.n`` holds the id of that run's n-th call: the row found
        then is not a child of this call's parent in this call's tree, and
        taking its outcome would answer this call with another workflow's. An
        id given with ``with_options(id=...)`` or ``ctx.promise(id=...)`` is
        the caller's to share, and is not checked.
        """
        ctx = self._ctx
        parent = ctx.id
        # A remote call is the root of its own tree; any other call is in its run's.
        root = self.id if self._type == _REMOTE else ctx.root_id
        if self._custom_id:
            return stored
        if stored.parent_id == parent and stored.root_id == root:
            # This call's place in this workflow: this call, unless the code
            # changed. (A remote call's name depends on where its function
            # is registered, see Context._remote: not compared.)
            if self._type == _REMOTE or self._same_call(stored):
                return stored
            raise self._fatal(self._diverged(stored))
        if (
            stored.kind is Kind.REMOTE
            and stored.root_id == stored.id
            and stored.parent_id == parent
            and ctx.id == ctx.root_id
        ):
            # A remote call that the run's own body made here (a run's id is
            # no other run's context), now another kind of call: the code
            # changed. Not in the history replayed (it is the root of its
            # own tree), it shows only here. (Under a step's context, whose
            # id another run may have, it stays a ConflictError.)
            raise self._fatal(self._diverged(stored))
        raise ConflictError(
            f"{self.id}: this call's id is already used by a promise of run "
            f"{stored.root_id!r}, not by a call of {parent!r}; a workflow's calls get the ids "
            f"'<its id>.1', '<its id>.2', ..., so a run id must not be another run's id "
            "plus '.<number>' (or give this call its own id with with_options(id=...))"
        )

    async def _when_settled(self, stored: PromiseRecord) -> T:
        """Wait until this call's promise is settled, wherever that happens; its outcome."""
        engine = self._ctx._engine
        settled = await engine.wait_settled(stored)
        return cast("T", engine.settled_child(self._ctx._run, settled))
