"""``ChannelListener``: LISTEN on one PostgreSQL channel, over a connection kept open.

:meth:`PostgresStore.listen <resonate_async.stores.postgres.PostgresStore.listen>`
opens one when its first callback arrives and closes it when the last one
leaves. The listener holds a dedicated connection (outside the store's pool)
that LISTENs on the store's channel and passes each payload (the id of a
settled promise) to every callback. When that connection drops, a task the
listener owns opens another, retrying with jittered backoff; notifications
sent meanwhile are lost, which waiters survive because they also poll.

The sending side (``NOTIFY`` inside each settling transaction) and the naming
of the channel stay in :mod:`resonate_async.stores.postgres`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ("ChannelListener",)

logger = logging.getLogger("resonate_async")

# The longest wait between attempts to LISTEN again (seconds); settles are
# still seen meanwhile, by polling.
_MAX_BACKOFF = 10.0


class ChannelListener:
    """Calls every callback with each payload NOTIFYed on ``channel``, until closed.

    Make one with :meth:`open`; it runs a task of its own, which
    :meth:`close` stops.

    Args:
        connect: opens a new asyncpg connection (outside any pool).
        channel: the channel to LISTEN on.
        errors: the driver's errors, which mean the connection failed.
        name: the owner's name, for logs and the task's name.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        errors: tuple[type[BaseException], ...],
        *,
        name: str,
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._errors = errors
        self._name = name
        self._callbacks: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        errors: tuple[type[BaseException], ...],
        *,
        name: str,
    ) -> ChannelListener:
        """A listener already listening on ``channel``.

        Raises:
            Exception: whichever of ``errors`` the first connection raised
                (the connection is closed; no task is left running).
        """
        listener = cls(connect, channel, errors, name=name)
        conn, lost = await listener._listen()
        listener._task = asyncio.create_task(
            listener._keep_listening(conn, lost), name=f"{name} listener"
        )
        return listener

    @property
    def callbacks(self) -> tuple[Callable[[str], None], ...]:
        """The callbacks called for each payload, in the order they were added."""
        return tuple(self._callbacks)

    def add(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` for each notification from now on."""
        self._callbacks.append(callback)

    def remove(self, callback: Callable[[str], None]) -> None:
        """Stop calling ``callback``; one never added is ignored."""
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    async def close(self) -> None:
        """Drop every callback and close the connection. Idempotent."""
        self._callbacks.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():
                task.result()  # re-raise whatever else ended it

    async def _listen(self) -> tuple[Any, asyncio.Event]:
        """A connection listening on the channel, and an event set when it drops."""
        conn = await self._connect()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self._channel, self._dispatch)
        except BaseException:
            await conn.close()
            raise
        return conn, lost

    async def _keep_listening(self, conn: Any, lost: asyncio.Event) -> None:
        """Hold the listening connection, opening a new one whenever it drops, until cancelled."""
        while True:
            try:
                await lost.wait()
            finally:
                # Nothing to do if the server closed it; an error closing
                # a connection that is dropped anyway does not matter.
                with contextlib.suppress(*self._errors):
                    await conn.close()
            logger.warning("%s lost its LISTEN connection; opening another", self._name)
            for attempt in itertools.count():
                try:
                    conn, lost = await self._listen()
                    break
                except self._errors as exc:
                    delay = min(0.1 * 2**attempt, _MAX_BACKOFF)
                    logger.warning(
                        "%s cannot LISTEN (%s); retrying in %.1f s", self._name, exc, delay
                    )
                    # Jitter: workers that lost the server together do not return together.
                    await asyncio.sleep(random.uniform(delay / 2, delay))
            logger.info("%s is listening again", self._name)

    def _dispatch(self, conn: object, pid: int, channel: str, payload: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(payload)
            except Exception:
                # One faulty listener must not starve the others.
                logger.exception("settlement listener %r failed for %r", callback, payload)
