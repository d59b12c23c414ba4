"""SQL shared by the SQLite and PostgreSQL stores.

Both backends keep the same table, the same columns in the same order and the
same write strategy; they differ only where their dialects do (column types,
placeholders, ``WITHOUT ROWID``, ``COLLATE "C"``). This module holds what they
share:

* the schema and its migrations, tracked in a ``schema_version`` table;
* conversion between a :class:`PromiseRecord` and a row;
* the write plan: :func:`fast_plan` decides whether a batch can be applied
  with bulk statements, reading back only the settled rows it cannot know,
  and :func:`resolve_exactly` computes the results of any batch from the
  rows it touches, with :func:`apply_op` semantics, for the rare batch that
  cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._base import FIELDS, Create, Kind, Op, PromiseRecord, Settle, State, apply_op, new_record

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = (
    "COLUMNS",
    "COLUMN_LIST",
    "POSTGRES",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_DDL",
    "SQLITE",
    "Dialect",
    "FastPathMiss",
    "FastPlan",
    "check_limit",
    "chunked",
    "dump_tags",
    "fast_plan",
    "migrations",
    "prefix_upper_bound",
    "record_to_row",
    "resolve_exactly",
    "row_to_record",
    "search_query",
    "touched_ids",
    "upsert_sql",
)

_T = TypeVar("_T")

#: Column order is the field order of :class:`PromiseRecord`, so a row maps to
#: a record positionally.
COLUMNS = FIELDS
COLUMN_LIST = ", ".join(COLUMNS)

#: The version :func:`migrations` brings a database to.
SCHEMA_VERSION = 3


@dataclass(frozen=True, slots=True)
class Dialect:
    """The few places where SQLite and PostgreSQL SQL differ."""

    name: str
    key: str
    text: str
    real: str
    integer: str
    blob: str
    table_options: str
    placeholder: str

    def param(self, n: int) -> str:
        """The placeholder of the ``n``-th parameter (1-based)."""
        return "?" if self.placeholder == "?" else f"${n}"


SQLITE = Dialect(
    name="sqlite",
    key="TEXT NOT NULL",
    text="TEXT",
    real="REAL",
    integer="INTEGER",
    blob="BLOB",
    # One b-tree keyed by id instead of a rowid table plus a unique index:
    # one insert per row instead of two. Rows are small (encoded arguments and
    # values); a large blob just spills to overflow pages.
    table_options=" WITHOUT ROWID",
    placeholder="?",
)

POSTGRES = Dialect(
    name="postgresql",
    # "C" collation makes ordering and prefix ranges compare code points, as
    # SQLite's BINARY collation and Python's str do, whatever the database's
    # locale, so every backend sorts search results the same way.
    key='text COLLATE "C" NOT NULL',
    text="text",
    real="double precision",
    integer="bigint",
    blob="bytea",
    table_options="",
    placeholder="$",
)

SCHEMA_VERSION_DDL = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def migrations(d: Dialect) -> tuple[tuple[str, ...], ...]:
    """Statements to migrate a database, one tuple per version step.

    ``migrations(d)[i]`` brings a database at version ``i`` to ``i + 1``.
    Append new steps; never edit a released one. A step may differ between
    dialects, or be empty for one of them, so that a version number means
    the same step everywhere.
    """
    version_1 = (
        f"""CREATE TABLE promises (
            id {d.key} PRIMARY KEY,
            state {d.text} NOT NULL,
            kind {d.text} NOT NULL,
            root_id {d.text} NOT NULL,
            created_at {d.real} NOT NULL,
            func {d.text},
            version {d.integer} NOT NULL,
            param {d.blob},
            value {d.blob},
            parent_id {d.text},
            timeout_at {d.real},
            settled_at {d.real},
            attempt {d.integer} NOT NULL,
            owner {d.text},
            lease_expires_at {d.real},
            tags {d.text}
        ){d.table_options}""",
        # A resumed run loads its whole tree in one query.
        "CREATE INDEX promises_root ON promises (root_id)",
        # Recovery and claims scan pending promises only; settled rows (almost
        # all of them) stay out of this index.
        "CREATE INDEX promises_pending ON promises (kind, created_at, id) WHERE state = 'PENDING'",
        # Heartbeats renew and release by owner.
        "CREATE INDEX promises_owner ON promises (owner) WHERE owner IS NOT NULL",
    )
    # SQLite: every leased root run added an entry to promises_owner when it
    # was created and removed it when it settled, about 6% of the blog
    # workload's write time. Only pending rows keep an owner, so renewing by
    # owner scans promises_pending instead (renew says ``state = 'PENDING'``),
    # and release and claim never used it. PostgreSQL keeps the index: there
    # an update does not remove index entries (vacuum does), the gain was
    # within the noise, and many workers renewing their own leases use it.
    version_2: tuple[str, ...] = (
        ("DROP INDEX IF EXISTS promises_owner",) if d.name == SQLITE.name else ()
    )
    # SQLite: promises_root took an entry for every row, and its b-tree
    # inserts were a quarter of the blog workload's write time (a settled
    # command row cost 11 µs with it, 5.6 µs without). Most rows do not need
    # it: a child's id is its parent's id plus ".n", so the rows of a tree
    # whose ids start with the root's id are a range of the primary key. The
    # index now holds only the others (children given their own id); see
    # OTHER_ROOT_ROWS and the SQLite store's tree query. PostgreSQL keeps
    # the plain index.
    version_3: tuple[str, ...] = (
        (
            "DROP INDEX IF EXISTS promises_root",
            f"CREATE INDEX promises_root_other ON promises (root_id) WHERE {OTHER_ROOT_ROWS}",
        )
        if d.name == SQLITE.name
        else ()
    )
    return (version_1, version_2, version_3)


#: The rows of a tree whose ids do not extend the root's id (``root.n...``):
#: the root itself is found by id, its ``root.``-prefixed rows by a range of
#: the primary key, and these through the partial index ``promises_root_other``.
#: (A query must repeat this text for SQLite to use that index.)
OTHER_ROOT_ROWS = "id <> root_id AND substr(id, 1, length(root_id) + 1) <> root_id || '.'"


_STATES = {s.value: s for s in State}
_KINDS = {k.value: k for k in Kind}
#: The text of a record's tags, as stored.
dump_tags = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def record_to_row(r: PromiseRecord) -> tuple[Any, ...]:
    """The row of ``r``, in :data:`COLUMNS` order.

    ``state`` and ``kind`` are passed as their ``_value_``, the plain ``str``
    of the member: sqlite3 binds an exact ``str`` directly, but sends a
    ``str`` subclass (the member itself) through its adapter lookup, which
    costs more than the rest of the row's binding (and ``.value`` is a
    property, slower than the attribute).
    """
    tags = r.tags
    return (
        r.id,
        r.state._value_,
        r.kind._value_,
        r.root_id,
        r.created_at,
        r.func,
        r.version,
        r.param,
        r.value,
        r.parent_id,
        r.timeout_at,
        r.settled_at,
        r.attempt,
        r.owner,
        r.lease_expires_at,
        None if tags is None else dump_tags(tags),
    )


def row_to_record(row: Sequence[Any]) -> PromiseRecord:
    """The record of a row selected as :data:`COLUMN_LIST`."""
    tags = row[15]
    return new_record(
        row[0],
        _STATES[row[1]],
        _KINDS[row[2]],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        None if tags is None else json.loads(tags),
    )


def chunked(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """Consecutive slices of ``items`` of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix``.

    ``prefix <= id < bound`` then selects exactly the ids starting with
    ``prefix`` under code-point order, and uses the primary key index (unlike
    ``LIKE``, which is case-insensitive in SQLite and needs escaping).
    ``None`` means there is no upper bound.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:
            # Surrogates cannot be stored as UTF-8; the next code point is the
            # next storable one.
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


