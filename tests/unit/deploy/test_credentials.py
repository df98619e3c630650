"""Each workload gets only the credentials it uses, and the bootstrap needs no Job.

What an llmp workload may receive is derived from its code (test_calls.code_of): an LLMP_* credential
held in a Secret goes to a component exactly when its code reads the Settings field of that variable
(LLMP_DATABASE_URL -> `database_url`, LLMP_S3_* -> `s3`, LLMP_ADMIN_KEY -> `admin_key`).
"""

from __future__ import annotations

import ast
import re

import pytest
from conftest import ROOT, containers, render
from test_calls import ENTRY_MODULES, code_of

BASE_SECRETS = {obj["metadata"]["name"]: obj for obj in render(ROOT / "deploy" / "base") if obj["kind"] == "Secret"}


def _field_of(variable: str) -> str:
    """The Settings field an LLMP_* variable fills (services/common/config.py: LLMP_S3_* are `s3`)."""
    name = variable.removeprefix("LLMP_").lower()
    return "s3" if name.startswith("s3_") else name


def _fields_read(component: str) -> set[str]:
    return {node.attr for module, tree in code_of(ENTRY_MODULES[component]).items()
            if module != "services.common.config" for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def received(container: dict) -> dict[str, set[str]]:
    """Secret name -> the keys a container gets from it (whole with envFrom, or one by one)."""
    got: dict[str, set[str]] = {}
    for ref in container.get("envFrom", []):
        if "secretRef" in ref:
            name = ref["secretRef"]["name"]
            got.setdefault(name, set()).update(BASE_SECRETS[name].get("stringData", {}))
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            got.setdefault(ref["name"], set()).add(ref["key"])
    return got


def _pods(objects: list[dict]) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] in {"Deployment", "StatefulSet", "Job"}}


@pytest.mark.parametrize("component", sorted(ENTRY_MODULES))
def test_llmp_components_get_exactly_the_credentials_their_code_reads(overlay, component):
    _, objects = overlay
    credentials = {key for secret in BASE_SECRETS.values() for key in secret.get("stringData", {})
                   if key.startswith("LLMP_")}
    needed = {key for key in credentials if _field_of(key) in _fields_read(component)}
    assert needed, f"{component} reads no credential at all?"
    workloads = [obj for obj in _pods(objects).values()
                 if obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == component]
    assert workloads, component
    for workload in workloads:
        for container in containers(workload):
            got = {key for keys in received(container).values() for key in keys}
            assert got == needed, f"{workload['metadata']['name']}: gets {sorted(got)}, its code reads {sorted(needed)}"


def test_only_the_admin_key_reader_gets_it_and_superuser_credentials_stay_with_their_server(overlay):
    _, objects = overlay
    holders: dict[str, set[str]] = {}
    for name, workload in _pods(objects).items():
        for container in containers(workload):
            for secret in received(container):
                holders.setdefault(secret, set()).add(name)
    assert holders["llmp-admin-key"] == {"gateway"}
    assert holders["llmp-minio-root"] == {"minio"}
    # The PostgreSQL superuser's password: only the server (which creates the llmp role with it).
    assert holders["llmp-postgres"] == {"postgres"}


