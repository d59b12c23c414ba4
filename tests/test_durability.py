"""Timers, timeouts, external promises, recorded values, retries and cancellation.

Every time-based test runs on the virtual clock: no test waits in wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import (
    CanceledError,
    Command,
    Context,
    JSONEncoder,
    Kind,
    MemoryStore,
    PromiseTimeoutError,
    Resonate,
    ShutdownError,
    State,
    StoreError,
)
from resonate_async._leases import _CLAIM_CHUNK
from resonate_async.retry import constant, exponential, never
from resonate_async.stores import Create, PromiseRecord, Settle
from resonate_async.testing import VirtualClock, crash, quiesce

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

    from resonate_async.stores._base import Op


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def make(clock: VirtualClock, store: MemoryStore | None = None) -> Resonate:
    return Resonate(store or MemoryStore(), clock=clock)


async def test_durable_sleep_wakes_after_its_time() -> None:
    clock = VirtualClock()
    resonate = make(clock)

    @resonate.register(name="nap")
    async def nap(ctx: Context) -> str:
        await ctx.sleep(60)
        return "awake"

    async with resonate:
        handle = resonate.run("nap", "nap")
        await clock.advance(59)
        assert not handle.done()
        await clock.advance(1)
        assert await handle == "awake"
        sleep = await resonate.promises.get("nap.1")
        assert sleep is not None and sleep.kind is Kind.SLEEP and sleep.state is State.RESOLVED


async def test_a_run_resumed_after_a_crash_sleeps_only_what_remains() -> None:
    clock = VirtualClock()
    store = MemoryStore()

    def build() -> Resonate:
        resonate = make(clock, store)

        @resonate.register(name="remind")
        async def remind(ctx: Context) -> float:
            await ctx.sleep(100)
            return await ctx.now()

        return resonate

    first = build()
    await first.start()
    started = clock.now()
    first.run("remind", "remind")
    await clock.advance(40)
    await crash(first)

    async with build() as second:
        handle = second.get("remind")
        await clock.advance(59)
        assert not handle.done()
        await clock.advance(1)
        assert await handle == started + 100


async def test_step_timeout_rejects_as_timed_out() -> None:
    clock = VirtualClock(autojump=True)
    resonate = make(clock)

    async def slow(ctx: Context) -> str:
        await clock.sleep(10)
        return "late"

    @resonate.register(name="impatient")
    async def impatient(ctx: Context) -> str:
        try:
            return await ctx.lfc(slow).with_options(timeout=5)
        except PromiseTimeoutError:
            return "timed out"

    async with resonate:
        assert await resonate.run("i", "impatient") == "timed out"
        step = await resonate.promises.get("i.1")
        assert step is not None and step.state is State.REJECTED_TIMEDOUT


async def test_run_timeout_rejects_the_run() -> None:
    clock = VirtualClock(autojump=True)
    resonate = make(clock)

    @resonate.register(name="forever", timeout=30)
    async def forever(ctx: Context) -> None:
        await ctx.sleep(3600)

    async with resonate:
        with pytest.raises(PromiseTimeoutError):
            await resonate.run("f", "forever")
        root = await resonate.promises.get("f")
        assert root is not None and root.state is State.REJECTED_TIMEDOUT


async def test_external_promise_resumes_the_workflow_and_settles_once() -> None:
    clock = VirtualClock()
    resonate = make(clock)

    @resonate.register(name="approve")
    async def approve(ctx: Context, amount: int) -> str:
        decision = await ctx.promise(id=f"approval-{ctx.id}")
        return f"{amount}:{decision}"

    async with resonate:
        handle = resonate.run("order-1", "approve", 50)
        while await resonate.promises.get("approval-order-1") is None:
            await asyncio.sleep(0)
        first = await resonate.promises.resolve("approval-order-1", "yes")
        second = await resonate.promises.resolve("approval-order-1", "no")
        assert first.state is State.RESOLVED
        assert second.value == first.value  # the first outcome stands
        assert await handle == "50:yes"


async def test_an_external_promise_id_created_before_is_shared_by_the_runs_waiting() -> None:
    resonate = make(VirtualClock())

    @resonate.register(name="wait")
    async def wait(ctx: Context, n: int) -> str:
        return f"{n}:{await ctx.promise(id='approval-7')}"

    async with resonate:
        await resonate.promises.create("approval-7")  # by the system that approves
        first, second = resonate.run("w1", "wait", 1), resonate.run("w2", "wait", 2)
        await first.created()
        await second.created()
        await resonate.promises.resolve("approval-7", "ok")
        assert [await first, await second] == ["1:ok", "2:ok"]


async def test_external_promise_settled_by_another_process_is_seen_by_polling() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    resonate = Resonate(store, clock=clock, poll_seconds=2)

    @resonate.register(name="wait")
    async def wait(ctx: Context) -> str:
        value: str = await ctx.promise(id="ext")
        return value

    async with resonate:
        handle = resonate.run("w", "wait")
        while not await store.get_many(["ext"]):
            await asyncio.sleep(0)
        # Another process writes straight to the shared store: no in-process wake-up.
        from resonate_async import JSONEncoder
        from resonate_async.stores._base import Settle

        await store.write([Settle("ext", State.RESOLVED, JSONEncoder().encode("hi"), 0.0)])
        await clock.advance(1)
        assert not handle.done()
        await clock.advance(1)
        assert await handle == "hi"


async def test_external_promise_timeout() -> None:
    clock = VirtualClock(autojump=True)
    resonate = make(clock)

    @resonate.register(name="wait")
    async def wait(ctx: Context) -> str:
        value: str = await ctx.promise(timeout=60)
        return value

    async with resonate:
        with pytest.raises(PromiseTimeoutError):
            await resonate.run("w", "wait")
        record = await resonate.promises.get("w.1")
        assert record is not None and record.state is State.REJECTED_TIMEDOUT


async def test_recorded_values_replay_after_a_crash() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    gate = asyncio.Event()

    async def block(ctx: Context) -> None:
        await gate.wait()

    def build() -> Resonate:
        resonate = make(clock, store)

        @resonate.register(name="stamp")
        async def stamp(ctx: Context) -> tuple[float, float]:
            now = await ctx.now()
            r = await ctx.random()
            await ctx.lfc(block)
            return (now, r)

        return resonate

    first = build()
    await first.start()
    first.run("s", "stamp")
    while len(await store.get_many(["s.1", "s.2"])) < 2:
        await asyncio.sleep(0)
    stored = await store.get_many(["s.1", "s.2"])
    await crash(first)
    await clock.advance(1000)
    gate.set()
    async with build() as second:
        now, r = await second.get("s")
    enc = second._encoder
    assert (now, r) == (
        enc.decode(stored["s.1"].value or b""),
        enc.decode(stored["s.2"].value or b""),
    )


async def test_step_retries_honour_policy_and_non_retryable() -> None:
    clock = VirtualClock(autojump=True)
    resonate = make(clock)
    calls: list[str] = []

    async def flaky(ctx: Context, fail_times: int) -> int:
        calls.append(f"flaky{ctx.attempt}")
        if ctx.attempt <= fail_times:
            raise Flaky()
        return ctx.attempt

    async def fatal(ctx: Context) -> None:
        calls.append("fatal")
        raise Fatal()

    @resonate.register(name="wf")
    async def wf(ctx: Context) -> int:
        policy = exponential(delay=1, factor=2, max_delay=30, max_retries=5, non_retryable=(Fatal,))
        attempts = await ctx.lfc(flaky, 3).with_options(retry_policy=policy)
        with contextlib.suppress(Fatal):
            await ctx.lfc(fatal).with_options(retry_policy=policy)
        return attempts

    async with resonate:
        start = clock.now()
        assert await resonate.run("r", "wf") == 4
        assert clock.now() - start == pytest.approx(1 + 2 + 4)
        step = await resonate.promises.get("r.1")
        assert step is not None and step.attempt == 4
    assert calls == ["flaky1", "flaky2", "flaky3", "flaky4", "fatal"]


async def test_cancelling_a_run_settles_it_canceled() -> None:
    clock = VirtualClock()
    resonate = make(clock)

    @resonate.register(name="long")
    async def long(ctx: Context) -> None:
        await ctx.sleep(1000)

    async with resonate:
        handle = resonate.run("a", "long")
        await handle.created()
        await clock.advance(1)
        assert handle.cancel()
        with pytest.raises(CanceledError):
            await handle
        other = resonate.run("b", "long")
        await other.created()
        await resonate.promises.cancel("b")
        with pytest.raises(CanceledError):
            await other
        for id in ("a", "b"):
            record = await resonate.promises.get(id)
            assert record is not None and record.state is State.REJECTED_CANCELED
        with pytest.raises(CanceledError):  # the stored outcome, for anyone attaching later
            await resonate.run("a", "long")


@pytest.mark.parametrize("settle", ["resolve", "reject"])
async def test_a_run_settled_from_outside_stops_here(settle: str) -> None:
    clock = VirtualClock()
    resonate = make(clock)
    steps: list[int] = []

    async def step(ctx: Context, n: int) -> None:
        steps.append(n)

    @resonate.register(name="chain")
    async def chain(ctx: Context) -> str:
        for n in range(5):
            await ctx.lfc(step, n)
            await ctx.sleep(10)
        return "body"

    async with resonate:
        handle = resonate.run("chain-1", "chain")
        await handle.created()
        await clock.advance(15)  # step 0, its sleep, step 1, in its second sleep
        if settle == "resolve":
            await resonate.promises.resolve("chain-1", "outside")
            await quiesce()
            assert handle.done()  # not at the end of the body's sleeps
            assert await handle == "outside"
        else:
            await resonate.promises.reject("chain-1", "refused")
            await quiesce()
            assert handle.done()
            with pytest.raises(Exception, match="refused"):
                await handle
        await clock.advance(100)  # the body's sleeps would all have ended
        await quiesce()
        assert steps == [0, 1]  # no step after its outcome was decided
        record = await resonate.promises.get("chain-1")
        assert record is not None
        assert record.state is (State.RESOLVED if settle == "resolve" else State.REJECTED)


async def test_a_settle_whose_caller_stopped_waiting_still_stops_the_run() -> None:
    # A web request cancelling a run, cut by its client once the cancel is
    # queued: the cancel commits, so the run must stop and its handle answer.
    clock = VirtualClock()
    resonate = make(clock)

    @resonate.register(name="waits")
    async def waits(ctx: Context) -> None:
        await ctx.sleep(3600)

    async with resonate:
        handle = resonate.run("w", "waits")
        await handle.created()
        engine = resonate._engine
        assert engine is not None
        request = asyncio.create_task(resonate.promises.cancel("w"))
        while engine.writer.idle:  # until the cancel is queued
            await asyncio.sleep(0)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request  # the caller unwinds before the commit
        await quiesce()
        record = await resonate.promises.get("w")
        assert record is not None and record.state is State.REJECTED_CANCELED
        assert handle.done()
        with pytest.raises(CanceledError):
            await handle


@dataclass
class Job(Command[int]):
    n: int


async def test_options_are_checked() -> None:
    resonate = Resonate(MemoryStore())

    async def handler(ctx: Context, jobs: list[Job]) -> list[int]:
        return [j.n for j in jobs]

    resonate.register_command_handler(Job, handler)

    async def step(ctx: Context) -> None:
        return None

    @resonate.register(name="wf")
    async def wf(ctx: Context) -> str:
        with pytest.raises(RuntimeError, match="handler's retry_policy"):
            ctx.lfi(Job(1)).with_options(retry_policy=never())
        promise = ctx.lfi(step)
        await promise
        with pytest.raises(RuntimeError, match="before the call starts"):
            promise.with_options(timeout=1)
        return "checked"

    async with resonate:
        assert await resonate.run("o", "wf") == "checked"


async def test_blog_generator_workflow_runs_and_batches() -> None:
    """The blog's example, unchanged but for imports: generators and a plain def handler."""
    import sqlite3

    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, value INTEGER)")
    batches: list[int] = []
    resonate = Resonate(MemoryStore())

    @dataclass
    class InsertUser(Command):
        id: int

    def _batch_handler(_: Context, users: list[InsertUser]) -> None:
        for user in users:
            conn.execute("INSERT INTO users (value) VALUES (?)", (user.id,))
        conn.commit()
        batches.append(len(users))

    def create_user_batching(ctx: Context, u: int):  # type: ignore[no-untyped-def]
        p = yield ctx.lfi(InsertUser(u))
        yield p

    resonate.register(create_user_batching, retry_policy=never())
    resonate.register_command_handler(InsertUser, _batch_handler, retry_policy=never())

    async with resonate:
        promises = []
        for u in range(1000):
            p = resonate.run(f"insert-value-{u}", create_user_batching, u)
            promises.append(p)
        for p in promises:
            await p.result()
    (count,) = conn.execute("SELECT COUNT(*) FROM users").fetchone()
    conn.close()
    assert count == 1000
    assert sum(batches) == 1000 and len(batches) < 1000 // 10


