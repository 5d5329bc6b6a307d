"""Exactly-once effects on real JetStream and SQLite: forced redelivery is skipped, a crash
between delivery and commit loses nothing, a restart reaches the same state as never
stopping, and a rebuild from the stream equals the live state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydantic_settings import CliApp
from sqlalchemy import text

from freshrec.v1 import event_pb2
from services.feature.consumer import FeatureConsumer, ensure_durable
from services.feature.pull import Puller, stream_position
from services.feature.rebuild import MIGRATIONS, VERSION_TABLE, ReplicaRunning, rebuild
from services.feature.settings import FeatureCommandLine
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.nats import EVENTS_STREAM
from tests.conftest import eventually
from tests.feature.helpers import (
    accepted_times,
    caught_up,
    last_sequence,
    publish,
    settings_for,
    started,
    stored_state,
    workload,
)


async def reference(nats_client, settings, events: list[event_pb2.Event]) -> dict:  # type: ignore[no-untyped-def]
    """The state one uninterrupted pass over the stream produces (stream sequences from 1, and
    the times the stream accepted the events, which must be these events in this order)."""
    accepted = await accepted_times(nats_client, [e.event_id for e in events])
    state = FeatureState(
        settings.recent_items, settings.preprocessing, settings.popularity, settings.seen_items
    )
    for seq, (e, at) in enumerate(zip(events, accepted, strict=True), 1):
        state.apply(e, seq, at)
    return state.dump()


async def fetch_exactly(puller: Puller, n: int) -> list:  # type: ignore[type-arg]
    got: list = []  # type: ignore[type-arg]

    async def enough() -> bool:
        got.extend(await puller.fetch(n - len(got), 1.0))
        return len(got) == n

    await eventually(enough, what=f"{n} deliveries")
    return got


def canonical(dump: dict) -> str:
    return json.dumps(dump, sort_keys=True)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_forced_redelivery_is_skipped(nats_server, nats_client, tmp_path: Path) -> None:
    settings = settings_for(nats_server, tmp_path, ack_wait_s=1.0)
    events = workload(300)
    await publish(nats_client, events)
    engine = make_engine(settings.database)
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    store = FeatureStore(make_sessionmaker(engine), settings.replica_name)
    state = FeatureState(
        settings.recent_items, settings.preprocessing, settings.popularity, settings.seen_items
    )
    js = nats_client.jetstream()
    await ensure_durable(js, settings, 0)
    puller = await Puller(nats_client, EVENTS_STREAM, settings.replica_name).start()
    consumer = FeatureConsumer(nats_client, js, state, store, settings)

    first = await fetch_exactly(puller, 300)
    # Applied and committed, but the ack is lost (as if the process died right after the commit).
    for msg in first:
        sequence, accepted_ns = stream_position(msg.reply)
        state.apply(event_pb2.Event.FromString(msg.data), sequence, accepted_ns / 1e9)
    store.save(*state.take_dirty())
    before = canonical(state.dump())
    skipped = metric("freshrec_feature_redeliveries_skipped_total")

    redelivered: list = []

    async def all_redelivered() -> bool:
        redelivered.extend(await puller.fetch(300, 0.5))
        return len(redelivered) >= 300

    await eventually(all_redelivered, what="JetStream redelivering the unacked batch")
    assert all(m.metadata.num_delivered >= 2 for m in redelivered)
    await consumer.apply(redelivered)  # applies nothing
    assert await consumer.flush()  # commits the position, acks
    assert canonical(state.dump()) == before == canonical(await reference(nats_client, settings, events))
    assert metric("freshrec_feature_redeliveries_skipped_total") - skipped == 300
    assert canonical(stored_state(settings)) == before
    # Acked now: nothing comes back.
    assert await puller.fetch(10, 1.5) == []
    await puller.close()
    engine.dispose()


async def test_events_delivered_but_never_committed_are_not_lost(
    nats_server, nats_client, tmp_path: Path
) -> None:
    settings = settings_for(nats_server, tmp_path, ack_wait_s=120.0)
    events = workload(400)
    await publish(nats_client, events)
    # A replica fetched a batch and died before committing it (no ack; ack_wait is long).
    await ensure_durable(nats_client.jetstream(), settings, 0)
    puller = await Puller(nats_client, EVENTS_STREAM, settings.replica_name).start()
    await fetch_exactly(puller, 150)
    await puller.close()

    app = await started(settings)
    await caught_up(app, len(events), timeout_s=30)  # well before ack_wait would redeliver
    assert app.state is not None
    assert canonical(app.state.dump()) == canonical(await reference(nats_client, settings, events))
    await app.stop()


async def test_restart_reaches_the_state_of_never_stopping(nats_server, nats_client, tmp_path: Path) -> None:
    steady = settings_for(nats_server, tmp_path, "steady", consumer_name="steady", fetch_batch=97)
    bumpy = settings_for(nats_server, tmp_path, "bumpy", consumer_name="bumpy", fetch_batch=53)
    events = workload(3000, seed=4)
    rules = {
        rule: metric("freshrec_feature_preprocessing_total", {"rule": rule})
        for rule in ("events", "collapsed_repeats", "bot_events", "bot_flags", "normalised_ratings")
    }
    a = await started(steady)
    b = await started(bumpy)
    await publish(nats_client, events[:1000])
    await caught_up(b, 500)
    # Stopped while events keep arriving, restarted, stopped again mid-stream, restarted.
    stopping = asyncio.create_task(b.stop())
    await publish(nats_client, events[1000:2000])
    await stopping
    b = await started(bumpy)
    await caught_up(b, 1500)
    await b.stop()
    await publish(nats_client, events[2000:])
    b = await started(bumpy)
    total = await last_sequence(nats_client)
    await caught_up(a, total)
    await caught_up(b, total)
    assert a.state is not None and b.state is not None
    expected = canonical(await reference(nats_client, steady, events))
    assert canonical(a.state.dump()) == expected
    assert canonical(b.state.dump()) == expected
    await a.stop()
    await b.stop()
    assert canonical(stored_state(steady)) == expected == canonical(stored_state(bumpy))
    # Every preprocessing rule fired and was counted (steady saw each event once, bumpy at least once).
    for rule, before in rules.items():
        assert metric("freshrec_feature_preprocessing_total", {"rule": rule}) > before, rule


async def test_rebuild_from_the_stream_equals_the_live_state(
    nats_server, nats_client, tmp_path: Path
) -> None:
    settings = settings_for(nats_server, tmp_path)
    events = workload(2000, seed=5)
    await publish(nats_client, events)
    app = await started(settings)
    await caught_up(app, len(events))
    assert app.state is not None
    live = canonical(app.state.dump())
    with pytest.raises(ReplicaRunning):
        await rebuild(settings)
    await app.stop()

    # Damage the stored state: a rebuild recomputes it all from the stream.
    engine = make_engine(settings.database)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM feature_users WHERE user_id LIKE 'u1%'"))
        connection.execute(text("UPDATE feature_consumer_position SET stream_sequence = 7"))
    engine.dispose()
    assert canonical(stored_state(settings)) != live
    rebuilt = await rebuild(settings, batch=333)
    assert canonical(rebuilt.dump()) == live
    assert canonical(stored_state(settings)) == live

    # The replica resumes after the rebuilt position: later events are applied once.
    more = workload(300, seed=6, start=1_700_100_000.0)
    await publish(nats_client, more)
    app = await started(settings)
    await caught_up(app, len(events) + len(more))
    assert canonical(app.state.dump()) == canonical(await reference(nats_client, settings, events + more))
    await app.stop()


@pytest.mark.slow
async def test_rebuild_command_line(nats_server, nats_client, tmp_path: Path) -> None:
    settings = settings_for(nats_server, tmp_path)
    events = workload(500, seed=7)
    await publish(nats_client, events)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env |= {"FRESHREC_NATS__URL": nats_server.url, "FRESHREC_DATABASE__URL": settings.database.url}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.feature", "rebuild", "--batch", "100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilt" in result.stderr
    assert canonical(stored_state(settings)) == canonical(await reference(nats_client, settings, events))


def test_help_explains_rebuild(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--help"], ["rebuild", "--help"]):
        with pytest.raises(SystemExit) as exited:
            CliApp.run(FeatureCommandLine, cli_args=args, cli_show_env_vars=True)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "rebuild" in out and "FRESHREC_EVENTS" in out  # the main help names the subcommand
    assert "sequence 1" in out and "one transaction" in out  # rebuild's own help says what it does


async def test_a_failed_commit_reloads_from_sql_and_applies_again(
    nats_server, nats_client, tmp_path: Path
) -> None:
    settings = settings_for(nats_server, tmp_path)
    events = workload(1200, seed=8)
    app = await started(settings)
    await publish(nats_client, events[:600])
    await caught_up(app, 600)
    failures = metric("freshrec_feature_commit_failures_total")
    engine = make_engine(settings.database)
    with engine.begin() as connection:  # the table disappears under the service
        connection.execute(text("ALTER TABLE feature_users RENAME TO feature_users_away"))
    await publish(nats_client, events[600:])

    async def failed() -> bool:
        return metric("freshrec_feature_commit_failures_total") > failures

    await eventually(failed, what="a failed commit")
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE feature_users_away RENAME TO feature_users"))
    engine.dispose()
    await caught_up(app, len(events))
    assert app.state is not None

    expected = canonical(await reference(nats_client, settings, events))

    async def recovered() -> bool:
        # Memory had everything even before the failed commit; what matters is SQL: the service
        # must notice the failure, reload, apply again and commit.
        return canonical(await asyncio.to_thread(stored_state, settings)) == expected

    await eventually(recovered, what="SQL holding the state of one clean pass")
    assert canonical(app.state.dump()) == expected
    await app.stop()
    assert canonical(stored_state(settings)) == canonical(await reference(nats_client, settings, events))
