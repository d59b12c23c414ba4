"""Replay: settled steps are not executed again; changed code is caught."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from resonate_async import (
    Command,
    Context,
    MemoryStore,
    NondeterminismError,
    Resonate,
    SQLiteStore,
    State,
)
from resonate_async.retry import never
from resonate_async.testing import crash

if TYPE_CHECKING:
    from collections.abc import Callable

HERE = Path(__file__).parent


@dataclass
class Note(Command[None]):
    text: str


async def test_a_step_completed_before_a_crash_is_not_executed_again(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    executed: list[str] = []
    gate = asyncio.Event()

    async def step_one(ctx: Context) -> str:
        executed.append("one")
        return "1"

    async def step_two(ctx: Context) -> str:
        executed.append("two")
        await gate.wait()
        return "2"

    def build() -> Resonate:
        resonate = Resonate(SQLiteStore(path))

        @resonate.register(name="flow")
        async def flow(ctx: Context) -> str:
            return await ctx.lfc(step_one) + await ctx.lfc(step_two)

        return resonate

    first = build()
    await first.start()
    first.run("flow-1", "flow")
    while executed != ["one", "two"]:
        await asyncio.sleep(0.001)
    await crash(first)

    gate.set()
    async with build() as second:
        assert await second.get("flow-1") == "12"
    assert executed == ["one", "two", "two"]  # step one replayed from the store


async def test_gather_over_lfi_replays_without_nondeterminism() -> None:
    store = MemoryStore()
    calls: list[int] = []
    gate = asyncio.Event()

    async def square(ctx: Context, x: int) -> int:
        calls.append(x)
        if x == 4:
            await gate.wait()
        return x * x

    def build() -> Resonate:
        resonate = Resonate(store)

        @resonate.register(name="fan")
        async def fan(ctx: Context) -> list[int]:
            promises = [ctx.lfi(square, x).with_options(retry_policy=never()) for x in range(5)]
            return list(await asyncio.gather(*promises))

        return resonate

    first = build()
    await first.start()
    first.run("fan", "fan")
    while len(calls) < 5:
        await asyncio.sleep(0)
    for _ in range(20):  # let the four quick squares commit
        await asyncio.sleep(0)
    await crash(first)
    gate.set()
    async with build() as second:
        assert await second.get("fan") == [0, 1, 4, 9, 16]
    assert sorted(calls) == [0, 1, 2, 3, 4, 4]
    children = [r for r in await store.tree("fan") if r.id != "fan"]
    assert sorted(r.id for r in children) == [f"fan.{n}" for n in range(1, 6)]


async def test_changed_code_raises_nondeterminism_naming_both_calls() -> None:
    store = MemoryStore()
    gate = asyncio.Event()

    async def charge(ctx: Context) -> str:
        return "charged"

    async def refund(ctx: Context) -> str:
        return "refunded"

    async def block(ctx: Context) -> None:
        await gate.wait()

    first = Resonate(store)

    @first.register(name="pay")
    async def pay_v1(ctx: Context) -> str:
        await ctx.lfc(charge)
        await ctx.lfc(block)
        return "ok"

    await first.start()
    handle = first.run("pay-1", "pay")
    while not (await store.get_many(["pay-1.1"])):
        await asyncio.sleep(0)
    await crash(first)
    del handle

    second = Resonate(store)

    @second.register(name="pay")
    async def pay_v2(ctx: Context) -> str:
        await ctx.lfc(refund)  # the code changed under a pending run
        return "ok"

    async with second:
        with pytest.raises(NondeterminismError) as caught:
            await second.get("pay-1")
        # An explicit run() tries the stuck run again: it fails again, not hangs.
        with pytest.raises(NondeterminismError, match="refund"):
            await asyncio.wait_for(second.run("pay-1", "pay").result(), 10)
    assert "refund" in str(caught.value) and "charge" in str(caught.value)
    record = (await store.get_many(["pay-1"]))["pay-1"]
    assert record.state is State.PENDING  # deploying compatible code resumes it


async def test_calls_sharing_an_id_they_were_given_replay_without_nondeterminism() -> None:
    """Ids given with with_options(id=...) are not checked: two different
    functions given one id share the outcome stored first, on replay too."""
    store = MemoryStore()
    gate, blocked = asyncio.Event(), asyncio.Event()

    async def make_key(ctx: Context) -> str:
        return "key-1"

    async def read_key(ctx: Context) -> str:
        return "other"

    async def block(ctx: Context) -> None:
        blocked.set()
        await gate.wait()

    def build() -> Resonate:
        resonate = Resonate(store)

        @resonate.register(name="keys")
        async def keys(ctx: Context) -> list[str]:
            first = await ctx.lfc(make_key).with_options(id="shared-key")
            second = await ctx.lfc(read_key).with_options(id="shared-key")
            await ctx.lfc(block)
            return [first, second]

        return resonate

    first = build()
    await first.start()
    handle = first.run("k", "keys")
    await asyncio.wait_for(blocked.wait(), 10)  # both calls are stored
    await crash(first)
    del handle
    gate.set()
    async with build() as second:
        assert await asyncio.wait_for(second.get("k").result(), 10) == ["key-1", "key-1"]


@pytest.mark.timeout(60)
def test_sigkill_after_some_steps_resumes_without_redoing_them(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    log = tmp_path / "effects.log"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    worker = [sys.executable, str(HERE / "crash_worker.py"), str(store), str(log)]

    first = subprocess.Popen([*worker, "block"], env=env, stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "blocked"  # steps 1-3 committed, step 4 running
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    first.stdout.close()

    second = subprocess.run(
        [*worker, "finish"], env=env, capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == "result=s1+s2+s3+s4"
    effects = log.read_text().split()
    # Steps 1-3 ran once, before the kill; step 4 ran again (it never settled).
    assert effects == ["s1", "s2", "s3", "s4", "s4"]


@pytest.mark.timeout(90)
def test_a_worker_paused_past_its_lease_stops_the_run_another_took_over(
    tmp_path: Path,
) -> None:
    # Real processes: the starter is SIGSTOPped in its second or third step
    # for longer than its lease; the server claims the run and finishes it.
    # Continued, the starter may end the step it was in (nothing can stop a
    # step midway), then must stop: no step after it runs there again.
    store = tmp_path / "store.db"
    log = tmp_path / "effects.log"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    worker = [sys.executable, str(HERE / "paused_workload.py"), str(store), str(log)]

    def effects() -> list[tuple[str, str]]:
        if not log.exists():
            return []
        return [tuple(line.split()) for line in log.read_text().splitlines()]  # type: ignore[misc]

    def wait_for(done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done():
            assert time.monotonic() < deadline, effects()
            time.sleep(0.02)

    server = subprocess.Popen([*worker, "server"], env=env, stdout=subprocess.PIPE, text=True)
    starter = None
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        starter = subprocess.Popen(
            [*worker, "starter"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_for(lambda: ("p-1.1", "starter") in effects(), 20)
        time.sleep(0.1)  # into the next step's sleep: its writes are committed
        # A process stopped inside a transaction would hold SQLite's write lock
        # and no other could take over: stop it again until it holds none.
        for _ in range(50):
            starter.send_signal(signal.SIGSTOP)
            if not _write_locked(store):
                break
            starter.send_signal(signal.SIGCONT)
            time.sleep(0.03)
        else:
            pytest.fail("the starter held SQLite's write lock at every stop")
        before = [id for id, role in effects() if role == "starter"]
        wait_for(lambda: ("p-1.5", "server") in effects(), 30)  # taken over and finished
        starter.send_signal(signal.SIGCONT)
        out, err = starter.communicate(timeout=30)
        assert starter.returncode == 0, err
        assert out.strip() == "result=15"
        assert "stops executing here" in err
    finally:
        for process in (starter, server):
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
                process.wait(timeout=10)
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
    late = [id for id, role in effects() if role == "starter"][len(before) :]
    in_flight = f"p-1.{len(before) + 1}"
    assert late in ([], [in_flight]), effects()


def _write_locked(path: Path) -> bool:
    """Whether another connection holds ``path``'s SQLite write lock now."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


