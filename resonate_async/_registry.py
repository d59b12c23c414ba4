"""The registry: ``(name, version)`` to function, command type to handler."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from enum import Enum
from types import CodeType
from typing import TYPE_CHECKING, Any

from .errors import NotRegisteredError, SignatureError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .retry import RetryPolicy


class CallStyle(Enum):
    """How a user function is driven."""

    ASYNC = "async"  # awaited in the event loop
    SYNC = "sync"  # run in a worker thread; a leaf
    GENERATOR = "generator"  # driven by yielding promises (blog-era style)


# By code object: the closures a workflow makes on every run share their
# def's code, so the cache neither grows with runs nor keeps those closures
# (and what they capture) alive. Callables without code (partials, objects
# with __call__) are classified on each call.
_styles: dict[CodeType, CallStyle] = {}
_MAX_STYLES = 4096  # code compiled at run time (exec, eval) could be endless


def call_style(fn: Callable[..., Any]) -> CallStyle:
    """Classify ``fn``; cached by its code, because steps ask on every call."""
    code = getattr(fn, "__code__", None)
    style = _styles.get(code) if code is not None else None
    if style is None:
        # A callable object is called through its __call__.
        # (Not a class: calling one builds an instance, whatever its __call__.)
        plain = code is not None or isinstance(fn, type)
        call = fn if plain else getattr(fn, "__call__", None)  # noqa: B004
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call):
            style = CallStyle.ASYNC
        elif inspect.isgeneratorfunction(fn) or inspect.isgeneratorfunction(call):
            style = CallStyle.GENERATOR
        elif inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(call):
            raise TypeError(
                f"{function_name(fn)} is an async generator: a durable function "
                "returns its value (an `async def` without `yield`)"
            )
        elif callable(fn):
            style = CallStyle.SYNC
        else:
            raise TypeError(f"{fn!r} is not callable; pass a function or a Command instance")
        # A function marked with inspect.markcoroutinefunction is not its code.
        if type(code) is CodeType and "_is_coroutine_marker" not in getattr(fn, "__dict__", ()):
            if len(_styles) >= _MAX_STYLES:
                _styles.clear()
            _styles[code] = style
    return style


def function_name(fn: Callable[..., Any]) -> str:
    """The default name of a function: its ``__qualname__``; a partial's is its
    function's, a callable object's its class's. Never a ``repr``, whose
    memory address would differ in the process that replays the call."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name or type(fn).__qualname__)


