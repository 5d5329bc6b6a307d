"""The demo's synthetic world: known tastes, drift, determinism."""

from __future__ import annotations

from collections import Counter

import pytest

from cli.synthetic import SyntheticWorld


def share_in_taste(world: SyntheticWorld, n: int) -> dict[int, float]:
    """Per group, the share of events on items of the group's current category."""
    hits: Counter[int] = Counter()
    totals: Counter[int] = Counter()
    for event in world.events(n):
        group = world.group_of[event.user_id]
        totals[group] += 1
        hits[group] += world.category_of(event.item_id) == world.taste(group)
    return {g: hits[g] / totals[g] for g in totals}


def test_catalogue_and_users_are_complete() -> None:
    world = SyntheticWorld(users=50, items=60, groups=3, categories=5, seed=1)
    assert len(world.catalogue) == 60 and len({i.item_id for i in world.catalogue}) == 60
    assert {i.category for i in world.catalogue} == set(world.category_names)
    assert all(world.category_of(i.item_id) == i.category for i in world.catalogue)
    assert all(i.title for i in world.catalogue)
    assert set(world.group_of.values()) == {0, 1, 2}
    # Groups start with distinct tastes.
    assert len({world.taste(g) for g in range(3)}) == 3


def test_users_follow_their_groups_taste() -> None:
    world = SyntheticWorld(users=100, items=120, groups=4, categories=6, affinity=0.8, seed=2)
    expected = 0.8 + 0.2 / 6  # the affinity, plus random picks that land in the category
    for group, share in share_in_taste(world, 20_000).items():
        assert share == pytest.approx(expected, abs=0.03), group


def test_drift_moves_every_group_and_events_follow() -> None:
    world = SyntheticWorld(users=100, items=120, groups=4, categories=6, affinity=0.9, seed=3)
    before = {g: world.taste(g) for g in range(4)}
    world.drift()
    after = {g: world.taste(g) for g in range(4)}
    assert world.phase == 1
    assert all(before[g] != after[g] for g in range(4)), (before, after)
    assert len(set(after.values())) == 4, "groups keep distinct tastes"
    # Events after the drift follow the new tastes, not the old ones.
    old_hits: Counter[int] = Counter()
    for event in world.events(5000):
        old_hits[world.group_of[event.user_id]] += (
            world.category_of(event.item_id) == before[world.group_of[event.user_id]]
        )
    assert all(v / 1250 < 0.2 for v in old_hits.values()), old_hits
    assert all(share > 0.85 for share in share_in_taste(world, 5000).values())


def test_popular_items_inside_a_category_come_first() -> None:
    world = SyntheticWorld(users=50, items=60, groups=1, categories=1, affinity=1.0, seed=4)
    counts = Counter(e.item_id for e in world.events(20_000))
    ranked = [item for item, _ in counts.most_common()]
    assert ranked[0] == "item-00000"
    assert counts["item-00000"] > 5 * counts["item-00059"]


def test_same_seed_same_world_and_stream() -> None:
    a, b = SyntheticWorld(seed=7), SyntheticWorld(seed=7)
    assert a.events(500) == b.events(500)
    a.drift()
    b.drift()
    assert [a.taste(g) for g in range(a.groups)] == [b.taste(g) for g in range(b.groups)]
    assert SyntheticWorld(seed=8).events(50) != SyntheticWorld(seed=7).events(50)


def test_impossible_worlds_are_refused() -> None:
    with pytest.raises(ValueError, match="groups"):
        SyntheticWorld(groups=5, categories=3)
    with pytest.raises(ValueError, match="affinity"):
        SyntheticWorld(affinity=1.5)
