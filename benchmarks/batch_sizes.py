"""Batch sizes over time for the blog workload, drawn as an SVG.

    python benchmarks/batch_sizes.py                       # 100,000 runs
    python benchmarks/batch_sizes.py --runs 10000 --out sizes.svg --json sizes.json

Starts N blog workflows at once on a fresh SQLite promise store (as
``compare.py`` does) and records, for every call of the batch handler, when it
started and how many commands it served; a side task samples the number of
completed runs every few milliseconds. The SVG shows the batches as bars
(left axis) and the completed runs as a line (right axis). No plotting
library: the SVG is written by hand, so the script runs wherever the
benchmarks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import tempfile
import time
from html import escape
from typing import Any

import aiosqlite
import click

# The blog benchmark's own workload (this directory is on sys.path when a
# script here runs).
from batching import SCHEMA, InsertUser, create_user_batching, insert_users

from resonate_async import Context, Resonate
from resonate_async.retry import never

SAMPLE_SECONDS = 0.005


async def measure(runs: int, tmp: str) -> dict[str, Any]:
    users = os.path.join(tmp, "users.db")
    conn = sqlite3.connect(users)
    conn.execute(SCHEMA)
    conn.commit()
    conn.close()
    resonate = Resonate(os.path.join(tmp, "resonate.db"))
    batches: list[tuple[float, int]] = []
    started = 0.0

    async def recording(ctx: Context, cmds: list[InsertUser]) -> None:
        batches.append((time.perf_counter() - started, len(cmds)))
        await insert_users(ctx, cmds)

    resonate.register(create_user_batching, retry_policy=never())
    resonate.register_command_handler(InsertUser, recording, retry_policy=never())
    completed: list[tuple[float, int]] = []
    async with aiosqlite.connect(users) as db, resonate:
        resonate.set_dependency("db", db)
        resonate.set_dependency("log_batches", False)

        async def sample() -> None:
            while True:
                completed.append((time.perf_counter() - started, resonate.stats().runs.completed))
                await asyncio.sleep(SAMPLE_SECONDS)

        started = time.perf_counter()
        base = resonate.stats().runs.completed
        sampler = asyncio.create_task(sample())
        handles = [resonate.run(f"sizes-{u}", create_user_batching, u) for u in range(runs)]
        for handle in handles:
            await handle
        elapsed = time.perf_counter() - started
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        stats = resonate.stats()
    completed = [(t, n - base) for t, n in completed] + [(elapsed, runs)]
    return {
        "runs": runs,
        "seconds": elapsed,
        "batches": batches,
        "completed": completed,
        "transactions": stats.store.transactions,
        "rows_per_transaction": stats.store.mean_rows_per_transaction,
    }


def svg(data: dict[str, Any]) -> str:
    """The plot: batch sizes as bars, completed runs as a line."""
    width, height = 800, 360
    left, right, top, bottom = 70, 80, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    seconds = max(data["seconds"], 1e-9)
    runs = max(data["runs"], 1)
    biggest = max((size for _, size in data["batches"]), default=1)
    size_top = nice_ceiling(biggest)

    def x(t: float) -> float:
        return float(left + plot_w * t / seconds)

    def y_size(size: float) -> float:
        return top + plot_h * (1 - size / size_top)

    def y_runs(n: float) -> float:
        return float(top + plot_h * (1 - n / runs))

    title = (
        f"{data['runs']:,} blog runs on SQLite: {len(data['batches'])} handler calls, "
        f"{data['transactions']} store transactions, {data['seconds']:.2f} s"
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for i in range(5):  # grid and both y axes
        frac = i / 4
        y = top + plot_h * (1 - frac)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{size_top * frac:,.0f}</text>'
        )
        label = f"{runs * frac:,.0f}"
        out.append(f'<text x="{left + plot_w + 6}" y="{y + 4:.1f}" fill="#c0392b">{label}</text>')
    for i in range(6):  # x axis
        t = seconds * i / 5
        out.append(
            f'<text x="{x(t):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{t:.2f}</text>'
        )
    bar = max(2.0, plot_w / max(len(data["batches"]), 1) / 3)
    for t, size in data["batches"]:
        y = y_size(size)
        out.append(
            f'<rect x="{x(t):.1f}" y="{y:.1f}" width="{bar:.1f}" '
            f'height="{top + plot_h - y:.1f}" fill="#2e86c1"/>'
        )
    points = " ".join(f"{x(t):.1f},{y_runs(n):.1f}" for t, n in data["completed"])
    out.append(f'<polyline points="{points}" fill="none" stroke="#c0392b" stroke-width="2"/>')
    out += [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">'
        "seconds since the first resonate.run</text>",
        f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" fill="#2e86c1" '
        f'transform="rotate(-90 16 {top + plot_h / 2})">commands per handler call</text>',
        f'<text x="{width - 14}" y="{top + plot_h / 2}" text-anchor="middle" fill="#c0392b" '
        f'transform="rotate(90 {width - 14} {top + plot_h / 2})">runs completed</text>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    step = 1.0
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


@click.command()
@click.option("--runs", type=click.IntRange(1), default=100_000, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="docs/img/batch-sizes-100k.svg",
    show_default=True,
    help="Where to write the SVG.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the data here.")
def main(runs: int, out: str, json_path: str | None) -> None:
    """Record and plot the batch handler's batch sizes over one burst of runs."""
    with tempfile.TemporaryDirectory() as tmp:
        data = asyncio.run(measure(runs, tmp))
    if sum(size for _, size in data["batches"]) != runs:
        raise click.ClickException("the handler did not see every command exactly once")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(svg(data))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f)
    sizes = [size for _, size in data["batches"]]
    click.echo(
        f"{runs:,} runs in {data['seconds']:.2f}s: {len(sizes)} handler calls "
        f"(sizes {min(sizes):,} to {max(sizes):,}), {data['transactions']} store transactions "
        f"({data['rows_per_transaction']:.0f} rows each); wrote {out}"
    )


if __name__ == "__main__":
    main()
