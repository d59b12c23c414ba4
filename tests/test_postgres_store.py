"""PostgresStore beyond the protocol: LISTEN/NOTIFY, schemas, faults."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio

from resonate_async._store_suite import record
from resonate_async.errors import StoreError
from resonate_async.stores import Create, Settle, State
from resonate_async.stores._sql import POSTGRES, SCHEMA_VERSION, SCHEMA_VERSION_DDL, migrations
from resonate_async.stores.postgres import PostgresStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

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
    # The call that meets the dead connection may fail, saying so in words
    # (not asyncpg's "cannot switch to state 15"); the next one must not fail.
    try:
        await store.write([Create(record("during"))])
    except StoreError as exc:
        assert "connection to PostgreSQL was lost" in str(exc), exc
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


@asynccontextmanager
async def _admin(dsn: str, schema: str | None = None) -> AsyncIterator[Any]:
    """A superuser connection (an ``asyncpg.Connection``), closed afterwards."""
    settings = {} if schema is None else {"search_path": f'"{schema}"'}
    conn = await asyncpg.connect(dsn, server_settings=settings)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "ddl",
    [
        # Home-grown, with the store's own layout.
        "CREATE TABLE schema_version (version integer NOT NULL); "
        "INSERT INTO schema_version VALUES (1), (2)",
        # Flyway 4 and older.
        "CREATE TABLE schema_version (installed_rank int PRIMARY KEY, version varchar(50), "
        "description text); INSERT INTO schema_version VALUES (1, '1', 'init'), (2, '2', 'users')",
    ],
    ids=["home-grown", "flyway"],
)
async def test_an_apps_own_schema_version_table_is_left_alone(
    postgres_dsn: str, postgres_schema: str, ddl: str
) -> None:
    async with _admin(postgres_dsn) as admin:
        await admin.execute(f'CREATE SCHEMA "{postgres_schema}"')
    async with _admin(postgres_dsn, postgres_schema) as app:
        await app.execute(ddl)
        before = await app.fetch("SELECT * FROM schema_version")
        with pytest.raises(StoreError, match=r"not resonate_async's.*\?schema=resonate"):
            await PostgresStore(postgres_dsn, schema=postgres_schema).open()
        assert await app.fetch("SELECT * FROM schema_version") == before
        assert await app.fetchval("SELECT to_regclass('promises')") is None


async def test_a_store_of_an_earlier_version_is_migrated(
    postgres_dsn: str, postgres_schema: str
) -> None:
    async with _admin(postgres_dsn) as admin:
        await admin.execute(f'CREATE SCHEMA "{postgres_schema}"')
    async with _admin(postgres_dsn, postgres_schema) as old:
        await old.execute(SCHEMA_VERSION_DDL)
        for statement in migrations(POSTGRES)[0]:
            await old.execute(statement)
        await old.execute("INSERT INTO schema_version VALUES (1)")
        async with PostgresStore(postgres_dsn, schema=postgres_schema) as store:
            await store.write([Create(record("kept"))])
        assert await old.fetch("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_a_schema_name_of_63_bytes_works(postgres_dsn: str, postgres_schema: str) -> None:
    schema = postgres_schema.ljust(63, "x")  # the longest name PostgreSQL allows
    try:
        async with PostgresStore(postgres_dsn, schema=schema) as store:
            heard = Heard()
            await store.listen(heard)
            await store.write([Create(record("l-1")), Settle("l-1", State.RESOLVED, None, 1.0)])
            await heard.wait_for("l-1")
    finally:
        async with _admin(postgres_dsn) as admin:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def app_dsn(postgres_dsn: str) -> Iterator[str]:
    """The DSN of a new login role that has no privileges yet; dropped afterwards."""
    role = f"resonate_test_app_{uuid.uuid4().hex[:12]}"
    password = uuid.uuid4().hex
    asyncio.run(_as_admin(postgres_dsn, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
    url = urlsplit(postgres_dsn)
    yield urlunsplit(url._replace(netloc=f"{role}:{password}@{url.netloc.rpartition('@')[2]}"))
    asyncio.run(_as_admin(postgres_dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}"))


async def _as_admin(dsn: str, *statements: str) -> None:
    async with _admin(dsn) as admin:
        for statement in statements:
            await admin.execute(statement)


async def test_a_role_without_create_privileges_uses_an_existing_store(
    postgres_dsn: str, postgres_schema: str, app_dsn: str
) -> None:
    async with PostgresStore(postgres_dsn, schema=postgres_schema):
        pass  # the owner creates the store
    role = urlsplit(app_dsn).username
    async with _admin(postgres_dsn, postgres_schema) as admin:
        # The privileges docs/deployment.md lists.
        await admin.execute(f'GRANT USAGE ON SCHEMA "{postgres_schema}" TO {role}')
        await admin.execute(f"GRANT SELECT, INSERT, UPDATE ON promises TO {role}")
        await admin.execute(f"GRANT SELECT ON schema_version TO {role}")
    async with PostgresStore(app_dsn, schema=postgres_schema) as store:
        heard = Heard()
        await store.listen(heard)
        await store.write([Create(record("p-1")), Settle("p-1", State.RESOLVED, b"1", 1.0)])
        # Two settles of one id take the exact path, which locks the table.
        await store.write([Create(record("p-2"))])
        await store.write(
            [Settle("p-2", State.REJECTED, None, 1.0), Settle("p-2", State.RESOLVED, None, 2.0)]
        )
        await heard.wait_for("p-1", "p-2")


async def test_listening_resumes_after_the_connection_is_dropped(
    store: PostgresStore, postgres_dsn: str
) -> None:
    heard = Heard()
    await store.listen(heard)
    async with _admin(postgres_dsn) as admin:
        listening = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND query LIKE $1",
            f"%{store.schema}%",
        )
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", listening)
    # Settles made before the store listens again are not announced; keep
    # settling until one is.
    async with asyncio.timeout(30):
        for n in itertools.count():
            await store.write(
                [Create(record(f"r-{n}")), Settle(f"r-{n}", State.RESOLVED, None, 1.0)]
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await heard.wait_for(f"r-{n}")
                break


async def test_no_schema_and_the_default_schema_by_name_wake_each_other(
    postgres_dsn: str, postgres_schema: str
) -> None:
    # The server's default schema here is the test's own: asyncpg passes
    # unknown URL parameters on as server settings.
    default_dsn = (
        f"{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}search_path={postgres_schema}"
    )
    async with (
        PostgresStore(postgres_dsn, schema=postgres_schema) as named,
        PostgresStore(default_dsn) as unnamed,
    ):
        heard_by_named, heard_by_unnamed = Heard(), Heard()
        await named.listen(heard_by_named)
        await unnamed.listen(heard_by_unnamed)
        await unnamed.write([Create(record("u-1")), Settle("u-1", State.RESOLVED, None, 1.0)])
        await named.write([Create(record("u-2")), Settle("u-2", State.RESOLVED, None, 1.0)])
        await heard_by_named.wait_for("u-1", "u-2")
        await heard_by_unnamed.wait_for("u-1", "u-2")
