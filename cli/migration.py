"""``python -m cli.migration SERVICE MESSAGE``: a new Alembic revision from a service's model changes.

Upgrades a scratch SQLite database to the service's newest revision, then autogenerates the
difference between it and the service's SQLAlchemy models. Read the result before committing it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from alembic import command

from shared.db import alembic_config

SERVICES = ("ingestion", "feature", "trainer")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cli.migration", description=__doc__)
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("message", help="what the revision changes, e.g. 'add item tags'")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp()) / "scratch.db"
    migrations = Path(__file__).resolve().parents[1] / "services" / args.service / "migrations"
    config = alembic_config(migrations, f"alembic_version_{args.service}", f"sqlite:///{scratch}")
    command.upgrade(config, "head")
    command.revision(config, autogenerate=True, message=args.message)


if __name__ == "__main__":
    main()
