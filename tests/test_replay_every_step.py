"""Replay-every-step mode: flushes out non-deterministic and non-idempotent workflow code."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from resonate_async import Command, Context, MemoryStore, NondeterminismError, Resonate
from resonate_async.retry import never


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
