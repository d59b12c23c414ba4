"""Schema versions and migrations of the SQL stores, and the queries the schema serves.

Version 2 drops the SQLite index ``promises_owner`` (PostgreSQL keeps it);
version 3 narrows the SQLite index on ``root_id`` to the rows whose ids do not
extend their root's. A database of any earlier version, or none, opens at
version 3, its data intact.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import pytest

from resonate_async._store_suite import record
from resonate_async.stores import Create, Kind, Settle, SQLiteStore, State
from resonate_async.stores import sqlite as sqlite_store
from resonate_async.stores._sql import (
    POSTGRES,
    SCHEMA_VERSION,
    SCHEMA_VERSION_DDL,
    SQLITE,
    migrations,
)

if TYPE_CHECKING:
    from pathlib import Path


def _indexes(db: sqlite3.Connection) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    return {r[0] for r in rows}


def _make_v1(path: Path) -> None:
    """A file as a version-1 store left it: its schema, version 1, leased rows."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(SCHEMA_VERSION_DDL)
        for statement in migrations(SQLITE)[0]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (1)")
        rows = [
            ("old-1", "PENDING", "run", "old-1", 1.0, "f", 1, 1, "w", 10.0),
            ("old-2", "PENDING", "run", "old-2", 2.0, "f", 1, 1, "w", 10.0),
            ("old-3", "PENDING", "run", "old-3", 3.0, "f", 1, 1, None, None),
        ]
        db.executemany(
            "INSERT INTO promises (id, state, kind, root_id, created_at, func, version, "
            "attempt, owner, lease_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        assert "promises_owner" in _indexes(db)
    finally:
        db.close()


def _version(path: Path) -> list[tuple[int]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT version FROM schema_version").fetchall()
    finally:
        db.close()


def test_schema_version_is_the_number_of_steps() -> None:
    assert len(migrations(SQLITE)) == len(migrations(POSTGRES)) == SCHEMA_VERSION == 3


def test_version_2_drops_the_owner_index_on_sqlite_only() -> None:
    assert migrations(SQLITE)[1] == ("DROP INDEX IF EXISTS promises_owner",)
    assert migrations(POSTGRES)[1] == ()


def test_version_3_narrows_the_root_index_on_sqlite_only() -> None:
    assert migrations(SQLITE)[2][0] == "DROP INDEX IF EXISTS promises_root"
    assert "promises_root_other" in migrations(SQLITE)[2][1]
    assert migrations(POSTGRES)[2] == ()


async def test_a_new_sqlite_file_is_at_version_3_with_its_two_indexes(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SQLiteStore(path):
        pass
    assert _version(path) == [(3,)]
    db = sqlite3.connect(path)
    try:
        assert _indexes(db) == {"promises_root_other", "promises_pending"}
    finally:
        db.close()


async def test_a_version_1_sqlite_file_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    _make_v1(path)
    async with SQLiteStore(path) as store:
        before = await store.get_many(["old-1", "old-2", "old-3"])
        assert set(before) == {"old-1", "old-2", "old-3"}
        assert before["old-1"].owner == "w" and before["old-3"].owner is None
        # Every query that selects by owner still answers right without the index.
        assert await store.renew("w", lease_until=20.0) == 2
        await store.release("w", ["old-2"])
        claimed = await store.claim("v", now=0.0, lease_until=30.0)
        assert [r.id for r in claimed] == ["old-2", "old-3"]
        await store.write([Settle("old-1", State.RESOLVED, b"1", 5.0, prior=before["old-1"])])
        assert await store.renew("w", lease_until=40.0) == 0
        assert await store.renew("v", lease_until=40.0) == 2
        assert [r.id for r in await store.tree("old-1")] == ["old-1"]
    assert _version(path) == [(3,)]
    db = sqlite3.connect(path)
    try:
        assert _indexes(db) == {"promises_root_other", "promises_pending"}
    finally:
        db.close()
    async with SQLiteStore(path) as store:  # a second open migrates nothing
        assert (await store.get_many(["old-1"]))["old-1"].state is State.RESOLVED
    assert _version(path) == [(3,)]


async def test_owner_queries_use_the_pending_index_or_the_primary_key(tmp_path: Path) -> None:
    path = tmp_path / "plan.db"
    async with SQLiteStore(path):
        pass
    db = sqlite3.connect(path)

    def plan(sql: str, args: tuple[object, ...] | dict[str, object]) -> str:
        return "; ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))

    try:
        # Renewing reads only pending rows (those holding leases), never the table.
        assert "USING INDEX promises_pending" in plan(sqlite_store._RENEW, (1.0, "w"))
        released = plan(sqlite_store._release(2), ("w", "a", "b"))
        assert "USING PRIMARY KEY" in released and "SCAN" not in released
        claim = plan(sqlite_store._claim(1, None), ("w", 1.0, "run", 0.0, 10))
        assert "USING INDEX promises_pending" in claim
        # A tree: its root and its "root."-prefixed rows by primary key, the
        # rest through the partial index; never a scan of the table.
        tree = plan(sqlite_store._TREE, {"root": "r"})
        assert "USING PRIMARY KEY (id=?)" in tree and "USING PRIMARY KEY (id>? AND id<?)" in tree
        assert "USING INDEX promises_root_other" in tree and "SCAN promises" not in tree
    finally:
        db.close()


async def test_a_settle_with_prior_reads_nothing_back(tmp_path: Path) -> None:
    seen: list[str] = []
    async with SQLiteStore(tmp_path / "trace.db") as store:
        roots = [record(f"p-{i}", kind=Kind.RUN, owner="w", lease_expires_at=9.0) for i in range(3)]
        await store.write([Create(r) for r in roots])
        conn = store._require_open()
        await conn.set_trace_callback(seen.append)
        with_prior = await store.write(
            [Settle(r.id, State.RESOLVED, b"1", 2.0, prior=r) for r in roots[:2]]
        )
        selects_with_prior = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
        seen.clear()
        [without] = await store.write([Settle("p-2", State.RESOLVED, b"1", 2.0)])
        selects_without = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
        stored = await store.get_many(["p-0", "p-1", "p-2"])
    assert selects_with_prior == []
    assert len(selects_without) == 1
    assert with_prior == [stored["p-0"], stored["p-1"]] and without == stored["p-2"]


@pytest.mark.postgres
async def test_postgres_keeps_the_owner_index_and_migrates_version_1(
    postgres_dsn: str, postgres_schema: str
) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    from resonate_async.stores.postgres import PostgresStore

    admin = await asyncpg.connect(postgres_dsn)
    try:
        quoted = f'"{postgres_schema}"'
        await admin.execute(f"CREATE SCHEMA {quoted}")
        await admin.execute(f"SET search_path = {quoted}")
        await admin.execute(SCHEMA_VERSION_DDL)
        for statement in migrations(POSTGRES)[0]:
            await admin.execute(statement)
        await admin.execute("INSERT INTO schema_version VALUES (1)")
        await admin.execute(
            "INSERT INTO promises (id, state, kind, root_id, created_at, version, attempt, "
            "owner, lease_expires_at) VALUES ('old', 'PENDING', 'run', 'old', 1, 1, 1, 'w', 10)"
        )
        async with PostgresStore(postgres_dsn, schema=postgres_schema) as store:
            assert await store.renew("w", lease_until=20.0) == 1
            assert (await store.get_many(["old"]))["old"].lease_expires_at == 20.0
        assert await admin.fetch("SELECT version FROM schema_version") == [(3,)]
        indexes = {
            r[0]
            for r in await admin.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = $1", postgres_schema
            )
        }
        assert {"promises_root", "promises_pending", "promises_owner"} <= indexes
    finally:
        await admin.close()
