"""The default JSON encoder: round trips, canonical bytes, errors that say where."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import decimal
import enum
import json
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resonate_async import Context, Resonate, State, errors
from resonate_async._command import Command
from resonate_async._encoding import Encoder, JSONEncoder, default_encoder, same_params
from resonate_async._error_encoding import NOTE_PREFIX
from resonate_async.errors import EncodingError, StoredError
from resonate_async.retry import never
from resonate_async.testing import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Callable

# -- module-level types, so that decoding can import them ----------------------


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass
class Box:
    items: list[Any]
    label: str = ""


@dataclass
class Holder:
    value: Any


@dataclass
class InsertUser(Command[int]):
    id: int


@dataclass
class Unregistered(Command):
    name: str


@dataclass
class WithDerived:
    base: int
    double: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.double = self.base * 2


class NotADataclass(Command[int]):
    pass


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


class PaymentDeclined(Exception):
    """A custom error with positional args and an extra attribute."""

    def __init__(self, order: str, amount: int) -> None:
        super().__init__(order, amount)
        self.order = order
        self.amount = amount
        self.retryable = False


class KeywordOnly(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"failed with code {code}")
        self.code = code


class SlottedStr(Exception):
    """Its attribute lives in a slot, which BaseException.__reduce__ leaves out."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def __str__(self) -> str:
        return f"code={self.code}"


class MissingData(OSError):
    """An OSError whose constructor takes other arguments than OSError's."""

    def __init__(self, path: str) -> None:
        super().__init__(2, "custom missing", path)


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


ENC = JSONEncoder()
MOD = __name__  # "test_encoding", or "tests.test_encoding" under a package layout
ENC.register_type("InsertUser", InsertUser)


def same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types (1 == 1.0 == True, [1] != (1,))."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)  # nan equals nan, -0.0 differs from 0.0
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


# -- round trips ---------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary(max_size=20)
    | st.sampled_from(Color)
)
keys = st.text(max_size=5) | st.sampled_from(["$", "v", "tuple", "$type"])
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
        | st.builds(Holder, children)
        | st.builds(Box, st.lists(children, max_size=3), st.text(max_size=3))
        | st.builds(Point, st.integers(), st.integers())
        | st.builds(InsertUser, st.integers())
        | st.builds(Unregistered, st.text(max_size=3))
    ),
    max_leaves=20,
)


@given(values)
def test_round_trip_keeps_values_and_types(value: object) -> None:
    assert same(ENC.decode(ENC.encode(value)), value)


@given(values)
def test_output_is_canonical_strict_json(value: object) -> None:
    data = ENC.encode(value)
    assert ENC.encode(ENC.decode(data)) == data
    assert data.isascii()

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads(data, parse_constant=reject)


@given(st.dictionaries(keys, values, min_size=2, max_size=6))
def test_a_dict_keeps_its_key_order_and_any_order_is_the_same_arguments(
    d: dict[str, object],
) -> None:
    # As a Python dict does: a step returning ranked results iterates them
    # back in rank order (sorted keys once turned an error's message around).
    assert list(ENC.decode(ENC.encode(d))) == list(d)  # type: ignore[call-overload]
    flipped = dict(reversed(d.items()))
    assert list(ENC.decode(ENC.encode(flipped))) == list(flipped)  # type: ignore[call-overload]
    assert same_params(ENC, ENC.encode([[d], {}]), ENC.encode([[flipped], {}]))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, b"5"),
        (None, b"null"),
        (True, b"true"),
        ("h\u00e9", b'"h\\u00e9"'),
        (1.5, b"1.5"),
        ({"b": 1, "a": [None]}, b'{"b":1,"a":[null]}'),
        ((1, 2), b'{"$":"tuple","v":[1,2]}'),
        (b"x", b'{"$":"bytes","v":"eA=="}'),
        (math.inf, b'{"$":"float","v":"inf"}'),
        ([-math.inf], b'[{"$":"float","v":"-inf"}]'),
        (InsertUser(5), b'{"$":"InsertUser","id":5}'),
        (Point(1, 2), b'{"$":"%s:Point","x":1,"y":2}' % MOD.encode()),
        (Color.GREEN, b'{"$":"%s:Color","value":"green"}' % MOD.encode()),
        (Perm.READ | Perm.WRITE, b'{"$":"%s:Perm","value":3}' % MOD.encode()),
        ({"$": "tuple", "v": [1]}, b'{"$":"dict","v":[["$","tuple"],["v",[1]]]}'),
    ],
)
def test_stored_format(value: object, expected: bytes) -> None:
    assert ENC.encode(value) == expected
    assert same(ENC.decode(expected), value)


