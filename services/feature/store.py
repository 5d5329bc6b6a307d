"""The feature service's SQL tables: persisted features, stream positions, the catalogue.

Feature rows are keyed by replica as well as by id, so several partitioned replicas can share
one database (each keeps and rebuilds only its own rows). Every method is one unit of work;
call them off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    cast,
    delete,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from freshrec.v1 import item_pb2
from services.feature.state import FeatureState, Watermark


class Base(DeclarativeBase):
    """Tables owned by the feature service."""


class UserRow(Base):
    """One user's features and preprocessing state, as one replica keeps them."""

    __tablename__ = "feature_users"
    replica: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)


class ItemStatsRow(Base):
    """One item's popularity and counts, as one replica computed them from its users' events."""

    __tablename__ = "feature_items"
    replica: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)


class ConsumerPosition(Base):
    """The last stream sequence whose effect is in these tables (committed with that effect)."""

    __tablename__ = "feature_consumer_position"
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream_sequence: Mapped[int] = mapped_column(BigInteger)
    event_time: Mapped[float] = mapped_column(Float)


class CatalogueItem(Base):
    """One catalogue entry; ``published`` is false until FRESHREC_CATALOG has this revision."""

    __tablename__ = "catalog_items"
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    categories: Mapped[list[str]] = mapped_column(JSON)
    tags: Mapped[list[str]] = mapped_column(JSON)
    attributes: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revision: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    published: Mapped[bool] = mapped_column(Boolean, server_default=false())
    #: Served nowhere while true (the entry stays, and may come back).
    hidden: Mapped[bool] = mapped_column(Boolean, server_default=false())
    #: Served nowhere from this time on (None: forever).
    available_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: A tombstone: DeleteItems removed the entry; only its id and revision remain (revisions stay
    #: monotonic across a later re-upsert) until the outbox has published it.
    deleted: Mapped[bool] = mapped_column(Boolean, server_default=false())

    __table_args__ = (
        # The catalogue outbox: a small partial index over revisions not yet published.
        Index(
            "ix_catalog_items_unpublished",
            "updated_at",
            sqlite_where=text("published = 0"),
            postgresql_where=text("published = false"),
        ),
    )

    def to_proto(self) -> item_pb2.Item:
        if self.deleted:
            return item_pb2.Item(item_id=self.item_id, deleted=True)
        item = item_pb2.Item(
            item_id=self.item_id,
            title=self.title,
            description=self.description,
            categories=self.categories,
            tags=self.tags,
            attributes=self.attributes,
            hidden=self.hidden,
        )
        if self.created_at is not None:
            item.created_at.FromDatetime(_aware(self.created_at))
        if self.available_until is not None:
            item.available_until.FromDatetime(_aware(self.available_until))
        return item


def _aware(t: datetime) -> datetime:
    """SQLite hands timestamps back naive; they were stored in UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Revision:
    """A catalogue entry at one revision."""

    item: item_pb2.Item
    revision: int


def _insert(session: Session) -> Callable[[Any], postgresql.Insert | sqlite.Insert]:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _catalogue_row(item: item_pb2.Item, now: datetime) -> dict[str, Any]:
    """The row's content columns (all cleared for a tombstone)."""
    if item.deleted:
        item = item_pb2.Item(item_id=item.item_id, deleted=True)
    return {
        "item_id": item.item_id,
        "title": item.title,
        "description": item.description,
        "categories": list(item.categories),
        "tags": list(item.tags),
        "attributes": dict(item.attributes),
        "created_at": item.created_at.ToDatetime(tzinfo=UTC) if item.HasField("created_at") else None,
        "updated_at": now,
        "hidden": item.hidden,
        "available_until": (
            item.available_until.ToDatetime(tzinfo=UTC) if item.HasField("available_until") else None
        ),
        "deleted": item.deleted,
    }


_CONTENT = (
    "title",
    "description",
    "categories",
    "tags",
    "attributes",
    "created_at",
    "updated_at",
    "hidden",
    "available_until",
    "deleted",
)


class FeatureStore:
    """Persistence of one replica's feature state and of the (shared) catalogue."""

    def __init__(self, sessions: sessionmaker[Session], replica: str) -> None:
        self.sessions = sessions
        self.replica = replica

    # -- features ----------------------------------------------------------------------------

    def load(self, state: FeatureState, *, features: bool = True) -> None:
        """Fills an empty state from SQL: catalogue categories, then (unless ``features`` is
        False) this replica's features and stream position."""
        with self.sessions.begin() as session:
            deleted: set[str] = set()
            for row in session.scalars(select(CatalogueItem)):
                state.set_catalogue_entry(row.to_proto(), row.revision)
                if row.deleted:
                    deleted.add(row.item_id)
            if not features:
                return
            for user_id, doc in session.execute(
                select(UserRow.user_id, UserRow.state).where(UserRow.replica == self.replica)
            ):
                state.restore_user(user_id, doc)
            for item_id, doc in session.execute(
                select(ItemStatsRow.item_id, ItemStatsRow.state).where(ItemStatsRow.replica == self.replica)
            ):
                if item_id not in deleted:  # a commit that raced the delete: not brought back
                    state.restore_item(item_id, doc)
            position = session.get(ConsumerPosition, self.replica)
            watermark = (
                Watermark() if position is None else Watermark(position.stream_sequence, position.event_time)
            )
        state.finish_restore(watermark)

    def position(self, consumer: str | None = None) -> Watermark:
        with self.sessions.begin() as session:
            row = session.get(ConsumerPosition, consumer or self.replica)
            return Watermark() if row is None else Watermark(row.stream_sequence, row.event_time)

    def save(
        self,
        users: dict[str, str],
        items: dict[str, str],
        watermark: Watermark,
        deleted_users: Iterable[str] = (),
    ) -> None:
        """Writes changed users and items (each as its JSON text, from ``FeatureState.take_dirty``),
        deletes the rows of users gone, and stores the stream position, in one transaction."""
        with self.sessions.begin() as session:
            gone = list(deleted_users)
            for start in range(0, len(gone), 500):
                session.execute(
                    delete(UserRow).where(
                        UserRow.replica == self.replica, UserRow.user_id.in_(gone[start : start + 500])
                    )
                )
            self._write(session, users, items)
            self._set_position(session, self.replica, watermark)

    def holds_user(self, user_id: str) -> bool:
        """Whether this replica's table still has a row of the user."""
        with self.sessions.begin() as session:
            return (
                session.execute(
                    select(UserRow.user_id).where(UserRow.replica == self.replica, UserRow.user_id == user_id)
                ).first()
                is not None
            )

    def replace_all(self, state: FeatureState) -> None:
        """Replaces every row of this replica with the given state, in one transaction (rebuild)."""
        users = {u: orjson.dumps(state.user_doc(u)).decode() for u in state.users}
        items = {i: orjson.dumps(s.to_json()).decode() for i, s in state.items.items()}
        with self.sessions.begin() as session:
            session.execute(delete(UserRow).where(UserRow.replica == self.replica))
            session.execute(delete(ItemStatsRow).where(ItemStatsRow.replica == self.replica))
            self._write(session, users, items)
            self._set_position(session, self.replica, state.watermark)

    def _write(self, session: Session, users: dict[str, str], items: dict[str, str]) -> None:
        """Upserts rows whose ``state`` is already JSON text: bound as text (cast to JSON on
        PostgreSQL), through Core's executemany rather than the ORM's bulk path, which would
        serialise every document again and costs more per row."""
        postgres = session.get_bind().dialect.name == "postgresql"
        insert = postgresql.insert if postgres else sqlite.insert
        text_state = bindparam("state", type_=Text)
        state = cast(text_state, JSON) if postgres else text_state
        for table, docs, key in ((UserRow, users, "user_id"), (ItemStatsRow, items, "item_id")):
            if not docs:
                continue
            stmt = insert(table).values(replica=bindparam("replica"), **{key: bindparam("key")}, state=state)
            stmt = stmt.on_conflict_do_update(
                index_elements=["replica", key], set_={"state": stmt.excluded.state}
            )
            session.connection().execute(
                stmt, [{"replica": self.replica, "key": k, "state": v} for k, v in docs.items()]
            )

    @staticmethod
    def _set_position(session: Session, consumer: str, watermark: Watermark) -> None:
        stmt = _insert(session)(ConsumerPosition).values(
            consumer=consumer, stream_sequence=watermark.stream_sequence, event_time=watermark.event_time
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["consumer"],
            set_={"stream_sequence": stmt.excluded.stream_sequence, "event_time": stmt.excluded.event_time},
        )
        session.execute(stmt)

    # -- the catalogue -----------------------------------------------------------------------

    def upsert_items(self, items: list[item_pb2.Item]) -> list[Revision]:
        """Stores validated items (later ones win within the list); returns each stored revision,
        not yet published."""
        latest = {item.item_id: item for item in items}
        if not latest:
            return []
        now = datetime.now(UTC)
        rows = [_catalogue_row(item, now) | {"revision": 1, "published": False} for item in latest.values()]
        with self.sessions.begin() as session:
            stmt = _insert(session)(CatalogueItem)
            upsert = stmt.on_conflict_do_update(
                index_elements=["item_id"],
                set_={
                    **{c: stmt.excluded[c] for c in _CONTENT},
                    "revision": CatalogueItem.revision + 1,
                    "published": False,
                },
            ).returning(CatalogueItem.item_id, CatalogueItem.revision)
            revisions = {item_id: revision for item_id, revision in session.execute(upsert, rows)}
        return [Revision(latest[item_id], revisions[item_id]) for item_id in latest]

    def delete_items(self, item_ids: list[str]) -> tuple[list[Revision], list[str]]:
        """Turns the named entries into tombstones (content cleared, next revision, unpublished) and
        drops every replica's item features for them, in one transaction; returns the tombstones
        and the ids that had no entry (or were deleted already)."""
        wanted = list(dict.fromkeys(item_ids))
        now = datetime.now(UTC)
        cleared = _catalogue_row(item_pb2.Item(deleted=True), now)
        cleared.pop("item_id")
        with self.sessions.begin() as session:
            held = session.scalars(
                select(CatalogueItem.item_id).where(
                    CatalogueItem.item_id.in_(wanted), CatalogueItem.deleted == false()
                )
            ).all()
            revisions: dict[str, int] = {}
            if held:
                stmt = (
                    update(CatalogueItem)
                    .where(CatalogueItem.item_id.in_(held))
                    .values(**cleared, revision=CatalogueItem.revision + 1, published=False)
                    .returning(CatalogueItem.item_id, CatalogueItem.revision)
                )
                revisions = {item_id: revision for item_id, revision in session.execute(stmt)}
            session.execute(delete(ItemStatsRow).where(ItemStatsRow.item_id.in_(wanted)))
        tombstones = [Revision(item_pb2.Item(item_id=i, deleted=True), revisions[i]) for i in held]
        return tombstones, [i for i in wanted if i not in revisions]

    def follow(self, revisions: list[Revision], position: int, consumer: str) -> list[Revision]:
        """Stores entries read from FRESHREC_CATALOG unless a newer revision is already here, with
        the follower's stream position, in one transaction; returns those newer than what was here."""
        now = datetime.now(UTC)
        newest: dict[str, Revision] = {}
        for r in revisions:
            if r.item.item_id not in newest or newest[r.item.item_id].revision < r.revision:
                newest[r.item.item_id] = r
        with self.sessions.begin() as session:
            query = select(CatalogueItem.item_id, CatalogueItem.revision).where(
                CatalogueItem.item_id.in_(list(newest))
            )
            held = {item_id: revision for item_id, revision in session.execute(query)}
            fresh = [r for r in newest.values() if held.get(r.item.item_id, 0) < r.revision]
            if fresh:
                stmt = _insert(session)(CatalogueItem)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["item_id"],
                    set_={
                        **{c: stmt.excluded[c] for c in _CONTENT},
                        "revision": stmt.excluded.revision,
                        "published": True,
                    },
                    where=CatalogueItem.revision < stmt.excluded.revision,
                )
                session.execute(
                    stmt,
                    [
                        _catalogue_row(r.item, now) | {"revision": r.revision, "published": True}
                        for r in fresh
                    ],
                )
                gone = [r.item.item_id for r in fresh if r.item.deleted]
                if gone:
                    session.execute(
                        delete(ItemStatsRow).where(
                            ItemStatsRow.replica == self.replica, ItemStatsRow.item_id.in_(gone)
                        )
                    )
            self._set_position(session, consumer, Watermark(position, 0.0))
        return fresh

    def mark_published(self, revisions: Iterable[Revision]) -> None:
        with self.sessions.begin() as session:
            for r in revisions:
                session.execute(
                    update(CatalogueItem)
                    .where(CatalogueItem.item_id == r.item.item_id, CatalogueItem.revision == r.revision)
                    .values(published=True)
                )

    def unpublished(self, limit: int) -> list[Revision]:
        """Stored revisions FRESHREC_CATALOG has not acknowledged yet, oldest first."""
        with self.sessions.begin() as session:
            rows = session.scalars(
                select(CatalogueItem)
                .where(CatalogueItem.published == false())
                .order_by(CatalogueItem.updated_at, CatalogueItem.item_id)
                .limit(limit)
            ).all()
            return [Revision(row.to_proto(), row.revision) for row in rows]

    def count_unpublished(self) -> int:
        with self.sessions.begin() as session:
            return int(
                session.execute(
                    select(func.count()).select_from(CatalogueItem).where(CatalogueItem.published == false())
                ).scalar_one()
            )

    def get_items(self, item_ids: list[str]) -> dict[str, item_pb2.Item]:
        with self.sessions.begin() as session:
            rows = session.scalars(
                select(CatalogueItem).where(
                    CatalogueItem.item_id.in_(item_ids), CatalogueItem.deleted == false()
                )
            ).all()
            return {row.item_id: row.to_proto() for row in rows}

    def list_items(self, after: str, limit: int) -> list[item_pb2.Item]:
        with self.sessions.begin() as session:
            rows = session.scalars(
                select(CatalogueItem)
                .where(CatalogueItem.item_id > after, CatalogueItem.deleted == false())
                .order_by(CatalogueItem.item_id)
                .limit(limit)
            ).all()
            return [row.to_proto() for row in rows]
