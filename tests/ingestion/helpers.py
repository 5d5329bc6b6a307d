"""Observers and process control for the ingestion tests (nothing here stands in for a component)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from freshrec.v1 import event_pb2
from shared.nats import ACCEPTED_SUBJECTS, EVENTS_STREAM, MSG_ID_HEADER
from tests.harness import NatsServer, free_port, wait_serving

ROOT = Path(__file__).resolve().parents[2]


async def stream_ids(url: str, stream: str = EVENTS_STREAM, subject: str = ACCEPTED_SUBJECTS) -> list[str]:
    """Every ``Nats-Msg-Id`` in a stream, in stream order (read with an ordered consumer)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []  # not declared yet
        ids: list[str] = []
        if info.state.messages:
            sub = await js.subscribe(
                subject,
                stream=stream,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, headers_only=True),
            )
            for _ in range(info.state.messages):
                msg = await sub.next_msg(timeout=10)
                ids.append((msg.headers or {}).get(MSG_ID_HEADER, ""))
            await sub.unsubscribe()
        return ids
    finally:
        await nc.close()


async def stream_events(url: str) -> list[tuple[str, event_pb2.Event, dict[str, str]]]:
    """(subject, event, headers) of every message in FRESHREC_EVENTS, in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(EVENTS_STREAM)
        out = []
        if info.state.messages:
            sub = await js.subscribe(
                ACCEPTED_SUBJECTS,
                stream=EVENTS_STREAM,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
            for _ in range(info.state.messages):
                msg = await sub.next_msg(timeout=10)
                out.append((msg.subject, event_pb2.Event.FromString(msg.data), dict(msg.headers or {})))
            await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def duplicated(ids: list[str]) -> dict[str, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def committed_ids(db: Path) -> list[str]:
    """Event ids in the SQL event log, read-only (the service keeps writing)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        return [row[0] for row in connection.execute("SELECT event_id FROM events ORDER BY seq")]


def unpublished_count(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        return int(connection.execute("SELECT count(*) FROM events WHERE published = 0").fetchone()[0])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


class IngestionProcess:
    """``python -m services.ingestion`` as a real subprocess, configured through its environment."""

    def __init__(self, nats_server: NatsServer, db: Path, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        self.env.update(
            {
                "FRESHREC_NATS__URL": nats_server.url,
                "FRESHREC_NATS__RECONNECT_WAIT_S": "0.2",
                "FRESHREC_GRPC__HOST": "127.0.0.1",
                "FRESHREC_GRPC__PORT": str(self.port),
                "FRESHREC_GRPC__GRACE_S": "1",
                "FRESHREC_METRICS__HOST": "127.0.0.1",
                "FRESHREC_METRICS__PORT": str(self.metrics_port),
                "FRESHREC_DATABASE__URL": f"sqlite:///{db}",
                "FRESHREC_RELAY_INTERVAL_S": "0.2",
                "FRESHREC_REPLICA_NAME": "test",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update({f"FRESHREC_{k.upper()}": v for k, v in settings.items()})
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.ingestion"],
            env=self.env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_serving(self.address, timeout_s, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        return scrape(self.metrics_port)


@contextmanager
def frozen(server: NatsServer) -> Iterator[None]:
    """SIGSTOPs the nats-server: connections stay open, nothing is answered, until the block ends."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


def env_settings(**values: Any) -> Mapping[str, str]:
    return {k: str(v) for k, v in values.items()}
