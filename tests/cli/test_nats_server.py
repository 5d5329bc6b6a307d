"""The private nats-server: a port taken between picking and binding moves it, on first start only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli.stack import NatsServer, PortTakenError, port_in_use


def test_a_port_taken_before_the_first_start_moves_the_server(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = NatsServer(tmp_path / "nats")
        server.port = busy  # as if another process bound the picked port in the meantime
        server.start()
        try:
            assert server.port != busy and port_in_use(server.port)
        finally:
            server.stop()
        # A restart keeps its port: the clients know the URL.
        port = server.port
        server.start()
        try:
            assert server.port == port
        finally:
            server.stop()


def test_a_port_given_explicitly_is_not_moved(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(PortTakenError, match=str(busy)):
            NatsServer(tmp_path / "nats", port=busy).start()
