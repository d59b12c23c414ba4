"""How errors become bytes in the store, and back.

An error is written as a record, a JSON object with the keys ``"type"``,
``"message"``, ``"traceback"``, ``"args"`` and ``"state"`` (plus
``"exceptions"``, the records of an exception group's sub-exceptions)::

    ValueError("x", 1)      {"args":["x",1],"message":"('x', 1)",
                             "traceback":"...","type":"ValueError"}

``args`` and ``state`` (the error's attributes) are what pickle would store
for it, written as values are (see ``_encoding.py``, whose
:class:`~resonate_async.JSONEncoder` owns an :class:`ErrorCodec` and lends it
its walk, its JSON writer and its decoder). An error is rebuilt as its
original class when it can be imported (by its constructor, or by
``__new__`` when the constructor takes other arguments than the error's
``args``); otherwise, or when an arg or attribute could not be stored, as
:class:`~resonate_async.errors.StoredError`. Either way the stored traceback
comes back as a note beginning with :data:`NOTE_PREFIX`.

It also holds :func:`type_name` and :func:`import_attr`, which the value
encoder uses too: this module imports nothing from ``_encoding.py``, so the
two never import each other.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import reprlib
import traceback
from typing import TYPE_CHECKING, Any, Final

from .errors import EncodingError, StoredError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ("NOTE_PREFIX", "ErrorCodec", "import_attr", "type_name")

_NoneType: Final = type(None)
# Marks the note that carries a decoded error's stored traceback.
NOTE_PREFIX: Final = "Stored traceback (where the error was raised, maybe in another process):\n"
_MAX_TRACEBACK: Final = 16_384
_MAX_CACHED: Final = 1024
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def type_name(cls: type) -> str:
    """The name a traceback would print for ``cls``: builtins bare, others dotted.

    It is an error record's ``"type"``, and how the value encoder's messages
    name a type.
    """
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def import_attr(module: str, qualname: str) -> object:
    """Import ``module`` and return the object ``qualname`` names in it."""
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class ErrorCodec:
    """Encodes exceptions as records and rebuilds them, for a value encoder.

    It writes no JSON itself: the :class:`~resonate_async.JSONEncoder` that
    owns it gives it ``walk`` (a sequence of values as a list of plain JSON
    types, or ``None`` if one cannot be encoded), ``dump`` (plain JSON types
    as compact JSON text) and ``decode`` (its ``decode``). The encoder's
    ``encode_error`` and ``decode_error`` document what is stored and how it
    comes back.
    """

    def __init__(
        self,
        walk: Callable[[list[object] | tuple[object, ...]], list[object] | None],
        dump: Callable[[object], str],
        decode: Callable[[bytes], object],
    ) -> None:
        self._walk = walk
        self._dump = dump
        self._decode = decode
        self._classes: dict[str, type[BaseException] | None] = {}

    def encode(self, error: BaseException) -> bytes:
        """The record of ``error``, with its traceback, as JSON bytes."""
        record = self._record(error)
        record["traceback"] = _format_traceback(error)
        try:
            return self._dump(record).encode()
        except ValueError:  # an int too long to print: keep type, message and traceback
            kept = ("type", "message", "traceback")
            return self._dump({k: record[k] for k in kept}).encode()

    def _record(self, error: BaseException) -> dict[str, object]:
        cls = type(error)
        try:
            message = str(error)
        except Exception:
            message = f"<unprintable {cls.__name__} object>"
        record: dict[str, object] = {"type": type_name(cls), "message": message}
        args, state = _reduce(error)
        if isinstance(error, BaseExceptionGroup):
            # Its args hold the sub-exceptions, which are stored apart. A group
            # holding a BaseException (a CancelledError) stays a StoredError.
            args = None
            if all(isinstance(sub, Exception) for sub in error.exceptions):
                try:
                    record["exceptions"] = [self._record(sub) for sub in error.exceptions]
                    args = (error.message,)
                except RecursionError:  # groups nested too deeply
                    record.pop("exceptions", None)
        if args is not None:
            stored_args = self._walk(args)
            if stored_args is None:
                return _without_fields(record)
            record["args"] = stored_args
        if state:
            values = self._walk(list(state.values()))
            if values is None:
                return _without_fields(record)
            record["state"] = dict(zip(state, values, strict=True))
        return record

    def decode(self, data: bytes) -> BaseException:
        """The error ``data`` holds; raise ``EncodingError`` if it holds none."""
        try:
            record = self._decode(data)
        except EncodingError:
            # A value in it (an arg, an attribute) does not decode here: its
            # class is gone, or registered only where a handler is. Kept as
            # what it was (a StoredError of its type, message and traceback).
            try:
                record = json.loads(data)
            except ValueError:
                raise EncodingError(f"cannot decode an error from {_short.repr(data)}") from None
            if type(record) is dict:
                record = _without_fields(record)
        error = self._error_from(record)
        if error is None:
            raise EncodingError(f"cannot decode an error from {_short.repr(data)}")
        return error

    def _error_from(self, record: object) -> BaseException | None:
        """The error a record holds, or ``None`` if it is not a record."""
        if not (
            type(record) is dict
            and type(record.get("type")) is str
            and type(record.get("message")) is str
            and type(record.get("traceback", "")) in (str, _NoneType)
            and type(record.get("args", [])) is list
            and type(record.get("state", {})) is dict
            and type(record.get("exceptions", [])) is list
        ):
            return None
        name: str = record["type"]
        tb: str | None = record.get("traceback")
        error: BaseException | None = None
        cls = self._class(name)
        args = record.get("args")
        subs: list[BaseException] | None = None
        if "exceptions" in record:
            subs = []
            for sub_record in record["exceptions"]:
                sub = self._error_from(sub_record)
                if sub is None:
                    return None
                subs.append(sub)
        if cls is not None and args is not None and (subs is not None) is _is_group(cls):
            if subs is not None:
                args = [*args, subs]
            error = _construct(cls, args, record.get("state", {}), record["message"])
        if error is None:
            error = StoredError(name, record["message"], tb)
        if tb:
            error.add_note(NOTE_PREFIX + tb)
        return error

    def _class(self, name: str) -> type[BaseException] | None:
        if name in self._classes:
            return self._classes[name]
        cls: object = None
        parts = name.split(".")
        if len(parts) == 1:
            parts.insert(0, "builtins")
        for i in range(len(parts) - 1, 0, -1):
            try:
                cls = import_attr(".".join(parts[:i]), ".".join(parts[i:]))
                break
            except Exception:
                continue
        # A BaseExceptionGroup of Exceptions is rebuilt too; other
        # BaseException-only types would cancel or stop the caller.
        found = (
            cls
            if isinstance(cls, type) and (issubclass(cls, Exception) or _is_group(cls))
            else None
        )
        if len(self._classes) >= _MAX_CACHED:  # names come from data: stay bounded
            self._classes.clear()
        self._classes[name] = found
        return found


def _without_fields(record: dict[str, object]) -> dict[str, object]:
    """``record`` when an arg or attribute of its error cannot be stored.

    Rebuilt without it, the error would lack the attribute or hold a wrong one
    (its constructor given the message): it decodes as a StoredError instead.
    """
    for key in ("args", "state", "exceptions"):
        record.pop(key, None)
    return record


def _is_group(cls: type) -> bool:
    return issubclass(cls, BaseExceptionGroup)


def _construct(
    cls: type[BaseException], args: list[Any], state: dict[str, Any], message: str
) -> BaseException | None:
    """An instance of ``cls`` rebuilt from its reduced ``args`` and ``state``
    (its ``__dict__``); ``message`` is what ``str()`` gave originally.

    By its constructor if it takes ``args``, else by ``__new__`` alone, which
    is kept only if the result prints the original message (a class with
    slots or a constructor of its own would come back incomplete).
    """
    error: object = None
    constructed = True
    try:
        error = cls(*args)
    except Exception:
        constructed = False
        with contextlib.suppress(Exception):
            error = cls.__new__(cls, *args)
    if not isinstance(error, BaseException):
        return None
    try:
        for key, attr in state.items():
            setattr(error, key, attr)
    except Exception:  # an attribute it would lack: not the error that was raised
        return None
    if _prints(error, message):
        return error
    # A constructor that formats its message (super().__init__(f"... {code}"))
    # formats the stored message again: then the stored args are the message.
    with contextlib.suppress(Exception):
        error.args = tuple(args)
    return error if constructed or _prints(error, message) else None


def _prints(error: BaseException, message: str) -> bool:
    try:
        return str(error) == message
    except Exception:
        return False


def _reduce(error: BaseException) -> tuple[tuple[object, ...] | None, dict[str, object]]:
    """The constructor args and attributes that rebuild ``error``, as pickle would."""
    try:
        reduced = error.__reduce__()
    except Exception:
        return None, {}
    if not (
        isinstance(reduced, tuple)
        and len(reduced) >= 2
        and reduced[0] is type(error)
        and type(reduced[1]) is tuple
    ):
        return None, {}
    state = reduced[2] if len(reduced) > 2 and isinstance(reduced[2], dict) else {}
    notes = state.get("__notes__")
    if isinstance(notes, list):
        # Our own note is already inside the traceback text; keep only the user's.
        kept = [n for n in notes if not (isinstance(n, str) and n.startswith(NOTE_PREFIX))]
        state = (
            {**state, "__notes__": kept}
            if kept
            else {k: v for k, v in state.items() if k != "__notes__"}
        )
    state = {k: v for k, v in state.items() if type(k) is str}
    if type(error).__reduce__ is BaseException.__reduce__:  # it keeps __dict__ only
        for name in _slot_names(type(error)):
            with contextlib.suppress(AttributeError):
                state.setdefault(name, getattr(error, name))
    return reduced[1], state


def _slot_names(cls: type) -> list[str]:
    """The attributes ``__slots__`` give ``cls`` and its bases (as set, mangled)."""
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"
            names.append(name)
    return names


def _format_traceback(error: BaseException) -> str:
    text = "".join(traceback.format_exception(error))
    if len(text) > _MAX_TRACEBACK:
        # The innermost frames and the notes at the end matter most.
        cut = len(text) - _MAX_TRACEBACK
        text = f"[{cut} characters of traceback omitted]\n" + text[cut:]
    return text
