"""Issue 15, hygiene: the CLI's client never carries the API key to another origin on a redirect (urllib
copies the Authorization header into the redirected request); a redirect within the origin is followed."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli.client import ApiError, Client

pytestmark = pytest.mark.integration


class _Server:
    """A local HTTP server: `/moved` redirects to `target`, anything else answers `{}` and records the
    Authorization header it got."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.target = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", outer.target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.seen.append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def servers():
    api, elsewhere = _Server(), _Server()
    yield api, elsewhere
    for server in (api, elsewhere):
        server.httpd.shutdown()
        server.httpd.server_close()


def test_a_redirect_to_another_origin_is_refused_and_the_key_stays_home(servers):
    api, elsewhere = servers
    api.target = elsewhere.url + "/collect"
    with pytest.raises(ApiError) as refused:
        Client(api.url, "llmp_secret_key").call("GET", "/moved")
    assert refused.value.status == 302 and "another origin" in refused.value.message
    assert elsewhere.seen == []


def test_a_redirect_to_the_same_host_on_another_port_is_another_origin(servers):
    api, elsewhere = servers
    api.target = elsewhere.url.replace("127.0.0.1", "localhost") + "/collect"
    with pytest.raises(ApiError):
        Client(api.url, "llmp_secret_key").call("GET", "/moved")
    assert elsewhere.seen == []


def test_a_redirect_within_the_origin_is_followed_with_the_key(servers):
    api, _ = servers
    api.target = "/v1/here"
    assert Client(api.url, "llmp_secret_key").call("GET", "/moved") == {"path": "/v1/here"}
    assert api.seen == [("/v1/here", "Bearer llmp_secret_key")]
