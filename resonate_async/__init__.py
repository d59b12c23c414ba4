"""resonate_async: asyncio-native durable execution with transparent batching.

Write plain ``async def`` workflows; every step taken through the ``Context``
is recorded as a durable promise, so a crashed run resumes where it stopped
and a run started twice happens once. Commands issued by thousands of
concurrent workflows are served by one batch handler call.

Example:
    ```python
    from resonate_async import Resonate, Context

    resonate = Resonate("app.db")

    @resonate.register
    async def greet(ctx: Context, name: str) -> str:
        return f"hello {name}"

    async def main() -> None:
        async with resonate:
            print(await resonate.run("greet-1", greet, "world"))
    ```
"""

from typing import TYPE_CHECKING

from ._clock import Clock, SystemClock
from ._command import Command
from ._context import Context
from ._encoding import Encoder, JSONEncoder
from ._handle import Handle
from ._promise import Promise
from ._promises import Promises
from ._resonate import Resonate
from ._stats import BatcherStats, Histogram, RunStats, Stats, StoreStats
from .errors import (
    BatchResultError,
    CanceledError,
    ConflictError,
    EncodingError,
    NondeterminismError,
    NotFoundError,
    NotRegisteredError,
    PromiseTimeoutError,
    ResonateError,
    ShutdownError,
    StoredError,
    StoreError,
)
from .retry import RetryPolicy, constant, exponential, linear, never
from .stores import MemoryStore, SQLiteStore, Store
from .stores._base import Kind, PromiseRecord, State

if TYPE_CHECKING:
    # Loaded on use by __getattr__ below; imported here so type checkers see the class.
    from .stores.postgres import PostgresStore as PostgresStore

__version__ = "0.1.0"

__all__ = (
    "BatchResultError",
    "BatcherStats",
    "CanceledError",
    "Clock",
    "Command",
    "ConflictError",
    "Context",
    "Encoder",
    "EncodingError",
    "Handle",
    "Histogram",
    "JSONEncoder",
    "Kind",
    "MemoryStore",
    "NondeterminismError",
    "NotFoundError",
    "NotRegisteredError",
    "Promise",
    "PromiseRecord",
    "PromiseTimeoutError",
    "Promises",
    "Resonate",
    "ResonateError",
    "RetryPolicy",
    "RunStats",
    "SQLiteStore",
    "ShutdownError",
    "State",
    "Stats",
    "Store",
    "StoreError",
    "StoreStats",
    "StoredError",
    "SystemClock",
    "constant",
    "exponential",
    "linear",
    "never",
)


if not TYPE_CHECKING:  # type checkers see the import above, and no catch-all

    def __getattr__(name: str) -> object:
        # PostgresStore needs the optional asyncpg driver: import it only on use.
        if name == "PostgresStore":
            from .stores.postgres import PostgresStore

            return PostgresStore
        raise AttributeError(f"module 'resonate_async' has no attribute {name!r}")
