"""The SQL event log (table ``events``), which doubles as the outbox for JetStream.

Each accepted event is one row; ``published`` is false until JetStream has acknowledged it,
so the relay can publish anything a crash or a NATS outage left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import JSON

from freshrec.v1 import event_pb2


class Base(DeclarativeBase):
    """Tables owned by the ingestion service."""


class EventRow(Base):
    """One accepted event."""

    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    item_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[int] = mapped_column(SmallInteger)
    value: Mapped[float] = mapped_column(Float)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    session_id: Mapped[str] = mapped_column(String(128))
    context: Mapped[dict[str, str]] = mapped_column(JSON)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        # The outbox: a small partial index over the rows JetStream has not acknowledged.
        Index(
            "ix_events_unpublished",
            "seq",
            sqlite_where=text("published = 0"),
            postgresql_where=text("published = false"),
        ),
    )


@dataclass(frozen=True)
class StoredEvent:
    """An event as committed: its log position, id, subject type and wire payload, and its user
    (whose partition is part of the subject)."""

    seq: int
    event_id: str
    type: int
    payload: bytes
    user_id: str


class EventLog:
    """Repository over the ``events`` table; every method is one unit of work (call it off the loop)."""

    def __init__(self, sessions: sessionmaker) -> None:  # type: ignore[type-arg]
        self.sessions = sessions

    def insert_new(self, events: list[event_pb2.Event]) -> tuple[list[StoredEvent], int]:
        """Stores the events whose ids are new; returns them (in order) and the count of duplicates.

        ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` makes dedup atomic even with several
        ingestion replicas writing to one database.
        """
        if not events:
            return [], 0
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for event in events:
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            rows.append(
                {
                    "event_id": event.event_id,
                    "user_id": event.user_id,
                    "item_id": event.item_id,
                    "type": event.type,
                    "value": event.value,
                    "occurred_at": event.occurred_at.ToDatetime(tzinfo=UTC),
                    "session_id": event.session_id,
                    "context": dict(event.context),
                    "payload": event.SerializeToString(deterministic=True),
                    "received_at": now,
                    "published": False,
                }
            )
        with self.sessions.begin() as session:
            dialect = session.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            stmt = (
                insert(EventRow)
                .on_conflict_do_nothing(index_elements=["event_id"])
                .returning(EventRow.seq, EventRow.event_id, EventRow.type, EventRow.payload, EventRow.user_id)
            )
            result = session.execute(stmt, rows)
            stored = [StoredEvent(*row) for row in result.all()]
        stored.sort(key=lambda s: s.seq)
        return stored, len(events) - len(stored)

    def mark_published(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self.sessions.begin() as session:
            session.execute(update(EventRow).where(EventRow.seq.in_(seqs)).values(published=True))

    def unpublished(self, limit: int, after_seq: int = 0) -> list[StoredEvent]:
        """Committed events JetStream has not acknowledged yet, oldest first."""
        with self.sessions.begin() as session:
            rows = session.execute(
                select(EventRow.seq, EventRow.event_id, EventRow.type, EventRow.payload, EventRow.user_id)
                .where(EventRow.published == false(), EventRow.seq > after_seq)
                .order_by(EventRow.seq)
                .limit(limit)
            ).all()
        return [StoredEvent(*row) for row in rows]

    def count_unpublished(self) -> int:
        with self.sessions.begin() as session:
            return int(
                session.execute(select(func.count()).where(EventRow.published == false())).scalar_one()
            )