@dataclass
class Parcel:
    weight: int


async def test_a_stored_value_that_no_longer_decodes_leaves_the_run_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A step's value was stored as a class the new code renamed: the run
    # stops as on nondeterminism (PENDING, resumed once compatible code is
    # back) instead of settling REJECTED on a decoding error for good.
    store = MemoryStore()
    gate = asyncio.Event()

    async def weigh(ctx: Context) -> Parcel:
        return Parcel(3)

    async def block(ctx: Context) -> None:
        await gate.wait()

    def build() -> Resonate:
        resonate = Resonate(store, worker_id="w")  # one worker, restarted

        @resonate.register(name="ship", retry_policy=never())
        async def ship(ctx: Context) -> int:
            parcel = await ctx.lfc(weigh)
            try:
                await ctx.lfc(block)
            except Exception:  # a body that catches everything does not settle it either
                return -1
            return parcel.weight

        return resonate

    first = build()
    await first.start()
    first.run("ship-1", "ship")
    while not (await store.get_many(["ship-1.1"])):
        await asyncio.sleep(0)
    await crash(first)

    monkeypatch.delattr(sys.modules[__name__], "Parcel")
    async with build() as second:
        with pytest.raises(NondeterminismError, match="no longer decodes"):
            await asyncio.wait_for(second.get("ship-1").result(), 10)
    assert (await store.get_many(["ship-1"]))["ship-1"].state is State.PENDING

    monkeypatch.undo()  # compatible code is deployed again
    gate.set()
    async with build() as third:
        assert await asyncio.wait_for(third.get("ship-1").result(), 10) == 3


