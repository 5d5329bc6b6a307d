"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading it: every
command, port, variable, volume and path it names must exist in the project; and the parts that can
run without Docker do run: the NATS cluster from the nodes' own command lines, the migrate job's
command."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "ingestion": "services.ingestion.settings:IngestionSettings",
    "feature": "services.feature.settings:FeatureSettings",
    "trainer": "services.trainer.settings:TrainerSettings",
    "inference": "services.inference.settings:InferenceSettings",
}
NATS_NODES = ("nats-1", "nats-2", "nats-3")
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


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


def raw_compose() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with ``env`` standing in for .env."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name} is required: {arg}")
        return ""

    return INTERPOLATION.sub(one, value).replace("$$", "$")


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return dict(yaml.safe_load(interpolate(raw_compose(), env or example_env())))


def example_env() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {k.strip(): v.strip() for k, v in pairs}


def freshrec_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in doc["services"].items() if s.get("image", "").startswith("freshrec")}


def test_every_command_exists() -> None:
    doc = compose()
    assert set(SETTINGS) <= set(doc["services"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name, service in freshrec_services(doc).items():
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            module = command[2]
            assert module == f"services.{name.removesuffix('-standby')}", f"{name} runs {module}"
            assert (ROOT / module.replace(".", "/") / "__main__.py").is_file()
        else:
            # Console scripts: declared in pyproject, and the verb exists (answers --help).
            assert command[0] in pyproject["project"]["scripts"], command
            result = subprocess.run(
                [str(Path(sys.executable).parent / command[0]), *command[1:], "--help"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr


def test_health_checks_ask_grpc_health_on_the_served_port() -> None:
    doc = compose()
    for name in SETTINGS:
        service = doc["services"][name]
        health = service["healthcheck"]["test"]
        assert health[:4] == ["CMD", "python", "-m", "shared.healthcheck"], "health must ask grpc.health.v1"
        assert (ROOT / "shared" / "healthcheck.py").is_file()
        port = int(service["environment"]["FRESHREC_GRPC__PORT"])
        assert health[4] == f"127.0.0.1:{port}"
        assert port == settings_class(name).model_fields["grpc"].default.port
        published = [p for p in service["ports"] if p.endswith(f":{port}")]
        assert published, f"{name} does not publish its gRPC port {port}"
        host = published[0].rsplit(":", 1)[0]
        assert re.fullmatch(r"\d+(-\d+)?", host), host
    for node in NATS_NODES:
        command = doc["services"][node]["command"]
        http_port = command[command.index("--http_port") + 1]
        assert f"127.0.0.1:{http_port}/healthz" in " ".join(doc["services"][node]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(doc["services"]["postgres"]["healthcheck"]["test"])


def test_startup_order_waits_on_health_and_migrations() -> None:
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no health check"
            else:
                assert condition == "service_completed_successfully" and dependency == "migrate"
    for name in ("ingestion", "feature", "trainer"):
        needs = services[name]["depends_on"]
        assert {*NATS_NODES, "postgres", "migrate"} <= set(needs), name
    assert {*NATS_NODES, "feature"} <= set(services["inference"]["depends_on"])
    assert services["migrate"]["restart"] == "no"


def test_variables_are_read_by_the_settings_and_documented() -> None:
    doc = compose()
    every_setting: set[str] = set()
    for name in SETTINGS:
        names = env_names(settings_class(name))
        every_setting |= names
        unknown = set(doc["services"][name]["environment"]) - names
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
    # The migrate job hands its URL to `freshrec db upgrade` (option --url, env FRESHREC_DATABASE__URL).
    assert set(doc["services"]["migrate"]["environment"]) == {"FRESHREC_DATABASE__URL"}
    example = example_env()
    interpolated = {m[0] for m in INTERPOLATION.findall(raw_compose())}
    assert interpolated <= set(example), f"not in .env.example: {interpolated - set(example)}"
    for variable in example:
        assert variable in interpolated or variable in every_setting, f".env.example sets unknown {variable}"
    # Required variables fail loudly when .env is missing them.
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        compose({"POSTGRES_PASSWORD": ""} | {k: v for k, v in example.items() if k != "POSTGRES_PASSWORD"})
    for name in ("ingestion", "feature", "trainer"):
        url = doc["services"][name]["environment"]["FRESHREC_DATABASE__URL"]
        assert url == doc["services"]["migrate"]["environment"]["FRESHREC_DATABASE__URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url


def test_volumes_and_paths() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    used = set()
    # The image's own VOLUME lines: a container's private volume where nothing is mounted there.
    image_volumes = [
        json.loads(line.split(None, 1)[1])
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("VOLUME ")
    ]
    for name, service in doc["services"].items():
        mounts = {target: "(image)" for targets in image_volumes for target in targets}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert source in declared, f"{name} mounts undeclared volume {source}"
            used.add(source)
            mounts[target] = source
        for variable in ("FRESHREC_MODEL_STORE", "FRESHREC_CHECKPOINT_DIR"):
            path = service.get("environment", {}).get(variable)
            if path:
                assert any(path == t or path.startswith(t + "/") for t in mounts), (
                    f"{name}: {path} not on a volume"
                )
    assert used == declared, f"declared but unused volumes: {declared - used}"
    inference = doc["services"]["inference"]
    # Models travel through the JetStream Object Store: no service names a model folder or shares a
    # volume with another (the deployment is not tied to one host's disk).
    assert not any("FRESHREC_MODEL_STORE" in s.get("environment", {}) for s in doc["services"].values())
    assert "volumes" not in inference
    # Nor the trainer's checkpoint: a second trainer (--scale trainer=2) stands by with its own copy.
    assert "volumes" not in doc["services"]["trainer"]
    mounted = [v.split(":")[0] for s in doc["services"].values() for v in s.get("volumes", [])]
    assert len(mounted) == len(set(mounted)), f"a volume is shared between services: {mounted}"
    host, port = inference["environment"]["FRESHREC_FEATURE_ADDR"].split(":")
    assert host in doc["services"] and int(port) == int(
        doc["services"][host]["environment"]["FRESHREC_GRPC__PORT"]
    )
    for name in SETTINGS:
        nats = doc["services"][name]["environment"]["FRESHREC_NATS__URL"].split(",")
        assert [u.split("//")[1].split(":")[0] for u in nats] == list(NATS_NODES)
        assert doc["services"][name]["environment"]["FRESHREC_NATS__STREAM_REPLICAS"] == "3"


def test_the_topology_is_the_one_freshrec_up_hosts_runs() -> None:
    """Compose and `freshrec up --hosts` (cli/hosts.py) run the same processes: a NATS node per host
    and the services as PLACEMENT spreads them (two trainers: one leads, one stands by)."""
    from cli.hosts import PLACEMENT

    doc = compose()
    in_compose = sorted(
        s["command"][2].removeprefix("services.")
        for s in freshrec_services(doc).values()
        if s["command"][:2] == ["python", "-m"]
    )
    assert in_compose == sorted(s for services in PLACEMENT.values() for s in services)
    assert len(NATS_NODES) == len(PLACEMENT)
    standby = doc["services"]["trainer-standby"]
    assert standby["environment"] == doc["services"]["trainer"]["environment"]
    assert standby["ports"] == [] and "volumes" not in standby


def dockerfile_stages() -> list[str]:
    return re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)


def test_dockerfile_builds_from_what_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a multi-stage build"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    for stage in re.findall(r"^COPY --from=(\S+)", dockerfile, flags=re.M):
        assert stage in stages, f"COPY --from unknown stage {stage}"
    doc = compose()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, service in freshrec_services(doc).items():
        build = service["build"]
        assert build["context"] == "." and build["target"] in stages, name
        for group in build["args"]["EXTRAS"].split(","):
            assert group in extras, f"{name}: no extra {group} in pyproject.toml"
    inference_extras = doc["services"]["inference"]["build"]["args"]["EXTRAS"].split(",")
    assert not any("torch" in dep for dep in requirements(inference_extras, extras)), (
        "inference image gets torch"
    )
    assert any("torch" in dep for dep in requirements(["trainer"], extras))


def requirements(groups: list[str], extras: dict[str, list[str]]) -> set[str]:
    """Every requirement the extras pull in, following ``freshrec[...]`` references."""
    out: set[str] = set()
    for group in groups:
        for dep in extras[group]:
            nested = re.fullmatch(r"freshrec\[(.+)\]", dep)
            out |= requirements(nested.group(1).split(","), extras) if nested else {dep}
    return out


def test_migrate_command_creates_every_services_tables(tmp_path: Path) -> None:
    """What the migrate job runs, on a SQLite file instead of the compose PostgreSQL."""
    from sqlalchemy import create_engine, inspect

    from cli import db

    url = f"sqlite:///{tmp_path / 'all.db'}"
    command = compose()["services"]["migrate"]["command"]
    result = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        env={"FRESHREC_DATABASE__URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    for service in db.migrated_services():
        assert f"alembic_version_{service}" in tables
        assert db.current(service, url) == db.head(service)
    assert {"events", "models"} <= tables
