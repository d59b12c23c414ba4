"""The SIGKILL crash loop: a durable workload, the loop that kills it, and the checker.

Run as a script, this module is the *workload*, one process of the loop::

    python tests/crash_loop_workload.py STORE USERS_DB EFFECTS_LOG RUNS GENERATION [--first N]

It starts ``Resonate(STORE)`` (SQLite, durable) and runs ``signup-{first}``
... ``signup-{first + RUNS - 1}``. Each run of ``signup(ctx, user_id)`` takes
four steps (one ``lfc``, two ``lfi`` gathered, one more ``lfc``), one
batched ``InsertUser`` command and a short durable sleep, and returns
``f"user-{user_id}"``. Runs that
completed in an earlier process return their stored outcome; runs left
PENDING by a killed process are resumed. It prints ``started`` once it is
running (recovery included), ``closing`` once every run has returned, and
``DONE`` once Resonate is closed and every value checked, then exits 0.

Every process of the loop gets the next *generation* number ``G`` and leaves
evidence of what it executed:

* a step appends ``"{step id} {G}"`` to the effects log before it returns
  (one ``write(2)`` on an ``O_APPEND`` file, which a SIGKILL cannot undo), and
  returns ``G``: the stored value of a settled step names the generation
  whose execution was committed;
* a run's body appends ``"{run id} {G}"`` each time it is invoked (first
  execution or replay), and returns ``["user-{i}", G]``: the root's stored
  value names the generation whose body settled it (no clocks involved);
* the ``InsertUser`` handler inserts into ``users`` (``INSERT OR IGNORE`` on
  a primary key: idempotent), logs each execution in ``executions``, commits
  once per batch, and returns ``G`` for every command.

Imported, the module is the *harness*: :func:`run_crash_loop` starts the
workload, SIGKILLs it at a random moment, restarts it on the same files, again
and again, then lets one last process finish; :func:`check` reads the store,
the effects log and the users table and lists anomalies (see
:class:`LoopResult`). ``tests/test_crash_loop.py`` and
``benchmarks/crash_loop.py`` both use it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resonate_async import Command, Context, Resonate

if TYPE_CHECKING:
    from collections.abc import Callable

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "crash_loop_workload.py"

# The child ids of run ``signup-i`` and what each one is.
STEP_SUFFIXES = (".1", ".2", ".3", ".5")
COMMAND_SUFFIX = ".4"
SLEEP_SUFFIX = ".6"
# Long enough that kills land mid-sleep, and the restart finds it overdue.
SLEEP_SECONDS = 0.01

# Run bodies working at once, and the longest sleep before and after a step's
# effect: 50 runs in flight, ~0.3 s of work per 100 runs, so 1,000 runs
# outlast many kills and every kill finds dozens of runs mid-step.
DEFAULT_CONCURRENCY = 50
DEFAULT_STEP_DELAY = 0.05

USERS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, generation INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS executions (user_id INTEGER NOT NULL, generation INTEGER NOT NULL)",
)


def run_id(i: int) -> str:
    """The id of the ``i``-th run."""
    return f"signup-{i}"


def expected_value(i: int) -> str:
    """What run ``i`` must return, beside the generation that settled it."""
    return f"user-{i}"


def returned_value(outcome: object) -> object:
    """The part of a run's outcome that must equal :func:`expected_value`."""
    if isinstance(outcome, list) and len(outcome) == 2:
        return outcome[0]
    return outcome


# -- the workload (the child process) --------------------------------------------


@dataclass
class InsertUser(Command[int]):
    """Insert one user; resolves to the generation that executed the batch."""

    id: int


