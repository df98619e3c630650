import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.http import check_if_match, etag_of, json_response, none_match
from services.common import errors

TAG = '"abc"'


def request(method: str, headers: dict[str, str]):
    return make_mocked_request(method, "/x", headers=headers)


def test_etag_is_strong_and_depends_only_on_content():
    assert etag_of({"a": 1, "b": 2}) == etag_of({"b": 2, "a": 1})
    assert etag_of({"a": 1}) != etag_of({"a": 2})
    assert etag_of({"a": 1}).startswith('"') and not etag_of({"a": 1}).startswith("W/")


@pytest.mark.parametrize("header, matches", [
    ('"abc"', True), ('W/"abc"', True), ('"x", "abc"', True), ("*", True), ('"abd"', False), ("", False),
])
def test_if_none_match_uses_weak_comparison_lists_and_star(header, matches):
    assert none_match(header, TAG) is matches


def test_get_answers_304_with_the_same_etag_and_cache_control():
    payload = {"name": "d"}
    first = json_response(request("GET", {}), payload, cache_control="private, max-age=5")
    again = json_response(request("GET", {"If-None-Match": first.headers["ETag"]}), payload,
                          cache_control="private, max-age=5")
    assert first.status == 200 and again.status == 304
    for header in ("ETag", "Cache-Control", "Vary"):
        assert again.headers[header] == first.headers[header]
    assert again.body is None


def test_if_match_strong_comparison():
    check_if_match(request("PUT", {"If-Match": TAG}), TAG, required=True)
    check_if_match(request("PUT", {"If-Match": "*"}), TAG, required=True)
    with pytest.raises(errors.PreconditionFailed):
        check_if_match(request("PUT", {"If-Match": 'W/"abc"'}), TAG, required=True)
    with pytest.raises(errors.PreconditionFailed):
        check_if_match(request("PUT", {"If-Match": '"old"'}), TAG, required=True)
    with pytest.raises(errors.PreconditionFailed):
        check_if_match(request("PUT", {"If-Match": TAG}), None, required=True)


def test_missing_precondition_is_428_only_where_required():
    with pytest.raises(errors.PreconditionRequired):
        check_if_match(request("PUT", {}), TAG, required=True)
    with pytest.raises(errors.PreconditionRequired):
        check_if_match(request("PUT", {}), None, required=True)
    check_if_match(request("DELETE", {}), TAG, required=False)


def test_if_none_match_star_creates_only_when_absent():
    check_if_match(request("PUT", {"If-None-Match": "*"}), None, required=True)
    with pytest.raises(errors.PreconditionFailed):
        check_if_match(request("PUT", {"If-None-Match": "*"}), TAG, required=True)
