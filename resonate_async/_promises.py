"""``Promises`` (``resonate.promises``): read, search, create and settle durable promises."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, TypeVar

from ._cli_view import search
from ._clock import check_seconds
from ._promise import check_id
from .errors import NotFoundError
from .stores._base import Create, Kind, PromiseRecord, Settle, State

if TYPE_CHECKING:
    from ._engine import Engine
    from ._resonate import Resonate

__all__ = ("Promises",)

E = TypeVar("E", State, Kind)


class Promises:
    """The promise API (``resonate.promises``): read and settle durable promises."""

    def __init__(self, resonate: Resonate) -> None:
        self._resonate = resonate

    def _engine(self) -> Engine:
        return self._resonate._started()

    async def get(self, id: str) -> PromiseRecord | None:
        """The promise ``id`` as a reader sees it (timeouts applied), or ``None``.

        Raises:
            ValueError: ``id`` is not one a store can keep (see ``Resonate.run``).
        """
        check_id(id, "a promise id")
        engine = self._engine()
        await self._after_admission(engine, id)  # a run() just made is found
        record = (await engine.store.get_many([id])).get(id)
        return None if record is None else engine.effective(record)

    async def search(
        self,
        *,
        state: State | str | None = None,
        prefix: str | None = None,
        kind: Kind | str | None = None,
        limit: int | None = 100,
    ) -> list[PromiseRecord]:
        """Promises matching every filter given, oldest first; ``state`` is the
        state a reader sees (a PENDING promise past its timeout reads as timed out).

        Args:
            state: a ``State``, or its name in any case (``"resolved"``).
            prefix: only ids that start with it.
            kind: a ``Kind``, or its name in any case (``"run"``).
            limit: the most records returned (``None``: all).

        Raises:
            ValueError: ``state`` or ``kind`` names no member.
        """
        state = None if state is None else _member(State, state, "state")
        kind = None if kind is None else _member(Kind, kind, "kind")
        engine = self._engine()
        # By the state a reader sees: a PENDING row past its timeout is not
        # PENDING (see DESIGN §2), whatever the store's column says.
        return await search(
            engine.store, state=state, kind=kind, prefix=prefix, limit=limit, now=engine.clock.now()
        )

    async def create(
        self,
        id: str,
        *,
        param: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the promise's timeout, not the call's
        tags: dict[str, str] | None = None,
    ) -> PromiseRecord:
        """Create an external PENDING promise (idempotent: an existing id is returned).

        Args:
            id: the promise's id.
            param: a value stored with it (encoded).
            timeout: seconds until it times out (``REJECTED_TIMEDOUT``), > 0;
                ``None`` (the default): never.
            tags: string labels stored with it.

        Raises:
            ValueError: ``timeout`` is not positive, or ``id`` is not one a
                store can keep (see ``Resonate.run``).
            TypeError: ``timeout`` is not a number of seconds, or ``tags``
                not a dict of ``str`` to ``str``.
        """
        check_id(id, "a promise id")
        if timeout is not None:
            check_seconds("timeout", timeout, none_ok=True)
        if tags is not None and not (
            isinstance(tags, dict)
            and all(type(k) is str and type(v) is str for k, v in tags.items())
        ):
            raise TypeError(f"tags must be a dict of str to str, got {tags!r}")
        engine = self._engine()
        now = engine.clock.now()
        record = PromiseRecord(
            id=id,
            state=State.PENDING,
            kind=Kind.EXTERNAL,
            root_id=id,
            created_at=now,
            param=engine.encode_for(param, f"promise {id!r}"),
            timeout_at=None if timeout is None else now + timeout,
            tags=tags,
        )
        await self._after_admission(engine, id)
        stored = await engine.writer.write_for_caller(Create(record))
        return engine.effective(stored or record)

    @staticmethod
    async def _after_admission(engine: Engine, id: str) -> None:
        """Wait until the root of a run of this process with this id is written.

        The writer writes running work before new runs' roots, so without this
        a call right after ``resonate.run(id, ...)`` could reach the store
        first and find nothing. Its outcome does not matter here: whatever
        the store holds then is what this call acts on.
        """
        run = engine.runs.get(id)
        if run is not None and not run._created and not run.done():
            with contextlib.suppress(Exception):
                await run.created()

    async def resolve(self, id: str, value: Any = None) -> PromiseRecord:
        """Resolve ``id`` with ``value``; a settled promise keeps its first outcome.

        A promise past its ``timeout`` reads as timed out already: that is
        what is recorded and returned, as for ``reject`` and ``cancel``. The
        root promise of a run executing in this process settles its run: its
        body is stopped as by a cancel, and its handle answers ``value``.
        """
        engine = self._engine()
        data = engine.encode_for(value, f"resolve {id!r}")
        return await self._settle(engine, id, State.RESOLVED, data)

    async def reject(self, id: str, error: BaseException | str) -> PromiseRecord:
        """Reject ``id`` with ``error`` (an exception, or a message); a run
        executing here under that id is stopped, as for ``resolve``."""
        engine = self._engine()
        exc = error if isinstance(error, BaseException) else Exception(error)
        return await self._settle(engine, id, State.REJECTED, engine.encoder.encode_error(exc))

    async def cancel(self, id: str) -> PromiseRecord:
        """Cancel ``id`` (``REJECTED_CANCELED``); a run executing here is cancelled too."""
        from .errors import CanceledError

        engine = self._engine()
        data = engine.encoder.encode_error(CanceledError(f"promise {id!r} was canceled"))
        return await self._settle(engine, id, State.REJECTED_CANCELED, data)

    async def _settle(self, engine: Engine, id: str, state: State, data: bytes) -> PromiseRecord:
        check_id(id, "a promise id")
        await self._after_admission(engine, id)
        now = engine.clock.now()
        stored = (await engine.store.get_many([id])).get(id)
        if (
            stored is not None
            and stored.state is State.PENDING
            and stored.timeout_at is not None
            and now >= stored.timeout_at
        ):
            # Past its deadline it reads as settled already (timed out; a sleep,
            # woken): record that, as a waiter would, not the late outcome.
            op = engine.overdue_settle(stored, now)
            overdue = True
        else:
            op = Settle(id, state, data, now)
            overdue = False

        def settled(record: PromiseRecord) -> None:
            # Whether or not the caller still waits (a request cancelled by
            # its client): waiters wake, and a run executing here stops.
            engine.wake(record)
            if overdue:  # a run timed out while its process was down: its sleeps too
                engine.spawn_other(engine.settle_sleeps_of_timed_out_run(record))
            run = engine.runs.get(id)
            if run is not None:
                # Its outcome is decided: what its body would still do is
                # wasted (or worse, side effects for an outcome nobody reads).
                # The cancel writes nothing over the first outcome, which its
                # handle answers.
                run.cancel()

        record = await engine.writer.write_for_caller(op, settled)
        if record is None:
            raise NotFoundError(
                f"no promise with id {id!r}; create it first (ctx.promise or promises.create)"
            )
        return engine.effective(record)


def _member(cls: type[E], value: E | str, param: str) -> E:
    """The member of ``cls`` that ``value`` is or names (its name or value, any case)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.name.lower(), member.value.lower()):
                return member
    names = ", ".join(m.value for m in cls)
    raise ValueError(f"{param} {value!r} is not one of {names}")