def test_nan_round_trips() -> None:
    decoded = ENC.decode(ENC.encode([math.nan]))
    assert isinstance(decoded, list)
    assert math.isnan(decoded[0])


@dataclass
class Doubled:
    x: int

    def __post_init__(self) -> None:
        self.x *= 2


@dataclass
class Scaled:
    a: int
    scale: dataclasses.InitVar[int]

    def __post_init__(self, scale: int) -> None:
        self.a *= scale


@dataclass
class NonNegative:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("negative")


@dataclass
class Counter:
    name: str
    hits: int = dataclasses.field(init=False, default=0)
    seen: list[str] = dataclasses.field(init=False, default_factory=list)


@dataclass(frozen=True, slots=True)
class FrozenSlots:
    x: int
    half: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", self.x + 1)
        object.__setattr__(self, "half", self.x / 2)


def _bumped(value: Any) -> Any:
    value.n, value.hits = -5, 3  # set after the constructor checked it
    return value


def _counted(value: Counter) -> Counter:
    value.hits += 2
    value.seen.append("a")
    return value


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (Doubled(1), '"x":2'),  # __post_init__ ran once, when it was made
        (Scaled(2, 10), '"a":20'),  # an InitVar is not a field: not needed to rebuild
        (_bumped(NonNegative(1)), '"n":-5'),  # its __post_init__ would refuse it now
        (_counted(Counter("c")), '"name":"c","hits":2,"seen":["a"]'),
        (FrozenSlots(1), '"x":2,"half":1.0'),
    ],
    ids=["post-init", "init-var", "post-init-raises", "init-false", "frozen-slots"],
)
def test_dataclasses_come_back_as_they_were_stored(value: Any, stored: str) -> None:
    # Rebuilt as pickle does: neither __init__ nor __post_init__ runs again,
    # and init=False fields are stored like the others.
    data = ENC.encode(value)
    assert data == f'{{"$":"{MOD}:{type(value).__qualname__}",{stored}}}'.encode()
    decoded = ENC.decode(data)
    assert type(decoded) is type(value)
    assert same(decoded, value)
    assert ENC.encode(decoded) == data


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        # Stored before init=False fields were: rebuilt by the constructor as
        # they were then, which gives the field its default or computes it.
        ('"name":"c"', Counter("c")),
        ('"base":3', WithDerived(3)),
        # A field the class gained since, with a default, takes it.
        ('"items":[1]', Box([1], "")),
    ],
    ids=["init-false-default", "init-false-derived", "new-field"],
)
def test_values_stored_with_fewer_fields_still_decode(stored: str, expected: Any) -> None:
    decoded = ENC.decode(f'{{"$":"{MOD}:{type(expected).__qualname__}",{stored}}}'.encode())
    assert type(decoded) is type(expected)
    assert same(decoded, expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"$":"%s:Point","x":1,"z":2}' % MOD.encode(), "it has no field 'z'"),
        (b'{"$":"%s:Point","x":1}' % MOD.encode(), "its field 'y' is missing and has no default"),
    ],
    ids=["removed-field", "missing-field"],
)
def test_stored_fields_that_do_not_fit_the_class_say_so(data: bytes, message: str) -> None:
    with pytest.raises(EncodingError, match="did the class change") as info:
        ENC.decode(data)
    assert message in str(info.value)


@dataclass
class Lazy:
    key: str
    cache: str = dataclasses.field(init=False)


def test_an_unset_init_false_field_is_left_out() -> None:
    data = ENC.encode(Lazy("k"))
    assert data == f'{{"$":"{MOD}:Lazy","key":"k"}}'.encode()
    assert not hasattr(ENC.decode(data), "cache")
    filled = Lazy("k")
    filled.cache = "v"
    decoded = ENC.decode(ENC.encode(filled))
    assert isinstance(decoded, Lazy) and decoded.cache == "v"


