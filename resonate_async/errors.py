"""The exception tree of resonate_async.

What goes wrong in durable execution is a ``ResonateError``. The tree
is shallow on purpose: catch ``ResonateError`` for "anything from the SDK", or
one leaf for a specific case. Bad arguments raise ``ValueError`` or
``TypeError`` and misuse (a durable call from a leaf, ``with_options`` too
late) raises ``RuntimeError``, as in the standard library. Each message says
what happened and what to do next.
"""

from __future__ import annotations

__all__ = (
    "BatchResultError",
    "CanceledError",
    "ConflictError",
    "EncodingError",
    "NondeterminismError",
    "NotFoundError",
    "NotRegisteredError",
    "PromiseTimeoutError",
    "ResonateError",
    "ShutdownError",
    "SignatureError",
    "StoreError",
    "StoredError",
    "UsageError",
)


class ResonateError(Exception):
    """Base class of every error raised by resonate_async."""


class ConflictError(ResonateError):
    """An id is already used by a run with a different function or arguments,
    by another kind of promise, or is the id a call of another run takes.

    Runs are idempotent by id: pick a new id, or call ``run`` with the same
    function and arguments to attach to the existing run.
    """


class NondeterminismError(ResonateError):
    """A replayed workflow made a different call than the one recorded.

    The workflow's code changed (or depends on something non-deterministic)
    between the first execution and the replay. Deploy code compatible with
    the recorded history, or register the new code under a new ``version``.
    """


class EncodingError(ResonateError, TypeError):
    """A value could not be encoded (or decoded) by the encoder."""


class BatchResultError(ResonateError):
    """A batch handler's result does not fit its batch: a list whose length
    differs from the batch's, or a batch list it grew, shrank or replaced
    commands in (reordering it in place is fine)."""


class StoredError(ResonateError):
    """An error read back from the store whose original type cannot be rebuilt.

    Attributes:
        type: the qualified name of the original exception type.
        message: the original ``str(exception)``.
        traceback: the original traceback text, if it was recorded.
    """

    def __init__(self, type: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (StoredError, (self.type, self.message, self.traceback))


class PromiseTimeoutError(ResonateError, TimeoutError):
    """A promise passed its ``timeout_at`` before it settled (``REJECTED_TIMEDOUT``)."""


class CanceledError(ResonateError):
    """A promise was canceled (``REJECTED_CANCELED``)."""


class StoreError(ResonateError):
    """The store failed to read or write; nothing in the failed call is durable.

    The driver's exception is chained as ``__cause__``. The run stays PENDING
    and is recovered at the next start once the store is healthy again.
    """


class NotRegisteredError(ResonateError, LookupError):
    """A function or command type was used without being registered."""


class NotFoundError(ResonateError, LookupError):
    """No promise exists with the given id."""


class ShutdownError(ResonateError):
    """The Resonate instance shut down before the run finished.

    The run stays PENDING in the store and resumes at the next start.
    """


class UsageError(ResonateError, RuntimeError):
    """The SDK used in a way that no retry can fix: a durable call from a leaf
    step or through a context whose function returned, ``with_options`` after
    the call started (or with an option the call does not take).

    Also a ``RuntimeError``. Retry policies never retry it (custom ones
    included), so the call fails at once instead of after every back-off.
    """


class SignatureError(ResonateError, TypeError):
    """A call's arguments do not fit its function's signature, found at the
    call (``resonate.run``, ``ctx.lfi``/``lfc``/``rfi``/``rfc`` of a function
    this process knows) rather than when the function is called.

    Also a ``TypeError``, like the error Python raises for such a call.
    ``resonate.run`` raises it before anything is stored, so the id stays
    free for the corrected call; retry policies never retry it.
    """
