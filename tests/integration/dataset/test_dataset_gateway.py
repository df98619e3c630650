"""`/v1/datasets…` through the real gateway app and the in-process dataset service."""

import io
import json

import pytest

from gateway import routes
from gateway.app import init_app
from gateway.views import datasets
from services.common import topology
from services.common.config import Settings
from services.dataset import server

from .conftest import UPLOAD_LIMIT

pytestmark = pytest.mark.integration
ADMIN_KEY = "llmp_bootstrap_dataset-test-admin"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def gateway(aiohttp_client, settings_env, lineage, monkeypatch):
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY,
                                  "LLMP_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)})
    app = await server.build_app(settings, models_using=lineage)
    await app.start(settings.listen_addr(topology.DATASET))
    assert datasets in routes.VIEW_MODULES
    yield await aiohttp_client(init_app(settings))
    await app.stop()


async def test_upload_get_watch_and_delete(gateway, shakespeare):
    corpus = shakespeare[:30_000]
    created = await gateway.post("/v1/datasets?name=gw-shake&tokenizer=char", data=corpus, headers=AUTH)
    assert created.status == 202, await created.text()
    body = await created.json()
    assert (body["name"], body["version"], body["state"]) == ("gw-shake", 1, "PENDING")
    location = created.headers["Location"]

    events = await gateway.get(location + "/events", headers=AUTH)
    assert events.headers["Content-Type"].startswith("text/event-stream")
    frames = [frame for frame in (await events.text()).split("\n\n") if frame]
    assert frames[-1] == "data: [DONE]"
    final = json.loads(frames[-2].split("data: ", 1)[1])
    assert final["state"] == "READY" and final["version"]["state"] == "READY"

    got = await gateway.get(location, headers=AUTH)
    version = await got.json()
    assert got.status == 200 and version["state"] == "READY"
    assert set(version["splits"]) == {"train", "validation", "test", "calibration"}
    assert version["splits"]["train"]["documents"] > 0 and version["splits"]["train"]["tokens"] > 0
    assert version["tokenizer"]["kind"] == "char"
    assert all(len(o["sha256"]) == 64 and int(o["size"]) > 0 for o in version["manifest"]["objects"])
    again = await gateway.get(location, headers={**AUTH, "If-None-Match": got.headers["ETag"]})
    assert again.status == 304

    same = await gateway.post("/v1/datasets?name=gw-shake&tokenizer=char", data=corpus, headers=AUTH)
    assert same.status == 200 and (await same.json())["version"] == 1

    listed = await (await gateway.get("/v1/datasets", headers=AUTH)).json()
    assert "gw-shake" in [d["name"] for d in listed["datasets"]]

    stale = await gateway.delete(location, headers={**AUTH, "If-Match": '"stale"'})
    assert stale.status == 412
    deleted = await gateway.delete(location, headers={**AUTH, "If-Match": got.headers["ETag"]})
    assert deleted.status == 200, await deleted.text()
    assert (await gateway.get(location, headers=AUTH)).status == 404


@pytest.mark.parametrize("query, data, status, kind", [
    ("name=gw-bad", b"ok\n\xff\n", 400, "invalid_argument"),
    ("name=gw-bad&format=jsonl", b"{nope}\n", 400, "invalid_argument"),
    ("name=gw-bad", b"\n\n", 422, "validation_failed"),
    ("tokenizer=char", b"text", 422, "validation_failed"),
    ("name=gw-bad&tokenizer=wordpiece", b"text", 422, "validation_failed"),
])
async def test_bad_uploads_get_the_right_4xx(gateway, query, data, status, kind):
    response = await gateway.post(f"/v1/datasets?{query}", data=io.BytesIO(data), headers=AUTH)
    assert response.status == status, await response.text()
    assert (await response.json())["error"]["type"] == kind


async def test_delete_is_409_while_a_model_uses_the_version(gateway, lineage, shakespeare):
    created = await gateway.post("/v1/datasets?name=gw-used&tokenizer=char&wait=true", data=shakespeare[:8000],
                                 headers=AUTH)
    assert created.status == 201, await created.text()
    body = await created.json()
    lineage.users.update({(tenant, "gw-used", 1): ["m:1"] for tenant in [body["tenant"]]})
    response = await gateway.delete("/v1/datasets/gw-used/versions/1", headers=AUTH)
    assert response.status == 409 and (await response.json())["error"]["type"] == "conflict"


async def _chunked(data: bytes, size: int = 256 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("how", ["content-length", "chunked", "multipart"])
async def test_oversize_upload_is_413_naming_the_limit_and_creates_nothing(gateway, how):
    import aiohttp

    data = b"to be or not to be\n" * (UPLOAD_LIMIT // 19 + 1)
    assert len(data) > UPLOAD_LIMIT
    if how == "content-length":
        body = io.BytesIO(data)
    elif how == "chunked":  # no Content-Length: the limit is found while streaming
        body = _chunked(data)
    else:
        body = aiohttp.FormData()
        body.add_field("corpus", io.BytesIO(data), filename="corpus.txt", content_type="text/plain")
    response = await gateway.post(f"/v1/datasets?name=gw-huge-{how}", data=body, headers=AUTH)
    assert response.status == 413, await response.text()
    error = (await response.json())["error"]
    assert error["type"] == "payload_too_large" and f"limit of {UPLOAD_LIMIT} bytes" in error["message"]
    listed = await (await gateway.get("/v1/datasets", headers=AUTH)).json()
    assert f"gw-huge-{how}" not in [d["name"] for d in listed["datasets"]]
    assert (await gateway.get(f"/v1/datasets/gw-huge-{how}", headers=AUTH)).status == 404


async def test_an_ingest_past_the_tenants_bytes_per_day_is_429_naming_the_quota(aiohttp_client, settings_env,
                                                                                  lineage, shakespeare):
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY,
                                  "LLMP_TENANT_INGEST_BYTES_PER_DAY": "1"})
    app = await server.build_app(settings, models_using=lineage)
    await app.start(settings.listen_addr(topology.DATASET))
    try:
        gateway = await aiohttp_client(init_app(settings))
        refused = await gateway.post("/v1/datasets?name=gw-over-quota&tokenizer=char", data=shakespeare[:20_000],
                                     headers=AUTH)
        assert refused.status == 429, await refused.text()
        assert int(refused.headers["Retry-After"]) > 0
        error = (await refused.json())["error"]
        assert error["type"] == "rate_limited" and "LLMP_TENANT_INGEST_BYTES_PER_DAY=1" in error["message"]
        missing = await gateway.get("/v1/datasets/gw-over-quota/versions/1", headers=AUTH)
        assert missing.status == 404  # nothing was created
    finally:
        await app.stop()
