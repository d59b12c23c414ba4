"""What awaiting a durable call means under timeouts, cancellation, sharing and shutdown.

A caller that stops waiting (an ``asyncio.timeout`` around the await, a
``TaskGroup`` cancelling its task) does not cancel the run; only a cancel of
the run does. No test waits in wall time: timeouts are ``timeout=0`` or the
virtual clock, and slow calls wait on events.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import (
    CanceledError,
    Command,
    Context,
    MemoryStore,
    PromiseTimeoutError,
    Resonate,
    ShutdownError,
    State,
)
from resonate_async.retry import never
from resonate_async.testing import VirtualClock, quiesce

if TYPE_CHECKING:
    from collections.abc import Awaitable


@dataclass
class Ping(Command[str]):
    n: int


async def state_of(store: MemoryStore, id: str) -> State:
    return (await store.get_many([id]))[id].state


async def test_a_timeout_around_an_lfi_child_does_not_cancel_the_child_or_the_run() -> None:
    store = MemoryStore()
    resonate = Resonate(store)
    gate = asyncio.Event()

    async def slow(ctx: Context) -> str:
        await gate.wait()
        return "slow-done"

    @resonate.register
    async def impatient(ctx: Context) -> str:
        child = ctx.lfi(slow)
        try:
            async with asyncio.timeout(0):
                return await child
        except TimeoutError:
            gate.set()
            return "gave up"

    async with resonate:
        assert await asyncio.wait_for(resonate.run("r", impatient).result(), 10) == "gave up"
        # The run settled after its child, which finished and was recorded.
        assert await state_of(store, "r.1") is State.RESOLVED


async def test_a_timeout_around_an_lfi_command_leaves_it_to_its_batch() -> None:
    store = MemoryStore()
    resonate = Resonate(store)
    gate = asyncio.Event()

    async def handle(ctx: Context, pings: list[Ping]) -> list[str]:
        await gate.wait()
        return [f"pong {p.n}" for p in pings]

    resonate.register_command_handler(Ping, handle, retry_policy=never())

    @resonate.register
    async def impatient(ctx: Context) -> str:
        child = ctx.lfi(Ping(1))
        try:
            async with asyncio.timeout(0):
                return await child
        except TimeoutError:
            gate.set()
        return await child  # waiting again gets the command's outcome

    async with resonate:
        assert await asyncio.wait_for(resonate.run("w", impatient).result(), 10) == "pong 1"
        assert await state_of(store, "w.1") is State.RESOLVED


async def test_an_lfi_command_whose_awaiter_gave_up_still_runs_before_the_run_settles() -> None:
    # Awaited right after lfi, before the command started: still a child.
    store = MemoryStore()
    resonate = Resonate(store)
    handled: list[int] = []

    async def handle(ctx: Context, pings: list[Ping]) -> list[str]:
        handled.extend(p.n for p in pings)
        return [f"pong {p.n}" for p in pings]

    resonate.register_command_handler(Ping, handle, retry_policy=never())

    @resonate.register
    async def impatient(ctx: Context) -> str:
        child = ctx.lfi(Ping(1))
        try:
            async with asyncio.timeout(0):
                await child
        except TimeoutError:
            pass
        return "gave up"  # not awaited again: the run waits for it all the same

    async with resonate:
        assert await asyncio.wait_for(resonate.run("w", impatient).result(), 10) == "gave up"
        assert await state_of(store, "w.1") is State.RESOLVED
    assert handled == [1]


async def test_a_command_timeout_counts_from_its_start_when_awaited_again() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    resonate = Resonate(store, clock=clock)
    gate = asyncio.Event()
    started = clock.now()

    async def handle(ctx: Context, pings: list[Ping]) -> list[str]:
        await gate.wait()
        return [f"pong {p.n}" for p in pings]

    resonate.register_command_handler(Ping, handle, retry_policy=never())

    async def wait_for(call: Awaitable[str]) -> str:
        return await call

    @resonate.register
    async def patient(ctx: Context) -> str:
        call = ctx.lfc(Ping(1)).with_options(timeout=10)
        first = asyncio.ensure_future(wait_for(call))
        await clock.sleep(6)
        first.cancel()  # the caller gives up after 6 s ...
        await asyncio.gather(first, return_exceptions=True)
        try:
            return await call  # ... and waits again: 4 s are left, not 10
        except PromiseTimeoutError:
            return f"timed out at {clock.now() - started:g}"

    async with resonate:
        handle_ = resonate.run("t", patient)
        await clock.advance(12)
        assert handle_.done()
        assert await handle_ == "timed out at 10"
        row = (await store.get_many(["t.1"]))["t.1"]
        assert row.state is State.REJECTED_TIMEDOUT and row.timeout_at == started + 10
        gate.set()


async def test_an_lfc_command_given_up_while_the_queue_is_full_leaves_no_timeout() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    resonate = Resonate(store, clock=clock)
    gate = asyncio.Event()
    busy = asyncio.Event()

    async def handle(ctx: Context, pings: list[Ping]) -> list[str]:
        busy.set()
        await gate.wait()
        return [f"pong {p.n}" for p in pings]

    resonate.register_command_handler(Ping, handle, retry_policy=never(), queue_size=1)

    @resonate.register
    async def plain(ctx: Context, n: int) -> str:
        return await ctx.lfc(Ping(n))

    @resonate.register
    async def impatient(ctx: Context) -> str:
        try:
            async with asyncio.timeout(0):  # gives up while waiting for room
                await ctx.lfc(Ping(99)).with_options(timeout=3600)
        except TimeoutError:
            return "gave up"
        return "answered"

    async with resonate:
        in_batch = resonate.run("a", plain, 0)
        await busy.wait()
        queued = resonate.run("b", plain, 1)
        while resonate.stats().batchers["Ping"].queue_depth < 1:  # the queue is full
            await asyncio.sleep(0)
        assert await asyncio.wait_for(resonate.run("w", impatient).result(), 10) == "gave up"
        gate.set()
        assert [await in_batch, await queued] == ["pong 0", "pong 1"]
        await clock.advance(3601)
        # The command never ran: no timeout row for it, under a settled run.
        assert "w.1" not in await store.get_many(["w.1"])


@pytest.mark.parametrize("where", ["run", "step"])
async def test_a_call_that_times_out_stops_its_lfi_children_and_times_out(where: str) -> None:
    clock = VirtualClock(autojump=True)
    store = MemoryStore()
    resonate = Resonate(store, clock=clock, step_retry_policy=never())
    started: list[str] = []

    async def forever(ctx: Context) -> None:
        started.append(ctx.id)
        await asyncio.Event().wait()

    async def waits_for_a_child(ctx: Context) -> str:
        await ctx.lfi(forever)
        return "never"

    @resonate.register(timeout=10, retry_policy=never())
    async def timed(ctx: Context) -> str:
        return await waits_for_a_child(ctx)

    @resonate.register(retry_policy=never())
    async def outer(ctx: Context) -> str:
        try:
            return await ctx.lfc(waits_for_a_child).with_options(timeout=10)
        except PromiseTimeoutError:
            return "step timed out"

    async with resonate:
        if where == "run":
            with pytest.raises(PromiseTimeoutError):
                await asyncio.wait_for(resonate.run("t", timed).result(), 10)
            assert await state_of(store, "t") is State.REJECTED_TIMEDOUT
        else:
            assert await asyncio.wait_for(resonate.run("t", outer).result(), 10) == (
                "step timed out"
            )
            assert await state_of(store, "t.1") is State.REJECTED_TIMEDOUT
    assert started  # the child ran, and was stopped with its parent


@pytest.mark.parametrize("where", ["run", "step"])
@pytest.mark.parametrize("ending", ["returns", "raises"])
async def test_a_timeout_covers_the_children_a_body_left_running(where: str, ending: str) -> None:
    # The body ends at once but leaves an lfi child running past the call's
    # deadline: the call times out at its deadline and stops the child, as
    # the docs say; it was stored RESOLVED (or REJECTED) once the child ended.
    clock = VirtualClock(autojump=True)
    store = MemoryStore()
    resonate = Resonate(store, clock=clock, step_retry_policy=never())
    ended: list[str] = []

    async def slow(ctx: Context) -> str:
        await clock.sleep(1000)
        ended.append(ctx.id)
        return "child done"

    async def leaves_a_child(ctx: Context) -> str:
        ctx.lfi(slow)
        if ending == "raises":
            raise ValueError("body failed")
        return "body done"

    resonate.register(leaves_a_child, name="timed", timeout=12, retry_policy=never())

    @resonate.register(retry_policy=never())
    async def outer(ctx: Context) -> str:
        try:
            return await ctx.lfc(leaves_a_child).with_options(timeout=12)
        except PromiseTimeoutError:
            return "step timed out"

    async with resonate:
        started = clock.now()
        if where == "run":
            with pytest.raises(PromiseTimeoutError):
                await resonate.run("t", "timed")
            timed_out = "t"
        else:
            assert await resonate.run("t", outer) == "step timed out"
            timed_out = "t.1"
        assert clock.now() - started < 1000
        assert await state_of(store, timed_out) is State.REJECTED_TIMEDOUT
    assert ended == []  # stopped with its parent


async def test_a_task_group_that_cancels_a_sibling_keeps_the_bodys_own_outcome() -> None:
    store = MemoryStore()
    resonate = Resonate(store, step_retry_policy=never())
    gate = asyncio.Event()

    async def boom(ctx: Context) -> None:
        raise ValueError("boom")

    async def slow(ctx: Context) -> str:
        await gate.wait()
        return "slow"

    async def awaited(call: Awaitable[Any]) -> Any:
        return await call

    @resonate.register(retry_policy=never())
    async def handled(ctx: Context) -> str:
        outcome = "not reached"
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(awaited(ctx.lfi(slow)))
                group.create_task(awaited(ctx.lfi(boom)))
        except* ValueError:
            gate.set()
            outcome = "handled"
        return outcome

    async with resonate:
        assert await asyncio.wait_for(resonate.run("g", handled).result(), 10) == "handled"
        assert await state_of(store, "g") is State.RESOLVED


async def test_awaiting_an_external_promise_again_after_a_timeout_gets_its_value() -> None:
    resonate = Resonate(MemoryStore())
    reminded: list[int] = []

    @resonate.register
    async def approval(ctx: Context) -> str:
        answer = ctx.promise(id="approval-1")
        for attempt in range(3):
            try:
                async with asyncio.timeout(0 if attempt < 2 else 10):
                    return f"approved:{await answer}"
            except TimeoutError:
                reminded.append(attempt)  # "send a reminder"
                if attempt == 1:
                    await resonate.promises.resolve("approval-1", "yes")
        return "no answer"

    async with resonate:
        await resonate.promises.create("approval-1")
        assert await asyncio.wait_for(resonate.run("a", approval).result(), 10) == "approved:yes"
    assert reminded == [0, 1]


async def test_an_lfc_cut_short_by_a_timeout_runs_again_when_awaited_again() -> None:
    store = MemoryStore()
    resonate = Resonate(store)
    calls: list[str] = []
    gate = asyncio.Event()

    async def slow(ctx: Context) -> str:
        calls.append(ctx.id)
        await gate.wait()
        return "done"

    @resonate.register
    async def retrying(ctx: Context) -> str:
        call = ctx.lfc(slow)
        try:
            async with asyncio.timeout(0):
                await call
        except TimeoutError:
            gate.set()
        return await call

    async with resonate:
        assert await asyncio.wait_for(resonate.run("l", retrying).result(), 10) == "done"
    assert calls == ["l.1", "l.1"]  # the first execution never finished


async def test_one_lfc_awaited_by_two_tasks_runs_once() -> None:
    resonate = Resonate(MemoryStore())
    calls: list[str] = []

    async def step(ctx: Context) -> int:
        calls.append(ctx.id)
        await asyncio.sleep(0)
        return 1

    async def awaited(call: Awaitable[int]) -> int:
        return await call

    @resonate.register
    async def shared(ctx: Context) -> list[int]:
        call = ctx.lfc(step)  # (gather(call, call) would await it once)
        first = asyncio.create_task(awaited(call))
        second = asyncio.create_task(awaited(call))
        return [await first, await second]

    async with resonate:
        assert await asyncio.wait_for(resonate.run("s", shared).result(), 10) == [1, 1]
    assert calls == ["s.1"]


async def test_a_body_that_catches_the_shutdown_cancel_is_not_settled() -> None:
    store = MemoryStore()
    gate = asyncio.Event()
    refunds: list[str] = []

    async def refund(ctx: Context) -> None:
        refunds.append(ctx.id)

    def build() -> Resonate:
        resonate = Resonate(store, worker_id="shop-1")  # the restart frees its leases

        @resonate.register(name="order")
        async def order(ctx: Context) -> str:
            try:
                await gate.wait()
            except asyncio.CancelledError:  # meant for a cancelled order
                await ctx.lfc(refund)
                return "refunded"
            return "shipped"

        return resonate

    async with build() as first:
        handle = first.run("o", "order")
        await handle.created()
        await asyncio.sleep(0)
    with pytest.raises(ShutdownError):
        await handle
    assert await state_of(store, "o") is State.PENDING
    assert refunds == []  # no new call starts during a shutdown
    gate.set()
    async with build() as second:
        assert await asyncio.wait_for(second.get("o").result(), 10) == "shipped"


class Abort(BaseException):
    """Not an Exception, as pytest's own ``Failed`` is not."""


