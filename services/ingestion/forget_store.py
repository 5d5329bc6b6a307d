"""The SQL side of forgetting users: requests, each service's progress, tombstones.

Nothing here holds a user id: a request and a tombstone name the user by ``user_hash``, the
keyed hash ``services/ingestion/tombstones.py`` computes. Erasing the user's events from the
event log is ``forget_events`` below; on SQLite every connection has ``secure_delete`` on, so the
deleted rows are overwritten, and the write-ahead log is truncated afterwards
(``shared.db.scrub_wal``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Engine, String, Text, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from services.ingestion.store import Base, EventRow


class ForgetRequestRow(Base):
    """One forget request."""

    __tablename__ = "forget_requests"

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_hash: Mapped[str] = mapped_column(String(64), index=True)
    requested_at_us: Mapped[int] = mapped_column(BigInteger)
    #: Stream sequence of the task in FRESHREC_FORGET (0 until published), erased once done.
    task_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: When the last live replica reported done (0 while pending).
    completed_at_us: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ForgetProgressRow(Base):
    """One service replica's report that it did its part of a request."""

    __tablename__ = "forget_progress"

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    service: Mapped[str] = mapped_column(String(32), primary_key=True)
    replica: Mapped[str] = mapped_column(String(128), primary_key=True)
    done_at_us: Mapped[int] = mapped_column(BigInteger)
    detail: Mapped[str] = mapped_column(Text, server_default="")


class TombstoneRow(Base):
    """A forgotten user, by keyed hash, whose late events are dropped until ``expires_at_us``."""

    __tablename__ = "tombstones"

    user_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at_us: Mapped[int] = mapped_column(BigInteger)


@dataclass
class Progress:
    service: str
    replica: str
    done_at_us: int
    detail: str


@dataclass
class Request:
    request_id: str
    user_hash: str
    requested_at_us: int
    task_seq: int
    completed_at_us: int
    progress: list[Progress]


class ForgetStore:
    """Every method is one unit of work (call it off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    def open_request(self, user_hash: str) -> str | None:
        """The id of a pending (not completed) request for this user, if any."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(ForgetRequestRow.request_id)
                .where(ForgetRequestRow.user_hash == user_hash, ForgetRequestRow.completed_at_us == 0)
                .limit(1)
            ).scalar_one_or_none()

    def add_request(self, request_id: str, user_hash: str, now_us: int, tombstone_until_us: int) -> None:
        """Records a request and its tombstone in one transaction."""
        with self.engine.begin() as connection:
            connection.execute(
                self._insert(ForgetRequestRow).values(
                    request_id=request_id, user_hash=user_hash, requested_at_us=now_us, task_seq=0
                )
            )
            self._tombstone(connection, user_hash, tombstone_until_us)

    def _tombstone(self, connection: object, user_hash: str, until_us: int) -> None:
        stmt = self._insert(TombstoneRow).values(user_hash=user_hash, expires_at_us=until_us)
        stmt = stmt.on_conflict_do_update(index_elements=["user_hash"], set_={"expires_at_us": until_us})
        connection.execute(stmt)  # type: ignore[attr-defined]

    def set_task_seq(self, request_id: str, seq: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(ForgetRequestRow).where(ForgetRequestRow.request_id == request_id).values(task_seq=seq)
            )

    def drop_request(self, request_id: str) -> None:
        """Removes a request that could not be published (the caller is told to retry)."""
        with self.engine.begin() as connection:
            connection.execute(delete(ForgetRequestRow).where(ForgetRequestRow.request_id == request_id))

    def get(self, request_id: str) -> Request | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(ForgetRequestRow).where(ForgetRequestRow.request_id == request_id)
            ).first()
            if row is None:
                return None
            progress = [
                Progress(p.service, p.replica, p.done_at_us, p.detail)
                for p in connection.execute(
                    select(ForgetProgressRow)
                    .where(ForgetProgressRow.request_id == request_id)
                    .order_by(ForgetProgressRow.service, ForgetProgressRow.replica)
                )
            ]
        return Request(
            row.request_id, row.user_hash, row.requested_at_us, row.task_seq, row.completed_at_us, progress
        )

    def pending(self) -> list[str]:
        """The ids of published requests not completed yet."""
        with self.engine.connect() as connection:
            return list(
                connection.execute(
                    select(ForgetRequestRow.request_id).where(
                        ForgetRequestRow.completed_at_us == 0, ForgetRequestRow.task_seq > 0
                    )
                ).scalars()
            )

    def record(self, request_id: str, service: str, replica: str, done_at_us: int, detail: str) -> bool:
        """Records a report (a repeat changes nothing); False when the request is unknown."""
        with self.engine.begin() as connection:
            known = connection.execute(
                select(ForgetRequestRow.request_id).where(ForgetRequestRow.request_id == request_id)
            ).first()
            if known is None:
                return False
            connection.execute(
                self._insert(ForgetProgressRow)
                .values(
                    request_id=request_id,
                    service=service,
                    replica=replica,
                    done_at_us=done_at_us,
                    detail=detail,
                )
                .on_conflict_do_nothing()
            )
        return True

    def complete(self, request_id: str, at_us: int) -> bool:
        """Marks a request completed; False when it already was."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(ForgetRequestRow)
                .where(ForgetRequestRow.request_id == request_id, ForgetRequestRow.completed_at_us == 0)
                .values(completed_at_us=at_us)
            )
            return bool(result.rowcount)

    # -- tombstones -----------------------------------------------------------------------
    def tombstone(self, user_hash: str, until_us: int) -> None:
        with self.engine.begin() as connection:
            self._tombstone(connection, user_hash, until_us)

    def tombstones(self, now_us: int) -> set[str]:
        with self.engine.connect() as connection:
            return set(
                connection.execute(
                    select(TombstoneRow.user_hash).where(TombstoneRow.expires_at_us > now_us)
                ).scalars()
            )

    def expire_tombstones(self, now_us: int) -> int:
        with self.engine.begin() as connection:
            result = connection.execute(delete(TombstoneRow).where(TombstoneRow.expires_at_us <= now_us))
            return int(result.rowcount or 0)

    # -- erasing ----------------------------------------------------------------------------
    def forget_events(self, user_id: str) -> int:
        """Deletes the user's rows from the event log (published or not); returns how many."""
        with self.engine.begin() as connection:
            result = connection.execute(delete(EventRow).where(EventRow.user_id == user_id))
            return int(result.rowcount or 0)
