"""The launcher's pure parts: component selection and order, settings resolution, the state file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cli import stack
from services.common import config, topology
from services.common.config import Settings


def test_every_component_starts_after_what_it_requires():
    levels = stack.start_levels(stack.select(None))
    position = {name: index for index, level in enumerate(levels) for name in level}
    assert set(position) == set(stack.BY_NAME)
    for component in stack.COMPONENTS:
        for required in component.requires:
            assert position[required] < position[component.name], (component.name, required)
    assert levels[0] == list(stack.INFRA)  # the four third-party servers start together, first
    assert levels[-1] == ["gateway"]


def test_only_adds_what_the_chosen_components_require():
    assert stack.select(["postgres", "triton"]) == ["postgres", "triton"]
    assert stack.select(["inference"]) == ["postgres", "s3", "triton", "inference"]
    assert set(stack.select(["gateway"])) == set(stack.BY_NAME) - {"worker", "broker"} | {"broker"}


def test_unknown_component_is_refused():
    with pytest.raises(stack.StackError, match="unknown component.*nosuch"):
        stack.select(["postgres", "nosuch"])


def test_a_dependency_cycle_is_refused():
    components = {"a": stack.Component("a", ("b",)), "b": stack.Component("b", ("a",))}
    with pytest.raises(stack.StackError, match="cycle"):
        stack.start_levels(["a", "b"], components)


def test_components_whose_module_does_not_exist_are_named():
    components = {"db": stack.Component("db"), "svc": stack.Component("svc", module="services.nope.server"),
                  "ok": stack.Component("ok", module="cli.stack")}
    assert stack.missing_modules(["db", "svc", "ok"], components) == {"svc": "services.nope.server"}


def test_up_refuses_before_starting_anything_when_a_module_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(stack, "missing_modules", lambda names: {"dataset": "services.dataset.server"})
    with pytest.raises(stack.StackError, match="services.dataset.server does not exist yet"):
        stack.up({"LLMP_STATE_DIR": str(tmp_path / "state")}, ["dataset"])
    assert not (tmp_path / "state").exists()


def test_base_env_fills_defaults_and_makes_the_state_dir_absolute(tmp_path):
    env = stack.base_env({"LLMP_S3_BUCKET": "mine", "HOME": "/x"}, cwd=tmp_path)
    assert env["LLMP_STATE_DIR"] == str(tmp_path / ".llmp")
    assert env["LLMP_TRITON_MODEL_REPOSITORY"] == str(tmp_path / ".llmp" / "triton-models")
    assert env["LLMP_S3_BUCKET"] == "mine"
    assert env["LLMP_DATABASE_URL"] == config.DEFAULTS["LLMP_DATABASE_URL"]
    assert env["LLMP_TRITON_METRICS_PORT"] == str(topology.TRITON_METRICS_PORT)
    assert "HOME" not in env
    explicit = stack.base_env({"LLMP_STATE_DIR": "/s", "LLMP_TRITON_MODEL_REPOSITORY": "/models"})
    assert (explicit["LLMP_STATE_DIR"], explicit["LLMP_TRITON_MODEL_REPOSITORY"]) == ("/s", "/models")


def test_child_env_passes_only_settings_services_accept():
    env = stack.base_env({"LLMP_TRITON_METRICS_PORT": "1234", "LLMP_GATEWAY_PORT": "9999"}, cwd=Path("/w"))
    child = stack.child_env(env, {"LLMP_NOT_A_SETTING": "x", "HOME": "/root", "PATH": "/usr/bin"})
    assert child["LLMP_TRITON_METRICS_PORT"] == "1234" and "LLMP_NOT_A_SETTING" not in child
    assert child["HOME"] == "/root" and child["LLMP_GATEWAY_PORT"] == "9999"
    assert child["PATH"].startswith(str(Path(sys.executable).parent) + ":")
    settings = Settings.from_env(child)  # a service's main() accepts it
    assert settings.gateway_port == 9999 and settings.state_dir == Path("/w/.llmp")


@pytest.mark.parametrize("address, default, expected", [
    ("127.0.0.1:9000", None, ("127.0.0.1", 9000)),
    ("postgresql://u:p@db.example:6543/llmp", 5432, ("db.example", 6543)),
    ("postgresql://postgres@localhost/llmp", 5432, ("localhost", 5432)),
    ("redis://127.0.0.1:6379/0", 6379, ("127.0.0.1", 6379)),
    (":8001", None, ("127.0.0.1", 8001)),
])
def test_host_port(address, default, expected):
    assert stack.host_port(address, default) == expected


def test_with_port_keeps_credentials_path_and_query():
    url = "postgresql://user:secret@10.0.0.5:5432/llmp?sslmode=disable"
    assert stack.with_port(url, "127.0.0.1", 41000) == "postgresql://user:secret@127.0.0.1:41000/llmp?sslmode=disable"
    assert stack.with_port("postgresql://h/db", "127.0.0.1", 1) == "postgresql://127.0.0.1:1/db"
    assert stack.with_port("postgresql://h/db", "h", 1, default_user="postgres") == "postgresql://postgres@h:1/db"
    assert stack.with_port("postgresql://me@h/db", "h", 1, default_user="postgres") == "postgresql://me@h:1/db"


def test_redact_hides_only_the_password():
    assert stack.redact("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert stack.redact("postgresql://postgres@h/db") == "postgresql://postgres@h/db"


def test_component_ports_follow_the_settings():
    env = stack.base_env({
        "LLMP_DATABASE_URL": "postgresql://postgres@127.0.0.1:6000/x", "LLMP_S3_ENDPOINT": "127.0.0.1:6001",
        "LLMP_TRITON_HTTP_URL": "127.0.0.1:6002", "LLMP_TRITON_GRPC_URL": "127.0.0.1:6003",
        "LLMP_TRITON_METRICS_PORT": "6004", "LLMP_GATEWAY_PORT": "6005", "LLMP_DATASET_ADDR": "127.0.0.1:6006",
    })
    assert stack.component_ports("postgres", env) == [6000]
    assert stack.component_ports("s3", env) == [6001]
    assert stack.component_ports("triton", env) == [6002, 6003, 6004]
    assert stack.component_ports("gateway", env) == [6005]
    assert stack.component_ports("dataset", env) == [6006]
    assert stack.component_ports("broker", {**env, "LLMP_BROKER_URL": "sqla+sqlite:////tmp/b.sqlite"}) == []


def test_state_round_trips_and_is_private(tmp_path):
    dirs = stack.StateDir(tmp_path / "state")
    state = stack.StackState(env={"LLMP_STATE_DIR": str(dirs.root)})
    state.records["triton"] = stack.Record("triton", "process", pid=os.getpid(),
                                           start_time=stack.servers.process_start_time(os.getpid()),
                                           ports=[1, 2, 3], log="/l", startup_s=0.5)
    state.records["postgres"] = stack.Record("postgres", "external", ports=[5432], detail="postgresql://h/db")
    dirs.save(state)
    loaded = dirs.load()
    assert loaded.records == state.records and loaded.env == state.env
    assert stat.S_IMODE(dirs.stack_file.stat().st_mode) == 0o600
    assert dirs.pid_file("triton").read_text().strip() == str(os.getpid())
    assert not dirs.pid_file("postgres").exists()
    dirs.clear()
    assert dirs.load() is None and not dirs.pid_file("triton").exists()


def test_a_state_file_of_another_version_is_refused(tmp_path):
    dirs = stack.StateDir(tmp_path)
    dirs.stack_file.write_text(json.dumps({"version": 99, "env": {}, "components": {}, "created_at": 0}))
    with pytest.raises(stack.StackError, match="version 99"):
        dirs.load()


def test_a_record_is_dead_once_its_pid_names_another_process():
    me = os.getpid()
    assert stack.Record("x", "process", pid=me, start_time=stack.servers.process_start_time(me)).alive()
    assert not stack.Record("x", "process", pid=me, start_time=1).alive()  # pid reused
    process = subprocess.Popen(["true"])
    process.wait()
    assert not stack.Record("x", "process", pid=process.pid).alive()
    assert stack.Record("pg", "external").alive()


def test_admin_key_is_generated_once_and_kept_private(tmp_path):
    env = {"LLMP_STATE_DIR": str(tmp_path), "LLMP_ADMIN_KEY": ""}
    key = stack.admin_key(env)
    assert len(key) > 30 and stack.admin_key(env) == key
    path = tmp_path / "admin.key"
    assert path.read_text().strip() == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stack.admin_key({**env, "LLMP_ADMIN_KEY": "given"}) == "given"


def test_broadcast_capable_brokers():
    assert stack.broker_supports_broadcast("redis://127.0.0.1:6379/0")
    assert stack.broker_supports_broadcast("amqp://guest@127.0.0.1//")
    assert not stack.broker_supports_broadcast("sqla+sqlite:////tmp/b.sqlite")


def test_status_table_has_a_row_per_component():
    rows = [{"name": "postgres", "mode": "embedded", "pid": 12, "ports": [5432], "healthy": True,
             "log": "/s/logs/postgres.log", "detail": ""},
            {"name": "triton", "mode": "process", "pid": 13, "ports": [8000, 8001], "healthy": False,
             "log": "/s/logs/triton.log", "detail": ""}]
    lines = stack.format_table(rows).splitlines()
    assert lines[0].split() == ["COMPONENT", "MODE", "PID", "PORTS", "HEALTHY", "LOG"]
    assert lines[1].split() == ["postgres", "embedded", "12", "5432", "yes", "/s/logs/postgres.log"]
    assert lines[2].split() == ["triton", "process", "13", "8000,8001", "NO", "/s/logs/triton.log"]


def test_seaweed_ports_are_reused_while_free(tmp_path):
    path = tmp_path / "ports.json"
    first = stack.seaweed_ports(path, 9100)
    again = stack.seaweed_ports(path, 9100)
    assert again == first and first.s3 == 9100
    assert all(port <= 65535 for port in vars(first).values())
