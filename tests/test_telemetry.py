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
