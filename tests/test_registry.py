"""What a registered function or a step is called, and how it is called."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import CanceledError, Context, EncodingError, MemoryStore, Resonate, State
from resonate_async._registry import CallStyle, call_style, function_name
from resonate_async.retry import never
from resonate_async.testing import crash

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Generator


async def add(ctx: Context, a: int, b: int) -> int:
    return a + b


class Charge:
    """A callable object whose __call__ is a coroutine function."""

    async def __call__(self, ctx: Context, amount: int) -> int:
        return amount


class Tally:
    def __call__(self, ctx: Context, n: int) -> int:
        return n


def test_names_are_the_same_in_every_process() -> None:
    # Never a repr: its memory address differs in the process that replays.
    assert function_name(add) == "add"
    assert function_name(functools.partial(add, b=1)) == "add"
    assert function_name(functools.partial(functools.partial(add, b=1), 2)) == "add"
    assert function_name(Charge()) == "Charge"
    assert function_name(Tally()) == "Tally"


def test_a_callable_object_is_called_the_way_its_call_method_is() -> None:
    assert call_style(Charge()) is CallStyle.ASYNC
    assert call_style(Tally()) is CallStyle.SYNC
    assert call_style(functools.partial(add, b=1)) is CallStyle.ASYNC


def test_an_async_generator_is_refused() -> None:
    async def numbers(ctx: Context) -> AsyncGenerator[int, None]:
        yield 1

    with pytest.raises(TypeError, match="is an async generator: a durable function returns"):
        Resonate(MemoryStore()).register(numbers)


async def test_a_partial_step_replays_after_a_restart() -> None:
    store = MemoryStore()
    gate = asyncio.Event()
    effects: list[int] = []

    async def record(ctx: Context, a: int, b: int) -> int:
        effects.append(a + b)
        return a + b

    async def block(ctx: Context) -> None:
        await gate.wait()

    def build() -> Resonate:
        resonate = Resonate(store, worker_id="w")

        @resonate.register(name="sums")
        async def sums(ctx: Context) -> int:
            total = await ctx.lfc(functools.partial(record, b=2), 1)
            total += await ctx.lfc(Charge(), 4)
            await ctx.lfc(block)
            return total

        return resonate

    first = build()
    await first.start()
    first.run("s", "sums")
    while not (await store.get_many(["s.2"])):
        await asyncio.sleep(0)
    await crash(first)
    gate.set()
    async with build() as second:
        assert await asyncio.wait_for(second.get("s").result(), 10) == 7
    assert effects == [3]  # recorded once, replayed after the restart


async def test_a_generator_cancelled_in_a_step_runs_its_finally_cleanup() -> None:
    # As a coroutine does: the cancellation is thrown into the generator,
    # whose `finally` may still yield a cleanup step.
    resonate = Resonate(MemoryStore())
    started = asyncio.Event()
    effects: list[str] = []

    async def wait(ctx: Context) -> None:
        started.set()
        await asyncio.Event().wait()

    async def cleanup(ctx: Context) -> None:
        effects.append("cleanup")

    def guarded(ctx: Context) -> Generator[Any, Any, str]:
        try:
            yield ctx.lfc(wait)
            return "never"
        finally:
            yield ctx.lfc(cleanup)

    resonate.register(guarded, name="guarded", retry_policy=never())
    async with resonate:
        handle = resonate.run("g", "guarded")
        await started.wait()
        assert handle.cancel()
        with pytest.raises(CanceledError):
            await asyncio.wait_for(handle.result(), 10)
        stored = await resonate.promises.get("g")
        assert stored is not None and stored.state is State.REJECTED_CANCELED
    assert effects == ["cleanup"]


def test_a_class_is_called_to_build_an_instance_whatever_its_call_method() -> None:
    assert call_style(Charge) is CallStyle.SYNC  # Charge(...) builds a Charge


def test_a_dead_aiosqlite_thread_is_seen_before_and_after_aiosqlite_0_22() -> None:
    import threading

    from resonate_async.stores.sqlite import _dead

    class OldConnection(threading.Thread):  # aiosqlite < 0.22: the connection is the thread
        pass

    class NewConnection:  # aiosqlite 0.22+: the connection holds its thread
        def __init__(self) -> None:
            self._thread = threading.Thread(target=lambda: None)

    for conn in (OldConnection(target=lambda: None), NewConnection()):
        thread = conn if isinstance(conn, threading.Thread) else conn._thread
        assert not _dead(conn)  # type: ignore[arg-type]  # not started yet
        thread.start()
        thread.join()
        assert _dead(conn)  # type: ignore[arg-type]


async def test_a_generator_that_returns_an_lfi_promise_is_told_to_yield_it_again() -> None:
    # The blog-era style: `p = yield ctx.lfi(...)` gives the promise; its
    # value takes a second `yield p`. Storing the promise says so.
    resonate = Resonate(MemoryStore())

    async def step(ctx: Context) -> int:
        return 1

    @resonate.register(retry_policy=never())
    def forgot(ctx: Context) -> Generator[Any, Any, int]:
        promise = yield ctx.lfi(step)
        return promise  # type: ignore[no-any-return]

    async with resonate:
        with pytest.raises(EncodingError, match="`yield` it once more"):
            await resonate.run("g", forgot)