async def test_a_base_exception_from_a_body_reaches_the_handle_instead_of_hanging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    resonate = Resonate(store)

    @resonate.register
    async def aborting(ctx: Context) -> None:
        raise Abort("stop")

    async with resonate:
        with pytest.raises(Abort, match="stop"):
            await asyncio.wait_for(resonate.run("b", aborting).result(), 10)
        assert await state_of(store, "b") is State.PENDING
    assert "which is not an Exception" in caplog.text


async def test_an_error_of_a_child_never_awaited_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resonate = Resonate(MemoryStore(), step_retry_policy=never())

    async def failing(ctx: Context) -> None:
        raise ValueError("lost")

    @resonate.register
    async def careless(ctx: Context) -> str:
        ctx.lfi(failing)
        return "ok"

    with caplog.at_level(logging.WARNING, logger="resonate_async"):
        async with resonate:
            assert await resonate.run("c", careless) == "ok"
    assert "error of child c.1 that was never awaited" in caplog.text


async def test_replay_every_step_waits_for_lfc_calls_running_in_other_tasks() -> None:
    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock, replay_every_step=True)
    ran: list[str] = []

    async def leaf(ctx: Context, seconds: float) -> str:
        ran.append(ctx.id)
        await clock.sleep(seconds)
        return ctx.id

    @resonate.register
    async def both(ctx: Context) -> list[str]:
        return list(await asyncio.gather(ctx.lfc(leaf, 1), ctx.lfc(leaf, 5)))

    async with resonate:
        assert await asyncio.wait_for(resonate.run("p", both).result(), 10) == ["p.1", "p.2"]
    assert sorted(ran) == ["p.1", "p.2"]