async def test_constant_retry_of_whole_run_uses_clock() -> None:
    clock = VirtualClock(autojump=True)
    resonate = make(clock)

    @resonate.register(name="r", retry_policy=constant(delay=5, max_retries=1))
    async def r(ctx: Context) -> int:
        if ctx.attempt == 1:
            raise Flaky()
        return ctx.attempt

    async with resonate:
        start = clock.now()
        assert await resonate.run("x", "r") == 2
        assert clock.now() - start == pytest.approx(5)


class FailsOnce(MemoryStore):
    """A memory store whose first write of a create (or a settle) of ``id`` fails."""

    def __init__(self, op: type[Op], id: str, *, failed_releases: int = 0) -> None:
        super().__init__()
        self.failing: tuple[type[Op], str] | None = (op, id)
        self.failed_releases = failed_releases  # the store stays down a while

    async def release(self, owner: str, ids: Sequence[str]) -> None:
        if self.failed_releases:
            self.failed_releases -= 1
            raise OSError("still down")
        await super().release(owner, ids)

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        written = [(type(op), op.record.id if isinstance(op, Create) else op.id) for op in ops]
        if self.failing in written:
            self.failing = None
            raise OSError("disk full")
        return await super().write(ops)


# The step's row fails to commit (the body stops), or the run's settle does;
# the store may still be down at the next polls.
@pytest.mark.parametrize(
    ("op", "failing_id", "failed_releases"),
    [(Create, "s.1", 0), (Settle, "s", 0), (Create, "s.1", 3)],
    ids=["step", "settle", "store-down-for-three-polls"],
)
async def test_a_run_stopped_by_a_store_failure_is_resumed(
    op: type[Op], failing_id: str, failed_releases: int
) -> None:
    clock = VirtualClock(autojump=True)
    store = FailsOnce(op, failing_id, failed_releases=failed_releases)
    resonate = Resonate(store, clock=clock, lease_seconds=10, poll_seconds=1)
    steps: list[str] = []

    async def step(ctx: Context) -> int:
        steps.append(ctx.id)
        return 7

    @resonate.register
    async def flow(ctx: Context) -> int:
        return await ctx.lfc(step)

    async with resonate:
        with pytest.raises(StoreError, match="disk full"):
            await resonate.run("s", flow)
        start = clock.now()
        # Nobody calls run() again: the worker frees its own lease and its
        # next claim resumes the run, long before the lease would expire.
        assert await asyncio.wait_for(resonate.get("s").result(), 10) == 7
        assert clock.now() - start < 10
        assert await resonate.run("s", flow) == 7
    # The step's row was lost with the failure, or it was stored and replayed.
    assert steps == (["s.1", "s.1"] if failing_id == "s.1" else ["s.1"])


