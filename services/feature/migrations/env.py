"""Alembic environment of the feature service's tables."""

from services.feature.store import Base
from shared.db import run_migrations

run_migrations(Base.metadata)
