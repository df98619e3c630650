"""llmp's one Dockerfile: a COMPONENT build argument per image, multi-stage, pinned bases, the
component's lock, non-root, gRPC/HTTP healthchecks.

No Docker engine runs here; the Dockerfile is parsed into its instructions and each component's image
is resolved from it as BuildKit would (the COMPONENT argument substituted, the final stage followed
through the stages it builds on). The build stage's install step is run for real in a shell with `pip`
and `python` recording their arguments, so what each image installs (torch or not, which build) is
what the shell the image build runs decides. The healthcheck module is exercised in test_healthcheck.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from services.common import topology

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"
GATEWAY = "gateway"
# component -> (the module its CMD starts, the address its HEALTHCHECK asks, ports it exposes)
IMAGES = {
    **{service.name: (service.module, f"127.0.0.1:{service.port}", {service.port, service.metrics_port})
       for service in topology.GRPC_SERVICES},
    GATEWAY: (topology.GATEWAY_MODULE, f"http://127.0.0.1:{topology.GATEWAY_PORT}/healthz", {topology.GATEWAY_PORT}),
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


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def pinned(image: str) -> bool:
    """A digest, or a tag naming an exact release (digits), never a floating `latest`."""
    if "@sha256:" in image:
        return bool(re.search(r"@sha256:[0-9a-f]{64}$", image))
    _, _, tag = image.rpartition(":")
    return bool(re.match(r"\d+\.\d+\.\d+", tag))


PARSED = instructions(DOCKERFILE)
STAGES = {words[2]: stage for stage in stages(PARSED)
          if len(words := stage[0][1].split()) == 3 and words[1].upper() == "AS"}


def image_of(component: str) -> list[tuple[str, str]]:
    """The instructions that make `component`'s image, oldest stage first: the final `FROM ${COMPONENT}`
    resolved with the build argument, then each stage it is built `FROM`, back to the base image."""
    args = {**global_args(PARSED), "COMPONENT": component}
    final = stages(PARSED)[-1]
    chain: list[list[tuple[str, str]]] = [final]
    source = resolve(final[0][1].split()[0], args)
    while source in STAGES:
        chain.append(STAGES[source])
        source = resolve(STAGES[source][0][1].split()[0], args)
    return [instruction for stage in reversed(chain) for instruction in stage]


@pytest.fixture(params=sorted(IMAGES), ids=str)
def image(request):
    module, health_addr, ports = IMAGES[request.param]
    return request.param, image_of(request.param), module, health_addr, ports


def test_one_dockerfile_for_every_component():
    assert sorted(ROOT.glob("**/Dockerfile")) == [DOCKERFILE, ROOT / "deploy" / "triton" / "Dockerfile"]
    assert set(IMAGES) <= set(STAGES), sorted(set(IMAGES) - set(STAGES))
    assert resolve(stages(PARSED)[-1][0][1], {"COMPONENT": "x"}) == "x", "the image built is COMPONENT's stage"


def test_multi_stage_with_pinned_bases():
    args = global_args(PARSED)
    for stage in stages(PARSED):
        source = resolve(stage[0][1].split()[0], args)
        assert source in STAGES or source == args["COMPONENT"] or pinned(source), source
    assert any(name == "COPY" and value.startswith("--from=build ") for name, value in STAGES["runtime"])


def test_runs_as_a_non_root_user(image):
    _, parsed, *_ = image
    users = [value for name, value in parsed if name == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_starts_the_topology_module_and_checks_health_over_its_protocol(image):
    _, parsed, module, health_addr, _ = image
    runtime = dict(parsed)  # the last of each instruction wins, as in the image
    assert json.loads(runtime["CMD"]) == ["python", "-m", module]
    command = json.loads(runtime["HEALTHCHECK"].split("CMD", 1)[1])
    assert command == ["python", "-m", "services.common.healthcheck", health_addr]
    assert runtime["STOPSIGNAL"] == "SIGTERM"


def test_exposes_its_ports_and_listens_on_every_interface(image):
    _, parsed, _, _, ports = image
    exposed = {int(port) for name, value in parsed if name == "EXPOSE" for port in value.split()}
    assert exposed == ports
    env = " ".join(value for name, value in parsed if name == "ENV")
    assert "LLMP_BIND_HOST=0.0.0.0" in env


def _install_step(component: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """Run the build stage's RUN steps for `component` in a shell whose `pip` and `python` record their
    arguments; returns (pip calls, python calls)."""
    build = STAGES["build"]
    work = tmp_path / component
    (work / "bin").mkdir(parents=True)
    (work / "component.lock").write_text((ROOT / "deploy" / "locks" / f"{component}.lock").read_text())
    for tool in ("pip", "python"):
        script = work / "bin" / tool
        script.write_text(f'#!/bin/sh\necho "$*" >> "{work}/{tool}.calls"\n')
        script.chmod(0o755)
    steps = [resolve(value, {"COMPONENT": component}) for name, value in build if name == "RUN"
             and "venv" not in value]
    for step in steps:
        done = subprocess.run(["sh", "-ec", step.replace("/tmp/", f"{work}/")], cwd=work, capture_output=True,
                              text=True, env={**os.environ, "PATH": f"{work}/bin:{os.environ['PATH']}",
                                              "COMPONENT": component})
        assert done.returncode == 0, done.stderr
    calls = [(work / f"{tool}.calls") for tool in ("pip", "python")]
    return [path.read_text().splitlines() if path.exists() else [] for path in calls]


def test_each_image_installs_its_own_lock_then_llmp(image, tmp_path):
    component, *_ = image
    build = STAGES["build"]
    copied = [resolve(value, {"COMPONENT": component}) for name, value in build if name == "COPY"]
    assert copied[0] == f"deploy/locks/{component}.lock ./component.lock", \
        "the lock is copied (and installed) before the sources, so code edits keep the dependency layer"
    pip, python = _install_step(component, tmp_path)
    assert pip[0] == f"install --no-deps -r {tmp_path / component}/without-torch.lock"
    assert pip[-1] == "install --no-deps --no-build-isolation ."
    installed_without_torch = (tmp_path / component / "without-torch.lock").read_text()
    assert "torch==" not in installed_without_torch
    module = IMAGES[component][0] if component != "training" else topology.WORKER_APP
    assert python == [f"-c import {module}, services.common.healthcheck"]


def test_torch_only_where_the_lock_has_it_cuda_only_for_training(tmp_path):
    for component in IMAGES:
        pip, _ = _install_step(component, tmp_path)
        torch = [call for call in pip if "torch==" in call]
        has_torch = "torch==" in (ROOT / "deploy" / "locks" / f"{component}.lock").read_text()
        if not has_torch:
            assert not torch, component
        elif component == "training":
            assert torch == ["install -c component.lock torch==2.13.0"] and "whl/cpu" not in " ".join(torch)
        else:
            assert len(torch) == 1 and "--index-url https://download.pytorch.org/whl/cpu" in torch[0], component
            assert torch[0].endswith("+cpu"), component
    assert "inference" in IMAGES and "torch==" not in (ROOT / "deploy/locks/inference.lock").read_text()


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _matches(path: str, pattern: str) -> bool:
    plain = pattern.removeprefix("**/")
    return (fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, plain) or path.split("/")[0] == pattern
            or path.startswith(pattern.rstrip("/") + "/"))


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path decides; `!pattern` takes it back in."""
    dropped = False
    for pattern in patterns:
        if _matches(path, pattern.removeprefix("!")):
            dropped = not pattern.startswith("!")
    return dropped


