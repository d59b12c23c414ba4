"""Where the cyclic GC's work comes from in a burst of blog workflows.

    python benchmarks/gc_census.py                 # 100,000 runs
    python benchmarks/gc_census.py --runs 10000

Starts N blog workflows at once on a fresh SQLite promise store (as
``compare.py``'s batched pipeline does, handles awaited in order) and reports:

* the collections of each generation and the seconds they took;
* how many allocations the GC *counted* per run, split by where they
  happened: the ``resonate.run`` calls, the writer's reports that start
  admitted runs' tasks, the reports that wake workflows whose commands were
  recorded, and everything else. A young collection starts every 700 counted
  allocations; a free only uncounts one while the count is above zero, so
  objects freed in a burst right after a collection are not uncounted;
* what the first full collection after the burst was submitted walked: the
  number of tracked objects and the most common types;
* with ``--skip-rule``, how far each full collection was from being skipped.
  CPython skips one while the objects promoted into the oldest generation
  since the last (``long_lived_pending``) are fewer than a quarter of those
  it kept then (``long_lived_total``). The hook counts both with
  ``gc.get_objects(2)`` around every middle collection, which is slow.

It reads two internals (the writer's transaction report and the engine), so
it is a diagnostic, not an example.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any

import aiosqlite
import click
from batching import SCHEMA, build, create_user_batching

from resonate_async import _writer

PHASES = ("resonate.run calls", "starting admitted runs", "waking recorded commands", "the rest")


class Census:
    """A ``gc.callbacks`` hook: collections, their time, and the counted allocations."""

    def __init__(self) -> None:
        self.flushed = 0  # counted allocations that young collections reset
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self.full_walks: list[tuple[float, int]] = []  # (seconds, tracked objects)
        self.armed = False  # set once the burst is submitted: census the next full collection
        self.snapshot_at = 0  # which full collection that was (1-based)
        self.types: collections.Counter[str] = collections.Counter()
        self._started = 0.0
        self.skip_rule = False  # measure the promotions (see --skip-rule)
        self.kept = 0  # objects in the oldest generation after the last full collection
        self.promoted = 0  # moved into it by middle collections since then
        self.before = 0
        self.pending: list[tuple[int, int]] = []  # (promoted, kept) as each full one starts

    def counted(self) -> int:
        """Counted allocations so far (monotonic while the hook is installed)."""
        return self.flushed + gc.get_count()[0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            self.flushed += gc.get_count()[0]
            if self.skip_rule and generation == 1:
                self.before = len(gc.get_objects(2))
            elif self.skip_rule and generation == 2 and self.kept:
                self.pending.append((self.promoted, self.kept))
            self._started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._started
        if self.skip_rule and generation == 1:
            self.promoted += len(gc.get_objects(2)) - self.before
        elif self.skip_rule and generation == 2:
            self.kept, self.promoted = len(gc.get_objects(2)), 0
        self.seconds[generation] += elapsed
        self.collections[generation] += 1
        if generation == 2:
            objects = gc.get_objects()
            self.full_walks.append((elapsed, len(objects)))
            if self.armed and not self.types:
                self.types.update(_name(type(o)) for o in objects)
                self.snapshot_at = len(self.full_walks)
            del objects


def _name(cls: type) -> str:
    """A type's name, with its package unless builtin (asyncio has a Handle too)."""
    package = cls.__module__.partition(".")[0]
    return cls.__qualname__ if package == "builtins" else f"{package}.{cls.__qualname__}"


def instrument(census: Census, phases: collections.Counter[str]) -> None:
    """Attribute the writer's report callbacks to their phase."""
    names = {"_root_created": PHASES[1], "_recorded": PHASES[2]}

    def report(txn: Any, results: Any, error: BaseException | None) -> None:
        future = txn.future
        if error is None:
            future.set_result(results)
        else:
            future.set_exception(error)
            future.exception()
        for index, done, arg in zip(txn.indexes, txn.dones, txn.args, strict=True):
            before = census.counted()
            done(arg, None if results is None else results[index], error)
            phase = names.get(getattr(done, "__name__", ""))
            if phase is not None:
                phases[phase] += census.counted() - before

    _writer._Transaction.report = report  # type: ignore[method-assign,assignment]


