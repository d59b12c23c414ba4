"""Remote invocation: any worker that registered a function may run it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import Command, Context, Kind, MemoryStore, Resonate, State
from resonate_async.errors import StoreError
from resonate_async.stores import Create, Settle
from resonate_async.testing import VirtualClock, crash, quiesce

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from resonate_async.stores import PromiseRecord
    from resonate_async.stores._base import Op


async def test_rfc_runs_on_a_worker_that_registered_the_function() -> None:
    store = MemoryStore()
    caller = Resonate(store, poll_seconds=0.01)
    worker = Resonate(store, poll_seconds=0.01)
    ran_on: list[str] = []

    @worker.register(name="double")
    async def double(ctx: Context, x: int) -> int:
        ran_on.append("worker")
        return x * 2

    @caller.register(name="parent")
    async def parent(ctx: Context, x: int) -> int:
        doubled: int = await ctx.rfc("double", x)  # by name: the value is Any
        return doubled + 1

    async with caller, worker:
        assert await caller.run("p", "parent", 20) == 41
        remote = await caller.promises.get("p.1")
        assert remote is not None and remote.kind is Kind.REMOTE
        assert remote.state is State.RESOLVED
    assert ran_on == ["worker"]


async def test_a_caller_that_does_not_register_a_function_calls_the_version_it_names() -> None:
    # The caller cannot know which versions exist: without a version it
    # records 1, which a worker registering version 2 alone never claims.
    store = MemoryStore()
    caller = Resonate(store, poll_seconds=0.01)
    worker = Resonate(store, poll_seconds=0.01)

    @worker.register(name="double", version=2)
    async def double(ctx: Context, x: int) -> int:
        return x * 2

    @caller.register(name="parent")
    async def parent(ctx: Context, x: int) -> int:
        doubled: int = await ctx.rfc("double", x).with_options(version=2)
        return doubled + 1

    async with caller, worker:
        assert await asyncio.wait_for(caller.run("p", "parent", 20).result(), 10) == 41
        remote = await caller.promises.get("p.1")
        assert remote is not None and remote.version == 2

        @caller.register(name="bad_versions")
        async def bad_versions(ctx: Context) -> list[str]:
            refused = []
            for version in (0, True, "2"):
                try:
                    ctx.rfc("double", 1).with_options(version=version)  # type: ignore[arg-type]
                except (TypeError, ValueError) as exc:
                    refused.append(f"{type(exc).__name__}: {exc}")
            return refused

        assert await caller.run("b", "bad_versions") == [
            "ValueError: version must be at least 1, got 0",
            "TypeError: version must be an int, got True",
            "TypeError: version must be an int, got '2'",
        ]


async def test_rfi_fans_out_and_runs_locally_when_registered_here() -> None:
    resonate = Resonate(MemoryStore(), poll_seconds=60)  # no polling needed: woken at once

    @resonate.register(name="square")
    async def square(ctx: Context, x: int) -> int:
        return x * x

    @resonate.register(name="fan")
    async def fan(ctx: Context) -> list[int]:
        return list(await asyncio.gather(*(ctx.rfi(square, x) for x in range(5))))

    async with resonate:
        assert await resonate.run("f", "fan") == [0, 1, 4, 9, 16]


async def test_a_run_owned_by_a_vanished_worker_is_taken_over_when_its_lease_expires() -> None:
    from resonate_async._leases import abandoned_workers
    from resonate_async.testing import VirtualClock, crash

    clock = VirtualClock()
    store = MemoryStore()
    executions: list[str] = []
    gate = asyncio.Event()

    def build(worker_id: str) -> Resonate:
        resonate = Resonate(store, clock=clock, worker_id=worker_id, lease_seconds=15)

        @resonate.register(name="job")
        async def job(ctx: Context) -> str:
            executions.append(worker_id)
            await gate.wait()
            return worker_id

        return resonate

    first = build("host-a:1:x")
    await first.start()
    first.run("job-1", "job")
    while not executions:
        await asyncio.sleep(0)
    await crash(first)
    abandoned_workers.discard("host-a:1:x")  # as if on another host: only the lease tells
    gate.set()

    async with build("host-b:2:y") as second:
        handle = second.run("job-1", "job")
        await clock.advance(10)
        assert not handle.done() and executions == ["host-a:1:x"]  # lease still live
        await clock.advance(10)
        assert await handle == "host-b:2:y"
    assert executions == ["host-a:1:x", "host-b:2:y"]


async def test_a_stalled_worker_whose_run_was_taken_over_ends_with_the_stored_outcome() -> None:
    # No fencing at write time: a worker that lost its lease while stalled
    # (here: its lease is freed under it while its heartbeats go on, so it
    # has no lapse to notice) still finishes the run's body. What it may not do is
    # disagree with the store: the step it completes late finds the new
    # owner's outcome stored, and its body continues with that one.
    store = MemoryStore()
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    executed: list[str] = []
    continued: list[tuple[str, str]] = []

    def build(name: str) -> Resonate:
        resonate = Resonate(store, worker_id=f"host-{name}:1:x", poll_seconds=60)

        async def step(ctx: Context) -> str:
            executed.append(name)
            await gates[name].wait()
            return f"step by {name}"

        @resonate.register(name="job")
        async def job(ctx: Context) -> str:
            value: str = await ctx.lfc(step)
            continued.append((name, value))
            return value

        return resonate

    first, second = build("a"), build("b")
    async with first, second:
        stalled = first.run("job-1", "job")
        while executed != ["a"]:
            await asyncio.sleep(0)
        await store.release("host-a:1:x", ["job-1"])  # its lease lapsed while it stalled

        gates["b"].set()
        assert await second.run("job-1", "job") == "step by b"  # taken over by an atomic claim

        gates["a"].set()  # the stalled worker wakes up and finishes its step
        assert await stalled == "step by b"

    assert executed == ["a", "b"]  # the step ran twice: steps are at least once
    assert continued == [("b", "step by b"), ("a", "step by b")]
    stored = (await store.get_many(["job-1.1"]))["job-1.1"]
    assert stored.value is not None and b"step by b" in stored.value


class Unreachable(MemoryStore):
    """A memory store that one worker cannot renew or claim leases in while
    ``cut``: its calls fail at once, or (``hang``) answer once ``mended``."""

    def __init__(self, worker_id: str, *, hang: bool) -> None:
        super().__init__()
        self.cut_off = worker_id
        self.cut = False
        self.hang = hang
        self.mended = asyncio.Event()

    async def _reach(self, owner: str) -> None:
        if self.cut and owner == self.cut_off:
            if not self.hang:
                raise OSError("connection refused")
            await self.mended.wait()

    def mend(self) -> None:
        self.cut = False
        self.mended.set()

    async def renew(self, owner: str, *, lease_until: float) -> int:
        await self._reach(owner)
        return await super().renew(owner, lease_until=lease_until)

    async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
        await self._reach(owner)
        return await super().claim(owner, **kwargs)


@dataclass
class Note(Command[int]):
    n: int


@pytest.mark.parametrize("third", ["step", "command"])
@pytest.mark.parametrize("noticed_by", ["heartbeat", "next call"])
@pytest.mark.parametrize("store_answers", ["refusing", "late"])
@pytest.mark.parametrize("taken_over", ["settled", "running"])
async def test_a_worker_that_lost_its_lease_stops_the_run_and_follows_it(
    taken_over: str,
    store_answers: str,
    noticed_by: str,
    third: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Worker a cannot renew for longer than a lease (a pause, a partition;
    # its renewals fail, or one hangs until the store answers again): b
    # claims the run and executes it. Once a renews again it must stop its
    # execution there, before its body starts steps b has recorded already
    # (its cleanup included), and its handle answers with the run's outcome
    # from the store. Its next call may come before its next heartbeat: a
    # step, or the batch of a command, renews first.
    clock = VirtualClock()
    store = Unreachable("a", hang=store_answers == "late")
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    steps: list[tuple[str, str]] = []

    def build(name: str) -> Resonate:
        resonate = Resonate(
            store, clock=clock, worker_id=name, lease_seconds=10, heartbeat_seconds=3
        )

        async def step(ctx: Context, n: int) -> int:
            steps.append((name, ctx.id))
            if n == 2:
                await gates[name].wait()
            return n

        async def note(ctx: Context, notes: list[Note]) -> list[int]:
            steps.extend((name, f"note-{c.n}") for c in notes)
            return [c.n for c in notes]

        resonate.register_command_handler(Note, note)

        @resonate.register(name="job")
        async def job(ctx: Context) -> int:
            total = 0
            try:
                for n in (1, 2):
                    total += await ctx.lfc(step, n)
                total += await (ctx.lfc(step, 3) if third == "step" else ctx.lfc(Note(3)))
            except asyncio.CancelledError:
                await ctx.lfc(step, 0)  # a cleanup step: not where b runs the run
                raise
            return total

        return resonate

    first, second = build("a"), build("b")
    async with first, second:
        stalled = first.run("job-1", "job")
        while ("a", "job-1.2") not in steps:
            await asyncio.sleep(0)
        store.cut = True
        await clock.advance(11)  # a's lease ran out; b's claim loop takes the run
        assert ("b", "job-1.2") in steps and ("a", "job-1.1") in steps
        if taken_over == "settled":
            gates["b"].set()
            assert await second.get("job-1") == 6
        store.mend()
        with caplog.at_level(logging.WARNING, logger="resonate_async"):
            if noticed_by == "heartbeat":
                await clock.advance(3)  # a renews: its lapse makes it look at its runs
                gates["a"].set()  # a's step would return now, its body go on to call 3
            else:
                gates["a"].set()  # at once: call 3 is about to start
            await quiesce()
        assert not stalled.done() or await stalled == 6
        gates["b"].set()
        await clock.advance(5)  # a's handle looks for the outcome at its polls
        assert await asyncio.wait_for(stalled.result(), 10) == 6
    last = ("b", "job-1.3") if third == "step" else ("b", "note-3")
    assert steps == [("a", "job-1.1"), ("a", "job-1.2"), ("b", "job-1.2"), last]
    held = "was settled RESOLVED" if taken_over == "settled" else "is held by worker 'b'"
    assert f"run 'job-1' {held}" in caplog.text


async def test_a_step_ready_to_start_as_its_run_is_found_lost_does_not_start() -> None:
    # The renewal that finds the run lost has moved the lease on already: an
    # lfi step whose task was made just before the run was marked lost must
    # not start here all the same (a probe saw one on PostgreSQL after SIGCONT).
    clock = VirtualClock()

    class HeldRead(Unreachable):
        def __init__(self) -> None:
            super().__init__("a", hang=False)
            self.hold: asyncio.Event | None = None

        async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
            hold, self.hold = self.hold, None
            if hold is not None:  # a's look at its runs, after its lapse
                await hold.wait()
            return await super().get_many(ids)

    store = HeldRead()
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    started_child = asyncio.Event()
    steps: list[tuple[str, str]] = []

    def build(name: str) -> Resonate:
        resonate = Resonate(
            store, clock=clock, worker_id=name, lease_seconds=10, heartbeat_seconds=3
        )

        async def step(ctx: Context, n: int) -> int:
            steps.append((name, ctx.id))
            if n == 1:
                await gates[name].wait()
            return n

        @resonate.register(name="job")
        async def job(ctx: Context) -> int:
            total = await ctx.lfc(step, 1)
            child = ctx.lfi(step, 2)
            if name == "a":
                started_child.set()
            return total + await child

        return resonate

    first, second = build("a"), build("b")
    async with first, second:
        stalled = first.run("job-1", "job")
        while ("a", "job-1.1") not in steps:
            await asyncio.sleep(0)
        store.cut = True
        await clock.advance(11)  # a's lease ran out; b claims the run
        assert ("b", "job-1.1") in steps
        store.mend()
        store.hold = started_child
        await clock.advance(3)  # a renews, then reads its runs: held until ...
        gates["a"].set()  # ... its body made the lfi child, whose task is about to run
        await quiesce()
        gates["b"].set()
        await clock.advance(5)
        assert await asyncio.wait_for(stalled.result(), 10) == 3
    assert ("a", "job-1.2") not in steps
    assert steps.count(("b", "job-1.2")) == 1


async def test_a_worker_id_restarted_after_a_crash_keeps_its_runs() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    starts: list[str] = []

    async def job(ctx: Context, seconds: float) -> str:
        starts.append(ctx._engine.worker_id)
        await ctx.sleep(seconds)
        return "done"

    def worker(id: str) -> Resonate:
        resonate = Resonate(store, clock=clock, worker_id=id)
        resonate.register(job)
        return resonate

    crashed = worker("a")
    await crashed.start()
    await crash(crashed)  # "a" is now a dead worker id...
    restarted, other = worker("a"), worker("b")  # ...until it starts again
    async with restarted, other:
        handle = restarted.run("job", job, 600)
        await clock.advance(700)  # many of b's polls, some freeing dead workers' leases
        assert await handle == "done"
    assert starts == ["a"]  # b never took the live worker's run


async def test_stats_count_what_executed_here_and_what_was_recovered() -> None:
    store = MemoryStore()
    gate, waiting = asyncio.Event(), asyncio.Event()

    def build() -> Resonate:
        resonate = Resonate(store, worker_id="w", poll_seconds=60)

        @resonate.register(name="square")
        async def square(ctx: Context, x: int) -> int:
            return x * x

        @resonate.register(name="parent")
        async def parent(ctx: Context, x: int) -> int:
            squared: int = await ctx.rfc("square", x)
            waiting.set()
            await gate.wait()
            return squared + 1

        return resonate

    first = build()
    await first.start()
    handle = first.run("p", "parent", 3)
    try:
        await asyncio.wait_for(waiting.wait(), 10)
    finally:
        stats = first.stats().runs
        await crash(first)
    del handle
    # The run and the remote call it made both executed here; nothing was recovered.
    assert (stats.started, stats.completed, stats.recovered) == (2, 1, 0)
    gate.set()
    async with build() as second:
        assert await asyncio.wait_for(second.get("p").result(), 10) == 10
        # An id whose outcome is stored answers from it: nothing runs.
        assert await second.run("p", "parent", 3) == 10
        stats = second.stats().runs
    assert (stats.started, stats.completed, stats.failed, stats.recovered) == (1, 1, 0, 1)


async def test_a_remote_call_takes_its_functions_registered_timeout() -> None:
    # As resonate.run does; with_options(timeout=) still overrides it.
    from resonate_async import PromiseTimeoutError

    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)

    @resonate.register(name="slow", timeout=5)
    async def slow(ctx: Context) -> str:
        await clock.sleep(1000)
        return "slow done"

    @resonate.register(name="caller")
    async def caller(ctx: Context) -> list[str]:
        outcomes = []
        for call in (ctx.rfc("slow"), ctx.rfc(slow).with_options(timeout=2000)):
            try:
                outcomes.append(await call)
            except PromiseTimeoutError:
                outcomes.append("timed out")
        return outcomes

    async with resonate:
        started = clock.now()
        assert await resonate.run("c", "caller") == ["timed out", "slow done"]
        first = await resonate.promises.get("c.1")
        assert first is not None and first.timeout_at == started + 5


async def test_with_options_refuses_what_a_call_cannot_use() -> None:
    from resonate_async.retry import constant

    resonate = Resonate(MemoryStore())
    errors: list[str] = []

    @resonate.register(name="remote")
    async def remote(ctx: Context) -> None:
        return None

    @resonate.register(name="careless")
    async def careless(ctx: Context) -> None:
        for call in (
            lambda: ctx.sleep(100).with_options(timeout=5),
            lambda: ctx.sleep(1).with_options(retry_policy=constant(1, 3)),
            lambda: ctx.rfc(remote).with_options(retry_policy=constant(1, 3)),
            lambda: ctx.promise().with_options(retry_policy=constant(1, 3)),
            lambda: ctx.sleep(1).with_options(version=2),
        ):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))

    async with resonate:
        await resonate.run("w", "careless")
    assert len(errors) == 5
    assert "a sleep takes no timeout" in errors[0]
    assert "a sleep is not retried" in errors[1]
    assert "registered with, in the worker that runs it" in errors[2]
    assert "settled from outside, not retried" in errors[3]
    assert "only a remote call (rfi/rfc) takes a version" in errors[4]


async def test_rows_a_claim_leased_here_whose_answer_was_lost_are_run() -> None:
    # The claim committed but its answer never came (a dropped connection):
    # its rows were leased to this worker, which did not run them, and its
    # heartbeat renewed those leases for ever. The caller waited for ever.
    from resonate_async.errors import StoreError

    class LosesAClaimAnswer(MemoryStore):
        lost = False

        async def claim(self, *args: Any, **kwargs: Any) -> list[PromiseRecord]:
            claimed = await super().claim(*args, **kwargs)
            if claimed and not self.lost:
                self.lost = True
                raise StoreError("connection lost after the claim committed")
            return claimed

    store = LosesAClaimAnswer()
    caller = Resonate(store, poll_seconds=0.01)
    worker = Resonate(store, poll_seconds=0.01)

    @worker.register(name="double")
    async def double(ctx: Context, x: int) -> int:
        return x * 2

    @caller.register(name="parent")
    async def parent(ctx: Context, x: int) -> int:
        doubled: int = await ctx.rfc("double", x)
        return doubled

    async with caller, worker:
        assert await asyncio.wait_for(caller.run("p", "parent", 21).result(), 10) == 42
    assert store.lost


async def test_taking_a_fresh_remote_call_is_not_logged_as_a_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resonate = Resonate(MemoryStore(), poll_seconds=60)

    @resonate.register(name="square")
    async def square(ctx: Context, x: int) -> int:
        return x * x

    @resonate.register(name="calls")
    async def calls(ctx: Context) -> int:
        return int(await ctx.rfc("square", 3))

    with caplog.at_level(logging.INFO, "resonate_async"):
        async with resonate:
            assert await resonate.run("c", "calls") == 9
    assert "resumed" not in caplog.text


class CountingStore(MemoryStore):
    """Counts the claims and the reads of ``job-*`` promises."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.job_reads = 0

    async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
        self.claims += 1
        return await super().claim(owner, **kwargs)

    async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
        if any(id.startswith("job-") for id in ids):
            self.job_reads += 1
        return await super().get_many(ids)


