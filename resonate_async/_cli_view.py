"""How the ``resonate-async`` command line reads and prints a promise.

A promise is shown as a reader sees it (DESIGN §2): a PENDING promise past
its ``timeout_at`` reads ``REJECTED_TIMEDOUT``, a sleep past its wake time
reads ``RESOLVED``. Stored params and values are decoded for display; what
the encoder cannot rebuild is shown as its stored JSON, and bytes that are no
JSON at all as their ``repr``.
"""

from __future__ import annotations

import json
import pprint
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .errors import EncodingError, StoredError
from .stores._base import Kind, PromiseRecord, State

if TYPE_CHECKING:
    from collections.abc import Container, Iterable, Mapping, Sequence

    from ._encoding import JSONEncoder
    from .stores._base import Store

__all__ = (
    "effective",
    "error_text",
    "is_error",
    "iso",
    "outcome_text",
    "run_tree",
    "search",
    "stored_json",
    "summary",
    "table",
    "tree_parent",
    "unstored_roots",
)


# -- the reader's view -------------------------------------------------------


def effective(record: PromiseRecord, now: float) -> PromiseRecord:
    """``record`` as a reader sees it at ``now`` (timeouts applied, DESIGN §2)."""
    deadline = record.timeout_at
    if record.state is State.PENDING and deadline is not None and now >= deadline:
        state = State.RESOLVED if record.kind is Kind.SLEEP else State.REJECTED_TIMEDOUT
        return replace(record, state=state)
    return record


async def search(
    store: Store,
    *,
    state: State | None,
    kind: Kind | None,
    prefix: str | None,
    limit: int | None,
    now: float | None = None,
) -> list[PromiseRecord]:
    """``store.search`` filtered by *effective* state at ``now`` (default: the
    time now), oldest first; also ``resonate.promises.search``.

    A PENDING row may read as REJECTED_TIMEDOUT (or RESOLVED, for a sleep), so
    those filters also sweep the pending rows, which the store cannot filter
    by deadline; that sweep reads every pending row matching the other filters.
    """
    now = time.time() if now is None else now
    if state is None:
        rows = await store.search(kind=kind, prefix=prefix, limit=limit)
        return [effective(r, now) for r in rows]
    found = (
        []
        if state is State.PENDING
        else await store.search(state=state, kind=kind, prefix=prefix, limit=limit)
    )
    sweep = state is State.PENDING or (state is State.REJECTED_TIMEDOUT and kind is not Kind.SLEEP)
    sweep_kind = kind
    if state is State.RESOLVED and kind in (None, Kind.SLEEP):
        sweep, sweep_kind = True, Kind.SLEEP
    if sweep:
        # For PENDING a limited read suffices unless some of it timed out.
        first = limit if state is State.PENDING else None
        pending = await store.search(
            state=State.PENDING, kind=sweep_kind, prefix=prefix, limit=first
        )
        kept = [r for r in (effective(p, now) for p in pending) if r.state is state]
        if first is not None and len(pending) == first and len(kept) < len(pending):
            pending = await store.search(
                state=State.PENDING, kind=sweep_kind, prefix=prefix, limit=None
            )
            kept = [r for r in (effective(p, now) for p in pending) if r.state is state]
        found = sorted([*found, *kept], key=lambda r: (r.created_at, r.id))
    return found if limit is None else found[:limit]


# -- a run's tree ---------------------------------------------------------------


def _ancestry(id: str) -> list[str]:
    """``id`` and the ids it extends, nearest first: ``a.1.2``, ``a.1``, ``a``."""
    parts = id.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def tree_parent(
    record: PromiseRecord, ids: Container[str], roots: Mapping[str, str] | None = None
) -> str | None:
    """The id among ``ids`` that ``record`` is shown under, if any.

    That is its ``parent_id``; or, for a parent not stored yet (a step is
    written only when it settles, so a step still running is missing), the
    parent's nearest ancestor by id; or, when that parent's id extends no
    stored id (a step given its own id), the run it belongs to: the record's
    own ``root_id``, or for a remote call (the root of its own tree) the run
    that ``roots`` (see :func:`unstored_roots`) says its caller belongs to.
    """
    parent = record.parent_id
    if parent is None:
        return None
    found = next((a for a in _ancestry(parent) if a in ids and a != record.id), None)
    if found is not None:
        return found
    if record.root_id != record.id:
        return record.root_id if record.root_id in ids else None
    if roots is not None:
        return next((roots[a] for a in _ancestry(parent) if roots.get(a) in ids), None)
    return None


def unstored_roots(records: Iterable[PromiseRecord]) -> dict[str, str]:
    """The run each parent of ``records`` belongs to, stored or not: what a
    remote call made by an unstored parent is placed under."""
    return {r.parent_id: r.root_id for r in records if r.parent_id and r.root_id != r.id}


