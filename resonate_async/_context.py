"""``Context`` and ``Promise``: the durable calls a workflow makes, and their replay.

A workflow receives a :class:`Context`. Every durable call on it (``lfi``,
``sleep``, ``promise``, ``now``, ``random``) takes the next sequence number
*synchronously*, so the child id ``f"{ctx.id}.{n}"`` depends only on program
order, and ``asyncio.gather`` over several calls replays deterministically.

A child whose row is settled in the run's replay table returns its stored
outcome without running; otherwise it runs and its outcome is written once,
when settled, by the group-commit writer.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from ._command import Command
from ._registry import call_style, function_name
from .errors import NondeterminismError, NotFoundError, ShutdownError, StoreError
from .stores._base import Create, Kind, PromiseRecord, Settle, State

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator

    from ._engine import Engine, RunState
    from .retry import RetryPolicy

__all__ = ("Context", "Promise")

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger("resonate_async")

# What a Promise stands for.
_STEP, _COMMAND, _SLEEP, _EXTERNAL, _REMOTE = range(5)
_NOT_STARTED, _STARTED, _INLINE_DONE = range(3)
_NO_KWARGS: dict[str, Any] = {}  # shared by every command; never mutated


class ReplayNow(BaseException):
    """Replay-every-step mode: unwind the workflow so it re-runs from the store.

    A ``BaseException`` so that a workflow's own ``except Exception`` never
    swallows it.
    """


# Outcomes that are not settled promises: nothing to replay from.
_NOT_SETTLED = (asyncio.CancelledError, NondeterminismError, StoreError, ShutdownError)


class Context:
    """What a workflow, a step or a batch handler receives as its first argument.

    Attributes:
        id: this execution's promise id (``"order-7"``, ``"order-7.2"``, ...).
        root_id: the id of the root run of the tree.
        attempt: 1 for the first attempt, 2 for the first retry, ...

    Example:
        ```python
        @resonate.register
        async def checkout(ctx: Context, order_id: int) -> str:
            receipt = await ctx.lfc(charge, order_id)      # a durable step
            await ctx.lfc(SendEmail(order_id))             # a batched command
            return receipt
        ```
    """

    __slots__ = ("_children", "_engine", "_leaf", "_run", "_seq", "attempt", "id", "root_id")

    def __init__(
        self,
        engine: Engine,
        run: RunState | None,
        id: str,
        root_id: str,
        attempt: int = 1,
        *,
        leaf: bool = False,
    ) -> None:
        self.id = id
        self.root_id = root_id
        self.attempt = attempt
        self._engine = engine
        self._run = run
        self._seq = 0
        self._children: list[Promise[Any]] | None = None
        self._leaf = leaf

    def __repr__(self) -> str:
        return f"Context(id={self.id!r}, attempt={self.attempt})"

    def get_dependency(self, name: str) -> Any:
        """The object registered with ``resonate.set_dependency(name, obj)``.

        Raises:
            KeyError: nothing is registered under ``name``.
        """
        try:
            return self._engine.dependencies[name]
        except KeyError:
            raise KeyError(
                f"no dependency named {name!r}; call resonate.set_dependency({name!r}, obj) "
                "before running functions that need it"
            ) from None

    # -- durable calls -------------------------------------------------------

    def _next_id(self) -> str:
        if self._run is None or self._leaf:
            raise RuntimeError(
                f"{self.id}: durable calls (lfi, lfc, sleep, promise, now, random) are only "
                "available to async or generator workflows and steps; a plain `def` function "
                "or a batch handler is a leaf"
            )
        self._seq += 1
        return f"{self.id}.{self._seq}"

    @overload
    def lfi(self, target: Command[T], /) -> Promise[T]: ...
    @overload
    def lfi(
        self,
        target: Callable[Concatenate[Context, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def lfi(self, target: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Promise[Any]: ...
    def lfi(self, target: Any, /, *args: Any, **kwargs: Any) -> Promise[Any]:
        """Start a local function invocation (or a batched command); return its promise.

        ``target`` is a function called as ``target(ctx, *args, **kwargs)``
        (``async def`` awaited, plain ``def`` run in a worker thread, generator
        driven), or a :class:`Command` instance, which goes to its type's batcher.
        The child id is assigned now; the work starts on the next loop
        iteration unless the child is already settled in the store.
        """
        promise = self._make(target, args, kwargs)
        return self._start_child(promise)

    @overload
    def lfc(self, target: Command[T], /) -> Promise[T]: ...
    @overload
    def lfc(
        self,
        target: Callable[Concatenate[Context, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def lfc(self, target: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Promise[Any]: ...
    def lfc(self, target: Any, /, *args: Any, **kwargs: Any) -> Promise[Any]:
        """``lfi`` and await: ``value = await ctx.lfc(fn, *args)``.

        The child id is assigned at the call; an ``async def`` step then runs
        inline in the awaiting task (no extra task).
        """
        promise = self._make(target, args, kwargs)
        promise._inline = True
        return promise

    def _start_child(self, promise: Promise[T]) -> Promise[T]:
        """Track an ``lfi``/``rfi`` child (awaited at the end) and start it next iteration."""
        if self._children is None:
            self._children = []
        self._children.append(promise)
        self._engine.loop.call_soon(promise._start)
        return promise

    def _make(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Promise[Any]:
        if isinstance(target, Command):
            if args or kwargs:
                raise TypeError("a Command carries its own arguments; pass only the instance")
            self._engine.registry.handler(type(target))  # fail now if no handler
            promise: Promise[Any] = Promise(self, self._next_id(), _COMMAND, target, (), _NO_KWARGS)
            promise._param = self._engine.encode_for(target, promise.id)  # fail now if unencodable
            if self._engine.tracing.enabled:  # the batch span links to this run's span
                promise._span = self._engine.tracing.current()
            return promise
        call_style(target)  # fail now if not callable
        return Promise(self, self._next_id(), _STEP, target, args, kwargs)

    @overload
    def rfi(
        self,
        target: Callable[Concatenate[Context, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def rfi(
        self, target: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> Promise[Any]: ...
    def rfi(self, target: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Promise[Any]:
        """Start a *remote* function invocation; any worker that registered it may run it.

        Creates a PENDING remote promise in the store; a worker (this one
        included) that registered ``target`` claims it, runs it and settles
        it. Arguments and the result must be encodable.

        Args:
            target: a registered function, or its registered name.
        """
        promise = self._remote(target, args, kwargs)
        return self._start_child(promise)

    @overload
    def rfc(
        self,
        target: Callable[Concatenate[Context, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def rfc(
        self, target: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> Promise[Any]: ...
    def rfc(self, target: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Promise[Any]:
        """``rfi`` and await: ``value = await ctx.rfc("charge", order_id)``."""
        promise = self._remote(target, args, kwargs)
        promise._inline = True
        return promise

    def _remote(
        self, target: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Promise[Any]:
        registry = self._engine.registry
        if isinstance(target, str):
            name = target
            entry = registry.lookup_newest(target)
        else:
            entry = registry.lookup_fn(target)
            name = entry.name if entry is not None else function_name(target)
        promise: Promise[Any] = Promise(self, self._next_id(), _REMOTE, name, args, kwargs)
        promise._version = entry.version if entry is not None else 1
        promise._param = self._engine.encode_for([list(args), kwargs], promise.id)
        return promise

    def sleep(self, seconds: float) -> Promise[None]:
        """A durable timer: ``await ctx.sleep(60)``.

        A run resumed after a crash sleeps only the time that remains.
        """
        if seconds < 0:
            raise ValueError(f"sleep needs a non-negative number of seconds, got {seconds}")
        promise: Promise[None] = Promise(self, self._next_id(), _SLEEP, seconds, (), {})
        promise._inline = True
        return promise

    def promise(self, id: str | None = None, timeout: float | None = None) -> Promise[Any]:
        """An external promise that something outside the run settles.

        ``await`` it to wait until ``resonate.promises.resolve(id, value)`` (or
        reject/cancel, from any process sharing the store) settles it.

        Args:
            id: the promise's global id, used verbatim (default: a child id).
            timeout: seconds after which it rejects with ``PromiseTimeoutError``.
        """
        child_id = self._next_id()
        return Promise(self, child_id if id is None else id, _EXTERNAL, timeout, (), {})

    def now(self) -> Promise[float]:
        """The current time (seconds since the epoch), recorded once and replayed."""
        return cast("Promise[float]", self.lfc(_recorded_now))

    def random(self) -> Promise[float]:
        """A random float in ``[0, 1)``, recorded once and replayed."""
        return cast("Promise[float]", self.lfc(_recorded_random))

    # -- structure -----------------------------------------------------------

    async def _join_children(self) -> None:
        """Wait for every ``lfi`` child; errors of children never awaited are logged."""
        children = self._children
        if not children:
            return
        for child in children:
            try:
                await child
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not child._awaited:
                    log.warning(
                        "%s: error of child %s that was never awaited: %r", self.id, child.id, exc
                    )

    def _cancel_children(self) -> None:
        for child in self._children or ():
            child._cancel()


async def _recorded_now(ctx: Context) -> float:
    return ctx._engine.clock.now()


async def _recorded_random(ctx: Context) -> float:
    return _random.random()


_recorded_now.__qualname__ = "resonate.now"
_recorded_random.__qualname__ = "resonate.random"


class Promise(Generic[T]):
    """The promise of a durable call; ``await`` it for the value.

    Attributes:
        id: the promise's id in the store.
    """

    __slots__ = (
        "_args",
        "_awaited",
        "_ctx",
        "_error",
        "_fresh",
        "_future",
        "_in_queue",
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
        self._future: asyncio.Future[T] | None = None
        self._state = _NOT_STARTED
        self._inline = False
        self._in_queue = False
        self._fresh = False  # executed now, not replayed from the store
        self._awaited = False
        self._yielded = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._version = 1

    def __repr__(self) -> str:
        return f"Promise(id={self.id!r})"

    def with_options(
        self,
        *,
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
        id: str | None = None,
    ) -> Promise[T]:
        """Set options of this call before it starts; returns this promise.

        Args:
            retry_policy: how a failing step is retried (not for commands: a
                batch follows its handler's policy).
            timeout: seconds from now after which the call rejects with
                ``PromiseTimeoutError`` (``REJECTED_TIMEDOUT``).
            id: use this id instead of the child id (verbatim).

        Raises:
            RuntimeError: the call has already been dispatched, or a retry
                policy was given for a command.
        """
        if self._state != _NOT_STARTED:
            raise RuntimeError(
                f"{self.id}: with_options must be called before the call starts "
                "(right after lfi/lfc, before the next await)"
            )
        if retry_policy is not None:
            if self._type == _COMMAND:
                raise RuntimeError(
                    f"{self.id}: a command's retries follow its handler's retry_policy; "
                    "set it in register_command_handler"
                )
            self._retry_policy = retry_policy
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, got {timeout}")
            self._timeout = timeout
        if id is not None:
            self.id = id
        return self

    # -- awaiting ------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, T]:
        if (
            self._type == _COMMAND
            and self._state == _NOT_STARTED
            and not self._ctx._engine.replay_every_step
        ):
            # The hot path of `await ctx.lfc(Command(...))`: await the future itself.
            future = self._start()
            if self._in_queue or future.done():
                self._awaited = True
                return future.__await__()
        return self._await()

    def _await(self) -> Generator[Any, None, T]:
        self._awaited = True
        state = self._state
        if state == _INLINE_DONE:
            return self._outcome()
        if state == _NOT_STARTED and self._inline and self._type != _COMMAND:
            self._state = _STARTED
            try:
                self._value = yield from self._run_inline().__await__()
            except BaseException as exc:
                self._error = exc
                self._state = _INLINE_DONE
                self._replay_now(exc)
                raise
            self._state = _INLINE_DONE
            self._replay_now(None)
            return cast("T", self._value)
        future = self._start()
        if self._type == _COMMAND and not future.done() and not self._in_queue:
            yield from self._ctx._engine.batchers[type(self._target)].put(self).__await__()
        try:
            value = yield from future.__await__()
        except Exception as exc:
            self._replay_now(exc)
            raise
        self._replay_now(None)
        return value

    def _replay_now(self, error: BaseException | None) -> None:
        """In replay-every-step mode, restart the workflow once this fresh call settled."""
        if not self._fresh or not self._ctx._engine.replay_every_step or self._ctx._run is None:
            return
        if error is not None and isinstance(error, _NOT_SETTLED):
            return
        self._fresh = False
        raise ReplayNow

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return cast("T", self._value)

    def _cancel(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.cancel()

    def _start(self) -> asyncio.Future[T]:
        """Dispatch once (idempotent): replay from the store, or run."""
        future = self._future
        if future is not None:
            return future
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
                future.set_result(engine.outcome(stored))
            except Exception as exc:
                future.set_exception(exc)
        elif self._type == _COMMAND:
            future = loop.create_future()
            self._future = future
            engine.batchers[type(self._target)].offer(self)
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

    def _stored(self) -> PromiseRecord | None:
        """This call's row in the run's replay table, settled or not."""
        run = self._ctx._run
        return run.replay.get(self.id) if run is not None and run.replay else None

    def _replayed(self) -> PromiseRecord | None:
        """The stored, settled record of this call, checking it is the same call."""
        stored = self._stored()
        if stored is None:
            return None
        expected = self._func_name()
        if stored.func != expected:
            error = NondeterminismError(
                f"{self.id}: the workflow now calls {expected!r} here, but the stored history "
                f"recorded {stored.func!r}; deploy code compatible with the history or register "
                "the changed workflow under a new version"
            )
            run = self._ctx._run
            if run is not None:  # fatal for the run, even if the workflow catches it
                run.fatal = error
            raise error
        if stored.state is State.PENDING and not self._ctx._engine.effectively_settled(stored):
            return None
        return stored

    def _func_name(self) -> str | None:
        if self._type == _COMMAND:
            return self._ctx._engine.registry.handler(type(self._target)).name
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
            return cast("T", self._ctx._engine.outcome(stored))
        if self._type == _STEP:
            return await self._execute_step()
        if self._type == _SLEEP:
            await self._execute_sleep()
            return cast("T", None)
        if self._type == _REMOTE:
            return await self._execute_remote()
        return await self._execute_external()

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
            call = engine.tracing.traced(call, "resonate.step", attributes)
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
        stored = await engine.writer.write(Create(record))
        return cast("T", engine.settled_child(ctx._run, stored or record))

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
            stored = await engine.writer.write(Create(record))
            if stored is not None and stored.timeout_at is not None:
                wake = stored.timeout_at
        await engine.clock.sleep(wake - engine.clock.now())
        settled = await engine.writer.write(
            Settle(self.id, State.RESOLVED, engine.encoded_none, engine.clock.now())
        )
        if settled is not None:
            engine.settled_child(run, settled)

    async def _execute_external(self) -> T:
        ctx = self._ctx
        engine = ctx._engine
        run = ctx._run
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
            stored = await engine.writer.write(Create(record))
            if stored is None:  # pragma: no cover - a create always leaves a row
                raise NotFoundError(self.id)
        settled = await engine.wait_settled(stored)
        return cast("T", engine.settled_child(run, settled))

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
        stored = await engine.writer.write(Create(record))
        if stored is None:  # pragma: no cover - a create always leaves a row
            raise NotFoundError(self.id)
        if stored is record:
            engine.remote_created()
        settled = await engine.wait_settled(stored)
        return cast("T", engine.settled_child(ctx._run, settled))
