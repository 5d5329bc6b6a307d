"""The SQL event log (table ``events``), which doubles as the outbox for JetStream.

Each accepted event is one row; ``published`` is false until JetStream has acknowledged it,
and ``owner`` names the ingestion replica whose relay is responsible for publishing it.
Replicas sharing one database register in ``ingestion_replicas`` and renew a heartbeat; the
unpublished rows of a replica that went silent are taken over by a live one.

The insert is the hot path. It is one multi-row ``INSERT ... ON CONFLICT (event_id) DO NOTHING
RETURNING seq, event_id`` per chunk, built with SQLAlchemy Core and compiled once per chunk size
for the engine's dialect (SQLite and PostgreSQL alike); values always travel as bound
parameters. Executing the compiled statement directly skips SQLAlchemy's per-row parameter
processing, which otherwise costs more than SQLite's own work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    bindparam,
    delete,
    false,
    func,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Tables owned by the ingestion service."""


class EventRow(Base):
    """One accepted event."""

    __tablename__ = "events"

    #: Position in the log: the order events were committed in, and the order the relay publishes.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    user_id: Mapped[str] = mapped_column(String(128))
    item_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[int] = mapped_column(SmallInteger)
    value: Mapped[float] = mapped_column(Float)
    #: Event time, microseconds since the Unix epoch (UTC).
    occurred_at_us: Mapped[int] = mapped_column(BigInteger)
    #: When ingestion accepted the event, microseconds since the Unix epoch; no copy of the event
    #: can be in JetStream from before this moment (the outbox reconciliation relies on it).
    received_at_us: Mapped[int] = mapped_column(BigInteger)
    #: The event as published: protobuf ``freshrec.v1.Event`` bytes (with the derived id, if any).
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    published: Mapped[bool] = mapped_column(Boolean, server_default=false())
    #: Id of the replica (incarnation) whose relay publishes this row if the request could not.
    owner: Mapped[str] = mapped_column(String(32), server_default="")

    __table_args__ = (
        # The outbox: a small partial index over the rows JetStream has not acknowledged, per owner.
        Index(
            "ix_events_outbox",
            "owner",
            "seq",
            sqlite_where=text("published = 0"),
            postgresql_where=text("published = false"),
        ),
    )


class ReplicaRow(Base):
    """One running (or crashed) ingestion process sharing this database."""

    __tablename__ = "ingestion_replicas"

    #: A fresh id per process start (incarnation).
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The configured replica name; a new incarnation takes over the outbox of older ones.
    name: Mapped[str] = mapped_column(String(128))
    started_at_us: Mapped[int] = mapped_column(BigInteger)
    heartbeat_at_us: Mapped[int] = mapped_column(BigInteger)


#: A validated event ready to insert, a plain tuple in ``INSERT_COLUMNS`` order (one per event on
#: the hot path, so no NamedTuple): event_id, user_id, item_id, type, value, occurred_at_us,
#: received_at_us, payload, owner.
NewEvent = tuple[str, str, str, int, float, int, int, bytes, str]
INSERT_COLUMNS = (
    "event_id",
    "user_id",
    "item_id",
    "type",
    "value",
    "occurred_at_us",
    "received_at_us",
    "payload",
    "owner",
)


class OutboxEvent(NamedTuple):
    """A committed event as the publisher needs it (the user picks the subject's partition)."""

    seq: int
    event_id: str
    type: int
    user_id: str
    payload: bytes
    received_at_us: int


_new_tuple = tuple.__new__

#: Rows per INSERT statement: 9 columns x 500 rows stays far below SQLite's 32,766 parameters.
#: A group is cut into chunks of these sizes only (largest first), so a handful of statements is
#: compiled once, at start, instead of one per odd batch size.
CHUNK_SIZES = (500, 100, 20, 5, 1)

_events = cast(Table, EventRow.__table__)
_replicas = cast(Table, ReplicaRow.__table__)


