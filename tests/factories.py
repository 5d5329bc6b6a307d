"""Builders of test inputs."""

from __future__ import annotations

import time

from freshrec.v1 import event_pb2


def event(
    user: str,
    item: str,
    *,
    event_id: str | None = None,
    type: int = event_pb2.EVENT_TYPE_CLICK,
    at: float | None = None,
    value: float = 0.0,
) -> event_pb2.Event:
    e = event_pb2.Event(user_id=user, item_id=item, type=type, value=value)
    if event_id is not None:
        e.event_id = event_id
    e.occurred_at.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return e
