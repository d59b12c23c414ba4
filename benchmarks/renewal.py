"""How long one lease renewal takes for a worker holding many runs.

    python benchmarks/renewal.py                          # 1,000 / 10,000 / 100,000 runs, SQLite
    python benchmarks/renewal.py --store postgresql://postgres@127.0.0.1/test

A worker's heartbeat renews every lease it holds in one ``UPDATE``; its
duration adds to what the lease must outlast (see docs/deployment.md,
"Choosing lease, heartbeat and poll"). For each size, the script stores that
many PENDING runs, claims them all for one worker, and times ``renew`` (the
median of five). On PostgreSQL it works in a throwaway schema, dropped after.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

import click

from resonate_async.stores import (
    Create,
    Kind,
    PostgresStore,
    PromiseRecord,
    SQLiteStore,
    State,
    Store,
)

_CHUNK = 1000  # rows per write and per claim (a claim's most)


async def renew_seconds(store: Store, runs: int) -> float:
    """The median time of five renewals of ``runs`` leases held by one worker."""
    now = time.time()
    for start in range(0, runs, _CHUNK):
        ids = [f"run-{n}" for n in range(start, min(runs, start + _CHUNK))]
        created = [
            Create(PromiseRecord(id, State.PENDING, Kind.RUN, id, now, func="f")) for id in ids
        ]
        await store.write(created)
    held = 0
    while held < runs:
        claimed = await store.claim("worker", now=now, lease_until=now + 60, limit=_CHUNK)
        if not claimed:
            raise click.ClickException(f"claimed {held} of {runs} runs")
        held += len(claimed)
    times = []
    for i in range(5):
        started = time.perf_counter()
        renewed = await store.renew("worker", lease_until=now + 120 + i)
        times.append(time.perf_counter() - started)
        if renewed != runs:
            raise click.ClickException(f"renewed {renewed} of {runs} leases")
    return statistics.median(times)


async def bench(sizes: list[int], store: str, tmp: str) -> list[tuple[int, float]]:
    results = []
    for runs in sizes:
        if store.startswith(("postgresql://", "postgres://")):
            schema = f"renewal_{os.getpid()}_{runs}"
            pg = PostgresStore(store, schema=schema)
            await pg.open()
            try:
                results.append((runs, await renew_seconds(pg, runs)))
            finally:
                await pg.close()
                import asyncpg  # the [postgres] extra, there when PostgresStore opened

                conn = await asyncpg.connect(store)
                try:
                    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
                finally:
                    await conn.close()
        else:
            sqlite = SQLiteStore(os.path.join(tmp, f"renewal-{runs}.db"))
            await sqlite.open()
            try:
                results.append((runs, await renew_seconds(sqlite, runs)))
            finally:
                await sqlite.close()
    return results


@click.command()
@click.option(
    "--sizes",
    default="1000,10000,100000",
    show_default=True,
    help="Comma-separated numbers of runs held by the worker.",
)
@click.option(
    "--store",
    default="",
    help="A postgresql:// URL (default: a fresh SQLite file per size).",
)
def main(sizes: str, store: str) -> None:
    """Time one lease renewal of a worker holding SIZES runs."""
    try:
        counts = [int(s) for s in sizes.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"not a list of numbers: {sizes!r}", param_hint="--sizes"
        ) from None
    if any(n < 1 for n in counts):
        raise click.BadParameter("sizes must be at least 1", param_hint="--sizes")
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(bench(counts, store, tmp))
    kind = "PostgreSQL" if store else "SQLite"
    for runs, seconds in results:
        print(
            f"{kind}: renewing {runs:,} leases took {seconds * 1e3:.1f} ms "
            f"({seconds / runs * 1e6:.1f} µs a lease)"
        )


if __name__ == "__main__":
    main()
