"""A trainer that finds more events waiting than it has learned fits the retained log in epochs
before going online, says so, and serves a model that knows the backlog; one that keeps up does not
(real NATS, SQLite and the trainer service in-process)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from freshrec.v1 import trainer_pb2
from tests.conftest import eventually
from tests.feature.helpers import publish
from tests.trainer.streams import taste_stream
from tests.trainer.test_service import Running, trainer  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


async def test_a_backlog_is_fitted_in_epochs_before_online_learning(
    trainer: Any,  # noqa: F811
    nats_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = taste_stream(n_users=40, rounds=30)  # 1,200 events waiting before the trainer starts
    await publish(nats_client, [e for _, e in stream])
    caplog.set_level(logging.INFO, logger="services.trainer.loop")
    t: Running = await trainer(bootstrap_min_events=500, bootstrap_max_epochs=6, export_interval_s=3600.0)
    await t.learned(len(stream))

    async def fitted() -> trainer_pb2.GetTrainerStatusResponse | None:
        status = await t.status()
        return status if status.metrics["bootstrap_epochs"] and not status.metrics["bootstrapping"] else None

    status = await eventually(fitted, timeout_s=120, what="the bootstrap fit done")
    assert status.metrics["bootstrap_events"] == len(stream)
    assert 2 <= status.metrics["bootstrap_epochs"] <= 6
    assert status.metrics["bootstrapping"] == 0.0
    assert any("bootstrapping: the model has learned" in r.getMessage() for r in caplog.records)

    listed = await t.stub.ListModels(trainer_pb2.ListModelsRequest())
    first = listed.models[-1]
    assert first.status == trainer_pb2.MODEL_STATUS_LIVE
    assert first.trained_through.stream_sequence == len(stream)  # the whole backlog, at once
    # Learned well in epochs: the next events of the same tastes are predicted.
    more = taste_stream(n_users=40, rounds=35)[len(stream) :]
    await publish(nats_client, [e for _, e in more])
    status = await t.learned(len(stream) + len(more))
    assert status.metrics["prequential_hr@10"] > 0.3
    assert status.metrics["bootstrap_events"] == len(stream)  # keeping up: no second bootstrap


async def test_a_trainer_that_keeps_up_never_bootstraps(trainer: Any, nats_client: Any) -> None:  # noqa: F811
    t: Running = await trainer(bootstrap_min_events=500, export_interval_s=3600.0)
    stream = taste_stream(n_users=40, rounds=30)
    for start in range(0, len(stream), 100):  # trickled in: never more waiting than learned
        await publish(nats_client, [e for _, e in stream[start : start + 100]])
        await t.learned(start + 100)
    status = await t.status()
    assert "bootstrap_events" not in status.metrics and status.events_learned == len(stream)
