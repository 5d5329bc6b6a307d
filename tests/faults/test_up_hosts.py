"""`freshrec up --hosts`: the compose topology on three network namespaces, as a user starts it.
The verbs find it through stack.json (status lists every replica SERVING, the standby trainer
naming the leader at its own address), a service that dies on a host is started again, and
Ctrl-C stops every process on the hosts and removes every namespace, link and bridge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli.hosts import PLACEMENT
from tests.conftest import eventually

pytestmark = [
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

FRESHREC = str(Path(sys.executable).parent / "freshrec")
ENV = {"COLUMNS": "250", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def freshrec(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FRESHREC, "--data-dir", str(data), *args], capture_output=True, text=True, timeout=120, env=ENV
    )


async def test_up_hosts_runs_the_topology_and_removes_it_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "var"
    out_path = tmp_path / "up.out"
    process = subprocess.Popen(
        [FRESHREC, "--data-dir", str(data), "up", "--hosts"],
        stdout=out_path.open("w"),
        stderr=subprocess.STDOUT,
        env=ENV,
    )
    try:

        async def up() -> bool:
            assert process.poll() is None, out_path.read_text()
            return "Press Ctrl-C to stop" in out_path.read_text()

        await eventually(up, timeout_s=300, what="freshrec up --hosts to report the stack up")
        state = json.loads((data / "stack.json").read_text())
        assert sorted(state["hosts"]) == sorted(PLACEMENT)
        for host in state["hosts"].values():
            assert host["namespace"] in namespaces()
        placed = {r["instance"]: r for replicas in state["services"].values() for r in replicas}
        assert {name: r["host"] for name, r in placed.items()} == {
            "ingestion": "c",
            "feature": "b",
            "trainer-a": "a",
            "trainer-b": "b",
            "inference": "c",
        }
        # Each service on its host's own address, not on this machine's loopback.
        for r in placed.values():
            assert r["address"].split(":")[0] == state["hosts"][r["host"]]["address"]

        status = freshrec(data, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        rows = json.loads(status.stdout)
        assert [r["health"] for r in rows] == ["SERVING"] * 5
        standby = next(r for r in rows if r["address"] == placed["trainer-b"]["address"])
        assert f"{placed['trainer-a']['address']}" in json.dumps(standby), standby

        # A service that dies on its host is started again there.
        os.kill(placed["feature"]["pid"], signal.SIGKILL)

        async def restarted() -> bool:
            return "b/feature exited; restarted it" in out_path.read_text()

        await eventually(restarted, timeout_s=30, what="the feature service restarted")
        await eventually(
            lambda: _serving(data), timeout_s=120, what="every service serving again after the restart"
        )

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, out_path.read_text()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert "stopped." in out_path.read_text()
    assert not (data / "stack.json").exists()
    assert not any(alive(r["pid"]) for r in placed.values())
    listed = namespaces()
    assert not any(h["namespace"] in listed for h in state["hosts"].values())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    bridge = state["hosts"]["a"]["namespace"].split("-")[0].replace("fr", "frbr")
    assert bridge not in links
    assert (data / "hosts" / "logs" / "c-ingestion.log").is_file()


async def _serving(data: Path) -> bool:
    status = freshrec(data, "status", "--json")
    return status.returncode == 0