async def _top_run(store: Store, record: PromiseRecord) -> str:
    """The id of the topmost run above ``record``, climbing through remote calls.

    A remote call is stored as the root of a tree of its own, with its caller
    as ``parent_id``: from a root, the climb goes on to its parent's tree (to
    the caller's nearest stored ancestor, while the caller runs unstored).
    """
    seen = {record.id}
    while True:
        if record.root_id != record.id:
            up = [record.root_id]
        elif record.parent_id is not None:
            up = _ancestry(record.parent_id)
        else:
            return record.id
        found = await store.get_many(up)
        above = next((found[a] for a in up if a in found), None)
        if above is None and record.root_id == record.id:
            above = await _run_of_unstored(store, up)
        if above is None or above.id in seen:  # a missing row, or a cycle: stop here
            return record.root_id
        seen.add(above.id)
        record = above


async def _run_of_unstored(store: Store, ids: Sequence[str]) -> PromiseRecord | None:
    """The run that one of ``ids`` (unstored calls, nearest first) belongs to,
    found through a stored child of it: a step given its own id that still
    runs is known only by its children."""
    for id in ids:
        for child in await store.search(prefix=f"{id}.", limit=100):
            if child.parent_id == id and child.root_id != child.id:
                return (await store.get_many([child.root_id])).get(child.root_id)
    return None


async def run_tree(store: Store, id: str) -> tuple[str, list[PromiseRecord]]:
    """The topmost run that ``id`` belongs to, and every promise under it.

    That is the run's tree and, recursively, the trees of the remote calls
    (``ctx.rfi``/``ctx.rfc``) made anywhere in it: each is stored as a root
    whose ``parent_id`` is its caller, under an id of the caller's choosing.
    The store cannot search by ``parent_id``, so every remote call is read
    once and kept when its caller (see :func:`tree_parent`) is in the tree.
    No rows: no such promise.
    """
    record = (await store.get_many([id])).get(id)
    top = id if record is None else await _top_run(store, record)
    by_id = {r.id: r for r in await store.tree(top)}
    remotes = [
        r
        for r in await store.search(kind=Kind.REMOTE, limit=None)
        if r.parent_id is not None and r.id not in by_id
    ]
    # A caller is the parent, or its nearest *stored* ancestor: look them all up at once.
    wanted = [a for r in remotes if r.parent_id is not None for a in _ancestry(r.parent_id)]
    stored = await store.get_many(wanted)
    while attached := [
        r
        for r in remotes
        if r.id not in by_id
        and tree_parent(r, stored.keys() | by_id.keys(), unstored_roots(by_id.values())) in by_id
    ]:
        for remote in attached:
            for r in [remote, *await store.tree(remote.id)]:
                by_id.setdefault(r.id, r)
    return top, list(by_id.values())


# -- formatting ----------------------------------------------------------------


def iso(ts: float | None, timespec: str = "auto") -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC string (``None`` stays ``None``).

    A time no date can show (past year 9999, or not finite: a timeout of
    ``1e20`` seconds, say) is shown as its number, such as ``"1e+20"``.
    """
    if ts is None:
        return None
    try:
        when = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return repr(ts)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


def table(header: Sequence[str], rows: Sequence[Sequence[str | None]]) -> str:
    """Left-aligned columns two spaces apart; ``None`` cells print as ``-``."""
    cells = [list(header), *([c if c is not None else "-" for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def summary(record: PromiseRecord) -> dict[str, object]:
    """The fields of ``promises list --json``."""
    return {
        "id": record.id,
        "state": record.state.value,
        "kind": record.kind.value,
        "func": record.func,
        "version": record.version,
        "parent_id": record.parent_id,
        "root_id": record.root_id,
        "attempt": record.attempt,
        "created_at": iso(record.created_at),
        "settled_at": iso(record.settled_at),
        "timeout_at": iso(record.timeout_at),
    }


def stored_json(data: bytes | None) -> tuple[object, str | None]:
    """Stored bytes as plain JSON (tags kept, nothing imported), else their repr."""
    if data is None:
        return None, None
    try:
        return json.loads(data), None
    except ValueError:
        return None, repr(data)


def error_text(error: BaseException) -> str:
    """``type: message`` of a decoded error, with the stored type name when rebuilt as-is."""
    if isinstance(error, StoredError):
        return f"{error.type}: {error.message}"
    cls = type(error)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return f"{name}: {error}"


def outcome_text(encoder: JSONEncoder, data: bytes | None, *, error: bool) -> str:
    """A stored param, value or error decoded and pretty-printed for a person.

    What the encoder cannot rebuild (say a dataclass whose module does not
    import here) is shown as its stored JSON; bytes that are no JSON at all as
    their repr.
    """
    if data is None:
        return "-"
    try:
        if error:
            return error_text(encoder.decode_error(data))
        return pprint.pformat(encoder.decode(data), width=88, sort_dicts=False)
    except EncodingError as exc:
        raw, bad = stored_json(data)
        if bad is not None:
            return f"{bad}  (undecodable)"
        why = str(exc)
        if "no type is registered under that name" in why:  # the CLI registers nothing
            why = "a type stored under its registered name (a Command's), unknown here"
        return f"{json.dumps(raw, indent=2)}\n(stored JSON; not rebuilt: {why})"


def is_error(record: PromiseRecord) -> bool:
    """Whether ``record.value`` holds an encoded error (a rejected state)."""
    return record.state.settled and record.state is not State.RESOLVED
