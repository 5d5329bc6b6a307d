"""The `freshrec` verbs against a real embedded stack with two ingestion and two inference replicas:
replay of MovieLens-100K through both ingestion replicas, both inference replicas swapping to each
new model, promote and rollback reaching every replica, recommend, status, the demo, metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.main import EARLIEST_EVENT_TIME_ENV
from cli.stack import Stack
from freshrec.v1 import inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import ML100K, eventually

pytestmark = pytest.mark.slow

FRESHREC = str(Path(sys.executable).parent / "freshrec")
JSON_LOGS = {"FRESHREC_LOG__JSON_LINES": "true"}
ROOT = Path(__file__).resolve().parents[2]
REPLAYED = 3000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    s = Stack(
        root / "var",
        ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
        replicas={"ingestion": 2, "inference": 2},
        extra_env={
            # What `freshrec up --earliest-event-time` sets: MovieLens-100K is from 1997-98.
            "ingestion": {EARLIEST_EVENT_TIME_ENV: "1995-01-01T00:00:00Z", **JSON_LOGS},
            "feature": JSON_LOGS,
            "trainer": {"FRESHREC_EXPORT_INTERVAL_S": "1", "FRESHREC_MICRO_BATCH": "128", **JSON_LOGS},
            # Announcements, not the poll, must do it.
            "inference": {"FRESHREC_POLL_INTERVAL_S": "60", **JSON_LOGS},
        },
        log_dir=root / "logs",
    )
    s.start()
    s.write_state()  # what `freshrec up` does: the verbs below find the stack through it
    yield s
    s.stop()


def freshrec(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FRESHREC, "--data-dir", str(stack.data_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


async def served_versions(stack: Stack) -> list[str]:
    versions = []
    for address in stack.addresses("inference"):
        async with grpc.aio.insecure_channel(address) as channel:
            info = await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
                inference_pb2.GetModelInfoRequest(), timeout=5
            )
        versions.append(info.model_version)
    return versions


async def trainer_status(stack: Stack) -> trainer_pb2.GetTrainerStatusResponse:
    async with grpc.aio.insecure_channel(stack.address("trainer")) as channel:
        return await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
            trainer_pb2.GetTrainerStatusRequest(), timeout=5
        )


@pytest.fixture(scope="module")
def replayed(stack: Stack) -> subprocess.CompletedProcess[str]:
    if not (ML100K / "u.data").is_file():
        pytest.skip("MovieLens-100K is not available")
    return freshrec(
        stack,
        "replay",
        str(ML100K / "u.data"),
        "--format",
        "movielens",
        "--limit",
        str(REPLAYED),
        "--batch",
        "250",
        "--timestamps",
        "shift",
    )


def test_replay_goes_through_both_ingestion_replicas(
    stack: Stack, replayed: subprocess.CompletedProcess[str]
) -> None:
    assert replayed.returncode == 0, replayed.stderr
    out = replayed.stdout
    assert f"{REPLAYED}/{REPLAYED}" in out, out  # the progress bar finished
    assert "replay summary" in out and row(out, "accepted") == f"{REPLAYED:,}", out
    for address in stack.addresses("ingestion"):
        assert address in out
    # Both replicas took calls: each one's RPC counter moved.
    for instance in stack.instances("ingestion"):
        text = scrape(stack, instance)
        assert 'freshrec_rpc_total{code="OK",method="/freshrec.v1.IngestionService/IngestEvents"}' in text

    # A second replay of the same file is recognised event by event, original timestamps or not.
    again = freshrec(stack, "replay", str(ML100K / "u.data"), "--limit", "500", "--timestamps", "keep")
    assert again.returncode == 0, again.stderr
    assert row(again.stdout, "duplicates (already ingested)") == "500", again.stdout
    assert row(again.stdout, "accepted") == "0", again.stdout


async def test_both_inference_replicas_swap_to_each_new_model(
    stack: Stack, replayed: subprocess.CompletedProcess[str]
) -> None:
    async def learned_all() -> trainer_pb2.GetTrainerStatusResponse | None:
        status = await trainer_status(stack)
        return status if status.events_learned >= REPLAYED and status.live_version else None

    await eventually(learned_all, timeout_s=90, what="the trainer to learn the replay")

    async def all_serve_live() -> str | None:
        live = (await trainer_status(stack)).live_version
        versions = await served_versions(stack)
        return live if live and all(v == live for v in versions) else None

    first = await eventually(all_serve_live, timeout_s=60, what="both replicas serving the live model")
    pids = [stack.services[i].process.pid for i in stack.instances("inference")]  # type: ignore[union-attr]

    # The next export reaches both replicas too, without restarting either.
    async with grpc.aio.insecure_channel(stack.address("trainer")) as channel:
        exported = await trainer_pb2_grpc.TrainerServiceStub(channel).TriggerTraining(
            trainer_pb2.TriggerTrainingRequest(kind=trainer_pb2.TRAINING_KIND_EXPORT), timeout=60
        )
    newer = exported.model.version
    assert newer > first

    async def both_on_newer() -> bool:
        return all(v >= newer for v in await served_versions(stack))

    await eventually(both_on_newer, timeout_s=60, what=f"both replicas on {newer} or later")
    assert pids == [stack.services[i].process.pid for i in stack.instances("inference")]  # type: ignore[union-attr]


def test_models_verbs_move_every_replica(stack: Stack, replayed: subprocess.CompletedProcess[str]) -> None:
    listing = freshrec(stack, "models", "list")
    assert listing.returncode == 0, listing.stderr
    assert "live" in listing.stdout and "v0000" in listing.stdout

    rolled = freshrec(stack, "models", "rollback", "--timeout", "60")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    target = rolled.stdout.split("rolled back to ")[1].split()[0]
    assert rolled.stdout.count("serving it") == 2, rolled.stdout
    for address in stack.addresses("inference"):
        assert f"inference {address}: serving it" in rolled.stdout

    previous = rolled.stdout.split("(was ")[1].split(")")[0]
    promoted = freshrec(stack, "models", "promote", previous, "--timeout", "60")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert f"promoted {previous} (was {target})" in promoted.stdout
    assert promoted.stdout.count("serving it") == 2, promoted.stdout

    missing = freshrec(stack, "models", "promote", "v999999")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr and "v999999" in missing.stderr


def test_recommend_and_status(stack: Stack, replayed: subprocess.CompletedProcess[str]) -> None:
    answer = freshrec(stack, "recommend", "196", "-k", "3", "--json")
    assert answer.returncode == 0, answer.stderr
    response = json.loads(answer.stdout)
    assert len(response["items"]) == 3
    assert all(i["item_id"] and i["source"] for i in response["items"])

    table = freshrec(stack, "recommend", "196", "-k", "3")
    assert table.returncode == 0 and "top 3 for 196" in table.stdout, table.stdout + table.stderr

    status = freshrec(stack, "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert [r["service"] for r in rows] == [
        "ingestion",
        "ingestion",
        "feature",
        "trainer",
        "inference",
        "inference",
    ]
    assert all(r["health"] == "SERVING" for r in rows)
    assert all(r["metrics"].startswith("http://127.0.0.1:") for r in rows)
    assert all(r["model"].startswith("v") for r in rows if r["service"] == "inference")


def test_demo_streams_and_reports(stack: Stack, replayed: subprocess.CompletedProcess[str]) -> None:
    # The replay has the stack serve a model before the demo starts (without it the demo's first
    # seconds are rightly served by popularity alone).
    started = time.monotonic()
    result = freshrec(stack, "demo", "--duration", "6", "--drift-every", "3", "--rate", "150", "--plain")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("t=")]
    assert len(lines) >= 3, result.stdout
    assert any("phase=1" in line for line in lines), "the demo drifts"
    assert all("model=v" in line for line in lines), "a model is served throughout"
    assert "prequential_hr@10" in result.stdout
    assert row(result.stdout, "catalogue items published") == "400", result.stdout
    assert "demo summary" in result.stdout and "drifts" in result.stdout
    assert time.monotonic() - started < 60


def row(table: str, label: str) -> str:
    """The value of a two-column rich table's row."""
    match = re.search(rf"│ {re.escape(label)}\s*│\s*(\S[^│]*?)\s*│", table)
    assert match, f"no row {label!r} in {table}"
    return match.group(1)


