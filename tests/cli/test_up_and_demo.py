"""`freshrec up` as `make run` starts it (status table, stack.json, `freshrec scale` moving features
from one replica to three and back under load, Ctrl-C stops everything), and `freshrec demo`
starting a stack of its own when none is running."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import (
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)
from shared.nats import user_partition
from tests.conftest import eventually
from tests.factories import event

pytestmark = pytest.mark.slow

FRESHREC = str(Path(sys.executable).parent / "freshrec")
ENV = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_up_shows_a_status_table_scales_features_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
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

        await scale_features_to_three_and_back(data)
        children = [r["pid"] for replicas in state["services"].values() for r in replicas]
        children += [r["pid"] for r in json.loads((data / "stack.json").read_text())["services"]["feature"]]

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:  # a failed assertion: stop the stack too, not only `up`
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
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


USERS = [f"scale-user-{i}" for i in range(48)]
EVENTS_PER_USER = 3


def lookup_errors(metrics_url: str) -> dict[str, float]:
    """Inference's unanswered user lookups so far, by gRPC status."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = r'^freshrec_inference_user_lookup_errors_total\{code="(\w+)"\} (\S+)$'
    return {code: float(value) for code, value in re.findall(pattern, text, re.M)}


async def scale_features_to_three_and_back(data: Path) -> None:
    """`freshrec scale feature 3`, then `1`, while Recommend runs: each layout ends with every
    user's history at the owner of the user's partition, and meanwhile no Recommend fails and no
    lookup reaches a replica that is gone or owns no such user (a slow lookup may time out)."""

    def services() -> dict[str, list[dict[str, str]]]:
        return dict(json.loads((data / "stack.json").read_text())["services"])

    first_feature = services()["feature"][0]["address"]
    inference = services()["inference"][0]
    async with grpc.aio.insecure_channel(services()["ingestion"][0]["address"]) as channel:
        events = [
            event(u, f"item-{(i * 7 + j) % 40}") for i, u in enumerate(USERS) for j in range(EVENTS_PER_USER)
        ]
        answer = await ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=30
        )
        assert answer.accepted == len(events), answer

    async def every_history_at_its_owner() -> bool:
        features = services()["feature"]
        owners = {f.get("partition", "0 of 1"): f["address"] for f in features}
        for user in USERS:
            owner = owners[f"{user_partition(user) % len(features)} of {len(features)}"]
            async with grpc.aio.insecure_channel(owner) as channel:
                answer = await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
                    feature_pb2.GetUserFeaturesRequest(user_id=user), timeout=5
                )
            if len(answer.features.recent) != EVENTS_PER_USER:
                return False
        return True

    await eventually(
        every_history_at_its_owner, timeout_s=60, what="the feature service to hold every history"
    )
    errors_before = lookup_errors(inference["metrics"])
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()

    async def recommend_meanwhile() -> None:
        nonlocal calls
        async with grpc.aio.insecure_channel(inference["address"]) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not stop.is_set():
                for user in USERS:
                    try:
                        await stub.Recommend(inference_pb2.RecommendRequest(user_id=user, k=5), timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"{user}: {exc.code().name} {exc.details()}")
                    calls += 1
                await asyncio.sleep(0.05)

    load = asyncio.create_task(recommend_meanwhile())
    try:
        for target in (3, 1):
            scaled = await asyncio.to_thread(
                subprocess.run,
                [FRESHREC, "--data-dir", str(data), "scale", "feature", str(target), "--timeout", "300"],
                capture_output=True,
                text=True,
                timeout=420,
                env=ENV,
            )
            assert scaled.returncode == 0, scaled.stdout + scaled.stderr
            assert "catching up" in scaled.stdout and "done:" in scaled.stdout, scaled.stdout
            features = services()["feature"]
            assert sorted(f.get("partition", "whole") for f in features) == (
                ["0 of 3", "1 of 3", "2 of 3"] if target == 3 else ["whole"]
            )
            assert await every_history_at_its_owner()
    finally:
        stop.set()
        await load
    # Back to one replica, in the first one's place: clients configured with it reach it again.
    assert services()["feature"][0]["address"] == first_feature
    assert calls > len(USERS) and not failures, failures[:5]
    errors_after = lookup_errors(inference["metrics"])
    misrouted = {
        code: errors_after[code] - errors_before.get(code, 0)
        for code in errors_after
        if code != "DEADLINE_EXCEEDED" and errors_after[code] > errors_before.get(code, 0)
    }
    assert not misrouted, misrouted

    # Asking for the layout it already runs changes nothing; an unscalable service is refused.
    same = subprocess.run(
        [FRESHREC, "--data-dir", str(data), "scale", "feature", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stdout + same.stderr
    trainer = subprocess.run(
        [FRESHREC, "--data-dir", str(data), "scale", "trainer", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert trainer.returncode == 2 and "trainer" in trainer.stderr
