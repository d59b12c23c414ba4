"""OpenTelemetry spans, opt-in: run, step, batch (linked to its runs) and store commit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from resonate_async import Command, Context, MemoryStore, Resonate
from resonate_async.retry import never

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")


@dataclass
class Ping(Command[str]):
    n: int


async def test_spans_for_fresh_executions_with_batch_links() -> None:
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    # An explicit provider: the SDK never touches the global one.
    resonate = Resonate(MemoryStore(), tracer_provider=provider)

    async def pong(ctx: Context, cmds: list[Ping]) -> list[str]:
        return [f"pong{c.n}" for c in cmds]

    async def step(ctx: Context) -> int:
        return 1

    resonate.register_command_handler(Ping, pong, retry_policy=never())

    @resonate.register(name="wf")
    async def wf(ctx: Context, n: int) -> str:
        await ctx.lfc(step)
        return await ctx.lfc(Ping(n))

    async with resonate:
        assert await asyncio.gather(*(resonate.run(f"r{i}", "wf", i) for i in range(3))) == [
            "pong0",
            "pong1",
            "pong2",
        ]
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("resonate.run") == 3 and names.count("resonate.step") == 3
    assert "resonate.store.commit" in names
    runs = {s.attributes["resonate.id"]: s for s in spans if s.name == "resonate.run"}
    for s in spans:
        if s.name == "resonate.step":
            assert s.parent is not None and s.parent.span_id in {
                r.context.span_id for r in runs.values()
            }
    batches = [s for s in spans if s.name == "resonate.batch"]
    linked = {link.context.span_id for b in batches for link in b.links}
    assert linked == {r.context.span_id for r in runs.values()}  # a batch is a fan-in
    assert all("resonate.size" in b.attributes for b in batches)
    provider.shutdown()


def test_tracing_off_by_default_costs_nothing() -> None:
    from resonate_async._telemetry import Tracing

    assert Tracing(False).current() is None


async def test_a_run_span_is_a_child_of_the_callers_span_not_of_starts() -> None:
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("app")
    resonate = Resonate(MemoryStore(), tracer_provider=provider)

    async def step(ctx: Context) -> int:
        return 1

    @resonate.register(name="wf", retry_policy=never())
    async def wf(ctx: Context, fail: bool) -> int:
        await ctx.lfc(step)
        if fail:
            raise ValueError("boom")
        return 1

    with tracer.start_as_current_span("app.startup"):
        await resonate.start()
    try:
        with tracer.start_as_current_span("app.request") as request:
            assert await resonate.run("ok", "wf", False) == 1
            with pytest.raises(ValueError):
                await resonate.run("bad", "wf", True)
        assert await resonate.run("outside", "wf", False) == 1  # no span current
    finally:
        await resonate.aclose()
    spans = exporter.get_finished_spans()
    startup = next(s for s in spans if s.name == "app.startup")
    runs = {s.attributes["resonate.id"]: s for s in spans if s.name == "resonate.run"}
    assert runs["ok"].parent is not None
    assert runs["ok"].parent.span_id == request.get_span_context().span_id
    assert runs["outside"].parent is None
    for span in spans:  # commits and batches belong to no caller, least of all start()'s
        if span.name == "resonate.store.commit":
            assert span.parent is None or span.parent.span_id != startup.context.span_id
    from opentelemetry.trace import StatusCode

    assert runs["bad"].status.status_code is StatusCode.ERROR
    assert runs["ok"].status.status_code is StatusCode.UNSET
    provider.shutdown()


async def test_a_body_sees_the_context_variables_of_its_caller() -> None:
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    resonate = Resonate(MemoryStore())

    @resonate.register(name="echo")
    async def echo(ctx: Context) -> str:
        return request_id.get()

    request_id.set("startup")
    async with resonate:
        request_id.set("request-42")
        assert await resonate.run("a", "echo") == "request-42"
        request_id.set("request-43")
        assert await resonate.run("b", "echo") == "request-43"