async def test_handles_on_runs_a_live_worker_holds_cost_one_read_a_poll() -> None:
    # Every worker calling run() on the same ids: each run() of a run another
    # live worker held made a claim, and each handle read its row every poll,
    # a query per handle per poll, enough to starve a worker's heartbeat.
    clock = VirtualClock()
    store = CountingStore()
    gate = asyncio.Event()
    started: list[str] = []

    def build(worker_id: str) -> Resonate:
        resonate = Resonate(
            store, clock=clock, worker_id=worker_id, lease_seconds=60, poll_seconds=1
        )

        @resonate.register(name="job")
        async def job(ctx: Context) -> str:
            started.append(ctx.id)
            await gate.wait()
            return worker_id

        return resonate

    async with build("host-a:1:x") as a, build("host-b:2:y") as b:
        for i in range(200):
            a.run(f"job-{i}", "job")
        while len(started) < 200:
            await asyncio.sleep(0)
        store.claims = store.job_reads = 0
        handles = [b.run(f"job-{i}", "job") for i in range(200)]
        for _ in range(3):
            await clock.advance(1)
        assert not any(h.done() for h in handles)
        assert store.claims <= 2 * 3  # the two claim loops' polls, no claim per run()
        assert store.job_reads <= 3  # one read a poll for all 200 handles
        gate.set()
        for _ in range(10):  # a poll after A's settles commit finds them
            await clock.advance(1)
            if all(h.done() for h in handles):
                break
        assert await asyncio.gather(*handles) == ["host-a:1:x"] * 200