# The same failure inside an asyncio.TaskGroup reaches the body as an
# ExceptionGroup: it must still leave the run (or step) PENDING, not settle it
# as the body's own failure for good.
@pytest.mark.parametrize("where", ["run", "step"])
async def test_a_store_failure_in_a_task_group_leaves_the_call_pending(where: str) -> None:
    clock = VirtualClock(autojump=True)
    failing_id = "t.2" if where == "run" else "t.1.2"
    store = FailsOnce(Create, failing_id)
    # never() everywhere: a failure the body made would be final at once.
    resonate = Resonate(
        store, clock=clock, lease_seconds=10, poll_seconds=1, step_retry_policy=never()
    )
    squared: list[int] = []

    async def square(ctx: Context, x: int) -> int:
        squared.append(x)
        return x * x

    async def both(ctx: Context) -> int:
        async with asyncio.TaskGroup() as group:
            first = group.create_task(_awaited(ctx.lfc(square, 2)))
            await asyncio.sleep(0)  # the first call's row goes in a transaction of its own
            second = group.create_task(_awaited(ctx.lfc(square, 3)))
        return first.result() + second.result()

    async def outer(ctx: Context) -> int:
        return await ctx.lfc(both)

    resonate.register(both, retry_policy=never())
    resonate.register(outer, retry_policy=never())
    flow = both if where == "run" else outer

    async with resonate:
        with pytest.raises(StoreError, match="disk full"):
            await resonate.run("t", flow)
        assert (await store.get_many(["t"]))["t"].state is State.PENDING
        assert await asyncio.wait_for(resonate.get("t").result(), 10) == 13
    # The committed child is replayed; the one whose row was lost runs again.
    assert squared == [2, 3, 3]


