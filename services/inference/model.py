"""Loading a model version from the store: verify, build the session, smoke-test, then hand it over.

Everything here runs off the request path (in a worker thread); requests only ever see a
``LoadedModel`` that passed every check.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.model_store import ArtifactError, ModelStore

FORMAT = "freshrec.two_tower.v1"
REQUIRED_FILES = ("user_tower.onnx", "item_embeddings.npy", "item_ids.json", "user_ids.json")


@dataclass
class LoadedModel:
    """An immutable, verified model; requests hold a reference to it for their whole life."""

    version: str
    manifest: dict[str, Any]
    session: ort.InferenceSession
    item_matrix: np.ndarray  # [item_rows, dim]; row 0 is padding
    item_ids: list[str]
    item_rows: dict[str, int]
    user_rows: dict[str, int]
    max_history: int
    loaded_at: float = field(default_factory=time.time)

    @property
    def trained_through(self) -> tuple[int, float]:
        t = self.manifest.get("trained_through", {})
        return int(t.get("stream_sequence", 0)), float(t.get("event_time", 0.0))

    def user_vectors(self, histories: list[list[str]], user_ids: list[str]) -> np.ndarray:
        """User tower on a batch: each history newest last; unknown items are skipped."""
        batch = np.zeros((len(histories), self.max_history), dtype=np.int64)
        for i, history in enumerate(histories):
            rows = [r for r in (self.item_rows.get(item) for item in history) if r][-self.max_history :]
            if rows:
                batch[i, -len(rows) :] = rows
        users = np.array([self.user_rows.get(u, 0) for u in user_ids], dtype=np.int64)
        (vectors,) = self.session.run(["user_embedding"], {"history": batch, "user": users})
        return np.asarray(vectors, dtype=np.float32)


def load_model(
    store: ModelStore,
    version: str,
    expected_sha256: str | None,
    threads: int,
    public_key: Ed25519PublicKey | None = None,
) -> LoadedModel:
    """Verifies (signature first, when a key is configured) and loads one version; raises
    ArtifactError with the reason on any defect, before any session is built."""
    stored = store.open_verified(version, expected_sha256, public_key)
    manifest = stored.manifest
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"version {version}: format {manifest.get('format')!r} is not {FORMAT}")
    missing = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if missing:
        raise ArtifactError(f"version {version}: manifest lacks {', '.join(missing)}")
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(stored.path / "user_tower.onnx"), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ArtifactError(f"version {version}: onnxruntime cannot load the graph ({exc})") from exc
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if inputs != {"history", "user"} or "user_embedding" not in outputs:
        raise ArtifactError(
            f"version {version}: graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not match "
            "history,user -> user_embedding"
        )
    try:
        matrix = np.load(io.BytesIO((stored.path / "item_embeddings.npy").read_bytes()), allow_pickle=False)
        item_ids = json.loads((stored.path / "item_ids.json").read_text())
        user_ids = json.loads((stored.path / "user_ids.json").read_text())
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"version {version}: cannot read the item matrix or id lists ({exc})") from exc
    model_info = manifest.get("model", {})
    dim = int(model_info.get("dim", 0))
    if matrix.ndim != 2 or matrix.shape != (len(item_ids), dim) or matrix.dtype != np.float32:
        raise ArtifactError(
            f"version {version}: item matrix {matrix.shape} {matrix.dtype} does not match "
            f"{len(item_ids)} items x dim {dim} float32"
        )
    if int(model_info.get("max_history", 0)) <= 0:
        raise ArtifactError(f"version {version}: manifest gives no positive model.max_history")
    if not np.all(np.isfinite(matrix)):
        raise ArtifactError(f"version {version}: item matrix holds NaN or infinite values")
    model = LoadedModel(
        version=version,
        manifest=manifest,
        session=session,
        item_matrix=matrix,
        item_ids=item_ids,
        item_rows={item: row for row, item in enumerate(item_ids) if row},
        user_rows={user: row for row, user in enumerate(user_ids) if row},
        max_history=int(model_info.get("max_history", 0)),
    )
    _smoke_test(model)
    return model


def _smoke_test(model: LoadedModel) -> None:
    """One real inference; the outputs must have the right shape and be finite."""
    probe_items = model.item_ids[1:3]
    try:
        vectors = model.user_vectors([[], probe_items], ["", ""])
    except Exception as exc:
        raise ArtifactError(f"version {model.version}: smoke inference failed ({exc})") from exc
    if vectors.shape != (2, model.item_matrix.shape[1]):
        raise ArtifactError(f"version {model.version}: user tower returned shape {vectors.shape}")
    scores = vectors @ model.item_matrix.T
    if not (np.all(np.isfinite(vectors)) and np.all(np.isfinite(scores))):
        raise ArtifactError(f"version {model.version}: smoke inference produced NaN or infinite scores")
