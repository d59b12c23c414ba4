"""The testing kit as users use it: the example from docs/testing.md, verbatim in spirit."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import Context, MemoryStore, Resonate
from resonate_async.testing import VirtualClock, crash, quiesce

if TYPE_CHECKING:
    from resonate_async.stores import PromiseRecord

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


async def test_a_poll_waits_for_the_clock_to_stop_instead_of_stopping_it() -> None:
    clock = VirtualClock()
    returned: list[tuple[str, float]] = []

    async def wait(name: str, seconds: float, *, poll: bool) -> None:
        await (clock.poll(seconds) if poll else clock.sleep(seconds))
        returned.append((name, clock.now() - start))

    start = clock.now()
    tasks = [
        asyncio.create_task(wait("poll 1", 1, poll=True)),
        asyncio.create_task(wait("poll 30", 30, poll=True)),
        asyncio.create_task(wait("sleep 20", 20, poll=False)),
    ]
    await clock.advance(10)
    assert returned == [("poll 1", 10)]  # due at 1, returned when the advance ended
    await clock.advance(100)
    # The timer stops the clock at 20 (poll 30 is not due yet); poll 30 goes at the end.
    assert returned == [("poll 1", 10), ("sleep 20", 20), ("poll 30", 110)]
    await asyncio.gather(*tasks)


async def test_an_autojump_clock_jumps_to_a_poll_when_no_timer_is_left() -> None:
    clock = VirtualClock(autojump=True)
    start = clock.now()
    await clock.poll(5)
    assert clock.now() - start == 5


async def test_a_virtual_day_polls_at_the_clocks_stops_not_every_second() -> None:
    class Counting(MemoryStore):
        claims = 0

        async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
            self.claims += 1
            return await super().claim(owner, **kwargs)

    store, clock = Counting(), VirtualClock()
    resonate = build(store, clock)  # poll_seconds=1, lease 15 s, heartbeat 5 s
    async with resonate:
        handle = resonate.run("day", "remind", "water the plants")
        await clock.advance(86_400)
        assert await handle == "sent"
    # Claims ran when the heartbeat stopped the clock (every 10 virtual
    # seconds at the latest: lease - heartbeat), not at each of 86,400 seconds.
    assert 86_400 / 10 <= store.claims <= 86_400 / 10 + 10


async def test_a_poll_given_up_leaves_nothing_behind() -> None:
    clock = VirtualClock()
    for _ in range(100):
        waiter = asyncio.create_task(clock.poll(1))
        await asyncio.sleep(0)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    assert clock._polls == []


async def test_quiesce_next_to_an_autojump_clock_does_not_make_it_jump_while_busy() -> None:
    # The test's quiesce() and the clock's each saw the other's next step as
    # work, so neither saw an idle loop; the clock then jumped regardless.
    clock = VirtualClock(autojump=True)
    sleeper = asyncio.ensure_future(clock.sleep(10))
    await asyncio.sleep(0)
    start = clock.now()
    await quiesce()
    for _ in range(50):  # busy: never idle
        await asyncio.sleep(0)
    assert clock.now() == start
    sleeper.cancel()


async def test_time_never_moves_back_and_is_never_nan() -> None:
    clock = VirtualClock(start=0.0)
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(50)
        woke.append(clock.now())

    sleeping = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    # Two advances at once: the shorter one ends while the longer one goes on.
    await asyncio.gather(clock.advance(100), clock.advance(10), sleeping)
    assert woke == [50.0] and clock.now() == 100.0
    for call in (clock.advance, clock.sleep, clock.poll):
        with pytest.raises(ValueError, match="NaN"):
            await call(float("nan"))
    assert clock.now() == 100.0 and clock.pending_timers == 0


async def test_timers_given_up_do_not_pile_up() -> None:
    # What a step under a long deadline leaves each time it returns in time.
    clock = VirtualClock()
    for _ in range(1000):
        sleeping = asyncio.ensure_future(clock.sleep(3600))
        await asyncio.sleep(0)
        sleeping.cancel()
        await asyncio.gather(sleeping, return_exceptions=True)
    assert len(clock._timers) <= 130


@pytest.mark.parametrize("jump", ["autojump", "advance"])
async def test_virtual_time_waits_for_a_long_chain_of_steps_that_await_nothing(
    jump: str,
) -> None:
    # 1,500 steps take more loop iterations than one quiesce() runs: time
    # moved on while they ran, and the run timed out at a deadline it never
    # reached in virtual time.
    clock = VirtualClock(autojump=jump == "autojump")
    resonate = Resonate(MemoryStore(), clock=clock)

    async def step(ctx: Context, n: int) -> int:
        return n

    @resonate.register(timeout=30)
    async def chain(ctx: Context) -> float:
        start = clock.now()
        await ctx.sleep(5)
        for n in range(1500):
            await ctx.lfc(step, n)
        return clock.now() - start

    async with resonate:
        handle = resonate.run("chain", chain)
        if jump == "advance":
            await clock.advance(600)
            assert handle.done()
        assert await handle == 5.0


async def test_virtual_durations_are_finite_numbers() -> None:
    clock = VirtualClock()
    for call in (clock.advance, clock.sleep, clock.poll):
        with pytest.raises(ValueError, match="finite"):
            await call(float("inf"))  # advance(inf) never ended
        with pytest.raises(TypeError, match="number of seconds"):
            await call("5")  # type: ignore[arg-type]
    assert clock.pending_timers == 0


async def test_an_autojump_clock_used_by_another_loop_before_still_jumps() -> None:
    # A module-scoped test's loop left a sleep (and the clock's jumper) pending.
    clock = VirtualClock(autojump=True)
    other = asyncio.new_event_loop()

    left: list[asyncio.Future[None]] = []

    async def leave_a_sleep() -> None:
        left.append(asyncio.ensure_future(clock.sleep(1000)))
        await asyncio.sleep(0)

    try:
        await asyncio.to_thread(other.run_until_complete, leave_a_sleep())
        start = clock.now()
        await asyncio.wait_for(clock.sleep(5), 5)  # jumps here, not waits for ever
        assert clock.now() == start + 5
    finally:
        for task in asyncio.all_tasks(other):
            task.cancel()
        other.close()


def test_crash_of_a_resonate_whose_loop_ended_drops_it() -> None:
    # A failing test's loop ended without aclose(); the next test crashes it.
    store = MemoryStore()
    resonate = Resonate(store, worker_id="w")

    async def failing_test() -> None:
        await resonate.start()

    async def next_test() -> None:
        await crash(resonate)  # asyncio's "Event loop is closed" before
        assert resonate._engine is None
        async with resonate:  # and it starts again in this loop
            pass

    asyncio.run(failing_test())
    asyncio.run(next_test())


def test_the_fixtures_need_no_async_plugin(
    virtual_clock: VirtualClock, memory_store: MemoryStore
) -> None:
    # Plain fixtures: an anyio or sync test gets them too.
    assert isinstance(virtual_clock, VirtualClock)
    assert isinstance(memory_store, MemoryStore)
