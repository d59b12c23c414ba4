"""Memory: RSS per in-flight run, and peak RSS when streaming many runs with a bound.

    python benchmarks/memory.py inflight --runs 100000
    python benchmarks/memory.py stream --runs 1000000 --in-flight 10000

``inflight`` starts RUNS workflows whose batched command cannot complete (the
handler waits on a gate), so every run is in flight at once, and reports the
growth of the resident set per run. ``stream`` submits RUNS workflows keeping
at most IN_FLIGHT running (the bounded-submission pattern documented in
docs/performance.md) and reports the peak resident set. The promise store is
a fresh SQLite file in a temporary directory (``--store`` to change it).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import tempfile
import time
from dataclasses import dataclass

import click

from resonate_async import Command, Context, Resonate
from resonate_async.retry import never


@dataclass
class Touch(Command[None]):
    id: int


def rss_mib() -> float:
    """The current resident set, from /proc (the peak is ``ru_maxrss``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(store: str, gate: asyncio.Event | None) -> Resonate:
    resonate = Resonate(store)

    async def handler(ctx: Context, cmds: list[Touch]) -> None:
        if gate is not None:
            await gate.wait()

    resonate.register_command_handler(Touch, handler, retry_policy=never())

    @resonate.register(name="touch", retry_policy=never())
    async def touch(ctx: Context, i: int) -> int:
        await ctx.lfc(Touch(i))
        return i

    return resonate


async def inflight(runs: int, store: str) -> None:
    gate = asyncio.Event()
    resonate = build(store, gate)
    async with resonate:
        gc.collect()
        before = rss_mib()
        handles = [resonate.run(f"m-{i}", "touch", i) for i in range(runs)]
        # Poll until every root is durable and every command queued.
        while resonate.stats().store.rows < runs:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        gc.collect()
        during = rss_mib()
        gate.set()
        await asyncio.gather(*handles)
    per_run = (during - before) * 2**20 / runs
    growth = f"RSS {before:.0f} -> {during:.0f} MiB"
    print(f"{runs:,} runs in flight: {growth}, {per_run:,.0f} bytes per run")


async def stream(runs: int, in_flight: int, store: str) -> None:
    resonate = build(store, None)
    async with resonate:
        started = time.perf_counter()
        bound = asyncio.Semaphore(in_flight)
        all_done = asyncio.Event()
        done = 0

        def release(_: object) -> None:
            nonlocal done
            done += 1
            bound.release()
            if done == runs:
                all_done.set()

        for i in range(runs):
            await bound.acquire()  # at most IN_FLIGHT runs at once
            waiter = asyncio.ensure_future(resonate.run(f"s-{i}", "touch", i).result())
            waiter.add_done_callback(release)
        await all_done.wait()
        elapsed = time.perf_counter() - started
    print(
        f"{runs:,} runs streamed, at most {in_flight:,} in flight: {elapsed:.1f}s, "
        f"peak RSS {peak_mib():.0f} MiB"
    )


@click.group()
def main() -> None:
    """Memory benchmarks."""


@main.command("inflight")
@click.option("--runs", type=click.IntRange(1), default=100_000, show_default=True)
@click.option("--store", default="", help="Promise store (default: a fresh SQLite file).")
def inflight_command(runs: int, store: str) -> None:
    """RSS growth per run with RUNS runs in flight at once."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(inflight(runs, store or os.path.join(tmp, "resonate.db")))


@main.command("stream")
@click.option("--runs", type=click.IntRange(1), default=1_000_000, show_default=True)
@click.option("--in-flight", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--store", default="", help="Promise store (default: a fresh SQLite file).")
def stream_command(runs: int, in_flight: int, store: str) -> None:
    """Peak RSS when streaming RUNS runs with at most IN_FLIGHT at once."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(stream(runs, in_flight, store or os.path.join(tmp, "resonate.db")))


if __name__ == "__main__":
    main()
