"""``python -m services.trainer``: run the trainer service (``--help`` lists every option);
``python -m services.trainer pretrain``: pre-train from history first (``pretrain --help``)."""

from __future__ import annotations

import asyncio
import sys

from pydantic_settings import CliApp

from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerCommandLine
from shared.grpc_server import serve_until_signal
from shared.logs import configure_logging


def main() -> None:
    settings = CliApp.run(TrainerCommandLine, cli_show_env_vars=True)
    configure_logging(settings.log, "trainer")
    if settings.pretrain is not None:
        from services.trainer.pretrain import run_pretrain

        sys.exit(asyncio.run(run_pretrain(settings, settings.pretrain)))
    asyncio.run(serve_until_signal(TrainerApp(settings)))


if __name__ == "__main__":
    main()
