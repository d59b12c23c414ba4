"""How fast a crashed burst resumes, and whether the resumed runs still batch.

    python benchmarks/recovery.py                     # 20,000 runs, a fresh SQLite file
    python benchmarks/recovery.py --runs 2000 --store postgresql://postgres@127.0.0.1/test

Each run issues one batched command, then waits for an event, then issues a
second one. Once every first command is recorded, the process "crashes"
(``resonate_async.testing.crash``: nothing more is written, the runs stay
PENDING), the event is set, and a new ``Resonate`` on the same store resumes
them: each run replays its first command from the store and sends its second
live. Reported: the seconds from the new start until every run settled, and
the second commands' batches (resumed together, they batch like fresh runs).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import click

from resonate_async import Command, Context, Resonate
from resonate_async.retry import never
from resonate_async.testing import crash


@dataclass
class Bump(Command[int]):
    n: int


class Progress:
    """The first commands recorded so far (an ``lfc`` returns once its row is
    committed), and the gate the runs wait at."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.recorded = 0
        self.all_recorded = asyncio.Event()
        self.gate = asyncio.Event()


def build(store: str, progress: Progress) -> Resonate:
    resonate = Resonate(store)

    async def bump(ctx: Context, commands: list[Bump]) -> list[int]:
        return [c.n + 1 for c in commands]

    resonate.register_command_handler(Bump, bump, retry_policy=never())

    @resonate.register(name="flow", retry_policy=never())
    async def flow(ctx: Context, n: int) -> int:
        first = await ctx.lfc(Bump(n))
        progress.recorded += 1
        if progress.recorded == progress.runs:
            progress.all_recorded.set()
        await progress.gate.wait()
        return await ctx.lfc(Bump(first))

    return resonate


async def bench(runs: int, store: str) -> dict[str, Any]:
    progress = Progress(runs)
    first = build(store, progress)
    await first.start()
    prefix = f"recovery-{time.time_ns()}"
    for i in range(runs):
        first.run(f"{prefix}-{i}", "flow", i)
    await progress.all_recorded.wait()
    await crash(first)
    progress.gate.set()
    second = build(store, progress)
    started = time.perf_counter()
    async with second:
        values = await asyncio.gather(*(second.get(f"{prefix}-{i}") for i in range(runs)))
        seconds = time.perf_counter() - started
        stats = second.stats()
    if values != [i + 2 for i in range(runs)]:
        raise click.ClickException("a resumed run returned a wrong value")
    batcher = stats.batchers["Bump"]
    return {
        "runs": runs,
        "seconds": seconds,
        "resumed": stats.runs.recovered,
        "batches": batcher.batches,
        "largest_batch": batcher.batch_size.max,
    }


@click.command()
@click.option("--runs", type=click.IntRange(1, 1_000_000), default=20_000, show_default=True)
@click.option(
    "--store",
    default="",
    help="A SQLite path or a postgresql:// URL (default: a fresh SQLite file).",
)
def main(runs: int, store: str) -> None:
    """Crash a burst of RUNS workflows mid-way, restart, and time their recovery."""
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(bench(runs, store or os.path.join(tmp, "resonate.db")))
    print(
        f"{result['runs']:,} runs resumed in {result['seconds']:.2f} s "
        f"({result['seconds'] / result['runs'] * 1e6:.0f} µs a run); their second commands "
        f"went in {result['batches']:,} batches (largest {result['largest_batch']:,.0f})"
    )


if __name__ == "__main__":
    main()
