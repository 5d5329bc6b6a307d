"""Building the ``Watermark`` every answer carries: how far through the stream its state is."""

from __future__ import annotations

import time

from freshrec.v1 import watermark_pb2


def watermark_proto(
    stream_sequence: int, event_time_s: float, now_s: float | None = None
) -> watermark_pb2.Watermark:
    """A Watermark for the last applied event; ``lag`` is now minus that event's time (0 if none)."""
    wm = watermark_pb2.Watermark(stream_sequence=stream_sequence)
    if event_time_s > 0:
        wm.event_time.FromNanoseconds(int(event_time_s * 1e9))
        lag = max(0.0, (time.time() if now_s is None else now_s) - event_time_s)
        wm.lag.FromNanoseconds(int(lag * 1e9))
    return wm
