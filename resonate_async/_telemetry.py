"""Optional OpenTelemetry spans (the ``[otel]`` extra; opt in with ``Resonate(tracing=True)``).

Spans, only for fresh executions (a replayed step is not executed, so it has
no span): ``resonate.run``, ``resonate.step``, ``resonate.batch`` (linked to
the span of each run whose command it serves: a batch is a fan-in) and
``resonate.store.commit``. Attributes are namespaced ``resonate.*`` and carry
ids, counts and kinds, never payloads. The tracer comes from the global
provider the application configured; this module never installs one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from .stores._base import State

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

__all__ = ("Tracing",)

T = TypeVar("T")


class Tracing:
    """Wraps awaitables in spans. Callers test ``enabled`` first, so tracing off costs
    one attribute read and no extra coroutine."""

    __slots__ = ("_trace", "_tracer", "enabled")

    def __init__(self, enabled: bool, provider: Any = None) -> None:
        enabled = enabled or provider is not None
        self.enabled = enabled
        self._tracer: Any = None
        if enabled:
            try:
                from opentelemetry import trace
            except ImportError:
                raise ImportError(
                    'tracing=True needs opentelemetry-api: pip install "resonate-async[otel]"'
                ) from None
            self._trace = trace
            self._tracer = (
                trace.get_tracer("resonate_async")
                if provider is None
                else provider.get_tracer("resonate_async")
            )

    def current(self) -> Any:
        """The current span's context, to link a batch to the runs it serves."""
        return self._trace.get_current_span().get_span_context() if self.enabled else None

    async def traced(
        self,
        awaitable: Awaitable[T],
        name: str,
        attributes: dict[str, Any],
        links: Sequence[Any] = (),
        *,
        settles: bool = False,
    ) -> T:
        """Await ``awaitable`` inside a span named ``name`` (callers check ``enabled`` first).

        With ``settles``, the awaitable gives a call's ``(state, ...)``: a
        state other than RESOLVED marks the span as an error, as an exception
        would (a call's failure is returned to be settled, not raised).
        """
        link = self._trace.Link
        valid = [link(c) for c in links if c is not None and c.is_valid]
        with self._tracer.start_as_current_span(name, attributes=attributes, links=valid) as span:
            result = await awaitable
            if settles:
                state = result[0]  # type: ignore[index]
                if state is not State.RESOLVED:
                    span.set_status(self._trace.StatusCode.ERROR, state.value)
            return result
