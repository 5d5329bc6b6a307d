"""Which feature replica owns which users: the partition map, on a JetStream KV bucket.

Every feature replica puts an entry under its name in KV bucket ``FRESHREC_FEATURE_REPLICAS``
every :data:`ANNOUNCE_EVERY_S` (entries expire after :data:`ENTRY_TTL_S`, so a replica that died
drops out of the map on its own; one that stops deletes its entry): the address clients reach it at,
its layout (replica *i* of *n* owns the user partitions *p* with *p* mod *n* = *i*, see
``shared.nats.user_partition``), whether it has caught up with the event stream, and when it
started. Inference watches the bucket and sends each user lookup to its partition's owner.

The owner of a partition is, among the live replicas whose layout covers it, the most recently
started one that has caught up; if none has, the longest-running one. So when replicas are added
or the layout changes (1 → 3 replicas and back), the old owners keep answering for a partition
until a new owner has read the stream up to its end, then lookups move to it, and the old
replicas can be stopped: no lookup goes to a replica still building its state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from shared.nats import EVENT_PARTITIONS, bind_key_value, user_partition

logger = logging.getLogger(__name__)

REPLICAS_BUCKET = "FRESHREC_FEATURE_REPLICAS"
#: How often a replica rewrites its entry, and how long an entry outlives the last rewrite.
ANNOUNCE_EVERY_S = 2.0
ENTRY_TTL_S = 10.0


@dataclass(frozen=True)
class ReplicaEntry:
    """One feature replica as the map sees it."""

    name: str
    address: str
    replica: int
    replicas: int
    caught_up: bool
    started_at: float

    def owns(self, partition: int) -> bool:
        return partition % self.replicas == self.replica

    def encode(self) -> bytes:
        return json.dumps(
            {
                "address": self.address,
                "replica": self.replica,
                "replicas": self.replicas,
                "caught_up": self.caught_up,
                "started_at": self.started_at,
            }
        ).encode()

    @classmethod
    def decode(cls, name: str, data: bytes) -> ReplicaEntry | None:
        try:
            v = json.loads(data)
            entry = cls(
                name,
                str(v["address"]),
                int(v["replica"]),
                int(v["replicas"]),
                bool(v["caught_up"]),
                float(v["started_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if not entry.address or not 0 <= entry.replica < entry.replicas <= EVENT_PARTITIONS:
            return None
        return entry


async def open_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    config = KeyValueConfig(
        bucket=REPLICAS_BUCKET,
        description="freshrec feature replicas and the user partitions they own",
        history=1,
        ttl=ENTRY_TTL_S,
        storage=StorageType.MEMORY,
        replicas=replicas,
    )
    return await bind_key_value(js, config)


def owners(entries: list[ReplicaEntry]) -> dict[int, ReplicaEntry]:
    """Partition → the replica that answers for it (see the module docstring); partitions no
    live replica covers are absent."""
    chosen: dict[int, ReplicaEntry] = {}
    for partition in range(EVENT_PARTITIONS):
        covering = [e for e in entries if e.owns(partition)]
        ready = [e for e in covering if e.caught_up]
        if ready:
            chosen[partition] = max(ready, key=lambda e: (e.started_at, e.name))
        elif covering:
            chosen[partition] = min(covering, key=lambda e: (e.started_at, e.name))
    return chosen


class PartitionMap:
    """The live entries and the owner of each partition, kept current by :meth:`watch`."""

    def __init__(self) -> None:
        self.entries: dict[str, ReplicaEntry] = {}
        self.owner: dict[int, ReplicaEntry] = {}
        #: Bumped at every change of an owner, so users of the map can tell it moved.
        self.revision = 0

    def address_for(self, user_id: str) -> str | None:
        entry = self.owner.get(user_partition(user_id))
        return entry.address if entry is not None else None

    def apply(self, name: str, data: bytes | None) -> bool:
        """One KV update (None or empty: the entry is gone); True if an owner changed."""
        entry = ReplicaEntry.decode(name, data) if data else None
        if entry is None:
            self.entries.pop(name, None)
        else:
            self.entries[name] = entry
        new = owners(list(self.entries.values()))
        if {p: e.address for p, e in new.items()} == {p: e.address for p, e in self.owner.items()}:
            self.owner = new
            return False
        self.owner = new
        self.revision += 1
        return True

    async def watch(self, kv: KeyValue, changed: Callable[[PartitionMap], None] | None = None) -> None:
        """Follows the bucket for ever (an entry that expires arrives as a deletion)."""
        watcher = await kv.watchall()
        try:
            async for update in watcher:
                if update is None:  # the initial values are all in
                    continue
                if self.apply(update.key, update.value) and changed is not None:
                    changed(self)
                    logger.info(
                        "feature partition map revision %d: %s",
                        self.revision,
                        ", ".join(sorted({f"{e.name}@{e.address}" for e in self.owner.values()})) or "empty",
                    )
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated


class Announcer:
    """A feature replica's entry in the bucket: rewritten every :data:`ANNOUNCE_EVERY_S`."""

    def __init__(self, kv: KeyValue, name: str, address: str, replica: int, replicas: int) -> None:
        self.kv = kv
        self.name = name
        self.address = address
        self.replica = replica
        self.replicas = replicas
        self.started_at = time.time()

    async def put(self, caught_up: bool) -> None:
        entry = ReplicaEntry(self.name, self.address, self.replica, self.replicas, caught_up, self.started_at)
        await self.kv.put(self.name, entry.encode())

    async def withdraw(self) -> None:
        try:
            await self.kv.delete(self.name)
        except Exception as exc:  # the entry expires on its own
            logger.warning("could not withdraw feature replica %s from the map: %s", self.name, exc)
