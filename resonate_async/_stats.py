"""Counters behind ``Resonate.stats()`` and the typed snapshots it returns."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ("BatcherStats", "Histogram", "RunStats", "Stats", "StoreStats")

# Power-of-two-ish bucket bounds: small enough to keep per batch, wide enough
# to show the blog's batches of 2 to 1,840.
_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_SECONDS_BOUNDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(slots=True)
class Histogram:
    """A fixed-bucket histogram: ``counts[i]`` counts values ``<= bounds[i]``.

    The last count is the overflow bucket (values above every bound).
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    max: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def add(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1
        if value > self.max:
            self.max = value

    @property
    def mean(self) -> float:
        """The mean of every value counted (0.0 when empty)."""
        return self.total / self.n if self.n else 0.0

    def quantile(self, q: float) -> float:
        """An upper bound of the ``q`` quantile (the bucket bound it falls in)."""
        if not self.n:
            return 0.0
        rank = q * self.n
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return self.bounds[i] if i < len(self.bounds) else self.max
        return self.max

    def copy(self) -> Histogram:
        """A snapshot that later counting does not change."""
        return Histogram(self.bounds, list(self.counts), self.total, self.n, self.max)


def size_histogram() -> Histogram:
    """A histogram for batch sizes and rows per transaction."""
    return Histogram(_SIZE_BOUNDS)


def seconds_histogram() -> Histogram:
    """A histogram for latencies in seconds."""
    return Histogram(_SECONDS_BOUNDS)


@dataclass(slots=True)
class StoreStats:
    """What the group-commit writer did: transactions, rows, commit latency.

    A "row" here is one write operation (a ``Create`` or a ``Settle``) in a
    call of ``Store.write``, not a table row: a promise created and settled
    in one transaction counts 2, and a duplicate ``Create`` that changes
    nothing counts 1. Lease traffic (``claim``, ``renew``, ``release``) and
    reads do not go through the writer and are not counted.

    Attributes:
        transactions: ``Store.write`` calls that committed.
        failed_transactions: ``Store.write`` calls that raised (nothing of
            them was written; their callers get a ``StoreError``). A write
            cut short by a shutdown is in neither count.
        rows: operations in the committed transactions, in total.
        rows_per_transaction: one sample per committed transaction: its
            number of operations.
        commit_seconds: one sample per committed transaction: the wall time
            (``time.perf_counter``, not the engine's clock) ``Store.write``
            took, from the call to its return.
    """

    transactions: int = 0
    failed_transactions: int = 0
    rows: int = 0
    rows_per_transaction: Histogram = field(default_factory=size_histogram)
    commit_seconds: Histogram = field(default_factory=seconds_histogram)

    def record_commit(self, rows: int, seconds: float) -> None:
        """Count one committed transaction."""
        self.transactions += 1
        self.rows += rows
        self.rows_per_transaction.add(rows)
        self.commit_seconds.add(seconds)

    @property
    def mean_rows_per_transaction(self) -> float:
        """Operations per committed transaction, on average (``rows / transactions``)."""
        return self.rows / self.transactions if self.transactions else 0.0

    def copy(self) -> StoreStats:
        """A snapshot."""
        return StoreStats(
            self.transactions,
            self.failed_transactions,
            self.rows,
            self.rows_per_transaction.copy(),
            self.commit_seconds.copy(),
        )


@dataclass(slots=True)
class BatcherStats:
    """One command type's batcher: queue depth, batches, sizes, waits, handler time.

    Attributes:
        queue_depth: commands waiting for a batch, their workflows still waiting.
        batches: batches taken from the queue (retries and halves of a batch
            are counted in ``handler_calls``, not here).
        commands: commands in those batches.
        failed_batches: batches whose commands failed without a recorded
            outcome: the store could not record them, or the batch was
            cancelled. A handler that raises is not one: its commands are
            rejected with its error (see ``handler_failures``).
        handler_calls: calls of the handler, retries and bisection included.
        handler_failures: those calls that raised; each command a failure
            leaves without an outcome (retries and bisection exhausted) is
            recorded as rejected with its error.
        batch_size: the size of each batch.
        wait_seconds: one sample per batch: how long its oldest command waited
            in the queue before the batch was taken (lingering for
            ``max_wait`` included), on the engine's clock.
        handler_seconds: one sample per batch: from taking it to its
            outcomes (retries and their delays included).
    """

    name: str
    queue_depth: int = 0
    batches: int = 0
    commands: int = 0
    failed_batches: int = 0
    batch_size: Histogram = field(default_factory=size_histogram)
    wait_seconds: Histogram = field(default_factory=seconds_histogram)
    handler_seconds: Histogram = field(default_factory=seconds_histogram)
    handler_calls: int = 0
    handler_failures: int = 0

    def copy(self) -> BatcherStats:
        """A snapshot."""
        return BatcherStats(
            self.name,
            self.queue_depth,
            self.batches,
            self.commands,
            self.failed_batches,
            self.batch_size.copy(),
            self.wait_seconds.copy(),
            self.handler_seconds.copy(),
            self.handler_calls,
            self.handler_failures,
        )


@dataclass(slots=True)
class RunStats:
    """Runs this process executed.

    Attributes:
        started: bodies that began executing here: fresh runs, resumed ones
            and remote calls claimed here (``run()`` of an id whose outcome
            is stored, or that runs elsewhere, starts nothing).
        completed: runs settled here as resolved.
        failed: runs settled here as rejected (canceled and timed out included).
        recovered: of those started, the runs resumed from the store (after a
            crash, or taken over from another worker).
    """

    started: int = 0
    completed: int = 0
    failed: int = 0
    recovered: int = 0

    def copy(self) -> RunStats:
        """A snapshot."""
        return RunStats(self.started, self.completed, self.failed, self.recovered)


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot returned by ``Resonate.stats()``.

    Attributes:
        runs: run counters of this process.
        batchers: per command type name, its batcher's counters.
        store: the group-commit writer's counters (transactions, rows per
            transaction, p50/p99 commit latency via ``commit_seconds.quantile``).
    """

    runs: RunStats
    batchers: dict[str, BatcherStats]
    store: StoreStats

    def copy(self) -> Stats:
        """A snapshot that changes to this one (or its counters) do not reach."""
        return Stats(
            self.runs.copy(),
            {name: b.copy() for name, b in self.batchers.items()},
            self.store.copy(),
        )