@dataclass
class Guarded:
    key: str
    lock: Any = dataclasses.field(init=False, default_factory=threading.Lock)


def test_an_init_false_field_that_cannot_be_encoded_is_left_out() -> None:
    # As before init=False fields were stored: the value decodes with a new one.
    data = ENC.encode(Guarded("k"))
    assert data == f'{{"$":"{MOD}:Guarded","key":"k"}}'.encode()
    decoded = ENC.decode(data)
    assert isinstance(decoded, Guarded) and decoded.key == "k"
    assert isinstance(decoded.lock, type(threading.Lock()))


def test_an_unset_init_field_is_refused() -> None:
    value = Point(1, 2)
    object.__delattr__(value, "y")
    with pytest.raises(EncodingError, match=r"field 'y' is unset at value\[0\]"):
        ENC.encode([value])


def test_unregistered_command_uses_its_qualified_name() -> None:
    assert ENC.encode(Unregistered("a")) == f'{{"$":"{MOD}:Unregistered","name":"a"}}'.encode()


def test_registered_name_is_needed_to_decode() -> None:
    data = ENC.encode(InsertUser(1))
    with pytest.raises(EncodingError, match=r"'InsertUser'.*register"):
        JSONEncoder().decode(data)


def test_registering_renames_a_type_already_encoded() -> None:
    enc = JSONEncoder()
    old = enc.encode(Point(1, 2))
    assert old == f'{{"$":"{MOD}:Point","x":1,"y":2}}'.encode()
    enc.register_type("Point", Point)
    assert enc.encode(Point(1, 2)) == b'{"$":"Point","x":1,"y":2}'
    assert enc.decode(old) == Point(1, 2)  # values stored before still decode


def test_register_type_rules() -> None:
    enc = JSONEncoder()
    enc.register_type("InsertUser", InsertUser)
    enc.register_type("InsertUser", InsertUser)  # the same pair again is fine
    with pytest.raises(ValueError, match=f"taken by {MOD}:InsertUser"):
        enc.register_type("InsertUser", Point)
    with pytest.raises(ValueError, match="already registered as 'InsertUser'"):
        enc.register_type("Other", InsertUser)
    with pytest.raises(ValueError, match="non-empty str other than"):
        enc.register_type("tuple", Point)
    with pytest.raises(TypeError, match="@dataclass"):
        enc.register_type("NotADataclass", NotADataclass)


def test_default_encoder_is_a_fresh_json_encoder() -> None:
    first: Encoder = default_encoder()
    assert isinstance(first, JSONEncoder)
    assert first is not default_encoder()


# -- values that cannot be encoded ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, "a value of type set at value:"),
        ([Box([0, 1, 2, {3}])], "a value of type set at value[0].items[3]:"),
        ({"a": (1, object())}, "a value of type object at value['a'][1]:"),
        ({"$": [Holder(frozenset())]}, "type frozenset at value['$'][0].value:"),
        (collections.OrderedDict(a=1), "type collections.OrderedDict at value:"),
        ([{1: "a"}], "dict key 1 of type int at value[0]: JSON object keys must be str"),
        (NotADataclass(), f"command {MOD}:NotADataclass at value: a Command must"),
        (bytearray(b"x"), "type bytearray at value:"),
    ],
)
def test_unencodable_values_name_type_and_path(value: object, message: str) -> None:
    with pytest.raises(EncodingError) as info:
        ENC.encode(value)
    assert message in str(info.value)


def test_unencodable_message_says_what_to_do() -> None:
    with pytest.raises(EncodingError, match=r"handles None, bool, .*convert it"):
        ENC.encode({1.5j})


def test_local_classes_are_refused_at_encode_time() -> None:
    @dataclass
    class Local:
        x: int

    with pytest.raises(EncodingError, match=r"defined inside a function.*module level"):
        ENC.encode([Local(1)])


def test_cycles_are_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(EncodingError, match="cycle"):
        ENC.encode(loop)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[1,",
        b"5 x",
        b"\xff",
        b'{"$":"tuple"}',
        b'{"$":"tuple","v":[1],"w":2}',
        b'{"$":"bytes","v":"e A=="}',
        b'{"$":"float","v":"1.5"}',
        b'{"$":"dict","v":[["a"]]}',
        b'{"$":7}',
        b'{"$":"NoSuchName","x":1}',
        b'{"$":"no_such_module:Thing"}',
        b'{"$":"json:dumps"}',
        b'{"$":"%s:Point","x":1}' % MOD.encode(),
        b'{"$":"%s:Color","value":3}' % MOD.encode(),
    ],
)
def test_malformed_data_raises_encoding_error(data: bytes) -> None:
    with pytest.raises(EncodingError, match="cannot"):
        ENC.decode(data)


