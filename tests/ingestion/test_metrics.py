"""The Prometheus metrics, read over HTTP from the service's endpoint as a scraper would."""

from __future__ import annotations

from freshrec.v1 import event_pb2, ingestion_pb2
from shared.nats import RAW_SUBJECT
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory, stub_for
from tests.ingestion.helpers import metric, scrape, stream_ids

PREFIX = "freshrec_ingestion_"


async def test_metrics_count_what_happened(
    make_app: AppFactory, nats_server: NatsServer, nats_client
) -> None:
    app = await make_app(metrics={"enabled": True, "host": "127.0.0.1", "port": 0})
    assert app.metrics_port
    before = scrape(app.metrics_port)

    def delta(text: str, name: str, **labels: str) -> float:
        return metric(text, PREFIX + name, **labels) - metric(before, PREFIX + name, **labels)

    channel, stub = stub_for(app)
    async with channel:
        events = [event("u", f"i{n}", event_id=f"m{n}") for n in range(5)]
        events += [event("u", "i0", event_id="m0"), event("", "i", event_id="bad")]
        events.append(event("u", "i", event_id="bad-rating", type=event_pb2.EVENT_TYPE_RATE, value=9))
        response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
    assert (response.accepted, response.duplicates, len(response.errors)) == (5, 1, 2)
    js = nats_client.jetstream()
    await js.publish(RAW_SUBJECT, b"\x00garbage")
    await js.publish(RAW_SUBJECT, event("u", "i9", event_id="via-nats").SerializeToString())

    async def settled() -> str | None:
        text = scrape(app.metrics_port)  # type: ignore[arg-type]
        return (
            text
            if delta(text, "dlq_total", reason="decode_error") == 1
            # counted once JetStream acknowledges it, so possibly after it shows in the stream
            and delta(text, "events_accepted_total", source="nats") == 1
            and len(await stream_ids(nats_server.url)) == 6
            else None
        )

    text = await eventually(settled, what="the NATS message and the dead letter to be counted")
    assert delta(text, "events_accepted_total", source="grpc") == 5
    assert delta(text, "events_accepted_total", source="nats") == 1
    assert delta(text, "events_duplicate_total", source="grpc") == 1
    assert delta(text, "events_rejected_total", source="grpc", reason="user_id_empty") == 1
    assert delta(text, "events_rejected_total", source="grpc", reason="rating_out_of_range") == 1
    assert delta(text, "events_published_total", path="request") == 6
    assert delta(text, "publish_latency_seconds_count") >= 2
    assert delta(text, "commit_seconds_count") >= 2
    assert delta(text, "raw_messages_total") == 2

    async def gauges_up() -> bool:
        text = scrape(app.metrics_port)  # type: ignore[arg-type]
        return metric(text, PREFIX + "nats_connected") == metric(text, PREFIX + "publisher_serving") == 1

    await eventually(gauges_up, what="the connection gauges to say the publisher works")
    assert f"# TYPE {PREFIX}outbox_backlog gauge" in text
    for name in (
        "reconciled_total",
        "outbox_adopted_total",
        "publish_failures_total",
        "batches_refused_total",
    ):
        assert f"# HELP {PREFIX}{name.removesuffix('_total')}" in text, name
