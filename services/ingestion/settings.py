"""Configuration of the ingestion service."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import DatabaseSettings, GrpcSettings, ServiceSettings


class IngestionSettings(ServiceSettings):
    """freshrec ingestion: validates events, stores them in the SQL event log and publishes them
    to the JetStream stream FRESHREC_EVENTS. Every option can also be set from the environment as
    FRESHREC_<OPTION> with '__' between levels, for example FRESHREC_GRPC__PORT=50051."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.ingestion")

    grpc: GrpcSettings = GrpcSettings(port=50051)
    database: DatabaseSettings = DatabaseSettings(url="sqlite:///var/ingestion.db")
    max_batch: int = Field(1000, gt=0, description="Most events one IngestEvents call may carry.")
    duplicate_window_s: float = Field(
        120.0, gt=0, description="JetStream deduplication window for Nats-Msg-Id (seconds)."
    )
    publish_timeout_s: float = Field(5.0, gt=0, description="How long to wait for JetStream acks.")
    relay_interval_s: float = Field(
        1.0, gt=0, description="How often the outbox relay looks for committed but unpublished events."
    )
    raw_batch: int = Field(500, gt=0, description="Messages fetched at once from freshrec.events.raw.")
