"""Arguments that cannot work are refused at the call, with an error naming the fix."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from resonate_async import (
    CanceledError,
    Command,
    Context,
    EncodingError,
    JSONEncoder,
    Kind,
    MemoryStore,
    NotRegisteredError,
    Resonate,
    ShutdownError,
    State,
    SystemClock,
)
from resonate_async.errors import SignatureError
from resonate_async.retry import Never, RetryPolicy, constant, never
from resonate_async.stores import store_from_spec
from resonate_async.testing import VirtualClock, crash, quiesce


@dataclass
class Ping(Command[str]):
    n: int


async def echo(ctx: Context, x: int) -> int:
    return x


def pong(ctx: Context, commands: list[Ping]) -> str:
    return "pong"


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("poll_seconds", 0),
        ("poll_seconds", -1.0),
        ("poll_seconds", float("nan")),
        ("lease_seconds", 0),
        ("lease_seconds", -15),
        ("heartbeat_seconds", 0),
        ("heartbeat_seconds", -5),
        ("grace_seconds", -0.5),
        ("max_rows_per_transaction", 0),
    ],
)
def test_durations_out_of_range_are_refused_naming_the_parameter(param: str, value: float) -> None:
    # A zero poll or heartbeat made an idle engine spin at 100% CPU.
    with pytest.raises(ValueError, match=rf"^{param} must be"):
        Resonate(MemoryStore(), **{param: value})  # type: ignore[arg-type]


def test_durations_in_range_are_accepted() -> None:
    Resonate(MemoryStore(), lease_seconds=3, heartbeat_seconds=1, poll_seconds=0.2, grace_seconds=0)
    # Not a third of the lease: recommended, not enforced.
    Resonate(MemoryStore(), lease_seconds=3, heartbeat_seconds=2.5)
    with pytest.raises(ValueError, match="shorter than lease_seconds"):
        Resonate(MemoryStore(), lease_seconds=3, heartbeat_seconds=3)
    with pytest.raises(TypeError, match="poll_seconds must be a number"):
        Resonate(MemoryStore(), poll_seconds="1")  # type: ignore[arg-type]


NOT_POLICIES = pytest.mark.parametrize(
    "policy", ["never", 3, never, Never], ids=["str", "int", "factory", "class"]
)


@NOT_POLICIES
def test_register_refuses_what_is_not_a_retry_policy(policy: Any) -> None:
    resonate = Resonate(MemoryStore())
    with pytest.raises(TypeError, match=r"^retry_policy must be a RetryPolicy such as never\(\)"):
        resonate.register(echo, retry_policy=policy)
    with pytest.raises(TypeError, match=r"^retry_policy must be a RetryPolicy"):
        resonate.register(retry_policy=policy)


@NOT_POLICIES
def test_register_command_handler_refuses_what_is_not_a_retry_policy(policy: Any) -> None:
    resonate = Resonate(MemoryStore())
    with pytest.raises(TypeError, match=r"^retry_policy must be a RetryPolicy"):
        resonate.register_command_handler(Ping, pong, retry_policy=policy)


@NOT_POLICIES
def test_resonate_refuses_a_step_retry_policy_that_is_not_one(policy: Any) -> None:
    with pytest.raises(TypeError, match=r"^step_retry_policy must be a RetryPolicy"):
        Resonate(MemoryStore(), step_retry_policy=policy)


def test_an_uncalled_factory_is_told_to_call_it() -> None:
    with pytest.raises(TypeError, match=r"call it: never\(\)"):
        Resonate(MemoryStore()).register(echo, retry_policy=never)  # type: ignore[call-overload]


async def test_policies_of_the_factories_and_of_the_user_are_accepted() -> None:
    class EveryOther:
        def next_delay(self, attempt: int) -> float | None:
            return 0.0 if attempt <= 2 else None

        def should_retry(self, error: BaseException) -> bool:
            return True

    assert isinstance(EveryOther(), RetryPolicy)
    resonate = Resonate(MemoryStore(), step_retry_policy=constant(0, 1))
    resonate.register(echo, retry_policy=EveryOther())
    resonate.register_command_handler(Ping, pong, retry_policy=never())
    async with resonate:
        assert await resonate.run("e", echo, 4) == 4


@pytest.mark.parametrize("timeout", ["10", True, [1]])
def test_register_refuses_a_timeout_that_is_not_a_number(timeout: Any) -> None:
    with pytest.raises(TypeError, match=r"^timeout must be a number of seconds"):
        Resonate(MemoryStore()).register(echo, timeout=timeout)


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_register_refuses_a_timeout_that_is_not_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be positive"):
        Resonate(MemoryStore()).register(echo, timeout=timeout)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"maxlen": 0}, ValueError, r"^maxlen must be at least 1 \(or None\)"),
        ({"maxlen": 2.5}, TypeError, r"^maxlen must be an int \(or None\)"),
        ({"maxlen": True}, TypeError, r"^maxlen must be an int"),
        ({"max_wait": -1}, ValueError, r"^max_wait must be >= 0"),
        ({"max_wait": math.inf}, ValueError, r"^max_wait must be finite, got inf$"),
        ({"max_wait": math.nan}, ValueError, r"^max_wait must be >= 0"),
        ({"max_wait": "1"}, TypeError, r"^max_wait must be a number of seconds"),
        ({"concurrency": 0}, ValueError, r"^concurrency must be at least 1"),
        ({"concurrency": 1.5}, TypeError, r"^concurrency must be an int"),
        ({"queue_size": 2.5}, TypeError, r"^queue_size must be an int \(or None\)"),
        ({"queue_size": 0}, ValueError, r"^queue_size must be at least 1"),
    ],
)
def test_register_command_handler_refuses_bad_numbers_naming_them(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    # max_wait=inf made the batcher wait for ever; concurrency=1.5 failed at
    # the first batch, far from the call that set it.
    with pytest.raises(error, match=message):
        Resonate(MemoryStore()).register_command_handler(Ping, pong, **options)


def test_register_refuses_an_infinite_timeout() -> None:
    with pytest.raises(ValueError, match=r"^timeout must be finite, got inf \(None means no"):
        Resonate(MemoryStore()).register(echo, timeout=math.inf)
    Resonate(MemoryStore(), grace_seconds=math.inf)  # aclose() may wait for batches for ever


async def test_promises_create_refuses_an_infinite_timeout() -> None:
    resonate = Resonate(MemoryStore())
    async with resonate:
        with pytest.raises(ValueError, match=r"^timeout must be finite"):
            await resonate.promises.create("forever", timeout=math.inf)


def test_register_refuses_an_empty_name() -> None:
    resonate = Resonate(MemoryStore())
    with pytest.raises(ValueError, match=r"^name must be a non-empty string"):
        resonate.register(echo, name="")
    with pytest.raises(ValueError, match=r"^name must be a non-empty string"):
        resonate.register_command_handler(Ping, pong, name="")


@pytest.mark.parametrize("seconds", [0, -5])
async def test_promises_create_refuses_a_timeout_that_is_not_positive(seconds: float) -> None:
    resonate = Resonate(MemoryStore())
    async with resonate:
        with pytest.raises(ValueError, match=r"^timeout must be positive"):
            await resonate.promises.create("p", timeout=seconds)
        assert await resonate.promises.get("p") is None  # nothing was created
        made = await resonate.promises.create("p", timeout=None)
        assert made.timeout_at is None and made.state is State.PENDING


async def test_promises_search_takes_state_and_kind_names_in_any_case() -> None:
    resonate = Resonate(MemoryStore())
    async with resonate:
        await resonate.promises.create("a")
        await resonate.promises.create("b")
        await resonate.promises.resolve("b", 1)
        for state in ("resolved", "Resolved", "RESOLVED", State.RESOLVED):
            assert [r.id for r in await resonate.promises.search(state=state)] == ["b"]
        for kind in ("external", "EXTERNAL", Kind.EXTERNAL):
            found = await resonate.promises.search(kind=kind, state="pending")
            assert [r.id for r in found] == ["a"]
        with pytest.raises(ValueError, match="state 'done' is not one of PENDING, RESOLVED"):
            await resonate.promises.search(state="done")
        with pytest.raises(ValueError, match="kind 'job' is not one of run, step"):
            await resonate.promises.search(kind="job")


async def test_calls_refuse_options_of_the_wrong_type_naming_them() -> None:
    resonate = Resonate(MemoryStore())
    errors: list[str] = []

    async def step(ctx: Context) -> None:
        return None

    @resonate.register
    async def careless(ctx: Context) -> None:
        for bad in (
            lambda: ctx.lfc(step).with_options(retry_policy=3),  # type: ignore[arg-type]
            lambda: ctx.lfc(step).with_options(timeout="10"),  # type: ignore[arg-type]
            lambda: ctx.sleep("5"),  # type: ignore[arg-type]
            lambda: ctx.promise(timeout=0),
            lambda: ctx.promise(timeout="5"),  # type: ignore[arg-type]
            lambda: ctx.sleep(math.inf),
            lambda: ctx.promise(timeout=math.inf),
            lambda: ctx.lfc(step).with_options(timeout=math.inf),
        ):
            try:
                bad()
            except (TypeError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    async with resonate:
        await resonate.run("c", careless)
    assert errors[0].startswith("TypeError: retry_policy must be a RetryPolicy")
    assert errors[1].startswith("TypeError: timeout must be a number of seconds")
    assert errors[2].startswith("TypeError: sleep needs a number of seconds")
    assert errors[3].startswith("ValueError: timeout must be positive")
    assert errors[4].startswith("TypeError: timeout must be a number of seconds")
    assert errors[5].startswith("ValueError: sleep needs a finite")
    assert errors[6].startswith("ValueError: timeout must be finite")
    assert errors[7].startswith("ValueError: timeout must be finite")
    assert len(errors) == 8


async def test_get_refuses_an_id_that_is_not_a_string() -> None:
    resonate = Resonate(MemoryStore())
    async with resonate:
        with pytest.raises(ValueError, match="a run id must be a non-empty string"):
            resonate.get(5)  # type: ignore[arg-type]


def test_a_resonate_used_from_another_event_loop_says_so() -> None:
    resonate = Resonate(MemoryStore())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(resonate.start())

        async def elsewhere() -> None:
            with pytest.raises(RuntimeError, match="started in another event loop"):
                resonate.run("x", "nothing")

        asyncio.run(elsewhere())
        with pytest.raises(RuntimeError, match="none runs in this thread"):
            resonate.get("x")  # no event loop runs here at all
        loop.run_until_complete(resonate.aclose())
    finally:
        loop.close()


async def test_an_argument_that_cannot_be_encoded_is_named_as_an_argument() -> None:
    # Not by the [args, kwargs] list the arguments are stored as.
    from resonate_async import EncodingError

    resonate = Resonate(MemoryStore())
    errors: list[str] = []

    @resonate.register(name="takes")
    async def takes(ctx: Context, *args: Any, y: Any = None) -> None:
        return None

    @resonate.register(name="calls")
    async def calls(ctx: Context) -> None:
        try:
            ctx.rfi(takes, 1, {2})
        except EncodingError as exc:
            errors.append(str(exc))

    async with resonate:
        with pytest.raises(EncodingError) as caught:
            resonate.run("a", takes, {1})
        errors.append(str(caught.value))
        with pytest.raises(EncodingError) as caught:
            resonate.run("b", takes, y=[{1}])
        errors.append(str(caught.value))
        await resonate.run("c", calls)
    assert "run 'a' of 'takes': cannot encode a value of type set at argument 1:" in errors[0]
    assert "at keyword argument 'y'[0]:" in errors[1]
    assert errors[2].startswith("c.1: cannot encode a value of type set at argument 2:")


@pytest.mark.parametrize(
    ("id", "message"),
    [
        ("a\x00b", "must not contain NUL characters"),
        ("lone \udc80", "must be valid Unicode text"),
        ("x" * 1001, "must be at most 1000 bytes of UTF-8, got 1001"),
        ("é" * 501, "must be at most 1000 bytes of UTF-8, got 1002"),
    ],
)
async def test_ids_no_store_could_keep_are_refused_at_the_call(id: str, message: str) -> None:
    # One such id in a store made every later claim or release that carried
    # it fail, and with it the worker's claims of every other run.
    resonate = Resonate(MemoryStore())
    resonate.register(echo)
    errors: list[str] = []

    @resonate.register(name="custom")
    async def custom(ctx: Context) -> None:
        for call in (lambda: ctx.lfi(echo, 1).with_options(id=id), lambda: ctx.promise(id=id)):
            try:
                call()
            except ValueError as exc:
                errors.append(str(exc))

    async with resonate:
        with pytest.raises(ValueError, match=message):
            resonate.run(id, echo, 1)
        with pytest.raises(ValueError, match=message):
            await resonate.promises.create(id)
        await resonate.run("c", "custom")
        assert await resonate.run("é" * 500, echo, 2) == 2  # 1,000 bytes: kept
    assert len(errors) == 2 and all(message in e for e in errors)


@dataclass
class Pong(Command[str]):
    n: int


class NotADataclass(Command[str]):
    pass


def any_pong(ctx: Context, commands: list[Any]) -> str:
    return "pong"


async def test_a_refused_handler_registration_leaves_nothing_registered() -> None:
    resonate = Resonate(MemoryStore())
    resonate.register_command_handler(Ping, pong, name="Ping")
    with pytest.raises(ValueError, match="Ping"):  # the name is taken by Ping
        resonate.register_command_handler(Pong, any_pong, name="Ping")
    with pytest.raises(TypeError):
        resonate.register_command_handler(NotADataclass, any_pong)

    async def call(ctx: Context, which: str) -> str:
        return await ctx.lfc(Pong(1) if which == "Pong" else NotADataclass())

    resonate.register(call)
    async with resonate:
        for which in ("Pong", "NotADataclass"):
            with pytest.raises(NotRegisteredError, match=which):
                await resonate.run(f"call-{which}", call, which)
    # Fixed, the same type registers: it was not half-registered before.
    resonate.register_command_handler(Pong, any_pong, name="Pong")


@pytest.mark.parametrize("caught", [False, True])
async def test_a_command_without_a_handler_here_leaves_its_run_to_a_worker_with_one(
    caught: bool,
) -> None:
    # A deployment to finish, not the run's failure: its id is not used up.
    store = MemoryStore()
    clock = VirtualClock()

    def worker(with_handler: bool) -> Resonate:
        resonate = Resonate(store, clock=clock, worker_id="w")
        if with_handler:
            resonate.register_command_handler(Ping, pong)

        @resonate.register(name="send")
        async def send(ctx: Context) -> str:
            try:
                return await ctx.lfc(Ping(1))
            except NotRegisteredError:
                if not caught:
                    raise
                return "caught"  # not what the run settles with

        return resonate

    first = worker(with_handler=False)
    async with first:
        with pytest.raises(NotRegisteredError, match="register_command_handler"):
            await first.run("s", "send")
        assert (await store.get_many(["s"]))["s"].state is State.PENDING
    second = worker(with_handler=True)
    async with second:  # restarted with the handler: the run resumes
        assert await asyncio.wait_for(second.get("s").result(), 10) == "pong"
    assert (await store.get_many(["s"]))["s"].state is State.RESOLVED


@pytest.mark.parametrize("name", [None, "ping-v1"])
async def test_a_command_its_history_holds_replays_in_a_worker_without_its_handler(
    name: str | None,
) -> None:
    # Workers of one store need not all register every handler: one without
    # Ping's resumes a run whose Ping is recorded, and needs none to replay it.
    store = MemoryStore()
    clock = VirtualClock()

    async def pong_here(ctx: Context, commands: list[Ping]) -> str:
        return "pong"  # not a thread's: the virtual clock's advance waits for it

    def worker(with_handler: bool) -> Resonate:
        resonate = Resonate(store, clock=clock, worker_id="w")
        if with_handler:
            resonate.register_command_handler(Ping, pong_here, name=name)

        @resonate.register(name="send-later")
        async def send_later(ctx: Context) -> str:
            answer = await ctx.lfc(Ping(1))
            await ctx.sleep(100)
            return answer + "!"

        return resonate

    first = worker(with_handler=True)
    await first.start()
    first.run("s2", "send-later")
    await clock.advance(1)  # Ping recorded, the sleep started
    assert (await store.get_many(["s2.1"]))["s2.1"].state is State.RESOLVED
    await crash(first)
    second = worker(with_handler=False)
    async with second:
        handle = second.get("s2")
        await clock.advance(100)
        await quiesce()
        if name is None:
            assert handle.done()
            assert await handle == "pong!"
        else:  # recorded under a name only its handler's workers know: not replayed here
            engine = second._engine
            assert engine is not None
            assert "s2" not in engine.stuck  # left to them, not held as nondeterministic
            assert (await store.get_many(["s2"]))["s2"].state is State.PENDING


@pytest.mark.parametrize("retried", [False, True])
async def test_a_context_kept_past_its_function_makes_no_more_durable_calls(
    retried: bool,
) -> None:
    # A context that outlives its function (kept in a global, a task left
    # running) must not add children to a run that settled without them.
    store = MemoryStore()
    resonate = Resonate(store)
    kept: list[Context] = []
    steps: list[str] = []

    async def step(ctx: Context, x: int) -> int:
        steps.append(ctx.id)
        return x

    @resonate.register(retry_policy=constant(delay=0.001, max_retries=1) if retried else never())
    async def keep(ctx: Context) -> int:
        kept.append(ctx)
        if retried and ctx.attempt == 1:
            raise ValueError("first attempt fails")
        return await ctx.lfc(step, 1)

    async with resonate:
        assert await resonate.run("keep", keep) == 1
        for ctx in kept:
            with pytest.raises(RuntimeError, match="already returned"):
                ctx.lfc(step, 2)
            with pytest.raises(RuntimeError, match="already returned"):
                ctx.lfi(step, 2)
            with pytest.raises(RuntimeError, match="already returned"):
                ctx.sleep(1)
            with pytest.raises(RuntimeError, match="already returned"):
                ctx.now()
        ids = sorted(r.id for r in await store.search(prefix="keep"))
    assert steps == ["keep.1"]
    assert ids == ["keep", "keep.1"]
    assert len(kept) == (2 if retried else 1)


class AlwaysRetry:
    """A user's policy that retries everything."""

    def should_retry(self, error: BaseException) -> bool:
        return True

    def next_delay(self, attempt: int) -> float | None:
        return 60.0


