"""One worker process of the multi-worker tests (``tests/test_multiworker.py``).

Run as a script::

    python tests/multiworker_workload.py postgres --dsn DSN --store-schema A --users-schema B \\
        --name NAME --role starter|server|both --runs N [--lease 3 --heartbeat 1 --poll 0.2]
    python tests/multiworker_workload.py sqlite --store-path STORE.db --users-path USERS.db \\
        --log EXECUTIONS.log --name NAME --role ... --runs N

Every process registers the same functions (but see ``--no-remote``) and serves them:

* ``signup(ctx, i)``, the root run: ``await ctx.rfc("provision", i)``, then
  returns ``f"signed-up-{i}"``;
* ``provision(ctx, i)``, the remote function any worker may claim: a little
  simulated work, then the batched command ``await ctx.lfc(InsertUser(i, ctx.id))``,
  and returns ``f"user-{i}"``;
* the ``InsertUser`` batch handler inserts the users idempotently
  (``ON CONFLICT DO NOTHING`` on a primary key) and, in the same transaction,
  appends one ``handler_calls`` row per command saying which worker executed
  it and whether its insert took effect. It resolves every command to the
  worker's name.

Each body (``signup`` and ``provision``) appends an ``executions`` row (kind,
promise id, worker, pid, wall time) *before* doing anything durable, so the
test sees every execution, including those of a process SIGKILLed a moment
later. On PostgreSQL these tables live in the users schema; on SQLite the
users and ``handler_calls`` tables are in the users file and executions go to
an append-only log (one ``write(2)`` per line on an ``O_APPEND`` file).

Roles: ``starter`` calls ``resonate.run(f"signup-{i}", "signup", i)`` for every
``i < N``, prints ``created`` once every root is durable and ``done {json}``
once every handle has returned (the JSON counts right and wrong values), then
keeps serving. ``server`` only serves. ``--no-remote`` leaves ``provision``
unregistered: the process calls it but never runs it. ``both`` is a starter too; it is the
role of the SQLite tests, where two processes call ``run`` for the same ids:
``--order reverse`` calls ``run`` from the last id down, ``--go-file`` holds
the calls until that file exists and ``--wave K`` makes them K at a time, so
the two contend for the same ids at the same moment. Every process prints
``ready {worker_id}`` once started and ``stopped`` after a clean ``aclose``
on SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from resonate_async import Command, Context, Resonate

#: The tables of the users schema (PostgreSQL); the test creates them before the workers start.
POSTGRES_USERS_DDL = (
    "CREATE TABLE users (id integer PRIMARY KEY, remote_id text NOT NULL, worker text NOT NULL)",
    "CREATE TABLE handler_calls (user_id integer NOT NULL, remote_id text NOT NULL, "
    "worker text NOT NULL, inserted boolean NOT NULL, at double precision NOT NULL)",
    "CREATE TABLE executions (kind text NOT NULL, id text NOT NULL, worker text NOT NULL, "
    "pid integer NOT NULL, at double precision NOT NULL)",
)

SQLITE_USERS_DDL = (
    "CREATE TABLE users (id INTEGER PRIMARY KEY, remote_id TEXT NOT NULL, worker TEXT NOT NULL)",
    "CREATE TABLE handler_calls (user_id INTEGER NOT NULL, remote_id TEXT NOT NULL, "
    "worker TEXT NOT NULL, inserted INTEGER NOT NULL, at REAL NOT NULL)",
)


def setup_sqlite_users(path: str) -> None:
    """Create the users file (WAL, tables) before any worker opens it.

    Done once, by the harness: switching a new file to WAL while another
    process holds a lock on it fails at once with "database is locked" (the
    busy timeout does not apply to that switch).
    """
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        for statement in SQLITE_USERS_DDL:
            db.execute(statement)
    finally:
        db.close()


def run_id(i: int) -> str:
    """The root id of run ``i``."""
    return f"signup-{i}"


def remote_id(i: int) -> str:
    """The id of run ``i``'s remote ``provision`` call (its first durable call)."""
    return f"signup-{i}.1"


def command_id(i: int) -> str:
    """The id of run ``i``'s ``InsertUser`` command (the remote body's first durable call)."""
    return f"signup-{i}.1.1"


def root_value(i: int) -> str:
    return f"signed-up-{i}"


def remote_value(i: int) -> str:
    return f"user-{i}"


