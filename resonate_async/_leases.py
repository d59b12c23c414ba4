"""Leases: who runs a PENDING run, and taking over the runs of workers that died.

A pending root run (or remote call) is owned by one worker through
``owner``/``lease_expires_at``. The heartbeat renews this worker's leases;
the claim loop takes free or expired ones (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and resumes them by replay. On a
single-host store a lease whose owner is a dead process of this host is
freed at once instead of waiting for it to expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from contextvars import Context
from typing import TYPE_CHECKING, Any, cast

from .errors import StoreError
from .stores._base import Kind, State

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine, Sequence

    from ._clock import Clock
    from ._encoding import Encoder
    from ._registry import FunctionEntry, Registry
    from ._runs import RunState
    from .errors import NondeterminismError
    from .stores._base import PromiseRecord, Store

__all__ = (
    "MAX_RESUME_DELAY",
    "LeaseKeeper",
    "LeaseLost",
    "abandoned_workers",
    "default_worker_id",
)

log = logging.getLogger("resonate_async")

# How many promises one claim takes at most; recovery claims chunk after chunk.
_CLAIM_CHUNK = 1000
#: The longest wait before a run stopped by store failures is resumed again.
MAX_RESUME_DELAY = 300.0
# A run's store failures older than this are forgotten (its back-off restarts).
_FORGET_FAILURES = 2 * MAX_RESUME_DELAY


def default_worker_id() -> str:
    """``host:pid:random``; the host and pid let a restart on one host take over at once."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# Worker ids abandoned in this process by ``testing.crash``: as dead as a killed pid.
abandoned_workers: set[str] = set()


class LeaseLost(StoreError):
    """A run executing here is another worker's now, or settled: this worker's
    lease on it ran out while it could not renew (a paused process, an
    unreachable store). The run stops here unsettled and its handle follows
    the run's outcome from the store. A ``StoreError``, so a body that
    catches it still ends without settling (see ``RunState.fatal``)."""

    def __init__(self, message: str, record: PromiseRecord | None) -> None:
        super().__init__(message)
        self.record = record


def _dead_local_owner(owner: str | None, *, check_pids: bool = True) -> bool:
    """Whether ``owner`` names a process of this host that no longer exists.

    Workers abandoned by ``testing.crash`` are dead whatever the store. The pid
    check only holds where every worker shares this host's pid space (SQLite,
    DESIGN §7): on a networked store, a worker in another container with the
    same host name would be taken for dead while it still runs.
    """
    if not owner:
        return False
    if owner in abandoned_workers:
        return True
    if not check_pids:
        return False
    parts = owner.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _exited(pid)


