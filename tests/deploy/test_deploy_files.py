"""CI has no Docker engine: these tests parse docker-compose.yml and the Dockerfile and check them against the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _settings_env_names() -> set[str]:
    """Every DAE_* variable the gateway's and the worker's settings read."""
    from service.config import Settings
    from worker.config import WorkerSettings

    names = set()
    for settings_class in (Settings, WorkerSettings):
        prefix = settings_class.model_config.get("env_prefix", "")
        names |= {f"{prefix}{field}".upper() for field in settings_class.model_fields}
    return names


def test_compose_has_the_services_and_volumes(compose: dict) -> None:
    assert set(compose["services"]) >= {"redis", "gateway", "worker", "flower"}
    assert compose["services"]["flower"]["profiles"] == ["monitoring"]
    assert set(compose["volumes"]) == {"redis-data", "store"}
    for service in ("gateway", "worker"):
        assert "store:/data/store" in compose["services"][service]["volumes"]


def test_redis_is_durable_and_never_evicts(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["volumes"] == ["redis-data:/data"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_gateway_and_worker_commands_point_at_real_code(compose: dict) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["ports"] == ["8000:8000"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    module, attribute = gateway["command"][1].split(":")
    assert gateway["command"][0] == "uvicorn" and module == "service.main" and attribute == "app"
    assert "--port" in gateway["command"] and gateway["command"][gateway["command"].index("--port") + 1] == "8000"

    worker = compose["services"]["worker"]
    assert worker["command"][:3] == ["celery", "-A", "worker.celery_app"]
    assert "ports" not in worker, "workers must be scalable (--scale worker=3), so they publish no fixed port"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    importlib.import_module("worker.celery_app")  # the app the command names exists and imports without TensorFlow


def test_compose_environment_matches_settings(compose: dict) -> None:
    known = _settings_env_names()
    for service in ("gateway", "worker"):
        environment = compose["services"][service]["environment"]
        unknown = {name for name in environment if name not in known}
        assert not unknown, f"{service} sets variables no settings class reads: {sorted(unknown)}"
        assert environment["DAE_REDIS_URL"] == "redis://redis:6379/0"
        assert environment["DAE_STORE_DIR"] == "/data/store"


def test_env_example_only_names_real_settings() -> None:
    names = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert names and names <= _settings_env_names()


def test_dockerfile_builds_slim_non_root_images_with_offline_data(dockerfile: str) -> None:
    assert re.search(r"^FROM python:3\.11-slim\S* AS base$", dockerfile, re.M)
    targets = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M)
    assert {"gateway", "full"} <= set(targets), targets
    assert targets[-1] == "full", "the default (last) target must be the full image that compose builds"
    assert "dataset-fashion-mnist" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and all(user != "root" for user in users)
    for requirements in re.findall(r"COPY (requirements\S*\.txt)", dockerfile):
        assert (ROOT / requirements).is_file(), requirements


def test_gateway_requirements_leave_out_tensorflow() -> None:
    lines = (ROOT / "requirements-gateway.txt").read_text().lower().splitlines()
    packages = {line.split("==")[0] for line in lines if "==" in line}
    assert not {name for name in packages if "tensorflow" in name or name in ("keras", "tf2onnx")}
    assert {"onnxruntime", "fastapi", "uvicorn", "celery", "redis"} <= packages


def test_gateway_pins_are_the_same_versions_as_the_full_image() -> None:
    def pins(name: str) -> set[str]:
        return {line for line in (ROOT / name).read_text().splitlines() if "==" in line}

    assert pins("requirements-gateway.txt") <= pins("requirements.txt")


def test_every_requirement_is_pinned() -> None:
    for name in ("requirements.txt", "requirements-gateway.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "-r")):
                assert "==" in line, f"{name}: {line!r} is not pinned with =="


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in _settings_env_names() if f"`{name}`" not in readme)
    assert not missing, f"README.md's configuration table lacks {missing}"


def _stages(dockerfile: str) -> dict[str, str]:
    """Dockerfile text per stage name (FROM ... AS name)."""
    parts = re.split(r"^FROM \S+ AS (\S+)\s*$", dockerfile, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _project_packages_imported(entry: str) -> set[str]:
    """The repository's top-level packages that importing `entry` loads (in a fresh interpreter)."""
    import json
    import subprocess
    import sys

    code = f"import json, sys, {entry}; print(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                            timeout=120).stdout
    loaded = set(json.loads(output.strip().splitlines()[-1]))
    return {package for package in loaded if (ROOT / package / "__init__.py").is_file()}


@pytest.mark.parametrize(("stage", "entry"), [("gateway", "service.main"), ("full", "worker.tasks")])
def test_each_image_copies_every_package_its_entry_point_imports(dockerfile: str, stage: str, entry: str) -> None:
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", _stages(dockerfile)[stage], flags=re.M))
    needed = _project_packages_imported(entry)
    assert needed <= copied, f"stage {stage} lacks {sorted(needed - copied)}"
    assert {"dae", "core"} <= needed  # the check sees the packages at all
