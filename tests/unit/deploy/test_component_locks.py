"""Each image installs only its component's dependencies (issue 16), and they are enough to run it.

`scripts/gen_runtime_lock.py` derives deploy/locks/<component>.lock from the component's import closure.
Here each lock is put to the test without Docker or a package index: a fresh virtual environment (no
system site-packages) gets exactly the distributions the lock names, linked from the ones installed
here, at the lock's versions; then the component's entry modules, the healthcheck module every image's
HEALTHCHECK runs, and what its libraries load by name are imported in it. A module the lock lacks fails
the import, so a lock that shrank too far cannot pass; the inference image's carries no torch. Every
third-party name the code uses is imported as the code imports it, the lazy imports inside functions too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("gen_runtime_lock", ROOT / "scripts" / "gen_runtime_lock.py")
gen_runtime_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_runtime_lock)
COMPONENTS = sorted(gen_runtime_lock.COMPONENT_ENTRIES)


def locked(component: str) -> dict[str, str]:
    """Canonical name -> pinned version of every line of a component's lock."""
    pins = {}
    for line in (gen_runtime_lock.COMPONENT_LOCKS / f"{component}.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _installed() -> dict[str, metadata.Distribution]:
    return {canonicalize_name(dist.metadata["Name"]): dist for dist in metadata.distributions()}


def environment_of(component: str, where: Path) -> Path:
    """A virtual environment holding exactly the component lock's distributions; returns its python."""
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    installed = _installed()
    # Top-level entries shared by several installed distributions (namespace packages: google/,
    # opentelemetry/) are linked file by file; the others whole.
    owners: dict[str, set[str]] = {}
    for name, dist in installed.items():
        for file in dist.files or []:
            if not str(file).startswith(".."):
                owners.setdefault(file.parts[0], set()).add(name)
    for name, version in locked(component).items():
        dist = installed.get(name)
        # The public version: torch's CPU build here is 2.13.0+cpu, as the CPU images install it.
        assert dist is not None and Version(dist.version).public == version, f"{name}=={version} is not installed here"
        for file in dist.files or []:
            if str(file).startswith("..") or file.parts[0] == "__pycache__":
                continue
            whole = owners[file.parts[0]] == {name}
            source = Path(dist.locate_file(file.parts[0] if whole else file))
            target = site / (file.parts[0] if whole else file)
            if target.is_symlink() or target.exists() or not source.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return python


def test_the_generated_locks_are_current():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_runtime_lock.py"), "--check"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr + done.stdout


def test_each_lock_is_a_subset_of_the_one_lock_and_only_the_ones_that_need_it_get_torch():
    full = {canonicalize_name(Requirement(line).name): line
            for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")}
    for component in COMPONENTS:
        for name, version in locked(component).items():
            assert full[name].endswith(f"=={version}"), (component, name)
    assert "torch" not in locked("inference"), "the inference service's code does not import torch"
    assert "torch" not in locked("gateway") and "torch" not in locked("dataset")
    assert "torch" in locked("training") and "torch" in locked("registry")  # training; ONNX export
    for component in COMPONENTS:  # no test or benchmark tool in an image
        assert not {"pytest", "selenium", "datasets", "ruff", "schemathesis"} & set(locked(component)), component


IMPORT_LIKE_THE_CODE = """
import importlib, sys

def use(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        parent, _, attribute = name.rpartition(".")
        if error.name != name or not parent:
            raise
        getattr(importlib.import_module(parent), attribute)
"""


@pytest.mark.slow  # a few seconds per component: torch's import in the training and registry venvs
@pytest.mark.parametrize("component", COMPONENTS)
def test_the_component_runs_from_its_lock_alone(component, tmp_path):
    python = environment_of(component, tmp_path / "venv")
    modules = [*gen_runtime_lock.COMPONENT_ENTRIES[component], gen_runtime_lock.HEALTHCHECK_MODULE]
    used = gen_runtime_lock.third_party_imports(gen_runtime_lock.COMPONENT_ENTRIES[component])
    loaded = sorted({extra for prefix, extras in gen_runtime_lock.LOADED_BY_NAME.items()
                     if any(name == prefix or name.startswith(prefix + ".") for name in used) for extra in extras})
    if component == "training":
        modules.append("services.training.train")  # what the worker launches under torchrun
    # Each third-party name the code uses, as the code uses it (lazy imports inside functions included):
    # `import a.b`, or `from a import b` (a module, or a name the package may load on first access).
    script = IMPORT_LIKE_THE_CODE + "".join(f"use({name!r})\n" for name in [*modules, *sorted(used), *loaded])
    script += "print(sorted(m for m in sys.modules if m in ('torch', 'onnxruntime', 'celery')))\n"
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    done = subprocess.run([python, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}", "PYTHONNOUSERSITE": "1"})
    assert done.returncode == 0, f"{component} cannot start from its lock:\n{done.stderr[-3000:]}"
    if component == "inference":
        assert "torch" not in done.stdout
