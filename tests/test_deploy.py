"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading it: every
command, port, variable, volume and path it names must exist in the project."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "ingestion": "services.ingestion.settings:IngestionSettings",
    "feature": "services.feature.settings:FeatureSettings",
    "trainer": "services.trainer.settings:TrainerSettings",
    "inference": "services.inference.settings:InferenceSettings",
}


def settings_class(service: str) -> Any:
    module, name = SETTINGS[service].split(":")
    return getattr(importlib.import_module(module), name)


def env_names(model: type[BaseModel], prefix: str = "FRESHREC_") -> set[str]:
    """Every environment variable a settings class reads."""
    names = set()
    for field_name, field in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names.add(name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= env_names(annotation, f"{name}__")
    return names


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_and_command_exists() -> None:
    doc = compose()
    assert set(SETTINGS) <= set(doc["services"])
    for name, service in doc["services"].items():
        command = service.get("command", [])
        if name in SETTINGS:
            assert command == ["python", "-m", f"services.{name}"]
            assert (ROOT / "services" / name / "__main__.py").is_file()
            health = service["healthcheck"]["test"]
            assert health[1:4] == ["python", "-m", "shared.healthcheck"], "health must ask grpc.health.v1"
            assert (ROOT / "shared" / "healthcheck.py").is_file()
            assert service["build"]["context"] == "."


def test_ports_and_variables_match_the_settings() -> None:
    doc = compose()
    for name in SETTINGS:
        service = doc["services"][name]
        cls = settings_class(name)
        env = service["environment"]
        unknown = set(env) - env_names(cls)
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
        port = int(env["FRESHREC_GRPC__PORT"])
        assert port == cls.model_fields["grpc"].default.port
        assert f"{port}:{port}" in service["ports"]
        assert health_port(service) == port
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    every_setting = set().union(*(env_names(settings_class(n)) for n in SETTINGS))
    assert example and example <= every_setting, example - every_setting


def health_port(service: dict[str, Any]) -> int:
    return int(service["healthcheck"]["test"][-1].rsplit(":", 1)[1])


def test_volumes_are_declared_and_peers_resolve() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    for service in doc["services"].values():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared
        for dependency in service.get("depends_on", {}):
            assert dependency in doc["services"]
    feature_addr = doc["services"]["inference"]["environment"]["FRESHREC_FEATURE_ADDR"]
    host, port = feature_addr.split(":")
    assert host in doc["services"] and int(port) == 50052


def test_dockerfile_copies_only_what_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    extras = re.findall(r"EXTRAS: (\S+)", (ROOT / "docker-compose.yml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    for group in {g for e in extras for g in e.split(",")}:
        assert re.search(rf"^{group} = \[", pyproject, flags=re.M), f"no extra {group} in pyproject.toml"
    assert "EXTRAS: inference" in (ROOT / "docker-compose.yml").read_text()
