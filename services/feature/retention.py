"""Applies the retention to the user histories the feature service keeps.

Every ``sweep_interval_s`` each user is checked (a slice at a time, so reads and the consumer
are not held up): interactions and touched items accepted before the cutoff are dropped, and a
user with no event inside the retention is forgotten whole, their row deleted at the next
commit. Item popularity is an aggregate over all users and is not a per-user record.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.feature import metrics
from services.feature.state import FeatureState
from shared.settings import RetentionSettings

logger = logging.getLogger(__name__)

#: Users checked between two yields to the event loop.
SLICE = 1000


async def expire_users(state: FeatureState, retention: RetentionSettings) -> tuple[int, int]:
    """One sweep over every user; returns (trimmed, forgotten)."""
    cutoff = retention.cutoff(time.time())
    if cutoff is None:
        return 0, 0
    user_ids = list(state.users)
    trimmed = forgotten = 0
    for start in range(0, len(user_ids), SLICE):
        t, f = state.expire_users(user_ids[start : start + SLICE], cutoff)
        trimmed, forgotten = trimmed + t, forgotten + f
        await asyncio.sleep(0)
    if trimmed or forgotten:
        metrics.USERS_EXPIRED.labels(outcome="trimmed").inc(trimmed)
        metrics.USERS_EXPIRED.labels(outcome="forgotten").inc(forgotten)
        metrics.USERS.set(len(state.users))
        logger.info(
            "retention: trimmed %d users' histories and forgot %d users with nothing newer than %s",
            trimmed,
            forgotten,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff)),
        )
    return trimmed, forgotten
