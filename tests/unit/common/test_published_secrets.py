"""Issue 15, hygiene: S3 credentials left at their published defaults (`llmp` / `llmp-secret-key`) no longer
apply silently: every process names each such variable in a warning when it configures its logging."""

from __future__ import annotations

import json
import logging

import pytest

from services.common import logs
from services.common.config import DEFAULTS, PUBLISHED_SECRETS, Settings


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_published_defaults_are_the_s3_credentials():
    assert DEFAULTS["LLMP_S3_ACCESS_KEY"] == "llmp" and DEFAULTS["LLMP_S3_SECRET_KEY"] == "llmp-secret-key"
    assert Settings.from_env({}).published_secrets() == list(PUBLISHED_SECRETS)
    explicit = Settings.from_env({"LLMP_S3_SECRET_KEY": "llmp-secret-key"})  # set, but to the published value
    assert explicit.published_secrets() == list(PUBLISHED_SECRETS)
    own = Settings.from_env({"LLMP_S3_ACCESS_KEY": "ours", "LLMP_S3_SECRET_KEY": "s3cr3t"})
    assert own.published_secrets() == []


def _warnings(capsys) -> list[dict]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "warning"]


def test_a_process_names_each_default_secret_in_a_warning(capsys, restored_logging):
    logs.configure(Settings.from_env({"LLMP_S3_ACCESS_KEY": "ours"}), "gateway")
    warned = _warnings(capsys)
    assert len(warned) == 1 and "LLMP_S3_SECRET_KEY" in warned[0]["message"], warned
    assert "llmp-secret-key" not in json.dumps(warned)  # names the variable, never prints a secret
    logs.configure(Settings.from_env({"LLMP_S3_ACCESS_KEY": "ours", "LLMP_S3_SECRET_KEY": "s3cr3t"}), "gateway")
    assert _warnings(capsys) == []
