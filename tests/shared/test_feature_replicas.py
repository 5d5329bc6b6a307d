"""The partition map: who answers for a partition while replicas come, catch up and go."""

from __future__ import annotations

from shared.feature_replicas import PartitionMap, ReplicaEntry, owners
from shared.nats import EVENT_PARTITIONS, user_partition


def entry(name: str, replica: int, replicas: int, caught_up: bool, started_at: float) -> ReplicaEntry:
    return ReplicaEntry(name, f"{name}:1", replica, replicas, caught_up, started_at)


OLD = entry("feature", 0, 1, True, 100.0)


def names(chosen: dict[int, ReplicaEntry]) -> dict[int, str]:
    return {p: e.name for p, e in chosen.items()}


def test_scaling_up_moves_a_partition_only_once_its_new_owner_has_caught_up() -> None:
    new = [entry(f"feature-{i}-of-3", i, 3, False, 200.0) for i in range(3)]
    assert set(names(owners([OLD, *new])).values()) == {"feature"}  # still building: the old one answers

    new[0] = entry("feature-0-of-3", 0, 3, True, 200.0)
    chosen = names(owners([OLD, *new]))
    assert all(chosen[p] == ("feature-0-of-3" if p % 3 == 0 else "feature") for p in range(EVENT_PARTITIONS))

    ready = [entry(f"feature-{i}-of-3", i, 3, True, 200.0) for i in range(3)]
    assert names(owners([OLD, *ready])) == names(owners(ready))  # the old one can go now
    assert names(owners(ready)) == {p: f"feature-{p % 3}-of-3" for p in range(EVENT_PARTITIONS)}


def test_scaling_back_down_and_partitions_nobody_has_caught_up_on() -> None:
    three = [entry(f"feature-{i}-of-3", i, 3, True, 200.0) for i in range(3)]
    single = entry("feature", 0, 1, False, 300.0)
    assert names(owners([*three, single])) == names(owners(three))
    single = entry("feature", 0, 1, True, 300.0)
    assert set(names(owners([*three, single])).values()) == {"feature"}
    # Nobody caught up (a cold start): the longest-running covering replica answers; partitions no
    # replica covers are absent.
    cold = [entry("a", 0, 2, False, 50.0), entry("b", 0, 2, False, 60.0)]
    assert set(names(owners(cold)).values()) == {"a"} and len(owners(cold)) == EVENT_PARTITIONS // 2


def test_the_map_follows_updates_and_counts_its_changes() -> None:
    partition_map = PartitionMap()
    assert partition_map.address_for("u1") is None
    assert partition_map.apply("feature", OLD.encode())
    assert partition_map.address_for("u1") == "feature:1" and partition_map.revision == 1
    assert not partition_map.apply("feature", OLD.encode())  # a renewal changes nothing
    assert not partition_map.apply("junk", b"not json") and "junk" not in partition_map.entries
    other = entry("feature-1-of-2", 1, 2, True, 200.0)
    assert partition_map.apply(other.name, other.encode())
    u = next(f"u{i}" for i in range(1000) if user_partition(f"u{i}") % 2 == 1)
    assert partition_map.address_for(u) == "feature-1-of-2:1"
    assert partition_map.apply("feature-1-of-2", None)  # expired or withdrawn
    assert partition_map.address_for(u) == "feature:1" and partition_map.revision == 3
