"""How close ``SQLiteStore.write`` comes to raw ``sqlite3.executemany``.

Writes the same rows both ways, in transactions of ``--batch`` operations, on
fresh database files with the same settings (WAL, the same ``synchronous``),
and prints the time of each and their ratio. Three workloads:

* ``creates``: every op inserts a new pending run;
* ``blog``: the blog post's workflow, three ops per run: the run is created
  pending, its command step is created settled, the run is settled;
* ``settles``: half the ops create pending runs, the other half settle them
  in later transactions, so each settled row is read back for its result.

Run from the repository root:
``PYTHONPATH=. python benchmarks/store_write.py --ops 30000 --batch 5000``
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from resonate_async.stores import Create, Kind, PromiseRecord, Settle, SQLiteStore, State
from resonate_async.stores._sql import COLUMN_LIST, SQLITE, migrations, record_to_row

if TYPE_CHECKING:
    from resonate_async.stores._base import Op

_INSERT = (
    f"INSERT INTO promises ({COLUMN_LIST}) VALUES ({', '.join(['?'] * 16)}) "
    "ON CONFLICT (id) DO NOTHING"
)
_SETTLE = (
    "UPDATE promises SET state = ?, value = ?, settled_at = ?, owner = NULL, "
    "lease_expires_at = NULL WHERE id = ? AND state = 'PENDING'"
)


def make_ops(workload: str, count: int) -> list[Op]:
    """``count`` operations of ``workload``."""
    now = time.time()
    if workload == "creates":
        return [
            Create(
                PromiseRecord(
                    f"run-{i}", State.PENDING, Kind.RUN, f"run-{i}", now, "create_user", 1, b"[1]"
                )
            )
            for i in range(count)
        ]
    if workload == "settles":
        runs = make_ops("creates", count // 2)
        settle = [Settle(f"run-{i}", State.RESOLVED, b"1", now) for i in range(count // 2)]
        return runs + settle
    ops: list[Op] = []
    for i in range(count // 3):
        run = f"run-{i}"
        ops.append(Create(PromiseRecord(run, State.PENDING, Kind.RUN, run, now, "create_user")))
        step = PromiseRecord(
            f"{run}.1", State.RESOLVED, Kind.COMMAND, run, now, "InsertUser", 1,
            b'{"id":1}', b"null", run, None, now,
        )  # fmt: skip
        ops.append(Create(step))
        ops.append(Settle(run, State.RESOLVED, b"1", now))
    return ops


def raw_write(path: Path, ops: list[Op], batch: int, synchronous: str) -> float:
    """Seconds to write ``ops`` with sqlite3 alone, rows prepared beforehand."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    for statement in migrations(SQLITE)[0]:
        db.execute(statement)
    chunks = []
    for start in range(0, len(ops), batch):
        chunk = ops[start : start + batch]
        creates = [record_to_row(op.record) for op in chunk if isinstance(op, Create)]
        settles = [
            (op.state, op.value, op.settled_at, op.id) for op in chunk if isinstance(op, Settle)
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


async def store_write(path: Path, ops: list[Op], batch: int, synchronous: str) -> float:
    """Seconds to write ``ops`` through ``SQLiteStore.write``."""
    async with SQLiteStore(path, synchronous=synchronous) as store:
        began = time.perf_counter()
        for start in range(0, len(ops), batch):
            await store.write(ops[start : start + batch])
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=30_000, help="operations in all")
    parser.add_argument("--batch", type=int, default=5_000, help="operations per transaction")
    parser.add_argument("--synchronous", default="FULL", help="SQLite synchronous setting")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    args = parser.parse_args()
    for workload in ("creates", "blog", "settles"):
        ops = make_ops(workload, args.ops)
        raw, ours = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.repeat):
                raw.append(raw_write(Path(tmp, f"raw{n}.db"), ops, args.batch, args.synchronous))
                ours.append(
                    asyncio.run(
                        store_write(Path(tmp, f"store{n}.db"), ops, args.batch, args.synchronous)
                    )
                )
        print(
            f"{workload:8} {len(ops)} ops, {args.batch}/txn, synchronous={args.synchronous}: "
            f"raw executemany {min(raw) * 1e3:7.1f} ms  SQLiteStore.write "
            f"{min(ours) * 1e3:7.1f} ms  ratio {min(ours) / min(raw):.2f}x"
        )


if __name__ == "__main__":
    main()
