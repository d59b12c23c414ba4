"""Transparent batching: 10,000 durable workflows, one INSERT batch per handler call.

Each workflow issues one small command ("insert this user"); the SDK groups
the commands of concurrent workflows into one call of the batch handler (many
INSERTs, one commit) without the workflows coordinating anything.

Run it with ``make demo`` (or ``python examples/batching.py``).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass

import aiosqlite

from resonate_async import Command, Context, Resonate
from resonate_async.retry import never

USERS = 10_000

resonate = Resonate(":memory:")  # main() points it at a fresh SQLite file


@dataclass
class InsertUser(Command[None]):
    id: int


async def insert_users(ctx: Context, users: list[InsertUser]) -> None:
    db: aiosqlite.Connection = ctx.get_dependency("db")
    # Idempotent: a batch may run again after a crash, so re-inserting is a no-op.
    await db.executemany("INSERT OR IGNORE INTO users (id) VALUES (?)", [(u.id,) for u in users])
    await db.commit()  # one commit per batch


@resonate.register(retry_policy=never())
async def create_user(ctx: Context, user_id: int) -> int:
    await ctx.lfc(InsertUser(user_id))  # transparently batched
    return user_id


resonate.register_command_handler(InsertUser, insert_users, maxlen=1000)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resonate.use_store(os.path.join(tmp, "resonate.db"))
        async with aiosqlite.connect(os.path.join(tmp, "users.db")) as db, resonate:
            await db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            await db.commit()
            resonate.set_dependency("db", db)

            started = time.perf_counter()
            handles = [resonate.run(f"insert-{u}", create_user, u) for u in range(USERS)]
            # In order: each await of a finished handle returns at once. (A
            # handle is not a future, so asyncio.gather would wrap each one in
            # a task of its own: about half as long again for this burst.)
            total = sum([await handle for handle in handles])
            elapsed = time.perf_counter() - started

            async with db.execute("SELECT COUNT(*) FROM users") as cursor:
                (rows,) = await cursor.fetchone() or (0,)
            stats = resonate.stats()
            batches = stats.batchers["InsertUser"]
            print(f"{rows:,} rows inserted by {USERS:,} durable workflows in {elapsed:.2f}s")
            print(
                f"{batches.batches:,} handler calls (batches of {batches.batch_size.mean:.0f} "
                f"on average, largest {batches.batch_size.max:.0f})"
            )
            print(
                f"{stats.store.transactions:,} store transactions, "
                f"{stats.store.mean_rows_per_transaction:.0f} rows each on average"
            )
            assert total == sum(range(USERS)), "every workflow returned its user id"
            assert rows == USERS, "every user row is present once"


if __name__ == "__main__":
    asyncio.run(main())
