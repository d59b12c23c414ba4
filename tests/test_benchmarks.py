"""The benchmark scripts run end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from scripts import run_python

if TYPE_CHECKING:
    import subprocess

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("aiodataloader")
pytest.importorskip("aiosqlite")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(BENCHMARKS / name, *args)


def words(text: str) -> str:
    """``text`` with every run of whitespace made one space: the table's title
    wraps wherever its width says (Python 3.13's GC thresholds print longer)."""
    return " ".join(text.split())


def test_compare_runs_every_pipeline_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = run_script("compare.py", "--sizes", "200", "--no-progress", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    for heading in ("pipeline", "in GC", "µs/run", "rows/txn", "peak RSS MiB"):
        assert heading in proc.stdout
    for label in ("raw executemany", "aiodataloader floor", "resonate batched", "--no-batch"):
        assert label in proc.stdout
    data = json.loads(out.read_text())
    pipelines = {r["pipeline"] for r in data["results"]}
    assert pipelines == {"raw", "dataloader", "resonate", "resonate-no-batch"}
    assert all(r["rows"] == 200 for r in data["results"])
    assert all(0 <= r["gc_seconds"] <= r["seconds"] for r in data["results"])


def test_compare_runs_no_batch_only_at_the_smallest_size(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = run_script("compare.py", "--sizes", "50,100", "--no-progress", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    no_batch = [r["users"] for r in results if r["pipeline"] == "resonate-no-batch"]
    assert no_batch == [50]
    # How each batched pipeline grows from the smallest size, with and without the GC.
    assert "(c) resonate batched: 100 users took" in proc.stdout
    assert "without the GC's time; linear is 2x" in proc.stdout


@pytest.mark.parametrize(
    ("flag", "title", "meta", "users"),
    [
        ("--gather", "handles awaited with gather", "gather", 100),
        ("--gc-freeze", "gc.freeze() once submitted", "gc_freeze", 60),
    ],
)
def test_compare_runs_every_pipeline_with_a_mode_flag(
    tmp_path: Path, flag: str, title: str, meta: str, users: int
) -> None:
    out = tmp_path / "compare.json"
    args = ("--sizes", str(users), "--no-progress", flag, "--json", str(out))
    proc = run_script("compare.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert title in words(proc.stdout)
    data = json.loads(out.read_text())
    assert data["meta"][meta] is True
    assert all(r["rows"] == users for r in data["results"])


def test_compare_sets_the_gc_threshold_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    args = ("--sizes", "50", "--no-progress", "--gc-threshold", "700,10,100", "--json", str(out))
    proc = run_script("compare.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["meta"]["gc_threshold"] == [700, 10, 100]
    assert run_script("compare.py", "--gc-threshold", "x").returncode != 0


def test_batch_sizes_draws_every_batch(tmp_path: Path) -> None:
    svg, data = tmp_path / "sizes.svg", tmp_path / "sizes.json"
    args = ("--runs", "300", "--out", str(svg), "--json", str(data))
    proc = run_script("batch_sizes.py", *args)
    assert proc.returncode == 0, proc.stderr
    batches = json.loads(data.read_text())["batches"]
    assert sum(size for _, size in batches) == 300
    drawing = svg.read_text()
    assert drawing.startswith("<svg") and drawing.count('fill="#2e86c1"/>') == len(
        batches
    )  # one bar each


def test_compare_rejects_bad_sizes() -> None:
    proc = run_script("compare.py", "--sizes", "ten")
    assert proc.returncode != 0


def test_compare_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    proc = run_script("compare.py", "--sizes", "100", "--no-progress", "--loop", "uvloop")
    assert proc.returncode == 0, proc.stderr
    assert "loop=uvloop" in words(proc.stdout)


def test_latency_prints_percentiles() -> None:
    proc = run_script("latency.py", "--runs", "20", "--warmup", "2")
    assert proc.returncode == 0, proc.stderr
    for text in ("p50 µs", "p99 µs", "call → handler", "handler → resume", "memory", "sqlite"):
        assert text in proc.stdout


def test_memory_benchmarks_run_at_a_tiny_size() -> None:
    inflight = run_script("memory.py", "inflight", "--runs", "300")
    assert inflight.returncode == 0, inflight.stderr
    assert "300 runs in flight" in inflight.stdout and "bytes per run" in inflight.stdout
    stream = run_script("memory.py", "stream", "--runs", "500", "--in-flight", "50")
    assert stream.returncode == 0, stream.stderr
    assert "500 runs streamed, at most 50 in flight" in stream.stdout


def test_compare_keeps_the_median_of_its_repeats(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = run_script(
        "compare.py", "--sizes", "60", "--repeat", "3", "--no-progress", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["repeat"] == 3
    for result in data["results"]:
        samples = result["samples"]
        assert len(samples) == (1 if result["pipeline"] == "resonate-no-batch" else 3)
        assert result["seconds"] == sorted(samples)[(len(samples) - 1) // 2]


def test_the_blog_benchmark_inserts_every_user_batched_and_one_by_one() -> None:
    batches = {}
    for mode in ("--batch", "--no-batch"):
        proc = run_script("batching.py", mode, "--users", "50", "--no-progress")
        assert proc.returncode == 0, proc.stderr  # it exits 1 unless the table holds 50 rows
        assert "Inserting 50 users took" in proc.stdout
        found = re.search(r"^([\d,]+) batches,", proc.stdout, re.MULTILINE)
        assert found is not None, proc.stdout
        batches[mode] = int(found.group(1).replace(",", ""))
    assert 1 <= batches["--batch"] < 50  # fifty commands, served by a few handler calls
    assert batches["--no-batch"] == 0


def test_the_crash_loop_script_kills_and_checks_at_a_tiny_size() -> None:
    args = ("--kills", "2", "--runs", "20", "--kills-per-round", "2", "--seed", "7")
    proc = run_script("crash_loop.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # it exits 1 on any anomaly
    assert "kills=2 runs=20 anomalies=0" in proc.stdout


def test_gc_census_counts_collections_and_allocations_by_phase() -> None:
    proc = run_script("gc_census.py", "--runs", "20000", "--top", "3", "--skip-rule")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "20,000 runs in" in out
    counted = re.search(r"allocations the GC counted: ([\d.]+) per run", out)
    assert counted is not None and float(counted.group(1)) > 0
    for phase in ("resonate.run calls", "starting admitted runs", "waking recorded commands"):
        assert f"per run in {phase}" in out
    # The census lists the handles alive then, one per run submitted (on
    # Python 3.13's thresholds a burst this small may see no full collection).
    if "no full collection after the burst was submitted" not in out:
        census = re.search(r"([\d,]+) resonate_async.RunState\n", out)
        assert census is not None and int(census.group(1).replace(",", "")) == 20_000
    skip = re.search(r"as each of (\d+) full collections started: median ([\d.]+)", out)
    full = re.search(r"collections \(young, middle, full\): [\d,]+, [\d,]+, (\d+)", out)
    assert full is not None
    if int(full.group(1)) >= 2:  # the rule is measured from the second one on
        assert skip is not None and int(skip.group(1)) == int(full.group(1)) - 1, out
        assert float(skip.group(2)) > 0


def test_recovery_resumes_a_crashed_burst_in_few_batches() -> None:
    proc = run_script("recovery.py", "--runs", "300")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"300 runs resumed in [\d.]+ s .* went in (\d+) batches", proc.stdout)
    assert match is not None, proc.stdout
    assert int(match.group(1)) <= 3, proc.stdout


def test_renewal_times_one_renewal_per_size() -> None:
    proc = run_script("renewal.py", "--sizes", "20,50")
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"SQLite: renewing ([\d,]+) leases took [\d.]+ ms", proc.stdout)
    assert lines == ["20", "50"], proc.stdout


def test_renewal_times_postgres_in_a_schema_it_drops(postgres_dsn: str) -> None:
    proc = run_script("renewal.py", "--sizes", "30", "--store", postgres_dsn)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"PostgreSQL: renewing 30 leases took [\d.]+ ms", proc.stdout), proc.stdout