async def test_a_poll_that_cannot_read_one_promise_fails_only_its_waiters() -> None:
    # The poll reads every awaited promise at once; one that does not decode
    # (here: the store raises for it) fails its own waiters, and the others
    # are still woken (the poller does not die of it).
    class OneBadRow(MemoryStore):
        broken = False

        async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
            if self.broken and "bad" in ids:
                raise ValueError("row 'bad' does not decode")
            return await super().get_many(ids)

    clock = VirtualClock()
    store = OneBadRow()
    resonate = Resonate(store, clock=clock, poll_seconds=1)
    async with resonate:
        await resonate.promises.create("good")
        await resonate.promises.create("bad")
        good, bad = resonate.get("good"), resonate.get("bad")
        await good.created()
        await bad.created()  # both wait now
        store.broken = True  # the row goes bad under a waiter
        # Settled behind this process's back (as another worker would).
        [settled] = await store.write(
            [Settle("good", State.RESOLVED, b"42", clock.now())]  # JSON 42
        )
        assert settled is not None
        await clock.advance(1)
        assert await asyncio.wait_for(good.result(), 5) == 42
        with pytest.raises(ValueError, match="does not decode"):
            await bad


async def test_a_remote_call_nobody_here_registers_is_said_to_wait_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resonate = Resonate(MemoryStore())

    @resonate.register
    async def caller(ctx: Context, n: int) -> Any:
        return await ctx.rfc("elsewhere.job", n)

    with caplog.at_level(logging.INFO, logger="resonate_async"):
        async with resonate:
            first, second = resonate.run("c1", caller, 1), resonate.run("c2", caller, 2)
            for _ in range(100):
                await asyncio.sleep(0)
            assert not first.done() and not second.done()  # waiting, as they should
    told = [r for r in caplog.records if "wait for a worker that registers it" in r.message]
    assert len(told) == 1 and "'elsewhere.job'" in told[0].message


