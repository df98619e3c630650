"""Mutual TLS on gRPC (LLMP_GRPC_TLS_*), as compose runs it: certificates from scripts/gen_grpc_certs.sh, a real
GrpcApp, and callers with the right certificate, none, or one from another CA."""

import asyncio
import dataclasses
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import topology
from services.common.config import GrpcTls, Settings
from services.common.grpc_client import health_check, open_channel
from services.common.grpc_server import GrpcApp
from services.common.healthcheck import check_grpc

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")]
SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "gen_grpc_certs.sh"


def _certificates(folder: Path, *components: str) -> Path:
    subprocess.run(["sh", str(SCRIPT), str(folder), *components], check=True, capture_output=True)
    return folder


def _tls(folder: Path, component: str) -> GrpcTls:
    return GrpcTls(folder / component / "cert.pem", folder / component / "key.pem", folder / component / "ca.pem")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> tuple[Path, Path]:
    ours = _certificates(tmp_path_factory.mktemp("tls"), "dataset", "gateway")
    theirs = _certificates(tmp_path_factory.mktemp("other-ca"), "gateway")  # same name, another CA
    return ours, theirs


@pytest.fixture
async def address(certificates, tmp_path):
    ours, _ = certificates
    settings = dataclasses.replace(Settings.from_env({"LLMP_STATE_DIR": str(tmp_path)}),
                                   grpc_tls=_tls(ours, "dataset"))
    app = GrpcApp(settings, topology.DATASET)
    port = await app.start("127.0.0.1:0")
    yield f"localhost:{port}"
    await app.stop()


async def _check(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status


async def test_a_caller_with_a_certificate_from_the_ca_is_served(address, certificates):
    ours, _ = certificates
    async with open_channel(address, _tls(ours, "gateway")) as channel:
        assert await _check(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await health_check(address, tls=_tls(ours, "gateway")) == "SERVING"


async def test_a_caller_without_a_certificate_is_refused(address, certificates):
    ours, _ = certificates
    anonymous = grpc.ssl_channel_credentials(root_certificates=(ours / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(address, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _check(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_caller_with_a_certificate_from_another_ca_is_refused(address, certificates):
    ours, theirs = certificates
    # It even trusts our CA for the server's side; its own certificate is what the server refuses.
    stranger = dataclasses.replace(_tls(theirs, "gateway"), ca=ours / "ca.pem")
    async with open_channel(address, stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _check(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_caller_is_refused(address):
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _check(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_container_healthcheck_presents_the_components_certificate(address, certificates, monkeypatch):
    ours, _ = certificates
    # The probe is synchronous: in a thread, so the server on this event loop can answer it.
    healthy, why = await asyncio.to_thread(check_grpc, address, timeout=3)
    assert not healthy and "UNAVAILABLE" in why
    tls = _tls(ours, "dataset")
    monkeypatch.setenv("LLMP_GRPC_TLS_CERT", str(tls.cert))
    monkeypatch.setenv("LLMP_GRPC_TLS_KEY", str(tls.key))
    monkeypatch.setenv("LLMP_GRPC_TLS_CA", str(tls.ca))
    assert await asyncio.to_thread(check_grpc, address, timeout=3) == (True, f"{address}: SERVING")
