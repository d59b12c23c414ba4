"""The blog workload through four pipelines, side by side, in one process.

    python benchmarks/compare.py                      # --sizes 10000,100000
    python benchmarks/compare.py --sizes 200 --loop uvloop --json out.json
    python benchmarks/compare.py --store postgresql://postgres@127.0.0.1/test

The workload: N "create user" operations, each inserting one row into a fresh
SQLite ``users`` table. Pipelines:

* ``raw``: one ``executemany`` and one commit over aiosqlite (the ceiling).
* ``dataloader``: N coroutines gathered, each ``await loader.load(u)`` on an
  ``aiodataloader.DataLoader`` whose batch function does executemany + commit.
  Batched, but not durable: the asyncio floor that batching can be held to.
* ``resonate``: N durable workflows, each ``await ctx.lfc(InsertUser(u))``,
  served by an async batch handler (executemany + commit). The handles are
  awaited in order, as the blog's benchmark does (``for p in promises:
  p.result()``); ``--gather`` awaits them with ``asyncio.gather`` instead,
  which wraps each handle in one more task (a handle is not a future).
* ``resonate --no-batch``: N durable workflows, each one ``lfc`` of a plain
  ``def`` that inserts and commits one row (sqlite3, worker thread, a lock).
  Slow, so it runs at the smallest size only.

Every pipeline is warmed up at a small size first; then ``--repeat`` rounds
(default 3) run every pipeline in turn, and each figure is the pipeline's
median run (this machine's speed drifts by tens of percent between runs;
``--json`` keeps every run's seconds). ``--no-batch`` runs once, last (see
:func:`bench`). Every run checks that the table holds exactly N rows, and
reports how much of its time the cyclic GC took ("in GC"); after the table,
each pipeline's growth from the smallest size to the larger ones is printed
with and without that GC time. ``--gc-threshold`` and ``--gc-freeze`` try
what an application can do about the GC (see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import aiosqlite
import click
from aiodataloader import DataLoader

# The durable pieces are the blog benchmark's own (this directory is on sys.path
# when a script here runs).
from batching import INSERT, SCHEMA, build, create_user, create_user_batching
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from collections.abc import Iterator

WARMUP_USERS = 200

PIPELINES = ("raw", "dataloader", "resonate", "resonate-no-batch")
LABELS = {
    "raw": "(a) raw executemany",
    "dataloader": "(b) aiodataloader floor",
    "resonate": "(c) resonate batched",
    "resonate-no-batch": "(d) resonate --no-batch",
}


# -- the pipelines -------------------------------------------------------------


class GCClock:
    """Seconds spent in the cyclic GC so far (a ``gc.callbacks`` hook).

    A run reads it before and after its timed part: the difference is the
    share of its wall time that the GC took (the GC runs on whatever thread
    allocates, here nearly always the event loop's).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


GC_CLOCK = GCClock()
gc.callbacks.append(GC_CLOCK)


@contextlib.contextmanager
def frozen_gc(enabled: bool) -> Iterator[None]:
    """With ``--gc-freeze``: everything alive on entry (the submitted work) is
    left out of the cyclic GC's collections until the block ends."""
    if not enabled:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Stopwatch:
    """Times a ``with`` block: ``seconds`` of wall time, ``gc_seconds`` of it in the GC."""

    seconds = gc_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._started, self._in_gc = time.perf_counter(), GC_CLOCK.seconds
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        self.gc_seconds = GC_CLOCK.seconds - self._in_gc


def peak_rss_mb() -> float:
    """Process-wide peak RSS so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def count_rows(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        (rows,) = conn.execute("SELECT COUNT(*) FROM users").fetchone()
    finally:
        conn.close()
    return int(rows)


def fresh_users_db(tmp: str) -> str:
    path = os.path.join(tmp, "users.db")
    conn = sqlite3.connect(path)
    conn.execute(SCHEMA)
    conn.commit()
    conn.close()
    return path


async def run_raw(users: int, tmp: str, store: str) -> dict[str, Any]:
    path = fresh_users_db(tmp)
    async with aiosqlite.connect(path) as db:
        with Stopwatch() as timed:
            await db.executemany(INSERT, [(u,) for u in range(users)])
            await db.commit()
    return {
        "seconds": timed.seconds,
        "gc_seconds": timed.gc_seconds,
        "rows": count_rows(path),
        "transactions": 1,
        "batches": 1,
    }


async def run_dataloader(
    users: int, tmp: str, store: str, *, freeze: bool = False
) -> dict[str, Any]:
    path = fresh_users_db(tmp)
    batches = 0
    async with aiosqlite.connect(path) as db:

        async def load(keys: list[int]) -> list[None]:
            nonlocal batches
            batches += 1
            await db.executemany(INSERT, [(k,) for k in keys])
            await db.commit()
            return [None] * len(keys)

        loader: DataLoader[int, None] = DataLoader(load, cache=False)

        async def create(u: int) -> None:
            await loader.load(u)

        with Stopwatch() as timed:
            loads = asyncio.gather(*(create(u) for u in range(users)))
            with frozen_gc(freeze):
                await loads
    return {
        "seconds": timed.seconds,
        "gc_seconds": timed.gc_seconds,
        "rows": count_rows(path),
        "transactions": batches,
        "batches": batches,
    }


async def run_resonate(
    users: int, tmp: str, store: str, *, batch: bool, gather: bool = False, freeze: bool = False
) -> dict[str, Any]:
    path = fresh_users_db(tmp)
    resonate = build(store or os.path.join(tmp, "resonate.db"))
    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        async with aiosqlite.connect(path) as db, resonate:
            resonate.set_dependency("db", db)
            resonate.set_dependency("conn", conn)
            resonate.set_dependency("conn_lock", threading.Lock())
            resonate.set_dependency("log_batches", False)
            fn = create_user_batching if batch else create_user
            prefix = f"compare-{time.time_ns()}-{'b' if batch else 'n'}"
            with Stopwatch() as timed:
                handles = [resonate.run(f"{prefix}-{u}", fn, u) for u in range(users)]
                with frozen_gc(freeze):
                    if gather:
                        await asyncio.gather(*handles)
                    else:
                        for handle in handles:
                            await handle
            stats = resonate.stats()
    finally:
        conn.close()
    batcher = stats.batchers.get("InsertUser")
    return {
        "seconds": timed.seconds,
        "gc_seconds": timed.gc_seconds,
        "rows": count_rows(path),
        "transactions": stats.store.transactions,
        "store_rows": stats.store.rows,
        "batches": batcher.batches if batcher and batch else None,
        "rows_per_transaction": stats.store.mean_rows_per_transaction,
    }


async def run_pipeline(
    pipeline: str, users: int, store: str, *, gather: bool = False, freeze: bool = False
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        if pipeline == "raw":
            result = await run_raw(users, tmp, store)
        elif pipeline == "dataloader":
            result = await run_dataloader(users, tmp, store, freeze=freeze)
        else:
            batch = pipeline == "resonate"
            result = await run_resonate(
                users, tmp, store, batch=batch, gather=gather, freeze=freeze
            )
    if result["rows"] != users:
        raise click.ClickException(f"{pipeline}: expected {users} rows, found {result['rows']}")
    if "rows_per_transaction" not in result:
        result["rows_per_transaction"] = users / result["transactions"]
    result.update(
        pipeline=pipeline,
        users=users,
        us_per_run=result["seconds"] / users * 1e6 if users else 0.0,
        peak_rss_mb=peak_rss_mb(),
    )
    return result


async def bench(
    sizes: list[int],
    store: str,
    progress: Console | None,
    *,
    gather: bool = False,
    freeze: bool = False,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Each pipeline at each size: warm-ups first, then ``repeat`` rounds of every
    pipeline in turn (so a drift of the machine's speed touches them alike),
    keeping each pipeline's median run.

    ``--no-batch`` is measured once, at the smallest size, after everything
    else: its ~20,000 fsync'd commits left the runs that followed them
    slower (10k batched 0.34-0.37 s before, 0.37-0.46 s after, in one
    process), which skewed the medians and the 100k/10k ratio.
    """
    smallest = min(sizes)
    measured: dict[int, dict[str, dict[str, Any]]] = {}

    async def measure(pipeline: str, users: int) -> dict[str, Any]:
        result = await run_pipeline(pipeline, users, store, gather=gather, freeze=freeze)
        if progress is not None:
            progress.print(f"[dim]{LABELS[pipeline]} @ {users:,}: {result['seconds']:.3f}s[/dim]")
        return result

    batched = [p for p in PIPELINES if p != "resonate-no-batch"]
    for users in sizes:
        for pipeline in batched:
            await run_pipeline(
                pipeline, min(WARMUP_USERS, users), store, gather=gather, freeze=freeze
            )
        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in batched}
        for _ in range(repeat):
            for pipeline in batched:
                samples[pipeline].append(await measure(pipeline, users))
        measured[users] = {p: median_run(runs) for p, runs in samples.items()}
    if "resonate-no-batch" in PIPELINES:
        await run_pipeline(
            "resonate-no-batch", min(WARMUP_USERS, smallest), store, gather=gather, freeze=freeze
        )
        no_batch = await measure("resonate-no-batch", smallest)
        measured[smallest]["resonate-no-batch"] = median_run([no_batch])
    results: list[dict[str, Any]] = []
    for users in sizes:
        by_pipeline = measured[users]
        raw = by_pipeline["raw"]["seconds"]
        floor = by_pipeline["dataloader"]["seconds"]
        for pipeline in PIPELINES:
            result = by_pipeline.get(pipeline)
            if result is None:
                continue
            result["ratio_raw"] = result["seconds"] / raw if raw else None
            result["ratio_dataloader"] = result["seconds"] / floor if floor else None
            results.append(result)
    return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time (the lower one of an even count), with every run's
    seconds, and the peak RSS as of the first run (later rounds would report
    the peaks of every pipeline of the round before)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["samples"] = [r["seconds"] for r in runs]
    chosen["peak_rss_mb"] = runs[0]["peak_rss_mb"]
    return chosen