@pytest.mark.parametrize("then", ["cancel again", "close"])
@pytest.mark.parametrize("turns", [0, 1, 2, 3, 4, 6])
async def test_a_run_cancelled_again_while_its_cancel_is_settled_still_answers(
    then: str, turns: int
) -> None:
    store = MemoryStore()
    resonate = Resonate(store)

    @resonate.register
    async def waits(ctx: Context) -> str:
        await ctx.promise()  # for ever
        return "done"

    async with resonate:
        handle = resonate.run("c", waits)
        await handle.created()
        await quiesce()
        assert handle.cancel()
        for _ in range(turns):  # the second cancel lands somewhere in the settle
            await asyncio.sleep(0)
        if then == "cancel again":
            handle.cancel()
            with pytest.raises(CanceledError):
                await asyncio.wait_for(handle.result(), 10)
    assert handle.done()
    with pytest.raises((CanceledError, ShutdownError)):
        await handle
    assert await state_of(store, "c") in (State.REJECTED_CANCELED, State.PENDING)


@pytest.mark.parametrize("deadline", [None, 3600.0])
async def test_a_body_cut_short_by_a_shutdown_has_unwound_when_aclose_returns(
    deadline: float | None,
) -> None:
    # With a timeout the body runs under a deadline in a task of its own.
    resonate = Resonate(MemoryStore())
    events: list[str] = []

    async def body(ctx: Context) -> str:
        try:
            await ctx.promise()
        finally:
            events.append("cleanup started")
            for _ in range(200):  # closing a connection, say
                await asyncio.sleep(0)
            events.append("cleanup finished")
        return "unreached"

    resonate.register(body, timeout=deadline)
    async with resonate:
        await resonate.run("b", body).created()
        await quiesce()
    assert events == ["cleanup started", "cleanup finished"]
