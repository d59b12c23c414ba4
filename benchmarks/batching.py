"""The blog's batching benchmark, in resonate_async terms.

    python benchmarks/batching.py --batch --users 10000
    python benchmarks/batching.py --no-batch --users 10000
    python benchmarks/batching.py --batch --users 10000 --store postgresql://postgres@127.0.0.1/test

Each user is one durable workflow. With ``--batch`` the workflow issues one
``InsertUser`` command, and concurrent commands are served by one handler call
(many INSERTs, one commit). With ``--no-batch`` the workflow makes one ``lfi``
of a plain function that inserts and commits one row. The users table is
created fresh each time; so is the promise store, unless ``--store`` names one.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import aiosqlite
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from resonate_async import Command, Context, Resonate
from resonate_async.retry import never

console = Console(stderr=True)

SCHEMA = "CREATE TABLE users (id INTEGER PRIMARY KEY, value INTEGER UNIQUE)"
INSERT = "INSERT OR IGNORE INTO users (value) VALUES (?)"


@dataclass
class InsertUser(Command[None]):
    id: int


async def insert_users(ctx: Context, users: list[InsertUser]) -> None:
    """The batch handler: one executemany and one commit per batch."""
    db: aiosqlite.Connection = ctx.get_dependency("db")
    await db.executemany(INSERT, [(u.id,) for u in users])
    await db.commit()
    if ctx.get_dependency("log_batches"):
        print(f"Values from {users[0].id} to {users[-1].id} have been inserted")


def insert_user(ctx: Context, user: int) -> None:
    """The one-by-one step: one INSERT and one commit (a plain def, in a worker thread)."""
    conn: sqlite3.Connection = ctx.get_dependency("conn")
    with ctx.get_dependency("conn_lock"):
        conn.execute(INSERT, (user,))
        conn.commit()


async def create_user_batching(ctx: Context, user: int) -> None:
    await ctx.lfc(InsertUser(user))


async def create_user(ctx: Context, user: int) -> None:
    await ctx.lfc(insert_user, user)


def build(store: str) -> Resonate:
    resonate = Resonate(store)
    resonate.register(create_user_batching, retry_policy=never())
    resonate.register(create_user, retry_policy=never())
    resonate.register_command_handler(InsertUser, insert_users, retry_policy=never())
    return resonate


async def bench(
    users: int, batch: bool, store: str, log_batches: bool, progress: bool
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        users_db = os.path.join(tmp, "users.db")
        resonate = build(store or os.path.join(tmp, "resonate.db"))
        conn = sqlite3.connect(users_db, check_same_thread=False)
        conn.execute(SCHEMA)
        conn.commit()
        async with aiosqlite.connect(users_db) as db, resonate:
            resonate.set_dependency("db", db)
            resonate.set_dependency("conn", conn)
            resonate.set_dependency("conn_lock", threading.Lock())
            resonate.set_dependency("log_batches", log_batches)
            fn = create_user_batching if batch else create_user
            prefix = f"bench-{time.time_ns()}-{'b' if batch else 'n'}"
            started = time.perf_counter()
            handles = [resonate.run(f"{prefix}-{u}", fn, u) for u in range(users)]
            if progress and users:
                columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
                with Progress(*columns, console=console, transient=True) as bar:
                    task = bar.add_task("users", total=users)
                    for done in asyncio.as_completed([h.result() for h in handles]):
                        await done
                        bar.advance(task)
            else:
                for handle in handles:  # in order, as the blog does
                    await handle
            elapsed = time.perf_counter() - started
            stats = resonate.stats()
        (rows,) = conn.execute("SELECT COUNT(*) FROM users").fetchone()
        conn.close()
    batcher = stats.batchers.get("InsertUser")
    return {
        "users": users,
        "batching": batch,
        "seconds": elapsed,
        "rows": rows,
        "batches": batcher.batches if batcher else 0,
        "transactions": stats.store.transactions,
        "rows_per_transaction": stats.store.mean_rows_per_transaction,
    }


@click.command()
@click.option("--batch/--no-batch", default=True, help="Batch the inserts (default) or not.")
@click.option("--users", type=click.IntRange(0, 100_000), default=10_000, show_default=True)
@click.option(
    "--store",
    default="",
    help="Promise store: a SQLite path or a postgresql:// URL (default: a fresh SQLite file).",
)
@click.option("--log-batches", is_flag=True, help="Print one line per batch.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def main(batch: bool, users: int, store: str, log_batches: bool, progress: bool) -> None:
    """Insert USERS rows, each through a durable workflow, batched or one by one."""
    result = asyncio.run(bench(users, batch, store, log_batches, progress))
    if result["rows"] != users:
        raise SystemExit(f"expected {users} rows, found {result['rows']}")
    print(f"Inserting {users:,} users took {result['seconds']:.2f} seconds with batching={batch}")
    print(
        f"{result['batches']:,} batches, {result['transactions']:,} store transactions, "
        f"{result['rows_per_transaction']:.1f} rows per transaction"
    )


if __name__ == "__main__":
    main()
