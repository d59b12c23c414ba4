"""A worker process for the SIGKILL test: runs a four-step workflow on a SQLite store.

usage: crash_worker.py STORE EFFECTS_LOG block|finish

``block``: step 4 prints "blocked" and hangs, waiting to be killed.
``finish``: resumes the run and prints its result.
"""

from __future__ import annotations

import asyncio
import sys

from resonate_async import Context, Resonate

store, effects, mode = sys.argv[1], sys.argv[2], sys.argv[3]
resonate = Resonate(store)


def effect(name: str) -> None:
    with open(effects, "a") as f:
        f.write(name + "\n")
        f.flush()


async def step(ctx: Context, name: str) -> str:
    effect(name)
    if name == "s4" and mode == "block":
        print("blocked", flush=True)
        await asyncio.Event().wait()
    return name


@resonate.register(name="four_steps")
async def four_steps(ctx: Context) -> str:
    parts = [await ctx.lfc(step, f"s{i}") for i in range(1, 5)]
    return "+".join(parts)


async def main() -> None:
    async with resonate:
        value = await resonate.run("crash-run", four_steps)
        print(f"result={value}", flush=True)


asyncio.run(main())
