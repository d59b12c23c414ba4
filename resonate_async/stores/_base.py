"""The data model of durable promises and the ``Store`` protocol.

Every run, step, command, sleep and external promise is one
``PromiseRecord``. Stores are async throughout, and their primitive is a
*bulk* write: ``Store.write`` applies many operations in one transaction,
which is what lets the group-commit writer put rows from many runs into one
commit.

The semantics of an operation live here, in ``apply_op``, so that every
backend agrees on them: ``MemoryStore`` calls it directly, the SQL stores use
it to resolve the rare conflicting rows after their fast path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

__all__ = (
    "Create",
    "Kind",
    "Op",
    "PromiseRecord",
    "Settle",
    "State",
    "Store",
    "StoreLifecycle",
    "apply_op",
)


class State(str, enum.Enum):  # noqa: UP042 - str() must stay the member name
    """The state of a durable promise. Values are the names, as strings."""

    PENDING = "PENDING"
    RESOLVED = "RESOLVED"
    REJECTED = "REJECTED"
    REJECTED_CANCELED = "REJECTED_CANCELED"
    REJECTED_TIMEDOUT = "REJECTED_TIMEDOUT"

    @property
    def settled(self) -> bool:
        """Whether this state is final (anything but ``PENDING``)."""
        return self is not State.PENDING


class Kind(str, enum.Enum):  # noqa: UP042
    """What a promise stands for."""

    RUN = "run"
    STEP = "step"
    COMMAND = "command"
    SLEEP = "sleep"
    EXTERNAL = "external"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class PromiseRecord:
    """One durable promise, as stored.

    Attributes:
        id: unique id; children are ``f"{parent}.{n}"``.
        state: see ``State``.
        kind: see ``Kind``.
        func: registered function name or command type name
            (``"resonate.sleep"`` for sleeps, ``None`` for external promises).
        version: registered version of ``func``.
        param: encoded arguments (or ``None``).
        value: encoded outcome once settled: a value when resolved, an error
            when rejected (``None`` when there is nothing to say).
        parent_id: the promise that created this one (``None`` for roots).
        root_id: the root run of the tree (its own id for a root).
        timeout_at: seconds since the epoch after which a pending promise reads
            as timed out (for a sleep: its wake time).
        created_at: seconds since the epoch.
        settled_at: seconds since the epoch, once settled.
        attempt: for a step, the attempt that settled it; a batch's command
            keeps 1 (0 if it timed out unhandled): its handler's retries are
            per batch, counted in ``stats()``'s handler calls and failures;
            a run's root keeps the 1 it was created with (its body's
            retries are logged, not counted in its row).
        owner: the worker holding a pending run's lease.
        lease_expires_at: when that lease runs out (seconds since the epoch).
        tags: free-form string labels.
    """

    id: str
    state: State
    kind: Kind
    root_id: str
    created_at: float
    func: str | None = None
    version: int = 1
    param: bytes | None = None
    value: bytes | None = None
    parent_id: str | None = None
    timeout_at: float | None = None
    settled_at: float | None = None
    attempt: int = 0
    owner: str | None = None
    lease_expires_at: float | None = None
    tags: dict[str, str] | None = None


# The fast way to build a record. The frozen dataclass's ``__init__`` sets
# each field through ``object.__setattr__`` by name (1.1 µs a record here),
# and calling each slot's descriptor is not much better (0.63 µs); the engine
# builds three records per run. A plain class with the very same slots takes
# ordinary attribute stores (0.13 µs), and an instance of it may then become
# a PromiseRecord by assigning ``__class__``, which CPython allows exactly when
# the two layouts are identical (0.20 µs in all). ``PromiseRecord`` has no
# ``__post_init__`` to skip; the conformance suite compares every field of
# what this builds.
#: The field names of ``PromiseRecord``, in order (the stores' column order).
FIELDS = tuple(f.name for f in fields(PromiseRecord))
_new = object.__new__


class _UnfrozenRecord:
    """``PromiseRecord``'s slots without its frozen ``__setattr__``."""

    __slots__ = FIELDS


def new_record(
    id: str,
    state: State,
    kind: Kind,
    root_id: str,
    created_at: float,
    func: str | None,
    version: int,
    param: bytes | None,
    value: bytes | None,
    parent_id: str | None,
    timeout_at: float | None,
    settled_at: float | None,
    attempt: int,
    owner: str | None,
    lease_expires_at: float | None,
    tags: dict[str, str] | None,
) -> PromiseRecord:
    """``PromiseRecord(...)`` with every field given in order, built faster."""
    r: Any = _UnfrozenRecord()  # Any: its slots are named at run time
    r.id = id
    r.state = state
    r.kind = kind
    r.root_id = root_id
    r.created_at = created_at
    r.func = func
    r.version = version
    r.param = param
    r.value = value
    r.parent_id = parent_id
    r.timeout_at = timeout_at
    r.settled_at = settled_at
    r.attempt = attempt
    r.owner = owner
    r.lease_expires_at = lease_expires_at
    r.tags = tags
    r.__class__ = PromiseRecord
    return r  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Create:
    """Insert ``record`` unless a promise with its id exists (then: no change).

    Attributes:
        record: the promise to insert; the write's result for this op is
            ``record`` itself when inserted, else the stored record.
    """

    record: PromiseRecord


