"""The batcher: batch sizes, result mapping, failures, backpressure, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resonate_async import (
    BatchResultError,
    CanceledError,
    Command,
    Context,
    EncodingError,
    MemoryStore,
    PromiseTimeoutError,
    Resonate,
    State,
    _engine,
)
from resonate_async.retry import constant, never
from resonate_async.stores import Create, Kind
from resonate_async.testing import VirtualClock, crash

if TYPE_CHECKING:
    from collections.abc import Sequence

    from resonate_async.stores import PromiseRecord
    from resonate_async.stores._base import Op


@dataclass
class Add(Command[int]):
    n: int


class Poison(Exception):
    pass


def setup(
    handler: Any, clock: VirtualClock | None = None, **options: Any
) -> tuple[Resonate, list[list[int]]]:
    resonate = Resonate(MemoryStore(), clock=clock)
    calls: list[list[int]] = []

    async def recording(ctx: Context, cmds: list[Add]) -> Any:
        calls.append([c.n for c in cmds])
        return await handler(ctx, cmds)

    options.setdefault("retry_policy", never())
    resonate.register_command_handler(Add, recording, **options)

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return await ctx.lfc(Add(n))

    return resonate, calls


async def doubled(ctx: Context, cmds: list[Add]) -> list[int]:
    return [c.n * 2 for c in cmds]


async def test_batches_grow_with_the_backlog_and_every_command_gets_its_result() -> None:
    resonate, calls = setup(doubled)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(2000)]
        assert await asyncio.gather(*handles) == [i * 2 for i in range(2000)]
    assert sum(len(c) for c in calls) == 2000
    assert len(calls) < 20  # far fewer batches than commands
    assert max(len(c) for c in calls) >= 500


async def test_maxlen_is_never_exceeded() -> None:
    resonate, calls = setup(doubled, maxlen=64)
    async with resonate:
        await asyncio.gather(*(resonate.run(f"w{i}", "wf", i) for i in range(1000)))
    assert max(len(c) for c in calls) == 64
    assert sum(len(c) for c in calls) == 1000


async def test_a_lone_command_dispatches_without_waiting() -> None:
    clock = VirtualClock()
    resonate, calls = setup(doubled, clock=clock)  # max_wait defaults to 0
    async with resonate:
        handle = resonate.run("lone", "wf", 21)
        start = clock.now()
        assert await handle == 42  # the clock never moved, so no timer was involved
        assert clock.now() == start
    assert calls == [[21]]


async def test_max_wait_lingers_for_a_fuller_batch() -> None:
    clock = VirtualClock()
    resonate, calls = setup(doubled, clock=clock, max_wait=0.5, maxlen=10)
    async with resonate:
        first = resonate.run("a", "wf", 1)
        await clock.advance(0.2)
        assert calls == []  # still lingering
        second = resonate.run("b", "wf", 2)
        await clock.advance(0.4)
        assert await first == 2 and await second == 4
        waits = resonate.stats().batchers["Add"].wait_seconds
        # One batch, whose oldest command waited the whole window.
        assert waits.n == 1 and waits.max == pytest.approx(0.5)
    assert calls == [[1, 2]]


async def test_a_command_timeout_rejects_it_while_its_handler_still_runs() -> None:
    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)
    release = asyncio.Event()
    handled: list[list[int]] = []

    async def slow(ctx: Context, cmds: list[Add]) -> list[int]:
        handled.append([c.n for c in cmds])
        await release.wait()
        return [c.n * 2 for c in cmds]

    resonate.register_command_handler(Add, slow, retry_policy=never())

    @resonate.register(name="bounded")
    async def bounded(ctx: Context, n: int, seconds: float) -> int | str:
        try:
            return await ctx.lfc(Add(n)).with_options(timeout=seconds)
        except PromiseTimeoutError as exc:
            return f"timed out: {exc}"

    async with resonate:
        start = clock.now()
        late = resonate.run("late", "bounded", 1, 0.5)
        patient = resonate.run("patient", "bounded", 2, 60.0)
        assert await late == "timed out: late.1 timed out after 0.5s"
        assert clock.now() - start == pytest.approx(0.5)
        release.set()
        assert await patient == 4  # done before its timeout: its timer is gone
        assert await resonate.run("quick", "bounded", 3, 5.0) == 6
        stored = await resonate.promises.get("late.1")
        assert stored is not None and stored.state is State.REJECTED_TIMEDOUT
        # The handler's late outcome for the timed-out command was not recorded.
        assert (
            await resonate.run("late", "bounded", 1, 0.5)
            == "timed out: late.1 timed out after 0.5s"
        )
    assert handled == [[1, 2], [3]]


async def test_exception_items_reject_only_their_command() -> None:
    async def handler(ctx: Context, cmds: list[Add]) -> list[object]:
        return [Poison(c.n) if c.n % 2 else c.n for c in cmds]

    resonate, _ = setup(handler)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(10)]
        results = await asyncio.gather(*handles, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, Poison) and result.args == (i,)
        else:
            assert result == i


async def test_a_single_value_goes_to_every_command() -> None:
    async def handler(ctx: Context, cmds: list[Add]) -> None:
        return None

    resonate, _ = setup(handler)
    async with resonate:
        assert (
            await asyncio.gather(*(resonate.run(f"w{i}", "wf", i) for i in range(5))) == [None] * 5
        )


async def test_wrong_length_rejects_every_command_of_that_batch_only() -> None:
    bad_batch = asyncio.Event()

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        if not bad_batch.is_set():
            bad_batch.set()
            return [1]  # wrong length for a batch of 3
        return [c.n for c in cmds]

    resonate, calls = setup(handler)
    async with resonate:
        first = [resonate.run(f"a{i}", "wf", i) for i in range(3)]
        results = await asyncio.gather(*first, return_exceptions=True)
        assert all(isinstance(r, BatchResultError) for r in results)
        assert "1 results for a batch of 3" in str(results[0])
        # the batcher keeps serving
        assert await resonate.run("after", "wf", 9) == 9
    assert calls == [[0, 1, 2], [9]]


async def test_a_failing_batch_is_retried_per_the_handler_policy() -> None:
    clock = VirtualClock(autojump=True)
    failures = [2]

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("database is locked")
        return [c.n for c in cmds]

    resonate, calls = setup(handler, clock=clock, retry_policy=constant(delay=1, max_retries=3))
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(4)]
        assert await asyncio.gather(*handles) == [0, 1, 2, 3]
    assert calls == [[0, 1, 2, 3]] * 3


async def test_poison_command_is_isolated_by_bisection() -> None:
    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        if any(c.n == 613 for c in cmds):
            raise Poison("613 is poison")
        return [c.n for c in cmds]

    resonate, calls = setup(handler)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(1000)]
        results = await asyncio.gather(*handles, return_exceptions=True)
    rejected = [i for i, r in enumerate(results) if isinstance(r, Poison)]
    assert rejected == [613]
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 999
    assert len(calls) <= 2 * 11 + 2  # bisection costs about 2 calls per level


async def test_a_handler_bug_does_not_kill_the_batcher() -> None:
    broken = [True]

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        if broken[0]:
            broken[0] = False
            raise KeyError("bug")
        return [c.n for c in cmds]

    resonate, _ = setup(handler)
    async with resonate:
        with pytest.raises(KeyError):
            await resonate.run("x", "wf", 1)
        assert await resonate.run("y", "wf", 2) == 2


async def test_plain_def_handler_runs_in_a_thread() -> None:
    resonate = Resonate(MemoryStore())
    seen: list[int] = []

    def handler(ctx: Context, cmds: list[Add]) -> None:
        seen.extend(c.n for c in cmds)

    resonate.register_command_handler(Add, handler, retry_policy=never())

    @resonate.register
    async def wf(ctx: Context, n: int) -> None:
        await ctx.lfc(Add(n))

    async with resonate:
        await asyncio.gather(*(resonate.run(f"w{i}", wf, i) for i in range(50)))
    assert sorted(seen) == list(range(50))


async def test_full_queue_applies_backpressure_and_nothing_is_lost() -> None:
    resonate, calls = setup(doubled, queue_size=8, maxlen=4)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(100)]
        assert await asyncio.gather(*handles) == [i * 2 for i in range(100)]
        assert resonate.stats().batchers["Add"].queue_depth == 0
    assert max(len(c) for c in calls) <= 4


async def test_a_command_cancelled_before_dispatch_leaves_the_queue() -> None:
    gate = asyncio.Event()

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        await gate.wait()
        return [c.n for c in cmds]

    resonate, calls = setup(handler)
    async with resonate:
        busy = resonate.run("busy", "wf", 0)
        while not calls:
            await asyncio.sleep(0)
        queued = resonate.run("queued", "wf", 1)
        await queued.created()
        await asyncio.sleep(0)
        assert queued.cancel()
        with pytest.raises(CanceledError):
            await queued
        gate.set()
        assert await busy == 0
    assert calls == [[0]]  # the cancelled command never reached the handler


async def test_shutdown_lets_the_batch_in_hand_finish_and_records_it_whole() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        entered.set()
        await release.wait()
        return [c.n for c in cmds]

    store = MemoryStore()
    resonate = Resonate(store, grace_seconds=5)
    resonate.register_command_handler(Add, handler, retry_policy=never())

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return await ctx.lfc(Add(n))

    await resonate.start()
    handles = [resonate.run(f"w{i}", "wf", i) for i in range(3)]
    await entered.wait()
    closing = asyncio.ensure_future(resonate.aclose())
    await asyncio.sleep(0)
    release.set()
    await closing
    commands = await store.get_many([f"w{i}.1" for i in range(3)])
    roots = await store.get_many([f"w{i}" for i in range(3)])
    # The batch finished and all of its commands were recorded, in one piece;
    # the runs themselves were interrupted and stay PENDING for the next start.
    assert sorted(commands) == ["w0.1", "w1.1", "w2.1"]
    assert all(r.state.value == "RESOLVED" for r in commands.values())
    assert all(r.state.value == "PENDING" for r in roots.values())
    for handle in handles:
        assert handle.done()


async def test_the_next_batch_runs_while_the_last_one_is_being_recorded() -> None:
    # The handler slot is free once a batch's handler returns: recording its
    # commands is the writer's business, and the next batch need not wait.
    calls: list[list[int]] = []
    first_in, first_go, second_in = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        calls.append([c.n for c in cmds])
        if len(calls) == 1:
            first_in.set()
            await first_go.wait()
        else:
            second_in.set()
        return [c.n for c in cmds]

    class SlowRecords(MemoryStore):
        """Holds every transaction that records a command until ``gate`` opens."""

        def __init__(self) -> None:
            super().__init__()
            self.gate, self.held = asyncio.Event(), asyncio.Event()

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            if any(isinstance(op, Create) and op.record.kind is Kind.COMMAND for op in ops):
                self.held.set()
                await self.gate.wait()
            return await super().write(ops)

    store = SlowRecords()
    resonate = Resonate(store)
    resonate.register_command_handler(Add, handler, retry_policy=never())

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return await ctx.lfc(Add(n))

    async with resonate:
        first = resonate.run("w1", "wf", 1)
        await first_in.wait()
        second = resonate.run("w2", "wf", 2)
        async with asyncio.timeout(5):
            while resonate.stats().batchers["Add"].queue_depth == 0:
                await asyncio.sleep(0.001)
        first_go.set()
        await store.held.wait()  # the first batch's records are being written
        async with asyncio.timeout(5):
            await second_in.wait()
        assert not first.done()
        store.gate.set()
        assert (await first, await second) == (1, 2)
    assert calls == [[1], [2]]


# -- a property over random workloads ------------------------------------------------


@dataclass
class Job(Command[int]):
    i: int
    n: int


_workloads = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.25, 1.0])),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(
    jobs=_workloads,
    maxlen=st.none() | st.integers(1, 5),
    concurrency=st.integers(1, 3),
    max_wait=st.sampled_from([0.0, 0.3]),
    handler_seconds=st.sampled_from([0.0, 0.2]),
    poison=st.sets(st.integers(0, 12), max_size=2),
    rejected=st.sets(st.integers(0, 12), max_size=2),
)
def test_every_command_is_handled_once_and_gets_its_own_outcome(
    jobs: list[tuple[int, float]],
    maxlen: int | None,
    concurrency: int,
    max_wait: float,
    handler_seconds: float,
    poison: set[int],
    rejected: set[int],
) -> None:
    # Commands arrive at random (virtual) times; the handler is slow or not,
    # fails whole batches that hold a poison value, and rejects single items.
    # Whatever the batch window makes of it: no batch exceeds maxlen, no more
    # handler calls run at once than `concurrency`, every command is in
    # exactly one handler call that returned (poison ones in none), and every
    # workflow gets the outcome of its own command.
    async def scenario() -> None:
        clock = VirtualClock()
        resonate = Resonate(MemoryStore(), clock=clock)
        calls: list[list[int]] = []
        returned: list[list[int]] = []
        running = peak = 0

        async def handler(ctx: Context, batch: list[Job]) -> list[object]:
            nonlocal running, peak
            calls.append([job.i for job in batch])
            running += 1
            peak = max(peak, running)
            try:
                if handler_seconds:
                    await clock.sleep(handler_seconds)
                if any(job.n in poison for job in batch):
                    raise Poison(f"a batch of {len(batch)} holds poison")
            finally:
                running -= 1
            returned.append([job.i for job in batch])
            return [ValueError(job.n) if job.n in rejected else job.n * 2 for job in batch]

        resonate.register_command_handler(
            Job,
            handler,
            maxlen=maxlen,
            concurrency=concurrency,
            max_wait=max_wait,
            retry_policy=never(),
        )

        @resonate.register(name="wf", retry_policy=never())
        async def wf(ctx: Context, i: int, n: int, delay: float) -> int:
            if delay:
                await ctx.sleep(delay)
            return await ctx.lfc(Job(i, n))

        async with resonate:
            handles = [resonate.run(f"w{i}", "wf", i, n, d) for i, (n, d) in enumerate(jobs)]
            gathered = asyncio.gather(*handles, return_exceptions=True)
            for _ in range(1000):
                if gathered.done():
                    break
                await clock.advance(0.05)
            results = await gathered

        for (n, _), result in zip(jobs, results, strict=True):
            if n in poison:
                assert isinstance(result, Poison)
            elif n in rejected:
                assert isinstance(result, ValueError) and result.args == (n,)
            else:
                assert result == 2 * n
        assert peak <= concurrency
        if maxlen is not None:
            assert max(len(c) for c in calls) <= maxlen
        handled = sorted(i for batch in returned for i in batch)
        assert handled == [i for i, (n, _) in enumerate(jobs) if n not in poison]

    asyncio.run(scenario())


async def test_a_result_that_cannot_be_encoded_names_the_handler() -> None:
    async def handler(ctx: Context, cmds: list[Add]) -> list[Any]:
        return [object() if c.n == 1 else c.n for c in cmds]

    resonate, _ = setup(handler)
    async with resonate:
        results = await asyncio.gather(
            *(resonate.run(f"e{i}", "wf", i) for i in range(3)), return_exceptions=True
        )
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], EncodingError)
    assert "the Add handler's result is not encodable: cannot encode" in str(results[1])


async def test_a_handler_that_sorts_its_list_in_place_answers_the_right_commands() -> None:
    async def sorting(ctx: Context, cmds: list[Add]) -> list[int]:
        cmds.sort(key=lambda c: -c.n)  # results follow the list as the handler left it
        return [c.n * 10 for c in cmds]

    resonate, _ = setup(sorting)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(50)]
        assert await asyncio.gather(*handles) == [i * 10 for i in range(50)]


async def rejected_batch(handler: Any, runs: int) -> str:
    """Run ``runs`` workflows through ``handler``; every one must reject with
    ``BatchResultError``: the first one's message."""
    resonate, _ = setup(handler)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(runs)]
        outcomes = await asyncio.gather(*handles, return_exceptions=True)
    assert all(isinstance(o, BatchResultError) for o in outcomes), outcomes
    return str(outcomes[0])


