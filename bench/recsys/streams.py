"""Event streams of several kinds for the live benchmark (``bench/live.py``).

Each loader returns a :class:`Stream`: time-ordered interactions and a catalogue, as a client
would send them. The public data sets are read from ``../shared/data`` (each overridable by an
environment variable) and never copied; the synthetic streams come from :class:`SyntheticSpec`,
a generator with known tastes, drift, bursts and heavy-tailed users.

Every stream keeps a user's *first* interaction with an item only: a re-rating, a second tag of
the same artist or a repeated view inside a session is not a new discovery, and every ranker here
(freshrec included) leaves out what the user already touched.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared/data"
ML100K = Path(os.environ.get("FRESHREC_ML100K", DATA / "ml-100k"))
LASTFM = Path(os.environ.get("FRESHREC_LASTFM", DATA / "lastfm-2k"))
DIGINETICA = Path(os.environ.get("FRESHREC_DIGINETICA", DATA / "diginetica-sample"))

#: Event types by name, as the proto spells them.
RATE, CLICK, VIEW = "EVENT_TYPE_RATE", "EVENT_TYPE_CLICK", "EVENT_TYPE_VIEW"


@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    time: float  # seconds since the epoch
    type: str = CLICK
    value: float = 0.0


@dataclass(frozen=True)
class CatalogueItem:
    item_id: str
    title: str = ""
    categories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    created_at: float = 0.0  # 0: unknown


@dataclass
class Stream:
    name: str
    description: str
    events: list[Interaction]
    items: list[CatalogueItem]
    #: Knobs of a synthetic stream (empty for a public data set).
    spec: dict[str, object] = field(default_factory=dict)

    @property
    def span_days(self) -> float:
        return (self.events[-1].time - self.events[0].time) / 86400 if self.events else 0.0

    def summary(self) -> dict[str, object]:
        users: dict[str, int] = {}
        for e in self.events:
            users[e.user] = users.get(e.user, 0) + 1
        return {
            "events": len(self.events),
            "users": len(users),
            "items_in_events": len({e.item for e in self.events}),
            "catalogue": len(self.items),
            "span_days": round(self.span_days, 2),
            "max_user_events": max(users.values()) if users else 0,
            "distinct_times": len({e.time for e in self.events}),
        }


def first_touches(events: list[Interaction]) -> list[Interaction]:
    """Keeps each (user, item)'s first interaction, in order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for e in events:
        key = (e.user, e.item)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


# -- public data sets -----------------------------------------------------------------------------


def movielens_100k(folder: Path = ML100K) -> Stream:
    """Ratings as RATE events in (time, user, item) order; genres as categories, year as a tag."""
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)
    order = np.lexsort((raw[:, 1], raw[:, 0], raw[:, 3]))
    events = [
        Interaction(str(raw[k, 0]), str(raw[k, 1]), float(raw[k, 3]), RATE, float(raw[k, 2])) for k in order
    ]
    genres = [line.split("|")[0] for line in (folder / "u.genre").read_text().splitlines() if line]
    items = []
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        flags = parts[5:24]
        year = parts[2][-4:] if parts[2] else ""
        items.append(
            CatalogueItem(
                item_id=parts[0],
                title=parts[1],
                categories=tuple(g for g, f in zip(genres, flags, strict=False) if f == "1"),
                tags=(f"year-{year}",) if year else (),
            )
        )
    return Stream("ml-100k", "MovieLens-100K ratings (movies, 7 months, second resolution)", events, items)


