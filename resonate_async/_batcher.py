"""The batcher: one per command type, turning many ``lfc(Command)`` into one handler call.

The batch window (DESIGN §4):

1. wait until the queue is non-empty and a handler slot is free;
2. yield once to the event loop so producers ready in this iteration can
   enqueue; then, only if ``max_wait > 0`` and fewer than ``maxlen`` are
   queued, linger up to ``max_wait`` for more (an idle batcher adds no latency
   by default);
3. take up to ``maxlen`` and call ``handler(ctx, commands)``. Commands arriving
   meanwhile queue up, so the next batch is as large as the backlog.

Every flush runs inside an exception boundary: a handler bug, an unencodable
result or a store error fails the commands it touches and the batcher goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ._clock import with_deadline
from ._context import Context
from ._invoke import being_cancelled, invoke
from ._promise import _IN_BATCH, _QUEUED, _RECORDED, _STARTED
from ._stats import BatcherStats
from .errors import BatchResultError, EncodingError, ShutdownError, StoreError
from .stores._base import Kind, State, new_create, new_record

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._engine import Engine
    from ._promise import Promise
    from ._registry import HandlerEntry
    from .stores._base import PromiseRecord

__all__ = ("Batcher",)

log = logging.getLogger("resonate_async")

# An outcome per command: (state, encoded value or error).
Outcome = tuple[State, bytes]


class Batcher:
    """Queue and batch window of one command type; ``concurrency`` worker loops."""

    def __init__(self, engine: Engine, entry: HandlerEntry) -> None:
        self._engine = engine
        self.entry = entry
        self._queue: deque[Promise[Any]] = deque()
        self._queued_at: deque[float] = deque()  # when each queued command came, in order
        self._now = engine.clock.now
        self._limit = entry.queue_size
        # Queue lengths that wake the batch window: the first command, and a
        # full batch or a full queue while the window lingers for more.
        self._wake_at = (1, entry.maxlen or 1, entry.queue_size or 1)
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._closing = False
        self._batch_no = 0
        self.stats = BatcherStats(entry.name)

    def snapshot(self) -> BatcherStats:
        """A copy of the counters, with the current queue depth."""
        self.stats.queue_depth = sum(1 for p in self._queue if _waited_for(p))
        return self.stats.copy()

    # -- producers -------------------------------------------------------------

    def offer(self, promise: Promise[Any]) -> bool:
        """Enqueue at once if there is room; ``False`` means call :meth:`put`."""
        queue = self._queue
        if self._limit is not None and len(queue) >= self._limit:
            self._purge()
            if len(queue) >= self._limit:
                return False
        queue.append(promise)
        self._queued_at.append(self._now())
        promise._state = _QUEUED
        if len(queue) in self._wake_at:
            self._nonempty.set()
        return True

    async def put(self, promise: Promise[Any]) -> None:
        """Enqueue, waiting while the queue is full (backpressure); return early
        if the command got its outcome meanwhile (its timeout)."""
        while not self.offer(promise):
            if not _waited_for(promise):
                return
            self._space.clear()
            await self._space.wait()

    def wake_producers(self) -> None:
        """Let workflows waiting for room look again (one of theirs timed out)."""
        self._space.set()

    def _purge(self) -> None:
        """Drop the queued commands nobody waits for any more (a cancelled run,
        a timeout around the await): a command cancelled before its batch
        leaves the queue and its room."""
        queue, queued_at = self._queue, self._queued_at
        kept = []
        for promise, came in zip(queue, queued_at, strict=True):
            if _waited_for(promise):
                kept.append((promise, came))
            else:
                promise._state = _STARTED
        queue.clear()
        queue.extend(p for p, _ in kept)
        queued_at.clear()
        queued_at.extend(t for _, t in kept)

    # -- the batch window ------------------------------------------------------

    def close(self) -> None:
        """Workers finish the batch in hand and return."""
        self._closing = True
        self._nonempty.set()

    def _more_may_come(self) -> bool:
        """Whether lingering could grow the batch: it is not full, nor the queue."""
        queued = len(self._queue)
        maxlen, limit = self.entry.maxlen, self._limit
        return (maxlen is None or queued < maxlen) and (limit is None or queued < limit)

    async def run_worker(self) -> None:
        """One handler slot: take batches and flush them until closed (or
        cancelled: a shutdown, a crash, the event loop ending)."""
        entry = self.entry
        maxlen = entry.maxlen
        queue = self._queue
        engine = self._engine
        clock = engine.clock
        while not self._closing:
            if not queue:
                self._nonempty.clear()
                await self._nonempty.wait()
                continue
            await asyncio.sleep(0)
            if entry.max_wait > 0 and self._more_may_come():
                await self._linger(clock.now() + entry.max_wait)
            if clock.now() >= engine.leases_until:
                # As before a step (see Attempts.attempts): the commands of a
                # run another worker took over meanwhile leave the queue.
                try:
                    await engine.confirm_leases()
                except asyncio.CancelledError:
                    if being_cancelled():
                        raise
                    # The shared renewal was cancelled (a shutdown), not this worker.
                except Exception as exc:  # the batch goes on, as without the check
                    log.debug("confirming leases before a batch failed: %s", exc)
            batch = self._take(maxlen)
            if batch:
                await self._flush(batch)
            del batch  # an idle worker holds no commands (nor their workflows' state)

    async def _linger(self, until: float) -> None:
        clock = self._engine.clock
        while self._more_may_come():
            remaining = until - clock.now()
            if remaining <= 0 or self._closing:
                return
            self._nonempty.clear()
            try:
                await with_deadline(self._nonempty.wait(), until, clock)
            except TimeoutError:
                return

    def _take(self, maxlen: int | None) -> list[Promise[Any]]:
        queue, queued_at = self._queue, self._queued_at
        batch: list[Promise[Any]] = []
        oldest = 0.0
        while queue and (maxlen is None or len(batch) < maxlen):
            promise = queue.popleft()
            came = queued_at.popleft()
            if _waited_for(promise):
                promise._state = _IN_BATCH
                if not batch:
                    oldest = came
                batch.append(promise)
            else:  # cancelled before its batch: it leaves the queue here
                promise._state = _STARTED
        if batch:
            self.stats.wait_seconds.add(self._now() - oldest)
        self._space.set()
        self.stats.queue_depth = len(queue)
        return batch

    # -- flushing --------------------------------------------------------------

    async def _flush(self, batch: list[Promise[Any]]) -> None:
        engine = self._engine
        stats = self.stats
        stats.batches += 1
        stats.commands += len(batch)
        stats.batch_size.add(len(batch))
        started = time.perf_counter()
        try:
            call = self._outcomes(batch)
            if engine.tracing.enabled:
                attributes = {"resonate.command": self.entry.name, "resonate.size": len(batch)}
                links = [p._span for p in batch]
                call = engine.tracing.traced(call, "resonate.batch", attributes, links)
            outcomes = await call
            stats.handler_seconds.add(time.perf_counter() - started)
            now = engine.clock.now()
            name = self.entry.name
            kind = Kind.COMMAND
            # The handler slot is free again once the records are queued: the
            # writer reports each one to its workflow as its transaction
            # commits, while the next batch's handler already runs.
            write_then, recorded = engine.writer.write_then, self._recorded
            for p, (state, data) in zip(batch, outcomes, strict=True):
                ctx = p._ctx
                record = new_record(
                    p.id,
                    state,
                    kind,
                    ctx.root_id,
                    now,
                    name,
                    1,
                    p._param,
                    data,
                    ctx.id,
                    None,
                    now,
                    1,
                    None,
                    None,
                    None,
                )
                write_then(new_create(record), recorded, p)
        except asyncio.CancelledError:
            self._fail(batch, ShutdownError("shut down before the batch was recorded"))
            raise
        except Exception as exc:  # the boundary: fail these commands, keep serving
            stats.failed_batches += 1
            log.exception("batch of %d %s commands failed", len(batch), self.entry.name)
            self._fail(batch, exc)
            return
        if log.isEnabledFor(logging.INFO):
            log.info("%s: batch %d of %d commands", self.entry.name, stats.batches, len(batch))

    def _recorded(
        self, promise: Promise[Any], stored: PromiseRecord | None, error: BaseException | None
    ) -> None:
        """The writer's report on a command's record: the workflow may go on."""
        future = promise._future
        if future is None or future.done():  # the workflow stopped waiting
            if error is not None:
                promise._store_failed(error)
                promise._state = _STARTED  # not written: awaited again, it is queued again
            elif stored is not None:
                promise._state = _RECORDED  # awaited again, this is its outcome
                promise._value = stored
            return
        if error is not None:
            promise._store_failed(error)  # awaited straight from the future
            future.set_exception(error)
            return
        if stored is None:  # pragma: no cover - a create always leaves a row
            future.set_exception(StoreError(f"command {promise.id!r} was not stored"))
            return
        try:
            stored = promise._own(stored)  # raises if another workflow's row
            future.set_result(self._engine.settled_child(promise._ctx._run, stored))
        except Exception as exc:
            future.set_exception(exc)

    @staticmethod
    def _fail(batch: list[Promise[Any]], exc: BaseException) -> None:
        for promise in batch:
            future = promise._future
            if future is not None and not future.done():
                future.set_exception(exc)
            else:  # nobody waits: awaited again, it is queued again
                promise._state = _STARTED

    async def _outcomes(self, batch: list[Promise[Any]]) -> list[Outcome]:
        """Call the handler with retries; once exhausted, bisect to isolate poison.

        Once nobody waits for any command of the batch (all timed out, their
        runs cancelled or shutting down), a failure is not retried or
        bisected and nothing is recorded: the batch fails (see ``_fail``), so
        a replay sends its commands again rather than read a transient error
        as their outcome. (A command that timed out has its row already.)
        """
        return await self._try(batch, self._call_with_retries(batch), whole=True)

    async def _try(
        self, part: list[Promise[Any]], call: Awaitable[Any], *, whole: bool = False
    ) -> list[Outcome]:
        """Map ``call``'s result onto ``part``; if it fails, try each half once more.

        Halving goes down to single commands, so a poison command is rejected
        alone with the handler's error and the others still succeed.
        """
        try:
            result = await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if whole and not any(map(_waited_for, part)):
                raise  # nobody waits: nothing recorded (see _outcomes)
            if len(part) == 1:
                return [(State.REJECTED, self._engine.encoder.encode_error(exc))]
            half = len(part) // 2
            return await self._bisect(part[:half]) + await self._bisect(part[half:])
        return self._map_results(part, result)

    async def _bisect(self, part: list[Promise[Any]]) -> list[Outcome]:
        return await self._try(part, self._call_handler(part, attempt=1))

    async def _call_with_retries(self, batch: list[Promise[Any]]) -> Any:
        policy = self.entry.retry_policy
        attempt = 1
        while True:
            try:
                return await self._call_handler(batch, attempt)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = policy.next_delay(attempt + 1) if policy.should_retry(exc) else None
                if delay is None or not any(map(_waited_for, batch)):
                    raise
                log.warning(
                    "%s handler failed on attempt %d (%r); retrying in %.3fs",
                    self.entry.name,
                    attempt,
                    exc,
                    delay,
                )
                await self._engine.clock.sleep(delay)
                if not any(map(_waited_for, batch)):  # all timed out meanwhile
                    raise
                attempt += 1

    async def _call_handler(self, batch: list[Promise[Any]], attempt: int) -> Any:
        self.stats.handler_calls += 1
        try:
            return await self._call_handler_once(batch, attempt)
        except Exception:
            self.stats.handler_failures += 1
            raise

    async def _call_handler_once(self, batch: list[Promise[Any]], attempt: int) -> Any:
        self._batch_no += 1
        ctx = Context(
            self._engine, None, f"batch:{self.entry.name}:{self._batch_no}", "", attempt, leaf=True
        )
        commands = [p._target for p in batch]
        # A task of its own: a handler that cancels "the current task" cancels
        # itself, not this worker (the batcher never dies). Cancelling the
        # worker (a shutdown, the loop ending) cancels the handler with it.
        call = asyncio.ensure_future(
            invoke(self.entry.style, self.entry.handler, ctx, (commands,), {})
        )
        try:
            result = await call
        except (KeyboardInterrupt, SystemExit):
            raise
        except asyncio.CancelledError:
            if being_cancelled():
                raise  # this worker is cancelled
            # The handler's own: a failure of the batch, not of the batcher.
            raise RuntimeError(
                f"{self.entry.name} handler raised CancelledError (it was cancelled, "
                "not by a shutdown, or raised it itself)"
            ) from None
        except Exception:
            raise
        except BaseException as exc:  # the batcher never dies of a handler
            raise RuntimeError(
                f"{self.entry.name} handler raised {type(exc).__name__}: {exc}, "
                "which is not an Exception"
            ) from exc
        if isinstance(result, list) and (
            len(commands) != len(batch)
            or any(c is not p._target for c, p in zip(commands, batch, strict=True))
        ):
            return self._in_batch_order(batch, commands, result)
        return result

    def _in_batch_order(
        self, batch: list[Promise[Any]], commands: list[Any], result: list[Any]
    ) -> list[Any]:
        """Results of a handler that reordered its list in place (sorted it,
        say): item ``i`` answers the command now at ``commands[i]``. A list
        grown, shrunk or with commands replaced rejects them all."""
        where: dict[int, deque[int]] = {}
        if len(commands) == len(batch):
            for i, command in enumerate(commands):
                where.setdefault(id(command), deque()).append(i)
            order = []
            for p in batch:
                places = where.get(id(p._target))
                if not places:
                    break
                order.append(places.popleft())  # the same object twice: in order
            else:
                if len(result) != len(batch):
                    return result  # the usual error for a list of another length
                return [result[i] for i in order]
        error = BatchResultError(
            f"{self.entry.name} handler changed the list of commands it was given "
            "(other than by reordering it); work on a copy"
        )
        return [error] * len(batch)

    def _map_results(self, batch: list[Promise[Any]], result: Any) -> list[Outcome]:
        encoder = self._engine.encoder
        if isinstance(result, list):
            if len(result) != len(batch):
                error = BatchResultError(
                    f"{self.entry.name} handler returned {len(result)} results for a batch of "
                    f"{len(batch)} commands; return one item per command (an Exception item "
                    "rejects its command alone), or a single non-list value for all"
                )
                data = encoder.encode_error(error)
                return [(State.REJECTED, data)] * len(batch)
            return [self._one(item) for item in result]
        shared = self._one(result)
        return [shared] * len(batch)

    def _one(self, item: Any) -> Outcome:
        encoder = self._engine.encoder
        if isinstance(item, BaseException):
            return (State.REJECTED, encoder.encode_error(item))
        try:
            return (State.RESOLVED, encoder.encode(item))
        except EncodingError as exc:
            error = EncodingError(f"the {self.entry.name} handler's result is not encodable: {exc}")
            return (State.REJECTED, encoder.encode_error(error))


def _waited_for(promise: Promise[Any]) -> bool:
    """Whether a command's workflow still waits for its outcome (and still
    executes here: not a run whose lease this worker lost)."""
    future = promise._future
    return future is not None and not future.done() and promise._lost() is None
