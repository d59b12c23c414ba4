"""Retry policies: how long to wait before the next attempt, and whether to retry.

A policy is a frozen dataclass with two methods. ``next_delay(attempt)`` gives
the seconds to wait before ``attempt`` starts (``attempt`` 2 is the first
retry) or ``None`` to give up; ``should_retry(error)`` says whether an error
may be retried at all. Build policies with the factories:

Example:
    ```python
    from resonate_async.retry import exponential, never

    @resonate.register(retry_policy=never())
    async def create_user(ctx: Context, user_id: int) -> int: ...

    p = ctx.lfi(charge, order).with_options(
        retry_policy=exponential(delay=0.5, max_retries=3, non_retryable=(CardDeclined,))
    )
    ```

Steps and batch handlers default to ``exponential()``; a run's own body
defaults to ``never()``. ``asyncio.CancelledError``, ``NondeterminismError``,
``ShutdownError``, ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit``
are never retried, whatever the policy says.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from .errors import NondeterminismError, ShutdownError, SignatureError, UsageError

__all__ = (
    "Constant",
    "Exponential",
    "Linear",
    "Never",
    "RetryPolicy",
    "constant",
    "exponential",
    "linear",
    "never",
)

_ExceptionTypes = tuple[type[BaseException], ...]

# Errors that stop an attempt for a reason a retry cannot fix.
_NEVER_RETRIED: Final = (
    asyncio.CancelledError,
    NondeterminismError,
    ShutdownError,
    UsageError,
    SignatureError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


@runtime_checkable
class RetryPolicy(Protocol):
    """What the engine asks a retry policy after an attempt fails.

    Runtime-checkable, so ``isinstance(value, RetryPolicy)`` tells a policy
    (anything with ``next_delay`` and ``should_retry``) from a mistaken
    argument such as ``"never"`` or the factory ``never`` itself.
    """

    def next_delay(self, attempt: int) -> float | None:
        """Seconds to wait before ``attempt`` starts, or ``None`` to give up.

        Args:
            attempt: the attempt about to start; 2 is the first retry.
        """
        ...

    def should_retry(self, error: BaseException) -> bool:
        """Whether ``error`` may be retried at all."""
        ...


def checked_policy(param: str, value: object) -> RetryPolicy:
    """``value`` if it is a retry policy, else a ``TypeError`` naming ``param``."""
    # A policy class has the methods too, but is not a policy.
    if isinstance(value, RetryPolicy) and not isinstance(value, type):
        return value
    hint = ""
    factory = getattr(value, "__name__", None)
    if factory and getattr(value, "__module__", None) == __name__:
        hint = f" (call it: {factory}())"
    raise TypeError(
        f"{param} must be a RetryPolicy such as never() or exponential(max_retries=3), "
        f"got {value!r}{hint}"
    )


def _check_delay(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_max_retries(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_retries must be an int >= 0 (0 means no retries), got {value!r}")


def _check_types(name: str, value: object) -> None:
    if isinstance(value, type):
        raise TypeError(f"{name} must be a tuple of exception types: write ({value.__name__},)")
    if not isinstance(value, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in value
    ):
        raise TypeError(
            f"{name} must be a tuple of exception types, e.g. (ValueError,), got {value!r}"
        )


def _check_attempt(attempt: int) -> None:
    if attempt < 2:
        raise ValueError(f"attempt must be >= 2 (2 is the first retry), got {attempt!r}")


def _should_retry(
    error: BaseException, retry_on: _ExceptionTypes, non_retryable: _ExceptionTypes
) -> bool:
    if isinstance(error, (_NEVER_RETRIED, non_retryable)):
        return False
    return isinstance(error, retry_on)


@dataclass(frozen=True, slots=True)
class Never:
    """Never retry: the first failure is final.

    ``retry_on`` and ``non_retryable`` exist so every policy has the same
    fields; ``should_retry`` ignores them and always returns ``False``.

    Example:
        >>> never().next_delay(2) is None
        True
    """

    retry_on: _ExceptionTypes = field(default=(Exception,), kw_only=True)
    non_retryable: _ExceptionTypes = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        _check_types("retry_on", self.retry_on)
        _check_types("non_retryable", self.non_retryable)

    def next_delay(self, attempt: int) -> float | None:
        """Always ``None``: give up.

        Raises:
            ValueError: ``attempt`` is below 2.
        """
        _check_attempt(attempt)
        return None

    def should_retry(self, error: BaseException) -> bool:
        """Always ``False``."""
        return False


@dataclass(frozen=True, slots=True)
class Constant:
    """Wait the same ``delay`` before each of at most ``max_retries`` retries.

    Example:
        >>> p = constant(delay=2.0, max_retries=2)
        >>> tuple(p.next_delay(a) for a in (2, 3, 4))
        (2.0, 2.0, None)
    """

    delay: float = 1.0
    max_retries: int = 5
    retry_on: _ExceptionTypes = field(default=(Exception,), kw_only=True)
    non_retryable: _ExceptionTypes = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        _check_delay("delay", self.delay)
        _check_max_retries(self.max_retries)
        _check_types("retry_on", self.retry_on)
        _check_types("non_retryable", self.non_retryable)

    def next_delay(self, attempt: int) -> float | None:
        """``delay``, or ``None`` once ``max_retries`` retries have been made.

        Raises:
            ValueError: ``attempt`` is below 2.
        """
        _check_attempt(attempt)
        if attempt - 1 > self.max_retries:
            return None
        return float(self.delay)

    def should_retry(self, error: BaseException) -> bool:
        """``True`` for an instance of ``retry_on`` that is not ``non_retryable``."""
        return _should_retry(error, self.retry_on, self.non_retryable)


@dataclass(frozen=True, slots=True)
class Linear:
    """Wait ``delay`` times the retry number: ``delay``, ``2 * delay``, ...

    Example:
        >>> p = linear(delay=1.5, max_retries=3)
        >>> tuple(p.next_delay(a) for a in (2, 3, 4, 5))
        (1.5, 3.0, 4.5, None)
    """

    delay: float = 1.0
    max_retries: int = 5
    retry_on: _ExceptionTypes = field(default=(Exception,), kw_only=True)
    non_retryable: _ExceptionTypes = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        _check_delay("delay", self.delay)
        _check_max_retries(self.max_retries)
        _check_types("retry_on", self.retry_on)
        _check_types("non_retryable", self.non_retryable)

    def next_delay(self, attempt: int) -> float | None:
        """``delay * (attempt - 1)``, or ``None`` after ``max_retries`` retries.

        Raises:
            ValueError: ``attempt`` is below 2.
        """
        _check_attempt(attempt)
        if attempt - 1 > self.max_retries:
            return None
        return float(self.delay * (attempt - 1))

    def should_retry(self, error: BaseException) -> bool:
        """``True`` for an instance of ``retry_on`` that is not ``non_retryable``."""
        return _should_retry(error, self.retry_on, self.non_retryable)


@dataclass(frozen=True, slots=True)
class Exponential:
    """Multiply the wait by ``factor`` after each retry, up to ``max_delay``.

    Example:
        >>> p = exponential(delay=1.0, factor=2.0, max_delay=5.0, max_retries=4)
        >>> tuple(p.next_delay(a) for a in (2, 3, 4, 5, 6))
        (1.0, 2.0, 4.0, 5.0, None)
    """

    delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    max_retries: int = 5
    retry_on: _ExceptionTypes = field(default=(Exception,), kw_only=True)
    non_retryable: _ExceptionTypes = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        _check_delay("delay", self.delay)
        _check_delay("max_delay", self.max_delay)
        if self.max_delay < self.delay:
            raise ValueError(
                f"max_delay ({self.max_delay!r}) must be >= delay ({self.delay!r}); "
                "raise max_delay or lower delay"
            )
        if (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, int | float)
            or not 1 <= self.factor < math.inf
        ):
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")
        _check_max_retries(self.max_retries)
        _check_types("retry_on", self.retry_on)
        _check_types("non_retryable", self.non_retryable)

    def next_delay(self, attempt: int) -> float | None:
        """``min(delay * factor ** (attempt - 2), max_delay)``, or ``None`` after
        ``max_retries`` retries.

        Raises:
            ValueError: ``attempt`` is below 2.
        """
        _check_attempt(attempt)
        if attempt - 1 > self.max_retries:
            return None
        try:
            delay = self.delay * float(self.factor) ** (attempt - 2)
        except OverflowError:  # a huge attempt with factor > 1: the cap applies
            return 0.0 if self.delay == 0 else float(self.max_delay)
        return float(min(delay, self.max_delay))

    def should_retry(self, error: BaseException) -> bool:
        """``True`` for an instance of ``retry_on`` that is not ``non_retryable``."""
        return _should_retry(error, self.retry_on, self.non_retryable)


def never() -> Never:
    """A policy that never retries; the default for a run's own body.

    Example:
        >>> never()
        Never(retry_on=(<class 'Exception'>,), non_retryable=())
    """
    return Never()


def constant(
    delay: float = 1.0,
    max_retries: int = 5,
    *,
    retry_on: _ExceptionTypes = (Exception,),
    non_retryable: _ExceptionTypes = (),
) -> Constant:
    """Retry up to ``max_retries`` times, waiting ``delay`` seconds each time.

    Args:
        delay: seconds before each retry, >= 0.
        max_retries: retries after the first attempt, >= 0.
        retry_on: only these exception types are retried.
        non_retryable: these are never retried, even if listed in ``retry_on``.

    Raises:
        ValueError: ``delay`` is negative or not finite, or ``max_retries`` < 0.
        TypeError: ``retry_on`` or ``non_retryable`` is not a tuple of
            exception types.

    Example:
        >>> constant(0.5, 3, non_retryable=(KeyError,)).next_delay(2)
        0.5
    """
    return Constant(delay, max_retries, retry_on=retry_on, non_retryable=non_retryable)


def linear(
    delay: float = 1.0,
    max_retries: int = 5,
    *,
    retry_on: _ExceptionTypes = (Exception,),
    non_retryable: _ExceptionTypes = (),
) -> Linear:
    """Retry up to ``max_retries`` times, waiting ``delay * n`` before retry ``n``.

    Args:
        delay: seconds before the first retry, >= 0; retry n waits n times that.
        max_retries: retries after the first attempt, >= 0.
        retry_on: only these exception types are retried.
        non_retryable: these are never retried, even if listed in ``retry_on``.

    Raises:
        ValueError: ``delay`` is negative or not finite, or ``max_retries`` < 0.
        TypeError: ``retry_on`` or ``non_retryable`` is not a tuple of
            exception types.

    Example:
        >>> linear(2.0).next_delay(4)
        6.0
    """
    return Linear(delay, max_retries, retry_on=retry_on, non_retryable=non_retryable)


def exponential(
    delay: float = 1.0,
    factor: float = 2.0,
    max_delay: float = 30.0,
    max_retries: int = 5,
    *,
    retry_on: _ExceptionTypes = (Exception,),
    non_retryable: _ExceptionTypes = (),
) -> Exponential:
    """Retry up to ``max_retries`` times with waits growing by ``factor``.

    Retry n waits ``min(delay * factor ** (n - 1), max_delay)`` seconds. The
    default for steps and batch handlers.

    Args:
        delay: seconds before the first retry, >= 0.
        factor: growth per retry, >= 1.
        max_delay: the longest wait, >= ``delay``.
        max_retries: retries after the first attempt, >= 0.
        retry_on: only these exception types are retried.
        non_retryable: these are never retried, even if listed in ``retry_on``.

    Raises:
        ValueError: a delay is negative or not finite, ``max_delay < delay``,
            ``factor < 1`` or ``max_retries < 0``.
        TypeError: ``retry_on`` or ``non_retryable`` is not a tuple of
            exception types.

    Example:
        >>> tuple(exponential(max_retries=3).next_delay(a) for a in (2, 3, 4, 5))
        (1.0, 2.0, 4.0, None)
    """
    return Exponential(
        delay, factor, max_delay, max_retries, retry_on=retry_on, non_retryable=non_retryable
    )