async def test_a_task_group_failure_of_the_body_settles_the_run() -> None:
    store = MemoryStore()
    resonate = Resonate(store, step_retry_policy=never())

    async def boom(ctx: Context) -> int:
        raise Flaky("no")

    @resonate.register(retry_policy=never())
    async def grouped(ctx: Context) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(_awaited(ctx.lfc(boom)))

    async with resonate:
        with pytest.raises(Exception, match="unhandled errors in a TaskGroup"):
            await resonate.run("f", grouped)
        assert (await store.get_many(["f"]))["f"].state is State.REJECTED


@dataclass
class Double(Command[int]):
    x: int


# A body that catches everything would otherwise settle its run with a value
# that rests on a call whose row was never written.
@pytest.mark.parametrize("call", ["step", "command"])
async def test_a_store_failure_the_body_catches_still_leaves_the_run_pending(call: str) -> None:
    clock = VirtualClock(autojump=True)
    store = FailsOnce(Create, "c.1")
    resonate = Resonate(store, clock=clock, lease_seconds=10, poll_seconds=1)
    calls: list[int] = []

    async def double(ctx: Context, x: int) -> int:
        calls.append(x)
        return 2 * x

    async def double_all(ctx: Context, commands: list[Double]) -> list[int]:
        calls.extend(c.x for c in commands)
        return [2 * c.x for c in commands]

    resonate.register_command_handler(Double, double_all, retry_policy=never())

    @resonate.register(retry_policy=never())
    async def careless(ctx: Context) -> int:
        try:
            return await (ctx.lfc(double, 21) if call == "step" else ctx.lfc(Double(21)))
        except Exception:
            return -1  # "log and carry on"

    async with resonate:
        with pytest.raises(StoreError, match="disk full") as caught:
            await resonate.run("c", careless)
        assert isinstance(caught.value.__cause__, OSError)  # the driver's error, as documented
        assert (await store.get_many(["c"]))["c"].state is State.PENDING
        assert await asyncio.wait_for(resonate.get("c").result(), 10) == 42
    assert calls == [21, 21]  # its row was lost: the call ran again on resume


async def test_a_store_failure_writing_a_command_timeout_leaves_the_run_pending() -> None:
    clock = VirtualClock(autojump=True)
    store = FailsOnce(Create, "c.1")  # the timeout's row, written first
    resonate = Resonate(store, clock=clock, lease_seconds=10, poll_seconds=1)

    async def slow(ctx: Context, commands: list[Double]) -> list[int]:
        await clock.sleep(50)
        return [2 * c.x for c in commands]

    resonate.register_command_handler(Double, slow, retry_policy=never())

    @resonate.register(retry_policy=never())
    async def careless(ctx: Context) -> int:
        try:
            return await ctx.lfc(Double(21)).with_options(timeout=10)
        except StoreError:
            return -1
        except PromiseTimeoutError:
            return -2

    async with resonate:
        with pytest.raises(StoreError, match="disk full"):
            await resonate.run("c", careless)
        assert (await store.get_many(["c"]))["c"].state is State.PENDING
        # Resumed: this time the timeout's row is written, and is the outcome.
        assert await asyncio.wait_for(resonate.get("c").result(), 10) == -2


async def _awaited(call: Awaitable[int]) -> int:
    return await call


