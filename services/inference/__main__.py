"""``python -m services.inference``: run the inference service (``--help`` lists every option)."""

from __future__ import annotations

import asyncio

from pydantic_settings import CliApp

from services.inference.server import InferenceApp
from services.inference.settings import InferenceSettings
from shared.grpc_server import serve_until_signal
from shared.logs import configure_logging


def main() -> None:
    settings = CliApp.run(InferenceSettings, cli_show_env_vars=True)
    configure_logging(settings.log, "inference")
    asyncio.run(serve_until_signal(InferenceApp(settings)))


if __name__ == "__main__":
    main()
