"""Runs: idempotency by id, outcomes, errors at the call, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import (
    CanceledError,
    Command,
    ConflictError,
    Context,
    EncodingError,
    MemoryStore,
    NotFoundError,
    NotRegisteredError,
    Resonate,
    ShutdownError,
    State,
)
from resonate_async.errors import SignatureError
from resonate_async.retry import RetryPolicy, constant, never
from resonate_async.testing import quiesce

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from pathlib import Path

    from resonate_async.stores._base import Op


@dataclass
class Ping(Command[str]):
    n: int


class Boom(Exception):
    pass


def make(store: object = None) -> Resonate:
    return Resonate(store if store is not None else MemoryStore())  # type: ignore[arg-type]


async def test_run_returns_the_workflow_value() -> None:
    resonate = make()

    @resonate.register
    async def add(ctx: Context, a: int, b: int = 0) -> int:
        return a + b

    async with resonate:
        assert await resonate.run("add-1", add, 2, b=3) == 5
        assert (
            await resonate.run("add-2", "test_run_returns_the_workflow_value.<locals>.add", 1) == 1
        )


async def test_completed_id_returns_stored_outcome_without_running_again() -> None:
    store = MemoryStore()
    calls: list[int] = []
    resonate = make(store)

    @resonate.register
    async def once(ctx: Context, x: int) -> int:
        calls.append(x)
        return x * 10

    async with resonate:
        assert await resonate.run("once", once, 4) == 40
    async with resonate:  # a new start on the same store
        handle = resonate.run("once", once, 4)
        assert await handle == 40
        assert await handle.result() == 40
    assert calls == [4]


async def test_same_id_running_here_returns_the_same_handle() -> None:
    resonate = make()
    gate = asyncio.Event()

    @resonate.register
    async def wait(ctx: Context) -> str:
        await gate.wait()
        return "done"

    async with resonate:
        first = resonate.run("w", wait)
        second = resonate.run("w", wait)
        assert first is second
        gate.set()
        assert await first == "done"


async def test_same_id_other_arguments_is_a_conflict_whatever_the_state() -> None:
    resonate = make()

    @resonate.register
    async def f(ctx: Context, x: int) -> int:
        return x

    @resonate.register
    async def g(ctx: Context, x: int) -> int:
        return x

    async with resonate:
        running = resonate.run("c", f, 1)
        with pytest.raises(ConflictError, match="new id"):
            await resonate.run("c", f, 2)  # pending here
        assert await running == 1
        with pytest.raises(ConflictError, match=r"already used by .*f' version 1 with other arg"):
            await resonate.run("c", f, 2)  # completed, other arguments
        with pytest.raises(ConflictError, match=r"already used by .*f' version 1; runs"):
            await resonate.run("c", g, 1)  # completed, other function


async def test_arguments_that_bind_alike_are_the_same_run_however_they_are_passed() -> None:
    resonate = make()
    gate = asyncio.Event()
    calls: list[tuple[int, int]] = []

    @resonate.register
    async def f(ctx: Context, a: int, b: int = 2) -> int:
        calls.append((a, b))
        await gate.wait()
        return a + b

    async with resonate:
        running = resonate.run("alike", f, 1)
        assert resonate.run("alike", f, a=1) is running  # pending here
        assert resonate.run("alike", f, 1, b=2) is running
        gate.set()
        assert await running == 3
        assert await resonate.run("alike", f, b=2, a=1) == 3  # completed
        with pytest.raises(ConflictError, match="with other arguments"):
            await resonate.run("alike", f, 1, 3)
    assert calls == [(1, 2)]


async def test_a_decorated_workflow_is_not_bound_by_its_wrappers_signature() -> None:
    # Its signature is the wrapper's (*args, **kwargs): binding to it would
    # make every argument list alike.
    resonate = make()

    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)

        return wrapper

    @resonate.register
    @logged
    async def charge(ctx: Context, amount: int) -> int:
        return amount

    async with resonate:
        assert await resonate.run("pay-1", charge, 100) == 100
        with pytest.raises(ConflictError, match="with other arguments"):
            await resonate.run("pay-1", charge, 999)


async def test_the_same_arguments_are_the_same_run_whatever_their_dict_order() -> None:
    resonate = make()
    gate = asyncio.Event()

    @resonate.register
    async def f(ctx: Context, d: dict[str, int]) -> dict[str, int]:
        await gate.wait()
        return d

    async with resonate:
        running = resonate.run("d", f, {"b": 2, "a": 1})
        assert resonate.run("d", f, {"a": 1, "b": 2}) is running  # executing here
        gate.set()
        assert list(await running) == ["b", "a"]  # in the order it was given
        assert list(await resonate.run("d", f, {"a": 1, "b": 2})) == ["b", "a"]  # stored
        with pytest.raises(ConflictError, match="other arg"):
            other: dict[str, Any] = {"a": 1.0, "b": 2}  # 1.0 is not 1
            await resonate.run("d", f, other)


async def test_an_id_completed_by_an_older_version_answers_after_an_upgrade() -> None:
    # Deploying version 2 of a function must not turn a client's retried
    # run(id, ...) of an id that version 1 completed into a ConflictError.
    store = MemoryStore()
    ran: list[int] = []

    def deploy(versions: tuple[int, ...]) -> Resonate:
        resonate = Resonate(store)
        for version in versions:

            async def f(ctx: Context, x: int, version: int = version) -> str:
                ran.append(version)
                return f"v{version}:{x}"

            resonate.register(f, name="f", version=version)
        return resonate

    async with deploy((1,)) as old:
        assert await old.run("up", "f", 7) == "v1:7"
        await old.promises.create("ext", timeout=60)
        gate = asyncio.Event()

        async def slow(ctx: Context, x: int) -> str:
            await gate.wait()
            return "v1 slow"

        old.register(slow, name="s", version=1)
        running = old.run("run-here", "s", 1)
        await asyncio.sleep(0)

        async def newer(ctx: Context, x: int) -> str:
            return "v2 slow"

        old.register(newer, name="s", version=2)
        assert old.run("run-here", "s", 1) is running  # the same run, not a conflict
        gate.set()
        assert await running == "v1 slow"
    async with deploy((1, 2)) as both, deploy((2,)) as new:
        assert await both.run("up", "f", 7) == "v1:7"
        assert await new.run("up", "f", 7) == "v1:7"
        with pytest.raises(ConflictError, match="with other arg"):
            await new.run("up", "f", 8)
        with pytest.raises(ConflictError, match="a promise of kind 'external'"):
            await new.run("ext", "f", 7)
    assert ran == [1]


async def test_errors_round_trip_as_their_own_type() -> None:
    resonate = make()

    @resonate.register
    async def fails(ctx: Context) -> None:
        raise Boom("no")

    async with resonate:
        with pytest.raises(Boom, match="no"):
            await resonate.run("f", fails)
        record = await resonate.promises.get("f")
        assert record is not None and record.state is State.REJECTED
        with pytest.raises(Boom):  # a later attach sees the stored error
            await resonate.get("f")


async def test_plain_def_workflow_runs_in_a_thread() -> None:
    import threading

    resonate = make()
    main = threading.get_ident()

    @resonate.register
    def blocking(ctx: Context, x: int) -> bool:
        return threading.get_ident() != main and x == 1

    async with resonate:
        assert await resonate.run("b", blocking, 1) is True


async def test_bad_input_gets_errors_that_name_the_fix() -> None:
    resonate = make()

    async def unregistered(ctx: Context) -> None:
        return None

    @resonate.register
    async def takes(ctx: Context, x: object) -> None:
        return None

    @resonate.register
    async def sends(ctx: Context) -> str:
        return await ctx.lfc(Ping(1))

    with pytest.raises(RuntimeError, match="async with resonate"):
        resonate.run("early", takes, 1)
    async with resonate:
        with pytest.raises(NotRegisteredError, match="register"):
            resonate.run("u", unregistered)
        with pytest.raises(EncodingError, match="set"):
            resonate.run("e", takes, {1, 2})
        with pytest.raises(NotRegisteredError, match="register_command_handler"):
            await resonate.run("s", sends)
        with pytest.raises(NotFoundError):
            await resonate.get("nobody")
    with pytest.raises(RuntimeError, match="async with resonate"):
        resonate.run("late", takes, 1)


async def test_aclose_leaves_no_task_running() -> None:
    before = asyncio.all_tasks()
    resonate = make()
    gate = asyncio.Event()

    @resonate.register
    async def forever(ctx: Context) -> None:
        await gate.wait()

    async def handler(ctx: Context, cmds: list[Ping]) -> str:
        return "pong"

    resonate.register_command_handler(Ping, handler, concurrency=3)
    async with resonate:
        handles = [resonate.run(f"r{i}", forever) for i in range(10)]
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) > len(before)
    assert asyncio.all_tasks() == before
    await resonate.aclose()  # idempotent
    for h in handles:
        assert h.done()


async def test_shutdown_leaves_interrupted_runs_pending_and_the_next_start_resumes() -> None:
    from resonate_async import ShutdownError

    store = MemoryStore()
    resonate = make(store)
    gate = asyncio.Event()
    calls: list[str] = []

    @resonate.register
    async def slow(ctx: Context) -> str:
        calls.append("run")
        await gate.wait()
        return "finished"

    async with resonate:
        handle = resonate.run("slow", slow)
        await handle.created()
    with pytest.raises(ShutdownError):
        await handle
    record = (await store.get_many(["slow"]))["slow"]
    assert record.state is State.PENDING
    gate.set()
    async with resonate:
        assert await resonate.get("slow") == "finished"
    assert calls == ["run", "run"]


async def test_run_body_retries_follow_its_policy_and_steps_are_not_redone() -> None:
    from resonate_async.testing import VirtualClock

    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)
    step_calls: list[int] = []
    attempts: list[int] = []

    async def step(ctx: Context) -> int:
        step_calls.append(1)
        return 7

    @resonate.register(retry_policy=constant(delay=10, max_retries=2))
    async def flaky(ctx: Context) -> int:
        value = await ctx.lfc(step)
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise Boom("again")
        return value

    async with resonate:
        start = clock.now()
        assert await resonate.run("flaky", flaky) == 7
        assert clock.now() - start == pytest.approx(20)
    assert attempts == [1, 2, 3]
    assert step_calls == [1]  # the retried body replayed the settled step


@pytest.mark.parametrize(
    "run_policy", [never(), constant(delay=10, max_retries=1)], ids=["never", "constant"]
)
async def test_a_retried_step_does_not_redo_its_settled_children(run_policy: RetryPolicy) -> None:
    from resonate_async.testing import VirtualClock

    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)
    charged: list[str] = []
    attempts: list[int] = []

    async def charge(ctx: Context) -> str:
        charged.append(ctx.id)
        return "charged"

    async def pay(ctx: Context) -> str:
        receipt = await ctx.lfc(charge)
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("the network blinked after the charge")
        return receipt

    @resonate.register(retry_policy=run_policy)
    async def order(ctx: Context) -> str:
        return await ctx.lfc(pay).with_options(retry_policy=constant(delay=1, max_retries=3))

    async with resonate:
        assert await resonate.run("order", order) == "charged"
    assert attempts == [1, 2]
    assert charged == ["order.1.1"]  # the retry replayed the committed charge


async def test_a_run_whose_id_is_another_runs_call_id_gets_a_conflict_not_its_outcome() -> None:
    resonate = make()
    charged: list[int] = []

    async def charge(ctx: Context, amount: int) -> str:
        charged.append(amount)
        return f"receipt-{amount}"

    async def ping(ctx: Context, pings: list[Ping]) -> list[str]:
        return [f"pong-{p.n}" for p in pings]

    resonate.register_command_handler(Ping, ping)

    @resonate.register
    async def order(ctx: Context, amount: int) -> str:
        return await ctx.lfc(charge, amount)

    @resonate.register
    async def pinger(ctx: Context, n: int) -> str:
        return await ctx.lfc(Ping(n))

    async with resonate:
        assert await resonate.run("shop.1", order, 100) == "receipt-100"
        # Run "shop"'s first call has the id "shop.1": not the other run's receipt.
        with pytest.raises(ConflictError, match=r"used by a promise of run 'shop\.1'"):
            await resonate.run("shop", order, 5)
        assert await resonate.run("pings.1", pinger, 1) == "pong-1"
        with pytest.raises(ConflictError, match=r"used by a promise of run 'pings\.1'"):
            await resonate.run("pings", pinger, 2)
        # The other way round: the call's row is there first.
        assert await resonate.run("cart", order, 7) == "receipt-7"
        with pytest.raises(ConflictError, match="already the id of a call of run 'cart'"):
            await resonate.run("cart.1", order, 7)
    assert charged == [100, 5, 7]  # a step runs before its row is written (DESIGN §2)


async def test_a_nested_call_of_another_run_is_a_conflict_too() -> None:
    resonate = make()
    gate = asyncio.Event()

    async def inner(ctx: Context, who: str) -> str:
        return f"from run {who}"

    async def outer(ctx: Context) -> str:
        return await ctx.lfc(inner, "shop")  # id shop.1.1, a child of shop.1

    @resonate.register
    async def shop(ctx: Context) -> str:
        return await ctx.lfc(outer)  # id shop.1: the id of the other run

    @resonate.register
    async def shop_1(ctx: Context) -> str:
        await gate.wait()
        return await ctx.lfc(inner, "shop.1")  # id shop.1.1, written by shop first

    async with resonate:
        other = resonate.run("shop.1", shop_1)
        await other.created()
        with pytest.raises(ConflictError, match=r"used by a promise of run 'shop\.1'"):
            await resonate.run("shop", shop)
        gate.set()
        with pytest.raises(ConflictError, match=r"shop\.1\.1: .* of run 'shop',"):
            await other


@pytest.mark.parametrize("call", ["sleep", "external", "remote"])
async def test_a_sleep_external_or_remote_call_with_another_runs_id_is_a_conflict(
    call: str,
) -> None:
    resonate = make()

    @resonate.register
    async def other(ctx: Context) -> str:
        return "other"

    @resonate.register
    async def first_call(ctx: Context) -> object:
        if call == "sleep":
            await ctx.sleep(0.01)
            return None
        if call == "external":
            return await ctx.promise()
        return await ctx.rfc(other)

    async with resonate:
        assert await resonate.run("taken.1", other) == "other"
        with pytest.raises(ConflictError, match=r"used by a promise of run 'taken\.1'"):
            await asyncio.wait_for(resonate.run("taken", first_call).result(), 10)


async def test_calls_given_the_same_id_share_the_first_outcome() -> None:
    resonate = make()
    charged: list[int] = []

    async def charge(ctx: Context, amount: int) -> str:
        charged.append(amount)
        return f"receipt-{amount}"

    @resonate.register
    async def order(ctx: Context, amount: int) -> str:
        return await ctx.lfc(charge, amount).with_options(id="charge-once")

    async with resonate:
        assert await resonate.run("first", order, 1) == "receipt-1"
        assert await resonate.run("second", order, 2) == "receipt-1"
    # A local step runs before its row is written once (DESIGN §2): the id
    # shares the outcome that was stored first, not the execution.
    assert charged == [1, 2]


async def test_functions_a_workflow_makes_per_run_are_not_kept_alive() -> None:
    resonate = make()
    made: list[weakref.ref[Any]] = []

    @resonate.register
    async def flow(ctx: Context, i: int) -> int:
        payload = bytearray(1000)

        async def measure(ctx: Context) -> int:
            return len(payload) + i

        def measure_in_thread(ctx: Context) -> int:
            return len(payload) + i

        made.extend((weakref.ref(measure), weakref.ref(measure_in_thread)))
        first: int = await ctx.lfc(measure)
        second: int = await ctx.lfc(measure_in_thread)
        return first + second

    async with resonate:
        assert [await resonate.run(f"made-{i}", flow, i) for i in range(3)] == [2000, 2002, 2004]
    gc.collect()
    assert len(made) == 6 and all(ref() is None for ref in made)


async def test_an_lfc_never_awaited_warns_and_runs_nothing() -> None:
    resonate = make()
    ran: list[str] = []

    async def step(ctx: Context) -> None:
        ran.append(ctx.id)

    @resonate.register
    async def forgetful(ctx: Context) -> str:
        ctx.lfc(step)  # no await: nothing runs, as with a coroutine never awaited
        await ctx.lfc(step)
        return "done"

    async with resonate:
        with pytest.warns(
            RuntimeWarning, match=r"forgetful\.1: ctx\.lfc\(\.\.\.\) was never awaited"
        ):
            assert await resonate.run("forgetful", forgetful) == "done"
    assert ran == ["forgetful.2"]


async def test_calls_that_failed_or_were_interrupted_do_not_warn() -> None:
    # filterwarnings = error: a never-awaited warning here would fail the test.
    resonate = make()
    gate = asyncio.Event()

    async def step(ctx: Context) -> int:
        return 1

    async def ping(ctx: Context, pings: list[Ping]) -> list[str]:
        return ["pong" for _ in pings]

    resonate.register_command_handler(Ping, ping)

    @resonate.register
    async def unencodable(ctx: Context) -> str:
        try:
            ctx.lfc(Ping(object()))  # type: ignore[arg-type]
        except EncodingError:
            return "refused"
        return "sent"

    @resonate.register
    async def interrupted(ctx: Context) -> int:
        later = ctx.lfc(step)
        await gate.wait()  # cancelled or shut down here
        return await later

    async with resonate:
        assert await resonate.run("unencodable", unencodable) == "refused"
        cancelled = resonate.run("cancelled", interrupted)
        await cancelled.created()
        await asyncio.sleep(0.01)  # its body waits at the gate
        assert cancelled.cancel()
        with pytest.raises(CanceledError):
            await cancelled
        del cancelled  # its task's CancelledError holds the body's frame, and `later`
        gc.collect()
        handle = resonate.run("interrupted", interrupted)
        await handle.created()
    with pytest.raises(ShutdownError):
        await handle
    gc.collect()


async def test_stats_count_runs_and_store_transactions() -> None:
    resonate = make()

    @resonate.register(retry_policy=never())
    async def f(ctx: Context, i: int) -> int:
        return i

    async with resonate:
        await asyncio.gather(*(resonate.run(f"s{i}", f, i) for i in range(100)))
        stats = resonate.stats()
    assert stats.runs.started == 100 and stats.runs.completed == 100
    assert stats.store.rows == 200  # created + settled, nothing else
    assert stats.store.transactions < 10


async def test_stats_stay_readable_after_aclose_until_the_next_start() -> None:
    resonate = make()

    @resonate.register
    async def f(ctx: Context, i: int) -> str:
        return await ctx.lfc(Ping(i))

    def pong(ctx: Context, commands: list[Ping]) -> str:
        return "pong"

    resonate.register_command_handler(Ping, pong)
    async with resonate:
        await asyncio.gather(*(resonate.run(f"s{i}", f, i) for i in range(5)))
    stats = resonate.stats()
    assert stats.runs.started == 5 and stats.runs.completed == 5
    assert stats.batchers["Ping"].commands == 5
    assert stats.store.rows == 15  # per run: created, command settled, settled
    stats.runs.started = 0  # a snapshot: changing it changes nothing kept
    assert resonate.stats().runs.started == 5
    async with resonate:
        assert resonate.stats().runs.started == 0  # a new start counts from zero
        assert await resonate.run("s5", f, 5) == "pong"
    assert resonate.stats().runs.started == 1


def test_a_start_in_a_new_loop_drops_the_engine_of_a_loop_that_ended_without_aclose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    resonate = make(store)

    @resonate.register
    async def echo(ctx: Context, x: int) -> int:
        return x

    async def failing_test() -> None:
        await resonate.start()
        assert await resonate.run("a", echo, 1) == 1  # then fails: no aclose()

    async def next_test() -> None:
        await resonate.start()
        try:
            assert await resonate.run("b", echo, 2) == 2
            assert await resonate.get("a") == 1
        finally:
            await resonate.aclose()

    asyncio.run(failing_test())
    with caplog.at_level(logging.WARNING, "resonate_async"):
        asyncio.run(next_test())
    assert "ended without aclose()" in caplog.text
    assert resonate.stats().runs.started == 1


def test_aclose_and_use_store_in_a_new_loop_drop_the_engine_of_the_ended_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resonate = make()

    @resonate.register
    async def echo(ctx: Context, x: int) -> int:
        return x

    async def started() -> None:
        await resonate.start()
        assert await resonate.run("a", echo, 1) == 1

    async def closed() -> None:
        await resonate.aclose()
        await resonate.aclose()

    async def swapped() -> None:
        resonate.use_store(MemoryStore())
        async with resonate:
            assert await resonate.run("a", echo, 3) == 3  # the new store: runs again

    with caplog.at_level(logging.WARNING, "resonate_async"):
        asyncio.run(started())
        asyncio.run(closed())
        assert caplog.text.count("ended without aclose()") == 1
        assert resonate.stats().runs.completed == 1  # the dropped engine's counters
        asyncio.run(started())
        asyncio.run(swapped())
        assert caplog.text.count("ended without aclose()") == 2


def test_runs_of_a_stopped_loop_stay_pending_and_the_next_start_resumes_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    resonate = make(store)
    calls: list[int] = []

    @resonate.register
    async def slow(ctx: Context, x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            await asyncio.Event().wait()  # the first execution never finishes
        return x

    first: Any = None

    async def begin() -> None:
        nonlocal first
        await resonate.start()
        first = resonate.run("p", slow, 7)
        await first.created()
        while not calls:
            await asyncio.sleep(0)

    async def again() -> None:
        async with resonate:
            assert await resonate.get("p") == 7
            record = await resonate.promises.get("p")
            assert record is not None and record.state is State.RESOLVED

    old = asyncio.new_event_loop()
    try:
        old.run_until_complete(begin())  # the loop stops; its engine is left running
        with caplog.at_level(logging.WARNING, "resonate_async"):
            asyncio.run(again())
        assert "ended without aclose()" in caplog.text
        # Run again, the old loop only unwinds its cancelled tasks: the old
        # execution is interrupted, and writes nothing.
        old.run_until_complete(asyncio.sleep(0))
        old.run_until_complete(asyncio.gather(*asyncio.all_tasks(old), return_exceptions=True))
        assert first.done()
        with pytest.raises(ShutdownError):
            old.run_until_complete(first.result())
    finally:
        old.close()
    assert calls == [7, 7]


async def test_arguments_the_function_does_not_take_raise_from_run_and_store_nothing() -> None:
    resonate = Resonate(MemoryStore())

    @resonate.register(retry_policy=never())
    async def one(ctx: Context, n: int, *, scale: int = 1) -> int:
        return n * scale

    @resonate.register
    async def keyed(ctx: Context, *, key: str) -> str:
        return key

    async with resonate:
        for args, kwargs in [((1, 2), {}), ((), {}), ((1,), {"size": 2})]:
            with pytest.raises(SignatureError, match="one cannot be called") as raised:
                resonate.run("call", one, *args, **kwargs)
            assert isinstance(raised.value, TypeError)
        missing = r"missing a required (keyword-only )?argument: 'key'"  # (3.12 says which)
        with pytest.raises(SignatureError, match=missing):
            resonate.run("call", keyed)  # type: ignore[call-overload]
        assert await resonate.promises.get("call") is None  # the id is still free
        assert await resonate.run("call", one, 3, scale=2) == 6
        assert await resonate.run("keyed", keyed, key="k") == "k"


async def test_a_decorated_function_is_checked_against_what_its_wrapper_accepts() -> None:
    resonate = Resonate(MemoryStore())

    def with_scale(fn: Callable[..., Awaitable[int]]) -> Callable[..., Awaitable[int]]:
        @functools.wraps(fn)
        async def wrapper(ctx: Context, *args: Any, scale: int = 1, **kwargs: Any) -> int:
            return scale * await fn(ctx, *args, **kwargs)

        return wrapper

    @resonate.register
    @with_scale
    async def base(ctx: Context, n: int) -> int:
        return n

    async def flow(ctx: Context) -> int:
        return await ctx.lfc(base, 2, scale=5)

    resonate.register(flow)
    async with resonate:
        assert await resonate.run("d", base, 3, scale=10) == 30  # not base's own signature
        assert await resonate.run("f", flow) == 10


class Steps:
    async def step(self, ctx: Context, n: int) -> int:
        return n


async def test_a_method_and_its_function_are_checked_each_by_its_own_signature() -> None:
    # The bound method shares its function's code: not one cached signature.
    resonate = Resonate(MemoryStore())
    steps = Steps()

    @resonate.register
    async def flow(ctx: Context) -> int:
        unbound = await ctx.lfc(Steps.step, steps, 1)  # type: ignore[call-overload]
        bound = await ctx.lfc(steps.step, 2)
        return int(unbound) + bound

    async with resonate:
        assert await resonate.run("m", flow) == 3


def test_a_function_that_takes_no_context_is_refused_at_registration() -> None:
    resonate = Resonate(MemoryStore())

    async def no_context() -> None:
        pass

    async def keyword_context(*, ctx: Context) -> None:
        pass

    for fn in (no_context, keyword_context):
        with pytest.raises(SignatureError, match="takes no Context"):
            resonate.register(fn)  # type: ignore[type-var]


async def test_a_step_or_remote_call_with_arguments_it_does_not_take_fails_at_the_call() -> None:
    resonate = Resonate(MemoryStore())
    attempts: list[str] = []

    async def step(ctx: Context, n: int) -> int:
        attempts.append(ctx.id)
        return n

    @resonate.register
    async def remote(ctx: Context, n: int) -> int:
        return n

    @resonate.register  # the default policy retries: these are not retried
    async def flow(ctx: Context, how: str) -> int:
        if how == "step":
            return int(await ctx.lfc(step, 1, 2))  # type: ignore[call-overload]
        return int(await ctx.rfc(remote))  # type: ignore[call-overload]

    async with resonate:
        for how in ("step", "remote"):
            with pytest.raises(SignatureError, match="cannot be called with these arguments"):
                await asyncio.wait_for(resonate.run(f"f-{how}", flow, how).result(), 10)
    assert attempts == []


async def test_a_run_settles_after_the_children_its_body_left_running() -> None:
    resonate = Resonate(MemoryStore())
    gate = asyncio.Event()
    finished: list[str] = []

    async def child(ctx: Context) -> None:
        await gate.wait()
        finished.append("child")

    @resonate.register
    async def parent(ctx: Context) -> str:
        ctx.lfi(child)  # never awaited: the run still waits for it
        return "parent"

    async with resonate:
        handle = resonate.run("left-running", parent)
        await handle.created()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not handle.done()
        gate.set()
        assert await handle == "parent"
        assert finished == ["child"]
        child_row = await resonate.promises.get("left-running.1")
        assert child_row is not None and child_row.state is State.RESOLVED


def test_a_run_in_flight_when_asyncio_run_returns_stays_pending_and_resumes(
    tmp_path: Path,
) -> None:
    """asyncio.run cancels the tasks it leaves behind: a run's task among them
    is interrupted, not settled as canceled (nobody cancelled the run), and
    the loop's teardown does not wait on the writer it cancelled too."""
    resonate = Resonate(str(tmp_path / "resonate.db"))
    gate: list[asyncio.Event] = []

    @resonate.register
    async def slow(ctx: Context) -> str:
        if not gate:  # the first execution waits until its loop ends
            gate.append(asyncio.Event())
            await gate[0].wait()
        return "done"

    first: Any = None

    async def begin() -> None:
        nonlocal first
        await resonate.start()
        first = resonate.run("p", slow)
        await first.created()
        while not gate:
            await asyncio.sleep(0)

    async def again() -> str:
        async with resonate:
            record = await resonate.promises.get("p")
            assert record is not None and record.state is State.PENDING
            return await asyncio.wait_for(resonate.get("p").result(), 10)

    asyncio.run(begin())
    assert first.done() and isinstance(first._outcome, ShutdownError)
    assert asyncio.run(again()) == "done"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_start_goes_ahead_when_the_ended_loops_sqlite_thread_died(tmp_path: Path) -> None:
    # aiosqlite's thread dies when it hands a result to a loop that has ended
    # (a query still running as asyncio.run returned); the store's close then
    # never got an answer, and the next start hung for ever.
    import threading

    resonate = Resonate(str(tmp_path / "r.db"))
    release = threading.Event()
    holder: list[Any] = []

    @resonate.register
    async def echo(ctx: Context, x: int) -> int:
        return x

    async def ends_mid_query() -> None:
        await resonate.start()
        conn = resonate._engine.store._conn  # type: ignore[union-attr]
        holder.append(conn)
        future = asyncio.get_running_loop().create_future()
        conn._tx.put_nowait((future, release.wait))  # a call the loop will not see end

    async def next_start() -> None:
        async with resonate:
            assert await resonate.run("a", echo, 1) == 1

    asyncio.run(ends_mid_query())
    release.set()
    holder[0]._thread.join(10)
    assert not holder[0]._thread.is_alive()
    asyncio.run(asyncio.wait_for(next_start(), 3))  # not the 5 s grace, nor for ever


