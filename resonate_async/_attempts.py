"""Calling a function until its retry policy gives up, and encoding the outcome.

A step (``lfc``/``lfi`` of a function) and a run's body go through
:meth:`Attempts.attempts` (a plain run makes its first attempt inline, in
``_runs``, and continues here if it fails). Each attempt gets a fresh
``Context`` numbered by its attempt; a failure the policy retries waits its
delay on the engine's clock (the virtual one in tests) and runs again; the
final value or error is encoded once, ready for the settle. Errors that must
leave the promise PENDING (nondeterminism, a store failure, shutdown,
cancellation: ``LEAVE_PENDING``) propagate instead.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, cast

from ._clock import with_deadline
from ._context import Context
from ._invoke import invoke
from ._promise import ReplayNow
from ._registry import CallStyle
from ._waiting import ignore_report
from .errors import (
    CanceledError,
    EncodingError,
    NondeterminismError,
    PromiseTimeoutError,
    ShutdownError,
    SignatureError,
    StoreError,
    UsageError,
)
from .stores._base import Kind, Settle, State

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._clock import Clock
    from ._encoding import Encoder
    from ._engine import Engine
    from ._runs import RunState
    from ._writer import GroupCommitWriter
    from .retry import RetryPolicy
    from .stores._base import PromiseRecord, Store

__all__ = ("LEAVE_PENDING", "Attempts", "unwrap_group")

log = logging.getLogger("resonate_async")

# Errors that end a run without settling it: it stays PENDING for recovery.
_UNSETTLED = (NondeterminismError, StoreError, ShutdownError)
#: What leaves a call's promise pending, after cancelling the call's children.
LEAVE_PENDING = (asyncio.CancelledError, *_UNSETTLED)

# Members read on every call: a module global is cheaper than an Enum class attribute.
_RESOLVED = State.RESOLVED
_ASYNC, _SYNC = CallStyle.ASYNC, CallStyle.SYNC


class Attempts:
    """Attempts of one call under its retry policy (a mixin of ``Engine``)."""

    # Provided by Engine.
    store: Store
    encoder: Encoder
    clock: Clock
    encoded_none: bytes
    closing: bool
    restarting: set[Context]
    writer: GroupCommitWriter
    leases_until: float

    if TYPE_CHECKING:

        def effectively_settled(self, record: PromiseRecord) -> bool: ...

        async def confirm_leases(self) -> None: ...

        def overdue_settle(self, record: PromiseRecord, now: float) -> Settle: ...

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
            if run is not None:
                if clock.now() >= self.leases_until:
                    # This worker's leases may have run out (a pause, a store
                    # out of reach): renew them first, which stops this run if
                    # it is another worker's now, before the attempt makes its
                    # effects.
                    await self.confirm_leases()
                    self._check_unsettled(run)
                elif run.fatal is not None:
                    # Lost (or stuck) already, found by a renewal made
                    # meanwhile: not even an attempt in a task of its own
                    # (an lfi), or one that was ready to start as it was found.
                    raise run.fatal
            # cast: Engine is the one class that mixes this in.
            ctx = Context(cast("Engine", self), run, id, root_id, attempt, leaf=style is _SYNC)
            try:
                try:
                    if deadline is None:
                        # An async function is awaited directly: no wrapper
                        # coroutine on the hot path.
                        try:
                            value = await (
                                fn(ctx, *args, **kwargs)
                                if style is _ASYNC
                                else invoke(style, fn, ctx, args, kwargs)
                            )
                        except Exception:
                            ctx._ended = True  # see Context._ended
                            raise
                        ctx._ended = True
                        if ctx._children:
                            await ctx._join_children()
                    else:  # the deadline covers the call's children too
                        call = _then_join(style, fn, ctx, args, kwargs)
                        value = await with_deadline(call, deadline, clock)
                except BaseExceptionGroup as group:  # an asyncio.TaskGroup in the body
                    inner = unwrap_group(group)
                    if inner is None:
                        raise
                    raise inner from None
            except ReplayNow:
                # Replay-every-step mode: a fresh call settled; re-run from the store.
                # The restart replays its children all at once, once they end.
                if ctx._children and await self._join_within(ctx, deadline):
                    timeout = TimeoutError()  # the call's time ran out first
                    final = await self._failed(run, id, ctx, timeout, attempt, policy, deadline)
                    if final is not None:
                        return final[0], final[1], attempt
                if run is not None:
                    run.replay = {r.id: r for r in await self.store.tree(run.id)}
                continue
            except LEAVE_PENDING:
                await ctx._stop_children()
                raise
            except Exception as exc:
                final = await self._failed(run, id, ctx, exc, attempt, policy, deadline)
                if final is not None:
                    return final[0], final[1], attempt
                if run is not None and run.replay is None:
                    # The next attempt replays the children the failed ones
                    # settled (their ids repeat): each was committed before the
                    # attempt saw it, so the store has them all.
                    run.replay = {r.id: r for r in await self.store.tree(run.id)}
                attempt += 1
                continue
            finally:
                if self.restarting:  # however the attempt ended (see Promise._replayed)
                    self.restarting.discard(ctx)
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
        clock = self.clock
        timed_out = deadline is not None and clock.now() >= deadline
        if ctx._children:
            timed_out = await self._join_within(ctx, deadline, timed_out=timed_out)
        self._check_unsettled(run)
        if timed_out:
            await self.settle_cut_sleeps(id, ctx.root_id)
            timeout = PromiseTimeoutError(f"{id} timed out on attempt {attempt}")
            return State.REJECTED_TIMEDOUT, self.encoder.encode_error(timeout)
        # Misuse of the SDK fails at once, whatever a custom policy says.
        retry = not isinstance(exc, UsageError | SignatureError) and policy.should_retry(exc)
        delay = policy.next_delay(attempt + 1) if retry else None
        if delay is None or (deadline is not None and clock.now() + delay >= deadline):
            return State.REJECTED, self.encoder.encode_error(exc)
        log.info("%s failed on attempt %d (%r); retrying in %.3fs", id, attempt, exc, delay)
        await clock.sleep(delay)
        return None

    async def _join_within(
        self, ctx: Context, deadline: float | None, *, timed_out: bool = False
    ) -> bool:
        """Wait for the children of an attempt whose outcome is known (it
        failed) or whose body restarts, within the call's deadline; whether
        the call timed out (then its children are stopped). A cancel or a
        shutdown meanwhile stops them before it goes on."""
        join = ctx._join_children
        try:
            if deadline is not None and not timed_out:
                try:  # its children may not outlive the call's deadline either
                    await with_deadline(join(settled_by_now=True), deadline, self.clock)
                except TimeoutError:
                    timed_out = True
            if timed_out:
                ctx._cancel_children()  # the call's time is up, and its children's
                await join(settled_by_now=True)
            elif deadline is None:
                await join(settled_by_now=True)
        except BaseException:
            await ctx._stop_children()
            raise
        return timed_out

    async def settle_cut_sleeps(self, id: str, root_id: str) -> None:
        """Settle the sleeps under call ``id`` (of the run ``root_id``) that its
        deadline or a cancel cut short, which would otherwise stay PENDING for
        good under the settled call: as every reader sees them already (woken)
        once due, else canceled. Not those of another run whose id happens to
        extend ``id`` (a remote call's, or a run named ``<id>.x``)."""
        try:
            pending = await self.store.search(
                state=State.PENDING, kind=Kind.SLEEP, prefix=f"{id}.", limit=None
            )
        except StoreError as exc:
            log.warning("%s: reading its sleeps to settle them failed: %s", id, exc)
            return
        now = self.clock.now()
        canceled: bytes | None = None
        for record in pending:
            if record.root_id != root_id:
                continue
            if self.effectively_settled(record):
                op = self.overdue_settle(record, now)
            else:
                if canceled is None:
                    cut = CanceledError(f"a sleep of {id} was cut short")
                    canceled = self.encoder.encode_error(cut)
                op = Settle(record.id, State.REJECTED_CANCELED, canceled, now)
            self.writer.write_then(op, ignore_report, None)

    def _check_unsettled(self, run: RunState | None) -> None:
        """Raise what must leave the call PENDING whatever its body did with it:
        the run's nondeterminism or store failure (see ``RunState.fatal``), or a
        shutdown whose cancellation the body caught (it resumes at the next
        start, instead of settling with what the interrupted body chose)."""
        if run is not None and run.fatal is not None:
            raise run.fatal  # with its own cause: the driver's error, say
        if self.closing:
            raise asyncio.CancelledError

    def _succeeded(self, run: RunState | None, id: str, value: Any) -> tuple[State, bytes]:
        """The settled outcome of a call that returned ``value``."""
        self._check_unsettled(run)
        if value is None:
            return _RESOLVED, self.encoded_none
        try:
            return _RESOLVED, self.encoder.encode(value)
        except Exception as exc:  # a custom encoder's own errors too: the step settles
            error = EncodingError(f"{id}: the return value is not encodable: {exc}")
            if not isinstance(exc, EncodingError):
                error = EncodingError(f"{id}: the encoder failed on the return value: {exc!r}")
            if inspect.iscoroutine(value):  # a lambda or def returning a coroutine
                value.close()  # not awaited on purpose: no warning on top
                error = EncodingError(
                    f"{id} returned a coroutine, not its value: make it an `async def` "
                    "(a lambda or a plain def that returns a coroutine is not awaited)"
                )
            return State.REJECTED, self.encoder.encode_error(error)


async def _then_join(
    style: CallStyle,
    fn: Callable[..., Any],
    ctx: Context,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Call ``fn``, then wait for the ``lfi`` children it left running."""
    try:
        value = await invoke(style, fn, ctx, args, kwargs)
    except Exception:
        ctx._ended = True  # see Context._ended
        raise
    ctx._ended = True
    if ctx._children:
        await ctx._join_children()
    return value


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """What a group that a body raised (an ``asyncio.TaskGroup``'s) stands for.

    A store failure, nondeterminism, shutdown or cancellation in any of its
    tasks leaves the call PENDING, as it does outside a group: the first such
    error, to raise instead of the group. Otherwise, in replay-every-step
    mode, a fresh call that settled restarts the body: ``ReplayNow``. ``None``
    when the group is the body's own failure, to settle as such.
    """
    pending = group.subgroup(LEAVE_PENDING)
    if pending is not None:
        return _first_leaf(pending)
    if group.subgroup(ReplayNow) is not None:
        return ReplayNow()
    return None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in ``group`` that is not itself a group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
