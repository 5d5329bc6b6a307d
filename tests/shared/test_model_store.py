"""The model store: complete versions only, verified on read."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model_store import ArtifactError, ModelStore


def test_write_read_verify_and_live_pointer(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    stored = store.write_version("v000001", {"a.bin": b"abc", "b.json": b"[]"}, {"format": "x"})
    assert store.list_versions() == ["v000001"]
    assert store.open_verified("v000001", stored.manifest["sha256"]).manifest["format"] == "x"
    assert store.live_version() is None
    store.set_live("v000001")
    assert store.live_version() == "v000001"
    with pytest.raises(FileExistsError):
        store.write_version("v000001", {"a.bin": b"x"}, {})
    with pytest.raises(ArtifactError):
        store.set_live("v000404")
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "a.bin").write_bytes(b"abd"), "does not match its sha256"),
        (lambda p: (p / "a.bin").write_bytes(b"ab"), "bytes, manifest says"),
        (lambda p: (p / "a.bin").unlink(), "is missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    ],
)
def test_damaged_versions_are_refused(tmp_path: Path, damage, message) -> None:  # type: ignore[no-untyped-def]
    store = ModelStore(tmp_path)
    stored = store.write_version("v000001", {"a.bin": b"abc"}, {})
    damage(stored.path)
    with pytest.raises(ArtifactError, match=message):
        store.open_verified("v000001")


def test_announced_digest_must_match(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.write_version("v000001", {"a.bin": b"abc"}, {})
    with pytest.raises(ArtifactError, match="differs from the announced"):
        store.open_verified("v000001", "0" * 64)


def test_interrupted_writes_leave_no_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    (tmp_path / ".tmp-v000001-abc").mkdir(parents=True)
    (tmp_path / ".tmp-v000001-abc" / "user_tower.onnx").write_bytes(b"half")
    assert store.list_versions() == []
    store.clean_temporaries()
    assert not list(tmp_path.glob(".tmp-*"))