class EffectsLog:
    """Appends ``"{id} {generation}"`` lines, durable before :meth:`record` returns."""

    def __init__(self, path: str, generation: int, *, fsync: bool = False) -> None:
        self.generation = generation
        self._fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, id: str) -> None:
        # One write(2) of one short line on an O_APPEND file: a SIGKILL cannot
        # tear it, and once it returns the line is in the kernel's page cache,
        # which outlives the killed process. fsync would make it outlive the
        # machine too, which a SIGKILL loop does not need; it costs ~0.2 ms on
        # the event loop per line, which would dominate the workload's time.
        os.write(self._fd, f"{id} {self.generation}\n".encode())
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


async def step(ctx: Context, name: str) -> int:
    """A step with an outside effect, recorded before the step returns; returns the generation."""
    effects: EffectsLog = ctx.get_dependency("effects")
    delay: float = ctx.get_dependency("step_delay")
    await asyncio.sleep(random.random() * delay)
    effects.record(ctx.id)
    await asyncio.sleep(random.random() * delay)  # a window between the effect and the commit
    return effects.generation


async def insert_users(ctx: Context, commands: list[InsertUser]) -> int:
    """The batch handler: idempotent inserts and an execution log, one commit per batch."""
    db = ctx.get_dependency("users_db")
    generation: int = ctx.get_dependency("effects").generation
    rows = [(c.id, generation) for c in commands]
    await db.executemany("INSERT OR IGNORE INTO users (id, generation) VALUES (?, ?)", rows)
    await db.executemany("INSERT INTO executions (user_id, generation) VALUES (?, ?)", rows)
    await db.commit()
    return generation


async def signup(ctx: Context, user_id: int) -> list[str | int]:
    """Four steps, one batched command and a durable sleep; the body logs each invocation."""
    effects: EffectsLog = ctx.get_dependency("effects")
    effects.record(ctx.id)
    async with ctx.get_dependency("gate"):  # at most `concurrency` bodies past this point
        await ctx.lfc(step, "profile")
        await asyncio.gather(ctx.lfi(step, "welcome"), ctx.lfi(step, "quota"))
        await ctx.lfc(InsertUser(user_id))
        await ctx.lfc(step, "audit")
        await ctx.sleep(SLEEP_SECONDS)
    return [expected_value(user_id), effects.generation]


async def workload(
    store: str,
    users_db: str,
    effects_path: str,
    ids: range,
    generation: int,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    step_delay: float = DEFAULT_STEP_DELAY,
    fsync: bool = False,
) -> int:
    """One process of the loop: run (or resume, or look up) every id; 0 when all are right."""
    import aiosqlite

    effects = EffectsLog(effects_path, generation, fsync=fsync)
    resonate = Resonate(store)
    resonate.register(name="signup")(signup)
    resonate.register_command_handler(InsertUser, insert_users, name="InsertUser")
    try:
        async with aiosqlite.connect(users_db) as db:
            for statement in USERS_SCHEMA:
                await db.execute(statement)
            await db.commit()
            resonate.set_dependency("users_db", db)
            resonate.set_dependency("effects", effects)
            resonate.set_dependency("step_delay", step_delay)
            resonate.set_dependency("gate", asyncio.Semaphore(concurrency))
            async with resonate:
                print("started", flush=True)
                handles = [resonate.run(run_id(i), signup, i) for i in ids]
                outcomes = await asyncio.gather(*handles, return_exceptions=True)
                print("closing", flush=True)
    finally:
        effects.close()
    wrong = [
        (i, out)
        for i, out in zip(ids, outcomes, strict=True)
        if returned_value(out) != expected_value(i)
    ]
    for i, outcome in wrong[:20]:
        print(f"{run_id(i)}: {outcome!r}", file=sys.stderr)
    if wrong:
        print(f"{len(wrong)} runs did not return their value", file=sys.stderr)
        return 1
    print("DONE", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One process of the SIGKILL crash loop.")
    parser.add_argument("store", help="the promise store (a SQLite file)")
    parser.add_argument("users_db", help="the SQLite file of the users table")
    parser.add_argument("effects_log", help="where steps and run bodies log their executions")
    parser.add_argument("runs", type=int, help="how many runs")
    parser.add_argument("generation", type=int, help="this process's number in the loop")
    parser.add_argument("--first", type=int, default=0, help="the first run's number")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="run bodies working at once"
    )
    parser.add_argument(
        "--step-delay", type=float, default=DEFAULT_STEP_DELAY, help="max sleep in a step"
    )
    parser.add_argument("--fsync", action="store_true", help="fsync each effects-log line")
    a = parser.parse_args(argv)
    return asyncio.run(
        workload(
            a.store,
            a.users_db,
            a.effects_log,
            range(a.first, a.first + a.runs),
            a.generation,
            concurrency=a.concurrency,
            step_delay=a.step_delay,
            fsync=a.fsync,
        )
    )


