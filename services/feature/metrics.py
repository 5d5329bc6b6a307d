"""Prometheus metrics of the feature service (prefix ``freshrec_feature_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.preprocessing import RULES

_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

EVENTS_APPLIED = Counter(
    "freshrec_feature_events_applied_total", "Events applied to the features for the first time."
)
REDELIVERIES_SKIPPED = Counter(
    "freshrec_feature_redeliveries_skipped_total",
    "Events delivered again whose effect was already applied (skipped by stream sequence).",
)
USERS_EXPIRED = Counter(
    "freshrec_feature_users_expired_total",
    "Users changed by the retention: trimmed (older interactions dropped) or forgotten (every "
    "event older than the retention: the user's features are deleted).",
    ["outcome"],
)
PREPROCESSING = Counter(
    "freshrec_feature_preprocessing_total",
    "Events per preprocessing rule: events, collapsed_repeats, bot_events, bot_flags, "
    "normalised_ratings, value_weighted.",
    ["rule"],
)
for _rule in RULES:
    PREPROCESSING.labels(_rule)
EVENT_LAG = Histogram(
    "freshrec_feature_event_lag_seconds",
    "Time from JetStream accepting an event to its features being readable (applied in memory).",
    buckets=_LAG_BUCKETS,
)
COMMIT_LAG = Histogram(
    "freshrec_feature_commit_lag_seconds",
    "Time from JetStream accepting an event to its features being committed to SQL.",
    buckets=_LAG_BUCKETS,
)
COMMIT_SECONDS = Histogram(
    "freshrec_feature_commit_seconds",
    "Duration of one SQL commit of a batch of changed features and the stream position.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
COMMIT_FAILURES = Counter(
    "freshrec_feature_commit_failures_total", "Batches whose SQL commit failed (state reloaded, replayed)."
)
BATCH_SIZE = Histogram(
    "freshrec_feature_batch_events",
    "Events per fetched batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
WATERMARK_SEQUENCE = Gauge(
    "freshrec_feature_watermark_sequence", "Stream sequence of the last applied event."
)
WATERMARK_EVENT_TIME = Gauge(
    "freshrec_feature_watermark_event_time_seconds", "Newest event time (occurred_at) applied, unix seconds."
)
USERS = Gauge("freshrec_feature_users", "Users held in memory.")
ITEMS = Gauge("freshrec_feature_items", "Items with event statistics held in memory.")
CATALOGUE_ITEMS = Counter(
    "freshrec_feature_catalog_items_total",
    "Catalogue entries received, by source (grpc, nats) and outcome (accepted, rejected).",
    ["source", "outcome"],
)
CATALOGUE_DLQ = Counter(
    "freshrec_feature_catalog_dlq_total", "Catalogue messages or entries sent to freshrec.catalog.dlq."
)
CATALOGUE_PUBLISHED = Counter(
    "freshrec_feature_catalog_published_total", "Catalogue revisions published to FRESHREC_CATALOG."
)
CATALOGUE_FOLLOWED = Counter(
    "freshrec_feature_catalog_followed_total", "Catalogue revisions read back from FRESHREC_CATALOG."
)
CATALOGUE_UNPUBLISHED = Gauge(
    "freshrec_feature_catalog_unpublished", "Catalogue revisions stored but not yet published."
)


def count_rules(counts: dict[str, int]) -> None:
    for rule, n in counts.items():
        if n:
            PREPROCESSING.labels(rule).inc(n)


CATALOGUE_DELETED = Counter(
    "freshrec_feature_catalog_deleted_total", "Catalogue entries deleted through DeleteItems."
)
CATALOGUE_HIDDEN = Gauge("freshrec_feature_catalog_hidden", "Catalogue entries held hidden (served nowhere).")
CATALOGUE_TIME_LIMITED = Gauge(
    "freshrec_feature_catalog_time_limited",
    "Catalogue entries with an available_until (served nowhere once it passes).",
)
USERS_FORGOTTEN = Counter(
    "freshrec_feature_users_forgotten_total",
    'Forget requests carried out (ForgetUser): held="true" when this replica held the user.',
    ["held"],
)
