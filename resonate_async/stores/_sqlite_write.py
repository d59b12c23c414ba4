"""The bulk write of ``SQLiteStore``, run on the connection's own thread.

A transaction of the group-commit writer is one call here (:func:`write_ops`),
queued on aiosqlite's thread by :func:`submit`: ``BEGIN IMMEDIATE``, a few
multi-row statements for its creates and its settles, a read of the settled
rows it could not plan, and ``COMMIT``; should the statements not apply as
planned, the same call redoes the write exactly. The async side, which plans
the write and awaits it, is :meth:`SQLiteStore.write`.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from ._sql import (
    COLUMN_LIST,
    COLUMNS,
    SQLITE,
    FastPathMiss,
    FastPlan,
    chunked,
    dump_tags,
    record_to_row,
    resolve_exactly,
    row_to_record,
    touched_ids,
    upsert_sql,
)

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Sequence

    import aiosqlite

    from ._base import Op, PromiseRecord, Settle

__all__ = (
    "insert_params",
    "insert_rows",
    "marks",
    "max_params",
    "select_in",
    "select_rows",
    "settle_params",
    "settle_rows",
    "shapes",
    "submit",
    "write_ops",
)

_T = TypeVar("_T")

_UPSERT = upsert_sql(SQLITE)
# Binding: sqlite3 binds an exact int, float or str as it is, but sends None,
# bytes and str subclasses through its adapter lookup first, which costs more
# than the rest of a row's binding (about 0.3 µs a parameter on CPython 3.11;
# a blog run binds a dozen of them). The bulk statements therefore take a NULL
# as a sentinel of a type its column never holds, turned back into NULL by
# NULLIF: integer 0 in the text and blob columns, '' in the real ones; and a
# blob as a bytearray, which binds directly. The stored rows are the same.
_NULL_AS = {
    "func": "0",
    "param": "0",
    "value": "0",
    "parent_id": "0",
    "timeout_at": "''",
    "settled_at": "''",
    "owner": "0",
    "lease_expires_at": "''",
    "tags": "0",
}
# The bulk writes. Each transaction of the writer is one call on the
# connection's thread (one hop), and binds many rows to each statement (a
# multi-row VALUES), not one statement per row: sqlite3 releases the GIL
# around every step and reset of a statement, and the thread needs it back
# after each. While the event loop's thread runs Python, every such return
# waits up to a switch interval (5 ms) for the GIL, so executemany (one step
# per row) let 5,000 inserts take 10 s beside a busy loop; a few statements
# per transaction take a few of those waits.
#
# Statement shapes are fixed so that a handful are prepared once and then
# found in the connection's statement cache: a full statement holds the
# largest power of two of rows that the parameter limit allows (1,024 inserts,
# 4,096 settles), and the rest of a transaction goes in one statement of the
# next power of two, padded with rows that change nothing (an insert row with
# id 0, which the SELECT filters out; a settle row with id NULL, which matches
# no row).
_COLUMN_COUNT = len(COLUMNS)
_SETTLE_PARAMS = 4  # state, value, settled_at, id
_INSERT_VALUES = ", ".join(
    f"NULLIF(column{n}, {_NULL_AS[c]})" if c in _NULL_AS else f"column{n}"
    for n, c in enumerate(COLUMNS, start=1)
)
_INSERT_PAD = (0,) * _COLUMN_COUNT
_SETTLE_PAD = (0, 0, 0, None)


@functools.lru_cache(maxsize=32)
def insert_rows(n: int) -> str:
    """Insert ``n`` records (``_COLUMN_COUNT`` parameters each), skipping taken ids."""
    row = f"({marks(_COLUMN_COUNT)})"
    # The WHERE drops padding rows, and keeps ON CONFLICT from being parsed
    # as part of the SELECT.
    return (
        f"INSERT INTO promises ({COLUMN_LIST}) SELECT {_INSERT_VALUES} "
        f"FROM (VALUES {', '.join([row] * n)}) WHERE column1 IS NOT 0 "
        "ON CONFLICT (id) DO NOTHING"
    )


@functools.lru_cache(maxsize=32)
def settle_rows(n: int) -> str:
    """Settle ``n`` pending promises (``_SETTLE_PARAMS`` parameters each)."""
    return (
        "UPDATE promises SET state = v.column1, value = NULLIF(v.column2, 0), "
        "settled_at = v.column3, owner = NULL, lease_expires_at = NULL "
        f"FROM (VALUES {', '.join(['(?, ?, ?, ?)'] * n)}) AS v "
        "WHERE promises.id = v.column4 AND promises.state = 'PENDING'"
    )


def insert_params(records: list[PromiseRecord], _blob: type[bytearray] = bytearray) -> list[object]:
    """The parameters of :func:`insert_rows` for ``records``, flat (see the note on binding)."""
    params: list[object] = []
    extend = params.extend
    for r in records:
        extend(
            (
                r.id,
                r.state._value_,
                r.kind._value_,
                r.root_id,
                r.created_at,
                0 if (func := r.func) is None else func,
                r.version,
                0 if (param := r.param) is None else _blob(param),
                0 if (value := r.value) is None else _blob(value),
                0 if (parent_id := r.parent_id) is None else parent_id,
                "" if (timeout_at := r.timeout_at) is None else timeout_at,
                "" if (settled_at := r.settled_at) is None else settled_at,
                r.attempt,
                0 if (owner := r.owner) is None else owner,
                "" if (lease := r.lease_expires_at) is None else lease,
                0 if (tags := r.tags) is None else dump_tags(tags),
            )
        )
    return params


def settle_params(settles: list[Settle], _blob: type[bytearray] = bytearray) -> list[object]:
    """The parameters of :func:`settle_rows` for ``settles``, flat."""
    params: list[object] = []
    extend = params.extend
    for s in settles:
        extend((s.state._value_, 0 if (v := s.value) is None else _blob(v), s.settled_at, s.id))
    return params


def shapes(n: int, full: int) -> list[int]:
    """The statement sizes for ``n`` rows: full ones, then the next power of two."""
    shapes = [full] * (n // full)
    rest = n % full
    if rest:
        shapes.append(min(full, 1 << (rest - 1).bit_length()))
    return shapes


def _changed(
    db: sqlite3.Connection,
    sql: Callable[[int], str],
    params: list[object],
    width: int,
    pad: tuple[object, ...],
) -> int:
    """Run ``sql`` over ``params`` (``width`` per row) in :func:`shapes`; rows changed."""
    changed = 0
    start = 0
    for k in shapes(len(params) // width, _full_rows(width)):
        chunk = params[start : start + k * width]
        start += k * width
        missing = k - len(chunk) // width
        if missing:
            chunk.extend(pad * missing)
        changed += db.execute(sql(k), chunk).rowcount
    return changed


def write_ops(
    db: sqlite3.Connection,
    ops: Sequence[Op],
    plan: FastPlan | None,
    inserts: list[object],
    updates: list[object],
    cancelled: threading.Event,
) -> list[PromiseRecord | None] | None:
    """One whole write, run on the connection's thread: the bulk statements of
    ``plan`` or, when there is no plan or it did not apply, the exact path.

    Returns the results, or ``None`` when the caller was cancelled before
    ``COMMIT`` (the transaction is then rolled back). One call, so that a
    write queued behind this one never runs between the two attempts.
    """
    if cancelled.is_set():
        return None
    if plan is not None:
        try:
            return _write_planned(db, plan, inserts, updates, cancelled)
        except FastPathMiss:
            pass  # rolled back: redo it exactly, in this same call
    return _write_exact(db, ops, cancelled)


def _write_planned(
    db: sqlite3.Connection,
    plan: FastPlan,
    inserts: list[object],
    updates: list[object],
    cancelled: threading.Event,
) -> list[PromiseRecord | None] | None:
    """The bulk path: ``plan``'s results, or ``None`` if cancelled.

    If every insert inserted and every update updated, each op's result is
    the one planned, except for settles with neither a record created in
    this batch nor a ``prior``: their rows are read back here.

    Raises:
        FastPathMiss: a statement changed fewer rows than planned (an id
            taken, a promise settled already); the transaction is rolled back.
    """

    def apply() -> dict[str, PromiseRecord]:
        inserted = _changed(db, insert_rows, inserts, _COLUMN_COUNT, _INSERT_PAD) if inserts else 0
        updated = _changed(db, settle_rows, updates, _SETTLE_PARAMS, _SETTLE_PAD) if updates else 0
        if inserted != len(plan.creates) or updated != len(plan.settles):
            raise FastPathMiss
        return {row[0]: row_to_record(row) for row in select_rows(db, plan.unread)}

    stored = _in_transaction(db, cancelled, apply)
    return None if stored is None else plan.fill(stored)


def _write_exact(
    db: sqlite3.Connection, ops: Sequence[Op], cancelled: threading.Event
) -> list[PromiseRecord | None] | None:
    """The exact path: read the touched rows, apply ``ops`` in order, write the changes.

    ``BEGIN IMMEDIATE`` holds the write lock, so the rows read are the rows
    the ops apply to.
    """

    def apply() -> list[PromiseRecord | None]:
        before = {row[0]: row_to_record(row) for row in select_rows(db, touched_ids(ops))}
        results, changed, _ = resolve_exactly(ops, before)
        if changed:
            db.executemany(_UPSERT, [record_to_row(r) for r in changed])
        return results

    return _in_transaction(db, cancelled, apply)


def _in_transaction(
    db: sqlite3.Connection, cancelled: threading.Event, work: Callable[[], _T]
) -> _T | None:
    """``work()`` between ``BEGIN IMMEDIATE`` and ``COMMIT``, on the connection's thread.

    The thread-side twin of :meth:`SQLiteStore._transaction`: any error rolls
    back (quietly, so that error is the one reported), and so does a caller
    cancelled before ``COMMIT``, which then gets ``None``.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        if cancelled.is_set():
            db.rollback()
            return None
        db.execute("COMMIT")
    except BaseException:
        _rollback_quietly(db)
        raise
    return result


