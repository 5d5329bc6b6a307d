"""Reading MovieLens-style rating files into time-ordered events.

Three layouts are recognised from the file itself:

- ML-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, no header;
- ML-1M ``ratings.dat``: ``user::item::rating::timestamp``, no header;
- ``ratings.csv`` (ML-latest, ML-25M): a header naming ``userId,movieId,rating,timestamp``
  (``user_id``/``item_id`` spellings are accepted too).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from freshrec.v1 import event_pb2

USER_COLUMNS = ("userid", "user_id", "user")
ITEM_COLUMNS = ("movieid", "movie_id", "itemid", "item_id", "item")
RATING_COLUMNS = ("rating", "value", "score")
TIME_COLUMNS = ("timestamp", "time", "ts")


class FormatError(ValueError):
    """The file is not a MovieLens-style rating file; the message says which line and why."""


@dataclass(frozen=True, order=True)
class Rating:
    """One rating; ordering is (timestamp, user, item), the replay order."""

    timestamp: int
    user: str
    item: str
    rating: float


def read_ratings(path: Path) -> list[Rating]:
    """Every rating in the file, sorted by (timestamp, user, item)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist or is not a file")
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
        f.seek(0)
        if not first.strip():
            raise FormatError(f"{path} is empty")
        if "\t" in first:
            ratings = list(_split_lines(f, "\t", path))
        elif "::" in first:
            ratings = list(_split_lines(f, "::", path))
        elif "," in first:
            ratings = list(_csv(f, path))
        else:
            raise FormatError(
                f"{path}: cannot tell the layout from its first line {first.strip()[:60]!r}; expected "
                "u.data (tab-separated), ratings.dat ('::') or ratings.csv (comma-separated with a header)"
            )
    ratings.sort()
    return ratings


def _split_lines(lines: Iterable[str], sep: str, path: Path) -> Iterator[Rating]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split(sep)
        if len(parts) < 4:
            raise FormatError(f"{path}:{number}: expected user{sep}item{sep}rating{sep}timestamp")
        yield _rating(parts[0], parts[1], parts[2], parts[3], path, number)


def _csv(f: Iterable[str], path: Path) -> Iterator[Rating]:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader)]
    try:
        columns = [
            _column(header, label, names)
            for label, names in (
                ("user", USER_COLUMNS),
                ("item", ITEM_COLUMNS),
                ("rating", RATING_COLUMNS),
                ("timestamp", TIME_COLUMNS),
            )
        ]
    except KeyError as exc:
        raise FormatError(
            f"{path}: the header {','.join(header)!r} has no {exc.args[0]} column; "
            "expected userId,movieId,rating,timestamp"
        ) from None
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            user, item, rating, ts = (row[c] for c in columns)
        except IndexError:
            raise FormatError(f"{path}:{number}: too few columns") from None
        yield _rating(user, item, rating, ts, path, number)


def _column(header: list[str], label: str, names: tuple[str, ...]) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise KeyError(label)


def _rating(user: str, item: str, rating: str, ts: str, path: Path, number: int) -> Rating:
    try:
        return Rating(timestamp=int(float(ts)), user=user.strip(), item=item.strip(), rating=float(rating))
    except ValueError:
        raise FormatError(f"{path}:{number}: rating {rating!r} or timestamp {ts!r} is not a number") from None


def to_event(rating: Rating, shift_s: float = 0.0, prefix: str = "") -> event_pb2.Event:
    """A RATE event; the id is derived from (user, item, time) so a second replay deduplicates."""
    event = event_pb2.Event(
        event_id=f"{prefix}ml-{rating.user}-{rating.item}-{rating.timestamp}",
        user_id=f"{prefix}{rating.user}",
        item_id=f"{prefix}{rating.item}",
        type=event_pb2.EVENT_TYPE_RATE,
        value=rating.rating,
    )
    event.occurred_at.FromNanoseconds(int((rating.timestamp + shift_s) * 1e9))
    return event
