"""Forgetting a user, ingestion's share, on real parts: ForgetUser and GetForgetStatus over gRPC,
the NATS request, the event log's rows and the streams' messages erased, the tombstone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import nats
import pytest
from google.protobuf import json_format
from prometheus_client import REGISTRY

from freshrec.v1 import event_pb2, ingestion_pb2
from services.ingestion.nats_intake import DLQ_STREAM, RAW_STREAM
from shared.nats import (
    FORGET_REQUEST_SUBJECT,
    FORGET_STREAM,
    FORGET_TASKS_SUBJECT,
    MSG_ID_HEADER,
    RAW_SUBJECT,
)
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory, stub_for
from tests.ingestion.helpers import committed_ids, stream_events, stream_ids

KEY = {"hash_key": "test-key", "settle_s": 0.0}


def sample(name: str, **labels: str) -> float:
    """A metric of this process (in-process apps share the default registry)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def forget_settings(**extra: object) -> dict[str, object]:
    return {"forget": {**KEY, "services": ["ingestion"], **extra}}


async def stream_payloads(url: str, stream: str) -> list[bytes]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(int(info.state.first_seq or 1), int(info.state.last_seq or 0) + 1):
            try:
                out.append((await js.get_msg(stream, seq)).data or b"")
            except nats.js.errors.NotFoundError:
                continue  # erased
        return out
    finally:
        await nc.close()


async def status(stub, request_id: str) -> ingestion_pb2.GetForgetStatusResponse:  # type: ignore[no-untyped-def]
    return await stub.GetForgetStatus(ingestion_pb2.GetForgetStatusRequest(request_id=request_id))


async def test_requests_are_validated(make_app: AppFactory) -> None:
    app = await make_app(**forget_settings())
    channel, stub = stub_for(app)
    async with channel:
        for user_id, reason in (("", "user_id is empty"), ("x" * 129, "user_id is longer than 128")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id=user_id))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == reason
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await status(stub, "")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await status(stub, "0123456789abcdef")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_without_a_hash_key_forget_is_refused(make_app: AppFactory) -> None:
    app = await make_app()
    channel, stub = stub_for(app)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "FRESHREC_FORGET__HASH_KEY" in refused.value.details()


async def test_erases_rows_and_messages_then_drops_late_events(
    make_app: AppFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    app = await make_app(**forget_settings())
    dropped_before = {
        source: sample("freshrec_ingestion_events_forgotten_total", source=source)
        for source in ("grpc", "nats")
    }
    channel, stub = stub_for(app)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    async with channel:
        events = [event(u, f"i{n}", event_id=f"{u}-e{n}") for u in ("alice", "bob") for n in range(5)]
        assert (await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))).accepted == 10
        # Over NATS: one of alice's events, and one that is invalid, which lands in the DLQ.
        await js.publish(RAW_SUBJECT, event("alice", "i9", event_id="alice-raw").SerializeToString())
        bad = event("alice", "i9", event_id="alice-bad", type=event_pb2.EVENT_TYPE_UNSPECIFIED)
        await js.publish(RAW_SUBJECT, bad.SerializeToString())
        await js.publish(RAW_SUBJECT, event("bob", "i9", event_id="bob-raw").SerializeToString())
        await eventually(lambda: _count(stream_ids(nats_server.url), 12), what="every event published")
        await eventually(lambda: _count(stream_ids(nats_server.url, DLQ_STREAM, "freshrec.events.dlq"), 1))

        answer = await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))
        assert answer.request_id and answer.requested_at.seconds

        async def done() -> ingestion_pb2.GetForgetStatusResponse | None:
            s = await status(stub, answer.request_id)
            return s if s.done else None

        final = await eventually(done, what="the forget request to complete")
        assert [(p.service, p.state) for p in final.progress] == [
            ("ingestion", ingestion_pb2.FORGET_STATE_DONE)
        ]
        assert final.progress[0].done_at.seconds and final.completed_at.seconds
        assert "alice" not in final.user_hash and len(final.user_hash) == 64

        db = Path(app.settings.database.url.removeprefix("sqlite:///"))
        assert sorted(committed_ids(db)) == sorted([f"bob-e{n}" for n in range(5)] + ["bob-raw"])
        assert {e.user_id for _, e, _ in await stream_events(nats_server.url)} == {"bob"}
        for stream in (RAW_STREAM, DLQ_STREAM, FORGET_STREAM):
            assert not any(b"alice" in data for data in await stream_payloads(nats_server.url, stream)), (
                stream
            )

        # Late events of alice, over gRPC and over NATS, are dropped and counted.
        late = await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event("alice", "i1", event_id="alice-late")])
        )
        assert (late.accepted, late.forgotten, len(late.errors)) == (0, 1, 0)
        await js.publish(RAW_SUBJECT, event("alice", "i2", event_id="alice-late-raw").SerializeToString())
        await js.publish(RAW_SUBJECT, event("carol", "i2", event_id="carol-raw").SerializeToString())
        await eventually(lambda: _count(stream_ids(nats_server.url), 7), what="carol's event published")

        async def raw_clean() -> bool:
            return not any(b"alice" in d for d in await stream_payloads(nats_server.url, RAW_STREAM))

        await eventually(raw_clean, what="the late raw message erased")
        assert {e.user_id for _, e, _ in await stream_events(nats_server.url)} == {"bob", "carol"}
        for source in ("grpc", "nats"):
            assert (
                sample("freshrec_ingestion_events_forgotten_total", source=source)
                == dropped_before[source] + 1
            )
        assert sample("freshrec_ingestion_forget_requests_total", outcome="completed") >= 1
    await nc.close()
    assert b"alice" not in db.read_bytes()
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or b"alice" not in wal.read_bytes()


