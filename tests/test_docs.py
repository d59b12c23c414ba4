"""The docs' code keeps working: every Python block compiles, the README's
smallest example runs (and, started again, replays instead of inserting),
and the docs' front page is the README."""

from __future__ import annotations

import ast
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from scripts import run_python

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_compiles(page: Path) -> None:
    for n, code in enumerate(python_blocks(page)):
        # Snippets may await at top level, as in a notebook or `python -m asyncio`.
        compile(code, f"{page.name} block {n}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_readme_example_runs_and_a_second_run_replays(tmp_path: Path) -> None:
    (example,) = [b for b in python_blocks(ROOT / "README.md") if "asyncio.run(main())" in b]
    script = tmp_path / "example.py"
    script.write_text(example)

    def run_it() -> str:
        done = run_python(script, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run_it() == str(sum(range(10_000)))
    assert users(tmp_path / "users.db") == 10_000
    # Started again, every run id is complete in app.db: the same answer comes
    # from the stored outcomes, and no handler inserts into a fresh users table.
    (tmp_path / "users.db").unlink()
    assert run_it() == str(sum(range(10_000)))
    assert users(tmp_path / "users.db") == 0


def users(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM users").fetchone()
    return int(count)


def test_the_docs_front_page_is_the_readme() -> None:
    readme = (ROOT / "README.md").read_text().replace("](docs/", "](")
    assert (ROOT / "docs" / "index.md").read_text() == readme
