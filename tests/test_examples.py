"""The examples run end to end (``make demo`` runs the first; CI runs them here)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scripts import run_python

if TYPE_CHECKING:
    import subprocess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(EXAMPLES / name, *args)


def test_the_batching_example_inserts_every_user_once() -> None:
    done = run_example("batching.py")
    assert done.returncode == 0, done.stderr
    assert "10,000 rows inserted by 10,000 durable workflows" in done.stdout


def test_the_web_example_answers_202_once_durable_and_serves_the_outcome() -> None:
    # --selftest posts every signup at once (and one twice), polls until each
    # GET shows its value, checks a 404, and exits non-zero on any mismatch.
    done = run_example("web.py", "--selftest", "60")
    assert done.returncode == 0, done.stderr
    assert "60 signups accepted (202, durable)" in done.stdout