@pytest.mark.parametrize("catches", [False, True])
async def test_a_step_that_cannot_renew_a_lapsed_lease_leaves_the_run_pending(
    catches: bool,
) -> None:
    # The store refuses renewals (with its own error, not a StoreError) for
    # longer than a lease, then a step is about to start: that is a store
    # failure, which leaves the run PENDING even if the body catches it, and
    # the run resumes once the store answers. Not the step's own failure.
    clock = VirtualClock()
    store = Unreachable("a", hang=False)
    gate = asyncio.Event()
    calls: list[int] = []
    resonate = Resonate(store, clock=clock, worker_id="a", lease_seconds=10, heartbeat_seconds=3)

    async def step(ctx: Context, n: int) -> int:
        calls.append(n)
        if n == 1:
            await gate.wait()
        return n

    @resonate.register(name="job")
    async def job(ctx: Context) -> Any:
        first = await ctx.lfc(step, 1)
        try:
            second = await ctx.lfc(step, 2)
        except Exception as exc:
            if not catches:
                raise
            return f"fallback after {exc!r}"
        return first + second

    async with resonate:
        handle = resonate.run("job-1", job)
        await quiesce()
        store.cut = True
        await clock.advance(12)  # renewals fail for more than a lease
        gate.set()  # step 2 is about to start: it cannot renew
        await quiesce()
        assert calls == [1]
        assert (await store.get_many(["job-1"]))["job-1"].state is State.PENDING
        with pytest.raises(StoreError, match="renewing this worker's leases failed"):
            await asyncio.wait_for(handle.result(), 5)
        store.mend()
        await clock.advance(60)  # its back-off passes; the claim loop resumes it
        assert await asyncio.wait_for(resonate.get("job-1").result(), 5) == 3
    assert calls == [1, 2]