async def _count(ids_coroutine, n: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await ids_coroutine) >= n


async def test_a_repeated_or_redelivered_request_does_nothing_twice(
    make_app: AppFactory, nats_server: NatsServer
) -> None:
    # "feature" never reports here: the request stays pending.
    app = await make_app(**forget_settings(services=["ingestion", "feature"]))
    channel, stub = stub_for(app)
    async with channel:
        await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event("alice", "i1", event_id="a1")])
        )
        first = await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))
        again = await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))
        assert again.request_id == first.request_id

        async def ingestion_done() -> ingestion_pb2.GetForgetStatusResponse | None:
            s = await status(stub, first.request_id)
            states = {p.service: p.state for p in s.progress}
            return s if states.get("ingestion") == ingestion_pb2.FORGET_STATE_DONE else None

        before = await eventually(ingestion_done, what="ingestion's part")
        assert not before.done
        assert {(p.service, p.state) for p in before.progress} == {
            ("ingestion", ingestion_pb2.FORGET_STATE_DONE),
            ("feature", ingestion_pb2.FORGET_STATE_PENDING),
        }
        # The same task delivered again (a producer's retry through the stream, a redelivery).
        nc = await nats.connect(nats_server.url)
        task = ingestion_pb2.ForgetTask(request_id=first.request_id, user_id="alice")
        task.requested_at.CopyFrom(first.requested_at)
        await nc.jetstream().publish(
            FORGET_TASKS_SUBJECT, task.SerializeToString(), headers={MSG_ID_HEADER: "again"}
        )
        await nc.close()
        worker = app.forget_worker
        assert worker is not None
        await eventually(lambda: _true(worker.done >= 2), what="the redelivered task handled")
        after = await status(stub, first.request_id)
        assert [p.service for p in after.progress] == [p.service for p in before.progress]
        ingestion_entry = [p for p in after.progress if p.service == "ingestion"]
        assert (
            len(ingestion_entry) == 1
            and ingestion_entry[0].done_at
            == [p for p in before.progress if p.service == "ingestion"][0].done_at
        )


async def _true(value: bool) -> bool:
    return value


