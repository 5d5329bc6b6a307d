"""Which trainer learns: a lease on a JetStream KV key, taken and renewed by compare-and-set.

Several trainers may run against one stream; exactly one leads (reads the events, exports,
answers write RPCs), the others stand by. The lease is the key ``leader`` of KV bucket
``FRESHREC_TRAINER_LEADER``, whose entries expire ``ttl_s`` after they are written:

- a standby creates the key when it is absent (never held, released, or expired), which only one
  of several racing standbys can do;
- the leader renews it every third of the TTL with an update conditioned on the revision it last
  wrote, so a leader that was paused or cut off past the TTL finds the key taken by another and
  steps down at once (:class:`LostLease`) instead of writing beside the new leader;
- a leader that stops releases the key, so a standby takes over without waiting for the TTL;
- a trainer restarted under the same name takes its own lease back at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import NoReturn

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.nats import bind_key_value

logger = logging.getLogger(__name__)

LEADER_BUCKET = "FRESHREC_TRAINER_LEADER"
LEADER_KEY = "leader"


class LostLease(Exception):
    """Another trainer holds the lease now (or it could not be renewed within its TTL)."""


@dataclass(frozen=True)
class Holder:
    name: str
    address: str
    revision: int


class Lease:
    def __init__(self, kv: KeyValue, name: str, address: str, ttl_s: float) -> None:
        self.kv = kv
        self.name = name
        self.address = address
        self.ttl_s = ttl_s
        #: The revision this trainer last wrote while leading (0: not leading).
        self.revision = 0
        self.renewed_at = 0.0
        # One renewal at a time: two updates conditioned on the same revision would depose the
        # leader by itself (the second finds the revision the first wrote).
        self._renewing = asyncio.Lock()

    @classmethod
    async def open(
        cls, js: JetStreamContext, name: str, address: str, ttl_s: float, replicas: int = 1
    ) -> Lease:
        config = KeyValueConfig(
            bucket=LEADER_BUCKET,
            description="the freshrec trainer holding the leadership lease",
            history=1,
            ttl=ttl_s,
            storage=StorageType.FILE,
            replicas=replicas,
        )
        return cls(await bind_key_value(js, config), name, address, ttl_s)

    @property
    def leading(self) -> bool:
        return self.revision > 0

    def _value(self) -> bytes:
        return json.dumps({"name": self.name, "address": self.address}).encode()

    async def holder(self) -> Holder | None:
        """Who holds the lease now (None: nobody)."""
        try:
            entry = await self.kv.get(LEADER_KEY)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            value = json.loads(entry.value)
            return Holder(str(value["name"]), str(value.get("address", "")), int(entry.revision or 0))
        except (ValueError, KeyError, TypeError):
            return Holder("(unreadable)", "", int(entry.revision or 0))

    async def try_acquire(self) -> bool:
        """Takes the lease if nobody holds it (or this trainer's earlier life did); True if taken."""
        try:
            self.revision = await self.kv.create(LEADER_KEY, self._value())
        except KeyWrongLastSequenceError:
            current = await self.holder()
            if current is None or current.name != self.name:
                return False
            try:  # restarted under the same name: its own lease, taken back at once
                self.revision = await self.kv.update(LEADER_KEY, self._value(), last=current.revision)
            except KeyWrongLastSequenceError:
                return False
        self.renewed_at = time.monotonic()
        return True

    async def acquire(self) -> None:
        """Waits (standing by) until this trainer holds the lease."""
        told = ""
        while True:
            try:
                if await self.try_acquire():
                    break
                current = await self.holder()
            except Exception as exc:  # NATS unreachable or electing a leader: keep standing by
                logger.warning("could not read the trainer lease (%s); retrying", exc)
                await asyncio.sleep(self.ttl_s / 4)
                continue
            name = current.name if current else ""
            if name != told:
                logger.info("standing by: trainer %s leads", name or "(none)")
                told = name
            await asyncio.sleep(self.ttl_s / 4)
        logger.info("leading: took the trainer lease as %s", self.name)

    async def renew(self) -> None:
        """Extends the lease; LostLease if another trainer holds it now."""
        async with self._renewing:
            if not self.leading:
                raise LostLease("this trainer does not hold the lease")
            try:
                self.revision = await self.kv.update(LEADER_KEY, self._value(), last=self.revision)
            except KeyWrongLastSequenceError as exc:
                self.revision = 0
                raise LostLease("another trainer took the lease") from exc
            self.renewed_at = time.monotonic()

    async def keep(self) -> NoReturn:
        """Renews every third of the TTL; raises LostLease when it cannot hold it any longer."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew()
            except LostLease:
                raise
            except Exception as exc:  # NATS unreachable: keep trying while the lease may still hold
                if time.monotonic() - self.renewed_at >= self.ttl_s:
                    self.revision = 0
                    raise LostLease(f"could not renew the lease within its {self.ttl_s:g}s TTL") from exc
                logger.warning("renewing the trainer lease failed (%s); retrying", exc)

    async def release(self) -> None:
        """Gives the lease up so a standby takes over at once (best effort)."""
        if not self.leading:
            return
        revision, self.revision = self.revision, 0
        try:
            await self.kv.delete(LEADER_KEY, last=revision)
            logger.info("released the trainer lease")
        except Exception as exc:
            logger.warning("could not release the trainer lease (%s): a standby waits for its TTL", exc)
