"""Rendered manifests shared by the deploy tests, rendered once per session by the real kustomize
(`kubectl kustomize`, the renderer `kubectl apply -k` uses) so what is tested is what a cluster gets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[3]
OVERLAYS = tuple(sorted(path.name for path in (ROOT / "deploy" / "overlays").iterdir()
                        if (path / "kustomization.yaml").exists()))


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/: apt-get install kubectl")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def containers(obj: dict) -> list[dict]:
    """Every container (and init container) of a workload or Job's pod template."""
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") if obj["kind"] != "Pod" else spec
    if pod is None:
        return []
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 10**-3}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("4", "500m", "6Gi") as a number (bytes, CPUs)."""
    text = str(value)
    for suffix in sorted(UNITS, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return float(text[:-len(suffix)]) * UNITS[suffix]
    return float(text)


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    """(name, rendered objects) of each overlay in deploy/overlays."""
    return request.param, render(ROOT / "deploy" / "overlays" / request.param)


@pytest.fixture(scope="session")
def prod() -> list[dict]:
    return render(ROOT / "deploy" / "overlays" / "prod")


@pytest.fixture(scope="session")
def dev() -> list[dict]:
    return render(ROOT / "deploy" / "overlays" / "dev")
