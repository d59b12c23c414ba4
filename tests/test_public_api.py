"""The public API is exactly ``__all__``, and every public name is documented."""

from __future__ import annotations

import inspect

import resonate_async
import resonate_async.errors
import resonate_async.retry
import resonate_async.testing

EXPECTED = {
    "BatchResultError", "BatcherStats", "CanceledError", "Clock", "Command", "ConflictError",
    "Context", "Encoder", "EncodingError", "Handle", "Histogram", "JSONEncoder", "Kind",
    "MemoryStore", "NondeterminismError", "NotFoundError", "NotRegisteredError", "Promise",
    "PromiseRecord", "PromiseTimeoutError", "Promises", "Resonate", "ResonateError",
    "RetryPolicy", "RunStats", "SQLiteStore", "ShutdownError", "Stats", "Store", "StoreError",
    "StoreStats", "StoredError", "SystemClock", "State", "constant", "exponential", "linear",
    "never",
}  # fmt: skip


def test_all_is_exactly_the_public_api() -> None:
    assert isinstance(resonate_async.__all__, tuple)
    assert set(resonate_async.__all__) == EXPECTED
    assert len(resonate_async.__all__) == len(EXPECTED)
    for name in resonate_async.__all__:
        assert hasattr(resonate_async, name), name


def test_postgres_store_is_available_lazily() -> None:
    from resonate_async.stores.postgres import PostgresStore

    assert resonate_async.PostgresStore is PostgresStore


def test_every_public_name_has_a_docstring() -> None:
    modules = (resonate_async, resonate_async.errors, resonate_async.retry, resonate_async.testing)
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith(("_", "test_")) or not callable(member):
                        continue
                    assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_the_package_says_it_is_typed() -> None:
    # PEP 561: without the marker, a user's mypy treats the package as untyped.
    from importlib.resources import files

    assert files("resonate_async").joinpath("py.typed").is_file()


def test_the_api_page_documents_every_public_name() -> None:
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    by_module = {
        name
        for module in (resonate_async.errors, resonate_async.retry, resonate_async.testing)
        if f"::: {module.__name__}\n" in page
        for name in module.__all__
    }
    missing = [
        name
        for name in resonate_async.__all__
        if f"::: resonate_async.{name}\n" not in page and name not in by_module
    ]
    assert missing == []
    assert "PostgresStore" in page
