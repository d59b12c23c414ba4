"""A worker paused past its lease whose own claim loop takes its run back."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import Context, MemoryStore, Resonate, State
from resonate_async.testing import VirtualClock

if TYPE_CHECKING:
    from collections.abc import Sequence

    from resonate_async.stores import PromiseRecord


class Paused(MemoryStore):
    """A memory store that the workers in ``cut`` cannot renew or claim in
    (paused processes), and that orders worker a's first claim once ``race``
    is set against its heartbeat's look at its runs (``get_many``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cut: set[str] = set()
        self.race: str | None = None
        self.read = asyncio.Event()
        self.claimed = asyncio.Event()

    async def renew(self, owner: str, *, lease_until: float) -> int:
        if owner in self.cut:
            raise OSError("connection refused")
        return await super().renew(owner, lease_until=lease_until)

    async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
        if owner in self.cut:
            raise OSError("connection refused")
        if self.race is None or owner != "a" or self.claimed.is_set():
            return await super().claim(owner, **kwargs)
        if self.race == "read first":
            await self.read.wait()
        claimed = await super().claim(owner, **kwargs)
        self.claimed.set()
        return claimed

    async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
        if self.race is None or self.read.is_set():
            return await super().get_many(ids)
        if self.race == "claim first":
            await self.claimed.wait()
        rows = await super().get_many(ids)
        self.read.set()
        if self.race == "read first":
            await self.claimed.wait()  # answered after the claim: what it read is stale
        return rows


@pytest.mark.parametrize("race", ["read first", "claim first"])
async def test_a_run_its_own_worker_claims_back_after_a_pause_resumes_from_the_store(
    race: str,
) -> None:
    # Worker a is paused in step 2 past its lease; b takes the run over,
    # settles steps 2 and 3, and is paused in step 4 past its own lease. a
    # wakes: its claim loop claims the run back while a's execution of it is
    # still there, and its heartbeat looks at its runs after the lapse,
    # either before the claim (and reads b's lease) or after it (and reads
    # a's). Either way the run must end, once: not stuck PENDING under a
    # lease a renews for ever, nor a's stale execution running step 3 again,
    # and never two of its bodies at once in a.
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
        store.race = race
        store.cut = {"b"}
        await clock.advance(3)  # a wakes: it claims and renews
        assert store.claimed.is_set()
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
