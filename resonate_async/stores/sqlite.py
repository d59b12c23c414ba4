"""``SQLiteStore``: the embedded default, one SQLite file through aiosqlite.

aiosqlite runs every call on one thread per connection, so each awaited call
is a thread hop. A write is one hop whatever its size: ``BEGIN IMMEDIATE``, a
few multi-row statements for its creates and its settles, a read of the
settled rows only for settles that carry no ``prior`` (and were not created
in the batch), and ``COMMIT``, all in one function on the connection's thread
(``_sqlite_write``); should the bulk statements not apply as planned, the
same call redoes the write exactly. So writes run in
the order they were queued, and the group-commit writer may queue the next
transaction while the last one is still being written
(``pipeline_depth = 2``): the thread goes from one commit straight to the
next, without waiting for the event loop to come back to it.

Several processes may share one file (DESIGN §7): WAL lets readers run beside
the writer, ``busy_timeout`` makes a writer wait for the lock instead of
failing, and ``BEGIN IMMEDIATE`` takes the write lock before reading, so a
claim's read-then-update is atomic across processes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import threading
import time
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Literal, cast

import aiosqlite

from ..errors import StoreError
from ._base import Kind, Op, PromiseRecord, State, StoreLifecycle
from ._sql import (
    COLUMN_LIST,
    OTHER_ROOT_ROWS,
    SCHEMA_VERSION_DDL,
    SQLITE,
    check_limit,
    chunked,
    fast_plan,
    migrations,
    row_to_record,
    search_query,
)
from ._sqlite_write import (
    insert_params,
    marks,
    max_params,
    select_rows,
    settle_params,
    submit,
    write_ops,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

__all__ = ("SQLiteStore",)

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
# OverflowError: an int beyond 64 bits cannot be bound; like any driver error
# it fails the whole transaction.
_DRIVER_ERRORS = (sqlite3.Error, OverflowError)

# A tree in three parts that each use an index (see OTHER_ROOT_ROWS): the root
# by id, the rows whose ids extend it ("root." <= id < "root/", as "/" follows
# "."), and the rest through the partial index. Each row is in one part.
# A named parameter, bound from a dict: Python 3.12.0-3.12.3 warn when a
# sequence binds numbered ones (?1), as a tree's six uses of one id would.
_TREE = (
    f"SELECT {COLUMN_LIST} FROM promises WHERE id = :root AND root_id = :root "
    f"UNION ALL SELECT {COLUMN_LIST} FROM promises "
    "WHERE id >= :root || '.' AND id < :root || '/' AND root_id = :root "
    f"UNION ALL SELECT {COLUMN_LIST} FROM promises WHERE root_id = :root AND {OTHER_ROOT_ROWS} "
    "ORDER BY created_at, id"
)
_RENEW = "UPDATE promises SET lease_expires_at = ? WHERE owner = ? AND state = 'PENDING'"


@functools.lru_cache(maxsize=64)
def _release(n: int) -> str:
    return (
        "UPDATE promises SET owner = NULL, lease_expires_at = NULL "
        f"WHERE owner = ? AND id IN ({marks(n)})"
    )


@functools.lru_cache(maxsize=64)
def _claim(n_kinds: int, n_funcs: int | None) -> str:
    funcs = ""
    if n_funcs is not None:
        funcs = f" AND (func, version) IN (VALUES {', '.join(['(?, ?)'] * n_funcs)})"
    return (
        "UPDATE promises SET owner = ?, lease_expires_at = ? WHERE id IN ("
        f"SELECT id FROM promises WHERE state = 'PENDING' AND kind IN ({marks(n_kinds)}) "
        f"AND (owner IS NULL OR lease_expires_at <= ?){funcs} "
        # RETURNING only the ids: SQLite returns REAL columns holding whole
        # numbers as ints there, so the rows are read back with a SELECT.
        "ORDER BY created_at, id LIMIT ?) RETURNING id"
    )


class SQLiteStore(StoreLifecycle):
    """A durable promise store in one SQLite file.

    Args:
        path: the database file (created if missing), or ``":memory:"`` for a
            private in-memory database.
        synchronous: SQLite's ``synchronous`` setting. ``"FULL"`` (default)
            makes every commit survive power loss; ``"NORMAL"`` is faster and
            in WAL mode loses at most the last commits on power loss (never on
            a process crash).
        busy_timeout: seconds to wait for another process's write lock
            before a write fails with ``StoreError``.

    Example:
        >>> async with SQLiteStore("app.db") as store:  # doctest: +SKIP
        ...     await store.write([Create(record)])
    """

    #: Only processes of this host share this store, so a dead pid means a dead worker.
    single_host = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] | str = "FULL",
        busy_timeout: float = 5.0,
    ) -> None:
        level = synchronous.upper()
        if level not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self._path = os.fspath(path)
        self._synchronous = level
        self._busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None
        # One connection serves every caller; the lock keeps one caller's
        # statements (a transaction) from interleaving with another's.
        self._lock = asyncio.Lock()

    @property
    def pipeline_depth(self) -> int:
        """2: writes run in the order ``write`` is called (see the module's
        docstring), so the group-commit writer may call it again before it
        returns. 1 for a subclass that overrides ``write``: awaiting anything
        before ``super().write()`` would break that order."""
        return 2 if type(self).write is SQLiteStore.write else 1

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r}, synchronous={self._synchronous!r})"

    async def open(self) -> None:
        """Connect, apply the settings and create or migrate the schema. Idempotent.

        Raises:
            StoreError: the file cannot be opened or migrated.
        """
        async with self._lock:
            if self._conn is not None:
                return
            # check_same_thread=False: only aiosqlite's thread uses it, but if
            # that thread dies (see _close), the connection is closed from here.
            conn = aiosqlite.connect(
                self._path,
                isolation_level=None,
                timeout=self._busy_timeout,
                check_same_thread=False,
            )
            # A daemon thread: a store left open by an event loop that ended
            # (no aclose(), a failed test) must not keep the interpreter from
            # exiting. What it may have in hand then is a crash's: SQLite's
            # commit is atomic, and the runs resume at the next start.
            _thread_of(conn).daemon = True
            try:
                await conn
            except sqlite3.Error as exc:
                await _stopped(conn)
                raise StoreError(
                    f"cannot open SQLite database {self._path!r}: {exc}; "
                    "check that the directory exists and is writable"
                ) from exc
            try:
                await conn.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout * 1000)}")
                await self._switch_to_wal(conn)
                await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                await self._migrate(conn)
            except BaseException as exc:
                await conn.close()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(
                        f"cannot prepare SQLite database {self._path!r}: {exc}"
                    ) from exc
                raise
            self._conn = conn

    async def _switch_to_wal(self, conn: aiosqlite.Connection) -> None:
        # While another connection holds a lock on a file still in rollback
        # mode (two processes opening a new file at once), SQLite answers the
        # switch with SQLITE_BUSY at once, ignoring busy_timeout: retry it
        # ourselves for as long as busy_timeout allows.
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            try:
                async with conn.execute("PRAGMA journal_mode = WAL") as cursor:
                    row = await cursor.fetchone()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            else:
                mode = "" if row is None else str(row[0]).lower()
                # An in-memory database answers "memory": WAL is not for it.
                if mode == "wal" or mode == "memory" or time.monotonic() >= deadline:
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        steps = migrations(SQLITE)
        # A current schema needs no write lock, so opening waits for no writer.
        if await _schema_version(conn) == len(steps):
            return
        # Under the write lock, so processes opening one file at once migrate it once.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.execute(SCHEMA_VERSION_DDL)
            current = await _schema_version(conn)
            if current > len(steps):
                raise StoreError(
                    f"{self._path!r} has schema version {current}, newer than this "
                    f"resonate_async knows ({len(steps)}); upgrade resonate_async"
                )
            for step in steps[current:]:
                for statement in step:
                    await conn.execute(statement)
            if current < len(steps):
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version VALUES (?)", (len(steps),))
            await conn.execute("COMMIT")
        except BaseException:
            await conn.rollback()
            raise

    async def close(self) -> None:
        """Wait for the call in progress, then close the connection. Idempotent."""
        conn = self._conn
        if conn is not None and _dead(conn):  # see _close
            self._conn = None
            _close_abandoned(conn)
            return
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    await _close(conn)
                except sqlite3.Error as exc:
                    raise StoreError(f"closing {self._path!r} failed: {exc}") from exc

    async def pragmas(self) -> dict[str, Any]:
        """The connection's ``journal_mode``, ``synchronous`` and ``busy_timeout`` (ms)."""
        names = ("journal_mode", "synchronous", "busy_timeout")
        found: dict[str, Any] = {}
        async with self._connection() as conn:
            for name in names:
                rows = list(await conn.execute_fetchall(f"PRAGMA {name}"))
                found[name] = rows[0][0]
        found["synchronous"] = _SYNCHRONOUS[found["synchronous"]]
        return found

    def _require_open(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"{self!r} is not open: call `await store.open()` first")
        return self._conn

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, held by this caller, with driver errors as ``StoreError``."""
        async with self._lock:
            conn = self._require_open()
            try:
                yield conn
            except _DRIVER_ERRORS as exc:
                raise self._failed(exc) from exc

    def _failed(self, exc: BaseException) -> StoreError:
        """A driver error as the ``StoreError`` callers get (its transaction rolled back)."""
        return StoreError(f"SQLite operation on {self._path!r} failed: {exc}; nothing was written")

    @asynccontextmanager
    async def _transaction(self, mode: str = "IMMEDIATE") -> AsyncIterator[aiosqlite.Connection]:
        """One transaction: commit on success, roll back on any error.

        The store's transaction boundary on the event loop's side (a write
        uses its twin on the connection's thread, ``_in_transaction`` in
        ``_sqlite_write``); the rollback leaves the connection usable, so the
        next call succeeds once the fault (a lock, a full disk) clears.
        """
        async with self._connection() as conn:
            try:
                await conn.execute(f"BEGIN {mode}")
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        """Apply ``ops`` in order in one transaction; see ``Store.write``.

        Raises:
            StoreError: the transaction failed and was rolled back.
            TypeError: an op is neither ``Create`` nor ``Settle``.
        """
        if not ops:
            return []
        plan = fast_plan(ops)
        inserts: list[object] = []
        updates: list[object] = []
        if plan is not None:
            inserts = insert_params(plan.creates)
            updates = settle_params(plan.settles)
        cancelled = threading.Event()
        # The lock is held only while the write is queued: a caller running
        # several statements in a row (a claim, a read) holds it for all of
        # them, so this one call never lands between theirs, and writes queued
        # one after another run in that order, the next waiting on the thread.
        async with self._connection() as conn:
            done = submit(conn, write_ops, conn._conn, ops, plan, inserts, updates, cancelled)
        try:
            results: list[PromiseRecord | None] | None = await done
        except asyncio.CancelledError:
            cancelled.set()  # it rolls back unless it is committing already
            raise
        except _DRIVER_ERRORS as exc:
            raise self._failed(exc) from exc
        if results is None:  # pragma: no cover - only a cancelled caller gets None
            raise asyncio.CancelledError
        return results

    async def _select(
        self, conn: aiosqlite.Connection, ids: Sequence[str]
    ) -> dict[str, PromiseRecord]:
        # One trip to the connection's thread, however many statements.
        rows = await submit(conn, select_rows, conn._conn, ids)
        return {row[0]: row_to_record(row) for row in rows}

    async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
        """The stored records among ``ids``; see ``Store.get_many``."""
        unique = list(dict.fromkeys(ids))
        if len(unique) <= max_params():
            async with self._connection() as conn:
                return await self._select(conn, unique)
        # Several statements: read them in one snapshot.
        async with self._transaction("DEFERRED") as conn:
            return await self._select(conn, unique)

    async def _query(
        self, sql: str, args: Sequence[object] | Mapping[str, object]
    ) -> list[PromiseRecord]:
        async with self._connection() as conn:
            rows = await conn.execute_fetchall(sql, args)
        return [row_to_record(row) for row in rows]

    async def tree(self, root_id: str) -> list[PromiseRecord]:
        """Every record of the tree of ``root_id``, ordered by ``created_at`` then id."""
        return await self._query(_TREE, {"root": root_id})

    async def trees(self, root_ids: Sequence[str]) -> dict[str, list[PromiseRecord]]:
        """``tree`` of each of ``root_ids``, in one trip to the connection's thread."""
        async with self._connection() as conn:
            rows = await submit(conn, _read_trees, conn._conn, list(dict.fromkeys(root_ids)))
        return {root: [row_to_record(row) for row in tree] for root, tree in rows.items()}

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
        sql, args = search_query(SQLITE, state=state, kind=kind, prefix=prefix, limit=limit)
        return await self._query(sql, args)

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
        """Lease free pending promises to ``owner``, oldest first; see ``Store.claim``."""
        check_limit(limit)
        if not kinds or limit == 0 or (funcs is not None and not funcs):
            return []
        args: list[object] = [owner, lease_until, *(k.value for k in kinds), now]
        if funcs is not None:
            args.extend(x for name_version in funcs for x in name_version)
        args.append(limit)
        sql = _claim(len(kinds), None if funcs is None else len(funcs))
        async with self._transaction() as conn:
            ids = [row[0] for row in await conn.execute_fetchall(sql, args)]
            claimed = await self._select(conn, ids)
        return sorted(claimed.values(), key=_age)

    async def renew(self, owner: str, *, lease_until: float) -> int:
        """Extend ``owner``'s pending leases; return how many."""
        async with self._transaction() as conn:
            cursor = await conn.execute(_RENEW, (lease_until, owner))
            return cursor.rowcount

    async def release(self, owner: str, ids: Sequence[str]) -> None:
        """Free ``owner``'s leases on ``ids``; others' leases are untouched."""
        unique = list(dict.fromkeys(ids))
        if not unique:
            return
        async with self._transaction() as conn:
            for chunk in chunked(unique, max_params() - 1):
                await conn.execute(_release(len(chunk)), (owner, *chunk))


