"""Garbage-collector settings for services that hold large in-memory state and answer in ms.

CPython's cyclic collector pauses every thread of the process, and a full collection walks every
tracked object: with a feature state or a model catalogue in memory, that is hundreds of
thousands of objects, tens to hundreds of milliseconds. ``settle`` is called once a service has
loaded what it serves:

- everything alive then (the code, the loaded state) is frozen out of the collector's view (it
  stays in memory; plain, acyclic objects are still freed by reference counting when replaced);
- young collections wait for 50,000 allocations instead of 700, so the short-lived objects of
  requests, events and commits die before they can be promoted (promotions are what bring full
  collections), and a request pays for fewer collections.

``release`` undoes it when the service stops (several services may run in one process, as in
tests). ``freshrec_gc_pause_seconds`` (shared/metrics.py) shows the pauses that remain.
"""

from __future__ import annotations

import gc

#: Thresholds of generations 0, 1 and 2 (CPython's defaults are 700, 10, 10).
THRESHOLDS = (50_000, 20, 100)


_defaults: tuple[int, int, int] | None = None


def settle() -> None:
    global _defaults
    if _defaults is None:
        _defaults = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def release() -> None:
    """Back to the collector's defaults, everything frozen collectable again."""
    global _defaults
    if _defaults is not None:
        gc.set_threshold(*_defaults)
        _defaults = None
    gc.unfreeze()