def test_dockerignore_keeps_what_the_builds_copy_and_drops_local_state():
    patterns = dockerignore_patterns()
    for component in IMAGES:
        for name, value in image_of(component):
            if name == "COPY" and not value.startswith("--from"):
                *sources, _ = shlex.split(resolve(value, {"COMPONENT": component}))
                for source in sources:
                    assert not ignored(source, patterns), f"{component}'s image copies {source}: .dockerignore drops it"
    for local in (".venv", ".git", ".llmp", "tests", "services/dataset/__pycache__", "deploy/base/gateway.yaml"):
        assert ignored(local, patterns), local


def _locked(path: Path) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(line.strip()).name) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_images_install_every_module_the_code_imports_and_no_test_tool():
    """Every third-party module llmp's packages import comes from a distribution of the runtime lock;
    no image's lock (deploy/locks) holds a test or benchmark tool the code does not itself use (the
    runtime lock may: peft, a run-time dependency, requires accelerate)."""
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
    # What the imported distributions need at run time is no test tool there (peft requires accelerate).
    import importlib.util
    loader = importlib.util.spec_from_file_location("gen_runtime_lock", ROOT / "scripts" / "gen_runtime_lock.py")
    generator = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(generator)
    needed = generator.closure(sorted(imported))
    for lock in sorted((ROOT / "deploy" / "locks").glob("*.lock")):
        assert not (tools - needed) & _locked(lock), (lock.name, sorted((tools - needed) & _locked(lock)))
