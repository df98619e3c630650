"""How llmp's channels balance (issue 16, defect 9): over the replicas themselves, or through the mesh."""

import json

import pytest

from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.common.grpc_client import SERVICE_CONFIGS, ServiceClients
from services.common.grpc_server import ACCEPTING_HEALTH_NAME
from services.common.identity import GATEWAY
from tests.identities import SERVICE_SECRET


def _service_config(settings: Settings) -> dict:
    options = dict(ServiceClients(settings, principal=GATEWAY).options)
    return json.loads(options["grpc.service_config"])


def test_client_balancing_spreads_calls_and_health_checks_each_replica():
    config = _service_config(Settings.from_env({"LLMP_SERVICE_SECRET": SERVICE_SECRET}))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ACCEPTING_HEALTH_NAME}


def test_under_the_mesh_the_channel_leaves_balancing_and_health_to_envoy():
    """Behind a ClusterIP the channel's one subchannel is the local Envoy: a health Watch through it sees
    a single replica, and that replica draining would fail every call of the channel."""
    config = _service_config(Settings.from_env({"LLMP_GRPC_BALANCING": "mesh",
                                                "LLMP_SERVICE_SECRET": SERVICE_SECRET}))
    assert config["loadBalancingConfig"] == [{"pick_first": {}}]
    assert "healthCheckConfig" not in config


def test_both_retry_a_draining_servers_refusal():
    for config in SERVICE_CONFIGS.values():
        [policy] = config["methodConfig"]
        assert policy["retryPolicy"]["retryableStatusCodes"] == ["ABORTED"]


def test_an_unknown_balancing_is_refused_by_name():
    with pytest.raises(InvalidArgument, match="LLMP_GRPC_BALANCING"):
        Settings.from_env({"LLMP_GRPC_BALANCING": "envoy"})