# -- the harness (the parent process) ----------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """The shape of a crash loop.

    The loop is made of rounds; round ``r`` runs ids ``r * runs`` to
    ``(r + 1) * runs - 1`` on the shared store, is killed ``kills_per_round``
    times, then finishes in one unkilled process. Rounds keep every kill
    landing on a workload with work left: one round of 1,000 runs is done
    after a few dozen kills, and later kills would only hit start-up and
    idempotent look-ups.
    """

    runs: int = 1000
    kills: int = 20
    kills_per_round: int | None = None  # default: all kills in one round
    concurrency: int = DEFAULT_CONCURRENCY
    step_delay: float = DEFAULT_STEP_DELAY
    min_delay: float = 0.05
    max_delay: float = 0.6
    seed: int | None = None
    final_timeout: float = 120.0

    @property
    def rounds(self) -> int:
        per_round = self.kills_per_round or self.kills
        return max(1, -(-self.kills // per_round)) if per_round else 1

    @property
    def total_runs(self) -> int:
        return self.runs * self.rounds


@dataclass
class LoopResult:
    """What a crash loop did and what the checker found.

    ``anomalies`` maps a category to examples; every category must be empty:

    * ``final_run``: a round's last, unkilled process did not print DONE and exit 0;
    * ``worker_failed``: a process exited with an error before it was killed
      (after three failures the loop stops);
    * ``loop``: a round could not land its kills (every process finished first,
      or processes kept failing);
    * ``lost_runs``: a run has no root promise, or it is not RESOLVED;
    * ``wrong_values``: a root's stored value is not ``["user-{i}", G]``;
    * ``pending``: a promise of any kind is left PENDING;
    * ``not_resolved``: a step, command or sleep is missing or not RESOLVED;
    * ``unexpected_rows``: a promise that no run should have made, or of the wrong kind;
    * ``steps_reexecuted``: a step ran in a generation after the one whose
      execution was committed (a completed step executed again);
    * ``commands_reexecuted``: the same for a command, in its handler;
    * ``roots_reexecuted``: a run's body ran after its root had settled
      (a completed run executed again);
    * ``committed_without_effect``: a settled promise names a generation that
      left no trace of executing it;
    * ``duplicate_in_generation``: a step or command executed twice in one process;
    * ``users``: the users table is not exactly one row per run.

    ``metrics`` counts what is legitimate (at-least-once re-executions of
    steps and handlers whose outcome had not committed, replays of run
    bodies) and what shows that the kills landed mid-work.
    """

    runs: int
    kills: int
    rounds: int
    generations: int
    seconds: float
    seed: int
    kill_phases: Counter[str] = field(default_factory=Counter)
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, int] = field(default_factory=dict)

    @property
    def anomaly_count(self) -> int:
        return sum(len(v) for v in self.anomalies.values())

    def describe(self) -> str:
        phases = ", ".join(f"{k}={v}" for k, v in sorted(self.kill_phases.items()))
        lines = [
            f"runs={self.runs} kills={self.kills} rounds={self.rounds} "
            f"generations={self.generations} seconds={self.seconds:.1f} seed={self.seed} "
            f"anomalies={self.anomaly_count}",
            f"kills by phase: {phases}",
            *(f"  {k}: {v}" for k, v in self.metrics.items()),
        ]
        for category, examples in self.anomalies.items():
            lines.append(f"ANOMALY {category} ({len(examples)}): {examples[:5]}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LoopFiles:
    """The files every process of a loop shares."""

    store: Path
    users: Path
    effects: Path

    @classmethod
    def under(cls, workdir: Path) -> LoopFiles:
        return cls(workdir / "store.db", workdir / "users.db", workdir / "effects.log")


# A loop stops (and reports) after this many processes failed on their own.
_MAX_FAILURES = 3


def _phase(output: str) -> str:
    """Where a killed process was, from what it printed."""
    if "DONE" in output:
        return "exit"  # every run returned and Resonate closed
    if "closing" in output:
        return "aclose"  # every run returned; flushing and closing
    if "started" in output:
        return "running"  # runs in flight (recovered ones included)
    return "start-up"  # interpreter, imports, store open, recovery


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_crash_loop(
    workdir: Path, config: LoopConfig, progress: Callable[[int, int], None] | None = None
) -> LoopResult:
    """SIGKILL the workload at random moments, restart it, finish it; then :func:`check`.

    Each process is killed a random ``min_delay``..``max_delay`` seconds after
    its spawn (so kills also land in start-up and recovery). A process that
    finishes first is not counted as a kill, and later delays in its round are
    capped at its lifetime, so the round's remaining kills still land; after
    kills in start-up in a row, each next delay is 0.2 s longer, so a slow
    start-up does not take every kill. Then
    one unkilled process must print DONE. ``progress(generation, kills)`` is
    called after each process. Failures are reported as anomalies, not raised.
    """
    seed = random.randrange(2**32) if config.seed is None else config.seed
    rng = random.Random(seed)
    files = LoopFiles.under(workdir)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    starts: list[float] = []  # starts[g - 1]: when generation g was spawned
    phases: Counter[str] = Counter()
    killed: list[int] = []
    anomalies: dict[str, list[str]] = defaultdict(list)
    began = time.perf_counter()
    generation = failures = 0
    rounds: list[tuple[range, list[int]]] = []
    for number in range(config.rounds):
        ids = range(number * config.runs, (number + 1) * config.runs)
        quota = min(config.kills_per_round or config.kills, config.kills - len(killed))
        round_kills: list[int] = []
        rounds.append((ids, round_kills))
        cap = config.max_delay
        # Added to the next kill's delay after kills in start-up in a row: on
        # a slow machine (or a loaded CI) start-up alone can outlast the
        # window, and a loop whose kills all land there tests no recovery.
        late = 0.0
        budget = 5 * quota + 10  # processes this round may take before it gives up
        while True:
            generation += 1
            budget -= 1
            final = len(round_kills) >= quota or budget <= 0 or failures >= _MAX_FAILURES
            out_path = workdir / f"gen-{generation}.out"
            err_path = workdir / f"gen-{generation}.err"
            command = [
                sys.executable,
                str(WORKLOAD),
                str(files.store),
                str(files.users),
                str(files.effects),
                str(config.runs),
                str(generation),
                f"--first={ids.start}",
                f"--concurrency={config.concurrency}",
                f"--step-delay={config.step_delay}",
            ]
            delay = config.final_timeout if final else rng.uniform(config.min_delay, cap) + late
            starts.append(time.time())
            spawned = time.perf_counter()
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                child = subprocess.Popen(
                    command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
                )
                try:
                    child.wait(delay)
                except subprocess.TimeoutExpired:
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    if final:
                        anomalies["final_run"].append(
                            f"generation {generation} did not finish in {delay}s"
                        )
                    else:
                        round_kills.append(generation)
                        killed.append(generation)
                finally:  # an interrupted harness leaves no child behind
                    if child.poll() is None:
                        child.kill()
                        child.wait()
            lifetime = time.perf_counter() - spawned
            output = out_path.read_text()
            if child.returncode == -signal.SIGKILL:
                if not final:
                    phase = _phase(output)
                    phases[phase] += 1
                    late = late + 0.2 if phase == "start-up" else 0.0
            elif child.returncode != 0 or "DONE" not in output:
                failures += 1
                category = "final_run" if final else "worker_failed"
                anomalies[category].append(
                    f"generation {generation} exited {child.returncode}: {_tail(err_path)}"
                )
            elif not final:  # finished before its kill: aim the next kills inside a lifetime
                cap = max(config.min_delay, min(cap, lifetime))
            if progress is not None:
                progress(generation, len(killed))
            if final:
                break
        if len(round_kills) < quota:
            anomalies["loop"].append(
                f"round {number + 1} stopped after {len(round_kills)} of {quota} kills"
            )
            break
    seconds = time.perf_counter() - began
    found, metrics, settled_in = check(files, config.total_runs, starts)
    for category, examples in found.items():
        anomalies[category].extend(examples)
    pending_kills = 0
    for ids, round_kills in rounds:
        last = max((settled_in.get(i, 0) for i in ids), default=0)
        pending_kills += sum(1 for g in round_kills if g < last)
    metrics["kills while runs of the round were pending"] = pending_kills
    return LoopResult(
        runs=config.total_runs,
        kills=len(killed),
        rounds=config.rounds,
        generations=generation,
        seconds=seconds,
        seed=seed,
        kill_phases=phases,
        anomalies={k: v for k, v in anomalies.items() if v},
        metrics=metrics,
    )


def _read_effects(path: Path) -> dict[str, list[int]]:
    executions: dict[str, list[int]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            id, generation = line.split(" ")
            executions[id].append(int(generation))
    return executions


def _select(path: Path, sql: str) -> list[Any]:
    """Every row of ``sql`` in the database at ``path`` (none if it was never created)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:  # a process died before creating the table
        return []
    finally:
        db.close()


