"""How close ``SQLiteStore.write`` comes to raw ``sqlite3.executemany``.

Writes the same rows both ways, in transactions of about ``--batch``
operations, on fresh database files with the same schema and settings (WAL,
the same ``synchronous``), and prints the time of each and their ratio. Four
workloads:

* ``creates``: every op inserts a new pending run;
* ``blog``: the blog post's workflow, three ops per run, in one transaction:
  the run is created pending (leased to its worker, as the engine writes it),
  its command step is created settled, the run is settled;
* ``blog-split``: the same three ops per run as the group-commit writer sees
  them under load: each transaction creates new runs and finishes the runs
  created by the transaction before (their command rows and their settles,
  which carry the root record as ``prior``, so nothing is read back);
* ``settles``: half the ops create pending runs, the other half settle them
  in later transactions without ``prior``, so each settled row is read back
  for its result.

Run from the repository root:
``PYTHONPATH=. python benchmarks/store_write.py --ops 30000 --batch 5000``;
add ``--postgres postgresql://...`` to time ``PostgresStore.write`` on the
same batches too (no raw baseline there).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from resonate_async.stores import Create, Kind, PromiseRecord, Settle, SQLiteStore, State
from resonate_async.stores._sql import COLUMN_LIST, SQLITE, dump_tags, migrations

if TYPE_CHECKING:
    from resonate_async.stores._base import Op

WORKLOADS = ("creates", "blog", "blog-split", "settles")

_INSERT = (
    f"INSERT INTO promises ({COLUMN_LIST}) VALUES ({', '.join(['?'] * 16)}) "
    "ON CONFLICT (id) DO NOTHING"
)
_SETTLE = (
    "UPDATE promises SET state = ?, value = ?, settled_at = ?, owner = NULL, "
    "lease_expires_at = NULL WHERE id = ? AND state = 'PENDING'"
)
_WORKER = "host:1234:0123456789abcdef"


def _raw_row(r: PromiseRecord) -> tuple[object, ...]:
    """The row of ``r`` as plain sqlite3 code would bind it."""
    return (
        r.id, r.state.value, r.kind.value, r.root_id, r.created_at, r.func, r.version,
        r.param, r.value, r.parent_id, r.timeout_at, r.settled_at, r.attempt, r.owner,
        r.lease_expires_at, None if r.tags is None else dump_tags(r.tags),
    )  # fmt: skip


def _chunks(ops: list[Op], batch: int) -> list[list[Op]]:
    return [ops[start : start + batch] for start in range(0, len(ops), batch)]


def _root(i: int, now: float) -> PromiseRecord:
    """A pending root run, with the fields the engine sets when it creates one."""
    run = f"run-{i}"
    return PromiseRecord(
        run, State.PENDING, Kind.RUN, run, now, "create_user", 1, b"[1]",
        attempt=1, owner=_WORKER, lease_expires_at=now + 30.0,
    )  # fmt: skip


def _finish(root: PromiseRecord, now: float) -> list[Op]:
    """The command row and the settle of ``root``."""
    run = root.id
    step = PromiseRecord(
        f"{run}.1", State.RESOLVED, Kind.COMMAND, run, now, "InsertUser", 1,
        b'{"id":1}', b"null", run, None, now,
    )  # fmt: skip
    return [Create(step), Settle(run, State.RESOLVED, b"1", now, prior=root)]


def make_batches(workload: str, count: int, batch: int) -> list[list[Op]]:
    """About ``count`` operations of ``workload``, one list per transaction."""
    now = time.time()
    if workload == "creates":
        return _chunks(
            [
                Create(
                    PromiseRecord(
                        f"run-{i}", State.PENDING, Kind.RUN, f"run-{i}", now, "create_user",
                        1, b"[1]",
                    )
                )
                for i in range(count)
            ],
            batch,
        )  # fmt: skip
    if workload == "settles":
        runs = [op for chunk in make_batches("creates", count // 2, batch) for op in chunk]
        settle = [Settle(f"run-{i}", State.RESOLVED, b"1", now) for i in range(count // 2)]
        return _chunks([*runs, *settle], batch)
    if workload == "blog":
        ops: list[Op] = []
        for i in range(count // 3):
            root = _root(i, now)
            ops += [Create(root), *_finish(root, now)]
        return _chunks(ops, batch)
    if workload == "blog-split":
        per_txn = max(1, batch // 3)
        roots = [_root(i, now) for i in range(count // 3)]
        groups = [roots[start : start + per_txn] for start in range(0, len(roots), per_txn)]
        batches: list[list[Op]] = []
        for n in range(len(groups) + 1):
            ops = [Create(r) for r in groups[n]] if n < len(groups) else []
            for root in groups[n - 1] if n else ():
                ops += _finish(root, now)
            batches.append(ops)
        return batches
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


def raw_write(path: Path, batches: list[list[Op]], synchronous: str) -> float:
    """Seconds to write ``batches`` with sqlite3 alone, rows prepared beforehand.

    The rows are what plain sqlite3 code would bind (``None`` for NULL,
    ``bytes`` for blobs), with the store's schema and statements.
    """
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    for step in migrations(SQLITE):
        for statement in step:
            db.execute(statement)
    chunks = []
    for chunk in batches:
        creates = [_raw_row(op.record) for op in chunk if isinstance(op, Create)]
        settles = [
            (op.state.value, op.value, op.settled_at, op.id)
            for op in chunk
            if isinstance(op, Settle)
        ]
        chunks.append((creates, settles))
    began = time.perf_counter()
    for creates, settles in chunks:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(_INSERT, creates)
        if settles:
            db.executemany(_SETTLE, settles)
        db.execute("COMMIT")
    elapsed = time.perf_counter() - began
    db.close()
    return elapsed


async def store_write(path: Path, batches: list[list[Op]], synchronous: str) -> float:
    """Seconds to write ``batches`` through ``SQLiteStore.write``."""
    async with SQLiteStore(path, synchronous=synchronous) as store:
        began = time.perf_counter()
        for chunk in batches:
            await store.write(chunk)
        return time.perf_counter() - began


async def postgres_write(dsn: str, batches: list[list[Op]]) -> float:
    """Seconds to write ``batches`` through ``PostgresStore.write``, in a fresh schema."""
    import asyncpg

    from resonate_async.stores.postgres import PostgresStore

    schema = f"store_write_{uuid.uuid4().hex[:12]}"
    try:
        async with PostgresStore(dsn, schema=schema) as store:
            began = time.perf_counter()
            for chunk in batches:
                await store.write(chunk)
            return time.perf_counter() - began
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=30_000, help="operations in all")
    parser.add_argument("--batch", type=int, default=5_000, help="operations per transaction")
    parser.add_argument("--synchronous", default="FULL", help="SQLite synchronous setting")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument(
        "--workload", action="append", choices=WORKLOADS, help="run only these (repeatable)"
    )
    parser.add_argument(
        "--postgres",
        metavar="DSN",
        help="also time PostgresStore.write on this server (a scratch schema, dropped after)",
    )
    args = parser.parse_args()
    for workload in args.workload or WORKLOADS:
        batches = make_batches(workload, args.ops, args.batch)
        count = sum(map(len, batches))
        raw, ours = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.repeat):
                raw.append(raw_write(Path(tmp, f"raw{n}.db"), batches, args.synchronous))
                ours.append(
                    asyncio.run(store_write(Path(tmp, f"store{n}.db"), batches, args.synchronous))
                )
        print(
            f"{workload:10} {count} ops, {args.batch}/txn, synchronous={args.synchronous}: "
            f"raw executemany {min(raw) * 1e3:7.1f} ms  SQLiteStore.write "
            f"{min(ours) * 1e3:7.1f} ms  ratio {min(ours) / min(raw):.2f}x"
        )
        if args.postgres:
            pg = [asyncio.run(postgres_write(args.postgres, batches)) for _ in range(args.repeat)]
            print(f"{workload:10} {count} ops, {args.batch}/txn: PostgresStore.write "
                  f"{min(pg) * 1e3:7.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