@dataclass
class InsertUser(Command[str]):
    """Insert user ``user_id``; resolves to the name of the worker whose batch committed."""

    user_id: int
    remote_id: str


# -- where executions are recorded ----------------------------------------------------


class PostgresSink:
    """Users, handler calls and executions in a PostgreSQL schema, through asyncpg."""

    def __init__(self, dsn: str, schema: str, worker: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.worker = worker
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=4, server_settings={"search_path": self.schema}
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def executed(self, kind: str, id: str) -> None:
        await self.pool.execute(
            "INSERT INTO executions (kind, id, worker, pid, at) VALUES ($1, $2, $3, $4, $5)",
            kind,
            id,
            self.worker,
            os.getpid(),
            time.time(),
        )

    async def insert_users(self, commands: list[InsertUser]) -> None:
        ids = [c.user_id for c in commands]
        remotes = [c.remote_id for c in commands]
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "INSERT INTO users (id, remote_id, worker) "
                "SELECT u.id, u.remote_id, $3 "
                "FROM unnest($1::int[], $2::text[]) AS u (id, remote_id) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                ids,
                remotes,
                self.worker,
            )
            inserted = {row[0] for row in rows}
            await conn.execute(
                "INSERT INTO handler_calls (user_id, remote_id, worker, inserted, at) "
                "SELECT u.id, u.remote_id, $3, u.inserted, $5 "
                "FROM unnest($1::int[], $2::text[], $4::bool[]) AS u (id, remote_id, inserted)",
                ids,
                remotes,
                self.worker,
                [i in inserted for i in ids],
                time.time(),
            )


class SQLiteSink:
    """Users and handler calls in an SQLite file; executions in an append-only log."""

    def __init__(self, users_path: str, log_path: str, worker: str) -> None:
        self.users_path = users_path
        self.log_path = log_path
        self.worker = worker
        self.db: Any = None
        self.fd = -1

    async def open(self) -> None:
        import aiosqlite

        self.fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # The file exists already, in WAL mode (setup_sqlite_users).
        self.db = await aiosqlite.connect(self.users_path, isolation_level=None, timeout=10.0)

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
        if self.fd >= 0:
            os.close(self.fd)

    async def executed(self, kind: str, id: str) -> None:
        # One write(2) of one short line: a SIGKILL cannot tear it.
        line = f"{kind} {id} {self.worker} {os.getpid()} {time.time()!r}\n"
        os.write(self.fd, line.encode())

    async def insert_users(self, commands: list[InsertUser]) -> None:
        db = self.db
        now = time.time()
        await db.execute("BEGIN IMMEDIATE")
        try:
            calls = []
            for c in commands:
                cursor = await db.execute(
                    "INSERT OR IGNORE INTO users (id, remote_id, worker) VALUES (?, ?, ?)",
                    (c.user_id, c.remote_id, self.worker),
                )
                calls.append((c.user_id, c.remote_id, self.worker, cursor.rowcount == 1, now))
            await db.executemany(
                "INSERT INTO handler_calls (user_id, remote_id, worker, inserted, at) "
                "VALUES (?, ?, ?, ?, ?)",
                calls,
            )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


# -- the functions every worker registers -----------------------------------------------


async def signup(ctx: Context, i: int) -> str:
    """The root run: one remote call, then its value."""
    await ctx.get_dependency("sink").executed("run", ctx.id)
    user = await ctx.rfc("provision", i)
    if user != remote_value(i):
        raise RuntimeError(f"{ctx.id}: provision returned {user!r}")
    return root_value(i)


async def provision(ctx: Context, i: int) -> str:
    """The remote function: some work while holding the claim, then one batched command."""
    await ctx.get_dependency("sink").executed("remote", ctx.id)
    await asyncio.sleep(random.random() * ctx.get_dependency("work_delay"))
    await ctx.lfc(InsertUser(i, ctx.id))
    return remote_value(i)


async def insert_users(ctx: Context, commands: list[InsertUser]) -> str:
    """The batch handler: one transaction for the whole batch."""
    sink = ctx.get_dependency("sink")
    await sink.insert_users(commands)
    return str(sink.worker)


# -- the process -------------------------------------------------------------------


def application_name(store_schema: str, name: str) -> str:
    """The PostgreSQL ``application_name`` of a worker's store connections."""
    return f"mw-{store_schema}-{name}"[:63]


