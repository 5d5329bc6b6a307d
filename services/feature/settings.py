"""Configuration of the feature service."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.preprocessing import PreprocessingSettings
from shared.settings import DatabaseSettings, GrpcSettings, ServiceSettings


class FeatureSettings(ServiceSettings):
    """freshrec feature: consumes FRESHREC_EVENTS with a durable consumer and serves user and item
    features and the item catalogue. Every option can also be set from the environment as
    FRESHREC_<OPTION> with '__' between levels, for example FRESHREC_GRPC__PORT=50052."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.feature")

    grpc: GrpcSettings = GrpcSettings(port=50052)
    database: DatabaseSettings = DatabaseSettings(url="sqlite:///var/feature.db")
    consumer_name: str = Field("feature", description="Durable JetStream consumer name.")
    recent_items: int = Field(50, gt=0, le=1000, description="Recent interactions kept per user.")
    fetch_batch: int = Field(1000, gt=0, description="Events fetched and committed together.")
    preprocessing: PreprocessingSettings = Field(
        default_factory=PreprocessingSettings,
        description="Event weights and denoising rules (give the trainer the same values).",
    )