@dataclass(frozen=True, slots=True)
class Settle:
    """Move a PENDING promise to a settled ``state``; a settled one is unchanged.

    Attributes:
        id: the promise to settle.
        state: its settled state.
        value: its encoded outcome.
        settled_at: seconds since the epoch.
        prior: optionally, the caller's own copy of the row while it was
            PENDING (e.g. the root record a run created or claimed). It is a
            hint that changes no result: when the store sees that this settle
            applied (the row was pending), it builds the result from
            ``prior`` instead of reading the row back. So ``prior`` must be
            the stored row in every field but ``owner`` and
            ``lease_expires_at`` (which settling clears); one of another id is
            ignored. It takes no part in equality or ``repr``.
    """

    id: str
    state: State
    value: bytes | None
    settled_at: float
    prior: PromiseRecord | None = field(default=None, compare=False, repr=False)


Op = Create | Settle


def apply_op(existing: PromiseRecord | None, op: Op) -> PromiseRecord | None:
    """Return the record stored after applying ``op`` to ``existing``.

    This is the one definition of what a write means:

    * ``Create``: inserts when there is no row; otherwise the row is unchanged
      and the *existing* record is the result (the caller compares it with what
      it tried to create to detect a conflict or an earlier outcome).
    * ``Settle``: a PENDING row takes the new state, value and settled time; a
      settled row is unchanged (a duplicate settle never overwrites the first);
      a missing row stays missing and the result is ``None``.

    When the result is the operation's own record (a create that inserted), it
    is returned as the very same object, so callers can test ``is``.
    """
    if isinstance(op, Create):
        return op.record if existing is None else existing
    if existing is None or existing.state is not State.PENDING:
        return existing
    return replace(
        existing,
        state=op.state,
        value=op.value,
        settled_at=op.settled_at,
        owner=None,
        lease_expires_at=None,
    )


class StoreLifecycle:
    """``async with store:`` opens the store and closes it, for every backend."""

    __slots__ = ()

    async def open(self) -> None:  # pragma: no cover - every store defines it
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - every store defines it
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@runtime_checkable
class Store(Protocol):
    """What a promise store must do. Async throughout; writes are bulk.

    A store is opened once, used by one process, and closed once. Every
    implementation must pass the conformance suite in
    ``resonate_async.testing.StoreConformance``.

    An optional method, ``trees(root_ids) -> dict[str, list[PromiseRecord]]``
    (``tree`` of each id, in one round trip), lets runs resumed together
    read their histories at once; without it the engine calls ``tree``
    for each.

    Two optional attributes tell the engine more: ``single_host = True``
    when only processes of this host can share the store (a dead pid then
    frees its leases at once), and ``pipeline_depth = 2`` when the store
    applies concurrent ``write`` calls one at a time *in the order they
    were called* (and a failed write leaves later ones unaffected): the
    group-commit writer then calls ``write`` for the next transaction before
    the last one has returned.
    """

    async def open(self) -> None:
        """Connect and create or migrate the schema. Idempotent."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        """Apply ``ops`` in order in **one transaction** and commit.

        Returns, for each op, the record as stored after the op (see
        ``apply_op``); an op sees the effect of the ops before it in the
        same call. Either every op is durable when this returns, or it raises
        and none is.
        """

    async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
        """The stored records among ``ids`` (missing ids are absent)."""

    async def tree(self, root_id: str) -> list[PromiseRecord]:
        """Every record whose ``root_id`` is ``root_id`` (the root included)."""

    async def search(
        self,
        *,
        state: State | None = None,
        kind: Kind | None = None,
        prefix: str | None = None,
        limit: int | None = 100,
    ) -> list[PromiseRecord]:
        """Records matching all given filters, ordered by ``created_at`` then id."""

    async def claim(
        self,
        owner: str,
        *,
        now: float,
        lease_until: float,
        funcs: Sequence[tuple[str, int]] | None = None,
        kinds: Sequence[Kind] = (Kind.RUN,),
        limit: int = 1000,
    ) -> list[PromiseRecord]:
        """Take the leases of PENDING promises of ``kinds`` that are free.

        Free means: no owner, or an expired lease (``lease_expires_at <= now``).
        Promises whose live lease ``owner`` already holds are not returned
        (they run already); a restarted worker frees its previous leases with
        ``release`` first.
        Only promises whose ``(func, version)`` is in ``funcs`` are claimed
        when ``funcs`` is given. Sets ``owner`` and ``lease_expires_at`` and
        returns the claimed records, atomically, so two workers never claim
        the same promise.
        """

    async def renew(self, owner: str, *, lease_until: float) -> int:
        """Extend every PENDING lease held by ``owner``; return how many."""

    async def release(self, owner: str, ids: Sequence[str]) -> None:
        """Give up ``owner``'s leases on ``ids`` (they become free at once)."""


(_set_create_record,) = (getattr(Create, f.name).__set__ for f in fields(Create))


class _UnfrozenSettle:
    """``Settle``'s slots without its frozen ``__setattr__`` (see ``new_record``)."""

    __slots__ = tuple(f.name for f in fields(Settle))


def new_create(record: PromiseRecord) -> Create:
    """``Create(record)``, built faster (see ``new_record``)."""
    op = _new(Create)
    _set_create_record(op, record)
    return op


def new_settle(
    id: str, state: State, value: bytes | None, settled_at: float, prior: PromiseRecord | None
) -> Settle:
    """``Settle(id, state, value, settled_at, prior)``, built faster (see ``new_record``)."""
    op: Any = _UnfrozenSettle()
    op.id = id
    op.state = state
    op.value = value
    op.settled_at = settled_at
    op.prior = prior
    op.__class__ = Settle
    return op  # type: ignore[no-any-return]
