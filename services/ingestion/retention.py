"""Deletes accepted events older than the retention from the SQL event log.

The streams hold no event longer either: ingestion declares ``FRESHREC_RAW``, ``FRESHREC_EVENTS``
and the dead-letter stream with the retention as JetStream's ``max_age`` (see ``server.py``), and
the feature service expires what its user histories recorded (``services/feature/retention.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.ingestion import metrics
from services.ingestion.store import EventLog
from shared.settings import RetentionSettings

logger = logging.getLogger(__name__)


async def expire_events(log: EventLog, retention: RetentionSettings) -> int:
    """One sweep: deletes what is older than the retention; returns how many events went."""
    cutoff = retention.cutoff(time.time())
    if cutoff is None:
        return 0
    deleted, unpublished = await asyncio.to_thread(log.expire, int(cutoff * 1e6))
    if deleted:
        metrics.EXPIRED.labels(unpublished="false").inc(deleted - unpublished)
        logger.info("retention: deleted %d events accepted before %s", deleted, _utc(cutoff))
    if unpublished:
        metrics.EXPIRED.labels(unpublished="true").inc(unpublished)
        logger.error(
            "retention: %d of them had never reached JetStream (NATS unreachable for longer than the "
            "retention?); they are gone",
            unpublished,
        )
    return deleted


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
