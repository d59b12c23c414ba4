"""Replay-every-step mode: flushes out non-deterministic and non-idempotent workflow code."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import (
    Command,
    Context,
    MemoryStore,
    NondeterminismError,
    PromiseTimeoutError,
    Resonate,
    StoreError,
)
from resonate_async.retry import never
from resonate_async.testing import VirtualClock

if TYPE_CHECKING:
    from collections.abc import Awaitable, Generator


@dataclass
class Mail(Command[str]):
    to: str


def build(*, replay: bool) -> tuple[Resonate, list[str]]:
    resonate = Resonate(MemoryStore(), replay_every_step=replay)
    effects: list[str] = []

    async def send(ctx: Context, cmds: list[Mail]) -> list[str]:
        return [f"sent:{c.to}" for c in cmds]

    resonate.register_command_handler(Mail, send, retry_policy=never())

    async def charge(ctx: Context, amount: int) -> int:
        effects.append(f"charge {amount}")
        return amount

    @resonate.register(name="order")
    async def order(ctx: Context, amount: int) -> str:
        effects.append("outside a step")  # an effect a replay repeats
        paid = await ctx.lfc(charge, amount)
        both = await asyncio.gather(ctx.lfi(charge, 1), ctx.lfi(charge, 2))
        receipt = await ctx.lfc(Mail("ada"))
        return f"{paid}+{sum(both)}:{receipt}"

    return resonate, effects


async def test_outcome_is_the_same_and_steps_run_once_while_the_body_replays() -> None:
    plain, plain_effects = build(replay=False)
    async with plain:
        expected = await plain.run("o", "order", 5)
    replaying, effects = build(replay=True)
    async with replaying:
        assert await replaying.run("o", "order", 5) == expected == "5+3:sent:ada"
    # Each step body ran exactly once; the body itself re-ran after each fresh call.
    assert sorted(e for e in effects if e.startswith("charge")) == [
        "charge 1",
        "charge 2",
        "charge 5",
    ]
    assert plain_effects.count("outside a step") == 1
    assert effects.count("outside a step") > 2


async def test_non_deterministic_code_is_caught_at_once() -> None:
    resonate = Resonate(MemoryStore(), replay_every_step=True)
    flips = iter([True, False, True, False])

    async def left(ctx: Context) -> str:
        return "left"

    async def right(ctx: Context) -> str:
        return "right"

    @resonate.register(name="coin")
    async def coin(ctx: Context) -> str:
        # Decided outside a step: differs between executions.
        return await ctx.lfc(left if next(flips) else right)

    async with resonate:
        with pytest.raises(NondeterminismError, match="left"):
            await resonate.run("c", "coin")


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "replay-every-step"])
async def test_a_workflow_with_a_task_group_replays(replay: bool) -> None:
    resonate = Resonate(MemoryStore(), replay_every_step=replay)
    ran: list[int] = []

    async def square(ctx: Context, x: int) -> int:
        ran.append(x)
        return x * x

    async def call(promise: Awaitable[int]) -> int:
        return await promise

    @resonate.register(name="grouped")
    async def grouped(ctx: Context) -> int:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call(ctx.lfc(square, x))) for x in (2, 3)]
        return sum(task.result() for task in tasks)

    async with resonate:
        assert await asyncio.wait_for(resonate.run("g", "grouped").result(), 10) == 13
    assert sorted(ran) == [2, 3]  # each step body once, however often the body replayed


def test_a_task_group_that_failed_otherwise_next_to_a_replay_stays_pending() -> None:
    """What a TaskGroup's exception group stands for: an error that leaves the
    call PENDING wins over the replay a settled sibling asked for, which wins
    over the body's own failures (those settle the call)."""
    from resonate_async._attempts import unwrap_group
    from resonate_async._promise import ReplayNow

    disk = StoreError("disk full")
    nested = BaseExceptionGroup("outer", [ValueError("own"), ExceptionGroup("inner", [disk])])
    assert unwrap_group(BaseExceptionGroup("g", [ReplayNow(), disk])) is disk
    assert unwrap_group(nested) is disk
    assert isinstance(unwrap_group(BaseExceptionGroup("g", [ValueError(), ReplayNow()])), ReplayNow)
    assert unwrap_group(ExceptionGroup("g", [ValueError("own")])) is None


