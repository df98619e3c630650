"""Services meet over gRPC and `services.common.contracts`, never each other's modules or spellings.

Both checks walk the source (the AST, not a list of known offenders), so a new module is covered the
day it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ROOT / "services"
CONTRACTS = SERVICES / "common" / "contracts"
# Where a service's code lives; each must keep the bucket layout to the contracts.
CODE_DIRS = ("services", "gateway", "cli", "bench", "scripts")
# The roots of the bucket layout (services/common/contracts/paths.py). A bare "models" is a JSON field
# or an OpenAPI tag; a key starts with the root and a slash.
STORAGE_ROOTS = ("models/", "datasets/", "jobs/", "sources/")
# Still spelling a path, until the training worker is split (services/training/dispatch.py and friends):
# its init_from prefix must become contracts.model_version_prefix.
NOT_YET: set[Path] = set()


def _modules(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an import statement names (`from a import b` names `a` and `a.b`), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")  # a relative import is reported as foreign
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _foreign_imports(path: Path, text: str | None = None) -> list[str]:
    own = path.relative_to(SERVICES).parts[0]
    bad = []
    for line, module in _imported(ast.parse(path.read_text() if text is None else text, str(path))):
        if module.startswith("."):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            continue
        parts = module.split(".")
        if parts[0] == "services" and len(parts) > 1 and parts[1] not in (own, "common"):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


SERVICE_MODULES = [path for path in _modules(SERVICES) if len(path.relative_to(SERVICES).parts) > 1]


def test_the_walk_sees_every_service():
    assert {path.relative_to(SERVICES).parts[0] for path in SERVICE_MODULES} >= {
        "common", "dataset", "inference", "registry", "training"}


@pytest.mark.parametrize("path", SERVICE_MODULES, ids=lambda path: str(path.relative_to(SERVICES)))
def test_no_service_imports_another(path):
    assert _foreign_imports(path) == []


def test_the_import_check_catches_a_foreign_import():
    text = ("import services.registry.layout\nfrom services.training import data\nfrom services.common import s3\n"
            "from services.inference import sampling\ndef f():\n    from ..registry import onnx_export\n")
    found = _foreign_imports(SERVICES / "inference" / "probe.py", text)
    assert [entry.split(" imports ")[1] for entry in found] == [
        "services.registry.layout", "services.training", "services.training.data", "..registry",
        "..registry.onnx_export"]


def _spells_a_storage_path(value: str) -> bool:
    return value.startswith(STORAGE_ROOTS)


def _storage_spellings(path: Path, text: str | None = None) -> list[str]:
    """String constants and f-strings that start a bucket key (docstrings aside)."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    inside_fstring = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and id(node) not in inside_fstring and _spells_a_storage_path(node.value):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and _spells_a_storage_path(str(node.values[0].value)):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} f{ast.unparse(node)[1:]}")
    return found


CODE_MODULES = [path for folder in CODE_DIRS for path in _modules(ROOT / folder)
                if CONTRACTS not in path.parents and path not in NOT_YET]


def test_only_the_contracts_spell_storage_paths():
    assert [spelled for path in CODE_MODULES for spelled in _storage_spellings(path)] == []


def test_the_path_check_catches_constants_and_fstrings():
    text = ('"""Keys like models/{tenant}/ in a docstring are prose."""\n'
            'A = "models/"\nB = f"datasets/{t}/{n}/v{v}/"\nC = "jobs"\nD = f"/v1/datasets/{n}"\nE = "modelsx/"\n')
    assert [entry.split(" ", 1)[1] for entry in _storage_spellings(SERVICES / "dataset" / "probe.py", text)] == [
        "'models/'", "f'datasets/{t}/{n}/v{v}/'"]
