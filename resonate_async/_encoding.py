"""How arguments and values become bytes in the store, and back.

The default ``JSONEncoder`` writes compact JSON (no whitespace, ASCII
only) that keeps a dict's key order, so a dict decodes in the order it was
written, as it does in Python. Equal values may therefore encode to other
bytes (``{"a":1,"b":2}``, ``{"b":2,"a":1}``): the engine compares a run's
arguments with the stored ones as bytes first, then as decoded values (see
``same_values``).

Tag format. JSON has no tuples, bytes, non-finite floats or classes, so such
values are written as a JSON object holding the reserved key ``"$"``:

    (1, 2)                  {"$":"tuple","v":[1,2]}
    b"x"                    {"$":"bytes","v":"eA=="}       (base64)
    float("nan")            {"$":"float","v":"nan"}        (also "inf", "-inf")
    Point(1, 2)             {"$":"pkg.mod:Point","x":1,"y":2}
    InsertUser(5)           {"$":"InsertUser","id":5}      (a registered type)
    Color.RED               {"$":"pkg.mod:Color","value":1}
    {"$": 1, "a": 2}        {"$":"dict","v":[["$",1],["a",2]]}

A user dict is written as itself unless it has the key ``"$"``; then it is
escaped as the list of its items, so a tagged object is never ambiguous.
Dataclasses and enums are rebuilt on decode by importing ``module:qualname``
(which imports that module). An enum member is looked up by its value. A
dataclass is stored with every field (``init=False`` ones too) and rebuilt
as pickle and copy do: ``cls.__new__(cls)``, then each field set, so neither
``__init__`` nor ``__post_init__`` runs again and the value comes back as it
was stored. Only fields are stored: an attribute ``__post_init__`` sets
without declaring it as a field is not restored. An ``init=False`` field
that is unset or cannot be encoded (a lock) is left out; a value stored
without one (or stored before they were) is rebuilt by calling the class
with its other fields, which gives the field its default.

Errors are records of such values; ``_error_encoding.py`` holds how they
are written and rebuilt, and ``JSONEncoder`` hands its error methods to
the ``resonate_async._error_encoding.ErrorCodec`` it owns.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
import inspect
import json
import reprlib
from binascii import a2b_base64, b2a_base64
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from ._command import Command
from ._error_encoding import ErrorCodec, import_attr, type_name
from .errors import EncodingError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from _typeshed import DataclassInstance

__all__ = ("Encoder", "JSONEncoder", "default_encoder")

_NoneType: Final = type(None)
# Values of these types are JSON as they are (nan and inf are tagged afterwards,
# on the rare ValueError, so that the common case never checks a float).
_PLAIN: Final = frozenset((str, int, bool, float, _NoneType))
_STR: Final = frozenset((str,))
# Builtin types holding data of their own: a dataclass deriving from one is refused.
_DATA_BASES: Final = frozenset(
    (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray)
)
# Kinds of tagged object; registered type names may not take them.
_KINDS: Final = frozenset(("tuple", "bytes", "float", "dict"))
_NONFINITE: Final = frozenset(("nan", "inf", "-inf"))
_SUPPORTED: Final = (
    "the JSON encoder handles None, bool, int, float, str, bytes, list, tuple, "
    "dict with str keys, dataclasses and Enum members"
)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


class Encoder(Protocol):
    """Turns values and errors into bytes for the store, and back.

    Pass an implementation as ``Resonate(encoder=...)``. To tell whether a
    run id reused with arguments is the same run or a conflicting one
    (``ConflictError``), the engine compares the encoded arguments: the same
    bytes are the same call; other bytes are decoded with ``decode`` and are
    the same call if the values are equal and of the same types all the way
    down (``1`` is not ``1.0`` or ``True``; dicts in any key order). So
    ``encode`` need not give equal bytes for equal values, but ``decode`` must
    rebuild them faithfully; bytes that fail to decode count as different.
    """

    def encode(self, value: object) -> bytes:
        """Encode a value; raise ``EncodingError`` if it cannot be encoded."""
        ...

    def decode(self, data: bytes) -> object:
        """Decode what ``encode`` wrote; raise ``EncodingError`` on bad data."""
        ...

    def encode_error(self, error: BaseException) -> bytes:
        """Encode an exception. Never fails for an exception's content."""
        ...

    def decode_error(self, data: bytes) -> BaseException:
        """Rebuild an exception written by ``encode_error``."""
        ...

    def register_type(self, name: str, cls: type) -> None:
        """Encode instances of ``cls`` under ``name`` (used for command types)."""
        ...


