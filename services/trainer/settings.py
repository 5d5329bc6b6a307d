"""Configuration of the trainer service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import DatabaseSettings, GrpcSettings, ServiceSettings


class TrainerSettings(ServiceSettings):
    """freshrec trainer: consumes FRESHREC_EVENTS with a durable consumer, learns a two-tower model
    online, exports ONNX versions into the model store and announces them on
    freshrec.models.published. Every option can also be set from the environment as
    FRESHREC_<OPTION> with '__' between levels, for example FRESHREC_MODEL_STORE=/data/models."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.trainer")

    grpc: GrpcSettings = GrpcSettings(port=50053)
    database: DatabaseSettings = DatabaseSettings(url="sqlite:///var/trainer.db")
    model_store: Path = Field(Path("var/models"), description="Folder of the model store.")
    checkpoint_dir: Path = Field(Path("var/trainer"), description="Folder of the trainer's checkpoint.")
    signing_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) that signs every manifest (python -m shared.signing keygen).",
    )
    consumer_name: str = Field("trainer", description="Durable JetStream consumer name.")
    strategy: Literal["online"] = Field("online", description="Update schedule.")
    dim: int = Field(32, gt=0, le=1024, description="Embedding dimension.")
    max_history: int = Field(50, gt=0, le=1000, description="Recent items the user tower reads.")
    learning_rate: float = Field(0.01, gt=0, description="Adam learning rate.")
    micro_batch: int = Field(256, gt=0, description="Events per learning step.")
    micro_batch_wait_s: float = Field(0.5, gt=0, description="Longest wait to fill a micro-batch.")
    export_interval_s: float = Field(10.0, gt=0, description="Export a new version at most this often.")
    export_every_events: int = Field(
        50_000, gt=0, description="Export as soon as this many events were learned since the last export."
    )
    torch_threads: int = Field(1, gt=0, description="Threads PyTorch may use.")
    seed: int = Field(0, description="Seed of the model's initial weights.")
