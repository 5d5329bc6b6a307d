"""``python -m services.feature``: run the feature service (``--help`` lists every option)."""

from __future__ import annotations

import asyncio

from pydantic_settings import CliApp

from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from shared.grpc_server import serve_until_signal
from shared.logs import configure_logging


def main() -> None:
    settings = CliApp.run(FeatureSettings, cli_show_env_vars=True)
    configure_logging(settings.log, "feature")
    asyncio.run(serve_until_signal(FeatureApp(settings)))


if __name__ == "__main__":
    main()
