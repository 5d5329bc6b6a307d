"""Configuration of the ingestion service."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import DatabaseSettings, GrpcSettings, RetentionSettings, ServiceSettings

#: The services that take part in forgetting a user, each with its own durable consumer.
FORGET_SERVICES = ("ingestion", "feature", "trainer", "inference")


class ForgetSettings(BaseModel):
    """Forgetting users (ForgetUser): the tombstone's key and lifetime, who must report done."""

    hash_key: SecretStr | None = Field(
        None,
        description="Secret key of the HMAC-SHA256 that names a forgotten user in tombstones and status "
        "(never the id itself); every ingestion replica needs the same one. Unset: ForgetUser is refused.",
    )
    tombstone_ttl: timedelta = Field(
        timedelta(days=30),
        description="How long a forgotten user's late or redelivered events are dropped (seconds or an "
        "ISO 8601 duration such as P30D); afterwards the user may come back as a new user.",
    )
    tombstone_refresh_s: float = Field(
        1.0, gt=0, description="How often each replica reloads the tombstones other replicas recorded."
    )
    settle_s: float = Field(
        6.0,
        ge=0,
        description="How long ingestion waits after a request before erasing the event log and the streams, "
        "so events accepted just before the tombstone (being committed or published) are erased too.",
    )
    vacuum: bool = Field(
        True,
        description="SQLite: rebuild the event log's file (VACUUM) after erasing a user's rows, so no stale "
        "byte of them stays in a page; takes time in proportion to the log's size.",
    )
    services: list[str] = Field(
        list(FORGET_SERVICES),
        description="Services that must report done before a request is complete: at least one report of "
        "each, and one of every replica of theirs whose forget consumer is live (nats.forget_inactive_s).",
    )
    recheck_s: float = Field(
        5.0,
        gt=0,
        description="How often pending requests are checked again against the live replicas, so one that "
        "only waited for a replica that went away completes once that replica's consumer has expired.",
    )


class IngestionSettings(ServiceSettings):
    """freshrec ingestion: validates events, stores them in the SQL event log and publishes them
    to the JetStream stream FRESHREC_EVENTS. Every option can also be set from the environment as
    FRESHREC_<OPTION> with '__' between levels, for example FRESHREC_GRPC__PORT=50051."""

    model_config = SettingsConfigDict(cli_prog_name="python -m services.ingestion")

    grpc: GrpcSettings = GrpcSettings(port=50051)
    database: DatabaseSettings = DatabaseSettings(url="sqlite:///var/ingestion.db")
    retention: RetentionSettings = RetentionSettings()
    forget: ForgetSettings = ForgetSettings()

    # What an event must look like (services/ingestion/validation.py).
    max_batch: int = Field(
        1000, gt=0, description="Most events one IngestEvents call (or NATS batch) may carry."
    )
    rating_min: float = Field(1.0, description="Smallest value an EVENT_TYPE_RATE event may carry.")
    rating_max: float = Field(5.0, description="Largest value an EVENT_TYPE_RATE event may carry.")
    earliest_time: datetime = Field(
        datetime(2000, 1, 1, tzinfo=UTC),
        description="Events that occurred before this are refused (lower it to backfill older history).",
    )
    future_skew_s: float = Field(
        300.0, ge=0, description="How far in the future occurred_at may be (producer clock skew), seconds."
    )

    # Publishing and the outbox (services/ingestion/publisher.py, relay.py).
    duplicate_window_s: float = Field(
        120.0,
        gt=0,
        description="JetStream deduplication window of FRESHREC_EVENTS for Nats-Msg-Id (seconds).",
    )
    publish_timeout_s: float = Field(5.0, gt=0, description="How long to wait for JetStream acks of a batch.")
    max_publish_in_flight: int = Field(
        20_000, gt=0, description="Most events published and not yet acknowledged by JetStream at once."
    )
    relay_interval_s: float = Field(
        1.0, gt=0, description="How often the outbox relay looks for committed but unpublished events."
    )
    relay_batch: int = Field(1000, gt=0, description="Events the relay reads and publishes at a time.")
    relay_grace_s: float = Field(
        1.0, ge=0, description="The relay leaves events younger than this to the request that stored them."
    )
    reconcile_clock_skew_s: float = Field(
        5.0,
        ge=0,
        description="Largest clock difference assumed between ingestion and NATS when scanning the stream "
        "for events already published.",
    )
    commit_max_rows: int = Field(
        20_000,
        gt=0,
        description="Most events one group commit (one SQL transaction) takes from waiting requests.",
    )

    # Replicas sharing one database.
    replica_name: str = Field(
        "",
        max_length=128,
        description="Name of this replica; a restarted replica takes over the outbox of its earlier "
        "incarnation at once, so replicas running side by side need distinct names "
        "(default: <host name>:<gRPC port>).",
    )
    replica_lease_s: float = Field(
        30.0,
        gt=0,
        description="A replica silent for this long is presumed dead; others take over its outbox.",
    )

    # NATS intake (services/ingestion/nats_intake.py).
    raw_batch: int = Field(500, gt=0, description="Messages fetched at once from freshrec.events.raw.")
    raw_fetch_events: int = Field(
        2000,
        gt=0,
        description="Events the NATS intake aims to take per fetch (batches count all their events).",
    )
    raw_workers: int = Field(
        4, gt=0, le=64, description="Concurrent fetch-ingest-ack loops on freshrec.events.raw."
    )
    raw_ack_wait_s: float = Field(
        60.0, gt=0, description="Seconds before an unacknowledged raw message is redelivered."
    )
    dlq_duplicate_window_s: float = Field(
        600.0, gt=0, description="Deduplication window of the dead-letter stream FRESHREC_DLQ (seconds)."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> IngestionSettings:
        if self.rating_min > self.rating_max:
            raise ValueError("rating_min must not exceed rating_max")
        if self.earliest_time.tzinfo is None:
            self.earliest_time = self.earliest_time.replace(tzinfo=UTC)
        return self

    @property
    def replica(self) -> str:
        """The replica name in effect: ``replica_name``, or ``<host name>:<gRPC port>``."""
        return self.replica_name or f"{socket.gethostname()}:{self.grpc.port}"

    @property
    def reconcile_margin_s(self) -> float:
        """How long before the duplicate window closes a republish must be checked against the stream.

        Half the window, at most 30 s: a republish that lands within ``window - margin`` of the first
        possible copy is deduplicated by JetStream itself; anything older is reconciled first.
        """
        return min(self.duplicate_window_s / 2, 30.0)
