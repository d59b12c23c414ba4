"""Fixtures shared across the test suite."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

POSTGRES_DSN_ENV = "RESONATE_TEST_POSTGRES_DSN"

# Scripts that tests run as subprocesses: never import them while collecting
# (--doctest-modules would, and they act on sys.argv at import).
collect_ignore = [
    "crash_worker.py",
    "crash_loop_workload.py",
    "multiworker_workload.py",
    "paused_workload.py",
    "scripts.py",
]


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of a PostgreSQL server to test against; skips when none is set."""
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn and os.environ.get("RESONATE_REQUIRE_POSTGRES"):
        # CI sets this: there the PostgreSQL tests must run, never skip.
        pytest.fail(f"RESONATE_REQUIRE_POSTGRES is set but {POSTGRES_DSN_ENV} is not")
    if not dsn:
        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_DSN_ENV}, "
            "e.g. postgresql://postgres@127.0.0.1:5432/test"
        )
    return dsn


@pytest.fixture
def postgres_schema(postgres_dsn: str) -> Iterator[str]:
    """A fresh schema name for one test; the schema is dropped afterwards.

    Stores create the schema when they open, so a test only passes the name
    on (``PostgresStore(dsn, schema=postgres_schema)``). Synchronous on
    purpose: async fixtures may request it with ``getfixturevalue``, and the
    drop runs in its own event loop after the test's loop has stopped.
    """
    schema = f"resonate_test_{uuid.uuid4().hex[:12]}"
    yield schema
    asyncio.run(_drop_schema(postgres_dsn, schema))


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
