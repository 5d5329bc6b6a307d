"""Every service's Alembic history goes up, down to nothing and up again, on SQLite and on
PostgreSQL, and the newest revision matches the service's SQLAlchemy models exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from cli import db


def tables(url: str, versions: bool = True) -> set[str]:
    engine = create_engine(url)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    return names if versions else {n for n in names if not n.startswith("alembic_version_")}


def round_trip(url: str) -> None:
    services = db.migrated_services()
    assert {"ingestion", "feature", "trainer"} <= set(services)
    # All services share one database here, as they may in a deployment: each keeps its own
    # version table, and going down or up one service's history leaves the others alone.
    for service in services:
        db.upgrade(service, url)
        assert db.current(service, url) == db.head(service)
        db.check(service, url)  # the tables match the models: no migration is missing
    created = tables(url)
    for service in services:
        before = tables(url)
        db.downgrade(service, url, "base")
        assert db.current(service, url) == ""
        gone = before - tables(url)
        assert gone, f"{service}'s downgrade to base dropped nothing"
        assert tables(url) >= {f"alembic_version_{s}" for s in services if s != service}
        db.upgrade(service, url)
        assert db.current(service, url) == db.head(service)
        db.check(service, url)
        assert tables(url) == before, f"{service}: upgrade after downgrade differs"
    assert tables(url) == created


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    round_trip(f"sqlite:///{tmp_path / 'freshrec.db'}")


@pytest.mark.postgres
def test_upgrade_downgrade_upgrade_on_postgresql(postgres_url: str) -> None:
    round_trip(postgres_url)


def test_each_revision_steps_down_and_up_one_at_a_time(tmp_path: Path) -> None:
    """Not only base <-> head: every single revision's downgrade undoes its upgrade."""
    from alembic.script import ScriptDirectory

    url = f"sqlite:///{tmp_path / 'steps.db'}"
    for service in db.migrated_services():
        script = ScriptDirectory.from_config(db.config(service, url))
        revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
        snapshots = [tables(url, versions=False)]
        for revision in revisions:
            db.upgrade(service, url, revision)
            snapshots.append(tables(url, versions=False))
        for index in range(len(revisions) - 1, -1, -1):
            db.downgrade(service, url, revisions[index - 1] if index else "base")
            assert tables(url, versions=False) == snapshots[index], (
                f"{service}: downgrade of {revisions[index]}"
            )
        db.upgrade(service, url)
