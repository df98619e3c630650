"""The CPU data workers: every overlay and docker-compose.yml run them on the `data` queue only, with no GPU and
memory for the ranges they run at once, and the GPU workers leave that queue to them.

The queues, the data tasks and the worker app come from services/common/queues.py and topology.py; the
manifests are rendered by the real kustomize (conftest.py). tests/integration/dataset/test_data_worker.py
starts the worker as the rendered Deployment and the compose file do and asks it over a real broker.
"""

from __future__ import annotations

import math
import os

import pytest
from conftest import containers, quantity
from test_compose import SERVICES, environment, interpolate
from test_kubernetes import by_kind, pod_spec, workloads

from services.common import topology
from services.common.config import Settings
from services.common.queues import DATA_QUEUE, DATA_WORKER_QUEUES, GPU_WORKER_QUEUES, celery_config
from services.dataset import worker as data_worker

CONFIG = celery_config(Settings.from_env({}))
ALL_QUEUES = {queue.name for queue in CONFIG["task_queues"]}
DATA_TASKS = {task for task, route in CONFIG["task_routes"].items() if route["queue"] == DATA_QUEUE}
GPU = "nvidia.com/gpu"
def celery_args(container: dict) -> list[str] | None:
    command = [*container.get("command", []), *container.get("args", [])]
    return command if command[:1] == ["celery"] and "worker" in command else None


def consumed(command: list[str]) -> set[str]:
    return set(command[command.index("--queues") + 1].split(","))


def celery_workers(objects: list[dict]) -> dict[str, tuple[dict, dict, list[str]]]:
    """Workload name -> (workload, container, command) of every Celery worker a rendering runs."""
    found = {}
    for obj in workloads(objects):
        for container in containers(obj):
            if (command := celery_args(container)) is not None:
                found[obj["metadata"]["name"]] = (obj, container, command)
    return found


def manifest_concurrency(container: dict) -> int:
    """The pool size the manifest gives: LLMP_DATA_WORKER_CONCURRENCY as the downward API fills it (a
    resourceFieldRef with divisor 1 is the quantity rounded up) or as a value."""
    (variable,) = [v for v in container["env"] if v["name"] == "LLMP_DATA_WORKER_CONCURRENCY"]
    if "value" in variable:
        return int(variable["value"])
    ref = variable["valueFrom"]["resourceFieldRef"]
    assert ref["containerName"] == container["name"]
    kind, resource = ref["resource"].split(".")
    return math.ceil(quantity(container["resources"][kind][resource]) / quantity(ref.get("divisor", "1")))


# -- Kubernetes ------------------------------------------------------------------------------------

def test_every_overlay_runs_data_workers_on_the_data_queue_only(overlay):
    name, objects = overlay
    workers = celery_workers(objects)
    assert topology.DATA_WORKER in workers, f"{name} has no data worker"
    obj, container, command = workers[topology.DATA_WORKER]
    assert command[:4] == ["celery", "--app", topology.DATA_WORKER_APP, "worker"]
    assert consumed(command) == {DATA_QUEUE} == set(DATA_WORKER_QUEUES.split(","))
    assert "--concurrency" not in command and "-c" not in command  # the setting decides (below)
    assert container["image"].rsplit("/", 1)[-1].startswith("dataset:"), "the CPU image: no torch, no CUDA"
    assert obj["spec"].get("replicas", 1) >= 1
    assert pod_spec(obj)["serviceAccountName"] == f"llmp-{topology.DATA_WORKER}"


def test_gpu_workers_leave_the_data_queue_and_every_queue_has_a_consumer(overlay):
    name, objects = overlay
    workers = celery_workers(objects)
    for worker, (_, container, command) in workers.items():
        gpus = container["resources"].get("limits", {}).get(GPU)
        if gpus:  # a GPU node's slot is for training and evaluations
            assert DATA_QUEUE not in consumed(command), f"{name}: {worker} takes dataset ranges on a GPU"
            assert consumed(command) == set(GPU_WORKER_QUEUES.split(","))
        else:  # a CPU worker never takes a job that needs a GPU
            assert consumed(command) <= {DATA_QUEUE}, f"{name}: {worker} has no GPU"
    assert set().union(*(consumed(command) for _, _, command in workers.values())) == ALL_QUEUES


