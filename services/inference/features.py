"""The inference side of the feature service: user histories and popularity, with a deadline.

A user lookup that misses its deadline answers from the last value seen for that user, so a
slow feature service degrades freshness, never availability. Lookups made at the same time
share one ``BatchGetUserFeatures`` call. Popularity lists are cached and
refreshed in the background, so the user lookup is the only network hop on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import grpc
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from freshrec.v1 import feature_pb2, feature_pb2_grpc
from shared.feature_replicas import PartitionMap
from shared.forget import RecentlyForgotten
from shared.supervise import forever

logger = logging.getLogger(__name__)

USER_LOOKUPS = Counter(
    "freshrec_inference_user_lookups_total", "User feature lookups by outcome.", ["outcome"]
)

USER_LOOKUP_ERRORS = Counter(
    "freshrec_inference_user_lookup_errors_total",
    "User feature lookups the feature service did not answer, by gRPC status (DEADLINE_EXCEEDED: "
    "slow; UNAVAILABLE or FAILED_PRECONDITION: sent to a replica that is gone or owns no such user).",
    ["code"],
)

LOOKUP_BATCH = Histogram(
    "freshrec_inference_user_lookup_batch_size",
    "Users per BatchGetUserFeatures call (lookups that arrive together share one round trip).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

TRENDING = feature_pb2.POPULARITY_WINDOW_TRENDING
ALL_TIME = feature_pb2.POPULARITY_WINDOW_ALL_TIME
#: How long a channel to a feature replica that owns no partition any more stays open for the
#: lookups already sent on it (a lookup's own deadline is shorter).
CHANNEL_CLOSE_GRACE_S = 5.0


@dataclass(frozen=True)
class UserView:
    """What a request needs to know about its user."""

    known: bool
    recent: list[tuple[str, int]]  # (item id, EventType), oldest first
    fresh: bool  # False when served from the cache after a failed lookup
    #: Every item the user touched (what answers leave out); the recent items when the feature
    #: service keeps no more.
    seen: tuple[str, ...] = ()

    @property
    def recent_items(self) -> list[str]:
        return [item for item, _ in self.recent]


class FeatureClient:
    """User lookups, coalesced: lookups that arrive while ``max_in_flight`` batch calls are out
    wait for the next one (``BatchGetUserFeatures``, up to ``batch_size`` users), so under load
    one round trip serves many requests, and a lone lookup goes out at once. A feature service
    without the batch call (an older version) is asked one user at a time."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        deadline_s: float,
        cache_size: int = 100_000,
        batch_size: int = 64,
        max_in_flight: int = 1,
        router: FeatureRouter | None = None,
    ) -> None:
        self.stub = feature_pb2_grpc.FeatureServiceStub(channel)
        #: Sends each user to the replica owning their partition (None: everything to ``channel``).
        self.router = router
        self.deadline_s = deadline_s
        self.cache: OrderedDict[str, UserView] = OrderedDict()
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.batched = True  # False once the service answers UNIMPLEMENTED to the batch call
        self._waiting: dict[str, list[asyncio.Future[UserView]]] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Users just forgotten: their features are neither cached nor used (memory only).
        self.forgotten = RecentlyForgotten(window_s=600.0)

    async def user(self, user_id: str) -> UserView:
        if not self.batched:
            return await self._one(user_id)
        future: asyncio.Future[UserView] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user_id, []).append(future)
        self._send()
        return await future

    def _stub(self, user_id: str) -> feature_pb2_grpc.FeatureServiceStub:
        return self.router.stub_for(user_id) if self.router is not None else self.stub

    def _send(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            user_ids = list(islice(self._waiting, self.batch_size))
            batch = {u: self._waiting.pop(u) for u in user_ids}
            # One call per owning replica (a replica refuses users of partitions it does not own).
            by_owner: dict[int, tuple[feature_pb2_grpc.FeatureServiceStub, dict[str, list[Any]]]] = {}
            for user_id, futures in batch.items():
                stub = self._stub(user_id)
                by_owner.setdefault(id(stub), (stub, {}))[1][user_id] = futures
            for stub, part in by_owner.values():
                self._in_flight += 1
                task = asyncio.create_task(self._lookup(stub, part))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _lookup(
        self, stub: feature_pb2_grpc.FeatureServiceStub, batch: dict[str, list[asyncio.Future[UserView]]]
    ) -> None:
        views: dict[str, UserView] = {}
        try:
            LOOKUP_BATCH.observe(len(batch))
            response = await stub.BatchGetUserFeatures(
                feature_pb2.BatchGetUserFeaturesRequest(user_ids=list(batch), include_seen_items=True),
                timeout=self.deadline_s,
            )
            for features in response.features:
                views[features.user_id] = self._fresh(features)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                logger.warning("the feature service has no BatchGetUserFeatures; looking users up one by one")
                self.batched = False
                found = await asyncio.gather(*(self._one(u) for u in batch))
                views = dict(zip(batch, found, strict=True))
            else:
                views = {u: self._fallback(u, exc) for u in batch}
        except BaseException as exc:
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            raise
        finally:
            self._in_flight -= 1
            self._send()
        for user_id, futures in batch.items():
            for future in futures:
                if not future.done():  # a caller that gave up (cancelled) is skipped
                    future.set_result(views[user_id])

    async def forget(self, user_id: str) -> bool:
        """Drops the user's cached features; True once the feature service no longer knows them
        either (then nothing can fill the cache with them again)."""
        self.cache.pop(user_id, None)
        try:
            response = await self._stub(user_id).GetUserFeatures(
                feature_pb2.GetUserFeaturesRequest(user_id=user_id), timeout=max(self.deadline_s, 2.0)
            )
        except grpc.aio.AioRpcError:
            return False
        self.cache.pop(user_id, None)
        return not response.features.known

    async def _one(self, user_id: str) -> UserView:
        try:
            response = await self._stub(user_id).GetUserFeatures(
                feature_pb2.GetUserFeaturesRequest(user_id=user_id, include_seen_items=True),
                timeout=self.deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            return self._fallback(user_id, exc)
        return self._fresh(response.features)

    def _fallback(self, user_id: str, exc: grpc.aio.AioRpcError) -> UserView:
        cached = None if self.forgotten.holds(user_id) else self.cache.get(user_id)
        USER_LOOKUPS.labels("cached" if cached is not None else "failed").inc()
        USER_LOOKUP_ERRORS.labels(exc.code().name).inc()
        logger.debug("feature lookup for %s failed (%s); cached=%s", user_id, exc.code(), cached is not None)
        if cached is not None:
            return UserView(cached.known, cached.recent, fresh=False, seen=cached.seen)
        return UserView(known=False, recent=[], fresh=False)

    def _fresh(self, features: feature_pb2.UserFeatures) -> UserView:
        USER_LOOKUPS.labels("fresh").inc()
        if self.forgotten and self.forgotten.holds(features.user_id):
            return UserView(known=False, recent=[], fresh=True)
        # What the user tower reads: positive interactions (a dislike is seen, never learned from).
        recent = [(i.item_id, int(i.type)) for i in reversed(features.recent) if i.weight > 0]
        view = UserView(
            known=features.known,
            recent=recent,
            fresh=True,
            seen=tuple(features.seen_item_ids) or tuple(item for item, _ in recent),
        )
        user_id = features.user_id
        self.cache[user_id] = view
        self.cache.move_to_end(user_id)
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return view


class FeatureRouter:
    """A stub per feature replica the partition map names (one channel per address, opened on first
    use), and the configured address for users whose partition no live replica announces (a
    feature service that publishes no map, or a map not read yet)."""

    def __init__(self, default: grpc.aio.Channel, open_channel: Callable[[str], grpc.aio.Channel]) -> None:
        self.default = feature_pb2_grpc.FeatureServiceStub(default)
        self.open_channel = open_channel
        self.map = PartitionMap()
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, feature_pb2_grpc.FeatureServiceStub] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def stub_for(self, user_id: str) -> feature_pb2_grpc.FeatureServiceStub:
        address = self.map.address_for(user_id)
        if address is None:
            return self.default
        stub = self.stubs.get(address)
        if stub is None:
            channel = self.channels[address] = self.open_channel(address)
            stub = self.stubs[address] = feature_pb2_grpc.FeatureServiceStub(channel)
        return stub

    async def follow(self, kv: KeyValue) -> None:
        """Keeps the map current from the bucket (a change of owners applies to the next lookup)."""
        await forever(
            lambda: self.map.watch(kv, changed=self._forget_left_replicas),
            logger=logger,
            failed="following the feature partition map failed; retrying",
            every_s=1.0,
        )

    def _forget_left_replicas(self, partition_map: PartitionMap) -> None:
        """Closes the channels to addresses that own no partition any more (a replica that left or
        was scaled away), after the lookups already sent on them have had time to finish."""
        owning = {entry.address for entry in partition_map.owner.values()}
        for address in [a for a in self.channels if a not in owning]:
            channel = self.channels.pop(address)
            del self.stubs[address]
            task = asyncio.create_task(channel.close(grace=CHANNEL_CLOSE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            logger.info("feature replica at %s owns no partition now; its channel is closed", address)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


@dataclass(frozen=True)
class PopularList:
    fetched_at: float
    items: list[tuple[str, float]]


class PopularCache:
    """Popular and trending items per category, fetched once and refreshed in the background."""

    def __init__(self, channel: grpc.aio.Channel, deadline_s: float, ttl_s: float, size: int = 1000) -> None:
        self.stub = feature_pb2_grpc.FeatureServiceStub(channel)
        self.deadline_s = deadline_s
        self.ttl_s = ttl_s
        self.size = size
        self.lists: dict[tuple[str, int], PopularList] = {}
        self.last_success = 0.0
        self._refreshing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def available(self, within_s: float) -> bool:
        """True when the feature service answered a popularity request recently."""
        return time.monotonic() - self.last_success <= within_s

    async def fetch(self, category: str, window: int) -> PopularList | None:
        try:
            response = await self.stub.GetPopularItems(
                feature_pb2.GetPopularItemsRequest(
                    k=self.size,
                    category=category,
                    window=window,  # type: ignore[arg-type]  # an enum field takes its number too
                ),
                timeout=self.deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("popular items (%r, %s) unavailable: %s", category, window, exc.code())
            return None
        self.last_success = time.monotonic()
        entry = PopularList(time.monotonic(), [(p.item_id, p.score) for p in response.items])
        self.lists[(category, window)] = entry
        return entry

    def _refresh_later(self, key: tuple[str, int]) -> None:
        if key in self._refreshing:
            return
        self._refreshing.add(key)

        async def refresh() -> None:
            try:
                await self.fetch(*key)
            finally:
                self._refreshing.discard(key)

        task = asyncio.create_task(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def get(self, category: str, window: int) -> list[tuple[str, float]] | None:
        """The cached list (refreshed behind the request when stale); None if never obtainable."""
        key = (category, window)
        entry = self.lists.get(key)
        if entry is None:
            entry = await self.fetch(category, window)
            return entry.items if entry is not None else None
        if time.monotonic() - entry.fetched_at > self.ttl_s:
            self._refresh_later(key)
        return entry.items

    async def ranked(self, category: str) -> list[tuple[str, float, str]] | None:
        """Trending items first, then all-time popular ones: (item id, score, reason)."""
        trending = await self.get(category, TRENDING)
        overall = await self.get(category, ALL_TIME)
        if trending is None and overall is None:
            return None
        where = f" in {category}" if category else ""
        out: list[tuple[str, float, str]] = []
        seen: set[str] = set()
        for items, reason in (
            (trending or [], f"trending{where} right now"),
            (overall or [], f"popular{where}"),
        ):
            for item_id, score in items:
                if item_id not in seen:
                    seen.add(item_id)
                    out.append((item_id, score, reason))
        return out
