"""The item catalogue: validation, intake over gRPC and NATS, publication, and following.

Subjects and streams (names in ``shared/nats.py`` where other services need them):

- **In, gRPC**: ``FeatureService.UpsertItems``.
- **In, NATS**: ``freshrec.catalog.items``, captured by the stream ``FRESHREC_CATALOG_INTAKE``
  (so a message waits while the feature service is down) and consumed by the durable consumer
  ``feature-catalog-intake``, shared by all replicas. A message is a protobuf ``Item`` or
  ``UpsertItemsRequest`` (say which with the header ``Freshrec-Message-Type:
  freshrec.v1.Item`` or ``freshrec.v1.UpsertItemsRequest``; without it both are tried), or
  the same in the proto JSON mapping with ``Content-Type: application/json``.
- **Out**: stream ``FRESHREC_CATALOG``, subject ``freshrec.catalog.accepted``: one protobuf
  ``Item`` per message, after it is stored in SQL, with ``Nats-Msg-Id: <item_id>@<revision>``
  and the header ``Freshrec-Item-Revision`` (each upsert of an item increments its
  revision; a consumer keeps the highest). An outbox relay publishes whatever a NATS outage
  left unpublished.
- **Deletes**: ``FeatureService.DeleteItems`` turns entries into tombstones: a protobuf ``Item``
  with only ``item_id`` and ``deleted`` set, published on the same subject at the entry's next
  revision (so followers that keep the highest revision apply it in order). A follower drops the
  item. ``hidden`` and ``available_until`` travel inside ordinary entries.
- **Dead letters**: ``freshrec.catalog.dlq`` (stream ``FRESHREC_CATALOG_DLQ``, kept 30 days):
  an undecodable message as it came, or each rejected ``Item`` of a batch, with the reason in
  the header ``Freshrec-Dlq-Reason``; the valid items of a batch are accepted.

Every replica follows ``FRESHREC_CATALOG`` from its stored position, storing revisions newer
than its own and updating the categories in memory, so replicas that do not share a database
(or were down during an upsert) still agree on the catalogue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass

from google.protobuf import json_format, unknown_fields
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from freshrec.v1 import feature_pb2, item_pb2
from services.feature import metrics
from services.feature.settings import CatalogueSettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore, Revision
from shared.nats import (
    CATALOGUE_ACCEPTED_SUBJECT,
    CATALOGUE_ITEMS_SUBJECT,
    CATALOGUE_STREAM,
    MSG_ID_HEADER,
    ensure_stream,
    fetch_batch,
    follow_stream,
    kept_stream_config,
)
from shared.supervise import forever, raise_if_cancelling

logger = logging.getLogger(__name__)

INTAKE_STREAM = "FRESHREC_CATALOG_INTAKE"
INTAKE_CONSUMER = "feature-catalog-intake"
DLQ_SUBJECT = "freshrec.catalog.dlq"
DLQ_STREAM = "FRESHREC_CATALOG_DLQ"
REASON_HEADER = "Freshrec-Dlq-Reason"
TYPE_HEADER = "Freshrec-Message-Type"
REVISION_HEADER = "Freshrec-Item-Revision"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Timestamp's valid range (0001-01-01 to 9999-12-31).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


@dataclass(frozen=True)
class ItemError:
    index: int
    item_id: str
    reason: str


def _label_error(what: str, values: list[str], most: int, longest: int) -> str | None:
    if len(values) > most:
        return f"more than {most} {what}"
    for value in values:
        if not value:
            return f"{what} has an empty entry"
        if len(value) > longest:
            return f"{what} entry longer than {longest}"
        if _CONTROL.search(value):
            return f"{what} entry contains control characters"
    return None


def validate_item(item: item_pb2.Item, limits: CatalogueSettings, now: float | None = None) -> str | None:
    """Returns why the item is invalid, or None when it may be stored."""
    if not item.item_id:
        return "item_id is empty"
    if len(item.item_id) > limits.max_id_length:
        return f"item_id longer than {limits.max_id_length}"
    if _CONTROL.search(item.item_id):
        return "item_id contains control characters"
    if len(item.title) > limits.max_title_length:
        return f"title longer than {limits.max_title_length}"
    if _CONTROL.search(item.title):
        return "title contains control characters"
    if len(item.description) > limits.max_description_length:
        return f"description longer than {limits.max_description_length}"
    if _CONTROL_EXCEPT_WHITESPACE.search(item.description):
        return "description contains control characters"
    reason = _label_error("categories", list(item.categories), limits.max_categories, limits.max_label_length)
    reason = reason or _label_error("tags", list(item.tags), limits.max_tags, limits.max_label_length)
    if reason:
        return reason
    if len(item.attributes) > limits.max_attributes:
        return f"more than {limits.max_attributes} attributes"
    for key, value in item.attributes.items():
        if not key:
            return "attributes has an empty key"
        if len(key) > limits.max_attribute_key_length:
            return f"attribute key longer than {limits.max_attribute_key_length}"
        if len(value) > limits.max_attribute_value_length:
            return f"attribute {key!r} longer than {limits.max_attribute_value_length}"
        if _CONTROL.search(key) or _CONTROL_EXCEPT_WHITESPACE.search(value):
            return f"attribute {key[:64]!r} contains control characters"
    if item.HasField("created_at"):
        ts = item.created_at
        if not _valid_timestamp(ts):
            return "created_at is not a valid timestamp"
        if ts.seconds > (time.time() if now is None else now) + limits.max_future_s:
            return f"created_at is more than {limits.max_future_s:g} s in the future"
    if item.HasField("available_until") and not _valid_timestamp(item.available_until):
        return "available_until is not a valid timestamp"
    if item.deleted:
        return "deleted is set only on the catalogue stream's tombstones; call DeleteItems to delete"
    return None


def _valid_timestamp(ts: Timestamp) -> bool:
    return _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000


def _clean(message: Message) -> bool:
    """True when the parse left no unknown fields anywhere (it really was this message type)."""
    if len(unknown_fields.UnknownFieldSet(message)):
        return False
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        children = value if field.is_repeated else [value]
        if not all(_clean(child) for child in children):
            return False
    return True


def decode_items(data: bytes, headers: dict[str, str] | None) -> tuple[list[item_pb2.Item], str | None]:
    """Decodes a catalogue message into items, or says why it cannot be decoded."""
    headers = headers or {}
    kind = headers.get(TYPE_HEADER, "")
    if kind not in ("", "freshrec.v1.Item", "freshrec.v1.UpsertItemsRequest"):
        return [], f"unknown {TYPE_HEADER} {kind[:100]!r}"
    if "json" in headers.get("Content-Type", "").lower():
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            return [], f"not valid JSON: {exc}"
        if not isinstance(doc, dict):
            return [], "JSON message is not an object"
        batch = kind == "freshrec.v1.UpsertItemsRequest" or (not kind and "items" in doc)
        try:
            if batch:
                return list(json_format.ParseDict(doc, feature_pb2.UpsertItemsRequest()).items), None
            return [json_format.ParseDict(doc, item_pb2.Item())], None
        except json_format.ParseError as exc:
            what = "UpsertItemsRequest" if batch else "Item"
            return [], f"not a freshrec.v1.{what} in the proto JSON mapping: {exc}"[:500]
    if kind != "freshrec.v1.Item":
        try:
            request = feature_pb2.UpsertItemsRequest.FromString(data)
            if kind or (request.items and _clean(request)):
                return list(request.items), None
        except DecodeError as exc:
            if kind:
                return [], f"not a protobuf freshrec.v1.UpsertItemsRequest: {exc}"
    try:
        item = item_pb2.Item.FromString(data)
    except DecodeError as exc:
        return [], f"not a protobuf freshrec.v1.Item or UpsertItemsRequest: {exc}"
    if not kind and not _clean(item):
        return [], "not a protobuf freshrec.v1.Item or UpsertItemsRequest (unknown fields)"
    return [item], None


async def ensure_intake_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Declares the catalogue intake and dead-letter streams (owned by the feature service)."""
    intake = kept_stream_config(
        INTAKE_STREAM, CATALOGUE_ITEMS_SUBJECT, replicas=replicas, max_age_s=7 * 24 * 3600
    )
    dlq = kept_stream_config(DLQ_STREAM, DLQ_SUBJECT, replicas=replicas, max_age_s=30 * 24 * 3600)
    for config in (intake, dlq):
        await ensure_stream(js, config)


