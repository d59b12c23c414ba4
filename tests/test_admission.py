"""Admission: a burst of runs moves through the writer a few transactions at a
time, and finished work leaves nothing behind for a long-kept handle to hold."""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resonate_async import CanceledError, Command, Context, MemoryStore, Resonate, State
from resonate_async._stats import StoreStats
from resonate_async._writer import GroupCommitWriter
from resonate_async.errors import ShutdownError
from resonate_async.stores import Create, Kind, PromiseRecord
from resonate_async.testing import VirtualClock

if TYPE_CHECKING:
    from collections.abc import Sequence

    from resonate_async.stores._base import Op


class RecordingStore(MemoryStore):
    """A memory store that remembers the ids written by each transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.transactions: list[list[str]] = []

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        self.transactions.append([op.record.id if isinstance(op, Create) else op.id for op in ops])
        return await super().write(ops)


def record(id: str) -> PromiseRecord:
    return PromiseRecord(id, State.PENDING, Kind.RUN, id, 0.0)


async def drain(writer: GroupCommitWriter) -> None:
    task = asyncio.create_task(writer.run())
    writer.close()
    await task


def creating(id: str) -> Create:
    """What ``admit_then`` calls to build an admission's op, given its arg."""
    return Create(record(id))


def ignore(arg: Any, stored: PromiseRecord | None, error: BaseException | None) -> None:
    pass


async def test_running_work_is_written_first_and_admissions_fill_the_rest() -> None:
    store = RecordingStore()
    writer = GroupCommitWriter(store, StoreStats(), max_rows_per_transaction=3)
    async with store:
        for i in range(5):
            writer.admit_then(creating, ignore, f"a{i}")
        writer.write_then(Create(record("u0")), ignore, None)
        writer.write_then(Create(record("u1")), ignore, None)
        assert not writer.idle
        await drain(writer)
    assert store.transactions == [["u0", "u1", "a0"], ["a1", "a2", "a3"], ["a4"]]
    assert writer.idle


async def test_admissions_wait_while_running_work_fills_whole_transactions() -> None:
    store = RecordingStore()
    writer = GroupCommitWriter(store, StoreStats(), max_rows_per_transaction=2)
    async with store:
        writer.admit_then(creating, ignore, "a0")
        for i in range(4):
            writer.write_then(Create(record(f"u{i}")), ignore, None)
        await drain(writer)
    assert store.transactions == [["u0", "u1"], ["u2", "u3"], ["a0"]]


async def test_admissions_are_reported_after_commit_and_dropped_ones_fail() -> None:
    store = RecordingStore()
    writer = GroupCommitWriter(store, StoreStats())
    reports: list[tuple[str, PromiseRecord | None, BaseException | None]] = []

    def done(tag: str, stored: PromiseRecord | None, error: BaseException | None) -> None:
        reports.append((tag, stored, error))

    async with store:
        writer.admit_then(creating, done, "admitted")
        assert reports == []
        await drain(writer)
        assert reports == [("admitted", record("admitted"), None)]

        writer = GroupCommitWriter(store, StoreStats())
        writer.admit_then(creating, done, "lost")
        writer.drop()  # a simulated crash
        tag, stored, error = reports[1]
        assert (tag, stored) == ("lost", None) and isinstance(error, ShutdownError)
        assert await store.get_many(["lost"]) == {}
        assert writer.idle


async def test_an_admission_whose_op_cannot_be_built_fails_alone() -> None:
    # make() reads the engine's clock, which an application may inject.
    store = RecordingStore()
    writer = GroupCommitWriter(store, StoreStats())
    reports: list[tuple[str, PromiseRecord | None, BaseException | None]] = []

    def done(tag: str, stored: PromiseRecord | None, error: BaseException | None) -> None:
        reports.append((tag, stored, error))

    def building(id: str) -> Create:
        if id == "broken":
            raise OSError("the clock failed")
        return creating(id)

    async with store:
        for id in ("a0", "broken", "a1"):
            writer.admit_then(building, done, id)
        await drain(writer)
    assert store.transactions == [["a0", "a1"]]
    assert [(tag, stored) for tag, stored, _ in reports] == [
        ("broken", None),
        ("a0", record("a0")),
        ("a1", record("a1")),
    ]
    assert isinstance(reports[0][2], OSError) and writer.idle


async def test_a_writer_cancelled_while_writing_leaves_no_write_running() -> None:
    # Two transactions in the store at once (pipeline_depth = 2, as SQLite's).
    class SlowStore(RecordingStore):
        pipeline_depth = 2

        def __init__(self) -> None:
            super().__init__()
            self.entered = 0
            self.ended = 0

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            self.entered += 1
            try:
                await asyncio.Event().wait()
            finally:
                for _ in range(5):  # a store winding down (aiosqlite's thread answering)
                    await asyncio.sleep(0)
                self.ended += 1
            return []  # pragma: no cover - never reached

    store = SlowStore()
    writer = GroupCommitWriter(store, StoreStats(), max_rows_per_transaction=1)
    reports: list[BaseException | None] = []
    async with store:
        for id in ("u0", "u1"):
            writer.write_then(Create(record(id)), lambda _a, _s, e: reports.append(e), None)
        task = asyncio.create_task(writer.run())
        while store.entered < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.ended == 2  # both writes ended with the writer, not after it
    assert len(reports) == 2 and all(isinstance(e, ShutdownError) for e in reports)


