"""Three hosts as network namespaces; the leading trainer's host is killed whole under load, and in a
second run cut off the network and then healed: nothing acknowledged is lost or doubled, Recommend
keeps answering, the standby trainer on another host takes over, the leader at the end has learned
every event once, a healed old leader stands by, and an inference replica on a new host serves the
live model from the Object Store (bench/hosts.py --quick, which measures the same)."""

from __future__ import annotations

import os

import pytest

from tests.bench.helpers import quick_figures

pytestmark = [
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


def test_losing_the_trainers_host_loses_nothing() -> None:
    figures = quick_figures("hosts.py", timeout_s=880)
    for scenario in ("kill", "partition"):
        f = {k.removeprefix(f"{scenario}_"): v for k, v in figures.items() if k.startswith(f"{scenario}_")}
        assert f["leader_before"] == "trainer-a" and f["standby_role_before"] == "TRAINER_ROLE_STANDBY"
        assert f["events_acknowledged"] > 0
        assert f["events_lost"] == 0 and f["events_duplicated"] == 0, scenario
        assert f["new_leader_learned"] == f["stream_events"] >= f["events_acknowledged"], scenario
        assert f["recommend_calls_during_fault"] > 0 and f["recommend_success_during_fault"] >= 0.99, scenario
        assert f["new_model_served_after_s"] > 0 and f["new_host_serves_live_model_s"] > 0
    assert figures["partition_old_leader_stands_by_after_heal_s"] >= 0
