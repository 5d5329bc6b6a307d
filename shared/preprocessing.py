"""Preprocessing of behaviour events: the numbers every learner and every feature agree on.

The feature service and the trainer both run this module on the ``FRESHREC_EVENTS`` stream,
so what a user's features show (weights, likely-bot flag, collapsed repeats) is exactly what
the trainer learns from. It is deterministic, runs on event time (``occurred_at``) only, and
depends on nothing but pydantic (for its settings): no SQL, no NATS, no torch.

Use
---
::

    from shared.preprocessing import Preprocessor, PreprocessingSettings

    pre = Preprocessor(settings.preprocessing)       # embed PreprocessingSettings in your Settings
    for seq, event in events_in_stream_order:
        out = pre.process_event(event)                # or pre.process(user, item, type, value, t)
        if not out.kept:                              # a rapid repeat: ignore it everywhere
            continue
        if out.signal:                                # not a likely bot: popularity, training
            learn(event, weight=out.weight)

    checkpoint["preprocessing"] = pre.state_dict()   # JSON-able; restore with load_state_dict
    pre.take_counts()                                 # {"events": n, "collapsed_repeats": n, ...}

Rules, applied to each event in stream order (every one counted in ``counts``):

1. **Likely bot** (``bot_max_events`` within ``bot_window_s``): a leaky bucket per user on event
   time. Each event (repeats included) adds 1, except one at the very event time of the user's
   newest (a coarse clock, such as dates only, says nothing of speed); the bucket drains ``bot_max_events /
   bot_window_s`` per second of event time. When it overflows, the user is flagged until
   ``occurred_at + bot_quarantine_s``; every event of a flagged user has ``likely_bot=True``
   and ``signal=False``: it stays in the user's own features but is kept out of popularity
   and training. An event older than the user's newest one drains nothing (no negative time).
2. **Rapid repeat** (``repeat_window_s``): an event with the same user, item and type within
   the window of the last *kept* one collapses into it (``kept=False``): at most one event
   per (user, item, type) per window. Keys older than the window behind the user's newest
   event are pruned once a user holds more than ``REPEAT_PRUNE_AT`` of them.
3. **Weight**: ``type_weights[type]`` (1.0 for a type not listed). For ``EVENT_TYPE_RATE`` it is
   multiplied by ``clip(1 + rating_slope * z, rating_min_factor, rating_max_factor)`` where
   ``z`` is the rating normalised for this user (below). For other types a positive
   ``value`` multiplies the weight, capped at ``value_cap`` (0 turns that off).
4. **Rating normalisation**: per user, the mean and variance of the user's kept ratings
   (including this one) shrunk towards ``rating_prior_mean`` / ``rating_prior_std`` with the
   weight of ``rating_prior_strength`` ratings; ``z = (value - mean) / std``. A 3 from a
   harsh rater (mean 2) scores above a 3 from a generous one (mean 4).

Every rule depends only on the same user's earlier events, so any partition of the stream
by user (feature replicas) computes the same numbers as one process reading it all (the
trainer), and replaying the stream reproduces them exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, Field, field_validator

from freshrec.v1 import event_pb2

#: Rule names as they appear in ``Preprocessor.counts`` (and in services' metrics labels).
RULES = (
    "events",  # events processed
    "collapsed_repeats",  # rule 2: dropped as a rapid repeat
    "bot_events",  # rule 1: events of a user flagged as a likely bot
    "bot_flags",  # rule 1: times a user went from not flagged to flagged
    "normalised_ratings",  # rule 4: ratings normalised
    "value_weighted",  # rule 3: non-rating events whose value multiplied the weight
)

#: A user's rapid-repeat keys are pruned once there are more than this many.
REPEAT_PRUNE_AT = 64

_RATE = event_pb2.EVENT_TYPE_RATE
_TYPE_NAMES = {v.number: v.name for v in event_pb2.EventType.DESCRIPTOR.values}

DEFAULT_TYPE_WEIGHTS = {
    "EVENT_TYPE_VIEW": 1.0,
    "EVENT_TYPE_CLICK": 2.0,
    "EVENT_TYPE_ADD_TO_CART": 3.0,
    "EVENT_TYPE_PURCHASE": 5.0,
    "EVENT_TYPE_RATE": 1.0,
    "EVENT_TYPE_LIKE": 3.0,
    "EVENT_TYPE_DISLIKE": -1.0,
}


class PreprocessingSettings(BaseModel):
    """How events are weighted and denoised before anything learns from them (shared by the
    feature service and the trainer: give both the same values)."""

    type_weights: dict[str, float] = Field(
        DEFAULT_TYPE_WEIGHTS,
        description="Weight of each event type (EVENT_TYPE_* name or its suffix, e.g. 'purchase').",
    )
    value_cap: float = Field(
        10.0, ge=0, description="Largest multiplier a non-rating event's value may apply (0: ignore value)."
    )
    repeat_window_s: float = Field(
        10.0,
        ge=0,
        description="Same user, item and type within this many seconds collapse into one (0: off).",
    )
    bot_max_events: int = Field(
        120, gt=0, description="A user with more events than this within bot-window-s is a likely bot."
    )
    bot_window_s: float = Field(60.0, gt=0, description="Window (event time) of the likely-bot rate bound.")
    bot_quarantine_s: float = Field(
        3600.0, ge=0, description="How long (event time) a likely bot stays flagged after its last overflow."
    )
    rating_prior_mean: float = Field(3.0, description="Rating a user is assumed to give before any rating.")
    rating_prior_std: float = Field(1.0, gt=0, description="Spread of a user's ratings assumed before any.")
    rating_prior_strength: float = Field(
        5.0, ge=0, description="How many ratings the prior counts for when normalising a user's ratings."
    )
    rating_slope: float = Field(0.5, ge=0, description="Weight change per standard deviation of rating.")
    rating_min_factor: float = Field(0.1, ge=0, description="Smallest rating weight factor.")
    rating_max_factor: float = Field(2.0, ge=0, description="Largest rating weight factor.")

    @field_validator("type_weights")
    @classmethod
    def _known_types(cls, value: dict[str, float]) -> dict[str, float]:
        normalised: dict[str, float] = {}
        for name, weight in value.items():
            full = name.upper() if name.upper().startswith("EVENT_TYPE_") else f"EVENT_TYPE_{name.upper()}"
            if full not in event_pb2.EventType.keys() or full == "EVENT_TYPE_UNSPECIFIED":
                raise ValueError(f"unknown event type {name!r}")
            if not math.isfinite(weight):
                raise ValueError(f"weight of {name} is not finite")
            normalised[full] = float(weight)
        return normalised


@dataclass(frozen=True, slots=True)
class Processed:
    """What preprocessing made of one event."""

    #: False for a rapid repeat collapsed into an earlier event: ignore it everywhere.
    kept: bool
    #: The user is flagged as a likely bot at this event.
    likely_bot: bool
    #: The event's weight (type weight times the rating or value factor); may be negative.
    weight: float
    #: The rating normalised for this user (z-score); None for non-rating or collapsed events.
    normalized_rating: float | None = None

    @property
    def signal(self) -> bool:
        """True when the event may feed popularity and training (kept and not a likely bot)."""
        return self.kept and not self.likely_bot


class UserPreprocessing:
    """The per-user state the rules need (small: a few floats and the recent repeat keys)."""

    __slots__ = (
        "bucket",
        "bucket_t",
        "flagged_until",
        "newest",
        "n_ratings",
        "rating_mean",
        "rating_m2",
        "keys",
    )

    def __init__(self) -> None:
        self.bucket = 0.0  # leaky-bucket level
        self.bucket_t = -math.inf  # event time the bucket was last drained to
        self.flagged_until = -math.inf  # likely bot while occurred_at < this
        self.newest = -math.inf  # newest event time seen
        self.n_ratings = 0
        self.rating_mean = 0.0
        self.rating_m2 = 0.0  # Welford's sum of squared deviations
        self.keys: dict[str, float] = {}  # "<type>:<item>" -> event time of the last kept one

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "bucket_t": _finite(self.bucket_t),
            "flagged_until": _finite(self.flagged_until),
            "newest": _finite(self.newest),
            "n_ratings": self.n_ratings,
            "rating_mean": self.rating_mean,
            "rating_m2": self.rating_m2,
            "keys": dict(self.keys),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> UserPreprocessing:
        user = cls()
        user.bucket = float(doc["bucket"])
        user.bucket_t = _infinite(doc["bucket_t"])
        user.flagged_until = _infinite(doc["flagged_until"])
        user.newest = _infinite(doc["newest"])
        user.n_ratings = int(doc["n_ratings"])
        user.rating_mean = float(doc["rating_mean"])
        user.rating_m2 = float(doc["rating_m2"])
        user.keys = {str(k): float(v) for k, v in doc["keys"].items()}
        return user

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserPreprocessing) and self.to_json() == other.to_json()

    def rating_stats(self, settings: PreprocessingSettings) -> tuple[float, float]:
        """The user's shrunk rating mean and standard deviation."""
        k = settings.rating_prior_strength
        n = self.n_ratings
        if n + k <= 0:
            return settings.rating_prior_mean, settings.rating_prior_std
        mean = (k * settings.rating_prior_mean + n * self.rating_mean) / (k + n)
        between = k * n / (k + n) * (self.rating_mean - settings.rating_prior_mean) ** 2 if n else 0.0
        var = (k * settings.rating_prior_std**2 + self.rating_m2 + between) / (k + n)
        return mean, math.sqrt(max(var, 1e-12))


