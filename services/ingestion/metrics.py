"""Prometheus metrics of the ingestion service (prefix ``freshrec_ingestion_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Where an event came from: ``grpc`` (IngestEvents / IngestEventStream) or ``nats`` (freshrec.events.raw).
SOURCES = ("grpc", "nats")

ACCEPTED = Counter(
    "freshrec_ingestion_events_accepted_total",
    "Events stored in the event log for the first time.",
    ["source"],
)
DUPLICATES = Counter(
    "freshrec_ingestion_events_duplicate_total",
    "Events whose event_id was already in the event log (counted, not stored again).",
    ["source"],
)
REJECTED = Counter(
    "freshrec_ingestion_events_rejected_total",
    "Events refused by validation, by rule (the code of services/ingestion/validation.py).",
    ["source", "reason"],
)
EXPIRED = Counter(
    "freshrec_ingestion_events_expired_total",
    "Events deleted from the SQL event log for being older than the retention "
    '(unpublished="true": deleted before JetStream had them).',
    ["unpublished"],
)
BATCHES_REFUSED = Counter(
    "freshrec_ingestion_batches_refused_total",
    "Whole batches refused (over the size limit), by source.",
    ["source"],
)
PUBLISHED = Counter(
    "freshrec_ingestion_events_published_total",
    "Events JetStream acknowledged, by path: request (right after commit) or relay (the outbox).",
    ["path"],
)
PUBLISH_FAILED = Counter(
    "freshrec_ingestion_publish_failures_total",
    "Events whose publish was not acknowledged (timeout, error, NATS down); the relay retries them.",
    ["path"],
)
PUBLISH_LATENCY = Histogram(
    "freshrec_ingestion_publish_latency_seconds",
    "From the first publish of a batch to the last JetStream acknowledgement.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COMMIT_SECONDS = Histogram(
    "freshrec_ingestion_commit_seconds",
    "Duration of one group-commit transaction of the event log.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
COMMIT_ROWS = Histogram(
    "freshrec_ingestion_commit_rows",
    "Events written by one group commit (how many requests shared a transaction).",
    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000),
)
OUTBOX_BACKLOG = Gauge(
    "freshrec_ingestion_outbox_backlog",
    "Events committed to the event log and not yet acknowledged by JetStream (this replica's outbox).",
)
NATS_CONNECTED = Gauge("freshrec_ingestion_nats_connected", "1 while connected to NATS.")
PUBLISHER_SERVING = Gauge(
    "freshrec_ingestion_publisher_serving",
    "1 while events are published as they are accepted; 0 while they wait in the outbox.",
)
RECONCILED = Counter(
    "freshrec_ingestion_reconciled_total",
    "Unpublished events found already in FRESHREC_EVENTS by reconciliation (so not published again).",
)
RECONCILE_SCANNED = Counter(
    "freshrec_ingestion_reconcile_scanned_total",
    "Stream messages read by reconciliation scans.",
)
ADOPTED = Counter(
    "freshrec_ingestion_outbox_adopted_total",
    "Unpublished events taken over from earlier incarnations or silent replicas.",
)
DLQ = Counter(
    "freshrec_ingestion_dlq_total",
    "Messages (or events of a batch) dead-lettered to freshrec.events.dlq, by reason code.",
    ["reason"],
)
RAW_MESSAGES = Counter(
    "freshrec_ingestion_raw_messages_total",
    "Messages consumed from freshrec.events.raw.",
)
FORGOTTEN_EVENTS = Counter(
    "freshrec_ingestion_events_forgotten_total",
    "Events of a forgotten user dropped while the user's tombstone holds, by source: grpc and nats (late "
    "or redelivered), outbox (committed before the tombstone, dropped instead of published).",
    ["source"],
)
FORGET_REQUESTS = Counter(
    "freshrec_ingestion_forget_requests_total",
    "Forget requests, by outcome: requested (new), repeated (a pending request for the same user "
    "answered again), completed (every service done), refused (no hash key, or NATS unreachable).",
    ["outcome"],
)
FORGET_SECONDS = Histogram(
    "freshrec_ingestion_forget_seconds",
    "From a forget request to the last service reporting done.",
    buckets=(0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300, 900, 3600),
)
FORGET_ERASED = Counter(
    "freshrec_ingestion_forget_erased_total",
    'What ingestion erased for forget requests: rows of the event log (where="events") and '
    "messages of each stream (where=<stream name>).",
    ["where"],
)
