"""A state-machine model of the promise store.

The model is a dict updated with :func:`apply_op`; hypothesis drives random
sequences of writes, reads, searches and lease operations through a real
store and checks after every step that the store agrees with the model.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from resonate_async._store_suite import expected_results
from resonate_async.stores import (
    Create,
    Kind,
    MemoryStore,
    PromiseRecord,
    Settle,
    SQLiteStore,
    State,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

    from resonate_async.stores import Store
    from resonate_async.stores._base import Op

IDS = [
    *("a", "a.1", "a.2", "a.1.1", "a.10", "ab", "b", "B", "b.1", "b.2"),
    *("\u00e9", "\u00e9.1", "c", "c.1", "c.2", "d"),
]
ROOTS = ["a", "b", "\u00e9", "c"]
OWNERS = ["w1", "w2"]

ids = st.sampled_from(IDS)
states = st.sampled_from(list(State))
# Creates are mostly of pending promises, as in the engine, so settles meet
# pending rows often.
created_states = st.sampled_from([State.PENDING] * 4 + list(State))
kinds = st.sampled_from(list(Kind))
# Whole quarters: exact in every backend, and often equal, so ordering ties
# fall through to the id.
times = st.integers(0, 12).map(lambda n: n / 4)
blobs = st.none() | st.binary(max_size=4)
records = st.builds(
    PromiseRecord,
    id=ids,
    state=created_states,
    kind=kinds,
    root_id=st.sampled_from(ROOTS),
    created_at=times,
    func=st.none() | st.sampled_from(["f", "g"]),
    version=st.integers(1, 2),
    param=blobs,
    value=blobs,
    parent_id=st.none() | ids,
    timeout_at=st.none() | times,
    settled_at=st.none() | times,
    attempt=st.integers(0, 3),
    owner=st.none() | st.sampled_from(OWNERS),
    lease_expires_at=st.none() | times,
    tags=st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
ops = st.one_of(
    st.builds(Create, records),
    st.builds(Settle, ids, states, blobs, times),
)
funcs = st.none() | st.lists(st.tuples(st.sampled_from(["f", "g"]), st.integers(1, 2)))


def _age(r: PromiseRecord) -> tuple[float, str]:
    return r.created_at, r.id


class StoreMachine(RuleBasedStateMachine):
    """Checks one store against the model; subclasses choose the store."""

    def make_store(self) -> Store:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.model: dict[str, PromiseRecord] = {}
        self.store = self.make_store()
        self.run(self.store.open())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.runner.run(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.runner.close()

    def lease(self, ids: Sequence[str], owner: str | None, until: float | None) -> None:
        for i in ids:
            self.model[i] = replace(self.model[i], owner=owner, lease_expires_at=until)

    @rule(batch=st.lists(ops, max_size=8), data=st.data())
    def write(self, batch: list[Op], data: st.DataObject) -> None:
        self.apply([self.with_prior(op, data) for op in batch])

    def apply(self, batch: list[Op]) -> None:
        want, self.model = expected_results(self.model, batch)
        got = self.run(self.store.write(batch))
        assert got == want
        for op, result, expected in zip(batch, got, want, strict=True):
            if isinstance(op, Create):
                assert (result is op.record) == (expected is op.record)

    @rule(batches=st.lists(st.lists(ops, min_size=1, max_size=6), min_size=2, max_size=4))
    def write_together(self, batches: list[list[Op]]) -> None:
        """Writes called together apply in call order on a store that says so.

        ``pipeline_depth = 2`` lets the writer call ``write`` again before
        the last call returned (SQLite queues them on one thread); each
        result must still be the one of applying the batches one by one.
        """
        if getattr(self.store, "pipeline_depth", 1) < 2:
            for batch in batches:
                self.apply(batch)
            return
        wanted = []
        for batch in batches:
            want, self.model = expected_results(self.model, batch)
            wanted.append(want)

        async def together() -> list[list[PromiseRecord | None]]:
            return list(await asyncio.gather(*(self.store.write(b) for b in batches)))

        assert self.run(together()) == wanted

    def with_prior(self, op: Op, data: st.DataObject) -> Op:
        """``op``, or, if a settle, maybe the same settle carrying a ``prior``.

        A prior is the caller's copy of the row: the stored row as of before
        this write (its lease possibly changed since), or any record of that
        id when there is no row. It must never change a result.
        """
        if not isinstance(op, Settle) or not data.draw(st.booleans(), label="prior"):
            return op
        stored = self.model.get(op.id)
        if stored is None:
            prior = data.draw(records.map(lambda r: replace(r, id=op.id)), label="ghost")
        else:
            owner = data.draw(st.none() | st.sampled_from(OWNERS), label="owner")
            prior = replace(stored, owner=owner, lease_expires_at=data.draw(times))
        return Settle(op.id, op.state, op.value, op.settled_at, prior=prior)

    @rule(data=st.data(), state=states.filter(lambda s: s.settled), value=blobs, at=times)
    def settle_pending_with_prior(
        self, data: st.DataObject, state: State, value: bytes | None, at: float
    ) -> None:
        """The engine's common write: settle pending rows, each with its ``prior``.

        Every update applies, so the store answers from the priors without
        reading (unlike random batches, which mostly miss the fast path).
        """
        pending = sorted(i for i, r in self.model.items() if r.state is State.PENDING)
        if not pending:
            return
        chosen = data.draw(st.lists(st.sampled_from(pending), unique=True), label="ids")
        batch: list[Op] = []
        for i in chosen:
            owner = data.draw(st.none() | st.sampled_from(OWNERS), label="owner")
            prior = replace(self.model[i], owner=owner, lease_expires_at=data.draw(times))
            batch.append(Settle(i, state, value, at, prior=prior))
        self.apply(batch)

    @rule(asked=st.lists(ids, max_size=5))
    def get_many(self, asked: list[str]) -> None:
        want = {i: self.model[i] for i in asked if i in self.model}
        assert self.run(self.store.get_many(asked)) == want

    @rule(root=st.sampled_from(ROOTS))
    def tree(self, root: str) -> None:
        want = sorted((r for r in self.model.values() if r.root_id == root), key=_age)
        assert sorted(self.run(self.store.tree(root)), key=_age) == want

    @rule(
        state=st.none() | states,
        kind=st.none() | kinds,
        prefix=st.none() | st.sampled_from(["a", "a.", "b", "B", "\u00e9", "x", ""]),
        limit=st.none() | st.integers(0, 4),
    )
    def search(
        self, state: State | None, kind: Kind | None, prefix: str | None, limit: int | None
    ) -> None:
        found = sorted(
            (
                r
                for r in self.model.values()
                if (state is None or r.state is state)
                and (kind is None or r.kind is kind)
                and (not prefix or r.id.startswith(prefix))
            ),
            key=_age,
        )
        want = found if limit is None else found[:limit]
        got = self.run(self.store.search(state=state, kind=kind, prefix=prefix, limit=limit))
        assert got == want

    @rule(
        owner=st.sampled_from(OWNERS),
        now=times,
        until=times,
        wanted=funcs,
        claim_kinds=st.lists(kinds, min_size=1, max_size=2, unique=True),
        limit=st.integers(0, 4),
    )
    def claim(
        self,
        owner: str,
        now: float,
        until: float,
        wanted: list[tuple[str, int]] | None,
        claim_kinds: list[Kind],
        limit: int,
    ) -> None:
        free = sorted(
            (
                r
                for r in self.model.values()
                if r.state is State.PENDING
                and r.kind in claim_kinds
                and (wanted is None or (r.func, r.version) in wanted)
                and (
                    r.owner is None
                    or (r.lease_expires_at is not None and r.lease_expires_at <= now)
                )
            ),
            key=_age,
        )[:limit]
        self.lease([r.id for r in free], owner, until)
        got = self.run(
            self.store.claim(
                owner, now=now, lease_until=until, funcs=wanted, kinds=claim_kinds, limit=limit
            )
        )
        assert got == [self.model[r.id] for r in free]

    @rule(owner=st.sampled_from(OWNERS), until=times)
    def renew(self, owner: str, until: float) -> None:
        held = [i for i, r in self.model.items() if r.owner == owner and r.state is State.PENDING]
        self.lease(held, owner, until)
        assert self.run(self.store.renew(owner, lease_until=until)) == len(held)

    @rule(owner=st.sampled_from(OWNERS), asked=st.lists(ids, max_size=4))
    def release(self, owner: str, asked: list[str]) -> None:
        mine = {i for i in asked if i in self.model and self.model[i].owner == owner}
        self.lease(sorted(mine), None, None)
        self.run(self.store.release(owner, asked))

    @invariant()
    def store_matches_model(self) -> None:
        assert self.run(self.store.get_many(IDS)) == self.model


_settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, report_multiple_bugs=False
)


@_settings
class MemoryMachine(StoreMachine):
    def make_store(self) -> Store:
        return MemoryStore()


@_settings
class SQLiteMachine(StoreMachine):
    def make_store(self) -> Store:
        return SQLiteStore(":memory:")


POSTGRES_DSN = os.environ.get("RESONATE_TEST_POSTGRES_DSN", "")


@_settings
class PostgresMachine(StoreMachine):
    """The PostgreSQL store has bulk statements of its own: check them against the model."""

    def make_store(self) -> Store:
        from resonate_async.stores.postgres import PostgresStore

        self.schema = f"resonate_model_{uuid.uuid4().hex[:12]}"
        return PostgresStore(POSTGRES_DSN, schema=self.schema, notify=False, max_connections=2)

    def teardown(self) -> None:
        try:
            self.run(self.drop_schema())
        finally:
            super().teardown()

    async def drop_schema(self) -> None:
        async with self.store._connection() as conn:  # type: ignore[attr-defined]
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


TestMemoryStoreModel = MemoryMachine.TestCase
TestSQLiteStoreModel = SQLiteMachine.TestCase
TestPostgresStoreModel = pytest.mark.postgres(
    pytest.mark.skipif(not POSTGRES_DSN, reason="needs RESONATE_TEST_POSTGRES_DSN")(
        PostgresMachine.TestCase
    )
)
