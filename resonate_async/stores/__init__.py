"""Durable promise stores: the protocol, its backends, and picking one by name.

``PostgresStore`` is loaded on first use, so importing this package never
needs asyncpg.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from ._base import Create, Kind, PromiseRecord, Settle, State, Store
from .memory import MemoryStore
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = (
    "Create",
    "Kind",
    "MemoryStore",
    "PostgresStore",
    "PromiseRecord",
    "SQLiteStore",
    "Settle",
    "State",
    "Store",
    "store_from_spec",
)

DEFAULT_STORE = "resonate.db"
_ACCEPTED = (
    'a Store instance, ":memory:", a file path, "sqlite:///relative/path", '
    '"sqlite:////absolute/path" or "postgresql://user@host/db"'
)


if not TYPE_CHECKING:  # type checkers see the import above, and no catch-all

    def __getattr__(name: str) -> Any:
        if name == "PostgresStore":
            from .postgres import PostgresStore

            return PostgresStore
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def store_from_spec(spec: str | os.PathLike[str] | Store | None) -> Store:
    """The store that ``spec`` names.

    Args:
        spec: one of

            * ``None``: the ``RESONATE_STORE`` environment variable (any form
              below), else the file ``resonate.db``;
            * a ``Store`` instance: itself;
            * ``":memory:"``: a ``MemoryStore`` (no durability);
            * ``"sqlite:///relative/path"`` or ``"sqlite:////absolute/path"``:
              a ``SQLiteStore`` (the path percent-decoded, no query);
            * ``"postgresql://..."`` or ``"postgres://..."``: a
              ``PostgresStore`` (needs the ``postgres`` extra); a
              ``schema=NAME`` query parameter is its ``schema``
              (``postgresql://app@db/app?schema=resonate``);
            * any other string without ``://``, or a path object: a
              ``SQLiteStore`` on that file.

    Returns:
        A store, not yet opened.

    Raises:
        ValueError: ``spec`` is none of the accepted forms.
        ImportError: a PostgreSQL URL was given but asyncpg is not installed.

    Example:
        >>> store_from_spec(":memory:")
        MemoryStore(<0 promises>)
    """
    if spec is None:
        spec = os.environ.get("RESONATE_STORE") or DEFAULT_STORE
    if isinstance(spec, Store):
        return spec
    if isinstance(spec, os.PathLike):
        return SQLiteStore(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"cannot make a store of {spec!r}; pass {_ACCEPTED}")
    if spec == ":memory:":
        return MemoryStore()
    if spec.strip().lower() == ":memory:":  # not a file name anyone means
        raise ValueError(f"cannot make a store of {spec!r}; did you mean ':memory:'?")
    scheme, sep, rest = spec.partition("://")
    if not sep:
        return SQLiteStore(spec)
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        dsn, schema = _schema_parameter(spec)
        return PostgresStore(dsn, schema=schema)
    if scheme == "sqlite":
        # sqlite:///app.db -> "app.db"; sqlite:////var/app.db -> "/var/app.db"
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"{spec!r} has no file path; write {_ACCEPTED}")
        if "?" in rest or "#" in rest:
            raise ValueError(
                f"{spec!r}: a sqlite:// URL takes no query or fragment; give the file's "
                "path alone (percent-encoded where needed, %3F for '?')"
            )
        return SQLiteStore(urllib.parse.unquote(rest[1:]))  # a URL: %20 is a space
    raise ValueError(f"unknown store URL scheme {scheme!r} in {spec!r}; pass {_ACCEPTED}")


def _schema_parameter(url: str) -> tuple[str, str | None]:
    """``url`` without its ``schema=`` query parameter, and that parameter."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return url, None
    if len(schemas) > 1 or not schemas[0]:
        raise ValueError(f"give one non-empty schema= in {url!r}")
    others = [(k, v) for k, v in query if k != "schema"]
    rest = urllib.parse.urlencode(others, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schemas[0]