def _age(record: PromiseRecord) -> tuple[float, str]:
    return record.created_at, record.id


async def _schema_version(conn: aiosqlite.Connection) -> int:
    """The schema version stored in ``conn``'s database; 0 for a new one."""
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    if not list(await conn.execute_fetchall(query)):
        return 0
    rows = list(await conn.execute_fetchall("SELECT max(version) FROM schema_version"))
    return int(rows[0][0] or 0)


async def _stopped(conn: aiosqlite.Connection) -> None:
    """Wait until a connection that failed to connect has stopped its thread.

    On a failed connect aiosqlite stops its worker thread, which then reports
    to the event loop; waiting for it keeps that report from reaching a loop
    that has since closed.
    """
    thread = getattr(conn, "_thread", None)
    if thread is not None:
        await asyncio.to_thread(thread.join, 5.0)


async def _rollback(conn: aiosqlite.Connection) -> None:
    # The rollback is best effort: if it fails too, the connection is broken
    # and the original error is the one worth reporting.
    with suppress(sqlite3.Error):
        await conn.rollback()


def _read_trees(db: sqlite3.Connection, roots: list[str]) -> dict[str, list[Any]]:
    """The rows of each tree, read on the connection's thread."""
    return {root: db.execute(_TREE, {"root": root}).fetchall() for root in roots}