class EventLike(Protocol):
    """What ``process_event`` reads: a ``freshrec.v1.Event`` or anything shaped like it."""

    user_id: str
    item_id: str
    value: float

    @property
    def type(self) -> int: ...  # read only, so an Event's EventType (an int) fits

    @property
    def occurred_at(self) -> Any: ...


def event_time_s(event: EventLike) -> float:
    """``occurred_at`` in unix seconds (float)."""
    ts = event.occurred_at
    return float(ts.seconds + ts.nanos / 1e9)


class Preprocessor:
    """Applies the rules to events in stream order and keeps the per-user state they need."""

    def __init__(self, settings: PreprocessingSettings | None = None) -> None:
        self.settings = settings or PreprocessingSettings()
        s = self.settings
        self.users: dict[str, UserPreprocessing] = {}
        self.counts: Counter[str] = Counter()
        self._weights = {num: s.type_weights.get(name, 1.0) for num, name in _TYPE_NAMES.items()}
        self._drain_per_s = s.bot_max_events / s.bot_window_s

    def type_weight(self, event_type: int) -> float:
        return self._weights.get(event_type, 1.0)

    def process_event(self, event: EventLike) -> Processed:
        """``process`` for a ``freshrec.v1.Event``."""
        return self.process(event.user_id, event.item_id, event.type, event.value, event_time_s(event))

    def process(self, user_id: str, item_id: str, event_type: int, value: float, t: float) -> Processed:
        """Applies every rule to one event (call in stream order) and updates the user's state."""
        s = self.settings
        counts = self.counts
        counts["events"] += 1
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = UserPreprocessing()

        # 1. Likely bot: leaky bucket on event time. Events at the very time of the user's newest one
        # count once: a clock that only tells the day or the month (dated history backfilled) is
        # no evidence of speed, and would otherwise flag every active user of that day.
        same_moment = t == user.bucket_t
        if t > user.bucket_t:
            if user.bucket_t > -math.inf:
                user.bucket = max(0.0, user.bucket - (t - user.bucket_t) * self._drain_per_s)
            user.bucket_t = t
        if not same_moment:
            user.bucket += 1.0
        if user.bucket > s.bot_max_events:
            if not t < user.flagged_until:
                counts["bot_flags"] += 1
            user.flagged_until = max(user.flagged_until, t + s.bot_quarantine_s)
        likely_bot = t < user.flagged_until
        if t > user.newest:
            user.newest = t

        # 2. Rapid repeat: at most one kept event per (user, item, type) per window.
        if s.repeat_window_s > 0:
            key = f"{event_type}:{item_id}"
            last = user.keys.get(key)
            if last is not None and abs(t - last) < s.repeat_window_s:
                counts["collapsed_repeats"] += 1
                if likely_bot:
                    counts["bot_events"] += 1
                return Processed(kept=False, likely_bot=likely_bot, weight=0.0)
            user.keys[key] = t
            if len(user.keys) > REPEAT_PRUNE_AT:
                horizon = user.newest - s.repeat_window_s
                user.keys = {k: v for k, v in user.keys.items() if v >= horizon}
        if likely_bot:
            counts["bot_events"] += 1

        # 3 and 4. Weight, with ratings normalised per user.
        weight = self._weights.get(event_type, 1.0)
        normalized: float | None = None
        if event_type == _RATE:
            user.n_ratings += 1
            delta = value - user.rating_mean
            user.rating_mean += delta / user.n_ratings
            user.rating_m2 += delta * (value - user.rating_mean)
            mean, std = user.rating_stats(s)
            normalized = (value - mean) / std
            factor = min(max(1.0 + s.rating_slope * normalized, s.rating_min_factor), s.rating_max_factor)
            weight *= factor
            counts["normalised_ratings"] += 1
        elif value > 0 and s.value_cap > 0:
            weight *= min(value, s.value_cap)
            counts["value_weighted"] += 1
        return Processed(kept=True, likely_bot=likely_bot, weight=weight, normalized_rating=normalized)

    def is_likely_bot(self, user_id: str, at: float | None = None) -> bool:
        """Whether the user is flagged at event time ``at`` (default: the user's newest event)."""
        user = self.users.get(user_id)
        if user is None:
            return False
        return (user.newest if at is None else at) < user.flagged_until

    def take_counts(self) -> dict[str, int]:
        """The rule counts since the last call (for metrics), then resets them."""
        taken = dict(self.counts)
        self.counts.clear()
        return taken

    def export_user(self, user_id: str) -> dict[str, Any] | None:
        """One user's state as JSON-able data (None for a user never seen)."""
        user = self.users.get(user_id)
        return None if user is None else user.to_json()

    def import_user(self, user_id: str, doc: dict[str, Any]) -> None:
        """Restores one user's state from ``export_user``."""
        self.users[user_id] = UserPreprocessing.from_json(doc)

    def forget_user(self, user_id: str) -> None:
        """Drops one user's state (a user seen again starts afresh)."""
        self.users.pop(user_id, None)

    def state_dict(self) -> dict[str, Any]:
        """Every user's state as JSON-able data (for checkpoints)."""
        return {"version": 1, "users": {u: s.to_json() for u, s in self.users.items()}}

    def load_state_dict(self, doc: dict[str, Any]) -> None:
        """Replaces all state with a ``state_dict``."""
        self.users = {u: UserPreprocessing.from_json(s) for u, s in doc["users"].items()}


def _finite(x: float) -> float | None:
    return None if x == -math.inf else x


def _infinite(x: float | None) -> float:
    return -math.inf if x is None else float(x)