async def burst(runs: int, tmp: str, census: Census | None) -> tuple[float, dict[str, int]]:
    """Run the burst; its seconds and, with a census, the counted allocations by phase."""
    users = os.path.join(tmp, f"users-{runs}.db")
    conn = sqlite3.connect(users)
    conn.execute(SCHEMA)
    conn.close()
    resonate = build(os.path.join(tmp, f"resonate-{runs}.db"))
    phases: collections.Counter[str] = collections.Counter()
    if census is not None:
        instrument(census, phases)
    async with aiosqlite.connect(users) as db, resonate:
        resonate.set_dependency("db", db)
        resonate.set_dependency("log_batches", False)
        if census is not None:
            gc.collect()
            gc.callbacks.append(census)
        try:
            counted = census.counted if census is not None else lambda: 0
            started, before = time.perf_counter(), counted()
            handles = [resonate.run(f"gc-{u}", create_user_batching, u) for u in range(runs)]
            submitted = counted()
            if census is not None:
                census.armed = True
            for handle in handles:
                await handle
            seconds, total = time.perf_counter() - started, counted() - before
        finally:
            if census is not None:
                gc.callbacks.remove(census)
    phases[PHASES[0]] = submitted - before
    phases[PHASES[3]] = total - sum(phases[p] for p in PHASES[:3])
    return seconds, dict(phases)


@click.command()
@click.option("--runs", default=100_000, show_default=True, help="Workflows in the burst.")
@click.option("--top", default=12, show_default=True, help="Types to list from the census.")
@click.option(
    "--skip-rule",
    is_flag=True,
    help="Also compare each full collection's promotions with CPython's skip rule (slow).",
)
def main(runs: int, top: int, skip_rule: bool) -> None:
    """Count the cyclic GC's collections and what they walk in a burst of N runs."""
    census = Census()
    census.skip_rule = skip_rule
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(burst(200, tmp, None))  # warm-up
        seconds, phases = asyncio.run(burst(runs, tmp, census))
    print(
        f"{runs:,} runs in {seconds:.3f} s, Python {sys.version.split()[0]}, "
        f"GC thresholds {gc.get_threshold()}"
    )
    print(
        "collections (young, middle, full): "
        + ", ".join(f"{n:,}" for n in census.collections)
        + "; seconds: "
        + ", ".join(f"{s:.3f}" for s in census.seconds)
    )
    print(f"allocations the GC counted: {sum(phases.values()) / runs:.1f} per run")
    for phase in PHASES:
        print(f"  {phases[phase] / runs:5.1f} per run in {phase}")
    if census.full_walks:
        walks = [s for s, _ in census.full_walks]
        sizes = [n for _, n in census.full_walks]
        print(
            f"full collections: median {statistics.median(walks) * 1000:.1f} ms, "
            f"tracked objects after them {min(sizes):,} to {max(sizes):,}"
        )
    if census.types:
        print(f"tracked objects after full collection {census.snapshot_at}:")
        for name, count in census.types.most_common(top):
            print(f"  {count:8,} {name}")
    else:
        print("no full collection after the burst was submitted")
    if census.pending:
        ratios = sorted(promoted / (kept / 4) for promoted, kept in census.pending)
        print(
            f"skip rule: promoted since the last full collection / a quarter of what it "
            f"kept, as each of {len(ratios)} full collections started: median "
            f"{statistics.median(ratios):.2f}, {ratios[0]:.2f} to {ratios[-1]:.2f} "
            "(below 1.00 CPython skips it)"
        )


if __name__ == "__main__":
    main()
