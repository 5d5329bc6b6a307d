"""``python -m services.trainer``: run the trainer service (``--help`` lists every option)."""

from __future__ import annotations

import asyncio

from pydantic_settings import CliApp

from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from shared.grpc_server import serve_until_signal
from shared.logs import configure_logging


def main() -> None:
    settings = CliApp.run(TrainerSettings, cli_show_env_vars=True)
    configure_logging(settings.log, "trainer")
    asyncio.run(serve_until_signal(TrainerApp(settings)))


if __name__ == "__main__":
    main()