def _thread_of(conn: aiosqlite.Connection) -> threading.Thread:
    """aiosqlite's worker thread of ``conn`` (private; before 0.22, ``conn`` itself)."""
    return cast("threading.Thread", getattr(conn, "_thread", conn))


def _dead(conn: aiosqlite.Connection) -> bool:
    """Whether aiosqlite's thread (private) has died: it does when it hands a
    result to an event loop that has ended (a store left open by an
    ``asyncio.run`` that returned), and then never answers again."""
    thread = _thread_of(conn)
    return thread.ident is not None and not thread.is_alive()


def _close_abandoned(conn: aiosqlite.Connection) -> None:
    """Close the sqlite3 connection of an aiosqlite one whose thread died."""
    db, conn._connection = conn._connection, None
    if db is not None:
        with suppress(sqlite3.Error):
            db.close()


async def _close(conn: aiosqlite.Connection) -> None:
    """``conn.close()``, unless its thread dies first: then its answer never
    comes, and the connection is closed from here."""
    closing = asyncio.ensure_future(conn.close())
    while not (await asyncio.wait({closing}, timeout=0.1))[0]:
        if _dead(conn):
            _close_abandoned(conn)
            # aiosqlite's close awaits once more in its `finally`: cancel both.
            closing.cancel()
            await asyncio.sleep(0)
            closing.cancel()
            return
    closing.result()
