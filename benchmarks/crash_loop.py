"""The SIGKILL crash loop, long form: kill a durable workload hundreds of times, then check.

    python benchmarks/crash_loop.py --kills 200 --runs 1000

Every round runs ``--runs`` new durable runs (four steps and one batched
``InsertUser`` command each, the handler inserting into a user table) in a
subprocess on one SQLite store, SIGKILLs the process at random moments
``--kills-per-round`` times, restarting it on the same files each time, then
lets it finish. Rounds continue on the same store until ``--kills`` kills
have landed. At the end every run must have completed exactly once with its
value, no completed step or command may have executed again after a restart,
every user row must exist exactly once, and no promise may be left PENDING.

The workload, the loop and the checker live in ``tests/crash_loop_workload.py``
(shared with ``tests/test_crash_loop.py``). Exits 1 when any anomaly is found.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crash_loop_workload import (  # type: ignore[import-not-found]  # via sys.path above
    DEFAULT_CONCURRENCY,
    DEFAULT_STEP_DELAY,
    LoopConfig,
    run_crash_loop,
)

console = Console()


@click.command()
@click.option("--kills", type=click.IntRange(1), default=200, show_default=True)
@click.option(
    "--runs", type=click.IntRange(1), default=1000, show_default=True, help="New runs per round."
)
@click.option("--kills-per-round", type=click.IntRange(1), default=20, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Run bodies working at once in the workload.",
)
@click.option(
    "--step-delay",
    type=click.FloatRange(0),
    default=DEFAULT_STEP_DELAY,
    show_default=True,
    help="Longest sleep before and after a step's effect (s).",
)
@click.option(
    "--min-delay",
    type=click.FloatRange(0),
    default=0.05,
    show_default=True,
    help="Shortest life of a process before its kill (s).",
)
@click.option(
    "--max-delay",
    type=click.FloatRange(0),
    default=0.6,
    show_default=True,
    help="Longest life of a process before its kill (s).",
)
@click.option("--seed", type=int, default=None, help="Seed of the kill delays.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the store, users table and logs here (default: a temporary dir).",
)
def main(
    kills: int,
    runs: int,
    kills_per_round: int,
    concurrency: int,
    step_delay: float,
    min_delay: float,
    max_delay: float,
    seed: int | None,
    workdir: Path | None,
) -> None:
    """SIGKILL a durable workload KILLS times at random moments; count the anomalies."""
    config = LoopConfig(
        runs=runs,
        kills=kills,
        kills_per_round=kills_per_round,
        concurrency=concurrency,
        step_delay=step_delay,
        min_delay=min_delay,
        max_delay=max(min_delay, max_delay),
        seed=seed,
    )
    directory = workdir or Path(tempfile.mkdtemp(prefix="crash-loop-"))
    directory.mkdir(parents=True, exist_ok=True)
    console.print(
        f"{config.rounds} rounds of {runs:,} runs, {kills} kills, in {directory}", highlight=False
    )
    try:
        with console.status("starting") as status:

            def progress(generation: int, done: int) -> None:
                status.update(f"process {generation}: {done}/{kills} kills")

            result = run_crash_loop(directory, config, progress)
    finally:
        if workdir is None:
            shutil.rmtree(directory, ignore_errors=True)

    table = Table(title="SIGKILL crash loop", show_header=False)
    table.add_row("runs", f"{result.runs:,}")
    table.add_row("kills", f"{result.kills}")
    table.add_row("rounds", f"{result.rounds}")
    table.add_row("processes", f"{result.generations}")
    table.add_row("seconds", f"{result.seconds:.1f}")
    table.add_row("seed", f"{result.seed}")
    for phase, count in sorted(result.kill_phases.items()):
        table.add_row(f"kills during {phase}", f"{count}")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:,}")
    table.add_row("anomalies", f"[bold]{result.anomaly_count}[/bold]")
    console.print(table)
    for category, examples in result.anomalies.items():
        console.print(f"[red]{category}: {len(examples)}[/red] e.g. {examples[:3]}")
    print(
        f"kills={result.kills} runs={result.runs} anomalies={result.anomaly_count} "
        f"seconds={result.seconds:.1f}"
    )
    if result.anomaly_count:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
