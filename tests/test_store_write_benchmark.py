"""``benchmarks/store_write.py`` runs end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "store_write.py"
WORKLOADS = ("creates", "blog", "blog-split", "settles")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--ops", "300", "--batch", "50", "--repeat", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_every_workload_runs_against_raw_sqlite() -> None:
    proc = run()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(WORKLOADS)
    assert all("ratio" in line for line in lines)


def test_one_workload_on_postgres_too() -> None:
    dsn = os.environ.get("RESONATE_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("needs RESONATE_TEST_POSTGRES_DSN")
    pytest.importorskip("asyncpg")
    proc = run("--workload", "blog-split", "--postgres", dsn)
    assert proc.returncode == 0, proc.stderr
    assert "PostgresStore.write" in proc.stdout


def test_blog_split_finishes_each_run_one_transaction_after_creating_it() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import store_write  # type: ignore[import-not-found]  # via sys.path above
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from resonate_async.stores import Create, Settle

    batches = store_write.make_batches("blog-split", 300, 30)
    created_in: dict[str, int] = {}
    for n, batch in enumerate(batches):
        for op in batch:
            if isinstance(op, Create) and op.record.parent_id is None:
                created_in[op.record.id] = n
            elif isinstance(op, Settle):
                assert created_in[op.id] == n - 1
                assert op.prior is not None and op.prior.id == op.id
    assert len(created_in) == 100
    assert sum(map(len, batches)) == 300
