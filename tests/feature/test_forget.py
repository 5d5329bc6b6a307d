"""Forgetting a user in the feature service: memory, the SQL row, and no bytes left in the SQLite
file; a replica that was down when the request came does its part when it starts again."""

from __future__ import annotations

from pathlib import Path

import grpc

from freshrec.v1 import feature_pb2, ingestion_pb2, ingestion_pb2_grpc
from services.feature.state import FeatureState
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from tests.conftest import eventually, service_settings
from tests.factories import event
from tests.feature.helpers import T0, caught_up, last_sequence, settings_for, started, stored_state, stub
from tests.harness import NatsServer


def test_forget_user_leaves_a_snapshot_in_progress_out() -> None:
    state = FeatureState(10)
    for seq, user in enumerate(("alice", "bob"), 1):
        state.apply(event(user, "a", at=T0 + seq), seq, T0 + seq)
    snapshot = state.begin_snapshot()
    assert state.forget_user("alice")
    assert not state.forget_user("alice")  # again: nothing more to do
    while not state.snapshot_step(1):
        pass
    assert set(snapshot.users) == {"bob"} and "alice" in snapshot.deleted_users
    assert "alice" not in state.users and "alice" in state.deleted_users


async def test_a_replica_down_during_the_request_forgets_when_it_comes_back(
    nats_server: NatsServer, nats_client: object, tmp_path: Path
) -> None:
    ingestion = IngestionApp(
        service_settings(
            IngestionSettings,
            nats_server,
            tmp_path,
            forget={"hash_key": "k", "settle_s": 0.0, "services": ["ingestion", "feature"]},
        )
    )
    await ingestion.start()
    settings = settings_for(nats_server, tmp_path, commit_interval_s=0.05)
    feature = await started(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestion.port}") as ch:
        ingest = ingestion_pb2_grpc.IngestionServiceStub(ch)
        events = [event(u, f"i{n}", event_id=f"{u}-{n}") for u in ("alice", "bob") for n in range(4)]
        assert (await ingest.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))).accepted == 8
        await caught_up(feature, await last_sequence(nats_client))
        await eventually(lambda: _stored(settings, "alice"), what="alice's row committed")
        await feature.stop()

        answer = await ingest.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))

        async def progress() -> dict[str, int]:
            s = await ingest.GetForgetStatus(
                ingestion_pb2.GetForgetStatusRequest(request_id=answer.request_id)
            )
            return {p.service: p.state for p in s.progress} | {"done": int(s.done)}

        await eventually(
            lambda: _is(progress(), {"ingestion": 2, "feature": 1, "done": 0}),
            what="ingestion done, feature pending",
        )
        assert "alice" in stored_state(settings)["users"]  # the replica is down: its row is still there

        feature = await started(settings)
        await eventually(
            lambda: _is(progress(), {"ingestion": 2, "feature": 2, "done": 1}), what="the request done"
        )
        fch, fstub = stub(feature)
        async with fch:
            alice = await fstub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="alice"))
            bob = await fstub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="bob"))
        assert not alice.features.known and bob.features.known
        # A late event of alice is dropped by the tombstone and never reaches the feature state.
        late = await ingest.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event("alice", "i9", event_id="alice-late")])
        )
        assert late.forgotten == 1
    await feature.stop()
    await ingestion.stop()
    assert "alice" not in stored_state(settings)["users"]
    db = Path(settings.database.url.removeprefix("sqlite:///"))
    for path in (db, db.with_name(db.name + "-wal")):
        assert not path.exists() or b"alice" not in path.read_bytes(), path


async def _stored(settings, user: str) -> bool:  # type: ignore[no-untyped-def]
    return user in stored_state(settings)["users"]


async def _is(value, expected: object) -> bool:  # type: ignore[no-untyped-def]
    return await value == expected
