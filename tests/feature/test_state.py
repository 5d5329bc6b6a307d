"""The in-memory feature state: preprocessing applied, popularity by category and window,
affinity, and an exact round trip through SQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freshrec.v1 import event_pb2, item_pb2
from services.feature.rebuild import MIGRATIONS, VERSION_TABLE
from services.feature.settings import PopularitySettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.preprocessing import PreprocessingSettings
from shared.settings import DatabaseSettings
from tests.factories import event
from tests.feature.helpers import T0, workload

CLICK, PURCHASE, RATE = event_pb2.EVENT_TYPE_CLICK, event_pb2.EVENT_TYPE_PURCHASE, event_pb2.EVENT_TYPE_RATE


def feed(state: FeatureState, events: list[event_pb2.Event], start: int = 1) -> None:
    for seq, e in enumerate(events, start):
        state.apply(e, seq)


def test_bots_are_visible_in_their_features_but_not_in_popularity() -> None:
    state = FeatureState(50, PreprocessingSettings(bot_max_events=5, bot_window_s=60, repeat_window_s=0))
    feed(state, [event("bot", f"spam{n % 2}", at=T0 + n * 0.1) for n in range(30)])
    feed(state, [event("human", "good", at=T0 + 5)], start=31)
    assert state.is_likely_bot("bot") and not state.is_likely_bot("human")
    assert len(state.users["bot"].recent) == 30 and state.users["bot"].counts["EVENT_TYPE_CLICK"] == 30
    # Only the events before the bound was crossed reached the items.
    assert [state.items[i].counts["EVENT_TYPE_CLICK"] for i in ("spam0", "spam1")] == [3, 2]
    assert [i for i, _ in state.popular(3)] == ["spam0", "spam1", "good"]


def test_rapid_repeats_change_nothing_but_the_watermark() -> None:
    state = FeatureState(50, PreprocessingSettings(repeat_window_s=30))
    feed(state, [event("u", "a", at=T0), event("u", "a", at=T0 + 5), event("u", "a", at=T0 + 29)])
    assert [i[0] for i in state.users["u"].recent] == ["a"]
    assert state.items["a"].counts == {"EVENT_TYPE_CLICK": 1}
    assert state.watermark.stream_sequence == 3 and state.watermark.event_time == T0 + 29


def test_weights_and_normalised_ratings_are_what_the_features_show() -> None:
    state = FeatureState(50)
    feed(state, [event("u", "a", type=PURCHASE, at=T0), event("u", "b", type=RATE, value=5.0, at=T0 + 1)])
    (_, _, _, purchase_weight, purchase_z, _), (_, _, _, rating_weight, rating_z, _) = state.users["u"].recent
    assert purchase_weight == 5.0 and purchase_z is None
    assert rating_z is not None and rating_z > 0 and rating_weight > 1.0


def test_popularity_per_category_and_trending_window() -> None:
    state = FeatureState(
        50, popularity=PopularitySettings(half_life_events=0, trending_window_events=4, trending_buckets=4)
    )
    state.set_categories("old-hit", ["drama"], 1)
    state.set_categories("new", ["drama", "comedy"], 1)
    state.set_categories("joke", ["comedy"], 1)
    events = [event(f"u{n}", "old-hit", type=PURCHASE, at=T0 + n) for n in range(10)]
    events += [event(f"v{n}", "new", at=T0 + 10 + n) for n in range(3)]
    events += [event("w", "joke", at=T0 + 13)]
    feed(state, events)
    assert [i for i, _ in state.popular(5)] == ["old-hit", "new", "joke"]
    assert state.popular(1)[0][1] == pytest.approx(50.0)  # no decay: 10 purchases of weight 5
    assert [i for i, _ in state.popular(5, "comedy")] == ["new", "joke"]
    # Four events later the old hit has left the four-event trending window.
    assert state.popular(5, trending=True) == [("new", 6.0), ("joke", 2.0)]
    assert [i for i, _ in state.popular(5, "drama", trending=True)] == ["new"]
    # A catalogue change moves an item between categories.
    state.set_categories("joke", ["drama"], 2)
    assert [i for i, _ in state.popular(5, "comedy")] == ["new"]
    assert state.set_categories("joke", ["comedy"], 1) is False  # an older revision is ignored


def test_popularity_halves_every_half_life_of_events() -> None:
    state = FeatureState(50, popularity=PopularitySettings(half_life_events=10))
    feed(state, [event("u", "a", type=PURCHASE, at=T0)] + [event(f"v{n}", "b", at=T0) for n in range(10)])
    # a's weight of 5 is ten events old; b's ten clicks of 2 are 0 to 9 events old.
    (a,) = (score for item, score in state.popular(5) if item == "a")
    assert a == pytest.approx(2.5)


def test_category_affinity_decays_over_the_users_own_events() -> None:
    state = FeatureState(50, popularity=PopularitySettings(affinity_half_life_events=1))
    state.set_categories("m", ["drama", "crime"], 1)
    feed(state, [event("u", "m", type=PURCHASE, at=T0), event("other", "x", at=T0 + 1)])
    # Other users' events do not age u's taste; u's next one (without a category) does.
    assert state.affinities(state.users["u"]) == {"drama": pytest.approx(5.0), "crime": pytest.approx(5.0)}
    feed(state, [event("u", "x", at=T0 + 2)], start=3)
    assert state.affinities(state.users["u"]) == {"drama": pytest.approx(2.5), "crime": pytest.approx(2.5)}


@pytest.mark.parametrize("span_s", [1.0, 20 * 365 * 86_400.0], ids=["one-second", "twenty-years"])
def test_popularity_and_affinity_do_not_depend_on_how_fast_the_clock_runs(span_s: float) -> None:
    """The same events in the same order give the same popularity, trending and affinity
    whether their timestamps span one second (a backfill) or twenty years (a slow stream):
    no default assumes how fast a stream's clock runs."""
    events = workload(3000)
    first, last = events[0].occurred_at.seconds, events[-1].occurred_at.seconds
    states = []
    for span in (3600.0, span_s):
        rescaled = []
        for e in events:
            copy = event_pb2.Event()
            copy.CopyFrom(e)
            at = T0 + (e.occurred_at.seconds - first) / max(last - first, 1) * span
            copy.occurred_at.FromNanoseconds(int(at * 1e9))
            rescaled.append(copy)
        state = FeatureState(10, PreprocessingSettings(repeat_window_s=0, bot_max_events=10**6))
        for n in range(60):
            state.set_categories(f"i{n}", [f"c{n % 3}"], 1)
        feed(state, rescaled)
        states.append(state)
    reference, other = states
    assert other.popular(50) == reference.popular(50)
    assert other.popular(50, trending=True) == reference.popular(50, trending=True)
    assert {u: other.affinities(s) for u, s in other.users.items()} == {
        u: reference.affinities(s) for u, s in reference.users.items()
    }
    assert reference.popular(1)[0][1] > 0 and reference.popular(1, trending=True)