async def test_a_handler_that_changes_its_list_rejects_the_batch() -> None:
    async def replacing(ctx: Context, cmds: list[Add]) -> list[int]:
        cmds[0] = Add(99)
        cmds.reverse()
        return [c.n for c in cmds]

    assert "changed the list of commands" in await rejected_batch(replacing, 5)


async def test_a_stray_cancel_fails_the_batch_not_the_batcher() -> None:
    # A cancel that is not the engine's (code cancelling "the current task")
    # fails the commands in hand; the batcher serves the next ones.
    first = [True]

    async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
        if first[0]:
            first[0] = False
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        return [c.n for c in cmds]

    resonate, calls = setup(handler)
    async with resonate:
        with pytest.raises(RuntimeError, match="Add handler raised CancelledError"):
            await resonate.run("x", "wf", 1)
        assert await asyncio.wait_for(resonate.run("y", "wf", 2), 5) == 2
        stats = resonate.stats().batchers["Add"]
        assert (stats.handler_calls, stats.handler_failures) == (2, 1)
    assert calls == [[1], [2]]


async def test_max_wait_ends_once_the_queue_is_full() -> None:
    # Producers are blocked on a full queue: lingering cannot grow the batch.
    clock = VirtualClock()
    resonate, calls = setup(doubled, clock=clock, max_wait=1.0, queue_size=5)
    async with resonate:
        start = clock.now()
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(20)]
        assert await asyncio.gather(*handles) == [i * 2 for i in range(20)]
        assert clock.now() == start  # no batch waited for the clock (nothing advances it)
    assert sorted(n for batch in calls for n in batch) == list(range(20))
    assert max(len(c) for c in calls) == 5


