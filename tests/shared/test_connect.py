"""A service's first connection waits for JetStream to answer: a cluster that has just started
elects its meta leader first, and a stream declared before that times out (the service would exit)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from shared.nats import connect, wait_for_jetstream
from shared.settings import NatsSettings
from tests.harness import NATS_SERVER, cluster_nodes, free_port


async def test_connect_returns_once_the_cluster_has_a_meta_leader(tmp_path: Path) -> None:
    nodes = cluster_nodes(tmp_path)
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


async def test_a_server_that_stops_answering_is_left_for_another(tmp_path: Path) -> None:
    """A host cut off the network sends no reset: the client's pings must notice it (by nats-py's
    default only after minutes) and move to a node that answers."""
    nodes = cluster_nodes(tmp_path)
    for node in nodes:
        node.start()
    try:
        nc = await connect(NatsSettings(url=",".join(n.url for n in nodes), ping_interval_s=1), name="test")
        try:
            frozen = next(n for n in nodes if n.url.endswith(f":{nc.connected_url.port}"))
            assert frozen.process is not None
            frozen.process.send_signal(signal.SIGSTOP)  # alive, connected, silent: like a partition
            try:
                deadline = time.monotonic() + 30
                while nc.connected_url is None or nc.connected_url.port == frozen.port or not nc.is_connected:
                    assert time.monotonic() < deadline, "still on the server that stopped answering"
                    await asyncio.sleep(0.2)
                # and JetStream answers through the new node (once it has a meta leader again)
                await wait_for_jetstream(nc.jetstream(), 30)
            finally:
                frozen.process.send_signal(signal.SIGCONT)
        finally:
            await nc.close()
    finally:
        for node in nodes:
            node.stop()
