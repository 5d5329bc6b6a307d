"""``python -m services.feature``: run the feature service; ``python -m services.feature rebuild``
recomputes its state from the event log (``--help`` lists every option)."""

from __future__ import annotations

import asyncio
import gc
import sys

from pydantic_settings import CliApp

from services.feature.rebuild import ReplicaRunning, rebuild
from services.feature.server import FeatureApp
from services.feature.settings import FeatureCommandLine
from shared.grpc_server import serve_until_signal
from shared.logs import configure_logging


def main() -> None:
    settings = CliApp.run(FeatureCommandLine, cli_show_env_vars=True)
    configure_logging(settings.log, "feature")
    if settings.rebuild is not None:
        try:
            asyncio.run(rebuild(settings, settings.rebuild.batch, settings.rebuild.force))
        except ReplicaRunning as exc:
            print(f"rebuild refused: {exc}", file=sys.stderr)
            sys.exit(2)
        return
    # What the imports allocated lives as long as the process: keep it out of the cyclic
    # collector's full passes (about 100k objects), which would otherwise pause reads.
    gc.collect()
    gc.freeze()
    # Commits serialise rows in a worker thread; hand the GIL back to the event loop (reads,
    # applying events) within 1 ms rather than the default 5 ms.
    sys.setswitchinterval(0.001)
    asyncio.run(serve_until_signal(FeatureApp(settings)))


if __name__ == "__main__":
    main()