async def test_a_run_the_store_keeps_failing_is_resumed_ever_less_often() -> None:
    class FullDisk(MemoryStore):
        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            if any(isinstance(op, Create) and op.record.id == "s.1" for op in ops):
                raise OSError("disk full")
            return await super().write(ops)

    clock = VirtualClock()
    resonate = Resonate(FullDisk(), clock=clock, lease_seconds=10, poll_seconds=1)
    attempts: list[float] = []

    async def step(ctx: Context) -> int:
        attempts.append(clock.now() - start)
        return 7

    @resonate.register
    async def flow(ctx: Context) -> int:
        return await ctx.lfc(step)

    start = clock.now()
    async with resonate:
        with pytest.raises(StoreError, match="disk full"):
            await resonate.run("s", flow)
        for _ in range(120):  # two virtual minutes, a second at a time
            await clock.advance(1)
    # Resumed after 1, 2, 4, 8, 16, 32 s (each at the next poll): not 120 times.
    assert len(attempts) == 7
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))


async def test_a_root_create_whose_answer_was_lost_is_resumed() -> None:
    class LostAnswer(MemoryStore):
        lose = True

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            results = await super().write(ops)
            if self.lose and any(isinstance(op, Create) and op.record.id == "r" for op in ops):
                self.lose = False
                raise OSError("connection lost after the commit")
            return results

    clock = VirtualClock(autojump=True)
    resonate = Resonate(LostAnswer(), clock=clock, lease_seconds=10, poll_seconds=1)
    ran: list[str] = []

    @resonate.register
    async def flow(ctx: Context) -> int:
        ran.append(ctx.id)
        return 5

    async with resonate:
        with pytest.raises(StoreError, match="connection lost"):
            await resonate.run("r", flow)
        # The root was committed under this worker's lease: it is resumed,
        # before the lease (which the heartbeat renews) could expire.
        start = clock.now()
        assert await asyncio.wait_for(resonate.get("r").result(), 10) == 5
        assert clock.now() - start < 10
    assert ran == ["r"]


async def test_a_handle_whose_run_call_resumed_the_run_here_cancels_it() -> None:
    store = FailsOnce(Create, "c.1")
    resonate = Resonate(store, poll_seconds=60)  # no claim poll during the test
    gate = asyncio.Event()

    async def step(ctx: Context) -> int:
        await gate.wait()
        return 1

    @resonate.register
    async def flow(ctx: Context) -> int:
        return await ctx.lfc(step)

    async with resonate:
        first = resonate.run("c", flow)
        gate.set()
        with pytest.raises(StoreError):
            await first
        gate.clear()
        again = resonate.run("c", flow)  # the stored PENDING run is taken over here
        engine = resonate._engine
        assert engine is not None
        while engine.runs.get("c") in (None, again):  # until the claimed run executes
            await asyncio.sleep(0)
        assert again.cancel()
        with pytest.raises(CanceledError):
            await again
        stored = await resonate.promises.get("c")
        assert stored is not None and stored.state is State.REJECTED_CANCELED


async def test_run_of_a_store_failed_run_waits_for_the_claim_loops_release(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class SlowRelease(FailsOnce):
        gate: asyncio.Event | None = None

        async def release(self, owner: str, ids: Sequence[str]) -> None:
            if self.gate is not None:
                await self.gate.wait()
            await super().release(owner, ids)

    clock = VirtualClock()
    store = SlowRelease(Create, "s.1")
    resonate = Resonate(store, clock=clock, lease_seconds=10, poll_seconds=1)
    running: list[int] = []
    overlapped: list[int] = []

    async def step(ctx: Context) -> int:
        running.append(1)
        overlapped.append(len(running))
        await asyncio.sleep(0)
        running.pop()
        return 7

    @resonate.register
    async def flow(ctx: Context) -> int:
        return await ctx.lfc(step)

    async with resonate:
        with pytest.raises(StoreError):
            await resonate.run("s", flow)
        store.gate = asyncio.Event()
        await clock.advance(1)  # the claim loop frees the lease, and waits in release
        handle = resonate.run("s", flow)  # takes the run over: waits for the claim loop
        await quiesce()
        store.gate.set()
        assert await handle == 7
        await clock.advance(5)
    assert overlapped == [1, 1]  # the failed attempt, then one resume
    assert "claiming pending runs failed" not in caplog.text


async def test_store_failures_are_forgotten_once_they_are_old() -> None:
    class Down(MemoryStore):
        down = True

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            if self.down:
                raise OSError("the database is down")
            return await super().write(ops)

    clock = VirtualClock()
    store = Down()
    resonate = Resonate(store, clock=clock, lease_seconds=10, poll_seconds=1)

    @resonate.register
    async def flow(ctx: Context) -> int:
        return 1

    async with resonate:
        handles = [resonate.run(f"r{i}", flow) for i in range(50)]
        for handle in handles:
            with pytest.raises(StoreError):
                await handle
        engine = resonate._engine
        assert engine is not None and len(engine.store_failures) == 50
        store.down = False
        await clock.advance(1_200)  # none of those roots was stored: nothing to resume
        assert engine.store_failures == {} and engine.store_failed == {}


async def test_resolving_a_promise_past_its_timeout_records_the_timeout() -> None:
    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)

    @resonate.register
    async def waiting(ctx: Context) -> str:
        try:
            return str(await ctx.promise(id="late"))
        except PromiseTimeoutError:
            return "timed out"

    async with resonate:
        await resonate.promises.create("late", timeout=5)
        await resonate.promises.create("early", timeout=5)
        await clock.advance(10)
        seen = await resonate.promises.get("late")
        assert seen is not None and seen.state is State.REJECTED_TIMEDOUT
        # What every reader saw is what is recorded, not the late value.
        resolved = await resonate.promises.resolve("late", 42)
        assert resolved.state is State.REJECTED_TIMEDOUT
        assert await resonate.run("w", waiting) == "timed out"
        canceled = await resonate.promises.cancel("early")
        assert canceled.state is State.REJECTED_TIMEDOUT