def test_the_data_worker_asks_for_no_gpu_and_its_memory_holds_its_ranges(overlay):
    name, objects = overlay
    obj, container, _ = celery_workers(objects)[topology.DATA_WORKER]
    spec = pod_spec(obj)
    resources = container["resources"]
    assert GPU not in str(resources) and GPU not in str(spec.get("nodeSelector", {}))
    assert not [t for t in spec.get("tolerations", []) if GPU in str(t)]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    processes = manifest_concurrency(container)
    assert processes == math.ceil(quantity(resources["requests"]["cpu"])), "one process per requested CPU"
    settings = Settings.from_env(by_kind(objects, "ConfigMap")["llmp-config"]["data"])
    memory = data_worker.worker_memory_bytes(processes, settings.dataset_shard_bytes)
    assert quantity(resources["limits"]["memory"]) >= memory, f"{name}: {processes} ranges at their peak do not fit"
    # scheduled where most of it is free: ranges of the shortest documents are the worst case, not the usual one
    assert quantity(resources["requests"]["memory"]) >= memory * 0.6, f"{name}: request far below the ranges' peak"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    scratch = volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]  # tempfile's folder: where a range's files go
    assert quantity(scratch) >= data_worker.worker_scratch_bytes(processes, settings.dataset_shard_bytes), name
    # an emptyDir is the node's disk: the scheduler places the pod where that much is free only if it is asked
    assert quantity(resources["requests"].get("ephemeral-storage", 0)) >= quantity(scratch), name
    budgets = [b for b in by_kind(objects, "PodDisruptionBudget").values()
               if b["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": topology.DATA_WORKER}]
    assert len(budgets) == 1


# -- docker compose --------------------------------------------------------------------------------

def compose_memory(service: str) -> float:
    size = interpolate(str(SERVICES[service]["deploy"]["resources"]["limits"]["memory"])).lower()
    number = size.rstrip("bkmg")
    return float(number) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size[len(number):][:1] or "b"]


def test_compose_runs_a_cpu_data_worker_and_gpu_workers_leave_it_the_data_queue():
    command = SERVICES[topology.DATA_WORKER]["command"]
    assert command[:4] == ["celery", "--app", topology.DATA_WORKER_APP, "worker"]
    assert consumed(command) == {DATA_QUEUE}
    assert SERVICES[topology.DATA_WORKER]["build"]["args"] == {"COMPONENT": "dataset"}
    assert "reservations" not in SERVICES[topology.DATA_WORKER].get("deploy", {}).get("resources", {})
    workers = {name: spec["command"] for name, spec in SERVICES.items() if celery_args(spec) is not None}
    for name, worker_command in workers.items():
        reserved = SERVICES[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        if "devices" in reserved:
            assert consumed(worker_command) == set(GPU_WORKER_QUEUES.split(",")), name
        else:
            assert consumed(worker_command) <= {DATA_QUEUE}, name
    assert set().union(*(consumed(c) for c in workers.values())) == ALL_QUEUES
    settings = Settings.from_env(environment(topology.DATA_WORKER))
    assert settings.data_worker_concurrency >= 1, "compose hosts differ: a fixed count the memory limit fits"
    memory = data_worker.worker_memory_bytes(settings.data_worker_concurrency, settings.dataset_shard_bytes)
    assert compose_memory(topology.DATA_WORKER) >= memory


# -- the pool's size ---------------------------------------------------------------------------------

def test_the_pool_follows_the_containers_cpu_quota(tmp_path):
    """A quota's CPUs rounded up (tests/unit/inference/test_usable_cores.py has the cases), unless set."""
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert data_worker.concurrency(Settings.from_env({}), tmp_path) == min(2, len(os.sched_getaffinity(0)))
    assert data_worker.concurrency(Settings.from_env({"LLMP_DATA_WORKER_CONCURRENCY": "7"}), tmp_path) == 7


def test_a_concurrency_that_is_not_a_count_is_refused_by_name():
    from services.common.errors import InvalidArgument

    for bad in ("-1", "two", "1.5"):
        with pytest.raises(InvalidArgument, match="LLMP_DATA_WORKER_CONCURRENCY"):
            Settings.from_env({"LLMP_DATA_WORKER_CONCURRENCY": bad})

