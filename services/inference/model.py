"""Loading a model version from the store: verify, build the sessions, smoke-test, then hand it over.

Everything here runs off the request path (in a worker thread); requests only ever see a
``LoadedModel`` that passed every check. The artifact contract (``freshrec.two_tower.v1``):

- ``user_tower.onnx``: inputs ``history`` int64 [B, L] (item rows, oldest first, left-padded
  with 0; L = ``model.max_history``) and ``user`` int64 [B] (0 = unknown); optional inputs, each
  declared in ``model.inputs``: ``history_types`` int64 [B, L] (EventType numbers aligned with
  ``history``) and ``context`` int64 [B, K] (rows into ``context_vocab.json``, a list of
  ``"key=value"``; K = ``model.max_context``). Output ``user_embedding`` float32 [B, D].
- ``item_embeddings.npy`` float32 [N, D]; row i is the item ``item_ids.json[i]``; row 0 padding.
- ``user_ids.json``: index = user row, row 0 = "".
- optional ``item_tower.onnx``: inputs ``categories`` int64 [B, C] and ``tags`` int64 [B, T]
  (rows into ``content_vocab.json`` = {"categories": [...], "tags": [...]}, row 0 padding; C and T
  in ``model.item_tower``), output ``item_embedding`` float32 [B, D]: embeds catalogue items that
  arrived after the export.

Score = dot(user_embedding, item embedding).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.inference.ann import AnnIndex, AnnSettings
from shared.model_store import ArtifactError, ModelStore
from shared.signing import SignatureError

FORMAT = "freshrec.two_tower.v1"
REQUIRED_FILES = ("user_tower.onnx", "item_embeddings.npy", "item_ids.json", "user_ids.json")
#: Inputs of the user tower this service knows how to fill.
KNOWN_INPUTS = ("history", "user", "history_types", "context")
ITEM_TOWER_INPUTS = ("categories", "tags")


class RejectedArtifact(ArtifactError):
    """A version that must not be served; ``kind`` names the failed check (a metric label)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ItemTower:
    """Embeds catalogue items from their content (categories, tags)."""

    session: ort.InferenceSession
    category_rows: dict[str, int]
    tag_rows: dict[str, int]
    max_categories: int
    max_tags: int

    def embed(self, contents: Sequence[tuple[Sequence[str], Sequence[str]]]) -> np.ndarray:
        """Item embeddings for (categories, tags) pairs; unknown labels are skipped."""
        categories = _rows_batch([c for c, _ in contents], self.category_rows, self.max_categories)
        tags = _rows_batch([t for _, t in contents], self.tag_rows, self.max_tags)
        (vectors,) = self.session.run(["item_embedding"], {"categories": categories, "tags": tags})
        return np.asarray(vectors, dtype=np.float32)


def _rows_batch(values: Sequence[Sequence[str]], vocab: dict[str, int], width: int) -> np.ndarray:
    batch = np.zeros((len(values), width), dtype=np.int64)
    for i, labels in enumerate(values):
        rows = [r for r in (vocab.get(label, 0) for label in labels) if r][:width]
        batch[i, : len(rows)] = rows
    return batch


