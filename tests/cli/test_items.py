"""``freshrec items hide|unhide|delete`` as an operator runs them (a subprocess) against a real
feature service: what each prints, and what the catalogue holds afterwards."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc

from freshrec.v1 import feature_pb2, feature_pb2_grpc, item_pb2
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from tests.conftest import service_settings

ROOT = Path(__file__).resolve().parents[2]


async def freshrec(feature_port: int, data_dir: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRESHREC_FEATURE_ADDR": f"127.0.0.1:{feature_port}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "--data-dir",
        str(data_dir),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return int(process.returncode or 0), out.decode(), err.decode()


async def test_hide_unhide_and_delete_change_the_catalogue(nats_server, tmp_path: Path) -> None:
    app = FeatureApp(service_settings(FeatureSettings, nats_server, tmp_path))
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = feature_pb2_grpc.FeatureServiceStub(channel)
    data_dir = tmp_path / "var"
    try:
        items = [item_pb2.Item(item_id=i, title=f"Title {i}", categories=["c"]) for i in ("a", "b", "c")]
        await stub.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))

        async def held() -> dict[str, bool]:
            found = await stub.GetItems(feature_pb2.GetItemsRequest(item_ids=["a", "b", "c"]))
            return {i.item_id: i.hidden for i in found.items}

        code, out, _ = await freshrec(app.port, data_dir, "items", "hide", "a", "b", "nope")
        assert code == 0
        assert "hidden 2: a, b" in out and "not in the catalogue: nope" in out
        assert await held() == {"a": True, "b": True, "c": False}
        found = await stub.GetItems(feature_pb2.GetItemsRequest(item_ids=["a"]))
        assert found.items[0].title == "Title a" and list(found.items[0].categories) == ["c"]

        code, out, _ = await freshrec(app.port, data_dir, "items", "hide", "a")
        assert code == 0 and "already hidden: a" in out

        code, out, _ = await freshrec(app.port, data_dir, "items", "unhide", "a", "c")
        assert code == 0 and "unhidden 1: a" in out and "not hidden: c" in out
        assert await held() == {"a": False, "b": True, "c": False}

        code, out, _ = await freshrec(app.port, data_dir, "items", "delete", "b", "nope")
        assert code == 0 and "deleted 1: b" in out and "not in the catalogue: nope" in out
        assert await held() == {"a": False, "c": False}

        code, _, err = await freshrec(app.port, data_dir, "items", "delete", "x" * 200)
        assert code == 1 and "INVALID_ARGUMENT" in err and "longer than 128" in err
    finally:
        await channel.close()
        await app.stop()
