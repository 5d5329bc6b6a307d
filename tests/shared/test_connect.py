"""A service's first connection waits for JetStream to answer: a cluster that has just started
elects its meta leader first, and a stream declared before that times out (the service would exit)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from shared.nats import connect
from shared.settings import NatsSettings
from tests.harness import NATS_SERVER, NatsServer, free_port


def cluster_node(store: Path, index: int, cluster_ports: list[int]) -> NatsServer:
    routes = ", ".join(f'"nats://127.0.0.1:{p}"' for i, p in enumerate(cluster_ports) if i != index)
    config = (
        f"server_name: n{index}\n"
        f"cluster {{ name: freshrec, listen: 127.0.0.1:{cluster_ports[index]}, routes: [{routes}] }}\n"
    )
    return NatsServer(store / f"n{index}", config=config)


async def test_connect_returns_once_the_cluster_has_a_meta_leader(tmp_path: Path) -> None:
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [cluster_node(tmp_path, i, cluster_ports) for i in range(3)]
    nodes[0].start()
    try:
        settings = NatsSettings(url=nodes[0].url, jetstream_wait_s=60)
        connecting = asyncio.create_task(connect(settings, name="test"))
        await asyncio.sleep(3)  # one node of three: no majority, so no meta leader
        assert not connecting.done(), "connect returned before JetStream could answer"

        nodes[1].start()  # two of three elect a meta leader
        nc = await asyncio.wait_for(connecting, 30)
        try:
            # What a service does next at start: declare its replicated streams.
            await nc.jetstream().add_stream(StreamConfig(name="S", subjects=["s"], num_replicas=2))
        finally:
            await nc.close()
    finally:
        for node in nodes:
            node.stop()


async def test_connect_to_a_server_without_jetstream_says_what_to_check(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = NatsSettings(url=f"nats://127.0.0.1:{port}", jetstream_wait_s=2)
        with pytest.raises(ConnectionError, match="JetStream did not answer within 2 s.*-js"):
            await asyncio.wait_for(connect(settings, name="test"), 30)
    finally:
        server.terminate()
        server.wait(10)