async def test_a_start_during_an_aclose_waits_for_it_and_starts() -> None:
    resonate = make()

    @resonate.register
    async def echo(ctx: Context, x: int) -> int:
        return x

    await resonate.start()
    closing = asyncio.create_task(resonate.aclose())
    await asyncio.sleep(0)  # the close has begun
    await resonate.start()
    try:
        await closing
        assert await resonate.run("a", echo, 1) == 1
    finally:
        await resonate.aclose()


def test_a_process_whose_loop_ended_without_aclose_still_exits(tmp_path: Path) -> None:
    # aiosqlite's thread is no daemon: a store left open (a failed test, a
    # script without `async with`) kept the interpreter from exiting.
    import subprocess
    import sys

    # With a batch handler too: asyncio.run's teardown cancels its worker,
    # which must end (not take it for a stray cancel and serve on).
    script = (
        "import asyncio\n"
        "from dataclasses import dataclass\n"
        "from resonate_async import Command, Context, Resonate\n"
        "@dataclass\n"
        "class Add(Command[int]):\n"
        "    n: int\n"
        "async def add(ctx, cmds):\n"
        "    return [c.n + 1 for c in cmds]\n"
        "async def wf(ctx, n):\n"
        "    return await ctx.lfc(Add(n))\n"
        f"resonate = Resonate({str(tmp_path / 'r.db')!r})\n"
        "resonate.register_command_handler(Add, add)\n"
        "resonate.register(wf)\n"
        "async def main():\n"
        "    await resonate.start()\n"
        "    print(await resonate.run('w', wf, 1), flush=True)\n"
        "asyncio.run(main())\n"
        "print('returned', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\nreturned\n"


def test_a_loop_that_ends_with_runs_waiting_to_be_stored_says_it_dropped_them(
    tmp_path: Path,
) -> None:
    # A script that returns from asyncio.run without closing drops the runs
    # that were not stored yet: they never run, so it must not be silent.
    import subprocess
    import sys

    script = (
        "import asyncio, logging, sqlite3\n"
        "from resonate_async import Resonate\n"
        f"path = {str(tmp_path / 'r.db')!r}\n"
        "resonate = Resonate(path)\n"
        "async def quick(ctx, x):\n"
        "    return x\n"
        "resonate.register(quick)\n"
        "async def main():\n"
        "    await resonate.start()\n"
        "    for i in range(5000):\n"
        "        resonate.run(f'q-{i}', quick, i)\n"
        "    await asyncio.sleep(0)\n"
        "asyncio.run(main())\n"
        "stored = sqlite3.connect(path).execute('SELECT count(*) FROM promises').fetchone()[0]\n"
        "print(stored, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    stored = int(done.stdout)
    assert stored < 5000
    said = re.search(
        r"stopped without aclose\(\).*: (\d+) runs waiting to be stored were dropped "
        r"and never ran, and (\d+) writes queued or being written may not",
        done.stderr,
    )
    assert said is not None, done.stderr
    dropped, cut = int(said[1]), int(said[2])
    assert dropped > 0 and dropped + cut >= 5000 - stored


async def test_a_second_start_while_the_first_is_in_progress_is_refused(tmp_path: Path) -> None:
    resonate = Resonate(str(tmp_path / "r.db"))  # its open() awaits a thread
    first = asyncio.create_task(resonate.start())
    await asyncio.sleep(0)  # the first has begun
    with pytest.raises(RuntimeError, match="already started"):
        await resonate.start()
    await first
    await resonate.aclose()
    assert "not started" in repr(resonate)
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(name.startswith("resonate-") for name in names), names


async def test_an_aclose_during_a_start_stops_what_it_starts(tmp_path: Path) -> None:
    resonate = Resonate(str(tmp_path / "r.db"))
    starting = asyncio.create_task(resonate.start())
    await asyncio.sleep(0)  # the start has begun
    await resonate.aclose()
    await starting
    assert "not started" in repr(resonate)
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(name.startswith("resonate-") for name in names), names


async def test_a_cancelled_aclose_during_a_start_still_stops_what_it_starts() -> None:
    opened = asyncio.Event()
    proceed = asyncio.Event()

    class SlowToOpen(MemoryStore):
        async def open(self) -> None:
            opened.set()
            await proceed.wait()
            await super().open()

    resonate = Resonate(SlowToOpen())
    starting = asyncio.create_task(resonate.start())
    await opened.wait()
    closing = asyncio.create_task(resonate.aclose())
    await asyncio.sleep(0)
    closing.cancel()  # aclose is shielded: the stop goes on
    with pytest.raises(asyncio.CancelledError):
        await closing
    proceed.set()
    await starting
    for _ in range(100):
        if "not started" in repr(resonate):
            break
        await asyncio.sleep(0)
    assert "not started" in repr(resonate)
    await resonate.aclose()


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_no_lfi_child_outlives_its_runs_shutdown_or_cancel(how: str) -> None:
    resonate = make()
    started = asyncio.Event()
    log: list[str] = []

    async def child(ctx: Context) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # its cleanup
            log.append("child stopped")
            raise

    @resonate.register
    async def parent(ctx: Context) -> None:
        await ctx.lfi(child)

    await resonate.start()
    try:
        handle = resonate.run("p", parent)
        await started.wait()
        if how == "cancel":
            handle.cancel()
            with pytest.raises(CanceledError):
                await handle
            assert log == ["child stopped"]  # before the run settled
    finally:
        await resonate.aclose()
    assert log == ["child stopped"]
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []


async def test_a_cancel_while_a_failed_body_joins_its_child_stops_the_child_first() -> None:
    resonate = make()
    log: list[str] = []
    joining = asyncio.Event()

    async def child(ctx: Context) -> None:
        try:
            joining.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("child stopped")
            raise

    @resonate.register
    async def fails(ctx: Context) -> None:
        ctx.lfi(child)
        raise ValueError("the body failed while its child runs")

    async with resonate:
        handle = resonate.run("f", fails)
        await joining.wait()
        await asyncio.sleep(0)  # the failure is joining the child
        assert handle.cancel()
        with pytest.raises(CanceledError):
            await handle
        assert log == ["child stopped"]  # before the run settled


async def test_a_stopped_childs_failure_is_not_reported_as_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run left PENDING (here: its sleep's row could not be written) stops
    # its children; one that had failed already (its own create failed) kept
    # an exception nobody read, which asyncio logged as lost.
    import gc

    from resonate_async.errors import StoreError
    from resonate_async.stores import Create, PromiseRecord

    class FailsAtFirst(MemoryStore):
        failures = 0

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            ids = [op.record.id for op in ops if isinstance(op, Create)]
            if any(id.startswith("b.") for id in ids) and self.failures < 3:
                self.failures += 1
                raise StoreError("connection lost")
            return await super().write(ops)

    resonate = Resonate(FailsAtFirst(), poll_seconds=0.05)

    @resonate.register(name="body", timeout=30)
    async def body(ctx: Context) -> str:
        ctx.rfi("remote")
        await ctx.sleep(0.01)
        return "done"

    @resonate.register(name="remote")
    async def remote(ctx: Context) -> None:
        return None

    with caplog.at_level(logging.ERROR, "asyncio"):
        async with resonate:
            with pytest.raises(StoreError):
                await resonate.run("b", "body")
            assert await asyncio.wait_for(resonate.get("b").result(), 10) == "done"
        gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_failed_run_is_logged_once_where_it_settled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A web handler that answered 202 dropped the handle: the log says it.
    resonate = Resonate(MemoryStore())

    @resonate.register(retry_policy=never())
    async def charge(ctx: Context, cents: int) -> int:
        if cents > 100:
            raise ValueError("card declined")
        return cents

    with caplog.at_level(logging.INFO, "resonate_async"):
        async with resonate:
            await resonate.run("ok", charge, 5).created()
            await resonate.run("declined", charge, 500).created()
            while resonate.stats().runs.failed + resonate.stats().runs.completed < 2:
                await asyncio.sleep(0)
            with pytest.raises(ValueError, match="declined"):
                await resonate.get("declined")  # another handle: not logged again
    failed = [r.getMessage() for r in caplog.records if "settled" in r.getMessage()]
    assert failed == ["run declined settled REJECTED: ValueError('card declined')"]


async def test_a_stored_value_that_does_not_decode_here_names_its_promise() -> None:
    from resonate_async import Kind
    from resonate_async.stores import Create, PromiseRecord

    store = MemoryStore()
    value = b'{"$":"gone:Value"}'  # a dataclass of a module this process lacks
    await store.write([Create(PromiseRecord("v", State.RESOLVED, Kind.RUN, "v", 0.0, value=value))])
    async with Resonate(store) as resonate:
        with pytest.raises(EncodingError, match="the value of 'v' does not decode here"):
            await resonate.get("v")


@pytest.mark.parametrize("turns", range(6))
def test_a_loop_that_ends_while_a_cancel_is_being_settled_still_ends(turns: int) -> None:
    # asyncio.run returning without aclose() cancels every task, the writer
    # included, while the run's task waits for its cancel to be written.
    async def main() -> None:
        resonate = Resonate(MemoryStore())

        @resonate.register
        async def waits(ctx: Context) -> str:
            await ctx.promise()  # for ever
            return "unreached"

        await resonate.start()
        handle = resonate.run("c", waits)
        await handle.created()
        await quiesce()  # the writer is idle
        handle.cancel()
        for _ in range(turns):
            await asyncio.sleep(0)

    ended = threading.Event()

    def run() -> None:
        with contextlib.suppress(BaseException):
            asyncio.run(main())
        ended.set()

    threading.Thread(target=run, daemon=True).start()
    assert ended.wait(10), "asyncio.run never returned"


async def test_a_call_whose_id_is_another_runs_remote_call_is_a_conflict() -> None:
    resonate = make()

    async def h(ctx: Context) -> str:
        return "h"

    async def inner(ctx: Context) -> str:
        return "inner"

    async def outer(ctx: Context) -> str:
        return await ctx.lfc(inner)  # id shop.1.1: run shop.1's remote call

    resonate.register(h)
    resonate.register(inner)

    @resonate.register
    async def shop_1(ctx: Context) -> str:
        return await ctx.rfc(h)  # id shop.1.1

    @resonate.register
    async def shop(ctx: Context) -> str:
        return await ctx.lfc(outer)  # id shop.1: the id of the other run

    async with resonate:
        assert await resonate.run("shop.1", shop_1) == "h"
        with pytest.raises(ConflictError):
            await resonate.run("shop", shop)
        root = await resonate.promises.get("shop")
        assert root is not None and root.state is State.REJECTED
