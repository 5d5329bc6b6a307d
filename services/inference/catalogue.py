"""The item catalogue in memory: categories and tags for filters, creation times for exploration,
content for items newer than the model.

It follows JetStream ``FRESHREC_CATALOG`` (subject ``freshrec.catalog.accepted``, one protobuf
``Item`` per message, published by the feature service after each accepted upsert) from the
first message (``follow_stream``), so every replica holds the whole catalogue; at start
it also pages ``FeatureService.ListItems`` so items upserted before the stream existed are known.

An entry may be hidden or carry an ``available_until``; a tombstone (``Item.deleted``) removes the
entry and records the id as deleted, since the loaded model may still have a row for it. The
serving state turns these into the positions no answer may contain (``index.py``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Gauge

from freshrec.v1 import feature_pb2, feature_pb2_grpc, item_pb2
from shared.nats import CATALOGUE_ACCEPTED_SUBJECT, CATALOGUE_STREAM, ensure_catalogue_stream, follow_stream

logger = logging.getLogger(__name__)

CATALOGUE_ITEMS = Gauge("freshrec_inference_catalogue_items", "Catalogue entries held in memory.")
CATALOGUE_HIDDEN = Gauge(
    "freshrec_inference_catalogue_hidden", "Catalogue entries held hidden (never in an answer)."
)
CATALOGUE_DELETED = Gauge(
    "freshrec_inference_catalogue_deleted", "Deleted catalogue items this replica keeps out of answers."
)


@dataclass(frozen=True)
class CatalogueEntry:
    """What inference keeps of one catalogue item."""

    title: str
    categories: tuple[str, ...]
    tags: tuple[str, ...]
    created_at: float  # unix seconds; 0 when the producer gave none
    hidden: bool = False
    available_until: float = 0.0  # unix seconds; 0 = forever

    @classmethod
    def from_proto(cls, item: item_pb2.Item) -> CatalogueEntry:
        def seconds(field: str) -> float:
            if not item.HasField(field):
                return 0.0
            ts = getattr(item, field)
            return float(ts.seconds + ts.nanos / 1e9)

        return cls(
            item.title,
            tuple(item.categories),
            tuple(item.tags),
            seconds("created_at"),
            item.hidden,
            seconds("available_until"),
        )

    def servable(self, now: float) -> bool:
        """False when hidden or past ``available_until`` at wall clock ``now``."""
        return not self.hidden and (not self.available_until or self.available_until > now)

    def same_content(self, other: CatalogueEntry | None) -> bool:
        """Whether ``other`` embeds the same (availability aside)."""
        return other is not None and (self.categories, self.tags) == (other.categories, other.tags)


class Catalogue:
    """Item id -> entry, with a version number that moves on every change."""

    def __init__(self) -> None:
        self.items: dict[str, CatalogueEntry] = {}
        #: Ids deleted from the catalogue (kept out of answers while a model still has their row).
        self.deleted: set[str] = set()
        self.hidden: set[str] = set()
        self.version = 0
        self.changed = asyncio.Event()

    def upsert(self, item: item_pb2.Item) -> None:
        """Applies one catalogue message: an entry, or a tombstone (``item.deleted``)."""
        if not item.item_id:
            return
        if item.deleted:
            if self.items.pop(item.item_id, None) is None and item.item_id in self.deleted:
                return
            self.deleted.add(item.item_id)
            self.hidden.discard(item.item_id)
        else:
            entry = CatalogueEntry.from_proto(item)
            if self.items.get(item.item_id) == entry:
                return
            self.items[item.item_id] = entry
            self.deleted.discard(item.item_id)
            (self.hidden.add if entry.hidden else self.hidden.discard)(item.item_id)
        self.version += 1
        self.changed.set()
        CATALOGUE_ITEMS.set(len(self.items))
        CATALOGUE_HIDDEN.set(len(self.hidden))
        CATALOGUE_DELETED.set(len(self.deleted))

    def servable(self, item_id: str, now: float) -> bool:
        """False for an item deleted, hidden or past its ``available_until`` (wall clock ``now``)."""
        if item_id in self.deleted:
            return False
        entry = self.items.get(item_id)
        return entry is None or entry.servable(now)

    def snapshot(self) -> tuple[int, dict[str, CatalogueEntry], frozenset[str]]:
        """A copy that a worker thread may read while the loop keeps updating the original:
        version, entries, deleted ids."""
        return self.version, dict(self.items), frozenset(self.deleted)


class CatalogueFollower:
    """Fills a ``Catalogue`` from ListItems, then follows the catalogue stream."""

    def __init__(
        self,
        catalogue: Catalogue,
        nc: NatsClient,
        feature_channel: grpc.aio.Channel,
        page_size: int = 1000,
        retry_s: float = 2.0,
    ) -> None:
        self.catalogue = catalogue
        self.nc = nc
        self.stub = feature_pb2_grpc.FeatureServiceStub(feature_channel)
        self.page_size = page_size
        self.retry_s = retry_s
        #: The stream sequence of the last catalogue message applied.
        self.position = 0

    async def list_all(self, deadline_s: float = 5.0) -> int:
        """Pages ListItems into the catalogue; returns how many items came (0 if unreachable)."""
        token, count = "", 0
        try:
            while True:
                page = await self.stub.ListItems(
                    feature_pb2.ListItemsRequest(page_size=self.page_size, page_token=token),
                    timeout=deadline_s,
                )
                for item in page.items:
                    self.catalogue.upsert(item)
                count += len(page.items)
                token = page.next_page_token
                if not token:
                    return count
        except grpc.aio.AioRpcError as exc:
            logger.info("catalogue listing stopped after %d items: %s", count, exc.code())
            return count

    async def run(self) -> None:
        """Follows the catalogue stream from its first message, so this replica holds it all."""
        js = self.nc.jetstream()

        async def position() -> int:
            await ensure_catalogue_stream(js)  # so inference may start before the feature service
            return self.position

        async def apply(msgs: list[Msg]) -> None:
            for msg in msgs:
                item = item_pb2.Item()
                try:
                    item.ParseFromString(msg.data)
                except Exception:
                    logger.warning(
                        "ignoring a malformed catalogue message (stream sequence %d)",
                        msg.metadata.sequence.stream,
                    )
                    continue
                self.catalogue.upsert(item)
            self.position = msgs[-1].metadata.sequence.stream

        await follow_stream(
            js,
            CATALOGUE_STREAM,
            CATALOGUE_ACCEPTED_SUBJECT,
            position=position,
            apply=apply,
            name="inference",
            retry_s=self.retry_s,
        )
