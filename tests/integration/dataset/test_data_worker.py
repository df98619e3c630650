"""The CPU data worker started exactly as production starts it: the command, environment and liveness probe of
the Deployment `kubectl kustomize deploy/overlays/prod` renders, and the command and healthcheck of
docker-compose.yml's `data-worker`, on a Redis database of the test's own. Asked over the broker, it consumes
the `data` queue only, runs the dataset's tasks and no training task, and runs one pool process per CPU the
manifest requests (compose: per CPU it may use). tests/unit/deploy/test_data_worker.py checks the rest of the
manifests (no GPU, memory for its ranges, GPU workers off the `data` queue)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from services.common import topology
from services.common.config import Settings
from services.common.queues import DATA_QUEUE, celery_config, make_producer

ROOT = Path(__file__).resolve().parents[3]
CONFIG = celery_config(Settings.from_env({}))
DATA_TASKS = {task for task, route in CONFIG["task_routes"].items() if route["queue"] == DATA_QUEUE}
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][topology.DATA_WORKER]


@pytest.fixture(scope="module")
def manifest() -> dict:
    """The data worker's container in the production overlay, as the real kustomize renders it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/: apt-get install kubectl")
    done = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "overlays" / "prod")], capture_output=True,
                          text=True, timeout=120, check=True)
    (deployment,) = [obj for obj in yaml.safe_load_all(done.stdout) if obj and obj["kind"] == "Deployment"
                     and obj["metadata"]["name"] == topology.DATA_WORKER]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def downward_env(container: dict, pod: str) -> dict[str, str]:
    """The container's plain and downward-API variables as the kubelet fills them (fieldRef: the pod's name;
    resourceFieldRef: the quantity over its divisor, rounded up)."""
    env = {}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "fieldRef" in variable["valueFrom"]:
            assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[variable["name"]] = pod
        else:
            ref = variable["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            value, divisor = container["resources"][kind][resource], ref.get("divisor", "1")
            assert resource == "cpu" and not str(value).endswith("m") and divisor == "1", "whole CPUs here"
            env[variable["name"]] = str(math.ceil(float(value) / float(divisor)))
    return env


@contextmanager
def running(command: list[str], env: dict[str, str], log: Path, cpus: set[int] | None = None):
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    try:
        deadline = time.monotonic() + 90
        while "ready." not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker not ready: " + log.read_text()[-3000:]
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker_env(broker_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
    bin_dir = str(Path(sys.executable).parent)  # `celery` itself, on the PATH as in the image
    return env | {"PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
                  "LLMP_BROKER_URL": broker_url, "LLMP_STATE_DIR": str(tmp_path / "state"),
                  "LLMP_LOG_FORMAT": "text"} | extra


def ask(broker_url: str, hostname: str) -> tuple[set[str], int, set[str]]:
    """What the worker `hostname` consumes, its pool's size and its tasks, asked over the broker."""
    producer = make_producer(Settings.from_env({"LLMP_BROKER_URL": broker_url}))
    try:
        inspect = producer.control.inspect(destination=[hostname], timeout=5.0)
        queues = inspect.active_queues()[hostname]
        pool = inspect.stats()[hostname]["pool"]["max-concurrency"]
        registered = inspect.registered()[hostname]
    finally:
        producer.close()
    return {queue["name"] for queue in queues}, pool, set(registered)


def test_the_production_data_worker_takes_data_tasks_only_with_a_process_per_requested_cpu(
        manifest, own_broker_url, tmp_path):
    pod = f"data-worker-{uuid.uuid4().hex[:8]}"
    command = [part.replace("$(POD_NAME)", pod) for part in [*manifest.get("command", []), *manifest["args"]]]
    assert command[0] == "celery"
    filled = downward_env(manifest, pod)
    env = worker_env(own_broker_url, tmp_path, **filled)
    with running(command, env, tmp_path / "worker.log"):
        queues, pool, tasks = ask(own_broker_url, f"data@{pod}")
        assert queues == {DATA_QUEUE}
        assert pool == int(filled["LLMP_DATA_WORKER_CONCURRENCY"]) == math.ceil(
            float(manifest["resources"]["requests"]["cpu"]))
        assert tasks == DATA_TASKS, "the data worker runs the dataset's tasks and no training task"
        probe = manifest["livenessProbe"]["exec"]["command"]
        done = subprocess.run(probe, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    # The same probe fails once the worker is gone.
    done = subprocess.run([*probe[:-1], probe[-1].replace("--timeout 10", "--timeout 2")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def test_the_compose_data_worker_runs_a_process_per_cpu_it_may_use(own_broker_url, tmp_path):
    """LLMP_DATA_WORKER_CONCURRENCY=0: the CPUs the worker may use (here its affinity: one), not Celery's own
    default (the host's CPU count)."""
    command = [part.replace("$$", "$") for part in COMPOSE["command"]]
    env = worker_env(own_broker_url, tmp_path, LLMP_DATA_WORKER_CONCURRENCY="0")
    one_cpu = {min(os.sched_getaffinity(0))}
    with running(command, env, tmp_path / "worker.log", cpus=one_cpu):
        hostname = command[command.index("--hostname") + 1].replace("%h", socket.gethostname())
        queues, pool, _ = ask(own_broker_url, hostname)
        assert (queues, pool) == ({DATA_QUEUE}, 1)
        kind, script = COMPOSE["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        done = subprocess.run(["sh", "-c", script.replace("$$", "$")],
                              env=env | {"HOSTNAME": socket.gethostname()}, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
