"""The per-service Dockerfiles: multi-stage, pinned bases, the lock, non-root, gRPC/HTTP healthchecks.

No Docker engine runs here; each Dockerfile is parsed into its instructions and checked, and the
healthcheck module it runs is exercised for real in test_healthcheck.py.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

from services.common import topology

ROOT = Path(__file__).resolve().parents[3]
GATEWAY = "gateway"
# component -> (Dockerfile, the module its CMD starts, the address its HEALTHCHECK asks, ports it exposes)
IMAGES = {
    **{service.name: (f"services/{service.name}/Dockerfile", service.module, f"127.0.0.1:{service.port}",
                      {service.port, service.metrics_port}) for service in topology.GRPC_SERVICES},
    GATEWAY: ("gateway/Dockerfile", topology.GATEWAY_MODULE, f"http://127.0.0.1:{topology.GATEWAY_PORT}/healthz",
              {topology.GATEWAY_PORT}),
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in parsed:
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def global_args(parsed: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for name, value in parsed:
        if name == "FROM":
            break
        if name == "ARG" and "=" in value:
            key, default = value.split("=", 1)
            args[key] = default
    return args


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)


def pinned(image: str) -> bool:
    """A digest, or a tag naming an exact release (digits), never a floating `latest`."""
    if "@sha256:" in image:
        return bool(re.search(r"@sha256:[0-9a-f]{64}$", image))
    _, _, tag = image.rpartition(":")
    return bool(re.match(r"\d+\.\d+\.\d+", tag))


@pytest.fixture(params=sorted(IMAGES), ids=str)
def image(request):
    dockerfile, module, health_addr, ports = IMAGES[request.param]
    parsed = instructions(ROOT / dockerfile)
    return request.param, parsed, module, health_addr, ports


def test_multi_stage_with_pinned_bases(image):
    _, parsed, *_ = image
    args = global_args(parsed)
    froms = [value.split() for name, value in parsed if name == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    for words in froms:
        assert pinned(resolve(words[0], args)), words[0]
        assert words[1].upper() == "AS"
    runtime = stages(parsed)[-1]
    assert any(name == "COPY" and value.startswith("--from=build ") for name, value in runtime)


def test_installs_the_lock_without_resolving_then_the_project(image):
    _, parsed, *_ = image
    build = " ".join(value for name, value in stages(parsed)[0] if name == "RUN")
    assert re.search(r"pip install --no-deps -r (requirements-runtime\.lock|/tmp/lock-without-torch\.txt)", build)
    assert "pip install --no-deps --no-build-isolation ." in build
    copied = [value for name, value in stages(parsed)[0] if name == "COPY"]
    assert copied.index("requirements-runtime.lock ./") < copied.index("services ./services"), \
        "the lock is installed before the sources are copied, so code edits keep the dependency layer"


def test_runs_as_a_non_root_user(image):
    _, parsed, *_ = image
    users = [value for name, value in stages(parsed)[-1] if name == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_starts_the_topology_module_and_checks_health_over_its_protocol(image):
    _, parsed, module, health_addr, _ = image
    runtime = dict(stages(parsed)[-1])
    assert json.loads(runtime["CMD"]) == ["python", "-m", module]
    healthcheck = runtime["HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command == ["python", "-m", "services.common.healthcheck", health_addr]
    assert runtime["STOPSIGNAL"] == "SIGTERM"


def test_exposes_its_ports_and_listens_on_every_interface(image):
    _, parsed, _, _, ports = image
    runtime = stages(parsed)[-1]
    exposed = {int(port) for name, value in runtime if name == "EXPOSE" for port in value.split()}
    assert exposed == ports
    env = " ".join(value for name, value in runtime if name == "ENV")
    assert "LLMP_BIND_HOST=0.0.0.0" in env


def test_training_image_carries_cuda_torch_and_the_others_cpu_torch():
    for name, (dockerfile, *_) in IMAGES.items():
        build = " ".join(value for kind, value in stages(instructions(ROOT / dockerfile))[0] if kind == "RUN")
        if name == "training":
            assert "pip install -c requirements-runtime.lock" in build and "whl/cpu" not in build
        else:
            assert "download.pytorch.org/whl/cpu" in build


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        plain = pattern.removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, plain) or path.split("/")[0] == pattern:
            return True
    return False


def test_dockerignore_keeps_what_the_builds_copy_and_drops_local_state():
    patterns = dockerignore_patterns()
    for dockerfile, *_ in IMAGES.values():
        for name, value in instructions(ROOT / dockerfile):
            if name == "COPY" and not value.startswith("--from"):
                *sources, _ = shlex.split(value)
                for source in sources:
                    assert not ignored(source, patterns), f"{dockerfile} copies {source}, which .dockerignore drops"
    for local in (".venv", ".git", ".llmp", "tests", "services/dataset/__pycache__"):
        assert ignored(local, patterns), local


def test_the_runtime_lock_is_the_locks_run_time_part():
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_runtime_lock.py"), "--check"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr + done.stdout


def _locked(path: Path) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(line.strip()).name) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_images_install_every_module_the_code_imports_and_no_test_tool():
    """Every third-party module llmp's packages import comes from a distribution of the runtime lock;
    the test and benchmark extras' own tools are not in it."""
    import ast
    import sys
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    runtime = _locked(ROOT / "requirements-runtime.lock")
    providers = metadata.packages_distributions()
    imported: set[str] = set()
    for package in ("services", "gateway", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            if path.parent.name == "triton_model":  # runs inside Triton's Python backend (deploy/triton)
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in {"services", "gateway", "cli", "llmp"}:
                        continue
                    dists = {canonicalize_name(d) for d in providers.get(top, [])}
                    assert dists & runtime, f"{path.relative_to(ROOT)} imports {top}, which no image installs"
                    imported |= dists
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tools = {canonicalize_name(Requirement(text).name) for group in ("test", "bench") for text in extras[group]}
    assert not (tools - imported) & runtime, sorted((tools - imported) & runtime)
