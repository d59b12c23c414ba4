"""The ``resonate-async`` command line: inspect and settle promises in any store.

Standard library only (``argparse``), so it works wherever the SDK installs.
Every command opens the store named by ``--store`` (the last one given, else
``RESONATE_STORE``, else ``resonate.db``), does one thing, and closes it.
States are shown as a reader sees them (DESIGN §2): a PENDING promise past its
``timeout_at`` reads ``REJECTED_TIMEDOUT``, a sleep past its wake time reads
``RESOLVED``.

Exit codes: 0 success (settling an already-settled promise included), 1 an
unknown id or a store failure, 2 bad usage or a store that cannot be used.

Example:
    ```console
    $ resonate-async promises list --state PENDING --store app.db
    $ resonate-async promises resolve approval-7 --value '{"ok": true}' --store app.db
    ```
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from ._cli_view import (
    effective,
    is_error,
    iso,
    outcome_text,
    run_tree,
    search,
    stored_json,
    summary,
    table,
    tree_parent,
    unstored_roots,
)
from ._encoding import JSONEncoder
from .errors import CanceledError, EncodingError, PromiseTimeoutError, StoreError
from .stores import DEFAULT_STORE, store_from_spec
from .stores._base import Kind, PromiseRecord, Settle, State
from .stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .stores._base import Store

__all__ = ("main",)

_PROG = "resonate-async"
_STORE_FORMS = (
    "a SQLite file path, sqlite:///relative/path, sqlite:////absolute/path, "
    "postgresql://user:password@host/db, or :memory:"
)


class CLIError(Exception):
    """A failure reported as one line on stderr, ending the command with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- commands --------------------------------------------------------------------


async def cmd_list(store: Store, args: argparse.Namespace) -> int:
    """``promises list``: one row per promise, oldest first."""
    limit = args.limit or None
    records = await search(store, state=args.state, kind=args.kind, prefix=args.prefix, limit=limit)
    if args.json:
        print(json.dumps([summary(r) for r in records], indent=2))
    elif records:
        rows = [
            (
                r.id,
                r.state.value,
                r.kind.value,
                r.func,
                iso(r.created_at, "seconds"),
                iso(r.settled_at, "seconds"),
            )
            for r in records
        ]
        print(table(("ID", "STATE", "KIND", "FUNC", "CREATED_AT", "SETTLED_AT"), rows))
    else:
        print("no promises match")
    if limit is not None and len(records) == limit:
        print(f"(showing the first {limit}; pass --limit N, 0 for all)", file=sys.stderr)
    return 0


async def get(store: Store, id: str) -> PromiseRecord:
    """The stored record ``id``, or a :class:`CLIError` saying how to find ids."""
    record = (await store.get_many([id])).get(id)
    if record is None:
        raise unknown_id(id)
    return record


def unknown_id(id: str) -> CLIError:
    """The error for an ``id`` the store does not hold."""
    return CLIError(f"no promise with id {id!r}; list ids with `{_PROG} promises list`")


async def cmd_show(store: Store, args: argparse.Namespace) -> int:
    """``promises show``: every field, with param and value decoded."""
    stored = await get(store, args.id)
    record = effective(stored, time.time())
    if args.json:
        doc: dict[str, object] = {**summary(record), "stored_state": stored.state.value}
        doc |= {"owner": record.owner, "lease_expires_at": iso(record.lease_expires_at)}
        doc["tags"] = record.tags
        for name, data in (("param", record.param), ("value", record.value)):
            doc[name], bad = stored_json(data)
            if bad is not None:
                doc[f"{name}_repr"] = bad
        print(json.dumps(doc, indent=2))
        return 0
    encoder = JSONEncoder()
    state = record.state.value
    if record.state is not stored.state:
        state += f" (stored PENDING, past timeout_at {iso(record.timeout_at)})"
    fields: list[tuple[str, str | None]] = [
        ("id", record.id),
        ("state", state),
        ("kind", record.kind.value),
        ("func", None if record.func is None else f"{record.func} (version {record.version})"),
        ("parent_id", record.parent_id),
        ("root_id", record.root_id),
        ("attempt", str(record.attempt)),
        ("created_at", iso(record.created_at)),
        ("settled_at", iso(record.settled_at)),
        ("timeout_at", iso(record.timeout_at)),
        ("owner", record.owner),
        ("lease_expires_at", iso(record.lease_expires_at)),
        ("tags", None if record.tags is None else json.dumps(record.tags)),
        ("param", outcome_text(encoder, record.param, error=False)),
        (
            "error" if is_error(stored) else "value",
            outcome_text(encoder, record.value, error=is_error(stored)),
        ),
    ]
    for name, text in fields:
        body = "-" if text is None else text.replace("\n", "\n" + " " * 18)
        print(f"{name + ':':<18}{body}")
    return 0


