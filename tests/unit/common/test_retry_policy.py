"""Which calls llmp's gRPC clients repeat by themselves (grpc_client.SERVICE_CONFIG)."""

import grpc

from services.common import errors
from services.common.grpc_client import SERVICE_CONFIG


def test_only_a_draining_servers_refusal_is_repeated():
    """A create or a submit may have committed before its service answered UNAVAILABLE (its PostgreSQL
    went away mid-call): repeating it could create a second job or burn a version number, and repeating
    reads only stretches the wait past the caller's deadline. ABORTED is the gate's: the call never ran."""
    [policy] = SERVICE_CONFIG["methodConfig"]
    assert policy["name"] == [{}]
    assert policy["retryPolicy"]["retryableStatusCodes"] == ["ABORTED"]


def test_no_domain_error_answers_aborted():
    assert all(mapping.grpc_code != grpc.StatusCode.ABORTED for mapping in errors.MAPPING.values())
    assert isinstance(errors.from_grpc(grpc.StatusCode.ABORTED, "draining", None), errors.Unavailable)
