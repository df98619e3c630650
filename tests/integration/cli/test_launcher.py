"""`llmp up | status | down` against real servers: PostgreSQL (the machine's, or embedded from the pgserver
wheel), SeaweedFS, a Celery broker (Redis, or SQLite when Redis is unreachable) and the bundled Triton.

Every port is a free one and the state lives in tmp_path, so this runs beside other engineers' servers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

from cli import servers, stack
from cli.stack.s3 import s3_client

pytestmark = pytest.mark.integration
ADMIN_DATABASE_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LLMP_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")
INFRA = "postgres,s3,broker,triton"
HERE = Path(__file__).resolve().parent

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)]) for r in requests]
"""


def llmp(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def infra_env(state: Path, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
    env.update({
        "LLMP_STATE_DIR": str(state),
        "LLMP_DATABASE_URL": database_url,
        "LLMP_BROKER_URL": broker_url,
        "LLMP_S3_ENDPOINT": f"127.0.0.1:{servers.free_port()}",
        "LLMP_S3_ACCESS_KEY": "launcher-test",
        "LLMP_S3_SECRET_KEY": "launcher-test-secret",
        "LLMP_TRITON_HTTP_URL": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{servers.free_port()}",
        "LLMP_TRITON_METRICS_PORT": str(servers.free_port()),
        **extra,
    })
    return env


def closed_port_url(scheme: str, path: str, user: str = "") -> str:
    """A URL at a local port nothing listens on."""
    return f"{scheme}://{user + '@' if user else ''}127.0.0.1:{servers.free_port()}/{path}"


def processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that mention `folder` (what the stack started keeps its paths there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline and servers.process_alive(int(entry.name)):
            found.append(cmdline)
    return found


def recorded(env: dict[str, str]) -> stack.StackState:
    return stack.StateDir(Path(env["LLMP_STATE_DIR"])).load()


def assert_sql_works(env: dict[str, str]) -> None:
    with psycopg.connect(recorded(env).env["LLMP_DATABASE_URL"], autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS launcher_probe (n int)")
        connection.execute("INSERT INTO launcher_probe VALUES (41)")
        assert connection.execute("SELECT max(n) + 1 FROM launcher_probe").fetchone() == (42,)


def assert_s3_works(env: dict[str, str]) -> None:
    import io

    client = s3_client(recorded(env).env)
    bucket = env.get("LLMP_S3_BUCKET", "llmp")
    assert client.bucket_exists(bucket)  # `up` created it
    payload = uuid.uuid4().bytes * 1000
    client.put_object(bucket, "probe/blob", io.BytesIO(payload), len(payload))
    response = client.get_object(bucket, "probe/blob")
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()


def assert_celery_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    """A real worker consumes a task sent through the recorded broker."""
    from celery import Celery

    broker = recorded(env).env["LLMP_BROKER_URL"]
    queue = f"roundtrip-{uuid.uuid4().hex[:8]}"  # never steals another test's `gpu` tasks
    log = tmp_path / "roundtrip-worker.log"
    worker_env = {**env, "ROUNDTRIP_BROKER_URL": broker}
    with open(log, "wb") as handle:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "roundtrip_app", "worker", "-Q", queue,
                                   "--pool", "solo", "--loglevel", "INFO", "-n", f"{queue}@%h"],
                                  cwd=HERE, env=worker_env, stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        target, token = tmp_path / "roundtrip.txt", uuid.uuid4().hex
        app = Celery("sender", broker=broker, set_as_current=False)
        try:
            app.send_task("roundtrip.write", args=[str(target), token], queue=queue)
        finally:
            app.close()
        servers.wait_until(lambda: target.exists() and target.read_text() == token, 60, worker, log,
                           "the round-trip worker")
    finally:
        servers.stop(worker)


def assert_triton_serves_a_python_model(env: dict[str, str]) -> None:
    """Ready, and the Python backend stub really runs (the part that needs LD_LIBRARY_PATH and PATH right)."""
    resolved = recorded(env).env
    repository = Path(resolved["LLMP_TRITON_MODEL_REPOSITORY"])
    (repository / "echo" / "1").mkdir(parents=True, exist_ok=True)
    (repository / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repository / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    base = f"http://{resolved['LLMP_TRITON_HTTP_URL']}"
    assert servers.http_ok(f"{base}/v2/health/ready")
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v2/repository/models/echo/load", data=b"",
                                                       method="POST"), timeout=60) as response:
        assert response.status == 200
    body = json.dumps({"inputs": [{"name": "X", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v2/models/echo/infer", data=body,
                                                       method="POST"), timeout=30) as response:
        assert json.loads(response.read())["outputs"][0]["data"] == [2.0, 4.0, 6.0]


def assert_nothing_left(env: dict[str, str], ports: list[int]) -> None:
    state = Path(env["LLMP_STATE_DIR"])
    assert not (state / "stack.json").exists()
    assert not list((state / "pids").glob("*.pid")) if (state / "pids").exists() else True
    assert [p for p in ports if servers.port_open("127.0.0.1", p)] == []
    assert processes_under(state) == []


def status_rows(env: dict[str, str]) -> dict[str, dict]:
    result = llmp("status", "--json", env=env)
    return {row["name"]: row for row in json.loads(result.stdout)} | {"_rc": result.returncode}


def up_timed(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    result = llmp("up", "--only", INFRA, env=env)
    return result, time.monotonic() - began


@pytest.fixture
def state_root():
    """A state dir in /tmp itself: the embedded PostgreSQL runs as user `pgserver` (never as root) and must
    reach its data dir, which pytest's private tmp_path (0700, reset by every pytest session) forbids."""
    root = Path(tempfile.mkdtemp(prefix="llmp-stack-test-"))
    yield root / "state"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_database():
    """The name of a database that does not exist yet on the machine's PostgreSQL (dropped afterwards)."""
    name = f"llmp_stack_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_up_with_the_machines_postgres_and_redis(tmp_path, fresh_database):
    env = infra_env(tmp_path / "state", ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{fresh_database}", REDIS_URL)
    up, seconds = up_timed(env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert seconds < 60, up.stdout
        rows = status_rows(env)
        assert rows.pop("_rc") == 0
        assert {name: row["mode"] for name, row in rows.items()} == {
            "postgres": "external", "s3": "process", "broker": "external", "triton": "process"}
        assert all(row["healthy"] for row in rows.values())
        assert_sql_works(env)  # the database named in the URL was created
        assert_s3_works(env)
        assert_celery_round_trip(env, tmp_path)
        assert_triton_serves_a_python_model(env)

        again = llmp("up", "--only", INFRA, env=env)  # idempotent: nothing new starts
        assert again.returncode == 0, again.stderr
        assert {n: r["pid"] for n, r in status_rows(env).items() if n != "_rc"} == \
            {n: r["pid"] for n, r in rows.items()}
    finally:
        ports = [p for record in recorded(env).records.values() if record.mode == "process" for p in record.ports]
        down = llmp("down", env=env)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(env, ports)
    with psycopg.connect(recorded_url := env["LLMP_DATABASE_URL"]) as connection:  # external: left running
        assert connection.execute("SELECT 1").fetchone() == (1,), recorded_url
    assert llmp("down", env=env).returncode == 0  # nothing up: fine


def test_up_with_embedded_postgres_and_the_sqlite_broker(tmp_path, state_root):
    database_url = closed_port_url("postgresql", "llmp", "postgres")
    env = infra_env(state_root, database_url, closed_port_url("redis", "0"))
    up, seconds = up_timed(env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert seconds < 60, up.stdout
        rows = status_rows(env)
        assert rows.pop("_rc") == 0 and all(row["healthy"] for row in rows.values())
        assert rows["postgres"]["mode"] == "embedded" and rows["broker"]["mode"] == "file"
        resolved = recorded(env).env
        assert resolved["LLMP_DATABASE_URL"] == database_url  # the embedded server took the URL's free port
        assert resolved["LLMP_BROKER_URL"].startswith("sqla+sqlite:///")
        assert_sql_works(env)
        assert_s3_works(env)
        assert_celery_round_trip(env, tmp_path)
        assert_triton_serves_a_python_model(env)
    finally:
        ports = [p for record in recorded(env).records.values() for p in record.ports]
        down = llmp("down", env=env)
    assert down.returncode == 0, down.stderr
    data_dir = state_root / "postgres" / "data"
    assert servers.postgres_pid(data_dir) is None
    assert_nothing_left(env, ports)

    # Stopped properly: the next start is quick, needs no recovery and keeps the data.
    began = time.monotonic()
    again = llmp("up", "--only", "postgres,s3", env=env)
    try:
        assert again.returncode == 0, again.stderr
        assert time.monotonic() - began < 20, again.stdout
        with psycopg.connect(database_url) as connection:
            assert connection.execute("SELECT count(*) FROM launcher_probe").fetchone() == (1,)
        assert "not properly shut down" not in (state_root / "logs" / "postgres.log").read_text()
        assert s3_client(recorded(env).env).stat_object("llmp", "probe/blob").size == 16000
    finally:
        assert llmp("down", env=env).returncode == 0
    assert servers.postgres_pid(data_dir) is None


def test_the_whole_stack_runs_on_embedded_postgres_and_the_sqlite_broker(state_root):
    """`llmp up` on a machine with no PostgreSQL and no Redis: every component, a real call through the gateway
    that reaches the dataset service, the embedded PostgreSQL and S3, and a clean `down`."""
    from services.common import topology

    gateway_port, *service_ports = servers.free_ports(1 + len(topology.GRPC_SERVICES))
    admin_key = f"llmp_embedded_{uuid.uuid4().hex}"
    env = infra_env(state_root, closed_port_url("postgresql", "llmp", "postgres"), closed_port_url("redis", "0"),
                    LLMP_GATEWAY_PORT=str(gateway_port), LLMP_ADMIN_KEY=admin_key,
                    **{service.addr_env: f"127.0.0.1:{port}"
                       for service, port in zip(topology.GRPC_SERVICES, service_ports, strict=True)})
    began = time.monotonic()
    up = llmp("up", env=env)
    seconds = time.monotonic() - began
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert seconds < 60, up.stdout
        rows = status_rows(env)
        assert rows.pop("_rc") == 0 and all(row["healthy"] for row in rows.values()), rows
        assert rows["postgres"]["mode"] == "embedded" and rows["broker"]["mode"] == "file"
        assert {"dataset", "training", "registry", "inference", "worker", "gateway"} <= set(rows)
        base, auth = f"http://127.0.0.1:{gateway_port}", {"Authorization": f"Bearer {admin_key}"}
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as ready:
            assert ready.status == 200
        corpus = b"To be, or not to be, that is the question.\n\nWhether tis nobler in the mind to suffer.\n" * 40
        request = urllib.request.Request(f"{base}/v1/datasets?name=embedded&tokenizer=char&wait=true", data=corpus,
                                         headers={**auth, "Content-Type": "text/plain"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as created:
            version = json.loads(created.read())
        assert created.status == 201 and version["state"] == "READY", version
        assert version["splits"]["train"]["tokens"] > 0
    finally:
        state = recorded(env)
        ports = [p for record in state.records.values() for p in record.ports] if state else []
        down = llmp("down", env=env)
    assert down.returncode == 0, down.stderr
    assert servers.postgres_pid(state_root / "postgres" / "data") is None
    assert_nothing_left(env, ports)


def test_a_component_that_fails_shows_its_log_and_nothing_is_left(tmp_path, fresh_database):
    env = infra_env(tmp_path / "state", ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{fresh_database}",
                    closed_port_url("redis", "0"), LLMP_TRITON_MODEL_REPOSITORY=str(tmp_path / "no-such-repository"))
    ports = [int(env["LLMP_S3_ENDPOINT"].rsplit(":", 1)[1]), int(env["LLMP_TRITON_HTTP_URL"].rsplit(":", 1)[1])]
    up = llmp("up", "--only", INFRA, env=env)
    assert up.returncode == 1
    assert "triton did not come up" in up.stderr
    assert "triton.log" in up.stderr and "failed to stat file" in up.stderr  # the log's last lines
    assert_nothing_left(env, ports)  # s3, started beside it, was stopped


def test_ctrl_c_during_up_stops_what_it_started(state_root):
    env = infra_env(state_root, closed_port_url("postgresql", "llmp", "postgres"), closed_port_url("redis", "0"))
    ports = [int(env["LLMP_S3_ENDPOINT"].rsplit(":", 1)[1]), int(env["LLMP_TRITON_HTTP_URL"].rsplit(":", 1)[1])]
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--only", INFRA], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s3_log = state_root / "logs" / "s3.log"
    servers.wait_until(lambda: s3_log.exists(), 30, process, None, "llmp up to start SeaweedFS")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert_nothing_left(env, ports)
    assert servers.postgres_pid(state_root / "postgres" / "data") is None
