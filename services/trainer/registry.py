"""The model registry (SQL table ``models``) and the trainer's checkpoint file."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, DateTime, Float, String, delete, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import JSON

from freshrec.v1 import trainer_pb2
from shared.watermark import watermark_proto


class Base(DeclarativeBase):
    """Tables owned by the trainer service."""


class ModelRow(Base):
    __tablename__ = "models"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    trained_through_sequence: Mapped[int] = mapped_column(BigInteger)
    trained_through_time: Mapped[float] = mapped_column(Float)

    def to_proto(self) -> trainer_pb2.ModelVersion:
        proto = trainer_pb2.ModelVersion(
            version=self.version,
            parent_version=self.parent_version,
            status=f"MODEL_STATUS_{self.status}",
            sha256=self.sha256,
            metrics=self.metrics,
            trained_through=watermark_proto(self.trained_through_sequence, self.trained_through_time),
        )
        proto.created_at.FromDatetime(self.created_at)
        return proto


LIVE = "LIVE"
RETIRED = "RETIRED"
REJECTED = "REJECTED"
CANDIDATE = "CANDIDATE"


@dataclass
class NewVersion:
    version: str
    parent_version: str
    sha256: str
    metrics: dict[str, float]
    trained_through_sequence: int
    trained_through_time: float


class Registry:
    """Every method is one unit of work (call it off the event loop)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def add(self, new: NewVersion, status: str) -> ModelRow:
        row = ModelRow(
            version=new.version,
            parent_version=new.parent_version,
            status=status,
            sha256=new.sha256,
            created_at=datetime.now(UTC),
            metrics=new.metrics,
            trained_through_sequence=new.trained_through_sequence,
            trained_through_time=new.trained_through_time,
        )
        with self.sessions.begin() as session:
            if status == LIVE:
                session.execute(update(ModelRow).where(ModelRow.status == LIVE).values(status=RETIRED))
            session.add(row)
        return row

    def make_live(self, version: str) -> tuple[ModelRow, str]:
        """Marks a version live (the previous live one retired); returns it and the previous version."""
        with self.sessions.begin() as session:
            row = session.get(ModelRow, version)
            if row is None:
                raise KeyError(version)
            previous = session.scalars(select(ModelRow).where(ModelRow.status == LIVE)).first()
            previous_version = previous.version if previous else ""
            if previous is not None and previous.version != version:
                previous.status = RETIRED
            row.status = LIVE
            return row, previous_version

    def get(self, version: str) -> ModelRow | None:
        with self.sessions.begin() as session:
            return session.get(ModelRow, version)

    def live(self) -> ModelRow | None:
        with self.sessions.begin() as session:
            return session.scalars(select(ModelRow).where(ModelRow.status == LIVE)).first()

    def newest_first(self, limit: int = 0) -> list[ModelRow]:
        with self.sessions.begin() as session:
            query = select(ModelRow).order_by(ModelRow.version.desc())
            if limit:
                query = query.limit(limit)
            return list(session.scalars(query).all())

    def versions(self) -> list[str]:
        with self.sessions.begin() as session:
            return list(session.scalars(select(ModelRow.version)).all())

    def withdraw(self, versions: list[str]) -> None:
        """Removes versions from the registry (they held a forgotten user): they can no longer be
        promoted or rolled back to, and no version names them as its parent any more."""
        if not versions:
            return
        with self.sessions.begin() as session:
            session.execute(delete(ModelRow).where(ModelRow.version.in_(versions)))
            session.execute(
                update(ModelRow).where(ModelRow.parent_version.in_(versions)).values(parent_version="")
            )


def next_version(existing: list[str]) -> str:
    """``v000001``, ``v000002``, ...: one more than the highest version anywhere (registry or store)."""
    numbers = [int(v[1:]) for v in existing if v.startswith("v") and v[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


class CheckpointFile:
    """One file holding the learner's full state, replaced atomically."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "checkpoint.pt"

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        self.save_as(self.path.name, data)

    def clean_temporaries(self) -> None:
        """Removes half-written files a crash left (beside the checkpoint and the version weights):
        they hold an older learner state, perhaps of users forgotten since."""
        for folder in (self.path.parent, self.path.parent / "versions"):
            if folder.is_dir():
                for leftover in folder.glob(".tmp-checkpoint-*"):
                    leftover.unlink(missing_ok=True)

    def save_as(self, name: str, data: bytes) -> None:
        """Writes ``name`` in the checkpoint folder atomically (temporary file, fsync, rename)."""
        target = self.path.parent / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-checkpoint-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def metrics_of(manifest: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in manifest.get("metrics", {}).items()}


class WeightSnapshots:
    """The torch weights of exported versions (``<checkpoint_dir>/versions/<version>.pt``).

    Rollback, promotion and rejection continue learning from these, so every version starts
    from its parent's weights; the live version and its parent are also scored beside the
    learner (gate and rollback watch). Only the newest few are kept, plus any named as kept.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder) / "versions"

    def save(self, version: str, snapshot: dict[str, Any]) -> None:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(snapshot, buffer)
        CheckpointFile(self.folder).save_as(f"{version}.pt", buffer.getvalue())

    def load(self, version: str) -> dict[str, Any] | None:
        import io

        import torch

        if not version:
            return None
        try:
            data = (self.folder / f"{version}.pt").read_bytes()
        except FileNotFoundError:
            return None
        loaded: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=False)
        return loaded

    def remove(self, version: str) -> None:
        (self.folder / f"{version}.pt").unlink(missing_ok=True)

    def prune(self, keep_newest: int, keep: set[str]) -> None:
        if not self.folder.is_dir():
            return
        files = sorted(self.folder.glob("v*.pt"))
        for path in files[:-keep_newest] if keep_newest else files:
            if path.stem not in keep:
                path.unlink(missing_ok=True)