async def test_handler_calls_and_failures_count_retries_and_bisection() -> None:
    async def poisoned(ctx: Context, cmds: list[Add]) -> list[int]:
        if any(c.n == 3 for c in cmds):
            raise Poison
        return [c.n for c in cmds]

    resonate, calls = setup(poisoned)
    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(4)]
        outcomes = await asyncio.gather(*handles, return_exceptions=True)
        stats = resonate.stats().batchers["Add"]
    assert isinstance(outcomes[3], Poison) and outcomes[:3] == [0, 1, 2]
    # [0,1,2,3] fails; halves [0,1] ok, [2,3] fails; [2] ok, [3] fails.
    assert calls == [[0, 1, 2, 3], [0, 1], [2, 3], [2], [3]]
    assert (stats.batches, stats.failed_batches) == (1, 0)
    assert (stats.handler_calls, stats.handler_failures) == (5, 3)


async def test_shutdown_does_not_wait_for_ever_on_a_handler_that_ignores_cancellation(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_engine, "_CANCEL_SECONDS", 0.2)
    entered = asyncio.Event()
    stop = asyncio.Event()

    async def stubborn(ctx: Context, cmds: list[Add]) -> list[int]:
        entered.set()
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # ignores the shutdown
                await asyncio.sleep(0.01)
        return [c.n for c in cmds]

    resonate = Resonate(MemoryStore(), grace_seconds=0.05)
    resonate.register_command_handler(Add, stubborn, retry_policy=never())

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return await ctx.lfc(Add(n))

    loop = asyncio.get_running_loop()
    async with resonate:
        resonate.run("w", "wf", 1)
        await entered.wait()
        began = loop.time()
    assert loop.time() - began < 5  # the grace, then the bound after the cancel
    assert "ignored its cancellation" in caplog.text
    stop.set()
    await asyncio.sleep(0.05)  # the stubborn task ends: nothing leaks into other tests


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_runs_recovered_together_batch_their_commands(tmp_path: Any, backend: str) -> None:
    # Resumed runs read their histories in one round and replay together, so
    # their first live commands reach the batcher at once (they used to
    # arrive one by one: a thousand recovered runs, a thousand batches of one).
    store: Any = MemoryStore() if backend == "memory" else str(tmp_path / "p.db")
    gate = asyncio.Event()
    sizes: list[int] = []

    def build() -> Resonate:
        resonate = Resonate(store)

        async def handler(ctx: Context, cmds: list[Add]) -> list[int]:
            sizes.append(len(cmds))
            return [c.n for c in cmds]

        resonate.register_command_handler(Add, handler, retry_policy=never())

        @resonate.register(name="wf")
        async def wf(ctx: Context, n: int) -> int:
            await ctx.lfc(Add(n))
            await gate.wait()
            return await ctx.lfc(Add(n + 1))

        return resonate

    first = build()
    await first.start()
    for i in range(300):
        first.run(f"w{i}", "wf", i)
    recorded = [f"w{i}.1" for i in range(300)]
    while any(r is None for r in [await first.promises.get(id) for id in recorded]):
        await asyncio.sleep(0.01)  # every first command is recorded
    await crash(first)
    gate.set()
    sizes.clear()
    async with build() as second:
        assert await asyncio.gather(*(second.get(f"w{i}") for i in range(300))) == [
            i + 1 for i in range(300)
        ]
    assert sum(sizes) == 300 and len(sizes) <= 3, sizes


