"""The unit tier's own rule (tests/unit/conftest.py): its tests reach no server but one they start themselves."""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from cli.servers import free_port


def test_a_loopback_port_nothing_here_listens_on_is_refused_naming_the_move():
    with pytest.raises(ConnectionRefusedError, match="move this test to tests/integration") as refused:
        socket.create_connection(("127.0.0.1", free_port()), timeout=1)
    assert type(refused.value).__name__ == "ServerNeeded"  # the guard's refusal, not the kernel's
    with socket.socket() as sock:
        assert sock.connect_ex(("localhost", free_port())) == errno.ECONNREFUSED


def test_an_address_off_the_machine_is_refused_without_trying():
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="192.0.2.1:80 refused"):
        sock.settimeout(2)  # were it tried, TEST-NET-1 would time out instead
        sock.connect(("192.0.2.1", 80))


def test_a_server_the_test_starts_itself_is_reachable():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        def greet() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"hi")

        accepted = threading.Thread(target=greet)
        accepted.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.recv(2) == b"hi"
        accepted.join(5)


@pytest.mark.parametrize("name", ["database_url", "s3_endpoint", "private_broker_url", "settings_env"])
def test_the_server_fixtures_are_refused(request, name):
    with pytest.raises(pytest.fail.Exception, match="move this test to tests/integration"):
        request.getfixturevalue(name)
