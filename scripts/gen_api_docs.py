"""Generate docs/API.md, the REST API reference, from the gateway's OpenAPI document.

The document is the one `GET /openapi.json` serves (`gateway/openapi.py` over the route table of
`gateway/routes.py`), built here without a server. `--check` fails when the committed docs/API.md differs
from what the route table produces now; a unit test runs it, so the reference cannot drift from the API.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "API.md"
METHODS = ("get", "put", "post", "delete", "patch", "head")
# JSON Schema keywords shown as constraints, in this order, with how each reads.
CONSTRAINTS = {
    "minimum": ">= {}", "exclusiveMinimum": "> {}", "maximum": "<= {}", "exclusiveMaximum": "< {}",
    "minLength": "length >= {}", "maxLength": "length <= {}", "pattern": "matches `{}`",
    "minItems": "items >= {}", "maxItems": "items <= {}", "contains": "contains {}",
    "default": "default {}",
}


def document() -> dict:
    """The OpenAPI document the gateway serves."""
    from gateway import openapi, routes

    return openapi.document(routes.all_routes())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    return f"`{json.dumps(value)}`"


def type_of(schema: dict) -> str:
    """How a schema reads in one phrase: `integer`, `one of "a", "b"`, `array of string`, …"""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "const" in schema:
        return f"exactly {_value(schema['const'])}"
    if "enum" in schema:
        return "one of " + ", ".join(_value(v) for v in schema["enum"])
    for combinator in ("oneOf", "anyOf"):
        alternatives = [s for s in schema.get(combinator, []) if "type" in s or "enum" in s or "const" in s]
        if alternatives and "type" not in schema:
            return " or ".join(_phrase(s) for s in alternatives)
    kinds = schema.get("type", "any")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    words = [f"array of {type_of(schema['items'])}" if kind == "array" and "items" in schema else kind
             for kind in kinds]
    return " or ".join(words)


def _phrase(schema: dict) -> str:
    """A type with its constraints, for alternatives inside one cell."""
    limits = constraints(schema)
    return f"{type_of(schema)} ({limits})" if limits else type_of(schema)


def constraints(schema: dict) -> str:
    found = []
    for keyword, text in CONSTRAINTS.items():
        if keyword in schema:
            value = schema[keyword]
            if keyword == "contains":
                value = _phrase(value)
            elif keyword == "pattern":
                value = value.replace("`", "\\`")
            elif keyword == "default":
                value = _value(value)
            found.append(text.format(value))
    if schema.get("type") == "array" and "items" in schema:
        found.extend(f"each {limit}" for limit in constraints(schema["items"]).split("; ") if limit)
    return "; ".join(found)


def fields(schema: dict, prefix: str = "") -> list[tuple[str, str, bool, str]]:
    """(dotted name, type, required, constraints and description) of every property, nested objects flattened."""
    rows = []
    required = set(schema.get("required", []))
    for name, field in schema.get("properties", {}).items():
        notes = "; ".join(part for part in (constraints(field), field.get("description", "")) if part)
        rows.append((prefix + name, type_of(field), name in required, notes))
        rows.extend(fields(field, f"{prefix}{name}."))
    return rows


def operations(doc: dict) -> list[tuple[str, str, dict]]:
    """(METHOD, path, operation) in the document's order; HEADs are folded into their GET."""
    return [(method.upper(), path, operation) for path, item in doc["paths"].items()
            for method, operation in item.items() if method in METHODS and method != "head"]


def common_errors(doc: dict) -> dict[str, str]:
    """Error statuses every operation may answer, each with its usual meaning (an operation that gives one a
    meaning of its own lists it in its section)."""
    meanings: dict[str, Counter] = {}
    ops = operations(doc)
    for _, _, operation in ops:
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                meanings.setdefault(status, Counter())[answer["description"]] += 1
    return {status: counts.most_common(1)[0][0] for status, counts in sorted(meanings.items())
            if sum(counts.values()) == len(ops)}


