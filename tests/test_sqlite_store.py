"""SQLiteStore beyond the protocol: settings, schema, faults, several processes."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from resonate_async._store_suite import record
from resonate_async.errors import StoreError
from resonate_async.stores import Create, Settle, SQLiteStore, State
from resonate_async.stores._sqlite_write import settle_rows, shapes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from resonate_async.stores import PromiseRecord
    from resonate_async.stores._base import Op


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "s.db", busy_timeout=0.05) as store:
        yield store


# -- settings and schema -------------------------------------------------------------


async def test_defaults_are_wal_and_synchronous_full(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "d.db") as store:
        assert await store.pragmas() == {
            "journal_mode": "wal",
            "synchronous": "FULL",
            "busy_timeout": 5000,
        }


async def test_synchronous_and_busy_timeout_are_configurable(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "n.db", synchronous="normal", busy_timeout=0.25) as store:
        pragmas = await store.pragmas()
    assert pragmas["synchronous"] == "NORMAL" and pragmas["busy_timeout"] == 250


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"synchronous": "SOMETIMES"}, "synchronous"), ({"busy_timeout": -1.0}, "busy_timeout")],
)
def test_bad_settings_are_rejected(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SQLiteStore(tmp_path / "x.db", **kwargs)  # type: ignore[arg-type]


async def test_schema_is_created_once_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    async with SQLiteStore(path) as store:
        await store.write([Create(record("kept"))])
    async with SQLiteStore(path) as store:  # a second open migrates nothing
        assert "kept" in await store.get_many(["kept"])
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'promises'").fetchone()[0]
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert "WITHOUT ROWID" in sql
    # Version 2 dropped promises_owner on SQLite (see tests/test_store_schema.py).
    assert {"promises_root_other", "promises_pending"} <= indexes
    assert "promises_owner" not in indexes


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SQLiteStore(path):
        pass
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(StoreError, match="upgrade resonate_async"):
        await SQLiteStore(path).open()


async def test_opening_a_current_schema_waits_for_no_writer(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SQLiteStore(path) as store:
        await store.write([Create(record("kept"))])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        async with SQLiteStore(path, busy_timeout=0.05) as store:  # a reader, say the CLI
            assert "kept" in await store.get_many(["kept"])
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_open_failure_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open") as caught:
        await SQLiteStore(tmp_path / "missing-dir" / "x.db").open()
    assert isinstance(caught.value.__cause__, sqlite3.Error)


async def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    with pytest.raises(StoreError, match="not open"):
        await store.get_many(["x"])
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.write([Create(record("x"))])


# -- faults: each fails its transaction, and the store serves on ----------------------


async def test_a_locked_database_fails_the_write_then_recovers(
    store: SQLiteStore, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StoreError, match="locked") as caught:
            await store.write([Create(record("blocked"))])
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.get_many(["blocked"]) == {}
    [again] = await store.write([Create(record("blocked"))])
    assert again is not None and again.id == "blocked"


@pytest.mark.parametrize("path", ["bulk", "exact"])
async def test_an_unstorable_value_fails_the_whole_write(store: SQLiteStore, path: str) -> None:
    await store.write([Create(record("p"))])
    ops: list[Op] = [
        Settle("p", State.RESOLVED, b"1", 1.0),
        Create(record("ok")),
        Create(record("huge", attempt=2**64)),
    ]
    if path == "exact":  # an id created twice in one write takes the exact path
        ops.insert(1, Create(record("ok")))
    with pytest.raises(StoreError) as caught:
        await store.write(ops)
    assert isinstance(caught.value.__cause__, OverflowError)
    got = await store.get_many(["p", "ok", "huge"])
    assert set(got) == {"p"} and got["p"].state is State.PENDING
    assert [r.id for r in await store.write(ops[:2]) if r] == ["p", "ok"]


@pytest.mark.parametrize("path", ["bulk", "exact"])
async def test_a_cancelled_write_is_rolled_back(
    store: SQLiteStore, tmp_path: Path, path: str
) -> None:
    slow = SQLiteStore(tmp_path / "s.db", busy_timeout=5.0)
    await slow.open()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ops: list[Op] = [Create(record("cancelled"))]
    if path == "exact":  # an id created twice in one write takes the exact path
        ops.append(Create(record("cancelled")))
    try:
        task = asyncio.create_task(slow.write(ops))
        await asyncio.sleep(0.05)  # let it wait for the lock
        task.cancel()
        other.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await task
        [after] = await slow.write([Create(record("after"))])
        assert after is not None
        assert set(await slow.get_many(["cancelled", "after"])) == {"after"}
    finally:
        other.close()
        await slow.close()


async def test_writes_queued_together_apply_in_order_across_a_fast_path_miss(
    store: SQLiteStore,
) -> None:
    # The writer queues its next transaction while the last is being written.
    # A write whose bulk statements miss (an id already taken) is redone
    # exactly in the same call on the connection's thread, so the write
    # queued behind it never runs between the two attempts: here the second
    # write's create of "new" must find the first write's row, not take the id.
    await store.write([Create(record("taken"))])
    mine = record("new", attempt=1)
    first = store.write([Create(mine), Create(record("taken", attempt=9))])
    second = store.write([Create(record("new", attempt=2))])
    created, again = await asyncio.gather(first, second)
    assert created[0] is mine
    assert created[1] is not None and created[1].attempt != 9  # the stored row, unchanged
    assert again == [mine]  # an id already taken answers with the stored row
    assert (await store.get_many(["new"]))["new"].attempt == 1


# -- several processes on one file ------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
_CLAIMER = """
import asyncio, sys
from resonate_async.stores import SQLiteStore

