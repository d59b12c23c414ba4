"""Every store backend against the conformance suite, and choosing a store by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import pytest
import pytest_asyncio

from resonate_async._store_suite import StoreConformance, record
from resonate_async.stores import (
    Create,
    Kind,
    MemoryStore,
    PromiseRecord,
    SQLiteStore,
    State,
    Store,
    store_from_spec,
)
from resonate_async.stores.postgres import PostgresStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()


class TestSQLiteStore(StoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SQLiteStore]:
        async with SQLiteStore(tmp_path / "promises.db") as store:
            yield store

    @pytest.fixture
    async def peer_store(self, tmp_path: Path, store: Store) -> AsyncIterator[SQLiteStore]:
        async with SQLiteStore(tmp_path / "promises.db") as peer:
            yield peer

    @pytest.fixture
    async def reopen(self, tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
        opened: list[SQLiteStore] = []

        async def again() -> Store:
            store = SQLiteStore(tmp_path / "promises.db")
            await store.open()
            opened.append(store)
            return store

        yield again
        for store in opened:
            await store.close()


class TestPostgresStore(StoreConformance):
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        *StoreConformance.pytestmark,
        pytest.mark.postgres,
    ]

    @pytest.fixture
    async def store(self, postgres_dsn: str, postgres_schema: str) -> AsyncIterator[PostgresStore]:
        async with PostgresStore(postgres_dsn, schema=postgres_schema) as store:
            yield store

    @pytest.fixture
    async def peer_store(
        self, postgres_dsn: str, postgres_schema: str, store: Store
    ) -> AsyncIterator[PostgresStore]:
        async with PostgresStore(postgres_dsn, schema=postgres_schema) as peer:
            yield peer

    @pytest.fixture
    async def reopen(
        self, postgres_dsn: str, postgres_schema: str
    ) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
        opened: list[PostgresStore] = []

        async def again() -> Store:
            store = PostgresStore(postgres_dsn, schema=postgres_schema)
            await store.open()
            opened.append(store)
            return store

        yield again
        for store in opened:
            await store.close()


# -- behaviour of this package's stores beyond the protocol ----------------------


@pytest_asyncio.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "sqlite":
        store = SQLiteStore(tmp_path / "any.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        store = PostgresStore(dsn, schema=request.getfixturevalue("postgres_schema"))
    await store.open()
    yield store
    await store.close()


async def test_write_rejects_a_non_op_and_applies_nothing(any_store: Store) -> None:
    with pytest.raises(TypeError, match="Create and Settle"):
        await any_store.write([Create(record("typed")), "oops"])  # type: ignore[list-item]
    assert await any_store.get_many(["typed"]) == {}


async def test_stores_are_async_context_managers(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "ctx.db") as store:
        assert await store.write([Create(record("ctx"))]) != [None]
    async with MemoryStore() as memory:
        assert await memory.get_many(["ctx"]) == {}


def test_stores_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(MemoryStore(), Store)
    assert isinstance(SQLiteStore(tmp_path / "p.db"), Store)
    assert isinstance(PostgresStore("postgresql://nowhere/db"), Store)


# -- store_from_spec ---------------------------------------------------------------


def test_spec_store_instance_is_returned_as_is() -> None:
    store = MemoryStore()
    assert store_from_spec(store) is store


def test_spec_memory() -> None:
    assert isinstance(store_from_spec(":memory:"), MemoryStore)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("app.db", "app.db"),
        ("data/app.db", "data/app.db"),
        ("/var/lib/app.db", "/var/lib/app.db"),
        ("sqlite:///relative/app.db", "relative/app.db"),
        ("sqlite:////abs/app.db", "/abs/app.db"),
        ("SQLITE:///x.db", "x.db"),
        ("sqlite:////data/my%20app.db", "/data/my app.db"),  # a URL is percent-decoded
        ("my%20app.db", "my%20app.db"),  # a path is not
        (Path("p/app.db"), "p/app.db"),
    ],
)
def test_spec_sqlite(spec: str | Path, path: str) -> None:
    store = store_from_spec(spec)
    assert isinstance(store, SQLiteStore) and store.path == path


@pytest.mark.parametrize("spec", ["sqlite:////tmp/q.db?mode=ro", "sqlite:///q.db#x"])
def test_spec_sqlite_url_refuses_a_query(spec: str) -> None:
    with pytest.raises(ValueError, match="takes no query or fragment"):
        store_from_spec(spec)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_spec_postgres(scheme: str) -> None:
    assert isinstance(store_from_spec(f"{scheme}://u@h:5432/db"), PostgresStore)


@pytest.mark.parametrize(
    ("url", "dsn", "schema"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db", None),
        ("postgresql://u@h/db?schema=resonate", "postgresql://u@h/db", "resonate"),
        (
            "postgres://u@h/db?sslmode=disable&schema=a%20b",
            "postgres://u@h/db?sslmode=disable",
            "a b",
        ),
    ],
)
def test_spec_postgres_schema_parameter(url: str, dsn: str, schema: str | None) -> None:
    store = store_from_spec(url)
    assert isinstance(store, PostgresStore)
    assert (store._dsn, store._schema) == (dsn, schema)


@pytest.mark.parametrize(
    "url", ["postgresql://h/db?schema=", "postgresql://h/db?schema=a&schema=b"]
)
def test_spec_postgres_schema_must_be_one_name(url: str) -> None:
    with pytest.raises(ValueError, match="one non-empty schema="):
        store_from_spec(url)


def test_spec_none_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESONATE_STORE", ":memory:")
    assert isinstance(store_from_spec(None), MemoryStore)
    monkeypatch.setenv("RESONATE_STORE", "sqlite:///env.db")
    store = store_from_spec(None)
    assert isinstance(store, SQLiteStore) and store.path == "env.db"
    monkeypatch.delenv("RESONATE_STORE")
    store = store_from_spec(None)
    assert isinstance(store, SQLiteStore) and store.path == "resonate.db"


@pytest.mark.parametrize("spec", ["", "  ", "mysql://u@h/db", "sqlite://", "sqlite:///", 42])
def test_spec_rejects_other_forms(spec: object) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///relative/path.*postgresql://"):
        store_from_spec(spec)  # type: ignore[arg-type]


def test_package_imports_without_asyncpg() -> None:
    # A fresh interpreter where asyncpg cannot be imported.
    script = """