def _exited(pid: int) -> bool:
    """Whether ``pid`` is a zombie: it exited (killed, say) but its parent has
    not reaped it yet, so it is still signalled (Linux; elsewhere False). A
    supervisor that reaps late must not make the next start wait a lease."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    # "pid (command name) state ...": the name may hold spaces and parentheses.
    end = stat.rfind(b")")
    return stat[end + 2 : end + 3] == b"Z"


class LeaseKeeper:
    """The lease half of the engine: claiming, resuming, renewing (a mixin of ``Engine``)."""

    # Provided by Engine.
    store: Store
    registry: Registry
    encoder: Encoder
    clock: Clock
    worker_id: str
    lease_seconds: float
    heartbeat_seconds: float
    poll_seconds: float
    closing: bool
    runs: dict[str, RunState]
    stuck: dict[str, NondeterminismError]
    store_failed: dict[str, float]
    store_failures: dict[str, tuple[int, float]]
    claiming: asyncio.Lock
    loop: asyncio.AbstractEventLoop
    # Until when every lease this worker holds is known to last: the start of
    # its last renewal (or of the engine) plus a lease.
    leases_until: float
    _confirming: asyncio.Task[None] | None
    _single_host: bool
    _claim_wakeup: asyncio.Event
    _claim_lost: bool
    # Claimed rows to free: runs whose arguments do not decode here (see
    # _resume), and runs lost here whose release failed (see _claimed_back).
    _to_free: list[str]
    _just_freed: set[str]  # leases this poll freed after their back-off

    if TYPE_CHECKING:

        def start_run(
            self,
            id: str,
            entry: FunctionEntry,
            param: bytes,
            args: tuple[Any, ...] | list[Any],
            kwargs: dict[str, Any],
            stored: PromiseRecord | None = None,
        ) -> RunState: ...

        def spawn_other(
            self, coro: Coroutine[Any, Any, Any], context: Context | None = None
        ) -> asyncio.Task[Any]: ...

    async def recover(self, keys: Sequence[tuple[str, int]] | None = None) -> int:
        """Claim and resume PENDING runs and remote calls of registered functions.

        Free promises (no owner, an expired lease, or a dead owner on this
        host) are claimed in chunks; returns how many were resumed.
        """
        keys = list(self.registry.keys() if keys is None else keys)
        if not keys or self.closing:
            return 0
        if self._claim_lost:
            # A claim whose answer was lost may have leased rows to this
            # worker that nothing here runs, and that the heartbeat would
            # renew for ever: free them, for this claim to take them again.
            await self._release_dead_owners(own=True)
            self._claim_lost = False
        if self.runs and self.clock.now() >= self.leases_until:
            # This worker's leases may have lapsed (a pause, a virtual clock
            # jumping while the store works): renew them first, so that the
            # claim below takes back only the runs another worker took over
            # meanwhile, not every run still executing here (see _claimed_back).
            await self.confirm_leases()
        resumed = remote = 0
        while True:
            now = self.clock.now()
            try:
                claimed = await self.store.claim(
                    self.worker_id,
                    now=now,
                    lease_until=now + self.lease_seconds,
                    funcs=keys,
                    kinds=(Kind.RUN, Kind.REMOTE),
                    limit=_CLAIM_CHUNK,
                )
            except Exception:
                self._claim_lost = True
                raise
            if self.closing:  # shut down while claiming: start nothing (it would outlive aclose)
                if claimed:
                    await self.store.release(self.worker_id, [r.id for r in claimed])
                break
            lost = self._claimed_back(claimed)
            fresh = [r for r in claimed if r.id not in self.runs and r.id not in self.stuck]
            started_now = 0
            for record in fresh:
                started = self._resume(record)
                started_now += started
                if record.kind is Kind.REMOTE:
                    remote += started
            resumed += started_now
            released = self._to_free + lost
            if released:
                self._to_free = []
                try:
                    await self.store.release(self.worker_id, released)
                except Exception:
                    self._to_free += released  # freed after the next claim
                    raise
            # Not on once runs were released at once (see _resume, _claimed_back): the next
            # claim would take the same rows again. (Rows held are not taken.)
            if len(claimed) < _CLAIM_CHUNK or not fresh or released or self.closing:
                break
        if resumed > remote:  # a remote call taken here is work, not a recovery
            log.info("resumed %d pending runs", resumed - remote)
        return resumed

    def _claimed_back(self, claimed: list[PromiseRecord]) -> list[str]:
        """The ids of ``claimed`` whose runs still execute, or stop, here: to free.

        A claim takes only a free or expired lease, so such a run's lease ran
        out while it executed (a paused process) and another worker may have
        run it meanwhile: this execution's replay table misses the steps that
        worker settled, which it would run again. It stops as lost, and its
        lease is freed at once rather than renewed for ever under a run that
        no longer executes: its handle then claims it again (see
        ``RunDriver._attach_to``), or the next poll does, and resumes it from
        its stored history once this execution has unwound.
        """
        ids = []
        for record in claimed:
            run = self.runs.get(record.id)
            if run is None:
                continue
            if self._executing(run):
                self._lose(
                    run,
                    record,
                    f"run {run.id!r} was claimed back by this worker: its lease on it ran "
                    "out while it executed here, and another worker may have run it "
                    "meanwhile, so it resumes from its stored history",
                )
            if isinstance(run.fatal, LeaseLost):  # (also one a renewal found lost)
                ids.append(record.id)
        return ids

    def _resume(self, record: PromiseRecord) -> int:
        entry = None if record.func is None else self.registry.lookup(record.func, record.version)
        if entry is None or record.param is None:
            return 0
        try:
            decoded = self.encoder.decode(record.param)
            args, kwargs = cast("tuple[list[Any], dict[str, Any]]", decoded)
        except Exception as exc:
            # Not held here for ever (the heartbeat would renew the lease):
            # held for a back-off (so claims here take newer runs), then freed
            # and, taken again at once by this claim, left free until the next
            # poll: a worker that can decode them gets its turn.
            first = record.id not in self.store_failures  # logged at ERROR once
            if record.id in self._just_freed:
                self._to_free.append(record.id)
            else:
                self.free_later(record.id)
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "cannot resume %s: its arguments do not decode here: %s; it is left "
                "to a worker that can decode them",
                record.id,
                exc,
            )
            return 0
        self.start_run(record.id, entry, record.param, args, kwargs, stored=record)
        return 1

    def free_later(self, id: str) -> float:
        """Free this worker's lease on ``id`` after a back-off (the claim loop
        does it): a run stopped here unsettled, to be resumed here or
        elsewhere. Each stop in a row doubles the wait (a store that keeps
        failing must not turn every poll into another replay); its seconds."""
        now = self.clock.now()
        failures = self.store_failures.get(id, (0, now))[0] + 1
        self.store_failures[id] = (failures, now)
        # (The exponent capped: a store down for days must not overflow it.)
        delay = min(self.poll_seconds * 2.0 ** min(failures - 1, 40), MAX_RESUME_DELAY)
        self.store_failed[id] = now + delay
        return delay

    def remote_created(self) -> None:
        """A remote call was created here: look for work now, not at the next poll."""
        self._claim_wakeup.set()

    def _dead(self, owner: str) -> bool:
        return _dead_local_owner(owner, check_pids=self._single_host)

    async def _release_dead_owners(self, *, own: bool = False) -> None:
        """Free leases whose owner is a dead process of this host.

        With ``own``, also the leases held under this very ``worker_id`` of
        runs that do not execute here: at start, a previous incarnation's (a
        restart with a stable id); later, those a claim whose answer was lost
        took. (Not those of runs stopped here on purpose: stuck on
        nondeterminism, or waiting out a store failure's back-off.)
        """
        dead: dict[str, list[str]] = {}
        for kind in (Kind.RUN, Kind.REMOTE):
            for record in await self.store.search(state=State.PENDING, kind=kind, limit=None):
                owner, id = record.owner, record.id
                if owner is None or id in self.runs:
                    continue
                if owner == self.worker_id:
                    if own and id not in self.stuck and id not in self.store_failed:
                        dead.setdefault(owner, []).append(id)
                elif self._dead(owner):
                    dead.setdefault(owner, []).append(id)
        for owner, ids in dead.items():
            await self.store.release(owner, ids)

    async def _release_store_failed(self) -> None:
        """Free the leases of runs a store failure stopped here, before claiming:
        the claim that follows (here or elsewhere) resumes them. In this task,
        so a release never lands after this worker claimed the run again."""
        self._just_freed.clear()
        now = self.clock.now()
        failures = self.store_failures
        if failures:  # forget failures long past: the next one starts the back-off again
            for id in [i for i, (_, last) in failures.items() if now - last > _FORGET_FAILURES]:
                if id not in self.store_failed:
                    del failures[id]
        stopped = self.store_failed
        if not stopped:
            return
        for id in [id for id in stopped if id in self.runs]:  # resumed here meanwhile
            del stopped[id]
        ids = [id for id, due in stopped.items() if due <= now]
        if ids:
            try:
                await self.store.release(self.worker_id, ids)
            except Exception as exc:  # kept for the next poll; the claim goes on
                log.warning(
                    "freeing the leases of %d runs stopped here unsettled failed: %s",
                    len(ids),
                    exc,
                )
                return
            for id in ids:
                stopped.pop(id, None)
            self._just_freed.update(ids)  # (see _resume: left free until the next poll)
            # (Stopped unsettled here: a store failure, a command without a
            # handler here, arguments that do not decode here; see free_later.)
            log.info(
                "freed the leases of %d runs stopped here unsettled, after a back-off", len(ids)
            )

    async def _heartbeat(self) -> None:
        clock = self.clock
        poll = getattr(clock, "poll", None)
        while True:
            if poll is None:
                await clock.sleep(self.heartbeat_seconds)
            else:
                # A virtual clock renews when it stops anyway (see _claim_loop),
                # and at the latest where the real one would have renewed last.
                await _first(
                    poll(self.heartbeat_seconds),
                    clock.sleep(self.lease_seconds - self.heartbeat_seconds),
                )
            try:
                await self.confirm_leases()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # tried again at the next heartbeat
                log.warning("lease heartbeat failed: %s", exc)

    async def confirm_leases(self) -> None:
        """Renew this worker's leases now; after a lapse, stop the runs lost meanwhile.

        What the heartbeat does, and what a step about to start awaits once
        ``leases_until`` has passed (the process was paused, the store
        unreachable): so that no step starts in a run another worker may
        have taken over. Concurrent callers share one renewal.
        """
        if self.closing:
            return  # shutting down: nothing starts any more, nor is renewed
        confirming = self._confirming
        if confirming is None or confirming.done():
            # In an empty context: a step's variables, its span, are not the renewal's.
            confirming = self.spawn_other(self._renew_leases(), Context())
            self._confirming = confirming
        await asyncio.shield(confirming)

    async def _renew_leases(self) -> None:
        clock = self.clock
        now = clock.now()
        try:
            await self.store.renew(self.worker_id, lease_until=now + self.lease_seconds)
            if clock.now() >= self.leases_until:
                # The leases could expire before this renewal took effect (the
                # process was paused, the store unreachable or slow to answer):
                # another worker may have claimed runs that still execute here.
                await self._stop_lost_runs()
        except (StoreError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a store's own error: what a store failure is to a run
            raise StoreError(f"renewing this worker's leases failed: {exc}") from exc
        self.leases_until = now + self.lease_seconds

    async def _stop_lost_runs(self) -> None:
        """Stop the runs executing here whose lease this worker no longer holds.

        Each is cancelled with ``LeaseLost`` as its ``fatal`` error: it stays
        as the store has it (another worker's, or settled), and its handle
        waits for its outcome there. Only after a lapse in renewing, so the
        read costs nothing while leases are renewed in time.
        """
        running = [run for run in self.runs.values() if self._executing(run)]
        if not running:
            return
        records = await self.store.get_many([run.id for run in running])
        for run in running:
            record = records.get(run.id)
            if (
                record is not None
                and record.owner == self.worker_id
                and record.state is State.PENDING
            ):
                # Renewed just now; or claimed back by the claim loop, which
                # stops it (see _claimed_back): the claim tells, not the row.
                continue
            if not self._executing(run):
                continue  # it ended (or is settling) while the records were read
            if record is None:
                where = "is no longer in the store"
            elif record.state is State.PENDING and record.owner is None:
                where = "was freed (its lease released)"
            elif record.state is State.PENDING:
                where = f"is held by worker {record.owner!r} now"
            else:
                where = f"was settled {record.state.name} meanwhile"
            message = (
                f"run {run.id!r} {where}: this worker's lease on it ran out before "
                "it could renew it, so it stops executing here"
            )
            self._lose(run, record, message)

    @staticmethod
    def _lose(run: RunState, record: PromiseRecord | None, message: str) -> None:
        """Stop ``run``'s execution here (see ``LeaseLost``)."""
        log.warning("%s; its handle waits for the run's outcome", message)
        run.fatal = LeaseLost(message, record)
        cast("asyncio.Task[None]", run._task).cancel()

    def _executing(self, run: RunState) -> bool:
        """Whether ``run`` executes here now, its body's task not done, and
        nothing else (a cancel, a fatal error) already ends it."""
        task = run._task
        return (
            self.runs.get(run.id) is run
            and run._created
            and run.fatal is None
            and not run.cancel_requested
            and task is not None
            and not task.done()
        )

    async def _claim_loop(self) -> None:
        """Every ``poll_seconds`` (or at once when woken), claim free runs and remote calls."""
        clock = self.clock
        # A poll is no timer of the clock's own where the clock offers that
        # (VirtualClock.poll): a test that advances a virtual day does not
        # stop 86,400 times to poll, and a poll still runs as time passes.
        poll = getattr(clock, "poll", clock.sleep)
        polls = 0
        while True:
            self._claim_wakeup.clear()
            if await _first(poll(self.poll_seconds), self._claim_wakeup.wait()) == 0:
                polls += 1
            try:
                async with self.claiming:
                    await self._release_store_failed()
                    if self._single_host and polls % 30 == 29:
                        # Now and then, free the leases of dead processes of this host
                        # (elsewhere only an expired lease frees a run).
                        await self._release_dead_owners()
                    await self.recover()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("claiming pending runs failed: %s", exc)


async def _first(*awaitables: Awaitable[object]) -> int:
    """Wait until one of ``awaitables`` is done, cancel the others; its index."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(i for i, task in enumerate(tasks) if task in done)
    finally:
        for task in tasks:
            task.cancel()
        # Wait for them to unwind (their errors, if any, are not ours to raise).
        await asyncio.gather(*tasks, return_exceptions=True)
