"""A minimal kustomize renderer for the features deploy/ and istio/ use, so tests need no binary.

Supported, with kustomize's semantics: `resources` (files and kustomization directories), `patches`
given by `path` (strategic-merge patches identified by kind and name, `$patch: delete` included),
`images` (newName / newTag / digest), `replicas`, `labels` (`pairs`, without selectors) and
`namespace`. Anything else in a kustomization.yaml raises, so a manifest can never silently use a
feature this renderer would ignore. Where `kubectl` is installed, `kubectl kustomize` renders the same
objects (checked by hand when this file changes: `python tests/unit/deploy/kustomize_render.py`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images", "replicas", "labels"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
# Strategic-merge keys of the Kubernetes lists the patches touch; every other list is replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


class UnsupportedFeature(ValueError):
    """The kustomization uses something this renderer does not implement."""


def load_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def render(directory: Path) -> list[dict]:
    """The objects `kustomize build directory` would print, in resource order."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise UnsupportedFeature(f"{directory}: {sorted(unknown)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedFeature(f"{directory}: patch {patch} (only `path:` strategic-merge patches)")
        for document in load_documents(directory / patch["path"]):
            objects = apply_patch(objects, document)
    for image in kustomization.get("images", []):
        set_image(objects, image)
    for replicas in kustomization.get("replicas", []):
        set_replicas(objects, replicas["name"], replicas["count"])
    for label in kustomization.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise UnsupportedFeature(f"{directory}: labels with selectors/templates")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def _same_object(obj: dict, patch: dict) -> bool:
    group = lambda api_version: api_version.rpartition("/")[0]  # noqa: E731
    return (obj["kind"] == patch["kind"] and obj["metadata"]["name"] == patch["metadata"]["name"]
            and group(obj["apiVersion"]) == group(patch["apiVersion"]))


def apply_patch(objects: list[dict], patch: dict) -> list[dict]:
    matches = [obj for obj in objects if _same_object(obj, patch)]
    if len(matches) != 1:
        raise ValueError(f"patch for {patch['kind']}/{patch['metadata']['name']} matches {len(matches)} objects")
    target = matches[0]
    if patch.get("$patch") == "delete":
        return [obj for obj in objects if obj is not target]
    body = {key: value for key, value in patch.items() if key not in {"apiVersion", "kind"}}
    merged = merge(target, body)
    return [merged if obj is target else obj for obj in objects]


def merge(base, patch, key: str | None = None):
    """Strategic merge of `patch` into `base` (maps merge, keyed lists merge by key, others replace)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        result = copy.deepcopy(base)
        for name, value in patch.items():
            if value is None:
                result.pop(name, None)
            elif name in result:
                result[name] = merge(result[name], value, name)
            else:
                result[name] = copy.deepcopy(value)
        return result
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        result = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, old in enumerate(result) if old.get(merge_key) == item.get(merge_key)), None)
            if index is None:
                result.append(copy.deepcopy(item))
            else:
                result[index] = merge(result[index], item)
        return result
    return copy.deepcopy(patch)


def containers(obj: dict) -> list[dict]:
    """Every container (and init container) of a workload or Job's pod template."""
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") if obj["kind"] != "Pod" else spec
    if pod is None:
        return []
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def set_image(objects: list[dict], image: dict) -> None:
    for obj in objects:
        for container in containers(obj):
            name, tag = split_image(container["image"])
            if name != image["name"]:
                continue
            new_name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{new_name}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def split_image(image: str) -> tuple[str, str | None]:
    if "@" in image:
        return image.split("@", 1)[0], None
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, None
    return name, tag


def set_replicas(objects: list[dict], name: str, count: int) -> None:
    matches = [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS and obj["metadata"]["name"] == name]
    if not matches:
        raise ValueError(f"replicas: no workload named {name}")
    for obj in matches:
        obj["spec"]["replicas"] = count


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


if __name__ == "__main__":
    # Compare with `kubectl kustomize` for each directory given (or every overlay).
    import subprocess

    root = Path(__file__).resolve().parents[3]
    targets = [Path(arg) for arg in sys.argv[1:]] or [root / "deploy/overlays/dev", root / "deploy/overlays/prod",
                                                        root / "deploy/base", root / "istio"]
    failed = False
    for target in targets:
        ours = {_key(obj): obj for obj in render(target)}
        output = subprocess.run(["kubectl", "kustomize", str(target)], check=True, capture_output=True, text=True)
        theirs = {_key(obj): obj for obj in yaml.safe_load_all(output.stdout) if obj}
        differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
        failed |= bool(differing)
        sys.stdout.write(f"{target}: {len(ours)} objects, {len(differing)} differ {differing}\n")
    sys.exit(1 if failed else 0)
