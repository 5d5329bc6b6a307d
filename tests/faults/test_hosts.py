"""Three hosts as network namespaces, one killed whole (its NATS node and the leading trainer)
under load: nothing acknowledged is lost or doubled, Recommend keeps answering, the standby trainer
on another host takes over and learns every event once, and an inference replica on a new host
serves the live model from the Object Store (bench/hosts.py --quick, which measures the same)."""

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
    assert (
        figures["leader_before"] == "trainer-a" and figures["standby_role_before"] == "TRAINER_ROLE_STANDBY"
    )
    assert figures["events_acknowledged"] > 0
    assert figures["events_lost"] == 0 and figures["events_duplicated"] == 0
    assert figures["new_leader_learned"] == figures["stream_events"] >= figures["events_acknowledged"]
    assert figures["recommend_calls_during_fault"] > 0 and figures["recommend_success_during_fault"] >= 0.99
    assert figures["new_model_served_after_s"] > 0 and figures["new_host_serves_live_model_s"] > 0
