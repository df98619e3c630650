"""The address the per-address limiter keys on: the peer, or behind trusted proxies the entry they appended to
X-Forwarded-For, never what the client wrote there itself (it would pick a fresh bucket per request)."""

from __future__ import annotations

from unittest.mock import Mock

from aiohttp.test_utils import make_mocked_request

from gateway.app import client_address


def request(forwarded: str | None):
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    transport = Mock()
    transport.get_extra_info.return_value = ("10.0.0.9", 41000)  # the connection's peer (the proxy, if any)
    return make_mocked_request("GET", "/v1/models", headers=headers, transport=transport)


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says():
    assert client_address(request("1.2.3.4"), 0) == "10.0.0.9"


def test_behind_one_proxy_the_address_it_appended_is_the_client():
    assert client_address(request("6.6.6.6, 203.0.113.7"), 1) == "203.0.113.7"  # 6.6.6.6: the client's own claim
    assert client_address(request("198.51.100.2, 203.0.113.7"), 2) == "198.51.100.2"


def test_a_header_shorter_than_the_trusted_chain_falls_back_to_the_peer():
    assert client_address(request(None), 1) == "10.0.0.9"
