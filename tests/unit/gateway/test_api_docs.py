"""docs/API.md is what scripts/gen_api_docs.py makes of the gateway's OpenAPI document, now: it cannot drift."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gateway import openapi, routes
from gateway.http import ADMIN, Route

ROOT = Path(__file__).resolve().parents[3]
SPEC = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
gen_api_docs = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gen_api_docs)


async def handler(request):  # never called: the documents below are only rendered
    raise AssertionError


def test_the_committed_reference_is_what_the_routes_give():
    committed = (ROOT / "docs" / "API.md").read_text()
    assert committed == gen_api_docs.render(gen_api_docs.document()), \
        "docs/API.md is out of date: run `python scripts/gen_api_docs.py`"


def test_every_operation_has_a_section_naming_who_may_call_it():
    text = gen_api_docs.render(gen_api_docs.document())
    sections = {section.split("\n", 1)[0]: section for section in text.split("\n### ")[1:]}
    served = [route for route in routes.all_routes() if route.tag != "console"]
    assert len(sections) == len(served)
    for route in served:
        section = sections[f"`{route.method} {route.path}`"]
        assert route.summary in section
        roles = ", ".join(f"`{role}`" for role in route.roles) if route.roles else "public (no API key)"
        assert f"- Roles: {roles}\n" in section


def test_a_body_reads_as_one_row_per_field_nested_ones_dotted():
    body = {"type": "object", "required": ["spec"], "properties": {
        "spec": {"type": "object", "required": ["steps"], "properties": {
            "steps": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 4,
                      "description": "increasing"},
            "mode": {"enum": ["a", "b"]}}},
        "tag": {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^x|y$"}]}}}
    route = Route("POST", "/v1/things/{id}", handler, "Make a thing", roles=(ADMIN,), body=body,
                  responses={409: "Already made"}, tag="things")
    text = gen_api_docs.render(openapi.document([route]))
    assert "### `POST /v1/things/{id}`\n\nMake a thing\n\n- Roles: `admin`\n" in text
    assert "| `id` | path | string | yes |" in text
    assert "| `spec` | object | yes |  |" in text
    assert "| `spec.steps` | array of integer | yes | items <= 4; each >= 1; increasing |" in text
    assert '| `spec.mode` | one of `"a"`, `"b"` | no |  |' in text
    assert "| `tag` | integer or string (matches `^x\\|y$`) | no |  |" in text  # a pipe cannot end the cell
    assert "| 409 | Already made |" in text and "| 413 | Body too large |" in text


def test_check_fails_on_a_stale_reference(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "API.md"
    stale.write_text("# llmp REST API\n")
    monkeypatch.setattr(gen_api_docs, "API_MD", stale)
    assert gen_api_docs.main(["--check"]) == 1
    assert "run `python scripts/gen_api_docs.py`" in capsys.readouterr().err
    monkeypatch.setattr(gen_api_docs, "ROOT", tmp_path)
    assert gen_api_docs.main([]) == 0
    assert gen_api_docs.main(["--check"]) == 0


@pytest.mark.parametrize("schema, reads", [
    ({"const": 1}, "exactly `1`"),
    ({"type": ["object", "null"]}, "object or null"),
    ({"type": "array", "items": {"enum": ["x"]}}, 'array of one of `"x"`'),
    ({}, "any"),
])
def test_types_read_as_phrases(schema, reads):
    assert gen_api_docs.type_of(schema) == reads
