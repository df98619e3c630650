"""The launcher's parts that need no server: the component table and its order, settings resolution, the
state file, and the component protocol's start and stop over real local processes."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import servers
from cli.stack import broker, component, lifecycle, s3, settings, table
from cli.stack.commands import format_table
from cli.stack.errors import StackError
from cli.stack.state import Record, StackState, StateDir
from services.common import config, topology
from services.common.config import Settings


def rewired(name: str, requires: tuple[str, ...]) -> component.Component:
    """A real component of the table under another name and other requirements (for graph tests)."""
    return dataclasses.replace(table.BY_NAME["dataset"], name=name, requires=requires)


def test_the_table_lists_the_infrastructure_then_the_services_then_the_worker_and_the_gateway():
    names = [c.name for c in table.COMPONENTS]
    assert names == [*table.INFRA, *(s.name for s in topology.GRPC_SERVICES), "worker", "gateway"]
    assert len(set(names)) == len(names) and list(table.BY_NAME) == names
    assert all(c.module is None for c in table.COMPONENTS[:len(table.INFRA)])  # third-party servers
    assert all(c.module for c in table.COMPONENTS[len(table.INFRA):])  # llmp's own processes
    assert table.missing_modules(names) == {}  # every module the table names exists


def test_every_component_starts_after_what_it_requires():
    levels = table.start_levels(table.select(None))
    position = {name: index for index, level in enumerate(levels) for name in level}
    assert set(position) == set(table.BY_NAME)
    for each in table.COMPONENTS:
        for required in each.requires:
            assert position[required] < position[each.name], (each.name, required)
    assert levels[0] == list(table.INFRA)  # the four third-party servers start together, first
    assert levels[-1] == ["gateway"]


def test_only_adds_what_the_chosen_components_require():
    assert table.select(["postgres", "triton"]) == ["postgres", "triton"]
    assert table.select(["inference"]) == ["postgres", "s3", "triton", "inference"]
    assert set(table.select(["gateway"])) == set(table.BY_NAME) - {"worker", "broker"} | {"broker"}


def test_unknown_component_is_refused():
    with pytest.raises(StackError, match="unknown component.*nosuch"):
        table.select(["postgres", "nosuch"])


def test_a_dependency_cycle_is_refused():
    components = {"a": rewired("a", ("b",)), "b": rewired("b", ("a",))}
    with pytest.raises(StackError, match="cycle"):
        table.start_levels(["a", "b"], components)


def test_components_whose_module_does_not_exist_are_named():
    components = {"db": table.BY_NAME["postgres"],
                  "svc": dataclasses.replace(rewired("svc", ()), module="services.nope.server"),
                  "ok": dataclasses.replace(rewired("ok", ()), module="cli.stack")}
    assert table.missing_modules(["db", "svc", "ok"], components) == {"svc": "services.nope.server"}


def test_up_refuses_before_starting_anything_when_a_module_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(lifecycle, "missing_modules", lambda names: {"dataset": "services.dataset.server"})
    with pytest.raises(StackError, match="services.dataset.server does not exist yet"):
        lifecycle.up({"LLMP_STATE_DIR": str(tmp_path / "state")}, ["dataset"])
    assert not (tmp_path / "state").exists()


def test_a_record_of_an_unknown_component_is_refused():
    with pytest.raises(StackError, match="'nosuch'.*not a component"):
        table.component_of(Record("nosuch", "process"))


def test_base_env_fills_defaults_and_makes_the_state_dir_absolute(tmp_path):
    env = settings.base_env({"LLMP_S3_BUCKET": "mine", "HOME": "/x"}, cwd=tmp_path)
    assert env["LLMP_STATE_DIR"] == str(tmp_path / ".llmp")
    assert env["LLMP_TRITON_MODEL_REPOSITORY"] == str(tmp_path / ".llmp" / "triton-models")
    assert env["LLMP_S3_BUCKET"] == "mine"
    assert env["LLMP_DATABASE_URL"] == config.DEFAULTS["LLMP_DATABASE_URL"]
    assert env["LLMP_TRITON_METRICS_PORT"] == str(topology.TRITON_METRICS_PORT)
    assert "HOME" not in env
    explicit = settings.base_env({"LLMP_STATE_DIR": "/s", "LLMP_TRITON_MODEL_REPOSITORY": "/models"})
    assert (explicit["LLMP_STATE_DIR"], explicit["LLMP_TRITON_MODEL_REPOSITORY"]) == ("/s", "/models")


def test_child_env_passes_only_settings_services_accept():
    env = settings.base_env({"LLMP_TRITON_METRICS_PORT": "1234", "LLMP_GATEWAY_PORT": "9999"}, cwd=Path("/w"))
    child = settings.child_env(env, {"LLMP_NOT_A_SETTING": "x", "HOME": "/root", "PATH": "/usr/bin"})
    assert child["LLMP_TRITON_METRICS_PORT"] == "1234" and "LLMP_NOT_A_SETTING" not in child
    assert child["HOME"] == "/root" and child["LLMP_GATEWAY_PORT"] == "9999"
    assert child["PATH"].startswith(str(Path(sys.executable).parent) + ":")
    parsed = Settings.from_env(child)  # a service's main() accepts it
    assert parsed.gateway_port == 9999 and parsed.state_dir == Path("/w/.llmp")


@pytest.mark.parametrize("address, default, expected", [
    ("127.0.0.1:9000", None, ("127.0.0.1", 9000)),
    ("postgresql://u:p@db.example:6543/llmp", 5432, ("db.example", 6543)),
    ("postgresql://postgres@localhost/llmp", 5432, ("localhost", 5432)),
    ("redis://127.0.0.1:6379/0", 6379, ("127.0.0.1", 6379)),
    (":8001", None, ("127.0.0.1", 8001)),
])
def test_host_port(address, default, expected):
    assert settings.host_port(address, default) == expected


def test_with_port_keeps_credentials_path_and_query():
    url = "postgresql://user:secret@10.0.0.5:5432/llmp?sslmode=disable"
    assert settings.with_port(url, "127.0.0.1", 41000) == \
        "postgresql://user:secret@127.0.0.1:41000/llmp?sslmode=disable"
    assert settings.with_port("postgresql://h/db", "127.0.0.1", 1) == "postgresql://127.0.0.1:1/db"
    assert settings.with_port("postgresql://h/db", "h", 1, default_user="postgres") == "postgresql://postgres@h:1/db"
    assert settings.with_port("postgresql://me@h/db", "h", 1, default_user="postgres") == "postgresql://me@h:1/db"


def test_redact_hides_only_the_password():
    assert settings.redact("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert settings.redact("postgresql://postgres@h/db") == "postgresql://postgres@h/db"


def test_each_component_listens_where_its_settings_say():
    env = settings.base_env({
        "LLMP_DATABASE_URL": "postgresql://postgres@127.0.0.1:6000/x", "LLMP_S3_ENDPOINT": "127.0.0.1:6001",
        "LLMP_TRITON_HTTP_URL": "127.0.0.1:6002", "LLMP_TRITON_GRPC_URL": "127.0.0.1:6003",
        "LLMP_TRITON_METRICS_PORT": "6004", "LLMP_GATEWAY_PORT": "6005", "LLMP_DATASET_ADDR": "127.0.0.1:6006",
        "LLMP_BROKER_URL": "redis://127.0.0.1:6007/0",
    })
    ports = {c.name: c.ports(env) for c in table.COMPONENTS}
    assert ports["postgres"] == [6000] and ports["s3"] == [6001] and ports["broker"] == [6007]
    assert ports["triton"] == [6002, 6003, 6004] and ports["gateway"] == [6005] and ports["dataset"] == [6006]
    assert ports["worker"] == []
    assert table.BY_NAME["broker"].ports({**env, "LLMP_BROKER_URL": "sqla+sqlite:////tmp/b.sqlite"}) == []


def test_state_round_trips_and_is_private(tmp_path):
    dirs = StateDir(tmp_path / "state")
    state = StackState(env={"LLMP_STATE_DIR": str(dirs.root)})
    state.records["triton"] = Record("triton", "process", pid=os.getpid(),
                                     start_time=servers.process_start_time(os.getpid()), ports=[1, 2, 3], log="/l",
                                     startup_s=0.5)
    state.records["postgres"] = Record("postgres", "external", ports=[5432], detail="postgresql://h/db")
    dirs.save(state)
    loaded = dirs.load()
    assert loaded.records == state.records and loaded.env == state.env
    assert stat.S_IMODE(dirs.stack_file.stat().st_mode) == 0o600
    assert dirs.pid_file("triton").read_text().strip() == str(os.getpid())
    assert not dirs.pid_file("postgres").exists()
    del state.records["triton"]  # stopped: its pid file goes with it
    dirs.save(state)
    assert not dirs.pid_file("triton").exists()
    dirs.clear()
    assert dirs.load() is None and not dirs.pid_file("triton").exists()


def test_a_state_file_of_another_version_is_refused(tmp_path):
    dirs = StateDir(tmp_path)
    dirs.stack_file.write_text(json.dumps({"version": 99, "env": {}, "components": {}, "created_at": 0}))
    with pytest.raises(StackError, match="version 99"):
        dirs.load()


def test_a_record_is_dead_once_its_pid_names_another_process():
    me = os.getpid()
    assert Record("x", "process", pid=me, start_time=servers.process_start_time(me)).alive()
    assert not Record("x", "process", pid=me, start_time=1).alive()  # pid reused
    process = subprocess.Popen(["true"])
    process.wait()
    assert not Record("x", "process", pid=process.pid).alive()
    assert Record("pg", "external").alive()


def test_admin_key_is_generated_once_and_kept_private(tmp_path):
    env = {"LLMP_STATE_DIR": str(tmp_path), "LLMP_ADMIN_KEY": ""}
    key = settings.admin_key(env)
    assert len(key) > 30 and settings.admin_key(env) == key
    path = tmp_path / "admin.key"
    assert path.read_text().strip() == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert settings.admin_key({**env, "LLMP_ADMIN_KEY": "given"}) == "given"


def test_broadcast_capable_brokers():
    assert broker.supports_broadcast("redis://127.0.0.1:6379/0")
    assert broker.supports_broadcast("amqp://guest@127.0.0.1//")
    assert not broker.supports_broadcast("sqla+sqlite:////tmp/b.sqlite")


def test_status_table_has_a_row_per_component():
    rows = [{"name": "postgres", "mode": "embedded", "pid": 12, "ports": [5432], "healthy": True,
             "log": "/s/logs/postgres.log", "detail": ""},
            {"name": "triton", "mode": "process", "pid": 13, "ports": [8000, 8001], "healthy": False,
             "log": "/s/logs/triton.log", "detail": ""}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["COMPONENT", "MODE", "PID", "PORTS", "HEALTHY", "LOG"]
    assert lines[1].split() == ["postgres", "embedded", "12", "5432", "yes", "/s/logs/postgres.log"]
    assert lines[2].split() == ["triton", "process", "13", "8000,8001", "NO", "/s/logs/triton.log"]


def test_seaweed_ports_are_reused_while_free(tmp_path):
    path = tmp_path / "ports.json"
    first = s3.seaweed_ports(path, 9100)
    again = s3.seaweed_ports(path, 9100)
    assert again == first and first.s3 == 9100
    assert all(port <= 65535 for port in vars(first).values())


# --- the component protocol over real local processes ------------------------------------------

@pytest.fixture
def bystander():
    """A process `up` did not start, in a session of its own (as the stack's processes are)."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("name", list(table.BY_NAME))
def test_stop_never_touches_a_server_up_did_not_start(name, bystander):
    start_time = servers.process_start_time(bystander.pid)
    each = table.BY_NAME[name]
    each.stop(Record(name, "external", pid=bystander.pid, start_time=start_time, ports=[1]))
    each.stop(Record(name, "file", pid=bystander.pid, start_time=start_time))
    each.stop(Record(name, "process", pid=bystander.pid, start_time=start_time - 1))  # its pid was reused
    assert bystander.poll() is None


@pytest.mark.parametrize("name", list(table.BY_NAME))
def test_a_component_whose_process_is_gone_is_not_healthy(name):
    process = subprocess.Popen(["true"])
    process.wait()
    env = settings.base_env({"LLMP_STATE_DIR": "/nonexistent"})
    assert not table.healthy(Record(name, "process", pid=process.pid), env, timeout=0.1)


@dataclass(frozen=True)
class HttpFamily(component.PythonProcess):
    """A parent that serves HTTP on LLMP_GATEWAY_PORT and has a child of its own: enough to prove that start
    waits for health and that stop takes the whole process group and frees the port."""

    def ports(self, env: Mapping[str, str]) -> list[int]:
        return [int(env["LLMP_GATEWAY_PORT"])]

    def command(self, launch: component.Launch) -> tuple[list[str], dict[str, str], str]:
        script = ("import subprocess, sys, http.server; subprocess.Popen(['sleep', '60']); "
                  "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)"
                  ".serve_forever()")
        return [sys.executable, "-c", script, str(self.ports(launch.env)[0])], dict(os.environ), "family"

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        return servers.http_ok(f"http://127.0.0.1:{env['LLMP_GATEWAY_PORT']}/", timeout)


# `up` leaves what it started running when it returns, so it drops its Popen objects on purpose.
@pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")
def test_a_started_process_is_healthy_then_stopped_with_its_whole_group(tmp_path):
    env = settings.base_env({"LLMP_STATE_DIR": str(tmp_path), "LLMP_GATEWAY_PORT": str(servers.free_port())})
    launch = component.Launch(StateDir(tmp_path), env, timeout=30)
    family = HttpFamily("family", grace=2.0)
    record, updates = launch.start(family)
    try:
        assert updates == {} and launch.spawned == {"family": record}
        assert record.mode == "process" and record.ports == family.ports(env) and record.grace == 2.0
        assert family.healthy(record, env) and record.startup_s > 0
        assert "=== llmp up" in Path(record.log).read_text()
        members = servers.group_members(record.pid)
        assert len(members) >= 2  # the server and its child
        with pytest.raises(StackError, match="port .* already in use"):
            launch.require_free(family)  # a second start would collide
    finally:
        family.stop(record)
        # `start` dropped its Popen while the server ran; collect it now, under this test's filter, or
        # its "still running" warning surfaces in whichever later test the garbage collector runs in.
        del launch
        gc.collect()
    assert not record.alive() and not family.healthy(record, env)
    assert not any(servers.process_alive(pid) for pid in members)
    assert not servers.port_open("127.0.0.1", record.ports[0])
