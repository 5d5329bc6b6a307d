"""Settings pieces every service composes into its own ``Settings`` class.

All settings come from the environment with the prefix ``FRESHREC_`` and ``__`` between
nested names, for example ``FRESHREC_NATS__URL`` or ``FRESHREC_GRPC__PORT``; each
``python -m services.<name> --help`` lists its own.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TlsSettings(BaseModel):
    """TLS files (PEM). As a server: cert+key turn TLS on; a CA file then requires client
    certificates signed by it (mutual TLS). As a client: the CA verifies the server; cert+key
    present this client's identity for mutual TLS."""

    cert_file: Path | None = Field(None, description="Certificate chain (PEM).")
    key_file: Path | None = Field(None, description="Private key of the certificate (PEM).")
    ca_file: Path | None = Field(None, description="CA bundle to verify the other side (PEM).")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.ca_file)

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        return self


class PeerSettings(BaseModel):
    """How this service calls another freshrec service over gRPC."""

    tls: TlsSettings = TlsSettings()
    token: SecretStr | None = Field(None, description="Bearer token sent to the peer, if it requires one.")


class NatsSettings(BaseModel):
    """How to reach NATS JetStream."""

    url: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS server URL(s), comma-separated, nearest first: the client tries them in this "
        "order (see randomize), so a service on a host with its own node stays on that node and a fault "
        "elsewhere does not cut it off.",
    )
    randomize: bool = Field(
        False,
        description="Try the servers in random order instead (spreads many clients over a cluster whose "
        "nodes are equally near).",
    )
    user: str | None = Field(None, description="NATS user name, if the server requires one.")
    password: SecretStr | None = Field(None, description="NATS password.")
    token: SecretStr | None = Field(None, description="NATS authentication token.")
    creds_file: Path | None = Field(None, description="NATS credentials file (JWT + nkey seed).")
    nkey_seed_file: Path | None = Field(None, description="NATS nkey seed file.")
    tls: TlsSettings = TlsSettings()
    connect_timeout_s: float = Field(2.0, gt=0, description="Timeout of one connection attempt.")
    connect_attempts: int = Field(
        20, gt=0, description="Attempts of the first connection before giving up (reconnects never give up)."
    )
    reconnect_wait_s: float = Field(0.5, gt=0, description="Pause between reconnection attempts.")
    ping_interval_s: int = Field(
        5,
        ge=1,
        description="Pause between the client's pings; a server that misses 2 in a row is taken as gone "
        "and the client reconnects to another (a host cut off sends no reset: without pings it would "
        "take minutes to notice).",
    )
    jetstream_wait_s: float = Field(
        60.0,
        gt=0,
        description="How long a starting service waits for JetStream to answer (a cluster that has "
        "just started answers once it has elected its meta leader).",
    )
    stream_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="Replicas of the JetStream streams a service declares (3 on a 3-node cluster).",
    )
    forget_inactive_s: float = Field(
        120.0,
        gt=0,
        description="How long after a replica stops taking forget tasks JetStream removes its durable "
        "consumer on FRESHREC_FORGET (inactive_threshold); until then a pending forget request waits for "
        "that replica's report. Give every service the same value.",
    )

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]


class DatabaseSettings(BaseModel):
    """Where the service keeps its SQL state (SQLAlchemy URL)."""

    url: str = Field("sqlite:///var/freshrec.db", description="SQLAlchemy database URL.")
    echo: bool = Field(False, description="Log every SQL statement.")
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="SQLite synchronous pragma (FULL: a commit survives power loss)."
    )