async def test_a_reordered_list_holding_one_command_twice_keeps_their_order() -> None:
    # Two workflows awaiting one Command object: a stable sort keeps them in
    # order, and so do their results.
    shared = Add(1)

    async def sorting(ctx: Context, cmds: list[Add]) -> list[str]:
        cmds.sort(key=lambda c: c.n)
        seen: dict[int, int] = {}
        results = []
        for c in cmds:
            seen[id(c)] = seen.get(id(c), 0) + 1
            results.append(f"{c.n}#{seen[id(c)]}")
        return results

    resonate = Resonate(MemoryStore())
    resonate.register_command_handler(Add, sorting, retry_policy=never())

    @resonate.register(name="wf")
    async def wf(ctx: Context, which: int) -> int:
        return await ctx.lfc(shared if which != 5 else Add(5))

    async with resonate:
        handles = [resonate.run(f"w{i}", "wf", n) for i, n in enumerate((1, 5, 1))]
        assert await asyncio.gather(*handles) == ["1#1", "5#1", "1#2"]


async def test_a_sorted_list_with_too_few_results_gets_the_usual_error() -> None:
    async def short(ctx: Context, cmds: list[Add]) -> list[int]:
        cmds.sort(key=lambda c: -c.n)
        return [0]

    assert "returned 1 results for a batch of 2" in await rejected_batch(short, 2)