def count_unservable(state: FeatureState) -> None:
    metrics.CATALOGUE_HIDDEN.set(len(state.hidden_items))
    metrics.CATALOGUE_TIME_LIMITED.set(len(state.available_until))


class Catalogue:
    """Validates, stores, indexes and publishes catalogue entries."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        store: FeatureStore,
        state: FeatureState,
        limits: CatalogueSettings,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self.nc = nc
        self.js = js
        self.store = store
        self.state = state
        self.limits = limits
        self.publish_timeout_s = publish_timeout_s
        self._publishing = asyncio.Lock()

    def validate(self, items: list[item_pb2.Item]) -> tuple[list[item_pb2.Item], list[ItemError]]:
        now = time.time()
        valid: list[item_pb2.Item] = []
        errors: list[ItemError] = []
        for index, item in enumerate(items):
            reason = validate_item(item, self.limits, now)
            if reason is None:
                valid.append(item)
            else:
                errors.append(ItemError(index, item.item_id[: self.limits.max_id_length], reason))
        return valid, errors

    async def upsert(self, items: list[item_pb2.Item], source: str) -> tuple[int, list[ItemError]]:
        """Stores the valid items, updates memory, publishes; returns the count stored and the errors.

        Raises if SQL fails (nothing is then stored or published).
        """
        valid, errors = self.validate(items)
        metrics.CATALOGUE_ITEMS.labels(source, "rejected").inc(len(errors))
        if valid:
            revisions = await asyncio.to_thread(self.store.upsert_items, valid)
            for r in revisions:
                self.state.set_catalogue_entry(r.item, r.revision)
            metrics.CATALOGUE_ITEMS.labels(source, "accepted").inc(len(valid))
            await self.publish(revisions)
            count_unservable(self.state)
        return len(valid), errors

    async def delete(self, item_ids: list[str]) -> tuple[int, list[str]]:
        """Deletes entries (SQL row content, every replica's item features, this replica's memory)
        and publishes their tombstones; returns the count deleted and the ids that had no entry.

        Raises if SQL fails (nothing is then deleted or published).
        """
        tombstones, missing = await asyncio.to_thread(self.store.delete_items, item_ids)
        for r in tombstones:
            self.state.set_catalogue_entry(r.item, r.revision)
        metrics.CATALOGUE_DELETED.inc(len(tombstones))
        await self.publish(tombstones)
        count_unservable(self.state)
        if tombstones:
            logger.info("deleted %d catalogue entries (%d ids had none)", len(tombstones), len(missing))
        return len(tombstones), missing

    async def publish(self, revisions: list[Revision]) -> int:
        """Publishes stored revisions to FRESHREC_CATALOG and marks the acknowledged ones published;
        failures stay in the outbox for the relay."""
        if not revisions or not self.nc.is_connected:
            return 0
        async with self._publishing:
            futures = []
            try:
                for r in revisions:
                    headers = {
                        MSG_ID_HEADER: f"{r.item.item_id}@{r.revision}",
                        REVISION_HEADER: str(r.revision),
                    }
                    futures.append(
                        await self.js.publish_async(
                            CATALOGUE_ACCEPTED_SUBJECT,
                            r.item.SerializeToString(),
                            headers=headers,
                            stream=CATALOGUE_STREAM,
                        )
                    )
                done, pending = await asyncio.wait(futures, timeout=self.publish_timeout_s)
            except Exception as exc:
                logger.warning(
                    "publishing %d catalogue entries failed (%s); the relay retries", len(revisions), exc
                )
                return 0
            for future in pending:
                future.cancel()
            acked = [r for r, f in zip(revisions, futures, strict=False) if f in done and not f.exception()]
            if acked:
                await asyncio.to_thread(self.store.mark_published, acked)
                metrics.CATALOGUE_PUBLISHED.inc(len(acked))
            return len(acked)

    async def relay(self, interval_s: float, batch: int = 500) -> None:
        """Publishes stored-but-unpublished revisions, forever."""

        async def one_pass() -> None:
            while True:
                pending = await asyncio.to_thread(self.store.unpublished, batch)
                published = await self.publish(pending) if pending else 0
                if published < batch:
                    break
            metrics.CATALOGUE_UNPUBLISHED.set(await asyncio.to_thread(self.store.count_unpublished))

        await forever(one_pass, logger=logger, failed="catalogue relay pass failed", every_s=interval_s)


class CatalogueIntake:
    """Consumes ``freshrec.catalog.items`` (shared by all replicas) and feeds ``Catalogue.upsert``."""

    def __init__(self, js: JetStreamContext, catalogue: Catalogue, batch: int = 100) -> None:
        self.js = js
        self.catalogue = catalogue
        self.batch = batch

    async def run(self) -> None:
        await forever(
            self._consume, logger=logger, failed="catalogue intake failed; resubscribing in 1 s", retry_s=1.0
        )

    async def _consume(self) -> None:
        psub = await self.js.pull_subscribe(
            CATALOGUE_ITEMS_SUBJECT,
            durable=INTAKE_CONSUMER,
            stream=INTAKE_STREAM,
            # Replicas share this consumer, so each message is acked on its own.
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_ack_pending=10_000),
        )
        try:
            while True:
                raise_if_cancelling()
                for msg in await fetch_batch(psub, self.batch, timeout_s=1.0):
                    try:
                        await self.handle(msg)
                    except Exception:
                        logger.exception(
                            "catalogue message %d failed; redelivered later", msg.metadata.sequence.stream
                        )
                        await msg.nak(delay=2.0)
                        continue
                    await msg.ack()
        finally:
            await psub.unsubscribe()

    async def handle(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        items, reason = decode_items(msg.data, msg.headers)
        limit = self.catalogue.limits.max_items_per_request
        if reason is None and len(items) > limit:
            reason = f"more than {limit} items in one message"
        if reason is not None:
            metrics.CATALOGUE_ITEMS.labels("nats", "rejected").inc()
            await self.dead_letter(msg.data, reason, f"catalog-dlq-{seq}")
            return
        _, errors = await self.catalogue.upsert(items, "nats")
        for error in errors:
            await self.dead_letter(
                items[error.index].SerializeToString(), error.reason, f"catalog-dlq-{seq}-{error.index}"
            )

    async def dead_letter(self, data: bytes, reason: str, msg_id: str) -> None:
        # The id derives from the intake position: a redelivered message is dead-lettered once.
        headers = {REASON_HEADER: reason, MSG_ID_HEADER: msg_id}
        await self.js.publish(DLQ_SUBJECT, data, headers=headers, stream=DLQ_STREAM)
        metrics.CATALOGUE_DLQ.inc()
        logger.info("dead-lettered catalogue message (%s): %s", msg_id, reason)


class CatalogueFollower:
    """Follows FRESHREC_CATALOG from this replica's stored position (in SQL, with what it stored)."""

    def __init__(self, js: JetStreamContext, store: FeatureStore, state: FeatureState, name: str) -> None:
        self.js = js
        self.store = store
        self.state = state
        self.name = name
        self.position = 0

    async def run(self) -> None:
        await follow_stream(
            self.js,
            CATALOGUE_STREAM,
            CATALOGUE_ACCEPTED_SUBJECT,
            position=self._stored_position,
            apply=self.apply,
            name=self.name,
        )

    async def _stored_position(self) -> int:
        self.position = (await asyncio.to_thread(self.store.position, self.name)).stream_sequence
        return self.position

    async def apply(self, msgs: list[Msg]) -> None:
        revisions = []
        for msg in msgs:
            try:
                item = item_pb2.Item.FromString(msg.data)
                revision = int((msg.headers or {}).get(REVISION_HEADER, "0"))
            except (DecodeError, ValueError):
                logger.error(
                    "%s message %d is not a catalogue entry; skipped",
                    CATALOGUE_STREAM,
                    msg.metadata.sequence.stream,
                )
                continue
            revisions.append(Revision(item, revision))
        last = msgs[-1].metadata.sequence.stream
        fresh = await asyncio.to_thread(self.store.follow, revisions, last, self.name)
        for r in revisions:
            self.state.set_catalogue_entry(r.item, r.revision)
        count_unservable(self.state)
        self.position = last
        metrics.CATALOGUE_FOLLOWED.inc(len(fresh))
