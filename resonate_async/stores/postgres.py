"""``PostgresStore``: the distributed engine, PostgreSQL through asyncpg.

Every worker of a deployment points at the same database and coordinates only
through it (DESIGN §7): leases on pending runs are taken with
``FOR UPDATE SKIP LOCKED``, and each transaction that settles promises sends
``NOTIFY "resonate_settled:<schema>", '<id>'`` so waiters elsewhere wake up without
polling (``PostgresStore.listen``, which hands the receiving side to a
``resonate_async.stores._pg_listener.ChannelListener``).

Opening a store that is already current reads its version and changes
nothing, so a role with only ``USAGE`` on the schema and DML privileges on
the tables can use a store its owner created.

asyncpg is imported when a store is created, so the package imports without
it; a missing driver is an ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
from contextlib import asynccontextmanager
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import StoreError
from ._base import Kind, Op, PromiseRecord, State, StoreLifecycle
from ._pg_listener import ChannelListener
from ._sql import (
    COLUMN_LIST,
    COLUMNS,
    POSTGRES,
    SCHEMA_VERSION,
    SCHEMA_VERSION_DDL,
    FastPathMiss,
    FastPlan,
    check_limit,
    fast_plan,
    migrations,
    record_to_row,
    resolve_exactly,
    row_to_record,
    search_query,
    touched_ids,
    upsert_sql,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

__all__ = ("SETTLED_CHANNEL", "PostgresStore")

logger = logging.getLogger("resonate_async")
_T = TypeVar("_T")

# Attempts at a transaction that PostgreSQL rolls back to break a deadlock.
_ATTEMPTS = 5

#: The prefix of the channels on which the ids of newly settled promises are
#: announced: a store NOTIFYs on ``resonate_settled:<schema>`` (one channel per
#: schema), or ``resonate_settled#<hash of the schema>`` for a schema name too
#: long for that to fit in an identifier; see ``PostgresStore.channel``.
SETTLED_CHANNEL = "resonate_settled"
# The longest identifier PostgreSQL keeps whole (NAMEDATALEN - 1): a longer
# channel name is refused by NOTIFY and silently truncated by LISTEN.
_MAX_IDENTIFIER = 63
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; a longer id is
# not announced and its waiters fall back to polling.
_MAX_PAYLOAD = 7999

_RETURNING = ", ".join(f"p.{c}" for c in COLUMNS)

# One statement per batch whatever its size. The rows travel as one array of
# the table's own row type (each row a tuple in COLUMNS order, which is the
# table's column order): asyncpg encodes a tuple field by field, whereas an
# array per column costs it a few ``isinstance`` checks against the
# ``collections.abc`` classes per value, which took more client time than
# everything else in a bulk insert.
_INSERT = (
    f"INSERT INTO promises ({COLUMN_LIST}) SELECT {COLUMN_LIST} FROM unnest($1::promises[]) "
    "ON CONFLICT (id) DO NOTHING"
)
_SETTLE_COUNT = (
    "UPDATE promises AS p SET state = v.state, value = v.value, settled_at = v.settled_at, "
    "owner = NULL, lease_expires_at = NULL "
    "FROM unnest($1::text[], $2::text[], $3::bytea[], $4::float8[]) "
    "AS v (id, state, value, settled_at) "
    "WHERE p.id = v.id AND p.state = 'PENDING'"
)
# The same, sending the settled rows back, for a batch with settles whose
# results must be read (no ``prior``, not created in the batch).
_SETTLE = f"{_SETTLE_COUNT} RETURNING {_RETURNING}"
_UPSERT = upsert_sql(POSTGRES)
_SELECT = f"SELECT {COLUMN_LIST} FROM promises WHERE id = ANY($1::text[])"
_TREE = f"SELECT {COLUMN_LIST} FROM promises WHERE root_id = $1 ORDER BY created_at, id"
_TREES = (
    f"SELECT {COLUMN_LIST} FROM promises WHERE root_id = ANY($1::text[]) ORDER BY created_at, id"
)
_NOTIFY = "SELECT pg_notify($2, i) FROM unnest($1::text[]) AS i"
_RENEW = "UPDATE promises SET lease_expires_at = $1 WHERE owner = $2 AND state = 'PENDING'"
_RELEASE = (
    "UPDATE promises SET owner = NULL, lease_expires_at = NULL "
    "WHERE owner = $1 AND id = ANY($2::text[])"
)
_FUNCS = " AND (func, version) IN (SELECT * FROM unnest($6::text[], $7::int8[]))"
_CLAIM = (
    "UPDATE promises AS p SET owner = $1, lease_expires_at = $2 FROM ("
    "SELECT id FROM promises WHERE state = 'PENDING' AND kind = ANY($3::text[]) "
    "AND (owner IS NULL OR lease_expires_at <= $4){funcs} "
    "ORDER BY created_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) AS c "
    f"WHERE p.id = c.id RETURNING {_RETURNING}"
)


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:
        raise ImportError(
            'PostgresStore needs asyncpg: pip install "resonate-async[postgres]"'
        ) from exc
    return asyncpg


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_by_id = attrgetter("id")

# The tables of the schema the store would create its tables in, with the
# columns of schema_version (its "version" column only, in a store's).
_TABLES = (
    "SELECT c.relname, a.attname, a.atttypid::regtype::text FROM pg_class c "
    "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND c.relname = 'schema_version' "
    "AND a.attnum > 0 AND NOT a.attisdropped "
    "WHERE c.relnamespace = to_regnamespace(quote_ident(current_schema())) "
    "AND c.relname IN ('promises', 'schema_version') ORDER BY a.attnum"
)
_OWN_SCHEMA = (
    "give the store a schema of its own: PostgresStore(dsn, schema='resonate') or "
    "postgresql://...?schema=resonate"
)


def _settled_channel(schema: str) -> str:
    """The NOTIFY channel of the store in ``schema``.

    ``resonate_settled:<schema>`` when that is a valid identifier; for a
    longer schema name, a bounded name derived from it.
    """
    channel = f"{SETTLED_CHANNEL}:{schema}"
    if len(channel.encode()) <= _MAX_IDENTIFIER:
        return channel
    return f"{SETTLED_CHANNEL}#{hashlib.sha256(schema.encode()).hexdigest()[:40]}"


def _count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 42" or "UPDATE 42".
    return int(status.rsplit(" ", 1)[1])


class PostgresStore(StoreLifecycle):
    """A durable promise store in PostgreSQL, shared by many workers.

    Args:
        dsn: a ``postgresql://`` URL, as accepted by asyncpg.
        schema: the schema holding the tables (created if missing); the
            connection's ``search_path`` is set to it. ``None`` uses the
            server's default ``search_path``.
        min_connections: connections the pool keeps open.
        max_connections: connections the pool may open.
        notify: send a ``NOTIFY`` on the store's ``channel``
            (``resonate_settled:<schema>``) with the id of each settled promise.

    Raises:
        ImportError: asyncpg is not installed.

    Example:
        >>> async with PostgresStore("postgresql://app@db/app") as store:  # doctest: +SKIP
        ...     await store.listen(print)
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_connections: int = 1,
        max_connections: int = 10,
        notify: bool = True,
    ) -> None:
        if not 0 <= min_connections <= max_connections or max_connections < 1:
            raise ValueError(
                "need 0 <= min_connections <= max_connections and max_connections >= 1, "
                f"got {min_connections} and {max_connections}"
            )
        self._asyncpg = _import_asyncpg()
        self._errors: tuple[type[BaseException], ...] = (
            self._asyncpg.PostgresError,
            self._asyncpg.InterfaceError,
            # What asyncpg raises on a connection the server dropped mid-use.
            self._asyncpg.InternalClientError,
            OSError,
            OverflowError,
        )
        self._rolled_back: type[BaseException] = self._asyncpg.exceptions.TransactionRollbackError
        self._dsn = dsn
        self._schema = schema
        self._settings = {} if schema is None else {"search_path": _quote_ident(schema)}
        self._min = min_connections
        self._max = max_connections
        self._notify = notify
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._channel = None if schema is None else _settled_channel(schema)
        self._listener: ChannelListener | None = None

    @property
    def schema(self) -> str | None:
        """The schema holding the tables, if one was given."""
        return self._schema

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self._schema!r})"

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this store: one per schema, so stores never wake each other.

        Without a ``schema``, the channel is that of the schema the server
        puts the tables in, known once the store is open.

        Raises:
            StoreError: no schema was given and the store was never opened.
        """
        if self._channel is None:
            raise StoreError(f"{self!r} is not open: call `await store.open()` first")
        return self._channel

    async def open(self) -> None:
        """Create the pool and create or migrate the schema. Idempotent.

        Raises:
            StoreError: the server cannot be reached or the schema migrated.
        """
        async with self._opening:
            if self._pool is not None:
                return
            try:
                pool = await self._asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min,
                    max_size=self._max,
                    server_settings=self._settings,
                )
            except self._errors as exc:
                raise StoreError(
                    f"cannot connect to PostgreSQL: {exc}; check the DSN and that the "
                    "server is running"
                ) from exc
            try:
                async with pool.acquire() as conn:
                    await self._migrate(conn)
                    if self._channel is None:
                        schema = await conn.fetchval("SELECT current_schema()")
                        self._channel = _settled_channel(schema)
            except BaseException as exc:
                await pool.close()
                if isinstance(exc, self._errors):
                    raise StoreError(f"cannot prepare the PostgreSQL schema: {exc}") from exc
                raise
            self._pool = pool

    async def _holds_promises(self) -> bool:
        """Whether the schema holds a store already (without creating one).

        Raises:
            ValueError: asyncpg cannot parse the DSN (a port that is no number, say).
            StoreError: the server cannot be reached.
        """
        try:
            conn = await self._asyncpg.connect(self._dsn, server_settings=self._settings)
        except ValueError as exc:  # asyncpg parses the DSN only when connecting
            raise ValueError(f"invalid PostgreSQL URL: {exc}") from None
        except self._errors as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            return bool(await conn.fetchval("SELECT to_regclass('promises') IS NOT NULL"))
        finally:
            await conn.close()

    async def _migrate(self, conn: Any) -> None:
        # A current store is only read: even CREATE ... IF NOT EXISTS needs
        # the CREATE privilege, which the roles using a store may lack.
        if await self._version(conn) == SCHEMA_VERSION:
            return
        async with conn.transaction():
            # Workers starting together migrate once: the others wait here.
            key = f"resonate_async.migrate:{self._schema or ''}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
            current = await self._version(conn)
            if current == SCHEMA_VERSION:
                return
            if self._schema is not None:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self._schema)}")
            if current is None:
                await conn.execute(SCHEMA_VERSION_DDL)
            for step in migrations(POSTGRES)[current or 0 :]:
                for statement in step:
                    await conn.execute(statement)
            await conn.execute("DELETE FROM schema_version")
            await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)

    async def _version(self, conn: Any) -> int | None:
        """The store's schema version; ``None`` if there is no store yet.

        Raises:
            StoreError: the tables are not a store's (an application's own
                ``schema_version`` table, say), or are newer than this code.
        """
        rows = await conn.fetch(_TABLES)
        tables = {row[0] for row in rows}
        if not tables:
            return None
        columns = [tuple(row[1:]) for row in rows if row[0] == "schema_version"]
        if "schema_version" not in tables:
            found = "a promises table but no schema_version table"
        elif columns != [("version", "integer")]:
            found = "a schema_version table with other columns than (version integer)"
        elif "promises" not in tables:
            found = "a schema_version table but no promises table"
        else:
            found = ""
        if found:
            # Never write to tables the store did not create.
            schema = await conn.fetchval("SELECT current_schema()")
            raise StoreError(
                f"schema {schema!r} holds {found}: these tables are not resonate_async's "
                f"(your application's, perhaps) and the store leaves them alone; {_OWN_SCHEMA}"
            )
        current: int = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {current}, newer than this "
                f"resonate_async knows ({SCHEMA_VERSION}); upgrade resonate_async"
            )
        return current

    async def close(self) -> None:
        """Close the listener connection and the pool. Idempotent."""
        await self._stop_listening()
        pool, self._pool = self._pool, None
        try:
            if pool is not None:
                await pool.close()
        except self._errors as exc:
            raise StoreError(f"closing the PostgreSQL connections failed: {exc}") from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection, with driver errors as ``StoreError``."""
        if self._pool is None:
            raise StoreError(f"{self!r} is not open: call `await store.open()` first")
        acquired = False
        try:
            async with self._pool.acquire() as conn:
                acquired = True
                yield conn
        except self._errors as exc:
            if not acquired:  # nothing was sent
                raise StoreError(
                    f"cannot get a connection to PostgreSQL: {exc}; nothing was done. "
                    "Check that the server is up and reachable"
                ) from exc
            raise self._failed(exc) from exc

    def _failed(self, exc: BaseException) -> StoreError:
        """A driver error as the ``StoreError`` callers get, a lost connection said so."""
        lost = isinstance(
            exc,
            self._asyncpg.InternalClientError  # an operation cut short by the server
            | self._asyncpg.exceptions.PostgresConnectionError
            | OSError,
        ) or "connection is closed" in str(exc)
        if lost:
            return StoreError(
                f"the connection to PostgreSQL was lost ({type(exc).__name__}: {exc}); "
                "the call may or may not have taken effect. The next call reconnects, "
                "and runs it stopped resume by themselves"
            )
        return StoreError(f"PostgreSQL operation failed: {exc}")

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        """Apply ``ops`` in order in one transaction; see ``Store.write``.

        Raises:
            StoreError: the transaction failed and was rolled back.
            TypeError: an op is neither ``Create`` nor ``Settle``.
        """
        if not ops:
            return []
        return await self._retried(self._write, ops, fast_plan(ops))

    async def _write(self, ops: Sequence[Op], plan: FastPlan | None) -> list[PromiseRecord | None]:
        async with self._connection() as conn:
            if plan is not None:
                try:
                    async with conn.transaction():
                        return await self._write_fast(conn, plan)
                except FastPathMiss:
                    pass
            async with conn.transaction():
                return await self._write_exact(conn, ops)

    async def _write_fast(self, conn: Any, plan: FastPlan) -> list[PromiseRecord | None]:
        # Rows are written in id order, so that workers writing overlapping
        # rows lock them in the same order (fewer deadlocks to retry); the
        # results do not depend on it.
        creates = sorted(plan.creates, key=_by_id)
        settles = sorted(plan.settles, key=_by_id)
        unread = plan.unread
        if creates:
            new_rows = [record_to_row(r) for r in creates]
            if _count(await conn.execute(_INSERT, new_rows)) != len(creates):
                raise FastPathMiss
        if not settles:
            return plan.results  # the ops are exactly these creates, in order
        ids = [s.id for s in settles]
        args = (
            ids,
            [s.state for s in settles],
            [s.value for s in settles],
            [s.settled_at for s in settles],
        )
        stored: dict[str, PromiseRecord] = {}
        if unread:
            # Some results must be read: have the update send the rows back.
            rows = await conn.fetch(_SETTLE, *args)
            if len(rows) != len(settles):
                raise FastPathMiss
            wanted = set(unread)
            stored = {row[0]: row_to_record(row) for row in rows if row[0] in wanted}
        elif _count(await conn.execute(_SETTLE_COUNT, *args)) != len(settles):
            raise FastPathMiss
        await self._announce(conn, ids)
        return plan.fill(stored)

    async def _write_exact(self, conn: Any, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        # Rows that do not exist yet cannot be locked one by one, so the rare
        # exact path locks out other writers for its (short) duration; the
        # rows read are then the rows the ops apply to.
        await conn.execute("LOCK TABLE promises IN SHARE ROW EXCLUSIVE MODE")
        rows = await conn.fetch(_SELECT, touched_ids(ops))
        before = {row[0]: row_to_record(row) for row in rows}
        results, changed, settled = resolve_exactly(ops, before)
        if changed:
            await conn.executemany(_UPSERT, [record_to_row(r) for r in changed])
        await self._announce(conn, settled)
        return results

    async def _announce(self, conn: Any, ids: list[str]) -> None:
        # Inside the transaction: PostgreSQL delivers the notifications at
        # commit, and drops them on rollback.
        if self._notify and ids:
            small = [i for i in ids if len(i.encode()) <= _MAX_PAYLOAD]
            await conn.execute(_NOTIFY, small, self._channel)

    async def _query(self, sql: str, *args: object) -> list[PromiseRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
        return [row_to_record(row) for row in rows]

    async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
        """The stored records among ``ids``; see ``Store.get_many``."""
        if not ids:
            return {}
        return {r.id: r for r in await self._query(_SELECT, list(dict.fromkeys(ids)))}

    async def tree(self, root_id: str) -> list[PromiseRecord]:
        """Every record of the tree of ``root_id``, ordered by ``created_at`` then id."""
        return await self._query(_TREE, root_id)

    async def trees(self, root_ids: Sequence[str]) -> dict[str, list[PromiseRecord]]:
        """``tree`` of each of ``root_ids``, in one query."""
        found: dict[str, list[PromiseRecord]] = {root: [] for root in root_ids}
        for record in await self._query(_TREES, list(found)):
            found[record.root_id].append(record)
        return found

    async def search(
        self,
        *,
        state: State | None = None,
        kind: Kind | None = None,
        prefix: str | None = None,
        limit: int | None = 100,
    ) -> list[PromiseRecord]:
        """Records matching every filter; see ``Store.search``."""
        check_limit(limit)
        sql, args = search_query(POSTGRES, state=state, kind=kind, prefix=prefix, limit=limit)
        return await self._query(sql, *args)

    async def claim(
        self,
        owner: str,
        *,
        now: float,
        lease_until: float,
        funcs: Sequence[tuple[str, int]] | None = None,
        kinds: Sequence[Kind] = (Kind.RUN,),
        limit: int = 1000,
    ) -> list[PromiseRecord]:
        """Lease free pending promises to ``owner``, oldest first; see ``Store.claim``.

        Rows another worker is claiming at the same moment are skipped, not
        waited for (``FOR UPDATE SKIP LOCKED``).
        """
        check_limit(limit)
        if not kinds or limit == 0 or (funcs is not None and not funcs):
            return []
        args: list[object] = [owner, lease_until, [k.value for k in kinds], now, limit]
        if funcs is not None:
            args += [[f for f, _ in funcs], [v for _, v in funcs]]
        sql = _CLAIM.format(funcs="" if funcs is None else _FUNCS)
        claimed = await self._query(sql, *args)
        return sorted(claimed, key=lambda r: (r.created_at, r.id))

    async def renew(self, owner: str, *, lease_until: float) -> int:
        """Extend ``owner``'s pending leases; return how many."""
        return _count(await self._retried(self._execute, _RENEW, lease_until, owner))

    async def release(self, owner: str, ids: Sequence[str]) -> None:
        """Free ``owner``'s leases on ``ids``; others' leases are untouched."""
        if ids:
            await self._retried(self._execute, _RELEASE, owner, list(ids))

    async def _execute(self, sql: str, *args: object) -> str:
        async with self._connection() as conn:
            return str(await conn.execute(sql, *args))

    async def _retried(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``await fn(*args)``, again if PostgreSQL rolled it back to break a deadlock.

        A deadlock (or serialization failure) rolls the whole transaction
        back, so running it again is safe. Two workers can meet in one: a
        worker settling runs it no longer leases (taken over by another
        worker after its lease lapsed) while the new owner renews them, each
        statement locking the rows in its own order.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await fn(*args)
            except StoreError as exc:
                if attempt == _ATTEMPTS or not isinstance(exc.__cause__, self._rolled_back):
                    raise
                logger.info("PostgreSQL rolled a transaction back (%s); retrying it", exc.__cause__)
                await asyncio.sleep(random.uniform(0, 0.01 * attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def listen(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(id)`` for each promise settled by any worker, from now on.

        The first listener opens a dedicated connection (outside the pool)
        that receives the store's ``NOTIFY`` (see ``channel``); when that
        connection drops, it is opened again, retrying with backoff, and
        settles made meanwhile are not announced. Callbacks run on the event
        loop and must not block; an exception in one is logged and ignored.

        Raises:
            StoreError: the store is closed or the connection failed.
        """
        async with self._opening:
            if self._pool is None:
                raise StoreError(f"{self!r} is not open: call `await store.open()` first")
            if self._listener is None:
                connect = functools.partial(
                    self._asyncpg.connect, self._dsn, server_settings=self._settings
                )
                try:
                    self._listener = await ChannelListener.open(
                        connect, self.channel, self._errors, name=repr(self)
                    )
                except self._errors as exc:
                    raise StoreError(f"cannot LISTEN on PostgreSQL: {exc}") from exc
            self._listener.add(callback)

    async def unlisten(self, callback: Callable[[str], None]) -> None:
        """Stop calling ``callback``; the last one closes the listening connection."""
        async with self._opening:
            if self._listener is not None:
                self._listener.remove(callback)
                if not self._listener.callbacks:
                    await self._stop_listening()

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
