"""``Resonate``: the public face — lifecycle, registration, ``run``/``get``, stats.

Its ``promises`` namespace is ``Promises``, in ``_promises.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

from ._clock import check_seconds
from ._encoding import JSONEncoder, same_params
from ._engine import Engine, argument_path
from ._handle import Handle
from ._leases import abandoned_workers, default_worker_id
from ._promise import check_id
from ._promises import Promises
from ._registry import (
    CallStyle,
    FunctionEntry,
    HandlerEntry,
    Registry,
    arity,
    call_style,
    check_count,
    function_name,
)
from ._stats import RunStats, Stats, StoreStats
from .errors import ConflictError, EncodingError, SignatureError
from .retry import RetryPolicy, checked_policy, exponential, never
from .stores import MemoryStore, Store, store_from_spec

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator
    from types import TracebackType

    from ._clock import Clock
    from ._command import Command
    from ._context import Context
    from ._encoding import Encoder

__all__ = ("Resonate",)

log = logging.getLogger("resonate_async")

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound="Command[Any]")
F = TypeVar("F", bound="Callable[Concatenate[Context, ...], Any]")


class Resonate:
    """A durable-execution runtime on one store.

    Args:
        store: ``None`` (the ``RESONATE_STORE`` environment variable, else the
            embedded file ``resonate.db``), a path (SQLite file), ``":memory:"``,
            a URL (``sqlite:///path``, ``postgresql://...``) or a ``Store``.
        encoder: how arguments, values and errors are encoded (default JSON).
        clock: the source of time (tests pass ``testing.VirtualClock``).
        worker_id: this process's identity for leases (default
            ``host:pid:random``; pass a stable one to take over your own runs
            at once after a restart).
        step_retry_policy: default policy of ``lfi`` steps (a ``RetryPolicy``,
            e.g. ``exponential(max_retries=3)``).
        lease_seconds: how long a run's lease lasts without a heartbeat (> 0).
        heartbeat_seconds: how often leases are renewed (> 0, shorter than
            the lease; a third of it or less is recommended).
        poll_seconds: how often a waiter polls the store for promises settled
            by other processes (> 0).
        grace_seconds: how long ``aclose()`` lets in-flight batches finish (>= 0).
        max_rows_per_transaction: the group-commit writer's transaction size
            bound (rows written per commit; also how many fresh runs one
            commit admits at most).
        replay_every_step: a testing mode: after every durable call settles
            for the first time, the workflow is re-run from the top against
            the store, so code that is not deterministic raises
            ``NondeterminismError`` and effects made outside steps show up
            as repeated. Slow; for tests only.
        tracing: emit OpenTelemetry spans (``resonate.run``, ``resonate.step``,
            ``resonate.batch``, ``resonate.store.commit``) through the global
            tracer provider; needs the ``[otel]`` extra.
        tracer_provider: an OpenTelemetry ``TracerProvider`` to use instead of
            the global one (implies ``tracing=True``).

    Attributes:
        promises: the promise API (``Promises``): ``get``, ``search``,
            ``create``, ``resolve``, ``reject`` and ``cancel`` durable
            promises by id, e.g. ``await resonate.promises.resolve(id, value)``
            for an external promise. Its methods need a started ``Resonate``.

    Raises:
        ValueError: a duration above is out of range, the heartbeat is not
            shorter than the lease, or ``worker_id`` is empty.
        TypeError: ``step_retry_policy`` is not a ``RetryPolicy``, a
            duration is not a number, ``store`` is none of the accepted
            types, ``encoder`` or ``clock`` is not an instance with their
            methods (a class passed instead of an instance, say), or
            ``worker_id`` is not a string.

    Example:
        ```python
        resonate = Resonate("app.db")

        @resonate.register
        async def greet(ctx: Context, name: str) -> str:
            return f"hello {name}"

        async def main() -> None:
            async with resonate:
                print(await resonate.run("greet-1", greet, "world"))
        ```
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store | None = None,
        *,
        encoder: Encoder | None = None,
        clock: Clock | None = None,
        worker_id: str | None = None,
        step_retry_policy: RetryPolicy | None = None,
        lease_seconds: float = 15.0,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        grace_seconds: float = 5.0,
        max_rows_per_transaction: int = 1000,
        replay_every_step: bool = False,
        tracing: bool = False,
        tracer_provider: Any = None,
    ) -> None:
        from ._clock import SystemClock

        # Zero or negative intervals make an idle worker's loops spin.
        check_seconds("lease_seconds", lease_seconds)
        check_seconds("heartbeat_seconds", heartbeat_seconds)
        check_seconds("poll_seconds", poll_seconds)
        check_seconds("grace_seconds", grace_seconds, zero_ok=True, inf_ok=True)
        if heartbeat_seconds >= lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        _check_store_spec(store)
        self._store_spec: str | os.PathLike[str] | Store | None = store
        self._encoder: Encoder = encoder if encoder is not None else JSONEncoder()
        self._clock: Clock = clock if clock is not None else SystemClock()
        _check_instance(
            "encoder",
            encoder,
            ("encode", "decode", "encode_error", "decode_error", "register_type"),
        )
        _check_instance("clock", clock, ("now", "sleep"))
        if worker_id is not None:
            if not isinstance(worker_id, str):
                raise TypeError(f"worker_id must be a string (or None), got {worker_id!r}")
            if not worker_id.strip():
                raise ValueError(f"worker_id must not be empty, got {worker_id!r}")
        self._worker_id = worker_id or default_worker_id()
        self._step_policy = _retry_policy("step_retry_policy", step_retry_policy, exponential)
        self._lease = lease_seconds
        self._heartbeat = heartbeat_seconds
        self._poll = poll_seconds
        self._grace = grace_seconds
        check_count("max_rows_per_transaction", max_rows_per_transaction)
        self._max_rows = max_rows_per_transaction
        self._replay_every_step = replay_every_step
        if tracing or tracer_provider is not None:
            from ._telemetry import Tracing

            Tracing(True, tracer_provider)  # fail here, not at start, if otel is missing
        self._tracing = tracing
        self._tracer_provider = tracer_provider
        self._registry = Registry()
        self._dependencies: dict[str, Any] = {}
        self._engine: Engine | None = None
        self._closing: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[None] | None = None  # done when start() returns
        # The counters of the last engine, kept from its stop to the next start.
        self._stopped_stats: Stats | None = None
        # The store of an engine whose event loop ended, closed at the next
        # start() or aclose() (use_store cannot await).
        self._orphaned_store: Store | None = None
        self.promises = Promises(self)

    def __repr__(self) -> str:
        state = "started" if self._engine is not None else "not started"
        return f"<Resonate {self._worker_id} {state}>"

    @property
    def worker_id(self) -> str:
        """This process's identity in leases."""
        return self._worker_id

    # -- lifecycle -------------------------------------------------------------

    def use_store(self, store: str | os.PathLike[str] | Store) -> None:
        """Swap the store before start (e.g. a throwaway store in tests)."""
        self._forget_ended_loop()
        if self._engine is not None:
            raise RuntimeError(
                "use_store must be called before start (outside `async with`), and this "
                "Resonate is started: was it not closed, by an earlier test sharing this "
                "event loop? Call `await resonate.aclose()` first"
            )
        self._store_spec = store

    async def start(self) -> None:
        """Open the store, start the writer and batchers, recover pending runs.

        If the event loop that started this ``Resonate`` ended without
        ``aclose()`` (an ``asyncio.run`` that returned, a failed test), that
        engine is dropped with a warning, as if its process had crashed: its
        runs stay PENDING in the store and this start resumes them.
        """
        self._forget_ended_loop()
        await self._close_orphaned_store()
        if self._closing is not None and not self._closing.done():
            await asyncio.shield(self._closing)  # an aclose() in progress: start after it
        if self._engine is not None or self._starting is not None:
            raise RuntimeError("this Resonate is already started; call aclose() first")
        # From here until it returns, a second start() is refused and aclose()
        # waits for this one (then stops what it started).
        starting = self._starting = asyncio.get_running_loop().create_future()
        try:
            await self._start()
        finally:
            self._starting = None
            starting.set_result(None)

    async def _start(self) -> None:
        self._closing = None
        self._stopped_stats = None
        store = store_from_spec(self._store_spec)
        await store.open()
        try:
            engine = Engine(
                store=store,
                registry=self._registry,
                encoder=self._encoder,
                clock=self._clock,
                dependencies=self._dependencies,
                worker_id=self._worker_id,
                step_retry_policy=self._step_policy,
                lease_seconds=self._lease,
                heartbeat_seconds=self._heartbeat,
                poll_seconds=self._poll,
                grace_seconds=self._grace,
                max_rows_per_transaction=self._max_rows,
                replay_every_step=self._replay_every_step,
                tracing=self._tracing,
                tracer_provider=self._tracer_provider,
            )
            if not isinstance(self._store_spec, Store) and isinstance(store, MemoryStore):
                # ":memory:" (given or from RESONATE_STORE) is a new store at each start.
                engine.resumes = (
                    'is lost with this in-memory store (":memory:" makes a new one at '
                    "each start; pass one MemoryStore instance to keep runs across starts)"
                )
            self._engine = engine
            await engine.start()
        except BaseException:
            if self._engine is not None:
                await self._engine.shutdown()
                self._engine = None
            await store.close()
            raise

    async def aclose(self) -> None:
        """Stop: cancel runs in flight (they stay PENDING), let in-flight batches
        finish within the grace period, flush the writer, close the store.

        Idempotent, and shielded: cancelling the caller does not interrupt it.
        An engine whose event loop already ended is dropped instead (see
        ``start``).
        """
        self._engine_to_stop(
            "close it from that loop (asyncio.run_coroutine_threadsafe(resonate.aclose(), "
            "loop) from another thread)"
        )
        await self._close_orphaned_store()
        if self._closing is None:
            if self._engine is None and self._starting is None:
                return
            self._closing = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        starting = self._starting
        if starting is not None:  # a start() in progress: stop what it starts
            await starting
        engine = self._engine
        if engine is None:
            return
        try:
            await engine.shutdown()
        finally:
            self._engine = None
            self._stopped_stats = _snapshot(engine)
            await engine.store.close()

    def _engine_to_stop(self, how: str) -> Engine | None:
        """The engine to stop from this loop (``None``: none, or its loop
        ended and it was dropped); raise, saying ``how``, if it runs in
        another loop that still runs."""
        self._forget_ended_loop()
        engine = self._engine
        if engine is not None and engine.loop is not asyncio.get_running_loop():
            # Its tasks live in that loop: stopping them from here would fail
            # half-way and leave them running under this worker id.
            raise RuntimeError(
                f"this Resonate was started in another event loop, which still runs; {how}"
            )
        return engine

    def _forget_ended_loop(self) -> None:
        """Drop the engine of an event loop that ended without ``aclose()``.

        Its tasks cannot run again (or, on a loop merely stopped, must not: they
        would work as a second worker with this id), and awaiting anything of
        that loop raises. So it is dropped as ``testing.crash`` drops one:
        nothing queued is written, its runs stay PENDING, and the next start
        (same worker id) frees their leases and resumes them.
        """
        closing = self._closing
        if closing is not None and _ended(closing.get_loop()):
            self._closing = None
        starting = self._starting
        if starting is not None and _ended(starting.get_loop()):
            self._starting = None
        engine = self._engine
        if engine is None or not _ended(engine.loop):
            return
        log.warning(
            "the event loop that started %r ended without aclose(); dropping its engine "
            "(its runs stay PENDING in the store and resume at the next start)",
            self,
        )
        self._engine = None
        self._stopped_stats = _snapshot(engine)
        self._orphaned_store = engine.store
        if engine.loop.is_closed():
            engine.closing = True
            abandoned_workers.add(self._worker_id)
        else:  # stopped: cancel its tasks, should it run again
            engine.drop()

    async def _close_orphaned_store(self) -> None:
        store, self._orphaned_store = self._orphaned_store, None
        if store is None:
            return
        # Best effort: its connections may belong to the ended loop, and a
        # lock held by one of that loop's tasks would never be released. Not
        # wait_for: a close stuck on that loop's dead parts may not even end
        # once cancelled, and this start must go ahead regardless.
        closing = asyncio.ensure_future(store.close())
        done, _ = await asyncio.wait({closing}, timeout=max(self._grace, 1.0))
        if not done:
            closing.cancel()
            log.warning("closing the store of the ended event loop timed out; left behind")
        elif closing.exception() is not None:
            log.warning("closing the store of the ended event loop failed: %r", closing.exception())

    async def __aenter__(self) -> Resonate:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _started(self) -> Engine:
        engine = self._engine
        if engine is None or engine.closing:
            raise RuntimeError(
                "Resonate is not running; enter `async with resonate:` (or await "
                "resonate.start()) before running or getting runs"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None:
            raise RuntimeError(
                "resonate.run and resonate.get need the event loop this Resonate runs "
                "in, and none runs in this thread; from another thread, submit the call "
                "to that loop, e.g. asyncio.run_coroutine_threadsafe(...)"
            )
        if running is not engine.loop:
            raise RuntimeError(
                "this Resonate was started in another event loop; use it in the loop "
                "that entered `async with resonate:` (in pytest-asyncio, give the tests "
                "that share it the loop scope of the fixture or module that starts it)"
            )
        return engine

    # -- registration ----------------------------------------------------------

    @overload
    def register(
        self,
        fn: F,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> F: ...
    @overload
    def register(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...
    def register(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Register a workflow: ``@resonate.register``, ``@resonate.register(...)`` or a call.

        Accepts ``async def``, plain ``def`` (run in a worker thread) and
        generator functions, each taking a ``Context`` first. The registry key
        is ``(name, version)``; ``name`` defaults to ``fn.__qualname__`` (a
        ``functools.partial``'s function's, a callable object's class's: give
        two partials of one function, or two instances, a ``name=`` each). A run's
        own body is not retried by default (``never()``): its steps carry their
        own retries. Registering after start recovers that function's pending runs.

        Raises:
            ValueError: ``name`` is empty, ``version`` is below 1 or
                ``timeout`` is not positive.
            TypeError: ``retry_policy`` is not a ``RetryPolicy``, ``timeout``
                is not a number of seconds, ``name`` is not a string or
                ``version`` is not an int; ``SignatureError`` (a
                ``TypeError``) when the function takes no ``Context`` first.
        """
        _check_name(name)
        check_count("version", version)
        policy = _retry_policy("retry_policy", retry_policy, never)
        _check_timeout(timeout)

        def decorate(f: F) -> F:
            entry = FunctionEntry(
                fn=f,
                name=function_name(f) if name is None else name,
                version=version,
                style=call_style(f),
                retry_policy=policy,
                timeout=timeout,
                arity=arity(f),
            )
            self._registry.add_function(entry)
            engine = self._engine
            if engine is not None and not engine.closing:
                engine.spawn_other(engine.recover([(entry.name, entry.version)]))
            return f

        return decorate if fn is None else decorate(fn)

    def register_command_handler(
        self,
        command_type: type[C],
        handler: Callable[[Context, list[C]], Any],
        *,
        maxlen: int | None = None,
        max_wait: float = 0.0,
        concurrency: int = 1,
        retry_policy: RetryPolicy | None = None,
        queue_size: int | None = None,
        name: str | None = None,
    ) -> None:
        """Serve ``command_type`` by calling ``handler(ctx, commands)`` on batches.

        Args:
            command_type: a ``Command`` subclass (usually a dataclass).
            handler: ``async def handler(ctx, commands)`` or a plain ``def``
                (run in a worker thread). Return a list with one item per
                command (an ``Exception`` item rejects its command alone) or a
                single value for every command; a handler may reorder its list
                in place (results follow the list as it left it). Handlers run
                at least once per command: make them idempotent, keyed on the
                commands' fields.
            maxlen: largest batch (unbounded by default).
            max_wait: seconds to linger for a fuller batch while fewer than
                ``maxlen`` (and fewer than ``queue_size``) are queued
                (default 0: never adds latency).
            concurrency: handler calls that may run at once.
            retry_policy: retries of a failing batch (default exponential);
                once exhausted, the batch is bisected to isolate bad commands.
            queue_size: bound on waiting commands (backpressure when full).
            name: type name used in the store and the encoder (default
                ``__qualname__``).
        """
        from ._command import Command

        if not (isinstance(command_type, type) and issubclass(command_type, Command)):
            raise TypeError(f"{command_type!r} is not a Command subclass; subclass Command")
        _check_name(name)
        policy = _retry_policy("retry_policy", retry_policy, exponential)
        check_count("maxlen", maxlen, optional=True)
        check_seconds("max_wait", max_wait, zero_ok=True)
        check_count("concurrency", concurrency)
        check_count("queue_size", queue_size, optional=True)
        style = call_style(handler)
        if style is CallStyle.GENERATOR:
            raise TypeError("a batch handler must be an `async def` or a plain `def`")
        try:  # a handler that cannot take (ctx, commands) would fail every batch
            checked = arity(handler)
            if checked is not None:
                checked.check(handler, ([],), {})
        except SignatureError:
            raise SignatureError(
                f"{function_name(handler)} cannot be a batch handler: it is called as "
                "handler(ctx, commands), with the Context and the list of commands"
            ) from None
        entry = HandlerEntry(
            command_type=command_type,
            name=command_type.__qualname__ if name is None else name,
            handler=handler,
            style=style,
            maxlen=maxlen,
            max_wait=max_wait,
            concurrency=concurrency,
            retry_policy=policy,
            queue_size=queue_size,
        )
        # Check both sides before changing either: a registration that
        # raises leaves nothing registered.
        self._registry.check_handler(entry)
        self._encoder.register_type(entry.name, command_type)
        self._registry.add_handler(entry)
        if self._engine is not None and not self._engine.closing:
            self._engine.add_batcher(entry)

    # -- dependencies ----------------------------------------------------------

    def set_dependency(self, name: str, obj: Any) -> None:
        """Hand a non-durable resource (a connection, a client) to functions and handlers."""
        self._dependencies[name] = obj

    # -- runs --------------------------------------------------------------------

    @overload
    def run(
        self,
        id: str,
        fn: Callable[Concatenate[Context, P], Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Handle[R]: ...
    @overload
    def run(
        self,
        id: str,
        fn: Callable[Concatenate[Context, P], Generator[Any, Any, R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Handle[R]: ...
    @overload
    def run(
        self,
        id: str,
        fn: Callable[Concatenate[Context, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Handle[R]: ...
    @overload
    def run(self, id: str, fn: str, /, *args: Any, **kwargs: Any) -> Handle[Any]: ...
    def run(
        self, id: str, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> Handle[Any]:
        """Start (or attach to) the durable run ``id``; return its handle at once.

        Synchronous, like ``asyncio.create_task``: a loop of ``run`` calls
        starts thousands of runs that batch together. Idempotent by id: a
        completed id returns its stored outcome without running anything; an
        id running here returns the same handle; a PENDING id not running here
        (a crashed run) is resumed. The same id with another function or other
        arguments raises ``ConflictError`` when awaited.

        Raises:
            NotRegisteredError: ``fn`` is not registered.
            SignatureError: the arguments do not fit ``fn``'s signature (a
                ``TypeError``).
            EncodingError: an argument cannot be encoded.
            ValueError: ``id`` is empty, longer than 1,000 bytes of UTF-8, or
                holds a NUL or a lone surrogate (no store could keep it).
            RuntimeError: Resonate is not started.
        """
        engine = self._started()
        check_id(id, "a run id")
        entry = self._registry.function(fn)
        if entry.arity is not None:  # before anything is stored under this id
            entry.arity.check(entry.name, args, kwargs)
        try:
            param = self._encoder.encode([list(args), kwargs])
        except EncodingError as exc:
            where = f"run {id!r} of {entry.name!r}"
            raise EncodingError(f"{where}: {argument_path(str(exc))}") from None
        existing = engine.runs.get(id)
        if existing is not None:
            # Another version of the same function is the same run (as for
            # one stored already; see RunDriver._attach_to).
            running = existing.entry
            if running.name == entry.name and same_params(
                self._encoder, existing.param, param, entry.signature
            ):
                return existing
            other = " with other arguments" if running.name == entry.name else ""
            handle: Handle[Any] = Handle(id, asyncio.get_running_loop())
            handle._set_exception(
                ConflictError(
                    f"run id {id!r} is already running {running.name!r} version "
                    f"{running.version}{other}; use a new id"
                )
            )
            return handle
        return engine.start_run(id, entry, param, args, kwargs)

    def get(self, id: str) -> Handle[Any]:
        """A handle on an existing run (possibly started by another process).

        Awaiting it gives the outcome; ``NotFoundError`` if no such id exists.
        Any promise's id is accepted, not only a run's: a step's gives its
        value, an external promise's what settles it, a sleep's ``None``
        once it wakes (as ``await ctx.sleep`` does).
        """
        engine = self._started()
        check_id(id, "a run id")
        existing = engine.runs.get(id)
        if existing is not None:
            return existing
        return engine.watch(id)

    def stats(self) -> Stats:
        """A typed snapshot of runs, batchers and store commits.

        While started, the running engine's counters. After ``aclose()`` (or
        once the event loop that started it ended), the counters it had when
        it stopped, until the next ``start()`` begins again from zero. All
        zeros before the first start.
        """
        engine = self._engine
        if engine is not None:
            return _snapshot(engine)
        if self._stopped_stats is not None:
            return self._stopped_stats.copy()
        return Stats(RunStats(), {}, StoreStats())


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None:
        check_seconds("timeout", timeout, none_ok=True)


def _check_instance(name: str, value: object, methods: tuple[str, ...]) -> None:
    """Raise unless ``value`` is None or an instance with ``methods`` (not a class)."""
    if value is None:
        return
    missing = [m for m in methods if not callable(getattr(value, m, None))]
    if isinstance(value, type) or missing:
        hint = f"; did you mean {value.__name__}()?" if isinstance(value, type) else ""
        raise TypeError(
            f"{name} must be an instance with the methods {', '.join(methods)}, got {value!r}{hint}"
        )


def _check_store_spec(store: object) -> None:
    """Raise at construction for a store argument no start could use."""
    if store is None or isinstance(store, (str, os.PathLike, Store)):
        return
    raise TypeError(
        f"store must be a Store, a path or a URL string (or None for RESONATE_STORE), got {store!r}"
    )


def _check_name(name: str | None) -> None:
    if name is None:
        return
    if not isinstance(name, str):
        raise TypeError(f"name must be a string (or None for the default), got {name!r}")
    if not name:
        raise ValueError("name must be a non-empty string (or None for the default), got ''")


def _retry_policy(
    param: str, value: RetryPolicy | None, default: Callable[[], RetryPolicy]
) -> RetryPolicy:
    """``value`` if it is a retry policy, ``default()`` for ``None``; else a TypeError."""
    return default() if value is None else checked_policy(param, value)


def _ended(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` is over for us: closed, or stopped while another loop runs here."""
    if loop.is_closed():
        return True
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # outside any loop (use_store): a stopped loop may run again
        return False
    return running is not loop and not loop.is_running()


def _snapshot(engine: Engine) -> Stats:
    return Stats(
        runs=engine.run_stats.copy(),
        batchers={b.entry.name: b.snapshot() for b in engine.batchers.values()},
        store=engine.store_stats.copy(),
    )
