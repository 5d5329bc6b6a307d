"""The architecture's contract and its layout rules, checked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from freshrec.v1 import event_pb2, feature_pb2, inference_pb2, ingestion_pb2, item_pb2, trainer_pb2

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("ingestion", "feature", "trainer", "inference")


def rpcs(module, service: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}


def test_contract_names_exist() -> None:
    assert {v.name for v in event_pb2.EventType.DESCRIPTOR.values} >= {
        "EVENT_TYPE_UNSPECIFIED",
        "EVENT_TYPE_VIEW",
        "EVENT_TYPE_CLICK",
        "EVENT_TYPE_ADD_TO_CART",
        "EVENT_TYPE_PURCHASE",
        "EVENT_TYPE_RATE",
        "EVENT_TYPE_LIKE",
        "EVENT_TYPE_DISLIKE",
    }
    assert event_pb2.EVENT_TYPE_UNSPECIFIED == 0
    assert {f.name for f in event_pb2.Event.DESCRIPTOR.fields} >= {
        "event_id",
        "user_id",
        "item_id",
        "type",
        "value",
        "occurred_at",
        "context",
        "session_id",
    }
    assert {f.name for f in item_pb2.Item.DESCRIPTOR.fields} >= {
        "item_id",
        "title",
        "categories",
        "tags",
        "attributes",
        "created_at",
    }
    assert rpcs(ingestion_pb2, "IngestionService") >= {"IngestEvents", "IngestEventStream"}
    assert rpcs(feature_pb2, "FeatureService") >= {
        "GetUserFeatures",
        "GetItemFeatures",
        "UpsertItems",
        "GetPopularItems",
    }
    assert rpcs(trainer_pb2, "TrainerService") >= {
        "GetTrainerStatus",
        "TriggerTraining",
        "ListModels",
        "PromoteModel",
        "RollbackModel",
    }
    assert rpcs(inference_pb2, "InferenceService") >= {
        "Recommend",
        "ScoreItems",
        "SimilarItems",
        "GetModelInfo",
    }
    assert {f.name for f in inference_pb2.RecommendRequest.DESCRIPTOR.fields} >= {
        "user_id",
        "k",
        "exclude_item_ids",
        "categories",
        "include_seen",
        "diversity",
        "exploration",
        "context",
    }
    assert {f.name for f in inference_pb2.RecommendResponse.DESCRIPTOR.fields} >= {
        "items",
        "model_version",
        "trained_through",
    }
    assert {f.name for f in ingestion_pb2.IngestEventsResponse.DESCRIPTOR.fields} >= {
        "accepted",
        "duplicates",
        "errors",
    }
    assert ingestion_pb2.DESCRIPTOR.package == "freshrec.v1"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_services_never_import_each_other() -> None:
    for service in SERVICES:
        for path in (ROOT / "services" / service).rglob("*.py"):
            for module in imported_modules(path):
                for other in SERVICES:
                    if other != service:
                        assert not module.startswith(f"services.{other}"), f"{path} imports {module}"


def test_shared_does_not_import_services_or_torch() -> None:
    for path in (ROOT / "shared").rglob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith("services"), f"{path} imports {module}"
            assert module.split(".")[0] != "torch", f"{path} imports torch"


def test_inference_runs_where_torch_cannot_be_imported() -> None:
    """The inference image carries no PyTorch: import the whole service with torch blocked."""
    program = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not available in the inference image")
        return None
sys.meta_path.insert(0, NoTorch())
import services.inference.__main__, services.inference.server
from services.inference.settings import InferenceSettings
InferenceSettings()
assert "torch" not in sys.modules
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_service_has_help() -> None:
    for service in SERVICES:
        result = subprocess.run(
            [sys.executable, "-m", f"services.{service}", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "FRESHREC_" in result.stdout and "--grpc.port" in result.stdout


def test_tests_mirror_the_tree() -> None:
    """A service's, a shared module's or a test folder's tests live in its folder under tests/, not
    also in a tests/test_<name>.py beside it; only tests across several parts stay at the top."""
    tests = ROOT / "tests"
    subjects = {p.name for p in tests.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    subjects |= {p.name for p in (ROOT / "services").iterdir() if p.is_dir()}
    subjects |= {p.stem for p in (ROOT / "shared").glob("*.py")}
    beside = sorted(p.name for p in tests.glob("test_*.py") if p.stem.removeprefix("test_") in subjects)
    assert beside == [], f"move these into the folders of their subjects: {beside}"
