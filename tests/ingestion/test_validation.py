"""Every validation rule, each with its own code and reason, and the configurable limits."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from freshrec.v1 import event_pb2
from services.ingestion.settings import IngestionSettings
from services.ingestion.validation import Validator, derive_event_id, validator_from
from tests.factories import event

NOW = 1_800_000_000.0


def valid(**fields: object) -> event_pb2.Event:
    e = event("user-1", "item-1", event_id="e-1", at=NOW - 60)
    e.session_id = "s-1"
    e.recommendation_id = "0f8e2c3a9b1d4e5f8a7b6c5d4e3f2a1b"
    e.context["device"] = "web"
    for name, value in fields.items():
        setattr(e, name, value)
    return e


def rejection(e: event_pb2.Event, validator: Validator | None = None) -> tuple[str, str] | None:
    r = (validator or Validator()).check(e, now_s=NOW)
    return None if r is None else (r.code, r.reason)


def test_a_well_formed_event_passes() -> None:
    assert rejection(valid()) is None
    assert rejection(valid(event_id="")) is None  # the id is derived later
    rated = valid(type=event_pb2.EVENT_TYPE_RATE, value=4.5)
    assert rejection(rated) is None


LONG = "x" * 129
CONTROL = "bad\nid"


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"user_id": ""}, "user_id_empty", "user_id is empty"),
        ({"item_id": ""}, "item_id_empty", "item_id is empty"),
        ({"user_id": LONG}, "user_id_too_long", "user_id is longer than 128 characters"),
        ({"item_id": LONG}, "item_id_too_long", "item_id is longer than 128 characters"),
        ({"event_id": LONG}, "event_id_too_long", "event_id is longer than 128 characters"),
        ({"session_id": LONG}, "session_id_too_long", "session_id is longer than 128 characters"),
        ({"user_id": CONTROL}, "user_id_control_char", "user_id contains a control character"),
        ({"item_id": "a\x00b"}, "item_id_control_char", "item_id contains a control character"),
        (
            {"event_id": "e\r\nNats-Expected-Stream: X"},
            "event_id_control_char",
            "event_id contains a control character",
        ),
        ({"session_id": "s\x7f"}, "session_id_control_char", "session_id contains a control character"),
        (
            {"recommendation_id": "r" * 65},
            "recommendation_id_too_long",
            "recommendation_id is longer than 64 characters (send back the id a Recommend or "
            "SimilarItems answer carried, unchanged)",
        ),
        (
            {"recommendation_id": "r\t1"},
            "recommendation_id_control_char",
            "recommendation_id contains a control character",
        ),
        ({"user_id": "u\x85"}, "user_id_control_char", "user_id contains a control character"),
        ({"type": event_pb2.EVENT_TYPE_UNSPECIFIED}, "type_unspecified", "type is EVENT_TYPE_UNSPECIFIED"),
        ({"type": 99}, "type_unknown", "type 99 is not a known EventType"),
        ({"value": math.nan}, "value_not_finite", "value nan is not a finite number"),
        ({"value": math.inf}, "value_not_finite", "value inf is not a finite number"),
        (
            {"type": event_pb2.EVENT_TYPE_RATE, "value": 6.0},
            "rating_out_of_range",
            "rating 6 is outside the accepted range [1, 5]",
        ),
        (
            {"type": event_pb2.EVENT_TYPE_RATE, "value": 0.0},
            "rating_out_of_range",
            "rating 0 is outside the accepted range [1, 5]",
        ),
    ],
)
def test_each_rule_has_its_own_code_and_reason(fields: dict[str, object], code: str, reason: str) -> None:
    assert rejection(valid(**fields)) == (code, reason)


def test_occurred_at_rules() -> None:
    missing = valid()
    missing.ClearField("occurred_at")
    assert rejection(missing) == ("occurred_at_missing", "occurred_at is not set")

    future = valid()
    future.occurred_at.FromSeconds(int(NOW) + 301)
    assert rejection(future) == ("occurred_at_future", "occurred_at is more than 300 s in the future")
    near_future = valid()
    near_future.occurred_at.FromSeconds(int(NOW) + 299)  # within the allowed clock skew
    assert rejection(near_future) is None

    old = valid()
    old.occurred_at.FromSeconds(int(datetime(1999, 12, 31, tzinfo=UTC).timestamp()))
    assert rejection(old) == (
        "occurred_at_too_early",
        "occurred_at is before the earliest accepted time 2000-01-01T00:00:00Z",
    )


def test_context_rules() -> None:
    crowded = valid()
    for n in range(33):
        crowded.context[f"k{n}"] = "v"
    assert rejection(crowded) == ("context_too_many_entries", "context has 34 entries, more than 32")

    full = valid()
    for n in range(31):
        full.context[f"k{n}"] = "v"
    assert rejection(full) is None  # 32 entries are fine

    long_value = valid()
    long_value.context["page"] = "p" * 257
    assert rejection(long_value) == (
        "context_entry_too_long",
        "context entry 'page' is longer than 256 characters",
    )
    long_key = valid()
    long_key.context["k" * 257] = "v"
    assert rejection(long_key)[0] == "context_entry_too_long"  # type: ignore[index]
    at_limit = valid()
    at_limit.context["k" * 256] = "v" * 256
    assert rejection(at_limit) is None
    # Characters, not bytes: 256 two-byte characters are within the limit.
    wide = valid()
    wide.context["page"] = "é" * 256
    assert rejection(wide) is None


def test_limits_come_from_the_settings() -> None:
    settings = IngestionSettings(
        rating_min=0.0,
        rating_max=10.0,
        earliest_time=datetime(1990, 1, 1, tzinfo=UTC),
        future_skew_s=10.0,
    )
    validator = validator_from(settings)
    assert rejection(valid(type=event_pb2.EVENT_TYPE_RATE, value=9.5), validator) is None
    assert rejection(valid(type=event_pb2.EVENT_TYPE_RATE, value=10.5), validator) == (
        "rating_out_of_range",
        "rating 10.5 is outside the accepted range [0, 10]",
    )
    backfill = valid()
    backfill.occurred_at.FromSeconds(int(datetime(1995, 6, 1, tzinfo=UTC).timestamp()))
    assert rejection(backfill, validator) is None  # a backfill lowered the earliest time
    ahead = valid()
    ahead.occurred_at.FromSeconds(int(NOW) + 11)
    assert rejection(ahead, validator) == (
        "occurred_at_future",
        "occurred_at is more than 10 s in the future",
    )


def test_settings_refuse_an_empty_rating_range() -> None:
    with pytest.raises(ValueError, match="rating_min"):
        IngestionSettings(rating_min=5.0, rating_max=1.0)


def test_limits_are_in_the_environment_and_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_MAX_BATCH", "77")
    monkeypatch.setenv("FRESHREC_EARLIEST_TIME", "1980-01-01T00:00:00Z")
    monkeypatch.setenv("FRESHREC_FUTURE_SKEW_S", "5")
    settings = IngestionSettings()
    assert settings.max_batch == 77
    assert settings.earliest_time == datetime(1980, 1, 1, tzinfo=UTC)
    assert settings.future_skew_s == 5.0
    fields = IngestionSettings.model_fields
    for name in ("max_batch", "rating_min", "rating_max", "earliest_time", "future_skew_s"):
        assert fields[name].description, name


def test_derived_ids_are_deterministic_and_content_based() -> None:
    a = valid(event_id="")
    b = valid(event_id="")
    assert derive_event_id(a) == derive_event_id(b)
    assert derive_event_id(a).startswith("derived-")
    c = valid(event_id="", item_id="item-2")
    assert derive_event_id(c) != derive_event_id(a)
    # Map order does not matter.
    d = valid(event_id="")
    d.context.clear()
    d.context["x"] = "1"
    d.context["device"] = "web"
    e = valid(event_id="")
    e.context["x"] = "1"
    assert derive_event_id(d) == derive_event_id(e)
    # The producer's own id never changes the derived one.
    assert derive_event_id(valid(event_id="given")) == derive_event_id(a)
