"""Every verb of the `freshrec` command answers --help, and the console script is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from cli.stack import free_port


def verbs(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        out.append((*prefix, name))
        if hasattr(command, "commands"):
            out += verbs(command, (*prefix, name))
    return out


def test_every_verb_has_help() -> None:
    root = typer.main.get_command(app)
    assert hasattr(root, "commands")
    found = verbs(root)
    expected = {
        ("up",),
        ("demo",),
        ("replay",),
        ("recommend",),
        ("forget",),
        ("status",),
        ("models",),
        ("models", "list"),
        ("models", "promote"),
        ("models", "rollback"),
        ("items",),
        ("items", "hide"),
        ("items", "unhide"),
        ("items", "delete"),
        ("db",),
        ("db", "upgrade"),
        ("db", "downgrade"),
        ("db", "current"),
    }
    assert expected <= set(found)
    runner = CliRunner()
    for verb in found:
        result = runner.invoke(app, [*verb, "--help"])
        assert result.exit_code == 0, (verb, result.output)
        assert "Usage:" in result.output and len(result.output) > 100, verb


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "freshrec"
    assert script.is_file(), "pip install -e . should install the freshrec console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for verb in ("up", "demo", "replay", "recommend", "status", "models"):
        assert verb in result.stdout


@pytest.fixture
def unused_port() -> int:
    return free_port()


def test_unreachable_service_says_what_to_do(unused_port: int) -> None:
    result = CliRunner().invoke(app, ["--inference", f"127.0.0.1:{unused_port}", "recommend", "alice"])
    assert result.exit_code == 1
    assert f"cannot reach inference at 127.0.0.1:{unused_port}" in result.output
    assert "freshrec up" in result.output


def test_bad_replay_file_says_why(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("who,what\n1,2\n")
    result = CliRunner().invoke(app, ["replay", str(path), "--format", "movielens"])
    assert result.exit_code == 1
    assert "no user column" in result.output or "no rating column" in result.output


def test_earliest_event_time_option_sets_an_ingestion_setting() -> None:
    from cli.main import EARLIEST_EVENT_TIME_ENV
    from services.ingestion.settings import IngestionSettings

    field = EARLIEST_EVENT_TIME_ENV.removeprefix("FRESHREC_").lower()
    if "earliest" not in " ".join(IngestionSettings.model_fields):
        pytest.skip("ingestion has no earliest-time setting yet (issue 3)")
    assert field in IngestionSettings.model_fields
