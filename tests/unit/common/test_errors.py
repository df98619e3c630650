import grpc
import pytest

from services.common import errors


@pytest.mark.parametrize("cls", list(errors.MAPPING))
def test_every_error_survives_the_trip_through_grpc(cls):
    original = cls("something specific", retry_after=3)
    mapping = errors.mapping_for(original)
    rebuilt = errors.from_grpc(mapping.grpc_code, original.message, errors.to_grpc_metadata(original))
    assert type(rebuilt) is cls
    assert rebuilt.message == "something specific"
    assert rebuilt.retry_after == 3
    assert errors.mapping_for(rebuilt).http_status == mapping.http_status


def test_statuses_that_share_a_grpc_code_stay_distinct_over_http():
    code_412 = errors.mapping_for(errors.PreconditionFailed("x"))
    code_428 = errors.mapping_for(errors.PreconditionRequired("x"))
    code_409 = errors.mapping_for(errors.Conflict("x"))
    assert code_412.grpc_code == code_428.grpc_code == code_409.grpc_code == grpc.StatusCode.FAILED_PRECONDITION
    assert (code_412.http_status, code_428.http_status, code_409.http_status) == (412, 428, 409)


def test_a_raw_grpc_failure_maps_by_code_and_unavailable_gets_a_retry_hint():
    error = errors.from_grpc(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    assert isinstance(error, errors.Unavailable)
    assert error.retry_after == 1
    assert isinstance(errors.from_grpc(grpc.StatusCode.DATA_LOSS, None, ()), errors.Internal)


def test_subclasses_inherit_their_parents_mapping():
    class DatasetNotFound(errors.NotFound):
        pass

    assert errors.mapping_for(DatasetNotFound("gone")).http_status == 404


def test_http_body_shape():
    assert errors.http_body(errors.ValidationFailed("model.n_layer: must be >= 1")) == {
        "error": {"type": "validation_failed", "message": "model.n_layer: must be >= 1"}}


def test_client_errors_are_never_5xx():
    client_side = [errors.InvalidArgument, errors.ValidationFailed, errors.BadRequest, errors.NotFound,
                   errors.Conflict, errors.PreconditionFailed, errors.PreconditionRequired, errors.PayloadTooLarge,
                   errors.RateLimited, errors.Unauthenticated, errors.PermissionDenied, errors.AlreadyExists]
    assert all(400 <= errors.MAPPING[cls].http_status < 500 for cls in client_side)
