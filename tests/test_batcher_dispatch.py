"""A command reaches its handler once however its workflow waits for it, and
a handler cannot take the batcher down. Events and the virtual clock only."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from resonate_async import Command, Context, MemoryStore, PromiseTimeoutError, Resonate
from resonate_async.retry import never
from resonate_async.testing import VirtualClock

if TYPE_CHECKING:
    from collections.abc import Awaitable


@dataclass
class Cmd(Command[int]):
    n: int


def gated(**options: object) -> tuple[Resonate, list[list[int]], asyncio.Event]:
    """A handler that records each batch and waits for the gate."""
    resonate = Resonate(MemoryStore())
    seen: list[list[int]] = []
    gate = asyncio.Event()

    async def handler(ctx: Context, cmds: list[Cmd]) -> list[int]:
        seen.append([c.n for c in cmds])
        await gate.wait()
        return [c.n * 10 for c in cmds]

    resonate.register_command_handler(Cmd, handler, retry_policy=never(), **options)  # type: ignore[arg-type]
    return resonate, seen, gate


async def until(condition: object) -> None:
    for _ in range(1000):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_an_lfi_command_awaited_while_in_its_batch_is_not_dispatched_again() -> None:
    resonate, seen, gate = gated()

    @resonate.register
    async def later(ctx: Context) -> int:
        command = ctx.lfi(Cmd(1))
        await until(lambda: seen)  # its batch has begun
        gate.set()
        return await command

    async with resonate:
        assert await asyncio.wait_for(resonate.run("w", later).result(), 10) == 10
    assert seen == [[1]]


@pytest.mark.parametrize("where", ["queued", "in a batch", "recorded"])
async def test_a_command_awaited_again_after_its_awaiter_left_is_dispatched_once(
    where: str,
) -> None:
    store = MemoryStore()
    resonate, seen, gate = gated(concurrency=1)
    resonate.use_store(store)

    async def wait(call: Awaitable[int]) -> int:
        return await call

    @resonate.register
    async def impatient(ctx: Context) -> int:
        blocker = ctx.lfi(Cmd(0)) if where == "queued" else None
        if blocker is not None:  # it keeps the only handler busy
            await until(lambda: seen)
        command = ctx.lfc(Cmd(1))
        waiter = asyncio.ensure_future(wait(command))
        if where == "queued":
            await until(lambda: resonate.stats().batchers["Cmd"].queue_depth == 1)
        else:
            await until(lambda: [1] in seen)
        waiter.cancel()  # as a timeout around the await would
        if where == "recorded":
            gate.set()
            while not await store.get_many(["w.1"]):
                await asyncio.sleep(0)
            for _ in range(10):  # and the writer has reported it
                await asyncio.sleep(0)
        gate.set()
        value = await command
        return value + (0 if blocker is None else await blocker)

    async with resonate:
        assert await asyncio.wait_for(resonate.run("w", impatient).result(), 10) == 10
    assert [n for batch in seen for n in batch if n == 1] == [1]


async def test_a_full_batch_ends_the_wait_for_more_at_once() -> None:
    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)
    dispatched: list[float] = []

    async def handler(ctx: Context, cmds: list[Cmd]) -> list[int]:
        dispatched.append(clock.now())
        return [c.n for c in cmds]

    resonate.register_command_handler(Cmd, handler, maxlen=2, max_wait=10)

    @resonate.register
    async def one(ctx: Context, n: int) -> int:
        return await ctx.lfc(Cmd(n))

    async with resonate:
        start = clock.now()
        first = resonate.run("a", one, 0)
        await clock.sleep(1)
        second = resonate.run("b", one, 1)
        assert list(await asyncio.gather(first.result(), second.result())) == [0, 1]
    assert [t - start for t in dispatched] == [pytest.approx(1)]


async def test_a_command_timeout_fires_while_its_workflow_waits_for_room() -> None:
    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)
    gate = asyncio.Event()

    async def handler(ctx: Context, cmds: list[Cmd]) -> list[int]:
        await gate.wait()
        return [c.n for c in cmds]

    resonate.register_command_handler(Cmd, handler, queue_size=1, retry_policy=never())

    @resonate.register
    async def filler(ctx: Context, n: int) -> int:
        return await ctx.lfc(Cmd(n))

    @resonate.register
    async def hurried(ctx: Context) -> str:
        start = clock.now()
        try:
            await ctx.lfc(Cmd(99)).with_options(timeout=5)
        except PromiseTimeoutError:
            return f"timed out after {clock.now() - start:g}s"
        return "not timed out"

    async with resonate:
        fillers = [resonate.run(f"f{i}", filler, i) for i in range(3)]  # busy, queued, waiting
        assert await asyncio.wait_for(resonate.run("h", hurried).result(), 10) == (
            "timed out after 5s"
        )
        gate.set()
        assert list(await asyncio.gather(*(f.result() for f in fillers))) == [0, 1, 2]


async def test_a_command_whose_run_was_cancelled_leaves_the_queue_and_its_room() -> None:
    resonate, seen, gate = gated(queue_size=1)

    @resonate.register
    async def one(ctx: Context, n: int) -> int:
        return await ctx.lfc(Cmd(n))

    async with resonate:
        busy = resonate.run("busy", one, 0)
        await until(lambda: seen)
        queued = resonate.run("queued", one, 1)
        await until(lambda: resonate.stats().batchers["Cmd"].queue_depth == 1)
        assert queued.cancel()
        await until(lambda: queued.done())
        assert resonate.stats().batchers["Cmd"].queue_depth == 0
        other = resonate.run("other", one, 2)  # the room is free: queued at once
        await until(lambda: resonate.stats().batchers["Cmd"].queue_depth == 1)
        gate.set()
        assert await busy == 0 and await other == 20
    assert [1] not in seen


class Abort(BaseException):
    pass


@pytest.mark.parametrize("raised", [asyncio.CancelledError, Abort])
async def test_a_handler_raising_a_base_exception_fails_its_batch_not_the_batcher(
    raised: type[BaseException],
) -> None:
    resonate = Resonate(MemoryStore())
    calls: list[int] = []

    async def handler(ctx: Context, cmds: list[Cmd]) -> list[int]:
        calls.append(len(cmds))
        if len(calls) == 1:
            raise raised("from the handler")
        return [c.n for c in cmds]

    resonate.register_command_handler(Cmd, handler, retry_policy=never())

    @resonate.register
    async def one(ctx: Context, n: int) -> int:
        return await ctx.lfc(Cmd(n))

    async with resonate:
        with pytest.raises(RuntimeError, match="handler raised"):
            await asyncio.wait_for(resonate.run("first", one, 1).result(), 10)
        assert await asyncio.wait_for(resonate.run("second", one, 2).result(), 10) == 2
