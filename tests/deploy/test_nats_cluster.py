"""The compose file's three NATS nodes, run here from their own command lines (hosts and ports
mapped onto this machine): they form a JetStream cluster, freshrec declares its streams with three
replicas on it, and the stream keeps accepting and delivering with one node killed."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from shared.nats import EVENTS_STREAM, StreamReader, ensure_events_stream
from tests.conftest import eventually
from tests.deploy.test_compose import NATS_NODES, compose
from tests.harness import NATS_SERVER, free_port

pytestmark = pytest.mark.slow


def local_command(command: list[str], ports: dict[str, dict[str, int]], node: str, store: Path) -> list[str]:
    """The node's compose command with its hosts and ports mapped onto 127.0.0.1 and free ports."""
    args = list(command)

    def replace_value(flag: str, value: str) -> None:
        index = args.index(flag)
        args[index + 1] = value

    replace_value("--store_dir", str(store))
    replace_value("--http_port", str(ports[node]["http"]))
    assert args[args.index("--cluster") + 1] == "nats://0.0.0.0:6222"
    replace_value("--cluster", f"nats://127.0.0.1:{ports[node]['cluster']}")
    routes = args[args.index("--routes") + 1].split(",")
    assert routes == [f"nats://{n}:6222" for n in NATS_NODES], routes
    replace_value("--routes", ",".join(f"nats://127.0.0.1:{ports[n]['cluster']}" for n in NATS_NODES))
    return [str(NATS_SERVER), *args, "-a", "127.0.0.1", "-p", str(ports[node]["client"])]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, tuple[subprocess.Popen[bytes], dict[str, int]]]]:
    doc = compose()
    ports = {n: {"client": free_port(), "cluster": free_port(), "http": free_port()} for n in NATS_NODES}
    nodes = {}
    try:
        for node in NATS_NODES:
            command = local_command(doc["services"][node]["command"], ports, node, tmp_path / node)
            log = (tmp_path / f"{node}.log").open("wb")
            nodes[node] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), ports[node])
        yield nodes
    finally:
        for process, _ in nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?js-enabled-only=true", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


async def test_the_compose_nats_nodes_form_a_jetstream_cluster_that_survives_a_node(cluster) -> None:  # type: ignore[no-untyped-def]
    for node, (process, ports) in cluster.items():

        async def up(p: subprocess.Popen[bytes] = process, port: int = ports["http"]) -> bool:
            assert p.poll() is None, "a NATS node exited: see its log"
            return healthy(port)

        await eventually(up, timeout_s=60, what=f"{node} healthy")

    urls = [f"nats://127.0.0.1:{ports['client']}" for _, ports in cluster.values()]
    nc = await nats.connect(servers=urls[:2])  # not through nats-3, which is killed below
    js = nc.jetstream()

    async def declared() -> bool:
        try:
            await ensure_events_stream(js, replicas=3, owner=True)
        except Exception:  # no JetStream meta leader yet
            return False
        return True

    await eventually(declared, timeout_s=60, what="FRESHREC_EVENTS declared with three replicas")

    async def replicated() -> bool:
        info = await js.stream_info(EVENTS_STREAM)
        return (
            info.config.num_replicas == 3
            and info.cluster is not None
            and len(info.cluster.replicas or []) == 2
        )

    await eventually(replicated, timeout_s=60, what="three copies of the stream")
    subject = "freshrec.events.accepted.click.0"
    for n in range(10):
        await js.publish(subject, f"before-{n}".encode(), headers={"Nats-Msg-Id": f"before-{n}"})

    # The consumer exists before the failure, as freshrec's do (replicated with the stream).
    reader = StreamReader(js, "deploy-test")

    async def subscribe() -> bool:
        try:
            await reader.seat(0)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            return False  # the cluster is still electing a leader
        return True

    await eventually(subscribe, timeout_s=60, what="a durable consumer")

    nats3, _ = cluster["nats-3"]
    nats3.kill()
    nats3.wait()

    async def publish(data: str, msg_id: str) -> bool:
        # While the cluster elects a new stream leader a publish may time out; resending with the
        # same Nats-Msg-Id is safe (deduplicated), which is what producers do.
        try:
            await js.publish(subject, data.encode(), headers={"Nats-Msg-Id": msg_id}, timeout=5)
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            return False
        return True

    for n in range(10):
        await eventually(lambda n=n: publish(f"after-{n}", f"after-{n}"), timeout_s=60, what=f"publish {n}")
    await eventually(lambda: publish("before-0", "before-0"), timeout_s=60, what="a repeat")  # deduplicated

    seen: list[str] = []

    async def all_delivered() -> bool:
        try:
            msgs = await reader.fetch(20, timeout_s=1)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            return False  # re-seating while the cluster elects a leader: try again
        for msg in msgs:
            seen.append(msg.data.decode())
            await msg.ack()
        return len(seen) >= 20

    await eventually(all_delivered, timeout_s=60, what="every message delivered")
    assert seen == [f"before-{n}" for n in range(10)] + [f"after-{n}" for n in range(10)]
    await nc.close()