def _check_root(
    root_id: str,
    settled_in: int,
    settled_at: float,
    bodies: list[int],
    starts: list[float],
    anomalies: dict[str, list[str]],
    metrics: Counter[str],
) -> None:
    """A root settled by generation ``settled_in``, whose body ran in ``bodies``."""
    if settled_in not in bodies:
        anomalies["committed_without_effect"].append(f"{root_id} (generation {settled_in})")
    later = sorted(g for g in bodies if g > settled_in)
    if later:
        anomalies["roots_reexecuted"].append(
            f"{root_id} settled by generation {settled_in}, body ran again in {later}"
        )
    # The wall clock's view, for the record only: `settled_at` bisected into
    # the spawn times. It disagrees if the clock was stepped meanwhile.
    if bisect.bisect_right(starts, settled_at) != settled_in:
        metrics["roots whose settled_at is outside their generation's lifetime"] += 1


def check(
    files: LoopFiles, runs: int, starts: list[float]
) -> tuple[dict[str, list[str]], dict[str, int], dict[int, int]]:
    """Read the store, the effects log and the users table of runs ``0..runs-1``.

    Returns the anomalies (see :class:`LoopResult`), the metrics, and the
    generation that settled each run.

    A root, step or command names the generation that committed it in its
    value. ``starts[g - 1]`` is when generation ``g`` was spawned; a root's
    ``settled_at`` is only compared with them, as a metric (the wall clock
    can be stepped while the loop runs).
    """
    anomalies: dict[str, list[str]] = defaultdict(list)
    metrics: Counter[str] = Counter()
    committing: dict[str, set[int]] = defaultdict(set)
    settled: dict[int, int] = {}
    effects = _read_effects(files.effects)

    rows = _select(files.store, "SELECT id, state, kind, value, settled_at FROM promises")
    promises: dict[str, tuple[str, str, str, bytes | None, float | None]] = {
        row[0]: row for row in rows
    }
    user_ids = [row[0] for row in _select(files.users, "SELECT id FROM users")]
    handled: dict[str, list[int]] = defaultdict(list)
    for user_id, generation in _select(files.users, "SELECT user_id, generation FROM executions"):
        handled[run_id(user_id) + COMMAND_SUFFIX].append(generation)

    anomalies["pending"] = [id for id, state, *_ in rows if state == "PENDING"]
    expected: set[str] = set()
    for i in range(runs):
        root_id = run_id(i)
        expected.add(root_id)
        root = promises.get(root_id)
        bodies = effects.get(root_id, [])
        metrics["run body replays"] += max(0, len(bodies) - 1)
        if root is None or root[1] != "RESOLVED" or root[3] is None or root[4] is None:
            anomalies["lost_runs"].append(f"{root_id}: {root[1] if root else 'missing'}")
        else:
            value = json.loads(root[3])
            if (
                isinstance(value, list)
                and len(value) == 2
                and value[0] == expected_value(i)
                and isinstance(value[1], int)
            ):
                _check_root(root_id, value[1], root[4], bodies, starts, anomalies, metrics)
                settled[i] = value[1]
                committing["runs"].add(value[1])
            else:
                anomalies["wrong_values"].append(f"{root_id}: {value!r}")
        for suffix in (*STEP_SUFFIXES, COMMAND_SUFFIX):
            child_id = root_id + suffix
            expected.add(child_id)
            kind = "command" if suffix == COMMAND_SUFFIX else "step"
            ran = (handled if kind == "command" else effects).get(child_id, [])
            metrics[f"{kind} re-executions before commit (at-least-once)"] += max(0, len(ran) - 1)
            child = promises.get(child_id)
            if child is None or child[1] != "RESOLVED" or child[3] is None:
                anomalies["not_resolved"].append(f"{child_id}: {child[1] if child else 'missing'}")
                continue
            if child[2] != kind:
                anomalies["unexpected_rows"].append(f"{child_id} is a {child[2]}, not a {kind}")
            committed = json.loads(child[3])
            committing[f"{kind}s"].add(committed)
            if committed not in ran:
                anomalies["committed_without_effect"].append(f"{child_id} (generation {committed})")
            later = sorted(g for g in ran if g > committed)
            if later:
                anomalies[f"{kind}s_reexecuted"].append(
                    f"{child_id} committed by generation {committed}, executed again in {later}"
                )
            if len(set(ran)) != len(ran):
                anomalies["duplicate_in_generation"].append(f"{child_id}: {sorted(ran)}")
        # The sleep: settled once it woke, even when it came due while the
        # process was down (a PENDING one is reported under "pending" too).
        sleep_id = root_id + SLEEP_SUFFIX
        expected.add(sleep_id)
        sleep = promises.get(sleep_id)
        if sleep is None or sleep[1] != "RESOLVED":
            anomalies["not_resolved"].append(f"{sleep_id}: {sleep[1] if sleep else 'missing'}")
        elif sleep[2] != "sleep":
            anomalies["unexpected_rows"].append(f"{sleep_id} is a {sleep[2]}, not a sleep")
    anomalies["unexpected_rows"] += sorted(promises.keys() - expected)[:100]

    if len(user_ids) != runs or set(user_ids) != set(range(runs)):
        missing = sorted(set(range(runs)) - set(user_ids))
        extra = sorted(set(user_ids) - set(range(runs)))
        anomalies["users"].append(
            f"{len(user_ids)} rows for {runs} runs; missing {missing[:10]}, extra {extra[:10]}"
        )
    metrics["users inserted again (absorbed by INSERT OR IGNORE)"] = sum(
        1 for generations in handled.values() if len(generations) > 1
    )
    for what in ("steps", "commands", "runs"):
        metrics[f"generations that committed {what}"] = len(committing[what])
    return {k: v for k, v in anomalies.items() if v}, dict(metrics), settled


if __name__ == "__main__":
    sys.exit(main())