async def test_producers_ask_over_nats(make_app: AppFactory, nats_server: NatsServer) -> None:
    app = await make_app(**forget_settings())
    nc = await nats.connect(nats_server.url)
    reply = await nc.request(
        FORGET_REQUEST_SUBJECT,
        ingestion_pb2.ForgetUserRequest(user_id="alice").SerializeToString(),
        timeout=10,
    )
    answer = ingestion_pb2.ForgetUserResponse.FromString(reply.data)
    assert answer.request_id
    as_json = await nc.request(
        FORGET_REQUEST_SUBJECT, b'{"userId": "bob"}', timeout=10, headers={"Content-Type": "application/json"}
    )
    parsed = json_format.Parse(as_json.data, ingestion_pb2.ForgetUserResponse())
    assert parsed.request_id and parsed.request_id != answer.request_id
    refused = await nc.request(FORGET_REQUEST_SUBJECT, b"", timeout=10)
    assert refused.headers and refused.headers["Freshrec-Error-Code"] == "INVALID_ARGUMENT"
    assert refused.headers["Freshrec-Error"] == "user_id is empty"
    await nc.close()
    channel, stub = stub_for(app)
    async with channel:
        assert (await status(stub, answer.request_id)).request_id == answer.request_id


async def test_after_the_tombstone_expires_the_user_comes_back_as_new(make_app: AppFactory) -> None:
    app = await make_app(**forget_settings(tombstone_ttl=1.0, tombstone_refresh_s=0.1))
    channel, stub = stub_for(app)
    async with channel:
        await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event("alice", "i1", event_id="a1")])
        )
        answer = await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))
        await eventually(lambda: _done(stub, answer.request_id), what="the request done")

        async def accepted_again() -> bool:
            response = await stub.IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=[event("alice", "i2", event_id="a2")])
            )
            return response.accepted == 1

        # Once the tombstone has expired, her events are accepted again, as a new user's.
        await eventually(accepted_again, what="alice's event accepted after the tombstone expired")


async def _done(stub, request_id: str) -> bool:  # type: ignore[no-untyped-def]
    return bool((await status(stub, request_id)).done)


async def test_outbox_events_of_a_forgotten_user_are_dropped_not_published(
    make_app: AppFactory, nats_server: NatsServer
) -> None:
    """Events committed before the tombstone but still in the outbox (NATS was down) never reach the
    stream once the user is forgotten: the publisher drops them at the last moment before sending,
    so the relay cannot put them back after ingestion erased the user."""
    app = await make_app(
        nats={"url": nats_server.url, "reconnect_wait_s": 0.2}, **forget_settings(tombstone_refresh_s=0.1)
    )
    before = sample("freshrec_ingestion_events_forgotten_total", source="outbox")
    channel, stub = stub_for(app)
    async with channel:
        await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event("carol", "i0", event_id="c0")])
        )
        await eventually(lambda: _count(stream_ids(nats_server.url), 1), what="the first event published")
        nats_server.stop()
        events = [event(u, f"i{n}", event_id=f"{u}-e{n}") for n in range(3) for u in ("alice", "bob")]
        assert (await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))).accepted == 6
        # Another replica records alice's request (and tombstone) meanwhile; this one learns it at
        # its next reload, while the events wait in its outbox.
        store, tombstones = app.forget_store, app.tombstones
        assert store is not None and tombstones is not None
        await asyncio.to_thread(store.tombstone, tombstones.hash("alice"), int((time.time() + 3600) * 1e6))
        await eventually(lambda: _true(tombstones.holds("alice")), what="the tombstone reloaded")
        nats_server.start()
        ids = await eventually(
            lambda: _has(stream_ids(nats_server.url), {"bob-e0", "bob-e1", "bob-e2"}), what="bob's events"
        )
        assert not any(i.startswith("alice") for i in ids)
        assert sample("freshrec_ingestion_events_forgotten_total", source="outbox") >= before + 3
        await asyncio.sleep(1.0)  # several relay passes later, still nothing of alice
        assert not any(i.startswith("alice") for i in await stream_ids(nats_server.url))


async def _has(ids_coroutine, wanted: set[str]) -> list[str] | None:  # type: ignore[no-untyped-def]
    ids = await ids_coroutine
    return ids if wanted <= set(ids) else None
