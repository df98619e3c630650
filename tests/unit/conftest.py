"""Unit tests need no server: every test in this folder passes in a network namespace where nothing listens.

Three guards keep it so:
- the server fixtures of tests/conftest.py (PostgreSQL, S3, broker, the settings pointing at them) are
  refused here by name;
- while a unit test sets up (its fixtures included) and runs, a TCP or UDP connection is refused unless it goes to a
  loopback port that this process or a child of it listens on: a test may start its own server
  (`aiohttp_client`, an in-process gRPC server), never lean on one that happens to run on the machine.
  The refusal is a `ConnectionRefusedError`, what the namespace answers, so code that handles a refused
  connection behaves as it would there, and its message says what to do;
- `make test-unit` runs this folder in a fresh network namespace (only loopback up) where `unshare` can
  make one, which also covers connections made outside Python (libpq, gRPC's C core, child processes).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket

import psutil
import pytest

MOVE = "unit tests need no server: move this test to tests/integration"
SERVER_FIXTURES = ("database_url", "private_broker_url", "claim_broker", "own_broker_url", "s3_endpoint",
                   "settings_env", "settings")


def _refused_fixture(name: str):
    @pytest.fixture(name=name, scope="session")
    def refused():
        pytest.fail(f"fixture `{name}` reaches a server; {MOVE}", pytrace=False)

    return refused


for _name in SERVER_FIXTURES:  # each overrides tests/conftest.py's fixture of that name, for this folder only
    globals()[f"refuse_{_name}"] = _refused_fixture(_name)


class ServerNeeded(ConnectionRefusedError):
    """A connection a unit test may not make."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:  # a name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def _own_ports() -> set[int]:
    """Ports this process and its children listen on (TCP) or are bound to (UDP)."""
    me = psutil.Process()
    ports: set[int] = set()
    for process in (me, *me.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections(kind="inet"):
                if conn.laddr and (conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM):
                    ports.add(conn.laddr.port)
    return ports


def _refusal(sock: socket.socket, address) -> ServerNeeded | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None  # unix sockets and the like never leave the machine's processes
    host, port = address[0], address[1]
    if _is_loopback(host) and port in _own_ports():
        return None
    return ServerNeeded(errno.ECONNREFUSED, f"connection to {host}:{port} refused: {MOVE}")


_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _connect(self: socket.socket, address) -> None:
    if refusal := _refusal(self, address):
        raise refusal
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address) -> int:
    if _refusal(self, address):
        return errno.ECONNREFUSED
    return _real_connect_ex(self, address)


@contextlib.contextmanager
def _no_servers():
    socket.socket.connect, socket.socket.connect_ex = _connect, _connect_ex
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = _real_connect, _real_connect_ex


# The setup (fixtures included, session ones too) and the call of each test in this folder, and no other
# folder's: these hooks, unlike a fixture, come before every fixture. Teardown is left alone, since a mixed
# run (`make test`) tears the integration tests' session servers down after the last unit test.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _no_servers():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _no_servers():
        return (yield)
