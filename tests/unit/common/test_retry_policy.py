"""Which calls llmp's gRPC clients repeat by themselves (grpc_client.SERVICE_CONFIG)."""

import grpc

from services.common import errors
from services.common.grpc_client import SERVICE_CONFIG


def _policies() -> dict[str, list[str]]:
    default, specific = SERVICE_CONFIG["methodConfig"]
    assert default["name"] == [{}]
    codes = {name["method"]: specific["retryPolicy"]["retryableStatusCodes"] for name in specific["name"]}
    codes["*"] = default["retryPolicy"]["retryableStatusCodes"]
    return codes


def test_a_call_that_changes_something_is_not_repeated_after_unavailable():
    """A create or a submit may have committed before its service answered UNAVAILABLE (its PostgreSQL
    went away mid-call): repeating it could create a second job or burn a version number."""
    policies = _policies()
    for method in ("CreateDataset", "SubmitJob", "RegisterModelVersion", "ReserveModelVersion", "CreateExport",
                   "SetAlias", "PutDeployment", "DeleteDeployment", "DeleteModelVersion", "DeleteDatasetVersion"):
        assert method not in policies, method
    assert policies["*"] == ["ABORTED"]


def test_reads_and_idempotent_calls_are_repeated_after_unavailable():
    policies = _policies()
    for method in ("GetJob", "ListDatasets", "WatchJob", "DownloadArtifact", "GenerateStream", "ResolveAlias",
                   "CommitModelVersion", "CancelJob"):
        assert set(policies[method]) == {"ABORTED", "UNAVAILABLE"}, method


def test_no_domain_error_answers_aborted():
    """ABORTED is retried on every method because only a draining server's gate answers it."""
    assert all(mapping.grpc_code.name != "ABORTED" for mapping in errors.MAPPING.values())
    assert isinstance(errors.from_grpc(grpc.StatusCode.ABORTED, "draining", None), errors.Unavailable)
