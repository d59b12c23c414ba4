"""PostgresStore beyond the protocol: LISTEN/NOTIFY, schemas, faults."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from resonate_async._store_suite import record
from resonate_async.errors import StoreError
from resonate_async.stores import Create, Settle, State
from resonate_async.stores.postgres import PostgresStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.postgres
asyncpg = pytest.importorskip("asyncpg")


@pytest_asyncio.fixture
async def store(postgres_dsn: str, postgres_schema: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_dsn, schema=postgres_schema) as store:
        yield store


@pytest_asyncio.fixture
async def peer(
    postgres_dsn: str, postgres_schema: str, store: PostgresStore
) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_dsn, schema=postgres_schema) as peer:
        yield peer


class Heard:
    """A listener callback that records ids and lets a test wait for some."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, promise_id: str) -> None:
        self.ids.append(promise_id)
        self._changed.set()

    async def wait_for(self, *ids: str) -> None:
        async with asyncio.timeout(10):
            while not set(ids) <= set(self.ids):
                self._changed.clear()
                await self._changed.wait()


async def test_settlements_are_announced_to_listeners(
    store: PostgresStore, peer: PostgresStore
) -> None:
    heard, dropped = Heard(), Heard()
    await peer.listen(heard)
    await peer.listen(dropped)
    await peer.unlisten(dropped)
    await store.write([Create(record("n-1")), Create(record("n-2"))])
    await store.write([Settle("n-1", State.RESOLVED, b"1", 1.0)])
    # The exact path (two settles of one id) announces too, once.
    await store.write(
        [Settle("n-2", State.REJECTED, None, 1.0), Settle("n-2", State.RESOLVED, None, 2.0)]
    )
    await heard.wait_for("n-1", "n-2")
    assert sorted(heard.ids) == ["n-1", "n-2"]
    assert dropped.ids == []
    await peer.unlisten(heard)


async def test_a_failing_listener_does_not_starve_the_others(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(promise_id: str) -> None:
        raise RuntimeError("listener bug")

    heard = Heard()
    await store.listen(broken)
    await store.listen(heard)
    await store.write([Create(record("f-1")), Settle("f-1", State.RESOLVED, None, 1.0)])
    await heard.wait_for("f-1")
    assert "listener bug" in caplog.text


async def test_schemas_keep_data_apart(postgres_dsn: str, postgres_schema: str) -> None:
    other_schema = postgres_schema + "_b"
    try:
        async with (
            PostgresStore(postgres_dsn, schema=postgres_schema) as a,
            PostgresStore(postgres_dsn, schema=other_schema) as b,
        ):
            await a.write([Create(record("only-in-a"))])
            assert await b.get_many(["only-in-a"]) == {}
            assert "only-in-a" in await a.get_many(["only-in-a"])
    finally:
        admin = await asyncpg.connect(postgres_dsn)
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE')
        finally:
            await admin.close()


async def test_workers_opening_together_migrate_once(
    postgres_dsn: str, postgres_schema: str
) -> None:
    stores = [PostgresStore(postgres_dsn, schema=postgres_schema) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        async with stores[0]._connection() as conn:
            assert await conn.fetch("SELECT version FROM schema_version") == [(3,)]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_an_unstorable_value_fails_the_whole_write(store: PostgresStore) -> None:
    with pytest.raises(StoreError) as caught:
        await store.write([Create(record("ok")), Create(record("huge", attempt=2**64))])
    assert caught.value.__cause__ is not None
    assert await store.get_many(["ok", "huge"]) == {}


async def test_a_dropped_connection_fails_at_most_one_call(
    store: PostgresStore, postgres_dsn: str
) -> None:
    await store.write([Create(record("before"))])
    async with store._connection() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(postgres_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    # The call that meets the dead connection may fail; the next one must not.
    with contextlib.suppress(StoreError):
        await store.write([Create(record("during"))])
    [after] = await store.write([Create(record("after"))])
    assert after is not None and "before" in await store.get_many(["before"])


async def test_a_closed_store_refuses_work(postgres_dsn: str, postgres_schema: str) -> None:
    store = PostgresStore(postgres_dsn, schema=postgres_schema)
    with pytest.raises(StoreError, match="not open"):
        await store.write([Create(record("x"))])
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get_many(["x"])
    with pytest.raises(StoreError, match="not open"):
        await store.listen(print)


async def test_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="cannot connect"):
        await store.open()


async def test_a_write_chosen_to_break_a_deadlock_is_retried(
    store: PostgresStore, postgres_dsn: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A real deadlock: another session locks row "a", the store's transaction
    # inserts "y" and then waits for "a", and the other session then waits for
    # "y". PostgreSQL rolls back the session whose wait began first (the
    # store's: its deadlock check fires after 1 s, the other one's after 30 s);
    # the store runs the transaction again and it succeeds.
    caplog.set_level("INFO", logger="resonate_async")
    await store.write([Create(record("a"))])
    other = await asyncpg.connect(postgres_dsn, server_settings={"search_path": postgres_schema})
    try:
        await other.execute("SET deadlock_timeout = '30s'")
        async with other.transaction():
            await other.execute("UPDATE promises SET attempt = 2 WHERE id = 'a'")
            write = asyncio.create_task(
                store.write([Create(record("y")), Settle("a", State.RESOLVED, b"1", 1.0)])
            )
            await _wait_until_blocked(other)
            theirs = record("y", state=State.RESOLVED, value=b"theirs", settled_at=1.0)
            await other.execute(
                "INSERT INTO promises (id, state, kind, root_id, created_at, version, "
                "attempt, value) VALUES ('y', 'RESOLVED', $1, 'y', 0, 1, 1, $2)",
                theirs.kind.value,
                theirs.value,
            )
        y, a = await asyncio.wait_for(write, 30)
    finally:
        await other.close()
    # The retry saw the other session's committed row "y" (so its create left
    # it as it was) and settled "a".
    assert y is not None and y.value == b"theirs"
    assert a is not None and a.state is State.RESOLVED and a.attempt == 2
    assert "rolled a transaction back" in caplog.text


async def _wait_until_blocked(conn: Any) -> None:  # an asyncpg.Connection
    """Until some other session waits for a lock that ``conn``'s transaction holds."""
    async with asyncio.timeout(10):
        while not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            conn.get_server_pid(),
        ):
            await asyncio.sleep(0.01)