@dataclass
class Note(Command[int]):
    n: int


async def test_a_burst_of_runs_executes_a_few_transactions_at_a_time() -> None:
    # 400 runs submitted at once, 10 rows per transaction: the bodies start as
    # their roots commit, and running work is written before new roots, so
    # only a few transactions' worth of runs are executing at any moment.
    resonate = Resonate(MemoryStore(), max_rows_per_transaction=10)
    executing = 0
    peak = 0

    async def noted(ctx: Context, notes: list[Note]) -> list[int]:
        return [n.n for n in notes]

    resonate.register_command_handler(Note, noted)

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        nonlocal executing, peak
        executing += 1
        peak = max(peak, executing)
        try:
            return await ctx.lfc(Note(n))
        finally:
            executing -= 1

    async with resonate:
        handles = [resonate.run(f"burst-{i}", "wf", i) for i in range(400)]
        for i, handle in enumerate(handles):
            assert await handle == i
    assert 0 < peak <= 40, peak


async def test_a_finished_run_leaves_no_task_and_no_command_behind() -> None:
    resonate = Resonate(MemoryStore())
    commands: list[weakref.ref[Note]] = []

    async def noted(ctx: Context, notes: list[Note]) -> list[int]:
        commands.extend(weakref.ref(n) for n in notes)
        return [n.n for n in notes]

    resonate.register_command_handler(Note, noted)

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return await ctx.lfc(Note(n))

    async with resonate:
        handles = [resonate.run(f"kept-{i}", "wf", i) for i in range(50)]
        assert await asyncio.gather(*handles) == list(range(50))
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        # The caller keeps its handles; they hold the outcome, not the
        # finished task or the root's record, and the idle batcher holds none
        # of the commands.
        assert all(h.done() for h in handles)
        kept = [o for h in handles for o in gc.get_referents(h)]
        assert not any(isinstance(o, (asyncio.Task, PromiseRecord)) for o in kept)
        assert len(commands) == 50
        assert all(ref() is None for ref in commands)


