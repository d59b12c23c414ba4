"""Several worker processes on one store: leases, takeover after a SIGKILL, no double execution.

PostgreSQL (needs ``RESONATE_TEST_POSTGRES_DSN``): three processes share 1,000
runs. Each run ``signup-i`` makes a remote call ``ctx.rfc("provision", i)``
that any worker may claim, whose body issues one batched ``InsertUser``
command. One process is SIGKILLed mid-way, either a server holding claimed
remote calls or the starter holding every root; the others claim its work once
its leases expire and finish every run. Worker ids are explicit and not of the
``host:pid:...`` form, so takeover happens by lease expiry only, never by the
dead-pid shortcut.

SQLite: two processes on one file both call ``run`` for the same ids at the
same moment; every run body, remote body and batch command executes in
exactly one of them. Then one of two processes is SIGKILLed: its runs are
taken over by a restarted process at once, or by a peer that was waiting on
them within ~30 polls, in both cases long before its lease expires (the owner
is a dead pid of this host), and again nothing runs in two live processes.

Two regression tests pin bugs found here (now fixed): opening a new SQLite
file from two processes at once could fail, and a live worker whose pid is
not visible here (another PID namespace, same host name) was taken for dead
on PostgreSQL.

What is measured (see ``multiworker_workload.py``): each body records an
execution row *before* doing anything durable, and the batch handler records
one ``handler_calls`` row per command in the transaction of its insert. So:

* a body executed by two live workers shows as two executions by survivors;
* a body taken over before the dead worker's lease expired shows as a
  survivor's execution earlier than that lease's ``lease_expires_at``, read
  from the store right after the kill;
* a command applied twice shows as two ``handler_calls`` rows; that is legal
  (at-least-once) only when one of them is the killed worker's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from multiworker_workload import (
    POSTGRES_USERS_DDL,
    application_name,
    command_id,
    remote_id,
    remote_value,
    root_value,
    run_id,
    setup_sqlite_users,
)

from resonate_async.stores.sqlite import SQLiteStore

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "multiworker_workload.py"

RUNS = 1000  # PostgreSQL runs
SQLITE_RUNS = 300
LEASE, HEARTBEAT, POLL = 3.0, 1.0, 0.2  # small, for speed; the defaults are 15, 5, 1
SQLITE_LEASE = 10.0  # long, so that a takeover before it expires shows the dead-pid shortcut


@dataclass
class Worker:
    """One worker process, its output files and what it printed."""

    name: str
    role: str
    worker_id: str
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    files: list[IO[bytes]] = field(default_factory=list)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def printed(self, marker: str) -> bool:
        return any(line.startswith(marker) for line in self.output().splitlines())

    def line(self, marker: str) -> str | None:
        for line in self.output().splitlines():
            if line.startswith(marker):
                return line
        return None

    def describe(self) -> str:
        err = self.err_path.read_text(errors="replace").splitlines()[-15:]
        return (
            f"--- {self.name} ({self.worker_id}) rc={self.proc.poll()}\n"
            + self.output()
            + "\n".join(err)
        )


class Fleet:
    """Spawns workers and guarantees none outlives the test."""

    def __init__(self, workdir: Path, common: list[str]) -> None:
        self.workdir = workdir
        self.common = common
        self.workers: dict[str, Worker] = {}
        self.env = {**os.environ, "PYTHONPATH": str(HERE.parent)}

    def spawn(self, name: str, role: str, worker_id: str | None = None, *extra: str) -> Worker:
        out_path = self.workdir / f"{name}.out"
        err_path = self.workdir / f"{name}.err"
        out, err = open(out_path, "wb"), open(err_path, "wb")  # noqa: SIM115 - closed in close()
        args = [sys.executable, str(WORKLOAD), *self.common, *extra, "--name", name, "--role", role]
        if worker_id is not None:
            args += ["--worker-id", worker_id]
        proc = subprocess.Popen(
            args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env
        )
        worker = Worker(name, role, worker_id or "", proc, out_path, err_path, [out, err])
        self.workers[name] = worker
        return worker

    async def wait_for(self, what: str, check: Any, within: float) -> None:
        """Poll ``check()`` (sync or async) until true; fail after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            for w in self.workers.values():
                if w.proc.poll() is not None and w.proc.returncode != -signal.SIGKILL:
                    pytest.fail(f"{w.name} exited while waiting for {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {within}s waiting for {what}\n{self.describe()}")
            await asyncio.sleep(0.05)

    async def stop(self, within: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every live worker and wait: each must exit 0 after a clean shutdown."""
        live = [w for w in self.workers.values() if w.proc.poll() is None]
        for w in live:
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within
        while any(w.proc.poll() is None for w in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {w.name: w.proc.poll() for w in live}

    def close(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
            for f in w.files:
                f.close()

    def describe(self) -> str:
        return "\n".join(w.describe() for w in self.workers.values())

    def ready_id(self, worker: Worker) -> str:
        """The worker id a worker printed at start (``ready ID``)."""
        line = worker.line("ready ")
        assert line is not None, self.describe()
        return line[len("ready ") :]


# -- the evidence and its checker ----------------------------------------------------


@dataclass
class Evidence:
    """What the store and the users tables say once every run is done, backend-neutral."""

    #: id -> (state, kind, value, parent_id)
    promises: dict[str, tuple[str, str, bytes | None, str | None]]
    #: (user id, remote id) of every users row
    users: list[tuple[int, str]]
    #: user id -> [(worker, inserted)] of every handler execution
    calls: dict[int, list[tuple[str, bool]]]
    #: promise id -> [(kind, worker, wall time)] of every body execution, oldest first
    executions: dict[str, list[tuple[str, str, float]]]


@dataclass
class Kill:
    """A SIGKILL: whom, when (wall time), and the leases it held: id -> (kind, lease_expires_at)."""

    name: str
    at: float
    held: dict[str, tuple[str, float]]


def check(
    ev: Evidence, runs: int, workers: set[str], kill: Kill | None, *, lease_only: bool
) -> tuple[list[str], dict[str, Any]]:
    """Every run completed exactly once; return the anomalies found and some metrics.

    * the store: each of the ``3 * runs`` promises (root, remote call,
      command) RESOLVED with its value, nothing PENDING, nothing else;
    * the users table: one row per run, inserted by exactly one handler call,
      and each command's stored value names a worker whose handler call for
      that user is recorded (a command is never settled without its effect);
    * executions: every root and remote body executed, at most once by the
      live (never killed) workers together; more than once only when the
      killed worker executed it first, held its lease at the kill, and never
      after the kill; a command applied twice only when once by the killed
      worker (handlers are at-least-once);
    * with ``lease_only``, no live worker executed a promise the dead one held
      before that promise's ``lease_expires_at``.
    """
    bad: list[str] = []
    dead = None if kill is None else kill.name
    ps = ev.promises
    pending = [id for id, p in ps.items() if p[0] == "PENDING"]
    if pending:
        bad.append(f"{len(pending)} promises left PENDING: {pending[:5]}")
    kinds = Counter(p[1] for p in ps.values())
    if kinds != {"run": runs, "remote": runs, "command": runs}:
        bad.append(f"promises by kind: {dict(kinds)}")
    for i in range(runs):
        for id, kind, want in (
            (run_id(i), "run", root_value(i)),
            (remote_id(i), "remote", remote_value(i)),
            (command_id(i), "command", None),
        ):
            p = ps.get(id)
            if p is None or p[0] != "RESOLVED" or p[1] != kind or p[2] is None:
                bad.append(f"{id}: {p}")
                continue
            value = json.loads(p[2])
            if want is None:
                if value not in workers:
                    bad.append(f"{id} = {value!r}")
                elif value not in {w for w, _ in ev.calls.get(i, [])}:
                    bad.append(f"{id} settled by {value}, which has no handler call for it")
            elif value != want:
                bad.append(f"{id} = {value!r}")
        if ps.get(remote_id(i), (None,) * 4)[3] != run_id(i):
            bad.append(f"{remote_id(i)} is not a child of {run_id(i)}")

    if sorted(ev.users) != [(i, remote_id(i)) for i in range(runs)]:
        bad.append(f"users table: {len(ev.users)} rows for {runs} runs")
    applied_twice = 0
    for i in range(runs):
        calls = ev.calls.get(i, [])
        if sum(inserted for _, inserted in calls) != 1:
            bad.append(f"user {i} inserted by {calls}")
        if len([w for w, _ in calls if w != dead]) > 1:
            bad.append(f"{command_id(i)} applied by live workers: {calls}")
        applied_twice += len(calls) > 1

    expected = {run_id(i) for i in range(runs)} | {remote_id(i) for i in range(runs)}
    if set(ev.executions) != expected:
        missing, extra = expected - set(ev.executions), set(ev.executions) - expected
        bad.append(f"executions: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    delays: list[float] = []
    again: Counter[str] = Counter()
    for id, execs in ev.executions.items():
        live = [e for e in execs if e[1] != dead]
        if len(live) > 1:
            bad.append(f"{id} executed by live workers: {live}")
        if len(execs) > 1:
            again[execs[0][0]] += 1
            if len(live) == len(execs) or kill is None or id not in kill.held:
                bad.append(f"{id} executed {len(execs)} times without its owner dying: {execs}")
        if kill is None:
            continue
        if any(e[1] == dead and e[2] > kill.at for e in execs):
            bad.append(f"{id} executed by {dead} after it was killed")
        if id in kill.held and live:
            expiry = kill.held[id][1]
            if lease_only and live[0][2] < expiry:
                bad.append(f"{id} taken over {expiry - live[0][2]:.2f}s before its lease expired")
            delays.append(live[0][2] - kill.at)
    metrics: dict[str, Any] = {
        "bodies executed again after the takeover": dict(again),
        "commands applied twice (at-least-once)": applied_twice,
        "remote bodies by worker (last execution)": dict(
            Counter(e[-1][1] for id, e in ev.executions.items() if id.count(".") == 1)
        ),
        "root bodies by worker (last execution)": dict(
            Counter(e[-1][1] for id, e in ev.executions.items() if "." not in id)
        ),
    }
    if kill is not None:
        metrics["held at the kill"] = dict(Counter(kind for kind, _ in kill.held.values()))
        if len(delays) != len(kill.held):
            bad.append(f"only {len(delays)} of the {len(kill.held)} held promises were taken over")
        if delays:
            metrics["takeover after the kill (first, last)"] = (
                round(min(delays), 2),
                round(max(delays), 2),
            )
    return bad, metrics


def _report(title: str, timings: dict[str, float], metrics: dict[str, Any]) -> None:
    print(f"\n{title}")
    for k, v in timings.items():
        print(f"  {k}: {v:.1f}s")
    for k, v in metrics.items():
        print(f"  {k}: {v}")


# -- PostgreSQL: three workers, one SIGKILL ---------------------------------------------


async def _postgres_evidence(conn: Any, store_schema: str) -> Evidence:
    promises = {
        r["id"]: (r["state"], r["kind"], r["value"], r["parent_id"])
        for r in await conn.fetch(
            f'SELECT id, state, kind, value, parent_id FROM "{store_schema}".promises'
        )
    }
    calls: dict[int, list[tuple[str, bool]]] = defaultdict(list)
    for r in await conn.fetch("SELECT user_id, worker, inserted FROM handler_calls"):
        calls[r["user_id"]].append((r["worker"], r["inserted"]))
    executions: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for r in await conn.fetch("SELECT kind, id, worker, at FROM executions ORDER BY at"):
        executions[r["id"]].append((r["kind"], r["worker"], r["at"]))
    users = [(r["id"], r["remote_id"]) for r in await conn.fetch("SELECT id, remote_id FROM users")]
    return Evidence(promises, users, dict(calls), dict(executions))


@pytest.mark.postgres
@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", ["server", "starter"])
async def test_three_workers_share_runs_and_finish_a_killed_workers_runs(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path, victim: str
) -> None:
    """3 processes on one database, 1,000 runs with ``rfc`` and batched commands, one SIGKILL.

    ``victim="server"`` kills a server while it holds claimed remote calls; the
    starter's roots wait for them, and the other server runs them once the
    lease expires. Here the starter does not serve ``provision``
    (``--no-remote``): a worker claims every free remote call it sees, and the
    starter, woken at once by the calls its own roots make, would otherwise
    claim nearly all of them, leaving the servers too little to be sure to
    hold some at the kill. ``victim="starter"`` kills the process that
    started every run, serves every function, and holds every root's lease
    (and most remote calls): the two servers claim the roots and the remote
    calls once the lease expires and finish them by replay.
    """
    asyncpg = pytest.importorskip("asyncpg")
    began = time.perf_counter()
    store_schema, users_schema = postgres_schema, f"{postgres_schema}_users"
    promises = f'"{store_schema}".promises'
    tag = uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(postgres_dsn)
    fleet = Fleet(
        tmp_path,
        [
            "postgres",
            f"--dsn={postgres_dsn}",
            f"--store-schema={store_schema}",
            f"--users-schema={users_schema}",
            f"--runs={RUNS}",
            f"--lease={LEASE}",
            f"--heartbeat={HEARTBEAT}",
            f"--poll={POLL}",
            "--work-delay=0.5",
        ],
    )
    try:
        await conn.execute(f'CREATE SCHEMA "{users_schema}"')
        await conn.execute(f'SET search_path = "{users_schema}"')
        for statement in POSTGRES_USERS_DDL:
            await conn.execute(statement)

        # Worker ids not of the host:pid form: only lease expiry frees a dead worker's work.
        extra = ["--no-remote"] if victim == "server" else []
        starter = fleet.spawn("starter", "starter", f"mw-starter-{tag}", *extra)
        servers = [fleet.spawn(f"server{n}", "server", f"mw-server{n}-{tag}") for n in (1, 2)]
        await fleet.wait_for(
            "every worker ready and every root created",
            lambda: (
                starter.printed("created")
                and all(w.printed("ready") for w in fleet.workers.values())
            ),
            30,
        )
        created = time.perf_counter()

        async def users() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM users"))

        async def owned(worker: Worker, kind: str) -> int:
            sql = (
                f"SELECT count(*) FROM {promises} "
                "WHERE owner = $1 AND kind = $2 AND state = 'PENDING'"
            )
            return int(await conn.fetchval(sql, worker.worker_id, kind))

        chosen: list[Worker] = []

        async def kill_moment() -> bool:
            done = await users()
            if done >= RUNS:
                pytest.fail(f"every run finished before a kill moment came\n{fleet.describe()}")
            if done < RUNS // 4:
                return False
            if victim == "starter":
                candidates = [starter] if await owned(starter, "run") >= RUNS // 2 else []
            else:  # a server in the middle of claimed remote calls
                candidates = [w for w in servers if await owned(w, "remote") >= 10]
            chosen.extend(candidates[:1])
            return bool(candidates)

        await fleet.wait_for("a kill moment", kill_moment, 30)
        dead = chosen[0]
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        killed_at, killed = time.time(), time.perf_counter()
        # A transaction the worker sent just before it died may still commit
        # on the server: read its leases once its backends are gone.
        backend = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        app = application_name(store_schema, dead.name)

        async def backends_gone() -> bool:
            return int(await conn.fetchval(backend, app)) == 0

        await fleet.wait_for("the killed worker's connections to close", backends_gone, 10)
        users_at_kill = await users()
        # The dead worker's leases, read before they expire.
        sql = (
            f"SELECT id, kind, lease_expires_at FROM {promises} "
            "WHERE owner = $1 AND state = 'PENDING'"
        )
        held = {
            r["id"]: (r["kind"], r["lease_expires_at"])
            for r in await conn.fetch(sql, dead.worker_id)
        }
        assert held, "the killed worker held no lease"
        assert min(expiry for _, expiry in held.values()) > killed_at, (
            "a lease expired before the kill"
        )

        async def all_roots_resolved() -> bool:
            sql = f"SELECT count(*) FROM {promises} WHERE kind = 'run' AND state = 'RESOLVED'"
            return int(await conn.fetchval(sql)) == RUNS

        await fleet.wait_for("every root RESOLVED", all_roots_resolved, 45)
        finished = time.perf_counter()
        survivors = [w for w in fleet.workers.values() if w is not dead]
        if starter is not dead:  # the starter's handles all returned the right values
            await fleet.wait_for("the starter's handles", lambda: starter.printed("done"), 15)
            line = starter.line("done ")
            assert line is not None
            assert json.loads(line[len("done ") :]) == {"right": RUNS, "wrong": []}
        exits = await fleet.stop()
        assert exits == {w.name: 0 for w in survivors}, fleet.describe()
        assert all(w.printed("stopped") for w in survivors)

        evidence = await _postgres_evidence(conn, store_schema)
        kill = Kill(dead.name, killed_at, held)
        names = set(fleet.workers)
        bad, metrics = check(evidence, RUNS, names, kill, lease_only=True)
        assert bad == [], bad[:10]
        held_kinds = Counter(kind for kind, _ in held.values())
        if victim == "server":
            assert held_kinds["remote"] >= 1  # >= 10 a moment before the kill
            # The starter was never killed: each root body ran once, in the starter.
            assert metrics["root bodies by worker (last execution)"] == {"starter": RUNS}
        else:
            assert held_kinds["run"] >= RUNS // 3  # >= RUNS // 2 a moment before the kill
        _report(
            f"postgres, 3 workers, {RUNS} runs, lease={LEASE}s heartbeat={HEARTBEAT}s "
            f"poll={POLL}s, SIGKILL {dead.name} with {users_at_kill}/{RUNS} users inserted",
            {
                "start-up until every root was created": created - began,
                "kill after roots created": killed - created,
                "every root RESOLVED after the kill": finished - killed,
                "total": time.perf_counter() - began,
            },
            metrics,
        )
    finally:
        fleet.close()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{users_schema}" CASCADE')
        await conn.close()


# -- SQLite: two processes on one file ----------------------------------------------


def _sqlite_rows(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _sqlite_evidence(store: Path, users_db: Path, log: Path) -> Evidence:
    promises = {
        r[0]: (r[1], r[2], r[3], r[4])
        for r in _sqlite_rows(store, "SELECT id, state, kind, value, parent_id FROM promises")
    }
    calls: dict[int, list[tuple[str, bool]]] = defaultdict(list)
    for user, worker, inserted in _sqlite_rows(
        users_db, "SELECT user_id, worker, inserted FROM handler_calls"
    ):
        calls[user].append((worker, bool(inserted)))
    users = [(r[0], r[1]) for r in _sqlite_rows(users_db, "SELECT id, remote_id FROM users")]
    executions: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for line in sorted(log.read_text().splitlines(), key=lambda s: float(s.rsplit(" ", 1)[1])):
        kind, id, worker, _pid, at = line.split(" ")
        executions[id].append((kind, worker, float(at)))
    return Evidence(promises, users, dict(calls), dict(executions))


async def _sqlite_fleet(tmp_path: Path, lease: float) -> tuple[Fleet, Path, Path, Path]:
    store, users_db, log = tmp_path / "store.db", tmp_path / "users.db", tmp_path / "exec.log"
    setup_sqlite_users(str(users_db))
    # No pre-created store file: the workers open a new file at the same moment.
    fleet = Fleet(
        tmp_path,
        [
            "sqlite",
            f"--store-path={store}",
            f"--users-path={users_db}",
            f"--log={log}",
            f"--runs={SQLITE_RUNS}",
            f"--lease={lease}",
            f"--heartbeat={HEARTBEAT}",
            f"--poll={POLL}",
            "--work-delay=0.2",
            f"--go-file={tmp_path / 'go'}",
            "--wave=10",
        ],
    )
    return fleet, store, users_db, log


@pytest.mark.timeout(60)
async def test_two_processes_on_one_sqlite_file_never_run_a_body_twice(tmp_path: Path) -> None:
    """Two processes ``run`` the same ids at once, from opposite ends; each body runs once."""
    began = time.perf_counter()
    fleet, store, users_db, log = await _sqlite_fleet(tmp_path, lease=LEASE)
    try:
        a = fleet.spawn("a", "both")
        b = fleet.spawn("b", "both", None, "--order=reverse")
        await fleet.wait_for("both ready", lambda: a.printed("ready") and b.printed("ready"), 20)
        (tmp_path / "go").touch()
        await fleet.wait_for("both handles", lambda: a.printed("done") and b.printed("done"), 30)
        for w in (a, b):
            line = w.line("done ")
            assert line is not None
            assert json.loads(line[len("done ") :]) == {"right": SQLITE_RUNS, "wrong": []}
        assert await fleet.stop() == {"a": 0, "b": 0}, fleet.describe()
    finally:
        fleet.close()
    bad, metrics = check(
        _sqlite_evidence(store, users_db, log), SQLITE_RUNS, {"a", "b"}, None, lease_only=True
    )
    assert bad == [], bad[:10]
    _report(
        f"sqlite, 2 processes, {SQLITE_RUNS} runs",
        {"total": time.perf_counter() - began},
        metrics,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", ["restart", "attached"])
async def test_a_killed_process_on_sqlite_is_taken_over_without_waiting_for_its_lease(
    tmp_path: Path, scenario: str
) -> None:
    """SIGKILL one of two processes on one SQLite file; its pid is dead, so its runs are
    taken over long before its lease (10 s) expires, and none runs in two live processes.

    ``restart``: ``a`` starts every run, ``b`` serves; ``a`` is killed and a new
    process ``c`` starts (a restart), which frees the dead pid's leases at start.
    ``attached``: ``a`` and ``b`` both ``run`` the same ids, from opposite ends
    (``b`` waits on the runs ``a`` owns); ``a`` is killed and ``b`` alone must
    finish them.
    """
    began = time.perf_counter()
    fleet, store, users_db, log = await _sqlite_fleet(tmp_path, lease=SQLITE_LEASE)
    try:
        a = fleet.spawn("a", "starter" if scenario == "restart" else "both")
        # From opposite ends, so that a surely owns runs to kill it amid: in
        # the same order, b could win the race for nearly every id.
        b = (
            fleet.spawn("b", "server")
            if scenario == "restart"
            else fleet.spawn("b", "both", None, "--order=reverse")
        )
        await fleet.wait_for("both ready", lambda: a.printed("ready") and b.printed("ready"), 20)
        a_id = fleet.ready_id(a)
        (tmp_path / "go").touch()

        def kill_moment() -> bool:
            if not a.printed("created"):
                return False
            users = _sqlite_rows(users_db, "SELECT count(*) FROM users")[0][0]
            if users >= SQLITE_RUNS:
                pytest.fail(f"every run finished before a kill moment came\n{fleet.describe()}")
            sql = "SELECT count(*) FROM promises WHERE owner = ? AND state = 'PENDING'"
            return users >= SQLITE_RUNS // 10 and int(_sqlite_rows(store, sql, a_id)[0][0]) >= 10

        await fleet.wait_for("a kill moment", kill_moment, 20)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        killed_at, killed = time.time(), time.perf_counter()
        sql = (
            "SELECT id, kind, lease_expires_at FROM promises WHERE owner = ? AND state = 'PENDING'"
        )
        held = {r[0]: (r[1], r[2]) for r in _sqlite_rows(store, sql, a_id)}
        assert held
        if scenario == "restart":
            fleet.spawn("c", "server")

        def all_roots_resolved() -> bool:
            sql = "SELECT count(*) FROM promises WHERE kind = 'run' AND state = 'RESOLVED'"
            return int(_sqlite_rows(store, sql)[0][0]) == SQLITE_RUNS

        await fleet.wait_for("every root RESOLVED", all_roots_resolved, SQLITE_LEASE + 10)
        finished = time.perf_counter()
        if scenario == "attached":
            await fleet.wait_for("b's handles", lambda: b.printed("done"), 10)
            line = b.line("done ")
            assert line is not None
            assert json.loads(line[len("done ") :]) == {"right": SQLITE_RUNS, "wrong": []}
        survivors = [w.name for w in fleet.workers.values() if w is not a]
        assert await fleet.stop() == dict.fromkeys(survivors, 0), fleet.describe()
    finally:
        fleet.close()
    bad, metrics = check(
        _sqlite_evidence(store, users_db, log),
        SQLITE_RUNS,
        set(fleet.workers),
        Kill("a", killed_at, held),
        lease_only=False,
    )
    assert bad == [], bad[:10]
    _, last = metrics["takeover after the kill (first, last)"]
    # Taken over because the pid is dead, not because the lease ran out.
    assert last < min(expiry for _, expiry in held.values()) - killed_at
    _report(
        f"sqlite, SIGKILL a ({scenario}), {SQLITE_RUNS} runs, lease={SQLITE_LEASE}s",
        {
            "every root RESOLVED after the kill": finished - killed,
            "total": time.perf_counter() - began,
        },
        metrics,
    )


@pytest.mark.timeout(30)
async def test_opening_a_new_sqlite_file_waits_for_another_processs_lock(tmp_path: Path) -> None:
    """Another process's lock on a new file delays ``open`` (busy timeout) instead of failing it.

    Stands for the moment when another worker is creating or converting the
    file: ``open`` must wait up to ``busy_timeout`` like every other statement.
    """
    import threading

    path = tmp_path / "store.db"
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:  # another process, in rollback-journal mode, writing
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE other (x)")
            locked.set()
            release.wait(10)
            db.execute("COMMIT")
        finally:
            db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        asyncio.get_running_loop().call_later(0.3, release.set)
        store = SQLiteStore(path, busy_timeout=5.0)
        await store.open()
        try:
            assert (await store.pragmas())["journal_mode"] == "wal"
        finally:
            await store.close()
    finally:
        release.set()
        await asyncio.to_thread(holder.join)


@pytest.mark.postgres
@pytest.mark.timeout(30)
async def test_a_live_worker_in_another_pid_namespace_keeps_its_leases(
    postgres_dsn: str, postgres_schema: str
) -> None:
    """A worker on the same host name whose pid is not visible here is not taken for dead."""
    import socket

    from resonate_async import Context, Resonate
    from resonate_async.stores.postgres import PostgresStore

    # What a worker in another container with the same host name looks like from
    # here: its default id, with a pid above pid_max (2**22), which never exists here.
    other = f"{socket.gethostname()}:{2**22 + 1}:0a1b2c3d"
    entered: list[str] = []
    gate = asyncio.Event()

    def worker(worker_id: str | None) -> Resonate:
        resonate = Resonate(
            PostgresStore(postgres_dsn, schema=postgres_schema),
            worker_id=worker_id,
            lease_seconds=15,
            heartbeat_seconds=5,
            poll_seconds=0.1,
        )

        @resonate.register(name="job")
        async def job(ctx: Context) -> str:
            entered.append(resonate.worker_id)
            await gate.wait()
            return "ok"

        return resonate

    first, second = worker(other), worker(None)
    async with first:
        handle = first.run("job-1", "job")
        while not entered:
            await asyncio.sleep(0.01)
        async with second:  # starts, recovers, polls for a while: the run is first's
            await asyncio.sleep(1.0)
            gate.set()
            assert await handle == "ok"
    assert entered == [other]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/stat")
@pytest.mark.timeout(30)
async def test_a_killed_worker_its_parent_has_not_reaped_yet_is_dead(tmp_path: Path) -> None:
    """A zombie (exited, not yet reaped by a supervisor that reaps late) still
    answers signal 0: its runs must not wait out their lease all the same."""
    import socket

    from resonate_async import Context, Resonate

    exited = _a_zombie()
    try:
        gate = asyncio.Event()

        def worker(worker_id: str | None) -> Resonate:
            resonate = Resonate(
                tmp_path / "store.db", worker_id=worker_id, lease_seconds=3600, poll_seconds=0.05
            )

            @resonate.register(name="job")
            async def job(ctx: Context) -> str:
                await gate.wait()
                return "done"

            return resonate

        dead = worker(f"{socket.gethostname()}:{exited.pid}:0a1b2c3d")
        async with dead:
            await dead.run("z", "job").created()
        # Its lease holds for an hour; the worker that held it is gone.
        gate.set()
        async with worker(None) as alive:
            assert await asyncio.wait_for(alive.get("z").result(), 10) == "done"
    finally:
        exited.wait()


def _a_zombie() -> subprocess.Popen[bytes]:
    """A child process that has exited and that nobody has reaped yet."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{exited.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_bytes().rsplit(b")", 1)[1][1:2] != b"Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    return exited