async def settle(store: Store, args: argparse.Namespace, state: State, data: bytes) -> int:
    """Settle ``args.id`` in one write; report the first outcome if it was settled."""
    encoder = JSONEncoder()
    now = time.time()
    stored = await get(store, args.id)
    seen = effective(stored, now)
    op = Settle(args.id, state, data, now)
    if seen.state is not stored.state:
        # Past its deadline it already reads as settled: record that, as the engine would.
        timeout = PromiseTimeoutError(f"{args.id} timed out")
        value = (
            encoder.encode(None) if seen.state is State.RESOLVED else encoder.encode_error(timeout)
        )
        op = Settle(args.id, seen.state, value, now)
    (result,) = await store.write([op])
    if result is None:
        raise CLIError(f"no promise with id {args.id!r}; it vanished while settling")
    if op.value is data and (result.state, result.value, result.settled_at) == (state, data, now):
        print(f"{args.id}: {state.value}")
        return 0
    print(f"{args.id} was already settled: {result.state.value} (first outcome kept)")
    label = "error" if is_error(result) else "value"
    print(f"{label}: {outcome_text(encoder, result.value, error=is_error(result))}")
    return 0


async def cmd_resolve(store: Store, args: argparse.Namespace) -> int:
    """``promises resolve``: RESOLVED with ``--value`` (JSON, default null), encoded."""
    return await settle(store, args, State.RESOLVED, args.value)


async def cmd_reject(store: Store, args: argparse.Namespace) -> int:
    """``promises reject``: REJECTED with ``Exception(--message)``."""
    data = JSONEncoder().encode_error(Exception(args.message))
    return await settle(store, args, State.REJECTED, data)


async def cmd_cancel(store: Store, args: argparse.Namespace) -> int:
    """``promises cancel``: REJECTED_CANCELED with a ``CanceledError``."""
    error = CanceledError(f"promise {args.id!r} was canceled from the command line")
    return await settle(store, args, State.REJECTED_CANCELED, JSONEncoder().encode_error(error))


def _child_key(parent: str, record: PromiseRecord) -> tuple[int, float, str]:
    # Children are "{parent}.{n}": order them by n, so .2 comes before .10.
    n = record.id[len(parent) + 1 :] if record.id.startswith(parent + ".") else ""
    return (int(n), 0.0, "") if n.isdigit() else (sys.maxsize, record.created_at, record.id)


async def cmd_tree(store: Store, args: argparse.Namespace) -> int:
    """``runs tree``: a run's promises, its remote calls' included, each under its parent."""
    root_id, records = await run_tree(store, args.id)
    if not records:
        raise unknown_id(args.id)
    if root_id != args.id:
        print(f"({args.id} belongs to run {root_id}; showing its tree)", file=sys.stderr)
    now = time.time()
    by_id = {r.id: effective(r, now) for r in records}
    roots = unstored_roots(records)
    children: dict[str | None, list[PromiseRecord]] = {}
    for r in by_id.values():
        children.setdefault(tree_parent(r, by_id, roots), []).append(r)
    lines: list[tuple[int, PromiseRecord]] = []
    stack = [(0, r) for r in reversed(children.pop(None, []))]
    while stack:
        depth, record = stack.pop()
        lines.append((depth, record))
        kids = sorted(children.pop(record.id, []), key=lambda c: _child_key(record.id, c))
        stack.extend((depth + 1, c) for c in reversed(kids))
    lines += [(0, r) for rest in children.values() for r in rest]  # a parent cycle: flat
    if args.json:
        print(json.dumps([{**summary(r), "depth": d} for d, r in lines], indent=2))
        return 0
    rows = [("  " * d + r.id, r.state.value, r.kind.value, r.func) for d, r in lines]
    print(table(("ID", "STATE", "KIND", "FUNC"), rows).split("\n", 1)[1])
    return 0