class _Unencodable(Exception):
    """Raised inside the walk; ``path`` is filled in while unwinding."""

    def __init__(self, what: str, advice: str) -> None:
        super().__init__(what)
        self.what = what
        self.advice = advice
        self.path: list[str] = []


def _no_default(value: object) -> object:  # pragma: no cover - the walk leaves only JSON
    raise TypeError(f"unexpected {type(value).__name__} after the walk")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class JSONEncoder:
    """The default ``Encoder``: compact JSON that keeps dict order, no pickle.

    Handles ``None``, ``bool``, ``int``, ``float`` (``nan`` and ``inf`` too),
    ``str``, ``bytes``, ``list``, ``tuple`` (decoded as a tuple), ``dict`` with
    ``str`` keys, dataclass instances (``Command`` included) and ``Enum``
    members, nested freely. Types are matched exactly: a subclass of
    ``dict`` or ``int`` that is not an ``Enum`` is refused rather than
    silently decoded as its base class. A dataclass stores every field and
    decodes without calling ``__init__`` or ``__post_init__``, as pickle
    does. The module docstring shows the tags.

    Example:
        >>> enc = JSONEncoder()
        >>> enc.encode({"b": (1, b"x"), "a": None})
        b'{"b":{"$":"tuple","v":[1,{"$":"bytes","v":"eA=="}]},"a":null}'
        >>> enc.decode(enc.encode((1, b"x")))
        (1, b'x')
    """

    def __init__(self) -> None:
        self._names: dict[type, str] = {}
        self._classes: dict[str, type] = {}
        self._walkers: dict[type, Callable[[Any], object]] = {
            list: self._walk_list,
            dict: self._walk_dict,
            tuple: self._walk_tuple,
            bytes: self._walk_bytes,
        }
        # Dataclasses whose fields are ints and strs (most commands) are
        # written directly, without the walk and the C encoder's call (see
        # _flat_writer); the output is the same bytes.
        self._flat: dict[type, Callable[[Any], str | None]] = {}
        # How to rebuild the class of each tag met in decoding.
        self._rebuilders: dict[str, Callable[[dict[str, Any]], object]] = {}
        decoder = json.JSONDecoder(object_hook=self._hook)
        self._decoder = decoder
        # The C scanner: parse one value at an index, with no whitespace handling.
        self._scan: Callable[[str, int], tuple[object, int]] = decoder.scan_once  # type: ignore[attr-defined]
        # The C encoder, built once: json.dumps would rebuild it on every call.
        c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
        if c_make_encoder is not None:
            make = c_make_encoder(
                None, _no_default, encode_basestring_ascii, None, ":", ",", False, False, False
            )
            self._dumps: Callable[[object], str] = lambda obj: "".join(make(obj, 0))
        else:  # pragma: no cover - CPython always has the C encoder
            self._dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
        self._errors = ErrorCodec(self._walk_or_none, self._dump, self.decode)

    # -- registration ----------------------------------------------------------

    def register_type(self, name: str, cls: type) -> None:
        """Encode instances of the dataclass (or Enum) ``cls`` as ``name``.

        The engine calls this for every command type, so stored commands carry
        their registered name instead of ``module:qualname`` and survive a
        move of the class. Registering the same pair twice is a no-op.

        Raises:
            ValueError: ``name`` is empty or reserved (``tuple``, ``bytes``,
                ``float``, ``dict``), or either side is already registered
                with another partner.
            TypeError: ``cls`` is neither a dataclass nor an Enum.
        """
        if not isinstance(name, str) or not name or name in _KINDS:
            raise ValueError(
                f"cannot register {cls!r} as {name!r}: the name must be a non-empty str "
                f"other than {', '.join(sorted(_KINDS))}"
            )
        if not isinstance(cls, type) or not (
            dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)
        ):
            raise TypeError(
                f"cannot register {cls!r} as {name!r}: only dataclasses and Enum types "
                "can be registered; decorate the class with @dataclass"
            )
        if self._classes.get(name, cls) is not cls:
            raise ValueError(
                f"cannot register {_qualified(cls)} as {name!r}: the name is taken by "
                f"{_qualified(self._classes[name])}; choose another name"
            )
        if self._names.get(cls, name) != name:
            raise ValueError(
                f"cannot register {_qualified(cls)} as {name!r}: it is already "
                f"registered as {self._names[cls]!r}"
            )
        self._classes[name] = cls
        self._names[cls] = name
        self._walkers.pop(cls, None)
        self._flat.pop(cls, None)
        self._rebuilders.pop(name, None)

    # -- values ----------------------------------------------------------------

    def encode(self, value: object) -> bytes:
        """Encode ``value`` as compact JSON bytes (a dict in its key order).

        Raises:
            EncodingError: ``value`` holds something the encoder cannot
                handle; the message names its type and where it is, as a
                path such as ``value[0].items[3]``.
        """
        t = type(value)
        # Scalars skip the walk and the JSON encoder entirely.
        if t is int:
            try:
                return b"%d" % value  # type: ignore[str-format]
            except ValueError as exc:  # more digits than sys.get_int_max_str_digits()
                raise EncodingError(f"cannot encode int at value: {exc}") from None
        if t is str:
            return encode_basestring_ascii(value).encode()  # type: ignore[arg-type]
        if value is None:
            return b"null"
        if t is bool:
            return b"true" if value else b"false"
        if t is float and value - value == 0.0:  # type: ignore[operator]
            return float.__repr__(value).encode()
        try:
            flat = self._flat.get(t)
            if flat is not None and (text := flat(value)) is not None:
                return text.encode()
            if (
                t is list
                and len(value) == 2  # type: ignore[arg-type]
                and type(args := value[0]) is list  # type: ignore[index]
                and type(kwargs := value[1]) is dict  # type: ignore[index]
                and not kwargs
                and _PLAIN.issuperset(map(type, args))
            ):
                # The arguments of a call, `[[1, "a"], {}]`: the shape every
                # run encodes, with nothing to walk.
                text = _flat_items(args)
                if text is not None:
                    return f"[[{text}],{{}}]".encode()
                return self._dump(value).encode()
            return self._dump(self._walk(value)).encode()
        except _Unencodable as exc:
            where = "value" + "".join(reversed(exc.path))
            raise EncodingError(f"cannot encode {exc.what} at {where}: {exc.advice}") from None
        except RecursionError:
            raise EncodingError(
                "cannot encode value: it contains a reference cycle or is nested too deeply"
            ) from None
        except ValueError as exc:  # an int with too many digits, deep inside
            raise EncodingError(f"cannot encode value: {exc}") from None

    def _dump(self, walked: object) -> str:
        try:
            return self._dumps(walked)
        except ValueError:  # nan or inf somewhere (or an int too long: raised again)
            return self._dumps(_tag_nonfinite(walked))

    def _walk(self, v: object) -> object:
        """Return ``v`` as plain JSON types (a new object only where needed)."""
        t = type(v)
        if t in _PLAIN:
            return v
        walker = self._walkers.get(t)
        if walker is None:
            walker = self._walker_for(t)
        return walker(v)

    def _walk_list(self, v: list[object] | tuple[object, ...]) -> list[object]:
        # A C-speed scan; no copy when every item is already JSON.
        if type(v) is list and _PLAIN.issuperset(map(type, v)):
            return v
        try:
            return [x if type(x) in _PLAIN else self._walk(x) for x in v]
        except _Unencodable as exc:
            exc.path.append(f"[{self._first_failure(enumerate(v))}]")
            raise

    def _first_failure(self, items: Iterable[tuple[object, object]]) -> object:
        """The index or key of the first item that fails (only on the error path)."""
        for label, x in items:  # pragma: no branch - one item is known to fail
            try:
                self._walk(x)
            except _Unencodable:
                return label
        return "?"  # pragma: no cover

    def _walk_or_none(self, items: list[object] | tuple[object, ...]) -> list[object] | None:
        """``items`` walked, or ``None`` if one cannot be encoded (an error's args)."""
        try:
            return self._walk_list(items)
        except (_Unencodable, RecursionError, ValueError):
            return None

    def _walk_tuple(self, v: tuple[object, ...]) -> object:
        return {"$": "tuple", "v": self._walk_list(v)}

    def _walk_dict(self, v: dict[object, object]) -> object:
        if _STR.issuperset(map(type, v)):
            if "$" not in v and _PLAIN.issuperset(map(type, v.values())):
                return v
        else:
            k = next(k for k in v if type(k) is not str)
            raise _Unencodable(
                f"dict key {_short.repr(k)} of type {type_name(type(k))}",
                "JSON object keys must be str; convert the keys (e.g. with str())",
            )
        try:
            if "$" in v:
                return {"$": "dict", "v": [[k, self._walk(x)] for k, x in v.items()]}
            return {k: x if type(x) in _PLAIN else self._walk(x) for k, x in v.items()}
        except _Unencodable as exc:
            exc.path.append(f"[{self._first_failure(v.items())!r}]")
            raise

    @staticmethod
    def _walk_bytes(v: bytes) -> object:
        return {"$": "bytes", "v": b2a_base64(v, newline=False).decode("ascii")}

    def _walker_for(self, t: type) -> Callable[[Any], object]:
        """Build (and cache) the walker for a dataclass or Enum type."""
        tag = self._names.get(t)
        if dataclasses.is_dataclass(t):
            kind = "dataclass"
            builtin = next((b for b in t.__mro__ if b in _DATA_BASES), None)
            if builtin is not None:  # its fields are stored, its builtin part would be lost
                raise _Unencodable(
                    f"dataclass {_qualified(t)}, a subclass of {builtin.__name__}",
                    f"only its fields would be stored, not its {builtin.__name__} contents; "
                    "keep those in a field instead",
                )
        elif issubclass(t, enum.Enum):
            kind = "Enum"
        elif issubclass(t, Command):
            raise _Unencodable(
                f"command {_qualified(t)}", "a Command must be a dataclass: add @dataclass"
            )
        elif hasattr(t, "__await__"):  # a Promise (a generator function yields it twice)
            raise _Unencodable(
                f"an awaitable {type_name(t)}",
                "it is a call still to be awaited, not its value: await it (in a "
                "generator function, `yield` it once more) and store what that gives",
            )
        else:
            raise _Unencodable(
                f"a value of type {type_name(t)}",
                f"{_SUPPORTED}; convert it to one of those, or give Resonate(encoder=...) "
                "an encoder that handles it",
            )
        if tag is None:
            if "<locals>" in t.__qualname__:
                raise _Unencodable(
                    f"{kind} {t.__module__}.{t.__qualname__}",
                    "it is defined inside a function, so it could not be imported to decode "
                    "it; define it at module level",
                )
            tag = _qualified(t)
        walker: Callable[[Any], object]
        if kind == "Enum":

            def walker(v: enum.Enum) -> object:
                try:
                    return {"$": tag, "value": self._walk(v.value)}
                except _Unencodable as exc:
                    exc.path.append(".value")
                    raise

        else:
            # Every field, init=False ones too: decoding sets them as they are.
            fields = dataclasses.fields(cast("type[DataclassInstance]", t))
            names = tuple(f.name for f in fields)
            not_init = frozenset(f.name for f in fields if not f.init)
            walk = self._walk

            def walker(v: object) -> object:
                out: dict[str, object] = {"$": tag}
                name = ""
                try:
                    for name in names:
                        x = getattr(v, name)
                        out[name] = x if type(x) in _PLAIN else walk(x)
                except _Unencodable as exc:
                    if name in not_init:
                        return self._walk_leaving_out(v, tag, fields)
                    exc.path.append(f".{name}")
                    raise
                except AttributeError:  # a field never set
                    return self._walk_leaving_out(v, tag, fields)
                return out

        self._walkers[t] = walker
        if kind == "dataclass":
            self._flat[t] = _flat_writer(tag, names)
        return walker

    def _walk_leaving_out(
        self, v: object, tag: str, fields: tuple[dataclasses.Field[Any], ...]
    ) -> object:
        """A dataclass with a field that is unset or cannot be encoded.

        Such an ``init=False`` field (a cache filled later, a lock) is left
        out, and decoding rebuilds the value by its constructor, which gives
        the field its default; such an ``init`` field is refused.
        """
        out: dict[str, object] = {"$": tag}
        for f in fields:
            try:
                x = getattr(v, f.name)
            except AttributeError:
                if f.init:
                    raise _Unencodable(
                        f"dataclass {type_name(type(v))} whose field {f.name!r} is unset",
                        "set every field of a dataclass before it is stored",
                    ) from None
                continue
            try:
                out[f.name] = self._walk(x)
            except _Unencodable as exc:
                if not f.init:
                    continue
                exc.path.append(f".{f.name}")
                raise
        return out

    def decode(self, data: bytes) -> object:
        """Decode bytes written by ``encode``.

        Raises:
            EncodingError: ``data`` is not valid JSON or holds a malformed
                tag, an unknown type name or fields its class rejects.
        """
        if data == b"null":
            return None
        try:
            text = data.decode()
            value, end = self._scan(text, 0)
        except EncodingError:
            raise
        except RecursionError:
            raise EncodingError("cannot decode: the JSON is nested too deeply") from None
        except (StopIteration, ValueError, TypeError, AttributeError):
            # StopIteration: nothing parseable at index 0 (empty, leading space).
            return self._decode_slow(data)
        if end != len(text) and text[end:].strip():
            raise EncodingError(
                f"cannot decode {_short.repr(data)}: extra data after the JSON value at index {end}"
            )
        return value

    def _decode_slow(self, data: object) -> object:
        """Decode the rare input the fast path refused, or say exactly why not."""
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"expected bytes, got {type(data).__name__}")
            return self._decoder.decode(bytes(data).decode())
        except EncodingError:
            raise
        except (ValueError, TypeError) as exc:
            raise EncodingError(f"cannot decode {_short.repr(data)}: {exc}") from exc

    def _hook(self, d: dict[str, Any]) -> object:
        """Rebuild a tagged object; called by the JSON parser, innermost first."""
        if "$" not in d:
            return d
        tag = d["$"]
        if type(tag) is str and tag not in _KINDS:
            return self._rebuild(tag, d)
        v = d.get("v")
        if len(d) == 2:
            if tag == "tuple" and type(v) is list:
                return tuple(v)
            if tag == "bytes" and type(v) is str:
                try:
                    return a2b_base64(v, strict_mode=True)
                except binascii.Error as exc:
                    raise EncodingError(f"cannot decode bytes {_short.repr(v)}: {exc}") from None
            if tag == "float" and v in _NONFINITE:
                return float(v)
            if (
                tag == "dict"
                and type(v) is list
                and all(type(p) is list and len(p) == 2 and type(p[0]) is str for p in v)
            ):
                return dict(v)
        raise EncodingError(f"cannot decode malformed tagged object {_short.repr(d)}")

    def _rebuild(self, tag: str, d: dict[str, Any]) -> object:
        rebuild = self._rebuilders.get(tag)
        if rebuild is None:
            cls = self._classes.get(tag) or self._import(tag)
            rebuild = self._rebuilders[tag] = self._rebuilder_for(cls)
        del d["$"]  # the parser made d for us alone; what is left are the fields
        try:
            return rebuild(d)
        except EncodingError:
            raise
        except Exception as exc:
            raise EncodingError(
                f"cannot rebuild {tag} from the stored fields {_short.repr(d)}: {exc!r}; "
                "did the class change since the value was stored?"
            ) from exc

    def _rebuilder_for(self, cls: type) -> Callable[[dict[str, Any]], object]:
        if issubclass(cls, enum.Enum):
            return lambda d: cls(d["value"])
        fields = dataclasses.fields(cast("type[DataclassInstance]", cls))
        names = frozenset(f.name for f in fields)
        new = cls.__new__
        setattr_ = object.__setattr__
        # As pickle and copy do: no __init__ or __post_init__ runs again, so the
        # value comes back as it was stored. Fields kept in the instance's
        # __dict__ are filled in one update; slots (a data descriptor on the
        # class) are set one by one, past a frozen class's __setattr__.
        in_dict = cls.__dictoffset__ != 0 and not any(
            hasattr(inspect.getattr_static(cls, name, None), "__set__") for name in names
        )

        def rebuild(d: dict[str, Any]) -> object:
            if d.keys() != names:
                return _rebuild_partial(cls, fields, d)
            obj = new(cls)
            if in_dict:
                obj.__dict__.update(d)
            else:
                for name, x in d.items():
                    setattr_(obj, name, x)
            return obj

        return rebuild

    def _import(self, tag: str) -> type:
        module, sep, qualname = tag.partition(":")
        if not sep:
            raise EncodingError(
                f"cannot decode a value of type {tag!r}: no type is registered under that "
                "name; register its command handler (or the type) before decoding"
            )
        try:
            cls = import_attr(module, qualname)
        except Exception as exc:
            raise EncodingError(f"cannot decode a value of type {tag}: {exc!r}") from exc
        if not isinstance(cls, type) or not (
            dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)
        ):
            raise EncodingError(f"cannot decode a value of type {tag}: not a dataclass or Enum")
        return cls

    # -- errors ----------------------------------------------------------------

    def encode_error(self, error: BaseException) -> bytes:
        """Encode an exception: its type, message, traceback text, args and state.

        An exception group holding only ``Exception`` instances (what an
        ``asyncio.TaskGroup`` raises) also stores them, each encoded the same
        way but without its traceback (the group's shows them all). If an
        arg or attribute cannot be encoded, the args are not stored and the
        error decodes as ``StoredError`` with its type name and message;
        this method does not fail on them.
        """
        return self._errors.encode(error)

    def decode_error(self, data: bytes) -> BaseException:
        """Rebuild an exception written by ``encode_error``.

        The original class is rebuilt as ``cls(*args)`` when it can be
        imported and is an ``Exception`` subclass; a class whose constructor
        takes other arguments than the ``args`` it stores (``CardDeclined(code,
        reason)`` calling ``super().__init__(message)``) is rebuilt without
        calling its constructor, and kept only if it then prints the stored
        message (else ``StoredError``). Its attributes and ``args`` (so its
        message) are restored. An exception group is rebuilt as its class
        with its decoded sub-exceptions, so ``except*`` still matches them.
        Otherwise the result is a ``StoredError`` with the type
        name, message and traceback. Either way, the stored traceback is
        attached as a note (PEP 678) beginning with
        :data:`~resonate_async._error_encoding.NOTE_PREFIX`, so it prints
        below the new traceback. ``BaseException``-only types
        (``CancelledError``, ``KeyboardInterrupt``, ...) always decode as
        ``StoredError``: re-raising them would cancel or stop the caller.

        Raises:
            EncodingError: ``data`` is not an encoded error.
        """
        return self._errors.decode(data)