@pytest.mark.parametrize("policy", [constant(delay=60, max_retries=5), AlwaysRetry()])
async def test_a_durable_call_from_a_leaf_fails_the_step_without_retries(
    policy: RetryPolicy,
) -> None:
    # The SDK's own misuse errors cannot go away on a retry: the step fails
    # at its first attempt, not after every back-off of its retry policy.
    resonate = Resonate(MemoryStore(), step_retry_policy=policy)
    attempts: list[int] = []

    def leaf(ctx: Context) -> int:
        attempts.append(ctx.attempt)
        return ctx.lfc(echo, 1)  # type: ignore[return-value]

    @resonate.register(retry_policy=never())
    async def flow(ctx: Context) -> int:
        return await ctx.lfc(leaf)

    async with resonate:
        with pytest.raises(RuntimeError, match="is a leaf"):
            await asyncio.wait_for(resonate.run("leafy", flow).result(), 10)
    assert attempts == [1]


class _NoRegisterType:  # all the Encoder protocol but register_type
    def encode(self, value: object) -> bytes:
        return b""

    def decode(self, data: bytes) -> object:
        return None

    def encode_error(self, error: BaseException) -> bytes:
        return b""

    def decode_error(self, data: bytes) -> BaseException:
        return Exception()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"encoder": JSONEncoder}, TypeError, r"encoder must be an instance .*JSONEncoder\(\)"),
        ({"encoder": 1}, TypeError, "encoder must be an instance"),
        ({"encoder": _NoRegisterType()}, TypeError, "encoder must be .* register_type"),
        ({"clock": SystemClock}, TypeError, r"clock must be an instance .*SystemClock\(\)"),
        ({"clock": object()}, TypeError, "clock must be an instance with the methods now, sleep"),
        ({"worker_id": " "}, ValueError, "worker_id must not be empty"),
        ({"worker_id": 5}, TypeError, "worker_id must be a string"),
    ],
)
def test_resonate_refuses_what_no_start_could_use(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Resonate(MemoryStore(), **kwargs)


def test_resonate_refuses_a_store_argument_of_another_type() -> None:
    with pytest.raises(TypeError, match="store must be a Store, a path or a URL"):
        Resonate(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "error"), [("2", TypeError), (1.5, TypeError), (0, ValueError)]
)
def test_register_refuses_a_version_that_is_not_a_positive_int(
    version: object, error: type[Exception]
) -> None:
    resonate = Resonate(MemoryStore())
    with pytest.raises(error, match="version must be"):
        resonate.register(echo, version=version)  # type: ignore[call-overload]


