"""Reading MovieLens-style files for pre-training (and the benchmarks).

Ratings: ``u.data`` (tab-separated ``user item rating timestamp``, no header) or a
``ratings.csv`` with a ``userId,movieId,rating,timestamp`` header. Catalogue: ``u.item``
(pipe-separated, genre flags named by ``u.genre``) or ``movies.csv`` (``movieId,title,genres``).
Every rating is an implicit interaction, as in the benchmark protocols.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from freshrec.v1 import event_pb2, item_pb2

_YEAR = re.compile(r"(\d{4})\s*$")


@dataclass(frozen=True)
class Rating:
    user: str
    item: str
    rating: float
    time: float


def read_ratings(path: Path) -> list[Rating]:
    """Ratings in file order; ids as strings."""
    path = Path(path)
    with path.open(newline="", encoding="latin-1") as f:
        first = f.readline()
        f.seek(0)
        if "\t" in first:
            return [
                Rating(u, i, float(r), float(t))
                for u, i, r, t in (line.split("\t")[:4] for line in f if line.strip())
            ]
        sniffed = csv.Sniffer().sniff(first) if first.strip() else csv.excel
        reader = csv.reader(f, sniffed)
        header = [h.strip().lower() for h in next(reader)]
        try:
            u, i, r, t = (header.index(n) for n in ("userid", "movieid", "rating", "timestamp"))
        except ValueError as exc:
            raise ValueError(
                f"{path}: expected a userId,movieId,rating,timestamp header, got {header}"
            ) from exc
        return [Rating(row[u], row[i], float(row[r]), float(row[t])) for row in reader if row]


def time_ordered(ratings: list[Rating]) -> list[Rating]:
    """Sorted by (time, user, item): the order protocol B streams events in."""
    return sorted(ratings, key=lambda x: (x.time, _numeric(x.user), _numeric(x.item)))


def _numeric(value: str) -> tuple[int, str]:
    return (int(value), "") if value.isdigit() else (0, value)


def events(ratings: list[Rating], first_sequence: int = 0) -> list[tuple[int, event_pb2.Event]]:
    """Ratings as ``EVENT_TYPE_RATE`` events numbered from ``first_sequence`` (0: not from a stream)."""
    return [(first_sequence + n if first_sequence else 0, to_event(r)) for n, r in enumerate(ratings)]


def to_event(rating: Rating, event_id: str = "") -> event_pb2.Event:
    e = event_pb2.Event(
        event_id=event_id,
        user_id=rating.user,
        item_id=rating.item,
        type=event_pb2.EVENT_TYPE_RATE,
        value=rating.rating,
    )
    e.occurred_at.FromNanoseconds(int(rating.time * 1e9))
    return e


def read_items(path: Path) -> list[item_pb2.Item]:
    """Catalogue entries: genres as categories, release year and decade as tags, the title as text."""
    path = Path(path)
    items: list[item_pb2.Item] = []
    if path.name == "u.item" or path.suffix == ".item":
        genre_file = path.with_name("u.genre")
        genres = [
            line.split("|")[0] for line in genre_file.read_text(encoding="latin-1").splitlines() if line
        ]
        for line in path.read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            parts = line.split("|")
            flags = parts[5:]
            names = [genres[k] for k, flag in enumerate(flags) if flag.strip() == "1" and k < len(genres)]
            year = parts[2][-4:] if parts[2][-4:].isdigit() else ""
            items.append(_item(parts[0], parts[1], names, year))
        return items
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            title = row.get("title", "")
            match = _YEAR.search(title.rstrip(") ").rstrip("(")) or re.search(r"\((\d{4})\)", title)
            year = match.group(1) if match else ""
            genres = [g for g in row.get("genres", "").split("|") if g and g != "(no genres listed)"]
            items.append(_item(row["movieId"], title, genres, year))
    return items


def _item(item_id: str, title: str, genres: list[str], year: str) -> item_pb2.Item:
    tags = [f"year={year}", f"decade={year[:3]}0s"] if year else []
    return item_pb2.Item(item_id=item_id, title=title, categories=genres, tags=tags)


def item_text(item: item_pb2.Item) -> str:
    """What the sentence encoder reads: title, then description."""
    return f"{item.title}. {item.description}".strip(" .") if item.description else item.title
