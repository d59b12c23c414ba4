"""``MemoryStore``: promises in a dict, for tests and throwaway runs."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ._base import Create, Kind, Op, PromiseRecord, Settle, State, StoreLifecycle, apply_op
from ._sql import check_limit

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("MemoryStore",)


def _age(record: PromiseRecord) -> tuple[float, str]:
    return record.created_at, record.id


class MemoryStore(StoreLifecycle):
    """A promise store held in memory: fast, and gone with the process.

    Operations are ``apply_op`` applied to a dict, so this store is the
    reference the durable stores are checked against. Records are immutable
    and shared, never copied. The data outlives ``close()``: reopening the
    same instance finds it again, as a file would. Using it without
    ``open()`` is allowed.

    Example:
        >>> store = MemoryStore()
        >>> resonate = Resonate(store)  # doctest: +SKIP
    """

    #: Only processes of this host share this store, so a dead pid means a dead worker.
    single_host = True

    def __init__(self) -> None:
        self._rows: dict[str, PromiseRecord] = {}
        # root id -> ids of its tree, so resuming a run does not scan every row.
        self._trees: dict[str, dict[str, None]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._rows)} promises>)"

    async def open(self) -> None:
        """Nothing to connect to. Idempotent."""

    async def close(self) -> None:
        """Nothing to release; the data stays. Idempotent."""

    async def write(self, ops: Sequence[Op]) -> list[PromiseRecord | None]:
        """Apply ``ops`` in order, all or nothing; see ``Store.write``.

        Raises:
            TypeError: an op is neither ``Create`` nor ``Settle`` (nothing is
                applied).
        """
        rows = self._rows
        # Stage the batch and publish it at the end, so a bad op in the middle
        # leaves nothing behind, as a rolled-back transaction would.
        staged: dict[str, PromiseRecord] = {}
        results: list[PromiseRecord | None] = []
        for op in ops:
            if isinstance(op, Create):
                key = op.record.id
            elif isinstance(op, Settle):
                key = op.id
            else:
                raise TypeError(f"Store.write takes Create and Settle ops, got {type(op).__name__}")
            prior = staged[key] if key in staged else rows.get(key)
            after = apply_op(prior, op)
            results.append(after)
            if after is not None and after is not prior:
                staged[key] = after
        for key, record in staged.items():
            if key not in rows:
                self._trees.setdefault(record.root_id, {})[key] = None
            rows[key] = record
        return results

    async def get_many(self, ids: Sequence[str]) -> dict[str, PromiseRecord]:
        """The stored records among ``ids``; see ``Store.get_many``."""
        rows = self._rows
        return {i: rows[i] for i in ids if i in rows}

    async def tree(self, root_id: str) -> list[PromiseRecord]:
        """Every record of the tree of ``root_id``, ordered by ``created_at`` then id."""
        rows = self._rows
        return sorted((rows[i] for i in self._trees.get(root_id, ())), key=_age)

    async def search(
        self,
        *,
        state: State | None = None,
        kind: Kind | None = None,
        prefix: str | None = None,
        limit: int | None = 100,
    ) -> list[PromiseRecord]:
        """Records matching every filter; see ``Store.search``."""
        check_limit(limit)
        found = sorted(
            (
                r
                for r in self._rows.values()
                if (state is None or r.state is state)
                and (kind is None or r.kind is kind)
                and (not prefix or r.id.startswith(prefix))
            ),
            key=_age,
        )
        return found if limit is None else found[:limit]

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
        """Lease free pending promises to ``owner``, oldest first; see ``Store.claim``."""
        check_limit(limit)
        wanted = None if funcs is None else set(funcs)
        free = sorted(
            (
                r
                for r in self._rows.values()
                if r.state is State.PENDING
                and r.kind in kinds
                and (wanted is None or (r.func is not None and (r.func, r.version) in wanted))
                and (
                    r.owner is None
                    or (r.lease_expires_at is not None and r.lease_expires_at <= now)
                )
            ),
            key=_age,
        )[:limit]
        claimed = [_lease(r, owner, lease_until) for r in free]
        self._rows.update((r.id, r) for r in claimed)
        return claimed

    async def renew(self, owner: str, *, lease_until: float) -> int:
        """Extend ``owner``'s pending leases; return how many."""
        held = [r for r in self._rows.values() if r.owner == owner and r.state is State.PENDING]
        self._rows.update((r.id, _lease(r, owner, lease_until)) for r in held)
        return len(held)

    async def release(self, owner: str, ids: Sequence[str]) -> None:
        """Free ``owner``'s leases on ``ids``; others' leases are untouched."""
        rows = self._rows
        for i in ids:
            r = rows.get(i)
            if r is not None and r.owner == owner:
                rows[i] = _lease(r, None, None)


def _lease(r: PromiseRecord, owner: str | None, until: float | None) -> PromiseRecord:
    return replace(r, owner=owner, lease_expires_at=until)
