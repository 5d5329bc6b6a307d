"""Signed manifests: the trainer signs with Ed25519, inference loads only what the configured public
key verifies, and refuses before any onnxruntime session is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.inference.model import load_model
from services.trainer.export import export_learner
from services.trainer.learner import OnlineLearner
from shared.model_store import ArtifactError, ModelStore
from shared.signing import generate_keypair, load_private_key, load_public_key
from tests.trainer.streams import taste_stream


@pytest.fixture
def keys(tmp_path: Path):  # type: ignore[no-untyped-def]
    private, public = generate_keypair(tmp_path / "keys")
    _, other_public = generate_keypair(tmp_path / "other")
    return load_private_key(private), load_public_key(public), load_public_key(other_public)


@pytest.fixture
def exported():  # type: ignore[no-untyped-def]
    learner = OnlineLearner(dim=8, max_history=10, learning_rate=0.05)
    learner.learn(taste_stream(n_users=6, rounds=3))
    return export_learner(learner, parent_version=None)


def test_signed_version_loads_with_the_right_key(tmp_path: Path, keys, exported) -> None:
    private, public, _ = keys
    store = ModelStore(tmp_path / "models")
    store.write_version("v000001", exported.files, exported.manifest, signing_key=private)
    model = load_model(store, "v000001", None, threads=1, public_key=public)
    assert model.version == "v000001"


@pytest.mark.parametrize("case", ["unsigned", "wrong key", "manifest edited", "signature edited"])
def test_unverifiable_versions_are_refused_before_a_session(tmp_path: Path, keys, exported, case) -> None:
    private, public, other = keys
    store = ModelStore(tmp_path / "models")
    signer = None if case == "unsigned" else private
    stored = store.write_version("v000001", exported.files, exported.manifest, signer)
    manifest_path = stored.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if case == "manifest edited":
        manifest["metrics"]["prequential_hr@10"] = 0.99  # a tampered claim; the files are untouched
        manifest_path.write_text(json.dumps(manifest))
    if case == "signature edited":
        value = manifest["signature"]["value"]
        manifest["signature"]["value"] = ("A" if value[0] != "A" else "B") + value[1:]
        manifest_path.write_text(json.dumps(manifest))
    # A graph that onnxruntime could not even parse proves no session was attempted first.
    (stored.path / "user_tower.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError) as caught:
        load_model(store, "v000001", None, threads=1, public_key=other if case == "wrong key" else public)
    message = str(caught.value)
    assert "signature" in message or "signed by key" in message
    assert "onnxruntime" not in message


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    assert oct((tmp_path / "signing.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)
