"""Wires the feature service together: SQL, the in-memory state, the consumers and the gRPC server."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from nats.js import JetStreamContext

from freshrec.v1 import feature_pb2, feature_pb2_grpc
from services.feature import metrics
from services.feature.catalogue import Catalogue, CatalogueFollower, CatalogueIntake, ensure_intake_streams
from services.feature.consumer import FeatureConsumer
from services.feature.forget import FeatureForget
from services.feature.rebuild import MIGRATIONS, VERSION_TABLE
from services.feature.retention import expire_users
from services.feature.servicer import FeatureServicer
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared import feature_replicas, gc_tuning
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.forget import ForgetWorker
from shared.grpc_server import ServiceApp, advertised_host, full_service_name
from shared.supervise import forever

logger = logging.getLogger(__name__)


SERVICE_NAME = full_service_name(feature_pb2.DESCRIPTOR, "FeatureService")


class FeatureApp(ServiceApp):
    """The running feature service."""

    def __init__(self, settings: FeatureSettings) -> None:
        super().__init__(settings)
        self.settings: FeatureSettings = settings
        self.state: FeatureState | None = None
        self.consumer: FeatureConsumer | None = None
        self.catalogue: Catalogue | None = None
        self.forget: ForgetWorker | None = None
        self.announcer: feature_replicas.Announcer | None = None

    async def start(self) -> None:
        s = self.settings
        engine = make_engine(s.database)
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        store = FeatureStore(make_sessionmaker(engine), s.replica_name)
        state = self.state = FeatureState(s.recent_items, s.preprocessing, s.popularity, s.seen_items)
        await asyncio.to_thread(store.load, state)
        # Under live load at 5,000 events/s this took full collections from one every few
        # seconds (50-250 ms each) to none in a 30 s benchmark run.
        gc_tuning.settle()
        metrics.USERS.set(len(state.users))
        metrics.ITEMS.set(len(state.items))
        logger.info(
            "feature replica %s loaded: %d users, %d items, stream position %d",
            s.replica_name,
            len(state.users),
            len(state.items),
            state.watermark.stream_sequence,
        )

        nc = await fnats.connect(s.nats, name=f"freshrec-feature-{s.replica_name}")
        js = nc.jetstream()
        await fnats.ensure_events_stream(js, replicas=s.nats.stream_replicas)
        await fnats.ensure_catalogue_stream(js, owner=True, replicas=s.nats.stream_replicas)
        await ensure_intake_streams(js, s.nats.stream_replicas)
        catalogue = self.catalogue = Catalogue(nc, js, store, state, s.catalogue)
        consumer = self.consumer = FeatureConsumer(nc, js, state, store, s)
        follower = CatalogueFollower(js, store, state, f"{s.replica_name}:catalog")
        intake = CatalogueIntake(js, catalogue)
        forget = self.forget = ForgetWorker(
            js,
            service="feature",
            replica=s.replica_name,
            durable=f"forget-{s.replica_name}",
            handle=FeatureForget(js, consumer, store, engine, s.replica_name),
            stream_replicas=s.nats.stream_replicas,
            inactive_s=s.nats.forget_inactive_s,
        )

        partitions = await feature_replicas.open_bucket(js, s.nats.stream_replicas)
        announcer = self.announcer = feature_replicas.Announcer(
            partitions, s.replica_name, "", s.partition.replica, s.partition.replicas
        )

        await self.serve(
            SERVICE_NAME,
            feature_pb2_grpc.add_FeatureServiceServicer_to_server,
            FeatureServicer(state, store, catalogue, s),
            tasks={
                "feature-consumer": consumer.run(),
                "feature-catalogue-follower": follower.run(),
                "feature-catalogue-intake": intake.run(),
                "feature-catalogue-relay": catalogue.relay(s.catalogue.relay_interval_s),
                "feature-forget": forget.run(),
                "feature-announce": self._announce_forever(js, announcer, consumer),
                **({"feature-retention": self._expire_forever(state)} if s.retention.events else {}),
            },
            cleanups=[nc.drain, partial(asyncio.to_thread, engine.dispose), announcer.withdraw],
        )
        announcer.address = s.advertise_addr or f"{advertised_host(s.grpc.host)}:{self.port}"
        logger.info(
            "feature listening on %s:%d (in the partition map as %s)",
            s.grpc.host,
            self.port,
            announcer.address,
        )

    async def _announce_forever(
        self, js: JetStreamContext, announcer: feature_replicas.Announcer, consumer: FeatureConsumer
    ) -> None:
        """Keeps this replica in the partition map, saying whether it has read the stream to its end
        (then lookups for its partitions come here rather than to an older owner)."""
        name = self.settings.replica_name

        async def announce() -> None:
            caught_up = False
            if consumer.ready.is_set() and announcer.address:
                info = await js.consumer_info(fnats.EVENTS_STREAM, name)
                caught_up = not info.num_pending
            await announcer.put(caught_up)

        await forever(
            announce,
            logger=logger,
            failed="announcing this replica in the partition map failed; retrying",
            every_s=feature_replicas.ANNOUNCE_EVERY_S,
        )

    async def _expire_forever(self, state: FeatureState) -> None:
        retention = self.settings.retention
        await forever(
            lambda: expire_users(state, retention),
            logger=logger,
            failed="retention sweep of the user histories failed; retrying",
            every_s=retention.sweep_interval_s,
        )

    async def stop(self) -> None:
        await super().stop()
        gc_tuning.release()
