"""Database helpers: one engine factory, one session factory, schema upgrades through Alembic.

SQLAlchemy is synchronous here; services call it through ``asyncio.to_thread`` so the
event loop only moves bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import DatabaseSettings

logger = logging.getLogger(__name__)


#: PRAGMA statements are not parameterisable: each allowed value has its own constant statement.
SQLITE_SYNCHRONOUS = {level: f"PRAGMA synchronous={level}" for level in ("OFF", "NORMAL", "FULL", "EXTRA")}


def make_engine(settings: DatabaseSettings) -> Engine:
    """Creates the engine; for SQLite, creates the file's folder and turns on WAL."""
    url = make_url(settings.url)
    kwargs: dict[str, Any] = {"echo": settings.echo, "pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        synchronous = settings.sqlite_synchronous

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(SQLITE_SYNCHRONOUS[synchronous])
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Deleted rows are overwritten, not left in free pages: erasure (forget, retention)
            # leaves no trace in the file.
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

    return engine


def scrub_wal(engine: Engine, *, vacuum: bool = False) -> bool:
    """SQLite, after erasing rows: with ``vacuum``, rebuilds the file (``secure_delete`` zeroes
    deleted cells and freed pages, but a page SQLite rebuilds in place can keep stale bytes in its
    unused gap); then moves the write-ahead log into the database and truncates it, so no old page
    image stays in the WAL file. True when the checkpoint completed; readers can hold it back, so
    callers try again. Other databases: nothing to do."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        if vacuum:
            connection.exec_driver_sql("PRAGMA temp_store=MEMORY")  # no copy in a temporary file
            connection.exec_driver_sql("VACUUM")
        busy, _log, _moved = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        return not busy


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """The one session factory a service uses; units of work are ``with factory.begin()``."""
    return sessionmaker(engine, expire_on_commit=False)


def upgrade_schema(engine: Engine, migrations_dir: Path, version_table: str) -> None:
    """Brings the service's tables to the newest Alembic revision.

    Each service keeps its own migrations and its own version table, so services may share
    one database or each use their own.
    """
    config = alembic_config(migrations_dir, version_table)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def alembic_config(migrations_dir: Path, version_table: str, url: str | None = None) -> Config:
    """An Alembic configuration built in code (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("version_table", version_table)
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


def run_migrations(target_metadata: Any) -> None:
    """The body of every service's ``migrations/env.py`` (online mode only)."""
    from alembic import context

    config = context.config
    version_table = config.get_main_option("version_table") or "alembic_version"
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no database connection or sqlalchemy.url given to Alembic")
        engine = make_engine(DatabaseSettings(url=url))
        with engine.begin() as connection:
            _configure_and_run(context, connection, target_metadata, version_table)
        engine.dispose()
    else:
        _configure_and_run(context, connection, target_metadata, version_table)


def _configure_and_run(context: Any, connection: Any, target_metadata: Any, version_table: str) -> None:
    def own_tables_only(name: str | None, type_: str, _parents: Any) -> bool:
        # Services may share one database: autogenerate must not see another service's tables
        # (nor its version table) as tables to drop.
        return type_ != "table" or (name is not None and name in target_metadata.tables)

    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=version_table,
        render_as_batch=connection.dialect.name == "sqlite",
        include_name=own_tables_only,
    )
    with context.begin_transaction():
        context.run_migrations()
