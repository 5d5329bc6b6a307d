"""`freshrec up` as `make run` starts it (status table, stack.json, Ctrl-C stops everything), and
`freshrec demo` starting a stack of its own when none is running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.slow

FRESHREC = str(Path(sys.executable).parent / "freshrec")
ENV = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_up_shows_a_status_table_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "var"
    out = (tmp_path / "up.out").open("w+")
    process = subprocess.Popen(
        [FRESHREC, "--data-dir", str(data), "up", "--free-ports"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=ENV,
    )
    try:

        async def up() -> bool:
            assert process.poll() is None, (tmp_path / "up.out").read_text()
            return "Press Ctrl-C to stop" in (tmp_path / "up.out").read_text()

        await eventually(up, timeout_s=120, what="freshrec up to report the stack up")
        text = (tmp_path / "up.out").read_text()
        assert "freshrec is up" in text
        assert text.count("SERVING") == 4, text
        state = json.loads((data / "stack.json").read_text())
        assert state["pid"] == process.pid
        children = [r["pid"] for replicas in state["services"].values() for r in replicas]
        assert all(alive(pid) for pid in children)

        status = subprocess.run(
            [FRESHREC, "--data-dir", str(data), "status"], capture_output=True, text=True, timeout=60, env=ENV
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 4
        assert str(data / "stack.json") in status.stdout  # says where it found the stack

        # A second `up` in the same folder is refused with what to do.
        second = subprocess.run(
            [FRESHREC, "--data-dir", str(data), "up", "--free-ports"],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
        assert second.returncode == 1 and "already up" in second.stderr, second.stderr

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopped." in (tmp_path / "up.out").read_text()
    assert not (data / "stack.json").exists()
    assert not any(alive(pid) for pid in children)
    assert (data / "logs" / "ingestion.log").is_file()

    # With the stack gone, status says so and what to do.
    status = subprocess.run(
        [FRESHREC, "--data-dir", str(data), "--ingestion", "127.0.0.1:1", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert status.returncode == 1
    assert "run `freshrec up`" in status.stderr


def test_demo_starts_a_stack_when_none_is_running(tmp_path: Path) -> None:
    from cli.stack import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [
            FRESHREC,
            "--data-dir",
            str(tmp_path / "var"),
            "--ingestion",
            nowhere,
            "demo",
            "--duration",
            "4",
            "--rate",
            "100",
            "--plain",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting an embedded stack for the demo" in result.stdout
    assert "demo summary" in result.stdout
    assert "stopping the demo's stack" in result.stdout
    assert not (tmp_path / "var" / "stack.json").exists()
