"""Tombstones: forgotten users, named by a keyed hash, whose late events ingestion drops.

The hash is HMAC-SHA256 of the UTF-8 user id under ``FRESHREC_FORGET__HASH_KEY``: without the key
a tombstone cannot be matched to an id, not even by trying likely ids. Each replica keeps the live
tombstones in memory (checked on every event while any exist), adds its own requests at once and
reloads what other replicas recorded every ``tombstone_refresh_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

from services.ingestion.forget_store import ForgetStore
from shared.supervise import forever

logger = logging.getLogger(__name__)


def user_hash(key: bytes, user_id: str) -> str:
    """The keyed hash that stands for ``user_id`` (64 hex digits)."""
    return hmac.digest(key, user_id.encode("utf-8"), hashlib.sha256).hex()


class Tombstones:
    """The live tombstones of this replica."""

    def __init__(self, store: ForgetStore, key: bytes | None) -> None:
        self.store = store
        self.key = key
        self.hashes: set[str] = set()
        self._added: set[str] = set()  # added while a reload may be reading SQL

    def hash(self, user_id: str) -> str:
        if self.key is None:
            raise RuntimeError("no forget hash key configured")
        return user_hash(self.key, user_id)

    def holds(self, user_id: str) -> bool:
        """Whether the user is forgotten (their events are dropped); free while none are."""
        if not self.hashes or self.key is None:
            return False
        return user_hash(self.key, user_id) in self.hashes

    def add(self, hashed: str) -> None:
        """Holds a tombstone this replica just recorded in SQL."""
        self.hashes.add(hashed)
        self._added.add(hashed)

    async def reload(self) -> None:
        now_us = int(time.time() * 1e6)
        expired = await asyncio.to_thread(self.store.expire_tombstones, now_us)
        if expired:
            logger.info("%d tombstones expired; those users may come back as new users", expired)
        added, self._added = self._added, set()
        self.hashes = await asyncio.to_thread(self.store.tombstones, now_us) | added | self._added

    async def follow(self, every_s: float) -> None:
        await forever(self.reload, logger=logger, failed="reloading tombstones failed", every_s=every_s)