@pytest.mark.parametrize("call", ["sleep", "promise"])
async def test_a_call_that_came_due_while_the_process_was_down_is_settled_on_resume(
    call: str,
) -> None:
    store, clock = MemoryStore(), VirtualClock()

    def build() -> Resonate:
        resonate = Resonate(store, clock=clock, worker_id="w")

        @resonate.register(name="waits")
        async def waits(ctx: Context) -> str:
            if call == "sleep":
                await ctx.sleep(60)
                return "woke"
            try:
                return str(await ctx.promise(timeout=60))
            except PromiseTimeoutError:
                return "timed out"

        return resonate

    first = build()
    await first.start()
    first.run("d", "waits")
    await clock.advance(1)
    await crash(first)  # down for longer than the call had
    await clock.advance(120)
    async with build() as second:
        assert await asyncio.wait_for(second.get("d").result(), 10) == (
            "woke" if call == "sleep" else "timed out"
        )
    child = (await store.get_many(["d.1"]))["d.1"]
    expected = State.RESOLVED if call == "sleep" else State.REJECTED_TIMEDOUT
    assert child.state is expected  # not left PENDING under a settled run


async def test_a_run_resumed_after_its_deadline_runs_no_further_step() -> None:
    # Its stored root reads REJECTED_TIMEDOUT already (a get() says so): the
    # recovered run settles that way without executing its next step.
    store, clock = MemoryStore(), VirtualClock()
    effects: list[str] = []

    def build() -> Resonate:
        resonate = Resonate(store, clock=clock, worker_id="w")

        async def effect(ctx: Context, tag: str) -> str:
            effects.append(tag)
            return tag

        @resonate.register(name="timed", timeout=100)
        async def timed(ctx: Context) -> str:
            await ctx.lfc(effect, "before")
            await ctx.sleep(50)
            await ctx.lfc(effect, "after")
            return "done"

        return resonate

    first = build()
    await first.start()
    first.run("late", "timed")
    await clock.advance(10)
    await crash(first)
    await clock.advance(140)  # back up past the run's deadline
    async with build() as second:
        handle = second.get("late")
        await clock.advance(10)
        with pytest.raises(PromiseTimeoutError):
            await asyncio.wait_for(handle.result(), 10)
    assert effects == ["before"]
    rows = await store.get_many(["late", "late.2"])
    assert rows["late"].state is State.REJECTED_TIMEDOUT
    assert rows["late.2"].state is State.RESOLVED  # its sleep, due since: not left PENDING


async def test_a_sleep_a_timed_out_step_was_in_is_settled_canceled() -> None:
    clock = VirtualClock(autojump=True)
    store = MemoryStore()
    resonate = Resonate(store, clock=clock)

    async def napping(ctx: Context) -> None:
        await ctx.sleep(3600)

    @resonate.register(name="impatient")
    async def impatient(ctx: Context) -> str:
        try:
            await ctx.lfc(napping).with_options(timeout=30, retry_policy=never())
        except PromiseTimeoutError:
            return "gave up"
        return "slept"

    async with resonate:
        assert await resonate.run("i", "impatient") == "gave up"
    rows = await store.get_many(["i", "i.1", "i.1.1"])
    assert rows["i"].state is State.RESOLVED
    assert rows["i.1"].state is State.REJECTED_TIMEDOUT
    assert rows["i.1.1"].state is State.REJECTED_CANCELED  # not PENDING under a settled step


@pytest.mark.parametrize("how", ["timeout", "cancel"])
async def test_a_sleep_a_run_was_stopped_in_is_settled_canceled(how: str) -> None:
    # Not left PENDING for good under the settled run.
    clock = VirtualClock(autojump=how == "timeout")
    store = MemoryStore()
    resonate = Resonate(store, clock=clock)

    @resonate.register(name="naps", timeout=30 if how == "timeout" else None)
    async def naps(ctx: Context) -> None:
        await ctx.sleep(3600)

    async with resonate:
        handle = resonate.run("n", "naps")
        if how == "cancel":
            while not await store.get_many(["n.1"]):
                await asyncio.sleep(0)
            assert handle.cancel()
        with pytest.raises(PromiseTimeoutError if how == "timeout" else CanceledError):
            await handle
    rows = await store.get_many(["n", "n.1"])
    expected = State.REJECTED_TIMEDOUT if how == "timeout" else State.REJECTED_CANCELED
    assert rows["n"].state is expected
    assert rows["n.1"].state is State.REJECTED_CANCELED