def test_no_job_waits_on_a_sidecar_and_the_bucket_is_made_inside_minio(overlay):
    """Every pod of the namespace gets an Istio sidecar; before native sidecars (or without Istio's
    per-pod native-sidecar support, 1.24+) a Job's proxy keeps the pod running for ever. So no Job: the
    MinIO pod creates the bucket and users itself, over loopback (not through the mesh)."""
    _, objects = overlay
    assert not [obj for obj in objects if obj["kind"] in {"Job", "CronJob"}]
    assert "nativeSidecar" not in str(objects)
    minio = _pods(objects)["minio"]
    (server,) = containers(minio)
    hook = server["lifecycle"]["postStart"]["exec"]["command"]
    config_maps = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ConfigMap"}
    mounts = {mount["mountPath"]: mount["name"] for mount in server["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in minio["spec"]["template"]["spec"]["volumes"]}
    folder, _, script_name = hook[-1].rpartition("/")
    files = config_maps[volumes[mounts[folder]]["configMap"]["name"]]["data"]
    script = files[script_name]
    assert "http://127.0.0.1:9000" in script
    settings = config_maps["llmp-config"]["data"]
    assert f"local/{settings['LLMP_S3_BUCKET']}" in script
    repository = settings["LLMP_TRITON_MODEL_REPOSITORY"].split("/", 3)[3]  # s3://host:port/<bucket/prefix>
    assert f"local/{repository}/.keep" in script
    # Every policy file it loads is there and valid JSON; every user it creates has its secret in the env.
    import json

    for policy in re.findall(r"/etc/minio-bootstrap/([\w.-]+\.json)", script):
        json.loads(files[policy])
    env = {variable["name"] for variable in server["env"]}
    for user, secret in re.findall(r'^user "\$(\w+)" "\$(\w+)"', script, re.MULTILINE):
        assert {user, secret} <= env


# The image (and so the database role) a workload runs as: the training worker is the training component.
ROLE_OF = {"training-worker": "training"}


def test_each_component_connects_to_postgresql_as_its_own_role(overlay):
    """The components whose code reads LLMP_DATABASE_URL are exactly those postgres-init gives a role,
    and each workload gets its own role's URL only (issue 16, defect 10)."""
    _, objects = overlay
    readers = {component for component in ENTRY_MODULES if "database_url" in _fields_read(component)}
    script = (ROOT / "deploy" / "base" / "postgres-init" / "llmp-roles.psql").read_text()
    roles = set(re.findall(r"\('(\w+)', :'\1_password'\)", script))
    assert roles == {ROLE_OF.get(component, component) for component in readers}
    for workload in _pods(objects).values():
        component = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for container in containers(workload):
            got = {name for name, keys in received(container).items() if "LLMP_DATABASE_URL" in keys}
            if component in readers:
                assert got == {f"llmp-{ROLE_OF.get(component, component)}-database"}, (component, got)
            else:
                assert not got, (component, got)
    for component in roles:
        url = BASE_SECRETS[f"llmp-{component}-database"]["stringData"]["LLMP_DATABASE_URL"]
        assert url.startswith(f"postgresql://llmp_{component}:"), url


def test_postgres_creates_the_roles_with_the_passwords_it_is_given(overlay):
    _, objects = overlay
    (server,) = containers(_pods(objects)["postgres"])
    env = {variable["name"]: variable for variable in server["env"]}
    script = (ROOT / "deploy" / "base" / "postgres-init" / "10-llmp-roles.sh").read_text()
    for variable in re.findall(r'="\$(\w+)"', script):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        component = variable.removesuffix("_DB_PASSWORD").lower()
        assert (ref["name"], ref["key"]) == ("llmp-postgres", f"{component}-password")
    assert env["POSTGRES_DB"]["value"] == "llmp"
    mounts = {mount["mountPath"]: mount["name"] for mount in server["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in _pods(objects)["postgres"]["spec"]["template"]["spec"]["volumes"]}
    init = volumes[mounts["/docker-entrypoint-initdb.d"]]["configMap"]
    config_maps = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ConfigMap"}
    assert set(config_maps[init["name"]]["data"]) == {"10-llmp-roles.sh", "llmp-roles.psql"}
    assert init["defaultMode"] & 0o111, "executed, not sourced into the entrypoint's shell"


def test_each_component_has_an_s3_user_of_its_own(overlay):
    """Every workload whose code reads the S3 settings gets the keys of a user no other component holds,
    and the minio pod creates that user (with a policy limited to the llmp bucket)."""
    _, objects = overlay
    readers = {component for component in ENTRY_MODULES if "s3" in _fields_read(component)}
    holders: dict[str, set[str]] = {}
    for workload in _pods(objects).values():
        component = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        if component == "minio":  # the server itself, which creates the users
            continue
        for container in containers(workload):
            for name, keys in received(container).items():
                if "LLMP_S3_ACCESS_KEY" in keys:
                    holders.setdefault(name, set()).add(component)
    assert set().union(*holders.values()) == readers
    assert all(len(components) == 1 for components in holders.values()), holders
    (minio,) = containers(_pods(objects)["minio"])
    given = {variable["valueFrom"]["secretKeyRef"]["name"] for variable in minio["env"] if "valueFrom" in variable}
    assert set(holders) <= given, "the minio pod creates every user llmp's components use"
