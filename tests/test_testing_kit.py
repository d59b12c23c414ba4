"""The testing kit as users use it: the example from docs/testing.md, verbatim in spirit."""

from __future__ import annotations

from resonate_async import Context, MemoryStore, Resonate
from resonate_async.testing import VirtualClock, crash

sent: list[str] = []


async def send(ctx: Context, text: str) -> None:
    sent.append(text)


def build(store: MemoryStore, clock: VirtualClock) -> Resonate:
    resonate = Resonate(store, clock=clock)

    @resonate.register(name="remind")
    async def remind(ctx: Context, text: str) -> str:
        await ctx.sleep(86_400)
        await ctx.lfc(send, text)
        return "sent"

    return resonate


async def test_a_reminder_survives_a_crash(
    virtual_clock: VirtualClock, memory_store: MemoryStore
) -> None:
    sent.clear()
    first = build(memory_store, virtual_clock)
    await first.start()
    first.run("remind-1", "remind", "pay rent")
    await virtual_clock.advance(3_600)
    await crash(first)

    async with build(memory_store, virtual_clock) as second:
        handle = second.get("remind-1")
        await virtual_clock.advance(86_400 - 3_600 - 1)
        assert not handle.done()
        await virtual_clock.advance(1)
        assert await handle == "sent"
    assert sent == ["pay rent"]


async def test_use_store_swaps_a_module_level_instance(memory_store: MemoryStore) -> None:
    resonate = Resonate()  # as an app module would create it

    @resonate.register(name="hello")
    async def hello(ctx: Context, name: str) -> str:
        return f"hello {name}"

    resonate.use_store(memory_store)
    async with resonate:
        assert await resonate.run("h", "hello", "ada") == "hello ada"
    assert (await memory_store.get_many(["h"]))["h"].func == "hello"