class GrpcSettings(BaseModel):
    """The service's gRPC server."""

    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(0, ge=0, le=65535, description="Port to listen on (0: any free port).")
    grace_s: float = Field(10.0, ge=0, description="How long in-flight RPCs may run after SIGTERM.")
    drain_s: float = Field(
        0.5,
        ge=0,
        description="After SIGTERM, how long calls already sent are still taken before the stop.",
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest gRPC message accepted.")
    tls: TlsSettings = TlsSettings()
    auth_token: SecretStr | None = Field(
        None, description="When set, every RPC but health checks needs 'authorization: Bearer <token>'."
    )


class MetricsSettings(BaseModel):
    """The Prometheus metrics endpoint."""

    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    host: str = Field("0.0.0.0", description="Interface of the metrics endpoint.")
    port: int = Field(0, ge=0, le=65535, description="Port of the metrics endpoint (0: any free port).")


class LogSettings(BaseModel):
    """Logging output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    json_lines: bool = Field(False, description="Write JSON lines instead of plain text.")


class RequestLimits(BaseModel):
    """How much one read request may ask for (feature and inference services)."""

    max_id_length: int = Field(
        128, gt=0, le=128, description="Longest user, item or category id in a request."
    )
    max_ids_per_request: int = Field(1000, gt=0, description="Most ids in one request's list of ids.")
    max_k: int = Field(1000, gt=0, description="Most items one request may ask for (k).")
    max_context_entries: int = Field(32, ge=0, description="Most request context entries.")


class RetentionSettings(BaseModel):
    """How long accepted events are kept. Ages count from when ingestion accepted the event (the
    time JetStream stored it), so a backfill of old history is kept as long as live traffic."""

    events: timedelta | None = Field(
        None,
        description="Keep each accepted event, and the per-user records of it, at most this long "
        "after it was accepted: seconds or an ISO 8601 duration such as P30D (unset: forever). "
        "Applies to the SQL event log, FRESHREC_RAW, FRESHREC_EVENTS and the dead-letter stream "
        "(JetStream max_age) and the feature service's user histories; give every service the same value.",
    )
    sweep_interval_s: float = Field(
        60.0, gt=0, description="How often records older than the retention are removed."
    )

    @model_validator(mode="after")
    def _positive(self) -> Self:
        if self.events is not None and self.events.total_seconds() <= 0:
            raise ValueError("retention.events must be a positive duration (leave it unset to keep forever)")
        return self

    @property
    def events_s(self) -> float | None:
        return None if self.events is None else self.events.total_seconds()

    def cutoff(self, now: float) -> float | None:
        """Records accepted before this Unix time are expired (None: nothing expires)."""
        age = self.events_s
        return None if age is None else now - age

    def max_age_s(self, default: float | None = None) -> float | None:
        """A stream's age limit: the retention, or the stream's own default if that is shorter."""
        age = self.events_s
        if age is None:
            return default
        return age if default is None else min(age, default)


#: Environment variable names (or prefixes) an earlier version read, and what they are now.
RENAMED_VARIABLES = {
    "FRESHREC_CATALOG__": "FRESHREC_CATALOGUE__",
    # Popularity moved from seconds of event time to counts of events (values need converting).
    "FRESHREC_POPULARITY__HALF_LIFE_S": "FRESHREC_POPULARITY__HALF_LIFE_EVENTS",
    "FRESHREC_POPULARITY__TRENDING_WINDOW_S": "FRESHREC_POPULARITY__TRENDING_WINDOW_EVENTS",
    "FRESHREC_POPULARITY__AFFINITY_HALF_LIFE_S": "FRESHREC_POPULARITY__AFFINITY_HALF_LIFE_EVENTS",
}


class ServiceSettings(BaseSettings):
    """What every freshrec service is configured with; each service extends it."""

    model_config = SettingsConfigDict(
        env_prefix="FRESHREC_",
        env_nested_delimiter="__",
        extra="ignore",
        cli_kebab_case=True,
    )

    log: LogSettings = LogSettings()
    nats: NatsSettings = NatsSettings()
    grpc: GrpcSettings = GrpcSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _no_renamed_variables(self) -> Self:
        """Refuses to start on a variable that an earlier version read under another name: it
        would be ignored, and the service would run on the default instead."""
        for name in os.environ:
            for old, new in RENAMED_VARIABLES.items():
                if name.startswith(old):
                    raise ValueError(f"{name} is now named {new}{name[len(old) :]}; rename it")
        return self