import sys
sys.modules["asyncpg"] = None
import resonate_async.stores as stores
from resonate_async.stores import store_from_spec, PostgresStore
assert isinstance(store_from_spec(":memory:"), stores.MemoryStore)
for make in (lambda: PostgresStore("postgresql://h/db"), lambda: store_from_spec("postgres://h/db")):
    try:
        make()
    except ImportError as exc:
        assert 'pip install "resonate-async[postgres]"' in str(exc), exc
    else:
        raise SystemExit("no ImportError")
print("ok")
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_new_record_builds_the_same_record_as_the_dataclass() -> None:
    import dataclasses

    from resonate_async.stores._base import FIELDS, new_record

    assert tuple(f.name for f in dataclasses.fields(PromiseRecord)) == FIELDS
    values = (
        "r.1", State.RESOLVED, Kind.COMMAND, "r", 1.5, "Cmd", 2, b"[1]", b"2", "r", 9.0,
        3.5, 4, "worker", 7.5, {"k": "v"},
    )  # fmt: skip
    built = new_record(*values)
    assert type(built) is PromiseRecord and built == PromiseRecord(*values)
    assert hash(new_record(*values[:-1], None)) == hash(PromiseRecord(*values[:-1], None))
    assert [getattr(built, f) for f in FIELDS] == list(values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.id = "other"  # type: ignore[misc]


def test_new_create_and_new_settle_build_the_same_ops_as_the_dataclasses() -> None:
    import dataclasses

    from resonate_async.stores._base import Settle, new_create, new_settle

    prior = PromiseRecord("r", State.PENDING, Kind.RUN, "r", 1.0)
    create, settle = new_create(prior), new_settle("r", State.REJECTED, b"e", 2.0, prior)
    assert create == Create(prior) and create.record is prior
    assert settle == Settle("r", State.REJECTED, b"e", 2.0)
    assert (settle.id, settle.state, settle.value, settle.settled_at) == (
        "r",
        State.REJECTED,
        b"e",
        2.0,
    )
    assert settle.prior is prior
    assert type(settle) is Settle
    with pytest.raises(dataclasses.FrozenInstanceError):
        settle.id = "other"  # type: ignore[misc]