async def test_a_settle_notice_read_while_the_store_fails_is_dropped_quietly() -> None:
    # A NOTIFY wakes waiters by reading the row; a store failure then left a
    # task whose exception nobody retrieved. Its waiters poll the store anyway.
    from resonate_async.errors import StoreError

    class Down(MemoryStore):
        async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
            raise StoreError("connection lost")

    resonate = Resonate(Down())
    async with resonate:
        engine = resonate._engine
        assert engine is not None
        await engine._refresh("some-id")  # no error escapes


async def test_a_timed_out_run_leaves_the_sleeps_of_other_runs_alone() -> None:
    # Their ids extend its id (a remote call's, a run named "<id>.x"), but
    # they are other runs' sleeps, still running.
    clock = VirtualClock(autojump=True)
    store = MemoryStore()
    resonate = Resonate(store, clock=clock)

    @resonate.register(name="napper")
    async def napper(ctx: Context) -> str:
        await ctx.sleep(100)
        return "rested"

    @resonate.register(name="timed", timeout=30)
    async def timed(ctx: Context) -> None:
        await ctx.sleep(3600)

    async with resonate:
        other = resonate.run("t.x", "napper")
        await other.created()
        with pytest.raises(PromiseTimeoutError):
            await resonate.run("t", "timed")
        assert (await store.get_many(["t.1"]))["t.1"].state is State.REJECTED_CANCELED
        assert (await store.get_many(["t.x.1"]))["t.x.1"].state is not State.REJECTED_CANCELED
        assert await other == "rested"