@pytest.mark.parametrize("deadline", [None, 100.0])
async def test_a_cancelled_body_can_still_make_its_cleanup_calls(deadline: float | None) -> None:
    # Cancelled is not "returned": with or without a deadline (under which the
    # body runs in a task of its own), its cleanup's durable calls still run.
    resonate = Resonate(MemoryStore())
    gate = asyncio.Event()
    done: list[str] = []

    async def block(ctx: Context) -> None:
        await gate.wait()

    async def refund(ctx: Context) -> None:
        done.append(ctx.id)

    @resonate.register(timeout=deadline)
    async def order(ctx: Context) -> None:
        try:
            await ctx.lfc(block)
        except asyncio.CancelledError:
            await ctx.lfc(refund)
            raise

    async with resonate:
        handle = resonate.run("o", order)
        for _ in range(100):  # the body is in its first step
            await asyncio.sleep(0)
        assert handle.cancel()
        with pytest.raises(CanceledError):
            await handle
    assert done == ["o.2"]


async def test_a_function_that_returns_a_coroutine_is_told_to_be_an_async_def() -> None:
    resonate = Resonate(MemoryStore())

    async def later(ctx: Context) -> int:
        return 1

    def wrapper(ctx: Context) -> Any:
        return later(ctx)  # a coroutine, which nobody awaits

    resonate.register(wrapper, name="wrapper")
    async with resonate:
        with pytest.raises(EncodingError, match="returned a coroutine, not its value"):
            await resonate.run("co", "wrapper")


