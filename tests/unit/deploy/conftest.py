"""Rendered manifests shared by the deploy tests (rendered once per session: they are pure data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kustomize_render import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
OVERLAYS = ("dev", "prod")


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
