"""Static types of the public API, checked by ``make types`` (mypy --strict).

At run time ``assert_type`` returns its argument; under mypy each line fails
unless the expression has exactly that type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, assert_type

from resonate_async import Command, Context, Handle, MemoryStore, Promise, Resonate

if TYPE_CHECKING:
    from collections.abc import Generator


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


def sync_and_generator_calls_give_their_values(ctx: Context, resonate: Resonate) -> None:
    """Never called: a plain ``def`` or a generator's result is typed too, not ``Any``."""
    assert_type(ctx.lfc(step_in_thread, 1), Promise[int])
    assert_type(ctx.lfc(generator_step, 1), Promise[str])
    assert_type(resonate.run("s", step_in_thread, 1), Handle[int])
    assert_type(resonate.run("g", generator_step, 1), Handle[str])


def generator_step(ctx: Context, x: int) -> Generator[Any, Any, str]:
    value = yield ctx.lfc(double, x)
    return str(value)


async def wrong_results_do_not_type_check(ctx: Context, resonate: Resonate) -> str:
    """Never called: an expected type no longer falls through to ``Any``."""
    wrong: str = await ctx.lfc(double, 1)  # type: ignore[call-overload]
    handle: Handle[str] = resonate.run("x", double, 1)  # type: ignore[call-overload]
    del wrong, handle
    return await ctx.lfc(double, 1)  # type: ignore[call-overload,no-any-return]


def no_context(x: int) -> int:
    return x


def wrong_registrations_do_not_type_check(resonate: Resonate) -> None:
    """Never called: a function needs a Context first, a handler a list of its commands."""
    resonate.register(no_context)  # type: ignore[type-var]
    resonate.register_command_handler(Greet, double)  # type: ignore[arg-type]
    resonate.register_command_handler(int, lambda ctx, batch: batch)  # type: ignore[type-var]
    resonate.register_command_handler(Greet, lambda ctx, batch: [g.name for g in batch])


def typos_in_imports_do_not_type_check() -> None:
    """Never called: no module-level ``__getattr__`` hides a misspelt name."""
    from resonate_async import Resonat  # type: ignore[attr-defined]
    from resonate_async.stores import SqliteStore  # type: ignore[attr-defined]
    from resonate_async.testing import VirtualClok  # type: ignore[attr-defined]

    del Resonat, SqliteStore, VirtualClok


def a_path_names_a_store() -> None:
    """Never called: a ``pathlib.Path`` is a store spec, as at run time."""
    from pathlib import Path

    Resonate(Path("app.db")).use_store(Path("other.db"))
