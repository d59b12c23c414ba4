"""``Context``: the durable calls a workflow makes (see ``_promise`` for their replay).

A workflow receives a ``Context``. Every durable call on it (``lfi``,
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
import math
import random as _random
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast, overload

from ._clock import check_seconds
from ._command import Command
from ._invoke import being_cancelled
from ._promise import (
    _COMMAND,
    _EXTERNAL,
    _NO_KWARGS,
    _NOT_STARTED,
    _REMOTE,
    _SLEEP,
    _STEP,
    Promise,
    ReplayNow,
    check_id,
)
from ._registry import arity, call_style, function_name
from .errors import NotRegisteredError, UsageError
from .stores._base import State

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator

    from ._engine import Engine
    from ._runs import RunState

__all__ = ("Context",)

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger("resonate_async")


class Context:
    """What a workflow, a step or a batch handler receives as its first argument.

    Attributes:
        id: this execution's promise id (``"order-7"``, ``"order-7.2"``, ...),
            the same on every retry and after a crash: a step's idempotency
            key. In a batch handler it names the handler call
            (``"batch:InsertUser:7"``), which is no key: use the commands' fields.
        root_id: the id of the root run of the tree (``""`` in a batch handler).
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

    __slots__ = (
        "_children",
        "_ended",
        "_engine",
        "_leaf",
        "_run",
        "_seq",
        "attempt",
        "id",
        "root_id",
    )

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
        # Set once the function this context was passed to has returned or
        # raised an Exception: a call made through it then would belong to no
        # attempt. Not when it is cancelled (a cancel, a shutdown, a deadline):
        # its body may still be unwinding, and its cleanup may make calls.
        self._ended = False

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
            raise UsageError(
                f"{self.id}: durable calls (lfi, lfc, sleep, promise, now, random) are only "
                "available to async or generator workflows and steps; a plain `def` function "
                "or a batch handler is a leaf"
            )
        if self._ended:
            raise UsageError(
                f"{self.id}: this context's function has already returned (or raised), so "
                "a durable call through it would belong to no run; make every call before "
                "the function returns (await the tasks that make them)"
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
    def lfi(
        self,
        target: Callable[Concatenate[Context, P], Generator[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def lfi(
        self,
        target: Callable[Concatenate[Context, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    def lfi(self, target: Any, /, *args: Any, **kwargs: Any) -> Promise[Any]:
        """Start a local function invocation (or a batched command); return its promise.

        ``target`` is a function called as ``target(ctx, *args, **kwargs)``
        (``async def`` awaited, plain ``def`` run in a worker thread, generator
        driven), or a ``Command`` instance, which goes to its type's batcher.
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
    def lfc(
        self,
        target: Callable[Concatenate[Context, P], Generator[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def lfc(
        self,
        target: Callable[Concatenate[Context, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
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
            id = self._next_id()  # a leaf's call is misuse first (UsageError)
            promise: Promise[Any] = Promise(self, id, _COMMAND, target, (), _NO_KWARGS)
            try:
                self._engine.registry.handler(type(target))  # fail now if no handler
            except NotRegisteredError as exc:
                # Not the run's failure but this deployment's: it stays
                # PENDING, resumed by a worker that registered the handler
                # (this one, once restarted with it), as for an rfc. A
                # command whose outcome the history holds replays without one.
                if not self._recorded(promise):
                    promise._awaited = True  # the call is an error: no never-awaited warning
                    run = self._run
                    if run is not None and run.fatal is None:
                        run.fatal = exc
                    raise
            try:
                promise._param = self._engine.encode_for(target, promise.id)  # fail now
            except BaseException:
                promise._awaited = True  # the call is an error: no never-awaited warning on top
                raise
            if self._engine.tracing.enabled:  # the batch span links to this run's span
                promise._span = self._engine.tracing.current()
            return promise
        call_style(target)  # fail now if not callable
        checked = arity(target, cache=True)
        if checked is not None:  # fail now if these arguments cannot bind
            checked.check(target, args, kwargs)  # (named only if it fails)
        return Promise(self, self._next_id(), _STEP, target, args, kwargs)

    def _recorded(self, promise: Promise[Any]) -> bool:
        """Whether the run's history holds ``promise``'s outcome already (under
        the name it is found by here: a handler registered elsewhere under
        another ``name=`` is not known to be this call)."""
        stored = promise._stored()
        return (
            stored is not None
            and promise._same_call(stored)
            and (stored.state is not State.PENDING or self._engine.effectively_settled(stored))
        )

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
        self,
        target: Callable[Concatenate[Context, P], Generator[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def rfi(
        self,
        target: Callable[Concatenate[Context, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def rfi(self, target: str, /, *args: Any, **kwargs: Any) -> Promise[Any]: ...
    def rfi(self, target: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Promise[Any]:
        """Start a *remote* function invocation; any worker that registered it may run it.

        Creates a PENDING remote promise in the store; a worker (this one
        included) that registered ``target`` claims it, runs it and settles
        it. Arguments and the result must be encodable.

        Args:
            target: a registered function, or its registered name. A name
                registered here takes its newest version here, and the
                registered ``timeout``; one not registered in this process
                (registered by another worker) is stored as version 1,
                unless ``with_options(version=...)`` names another.
            *args: positional arguments: ``target`` is called as
                ``target(ctx, *args, **kwargs)`` by the worker that runs it.
                Encoded now, with the ``Resonate``'s encoder.
            **kwargs: keyword arguments, as ``args``.

        Returns:
            The child's promise; its id is assigned now. Await it for the
            value, or the error, of the remote run.

        Raises:
            EncodingError: an argument cannot be encoded.
            SignatureError: ``target`` is registered here and cannot be
                called with these arguments.
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
        self,
        target: Callable[Concatenate[Context, P], Generator[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def rfc(
        self,
        target: Callable[Concatenate[Context, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Promise[T]: ...
    @overload
    def rfc(self, target: str, /, *args: Any, **kwargs: Any) -> Promise[Any]: ...
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
        if entry is not None and entry.arity is not None:
            entry.arity.check(name, args, kwargs)
        promise: Promise[Any] = Promise(self, self._next_id(), _REMOTE, name, args, kwargs)
        if entry is not None:
            promise._version = entry.version
            # Its registered timeout, as for resonate.run (with_options overrides it).
            promise._timeout = entry.timeout
        else:
            promise._version = 1
            self._engine.note_remote_elsewhere(name)
        try:
            promise._param = self._engine.encode_args(args, kwargs, promise.id)
        except BaseException:
            promise._awaited = True  # the call is an error: no never-awaited warning on top
            raise
        return promise

    def sleep(self, seconds: float) -> Promise[None]:
        """A durable timer: ``await ctx.sleep(60)``.

        A run resumed after a crash sleeps only the time that remains.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"sleep needs a number of seconds, got {seconds!r}")
        if not 0 <= seconds < math.inf:  # NaN too
            raise ValueError(f"sleep needs a finite, non-negative number of seconds, got {seconds}")
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
        if timeout is not None:
            check_seconds("timeout", timeout, none_ok=True)
        if id is not None:
            check_id(id, "id")
        child_id = self._next_id()
        promise: Promise[Any] = Promise(
            self, child_id if id is None else id, _EXTERNAL, timeout, (), {}
        )
        promise._custom_id = id is not None  # a global id: shared, not checked as a child's
        return promise

    def now(self) -> Promise[float]:
        """The current time (seconds since the epoch), recorded once and replayed."""
        return cast("Promise[float]", self.lfc(_recorded_now))

    def random(self) -> Promise[float]:
        """A random float in ``[0, 1)``, recorded once and replayed."""
        return cast("Promise[float]", self.lfc(_recorded_random))

    # -- structure -----------------------------------------------------------

    async def _join_children(self, *, settled_by_now: bool = False) -> None:
        """Wait for every ``lfi`` child; errors of children never awaited are logged.

        A child stopped by ``_cancel_children`` (its parent timed out) has
        nothing to wait for. ``settled_by_now``: the call's outcome is known
        (it failed) or its body restarts anyway, so a child settling fresh in
        replay-every-step mode asks for no restart (its ``ReplayNow``).
        """
        children = self._children
        if not children:
            return
        for child in children:
            awaited = child._awaited
            if _stopped(child):
                continue
            try:
                await child
            except ReplayNow:
                if not settled_by_now:
                    raise
            except asyncio.CancelledError:
                if _stopped(child) and not being_cancelled():
                    continue
                raise
            except Exception as exc:
                if not awaited:
                    log.warning(
                        "%s: error of child %s that was never awaited: %r", self.id, child.id, exc
                    )

    def _cancel_children(self) -> None:
        for child in self._children or ():
            child._cancel()

    async def _stop_children(self) -> None:
        """Cancel every child and wait for those running in tasks to stop: no
        child step outlives its run's cancellation, or the shutdown."""
        self._cancel_children()
        tasks = [c._future for c in self._children or () if isinstance(c._future, asyncio.Task)]
        running = [task for task in tasks if not task.done()]
        if running:
            await asyncio.wait(running)
        for task in tasks:  # the call is left PENDING: their errors are not its outcome
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it as lost


def _stopped(child: Promise[Any]) -> bool:
    """Whether ``child`` was stopped without an outcome: cancelled, or (an
    lfc in replay-every-step mode) cut short in the task that awaited it."""
    if child._inline and child._state == _NOT_STARTED:
        return True
    future = child._future
    return future is not None and future.cancelled() and not child._inline


async def _recorded_now(ctx: Context) -> float:
    return ctx._engine.clock.now()


async def _recorded_random(ctx: Context) -> float:
    return _random.random()


_recorded_now.__qualname__ = "resonate.now"
_recorded_random.__qualname__ = "resonate.random"
