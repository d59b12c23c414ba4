"""Calling user functions: ``async def`` awaited, plain ``def`` in a thread, generators driven."""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._registry import CallStyle

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

    from ._context import Context

__all__ = ("being_cancelled", "invoke")


def being_cancelled() -> bool:
    """Whether the current task has a cancel request pending: a
    ``CancelledError`` caught now is that cancel, not one a user function
    raised (or let out) on its own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def invoke(
    style: CallStyle,
    fn: Callable[..., Any],
    ctx: Context,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Call ``fn(ctx, *args, **kwargs)`` the way its style asks for."""
    if style is CallStyle.ASYNC:
        return await fn(ctx, *args, **kwargs)
    if style is CallStyle.SYNC:
        # A thread cannot be cancelled: on cancellation we stop waiting for it.
        return await anyio.to_thread.run_sync(
            functools.partial(fn, ctx, *args, **kwargs), abandon_on_cancel=True
        )
    return await drive_generator(fn(ctx, *args, **kwargs))


async def drive_generator(gen: Generator[Any, Any, Any]) -> Any:
    """Run a blog-era generator workflow to completion.

    Yielding a ``Promise`` for the first time starts it and sends the promise
    back (``p = yield ctx.lfi(...)``); yielding it again, or yielding any other
    awaitable (``ctx.lfc(...)``, ``ctx.sleep(...)``), sends back its value or
    throws its error into the generator (a cancellation too).
    """
    from ._promise import Promise

    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = gen.send(send) if error is None else gen.throw(error)
        except StopIteration as stop:
            return stop.value
        send, error = None, None
        if isinstance(yielded, Promise) and not yielded._inline and not yielded._yielded:
            yielded._yielded = True
            send = yielded
            continue
        if not inspect.isawaitable(yielded):
            error = TypeError(
                f"a generator workflow yielded {type(yielded).__name__}; yield promises from "
                "ctx.lfi/ctx.lfc/ctx.sleep instead"
            )
            continue
        try:
            send = await yielded
        except BaseException as exc:
            # Cancellation and a replay's restart too, as into a coroutine: a
            # `finally` of the workflow may still yield its cleanup steps.
            error = exc
