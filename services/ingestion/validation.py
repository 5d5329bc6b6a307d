"""Validation of incoming events at the edge; every rule has its own reason text."""

from __future__ import annotations

import hashlib

from freshrec.v1 import event_pb2

KNOWN_TYPES = frozenset(v.number for v in event_pb2.EventType.DESCRIPTOR.values) - {
    event_pb2.EVENT_TYPE_UNSPECIFIED
}


def derive_event_id(event: event_pb2.Event) -> str:
    """A deterministic id from the event's content, so a retried send of an id-less event dedups."""
    content = event_pb2.Event()
    content.CopyFrom(event)
    content.event_id = ""
    # Deterministic serialisation orders map entries, so equal content gives equal bytes.
    digest = hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()
    return f"derived-{digest[:32]}"


def validate_event(event: event_pb2.Event) -> str | None:
    """Returns why the event is invalid, or None when it may be accepted."""
    if not event.user_id:
        return "user_id is empty"
    if not event.item_id:
        return "item_id is empty"
    if event.type == event_pb2.EVENT_TYPE_UNSPECIFIED:
        return "type is EVENT_TYPE_UNSPECIFIED"
    if event.type not in KNOWN_TYPES:
        return f"type {event.type} is not a known EventType"
    if not event.HasField("occurred_at"):
        return "occurred_at is not set"
    return None
