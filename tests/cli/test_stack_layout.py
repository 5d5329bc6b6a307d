"""How the embedded stack lays its replicas out (ports, partitions, instance names), before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.stack import DEFAULT_PORTS, REPLICA_PORT_STEP, Stack


def test_feature_replicas_each_own_a_share_of_the_users_on_ports_of_their_own(tmp_path: Path) -> None:
    stack = Stack(tmp_path, replicas={"feature": 3, "inference": 2})
    assert stack.instances("feature") == ["feature", "feature-2", "feature-3"]
    assert stack.replicas == {"ingestion": 1, "feature": 3, "trainer": 1, "inference": 2}
    for r, instance in enumerate(stack.instances("feature")):
        service = stack.services[instance]
        assert service.port == DEFAULT_PORTS["feature"] + REPLICA_PORT_STEP * r
        assert service.partition == (r, 3)
        assert service.env["FRESHREC_PARTITION__REPLICA"] == str(r)
        assert service.env["FRESHREC_PARTITION__REPLICAS"] == "3"
    # Inference and ingestion replicas share all users: no partition.
    assert all(stack.services[i].partition is None for i in stack.instances("inference"))
    assert "FRESHREC_PARTITION__REPLICAS" not in stack.services["inference-2"].env
    entry = stack.describe()["services"]["feature"][1]
    assert entry["instance"] == "feature-2" and entry["partition"] == "1 of 3"


def test_a_single_feature_replica_owns_everyone_and_the_trainer_leads_alone(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    assert "FRESHREC_PARTITION__REPLICAS" not in stack.services["feature"].env
    assert "partition" not in stack.describe()["services"]["feature"][0]
    with pytest.raises(ValueError, match="trainer cannot run 2 replicas"):
        Stack(tmp_path, replicas={"trainer": 2})
    with pytest.raises(ValueError, match="cannot run several replicas"):
        stack.add_instance("trainer")