def build(args: argparse.Namespace) -> tuple[Resonate, PostgresSink | SQLiteSink]:
    sink: PostgresSink | SQLiteSink
    if args.backend == "postgres":
        from resonate_async.stores.postgres import PostgresStore

        # Named connections: the test waits for a killed worker's server
        # backends to be gone (a COMMIT it sent may still land) before it
        # reads which leases the worker held.
        named = f"{args.dsn}{'&' if '?' in args.dsn else '?'}application_name="
        named += application_name(args.store_schema, args.name)
        store: Any = PostgresStore(named, schema=args.store_schema, max_connections=5)
        sink = PostgresSink(args.dsn, args.users_schema, args.name)
    else:
        from resonate_async.stores.sqlite import SQLiteStore

        store = SQLiteStore(args.store_path, synchronous="NORMAL", busy_timeout=10.0)
        sink = SQLiteSink(args.users_path, args.log, args.name)
    resonate = Resonate(
        store,
        worker_id=args.worker_id,
        lease_seconds=args.lease,
        heartbeat_seconds=args.heartbeat,
        poll_seconds=args.poll,
    )
    resonate.register(signup, name="signup")
    if not args.no_remote:
        resonate.register(provision, name="provision")
    resonate.register_command_handler(InsertUser, insert_users, name="InsertUser", maxlen=200)
    resonate.set_dependency("sink", sink)
    resonate.set_dependency("work_delay", args.work_delay)
    return resonate, sink


async def start_runs(
    resonate: Resonate, n: int, order: str, go_file: str | None, wave: int
) -> None:
    while go_file is not None and not os.path.exists(go_file):  # noqa: ASYNC240 - a test gate
        await asyncio.sleep(0.01)
    ids = range(n) if order == "forward" else range(n - 1, -1, -1)
    started = {}
    for i in ids:
        started[i] = resonate.run(run_id(i), "signup", i)
        if wave and len(started) % wave == 0:
            await asyncio.sleep(0.005)  # let this wave reach the store before the next
    handles = [started[i] for i in range(n)]
    await asyncio.gather(*(h.created() for h in handles))
    print("created", flush=True)
    outcomes = await asyncio.gather(*handles, return_exceptions=True)
    wrong = [f"{run_id(i)}: {o!r}" for i, o in enumerate(outcomes) if o != root_value(i)]
    print("done " + json.dumps({"right": n - len(wrong), "wrong": wrong[:20]}), flush=True)


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    resonate, sink = build(args)
    try:
        await sink.open()
        async with resonate:
            print(f"ready {resonate.worker_id}", flush=True)
            starter = None
            if args.role in ("starter", "both"):
                starter = asyncio.create_task(
                    start_runs(resonate, args.runs, args.order, args.go_file, args.wave)
                )
            await stop.wait()
            if starter is not None and not starter.done():
                starter.cancel()
                await asyncio.gather(starter, return_exceptions=True)
    finally:
        await sink.close()
    print("stopped", flush=True)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One worker of the multi-worker tests.")
    parser.add_argument("backend", choices=("postgres", "sqlite"))
    parser.add_argument("--dsn", help="PostgreSQL DSN (store and users schema)")
    parser.add_argument("--store-schema", help="PostgreSQL schema of the promise store")
    parser.add_argument("--users-schema", help="PostgreSQL schema of the users tables")
    parser.add_argument("--store-path", help="SQLite file of the promise store")
    parser.add_argument("--users-path", help="SQLite file of the users tables")
    parser.add_argument("--log", help="append-only executions log (SQLite backend)")
    parser.add_argument("--name", required=True, help="this worker's name in the records")
    parser.add_argument("--worker-id", default=None, help="lease identity (default host:pid:rand)")
    parser.add_argument("--role", choices=("starter", "server", "both"), default="server")
    parser.add_argument(
        "--no-remote", action="store_true", help="do not serve provision (only call it)"
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument(
        "--order", choices=("forward", "reverse"), default="forward", help="order of run calls"
    )
    parser.add_argument("--wave", type=int, default=0, help="run calls per wave (0: all)")
    parser.add_argument("--go-file", default=None, help="start runs once this file exists")
    parser.add_argument("--lease", type=float, default=3.0, help="lease_seconds")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat_seconds")
    parser.add_argument("--poll", type=float, default=0.2, help="poll_seconds")
    parser.add_argument(
        "--work-delay", type=float, default=0.5, help="max simulated work in provision (s)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