def search_query(
    d: Dialect,
    *,
    state: State | None,
    kind: Kind | None,
    prefix: str | None,
    limit: int | None,
) -> tuple[str, list[object]]:
    """The ``SELECT`` of ``Store.search`` and its parameters."""
    where: list[str] = []
    args: list[object] = []

    def bind(value: object) -> str:
        args.append(value)
        return d.param(len(args))

    if state is not None:
        where.append(f"state = {bind(state.value)}")
    if kind is not None:
        where.append(f"kind = {bind(kind.value)}")
    if prefix:
        where.append(f"id >= {bind(prefix)}")
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            where.append(f"id < {bind(upper)}")
    sql = f"SELECT {COLUMN_LIST} FROM promises"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at, id"
    if limit is not None:
        sql += f" LIMIT {bind(limit)}"
    return sql, args


def check_limit(limit: int | None) -> None:
    """Reject a negative limit (each database reads one differently)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


class FastPathMiss(Exception):
    """A bulk statement changed fewer rows than it had ops: redo the write exactly."""


def _op_id(op: Op) -> str:
    if isinstance(op, Create):
        return op.record.id
    if isinstance(op, Settle):
        return op.id
    raise TypeError(f"Store.write takes Create and Settle ops, got {type(op).__name__}")


@dataclass(slots=True)
class FastPlan:
    """A batch split for the bulk path, with its results computed ahead.

    Attributes:
        creates: the records to insert, in op order.
        settles: the settles to apply, in op order.
        results: the result of each op if every insert inserts and every
            update updates; ``None`` at the positions in ``holes``.
        holes: the positions of the settles whose results must be read back
            after the update: neither created in this batch nor given a
            ``prior`` (see :meth:`fill`).
        unread: the ids of those settles, in the order of ``holes``.
    """

    creates: list[PromiseRecord]
    settles: list[Settle]
    results: list[PromiseRecord | None]
    holes: list[int]
    unread: list[str]

    def fill(self, stored: dict[str, PromiseRecord]) -> list[PromiseRecord | None]:
        """The results, with the holes filled from ``stored`` (the rows of ``unread``)."""
        results = self.results
        for at, key in zip(self.holes, self.unread, strict=True):
            results[at] = stored[key]
        return results


def fast_plan(ops: Sequence[Op]) -> FastPlan | None:
    """Split ``ops`` for the bulk path and compute their results ahead.

    Running every create before every settle is equivalent to running the ops
    in order when each id is touched by one create, one settle, or a create
    followed by a settle (ops on different ids commute). Then, if every insert
    inserts and every update updates, each op's result is known without
    reading anything: a create returns its own record (the very object), a
    settle returns the record created for its id in this batch, else its
    ``prior``, settled by it. Only a settle with neither must have its row
    read back. Any other shape (a duplicate create, a settle before a create,
    two settles) returns ``None``: it is rare and goes to the exact path
    directly. The caller must check the change counts before trusting the
    results (and redo the write exactly otherwise, see :class:`FastPathMiss`).

    Raises:
        TypeError: an op is neither ``Create`` nor ``Settle``.
    """
    # id -> its record created in this batch, or None once settled in it.
    seen: dict[str, PromiseRecord | None] = {}
    creates: list[PromiseRecord] = []
    settles: list[Settle] = []
    results: list[PromiseRecord | None] = []
    holes: list[int] = []
    unread: list[str] = []
    for op in ops:
        if isinstance(op, Create):
            record = op.record
            key = record.id
            if key in seen:
                return None
            seen[key] = record
            creates.append(record)
            results.append(record)
        elif isinstance(op, Settle):
            key = op.id
            if key in seen:
                own = seen[key]
                if own is None:
                    return None
            else:
                own = op.prior
                if own is not None and own.id != key:
                    own = None
            seen[key] = None
            settles.append(op)
            if own is None:
                holes.append(len(results))
                unread.append(key)
                results.append(None)
            else:
                results.append(_settled(own, op))
        else:
            _op_id(op)  # raises the TypeError
    return FastPlan(creates, settles, results, holes, unread)


def _settled(r: PromiseRecord, op: Settle) -> PromiseRecord:
    """``apply_op(r, op)`` for a pending ``r``, built directly.

    ``dataclasses.replace`` costs a few microseconds a record, a large share
    of a bulk write; on the fast path the row is known to have been pending
    (its update counted), so this is exactly what :func:`apply_op` returns.
    ``r`` may be a settle's ``prior`` whose lease has changed since: the
    lease is cleared here anyway.
    """
    return new_record(
        r.id,
        op.state,
        r.kind,
        r.root_id,
        r.created_at,
        r.func,
        r.version,
        r.param,
        op.value,
        r.parent_id,
        r.timeout_at,
        op.settled_at,
        r.attempt,
        None,
        None,
        r.tags,
    )


def touched_ids(ops: Sequence[Op]) -> list[str]:
    """The distinct ids ``ops`` touch, in first-touch order."""
    return list(dict.fromkeys(_op_id(op) for op in ops))


def resolve_exactly(
    ops: Sequence[Op], before: dict[str, PromiseRecord]
) -> tuple[list[PromiseRecord | None], list[PromiseRecord], list[str]]:
    """Apply ``ops`` in order, with :func:`apply_op`, to the rows they touch.

    Args:
        ops: the batch.
        before: the stored rows of :func:`touched_ids` (missing ids absent),
            read inside the transaction that will write the outcome.

    Returns:
        The result of each op, the records to upsert (new or changed rows),
        and the ids that this batch moved from pending to settled.
    """
    current: dict[str, PromiseRecord] = dict(before)
    results: list[PromiseRecord | None] = []
    newly_settled: list[str] = []
    for op in ops:
        key = _op_id(op)
        prior = current.get(key)
        after = apply_op(prior, op)
        results.append(after)
        if after is not None:
            current[key] = after
            if isinstance(op, Settle) and after is not prior:
                newly_settled.append(key)
    changed = [rec for key, rec in current.items() if before.get(key) is not rec]
    return results, changed, newly_settled


def upsert_sql(d: Dialect) -> str:
    """An ``INSERT`` that overwrites every column of an existing row."""
    values = ", ".join(d.param(i) for i in range(1, len(COLUMNS) + 1))
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
    return (
        f"INSERT INTO promises ({COLUMN_LIST}) VALUES ({values}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )
