"""Alembic environment of the trainer service's tables."""

from services.trainer.registry import Base
from shared.db import run_migrations

run_migrations(Base.metadata)