@dataclass
class LoadedModel:
    """An immutable, verified model; requests hold a reference to it for their whole life."""

    version: str
    manifest: dict[str, Any]
    session: ort.InferenceSession
    inputs: frozenset[str]
    item_matrix: np.ndarray  # [item_rows, dim]; row 0 is padding
    item_norms: np.ndarray  # [item_rows] L2 norms (1 where the norm is 0)
    item_ids: list[str]
    item_rows: dict[str, int]
    user_rows: dict[str, int]
    max_history: int
    max_context: int = 0
    context_rows: dict[str, int] = field(default_factory=dict)
    item_tower: ItemTower | None = None
    ann: AnnIndex | None = None
    loaded_at: float = field(default_factory=time.time)
    #: Which ranker answers a request (``serving.policy``): by segment, the lower bound of items the
    #: user touched before, highest first; and the popularity columns a policy may pick [rows, H].
    policy: tuple[tuple[int, str], ...] = ()
    popularity: np.ndarray | None = None
    popularity_columns: tuple[str, ...] = ()
    #: What most often came right after each item (export rows [rows, width], 0: none), their
    #: counts, and the popularity column below them.
    follow_ups: tuple[np.ndarray, np.ndarray] | None = None
    follow_up_backoff: str = ""

    def ranker_for(self, touched: int) -> str:
        """``model``, ``popular:<half-life>`` or ``follow-up`` for a user who touched ``touched`` items."""
        for bound, ranker in self.policy:
            if touched >= bound:
                if ranker in self.popularity_columns or (
                    ranker == "follow-up" and self.follow_ups is not None
                ):
                    return ranker
                return "model"
        return "model"

    @property
    def dim(self) -> int:
        return int(self.item_matrix.shape[1])

    @property
    def trained_through(self) -> tuple[int, float]:
        t = self.manifest.get("trained_through", {})
        return int(t.get("stream_sequence", 0)), float(t.get("event_time", 0.0))

    def history_batch(self, histories: Sequence[Sequence[tuple[str, int]]]) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and event types, oldest first, left-padded; items the model does not know are skipped."""
        rows = np.zeros((len(histories), self.max_history), dtype=np.int64)
        types = np.zeros((len(histories), self.max_history), dtype=np.int64)
        for i, history in enumerate(histories):
            known = [(r, t) for r, t in ((self.item_rows.get(item, 0), t) for item, t in history) if r]
            known = known[-self.max_history :]
            if known:
                rows[i, -len(known) :] = [r for r, _ in known]
                types[i, -len(known) :] = [t for _, t in known]
        return rows, types

    def user_vectors(
        self,
        histories: Sequence[Sequence[tuple[str, int]]],
        user_ids: Sequence[str],
        contexts: Sequence[dict[str, str]] | None = None,
    ) -> np.ndarray:
        """One user-tower call for a batch: histories of (item id, event type), newest last."""
        rows, types = self.history_batch(histories)
        feeds: dict[str, np.ndarray] = {
            "history": rows,
            "user": np.array([self.user_rows.get(u, 0) for u in user_ids], dtype=np.int64),
        }
        if "history_types" in self.inputs:
            feeds["history_types"] = types
        if "context" in self.inputs:
            context = np.zeros((len(histories), self.max_context), dtype=np.int64)
            for i, values in enumerate(contexts or [{}] * len(histories)):
                found = [r for r in (self.context_rows.get(f"{k}={v}", 0) for k, v in values.items()) if r]
                found = found[: self.max_context]
                context[i, : len(found)] = found
            feeds["context"] = context
        (vectors,) = self.session.run(["user_embedding"], feeds)
        return np.asarray(vectors, dtype=np.float32)


def _session(path: str, threads: int, version: str, what: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Arena memory would be kept per session and grow with every reload; plain malloc gives it back.
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise RejectedArtifact("graph", f"version {version}: onnxruntime cannot load {what} ({exc})") from exc


def _dims_match(actual: Sequence[Any], expected: Sequence[int | None]) -> bool:
    """Graph dims against the contract: None means any (the batch); a symbolic graph dim matches anything."""
    if len(actual) != len(expected):
        return False
    return all(e is None or not isinstance(a, int) or a == e for a, e in zip(actual, expected, strict=True))


def _check_interface(
    session: ort.InferenceSession,
    expected_inputs: dict[str, list[int | None]],
    output: str,
    dim: int,
    version: str,
    what: str,
) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    if set(inputs) != set(expected_inputs):
        raise RejectedArtifact(
            "interface",
            f"version {version}: {what} inputs are {sorted(inputs)}, the manifest promises "
            f"{sorted(expected_inputs)}",
        )
    for name, dims in expected_inputs.items():
        node = inputs[name]
        if node.type != "tensor(int64)" or not _dims_match(node.shape, dims):
            raise RejectedArtifact(
                "interface",
                f"version {version}: {what} input {name} is {node.type} {node.shape}, expected int64 "
                f"{['batch' if d is None else d for d in dims]}",
            )
    outputs = {o.name: o for o in session.get_outputs()}
    if output not in outputs:
        raise RejectedArtifact(
            "interface", f"version {version}: {what} has outputs {sorted(outputs)}, not {output}"
        )
    if not _dims_match(outputs[output].shape, [None, dim]):
        raise RejectedArtifact(
            "interface",
            f"version {version}: {what} output {output} has shape {outputs[output].shape}, expected "
            f"[batch, {dim}]",
        )


def _positive_int(value: Any, what: str, version: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise RejectedArtifact("manifest", f"version {version}: manifest gives no positive {what}")
    return number


def _read_json(path: Any, version: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise RejectedArtifact("data", f"version {version}: cannot read {path.name} ({exc})") from exc


def load_model(
    store: ModelStore,
    version: str,
    expected_sha256: str | None,
    threads: int,
    ann: AnnSettings | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> LoadedModel:
    """Verifies (signature first, when a key is configured) and loads one version; raises
    RejectedArtifact (an ArtifactError with a kind) on any defect, before any session is built."""
    try:
        stored = store.open_verified(version, expected_sha256, public_key)
    except ArtifactError as exc:
        kind = "signature" if isinstance(exc.__cause__, SignatureError) else "integrity"
        raise RejectedArtifact(kind, str(exc)) from exc
    manifest = stored.manifest
    if manifest.get("format") != FORMAT:
        raise RejectedArtifact(
            "manifest", f"version {version}: format {manifest.get('format')!r} is not {FORMAT}"
        )
    missing = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if missing:
        raise RejectedArtifact("manifest", f"version {version}: manifest lacks {', '.join(missing)}")
    info = manifest.get("model", {})
    if not isinstance(info, dict):
        raise RejectedArtifact("manifest", f"version {version}: manifest 'model' is not an object")
    dim = _positive_int(info.get("dim"), "model.dim", version)
    max_history = _positive_int(info.get("max_history"), "model.max_history", version)

    declared = info.get("inputs", {"history": None, "user": None})
    declared_names = set(declared) if isinstance(declared, dict | list) else set()
    unknown = sorted(declared_names - set(KNOWN_INPUTS))
    if unknown:
        raise RejectedArtifact(
            "interface", f"version {version}: manifest declares inputs this service cannot fill: {unknown}"
        )
    if not {"history", "user"} <= declared_names:
        raise RejectedArtifact("interface", f"version {version}: manifest inputs lack history and user")
    expected: dict[str, list[int | None]] = {"history": [None, max_history], "user": [None]}
    if "history_types" in declared_names:
        expected["history_types"] = [None, max_history]
    max_context = 0
    context_rows: dict[str, int] = {}
    if "context" in declared_names:
        max_context = _positive_int(info.get("max_context"), "model.max_context", version)
        expected["context"] = [None, max_context]
        if "context_vocab.json" not in manifest["files"]:
            raise RejectedArtifact("manifest", f"version {version}: a context input needs context_vocab.json")
        vocab = _read_json(stored.path / "context_vocab.json", version)
        if not isinstance(vocab, list):
            raise RejectedArtifact("data", f"version {version}: context_vocab.json is not a list")
        context_rows = {str(v): row for row, v in enumerate(vocab) if row}

    session = _session(str(stored.path / "user_tower.onnx"), threads, version, "the user tower")
    _check_interface(session, expected, "user_embedding", dim, version, "the user tower")

    try:
        matrix = np.load(io.BytesIO((stored.path / "item_embeddings.npy").read_bytes()), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RejectedArtifact("data", f"version {version}: cannot read the item matrix ({exc})") from exc
    item_ids = _read_json(stored.path / "item_ids.json", version)
    user_ids = _read_json(stored.path / "user_ids.json", version)
    if not (isinstance(item_ids, list) and isinstance(user_ids, list)):
        raise RejectedArtifact("data", f"version {version}: item_ids.json and user_ids.json must be lists")
    if matrix.ndim != 2 or matrix.shape != (len(item_ids), dim) or matrix.dtype != np.float32:
        raise RejectedArtifact(
            "data",
            f"version {version}: item matrix {matrix.shape} {matrix.dtype} does not match "
            f"{len(item_ids)} items x dim {dim} float32",
        )
    if len(item_ids) < 2:
        raise RejectedArtifact("data", f"version {version}: the item matrix holds no item")
    if not np.all(np.isfinite(matrix)):
        raise RejectedArtifact("nonfinite", f"version {version}: item matrix holds NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=1).astype(np.float32)
    norms[norms == 0] = 1.0

    tower = _load_item_tower(stored.path, manifest, info, dim, threads, version)
    policy, popularity, columns = _load_serving(stored.path, manifest, len(item_ids), version)
    follow_ups, backoff = _load_follow_ups(stored.path, manifest, len(item_ids), columns, version)
    model = LoadedModel(
        version=version,
        manifest=manifest,
        session=session,
        inputs=frozenset(expected),
        item_matrix=matrix,
        item_norms=norms,
        item_ids=[str(i) for i in item_ids],
        item_rows={str(item): row for row, item in enumerate(item_ids) if row},
        user_rows={str(user): row for row, user in enumerate(user_ids) if row},
        max_history=max_history,
        max_context=max_context,
        context_rows=context_rows,
        item_tower=tower,
        policy=policy,
        popularity=popularity,
        popularity_columns=columns,
        follow_ups=follow_ups,
        follow_up_backoff=backoff,
    )
    _smoke_test(model)
    if ann is not None and len(item_ids) - 1 > ann.exact_limit:
        model.ann = AnnIndex.build(matrix, ann)
    return model


def _load_serving(
    path: Any, manifest: dict[str, Any], rows: int, version: str
) -> tuple[tuple[tuple[int, str], ...], np.ndarray | None, tuple[str, ...]]:
    """The serving policy and popularity columns (optional: a version without them is served by
    its model alone)."""
    serving = manifest.get("serving")
    if not isinstance(serving, dict):
        return (), None, ()
    segments, chosen = serving.get("segments", {}), serving.get("policy", {})
    spec = serving.get("popularity", {})
    if not (isinstance(segments, dict) and isinstance(chosen, dict) and isinstance(spec, dict)):
        raise RejectedArtifact("manifest", f"version {version}: manifest 'serving' is malformed")
    columns = tuple(str(c) for c in spec.get("columns", []))
    popularity = None
    if spec.get("file"):
        if spec["file"] not in manifest["files"]:
            raise RejectedArtifact(
                "manifest", f"version {version}: serving names {spec['file']}, not in files"
            )
        try:
            popularity = np.load(io.BytesIO((path / spec["file"]).read_bytes()), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise RejectedArtifact("data", f"version {version}: cannot read {spec['file']} ({exc})") from exc
        if popularity.shape != (rows, len(columns)) or not np.all(np.isfinite(popularity)):
            raise RejectedArtifact(
                "data",
                f"version {version}: {spec['file']} is {popularity.shape}, expected {rows} x {len(columns)} "
                "finite values",
            )
    try:
        policy = tuple(
            sorted(
                ((int(bound), str(chosen.get(name, "model"))) for name, bound in segments.items()),
                reverse=True,
            )
        )
    except (TypeError, ValueError) as exc:
        raise RejectedArtifact(
            "manifest", f"version {version}: serving segments are malformed ({exc})"
        ) from exc
    return policy, popularity, columns


def _load_follow_ups(
    path: Any, manifest: dict[str, Any], rows: int, columns: tuple[str, ...], version: str
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    spec = (manifest.get("serving") or {}).get("follow_ups")
    if not isinstance(spec, dict):
        return None, ""
    arrays = []
    for key in ("items", "counts"):
        name = spec.get(key)
        if name not in manifest["files"]:
            raise RejectedArtifact("manifest", f"version {version}: serving.follow_ups.{key} is not in files")
        try:
            arrays.append(np.load(io.BytesIO((path / name).read_bytes()), allow_pickle=False))
        except (ValueError, OSError) as exc:
            raise RejectedArtifact("data", f"version {version}: cannot read {name} ({exc})") from exc
    items, counts = arrays
    if (
        items.ndim != 2
        or items.shape[0] != rows
        or counts.shape != items.shape
        or items.min(initial=0) < 0
        or items.max(initial=0) >= rows
        or not np.all(np.isfinite(counts))
    ):
        raise RejectedArtifact(
            "data", f"version {version}: the follow-up table does not fit {rows} item rows"
        )
    backoff = str(spec.get("backoff", ""))
    if backoff not in columns:
        raise RejectedArtifact("manifest", f"version {version}: follow-ups fall back to unknown {backoff!r}")
    return (items.astype(np.int64), counts.astype(np.float64)), backoff


def _load_item_tower(
    path: Any, manifest: dict[str, Any], info: dict[str, Any], dim: int, threads: int, version: str
) -> ItemTower | None:
    if "item_tower.onnx" not in manifest["files"]:
        return None
    if "content_vocab.json" not in manifest["files"]:
        raise RejectedArtifact("manifest", f"version {version}: item_tower.onnx needs content_vocab.json")
    shape = info.get("item_tower", {})
    if not isinstance(shape, dict):
        raise RejectedArtifact("manifest", f"version {version}: model.item_tower is not an object")
    max_categories = _positive_int(
        shape.get("max_categories", shape.get("categories")), "model.item_tower.max_categories", version
    )
    max_tags = _positive_int(shape.get("max_tags", shape.get("tags")), "model.item_tower.max_tags", version)
    vocab = _read_json(path / "content_vocab.json", version)
    if not (isinstance(vocab, dict) and isinstance(vocab.get("categories"), list)):
        raise RejectedArtifact("data", f"version {version}: content_vocab.json lacks a categories list")
    session = _session(str(path / "item_tower.onnx"), threads, version, "the item tower")
    _check_interface(
        session,
        {"categories": [None, max_categories], "tags": [None, max_tags]},
        "item_embedding",
        dim,
        version,
        "the item tower",
    )
    return ItemTower(
        session=session,
        category_rows={str(c): row for row, c in enumerate(vocab["categories"]) if row},
        tag_rows={str(t): row for row, t in enumerate(vocab.get("tags", [])) if row},
        max_categories=max_categories,
        max_tags=max_tags,
    )


def _smoke_test(model: LoadedModel) -> None:
    """Real inferences (batch 1 and 2); outputs must have the right shape and be finite."""
    probe = [(item, 1) for item in model.item_ids[1:3]]
    context = {}
    if model.context_rows:
        key, _, value = next(iter(model.context_rows)).partition("=")
        context = {key: value}
    v = model.version
    try:
        vectors = np.concatenate(
            [
                model.user_vectors([probe], [""], [context]),
                model.user_vectors([[], probe[:1]], ["", next(iter(model.user_rows), "")], [{}, context]),
            ]
        )
    except Exception as exc:
        raise RejectedArtifact("smoke", f"version {v}: smoke inference failed ({exc})") from exc
    if vectors.shape != (3, model.dim):
        raise RejectedArtifact("smoke", f"version {v}: user tower returned shape {vectors.shape}")
    if not np.all(np.isfinite(vectors)):
        raise RejectedArtifact("nonfinite", f"version {v}: the user tower produced NaN or infinite values")
    with np.errstate(all="ignore"):
        scores = vectors @ model.item_matrix.T
    if not np.all(np.isfinite(scores)):
        raise RejectedArtifact("nonfinite", f"version {v}: smoke inference produced NaN or infinite scores")
    if model.item_tower is not None:
        tower = model.item_tower
        labels = (list(tower.category_rows)[:2], list(tower.tag_rows)[:2])
        try:
            items = tower.embed([labels, ([], [])])
        except Exception as exc:
            raise RejectedArtifact(
                "smoke", f"version {v}: item tower smoke inference failed ({exc})"
            ) from exc
        if items.shape != (2, model.dim):
            raise RejectedArtifact("smoke", f"version {v}: item tower returned shape {items.shape}")
        if not np.all(np.isfinite(items)):
            raise RejectedArtifact(
                "nonfinite", f"version {v}: the item tower produced NaN or infinite values"
            )
