"""Static types of the public API, checked by ``make types`` (mypy --strict).

At run time ``assert_type`` returns its argument; under mypy each line fails
unless the expression has exactly that type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_type

from resonate_async import Command, Context, Handle, MemoryStore, Promise, Resonate


@dataclass
class Greet(Command[str]):
    name: str


async def double(ctx: Context, x: int) -> int:
    return 2 * x


def typed_promises(ctx: Context, x: int) -> None:
    """Never called: an lfc never awaited does nothing (and warns when collected)."""
    assert_type(ctx.lfc(double, x), Promise[int])
    assert_type(ctx.lfi(double, x), Promise[int])
    assert_type(ctx.rfc(double, x), Promise[int])
    assert_type(ctx.rfi(double, x), Promise[int])
    assert_type(ctx.lfc(Greet("ada")), Promise[str])
    assert_type(ctx.rfc("double", x), Promise[Any])  # by name: nothing to infer from


async def workflow(ctx: Context, x: int) -> int:
    value = await ctx.lfc(double, x)
    assert_type(value, int)
    greeting = await ctx.lfc(Greet("ada"))
    assert_type(greeting, str)
    return value


async def test_awaiting_typed_calls_gives_their_values() -> None:
    resonate = Resonate(MemoryStore())
    resonate.register(workflow)
    resonate.register(double)
    resonate.register_command_handler(Greet, lambda ctx, batch: [f"hi {g.name}" for g in batch])
    async with resonate:
        handle = resonate.run("typed", workflow, 21)
        assert_type(handle, Handle[int])
        assert await handle == 42


def step_in_thread(ctx: Context, x: int) -> int:
    return x


def wrong_arguments_do_not_type_check(resonate: Resonate, ctx: Context) -> None:
    """Never called: mypy --strict (warn_unused_ignores) fails if a line type-checks."""
    resonate.run("x", workflow, "21")  # type: ignore[call-overload]
    resonate.run("x", workflow)  # type: ignore[call-overload]
    resonate.run("x", step_in_thread, 1, 2)  # type: ignore[call-overload]
    ctx.lfc(double, "21")  # type: ignore[call-overload]
    ctx.lfi(double, x=1, y=2)  # type: ignore[call-overload]
    ctx.lfc(step_in_thread, "21")  # type: ignore[call-overload]
    ctx.rfc(double)  # type: ignore[call-overload]
    ctx.rfi(double, 1, 2)  # type: ignore[call-overload]


def typed_postgres_store() -> None:
    """Never called: the lazily loaded ``PostgresStore`` keeps its type under mypy."""
    from resonate_async import PostgresStore

    assert_type(PostgresStore("postgresql://app@db/app", schema="x"), PostgresStore)
