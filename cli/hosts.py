"""Several hosts on one machine: a network namespace per host, joined by one bridge.

Each host gets its own address on a private /24 (the machine itself keeps ``.254`` on the bridge,
so a client here reaches every host), runs a node of a three-way NATS JetStream cluster and any
freshrec services placed on it, each configured only by environment, as compose configures its
containers. Losing a host means every process in its namespace killed at once; a partition cuts
the host's link to the bridge. Needs root (``ip netns``, veth pairs, a bridge); everything it
makes is removed by :meth:`Hosts.close`, whatever state it was left in.

:func:`start_freshrec` lays the services out as :data:`PLACEMENT` says (the topology
``docker-compose.yml`` describes, with any one host expendable); ``freshrec up --hosts``, the fault
tests and ``bench/hosts.py`` use it.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.stack import nats_server_binary, wait_healthy

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
NATS_CLIENT_PORT = 4222
NATS_CLUSTER_PORT = 6222
NATS_MONITOR_PORT = 8222
#: How often nodes and clients ping each other; a peer is dropped after two missed pings.
PING_INTERVAL = "1s"
DEFAULT_PORTS = {"ingestion": 50051, "feature": 50052, "trainer": 50053, "inference": 50054}
#: Each service's Prometheus port on its host (two services may share a host).
METRICS_PORTS = {"ingestion": 9101, "feature": 9102, "trainer": 9103, "inference": 9104}
#: Which services each host runs, in start order: losing any one host loses no accepted event and
#: stops no service for long (the trainer's standby leads, ingestion's outbox waits for NATS).
PLACEMENT = {
    "a": ["trainer"],
    "b": ["feature", "trainer"],
    "c": ["ingestion", "inference"],
}


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    return subprocess.run(command, check=check, capture_output=True, text=True)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: What each process was started with, so that :meth:`Hosts.supervise_once` can start it again.
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)


class Hosts:
    """Hosts ``names`` on a fresh bridge; use as a context manager (or call :meth:`close`)."""

    def __init__(self, names: list[str], work_dir: Path) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.work_dir = Path(work_dir)
        self.bridge = f"frbr{tag}"
        subnet = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.gateway = f"{subnet}.254"
        self.hosts = {
            name: Host(name, f"fr{tag}-{name}", f"{subnet}.{i + 1}", f"frv{tag}{i}")
            for i, name in enumerate(names)
        }
        self._made = False

    def __enter__(self) -> Hosts:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._made = True
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts.values():
            _ip("netns", "add", host.namespace)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", namespace=host.namespace)
            _ip("link", "set", "eth0", "up", namespace=host.namespace)
            _ip("link", "set", "lo", "up", namespace=host.namespace)

    def close(self) -> None:
        if not self._made:
            return
        for host in self.hosts.values():
            self.kill_host(host.name)
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        self._made = False

    # -- processes -------------------------------------------------------------------------------
    def run(self, host: str, name: str, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Starts ``argv`` in the host's namespace, its output in ``<work dir>/logs/<host>-<name>.log``."""
        h = self.hosts[host]
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / f"{host}-{name}.log").open("ab")
        process = subprocess.Popen(
            ["ip", "netns", "exec", h.namespace, *argv],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        h.processes[name] = process
        h.commands[name] = (list(argv), dict(env))
        return process

    def supervise_once(self) -> list[str]:
        """Starts again every process that exited on a host still up; ``host/name`` of each."""
        restarted = []
        for h in self.hosts.values():
            for name, process in list(h.processes.items()):
                if process.poll() is not None:
                    logger.warning(
                        "%s on host %s exited with %s; restarting it", name, h.name, process.returncode
                    )
                    argv, env = h.commands[name]
                    self.run(h.name, name, argv, env)
                    restarted.append(f"{h.name}/{name}")
        return restarted

    def kill_host(self, host: str) -> None:
        """Every process in the host's namespace, at once (SIGKILL): the machine is gone."""
        h = self.hosts[host]
        pids = _ip("netns", "pids", h.namespace, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for process in h.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                logger.warning("a process on %s outlived SIGKILL", host)
        h.processes.clear()

    def partition(self, host: str) -> None:
        """Cuts the host off the bridge (its processes keep running, alone)."""
        _ip("link", "set", self.hosts[host].veth, "down")

    def heal(self, host: str) -> None:
        _ip("link", "set", self.hosts[host].veth, "master", self.bridge, "up")

    # -- NATS ------------------------------------------------------------------------------------
    def nats_urls(self, first: str | None = None) -> str:
        """The cluster's client URLs, ``first``'s node first (a client prefers its own host's node)."""
        order = sorted(self.hosts.values(), key=lambda h: h.name != first)
        return ",".join(f"nats://{h.address}:{NATS_CLIENT_PORT}" for h in order)

    def start_nats(self, timeout_s: float = 60.0) -> None:
        """A JetStream cluster node on every host, then waits until each reports healthy: JetStream
        on, the cluster's meta leader elected and the node current with it."""
        for host in self.hosts.values():
            routes = ",".join(
                f"nats://{o.address}:{NATS_CLUSTER_PORT}" for o in self.hosts.values() if o is not host
            )
            store = self.work_dir / "nats" / host.name
            store.mkdir(parents=True, exist_ok=True)
            # A peer cut off mid-connection is noticed by missed pings, by default only after
            # minutes (2 min interval): until then requests routed to it go unanswered.
            config = store / "nats.conf"
            config.write_text(f'ping_interval: "{PING_INTERVAL}"\nping_max: 2\n')
            argv = [
                nats_server_binary(),
                "-c",
                str(config),
                "-js",
                "-sd",
                str(store),
                "-a",
                "0.0.0.0",
                "-p",
                str(NATS_CLIENT_PORT),
                "-m",
                str(NATS_MONITOR_PORT),
                "--server_name",
                f"nats-{host.name}",
                "--cluster_name",
                "freshrec",
                "--cluster",
                f"nats://0.0.0.0:{NATS_CLUSTER_PORT}",
                "--routes",
                routes,
            ]
            self.run(host.name, "nats", argv, os.environ)
        deadline = time.monotonic() + timeout_s
        for host in self.hosts.values():
            url = f"http://{host.address}:{NATS_MONITOR_PORT}/healthz"
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the NATS node on {host.name} did not become healthy")
                time.sleep(0.2)

    # -- freshrec services ----------------------------------------------------------------------
    def service_env(self, host: str, service: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """What compose gives a container: everything by environment, on the host's own address."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        env.update(
            {
                "FRESHREC_NATS__URL": self.nats_urls(first=host),
                "FRESHREC_NATS__STREAM_REPLICAS": str(min(3, len(self.hosts))),
                "FRESHREC_GRPC__HOST": self.hosts[host].address,
                "FRESHREC_GRPC__PORT": str(DEFAULT_PORTS[service]),
                "FRESHREC_METRICS__HOST": self.hosts[host].address,
                "FRESHREC_METRICS__PORT": str(METRICS_PORTS[service]),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        return env

    def start_service(
        self, host: str, service: str, extra: Mapping[str, str] | None = None, name: str | None = None
    ) -> subprocess.Popen[bytes]:
        return self.run(
            host,
            name or service,
            [sys.executable, "-m", f"services.{service}"],
            self.service_env(host, service, extra),
        )

    def address(self, host: str, service: str) -> str:
        return f"{self.hosts[host].address}:{DEFAULT_PORTS[service]}"


@dataclass
class Placed:
    """One freshrec process on a host."""

    host: str
    service: str
    name: str
    process: subprocess.Popen[bytes]


def start_freshrec(
    hosts: Hosts,
    work_dir: Path,
    env: Mapping[str, Mapping[str, str]] | None = None,
    timeout_s: float = 180.0,
) -> dict[str, Placed]:
    """The services on the hosts as :data:`PLACEMENT` says, each waited for until SERVING, by
    name: ``ingestion``, ``feature``, ``inference``, ``trainer-a`` and ``trainer-b`` (the trainer on
    the first host leads, the other stands by). ``env`` adds variables per service. SQL is a
    SQLite file per service under ``work_dir`` (the trainers share theirs: their registry; compose
    uses PostgreSQL). Models, checkpoints and the lease live on JetStream, so no other disk is
    shared."""
    placed: dict[str, Placed] = {}
    key = Path(work_dir) / "forget.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
    trainers = [h for h, services in PLACEMENT.items() if "trainer" in services]
    order = [(h, s) for s in DEFAULT_PORTS for h, services in PLACEMENT.items() if s in services]
    for host, service in order:
        name = f"trainer-{host}" if service == "trainer" and len(trainers) > 1 else service
        extra = {
            "FRESHREC_DATABASE__URL": f"sqlite:///{Path(work_dir) / (service + '.db')}",
            **(env or {}).get(service, {}),
        }
        if service == "ingestion":
            extra.setdefault("FRESHREC_FORGET__HASH_KEY", key.read_text().strip())
        if service == "trainer":
            extra.setdefault("FRESHREC_REPLICA_NAME", name)
            extra.setdefault("FRESHREC_CHECKPOINT_DIR", str(Path(work_dir) / name))
        if service == "inference":
            feature_host = next(h for h, services in PLACEMENT.items() if "feature" in services)
            extra.setdefault("FRESHREC_FEATURE_ADDR", hosts.address(feature_host, "feature"))
        process = hosts.start_service(host, service, extra, name=name)
        placed[name] = Placed(host, service, name, process)
        # One at a time: the first of each creates the schema and streams; the first trainer leads.
        wait_healthy(hosts.address(host, service), timeout_s, process)
    return placed


def describe(hosts: Hosts, placed: Mapping[str, Placed]) -> dict[str, Any]:
    """What ``freshrec up --hosts`` writes to ``stack.json`` for the other verbs to find."""
    services: dict[str, list[dict[str, Any]]] = {name: [] for name in DEFAULT_PORTS}
    for p in placed.values():
        address = hosts.hosts[p.host].address
        services[p.service].append(
            {
                "instance": p.name,
                "host": p.host,
                "address": hosts.address(p.host, p.service),
                "metrics": f"http://{address}:{METRICS_PORTS[p.service]}/metrics",
                "pid": hosts.hosts[p.host].processes[p.name].pid,
            }
        )
    return {
        "pid": os.getpid(),
        "data_dir": str(hosts.work_dir),
        "nats": hosts.nats_urls(),
        "hosts": {
            h.name: {"address": h.address, "namespace": h.namespace, "veth": h.veth}
            for h in hosts.hosts.values()
        },
        "services": services,
    }
