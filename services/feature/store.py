"""The feature service's SQL tables: persisted features, the consumer position, the catalogue."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from freshrec.v1 import item_pb2
from services.feature.state import FeatureState, ItemState, UserState, Watermark


class Base(DeclarativeBase):
    """Tables owned by the feature service."""


class UserRow(Base):
    __tablename__ = "feature_users"
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)


class ItemStatsRow(Base):
    __tablename__ = "feature_items"
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)


class ConsumerPosition(Base):
    """The last stream sequence whose effect is in these tables (committed with that effect)."""

    __tablename__ = "feature_consumer_position"
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream_sequence: Mapped[int] = mapped_column(BigInteger)
    event_time: Mapped[float] = mapped_column(Float)


class CatalogItem(Base):
    __tablename__ = "catalog_items"
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    categories: Mapped[list[str]] = mapped_column(JSON)
    tags: Mapped[list[str]] = mapped_column(JSON)
    attributes: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def to_proto(self) -> item_pb2.Item:
        item = item_pb2.Item(
            item_id=self.item_id,
            title=self.title,
            description=self.description,
            categories=self.categories,
            tags=self.tags,
            attributes=self.attributes,
        )
        if self.created_at is not None:
            item.created_at.FromDatetime(self.created_at)
        return item


class FeatureStore:
    """Persistence of the feature state; every method is one unit of work (call it off the loop)."""

    def __init__(self, sessions: sessionmaker, consumer: str) -> None:  # type: ignore[type-arg]
        self.sessions = sessions
        self.consumer = consumer

    def load(self, state: FeatureState) -> None:
        """Fills an empty state from SQL."""
        with self.sessions.begin() as session:
            for user_id, doc in session.execute(select(UserRow.user_id, UserRow.state)):
                state.users[user_id] = UserState.from_json(doc, state.max_recent)
                if doc.get("pre") is not None:
                    state.preprocessor.import_user(user_id, doc["pre"])
            for item_id, doc in session.execute(select(ItemStatsRow.item_id, ItemStatsRow.state)):
                state.items[item_id] = ItemState.from_json(doc)
            for item_id, categories in session.execute(select(CatalogItem.item_id, CatalogItem.categories)):
                state.item_categories[item_id] = list(categories)
            position = session.get(ConsumerPosition, self.consumer)
            if position is not None:
                state.watermark = Watermark(position.stream_sequence, position.event_time)

    def save(self, state: FeatureState, users: set[str], items: set[str]) -> None:
        """Writes the touched users and items and the stream position in one transaction."""
        with self.sessions.begin() as session:
            for user_id in users:
                doc = state.users[user_id].to_json()
                doc["pre"] = state.preprocessor.export_user(user_id)
                session.merge(UserRow(user_id=user_id, state=doc))
            for item_id in items:
                if item_id in state.items:  # events of likely bots do not touch items
                    session.merge(ItemStatsRow(item_id=item_id, state=state.items[item_id].to_json()))
            session.merge(
                ConsumerPosition(
                    consumer=self.consumer,
                    stream_sequence=state.watermark.stream_sequence,
                    event_time=state.watermark.event_time,
                )
            )

    def upsert_items(self, items: list[item_pb2.Item]) -> None:
        now = datetime.now(UTC)
        with self.sessions.begin() as session:
            for item in items:
                session.merge(
                    CatalogItem(
                        item_id=item.item_id,
                        title=item.title,
                        description=item.description,
                        categories=list(item.categories),
                        tags=list(item.tags),
                        attributes=dict(item.attributes),
                        created_at=item.created_at.ToDatetime(tzinfo=UTC)
                        if item.HasField("created_at")
                        else None,
                        updated_at=now,
                    )
                )

    def get_items(self, item_ids: list[str]) -> dict[str, item_pb2.Item]:
        with self.sessions.begin() as session:
            rows = session.scalars(select(CatalogItem).where(CatalogItem.item_id.in_(item_ids))).all()
            return {row.item_id: row.to_proto() for row in rows}

    def list_items(self, after: str, limit: int) -> list[item_pb2.Item]:
        with self.sessions.begin() as session:
            rows = session.scalars(
                select(CatalogItem)
                .where(CatalogItem.item_id > after)
                .order_by(CatalogItem.item_id)
                .limit(limit)
            ).all()
            return [row.to_proto() for row in rows]