def _roles(operation: dict) -> str:
    if not operation.get("security"):
        return "public (no API key)"
    return ", ".join(f"`{role}`" for role in operation.get("x-roles", [])) or "any API key"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows), ""]


def render(doc: dict) -> str:
    common = common_errors(doc)
    ops = operations(doc)
    lines = [
        "# llmp REST API",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from the gateway's OpenAPI document. Do not edit by hand:",
        "     run `python scripts/gen_api_docs.py`; the unit tests fail while this file is out of date. -->",
        "",
        doc["info"]["description"],
        "",
        f"This reference is generated from the OpenAPI {doc['openapi']} document the gateway serves at",
        "`GET /openapi.json` (`gateway/openapi.py` over the route table of `gateway/routes.py`), one section",
        "per operation.",
        "",
        "## Conventions",
        "",
        "- **Authentication**: `Authorization: Bearer <API key>`. Each operation names the roles whose keys may",
        "  call it; operations marked *public* need no key.",
        "- **Errors** answer a JSON body `{\"error\": {\"type\": \"…\", \"message\": \"…\"}}`; `type` names the",
        "  error and `message` says what was wrong. Any operation may answer these, so the sections below list",
        "  only the statuses particular to each operation:",
        "",
        *_table(("Status", "Meaning"), [(status, text) for status, text in common.items()]),
        "- **Caching**: every `GET` answers with `ETag` and `Cache-Control`, and with `304 Not Modified` when",
        "  `If-None-Match` names the current `ETag`. Every `GET` is also served as `HEAD`: the same status and",
        "  headers, no body.",
        "",
        "## Operations",
        "",
        *_table(("Method", "Path", "Summary"), [(method, f"`{path}`", op["summary"]) for method, path, op in ops]),
    ]
    tags = list(dict.fromkeys((op.get("tags") or ["other"])[0] for _, _, op in ops))
    for tag in tags:
        lines += [f"## {tag}", ""]
        for method, path, op in ops:
            if (op.get("tags") or ["other"])[0] != tag:
                continue
            lines += [f"### `{method} {path}`", "", op["summary"], "", f"- Roles: {_roles(op)}"]
            if method == "GET" and "head" in doc["paths"][path]:
                lines.append("- Also served as `HEAD` (headers only)")
            lines.append("")
            if op.get("parameters"):
                lines += ["Parameters:", ""]
                lines += _table(("Name", "In", "Type", "Required"), [
                    (f"`{p['name']}`", p["in"], type_of(p.get("schema", {})), "yes" if p.get("required") else "no")
                    for p in op["parameters"]])
            body = op.get("requestBody")
            if body:
                for media, content in body["content"].items():
                    schema = content.get("schema", {})
                    lines += [f"Request body (`{media}`{', required' if body.get('required') else ''}):", ""]
                    rows = fields(schema)
                    if rows:
                        lines += _table(("Field", "Type", "Required", "Notes"), [
                            (f"`{name}`", kind, "yes" if required else "no", notes)
                            for name, kind, required, notes in rows])
                    else:
                        lines += [f"{type_of(schema)}.", ""]
            particular = [(status, answer["description"]) for status, answer in op["responses"].items()
                          if common.get(status) != answer["description"]]
            lines += ["Responses (beside the common errors):", ""]
            lines += _table(("Status", "Meaning"), sorted(particular))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/API.md is not what the route table gives")
    options = parser.parse_args(argv)
    text = render(document())
    if options.check:
        if not API_MD.exists() or API_MD.read_text() != text:
            print("docs/API.md is out of date with the gateway's routes (run `python scripts/gen_api_docs.py`)",
                  file=sys.stderr)
            return 1
        print("docs/API.md matches the gateway's routes")
        return 0
    API_MD.write_text(text)
    print(f"generated {API_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "gen")]  # document this checkout's gateway, wherever llmp is installed
    sys.exit(main())