async def cmd_stats(store: Store, args: argparse.Namespace) -> int:
    """``stats``: how many promises the store holds, by kind and state."""
    now = time.time()
    counts = Counter((r.kind, effective(r, now).state) for r in await store.search(limit=None))
    if args.json:
        doc = {
            "total": counts.total(),
            "by_state": {s.value: sum(counts[k, s] for k in Kind) for s in State},
            "by_kind": {k.value: sum(counts[k, s] for s in State) for k in Kind},
            "by_kind_and_state": {k.value: {s.value: counts[k, s] for s in State} for k in Kind},
        }
        print(json.dumps(doc, indent=2))
        return 0
    header = ("KIND", *(s.value for s in State), "TOTAL")
    rows = [
        (k.value, *(str(counts[k, s]) for s in State), str(sum(counts[k, s] for s in State)))
        for k in Kind
    ]
    totals = (str(sum(counts[k, s] for k in Kind)) for s in State)
    rows.append(("total", *totals, str(counts.total())))
    print(table(header, rows))
    return 0


# -- arguments and the entry point -----------------------------------------------


def _enum_arg(cls: type[State] | type[Kind]) -> Callable[[str], State | Kind]:
    def parse(text: str) -> State | Kind:
        for member in cls:
            if text.lower() in (member.name.lower(), member.value.lower()):
                return member
        names = ", ".join(m.value for m in cls)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {names}")

    parse.__name__ = cls.__name__.lower()
    return parse


