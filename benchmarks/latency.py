"""Latency of one command on an idle batcher: what batching costs a lone caller.

    python benchmarks/latency.py                         # 500 runs, memory + sqlite
    python benchmarks/latency.py --runs 2000 --loop uvloop
    python benchmarks/latency.py --stores sqlite,postgresql://postgres@127.0.0.1/test

Runs are strictly sequential (one workflow in flight), so every command finds
the batcher idle and is served as a batch of one. Per run it measures:

* ``call → handler``: from the workflow's ``ctx.lfc(...)`` call to the batch
  handler's first line (queueing, durable create of the command promise);
* ``handler → resume``: from the handler's return to the line after the
  ``await`` in the workflow (durable resolve, waking the workflow);
* ``run → result``: from ``resonate.run(...)`` to its result (the whole run,
  including the workflow's own promise).
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from resonate_async import Command, Context, Resonate
from resonate_async.retry import never

METRICS = ("call → handler", "handler → resume", "run → result")


@dataclass
class Probe(Command[None]):
    i: int


async def serve(ctx: Context, probes: list[Probe]) -> None:
    marks: dict[int, dict[str, float]] = ctx.get_dependency("marks")
    entered = time.perf_counter()
    for p in probes:
        marks[p.i].setdefault("enter", entered)
    returned = time.perf_counter()
    for p in probes:
        marks[p.i]["return"] = returned


async def probe(ctx: Context, i: int) -> None:
    marks: dict[int, dict[str, float]] = ctx.get_dependency("marks")
    mark = marks.setdefault(i, {})
    mark.setdefault("call", time.perf_counter())
    await ctx.lfc(Probe(i))
    mark["resume"] = time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < q <= 1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def measure(spec: str, runs: int, warmup: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "resonate.db") if spec == "sqlite" else spec
        if spec == "memory":
            store = ":memory:"
        resonate = Resonate(store)
        resonate.register(probe, retry_policy=never())
        resonate.register_command_handler(Probe, serve, retry_policy=never())
        marks: dict[int, dict[str, float]] = {}
        resonate.set_dependency("marks", marks)
        samples: dict[str, list[float]] = {m: [] for m in METRICS}
        prefix = f"latency-{time.time_ns()}"
        async with resonate:
            for i in range(warmup + runs):
                started = time.perf_counter()
                await resonate.run(f"{prefix}-{i}", probe, i)
                finished = time.perf_counter()
                if i < warmup:
                    continue
                m = marks[i]
                samples["call → handler"].append(m["enter"] - m["call"])
                samples["handler → resume"].append(m["resume"] - m["return"])
                samples["run → result"].append(finished - started)
            stats = resonate.stats()
    batcher = stats.batchers["Probe"]
    if batcher.batches != warmup + runs or batcher.commands != warmup + runs:
        raise click.ClickException(
            f"{spec}: expected {warmup + runs} batches of one, got {batcher.batches} "
            f"batches for {batcher.commands} commands"
        )
    return samples


def run_with_loop(loop: str, coro: Any) -> Any:
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


async def bench(stores: list[str], runs: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    return {spec: await measure(spec, runs, warmup) for spec in stores}


@click.command()
@click.option("--runs", type=click.IntRange(1), default=500, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=20, show_default=True)
@click.option(
    "--stores",
    default="memory,sqlite",
    show_default=True,
    help="Comma-separated: memory, sqlite (a fresh file), or a postgresql:// URL.",
)
@click.option("--loop", type=click.Choice(["asyncio", "uvloop"]), default="asyncio")
def main(runs: int, warmup: int, stores: str, loop: str) -> None:
    """Time one command at a time through an idle batcher; print p50/p99 in µs."""
    specs = [s.strip() for s in stores.split(",") if s.strip()]
    for spec in specs:
        if spec not in ("memory", "sqlite") and not spec.startswith(
            ("postgres://", "postgresql://")
        ):
            raise click.BadParameter(f"unknown store {spec!r}", param_hint="--stores")
    results = run_with_loop(loop, bench(specs, runs, warmup))
    console = Console()
    if console.width < 100:
        console = Console(width=100)
    table = Table(
        title=f"One command on an idle batcher: {runs} sequential runs, loop={loop}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    for name in ("store", "interval", "p50 µs", "p99 µs", "mean µs", "max µs"):
        table.add_column(name, justify="left" if name in ("store", "interval") else "right")
    for spec, samples in results.items():
        label = "postgres" if spec.startswith("postgres") else spec
        for metric in METRICS:
            values = samples[metric]
            table.add_row(
                label,
                metric,
                f"{percentile(values, 0.50) * 1e6:.0f}",
                f"{percentile(values, 0.99) * 1e6:.0f}",
                f"{sum(values) / len(values) * 1e6:.0f}",
                f"{max(values) * 1e6:.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
