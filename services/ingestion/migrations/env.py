"""Alembic environment of the ingestion service's tables."""

from services.ingestion import forget_store  # noqa: F401  (its tables join Base.metadata)
from services.ingestion.store import Base
from shared.db import run_migrations

run_migrations(Base.metadata)
