"""``python -m cli.docs``: the configuration reference and the metrics list under ``docs/``,
generated from the code so they cannot drift (``make docs``; ``--check`` and the tests compare them).

- ``docs/configuration.md``: every service's settings class, walked field by field, as the
  environment variables it reads, with defaults and descriptions;
- ``docs/metrics.md``: every Prometheus metric a service process registers (each service is
  imported in its own interpreter, so a metric is listed under exactly the services that expose it).

Each page is hand-written prose around a marked section; only the marked section is rewritten.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGURATION_PAGE, METRICS_PAGE = "configuration.md", "metrics.md"
SETTINGS = {
    "ingestion": "services.ingestion.settings:IngestionSettings",
    "feature": "services.feature.settings:FeatureSettings",
    "trainer": "services.trainer.settings:TrainerSettings",
    "inference": "services.inference.settings:InferenceSettings",
}
CONFIG_BEGIN, CONFIG_END = "<!-- config:begin (python -m cli.docs) -->", "<!-- config:end -->"
METRICS_BEGIN, METRICS_END = "<!-- metrics:begin (python -m cli.docs) -->", "<!-- metrics:end -->"

_DUMP_METRICS = """
import importlib, json, sys
from prometheus_client import REGISTRY
importlib.import_module(sys.argv[1])
out = []
for collector in list(REGISTRY._collector_to_names):
    name = getattr(collector, "_name", None)
    kind = getattr(collector, "_type", None)
    if not name or not name.startswith("freshrec_") or kind is None:
        continue
    exposed = name + "_total" if kind == "counter" else name
    labels = list(getattr(collector, "_labelnames", ()))
    out.append({"name": exposed, "type": kind, "labels": labels, "help": collector._documentation})
print(json.dumps(sorted(out, key=lambda m: m["name"])))
"""


def settings_class(service: str) -> Any:
    module, name = SETTINGS[service].split(":")
    return getattr(importlib.import_module(module), name)


def _default(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if value is None:
        return "—"
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rows(model: BaseModel | type[BaseModel], prefix: str = "FRESHREC_") -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, nested ones flattened with ``__``."""
    cls = model if isinstance(model, type) else type(model)
    out = []
    for name, field in cls.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        default = getattr(model, name) if not isinstance(model, type) else field.default
        if isinstance(default, BaseModel):
            out += rows(default, f"{variable}__")
            continue
        description = (field.description or "").replace("|", "/")
        out.append((variable, _default(default), description))
    return out


def config_markdown() -> str:
    parts = [
        CONFIG_BEGIN,
        "Every variable can also be given as a command-line flag (`python -m services.<name> --help`).",
        "",
    ]
    for service in SETTINGS:
        cls = settings_class(service)
        parts += [f"**{service}**", "", "| variable | default | meaning |", "|---|---|---|"]
        parts += [f"| `{v}` | `{d}` | {m} |" for v, d, m in rows(cls())]
        parts.append("")
    parts.append(CONFIG_END)
    return "\n".join(parts)


@functools.cache  # a fresh interpreter per service: the answer cannot change while this one runs
def service_metrics(service: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", _DUMP_METRICS, f"services.{service}.server"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def metrics_markdown() -> str:
    by_name: dict[str, dict[str, Any]] = {}
    for service in SETTINGS:
        for metric in service_metrics(service):
            entry = by_name.setdefault(metric["name"], {**metric, "services": []})
            entry["services"].append(service)
    parts = [
        METRICS_BEGIN,
        "| metric | type | labels | services | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, m in sorted(by_name.items()):
        services = "all" if len(m["services"]) == len(SETTINGS) else ", ".join(m["services"])
        labels = ", ".join(f"`{label}`" for label in m["labels"]) or "—"
        parts.append(f"| `{name}` | {m['type']} | {labels} | {services} | {m['help'].replace('|', '/')} |")
    parts.append(METRICS_END)
    return "\n".join(parts)


def documented_metrics(page: str) -> dict[str, set[str]]:
    """Per service, the metric names the marked section of ``docs/metrics.md`` lists."""
    section = _section(page, METRICS_BEGIN, METRICS_END)
    out: dict[str, set[str]] = {s: set() for s in SETTINGS}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[0].startswith("`freshrec_"):
            continue
        services = list(SETTINGS) if cells[3] == "all" else [s.strip() for s in cells[3].split(",")]
        for service in services:
            out[service].add(cells[0].strip("`"))
    return out


def _section(text: str, begin: str, end: str) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no section between {begin!r} and {end!r}")
    return text[start : stop + len(end)]


def replace_section(text: str, begin: str, end: str, new: str) -> str:
    old = _section(text, begin, end)
    return text.replace(old, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--docs-dir", type=Path, default=DOCS, help=f"folder of {CONFIGURATION_PAGE} and {METRICS_PAGE}"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's generated section is stale")
    args = parser.parse_args(argv)
    pages = {
        args.docs_dir / CONFIGURATION_PAGE: (CONFIG_BEGIN, CONFIG_END, config_markdown()),
        args.docs_dir / METRICS_PAGE: (METRICS_BEGIN, METRICS_END, metrics_markdown()),
    }
    stale = 0
    for path, (begin, end, generated) in pages.items():
        text = path.read_text()
        new = replace_section(text, begin, end, generated)
        if new == text:
            print(f"{path} is up to date")
        elif args.check:
            print(f"{path} is stale: run `make docs`", file=sys.stderr)
            stale += 1
        else:
            path.write_text(new)
            print(f"wrote {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
