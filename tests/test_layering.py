"""The import direction of DESIGN.md, checked on the source of every module (function-level imports included):
`dae` (ML) and `core` (shared state, no ML) below `service` (gateway) and `worker`; `core` sees only the contracts
of `dae`, `dae` only the atomic write of `core`; the gateway never imports the worker or TensorFlow, the worker never imports the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ML_LIBRARIES = ("tensorflow", "keras", "tf2onnx")

#: package → (forbidden import prefixes, allowed exceptions among them)
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # core.fsio is standard library only: the one atomic write, which training's checkpoints use too.
    "dae": (("core", "service", "worker", "redis", "celery", "kombu", "fastapi", "starlette"), ("core.fsio",)),
    "core": (("dae", "service", "worker", "celery", *ML_LIBRARIES), ("dae.spec", "dae.errors", "dae.fingerprints")),
    "service": (("worker", "celery.worker", *ML_LIBRARIES), ()),
    "worker": (("service", "fastapi", "starlette"), ()),
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(RULES))
def test_imports_follow_the_layering(package: str) -> None:
    forbidden, allowed = RULES[package]
    violations = []
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(matches(module, prefix) for prefix in forbidden) and not any(
                matches(module, exception) for exception in allowed
            ):
                violations.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert violations == []


def test_the_checker_sees_nested_imports(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("def later():\n    import keras.ops\n    from core.store import ModelStore\n")
    assert imported_modules(source) == {"keras.ops", "core.store"}