async def test_a_handler_that_grows_its_list_rejects_the_batch() -> None:
    async def growing(ctx: Context, cmds: list[Add]) -> list[int]:
        cmds.append(Add(99))
        return [c.n for c in cmds]

    assert "changed the list of commands" in await rejected_batch(growing, 1)


async def test_a_failing_batch_is_not_retried_or_bisected_for_nobody() -> None:
    # The database is down: every command times out while its batch is
    # retried. Retrying (and bisecting) on for commands nobody waits for
    # kept calling the handler and held the slot for the commands behind.
    clock = VirtualClock(autojump=True)
    resonate = Resonate(MemoryStore(), clock=clock)
    calls: list[tuple[float, int]] = []

    async def down(ctx: Context, cmds: list[Add]) -> list[int]:
        calls.append((clock.now() - start, len(cmds)))
        raise ConnectionError("database is down")

    resonate.register_command_handler(Add, down, retry_policy=constant(delay=2, max_retries=10))

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return await ctx.lfc(Add(n)).with_options(timeout=5)

    async with resonate:
        start = clock.now()
        handles = [resonate.run(f"w{i}", "wf", i) for i in range(4)]
        outcomes = await asyncio.gather(*handles, return_exceptions=True)
    assert all(isinstance(o, PromiseTimeoutError) for o in outcomes), outcomes
    assert calls == [(0, 4), (2, 4), (4, 4)]  # then nobody waits: no 6, 8, ... nor halves


async def test_a_batch_failing_during_shutdown_records_no_outcome() -> None:
    # aclose() cancels the runs, then lets the batch in flight finish: its
    # transient error must not become its commands' stored outcome, or the
    # restarted run would replay the blip instead of sending the command.
    store = MemoryStore()
    calls: list[int] = []
    in_flight = asyncio.Event()

    async def flaky(ctx: Context, cmds: list[Add]) -> list[int]:
        calls.append(len(cmds))
        if len(calls) == 1:
            in_flight.set()
            await asyncio.sleep(0.05)  # in flight as aclose() begins
            raise ConnectionError("database blip")
        return [c.n for c in cmds]

    def worker() -> Resonate:
        resonate = Resonate(store, worker_id="w")
        resonate.register_command_handler(Add, flaky, retry_policy=constant(delay=0.01))

        @resonate.register(name="wf")
        async def wf(ctx: Context, n: int) -> int:
            return await ctx.lfc(Add(n))

        return resonate

    first = worker()
    await first.start()
    first.run("blip", "wf", 3)
    await in_flight.wait()
    await first.aclose()
    assert "blip.1" not in await store.get_many(["blip.1"])
    async with worker() as second:
        assert await asyncio.wait_for(second.get("blip").result(), 10) == 3