async def test_a_claim_answered_after_shutdown_began_starts_no_run() -> None:
    # The claim loop was inside claim() as aclose() began: what it claimed is
    # released for the next start, not started (its body would outlive aclose).
    class HeldClaims(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.hold = False
            self.entered = asyncio.Event()
            self.gate = asyncio.Event()

        async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
            if self.hold:
                self.entered.set()
                await self.gate.wait()
            return await super().claim(owner, **kwargs)

    store = HeldClaims()
    resonate = Resonate(store, poll_seconds=0.01)
    started: list[str] = []

    @resonate.register(name="orphan")
    async def orphan(ctx: Context) -> str:
        started.append(ctx.id)
        return "x"

    await resonate.start()
    store.hold = True
    # A run another process left PENDING and free.
    await store.write(
        [Create(PromiseRecord("o", State.PENDING, Kind.RUN, "o", 0.0, "orphan", 1, b"[[],{}]"))]
    )
    await store.entered.wait()
    closing = asyncio.create_task(resonate.aclose())
    await asyncio.sleep(0)  # shutdown has begun
    store.gate.set()
    await closing
    assert started == []
    stored = (await store.get_many(["o"]))["o"]
    assert stored.state is State.PENDING and stored.owner is None  # free for the next start


@dataclass
class Widget:
    n: int


async def test_a_run_whose_arguments_do_not_decode_here_is_left_to_a_worker_that_can(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Worker a cannot decode a Widget (it never registered the name); b can.
    store = MemoryStore()
    clock = VirtualClock()
    made: list[str] = []

    def worker(name: str, *, knows_widgets: bool) -> Resonate:
        encoder = JSONEncoder()
        if knows_widgets:
            encoder.register_type("Widget", Widget)
        resonate = Resonate(store, clock=clock, worker_id=name, encoder=encoder)

        @resonate.register(name="build")
        async def build(ctx: Context, widget: Widget) -> int:
            made.append(name)
            return widget.n

        return resonate

    left = PromiseRecord("w", State.PENDING, Kind.RUN, "w", 0.0, "build", 1)
    await store.write([Create(replace(left, param=b'[[{"$":"Widget","n":7}],{}]'))])
    with caplog.at_level(logging.DEBUG, "resonate_async"):
        async with worker("a", knows_widgets=False):
            await clock.advance(5)  # it claims it at start and at each poll
            assert (await store.get_many(["w"]))["w"].owner is None  # never kept
            async with worker("b", knows_widgets=True) as b:
                assert await asyncio.wait_for(b.get("w").result(), 10) == 7
    assert made == ["b"]
    said = [r for r in caplog.records if "do not decode here" in r.getMessage()]
    assert [r.levelno for r in said][:2] == [logging.ERROR, logging.DEBUG]  # said once


async def test_a_store_busy_at_start_does_not_fail_it_and_its_runs_resume_later() -> None:
    # Another process holds a SQLite file's lock past busy_timeout (a backup,
    # a VACUUM): start() must not fail (a supervisor would crash-loop it).
    class BusyAtFirst(MemoryStore):
        busy = True

        async def claim(self, owner: str, **kwargs: Any) -> list[PromiseRecord]:
            if self.busy:
                self.busy = False
                raise StoreError("database is locked")
            return await super().claim(owner, **kwargs)

    store = BusyAtFirst()
    clock = VirtualClock()
    left = PromiseRecord("o", State.PENDING, Kind.RUN, "o", 0.0, "orphan", 1, b"[[],{}]")
    await store.write([Create(left)])
    resonate = Resonate(store, clock=clock)

    @resonate.register(name="orphan")
    async def orphan(ctx: Context) -> str:
        return "resumed"

    async with resonate:  # start() does not raise
        await clock.advance(1)  # the first poll claims it
        assert await asyncio.wait_for(resonate.get("o").result(), 10) == "resumed"


async def test_a_claim_chunk_of_runs_that_do_not_decode_here_holds_back_nothing() -> None:
    # The oldest claimable runs (a whole chunk of them) do not decode here:
    # start() returns, and a newer run is resumed all the same.
    store = MemoryStore()
    clock = VirtualClock()
    bad = b'[[{"$":"Widget","n":1}],{}]'  # no Widget registered here
    await store.write(
        [
            Create(
                replace(
                    PromiseRecord(f"w{i}", State.PENDING, Kind.RUN, f"w{i}", 0.0, "build", 1),
                    param=bad,
                )
            )
            for i in range(_CLAIM_CHUNK)
        ]
    )
    good = PromiseRecord("good", State.PENDING, Kind.RUN, "good", 1.0, "build", 1, b"[[7],{}]")
    await store.write([Create(good)])
    resonate = Resonate(store, clock=clock)

    @resonate.register(name="build")
    async def build(ctx: Context, widget: Any) -> Any:
        return widget

    async with resonate:  # held for a back-off, so the next claim takes the newer run
        assert await asyncio.wait_for(resonate.get("good").result(), 10) == 7
        await clock.advance(5)  # then freed, taken again, and left free for a poll
        assert (await store.get_many(["w0"]))["w0"].owner is None


async def test_promises_search_filters_by_the_state_a_reader_sees() -> None:
    clock = VirtualClock()
    resonate = Resonate(MemoryStore(), clock=clock)
    async with resonate:
        await resonate.promises.create("approval-1", timeout=60)
        await resonate.promises.create("approval-2", timeout=600)
        await clock.advance(120)
        pending = await resonate.promises.search(state="pending")
        assert [r.id for r in pending] == ["approval-2"]
        timed_out = await resonate.promises.search(state="rejected_timedout")
        assert [(r.id, r.state) for r in timed_out] == [("approval-1", State.REJECTED_TIMEDOUT)]


@pytest.mark.parametrize("napper", ["run", "remote call"])
async def test_a_run_a_reader_times_out_leaves_no_sleep_pending(napper: str) -> None:
    # Its process died mid-sleep; past its deadline a process that does not
    # register its function reads it: the run reads timed out, and so must
    # the sleep it was in settle, as the run's own timeout would have.
    store, clock = MemoryStore(), VirtualClock()
    first = Resonate(store, clock=clock, worker_id="a")

    @first.register(name="naps", timeout=100)
    async def naps(ctx: Context) -> None:
        await ctx.sleep(1000)

    @first.register(name="parent")
    async def parent(ctx: Context) -> None:
        await ctx.rfc("naps")

    await first.start()
    if napper == "run":
        first.run("y", "naps")
        napping = "y"
    else:
        first.run("p", "parent")
        napping = "p.1"
    await clock.advance(30)
    await crash(first)
    await clock.advance(470)
    async with Resonate(store, clock=clock, worker_id="b") as reader:
        with pytest.raises(PromiseTimeoutError):
            await reader.get(napping)
        await quiesce()
    rows = await store.get_many([napping, f"{napping}.1"])
    assert rows[napping].state is State.REJECTED_TIMEDOUT
    assert rows[f"{napping}.1"].state is State.REJECTED_CANCELED


class _GatedStore(MemoryStore):
    """A store whose writes wait for a gate: a database locked elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        await self.gate.wait()
        return await super().write(ops)


async def test_a_promises_create_whose_caller_is_cancelled_unwinds_before_the_commit() -> None:
    store = _GatedStore()
    async with Resonate(store) as resonate:
        engine = resonate._engine
        assert engine is not None
        store.gate.clear()
        request = asyncio.create_task(resonate.promises.create("approval-9"))
        while engine.writer.idle:  # until the create is queued
            await asyncio.sleep(0)
        request.cancel()
        await quiesce()
        assert request.cancelled()  # not held until the store answers
        store.gate.set()
        await quiesce()
        record = await resonate.promises.get("approval-9")
        assert record is not None and record.state is State.PENDING  # the write went on


async def test_aclose_is_bounded_when_the_store_hangs_under_a_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A run cancelled by the shutdown while its step's write waits for a
    # store that never answers: aclose() stops the writer under it instead
    # of waiting for the commit for ever.
    monkeypatch.setattr("resonate_async._engine._CANCEL_SECONDS", 0.05)
    store = _GatedStore()
    resonate = Resonate(store, grace_seconds=0.05)

    async def step(ctx: Context) -> int:
        store.gate.clear()  # its own write will hang
        return 1

    @resonate.register(name="w")
    async def w(ctx: Context) -> int:
        return await ctx.lfc(step) + 1

    await resonate.start()
    handle = resonate.run("hung", "w")
    engine = resonate._engine
    assert engine is not None
    while store.gate.is_set():
        await asyncio.sleep(0)
    await quiesce()  # the step's write is with the store, which holds it
    queued = resonate.run("queued", "w")  # its root's write waits behind that one
    await quiesce()
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(resonate.aclose(), 10)
    assert "still wait for the store" in caplog.text
    with pytest.raises(ShutdownError):
        await handle
    with pytest.raises(ShutdownError, match="before this was written"):
        await asyncio.wait_for(queued.result(), 1)  # answered, not left waiting
    store.gate.set()
    rows = await store.get_many(["hung", "hung.1"])
    assert rows["hung"].state is State.PENDING and "hung.1" not in rows  # resumes at next start
