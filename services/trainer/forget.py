"""The trainer's share of forgetting a user: the learner, the checkpoint, every model version.

Once the trainer has learned every event from before the request, the user goes from every
per-user table of the learner (``Learner.forget_users``: id row with its optimizer moments,
histories, seen items, replay chunks, preprocessing state), under the loop's lock. Then a new
version is exported and made live whatever the quality gate says (its checkpoint holds nothing
of the user), and every older version whose ``user_ids.json`` names the user is withdrawn: its
folder leaves the model store, its row the registry, its weights the trainer's snapshots, so
neither a rollback nor a promotion can bring it back; inference serves the new version (the
announcement, or the store's LIVE pointer) and never finds the old ones again.
"""

from __future__ import annotations

import asyncio
import json
import logging

from freshrec.v1 import ingestion_pb2
from services.trainer import metrics
from services.trainer.export import USER_IDS
from services.trainer.loop import TrainerLoop
from shared.model_store import ModelStore
from shared.nats import EVENTS_STREAM

logger = logging.getLogger(__name__)


def versions_holding(store: ModelStore, user_id: str) -> list[str]:
    """The stored versions whose user table names ``user_id`` (an unreadable one counts as holding)."""
    holding = []
    for version in store.list_versions():
        try:
            users = json.loads((store.versions_dir / version / USER_IDS).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            holding.append(version)
            continue
        if user_id in users:
            holding.append(version)
    return holding


class TrainerForget:
    def __init__(self, loop: TrainerLoop) -> None:
        self.loop = loop
        #: Per request, the stream position the learner must reach first (memory only).
        self.targets: dict[str, int] = {}

    async def __call__(self, task: ingestion_pb2.ForgetTask) -> str | None:
        loop = self.loop
        user_id = task.user_id
        if task.request_id not in self.targets:
            info = await loop.js.stream_info(EVENTS_STREAM)
            self.targets[task.request_id] = int(info.state.last_seq or 0)
        if loop.learner.position.stream_sequence < self.targets[task.request_id]:
            # The last messages may have been erased before the learner read them: then its
            # consumer has nothing pending.
            info = await loop.js.consumer_info(EVENTS_STREAM, loop.settings.consumer_name)
            if info.num_pending:
                return None  # events from before the request are still to be learned: forget after them
        loop.forgotten.add(user_id)
        async with loop.lock:
            held = await asyncio.to_thread(loop.learner.forget_users, [user_id])
        holding = await asyncio.to_thread(versions_holding, loop.store, user_id)
        if not held and not holding:
            self.targets.pop(task.request_id, None)
            return "user not held; no version holds them"
        row = await loop.export(reason="forgotten", force=True)
        if row.version in await asyncio.to_thread(versions_holding, loop.store, user_id):
            return None  # learned again in between (cannot happen while the tombstone holds): again
        withdrawn = [v for v in holding if v != row.version]
        async with loop.lock:
            for version in withdrawn:
                await loop.remove_version(version)
                await asyncio.to_thread(loop.snapshots.remove, version)
            await asyncio.to_thread(loop.registry.withdraw, withdrawn)
            await loop.mirror_state()  # the withdrawn versions' weights leave the state bucket too
            # The parent's weights held the user: the rollback watch has nothing to go back to.
            loop.learner.shadows.pop("parent", None)
        self.targets.pop(task.request_id, None)
        metrics.USERS_FORGOTTEN.labels("request").inc(held)
        logger.info(
            "forget request %s: %s live, %d older versions withdrawn",
            task.request_id,
            row.version,
            len(withdrawn),
            extra={"model_version": row.version},
        )
        return (
            f"user {'held' if held else 'not held'}; {row.version} live; {len(withdrawn)} versions withdrawn"
        )