def scrape(stack: Stack, instance: str) -> str:
    port = stack.services[instance].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_every_instance_serves_prometheus_metrics(stack: Stack) -> None:
    for instance in stack.services:
        text = scrape(stack, instance)
        assert "# TYPE freshrec_rpc_latency_seconds histogram" in text, instance
        assert "process_resident_memory_bytes" in text, instance


def exposed_freshrec_metrics(text: str) -> set[str]:
    """Metric families named in # TYPE lines (prometheus-client's ``*_created`` companions aside)."""
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE freshrec_")}
    return {n for n in names if not n.endswith("_created")}


def test_every_instance_exposes_exactly_the_documented_metrics(stack: Stack) -> None:
    from cli.docs import documented_metrics

    documented = documented_metrics((ROOT / "docs" / "metrics.md").read_text())
    for instance, service in stack.services.items():
        exposed = exposed_freshrec_metrics(scrape(stack, instance))
        listed = documented[service.name]
        assert exposed == listed, (
            f"{instance}: exposed but not in docs/metrics.md: {sorted(exposed - listed)}; "
            f"in docs/metrics.md but not exposed: {sorted(listed - exposed)} (run `make docs`)"
        )


def test_service_logs_are_json_lines_with_model_versions(
    stack: Stack, replayed: subprocess.CompletedProcess[str]
) -> None:
    log_dir = stack.log_dir
    assert log_dir is not None
    for instance in stack.instances("inference"):
        text = (log_dir / f"{instance}.log").read_text()
        entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert entries and all({"ts", "level", "service", "logger", "msg"} <= set(e) for e in entries)
        served = [e for e in entries if e["msg"].startswith("now serving model")]
        assert served and all(e["model_version"] in e["msg"] for e in served)
    text = (log_dir / "trainer.log").read_text()
    trainer = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(e["msg"].startswith("published model") and e["model_version"].startswith("v") for e in trainer)
