"""A worker paused past its lease whose own claim loop takes its run back."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from resonate_async import Context, MemoryStore, Resonate, State
from resonate_async.testing import VirtualClock

if TYPE_CHECKING:
    import pytest

    from resonate_async.stores import PromiseRecord


class Paused(MemoryStore):
    """A memory store that the workers in ``cut`` cannot renew or claim in
    (paused processes)."""

    def __init__(self) -> None:
        super().__init__()
        self.cut: set[str] = set()

    async def renew(self, owner: str, *, lease_until: float) -> int:
        if owner in self.cut:
            raise OSError("connection refused")
        return await super().renew(owner, lease_until=lease_until)

    async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
        if owner in self.cut:
            raise OSError("connection refused")
        return await super().claim(owner, **kwargs)


async def test_a_run_taken_over_while_its_worker_was_paused_resumes_from_the_store() -> None:
    # Worker a is paused in step 2 past its lease; b takes the run over,
    # settles steps 2 and 3, and is paused in step 4 past its own lease. a
    # wakes, with a's execution of the run still there, and its claim loop
    # could take the now free row back: the run must end, once. Not stuck
    # PENDING under a lease a renews for ever (a's heartbeat reading b's
    # lease before the claim), nor a's stale execution running step 3
    # again (reading its own after it), and never two of its bodies at once
    # in a. (a renews before it claims after a lapse, and a run it claims
    # back anyway stops as lost.)
    clock = VirtualClock()
    store = Paused()
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    blocks = {("a", 2), ("b", 4)}
    steps: list[tuple[str, str]] = []
    bodies = {"a": 0, "b": 0}
    most = {"a": 0, "b": 0}

    def build(name: str) -> Resonate:
        resonate = Resonate(
            store, clock=clock, worker_id=name, lease_seconds=10, heartbeat_seconds=3
        )

        async def step(ctx: Context, n: int) -> int:
            steps.append((name, ctx.id))
            if (name, n) in blocks:
                await gates[name].wait()
            return n

        @resonate.register(name="job")
        async def job(ctx: Context) -> int:
            bodies[name] += 1
            most[name] = max(most[name], bodies[name])
            try:
                return sum([await ctx.lfc(step, n) for n in range(1, 6)])
            finally:
                bodies[name] -= 1

        return resonate

    first, second = build("a"), build("b")
    async with first, second:
        handle = first.run("job-1", "job")
        while ("a", "job-1.2") not in steps:
            await asyncio.sleep(0)
        store.cut = {"a"}
        await clock.advance(11)  # a's lease ran out; b takes the run over
        assert steps[-3:] == [("b", "job-1.2"), ("b", "job-1.3"), ("b", "job-1.4")]
        store.cut = {"a", "b"}
        await clock.advance(11)  # b's lease ran out too
        store.cut = {"b"}
        await clock.advance(3)  # a wakes: it renews and claims
        gates["a"].set()  # a's step 2 would end now, had it not been stopped
        for _ in range(10):
            await clock.advance(3)
        assert handle.done(), (steps, await store.get_many(["job-1"]))
        assert await handle == 15
        root = (await store.get_many(["job-1"]))["job-1"]
        assert root.state is State.RESOLVED
    assert steps == [
        ("a", "job-1.1"),
        ("a", "job-1.2"),
        ("b", "job-1.2"),
        ("b", "job-1.3"),
        ("b", "job-1.4"),
        ("a", "job-1.4"),  # resumed from what b stored: not step 3 again
        ("a", "job-1.5"),
    ]
    assert most["a"] == 1


async def test_a_lone_worker_back_from_a_pause_keeps_its_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nobody took the run over while the worker was cut off: whichever of
    # its claim loop and heartbeat comes first after the pause, its leases
    # are renewed before its claim could take its own runs back, and the
    # step in progress is not run again.
    clock = VirtualClock()
    store = Paused()
    gate = asyncio.Event()
    steps: list[str] = []
    resonate = Resonate(store, clock=clock, worker_id="a", lease_seconds=10, heartbeat_seconds=3)

    async def step(ctx: Context, n: int) -> int:
        steps.append(ctx.id)
        if n == 2:
            await gate.wait()
        return n

    @resonate.register(name="job")
    async def job(ctx: Context) -> int:
        return sum([await ctx.lfc(step, n) for n in range(1, 4)])

    async with resonate:
        handle = resonate.run("job-2", "job")
        while "job-2.2" not in steps:
            await asyncio.sleep(0)
        store.cut = {"a"}
        await clock.advance(11)  # its lease ran out; nobody else is there
        store.cut = set()
        await clock.advance(3)
        gate.set()
        for _ in range(3):
            await clock.advance(3)
        assert await handle == 6
    assert steps == ["job-2.1", "job-2.2", "job-2.3"]
    assert "claimed back" not in caplog.text
