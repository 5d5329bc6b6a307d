"""Prometheus metrics of the trainer (``freshrec_trainer_...``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_LEARNED = Counter("freshrec_trainer_events_learned_total", "Events the trainer has learned from.")
BATCH_SECONDS = Histogram(
    "freshrec_trainer_batch_seconds",
    "Time to score and learn one micro-batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PREQUENTIAL = Gauge(
    "freshrec_trainer_prequential",
    "Prequential (test-then-train) figures: hr@10, ndcg@10, over all events and the recent window.",
    ["figure"],
)
EXPORTS = Counter("freshrec_trainer_exports_total", "Exported candidates by outcome.", ["outcome"])
EXPORT_SECONDS = Histogram(
    "freshrec_trainer_export_seconds",
    "Export and validation time of one version.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
)
ROLLBACKS = Counter("freshrec_trainer_rollbacks_total", "Changes of the live version by reason.", ["reason"])
STREAM_SEQUENCE = Gauge("freshrec_trainer_stream_sequence", "Last stream sequence the trainer learned.")
EVENT_TIME = Gauge("freshrec_trainer_event_time_seconds", "Event time of the newest event learned.")
LIVE_TRAINED_THROUGH = Gauge(
    "freshrec_trainer_live_trained_through_seconds", "Event time the live version was trained through."
)
TABLE_ROWS = Gauge("freshrec_trainer_table_rows", "Rows in use in the embedding tables.", ["table"])
EXPIRED = Counter("freshrec_trainer_expired_rows_total", "Rows freed by expiry.", ["table"])
USERS_FORGOTTEN = Counter(
    "freshrec_trainer_users_forgotten_total",
    "Users erased from every per-user table (id row, histories, replay), by reason.",
    ["reason"],
)
SKIPPED_STEPS = Gauge("freshrec_trainer_skipped_steps", "Training steps skipped for a non-finite loss.")
RETRAIN_SECONDS = Histogram(
    "freshrec_trainer_retrain_seconds",
    "Duration of incremental fits and retrains from the event log.",
    buckets=(0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)


def publish_prequential(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        if name.startswith("prequential_"):
            PREQUENTIAL.labels(name.removeprefix("prequential_")).set(value)