def render(results: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for name, justify in (
        ("users", "right"),
        ("pipeline", "left"),
        ("seconds", "right"),
        ("in GC", "right"),
        ("µs/run", "right"),
        ("vs raw (a)", "right"),
        ("vs floor (b)", "right"),
        ("txns", "right"),
        ("rows/txn", "right"),
        ("batches", "right"),
        ("peak RSS MiB", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    for r in results:
        table.add_row(
            f"{r['users']:,}",
            LABELS[r["pipeline"]],
            f"{r['seconds']:.3f}",
            f"{r['gc_seconds']:.3f}",
            f"{r['us_per_run']:.1f}",
            ratio(r["ratio_raw"]),
            ratio(r["ratio_dataloader"]),
            f"{r['transactions']:,}",
            f"{r['rows_per_transaction']:.1f}",
            "—" if r["batches"] is None else f"{r['batches']:,}",
            f"{r['peak_rss_mb']:.0f}",
        )
    return table


def growth(results: list[dict[str, Any]]) -> list[str]:
    """How each pipeline's time grows from the smallest size to each larger one,
    with and without the time spent in the GC."""
    by_size: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by_size.setdefault(r["pipeline"], {})[r["users"]] = r
    lines = []
    for pipeline, runs in by_size.items():
        small = min(runs)
        base = runs[small]
        for users in sorted(runs)[1:]:
            big = runs[users]
            wall = big["seconds"] / base["seconds"]
            no_gc = (big["seconds"] - big["gc_seconds"]) / (base["seconds"] - base["gc_seconds"])
            lines.append(
                f"{LABELS[pipeline]}: {users:,} users took {wall:.2f}x the time of {small:,} "
                f"({no_gc:.2f}x without the GC's time; linear is {users / small:.0f}x)"
            )
    return lines


def run_with_loop(loop: str, coro: Any) -> Any:
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


@click.command()
@click.option(
    "--sizes",
    default="10000,100000",
    show_default=True,
    help="Comma-separated user counts; --no-batch runs at the smallest only.",
)
@click.option(
    "--store",
    default="",
    help="Promise store: a SQLite path or a postgresql:// URL (default: a fresh SQLite file).",
)
@click.option("--loop", type=click.Choice(["asyncio", "uvloop"]), default="asyncio")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--progress/--no-progress", default=True, help="Print each result as it lands.")
@click.option(
    "--gather", is_flag=True, help="Await the handles with asyncio.gather instead of in order."
)
@click.option(
    "--gc-freeze",
    "freeze",
    is_flag=True,
    help="Call gc.freeze() once a pipeline's work is submitted (gc.unfreeze() once done).",
)
@click.option(
    "--repeat",
    default=3,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Rounds per size; each figure is the pipeline's median run (--no-batch runs once).",
)
@click.option(
    "--gc-threshold",
    default="",
    help="Call gc.set_threshold with these comma-separated ints first (e.g. 700,10,100).",
)
def main(
    sizes: str,
    store: str,
    loop: str,
    json_path: str | None,
    progress: bool,
    gather: bool,
    freeze: bool,
    repeat: int,
    gc_threshold: str,
) -> None:
    """Compare raw SQLite, an aiodataloader floor, and resonate_async (batched / not)."""
    if gc_threshold:
        try:
            gc.set_threshold(*(int(t) for t in gc_threshold.split(",")))
        except (ValueError, TypeError) as exc:
            raise click.BadParameter(f"not 1 to 3 integers: {gc_threshold!r}") from exc
    try:
        counts = [int(s.replace("_", "")) for s in sizes.split(",") if s.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"not a list of integers: {sizes!r}") from exc
    if not counts or min(counts) < 1:
        raise click.BadParameter("sizes must be positive integers")
    console = Console()
    if console.width < 140:  # keep the table readable when piped or in a narrow terminal
        console = Console(width=140)
    status = Console(stderr=True) if progress else None
    work = bench(counts, store, status, gather=gather, freeze=freeze, repeat=repeat)
    results = run_with_loop(loop, work)
    store_name = "postgres" if store.startswith("postgres") else "sqlite"
    if store and store_name == "sqlite":
        store_name = f"sqlite ({store})"
    title = (
        f"Blog workload, loop={loop}, promise store={store_name}, "
        f"handles awaited {'with gather' if gather else 'in order'}, "
        f"gc thresholds {gc.get_threshold()}{', gc.freeze() once submitted' if freeze else ''}, "
        f"median of {repeat} runs, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    console.print(render(results, title))
    console.print(
        "in GC: seconds of the run spent in the cyclic garbage collector. "
        "txns: promise-store transactions for resonate rows; users-db commits for (a)/(b). "
        "Peak RSS is the process-wide high-water mark up to that pipeline's first run at "
        "that size; --no-batch runs last, after every size."
    )
    for line in growth(results):
        console.print(line)
    if json_path:
        meta = {
            "loop": loop,
            "store": store_name,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "sizes": counts,
            "gather": gather,
            "repeat": repeat,
            "gc_threshold": gc.get_threshold(),
            "gc_freeze": freeze,
        }
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