@pytest.mark.parametrize("style", ["async", "generator"])
async def test_a_cleanup_step_in_finally_runs_once_in_program_order(style: str) -> None:
    # The body unwinding for a restart used to run its `finally`'s step then,
    # out of program order: the restart then found that step where the body
    # makes its second call, and stopped the run as nondeterministic.
    resonate = Resonate(MemoryStore(), replay_every_step=True)
    effects: list[str] = []

    async def step(ctx: Context, name: str) -> str:
        effects.append(name)
        return name

    async def as_coroutine(ctx: Context) -> str:
        try:
            await ctx.lfc(step, "first")
            return await ctx.lfc(step, "second")
        finally:
            await ctx.lfc(step, "cleanup")

    def as_generator(ctx: Context) -> Generator[Any, Any, str]:
        try:
            yield ctx.lfc(step, "first")
            second: str = yield ctx.lfc(step, "second")
            return second
        finally:
            yield ctx.lfc(step, "cleanup")

    body = as_coroutine if style == "async" else as_generator
    resonate.register(body, name="tidy", retry_policy=never())
    async with resonate:
        assert await asyncio.wait_for(resonate.run("t", "tidy").result(), 10) == "second"
    assert effects == ["first", "second", "cleanup"]


async def test_bodies_that_end_oddly_leave_nothing_restarting() -> None:
    # A failure whose lfi child settles fresh while it is joined is the
    # outcome (its ReplayNow escaped as the run's error); a ReplayNow that a
    # gather(return_exceptions=True) swallowed kept its body's Context (and
    # run) in the engine for good.
    resonate = Resonate(MemoryStore(), replay_every_step=True, step_retry_policy=never())

    async def one(ctx: Context) -> int:
        return 1

    async def slow(ctx: Context) -> int:
        await asyncio.sleep(0.01)
        return 2

    @resonate.register(name="gathered", retry_policy=never())
    async def gathered(ctx: Context) -> str:
        await asyncio.gather(ctx.lfc(one), return_exceptions=True)
        return "ok"

    @resonate.register(name="raises", retry_policy=never())
    async def raises(ctx: Context) -> str:
        ctx.lfi(slow)
        raise ValueError("boom")

    async with resonate:
        engine = resonate._engine
        assert engine is not None
        for i in range(3):
            assert await resonate.run(f"g{i}", "gathered") == "ok"
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wait_for(resonate.run("r", "raises").result(), 10)
        assert engine.restarting == set()


def _restarting_with_a_child(
    clock: VirtualClock, log: list[str], timeout: float | None
) -> Resonate:
    """A body whose own sleep settles first (a restart) while its lfi child runs."""
    resonate = Resonate(MemoryStore(), clock=clock, replay_every_step=True)

    async def child(ctx: Context) -> None:
        await ctx.sleep(100)
        log.append("child done")

    @resonate.register(name="wf", timeout=timeout)
    async def wf(ctx: Context) -> None:
        ctx.lfi(child)
        await ctx.sleep(5)

    return resonate


async def test_a_deadline_covers_the_children_a_restart_waits_for() -> None:
    clock, log = VirtualClock(), list[str]()
    async with _restarting_with_a_child(clock, log, timeout=10) as resonate:
        handle = resonate.run("t", "wf")
        await clock.advance(10)
        assert handle.done()
        with pytest.raises(PromiseTimeoutError):
            await handle
        await clock.advance(200)
    assert log == []  # stopped at the deadline


async def test_a_shutdown_during_a_restart_stops_the_children() -> None:
    clock, log = VirtualClock(), list[str]()
    async with _restarting_with_a_child(clock, log, timeout=None) as resonate:
        resonate.run("t", "wf")
        await clock.advance(7)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