def _json_arg(text: str) -> bytes:
    """``text`` parsed as JSON and encoded for the store, so what cannot be stored is usage."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({exc}); quote strings, e.g. --value '\"yes\"'"
        ) from None
    except RecursionError:
        raise argparse.ArgumentTypeError("the JSON is nested too deeply to read") from None
    try:
        return JSONEncoder().encode(value)
    except EncodingError as exc:
        raise argparse.ArgumentTypeError(f"the JSON value cannot be stored: {exc}") from None


def _text_arg(text: str) -> str:
    # The shell passes bytes that are not UTF-8 as surrogates, which no store can hold.
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


def _limit_arg(text: str) -> int:
    # Stores count in signed 64 bits.
    if not text.isdigit() or int(text) >= 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count from 0 to 2**63 - 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``resonate-async``."""
    store_help = f"the store: {_STORE_FORMS} (default: $RESONATE_STORE, else {DEFAULT_STORE})"
    # SUPPRESS: a --store given earlier is not reset by a subparser; each level's
    # parser runs after the one above it, so the last --store given wins.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="SPEC", default=argparse.SUPPRESS, help=store_help)
    parser = argparse.ArgumentParser(prog=_PROG, description="Inspect and settle durable promises.")
    parser.add_argument("--store", metavar="SPEC", default=None, help=store_help)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    promises = commands.add_parser(
        "promises", parents=[common], help="list, show and settle promises"
    )
    verbs = promises.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def leaf(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Callable[[Store, argparse.Namespace], Awaitable[int]],
        help: str,
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    ls = leaf(verbs, "list", cmd_list, "list promises, oldest first")
    ls.add_argument("--state", type=_enum_arg(State), help="PENDING, RESOLVED, REJECTED, ...")
    ls.add_argument("--kind", type=_enum_arg(Kind), help="run, step, command, sleep, ...")
    ls.add_argument("--prefix", type=_text_arg, help="only ids starting with PREFIX")
    ls.add_argument(
        "--limit",
        type=_limit_arg,
        default=100,
        metavar="N",
        help="at most N rows (default 100; 0 for all)",
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    show = leaf(verbs, "show", cmd_show, "show every field of one promise")
    show.add_argument("id", type=_text_arg)
    show.add_argument("--json", action="store_true", help="print JSON (stored values, undecoded)")
    resolve = leaf(verbs, "resolve", cmd_resolve, "resolve a pending promise")
    resolve.add_argument("id", type=_text_arg)
    resolve.add_argument(
        "--value",
        type=_json_arg,
        default="null",  # a string: argparse passes it through _json_arg
        metavar="JSON",
        help="the value, as JSON (default null)",
    )
    reject = leaf(verbs, "reject", cmd_reject, "reject a pending promise")
    reject.add_argument("id", type=_text_arg)
    reject.add_argument("--message", default="rejected from the command line", metavar="TEXT")
    cancel = leaf(verbs, "cancel", cmd_cancel, "cancel a pending promise")
    cancel.add_argument("id", type=_text_arg)

    runs = commands.add_parser("runs", parents=[common], help="inspect runs")
    run_verbs = runs.add_subparsers(title="commands", required=True, metavar="COMMAND")
    tree = leaf(run_verbs, "tree", cmd_tree, "show the promise tree of a run")
    tree.add_argument("id", type=_text_arg)
    tree.add_argument("--json", action="store_true", help="print JSON")
    stats = leaf(commands, "stats", cmd_stats, "count promises by kind and state")
    stats.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _redacted(spec: str) -> str:
    """``spec`` with any URL password masked, for messages."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", spec)


def _holds_promises(path: str) -> bool:
    """Whether the SQLite file at ``path`` is a store, read without changing it.

    Even read-only, SQLite leaves ``-wal`` and ``-shm`` files beside a
    WAL-mode file that no one has open. Without a ``-wal`` file the database
    file holds every commit, so it is read as ``immutable``, which creates
    nothing; with one, a connection has it open (or the next will recover it)
    and its commits may be in it, so it is read as usual.
    """
    mode = "mode=ro" if os.path.exists(path + "-wal") else "immutable=1"
    uri = f"{Path(path).resolve().as_uri()}?{mode}"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'promises'"
            ).fetchone()
    except sqlite3.Error:
        return False
    return found is not None


def open_store(spec: str | None) -> Store:
    """The store ``spec`` names, refusing what the CLI cannot sensibly use.

    A SQLite file must exist and hold a store already: opening one migrates
    its schema, and an inspection tool should neither create an empty
    database from a typo nor add tables to an application's own database.
    """
    source = "--store"
    if spec is None:
        spec, source = os.environ.get("RESONATE_STORE") or None, "RESONATE_STORE"
        if spec is None:
            spec, source = DEFAULT_STORE, "the default"
    where = f"{_redacted(spec)!r} ({source})"
    try:
        store = store_from_spec(spec)
    except ImportError as exc:
        raise CLIError(str(exc), 2) from None
    except ValueError as exc:
        # It says what is wrong, then what a program may pass: keep the first part.
        reason = _redacted(str(exc)).partition("; ")[0]
        raise CLIError(f"cannot use store {where}: {reason}; pass {_STORE_FORMS}", 2) from None
    if isinstance(store, SQLiteStore) and store.path != ":memory:":
        if not os.path.exists(store.path):
            problem = f"no SQLite database at {where}"
        elif not _holds_promises(store.path):
            problem = f"{where} is not a resonate_async store (it has no promises table)"
        else:
            return store
        raise CLIError(f"{problem}; pass --store or set RESONATE_STORE to {_STORE_FORMS}", 2)
    return store


async def run(store: Store, args: argparse.Namespace) -> int:
    """Open ``store``, run the command, close the store."""
    holds_promises = getattr(store, "_holds_promises", None)  # PostgreSQL
    try:
        found = holds_promises is None or await holds_promises()
    except ValueError as exc:
        raise CLIError(f"{_redacted(str(exc))}; pass {_STORE_FORMS}", 2) from None
    if not found:
        # Opening would create the tables: an inspection tool must not.
        raise CLIError(
            "no resonate_async store in that PostgreSQL database and schema (no promises "
            "table); name the schema with ?schema=NAME in the URL",
            2,
        )
    await store.open()
    try:
        code: int = await args.handler(store, args)
        return code
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """Run ``resonate-async`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    for stream in (sys.stdout, sys.stderr):
        # Stored text may hold what the terminal's encoding cannot (a lone
        # surrogate from a file name): escaped, not a traceback.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(run(open_store(args.store), args))
    except CLIError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except StoreError as exc:
        print(f"{_PROG}: store error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
