"""Issue 15, finding 1: `?source=s3://…` reads only the caller tenant's import prefix of the platform bucket
(`imports/{tenant}/`), and an object it may not read answers exactly as a missing one (no existence or
size oracle). Before, any object of any bucket was read with the platform's own S3 credentials."""

import pytest

from services.common.s3 import ObjectStore
from tests.integration.gateway.conftest import CORPUS

pytestmark = pytest.mark.integration


async def _create_from(gateway, uri: str, tenant: str = "beta"):
    response = await gateway.client.post("/v1/datasets", params={"name": "imported", "tokenizer": "char",
                                                                  "wait": "true", "source": uri},
                                         headers=gateway.auth(tenant, "developer"))
    return response.status, await response.json()


async def test_a_source_is_read_only_from_the_callers_import_prefix(gateway, settings):
    store = ObjectStore(settings.s3)
    alpha, beta = gateway.tenants["alpha"], gateway.tenants["beta"]
    bucket = store.bucket
    corpus = CORPUS.encode()
    own = f"imports/{beta}/corpus.txt"
    forbidden = [
        f"sources/datasets/{alpha}/secret/v1/corpus",  # another tenant's stored corpus
        f"imports/{alpha}/corpus.txt",  # another tenant's import
        f"datasets/{beta}/notes.txt",  # the caller's own tenant, but outside its import prefix
        f"imports/{beta}x/corpus.txt",  # a tenant whose name starts with the caller's
        f"imports/{beta}",  # the prefix without its slash
    ]
    for key in [own, *forbidden]:
        store.put_bytes(key, corpus)

    status, body = await _create_from(gateway, f"s3://{bucket}/{own}")
    assert status == 201 and body["state"] == "READY", body

    missing_status, missing = await _create_from(gateway, f"s3://{bucket}/imports/{beta}/nothing-here.txt")
    assert missing_status == 404 and missing["error"]["type"] == "not_found", missing

    def same_as_missing(uri: str, answer: dict) -> dict:  # the answer, as if it were about the missing object
        message = answer["error"]["message"].replace(f"source {uri} ", f"source s3://{bucket}/imports/{beta}/"
                                                                         "nothing-here.txt ", 1)
        return {"error": {**answer["error"], "message": message}}

    for uri in [f"s3://{bucket}/{key}" for key in forbidden] + [
            f"s3://{bucket}/imports/{alpha}/absent.txt", f"s3://another-bucket/imports/{beta}/corpus.txt"]:
        status, answer = await _create_from(gateway, uri)
        assert status == 404, (uri, answer)
        assert same_as_missing(uri, answer) == missing, (uri, answer)
    # alpha reads its own import; the message names the rule, not the object
    status, body = await _create_from(gateway, f"s3://{bucket}/imports/{alpha}/corpus.txt", tenant="alpha")
    assert status == 201, body
    assert f"imports/{beta}/" in missing["error"]["message"]


async def test_the_openapi_document_describes_the_import_prefix(gateway):
    document = await (await gateway.client.get("/openapi.json")).json()
    parameters = document["paths"]["/v1/datasets"]["post"]["parameters"]
    source = next(p for p in parameters if p["name"] == "source")
    assert "imports/{tenant}/" in source["schema"]["description"]