async def test_no_lease_is_renewed_once_shutdown_has_begun() -> None:
    # During aclose()'s grace (a batch still in its handler) the heartbeat
    # ticks on: no renewal starts then, and none outlives the store's close.
    renewed_while_closing: list[bool] = []
    resonate: Resonate

    class Watched(MemoryStore):
        async def renew(self, owner: str, *, lease_until: float) -> int:
            engine = resonate._engine
            renewed_while_closing.append(engine is None or engine.closing)
            return await super().renew(owner, lease_until=lease_until)

    resonate = Resonate(
        Watched(), worker_id="a", lease_seconds=3, heartbeat_seconds=0.1, grace_seconds=2
    )

    async def note(ctx: Context, notes: list[Note]) -> list[int]:
        await asyncio.sleep(0.6)  # in flight through the first part of the grace
        return [c.n for c in notes]

    resonate.register_command_handler(Note, note)

    @resonate.register(name="job")
    async def job(ctx: Context) -> int:
        return await ctx.lfc(Note(1))

    await resonate.start()
    resonate.run("job-1", job)
    await asyncio.sleep(0.25)  # renewals while running
    await resonate.aclose()
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert left == []
    assert renewed_while_closing and not any(renewed_while_closing)


async def test_a_settle_notified_before_its_waiter_registers_still_wakes_it() -> None:
    # A store with NOTIFY (PostgreSQL): the waiter reads the promise PENDING,
    # and its settle's notice comes before the waiter is registered.
    class NotifyingStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.listeners: list[Callable[[str], None]] = []

        async def listen(self, callback: Callable[[str], None]) -> None:
            self.listeners.append(callback)

        async def unlisten(self, callback: Callable[[str], None]) -> None:
            self.listeners.remove(callback)

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            results = await super().write(ops)
            if any(isinstance(op, Create) and op.record.kind is Kind.EXTERNAL for op in ops):
                # Settled elsewhere right after this create, notified at once.
                await super().write([Settle("approval", State.RESOLVED, b'"yes"', 0.0)])
                for listener in self.listeners:
                    listener("approval")
            return results

    resonate = Resonate(NotifyingStore(), poll_seconds=3600)  # no poll comes to the rescue

    @resonate.register
    async def approval(ctx: Context) -> str:
        return str(await ctx.promise(id="approval"))

    async with resonate:
        assert await asyncio.wait_for(resonate.run("a", approval).result(), 10) == "yes"