async def main():
    async with SQLiteStore(sys.argv[1], busy_timeout=10.0) as store:
        n = 0
        # A new owner per batch, as distinct workers would claim.
        while batch := await store.claim(f"child-{n}", now=0.0, lease_until=60.0, limit=7):
            print(" ".join(r.id for r in batch), flush=True)
            n += 1

asyncio.run(main())
"""


async def test_processes_sharing_a_file_never_claim_the_same_run(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    ids = {f"run-{i:04}" for i in range(400)}
    async with SQLiteStore(path, busy_timeout=10.0) as store:
        await store.write([Create(record(i)) for i in sorted(ids)])
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(_CLAIMER),
            str(path),
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None
        # Race only once the child is claiming too.
        first = await child.stdout.readline()
        mine: list[str] = []
        while batch := await store.claim(f"parent-{len(mine)}", now=0.0, lease_until=60.0, limit=7):
            mine += [r.id for r in batch]
        rest, _ = await child.communicate()
        assert child.returncode == 0
        theirs = (first + rest).decode().split()
        stored = await store.get_many(sorted(ids))
    assert theirs
    assert not set(mine) & set(theirs)
    assert set(mine) | set(theirs) == ids
    assert {i for i, r in stored.items() if (r.owner or "").startswith("child-")} == set(theirs)


@pytest.mark.parametrize("n", [1, 2, 3, 1023, 1024, 1025, 4097])
def test_bulk_statements_cover_every_row_with_few_shapes(n: int) -> None:
    sizes = shapes(n, 1024)
    assert 0 <= sum(sizes) - n < 1024  # the last statement's padding
    assert all(s & (s - 1) == 0 and s <= 1024 for s in sizes)  # powers of two
    assert sizes[:-1] == [1024] * (len(sizes) - 1)


async def test_large_writes_span_several_statements(store: SQLiteStore) -> None:
    # More rows than one statement binds (1,024 creates, 4,096 settles a statement).
    n = 5000
    ids = [f"big-{i}" for i in range(n)]
    created = await store.write([Create(record(i, param=b"[]")) for i in ids])
    assert [r.id for r in created if r is not None] == ids
    settled = await store.write(
        [Settle(i, State.RESOLVED, b"%d" % k, 2.0) for k, i in enumerate(ids)]
    )
    assert [r.value for r in settled if r is not None] == [b"%d" % k for k in range(n)]
    stored = await store.get_many(ids)
    assert all(stored[i].state is State.RESOLVED and stored[i].param == b"[]" for i in ids)
    assert stored["big-4999"].value == b"4999" and stored["big-0"].owner is None


async def test_bulk_settle_finds_rows_by_primary_key(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "plan.db") as store:
        await store.write([Create(record(f"p-{i}")) for i in range(2000)])
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        conn.execute("ANALYZE")
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + settle_rows(2), ["RESOLVED", 0, 1.0, "p-1"] * 2
        ).fetchall()
    finally:
        conn.close()
    details = [row[-1] for row in plan]
    assert any("promises USING PRIMARY KEY" in d for d in details), details
    assert not any(d.startswith("SCAN promises") for d in details), details


def test_only_an_unchanged_write_is_pipelined(tmp_path: Path) -> None:
    # The writer hands SQLite the next transaction before the last returns
    # only while write() queues in call order; a subclass's write may await
    # before calling super().write(), so it gets one transaction at a time.
    class Audited(SQLiteStore):
        async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
            await asyncio.sleep(0)
            return await super().write(ops)

    assert SQLiteStore(tmp_path / "a.db").pipeline_depth == 2
    assert Audited(tmp_path / "b.db").pipeline_depth == 1
