"""The shared preprocessing rules: weights, rating normalisation, rapid repeats, likely bots,
each on event time and each counted; state survives a round trip; partitions agree."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from freshrec.v1 import event_pb2
from shared.preprocessing import PreprocessingSettings, Preprocessor
from tests.factories import event

T0 = 1_700_000_000.0
VIEW, CLICK, PURCHASE, RATE, DISLIKE = (
    event_pb2.EVENT_TYPE_VIEW,
    event_pb2.EVENT_TYPE_CLICK,
    event_pb2.EVENT_TYPE_PURCHASE,
    event_pb2.EVENT_TYPE_RATE,
    event_pb2.EVENT_TYPE_DISLIKE,
)


def test_type_weights_and_value_multiplier() -> None:
    pre = Preprocessor(PreprocessingSettings(type_weights={"purchase": 7.0, "EVENT_TYPE_VIEW": 0.5}))
    assert pre.process("u", "a", PURCHASE, 0.0, T0).weight == 7.0
    assert pre.process("u", "b", VIEW, 0.0, T0).weight == 0.5
    assert pre.process("u", "c", CLICK, 0.0, T0).weight == 1.0  # not listed: 1.0
    assert pre.process("u", "d", VIEW, 3.0, T0).weight == 1.5  # value multiplies
    assert pre.process("u", "e", VIEW, 1e9, T0).weight == 0.5 * 10.0  # capped at value_cap
    assert Preprocessor().process("u", "f", DISLIKE, 0.0, T0).weight < 0
    assert pre.counts["value_weighted"] == 2


def test_unknown_type_weight_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown event type"):
        PreprocessingSettings(type_weights={"teleport": 1.0})


def test_ratings_are_normalised_per_user() -> None:
    pre = Preprocessor()
    for n in range(20):
        pre.process("harsh", f"h{n}", RATE, 2.0 if n % 2 else 1.0, T0 + n * 100)
        pre.process("generous", f"g{n}", RATE, 5.0 if n % 2 else 4.0, T0 + n * 100)
    harsh = pre.process("harsh", "x", RATE, 3.0, T0 + 10_000)
    generous = pre.process("generous", "x", RATE, 3.0, T0 + 10_000)
    assert harsh.normalized_rating is not None and generous.normalized_rating is not None
    assert harsh.normalized_rating > 0.5 > -0.5 > generous.normalized_rating
    assert harsh.weight > 1.0 > generous.weight > 0
    # A first rating is shrunk towards the prior: a 3 from a stranger is neutral.
    stranger = pre.process("new", "x", RATE, 3.0, T0)
    assert stranger.normalized_rating == pytest.approx(0.0)
    assert stranger.weight == pytest.approx(1.0)
    assert pre.counts["normalised_ratings"] == 43


def test_rapid_repeats_collapse_on_event_time() -> None:
    pre = Preprocessor(PreprocessingSettings(repeat_window_s=10))
    assert pre.process("u", "a", CLICK, 0, T0).kept
    assert not pre.process("u", "a", CLICK, 0, T0 + 9.9).kept  # within the window
    assert pre.process("u", "a", VIEW, 0, T0 + 1).kept  # another type
    assert pre.process("u", "b", CLICK, 0, T0 + 1).kept  # another item
    assert pre.process("v", "a", CLICK, 0, T0 + 1).kept  # another user
    assert pre.process("u", "a", CLICK, 0, T0 + 10).kept  # window measured from the last kept one
    assert not pre.process("u", "a", CLICK, 0, T0 + 5).kept  # late arrival inside the window
    assert pre.counts["collapsed_repeats"] == 2
    off = Preprocessor(PreprocessingSettings(repeat_window_s=0))
    assert all(off.process("u", "a", CLICK, 0, T0).kept for _ in range(3))


def test_repeat_keys_are_pruned_but_recent_ones_kept() -> None:
    pre = Preprocessor(PreprocessingSettings(repeat_window_s=10, bot_max_events=10_000))
    for n in range(500):
        pre.process("u", f"i{n}", VIEW, 0, T0 + n)
    assert len(pre.users["u"].keys) <= 80
    assert not pre.process("u", "i499", VIEW, 0, T0 + 500).kept


def test_likely_bot_flag_follows_the_rate_bound_and_expires() -> None:
    s = PreprocessingSettings(bot_max_events=10, bot_window_s=10, bot_quarantine_s=100, repeat_window_s=0)
    pre = Preprocessor(s)
    # Exactly at the bound (1 event/s for a long time) is fine.
    assert not any(pre.process("steady", "i", VIEW, 0, T0 + n).likely_bot for n in range(100))
    # A burst: the 11th event within a few milliseconds overflows.
    outs = [pre.process("bot", f"i{n}", VIEW, 0, T0 + n * 0.001) for n in range(12)]
    assert [o.likely_bot for o in outs] == [False] * 10 + [True, True]
    assert not outs[11].signal and outs[11].kept
    assert pre.is_likely_bot("bot")
    # Still flagged within the quarantine, free after it (on event time).
    assert pre.process("bot", "z", VIEW, 0, T0 + 50).likely_bot
    assert not pre.process("bot", "z2", VIEW, 0, T0 + 101).likely_bot
    assert pre.counts["bot_flags"] == 1
    assert pre.counts["bot_events"] == 3


def test_events_at_one_instant_are_no_evidence_of_speed() -> None:
    """A clock that only tells the day (dated history backfilled): a user's 500 events of one day
    share a timestamp, which says nothing of how fast they came."""
    pre = Preprocessor(PreprocessingSettings(bot_max_events=10, bot_window_s=10, repeat_window_s=0))
    day = T0 - T0 % 86_400
    assert not any(pre.process("fan", f"i{n}", VIEW, 0, day).likely_bot for n in range(500))
    assert not any(pre.process("fan", f"j{n}", VIEW, 0, day + 86_400).likely_bot for n in range(500))
    assert pre.counts["bot_flags"] == 0


def _stream(n: int, seed: int = 0) -> list[event_pb2.Event]:
    rng = random.Random(seed)
    events = []
    for k in range(n):
        user = "u0" if rng.random() < 0.3 else f"u{rng.randrange(1, 30)}"
        if user == "u0":  # a bot: ~6 events per second for a while
            t = T0 + k * 0.05
        else:
            t = T0 + k * 3 + rng.uniform(-30, 30)  # out of order by up to a minute
        kind = rng.choice([VIEW, CLICK, PURCHASE, RATE, RATE])
        events.append(event(user, f"i{rng.randrange(40)}", type=kind, at=t, value=float(rng.randint(1, 5))))
    return events


def test_state_round_trip_and_user_partitions_give_the_same_numbers() -> None:
    events = _stream(3000)
    whole = Preprocessor()
    expected = [whole.process_event(e) for e in events]
    assert whole.counts["bot_events"] > 0 and whole.counts["collapsed_repeats"] > 0

    # Stopped half way, state through JSON, resumed: the same numbers.
    first = Preprocessor()
    got = [first.process_event(e) for e in events[:1500]]
    resumed = Preprocessor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.process_event(e) for e in events[1500:]]
    assert got == expected

    # Two replicas each seeing only their users' events: the same numbers per event.
    parts = [Preprocessor(), Preprocessor()]
    split = [parts[int(e.user_id[1:]) % 2].process_event(e) for e in events]
    assert split == expected
    assert resumed.users == whole.users


def test_take_counts_resets() -> None:
    pre = Preprocessor()
    pre.process("u", "a", VIEW, 0, T0)
    assert pre.take_counts() == {"events": 1}
    assert pre.take_counts() == {}
