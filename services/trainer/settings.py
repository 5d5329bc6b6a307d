"""Configuration of the trainer service (and of its ``pretrain`` subcommand)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import CliSubCommand, SettingsConfigDict

from services.trainer.learner import LearnerConfig
from services.trainer.model import ModelConfig
from shared.preprocessing import PreprocessingSettings
from shared.settings import DatabaseSettings, GrpcSettings, RetentionSettings, ServiceSettings


class PretrainCommand(BaseModel):
    """Pre-train the model on history, then write the checkpoint the service fine-tunes online and
    publish it as the live version. Run it while the trainer service is stopped."""

    source: Literal["stream", "file"] = Field(
        "stream",
        description="Where the history comes from: the event stream FRESHREC_EVENTS replayed from its "
        "start, or a MovieLens-style ratings file (--file).",
    )
    file: Path | None = Field(None, description="Ratings file (u.data, or ratings.csv with a header).")
    items: Path | None = Field(
        None, description="Catalogue file (u.item or movies.csv) for content features."
    )
    epochs: int | None = Field(
        None, gt=0, description="Epochs over the history (default: --pretrain-epochs)."
    )
    publish: bool = Field(True, description="Export the pre-trained model and make it the live version.")


class TrainerSettings(ServiceSettings):
    """freshrec trainer: consumes FRESHREC_EVENTS with a durable consumer, learns a two-tower model
    (a causal self-attention user tower, an id + content item tower), exports ONNX versions into the
    model store and announces them on freshrec.models.published. Every option can also be set from
    the environment as FRESHREC_<OPTION> with '__' between levels, for example
    FRESHREC_MODEL_STORE=/data/models. Subcommand: `pretrain` (see `pretrain --help`)."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.trainer")

    grpc: GrpcSettings = GrpcSettings(port=50053)
    database: DatabaseSettings = DatabaseSettings(url="sqlite:///var/trainer.db")
    #: Only ``events`` is read here: set, the trainer forgets users with no event left in the log.
    retention: RetentionSettings = RetentionSettings()
    model_store: Path | None = Field(
        None,
        description="Folder of the model store, when trainer and inference share a disk. Unset: versions go "
        "to the JetStream Object Store (bucket FRESHREC_MODELS, the live pointer in KV bucket "
        "FRESHREC_MODEL_LIVE) and the trainer's own copy stays under <checkpoint-dir>/models.",
    )
    checkpoint_dir: Path = Field(Path("var/trainer"), description="Folder of the trainer's checkpoint.")
    signing_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) that signs every manifest (python -m shared.signing keygen).",
    )
    consumer_name: str = Field("trainer", description="Durable JetStream consumer name on FRESHREC_EVENTS.")
    replica_name: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="Name of this trainer in the leadership lease (with no model folder named, several "
        "trainers may run: one leads, the others stand by); trainers need distinct names "
        "(default: <host name>-<gRPC port>).",
    )
    lease_ttl_s: float = Field(
        10.0,
        ge=1.0,
        le=300.0,
        description="How long the leadership lease outlives its holder's last renewal (renewed every third "
        "of it): the longest a standby waits to take over from a trainer that died without releasing it.",
    )

    # -- update schedule ---------------------------------------------------------------------
    strategy: Literal["online", "incremental", "periodic"] = Field(
        "online",
        description="online: a gradient step per micro-batch, export every --export-interval-s; "
        "incremental: fine-tune on each window of new events, then export; periodic: retrain from the "
        "event log every --periodic-interval-s, warm-started from the current weights.",
    )
    micro_batch: int = Field(256, gt=0, description="Events per micro-batch.")
    micro_batch_wait_s: float = Field(0.5, gt=0, description="Longest wait to fill a micro-batch.")
    export_interval_s: float = Field(10.0, gt=0, description="Export a new version at most this often.")
    export_every_events: int = Field(
        50_000, gt=0, description="Export as soon as this many events were learned since the last export."
    )
    incremental_window_events: int = Field(5_000, gt=0, description="Events per incremental window.")
    incremental_window_s: float = Field(60.0, gt=0, description="Longest incremental window.")
    incremental_epochs: int = Field(2, gt=0, description="Epochs over each incremental window.")
    periodic_interval_s: float = Field(3600.0, gt=0, description="Time between periodic retrains.")
    retrain_epochs: int = Field(10, gt=0, description="Epochs of a retrain from the event log.")
    pretrain_epochs: int = Field(40, gt=0, description="Epochs of `pretrain`.")
    bootstrap: bool = Field(
        True,
        description="When the events waiting in the stream outnumber those the model has learned (a new "
        "stack fed a backlog, a large backfill), fit the retained log in epochs before going on online.",
    )
    bootstrap_min_events: int = Field(
        1_000, gt=0, description="Smallest backlog (events) that triggers a bootstrap fit."
    )
    bootstrap_max_epochs: int = Field(
        40,
        gt=0,
        description="Most epochs of a bootstrap fit; it stops earlier once the newest held-out events "
        "stop improving.",
    )
    pretrain_context: int = Field(
        1,
        gt=0,
        description="Earlier items each training chunk reads before its first target when (pre)training "
        "on whole histories (1: SASRec-style chunks; max-history: every target sees its full window).",
    )

    preprocessing: PreprocessingSettings = Field(
        default_factory=PreprocessingSettings,
        description="Event weights and denoising (give the feature service the same values).",
    )

    # -- the model -------------------------------------------------------------------------
    dim: int = Field(64, gt=0, le=1024, description="Embedding dimension.")
    max_history: int = Field(50, gt=1, le=1000, description="Recent items the user tower reads.")
    blocks: int = Field(2, gt=0, le=12, description="Self-attention blocks in the user tower.")
    heads: int = Field(1, gt=0, le=16, description="Attention heads (must divide --dim).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout in the user tower.")
    max_categories: int = Field(4, ge=0, le=64, description="Categories per item the item tower reads.")
    max_tags: int = Field(8, ge=0, le=256, description="Tags per item the item tower reads.")
    max_context: int = Field(
        0, ge=0, le=64, description="Context key=value pairs the user tower reads (0: no context input)."
    )
    event_types: bool = Field(
        False,
        description="The user tower reads each history item's event type (exported input history_types).",
    )
    text_features: Literal["auto", "on", "off"] = Field(
        "off",
        description="Embed titles and descriptions with the `text` extra's sentence encoder (auto: when "
        "the extra is installed). Off by default: on MovieLens it lowered HR@10 both for known items "
        "(live and protocol B) and for cold ones (protocol C).",
    )
    item_tower: bool = Field(True, description="Export the content-only item tower (item_tower.onnx).")

    # -- learning --------------------------------------------------------------------------
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(128, gt=0, description="Sequences per step when training on whole histories.")
    replay_size: int = Field(20_000, ge=0, description="Past events kept in the replay buffer.")
    replay_ratio: float = Field(2.5, ge=0, description="Replayed events per new event in each update.")
    replay_weight: float = Field(
        0.4,
        ge=0,
        description="Loss weight of a replayed event relative to a new one (more, lighter replayed "
        "events anchor the model with less noise, at more CPU per event).",
    )
    online_learning_rate: float = Field(
        1.5e-3, gt=0, description="Adam learning rate of online steps (--learning-rate: every other fit)."
    )
    online_steps: int = Field(1, gt=0, le=16, description="Gradient steps per micro-batch (online).")
    online_momentum: float = Field(
        0.0, ge=0, lt=1, description="Adam beta1 of online steps (0: each step follows its micro-batch)."
    )
    average_decay: float = Field(
        0.97,
        ge=0,
        lt=1,
        description="The served (scored, exported) weights are a moving average of the trained ones with "
        "this decay per online step (0: serve the trained weights).",
    )
    average_min_count: int = Field(
        10, ge=0, description="Interactions before an item's served id embedding is averaged (fresh before)."
    )
    full_softmax_max_items: int = Field(
        20_000, gt=0, description="Softmax over every item up to this many; sampled softmax above."
    )
    sampled_negatives: int = Field(2048, gt=0, description="Random negatives per step of sampled softmax.")
    id_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of item id embeddings dropped per step (trains content)."
    )
    min_item_count: int = Field(
        1, gt=0, description="Interactions before an item gets its own id embedding (content before)."
    )
    min_user_count: int = Field(
        1, gt=0, description="Interactions before a user gets an id embedding (sequence-only before)."
    )
    row_ttl_s: float = Field(
        0.0, ge=0, description="Expire items and users unseen for this long in event time (0: never)."
    )
    recent_window: int = Field(2_000, gt=0, description="Events in the recent prequential figures.")

    # -- gating and rollback ---------------------------------------------------------------
    gate: bool = Field(True, description="Reject candidates worse than the live version.")
    gate_tolerance: float = Field(
        0.02, ge=0, description="HR@10 a candidate may trail the live version by before it is rejected."
    )
    gate_min_events: int = Field(200, gt=0, description="Events compared before the gate can reject.")
    gate_holdout_events: int = Field(
        1_000, ge=0, description="Newest events held out to judge incremental and periodic candidates."
    )
    rollback_tolerance: float = Field(
        0.02, ge=0, description="HR@10 the live version may trail its parent by before a rollback."
    )
    rollback_min_events: int = Field(1_000, gt=0, description="Events between two regression checks.")
    rollback_patience: int = Field(2, gt=0, description="Consecutive failed checks that roll back.")
    keep_versions: int = Field(
        20, gt=1, description="Versions whose weights and artifacts are kept for rollback and promotion."
    )

    torch_threads: int = Field(1, gt=0, description="Threads PyTorch may use.")
    seed: int = Field(0, description="Seed of initial weights, dropout and sampling.")

    @property
    def replica(self) -> str:
        """The trainer's name in effect: ``replica_name``, or ``<host name>-<gRPC port>``."""
        return self.replica_name or re.sub(r"[^A-Za-z0-9_-]", "-", f"{socket.gethostname()}-{self.grpc.port}")

    @property
    def distributed(self) -> bool:
        """No folder shared with inference: models, checkpoint and leadership live on JetStream."""
        return self.model_store is None

    def model_folder(self) -> Path:
        """Where versions are written: the shared store, or the trainer's own copy of the bucket's."""
        return self.model_store if self.model_store is not None else self.checkpoint_dir / "models"

    def model_shape(self, text_dim: int) -> ModelConfig:
        return ModelConfig(
            dim=self.dim,
            max_history=self.max_history,
            blocks=self.blocks,
            heads=self.heads,
            dropout=self.dropout,
            max_categories=self.max_categories,
            max_tags=self.max_tags,
            max_context=self.max_context,
            text_dim=text_dim,
            event_types=self.event_types,
        )

    def learner_config(self, text_dim: int) -> LearnerConfig:
        return LearnerConfig(
            model=self.model_shape(text_dim),
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            replay_size=self.replay_size,
            replay_ratio=self.replay_ratio,
            replay_weight=self.replay_weight,
            online_learning_rate=self.online_learning_rate,
            online_steps=self.online_steps,
            online_momentum=self.online_momentum,
            average_decay=self.average_decay,
            average_min_count=self.average_min_count,
            full_softmax_max_items=self.full_softmax_max_items,
            sampled_negatives=self.sampled_negatives,
            min_item_count=self.min_item_count,
            min_user_count=self.min_user_count,
            row_ttl_s=self.row_ttl_s,
            id_dropout=self.id_dropout,
            recent_window=self.recent_window,
            preprocessing=self.preprocessing,
            seed=self.seed,
        )


class TrainerCommandLine(TrainerSettings):
    """freshrec trainer: consumes FRESHREC_EVENTS with a durable consumer, learns a two-tower model
    (a causal self-attention user tower, an id + content item tower), exports ONNX versions into the
    model store and announces them on freshrec.models.published. Every option can also be set from
    the environment as FRESHREC_<OPTION> with '__' between levels, for example
    FRESHREC_MODEL_STORE=/data/models. Subcommand: `pretrain` (see `pretrain --help`)."""

    pretrain: CliSubCommand[PretrainCommand]
