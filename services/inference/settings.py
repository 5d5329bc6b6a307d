"""Configuration of the inference service."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.inference.ann import AnnSettings
from services.inference.served import ServedSettings
from shared.settings import GrpcSettings, PeerSettings, RequestLimits, RetentionSettings, ServiceSettings


class InferenceSettings(ServiceSettings):
    """freshrec inference: answers Recommend, ScoreItems, SimilarItems and GetModelInfo from the live
    ONNX model, hot-swapping each version announced on freshrec.models.published. Every option can
    also be set from the environment as FRESHREC_<OPTION> with '__' between levels, for example
    FRESHREC_FEATURE_ADDR=feature:50052."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.inference")

    grpc: GrpcSettings = GrpcSettings(port=50054)
    replica_name: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="Name of this replica, which names its durable consumer of forget requests (so a "
        "restarted replica does the requests it missed); replicas need distinct names "
        "(default: <host name>-<gRPC port>).",
    )
    model_store: Path | None = Field(
        None,
        description="Folder of the model store, when trainer and inference share a disk. Unset: versions "
        "come from the JetStream Object Store (bucket FRESHREC_MODELS; the live pointer, watched, in KV "
        "bucket FRESHREC_MODEL_LIVE), downloaded to --model-cache.",
    )
    model_cache: Path | None = Field(
        None,
        description="Folder for versions downloaded from the Object Store (only the loaded ones are kept). "
        "Unset: a private temporary folder, removed at stop.",
    )
    feature_addr: str = Field("127.0.0.1:50052", description="host:port of the feature service.")
    feature_routing: bool = Field(
        True,
        description="Send each user lookup to the feature replica owning the user's partition, from the "
        "map the replicas publish (KV bucket FRESHREC_FEATURE_REPLICAS), feature_addr for partitions it "
        "does not cover; off: every lookup to feature_addr.",
    )
    feature_deadline_s: float = Field(
        0.05, gt=0, description="Deadline of a feature lookup on the request path (then the cache answers)."
    )
    user_lookup_batch: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most users in one BatchGetUserFeatures call (lookups while one is out share the next).",
    )
    user_lookups_in_flight: int = Field(
        1,
        ge=1,
        le=64,
        description="BatchGetUserFeatures calls out at once (more: smaller batches, less waiting).",
    )
    user_tower_batch: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most requests whose user vectors one user-tower call computes (in a worker thread).",
    )
    poll_interval_s: float = Field(
        5.0, gt=0, description="How often the store's LIVE pointer is checked, besides announcements."
    )
    verify_key_file: Path | None = Field(
        None,
        description="Ed25519 public key (PEM): when set, only versions whose manifest it verifies load.",
    )
    feature: PeerSettings = PeerSettings()
    limits: RequestLimits = RequestLimits()
    keep_versions: int = Field(3, ge=1, description="Versions kept loaded for an instant rollback.")
    onnx_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per session.")
    blas_threads: int = Field(
        1,
        ge=1,
        description="Threads numpy's BLAS may use; a request multiplies one vector, where more threads "
        "only spin and contend.",
    )
    gil_switch_interval_s: float = Field(
        0.001,
        gt=0,
        le=0.1,
        description="Python's thread switch interval: how long a model load may hold the GIL from requests.",
    )
    ann: AnnSettings = AnnSettings()
    served: ServedSettings = ServedSettings()
    retention: RetentionSettings = RetentionSettings()
    mmr_candidates: int = Field(
        200, ge=10, le=5000, description="Candidates re-ranked by MMR when a request asks for diversity."
    )
    new_item_window_s: float = Field(
        86_400.0, ge=0, description="Catalogue items created this recently count as new for exploration."
    )
    under_exposed_quantile: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Items shown at most as often as this quantile of impressions count as under-exposed.",
    )
    exploration_sample: int = Field(
        256, ge=1, description="Random sample of the exploration pool scored per request."
    )
    popular_ttl_s: float = Field(
        2.0, gt=0, description="Age after which a cached popularity list is refreshed in the background."
    )
    catalogue_debounce_s: float = Field(
        0.05, ge=0, description="Least time between two rebuilds of the serving state for catalogue changes."
    )
    health_interval_s: float = Field(
        1.0, gt=0, description="How often health is re-evaluated (NOT_SERVING: no model and no fallback)."
    )

    @property
    def replica(self) -> str:
        """The replica name in effect: ``replica_name``, or ``<host name>-<gRPC port>``."""
        return self.replica_name or re.sub(r"[^A-Za-z0-9_-]", "-", f"{socket.gethostname()}-{self.grpc.port}")