async def test_a_remote_call_made_local_is_nondeterminism() -> None:
    # A remote call is the root of its own tree, not in the history a run
    # replays: a deploy that made it local shows when its id is found taken.
    store = MemoryStore()

    async def charge(ctx: Context) -> str:
        return "charged"

    first = Resonate(store)

    @first.register(name="pay")
    async def pay_v1(ctx: Context) -> str:
        return str(await ctx.rfc(charge))  # no worker runs "charge" yet

    await first.start()
    first.run("pay-2", "pay")
    while not (await store.get_many(["pay-2.1"])):
        await asyncio.sleep(0)
    await crash(first)

    second = Resonate(store)

    @second.register(name="pay")
    async def pay_v2(ctx: Context) -> str:
        return str(await ctx.lfc(charge))

    async with second:
        with pytest.raises(NondeterminismError, match=r"pay-2\.1: .*local call.*remote call"):
            await asyncio.wait_for(second.get("pay-2").result(), 10)
    rows = await store.get_many(["pay-2", "pay-2.1"])
    assert rows["pay-2"].state is State.PENDING  # deploying compatible code resumes it
    assert rows["pay-2.1"].state is State.PENDING


async def test_caught_nondeterminism_is_reported_where_it_first_diverged() -> None:
    store = MemoryStore()
    gate = asyncio.Event()

    async def charge(ctx: Context) -> str:
        return "charged"

    async def refund(ctx: Context) -> str:
        return "refunded"

    async def block(ctx: Context) -> None:
        await gate.wait()

    first = Resonate(store)

    @first.register(name="pay")
    async def pay_v1(ctx: Context) -> str:
        await ctx.lfc(charge)
        await ctx.lfc(charge)
        await ctx.lfc(block)
        return "ok"

    await first.start()
    first.run("pay-3", "pay")
    while not (await store.get_many(["pay-3.2"])):
        await asyncio.sleep(0)
    await crash(first)

    second = Resonate(store)

    @second.register(name="pay")
    async def pay_v2(ctx: Context) -> str:
        with contextlib.suppress(NondeterminismError):  # free to; the run still stops
            await ctx.lfc(refund)
        await ctx.lfc(refund)
        return "ok"

    async with second:
        with pytest.raises(NondeterminismError, match=r"^pay-3\.1: "):
            await asyncio.wait_for(second.get("pay-3").result(), 10)
    assert (await store.get_many(["pay-3"]))["pay-3"].state is State.PENDING


async def test_a_remote_call_replays_wherever_its_function_is_registered() -> None:
    # rfc(fn) is named by fn's registered name where it is registered, by
    # its qualified name elsewhere: a run resumed by a worker that does not
    # register it is the same run, not nondeterminism.
    store = MemoryStore()

    async def charge(ctx: Context, n: int) -> int:
        return n * 2

    async def wf(ctx: Context) -> int:
        x = await ctx.rfc(charge, 21)
        await ctx.promise(id="gate")
        return x

    first = Resonate(store, worker_id="w1")
    first.register(wf)
    first.register(charge, name="svc.charge")
    await first.start()
    first.run("order", wf)
    while not (await store.get_many(["gate"])):
        await asyncio.sleep(0)
    await crash(first)

    second = Resonate(store, worker_id="w1")  # the same id: its leases at once
    second.register(wf)
    async with second:
        await second.promises.resolve("gate", None)
        assert await asyncio.wait_for(second.get("order").result(), 10) == 42
