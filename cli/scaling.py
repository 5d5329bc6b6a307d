"""Changing how many replicas of a service the embedded stack runs, while it serves.

``freshrec up`` owns the processes, so ``freshrec scale`` leaves a request in the data folder
(:data:`REQUEST_FILE`) and follows the progress that ``up`` records under ``"scaling"`` in
``stack.json``. ``up`` carries a request out between its supervision rounds, one :meth:`Handover.step`
at a time, so the rest of the stack stays supervised meanwhile.

Feature replicas each own a share of the users (replica *r* of *n*: ``shared.feature_replicas``), so
going from one layout to another is a handover, never a restart:

1. the new layout starts beside the old one; each new replica's consumer reads the retained event
   stream from its start (or from its own last position) into rows of its own;
2. once every new replica is SERVING and its entry in the partition map says ``caught_up``, inference
   sends lookups to it of its own accord (the newest caught-up owner answers);
3. after :data:`HANDOVER_GRACE_S` (for inference's map watchers and the lookups in flight), the old
   replicas stop: each finishes what it is serving and withdraws from the map.

If a new replica exits or the deadline passes first, the new replicas are stopped and the old layout
keeps serving: a failed handover costs nothing. Ingestion and inference replicas share their state,
so scaling them only adds replicas (waiting until they serve) or stops the newest ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import BucketNotFoundError, NoKeysError

from cli.stack import SCALABLE, Stack, wait_healthy
from shared.feature_replicas import ANNOUNCE_EVERY_S, REPLICAS_BUCKET, ReplicaEntry

logger = logging.getLogger(__name__)

#: Where ``freshrec scale`` leaves its request for ``freshrec up``.
REQUEST_FILE = "scale-request.json"
#: How long the old feature replicas keep serving after every new one has caught up.
HANDOVER_GRACE_S = 2 * ANNOUNCE_EVERY_S
#: Most replicas of one service ``freshrec up`` runs.
MAX_REPLICAS = 8
DONE, FAILED = "done", "failed"


@dataclass
class Progress:
    """What ``up`` reports of a request, in ``stack.json`` under ``"scaling"``."""

    id: str
    service: str
    replicas: int
    phase: str
    detail: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in (DONE, FAILED)


# -- the verb's side ------------------------------------------------------------------------------


def request(data_dir: Path, service: str, replicas: int, timeout_s: float) -> str:
    """Leaves a request for ``freshrec up``; its id, which the progress in ``stack.json`` carries."""
    request_id = secrets.token_hex(6)
    path = Path(data_dir) / REQUEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"id": request_id, "service": service, "replicas": replicas, "timeout_s": timeout_s})
    )
    os.replace(tmp, path)
    return request_id


def progress_of(state: dict[str, Any], request_id: str) -> Progress | None:
    scaling = state.get("scaling")
    if not isinstance(scaling, dict) or scaling.get("id") != request_id:
        return None
    return Progress(**scaling)


# -- up's side ------------------------------------------------------------------------------------


def take_request(data_dir: Path) -> dict[str, Any] | None:
    """The request waiting in the data folder, if any (removed: each is carried out once)."""
    path = Path(data_dir) / REQUEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        logger.warning("ignoring an unreadable %s", REQUEST_FILE)
        return None
    return value if isinstance(value, dict) else None


def expected_entry_name(partition: tuple[int, int] | None) -> str:
    """The name a feature replica takes in the partition map (``services.feature.settings``)."""
    if partition is None or partition[1] == 1:
        return "feature"
    return f"feature-{partition[0]}-of-{partition[1]}"


async def partition_entries(nats_url: str) -> dict[str, ReplicaEntry]:
    """The feature replicas' entries in the partition map, by name."""
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    try:
        kv = await nc.jetstream().key_value(REPLICAS_BUCKET)
        try:
            names = await kv.keys()
        except NoKeysError:
            return {}
        entries = {}
        for name in names:
            got = await kv.get(name)
            entry = ReplicaEntry.decode(name, got.value or b"")
            if entry is not None:
                entries[name] = entry
        return entries
    except BucketNotFoundError:
        return {}
    finally:
        await nc.close()


