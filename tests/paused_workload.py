"""A worker process for the paused-worker test: a five-step run on a SQLite store.

usage: paused_workload.py STORE EFFECTS_LOG starter|server

``starter`` runs ``p-1`` and prints ``result=<value>``; ``server`` prints
``ready`` once started and serves (claims what is free) until SIGTERM. Each
step appends ``<step id> <role>`` to EFFECTS_LOG when it ends (its effect).
Leases are short (2 s) so that a SIGSTOP of a few seconds outlives one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from resonate_async import Context, Resonate

store, effects, role = sys.argv[1], sys.argv[2], sys.argv[3]
resonate = Resonate(store, lease_seconds=2, heartbeat_seconds=0.5, poll_seconds=0.2)
log = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def step(ctx: Context, n: int) -> int:
    await asyncio.sleep(0.4)
    os.write(log, f"{ctx.id} {role}\n".encode())  # one append: lines never mix
    return n


@resonate.register(name="five")
async def five(ctx: Context) -> int:
    return sum([await ctx.lfc(step, n) for n in range(1, 6)])


async def main() -> None:
    async with resonate:
        if role == "starter":
            print(f"result={await resonate.run('p-1', five)}", flush=True)
            return
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()


asyncio.run(main())
