"""Issue 15, item 8: answers the fuzz run drove out of the gateway, each now the status /openapi.json declares."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST


async def _error(response, status: int) -> dict:
    assert response.status == status, await response.text()
    return (await response.json())["error"]


async def test_a_json_route_refuses_another_media_type_with_415(gateway):
    answer = await gateway.client.post("/v1/api-keys", data=b'{"tenant": "t", "role": "developer"}',
                                       headers={**gateway.auth("alpha", "admin"), "Content-Type": "text/plain"})
    assert (await _error(answer, 415))["type"] == "unsupported_media_type"
    document = await (await gateway.client.get("/openapi.json")).json()
    assert "415" in document["paths"]["/v1/api-keys"]["post"]["responses"]


async def test_a_malformed_multipart_upload_is_400_not_a_500(gateway):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"\x10bad\"\r\n\r\ntext\r\n--{boundary}--\r\n"
            ).encode()
    answer = await gateway.client.post("/v1/datasets?name=multi", data=body, headers={
        **gateway.auth("alpha", "developer"), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (await _error(answer, 400))["type"] == "invalid_argument"


async def test_a_multipart_part_named_file_is_the_corpus(gateway):
    boundary = "b0undary"
    corpus = "\n\n".join(f"Paragraph {i}: a form field named file carries the corpus." for i in range(40))
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n{corpus}\r\n--{boundary}--\r\n"
            ).encode()
    answer = await gateway.client.post("/v1/datasets?name=form&tokenizer=char&wait=true", data=body, headers={
        **gateway.auth("alpha", "developer"), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status == 201, await answer.text()


async def test_declared_query_rules_are_enforced_and_undeclared_values_refused(gateway):
    developer = gateway.auth("alpha", "developer")
    for query, field in [("name=ok&wait=perhaps", "wait"), ("name=ok&fractions=1e-1,0,0,0", "fractions"),
                         ("name=ok&vocab_size=100", "vocab_size"), ("tokenizer=char", "name")]:
        answer = await gateway.client.post(f"/v1/datasets?{query}", data=b"text", headers=developer)
        assert (await _error(answer, 422))["message"].startswith(field), query
    listed = await gateway.client.get("/v1/datasets?page_token=not-issued", headers=developer)
    assert (await _error(listed, 422))["message"].startswith("page_token")


async def test_metrics_declare_the_exposition_format_they_are(gateway):
    answer = await gateway.client.get("/metrics")
    assert answer.status == 200 and answer.headers["Content-Type"] == CONTENT_TYPE_LATEST


async def test_every_parameterless_get_answers_the_media_type_its_document_declares(gateway):
    """What a client generated from /openapi.json parses is what each route sends: the JSON routes, the metrics'
    exposition format, the console's HTML (a route once said JSON and sent a tar archive: CI's fuzz found it)."""
    document = await (await gateway.client.get("/openapi.json")).json()
    admin = gateway.auth("alpha", "admin")
    checked = []
    for path, operations in document["paths"].items():
        get = operations.get("get")
        if get is None or "{" in path or any(p.get("required") for p in get.get("parameters", [])):
            continue
        answer = await gateway.client.get(path, headers=admin)
        if answer.status == 503:  # the routes of the services this fixture does not run
            continue
        assert 200 <= answer.status < 300, (path, answer.status, await answer.text())
        declared = {media.split(";")[0].strip() for media in get["responses"][str(answer.status)].get("content", {})}
        served = answer.headers["Content-Type"].split(";")[0].strip()
        assert served in declared, f"GET {path}: sends {served}, the document says {sorted(declared)}"
        checked.append(path)
    assert {"/metrics", "/openapi.json", "/v1/datasets", "/v1/api-keys"} <= set(checked), checked
