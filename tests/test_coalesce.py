"""Reads asked for in one loop iteration are made in one round (resonate_async._coalesce)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resonate_async._coalesce import Coalescer
from resonate_async.errors import StoreError


class Reads:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.gate = asyncio.Event()
        self.gate.set()
        self.tasks: list[asyncio.Task[Any]] = []

    async def read_many(self, keys: list[str]) -> dict[str, Any]:
        self.calls.append(keys)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: k.upper() for k in keys if k != "gone"} | {"bad": KeyError("bad")}

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task


def coalescer(reads: Reads) -> Coalescer[str]:
    return Coalescer(reads.read_many, lambda key: LookupError(key), reads.spawn)


async def test_keys_asked_for_together_are_read_in_one_call() -> None:
    reads = Reads()
    loader = coalescer(reads)
    futures = [loader.load(k) for k in ("a", "b", "a")]
    assert futures[0] is futures[2]  # one future per key
    assert await asyncio.gather(*futures) == ["A", "B", "A"]
    assert await loader.load("c") == "C"  # a later iteration: a round of its own
    assert reads.calls == [["a", "b"], ["c"]]


async def test_a_missing_key_and_an_error_value_fail_only_their_callers() -> None:
    loader = coalescer(Reads())
    got = await asyncio.gather(
        loader.load("a"), loader.load("gone"), loader.load("bad"), return_exceptions=True
    )
    assert got[0] == "A"
    assert isinstance(got[1], LookupError) and isinstance(got[2], KeyError)


async def test_a_failed_read_fails_every_caller_of_its_round() -> None:
    loader = coalescer(Reads(fail=OSError("down")))
    got = await asyncio.gather(loader.load("a"), loader.load("b"), return_exceptions=True)
    assert [type(g) for g in got] == [OSError, OSError]


async def test_a_cancelled_caller_leaves_the_others_answered() -> None:
    reads = Reads()
    reads.gate.clear()
    loader = coalescer(reads)
    first, second = loader.load("a"), loader.load("b")
    await asyncio.sleep(0)  # the round has started
    first.cancel()
    reads.gate.set()
    assert await second == "B"


async def test_a_cancelled_round_cancels_its_callers() -> None:
    reads = Reads()
    reads.gate.clear()
    loader = coalescer(reads)
    future = loader.load("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    reads.tasks[0].cancel()  # a shutdown
    with pytest.raises(asyncio.CancelledError):
        await future


async def test_one_bad_key_fails_only_its_callers() -> None:
    calls: list[list[str]] = []

    async def read_many(keys: list[str]) -> dict[str, Any]:
        calls.append(keys)
        if "bad" in keys:
            raise ValueError("does not decode")
        return {k: k.upper() for k in keys}

    loader: Coalescer[str] = Coalescer(read_many, LookupError, Reads().spawn)
    got = await asyncio.gather(
        loader.load("a"), loader.load("bad"), loader.load("b"), return_exceptions=True
    )
    assert got[0] == "A" and got[2] == "B" and isinstance(got[1], ValueError)
    assert calls == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]


async def test_a_read_raising_cancelled_error_on_its_own_is_an_error_not_a_cancel() -> None:
    # A cancel would make the runs waiting for their histories settle as
    # cancelled; nobody cancelled them.
    async def read_many(keys: list[str]) -> dict[str, Any]:
        if "b" in keys:
            raise asyncio.CancelledError
        return {k: k.upper() for k in keys}

    loader: Coalescer[str] = Coalescer(read_many, LookupError, Reads().spawn)
    got = await asyncio.gather(
        loader.load("a"), loader.load("b"), loader.load("c"), return_exceptions=True
    )
    assert got[0] == "A" and got[2] == "C"
    assert isinstance(got[1], RuntimeError) and "CancelledError" in str(got[1])


async def test_the_store_going_down_mid_fallback_fails_the_rest_at_once() -> None:
    calls: list[list[str]] = []

    async def read_many(keys: list[str]) -> dict[str, Any]:
        calls.append(keys)
        if len(keys) > 1:
            raise ValueError("one bad row")
        raise StoreError("down")

    loader: Coalescer[str] = Coalescer(read_many, LookupError, Reads().spawn)
    got = await asyncio.gather(*(loader.load(k) for k in "abcdef"), return_exceptions=True)
    assert all(isinstance(g, StoreError) for g in got)
    assert calls == [list("abcdef"), ["a"]]  # not one more read per key


async def test_a_read_that_returns_no_mapping_fails_its_callers() -> None:
    async def read_many(keys: list[str]) -> Any:
        return None

    loader: Coalescer[str] = Coalescer(read_many, LookupError, Reads().spawn)
    with pytest.raises(TypeError):
        await asyncio.wait_for(loader.load("a"), 5)
