"""Durable workflows behind an async web server: answer 202 once the run is durable.

    python examples/web.py --port 8080 --store signups.db   # serve until Ctrl-C or SIGTERM
    curl -X POST localhost:8080/signups/7     # 202 Accepted, the run is stored
    curl localhost:8080/signups/7             # {"state": "RESOLVED", "value": ...}
    python examples/web.py --selftest 300     # start, send 300 signups, check, stop

Without ``--store`` the promise store is a temporary file, deleted at exit:
enough to try the endpoints, not to see a run survive a restart.

``POST /signups/<user>`` starts the run ``signup-<user>`` and answers as soon
as its root promise is committed (``await handle.created()``): from then on a
crash loses nothing, and the next start of any worker on the same store
finishes it. Posting the same user twice is one run (runs are idempotent by
id). Each signup inserts its user through a batched command, so concurrent
requests share handler calls and commits. ``GET /signups/<user>`` reads the
run's state from the store, and its value once settled.

The server is a few lines of ``asyncio.start_server`` so that the example
needs nothing beyond the SDK; with Starlette or FastAPI, enter
``async with resonate:`` in the app's lifespan and do the same in handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import aiosqlite

from resonate_async import Command, Context, Resonate, ShutdownError, State

resonate = Resonate(":memory:")  # main() points it at a SQLite file


@dataclass
class InsertUser(Command[None]):
    id: int


async def insert_users(ctx: Context, users: list[InsertUser]) -> None:
    db: aiosqlite.Connection = ctx.get_dependency("db")
    await db.executemany("INSERT OR IGNORE INTO users (id) VALUES (?)", [(u.id,) for u in users])
    await db.commit()


resonate.register_command_handler(InsertUser, insert_users)


@resonate.register
async def signup(ctx: Context, user: int) -> dict[str, Any]:
    await ctx.lfc(InsertUser(user))  # batched with the other requests' inserts
    return {"user": user, "welcome": f"hello, user {user}"}


# -- HTTP ----------------------------------------------------------------------


async def route(method: str, path: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body for one request."""
    parts = path.strip("/").split("/")
    if len(parts) != 2 or parts[0] != "signups" or not parts[1].isdigit():
        return 404, {"error": "try /signups/<user id>"}
    run_id = f"signup-{parts[1]}"
    if method == "POST":
        handle = resonate.run(run_id, signup, int(parts[1]))
        await handle.created()  # durable: safe to answer
        return 202, {"id": run_id, "location": path}
    if method == "GET":
        record = await resonate.promises.get(run_id)
        if record is None:
            return 404, {"error": f"no signup {run_id!r}"}
        if record.state is State.PENDING:
            return 200, {"id": run_id, "state": record.state.value}
        try:
            value = await resonate.get(run_id)
        except Exception as exc:  # a failed run: its stored error
            return 200, {"id": run_id, "state": record.state.value, "error": str(exc)}
        return 200, {"id": run_id, "state": record.state.value, "value": value}
    return 405, {"error": f"{method} is not allowed"}


# The open connections, and those whose request is being answered: a stop
# lets the answers finish and drops the connections that sent nothing yet.
serving: set[asyncio.Task[Any]] = set()
answering: set[asyncio.Task[Any]] = set()


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 request per connection (``Connection: close``)."""
    task = asyncio.current_task()
    assert task is not None
    serving.add(task)
    try:
        await answer(reader, writer)
    except asyncio.CancelledError:
        pass  # stopping: the connection is dropped (a cancelled handler is logged on 3.11)
    except ConnectionError:
        pass  # the client left
    finally:
        serving.discard(task)
        answering.discard(task)
        writer.close()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        status, body = 400, {"error": "bad request"}
    else:
        task = asyncio.current_task()
        assert task is not None
        answering.add(task)
        try:
            status, body = await route(method, path)
        except (ShutdownError, RuntimeError):  # the server is shutting down: try again later
            status, body = 503, {"error": "shutting down; retry"}
        except Exception as exc:  # a store error, say: this request fails, not the server
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
    data = json.dumps(body).encode()
    reason = {
        200: "OK",
        202: "Accepted",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        500: "Internal Server Error",
        503: "Service Unavailable",
    }[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()


async def request(port: int, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """A tiny HTTP client for the self-test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def selftest(port: int, users: int) -> None:
    started = time.perf_counter()
    posted = await asyncio.gather(*(request(port, "POST", f"/signups/{u}") for u in range(users)))
    accepted = time.perf_counter() - started
    assert all(status == 202 for status, _ in posted), posted[:3]
    again, _ = await request(port, "POST", "/signups/0")  # the same run, not a second one
    assert again == 202
    pending = list(range(users))
    while pending:
        answers = await asyncio.gather(*(request(port, "GET", f"/signups/{u}") for u in pending))
        still = []
        for u, (status, body) in zip(pending, answers, strict=True):
            assert status == 200, body
            if body["state"] == "PENDING":
                still.append(u)
                continue
            assert body == {
                "id": f"signup-{u}",
                "state": "RESOLVED",
                "value": {"user": u, "welcome": f"hello, user {u}"},
            }, body
        pending = still
    done = time.perf_counter() - started
    missing, _ = await request(port, "GET", f"/signups/{users + 1}")
    assert missing == 404
    stats = resonate.stats()
    print(f"{users} signups accepted (202, durable) in {accepted:.2f}s, all done in {done:.2f}s")
    print(
        f"{stats.batchers['InsertUser'].batches} handler calls, "
        f"{stats.store.transactions} store transactions"
    )


async def main(port: int, store: str, users: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resonate.use_store(store or os.path.join(tmp, "resonate.db"))
        async with aiosqlite.connect(os.path.join(tmp, "users.db")) as db:
            await db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY)")
            await db.commit()
            resonate.set_dependency("db", db)  # before start: recovered runs need it
            async with resonate:
                server = await asyncio.start_server(serve_one, "127.0.0.1", port, backlog=1024)
                async with server:
                    bound = server.sockets[0].getsockname()[1]
                    if users is not None:
                        await selftest(bound, users)
                        return
                    print(f"serving on http://127.0.0.1:{bound} (Ctrl-C to stop)")
                    stop = asyncio.Event()
                    loop = asyncio.get_running_loop()
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, stop.set)
                    await stop.wait()
                    # Stop accepting; let the requests in flight get their
                    # answers (a 202 is only sent once its run is durable).
                    server.close()
                    if serving:  # a moment for requests already sent to be read
                        await asyncio.wait(serving, timeout=0.5)
                    if answering:
                        await asyncio.wait(answering, timeout=5)
                    for task in list(serving):
                        task.cancel()
                    await asyncio.gather(*serving, return_exceptions=True)
            # Leaving `async with resonate` lets in-flight batches finish and
            # leaves unfinished runs PENDING for the next start.


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--store", default="", help="promise store (default: a temporary file)")
    parser.add_argument("--selftest", type=int, metavar="USERS", help="send USERS signups, exit")
    args = parser.parse_args()
    asyncio.run(main(0 if args.selftest is not None else args.port, args.store, args.selftest))
