"""Handles: waiting without owning the run, and the writer callbacks behind them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import (
    CanceledError,
    ConflictError,
    Context,
    Handle,
    MemoryStore,
    Resonate,
    State,
)
from resonate_async._stats import StoreStats
from resonate_async._writer import GroupCommitWriter
from resonate_async.errors import ShutdownError, StoreError
from resonate_async.stores import Create, Kind, PromiseRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from resonate_async.stores._base import Op


def gated() -> tuple[Resonate, asyncio.Event]:
    resonate = Resonate(MemoryStore())
    gate = asyncio.Event()

    @resonate.register(name="wait")
    async def wait(ctx: Context, n: int) -> int:
        await gate.wait()
        return n * 2

    return resonate, gate


async def test_a_waiter_that_gives_up_takes_nothing_from_the_run_or_other_waiters() -> None:
    resonate, gate = gated()
    async with resonate:
        handle = resonate.run("a", "wait", 21)
        quitter = asyncio.create_task(handle.result())
        stayer = asyncio.create_task(handle.result())
        await handle.created()
        quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        assert not handle.done()
        gate.set()
        assert await stayer == 42
        assert await handle == 42  # and again, once done
        record = await resonate.promises.get("a")
        assert record is not None and record.state is State.RESOLVED


async def test_gather_over_handles_returns_every_value_in_order() -> None:
    resonate, gate = gated()
    async with resonate:
        handles = [resonate.run(f"g{n}", "wait", n) for n in range(50)]
        gate.set()
        assert await asyncio.gather(*handles) == [n * 2 for n in range(50)]


async def test_cancel_before_the_root_is_durable_settles_it_canceled() -> None:
    resonate, _gate = gated()
    async with resonate:
        handle = resonate.run("early", "wait", 1)
        assert not handle.done()
        assert handle.cancel()  # the create is still queued for the writer
        with pytest.raises(CanceledError):
            await handle
        record = await resonate.promises.get("early")
        assert record is not None and record.state is State.REJECTED_CANCELED
        assert not handle.cancel()  # already done


async def test_a_handle_on_a_run_of_another_worker_does_not_cancel_it_alone() -> None:
    store = MemoryStore()
    gate = asyncio.Event()
    workers = [Resonate(store), Resonate(store)]
    for worker in workers:

        @worker.register(name="wait")
        async def wait(ctx: Context, n: int) -> int:
            await gate.wait()
            return n * 2

    first, second = workers
    async with first, second:
        running = first.run("elsewhere", "wait", 1)
        await running.created()
        attached = second.run("elsewhere", "wait", 1)
        await attached.created()
        assert not attached.cancel()  # not executing in `second`
        gate.set()
        assert await attached == 2 and await running == 2

        # A cancel before the id is known to be stored cancels that run.
        gate.clear()
        running = first.run("cancelled-elsewhere", "wait", 2)
        await running.created()
        attached = second.run("cancelled-elsewhere", "wait", 2)
        assert attached.cancel()
        with pytest.raises(CanceledError):
            await attached
        record = await second.promises.get("cancelled-elsewhere")
        assert record is not None and record.state is State.REJECTED_CANCELED
        gate.set()
        with pytest.raises(CanceledError):
            await running


async def test_created_raises_the_conflict_of_a_taken_id() -> None:
    resonate, gate = gated()

    @resonate.register(name="other")
    async def other(ctx: Context, n: int) -> int:
        return n

    async with resonate:
        gate.set()
        assert await resonate.run("taken", "other", 1) == 1
        handle = resonate.run("taken", "wait", 1)
        with pytest.raises(ConflictError):
            await handle.created()
        assert handle.done()


# -- the writer's callbacks ---------------------------------------------------


class FlakyStore(MemoryStore):
    """A memory store whose next write fails once when ``fail`` is set."""

    fail = False

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        if self.fail:
            self.fail = False
            raise OSError("disk full")
        return await super().write(ops)


def record(id: str) -> PromiseRecord:
    return PromiseRecord(id, State.PENDING, Kind.RUN, id, 0.0)


async def test_write_then_reports_after_commit_and_reports_failures() -> None:
    store = FlakyStore()
    stats = StoreStats()
    writer = GroupCommitWriter(store, stats)
    reports: list[tuple[str, Any, Any]] = []

    def done(tag: str, stored: PromiseRecord | None, error: BaseException | None) -> None:
        reports.append((tag, stored, error))

    async with store:
        task = asyncio.create_task(writer.run())
        ok = record("ok")
        writer.write_then(Create(ok), done, "ok")
        assert reports == []  # nothing before the commit
        while not reports:
            await asyncio.sleep(0)
        assert reports == [("ok", ok, None)]
        assert (await store.get_many(["ok"]))["ok"] == ok

        store.fail = True
        writer.write_then(Create(record("lost")), done, "lost")
        while len(reports) < 2:
            await asyncio.sleep(0)
        tag, stored, error = reports[1]
        assert (tag, stored) == ("lost", None)
        assert isinstance(error, StoreError) and "disk full" in str(error)
        assert await store.get_many(["lost"]) == {}

        writer.write_then(Create(record("dropped")), done, "dropped")
        writer.drop()  # a simulated crash: queued writes are reported, not written
        assert reports[2][0] == "dropped" and isinstance(reports[2][2], ShutdownError)
        writer.close()
        await task


async def test_cancel_right_after_created_settles_the_run_canceled() -> None:
    # The run's task exists but has not taken its first step yet: cancelling
    # it then must still settle the run, not leave it (and its waiters) hanging.
    resonate, _gate = gated()
    async with resonate:
        handle = resonate.run("early-cancel", "wait", 1)
        await handle.created()
        assert handle.cancel()
        with pytest.raises(CanceledError):
            await asyncio.wait_for(handle.result(), 5)
        stored = await resonate.promises.get("early-cancel")
        assert stored is not None and stored.state is State.REJECTED_CANCELED


async def test_shutdown_right_after_created_interrupts_the_run() -> None:
    resonate, _gate = gated()
    async with resonate:
        handle = resonate.run("early-stop", "wait", 1)
        await handle.created()
    with pytest.raises(ShutdownError, match="interrupted by shutdown"):
        await asyncio.wait_for(handle.result(), 5)


async def test_cancel_once_the_body_returned_is_refused_and_the_run_resolves() -> None:
    # The body has returned and its root's settle is queued: the run can no
    # longer be cancelled, and cancel() says so instead of promising it.
    finished = asyncio.Event()

    async def quick(ctx: Context) -> int:
        finished.set()
        return 7

    resonate = Resonate(MemoryStore())
    resonate.register(quick)
    async with resonate:
        handle = resonate.run("settling", quick)
        await finished.wait()
        await asyncio.sleep(0)  # the run's task ends; the settle is queued
        assert not handle.done()
        assert not handle.cancel()
        assert await handle == 7
        stored = await resonate.promises.get("settling")
        assert stored is not None and stored.state is State.RESOLVED


async def test_a_finished_handle_keeps_answering() -> None:
    async def quick(ctx: Context, x: int) -> int:
        return x + 1

    resonate = Resonate(MemoryStore())
    resonate.register(quick)
    async with resonate:
        handle = resonate.run("finished", quick, 1)
        assert await handle == 2
        await handle.created()
        assert handle.done() and not handle.cancel()
        assert await handle.result() == 2
        assert repr(handle) == "<Handle 'finished' done>"
        assert resonate.run("finished", quick, 1) is not handle
        assert await resonate.run("finished", quick, 1) == 2


def test_awaiting_a_handle_in_another_loop_says_which_loop_to_use() -> None:
    resonate = Resonate(MemoryStore())
    gate: list[asyncio.Event] = []

    @resonate.register
    async def waits(ctx: Context) -> int:
        await gate[0].wait()
        return 1

    async def elsewhere(handle: Handle[int]) -> None:
        with pytest.raises(RuntimeError, match="belongs to another event loop"):
            await handle

    async def main() -> None:
        gate.append(asyncio.Event())
        async with resonate:
            handle = resonate.run("w", waits)
            await asyncio.to_thread(asyncio.run, elsewhere(handle))
            gate[0].set()
            assert await handle == 1

    asyncio.run(main())


async def test_repeated_gets_of_a_run_held_elsewhere_share_one_watch() -> None:
    # A status endpoint polling get(id) with a timeout, for a run another
    # worker holds for days: a watching task per request piled up.
    store = MemoryStore()
    gate = asyncio.Event()

    def worker(name: str) -> Resonate:
        resonate = Resonate(store, worker_id=name)

        @resonate.register(name="waits")
        async def waits(ctx: Context) -> int:
            await gate.wait()
            return 7

        return resonate

    async with worker("holder") as holder, worker("api") as api:
        running = holder.run("long", "waits")
        await running.created()
        engine = api._engine
        assert engine is not None
        before = len(engine._others)
        for _ in range(50):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.ensure_future(api.get("long")), 0.001)
        assert len(engine._others) <= before + 1
        watched = api.get("long")
        assert api.get("long") is watched
        gate.set()
        assert await running == 7
        assert await watched == 7


def frames_of(error: BaseException) -> list[str]:
    """The files of every frame an error's traceback holds, with each
    frame's callers (what the error keeps alive)."""
    names = []
    tb = error.__traceback__
    while tb is not None:
        frame: Any = tb.tb_frame
        while frame is not None:
            names.append(frame.f_code.co_filename)
            frame = frame.f_back
        tb = tb.tb_next
    return names


async def test_awaiting_a_failed_handle_again_does_not_grow_its_error() -> None:
    resonate = Resonate(MemoryStore())

    @resonate.register(name="fail")
    async def fail(ctx: Context) -> None:
        raise ValueError("no")

    async with resonate:
        handle = resonate.run("f", fail)
        sizes = []
        for _ in range(5):
            with pytest.raises(ValueError, match="no") as caught:
                await handle
            sizes.append(len(frames_of(caught.value)))
        assert len(set(sizes)) == 1, sizes


async def test_a_kept_failed_handle_does_not_hold_the_write_that_settled_it() -> None:
    # The error is read from the settled row in the writer's report: its
    # frames, kept by the handle, would hold the writer's whole batch.
    resonate = Resonate(MemoryStore())

    @resonate.register(name="fail")
    async def fail(ctx: Context) -> None:
        raise ValueError("no")

    async with resonate:
        for handle in (resonate.run("f", fail), resonate.get("f")):
            with pytest.raises(ValueError) as caught:
                await handle
            held = frames_of(caught.value)
            assert __file__ in held
            engine = [name for name in held if "resonate_async" in name]
            assert all(name.endswith("_handle.py") for name in engine), (handle, engine)
