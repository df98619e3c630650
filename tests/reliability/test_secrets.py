"""Issue 9, item 9: no credential in the repository or in any log; S3 and PostgreSQL credentials only
from configuration."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Shapes of real credentials: cloud keys, private keys, our own API keys, tokens of the usual hosts.
PATTERNS = {
    "AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    "llmp API key": re.compile(r"\bllmp_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}\b"),
    "URL with a password": re.compile(r"\b[a-z+]+://[^/\s:@'\"]+:(?!\*\*\*|\$|\{)[^/\s:@'\"]{6,}@"),
}
# Placeholders that only stand for a password in examples and tests.
PLACEHOLDERS = re.compile(r":(secret|password|passw0rd|changeme|example|hunter2)@")


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_no_credential_is_committed():
    found = []
    for path in tracked_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode(errors="ignore")
        for kind, pattern in PATTERNS.items():
            for match in pattern.finditer(text):
                if PLACEHOLDERS.search(match.group(0)):
                    continue
                found.append(f"{path.relative_to(ROOT)}: {kind}: {match.group(0)[:60]}")
    assert not found, "\n".join(found)


@pytest.mark.e2e
@pytest.mark.slow
def test_no_credential_reaches_a_log(stack):
    """After the rest of the suite ran against it, no log of the stack holds a secret it was given."""
    stack.http("GET", "/v1/datasets", key=stack.keys[("acme", "developer")])
    stack.http("GET", "/v1/datasets", key=stack.keys[("acme", "developer")] + "x")  # a wrong key is logged?
    env = stack.resolved_env()
    secrets = {"admin key": stack.admin_key, "S3 secret": env["LLMP_S3_SECRET_KEY"],
               **{f"API key {tenant}/{role}": key for (tenant, role), key in stack.keys.items()}}
    secrets = {name: value for name, value in secrets.items() if len(value) >= 12}
    logs = sorted((stack.state_dir / "logs").glob("*.log"))
    assert len(logs) >= 8
    leaks = []
    for log in logs:
        text = log.read_text(errors="ignore")
        leaks += [f"{log.name}: {name}" for name, value in secrets.items() if value in text]
        # llmp_<key id>_<secret>: the secret (token_urlsafe) may itself hold "_", so split from the left.
        secret_part = [value.split("_", 2)[2] for value in stack.keys.values()]
        leaks += [f"{log.name}: an API key's secret" for value in secret_part if value in text]
    assert not leaks, leaks