def select_rows(db: sqlite3.Connection, ids: Sequence[str]) -> list[Any]:
    """The rows of ``ids`` (those that exist), read on the connection's thread."""
    rows: list[Any] = []
    for chunk in chunked(ids, max_params()):
        rows += db.execute(select_in(len(chunk)), chunk).fetchall()
    return rows


def _rollback_quietly(db: sqlite3.Connection) -> None:
    # As _rollback: should the rollback fail too, the first error is the news.
    with suppress(sqlite3.Error):
        db.rollback()


def submit(conn: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Queue ``fn(*args)`` on the connection's thread now; return the future of its result.

    What aiosqlite's ``Connection._execute`` does, except that the call is
    queued before this returns, not when a coroutine first runs: a write
    holds the store's lock only while it queues its call (see
    :meth:`SQLiteStore.write`). This reaches into aiosqlite's private
    ``_tx`` queue; every write goes through here, so any change there fails
    the whole test suite.
    """
    if not conn._running or conn._connection is None:
        raise sqlite3.ProgrammingError("the connection's thread has stopped")
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    conn._tx.put_nowait((future, functools.partial(fn, *args)))
    return future


def _full_rows(width: int) -> int:
    """Rows of ``width`` parameters in a full statement: a power of two within the limit."""
    return 1 << ((max_params() // width).bit_length() - 1)


@functools.cache
def max_params() -> int:
    """How many ``?`` one statement may hold (999 in old builds, 32766+ now)."""
    probe = sqlite3.connect(":memory:")
    try:
        return min(probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 32766)
    finally:
        probe.close()


def marks(n: int) -> str:
    return ", ".join(["?"] * n)


@functools.lru_cache(maxsize=64)
def select_in(n: int) -> str:
    return f"SELECT {COLUMN_LIST} FROM promises WHERE id IN ({marks(n)})"
