"""Configuration of the feature service."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import CliSubCommand, SettingsConfigDict

from shared.nats import EVENT_PARTITIONS, partition_filter_subjects
from shared.preprocessing import PreprocessingSettings
from shared.settings import DatabaseSettings, GrpcSettings, RequestLimits, RetentionSettings, ServiceSettings


class PopularitySettings(BaseModel):
    """How item popularity and user category affinity decay: counted in events, not seconds,
    so the same values hold on a stream of any speed (years of history or a backfill replayed
    in seconds)."""

    half_life_events: int = Field(
        10_000,
        ge=0,
        description="Half-life of item popularity, in accepted events (stream sequence; 0: no decay).",
    )
    trending_window_events: int = Field(
        1_000, gt=0, description="Window of trending popularity: the last this many accepted events."
    )
    trending_buckets: int = Field(20, gt=0, le=1000, description="Slices the trending window moves by.")
    affinity_half_life_events: int = Field(
        20,
        ge=0,
        description="Half-life of a user's category affinity, in that user's own events (0: no decay).",
    )


class PartitionSettings(BaseModel):
    """Which share of users this replica owns: the user partitions p (CRC-32 of user_id mod 64)
    with p % replicas == replica. Each replica needs its own value of replica."""

    replicas: int = Field(1, ge=1, le=EVENT_PARTITIONS, description="Number of feature replicas.")
    replica: int = Field(0, ge=0, description="This replica's index, 0 to replicas - 1.")

    @model_validator(mode="after")
    def _in_range(self) -> Self:
        if self.replica >= self.replicas:
            raise ValueError(f"replica {self.replica} is not below replicas {self.replicas}")
        return self

    def filter_subjects(self) -> list[str]:
        return partition_filter_subjects(self.replica, self.replicas)

    def owns_partition(self, partition: int) -> bool:
        return partition % self.replicas == self.replica


class CatalogueSettings(BaseModel):
    """Limits every catalogue entry is validated against (gRPC and NATS alike)."""

    max_items_per_request: int = Field(1000, gt=0, description="Most items in one UpsertItems or message.")
    max_id_length: int = Field(128, gt=0, le=128, description="Longest item_id.")
    max_title_length: int = Field(512, gt=0, description="Longest title.")
    max_description_length: int = Field(10_000, gt=0, description="Longest description.")
    max_categories: int = Field(32, ge=0, description="Most categories per item.")
    max_tags: int = Field(64, ge=0, description="Most tags per item.")
    max_label_length: int = Field(64, gt=0, description="Longest category or tag.")
    max_attributes: int = Field(64, ge=0, description="Most attributes per item.")
    max_attribute_key_length: int = Field(64, gt=0, description="Longest attribute key.")
    max_attribute_value_length: int = Field(1024, gt=0, description="Longest attribute value.")
    max_future_s: float = Field(300.0, ge=0, description="How far in the future created_at may be.")
    relay_interval_s: float = Field(
        2.0, gt=0, description="How often entries stored but not yet published are retried."
    )


class FeatureSettings(ServiceSettings):
    """freshrec feature: consumes FRESHREC_EVENTS with a durable consumer and serves user and item
    features and the item catalogue. Every option can also be set from the environment as
    FRESHREC_<OPTION> with '__' between levels, for example FRESHREC_GRPC__PORT=50052."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.feature")

    grpc: GrpcSettings = GrpcSettings(port=50052)
    database: DatabaseSettings = DatabaseSettings(url="sqlite:///var/feature.db")
    retention: RetentionSettings = RetentionSettings()
    consumer_name: str = Field(
        "feature",
        pattern=r"^[A-Za-z0-9_-]{1,40}$",
        description="Durable JetStream consumer name (with partitions: <name>-<replica>-of-<replicas>).",
    )
    recent_items: int = Field(50, gt=0, le=1000, description="Recent interactions kept per user.")
    seen_items: int = Field(
        10_000,
        ge=0,
        description="Distinct items remembered per user as seen (oldest forgotten first; what "
        "recommendations leave out).",
    )
    fetch_batch: int = Field(2000, gt=0, le=100_000, description="Most events fetched and applied at once.")
    fetch_wait_s: float = Field(1.0, gt=0, description="Longest wait of one fetch when the stream is idle.")
    commit_interval_s: float = Field(
        0.25, ge=0, description="Shortest time between two commits of applied events to SQL."
    )
    ack_wait_s: float = Field(60.0, gt=0, description="JetStream redelivers an event not acked by then.")
    preprocessing: PreprocessingSettings = Field(
        PreprocessingSettings(),
        description="Event weights and denoising rules (give the trainer the same values).",
    )
    popularity: PopularitySettings = PopularitySettings()
    partition: PartitionSettings = PartitionSettings()
    advertise_addr: str = Field(
        "",
        pattern=r"^$|^[A-Za-z0-9.:\[\]_-]+:[0-9]+$",
        description="host:port at which inference reaches this replica, published in the partition map "
        "(KV bucket FRESHREC_FEATURE_REPLICAS) so lookups go to the owner of each user "
        "(default: the gRPC host, or this host's name when that is 0.0.0.0, with the served port).",
    )
    catalogue: CatalogueSettings = CatalogueSettings()
    limits: RequestLimits = RequestLimits()

    @property
    def replica_name(self) -> str:
        """Names this replica's durable consumer and its rows in SQL."""
        p = self.partition
        return self.consumer_name if p.replicas == 1 else f"{self.consumer_name}-{p.replica}-of-{p.replicas}"


class RebuildCommand(BaseModel):
    """Recompute this replica's user and item features from the event log: replay
    FRESHREC_EVENTS from sequence 1 (the stream keeps every event) through the same rules
    into fresh state, then replace the stored state and stream position in one transaction.
    Stop the replica first; on its next start it resumes after the rebuilt position. The
    catalogue is kept as it is."""

    batch: int = Field(5000, gt=0, description="Events fetched per request while replaying.")
    force: bool = Field(False, description="Rebuild even if the replica seems to be running.")


class FeatureCommandLine(FeatureSettings):
    """freshrec feature: consumes FRESHREC_EVENTS with a durable consumer and serves user and item
    features and the item catalogue over gRPC. Without a subcommand it runs the service;
    'rebuild' recomputes all feature state from the event log. Every option can also be set
    from the environment as FRESHREC_<OPTION> with '__' between levels, for example
    FRESHREC_GRPC__PORT=50052."""

    rebuild: CliSubCommand[RebuildCommand] = Field(
        description="Recompute all feature state by replaying FRESHREC_EVENTS from sequence 1 and swap it "
        "in transactionally (stop the service first). 'rebuild --help' says more."
    )
