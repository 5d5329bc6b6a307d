"""``python -m cli``: the freshrec command line (``up`` starts the embedded stack)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from cli.stack import DEFAULT_PORTS, SERVICES, Stack


def up(args: argparse.Namespace) -> int:
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    stack = Stack(Path(args.data_dir), ports=ports)
    print(f"starting freshrec under {stack.data_dir} ...", flush=True)
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\nfreshrec is up:")
    print(f"  {'nats':<10} {stack.nats.url}")
    for name in SERVICES:
        print(f"  {name:<10} {stack.address(name)}  (gRPC, health, reflection)")
    print(f"\ndata in {stack.data_dir}; press Ctrl-C to stop.\n", flush=True)
    try:
        while not stop:
            stack.supervise_once()
            time.sleep(0.5)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    print("stopping freshrec ...", flush=True)
    stack.stop()
    print("stopped.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="freshrec", description="freshrec: a recommender that learns online."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    up_parser = verbs.add_parser(
        "up", help="start the embedded stack: a private nats-server, SQLite and the four services"
    )
    up_parser.add_argument(
        "--data-dir", default="var", help="folder for SQLite files, models, NATS (default: var)"
    )
    for name, port in DEFAULT_PORTS.items():
        up_parser.add_argument(
            f"--{name}-port", type=int, default=port, help=f"port of {name} (0: any free port)"
        )
    up_parser.set_defaults(func=up)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s stack: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
