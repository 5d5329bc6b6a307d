"""Secrets never reach logs or reprs; SQL is never built from strings."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc
from services.ingestion.settings import IngestionSettings
from shared.security import make_channel
from shared.settings import PeerSettings
from tests.factories import event
from tests.harness import NatsServer, free_port, wait_serving

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-8c1f0e5b-never-log-me"
NATS_PASSWORD = "nats-pw-3d9a-never-log-me"


def test_settings_never_show_secrets() -> None:
    settings = IngestionSettings(nats={"password": NATS_PASSWORD}, grpc={"auth_token": TOKEN})
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert TOKEN not in text and NATS_PASSWORD not in text


def test_a_service_at_debug_level_logs_no_secret(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats", config=f'authorization {{ user: fr, password: "{NATS_PASSWORD}" }}')
    nats.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")} | {
        "FRESHREC_NATS__URL": nats.url,
        "FRESHREC_NATS__USER": "fr",
        "FRESHREC_NATS__PASSWORD": NATS_PASSWORD,
        "FRESHREC_GRPC__HOST": "127.0.0.1",
        "FRESHREC_GRPC__PORT": str(port),
        "FRESHREC_GRPC__AUTH_TOKEN": TOKEN,
        "FRESHREC_METRICS__ENABLED": "false",
        "FRESHREC_DATABASE__URL": f"sqlite:///{tmp_path / 'ingestion.db'}",
        "FRESHREC_LOG__LEVEL": "DEBUG",
        "FRESHREC_LOG__JSON_LINES": "true",
    }
    log = tmp_path / "ingestion.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingestion"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # no token: refused, and logged
            with pytest.raises(grpc.RpcError):
                ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
                    ingestion_pb2.IngestEventsRequest(events=[event("u", "i")]), timeout=10
                )

        async def with_token() -> None:
            async with make_channel(f"127.0.0.1:{port}", PeerSettings(token=TOKEN)) as channel:
                await ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
                    ingestion_pb2.IngestEventsRequest(events=[event("u", "i", event_id="s1")]), timeout=10
                )

        import asyncio

        asyncio.run(with_token())
        time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(30)
        nats.stop()
    text = log.read_text()
    assert '"level": "debug"' in text or '"level": "info"' in text, "the service logged nothing"
    assert TOKEN not in text
    assert NATS_PASSWORD not in text


def _sql_built_from_strings(path: Path, root: Path = ROOT) -> list[str]:
    """Calls of execute()/text()/exec_driver_sql() whose SQL is an f-string, a % or .format() expression."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in {"execute", "text", "exec_driver_sql", "executemany"}:
            continue
        sql = node.args[0]
        dynamic = (
            isinstance(sql, ast.JoinedStr)
            or (isinstance(sql, ast.BinOp) and isinstance(sql.op, ast.Mod | ast.Add))
            or (isinstance(sql, ast.Call) and getattr(sql.func, "attr", "") == "format")
        )
        if dynamic:
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_sql_is_built_from_strings() -> None:
    offenders = [
        hit
        for folder in ("services", "shared", "cli")
        for path in (ROOT / folder).rglob("*.py")
        for hit in _sql_built_from_strings(path)
    ]
    assert not offenders, f"SQL built from strings (use bound parameters): {offenders}"


def test_the_sql_check_catches_what_it_should(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "session.execute(f'SELECT * FROM t WHERE id = {x}')\n"
        "text('SELECT 1 WHERE a = ' + b)\n"
        "conn.exec_driver_sql('DELETE FROM %s' % table)\n"
        "session.execute(text('SELECT 1 WHERE a = :a'), {'a': a})\n"
    )
    assert _sql_built_from_strings(sample, tmp_path) == ["sample.py:1", "sample.py:2", "sample.py:3"]