def test_lone_surrogates_round_trip() -> None:
    assert ENC.decode(ENC.encode(["\ud800"])) == ["\ud800"]


def test_ints_too_long_to_print_are_refused() -> None:
    with pytest.raises(EncodingError, match="digits"):
        ENC.encode(10**5000)
    with pytest.raises(EncodingError, match="digits"):
        ENC.encode([10**5000])


def test_decode_accepts_surrounding_whitespace() -> None:
    assert ENC.decode(b" [1] \n") == [1]


# -- errors --------------------------------------------------------------------


def raise_and_catch(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        KeyError("missing"),
        FileNotFoundError(2, "No such file", "x.txt"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        PaymentDeclined("order-1", 250),
    ],
    ids=type,
)
def test_errors_round_trip_as_their_type(error: BaseException) -> None:
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(error)))
    assert type(decoded) is type(error)
    assert decoded.args == error.args
    assert str(decoded) == str(error)


class CardDeclined(Exception):
    """Its constructor takes other arguments than the message it stores."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"card declined ({code}): {reason}")
        self.code = code


class Formatted(Exception):
    """Its constructor takes one argument, and formats it into its message."""

    def __init__(self, code: object) -> None:
        super().__init__(f"failed with code {code}")
        self.code = code


@pytest.mark.parametrize(
    ("error", "attributes"),
    [
        (CardDeclined(51, "insufficient funds"), {"code": 51}),
        (Formatted(42), {"code": 42}),
        (KeywordOnly(code=7), {"code": 7}),
    ],
    ids=type,
)
def test_errors_whose_constructor_formats_the_message_round_trip(
    error: Exception, attributes: dict[str, object]
) -> None:
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(error)))
    assert type(decoded) is type(error)  # so `except CardDeclined:` catches it
    assert str(decoded) == str(error)
    assert {name: getattr(decoded, name) for name in attributes} == attributes


class ValidationFailed(Exception):
    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__()
        self.errors = errors

    def __str__(self) -> str:
        return f"invalid: {self.errors}"


def test_an_error_whose_message_shows_a_dict_comes_back_as_its_type() -> None:
    # Its constructor refuses the stored (empty) args, so the rebuilt error
    # must print the original message: with sorted keys it did not, and came
    # back as StoredError (an `except ValidationFailed:` missed it).
    error = ValidationFailed({"name": "required", "age": "must be > 0"})
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(error)))
    assert type(decoded) is ValidationFailed
    assert str(decoded) == str(error)


def test_error_attributes_are_restored() -> None:
    decoded = ENC.decode_error(ENC.encode_error(PaymentDeclined("order-1", 250)))
    assert isinstance(decoded, PaymentDeclined)
    assert (decoded.order, decoded.amount, decoded.retryable) == ("order-1", 250, False)


@pytest.mark.parametrize("name", errors.__all__)
def test_sdk_errors_round_trip_as_themselves(name: str) -> None:
    cls = getattr(errors, name)
    error = cls("t.Type", "msg", "tb") if cls is StoredError else cls("what to do next")
    decoded = ENC.decode_error(ENC.encode_error(error))
    assert type(decoded) is cls
    assert str(decoded) == str(error)
    if isinstance(error, StoredError):
        assert isinstance(decoded, StoredError)
        assert (decoded.type, decoded.message, decoded.traceback) == ("t.Type", "msg", "tb")


def test_store_error_keeps_its_message_not_its_cause() -> None:
    try:
        try:
            raise OSError("disk full")
        except OSError as exc:
            raise errors.StoreError("write failed; retry when the disk has space") from exc
    except errors.StoreError as caught:
        decoded = ENC.decode_error(ENC.encode_error(caught))
    assert isinstance(decoded, errors.StoreError)
    assert "disk full" in decoded.__notes__[-1]  # the cause is in the stored traceback


@pytest.mark.parametrize(
    ("error", "type_name", "message"),
    [
        (ValueError({1, 2}), "ValueError", "{1, 2}"),
        (asyncio.CancelledError("stop"), "asyncio.exceptions.CancelledError", "stop"),
        (KeyboardInterrupt(), "KeyboardInterrupt", ""),
        (MissingData("/data/x"), f"{MOD}.MissingData", "[Errno 2] custom missing: '/data/x'"),
    ],
    ids=["unencodable-args", "cancelled", "keyboard-interrupt", "oserror-subclass"],
)
def test_errors_that_cannot_be_rebuilt_become_stored_error(
    error: BaseException, type_name: str, message: str
) -> None:
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(error)))
    assert isinstance(decoded, StoredError)
    assert (decoded.type, decoded.message) == (type_name, message)
    assert decoded.traceback is not None
    assert "raise_and_catch" in decoded.traceback


class InsufficientFunds(Exception):
    def __init__(self, balance: object) -> None:
        super().__init__("balance too low")
        self.balance = balance


class HTTPError(Exception):
    def __init__(self, response: object) -> None:
        super().__init__("HTTP 500")
        self.response = response


class Immutable(Exception):
    """Its attributes cannot be set again once it is made."""

    def __init__(self, code: object) -> None:
        super().__init__(f"code {code}")
        object.__setattr__(self, "code", code)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{name} is read-only")


@pytest.mark.parametrize(
    "error",
    [InsufficientFunds(decimal.Decimal("3.50")), HTTPError(object()), Immutable(7)],
    ids=type,
)
def test_an_error_rebuilt_without_its_attribute_becomes_stored_error(error: Exception) -> None:
    # As its own class it would lack the attribute or hold a wrong one
    # (its constructor called with the message).
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(error)))
    assert isinstance(decoded, StoredError)
    assert (decoded.type, decoded.message) == (f"{MOD}.{type(error).__qualname__}", str(error))


class Slotted(Exception):
    """Its attributes are slots, which BaseException.__reduce__ leaves out."""

    __slots__ = ("__secret", "code")

    def __init__(self, code: int) -> None:
        super().__init__("slot error")
        self.code = code
        self.__secret = code * 2

    def secret(self) -> int:
        return self.__secret


class SlottedOpaque(Slotted):
    __slots__ = ("handle",)

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.handle = object()  # not encodable: the error cannot come back whole


class ConnectionLost(Exception):
    """Its own __reduce__ leaves its connection (a slot) out on purpose."""

    __slots__ = ("connection",)

    def __init__(self, message: str, connection: object = None) -> None:
        super().__init__(message)
        self.connection = connection

    def __reduce__(self) -> tuple[type[ConnectionLost], tuple[object, ...]]:
        return (type(self), self.args)


def test_an_error_whose_own_reduce_leaves_a_slot_out_is_rebuilt_without_it() -> None:
    error = raise_and_catch(ConnectionLost("db down", connection=object()))
    decoded = ENC.decode_error(ENC.encode_error(error))
    assert type(decoded) is ConnectionLost and str(decoded) == "db down"
    assert decoded.connection is None


def test_an_error_with_slots_keeps_their_values() -> None:
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(Slotted(5))))
    assert type(decoded) is Slotted
    assert (decoded.code, decoded.secret(), str(decoded)) == (5, 10, "slot error")
    # Rebuilt by __new__ (its constructor needs the code), then its slot set.
    rebuilt = ENC.decode_error(ENC.encode_error(raise_and_catch(SlottedStr(7))))
    assert type(rebuilt) is SlottedStr and (rebuilt.code, str(rebuilt)) == (7, "code=7")
    opaque = ENC.decode_error(ENC.encode_error(raise_and_catch(SlottedOpaque(5))))
    assert isinstance(opaque, StoredError) and opaque.message == "slot error"


class Batch(BaseExceptionGroup[Exception]):
    """A BaseExceptionGroup subclass, not an Exception, holding Exceptions."""


def _group_failure() -> BaseException:
    # What a workflow's asyncio.TaskGroup raises when two of its tasks fail.
    async def fail(i: int) -> None:
        raise ValueError(f"item {i}")

    async def grouped() -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(2):
                group.create_task(fail(i))

    try:
        asyncio.run(grouped())
    except BaseException as caught:
        return caught
    raise AssertionError("the group did not fail")  # pragma: no cover


def _leaves(error: BaseException) -> list[tuple[type[BaseException], tuple[object, ...]]]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [(type(error), error.args)]


@pytest.mark.parametrize(
    "make",
    [
        _group_failure,
        lambda: ExceptionGroup(
            "outer", [KeyError("k"), ExceptionGroup("inner", [PaymentDeclined("o", 5)])]
        ),
        lambda: Batch("batch", [ValueError("v")]),
    ],
    ids=["task-group", "nested", "base-group"],
)
def test_exception_groups_round_trip_with_their_sub_exceptions(
    make: Callable[[], BaseException],
) -> None:
    error = make()
    decoded = ENC.decode_error(ENC.encode_error(raise_and_catch(error)))
    assert isinstance(decoded, BaseExceptionGroup) and isinstance(error, BaseExceptionGroup)
    assert type(decoded) is type(error)
    assert decoded.message == error.message
    assert str(decoded) == str(error)
    assert _leaves(decoded) == _leaves(error)
    assert decoded.__notes__[-1].startswith(NOTE_PREFIX)  # the group's traceback, once
    assert all(not hasattr(leaf, "__notes__") for leaf in decoded.exceptions)


def test_except_star_matches_a_decoded_task_group_failure() -> None:
    decoded = ENC.decode_error(ENC.encode_error(_group_failure()))
    matched: list[BaseException] = []
    try:
        raise decoded
    except* ValueError as group:
        matched.extend(group.exceptions)
    assert [str(e) for e in matched] == ["item 0", "item 1"]


async def test_a_workflows_task_group_failure_is_caught_by_except_star() -> None:
    resonate = Resonate(MemoryStore(), step_retry_policy=never())

    async def check(ctx: Context, i: int) -> None:
        raise ValueError(f"item {i}")

    @resonate.register(retry_policy=never())
    async def check_all(ctx: Context) -> None:
        async def call(i: int) -> None:
            await ctx.lfc(check, i)

        async with asyncio.TaskGroup() as group:
            for i in range(2):
                group.create_task(call(i))

    async with resonate:
        with pytest.raises(ExceptionGroup) as first_run:
            await resonate.run("r", check_all)
        with pytest.raises(ExceptionGroup) as stored:
            await resonate.get("r")
    for info in (first_run, stored):
        assert info.group_contains(ValueError, match="item 0")
        assert info.group_contains(ValueError, match="item 1")


@pytest.mark.parametrize(
    ("error", "leaf"),
    [
        # A group holding a BaseException would cancel or stop the caller.
        (BaseExceptionGroup("stop", [asyncio.CancelledError()]), None),
        # A leaf that cannot be rebuilt is a StoredError; the group stays a group.
        (ExceptionGroup("g", [HTTPError(object()), ValueError("v")]), f"{MOD}.HTTPError"),
    ],
    ids=["base-exception-leaf", "unencodable-leaf"],
)
def test_exception_groups_that_cannot_be_rebuilt_whole(
    error: BaseException, leaf: str | None
) -> None:
    decoded = ENC.decode_error(ENC.encode_error(error))
    if leaf is None:
        assert isinstance(decoded, StoredError)
        assert decoded.type == "BaseExceptionGroup"
    else:
        assert isinstance(decoded, ExceptionGroup)
        first, second = decoded.exceptions
        assert isinstance(first, StoredError) and first.type == leaf
        assert type(second) is ValueError


def test_local_exception_types_become_stored_error() -> None:
    class Local(Exception):
        pass

    decoded = ENC.decode_error(ENC.encode_error(Local("x")))
    assert isinstance(decoded, StoredError)
    assert decoded.type.endswith("<locals>.Local")


def test_stored_traceback_is_attached_as_one_note() -> None:
    error = raise_and_catch(ValueError("boom"))
    error.add_note("user note")
    once = ENC.decode_error(ENC.encode_error(error))
    twice = ENC.decode_error(ENC.encode_error(raise_and_catch(once)))
    for decoded in (once, twice):
        ours = [n for n in decoded.__notes__ if n.startswith(NOTE_PREFIX)]
        assert len(ours) == 1
        assert "raise_and_catch" in ours[0]
        assert "ValueError: boom" in ours[0]
        assert "user note" in decoded.__notes__
    # The second hop's note holds the first traceback once, not once per hop.
    assert twice.__notes__[-1].count(NOTE_PREFIX) == 2


def test_error_args_with_nan_round_trip() -> None:
    decoded = ENC.decode_error(ENC.encode_error(ValueError(math.inf, "x")))
    assert type(decoded) is ValueError
    assert decoded.args == (math.inf, "x")


def test_error_with_an_unprintable_int_arg_keeps_its_message() -> None:
    decoded = ENC.decode_error(ENC.encode_error(ValueError(10**5000)))
    assert isinstance(decoded, StoredError)
    assert decoded.type == "ValueError"


def test_encode_error_survives_a_broken_str() -> None:
    decoded = ENC.decode_error(ENC.encode_error(BadStr()))
    assert isinstance(decoded, BadStr)


@pytest.mark.parametrize("data", [b"5", b'{"type":"ValueError"}', b"{"])
def test_decode_error_rejects_other_data(data: bytes) -> None:
    with pytest.raises(EncodingError, match="cannot decode"):
        ENC.decode_error(data)


@dataclass
class FlatFields:
    zeta: Any
    alpha: Any
    _under: Any = 0


_SCALARS = st.one_of(st.integers(), st.text(), st.booleans(), st.none(), st.floats())


@given(st.tuples(_SCALARS, _SCALARS, _SCALARS), st.lists(_SCALARS, max_size=4))
def test_the_direct_paths_write_the_same_bytes_as_the_json_encoder(
    fields: tuple[Any, Any, Any], args: list[Any]
) -> None:
    # Dataclasses of ints and strs, and the arguments of a call, skip the walk
    # and the C encoder's call; whatever the values, the bytes must be the
    # ones the general path writes (other values take the general path).
    encoder = JSONEncoder()
    value = FlatFields(*fields)
    encoder.encode(FlatFields(1, "warm"))  # the first encode builds the direct writer
    general = encoder._dump(encoder._walk(value)).encode()
    assert encoder.encode(value) == general
    call = [args, {}]
    assert encoder.encode(call) == encoder._dump(encoder._walk(call)).encode()
    # repr, not ==: a NaN argument decodes to a float that equals nothing.
    assert repr(encoder.decode(encoder.encode(call))) == repr(
        encoder.decode(encoder._dump(call).encode())
    )


def test_an_error_holding_a_value_that_does_not_decode_here_is_a_stored_error() -> None:
    # A handler rejects a command with an error holding the command; a
    # process without that handler (the API reading the run) cannot rebuild
    # the command, but still gets the error's type, message and traceback.
    error = ValueError("duplicate", InsertUser(1))
    data = ENC.encode_error(raise_and_catch(error))
    decoded = JSONEncoder().decode_error(data)  # InsertUser not registered here
    assert isinstance(decoded, StoredError)
    assert decoded.type == "ValueError"
    assert "duplicate" in decoded.message
    assert decoded.traceback


@dataclass
class TaggedList(list[int]):
    tag: str = ""


def test_a_dataclass_deriving_from_a_builtin_is_refused_not_half_stored() -> None:
    value = TaggedList("t")
    value.extend([5, 6])
    with pytest.raises(EncodingError, match="subclass of list"):
        ENC.encode(value)  # it stored the tag and came back as an empty list


class _Picky(JSONEncoder):
    """A custom encoder that breaks the protocol: TypeError, not EncodingError."""

    def encode(self, value: object) -> bytes:
        if isinstance(value, float):
            raise TypeError("no floats here")
        return super().encode(value)


async def test_a_custom_encoders_own_error_on_a_result_settles_the_step() -> None:
    resonate = Resonate(MemoryStore(), encoder=_Picky(), step_retry_policy=never())

    async def ratio(ctx: Context) -> float:
        return 0.5

    @resonate.register(retry_policy=never())
    async def flow(ctx: Context) -> str:
        try:
            await ctx.lfc(ratio)
        except EncodingError:
            return "settled"  # the step's row says so: a replay answers the same
        return "returned"

    async with resonate:
        assert await resonate.run("picky", flow) == "settled"
        step = await resonate.promises.get("picky.1")
        assert step is not None and step.state is State.REJECTED
