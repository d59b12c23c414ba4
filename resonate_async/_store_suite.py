"""The store conformance suite: what every ``Store`` must do.

Subclass ``StoreConformance`` in a test module and provide a ``store``
fixture that yields an opened, *empty* store for each test (the tests count
what they find) and closes it afterwards; pytest then runs every test below
against it::

    import pytest_asyncio
    from resonate_async.testing import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest_asyncio.fixture
        async def store(self):
            async with MyStore(...) as store:
                yield store

Two optional fixtures widen the suite:

* ``peer_store``: a second opened store on the *same* data (another
  connection, another worker). Defaults to ``store`` itself; override it to
  test that concurrent claimers never take the same promise.
* ``reopen``: an async callable returning a freshly opened store on the same
  data, for the persistence test; the fixture closes the stores it opened.
  Defaults to skipping that test (no durability).

The expected result of every write is computed with ``apply_op``, the one
definition of what a write means.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from .errors import StoreError
from .stores._base import Create, Kind, PromiseRecord, Settle, State, apply_op

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .stores._base import Op, Store

__all__ = ("StoreConformance", "expected_results", "record")


def record(id: str, **fields: Any) -> PromiseRecord:
    """A pending run record named ``id``, with ``fields`` overriding the defaults."""
    defaults: dict[str, Any] = {
        "state": State.PENDING,
        "kind": Kind.RUN,
        "root_id": id,
        "created_at": 1_700_000_000.0,
    }
    return PromiseRecord(id=id, **{**defaults, **fields})


def expected_results(
    before: dict[str, PromiseRecord], ops: Sequence[Op]
) -> tuple[list[PromiseRecord | None], dict[str, PromiseRecord]]:
    """What ``write(ops)`` must return, and the rows after it, per ``apply_op``."""
    rows = dict(before)
    results: list[PromiseRecord | None] = []
    for op in ops:
        key = op.record.id if isinstance(op, Create) else op.id
        after = apply_op(rows.get(key), op)
        results.append(after)
        if after is not None:
            rows[key] = after
    return results, rows


def _full(id: str) -> PromiseRecord:
    """A record with every field set to a non-default value."""
    return PromiseRecord(
        id=id,
        state=State.REJECTED_TIMEDOUT,
        kind=Kind.COMMAND,
        root_id="root-\u00e9",
        created_at=1_700_000_000.123456,
        func="module.InsertUser",
        version=7,
        param=b"\x00\xff binary \x80",
        value=b'{"error": "x"}',
        parent_id="root-\u00e9.3",
        timeout_at=1_700_000_060.5,
        settled_at=1_700_000_001.25,
        attempt=3,
        owner="host:123:abc",
        lease_expires_at=1_700_000_015.75,
        tags={"resonate:invoke": "poll", "\u00fc": "\u2603", "": ""},
    )


class StoreConformance:
    """Tests every ``Store`` must pass: subclass it in a test module.

    The subclass provides a ``store`` fixture yielding an opened, empty store
    for each test (closed afterwards). Optional fixtures: ``peer_store``, a
    second store on the same data (default: ``store`` itself), and
    ``reopen``, an async callable returning a freshly opened store on the
    same data (default: the persistence test is skipped). The tests need
    pytest-asyncio. See "Testing a store of your own" in the testing guide.

    Example:
        ```python
        class TestMyStore(StoreConformance):
            @pytest_asyncio.fixture
            async def store(self):
                async with MyStore(...) as store:
                    yield store
        ```
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    @pytest.fixture
    def peer_store(self, store: Store) -> Store:
        """Another store on the same data; by default the same store."""
        return store

    @pytest.fixture
    def reopen(self) -> Callable[[], Awaitable[Store]]:
        """Reopen the store's data after a close; by default: not durable, skip."""
        pytest.skip("this store is not durable: no reopen fixture")

    # -- create and read -------------------------------------------------------

    async def test_create_round_trips_every_field(self, store: Store) -> None:
        full, bare = _full("full"), record("bare")
        empty = record("empty", param=b"", value=b"", tags={}, func="")
        results = await store.write([Create(full), Create(bare), Create(empty)])
        assert results[0] is full and results[1] is bare and results[2] is empty
        got = await store.get_many(["full", "bare", "empty"])
        assert got == {"full": full, "bare": bare, "empty": empty}
        assert got["full"].state is State.REJECTED_TIMEDOUT
        assert got["full"].kind is Kind.COMMAND
        assert got["bare"].tags is None and got["empty"].tags == {}
        assert got["bare"].param is None and got["empty"].param == b""

    async def test_zeros_and_empties_are_not_null(self, store: Store) -> None:
        # Values next to nothing must come back as they went in, not as None.
        zeros = [
            record(
                "zero-text",
                func="0",
                param=b"0",
                value=b"",
                parent_id="0",
                timeout_at=0.0,
                settled_at=0.0,
                owner="0",
                lease_expires_at=0.0,
                tags={"0": "0"},
                created_at=0.0,
            ),
            record("zero-empty", func="", param=b"", parent_id="", owner="", tags={"": ""}),
            record("zero-int", timeout_at=0, lease_expires_at=0, owner="w"),
        ]
        await store.write([Create(r) for r in zeros])
        got = await store.get_many([r.id for r in zeros])
        assert got == {r.id: r for r in zeros}
        results = await store.write(
            [
                Settle("zero-text", State.RESOLVED, b"0", 0.0),
                Settle("zero-empty", State.REJECTED, b"", 0.0, prior=zeros[1]),
                Settle("zero-int", State.RESOLVED, None, 0.0, prior=zeros[2]),
            ]
        )
        settled = await store.get_many([r.id for r in zeros])
        assert results == [settled["zero-text"], settled["zero-empty"], settled["zero-int"]]
        assert settled["zero-text"].value == b"0" and settled["zero-empty"].value == b""
        assert settled["zero-int"].value is None and settled["zero-int"].settled_at == 0.0
        assert settled["zero-int"].timeout_at == 0

    async def test_duplicate_create_returns_the_existing_record(self, store: Store) -> None:
        first = record("dup", func="f", param=b"1")
        await store.write([Create(first)])
        second = record("dup", func="g", param=b"2", created_at=5.0)
        [result] = await store.write([Create(second)])
        assert result == first and result is not second
        assert (await store.get_many(["dup"]))["dup"] == first

    async def test_identical_duplicate_create_is_not_reported_as_inserted(
        self, store: Store
    ) -> None:
        await store.write([Create(record("same"))])
        again = record("same")
        [result] = await store.write([Create(again)])
        assert result == again and result is not again

    # -- settle ------------------------------------------------------------------

    async def test_settle_of_pending_sets_outcome_and_clears_lease(self, store: Store) -> None:
        pending = record("s", owner="w", lease_expires_at=99.0, attempt=2)
        await store.write([Create(pending)])
        [result] = await store.write([Settle("s", State.RESOLVED, b"42", 10.0)])
        want = PromiseRecord(
            **{
                **{f: getattr(pending, f) for f in PromiseRecord.__dataclass_fields__},
                "state": State.RESOLVED,
                "value": b"42",
                "settled_at": 10.0,
                "owner": None,
                "lease_expires_at": None,
            }
        )
        assert result == want
        assert (await store.get_many(["s"]))["s"] == want

    async def test_second_settle_is_a_noop_returning_the_first_outcome(self, store: Store) -> None:
        await store.write([Create(record("twice"))])
        [first] = await store.write([Settle("twice", State.REJECTED, b"err", 1.0)])
        [second] = await store.write([Settle("twice", State.RESOLVED, b"ok", 2.0)])
        assert second == first
        assert first is not None and first.state is State.REJECTED and first.value == b"err"
        assert (await store.get_many(["twice"]))["twice"] == first

    async def test_settle_of_unknown_id_returns_none(self, store: Store) -> None:
        assert await store.write([Settle("nobody", State.RESOLVED, None, 1.0)]) == [None]
        assert await store.get_many(["nobody"]) == {}

    async def test_settle_with_prior_returns_what_is_stored(self, store: Store) -> None:
        # ``prior`` is the caller's copy of the pending row: the result built
        # from it must be exactly the row a read then finds, every field.
        full = replace(_full("prior-full"), state=State.PENDING, value=None, settled_at=None)
        bare = record("prior-bare", func="f", param=b"[1]", attempt=1, owner="w")
        other, new = record("prior-other"), record("prior-new")
        await store.write([Create(full), Create(bare), Create(other)])
        # Since created, its lease was released: settling clears it anyway.
        await store.release("w", ["prior-bare"])
        ops: list[Op] = [
            Settle("prior-full", State.REJECTED, b"\x00err", 5.5, prior=full),
            Create(new),
            Settle("prior-bare", State.RESOLVED, b"1", 6.0, prior=bare),
            # Without prior, and in the same write: read back as before.
            Settle("prior-other", State.RESOLVED, None, 7.0),
            Settle("prior-new", State.RESOLVED, b"2", 8.0, prior=record("prior-new")),
        ]
        results = await store.write(ops)
        stored = await store.get_many(["prior-full", "prior-bare", "prior-other", "prior-new"])
        assert results == [
            stored["prior-full"],
            new,
            stored["prior-bare"],
            stored["prior-other"],
            stored["prior-new"],
        ]
        want, _ = expected_results({r.id: r for r in (full, bare, other)}, ops)
        assert want[0] == results[0] and want[4] == results[4]
        assert results[0] is not None and results[0].tags == full.tags
        assert results[2] is not None and results[2].owner is None
        assert results[2].lease_expires_at is None and results[2].attempt == 1

    async def test_settle_with_prior_of_a_settled_row_returns_the_first_outcome(
        self, store: Store
    ) -> None:
        pending = record("prior-twice")
        await store.write([Create(pending)])
        [first] = await store.write([Settle("prior-twice", State.REJECTED, b"err", 1.0)])
        [second] = await store.write(
            [Settle("prior-twice", State.RESOLVED, b"ok", 2.0, prior=pending)]
        )
        assert second == first == (await store.get_many(["prior-twice"]))["prior-twice"]
        assert second is not None and second.state is State.REJECTED and second.value == b"err"
        # The same within one write, after a settle without prior.
        again = record("prior-twice-2")
        await store.write([Create(again)])
        results = await store.write(
            [
                Settle("prior-twice-2", State.REJECTED, b"first", 1.0),
                Settle("prior-twice-2", State.RESOLVED, b"late", 2.0, prior=again),
            ]
        )
        assert results[0] == results[1]
        assert results[1] is not None and results[1].value == b"first"

    async def test_settle_with_prior_of_a_missing_row_returns_none(self, store: Store) -> None:
        ghost, real = record("prior-ghost"), record("prior-real")
        results = await store.write(
            [Settle("prior-ghost", State.RESOLVED, b"1", 1.0, prior=ghost), Create(real)]
        )
        assert results == [None, real] and results[1] is real
        assert await store.get_many(["prior-ghost"]) == {}

    async def test_settle_with_prior_of_another_id_is_read_instead(self, store: Store) -> None:
        await store.write([Create(record("prior-mine")), Create(record("prior-wrong", func="g"))])
        [result] = await store.write(
            [Settle("prior-mine", State.RESOLVED, b"1", 1.0, prior=record("prior-wrong"))]
        )
        assert result is not None and result.id == "prior-mine"
        assert result == (await store.get_many(["prior-mine"]))["prior-mine"]

    async def test_empty_write(self, store: Store) -> None:
        assert await store.write([]) == []

    # -- one write, many ops -------------------------------------------------------

    async def test_ops_apply_in_order_within_one_write(self, store: Store) -> None:
        x, y1, y2, z = record("x"), record("y", func="a"), record("y", func="b"), record("z")
        ops: list[Op] = [
            Create(x),
            Settle("x", State.RESOLVED, b"1", 2.0),
            Create(y1),
            Create(y2),
            Settle("z", State.RESOLVED, None, 3.0),
            Create(z),
            Settle("x", State.REJECTED, b"late", 4.0),
        ]
        results = await store.write(ops)
        want, rows = expected_results({}, ops)
        assert results == want
        assert results[0] is x and results[2] is y1 and results[3] is y1 and results[5] is z
        assert results[4] is None
        assert await store.get_many(["x", "y", "z"]) == rows

    @pytest.mark.parametrize(
        "shape",
        [
            "create settle",
            "create create",
            "create settle settle",
            "pending: create",
            "pending: settle create",
            "pending: settle settle",
            "settle create",
            "settle create settle",
        ],
    )
    async def test_each_shape_of_one_write_matches_apply_op(self, store: Store, shape: str) -> None:
        # "pending:" means the promise exists before the write.
        key = "shape-" + shape.replace(" ", "-").replace(":", "")
        before: dict[str, PromiseRecord] = {}
        if shape.startswith("pending:"):
            await store.write([Create(record(key))])
            before = await store.get_many([key])
        ops: list[Op] = []
        for n, word in enumerate(shape.removeprefix("pending:").split()):
            if word == "create":
                ops.append(Create(record(key, func=f"v{n}")))
            else:
                ops.append(Settle(key, State.RESOLVED, f"{n}".encode(), float(n)))
        want, rows = expected_results(before, ops)
        results = await store.write(ops)
        assert results == want
        for op, got, exp in zip(ops, results, want, strict=True):
            if isinstance(op, Create):
                assert (got is op.record) == (exp is op.record)
        assert await store.get_many([key]) == rows

    async def test_random_batches_match_apply_op(self, store: Store) -> None:
        rng = random.Random(20240601)
        ids = [f"mix-{i}" for i in range(40)]
        before = {i: record(i, created_at=float(n)) for n, i in enumerate(ids[:20])}
        await store.write([Create(r) for r in before.values()])
        await store.write([Settle(i, State.RESOLVED, b"old", 0.5) for i in ids[:5]])
        rows = await store.get_many(ids)
        for _ in range(3):
            ops: list[Op] = []
            for n in range(300):
                key = rng.choice(ids)
                if rng.random() < 0.5:
                    ops.append(Create(record(key, func=f"f{n}", attempt=n)))
                else:
                    state = rng.choice(list(State)[1:])
                    ops.append(Settle(key, state, rng.choice([None, b"v"]), float(n)))
            want, rows = expected_results(rows, ops)
            results = await store.write(ops)
            assert results == want
            for op, got, exp in zip(ops, results, want, strict=True):
                if isinstance(op, Create):
                    assert (got is op.record) == (exp is op.record)
            assert await store.get_many(ids) == rows

    async def test_a_failed_write_leaves_nothing(self, store: Store) -> None:
        # 2**80 fits no database integer: a durable store must fail the whole
        # transaction, including the valid create before it.
        bad = record("atomic-bad", version=2**80)
        try:
            await store.write([Create(record("atomic-2")), Create(bad)])
        except StoreError:
            assert await store.get_many(["atomic-2", "atomic-bad"]) == {}
        else:
            assert set(await store.get_many(["atomic-2", "atomic-bad"])) == {
                "atomic-2",
                "atomic-bad",
            }
        # The store keeps serving after a failed transaction.
        [after] = await store.write([Create(record("atomic-after"))])
        assert after is not None and after.id == "atomic-after"

    async def test_large_batches_and_get_many(self, store: Store) -> None:
        many = [record(f"big-{i:05}", created_at=float(i)) for i in range(3000)]
        results = await store.write([Create(r) for r in many])
        assert all(got is r for got, r in zip(results, many, strict=True))
        settled = await store.write([Settle(r.id, State.RESOLVED, b"v", 1.0) for r in many])
        assert all(s is not None and s.state is State.RESOLVED for s in settled)
        asked = [r.id for r in many] + ["big-missing"] + [many[0].id]
        got = await store.get_many(asked)
        assert len(got) == 3000 and set(got) == {r.id for r in many}
        assert got["big-00017"].created_at == 17.0 and got["big-00017"].value == b"v"
        assert await store.get_many([]) == {}

    # -- queries -------------------------------------------------------------------

    async def test_tree(self, store: Store) -> None:
        rows = [
            record("t1", created_at=1.0),
            record("t1.1", kind=Kind.STEP, root_id="t1", parent_id="t1", created_at=2.0),
            record("t1.1.1", kind=Kind.STEP, root_id="t1", parent_id="t1.1", created_at=3.0),
            record("t1.2", kind=Kind.SLEEP, root_id="t1", parent_id="t1", created_at=2.0),
            record("t2", created_at=1.0),
            record("t2.1", kind=Kind.STEP, root_id="t2", parent_id="t2", created_at=2.0),
        ]
        await store.write([Create(r) for r in rows])
        tree = await store.tree("t1")
        assert sorted(tree, key=lambda r: r.id) == rows[:4]
        assert await store.tree("unknown") == []

    async def test_tree_of_ids_that_do_not_extend_the_root(self, store: Store) -> None:
        # Children may have ids of their own (with_options(id=...), external
        # promises); a remote call is the root of its own tree; other runs'
        # ids may share the root's id as a prefix. A tree is exactly the rows
        # whose root_id is the root's, in created_at, id order.
        def row(id: str, root: str, at: float) -> PromiseRecord:
            return record(id, kind=Kind.STEP, root_id=root, created_at=at)

        rows = [
            record("o", created_at=1.0),
            row("o.1", "o", 2.0),
            row("custom-child", "o", 3.0),
            row("o.2", "o.2", 4.0),  # a remote call: the root of its own tree
            row("o.2.1", "o.2", 5.0),
            row("o.3.1", "o", 5.0),
            record("o-2", created_at=1.0),
            record("o/", created_at=1.0),
            record("o.", created_at=1.0),
            row("another", "o-2", 6.0),
            row("\u00e9t\u00e9.1", "o", 2.5),
        ]
        await store.write([Create(r) for r in rows])
        assert [r.id for r in await store.tree("o")] == [
            "o", "o.1", "\u00e9t\u00e9.1", "custom-child", "o.3.1"
        ]  # fmt: skip
        assert [r.id for r in await store.tree("o.2")] == ["o.2", "o.2.1"]
        assert [r.id for r in await store.tree("o-2")] == ["o-2", "another"]
        assert [r.id for r in await store.tree("o.")] == ["o."]
        trees = getattr(store, "trees", None)  # optional: many trees in one round trip
        if trees is not None:
            roots = ["o", "o.2", "o-2", "o.", "unknown", "o"]
            found = await trees(roots)
            assert found == {root: await store.tree(root) for root in roots}

    async def test_search_filters_order_and_limit(self, store: Store) -> None:
        rows = [
            record("se-b", created_at=2.0),
            record("se-a", created_at=2.0),
            record("se-a.1", kind=Kind.STEP, root_id="se-a", created_at=1.0),
            record("se-A", created_at=0.5),
            record("sea", created_at=3.0),
            record("se-%", created_at=4.0),
            record("se_x", created_at=5.0, kind=Kind.EXTERNAL),
            record("z\U0010ffff", created_at=6.0),
            record("z\U0010ffffq", created_at=7.0),
            record("{", created_at=8.0),
        ]
        await store.write([Create(r) for r in rows])
        await store.write([Settle("se-b", State.RESOLVED, None, 9.0)])

        async def ids(**filters: Any) -> list[str]:
            return [r.id for r in await store.search(**filters)]

        assert await ids(prefix="se-a") == ["se-a.1", "se-a"]
        assert await ids(prefix="se-") == ["se-A", "se-a.1", "se-a", "se-b", "se-%"]
        assert await ids(prefix="se-%") == ["se-%"]
        assert await ids(prefix="se_") == ["se_x"]
        assert await ids(prefix="z\U0010ffff") == ["z\U0010ffff", "z\U0010ffffq"]
        assert await ids(prefix="se-", state=State.RESOLVED) == ["se-b"]
        assert await ids(prefix="se", kind=Kind.STEP) == ["se-a.1"]
        assert await ids(kind=Kind.EXTERNAL, state=State.PENDING) == ["se_x"]
        assert await ids(prefix="se", limit=2) == ["se-A", "se-a.1"]
        assert await ids(prefix="se", limit=0) == []
        assert len(await ids(limit=None)) == len(rows)
        assert await ids(prefix="nothing") == []
        with pytest.raises(ValueError):
            await store.search(limit=-1)

    async def test_search_limit_defaults_to_100(self, store: Store) -> None:
        await store.write([Create(record(f"many-{i:03}")) for i in range(130)])
        found = await store.search(prefix="many-")
        assert [r.id for r in found] == [f"many-{i:03}" for i in range(100)]

    # -- leases --------------------------------------------------------------------

    async def test_claim_takes_free_and_expired_leases_only(self, store: Store) -> None:
        await store.write(
            [
                Create(record("c-free", created_at=1.0)),
                Create(record("c-expired", owner="other", lease_expires_at=100.0)),
                Create(record("c-mine", owner="me", lease_expires_at=500.0)),
                Create(record("c-held", owner="other", lease_expires_at=100.5)),
                Create(record("c-done", state=State.RESOLVED, settled_at=1.0)),
                Create(record("c-step", kind=Kind.STEP)),
            ]
        )
        claimed = await store.claim("me", now=100.0, lease_until=130.0)
        # A live lease of the claimer itself is not claimed again: a worker
        # frees its previous incarnation's leases explicitly at start.
        assert {r.id for r in claimed} == {"c-free", "c-expired"}
        assert all(r.owner == "me" and r.lease_expires_at == 130.0 for r in claimed)
        stored = await store.get_many(["c-free", "c-held", "c-step"])
        assert stored["c-free"].owner == "me" and stored["c-free"].lease_expires_at == 130.0
        assert stored["c-held"].owner == "other" and stored["c-step"].owner is None
        assert await store.claim("you", now=100.25, lease_until=150.0) == []
        later = await store.claim("you", now=100.5, lease_until=150.0)
        assert [r.id for r in later] == ["c-held"]
        steps = await store.claim("you", now=100.5, lease_until=150.0, kinds=[Kind.STEP])
        assert [r.id for r in steps] == ["c-step"]

    async def test_claim_filters_by_function_and_limit(self, store: Store) -> None:
        await store.write(
            [
                Create(record("f-a1", func="a", version=1, created_at=1.0)),
                Create(record("f-a2", func="a", version=2, created_at=2.0)),
                Create(record("f-b1", func="b", version=1, created_at=3.0)),
                Create(record("f-none", created_at=4.0)),
            ]
        )
        assert await store.claim("w", now=0.0, lease_until=1.0, funcs=[]) == []
        got = await store.claim("w", now=0.0, lease_until=1.0, funcs=[("a", 1), ("b", 1)])
        assert sorted(r.id for r in got) == ["f-a1", "f-b1"]
        limited = await store.claim("v", now=0.0, lease_until=1.0, limit=1)
        assert len(limited) == 1 and limited[0].id in {"f-a2", "f-none"}
        assert await store.claim("v", now=0.0, lease_until=1.0, limit=0) == []

    async def test_renew_and_release(self, store: Store) -> None:
        await store.write([Create(record(f"l-{i}")) for i in range(3)])
        await store.claim("me", now=0.0, lease_until=10.0, funcs=None, limit=2)
        await store.write([Create(record("l-other", owner="other", lease_expires_at=10.0))])
        assert await store.renew("me", lease_until=20.0) == 2
        mine = [r for r in (await store.get_many(["l-0", "l-1", "l-2"])).values() if r.owner]
        assert len(mine) == 2 and all(r.lease_expires_at == 20.0 for r in mine)
        await store.write([Settle(mine[0].id, State.RESOLVED, None, 1.0)])
        assert await store.renew("me", lease_until=30.0) == 1
        await store.release("me", [mine[1].id, "l-other", "l-unknown"])
        after = await store.get_many([mine[1].id, "l-other"])
        assert after[mine[1].id].owner is None and after[mine[1].id].lease_expires_at is None
        assert after["l-other"].owner == "other"
        assert await store.renew("me", lease_until=40.0) == 0
        # A released promise is free at once, long before any lease would expire.
        again = await store.claim("third", now=0.0, lease_until=5.0)
        assert mine[1].id in {r.id for r in again}

    async def test_concurrent_claimers_never_share_a_promise(
        self, store: Store, peer_store: Store
    ) -> None:
        ids = [f"cc-{i:03}" for i in range(120)]
        await store.write([Create(record(i, created_at=float(n))) for n, i in enumerate(ids)])
        a, b = await asyncio.gather(
            store.claim("a", now=0.0, lease_until=60.0, limit=80),
            peer_store.claim("b", now=0.0, lease_until=60.0, limit=80),
        )
        assert not {r.id for r in a} & {r.id for r in b}
        owners = {r.id: r.owner for r in (await store.get_many(ids)).values()}
        assert {i for i, o in owners.items() if o == "a"} == {r.id for r in a}
        assert {i for i, o in owners.items() if o == "b"} == {r.id for r in b}
        assert len(a) + len(b) == len(ids)

    # -- lifecycle -------------------------------------------------------------------

    async def test_data_survives_close_and_reopen(
        self, store: Store, reopen: Callable[[], Awaitable[Store]]
    ) -> None:
        full = _full("keep-full")
        await store.write([Create(full), Create(record("keep-run"))])
        await store.write([Settle("keep-run", State.RESOLVED, b"1", 2.0)])
        await store.claim("me", now=0.0, lease_until=9.0)
        before = await store.get_many(["keep-full", "keep-run"])
        await store.open()  # idempotent
        await store.close()
        await store.close()  # idempotent
        again = await reopen()
        assert await again.get_many(["keep-full", "keep-run"]) == before
        assert [r.id for r in await again.tree("keep-run")] == ["keep-run"]
