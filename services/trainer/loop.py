"""The trainer's main loop: consume, score, learn, export, gate, checkpoint, publish, ack.

Three schedules share this one code path (``--strategy``):

- ``online``: every micro-batch is scored, then learned with one step (plus replayed older
  events); a candidate is exported every ``export_interval_s`` (or ``export_every_events``)
  and judged by the gate: the learner's own prequential figures against the live version's,
  both scored on the same events since the last export, before either learned them.
- ``incremental``: micro-batches are scored and collected; each window is fitted for a few
  epochs (its newest events held out to judge the result against the live version), then
  exported.
- ``periodic``: micro-batches are scored; every ``periodic_interval_s`` the model is retrained
  on the event log (FRESHREC_EVENTS replayed), warm-started from the current weights, judged on
  held-out newest events, then exported. ``TriggerTraining(RETRAIN)`` does the same on demand.

A rejected candidate is stored as ``REJECTED``, never published, and learning continues from
the live version's weights. The live version and its parent are scored beside the learner on
every event; a sustained regression of the live version against its parent rolls it back.

Order of effects for one export (each step survives a crash of the next):
1. the version is written to the model store (atomically: it appears complete or not at all);
2. its weights are saved beside the checkpoint (rollback and promotion continue from them);
3. the checkpoint (weights, optimizer, id maps, histories, replay buffer, stream positions) is
   replaced atomically;
4. the registry records the version (``LIVE`` or ``REJECTED``); for a live one the store's
   ``LIVE`` points at it and the announcement goes out;
5. JetStream gets one ack covering every event and catalogue entry the checkpoint holds.
Events after the checkpoint are redelivered after a crash and learned once (the learner skips
stream sequences it already holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from freshrec.v1 import event_pb2, item_pb2, trainer_pb2
from services.trainer import metrics
from services.trainer.checkpoint import to_bytes
from services.trainer.datasets import item_text
from services.trainer.evaluation import Paired
from services.trainer.export import export_learner
from services.trainer.leadership import Lease, LostLease
from services.trainer.learner import Learner
from services.trainer.registry import (
    LIVE,
    REJECTED,
    CheckpointFile,
    ModelRow,
    NewVersion,
    Registry,
    WeightSnapshots,
    next_version,
)
from services.trainer.replay import Chunks
from services.trainer.settings import TrainerSettings
from services.trainer.state_bucket import StateBucket
from services.trainer.text import TextEncoder
from services.trainer.versions import make_shadow, rebase, snapshot
from shared.forget import RecentlyForgotten
from shared.model_bucket import ModelBucket
from shared.model_store import ModelStore
from shared.nats import (
    ACCEPTED_SUBJECTS,
    CATALOGUE_ACCEPTED_SUBJECT,
    CATALOGUE_STREAM,
    EVENTS_STREAM,
    MODELS_PUBLISHED_SUBJECT,
    RECEIVED_HEADER,
    StreamReader,
    ensure_catalogue_stream,
    fetch_batch,
    follow_stream,
    when_available,
)
from shared.signing import load_private_key
from shared.watermark import watermark_proto

logger = logging.getLogger(__name__)

#: The durable consumer on FRESHREC_CATALOG that versions before ``follow_stream`` used.
OLD_CATALOGUE_CONSUMER = "trainer-catalog"


@dataclass
class Request:
    kind: int
    done: asyncio.Future[ModelRow]


async def read_event_log(
    js: JetStreamContext, up_to: int, batch: int = 2_000
) -> list[tuple[int, event_pb2.Event]]:
    """Replays FRESHREC_EVENTS from its first retained message through ``up_to`` (0: the end)."""
    if up_to <= 0:
        info = await js.stream_info(EVENTS_STREAM)
        up_to = int(info.state.last_seq)
    if up_to <= 0:
        return []
    config = ConsumerConfig(
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=ACCEPTED_SUBJECTS,
        max_ack_pending=10 * batch,
        inactive_threshold=120.0,
    )
    psub = await js.pull_subscribe(ACCEPTED_SUBJECTS, durable=None, stream=EVENTS_STREAM, config=config)
    out: list[tuple[int, event_pb2.Event]] = []
    try:
        while True:
            msgs = await fetch_batch(psub, batch, timeout_s=5.0)
            if not msgs:
                break
            last = 0
            for msg in msgs:
                last = msg.metadata.sequence.stream
                if last <= up_to:
                    out.append((last, event_pb2.Event.FromString(msg.data)))
            await msgs[-1].ack()
            if last >= up_to:
                break
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return out


def aligned_batches(pending: list[Msg], size: int, flush: bool) -> tuple[list[list[Msg]], list[Msg]]:
    """Cuts messages into micro-batches ending at multiples of ``size`` in stream sequence, so a
    replay after a restart forms the same batches; the incomplete tail waits unless ``flush``."""
    batches = []
    while pending:
        boundary = (pending[0].metadata.sequence.stream - 1) // size * size + size
        cut = next((i for i, m in enumerate(pending) if m.metadata.sequence.stream > boundary), len(pending))
        if cut == len(pending) and pending[-1].metadata.sequence.stream < boundary and not flush:
            break
        batches.append(pending[:cut])
        pending = pending[cut:]
    return batches, pending


class TrainerLoop:
    def __init__(
        self,
        settings: TrainerSettings,
        learner: Learner,
        store: ModelStore,
        registry: Registry,
        checkpoint: CheckpointFile,
        snapshots: WeightSnapshots,
        nc: NatsClient,
        js: JetStreamContext,
        text: TextEncoder | None = None,
        bucket: ModelBucket | None = None,
        state: StateBucket | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.settings = settings
        self.learner = learner
        self.store = store
        self.registry = registry
        self.checkpoint = checkpoint
        self.snapshots = snapshots
        self.nc = nc
        self.js = js
        self.text = text
        #: The JetStream model store every version is copied to (None: ``store`` is shared).
        self.bucket = bucket
        #: Where the checkpoint and version weights are mirrored for a standby to take over from.
        self.state = state
        #: The leadership lease (None: the only trainer); checked before anything is published.
        self.lease = lease
        #: One learner call at a time; also serialises every change of the live version.
        self.lock = asyncio.Lock()
        self.requests: asyncio.Queue[Request] = asyncio.Queue()
        self.last_export_at: float = 0.0
        self.last_export_seconds: float = 0.0
        self.window: list[Chunks] = []
        self.window_events = 0
        self.window_started = 0.0
        self.last_retrain = time.monotonic()
        self.strikes = 0
        self.next_watch_check = settings.rollback_min_events
        self.unacked_events: Msg | None = None
        #: The last bootstrap fit's figures (for GetTrainerStatus); ``bootstrapping`` while one runs.
        self.bootstrap_state: dict[str, float] = {}
        self.bootstrapping = False
        self._next_backlog_check = 0.0
        self.signing_key = load_private_key(settings.signing_key_file) if settings.signing_key_file else None
        #: Users just forgotten (memory only): events of theirs still on their way are forgotten again.
        self.forgotten = RecentlyForgotten()

    # -- start -----------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Rebuilds the shadows (live version and its parent) from their saved weights."""
        live = await asyncio.to_thread(self.registry.live)
        if live is not None:
            async with self.lock:
                await asyncio.to_thread(self._load_shadows, live.version, live.parent_version)
            metrics.LIVE_TRAINED_THROUGH.set(live.trained_through_time)

    def _load_shadows(self, live: str, parent: str) -> None:
        self.learner.shadows = {}
        self.learner.shadow_figures = {}
        for role, version in (("live", live), ("parent", parent)):
            weights = self.snapshots.load(version)
            if weights is not None:
                self.learner.shadows[role] = make_shadow(self.learner, version, weights)

    def _ack_wait_s(self) -> float:
        s = self.settings
        longest = s.export_interval_s
        if s.strategy == "incremental":
            longest = max(longest, s.incremental_window_s)
        return max(60.0, 3 * longest)

    async def run(self) -> None:
        await self.prepare()
        reader = StreamReader(self.js, self.settings.consumer_name, ack_wait_s=self._ack_wait_s())
        # Seated at the position the checkpoint holds: events after it are learned exactly once.
        await when_available(
            lambda: reader.seat(self.learner.position.stream_sequence),
            what="seating the trainer on the event stream",
        )
        catalogue = asyncio.create_task(self.follow_catalogue(), name="trainer-catalogue")
        try:
            await self._consume(reader)
        finally:
            while not self.requests.empty():  # asked of a loop that stops: answer, do not hang
                waiting = self.requests.get_nowait()
                if not waiting.done.done():
                    waiting.done.set_exception(LostLease("this trainer stopped leading before it could"))
            catalogue.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await catalogue
            await reader.close()

    # -- the event stream ------------------------------------------------------------------
    async def _consume(self, reader: StreamReader) -> None:
        s = self.settings
        since_export = 0
        since_checkpoint = 0
        last_tick = time.monotonic()
        pending: list[Msg] = []
        reseat = False
        while True:
            try:
                if reseat:  # the learner's state is consistent: from its position nothing is lost
                    async with self.lock:
                        position = self.learner.position.stream_sequence
                    await reader.seat(position)
                    pending, reseat = [], False
                up_to = await self._backlog_to_fit()
                if up_to:
                    await self.bootstrap(up_to)
                    since_export = since_checkpoint = 0
                    last_tick = time.monotonic()
                    reseat = True
                    continue
                msgs = await reader.fetch(s.micro_batch, timeout_s=s.micro_batch_wait_s)
            except Exception:
                # NATS trouble: the learner's state is consistent, so go on from its position.
                logger.exception("fetching events failed; re-seating after the learner's position")
                await asyncio.sleep(1.0)
                reseat = True
                continue
            batches, pending = aligned_batches(pending + msgs, s.micro_batch, flush=not msgs)
            for part in batches:
                batch = [(m.metadata.sequence.stream, event_pb2.Event.FromString(m.data)) for m in part]
                calls = [int((m.headers or {}).get(RECEIVED_HEADER, 0) or 0) for m in part]
                async with self.lock:
                    learned = await asyncio.to_thread(self._learn, batch, calls)
                    self.unacked_events = part[-1]
                    if self.forgotten:
                        late = [e.user_id for _, e in batch if self.forgotten.holds(e.user_id)]
                        if late:
                            # Accepted just before the tombstone: learned, and forgotten again at once.
                            await asyncio.to_thread(self.learner.forget_users, late)
                since_export += learned
                since_checkpoint += learned
            request = None if self.requests.empty() else self.requests.get_nowait()
            now = time.monotonic()
            try:
                if request is not None:
                    await self._serve(request)
                    since_export = since_checkpoint = 0
                    last_tick = time.monotonic()
                    continue
                await self._watch_live()
                if s.strategy == "online":
                    if since_export and (
                        now - last_tick >= s.export_interval_s or since_export >= s.export_every_events
                    ):
                        await self.export()
                        since_export = since_checkpoint = 0
                        last_tick = time.monotonic()
                elif (
                    s.strategy == "incremental"
                    and self.window
                    and (
                        self.window_events >= s.incremental_window_events
                        or now - self.window_started >= s.incremental_window_s
                    )
                ):
                    paired = await self.fit_window()
                    await self.export(paired, reason="incremental")
                    since_export = since_checkpoint = 0
                    last_tick = time.monotonic()
                elif (
                    s.strategy == "periodic"
                    and since_export
                    and now - self.last_retrain >= s.periodic_interval_s
                ):
                    paired = await self.retrain()
                    await self.export(paired, reason="retrained")
                    since_export = since_checkpoint = 0
                    last_tick = time.monotonic()
                elif since_checkpoint and now - last_tick >= s.export_interval_s:
                    async with self.lock:
                        await self._ack(await self._save_checkpoint())
                    since_checkpoint = 0
                    last_tick = time.monotonic()
            except LostLease as exc:
                if request is not None and not request.done.done():
                    request.done.set_exception(exc)
                raise
            except Exception as exc:
                logger.exception("training step failed; retrying at the next interval")
                if request is not None and not request.done.done():
                    request.done.set_exception(exc)
                last_tick = time.monotonic()

    def _learn(self, batch: list[tuple[int, event_pb2.Event]], calls: list[int] | None = None) -> int:
        """Scores and learns one micro-batch (in a worker thread, under the lock)."""
        start = time.perf_counter()
        learner = self.learner
        observation = learner.observe(batch, calls=calls)
        if observation.chunks is not None:
            if self.settings.strategy == "online":
                learner.train_step(observation.chunks)
            elif self.settings.strategy == "incremental":
                if not self.window:
                    self.window_started = time.monotonic()
                self.window.append(observation.chunks)
        if self.settings.strategy == "incremental":
            self.window_events += observation.events
        if observation.events:
            metrics.EVENTS_LEARNED.inc(observation.events)
            metrics.BATCH_SECONDS.observe(time.perf_counter() - start)
            metrics.publish_prequential(learner.prequential.as_metrics())
            metrics.STREAM_SEQUENCE.set(learner.position.stream_sequence)
            metrics.EVENT_TIME.set(learner.position.event_time)
            metrics.TABLE_ROWS.labels("items").set(len(learner.items))
            metrics.TABLE_ROWS.labels("users").set(len(learner.users))
            metrics.SKIPPED_STEPS.set(learner.skipped_steps)
        return observation.events

    async def _backlog_to_fit(self) -> int:
        """The stream's last sequence when the model is young relative to the retained log (the
        events waiting outnumber those it has learned, and there are enough of them); else 0."""
        s = self.settings
        now = time.monotonic()
        if not s.bootstrap or now < self._next_backlog_check:
            return 0
        self._next_backlog_check = now + 2.0
        info = await self.js.stream_info(EVENTS_STREAM)
        last = int(info.state.last_seq)
        position = self.learner.position
        backlog = last - position.stream_sequence
        if backlog >= s.bootstrap_min_events and backlog >= position.events_learned:
            return last
        return 0

    async def bootstrap(self, up_to: int) -> ModelRow:
        """Fits the retained log through ``up_to`` in epochs (warm-started from the current weights),
        the users' last events held out to decide when to stop, then exports; online learning goes
        on from there. The events after the learner's position are folded in without being scored."""
        s = self.settings
        self.bootstrapping = True
        start = time.perf_counter()
        try:
            events = await read_event_log(self.js, up_to)
            known = self.learner.position.events_learned
            logger.info(
                "bootstrapping: the model has learned %d events and %d more wait in the log; fitting "
                "all %d in epochs (at most %d) before learning online",
                known,
                up_to - self.learner.position.stream_sequence,
                len(events),
                s.bootstrap_max_epochs,
            )

            def progress(epoch: int, epochs: int, hr: float) -> None:
                logger.info("bootstrap epoch %d/%d: held-out HR@10 %.4f", epoch, epochs, hr)

            def work() -> tuple[int, float, Paired | None]:
                learner = self.learner
                learner.absorb_events(
                    [(seq, e) for seq, e in events if seq > learner.position.stream_sequence]
                )
                chunks = learner.sequence_chunks(learner.log_sequences(events), context=s.pretrain_context)
                holdout = min(5_000, chunks.n_targets // 10)
                return learner.fit_until_stale(chunks, s.bootstrap_max_epochs, holdout, progress=progress)

            async with self.lock:
                epochs, hr, paired = await asyncio.to_thread(work)
            seconds = time.perf_counter() - start
            self.bootstrap_state = {
                "bootstrap_events": float(len(events)),
                "bootstrap_epochs": float(epochs),
                "bootstrap_holdout_hr@10": hr,
                "bootstrap_seconds": seconds,
            }
            metrics.RETRAIN_SECONDS.observe(seconds)
            logger.info(
                "bootstrap done: %d events, %d epochs kept (held-out HR@10 %.4f), %.1fs",
                len(events),
                epochs,
                hr,
                seconds,
            )
            return await self.export(paired, reason="bootstrapped")
        finally:
            self.bootstrapping = False

    async def fit_window(self) -> Paired | None:
        """Incremental: fits the collected window, its newest events held out to judge it."""
        s = self.settings

        def work() -> Paired | None:
            chunks = Chunks.concat(self.window)
            self.window = []
            self.window_events = 0
            holdout = min(s.gate_holdout_events, chunks.n_targets // 5)
            return self.learner.gated_fit(chunks, s.incremental_epochs, holdout, replay_ratio=s.replay_ratio)

        start = time.perf_counter()
        async with self.lock:
            paired = await asyncio.to_thread(work)
        metrics.RETRAIN_SECONDS.observe(time.perf_counter() - start)
        return paired

    async def retrain(self) -> Paired | None:
        """Retrains on the event log (warm-started from the current weights), newest events held out."""
        s = self.settings
        start = time.perf_counter()
        async with self.lock:
            up_to = self.learner.position.stream_sequence
        events = await read_event_log(self.js, up_to)
        logger.info("retraining on %d events of the log (%d epochs)", len(events), s.retrain_epochs)

        def progress(epoch: int, epochs: int, loss: float) -> None:
            logger.info("retrain epoch %d/%d, loss %.4f", epoch, epochs, loss)

        def work() -> Paired | None:
            learner = self.learner
            chunks = learner.sequence_chunks(learner.log_sequences(events), context=s.pretrain_context)
            holdout = min(s.gate_holdout_events, chunks.n_targets // 5)
            return learner.gated_fit(chunks, s.retrain_epochs, holdout, progress=progress)

        async with self.lock:
            paired = await asyncio.to_thread(work)
        self.last_retrain = time.monotonic()
        metrics.RETRAIN_SECONDS.observe(time.perf_counter() - start)
        return paired

    # -- requests (TriggerTraining) --------------------------------------------------------
    async def request(self, kind: int) -> ModelRow:
        """Asks the loop for an export (or a retrain and an export) and waits for the result."""
        request = Request(kind, asyncio.get_running_loop().create_future())
        await self.requests.put(request)
        return await request.done

    async def _serve(self, request: Request) -> None:
        if request.kind == trainer_pb2.TRAINING_KIND_RETRAIN:
            row = await self.export(await self.retrain(), reason="retrained")
        else:
            row = await self.export()
        if not request.done.done():
            request.done.set_result(row)

    # -- exports ---------------------------------------------------------------------------
    async def _forget_what_the_log_dropped(self) -> None:
        """With a retention set, forgets (before each export, under the lock) the users whose
        every event has left FRESHREC_EVENTS, which ingestion keeps for the retention."""
        if self.settings.retention.events is None:
            return
        try:
            first = int((await self.js.stream_info(EVENTS_STREAM)).state.first_seq)
        except Exception as exc:
            logger.warning("retention: could not read where the event log begins (%s); next export", exc)
            return
        forgotten = await asyncio.to_thread(self.learner.forget_users_before, first)
        if forgotten:
            metrics.USERS_FORGOTTEN.labels("retention").inc(forgotten)
            logger.info(
                "retention: forgot %d users with no event left in the log (it begins at %d)", forgotten, first
            )

    async def export(
        self, judged: Paired | None = None, reason: str = "published", *, force: bool = False
    ) -> ModelRow:
        """Exports a candidate, judges it against the live version, publishes or rejects it
        (``force``: publishes it whatever the gate says, as a forget request needs)."""
        s = self.settings
        learner = self.learner
        async with self.lock:
            live = await asyncio.to_thread(self.registry.live)
            parent = live.version if live else None
            expired_items, expired_users = await asyncio.to_thread(learner.expire)
            metrics.EXPIRED.labels("items").inc(expired_items)
            metrics.EXPIRED.labels("users").inc(expired_users)
            await self._forget_what_the_log_dropped()
            try:
                exported = await asyncio.to_thread(export_learner, learner, parent, item_tower=s.item_tower)
            except Exception:
                metrics.EXPORTS.labels("failed").inc()
                raise
            if judged is None and s.strategy == "online":
                judged = learner.gate
            manifest = exported.manifest
            rejected = not force and bool(
                s.gate
                and live is not None
                and judged is not None
                and judged.worse(s.gate_tolerance, s.gate_min_events)
            )
            if judged is not None and judged.n:
                manifest["metrics"].update(
                    {
                        "gate_events": float(judged.n),
                        "gate_candidate_hr@10": judged.mean_a,
                        "gate_live_hr@10": judged.mean_b,
                    }
                )
            known = [*await asyncio.to_thread(self.registry.versions), *self.store.list_versions()]
            version = next_version(known)
            stored = await asyncio.to_thread(
                self.store.write_version, version, exported.files, manifest, self.signing_key
            )
            if self.bucket is not None:
                await self.bucket.put_version(stored)
            weights = await asyncio.to_thread(snapshot, learner)
            await asyncio.to_thread(self.snapshots.save, version, weights)
            if rejected and live is not None:
                live_weights = await asyncio.to_thread(self.snapshots.load, live.version)
                if live_weights is not None:
                    await asyncio.to_thread(rebase, learner, live_weights)
            learner.gate = Paired()
            ackable = await self._save_checkpoint()
            trained = manifest["trained_through"]
            new = NewVersion(
                version=version,
                parent_version=parent or "",
                sha256=stored.manifest["sha256"],
                metrics=manifest["metrics"],
                trained_through_sequence=trained["stream_sequence"],
                trained_through_time=trained["event_time"],
            )
            if rejected:
                row = await asyncio.to_thread(self.registry.add, new, REJECTED)
                metrics.EXPORTS.labels("rejected").inc()
                logger.warning(
                    "rejected candidate %s: hr@10 %.4f against the live %s's %.4f on %d events",
                    version,
                    judged.mean_a if judged else 0.0,
                    parent,
                    judged.mean_b if judged else 0.0,
                    judged.n if judged else 0,
                )
            else:
                row = await asyncio.to_thread(self.registry.add, new, LIVE)
                await self.set_live(version)
                previous_live = learner.shadows.get("live")
                shadow = await asyncio.to_thread(make_shadow, learner, version, weights)
                learner.shadows = {"live": shadow, **({"parent": previous_live} if previous_live else {})}
                learner.shadow_figures = {}
                self._reset_watch()
                await self.announce(row, reason)
                metrics.EXPORTS.labels("published").inc()
                metrics.LIVE_TRAINED_THROUGH.set(row.trained_through_time)
                logger.info(
                    "published model %s (%d events learned, export %.2fs)",
                    version,
                    learner.position.events_learned,
                    exported.seconds,
                    extra={"model_version": version},
                )
            await self._ack(ackable)
            keep = {version, parent or "", live.parent_version if live else ""}
            await asyncio.to_thread(self.snapshots.prune, s.keep_versions, keep)
            await self._prune_versions(keep)
        metrics.EXPORT_SECONDS.observe(exported.seconds)
        self.last_export_at = time.time()
        self.last_export_seconds = exported.seconds
        return row

    async def _save_checkpoint(self) -> Msg | None:
        """Writes the checkpoint (lock held); returns the last event it covers, to ack afterwards."""
        data = await asyncio.to_thread(to_bytes, self.learner)
        ackable, self.unacked_events = self.unacked_events, None
        await asyncio.to_thread(self.checkpoint.save, data)
        await self.mirror_state()
        return ackable

    async def mirror_state(self) -> None:
        """Copies the checkpoint folder to the state bucket (while this trainer still leads)."""
        if self.lease is not None:
            await self.lease.renew()  # LostLease: another trainer leads, write nothing more
        if self.state is not None:
            await self.state.mirror(self.checkpoint.path.parent)

    async def _ack(self, ackable: Msg | None) -> None:
        if ackable is None:
            return
        try:
            await ackable.ack()
        except Exception as exc:
            # Redelivered events are skipped by the learner: a lost ack only costs a re-read.
            logger.warning("ack failed: %s", exc)

    # -- the live version ------------------------------------------------------------------
    def _reset_watch(self) -> None:
        self.learner.watch = Paired()
        self.strikes = 0
        self.next_watch_check = self.settings.rollback_min_events

    async def _watch_live(self) -> None:
        """Rolls back to the parent when the live version trails it, check after check."""
        s = self.settings
        watch = self.learner.watch
        if "parent" not in self.learner.shadows or watch.n < self.next_watch_check:
            return
        self.next_watch_check = watch.n + s.rollback_min_events
        self.strikes = self.strikes + 1 if watch.worse(s.rollback_tolerance, s.rollback_min_events) else 0
        if self.strikes < s.rollback_patience:
            return
        live = await asyncio.to_thread(self.registry.live)
        if live is None or not live.parent_version:
            return
        logger.warning(
            "live %s trails its parent %s (hr@10 %.4f against %.4f over %d events): rolling back",
            live.version,
            live.parent_version,
            watch.mean_a,
            watch.mean_b,
            watch.n,
        )
        await self.make_live(live.parent_version, "rolled_back_regression")

    async def set_live(self, version: str) -> None:
        """Points LIVE at ``version``: in the folder, then (with a bucket) in the bucket's KV."""
        if self.lease is not None:
            await self.lease.renew()  # LostLease: another trainer leads, publish nothing
        await asyncio.to_thread(self.store.set_live, version)
        if self.bucket is not None:
            await self.bucket.set_live(version)

    async def remove_version(self, version: str) -> None:
        """Deletes a version's artifacts from the folder and the bucket (not its registry row)."""
        await asyncio.to_thread(self.store.remove_version, version)
        if self.bucket is not None:
            await self.bucket.remove_version(version)

    async def _prune_versions(self, keep: set[str]) -> None:
        """Keeps the newest ``keep_versions`` artifacts and those named in ``keep``; a pruned version
        stays listed in the registry, and promoting it answers that its artifacts are gone."""
        versions = await asyncio.to_thread(self.store.list_versions)
        for version in versions[: -self.settings.keep_versions]:
            if version not in keep:
                await self.remove_version(version)
                logger.info("pruned the artifacts of model %s", version, extra={"model_version": version})

    async def make_live(self, version: str, reason: str) -> tuple[ModelRow, str]:
        """Promotion and rollback: verify the artifact, move the registry and LIVE, announce, and
        continue learning from that version's weights."""
        async with self.lock:
            stored = await asyncio.to_thread(self.store.open_verified, version)
            if self.bucket is not None and not await self.bucket.has_version(version):
                await self.bucket.put_version(stored)  # uploaded before a crash, or removed by hand
            row, previous = await asyncio.to_thread(self.registry.make_live, version)
            await self.set_live(version)
            await self.announce(row, reason)
            weights = await asyncio.to_thread(self.snapshots.load, version)
            if weights is not None:
                await asyncio.to_thread(rebase, self.learner, weights)
                await asyncio.to_thread(self._load_shadows, version, row.parent_version)
            else:
                logger.warning(
                    "no saved weights for %s: learning continues from the current weights", version
                )
                self.learner.shadows = {}
            self.learner.gate = Paired()
            self._reset_watch()
            await self._ack(await self._save_checkpoint())
            metrics.ROLLBACKS.labels(reason).inc()
            metrics.LIVE_TRAINED_THROUGH.set(row.trained_through_time)
            return row, previous

    async def announce(self, row: ModelRow, reason: str) -> None:
        announcement = trainer_pb2.ModelAnnouncement(
            version=row.version,
            sha256=row.sha256,
            reason=reason,
            trained_through=watermark_proto(row.trained_through_sequence, row.trained_through_time),
        )
        try:
            # No flush(timeout) here: in nats-py a flush that times out leaves a cancelled PONG
            # future behind, and the late PONG then breaks the client's read loop (seen with the
            # server frozen). The publish is buffered and sent on reconnection; the store poll
            # covers an announcement that never arrives.
            await self.nc.publish(MODELS_PUBLISHED_SUBJECT, announcement.SerializeToString())
        except Exception as exc:
            # Inference also polls the store's LIVE pointer, so a lost announcement only delays.
            logger.warning("announcing %s failed: %s", row.version, exc)

    # -- the catalogue ---------------------------------------------------------------------
    async def _remove_old_catalogue_consumer(self) -> None:
        """Deletes the durable consumer earlier versions read the catalogue through (it would keep
        a growing pending count on the server for ever); nothing to do where it never existed."""
        try:
            await self.js.delete_consumer(CATALOGUE_STREAM, OLD_CATALOGUE_CONSUMER)
            logger.info("removed the catalogue consumer %s of an earlier version", OLD_CATALOGUE_CONSUMER)
        except NotFoundError:
            pass
        except Exception as exc:  # NATS not reachable yet: the next start tries again
            logger.debug("could not remove %s: %s", OLD_CATALOGUE_CONSUMER, exc)

    async def follow_catalogue(self) -> None:
        """Content features from FRESHREC_CATALOG (published by the feature service), from the
        catalogue position the checkpoint holds."""

        async def position() -> int:
            # The feature service owns the stream; declaring it here lets the trainer start first.
            await ensure_catalogue_stream(self.js, replicas=self.settings.nats.stream_replicas)
            async with self.lock:
                return self.learner.position.catalogue_sequence

        async def apply(msgs: list[Msg]) -> None:
            items = []
            for msg in msgs:
                try:
                    items.append((msg.metadata.sequence.stream, item_pb2.Item.FromString(msg.data)))
                except Exception as exc:  # protobuf raises DecodeError; skip what is not an Item
                    logger.warning("skipping a catalogue message that is not an Item: %s", exc)
            text = None
            if self.text is not None and self.learner.config.model.text_dim and items:
                text = await asyncio.to_thread(self.text.encode, [item_text(i) for _, i in items])
            async with self.lock:
                await asyncio.to_thread(self.learner.add_items, items, text)

        await self._remove_old_catalogue_consumer()
        await follow_stream(
            self.js,
            CATALOGUE_STREAM,
            CATALOGUE_ACCEPTED_SUBJECT,
            position=position,
            apply=apply,
            name="trainer",
            batch=256,
        )
