"""The item catalogue in memory: categories and tags for filters, creation times for exploration,
content for items newer than the model.

It follows JetStream ``FRESHREC_CATALOG`` (subject ``freshrec.catalog.accepted``, one protobuf
``Item`` per message, published by the feature service after each accepted upsert) from the
first message (``follow_stream``), so every replica holds the whole catalogue; at start
it also pages ``FeatureService.ListItems`` so items upserted before the stream existed are known.
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


@dataclass(frozen=True)
class CatalogueEntry:
    """What inference keeps of one catalogue item."""

    title: str
    categories: tuple[str, ...]
    tags: tuple[str, ...]
    created_at: float  # unix seconds; 0 when the producer gave none

    @classmethod
    def from_proto(cls, item: item_pb2.Item) -> CatalogueEntry:
        created = (
            item.created_at.seconds + item.created_at.nanos / 1e9 if item.HasField("created_at") else 0.0
        )
        return cls(item.title, tuple(item.categories), tuple(item.tags), created)


class Catalogue:
    """Item id -> entry, with a version number that moves on every change."""

    def __init__(self) -> None:
        self.items: dict[str, CatalogueEntry] = {}
        self.version = 0
        self.changed = asyncio.Event()

    def upsert(self, item: item_pb2.Item) -> None:
        if not item.item_id:
            return
        entry = CatalogueEntry.from_proto(item)
        if self.items.get(item.item_id) == entry:
            return
        self.items[item.item_id] = entry
        self.version += 1
        self.changed.set()
        CATALOGUE_ITEMS.set(len(self.items))

    def snapshot(self) -> tuple[int, dict[str, CatalogueEntry]]:
        """A copy that a worker thread may read while the loop keeps updating the original."""
        return self.version, dict(self.items)


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
