"""Decay arithmetic, rankings and the trending window, on a clock of any unit."""

from __future__ import annotations

import math
import random
import time

import pytest

from services.feature.popularity import NO_SCORE, Decay, Ranking, TrendingWindow

DAY = 86_400.0
T0 = 1_700_000_000.0


def test_half_life_halves_and_sums() -> None:
    decay = Decay(DAY)
    key = decay.add(NO_SCORE, 8.0, T0)
    assert decay.value(key, T0) == pytest.approx(8.0)
    assert decay.value(key, T0 + DAY) == pytest.approx(4.0)
    assert decay.value(key, T0 + 3 * DAY) == pytest.approx(1.0)
    key = decay.add(key, 2.0, T0 + DAY)  # 4 left of the first, plus 2
    assert decay.value(key, T0 + DAY) == pytest.approx(6.0)
    # Out of order: an older event adds its own decayed share.
    key = decay.add(key, 4.0, T0 - DAY)
    assert decay.value(key, T0 + DAY) == pytest.approx(7.0)


def test_matches_the_direct_formula() -> None:
    rng = random.Random(1)
    decay = Decay(3600.0)
    events = [(rng.uniform(0.1, 5), T0 + rng.uniform(0, 30 * DAY)) for _ in range(500)]
    key = NO_SCORE
    for weight, t in events:
        key = decay.add(key, weight, t)
    at = T0 + 30 * DAY
    direct = math.fsum(w * 2 ** (-(at - t) / 3600.0) for w, t in events)
    assert decay.value(key, at) == pytest.approx(direct, rel=1e-9)


def test_numerically_safe_over_years_at_a_one_second_half_life() -> None:
    decay = Decay(1.0)
    key = NO_SCORE
    for year in range(20):
        key = decay.add(key, 1.0, T0 + year * 365 * DAY)
    assert math.isfinite(key)
    assert decay.value(key, T0 + 19 * 365 * DAY) == pytest.approx(1.0)  # older years decayed away
    assert decay.value(key, T0 + 19 * 365 * DAY + 10) == pytest.approx(2.0**-10)
    # An event from decades back does not overflow either.
    old = decay.add(key, 1.0, 0.0)
    assert math.isfinite(old) and old == key


def test_no_decay_is_a_plain_sum_and_non_positive_weights_add_nothing() -> None:
    decay = Decay(0.0)
    key = NO_SCORE
    for w in (1.0, 2.0, 3.0, 0.0, -5.0):
        key = decay.add(key, w, T0 + w * 1e6)
    assert decay.value(key, T0 + 1e12) == pytest.approx(6.0)
    assert decay.value(NO_SCORE, T0) == 0.0


def test_keys_rank_like_scores_at_any_time() -> None:
    decay = Decay(DAY)
    rng = random.Random(2)
    keys = {}
    for item in range(50):
        key = NO_SCORE
        for _ in range(rng.randint(1, 20)):
            key = decay.add(key, rng.uniform(0.5, 3), T0 + rng.uniform(0, 10 * DAY))
        keys[f"i{item}"] = key
    for at in (T0, T0 + 5 * DAY, T0 + 100 * DAY):
        by_key = sorted(keys, key=lambda i: -keys[i])
        by_score = sorted(keys, key=lambda i: -decay.value(keys[i], at))
        assert by_key == by_score


def test_ranking_overall_and_per_category() -> None:
    ranking = Ranking()
    ranking.update("a", 3.0, ["drama"])
    ranking.update("b", 5.0, ["comedy", "drama"])
    ranking.update("c", 4.0, [])
    assert list(ranking.top(10)) == [("b", 5.0), ("c", 4.0), ("a", 3.0)]
    assert [i for i, _ in ranking.top(10, "drama")] == ["b", "a"]
    ranking.update("a", 6.0, ["comedy"])  # a new score and new categories
    assert [i for i, _ in ranking.top(2)] == ["a", "b"]
    assert [i for i, _ in ranking.top(10, "drama")] == ["b"]
    assert [i for i, _ in ranking.top(10, "comedy")] == ["a", "b"]
    ranking.update("b", None)
    assert list(ranking.top(10, "drama")) == [] and list(ranking.top(10, "nope")) == []
    assert len(ranking) == 2


def test_top_k_stays_fast_with_many_items() -> None:
    # Not a benchmark: a guard against a full sort per call (20k items sorted 2,000 times
    # would take tens of seconds; reading the head of a sorted list takes milliseconds).
    ranking = Ranking()
    rng = random.Random(3)
    for n in range(20_000):
        ranking.update(f"i{n}", rng.random(), [f"c{n % 20}"])
    started = time.perf_counter()
    for n in range(2000):
        assert len(list(ranking.top(10, f"c{n % 20}" if n % 2 else ""))) == 10
    assert time.perf_counter() - started < 5.0


def test_trending_window_counts_only_recent_events() -> None:
    window = TrendingWindow(span=100.0, buckets=10)  # slices of 10 clock units
    slices: dict[str, dict[int, float]] = {"a": {}, "b": {}}
    window.advance(T0, slices.get)
    assert window.add("a", slices["a"], 2.0, T0)
    assert window.add("b", slices["b"], 1.0, T0 + 55)
    assert window.advance(T0 + 55, slices.get) == set()
    assert TrendingWindow.score(slices["a"]) == 2.0
    # a's slice leaves the window once the newest clock is 100 units past it.
    assert window.advance(T0 + 105, slices.get) == {"a"}
    assert TrendingWindow.score(slices["a"]) == 0.0 and TrendingWindow.score(slices["b"]) == 1.0
    assert not window.add("a", slices["a"], 5.0, T0 + 1)  # too old for the window
    assert window.add("a", slices["a"], 5.0, T0 + 104)
    assert TrendingWindow.score(slices["a"]) == 5.0