@pytest.mark.parametrize("spec", [":memory: ", " :memory:", ":MEMORY:"])
def test_a_near_miss_of_memory_is_no_sqlite_file(spec: str) -> None:
    with pytest.raises(ValueError, match="did you mean ':memory:'"):
        store_from_spec(spec)


@pytest.mark.parametrize("shared", [False, True])
async def test_a_shutdown_says_whether_the_run_survives_the_next_start(shared: bool) -> None:
    store = MemoryStore()
    resonate = Resonate(store if shared else ":memory:")
    gate = asyncio.Event()

    @resonate.register
    async def waits(ctx: Context) -> None:
        await gate.wait()

    await resonate.start()
    handle = resonate.run("w", waits)
    for _ in range(50):
        await asyncio.sleep(0)
    await resonate.aclose()
    with pytest.raises(ShutdownError) as raised:
        await handle
    if shared:
        assert "resumes at the next start" in str(raised.value)
    else:
        assert "is lost with this in-memory store" in str(raised.value)


async def test_a_handler_that_cannot_take_ctx_and_commands_is_refused() -> None:
    resonate = Resonate(MemoryStore())

    def no_context(commands: list[Ping]) -> str:
        return "pong"

    def three(ctx: Context, commands: list[Ping], extra: int) -> str:
        return "pong"

    for handler in (no_context, three):
        with pytest.raises(SignatureError, match="called as handler\\(ctx, commands\\)"):
            resonate.register_command_handler(Ping, handler)  # type: ignore[arg-type]
    resonate.register_command_handler(Ping, pong)  # nothing was half-registered


