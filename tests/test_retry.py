"""Retry policies: the delays they give, when they give up, what they retry."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from resonate_async.errors import (
    ConflictError,
    NondeterminismError,
    ShutdownError,
    StoreError,
)
from resonate_async.retry import (
    Constant,
    Exponential,
    Linear,
    Never,
    RetryPolicy,
    constant,
    exponential,
    linear,
    never,
)


def delays(policy: RetryPolicy, up_to: int = 8) -> list[float | None]:
    return [policy.next_delay(attempt) for attempt in range(2, up_to + 1)]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (never(), [None] * 3),
        (constant(), [1.0] * 5 + [None]),
        (constant(0.25, 2), [0.25, 0.25, None]),
        (linear(), [1.0, 2.0, 3.0, 4.0, 5.0, None]),
        (linear(0.5, 3), [0.5, 1.0, 1.5, None]),
        (exponential(), [1.0, 2.0, 4.0, 8.0, 16.0, None]),
        (exponential(max_retries=7), [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
        (exponential(0.1, 3.0, 1.0, 4), [0.1, pytest.approx(0.3), pytest.approx(0.9), 1.0]),
        (exponential(2.0, 1.0, 2.0, 2), [2.0, 2.0, None]),
        (exponential(0.0, 2.0, 0.0, 2), [0.0, 0.0, None]),
    ],
    ids=repr,
)
def test_delays(policy: RetryPolicy, expected: list[object]) -> None:
    assert delays(policy, len(expected) + 1) == expected


@pytest.mark.parametrize(
    "policy", [constant(max_retries=0), linear(0, 0), exponential(max_retries=0)]
)
def test_zero_max_retries_gives_up_at_once(policy: RetryPolicy) -> None:
    assert policy.next_delay(2) is None


@pytest.mark.parametrize(
    "policy", [never(), constant(), linear(), exponential()], ids=lambda p: type(p).__name__
)
def test_attempt_numbers_start_at_two(policy: RetryPolicy) -> None:
    with pytest.raises(ValueError, match="2 is the first retry"):
        policy.next_delay(1)


def test_exponential_caps_huge_attempts() -> None:
    assert exponential(max_retries=100_000).next_delay(50_000) == 30.0


def test_exponential_from_zero_stays_zero_for_huge_attempts() -> None:
    policy = exponential(delay=0.0, factor=10.0, max_delay=30.0, max_retries=10_000)
    assert policy.next_delay(300) == policy.next_delay(400) == 0.0  # 10.0**398 overflows


def test_delays_are_floats() -> None:
    assert type(constant(2).next_delay(2)) is float
    assert type(linear(2).next_delay(3)) is float
    assert type(exponential(1, 2, 10).next_delay(3)) is float


def test_factories_build_the_policy_dataclasses() -> None:
    assert never() == Never()
    assert constant(2.0, 3) == Constant(delay=2.0, max_retries=3)
    assert linear(2.0, 3) == Linear(delay=2.0, max_retries=3)
    assert exponential(1.0, 3.0, 9.0, 2, non_retryable=(KeyError,)) == Exponential(
        delay=1.0, factor=3.0, max_delay=9.0, max_retries=2, non_retryable=(KeyError,)
    )
    assert exponential() == Exponential(delay=1.0, factor=2.0, max_delay=30.0, max_retries=5)


def test_policies_are_frozen_and_hashable() -> None:
    policy = constant()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.delay = 2.0  # type: ignore[misc]
    assert len({constant(), constant(), linear()}) == 2


# -- which errors retry --------------------------------------------------------


class Transient(Exception):
    pass


class Permanent(Transient):
    pass


@pytest.mark.parametrize(
    "policy_factory", [constant, linear, exponential], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ValueError("x"), True),
        (StoreError("x"), True),
        (ConflictError("x"), True),
        (asyncio.CancelledError(), False),
        (NondeterminismError("x"), False),
        (ShutdownError("x"), False),
        (KeyboardInterrupt(), False),
    ],
    ids=lambda v: type(v).__name__,
)
def test_default_should_retry(
    policy_factory: type[RetryPolicy], error: BaseException, retried: bool
) -> None:
    assert policy_factory().should_retry(error) is retried


def test_retry_on_and_non_retryable() -> None:
    policy = exponential(retry_on=(Transient,), non_retryable=(Permanent,))
    assert policy.should_retry(Transient())
    assert not policy.should_retry(Permanent())  # non_retryable wins over retry_on
    assert not policy.should_retry(ValueError())  # not in retry_on


def test_sdk_control_errors_never_retry_even_when_listed() -> None:
    policy = constant(retry_on=(BaseException,))
    assert policy.should_retry(KeyError())
    assert not policy.should_retry(asyncio.CancelledError())
    assert not policy.should_retry(NondeterminismError("x"))
    assert not policy.should_retry(ShutdownError("x"))


def test_never_retries_nothing() -> None:
    assert not never().should_retry(ValueError())


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: constant(-1.0), "delay must be a number of seconds >= 0"),
        (lambda: linear(float("nan")), "delay must be a number of seconds >= 0"),
        (lambda: constant(float("inf")), "delay must be finite"),
        (lambda: constant(1.0, -1), "max_retries must be an int >= 0"),
        (lambda: linear(1.0, 2.5), "max_retries must be an int >= 0"),  # type: ignore[arg-type]
        (lambda: exponential(factor=0.5), "factor must be a finite number >= 1"),
        (lambda: exponential(max_delay=-1.0), "max_delay must be a number of seconds >= 0"),
        (lambda: exponential(delay=60.0), r"max_delay \(30.0\) must be >= delay \(60.0\)"),
        (lambda: exponential(max_retries=-3), "max_retries must be an int >= 0"),
    ],
)
def test_invalid_numbers_raise_value_error(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_exception_type_fields_must_be_tuples_of_exception_types() -> None:
    with pytest.raises(TypeError, match=r"write \(KeyError,\)"):
        constant(retry_on=KeyError)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple of exception types"):
        exponential(non_retryable=(int,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple of exception types"):
        Never(retry_on=[ValueError])  # type: ignore[arg-type]
