"""``python -m services.ingestion``: run the ingestion service (``--help`` lists every option)."""

from __future__ import annotations

import asyncio

from pydantic_settings import CliApp

from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from shared.grpc_server import serve_until_signal
from shared.logs import configure_logging


def main() -> None:
    settings = CliApp.run(IngestionSettings, cli_show_env_vars=True)
    configure_logging(settings.log, "ingestion")
    asyncio.run(serve_until_signal(IngestionApp(settings)))


if __name__ == "__main__":
    main()