def _chunks(rows: Sequence[NewEvent]) -> Iterable[Sequence[NewEvent]]:
    start = 0
    for size in CHUNK_SIZES:
        while len(rows) - start >= size:
            yield rows[start : start + size]
            start += size


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers: [1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


class EventLog:
    """Repository over the ingestion tables; every method is one unit of work (call it off the loop)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._insert_sql: dict[int, tuple[str, tuple[str, ...] | None]] = {}
        self._mark_range = (
            update(_events)
            .where(
                _events.c.seq.between(bindparam("lo"), bindparam("hi")),
                _events.c.published == false(),
            )
            .values(published=true())
        )

    # -- the hot path ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Compiles the insert statements (a 500-row insert takes a while to compile)."""
        for size in CHUNK_SIZES:
            self._compiled_insert(size)

    def _compiled_insert(self, rows: int) -> tuple[str, tuple[str, ...] | None]:
        """The multi-row insert for ``rows`` rows, compiled for this dialect (cached)."""
        cached = self._insert_sql.get(rows)
        if cached is None:
            values: list[dict[str, Any]] = [
                {c: bindparam(f"{c}_{i}") for c in INSERT_COLUMNS} for i in range(rows)
            ]
            insert = postgresql.insert if self.dialect.name == "postgresql" else sqlite.insert
            stmt = (
                insert(_events)
                .values(values)
                .on_conflict_do_nothing(index_elements=["event_id"])
                .returning(_events.c.seq, _events.c.event_id)
            )
            compiled = stmt.compile(dialect=self.dialect)
            order = tuple(compiled.positiontup) if compiled.positiontup is not None else None
            natural = tuple(f"{c}_{i}" for i in range(rows) for c in INSERT_COLUMNS)
            if order is not None and order != natural:
                raise RuntimeError("unexpected parameter order in the compiled insert")
            cached = (compiled.string, order)
            self._insert_sql[rows] = cached
        return cached

    def _insert_chunk(self, connection: Any, chunk: Sequence[NewEvent]) -> list[tuple[int, str]]:
        sql, positional = self._compiled_insert(len(chunk))
        params: Any
        if positional is not None:
            params = tuple(chain.from_iterable(chunk))
        else:
            params = {
                f"{c}_{i}": v for i, row in enumerate(chunk) for c, v in zip(INSERT_COLUMNS, row, strict=True)
            }
        return [(int(seq), event_id) for seq, event_id in connection.exec_driver_sql(sql, params)]

    def commit(
        self,
        groups: Sequence[Sequence[NewEvent]],
        published: Sequence[int] = (),
        heartbeat: tuple[str, str, int] | None = None,
    ) -> tuple[list[list[OutboxEvent]], bool]:
        """One transaction: inserts each group's new events, marks ``published`` rows, renews the
        heartbeat ``(replica id, name, now_us)``.

        Returns, per group, the events that were new (in log order; the rest of the group were
        duplicates of events already in the log: ``event_id`` is unique, so this holds even with
        several replicas writing to one database), and whether the replica had to register again
        because its row was gone (another replica took it for dead).
        """
        stored: list[list[OutboxEvent]] = []
        registered_again = False
        with self.engine.begin() as connection:
            for group in groups:
                new: list[OutboxEvent] = []
                for chunk in _chunks(group):
                    inserted = self._insert_chunk(connection, chunk)
                    if inserted:
                        by_id = {row[0]: row for row in chunk}
                        for seq, event_id in inserted:
                            row = by_id[event_id]
                            # OutboxEvent(seq, event_id, type, user_id, payload, received_at_us),
                            # minus the NamedTuple constructor's extra call: this runs per event.
                            new.append(
                                _new_tuple(OutboxEvent, (seq, event_id, row[3], row[1], row[7], row[6]))
                            )
                new.sort()
                stored.append(new)
            if published:
                self._mark(connection, published)
            if heartbeat is not None:
                replica_id, name, now_us = heartbeat
                renewed = connection.execute(
                    update(_replicas).where(_replicas.c.id == replica_id).values(heartbeat_at_us=now_us)
                )
                if not renewed.rowcount:
                    connection.execute(
                        _replicas.insert().values(
                            id=replica_id, name=name, started_at_us=now_us, heartbeat_at_us=now_us
                        )
                    )
                    registered_again = True
        return stored, registered_again

    def _mark(self, connection: Any, seqs: Iterable[int]) -> None:
        ranges = [{"lo": lo, "hi": hi} for lo, hi in seq_ranges(seqs)]
        if ranges:
            connection.execute(self._mark_range, ranges)

    # -- the outbox -----------------------------------------------------------------------------

    def mark_published(self, seqs: Iterable[int]) -> None:
        with self.engine.begin() as connection:
            self._mark(connection, seqs)

    def mark_published_ids(self, event_ids: Sequence[str]) -> int:
        """Marks the unpublished events with these ids published (found in the stream); returns how many."""
        if not event_ids:
            return 0
        with self.engine.begin() as connection:
            result = connection.execute(
                update(_events)
                .where(_events.c.event_id.in_(list(event_ids)), _events.c.published == false())
                .values(published=true())
            )
            return int(result.rowcount or 0)

    def unpublished(
        self, owner: str, limit: int, after_seq: int = 0, received_before_us: int | None = None
    ) -> list[OutboxEvent]:
        """Committed events of ``owner`` JetStream has not acknowledged yet, oldest first."""
        stmt = (
            select(
                _events.c.seq,
                _events.c.event_id,
                _events.c.type,
                _events.c.user_id,
                _events.c.payload,
                _events.c.received_at_us,
            )
            .where(_events.c.owner == owner, _events.c.published == false(), _events.c.seq > after_seq)
            .order_by(_events.c.seq)
            .limit(limit)
        )
        if received_before_us is not None:
            stmt = stmt.where(_events.c.received_at_us < received_before_us)
        with self.engine.connect() as connection:
            return [OutboxEvent(*row) for row in connection.execute(stmt)]

    def count_unpublished(self, owner: str | None = None) -> int:
        stmt = select(func.count()).select_from(_events).where(_events.c.published == false())
        if owner is not None:
            stmt = stmt.where(_events.c.owner == owner)
        with self.engine.connect() as connection:
            return int(connection.execute(stmt).scalar_one())

    # -- retention ------------------------------------------------------------------------------

    def expire(self, received_before_us: int, batch: int = 1000) -> tuple[int, int]:
        """Deletes the events accepted before ``received_before_us``, oldest first by position;
        returns (deleted, of which unpublished).

        It walks the log a batch at a time from its oldest position (the primary key, so the hot
        path's table needs no index on the time) and stops after the first batch holding an event
        young enough to keep. Acceptance times follow positions to within a commit's delay, so an
        old event committed after a younger one beyond that batch goes on the next sweep.
        """
        deleted = unpublished = 0
        while True:
            with self.engine.begin() as connection:
                rows = connection.execute(
                    select(_events.c.seq, _events.c.received_at_us, _events.c.published)
                    .order_by(_events.c.seq)
                    .limit(batch)
                ).all()
                old = [published for _, received, published in rows if received < received_before_us]
                if old:
                    connection.execute(
                        delete(_events).where(
                            _events.c.seq <= rows[-1][0], _events.c.received_at_us < received_before_us
                        )
                    )
                    deleted += len(old)
                    unpublished += old.count(False)
                young = len(old) < len(rows)
            if young or len(rows) < batch:
                return deleted, unpublished

    # -- replicas -------------------------------------------------------------------------------

    def register_replica(self, replica_id: str, name: str, now_us: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                _replicas.insert().values(
                    id=replica_id, name=name, started_at_us=now_us, heartbeat_at_us=now_us
                )
            )

    def adopt_orphans(
        self, replica_id: str, name: str, stale_before_us: int, *, everything: bool = False
    ) -> int:
        """Takes over the unpublished rows of replicas that are gone: earlier incarnations of
        ``name``, replicas silent since ``stale_before_us`` or stopped, and rows from before replicas
        were tracked (owner ``''``); with ``everything`` (at start) also rows whose owner is not
        registered at all. Returns how many rows were adopted.

        Reads first and writes only when there is something to take, through the outbox index
        (owner, seq), so the periodic check costs nothing while every replica is alive.
        """
        with self.engine.connect() as connection:
            gone = [
                row_id
                for (row_id,) in connection.execute(
                    select(_replicas.c.id).where(
                        _replicas.c.id != replica_id,
                        (_replicas.c.name == name) | (_replicas.c.heartbeat_at_us < stale_before_us),
                    )
                )
            ]
            owners = [""]
            if everything:
                # O(outbox): only at start.
                registered = {row_id for (row_id,) in connection.execute(select(_replicas.c.id))}
                owners += [
                    owner
                    for (owner,) in connection.execute(
                        select(_events.c.owner).where(_events.c.published == false()).distinct()
                    )
                    if owner not in registered and owner != replica_id
                ]
            orphaned = connection.execute(
                select(_events.c.seq)
                .where(_events.c.owner.in_(owners), _events.c.published == false())
                .limit(1)
            ).first()
        if not gone and orphaned is None:
            return 0
        with self.engine.begin() as connection:
            result = connection.execute(
                update(_events)
                .where(_events.c.owner.in_([*owners, *gone]), _events.c.published == false())
                .values(owner=replica_id)
            )
            if gone:
                connection.execute(delete(_replicas).where(_replicas.c.id.in_(gone)))
            return int(result.rowcount or 0)

    def deregister_replica(self, replica_id: str) -> None:
        """A clean stop: the replica counts as gone at once, so its unpublished rows (if any) are
        taken over by the next incarnation or another replica without waiting for the lease."""
        with self.engine.begin() as connection:
            connection.execute(
                update(_replicas).where(_replicas.c.id == replica_id).values(heartbeat_at_us=0)
            )