class Arity:
    """What a durable function accepts after its ``Context``, to check a call's
    arguments when it is made: a run whose arguments cannot bind would be
    stored and fail, and its id would then be taken by those arguments."""

    __slots__ = ("least", "most", "signature")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in _POSITIONAL]
        required_keywords = any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params)
        # Without keyword arguments, a count in [least, most] always binds
        # (the fast path); anything else is bound to find out (and say why).
        self.least = sum(1 for p in positional if p.default is p.empty) - 1
        self.most: int | None = len(positional) - 1
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            self.most = None
        if required_keywords:
            self.least = self.most = -1  # never the fast path

    def check(
        self, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Raise :class:`SignatureError` unless ``fn(ctx, *args, **kwargs)`` binds
        (``fn``: the function, or the name to give it in the message)."""
        count = len(args)
        most = self.most
        if not kwargs and self.least <= count and (most is None or count <= most):
            return
        try:
            self.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            name = fn if isinstance(fn, str) else function_name(fn)
            raise SignatureError(
                f"{name} cannot be called with these arguments: {exc} "
                "(it is called as fn(ctx, *args, **kwargs))"
            ) from None


_POSITIONAL = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
)
_arities: dict[CodeType, Arity | None] = {}


def arity(fn: Callable[..., Any], *, cache: bool = False) -> Arity | None:
    """``fn``'s :class:`Arity`, or None if it is not checked.

    Raises :class:`SignatureError` if ``fn`` cannot take a ``Context`` first.
    A function a decorator wrapped is checked against the wrapper's own
    signature (usually ``*args, **kwargs``): the wrapped one need not be what
    the wrapper accepts. With ``cache`` (steps ask on every call), only a
    plain function is checked, kept by its code object: not a partial or a
    callable object (whose signature would be read on every call), nor a
    wrapper (whose code many wrapped functions share).
    """
    code = None
    if cache:
        code = getattr(fn, "__code__", None)
        if type(code) is not CodeType or inspect.ismethod(fn) or hasattr(fn, "__wrapped__"):
            return None  # (a bound method shares its function's code, not its signature)
        if "__signature__" in getattr(fn, "__dict__", ()):
            return None
        if code in _arities:
            return _arities[code]
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):  # a builtin without a signature: not checked
        found = None
    else:
        try:
            signature.bind_partial(None)
        except TypeError:
            raise SignatureError(
                f"{function_name(fn)} takes no Context: a durable function is called "
                "as fn(ctx, *args, **kwargs); give it a first parameter `ctx: Context`"
            ) from None
        found = Arity(signature)
    if code is not None:
        if len(_arities) >= _MAX_STYLES:
            _arities.clear()
        _arities[code] = found
    return found


@dataclass(slots=True, frozen=True)
class FunctionEntry:
    """A registered function."""

    fn: Callable[..., Any]
    name: str
    version: int
    style: CallStyle
    retry_policy: RetryPolicy
    timeout: float | None
    arity: Arity | None = None

    @property
    def signature(self) -> inspect.Signature | None:
        """The function's signature, where its calls are checked (see ``Arity``)."""
        return None if self.arity is None else self.arity.signature


@dataclass(slots=True, frozen=True)
class HandlerEntry:
    """A registered command handler and its batch settings."""

    command_type: type
    name: str
    handler: Callable[..., Any]
    style: CallStyle
    maxlen: int | None
    max_wait: float
    concurrency: int
    retry_policy: RetryPolicy
    queue_size: int | None


class Registry:
    """Functions by ``(name, version)`` and by identity; handlers by command type."""

    __slots__ = ("_by_fn", "_by_id", "_by_key", "_handlers", "_newest")

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], FunctionEntry] = {}
        self._by_fn: dict[Callable[..., Any], FunctionEntry] = {}
        # Callable objects that cannot be hashed (a dataclass with __call__), by identity.
        self._by_id: dict[int, FunctionEntry] = {}
        self._newest: dict[str, FunctionEntry] = {}
        self._handlers: dict[type, HandlerEntry] = {}

    def add_function(self, entry: FunctionEntry) -> None:
        """Register ``entry``; re-registering the same key with another function fails."""
        key = (entry.name, entry.version)
        existing = self._by_key.get(key)
        # `!=`, not `is not`: each `obj.method` is a new bound method, equal to the last.
        if existing is not None and existing.fn != entry.fn:
            raise ValueError(
                f"{entry.name!r} version {entry.version} is already registered to "
                f"{existing.fn!r}; register the new function under another name or version"
            )
        try:
            hash(entry.fn)
        except TypeError:
            self._by_id[id(entry.fn)] = entry
        else:
            self._by_fn[entry.fn] = entry
        self._by_key[key] = entry
        newest = self._newest.get(entry.name)
        if newest is None or newest.version <= entry.version:
            self._newest[entry.name] = entry

    def check_handler(self, entry: HandlerEntry) -> None:
        """Raise ``ValueError`` if :meth:`add_handler` would refuse ``entry``."""
        if entry.command_type in self._handlers:
            raise ValueError(
                f"a handler for {entry.command_type.__qualname__} is already registered; "
                "register one handler per command type"
            )

    def add_handler(self, entry: HandlerEntry) -> None:
        """Register a command handler; one per command type."""
        self.check_handler(entry)
        self._handlers[entry.command_type] = entry

    def function(self, fn_or_name: Callable[..., Any] | str) -> FunctionEntry:
        """The entry for a function object or name (newest version of a name)."""
        entry = (
            self._newest.get(fn_or_name)
            if isinstance(fn_or_name, str)
            else self.lookup_fn(fn_or_name)
        )
        if entry is None:
            shown = fn_or_name if isinstance(fn_or_name, str) else function_name(fn_or_name)
            raise NotRegisteredError(
                f"function {shown!r} is not registered; decorate it with "
                "@resonate.register (or call resonate.register(fn)) before running it"
            )
        return entry

    def lookup_newest(self, name: str) -> FunctionEntry | None:
        """The newest version registered under ``name``, if any."""
        return self._newest.get(name)

    def lookup_fn(self, fn: Callable[..., Any]) -> FunctionEntry | None:
        """The entry of a registered function object, if any."""
        try:
            return self._by_fn.get(fn)
        except TypeError:  # a callable object that cannot be hashed
            return self._by_id.get(id(fn))

    def lookup(self, name: str, version: int) -> FunctionEntry | None:
        """The entry registered under exactly ``(name, version)``, if any."""
        return self._by_key.get((name, version))

    def keys(self) -> list[tuple[str, int]]:
        """Every registered ``(name, version)``."""
        return list(self._by_key)

    def handler(self, command_type: type) -> HandlerEntry:
        """The handler entry of a command type."""
        entry = self._handlers.get(command_type)
        if entry is None:
            raise NotRegisteredError(
                f"no handler is registered for command type {command_type.__qualname__}; "
                f"call resonate.register_command_handler({command_type.__qualname__}, handler)"
            )
        return entry

    def handlers(self) -> list[HandlerEntry]:
        """Every registered handler entry."""
        return list(self._handlers.values())


def check_count(name: str, value: object, *, optional: bool = False) -> None:
    """Raise unless ``value`` is an int (not a bool) of at least 1, or None when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int (or None)" if optional else "an int"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < 1:
        alternative = " (or None)" if optional else ""
        raise ValueError(f"{name} must be at least 1{alternative}, got {value}")
