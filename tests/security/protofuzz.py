"""Hypothesis strategies for any protobuf message, built from its descriptor: every field may be
missing, empty, huge, out of range, NaN, an unknown enum number, full of control characters."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
# Short strings most of the time, control characters and long ones sometimes.
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.text(min_size=100, max_size=600),
    st.sampled_from(["", " ", "\x00", "a\nb", "é" * 200, "x" * 129, "EVENT_TYPE_VIEW", "drama"]),
)
MAX_DEPTH = 3


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        return st.one_of(st.integers(low, high), st.sampled_from([0, 1, 10, 1000, 1001, low, high]))
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        width = 64 if field.type == F.TYPE_DOUBLE else 32
        return st.one_of(
            st.floats(width=width), st.sampled_from([0.0, 0.5, 1.0, -1.0, 1e300 if width == 64 else 1e30])
        )
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return TEXT
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-5, 1000))  # unknown numbers too
    raise TypeError(f"unsupported field type {field.type} of {field.full_name}")


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with arbitrary field values (nested up to MAX_DEPTH)."""
    cls = GetMessageClass(descriptor)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    if descriptor.full_name == "google.protobuf.Timestamp":
        # Timestamps outside the valid range (year 1..9999) are part of the attack surface.
        return st.builds(
            lambda s, n: cls(seconds=s, nanos=n),
            st.one_of(st.integers(-(2**40), 2**40), st.integers(0, 2_000_000_000)),
            st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),
        )
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = field.message_type.fields_by_name["key"]
            value = field.message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(_value(key, depth), _value(value, depth), max_size=40)
        elif field.is_repeated:
            optional[field.name] = st.lists(_value(field, depth), max_size=8 if depth else 40)
        else:
            optional[field.name] = _value(field, depth)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = getattr(message, name)
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, Message):
                    field[k].CopyFrom(v)
                else:
                    field[k] = v
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, Message):
                    field.add().CopyFrom(v)
                else:
                    field.append(v)
        elif isinstance(value, Message):
            field.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message