@dataclass
class CallableWorkflow:
    """A callable object of a dataclass: unhashable (eq=True, not frozen)."""

    greeting: str

    async def __call__(self, ctx: Context, name: str) -> str:
        return f"{self.greeting} {name}"


class Service:
    async def greet(self, ctx: Context, name: str) -> str:
        return f"hi {name}"


async def test_callable_objects_and_bound_methods_register_and_run() -> None:
    resonate = Resonate(MemoryStore())
    workflow = CallableWorkflow("hello")
    service = Service()
    resonate.register(workflow, name="hello")
    resonate.register(service.greet)
    resonate.register(service.greet)  # the same method again (a new bound object): fine
    async with resonate:
        assert await resonate.run("h", workflow, "ada") == "hello ada"
        assert await resonate.run("g", service.greet, "bob") == "hi bob"


async def test_promises_checks_ids_and_tags_and_sees_a_run_just_started() -> None:
    resonate = Resonate(MemoryStore())
    resonate.register(echo)
    async with resonate:
        resonate.run("r", echo, 1)
        found = await resonate.promises.get("r")  # before the writer got to it
        assert found is not None and found.kind is Kind.RUN
        for bad in ("", "\udcff", 5):
            with pytest.raises(ValueError, match="promise id"):
                await resonate.promises.get(bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="promise id"):
                await resonate.promises.resolve(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="tags must be a dict of str to str"):
            await resonate.promises.create("p", tags={"n": 1})  # type: ignore[dict-item]