def lastfm_2k(folder: Path = LASTFM) -> Stream:
    """Tag assignments as CLICK events on the artist, one per (user, artist), dated to the day."""
    rows = []
    with (folder / "user_taggedartists.dat").open(encoding="latin-1") as f:
        next(f)
        for line in f:
            user, artist, _tag, day, month, year = line.rstrip("\n").split("\t")
            when = datetime(int(year), int(month), int(day), tzinfo=UTC).timestamp()
            rows.append((when, int(user), int(artist)))
    rows.sort()
    events = first_touches([Interaction(str(u), str(a), t, CLICK) for t, u, a in rows])
    items = []
    with (folder / "artists.dat").open(encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2:
                items.append(CatalogueItem(item_id=parts[0], title=parts[1]))
    known = {i.item_id for i in items}
    items += [CatalogueItem(item_id=a) for a in sorted({e.item for e in events} - known)]
    return Stream("lastfm-2k", "Last.fm artist tagging (music, day resolution, 17k artists)", events, items)


def diginetica(folder: Path = DIGINETICA) -> Stream:
    """Anonymous sessions (the session is the user) of item views, ordered by (date, session, time)."""
    rows = []
    with (folder / "sample_train-item-views.csv").open(newline="") as f:
        for rec in csv.DictReader(f, delimiter=";"):
            day = datetime.fromisoformat(rec["eventdate"]).replace(tzinfo=UTC).timestamp()
            rows.append((day, int(rec["session_id"]), int(rec["timeframe"]), rec["item_id"]))
    rows.sort()
    events = first_touches([Interaction(f"s{s}", item, day + ms / 1000.0, VIEW) for day, s, ms, item in rows])
    items = [CatalogueItem(item_id=i) for i in sorted({e.item for e in events})]
    return Stream(
        "diginetica", "DIGINETICA anonymous shopping sessions (short, items mostly seen once)", events, items
    )


# -- synthetic ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """A world with known tastes: users prefer a few categories, items have Zipf popularity inside
    theirs, some items lead on to follow-ups (a sequence to learn), new items arrive with a burst of
    attention, and tastes drift (``abrupt``: every user's categories move at a few instants;
    ``gradual``: they slide over the whole span)."""

    name: str
    items: int = 1_000
    users: int = 2_000
    events: int = 40_000
    categories: int = 20
    span_days: float = 1.0
    end: str = "2026-01-01T00:00:00+00:00"
    max_user_events: int = 5_000
    #: Pareto shape of events per user (smaller: heavier tail).
    activity_shape: float = 1.1
    session_mean_events: float = 12.0
    session_gap_s: float = 20.0
    drift: str = "abrupt"  # abrupt | gradual | none
    drift_points: int = 3
    #: Probability that the next event in a session follows on from the previous item.
    sequential: float = 0.35
    zipf: float = 1.0
    #: Share of the catalogue created during the stream (the rest exists at its start).
    new_item_share: float = 0.2
    new_item_boost: float = 20.0
    #: Probability of an event outside the user's tastes.
    noise: float = 0.1
    seed: int = 0


def synthetic(spec: SyntheticSpec) -> Stream:
    rng = np.random.default_rng(spec.seed)
    end = datetime.fromisoformat(spec.end).timestamp()
    span = spec.span_days * 86400.0
    start = end - span
    C, N = spec.categories, spec.items
    category = rng.integers(0, C, size=N)
    created = np.full(N, start - 86400.0)
    fresh = rng.random(N) < spec.new_item_share
    created[fresh] = start + rng.random(int(fresh.sum())) * span
    members_of = [np.flatnonzero(category == c) for c in range(C)]
    # Zipf popularity inside each category (a random order of its items), as cumulative weights.
    cumulative = []
    for members in members_of:
        ranks = rng.permutation(len(members)) + 1
        w = 1.0 / ranks.astype(float) ** spec.zipf
        cumulative.append(np.cumsum(w) / w.sum())
    # New items of each category by creation time (they draw a burst of attention when they arrive).
    new_of = [m[np.argsort(created[m])] for m in members_of]
    new_of = [m[created[m] > start] for m in new_of]
    new_times = [created[m] for m in new_of]
    burst_s = span / 20.0
    # Follow-ups: each item leads on to up to three others of its category.
    follow = [
        rng.choice(members_of[category[i]], size=min(3, len(members_of[category[i]])), replace=False)
        for i in range(N)
    ]
    # Heavy-tailed activity: Pareto, capped, scaled to the wanted total.
    raw = rng.pareto(spec.activity_shape, spec.users) + 1.0
    counts = np.clip(np.round(raw / raw.sum() * spec.events), 1, spec.max_user_events).astype(int)
    tastes = [rng.choice(C, size=int(rng.integers(1, 4)), replace=False) for _ in range(spec.users)]
    drift_at = np.sort(start + rng.random(spec.drift_points) * span)
    shifts = rng.integers(1, C, size=max(1, spec.drift_points))

    def moved(t: float) -> int:
        """How far tastes have moved (in categories) at time t."""
        if spec.drift == "abrupt":
            return int(shifts[: int(np.searchsorted(drift_at, t))].sum()) % C
        if spec.drift == "gradual":  # a growing share of events follows the moved tastes
            return int(shifts[0]) if rng.random() < (t - start) / span else 0
        return 0

    def pick(taste: np.ndarray, t: float, taken: set[int], last: int) -> int:
        if last >= 0 and rng.random() < spec.sequential:
            options = [int(j) for j in follow[last] if int(j) not in taken and created[j] <= t]
            if options:
                return options[int(rng.integers(len(options)))]
        for attempt in range(40):
            anywhere = attempt >= 20 or rng.random() < spec.noise
            c = (
                int(rng.integers(C))
                if anywhere
                else int((taste[int(rng.integers(len(taste)))] + moved(t)) % C)
            )
            if rng.random() < 0.15:  # something new in the category, if it has arrived lately
                lo, hi = np.searchsorted(new_times[c], [t - burst_s, t], side="right")
                if hi > lo:
                    j = int(new_of[c][int(rng.integers(lo, hi))])
                    if j not in taken:
                        return j
            j = int(members_of[c][int(np.searchsorted(cumulative[c], rng.random()))])
            if j not in taken and created[j] <= t:
                return j
        return -1

    events: list[Interaction] = []
    for u in range(spec.users):
        n = int(counts[u])
        taken: set[int] = set()
        made = 0
        while made < n:
            session = min(n - made, max(1, int(rng.geometric(1.0 / spec.session_mean_events))))
            t = start + rng.random() * span
            last = -1
            for _ in range(session):
                t = min(end, t + rng.exponential(spec.session_gap_s))
                j = pick(tastes[u], t, taken, last)
                made += 1
                if j < 0:
                    continue
                taken.add(j)
                last = j
                events.append(Interaction(f"u{u}", f"i{j}", round(t, 3), CLICK))
    events.sort(key=lambda e: (e.time, e.user, e.item))
    items = [
        CatalogueItem(
            item_id=f"i{j}",
            title=f"item {j}",
            categories=(f"c{category[j]}",),
            created_at=float(max(created[j], start - 86400.0)),
        )
        for j in range(N)
    ]
    knobs = {k: getattr(spec, k) for k in spec.__dataclass_fields__ if k != "name"}
    described = (
        f"synthetic: {N:,} items, {spec.users:,} users, {spec.span_days:g} days, {spec.drift} drift, "
        f"users up to {spec.max_user_events:,} events"
    )
    return Stream(spec.name, described, events, items, knobs)


SYNTHETIC = {
    "synth-shop": SyntheticSpec(
        name="synth-shop",
        items=1_000,
        users=3_000,
        events=40_000,
        span_days=1.0,
        max_user_events=300,
        drift="abrupt",
        seed=1,
    ),
    "synth-archive": SyntheticSpec(
        name="synth-archive",
        items=100_000,
        users=3_000,
        events=80_000,
        categories=200,
        activity_shape=0.8,
        span_days=20 * 365.0,
        drift="gradual",
        session_gap_s=90.0,
        seed=2,
    ),
}

LOADERS: dict[str, Callable[[], Stream]] = {
    "ml-100k": movielens_100k,
    "lastfm-2k": lastfm_2k,
    "diginetica": diginetica,
    **{name: (lambda spec=spec: synthetic(spec)) for name, spec in SYNTHETIC.items()},
}


def load(name: str) -> Stream:
    try:
        return LOADERS[name]()
    except KeyError:
        raise SystemExit(f"unknown stream {name!r}; choose from {', '.join(LOADERS)}") from None


def log2_discount(rank: int) -> float:
    return 1.0 / math.log2(rank + 2)
