"""Validation of incoming events at the edge; every rule has its own code and reason text.

The code (``user_id_too_long``) labels the rejection metric and the dead-letter header
``Freshrec-Dlq-Code``; the reason is the sentence a producer reads. An event that breaks several
rules is refused for the first of them in this order:

- ``user_id`` and ``item_id`` present;
- ``event_id`` (optional: derived from the content when empty), ``user_id``, ``item_id`` and
  ``session_id`` at most 128 characters and without control characters (the event id travels
  in the ``Nats-Msg-Id`` header);
- ``type`` not ``EVENT_TYPE_UNSPECIFIED`` and a known ``EventType``;
- ``value`` finite, and for ``EVENT_TYPE_RATE`` within ``[rating_min, rating_max]``;
- ``occurred_at`` set, at most ``future_skew_s`` in the future, not before ``earliest_time``;
- ``context`` at most 32 entries, each key and each value at most 256 characters.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from freshrec.v1 import event_pb2

if TYPE_CHECKING:
    from services.ingestion.settings import IngestionSettings

KNOWN_TYPES = frozenset(v.number for v in event_pb2.EventType.DESCRIPTOR.values) - {
    event_pb2.EVENT_TYPE_UNSPECIFIED
}
MAX_ID_CHARS = 128
#: A recommendation id is ours (32 hex digits); anything much longer was not sent back unchanged.
MAX_RECOMMENDATION_ID_CHARS = 64
MAX_CONTEXT_ENTRIES = 32
MAX_CONTEXT_CHARS = 256
#: C0 controls, DEL and C1 controls (Unicode category Cc).
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Rejection:
    """Why one event was refused: a stable code for metrics and a sentence for people."""

    code: str
    reason: str


def derive_event_id(event: event_pb2.Event) -> str:
    """A deterministic id from the event's content, so a retried send of an id-less event dedups."""
    content = event_pb2.Event()
    content.CopyFrom(event)
    content.event_id = ""
    # Deterministic serialisation orders map entries, so equal content gives equal bytes.
    digest = hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()
    return f"derived-{digest[:32]}"


class Validator:
    """Checks events against the configured limits; ``check`` returns None for a valid event."""

    def __init__(
        self,
        *,
        rating_min: float = 1.0,
        rating_max: float = 5.0,
        earliest_time_s: float = 946_684_800.0,  # 2000-01-01T00:00:00Z
        future_skew_s: float = 300.0,
    ) -> None:
        self.rating_min = rating_min
        self.rating_max = rating_max
        self.earliest_s = int(math.floor(earliest_time_s))
        self.earliest_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(earliest_time_s))
        self.future_skew_s = future_skew_s

    def check(
        self, event: event_pb2.Event, now_s: float | None = None, wire_size: int | None = None
    ) -> Rejection | None:
        """Returns why the event is invalid, or None when it may be accepted.

        ``wire_size`` is the event's serialized size when the caller has it (saves computing it).
        """
        event_id = event.event_id
        user_id = event.user_id
        item_id = event.item_id
        session_id = event.session_id
        recommendation_id = event.recommendation_id
        if not user_id:
            return Rejection("user_id_empty", "user_id is empty")
        if not item_id:
            return Rejection("item_id_empty", "item_id is empty")
        if (
            len(event_id) > MAX_ID_CHARS
            or len(user_id) > MAX_ID_CHARS
            or len(item_id) > MAX_ID_CHARS
            or len(session_id) > MAX_ID_CHARS
        ):
            for name, text in (("event_id", event_id), ("user_id", user_id), ("item_id", item_id)):
                if len(text) > MAX_ID_CHARS:
                    return Rejection(f"{name}_too_long", f"{name} is longer than {MAX_ID_CHARS} characters")
            return Rejection("session_id_too_long", f"session_id is longer than {MAX_ID_CHARS} characters")
        if len(recommendation_id) > MAX_RECOMMENDATION_ID_CHARS:
            return Rejection(
                "recommendation_id_too_long",
                f"recommendation_id is longer than {MAX_RECOMMENDATION_ID_CHARS} characters "
                "(send back the id a Recommend or SimilarItems answer carried, unchanged)",
            )
        # One search over all ids (the common case finds nothing), then which one it was.
        if CONTROL_CHARS.search(event_id + user_id + item_id + session_id + recommendation_id):
            for name, text in (
                ("event_id", event_id),
                ("user_id", user_id),
                ("item_id", item_id),
                ("session_id", session_id),
                ("recommendation_id", recommendation_id),
            ):
                if CONTROL_CHARS.search(text):
                    return Rejection(f"{name}_control_char", f"{name} contains a control character")
        event_type = event.type
        if event_type == event_pb2.EVENT_TYPE_UNSPECIFIED:
            return Rejection("type_unspecified", "type is EVENT_TYPE_UNSPECIFIED")
        if event_type not in KNOWN_TYPES:
            return Rejection("type_unknown", f"type {event_type} is not a known EventType")
        value = event.value
        if not math.isfinite(value):
            return Rejection("value_not_finite", f"value {value} is not a finite number")
        if event_type == event_pb2.EVENT_TYPE_RATE and not self.rating_min <= value <= self.rating_max:
            return Rejection(
                "rating_out_of_range",
                f"rating {value:g} is outside the accepted range [{self.rating_min:g}, {self.rating_max:g}]",
            )
        occurred_at = event.occurred_at
        seconds = occurred_at.seconds
        if seconds <= 0 and occurred_at.nanos == 0 and not event.HasField("occurred_at"):
            return Rejection("occurred_at_missing", "occurred_at is not set")
        now = time.time() if now_s is None else now_s
        if seconds > now + self.future_skew_s:
            return Rejection(
                "occurred_at_future",
                f"occurred_at is more than {self.future_skew_s:g} s in the future",
            )
        if seconds < self.earliest_s:
            return Rejection(
                "occurred_at_too_early",
                f"occurred_at is before the earliest accepted time {self.earliest_text}",
            )
        context = event.context
        if context:
            if len(context) > MAX_CONTEXT_ENTRIES:
                return Rejection(
                    "context_too_many_entries",
                    f"context has {len(context)} entries, more than {MAX_CONTEXT_ENTRIES}",
                )
            # An entry over the limit needs more bytes than that on the wire: skip the (slow) map
            # walk for the usual small event.
            if (event.ByteSize() if wire_size is None else wire_size) > MAX_CONTEXT_CHARS:
                for key in context:
                    if len(key) > MAX_CONTEXT_CHARS or len(context[key]) > MAX_CONTEXT_CHARS:
                        return Rejection(
                            "context_entry_too_long",
                            f"context entry {key[:32]!r} is longer than {MAX_CONTEXT_CHARS} characters",
                        )
        return None


def validator_from(settings: IngestionSettings) -> Validator:
    """A Validator configured with the service's limits."""
    return Validator(
        rating_min=settings.rating_min,
        rating_max=settings.rating_max,
        earliest_time_s=settings.earliest_time.timestamp(),
        future_skew_s=settings.future_skew_s,
    )