def _rebuild_partial(
    cls: type, fields: tuple[dataclasses.Field[Any], ...], d: dict[str, Any]
) -> object:
    """Rebuild a dataclass from stored fields that are not exactly its fields.

    A value stored without an ``init=False`` field (it was unset or not
    encodable, or stored before such fields were) is rebuilt by the
    constructor, as it was before, which fills the field in (with its
    default, or as ``__post_init__`` computes it). A field the class gained
    since, with a default, takes its default. Anything else means the class
    changed in a way the stored value cannot follow.
    """
    by_name = {f.name: f for f in fields}
    unknown = sorted(d.keys() - by_name.keys())
    if unknown:
        raise EncodingError(
            f"cannot rebuild {_qualified(cls)} from the stored fields {_short.repr(d)}: "
            f"it has no field {', '.join(map(repr, unknown))}; did the class change "
            "since the value was stored?"
        )
    missing = [f for name, f in by_name.items() if name not in d]
    if any(not f.init for f in missing):
        built = cls(**{k: x for k, x in d.items() if by_name[k].init})
        for k, x in d.items():
            if not by_name[k].init:
                object.__setattr__(built, k, x)
        return built
    obj = cls.__new__(cls)  # type: ignore[call-overload]  # cls is a dataclass
    for f in missing:
        if f.default is not dataclasses.MISSING:
            d[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d[f.name] = f.default_factory()
        else:
            raise EncodingError(
                f"cannot rebuild {_qualified(cls)} from the stored fields {_short.repr(d)}: "
                f"its field {f.name!r} is missing and has no default; did the class change "
                "since the value was stored?"
            )
    for k, x in d.items():
        object.__setattr__(obj, k, x)
    return obj


def _tag_nonfinite(obj: object) -> object:
    """Copy a walked value, tagging nan and inf (which JSON cannot hold)."""
    t = type(obj)
    if t is float:
        return obj if obj - obj == 0.0 else {"$": "float", "v": repr(obj)}  # type: ignore[operator]
    if t is list:
        return [_tag_nonfinite(x) for x in obj]  # type: ignore[attr-defined]
    if t is dict:
        return {k: _tag_nonfinite(x) for k, x in obj.items()}  # type: ignore[attr-defined]
    return obj


def default_encoder() -> JSONEncoder:
    """Return a new ``JSONEncoder``, the encoder ``Resonate`` uses by default."""
    return JSONEncoder()


def same_values(a: object, b: object) -> bool:
    """Whether two decoded values are the same: equal, of the same types all
    the way down (``1`` is not ``1.0`` or ``True``; a dataclass field by
    field), dicts in any key order."""
    t = type(a)
    if t is not type(b):
        return False
    if t is dict:
        return a.keys() == b.keys() and all(  # type: ignore[attr-defined]
            same_values(x, b[k])  # type: ignore[index]
            for k, x in a.items()  # type: ignore[attr-defined]
        )
    if t is list or t is tuple:
        return len(a) == len(b) and all(  # type: ignore[arg-type]
            map(same_values, a, b)  # type: ignore[call-overload]
        )
    if t is float and a != a:  # nan
        return b != b
    if dataclasses.is_dataclass(t) and not isinstance(a, enum.Enum):
        names = [f.name for f in dataclasses.fields(t)]
        return same_values(
            [getattr(a, n, None) for n in names], [getattr(b, n, None) for n in names]
        )
    return a == b


def same_params(
    encoder: Encoder,
    a: bytes | None,
    b: bytes | None,
    signature: inspect.Signature | None = None,
) -> bool:
    """Whether two encoded argument lists are the same call's: the same bytes,
    or values that decode the same (a dict's keys in another order), or,
    given the function's ``signature``, that bind its parameters to the same
    values (``f(1)``, ``f(a=1)`` and ``f(1, b=2)`` where ``b`` defaults to 2)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    try:
        decoded_a, decoded_b = encoder.decode(a), encoder.decode(b)
        if same_values(decoded_a, decoded_b):
            return True
        if signature is None:
            return False
        bound_a, bound_b = _bound(signature, decoded_a), _bound(signature, decoded_b)
        return bound_a is not None and bound_b is not None and same_values(bound_a, bound_b)
    except Exception:  # not decodable here: not known to be the same
        return False


def _bound(signature: inspect.Signature, params: object) -> dict[str, Any] | None:
    """The parameters ``[args, kwargs]`` give a function of ``signature``
    (after its context), defaults included; ``None`` if they do not bind."""
    if not (type(params) is list and len(params) == 2):
        return None
    args, kwargs = params
    if type(args) is not list or type(kwargs) is not dict:
        return None
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in _TAKES_CONTEXT:
        # (A decorator's wrapper, fn(*args, **kwargs): what its arguments
        # mean is the wrapped function's to say.)
        return None
    try:
        bound = signature.replace(parameters=parameters[1:]).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


# The kinds of a first parameter that is the context, and only it.
_TAKES_CONTEXT = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


# How the C encoder writes the scalars that the direct paths take.
_FLAT: dict[type, Callable[[Any], str]] = {int: int.__repr__, str: encode_basestring_ascii}


def _flat_items(items: list[object]) -> str | None:
    """``items`` as the C encoder writes them, comma-separated, if all are ints
    and strs; else ``None``."""
    parts: list[str] = []
    for x in items:
        write = _FLAT.get(type(x))
        if write is None:
            return None
        parts.append(write(x))
    return ",".join(parts)


def _flat_writer(tag: str, names: tuple[str, ...]) -> Callable[[Any], str | None]:
    """Write a dataclass whose fields hold ints and strs as the C encoder would.

    That is ``{"$":tag,...}`` with the fields in their order and no spaces;
    any other field value returns ``None`` and the value takes the general
    path.
    """
    head = '{"$":' + encode_basestring_ascii(tag)
    keys = [(name, "," + encode_basestring_ascii(name) + ":") for name in names]

    def write(v: object) -> str | None:
        parts = [head]
        try:
            for name, key in keys:
                x = getattr(v, name)
                scalar = _FLAT.get(type(x))
                if scalar is None:
                    return None
                parts.append(key + scalar(x))
        except AttributeError:  # a field never set: the general path says what to do
            return None
        parts.append("}")
        return "".join(parts)

    return write