class GatedStore(MemoryStore):
    """A memory store that remembers every create and can hold its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[str, PromiseRecord] = {}
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        for op in ops:
            if isinstance(op, Create):
                self.created[op.record.id] = op.record
        return await super().write(ops)


async def test_a_root_admitted_late_gets_its_lease_from_when_it_is_written() -> None:
    # A burst can keep a fresh run's root waiting for a while; the lease in the
    # row must start when the row is written, or other workers could take the
    # run over at once while it executes here.
    clock = VirtualClock()
    store = GatedStore()
    resonate = Resonate(store, clock=clock, lease_seconds=15.0, heartbeat_seconds=5.0)

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> int:
        return n

    async with resonate:
        store.hold = asyncio.Event()
        first = resonate.run("first", "wf", 1)
        await store.holding.wait()  # the writer is inside the first transaction
        submitted = clock.now()
        late = resonate.run("late", "wf", 2)  # waits for the writer
        await clock.advance(100.0)
        store.hold.set()
        assert (await first, await late) == (1, 2)
    root = store.created["late"]
    assert root.created_at >= submitted + 100.0
    assert root.lease_expires_at == root.created_at + 15.0


async def test_the_promise_api_sees_a_run_started_just_before() -> None:
    # resonate.run queues the root for admission; a promise-API call on the
    # same id right after must still find it, as it would have when writes
    # were first-in first-out.
    resonate = Resonate(MemoryStore())
    gate = asyncio.Event()

    @resonate.register(name="wait")
    async def wait(ctx: Context) -> str:
        await gate.wait()
        return "done"

    async with resonate:
        canceled = resonate.run("to-cancel", "wait")
        record = await resonate.promises.cancel("to-cancel")
        assert record.state is State.REJECTED_CANCELED
        with pytest.raises(CanceledError):
            await canceled

        resolved = resonate.run("to-resolve", "wait")
        record = await resonate.promises.resolve("to-resolve", "early")
        assert record.state is State.RESOLVED
        gate.set()
        assert await resolved == "early"


# -- the scheduling rule, as a property ---------------------------------------

Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 7)),
        st.tuples(st.just("admit"), st.integers(1, 7)),
        st.tuples(st.just("commit"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps, max_rows=st.integers(1, 6))
def test_transactions_take_running_work_first_then_admissions_in_order(
    steps: list[Step], max_rows: int
) -> None:
    async def scenario() -> None:
        writer = GroupCommitWriter(MemoryStore(), StoreStats(), max_rows_per_transaction=max_rows)
        made: list[str] = []

        def make(id: str) -> Create:
            made.append(id)
            return Create(record(id))

        queued_writes: list[str] = []  # submitted, not yet in a transaction
        queued_admits: list[str] = []
        transactions: list[list[str]] = []

        def commit() -> None:
            txn = writer._next()
            ids = [op.record.id for op in txn.ops if isinstance(op, Create)]
            writes = [i for i in ids if i.startswith("w")]
            admits = [i for i in ids if i.startswith("a")]
            assert 0 < len(ids) <= max_rows
            assert ids == writes + admits  # running work first
            assert writes == queued_writes[: len(writes)]  # each kind in order
            assert admits == queued_admits[: len(admits)]
            if admits:  # admitted only into room that running work left
                assert len(writes) == len(queued_writes) or writes == []
                assert len(writes) < max_rows
            if len(admits) < len(queued_admits):
                assert len(ids) == max_rows  # a backlog of admissions fills the transaction
            del queued_writes[: len(writes)], queued_admits[: len(admits)]
            if admits:  # each admission's op is built as it enters a transaction
                assert made[-len(admits) :] == admits
            transactions.append(ids)
            txn.report([None] * len(ids), None)

        n = 0
        for kind, count in steps:
            if kind == "commit":
                if not writer.idle:
                    commit()
                continue
            for _ in range(count):
                n += 1
                if kind == "write":
                    queued_writes.append(f"w{n}")
                    writer.write_then(Create(record(f"w{n}")), ignore, None)
                else:
                    queued_admits.append(f"a{n}")
                    writer.admit_then(make, ignore, f"a{n}")
        assert len(made) == sum(len([i for i in t if i.startswith("a")]) for t in transactions)
        while not writer.idle:
            commit()
        assert queued_writes == queued_admits == []
        assert sorted(made) == sorted(i for t in transactions for i in t if i.startswith("a"))

    asyncio.run(scenario())


async def test_the_next_transaction_is_formed_before_the_last_one_is_reported() -> None:
    # Under load the store starts on what is queued while the last transaction
    # is reported: what the report queues goes in the transaction after.
    class Gated(RecordingStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            if not self.transactions:
                await self.gate.wait()
            return await super().write(ops)

    store = Gated()
    writer = GroupCommitWriter(store, StoreStats())
    reported: list[str] = []

    def then_more(tag: str, stored: PromiseRecord | None, error: BaseException | None) -> None:
        reported.append(tag)
        if tag == "a":
            writer.write_then(Create(record("c")), then_more, "c")

    async with store:
        running = asyncio.create_task(writer.run())
        writer.write_then(Create(record("a")), then_more, "a")
        for _ in range(5):
            await asyncio.sleep(0)  # the writer is now in the store with ["a"]
        writer.write_then(Create(record("b")), then_more, "b")
        store.gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        writer.close()
        await running
    assert store.transactions == [["a"], ["b"], ["c"]]
    assert reported == ["a", "b", "c"]


async def test_a_store_that_writes_in_order_gets_the_next_transaction_before_the_last_ends() -> (
    None
):
    # pipeline_depth = 2 (SQLite): the writer hands over the next transaction
    # while the last is still in the store, so the store never waits for the
    # event loop between commits; outcomes are still reported in order, and a
    # failed transaction does not hold back the next one.
    class Serial(MemoryStore):
        pipeline_depth = 2

        def __init__(self) -> None:
            super().__init__()
            self.started: list[list[str]] = []
            self.gates: list[asyncio.Event] = []

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            ids = [op.record.id if isinstance(op, Create) else op.id for op in ops]
            self.started.append(ids)
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
            if ids == ["bad"]:
                raise OSError("disk full")
            return await super().write(ops)

    store = Serial()
    writer = GroupCommitWriter(store, StoreStats(), max_rows_per_transaction=1)
    reported: list[tuple[str, str | None]] = []

    def done(tag: str, stored: PromiseRecord | None, error: BaseException | None) -> None:
        reported.append((tag, None if error is None else type(error).__name__))

    async with store:
        running = asyncio.create_task(writer.run())
        for tag in ("bad", "b", "c"):
            writer.write_then(Create(record(tag)), done, tag)
        for _ in range(10):
            await asyncio.sleep(0)
        assert store.started == [["bad"], ["b"]]  # two in the store at once, no more
        store.gates[0].set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert reported == [("bad", "StoreError")]
        assert store.started == [["bad"], ["b"], ["c"]]
        for gate in store.gates[1:]:
            gate.set()
        writer.close()
        await running
    assert reported == [("bad", "StoreError"), ("b", None), ("c", None)]


async def test_a_store_without_pipeline_depth_holds_one_transaction_at_a_time() -> None:
    class Plain(RecordingStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            ids = [op.record.id if isinstance(op, Create) else op.id for op in ops]
            self.transactions.append(ids)
            await self.gate.wait()
            return await MemoryStore.write(self, ops)

    store = Plain()
    writer = GroupCommitWriter(store, StoreStats(), max_rows_per_transaction=1)
    async with store:
        running = asyncio.create_task(writer.run())
        for tag in ("a", "b"):
            writer.write_then(Create(record(tag)), ignore, tag)
        for _ in range(10):
            await asyncio.sleep(0)
        assert store.transactions == [["a"]]
        store.gate.set()
        writer.close()
        await running
    assert store.transactions == [["a"], ["b"]]
