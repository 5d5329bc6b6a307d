"""Wires inference together: the model holder, announcements and polling, the catalogue, the
feature client, health, gRPC."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from freshrec.v1 import inference_pb2, inference_pb2_grpc
from services.inference.batcher import UserTowerBatcher
from services.inference.catalogue import Catalogue, CatalogueFollower
from services.inference.features import FeatureClient, FeatureRouter, PopularCache
from services.inference.forget import InferenceForget
from services.inference.index import ExplorationSettings
from services.inference.policy import RankingSettings, Recommender
from services.inference.reloader import ModelHolder
from services.inference.served import ServedPublisher, ensure_served_stream
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from shared import feature_replicas, gc_tuning
from shared import nats as fnats
from shared.forget import ForgetWorker
from shared.grpc_server import ServiceApp, full_service_name
from shared.model_bucket import ModelBucket
from shared.model_store import ModelStore
from shared.security import make_channel
from shared.signing import load_public_key
from shared.supervise import forever

logger = logging.getLogger(__name__)

SERVICE_NAME = full_service_name(inference_pb2.DESCRIPTOR, "InferenceService")


class InferenceApp(ServiceApp):
    """The running inference service."""

    def __init__(self, settings: InferenceSettings) -> None:
        super().__init__(settings)
        self.settings: InferenceSettings = settings
        self.holder: ModelHolder | None = None
        self.popular: PopularCache | None = None
        self.catalogue: Catalogue | None = None
        self.follower: CatalogueFollower | None = None
        self.serving: bool | None = None

    def has_answer(self) -> bool:
        """A model, or the popularity fallback (the feature service answered recently)."""
        assert self.holder is not None and self.popular is not None
        return self.holder.state is not None or self.popular.available(3 * self.settings.health_interval_s)

    async def start(self) -> None:
        s = self.settings
        faiss.omp_set_num_threads(s.ann.threads)
        threadpool_limits(limits=s.blas_threads, user_api="blas")
        # Model loads run Python in a worker thread; a short switch interval bounds how long they
        # can hold the GIL while a request waits (the default 5 ms shows up in p99 during reloads).
        sys.setswitchinterval(s.gil_switch_interval_s)
        catalogue = self.catalogue = Catalogue()
        public_key = load_public_key(s.verify_key_file) if s.verify_key_file else None
        nc = await fnats.connect(s.nats, name="freshrec-inference")
        bucket, folder = None, s.model_store
        removals: list[Callable[[], Awaitable[Any]]] = []
        if folder is None:
            bucket = await fnats.when_available(
                lambda: ModelBucket.open(nc.jetstream(), replicas=s.nats.stream_replicas),
                what="opening the model bucket",
            )
            folder = s.model_cache or Path(tempfile.mkdtemp(prefix="freshrec-models-"))
            if s.model_cache is None:
                removals.append(partial(asyncio.to_thread, shutil.rmtree, folder, True))
        holder = self.holder = ModelHolder(
            ModelStore(folder),
            s.keep_versions,
            s.onnx_threads,
            catalogue,
            s.ann,
            ExplorationSettings(s.new_item_window_s, s.under_exposed_quantile),
            public_key,
            bucket,
        )
        channel = make_channel(s.feature_addr, s.feature)
        router = FeatureRouter(channel, partial(make_channel, peer=s.feature)) if s.feature_routing else None
        features = FeatureClient(
            channel,
            s.feature_deadline_s,
            batch_size=s.user_lookup_batch,
            max_in_flight=s.user_lookups_in_flight,
            router=router,
        )
        routing: dict[str, Coroutine[Any, Any, None]] = {}
        if router is not None:
            partitions = await feature_replicas.open_bucket(nc.jetstream(), s.nats.stream_replicas)
            routing["feature-partition-map"] = router.follow(partitions)
            removals.append(router.close)
        popular = self.popular = PopularCache(channel, max(s.feature_deadline_s, 0.5), s.popular_ttl_s)
        follower = self.follower = CatalogueFollower(catalogue, nc, channel)
        listed = await follower.list_all()
        logger.info("catalogue: %d items listed from the feature service", listed)
        # Serve the newest live model from the first request on (waiting for JetStream if the store
        # is out of reach: its node down, or leaders being elected after a heal).
        await fnats.when_available(holder.sync_with_store, what="fetching the live model")
        await holder.subscribe(nc)
        gc_tuning.settle()  # the model, catalogue and code loaded: keep collections short and rare
        ranking = RankingSettings(s.ann.exact_limit, s.mmr_candidates, s.exploration_sample)
        tower = UserTowerBatcher(s.user_tower_batch)
        served: ServedPublisher | None = None
        if s.served.enabled:
            await fnats.when_available(
                lambda: ensure_served_stream(nc.jetstream(), s.served, s.retention, s.nats.stream_replicas),
                what="declaring the served-list stream",
            )
            served = ServedPublisher(nc.jetstream(), s.served, s.replica, features.forgotten.holds)

        await self.serve(
            SERVICE_NAME,
            inference_pb2_grpc.add_InferenceServiceServicer_to_server,
            InferenceServicer(
                Recommender(holder, features, popular, ranking, tower, np.random.default_rng()),
                s.limits,
                served,
            ),
            tasks={
                **({"served-lists": served.run()} if served is not None else {}),
                "model-poll": holder.poll(s.poll_interval_s),
                **({"model-watch": holder.watch_bucket()} if bucket is not None else {}),
                **routing,
                "catalogue-follower": follower.run(),
                "catalogue-rebuild": holder.follow_catalogue(s.catalogue_debounce_s),
                "health": self._watch_health(),
                "forget": ForgetWorker(
                    nc.jetstream(),
                    service="inference",
                    replica=s.replica,
                    durable=f"forget-inference-{s.replica}",
                    handle=InferenceForget(nc, holder, features),
                    stream_replicas=s.nats.stream_replicas,
                    inactive_s=s.nats.forget_inactive_s,
                ).run(),
            },
            cleanups=[*removals, nc.drain, channel.close, tower.close],
        )
        await self._update_health()
        logger.info(
            "inference listening on %s:%d, serving model %s",
            s.grpc.host,
            self.port,
            holder.served_version or "none (popularity fallback)",
        )

    async def _update_health(self) -> None:
        assert self.holder is not None and self.popular is not None and self.server is not None
        if self.holder.state is None and not self.has_answer():
            await self.popular.fetch("", 0)  # probe the fallback
        serving = self.has_answer()
        if serving != self.serving:
            self.serving = serving
            await self.server.set_serving(serving)
            if serving:
                logger.info(
                    "health SERVING (model %s)", self.holder.served_version or "none: popularity fallback"
                )
            else:
                logger.warning("health NOT_SERVING: no model loaded and the feature service is unreachable")

    async def _watch_health(self) -> None:
        assert self.holder is not None
        holder = self.holder

        async def after_a_swap_or_a_while() -> None:
            try:
                await asyncio.wait_for(holder.swapped.wait(), self.settings.health_interval_s)
            except TimeoutError:
                pass
            holder.swapped.clear()
            await self._update_health()

        await forever(after_a_swap_or_a_while, logger=logger, failed="health evaluation failed")

    async def stop(self) -> None:
        await super().stop()
        gc_tuning.release()
