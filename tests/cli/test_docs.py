"""The README's configuration reference is generated from the settings classes and kept current
(the metrics list is checked against what each running service exposes, in
test_verbs_on_a_stack.py)."""

from __future__ import annotations

from pathlib import Path

from cli import docs

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    generated = docs.config_markdown()
    assert generated in readme, "the README's configuration reference is stale: run `make docs`"


def test_every_setting_of_every_service_is_listed() -> None:
    text = docs.config_markdown()
    for service in docs.SETTINGS:
        for variable, _default, _meaning in docs.rows(docs.settings_class(service)()):
            assert f"| `{variable}` |" in text
    assert "| `FRESHREC_GRPC__PORT` | `50054` |" in text  # nested defaults come from the service
    assert "| `FRESHREC_NATS__PASSWORD` | `—` |" in text


def test_metrics_section_is_parsed_per_service() -> None:
    readme = (
        f"{docs.METRICS_BEGIN}\n| metric | type | labels | services | meaning |\n|---|---|---|---|---|\n"
        "| `freshrec_a_total` | counter | — | all | a |\n"
        "| `freshrec_b` | gauge | — | feature, trainer | b |\n"
        f"{docs.METRICS_END}"
    )
    found = docs.documented_metrics(readme)
    assert found["ingestion"] == {"freshrec_a_total"}
    assert found["feature"] == found["trainer"] == {"freshrec_a_total", "freshrec_b"}
