"""RFC 6902 JSON Patch, applied the way the Kubernetes API server applies `application/json-patch+json`
(the `jsonpatch` package is not installed here): operations in order on a copy, the whole patch refused
at the first one that fails, so a failed `test` leaves the object as it was."""

from __future__ import annotations

import copy


class PatchFailed(Exception):
    """A `test` did not hold, or a path does not exist (the API server answers 422)."""


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise PatchFailed(f"not a JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(target: list, part: str, *, insert: bool = False) -> int:
    if part == "-" and insert:
        return len(target)
    if not part.isdigit() or (part != "0" and part.startswith("0")):
        raise PatchFailed(f"not an array index: {part!r}")
    index = int(part)
    if index > len(target) or (index == len(target) and not insert):
        raise PatchFailed(f"index {index} out of range (length {len(target)})")
    return index


def _parent(document, parts: list[str]):
    target = document
    for part in parts[:-1]:
        if isinstance(target, list):
            target = target[_index(target, part)]
        elif isinstance(target, dict) and part in target:
            target = target[part]
        else:
            raise PatchFailed(f"no member {part!r}")
    return target


def apply_patch(document, patch: list[dict]):
    """`document` with `patch` applied (the argument is not changed); PatchFailed when any operation fails."""
    document = copy.deepcopy(document)
    for operation in patch:
        op, parts = operation["op"], _pointer(operation["path"])
        parent, last = _parent(document, parts), parts[-1]
        if op == "add":
            if isinstance(parent, list):
                parent.insert(_index(parent, last, insert=True), copy.deepcopy(operation["value"]))
            else:
                parent[last] = copy.deepcopy(operation["value"])
            continue
        if isinstance(parent, list):
            key = _index(parent, last)
        elif last in parent:
            key = last
        else:
            raise PatchFailed(f"{operation['path']} does not exist")
        if op == "test":
            if parent[key] != operation["value"]:
                raise PatchFailed(f"test of {operation['path']} failed: {parent[key]!r} != {operation['value']!r}")
        elif op == "replace":
            parent[key] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[key]
        else:
            raise PatchFailed(f"operation {op!r} not supported here")
    return document