def test_state_round_trips_exactly_through_sql(tmp_path: Path) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'f.db'}"))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    store = FeatureStore(make_sessionmaker(engine), "r")
    store.upsert_items([item_pb2.Item(item_id=f"i{n}", categories=[f"c{n % 3}"]) for n in range(60)])
    live = FeatureState(10)
    store.load(live)
    events = workload(3000)
    for half in (events[:1500], events[1500:]):
        feed(live, half, start=live.watermark.stream_sequence + 1)
        store.save(*live.take_dirty())
    loaded = FeatureState(10)
    store.load(loaded)
    assert json.dumps(loaded.dump(), sort_keys=True) == json.dumps(live.dump(), sort_keys=True)
    # And both keep agreeing on what comes next.
    more = workload(500, seed=9, start=T0 + 7000)
    feed(live, more, start=3001)
    feed(loaded, more, start=3001)
    assert loaded.dump() == live.dump()
    engine.dispose()


@pytest.mark.parametrize("trending_window_events", [100_000, 60], ids=["one-slice", "many-slices"])
def test_a_snapshot_serialised_while_events_arrive_shows_the_state_at_its_watermark(
    trending_window_events: int,
) -> None:
    """The consumer keeps applying while a commit serialises its snapshot a slice at a time:
    every document must still be the one at the snapshot's watermark (copy on write), also when
    the trending window moves on and expires slices of items the snapshot still holds."""
    settings = PopularitySettings(trending_window_events=trending_window_events, trending_buckets=6)
    events = workload(2000)
    live, reference = FeatureState(10, popularity=settings), FeatureState(10, popularity=settings)
    feed(live, events[:1000])
    feed(reference, events[:1000])

    snapshot = live.begin_snapshot()
    assert not live.snapshot_step(3)
    for seq, e in enumerate(events[1000:], 1001):
        live.apply(e, seq)
        if seq % 50 == 0:
            live.snapshot_step(2)
    assert live.snapshot_step(None)

    users, items, watermark, _ = reference.take_dirty()
    assert snapshot.watermark == watermark
    assert snapshot.users == users and snapshot.items == items
    # And what changed after the watermark is the next snapshot's.
    feed(reference, events[1000:], start=1001)
    assert live.take_dirty() == reference.take_dirty()