def test_aclose_from_another_event_loop_is_refused_and_stops_nothing() -> None:
    resonate = Resonate(MemoryStore())
    resonate.register(echo)
    owner = asyncio.new_event_loop()
    try:
        owner.run_until_complete(resonate.start())
        done = threading.Event()
        thread = threading.Thread(target=lambda: owner.run_until_complete(_until(done)))
        thread.start()
        try:
            with pytest.raises(RuntimeError, match="started in another event loop"):
                asyncio.run(resonate.aclose())
        finally:
            owner.call_soon_threadsafe(done.set)
            thread.join()

        # Still running in its own loop: it runs, then closes there.
        async def use_and_close() -> int:
            value = await resonate.run("e", echo, 3)
            await resonate.aclose()
            return value

        assert owner.run_until_complete(use_and_close()) == 3
    finally:
        owner.close()


async def _until(done: threading.Event) -> None:
    while not done.is_set():
        await asyncio.sleep(0.01)


async def test_use_store_on_a_started_resonate_says_to_close_it() -> None:
    # A module-level resonate that an earlier test (same loop scope) left started.
    resonate = Resonate(MemoryStore())
    await resonate.start()
    try:
        with pytest.raises(RuntimeError, match=r"before start .* resonate.aclose\(\)"):
            resonate.use_store(MemoryStore())
    finally:
        await resonate.aclose()
    resonate.use_store(MemoryStore())  # closed: fine