class Handover:
    """One request, carried out by :meth:`step` calls until :attr:`progress` is finished."""

    def __init__(self, stack: Stack, request: dict[str, Any], clock: Any = time.monotonic) -> None:
        self.stack = stack
        self.clock = clock
        self.new: list[str] = []
        self.old: list[str] = []
        self.caught_up_at: float | None = None
        request_id = str(request.get("id", ""))
        service, replicas = request.get("service"), request.get("replicas")
        self.progress = Progress(request_id, str(service), replicas if isinstance(replicas, int) else 0, "")
        self.deadline = clock() + float(request.get("timeout_s") or 600)
        problem = self._check(service, replicas)
        if problem:
            self.progress.phase, self.progress.detail = FAILED, problem
            return
        current = stack.instances(self.progress.service)
        if len(current) == self.progress.replicas:
            self.progress.phase = DONE
            self.progress.detail = f"{service} already runs {replicas} replica(s); nothing to do"
            return
        if service == "feature":
            self._start_layout()
        elif self.progress.replicas > len(current):
            self.new = [
                stack.add_instance(str(service)) for _ in range(self.progress.replicas - len(current))
            ]
            stack.pending.update(self.new)
            self._report("starting", f"started {', '.join(self.new)}")
        else:
            self.old = current[self.progress.replicas :]
            self._report("stopping", f"stopping {', '.join(self.old)}")

    def _check(self, service: Any, replicas: Any) -> str:
        if service not in SCALABLE:
            return f"cannot scale {service!r}: choose one of {', '.join(SCALABLE)} (the trainer leads alone)"
        if not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
            return f"replicas must be 1 to {MAX_REPLICAS}, not {replicas!r}"
        return ""

    def _start_layout(self) -> None:
        n = self.progress.replicas
        self.old = self.stack.instances("feature")
        for r in range(n):
            self.new.append(self.stack.add_instance("feature", (r, n) if n > 1 else None))
        self.stack.pending.update(self.new)
        self._report(
            "catching up",
            f"started {', '.join(self.new)} beside {', '.join(self.old)}; "
            "waiting until each has read the event stream to its end",
        )

    def _report(self, phase: str, detail: str) -> None:
        if (phase, detail) != (self.progress.phase, self.progress.detail):
            logger.info(
                "scaling %s to %d: %s: %s", self.progress.service, self.progress.replicas, phase, detail
            )
        self.progress.phase, self.progress.detail = phase, detail

    def step(self) -> None:
        """Advances as far as it can now, without blocking for long."""
        if self.progress.finished:
            return
        exited = [i for i in self.new if self.stack.services[i].process.poll() is not None]  # type: ignore[union-attr]
        if exited:
            return self._fail(f"{', '.join(exited)} exited while starting (see its log)")
        if self.clock() > self.deadline and self.progress.phase != "stopping":
            return self._fail("the new replicas did not catch up in time")
        if self.progress.phase == "starting":
            if self._all_serving():
                self.stack.pending.difference_update(self.new)
                self._finish(
                    f"{self.progress.service} runs {', '.join(self.stack.instances(self.progress.service))}"
                )
        elif self.progress.phase == "catching up":
            ready = self._caught_up()
            if len(ready) == len(self.new) and self._all_serving():
                self.caught_up_at = self.clock()
                self._report("handing over", f"{', '.join(self.new)} caught up; lookups move to them")
            else:
                self._report(
                    "catching up",
                    f"{len(ready)} of {len(self.new)} new replicas caught up; "
                    f"{', '.join(self.old)} answer meanwhile",
                )
        elif self.progress.phase == "handing over":
            assert self.caught_up_at is not None
            if self.clock() - self.caught_up_at >= HANDOVER_GRACE_S:
                self._report("stopping", f"stopping {', '.join(self.old)}")
        elif self.progress.phase == "stopping":
            for instance in self.old:
                self.stack.remove_instance(instance)
            self.stack.pending.difference_update(self.new)
            self._finish(f"{self.progress.service} runs {', '.join(self._describe_layout())}")

    def _describe_layout(self) -> list[str]:
        described = []
        for instance in self.stack.instances(self.progress.service):
            service = self.stack.services[instance]
            share = f" ({service.partition[0]} of {service.partition[1]})" if service.partition else ""
            described.append(f"{instance} at {service.address}{share}")
        return described

    def _all_serving(self) -> bool:
        for instance in self.new:
            try:
                wait_healthy(self.stack.services[instance].address, timeout_s=0.5)
            except (TimeoutError, RuntimeError):
                return False
        return True

    def _caught_up(self) -> list[str]:
        try:
            entries = asyncio.run(partition_entries(self.stack.nats.url))
        except Exception as exc:  # NATS busy or restarting: the next step asks again
            logger.warning("could not read the feature partition map: %s", exc)
            return []
        ready = []
        for instance in self.new:
            service = self.stack.services[instance]
            entry = entries.get(expected_entry_name(service.partition))
            if entry is not None and entry.caught_up and entry.address == service.address:
                ready.append(instance)
        return ready

    def _fail(self, reason: str) -> None:
        for instance in self.new:
            self.stack.remove_instance(instance)
        kept = ", ".join(self.stack.instances(self.progress.service))
        self.progress.phase, self.progress.detail = (
            FAILED,
            f"{reason}; stopped the new replicas, {kept} serve on",
        )
        logger.error("scaling %s failed: %s", self.progress.service, self.progress.detail)

    def _finish(self, detail: str) -> None:
        self.progress.phase, self.progress.detail = DONE, detail
        logger.info("scaling %s to %d done: %s", self.progress.service, self.progress.replicas, detail)

    def as_state(self) -> dict[str, Any]:
        return asdict(self.progress)
