"""The ``resonate-async`` command line, against a real SQLite store file."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from resonate_async import _cli
from resonate_async._cli import main
from resonate_async._encoding import JSONEncoder
from resonate_async.errors import CanceledError
from resonate_async.stores import Create, Kind, MemoryStore, PromiseRecord, SQLiteStore, State

if TYPE_CHECKING:
    from collections.abc import Callable

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
FAR = 4_000_000_000.0  # a deadline in 2096
ENC = JSONEncoder()


def rec(id: str, state: State, kind: Kind, at: float, **fields: Any) -> PromiseRecord:
    parent = fields.get("parent_id")
    settled = T0 + at + 1 if state.settled else None
    return PromiseRecord(
        id=id,
        state=state,
        kind=kind,
        root_id=fields.pop("root_id", id.split(".")[0] if parent else id),
        created_at=T0 + at,
        settled_at=settled,
        **fields,
    )


RECORDS = [
    rec(
        "order-1",
        State.RESOLVED,
        Kind.RUN,
        0,
        func="create_order",
        param=ENC.encode([[1, "book"], {}]),
        value=ENC.encode({"total": 3, "items": (1, 2)}),
    ),
    # Steps are written when settled, so .10 may be older than .2: the tree orders by n.
    rec("order-1.10", State.RESOLVED, Kind.STEP, 1, parent_id="order-1", func="ship"),
    rec("order-1.1", State.RESOLVED, Kind.STEP, 2, parent_id="order-1", func="charge"),
    rec("order-1.1.1", State.RESOLVED, Kind.STEP, 3, parent_id="order-1.1", func="card"),
    rec(
        "order-1.2",
        State.RESOLVED,
        Kind.COMMAND,
        4,
        parent_id="order-1",
        func="InsertUser",
        param=b'{"$":"InsertUser","id":4}',  # under its registered name
    ),
    rec(
        "order-2",
        State.REJECTED,
        Kind.RUN,
        5,
        func="create_order",
        value=ENC.encode_error(ValueError("out of stock")),
    ),
    rec("order-3", State.PENDING, Kind.RUN, 6, func="create_order", timeout_at=T0),
    rec("order-3.1", State.PENDING, Kind.SLEEP, 7, parent_id="order-3", timeout_at=T0),
    rec("approval-7", State.PENDING, Kind.EXTERNAL, 8, timeout_at=FAR),
    rec("approval-8", State.PENDING, Kind.EXTERNAL, 9),
    rec("approval-9", State.PENDING, Kind.EXTERNAL, 10),
    rec("bad", State.RESOLVED, Kind.STEP, 11, value=b"\xff\x00"),
    rec("gone", State.RESOLVED, Kind.STEP, 12, value=b'{"$":"no_such_module:Gone","x":1}'),
]


def on_store(path: Path, fn: Callable[[SQLiteStore], Any]) -> Any:
    async def go() -> Any:
        async with SQLiteStore(path) as store:
            return await fn(store)

    return asyncio.run(go())


def stored(path: Path, id: str) -> PromiseRecord:
    return on_store(path, lambda s: s.get_many([id]))[id]  # type: ignore[no-any-return]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    on_store(path, lambda s: s.write([Create(r) for r in RECORDS]))
    return path


@pytest.fixture
def cli(db: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def run(*argv: str) -> tuple[int, str, str]:
        code = main([*argv, "--store", str(db)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def ids_in_table(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()[1:]]


def test_list_shows_every_promise_with_iso_times_and_the_readers_state(cli: Any) -> None:
    code, out, _ = cli("promises", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "KIND", "FUNC", "CREATED_AT", "SETTLED_AT"]
    assert ids_in_table(out) == [r.id for r in RECORDS]
    assert rows[0].split() == [
        "order-1",
        "RESOLVED",
        "run",
        "create_order",
        "2023-11-14T22:13:20Z",
        "2023-11-14T22:13:21Z",
    ]
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id["order-3"][1] == "REJECTED_TIMEDOUT"  # PENDING past timeout_at
    assert by_id["order-3.1"][1] == "RESOLVED"  # a sleep past its wake time
    assert by_id["approval-7"][1:3] == ["PENDING", "external"]
    assert by_id["approval-7"][-1] == "-"  # not settled


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["--state", "PENDING"], ["approval-7", "approval-8", "approval-9"]),
        (["--state", "rejected_timedout"], ["order-3"]),
        (["--state", "REJECTED"], ["order-2"]),
        (
            ["--state", "resolved", "--kind", "step"],
            ["order-1.10", "order-1.1", "order-1.1.1", "bad", "gone"],
        ),
        (["--state", "RESOLVED", "--kind", "sleep"], ["order-3.1"]),
        (["--kind", "RUN"], ["order-1", "order-2", "order-3"]),
        (["--prefix", "order-1."], ["order-1.10", "order-1.1", "order-1.1.1", "order-1.2"]),
        (["--prefix", "approval", "--limit", "2"], ["approval-7", "approval-8"]),
        (["--state", "PENDING", "--limit", "1"], ["approval-7"]),
    ],
)
def test_list_filters(cli: Any, filters: list[str], expected: list[str]) -> None:
    code, out, _ = cli("promises", "list", *filters)
    assert code == 0
    assert ids_in_table(out) == expected


def test_list_says_when_it_stops_at_the_limit_and_when_nothing_matches(cli: Any) -> None:
    _, _, err = cli("promises", "list", "--limit", "2")
    assert "--limit" in err
    code, out, _ = cli("promises", "list", "--prefix", "nothing-")
    assert code == 0
    assert out.strip() == "no promises match"


def test_list_json_parses(cli: Any) -> None:
    code, out, _ = cli("promises", "list", "--kind", "run", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["id"] for r in rows] == ["order-1", "order-2", "order-3"]
    assert rows[0]["created_at"] == "2023-11-14T22:13:20Z"
    assert rows[2]["state"] == "REJECTED_TIMEDOUT"
    assert rows[2]["settled_at"] is None


def test_show_decodes_param_and_value(cli: Any) -> None:
    code, out, _ = cli("promises", "show", "order-1")
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    assert fields["state"].strip() == "RESOLVED"
    assert fields["func"].strip() == "create_order (version 1)"
    assert fields["param"].strip() == "[[1, 'book'], {}]"
    assert fields["value"].strip() == "{'total': 3, 'items': (1, 2)}"  # the tuple rebuilt
    assert fields["parent_id"].strip() == "-"


@pytest.mark.parametrize(
    ("id", "expected"),
    [
        ("order-2", "error:            ValueError: out of stock"),
        ("order-3", "REJECTED_TIMEDOUT (stored PENDING, past timeout_at"),
        ("bad", r"b'\xff\x00'  (undecodable)"),
        ("gone", '"$": "no_such_module:Gone"'),
        ("order-1.2", "not rebuilt: a type stored under its registered name (a Command's)"),
    ],
)
def test_show_errors_timeouts_and_undecodable_values(cli: Any, id: str, expected: str) -> None:
    code, out, _ = cli("promises", "show", id)
    assert code == 0
    assert expected in out


def test_show_json_has_every_field_and_the_stored_values(cli: Any) -> None:
    _, out, _ = cli("promises", "show", "order-1", "--json")
    doc = json.loads(out)
    assert doc["param"] == [[1, "book"], {}]
    assert doc["value"] == {"items": {"$": "tuple", "v": [1, 2]}, "total": 3}
    assert {"owner", "lease_expires_at", "tags", "timeout_at", "attempt"} <= doc.keys()
    _, out, _ = cli("promises", "show", "bad", "--json")
    doc = json.loads(out)
    assert doc["value"] is None
    assert doc["value_repr"] == r"b'\xff\x00'"
    _, out, _ = cli("promises", "show", "order-2", "--json")
    assert json.loads(out)["value"]["type"] == "ValueError"


def test_resolve_stores_the_json_value_once(cli: Any, db: Path) -> None:
    code, out, _ = cli("promises", "resolve", "approval-7", "--value", '{"ok": true, "n": [1]}')
    assert (code, out) == (0, "approval-7: RESOLVED\n")
    record = stored(db, "approval-7")
    assert record.state is State.RESOLVED
    assert ENC.decode(record.value or b"") == {"ok": True, "n": [1]}

    code, out, _ = cli("promises", "resolve", "approval-7", "--value", "2")
    assert code == 0
    assert "already settled: RESOLVED" in out
    assert "value: {'ok': True, 'n': [1]}" in out
    assert stored(db, "approval-7") == record  # the first outcome is kept


def test_resolve_without_value_stores_null(cli: Any, db: Path) -> None:
    assert cli("promises", "resolve", "approval-8")[0] == 0
    assert ENC.decode(stored(db, "approval-8").value or b"") is None


def test_reject_stores_an_exception_with_the_message(cli: Any, db: Path) -> None:
    code, out, _ = cli("promises", "reject", "approval-8", "--message", "not approved")
    assert (code, out) == (0, "approval-8: REJECTED\n")
    error = ENC.decode_error(stored(db, "approval-8").value or b"")
    assert type(error) is Exception
    assert str(error) == "not approved"
    _, out, _ = cli("promises", "cancel", "approval-8")
    assert "already settled: REJECTED" in out
    assert "error: Exception: not approved" in out


def test_cancel_stores_a_canceled_error(cli: Any, db: Path) -> None:
    code, out, _ = cli("promises", "cancel", "approval-9")
    assert (code, out) == (0, "approval-9: REJECTED_CANCELED\n")
    record = stored(db, "approval-9")
    assert record.state is State.REJECTED_CANCELED
    assert isinstance(ENC.decode_error(record.value or b""), CanceledError)
    code, out, _ = cli("promises", "cancel", "approval-9")
    assert code == 0
    assert "already settled: REJECTED_CANCELED" in out


def test_settling_a_timed_out_promise_records_the_timeout(cli: Any, db: Path) -> None:
    code, out, _ = cli("promises", "resolve", "order-3", "--value", "1")
    assert code == 0
    assert "already settled: REJECTED_TIMEDOUT" in out
    assert stored(db, "order-3").state is State.REJECTED_TIMEDOUT


@pytest.mark.parametrize(
    "argv",
    [
        ["promises", "show", "nope"],
        ["promises", "resolve", "nope"],
        ["promises", "reject", "nope"],
        ["promises", "cancel", "nope"],
        ["runs", "tree", "nope"],
    ],
)
def test_unknown_id_exits_1_with_a_message_on_stderr(cli: Any, argv: list[str]) -> None:
    code, out, err = cli(*argv)
    assert code == 1
    assert out == ""
    assert "no promise with id 'nope'" in err


def test_tree_indents_children_under_their_parent_in_call_order(cli: Any) -> None:
    code, out, _ = cli("runs", "tree", "order-1")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "order-1",
        "order-1.1",
        "order-1.1.1",
        "order-1.2",
        "order-1.10",
    ]
    indents = [len(line) - len(line.lstrip()) for line in lines]
    assert indents == [0, 2, 4, 2, 2]
    assert lines[1].split() == ["order-1.1", "RESOLVED", "step", "charge"]


def test_tree_of_a_child_shows_its_run_and_json_parses(cli: Any) -> None:
    code, out, err = cli("runs", "tree", "order-3.1", "--json")
    assert code == 0
    assert "belongs to run order-3" in err
    nodes = json.loads(out)
    assert [(n["id"], n["depth"], n["state"]) for n in nodes] == [
        ("order-3", 0, "REJECTED_TIMEDOUT"),
        ("order-3.1", 1, "RESOLVED"),
    ]


def remote(id: str, at: float, parent_id: str | None, **fields: Any) -> PromiseRecord:
    """A remote call (``ctx.rfc``): stored as the root of its own tree, its caller as parent."""
    state = fields.pop("state", State.RESOLVED)
    return rec(id, state, Kind.REMOTE, at, parent_id=parent_id, root_id=id, **fields)


REMOTE_RECORDS = [
    rec("p1", State.RESOLVED, Kind.RUN, 0, func="parent"),
    remote("p1.1", 1, "p1", func="child"),
    rec("p1.1.1", State.RESOLVED, Kind.STEP, 2, parent_id="p1.1", root_id="p1.1", func="leaf"),
    remote("p1.1.2", 3, "p1.1", func="grandchild"),  # a remote call of a remote call
    rec("p1.1.2.1", State.RESOLVED, Kind.STEP, 4, parent_id="p1.1.2", root_id="p1.1.2"),
    rec("p1.2", State.RESOLVED, Kind.STEP, 5, parent_id="p1", func="leaf"),
    remote("p1.3", 6, "p1", state=State.PENDING, func="child"),  # the last call, unclaimed
    rec("ship-7", State.RESOLVED, Kind.STEP, 7, parent_id="p1", root_id="p1", func="ship"),
    remote("ship-7.1", 8, "ship-7", func="notify"),  # called from a step with its own id
    remote("p1.9", 9, None, func="child"),  # started by hand, no caller: not in p1's tree
    remote("own-id", 10, "p1", func="child"),  # ctx.rfi(...).with_options(id="own-id")
    remote("own-id.1", 11, "own-id", func="grandchild"),
    # Called from step p1.4, still running so not stored yet: shown under p1.
    remote("p1.4.1", 12, "p1.4", state=State.PENDING, func="child"),
    # Made by a step given its own id ("my-step"), still running: the step is
    # known only by its stored child, whose root says which run it is in.
    rec("my-step.1", State.RESOLVED, Kind.STEP, 13, parent_id="my-step", root_id="p1"),
    remote("rem-of-my-step", 14, "my-step", state=State.PENDING, func="child"),
    rec(
        "gate-m",
        State.PENDING,
        Kind.EXTERNAL,
        15,
        parent_id="rem-of-my-step",
        root_id="rem-of-my-step",
    ),
]
REMOTE_TREE = [
    ("p1", 0, "run"),
    ("p1.1", 1, "remote"),
    ("p1.1.1", 2, "step"),
    ("p1.1.2", 2, "remote"),
    ("p1.1.2.1", 3, "step"),
    ("p1.2", 1, "step"),
    ("p1.3", 1, "remote"),
    ("ship-7", 1, "step"),
    ("ship-7.1", 2, "remote"),
    ("own-id", 1, "remote"),
    ("own-id.1", 2, "remote"),
    ("p1.4.1", 1, "remote"),
    ("my-step.1", 1, "step"),
    ("rem-of-my-step", 1, "remote"),
    ("gate-m", 2, "external"),
]


@pytest.fixture(params=["sqlite", "memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def remote_cli(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, str, str]]:
    """The CLI on each kind of store, holding ``REMOTE_RECORDS``."""
    creates = [Create(r) for r in REMOTE_RECORDS]
    if request.param == "sqlite":
        spec = str(tmp_path / "remote.db")
        on_store(Path(spec), lambda s: s.write(creates))
    elif request.param == "memory":
        spec = ":memory:"
        memory = MemoryStore()
        asyncio.run(memory.write(creates))
        monkeypatch.setattr(_cli, "open_store", lambda _: memory)
    else:
        from resonate_async.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("postgres_schema")

        async def fill() -> None:
            async with PostgresStore(dsn, schema=schema) as store:
                await store.write(creates)

        asyncio.run(fill())
        spec = f"{dsn}?schema={schema}"

    def run(*argv: str) -> tuple[int, str, str]:
        code = main([*argv, "--store", spec])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_tree_shows_remote_calls_under_their_caller(remote_cli: Any) -> None:
    code, out, err = remote_cli("runs", "tree", "p1")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    indents = [(len(line) - len(line.lstrip())) // 2 for line in lines]
    shown = [(line.split()[0], d, line.split()[2]) for line, d in zip(lines, indents, strict=True)]
    assert shown == REMOTE_TREE
    assert lines[1].split() == ["p1.1", "RESOLVED", "remote", "child"]
    assert lines[6].split() == ["p1.3", "PENDING", "remote", "child"]


@pytest.mark.parametrize(
    "id", ["p1.1", "p1.1.2.1", "p1.3", "ship-7.1", "own-id.1", "p1.4.1", "rem-of-my-step", "gate-m"]
)
def test_tree_of_a_remote_call_or_its_child_shows_the_run_it_belongs_to(
    remote_cli: Any, id: str
) -> None:
    code, out, err = remote_cli("runs", "tree", id, "--json")
    assert code == 0
    assert f"({id} belongs to run p1; showing its tree)" in err
    nodes = json.loads(out)
    assert [(n["id"], n["depth"], n["kind"]) for n in nodes] == REMOTE_TREE
    assert nodes[1]["root_id"] == "p1.1"  # as stored: the remote call roots a tree of its own


def test_tree_of_a_remote_call_without_a_caller_is_its_own(remote_cli: Any) -> None:
    code, out, err = remote_cli("runs", "tree", "p1.9")
    assert (code, err) == (0, "")
    assert out.split() == ["p1.9", "RESOLVED", "remote", "child"]


def test_stats_counts_by_kind_and_state(cli: Any) -> None:
    code, out, _ = cli("stats", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["total"] == len(RECORDS)
    assert doc["by_kind"]["run"] == 3
    assert doc["by_state"]["PENDING"] == 3
    assert doc["by_state"]["REJECTED_TIMEDOUT"] == 1
    assert doc["by_kind_and_state"]["sleep"]["RESOLVED"] == 1
    _, out, _ = cli("stats")
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["KIND"][1:3] == ["PENDING", "RESOLVED"]
    assert rows["total"][-1] == str(len(RECORDS))
    assert rows["external"][1] == "3"


def test_store_comes_from_the_environment_or_before_the_command(
    db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RESONATE_STORE", f"sqlite:///{db}")
    assert main(["promises", "list", "--kind", "run"]) == 0
    assert ids_in_table(capsys.readouterr().out) == ["order-1", "order-2", "order-3"]
    monkeypatch.delenv("RESONATE_STORE")
    assert main(["--store", str(db), "promises", "show", "order-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "order-1"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mysql://db/x", "sqlite:///relative/path"),
        ("sqlite://", "sqlite:///relative/path"),
        ("missing.db", "no SQLite database at 'missing.db'"),
        ("other.db", "'other.db' (--store) is not a resonate_async store"),
        ("notes.txt", "is not a resonate_async store"),
        ("postgresq://me:secret@host/db", "'postgresq://me:***@host/db'"),
        ("sqlite:///app.db?mode=ro", "a sqlite:// URL takes no query"),
        ("postgresql://me:secret@host/db?schema=", "give one non-empty schema="),
        ("postgresql://me:secret@127.0.0.1:notaport/db", "invalid PostgreSQL URL"),
    ],
)
def test_bad_store_exits_2_naming_the_accepted_forms(
    spec: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with closing(sqlite3.connect("other.db")) as conn:  # an application's own database
        conn.execute("CREATE TABLE users (id INTEGER)")
    Path("notes.txt").write_text("not a database")
    assert main(["promises", "list", "--store", spec]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1  # no traceback
    assert "secret" not in err
    assert not Path("missing.db").exists()  # the CLI never creates a database
    with closing(sqlite3.connect("other.db")) as conn:  # nor adds tables to one
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("users",)]


def test_memory_store_is_allowed_and_empty(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--json", "--store", ":memory:"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["promises", "resolve", "approval-7", "--value", "{not json"],
        ["promises", "list", "--state", "DONE"],
        ["promises", "list", "--limit", "-1"],
        ["promises", "list", "--limit", str(2**63)],  # past what a store can count
        ["promises", "resolve", "approval-7", "--value", "[" * 600 + "]" * 600],
        ["promises", "resolve", "approval-7", "--value", "[" * 5000 + "]" * 5000],
        ["promises", "show", "\udcff"],  # the shell's $'\xff': not UTF-8
        ["promises", "list", "--prefix", "\udcff"],
        ["runs", "tree", "\udcff"],
        ["promises"],
        [],
    ],
)
def test_usage_errors_exit_2(cli: Any, argv: list[str]) -> None:
    code, out, err = cli(*argv)
    assert code == 2
    assert out == ""
    assert "usage:" in err
    assert "Traceback" not in err


def test_store_may_follow_any_command_name_and_the_last_one_wins(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["promises", "--store", str(db), "show", "order-1"]) == 0
    assert main(["runs", "--store", str(db), "tree", "order-1"]) == 0
    argv = ["--store", "a.db", "promises", "--store", "b.db", "show", "order-1"]
    assert main([*argv, "--store", str(db)]) == 0
    assert main(["--store", str(db), "promises", "--store", "b.db", "show", "order-1"]) == 2
    assert "no SQLite database at 'b.db'" in capsys.readouterr().err


def test_a_wal_file_that_is_no_store_is_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE users (id INTEGER)")
    assert main(["stats", "--store", str(path)]) == 2
    assert "is not a resonate_async store" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["users.db"]  # no -wal or -shm left behind


def test_a_store_whose_commits_are_still_in_its_wal_file_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "busy.db"
    with closing(sqlite3.connect(path)) as app:  # open: the last to close checkpoints
        app.execute("PRAGMA journal_mode = WAL")
        app.execute("SELECT * FROM sqlite_master").fetchall()  # now it has the WAL open
        on_store(path, lambda s: s.write([Create(r) for r in RECORDS]))
        assert (tmp_path / "busy.db-wal").stat().st_size > 0
        assert main(["promises", "show", "order-1", "--store", str(path)]) == 0
    assert "create_order" in capsys.readouterr().out


def test_times_no_date_can_show_print_as_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "far.db"
    far = [
        rec("far", State.PENDING, Kind.EXTERNAL, 0, timeout_at=1e20),  # timeout=1e20
        rec("never", State.PENDING, Kind.EXTERNAL, 1, timeout_at=float("inf")),
    ]
    on_store(path, lambda s: s.write([Create(r) for r in far]))
    assert main(["promises", "show", "far", "--store", str(path)]) == 0
    assert "timeout_at:       1e+20\n" in capsys.readouterr().out

    def strict(text: str) -> Any:  # no bare Infinity or NaN
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    assert main(["promises", "show", "never", "--json", "--store", str(path)]) == 0
    assert strict(capsys.readouterr().out)["timeout_at"] == "inf"
    assert main(["promises", "list", "--json", "--store", str(path)]) == 0
    rows = strict(capsys.readouterr().out)
    assert [(r["id"], r["state"], r["timeout_at"]) for r in rows] == [
        ("far", "PENDING", "1e+20"),
        ("never", "PENDING", "inf"),
    ]


def test_python_dash_m_runs_the_cli(db: Path) -> None:
    env = {**os.environ, "RESONATE_STORE": str(db)}
    argv = ["promises", "list", "--json", "--state", "PENDING"]
    done = subprocess.run(
        [sys.executable, "-m", "resonate_async", *argv],
        cwd=db.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in json.loads(done.stdout)] == ["approval-7", "approval-8", "approval-9"]


def test_tree_survives_a_parent_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "loop.db"
    loop = [
        rec("loop.1", State.RESOLVED, Kind.STEP, 0, parent_id="loop.2"),
        rec("loop.2", State.RESOLVED, Kind.STEP, 1, parent_id="loop.1"),
    ]
    on_store(path, lambda s: s.write([Create(r) for r in loop]))
    assert main(["runs", "tree", "loop", "--store", str(path)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "loop.1",
        "loop.2",
    ]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "promises" in capsys.readouterr().out


def test_a_postgresql_store_in_its_own_schema_and_no_store_created(
    postgres_dsn: str, postgres_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from resonate_async.stores import PostgresStore

    url = f"{postgres_dsn}?schema={postgres_schema}"
    assert main(["promises", "list", "--store", url]) == 2
    assert "no resonate_async store in that PostgreSQL database" in capsys.readouterr().err

    async def tables() -> list[str]:
        import asyncpg

        conn = await asyncpg.connect(postgres_dsn)
        try:
            rows = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                postgres_schema,
            )
        finally:
            await conn.close()
        return sorted(r["table_name"] for r in rows)

    assert asyncio.run(tables()) == []  # the CLI created nothing

    async def fill() -> None:
        async with PostgresStore(postgres_dsn, schema=postgres_schema) as store:
            await store.write([Create(r) for r in RECORDS])

    asyncio.run(fill())
    assert main(["promises", "list", "--json", "--limit", "0", "--store", url]) == 0
    listed = [r["id"] for r in json.loads(capsys.readouterr().out)]
    assert sorted(listed) == sorted(r.id for r in RECORDS)


def test_show_escapes_an_error_message_the_terminal_cannot_print(tmp_path: Path) -> None:
    # A message built from a file name decoded with surrogateescape.
    path = tmp_path / "odd.db"
    error = ENC.encode_error(OSError("cannot read \udcff.csv"))
    record = rec("odd", State.REJECTED, Kind.RUN, 0, func="load", value=error)
    on_store(path, lambda s: s.write([Create(record)]))
    done = subprocess.run(
        [sys.executable, "-m", "resonate_async", "promises", "show", "odd", "--store", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr  # a UnicodeEncodeError traceback before
    assert "cannot read \\udcff.csv" in done.stdout
