from pathlib import Path

import pytest

from services.common import topology
from services.common.config import DEFAULTS, VARIABLES, Settings
from services.common.errors import InvalidArgument


def test_defaults_match_the_topology():
    settings = Settings.from_env({})
    assert settings.service_addrs == {s.name: f"127.0.0.1:{s.port}" for s in topology.GRPC_SERVICES}
    assert settings.gateway_port == topology.GATEWAY_PORT
    assert settings.s3.endpoint == f"127.0.0.1:{topology.S3_PORT}"
    assert settings.s3.secure is False
    assert settings.state_dir == Path(".llmp")


def test_environment_overrides_defaults():
    settings = Settings.from_env({"LLMP_S3_SECURE": "true", "LLMP_GATEWAY_PORT": "9999",
                                  "LLMP_DATASET_ADDR": "dataset:50051", "LLMP_BIND_HOST": "0.0.0.0",
                                  "LLMP_LOG_LEVEL": "debug"})
    assert settings.s3.secure is True
    assert settings.gateway_port == 9999
    assert settings.service_addrs["dataset"] == "dataset:50051"
    assert settings.listen_addr(topology.DATASET) == "0.0.0.0:50051"
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize("env, named", [
    ({"LLMP_GATEWAY_PORT": "http"}, "LLMP_GATEWAY_PORT"),
    ({"LLMP_GATEWAY_PORT": "-1"}, "LLMP_GATEWAY_PORT"),
    ({"LLMP_S3_SECURE": "maybe"}, "LLMP_S3_SECURE"),
    ({"LLMP_LOG_FORMAT": "xml"}, "LLMP_LOG_FORMAT"),
    ({"LLMP_DATABSE_URL": "postgresql://x"}, "LLMP_DATABSE_URL"),
    ({"LLMP_TRITON_INTRA_OP_THREADS": "-1"}, "LLMP_TRITON_INTRA_OP_THREADS"),
    ({"LLMP_TRITON_INTRA_OP_THREADS": "all"}, "LLMP_TRITON_INTRA_OP_THREADS"),
])
def test_bad_settings_are_refused_naming_the_variable(env, named):
    with pytest.raises(InvalidArgument, match=named):
        Settings.from_env(env)


def test_every_variable_is_documented_in_the_readme():
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    missing = [variable.name for variable in VARIABLES if f"`{variable.name}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_variables_are_unique_and_prefixed():
    names = [variable.name for variable in VARIABLES]
    assert len(names) == len(set(names)) == len(DEFAULTS)
    assert all(name.startswith("LLMP_") for name in names)


def test_grpc_tls_needs_its_certificate_key_and_ca_together():
    assert Settings.from_env({}).grpc_tls is None
    with pytest.raises(InvalidArgument, match="LLMP_GRPC_TLS_CA"):
        Settings.from_env({"LLMP_GRPC_TLS_CERT": "/c.pem", "LLMP_GRPC_TLS_KEY": "/k.pem"})
    tls = Settings.from_env({"LLMP_GRPC_TLS_CERT": "/c.pem", "LLMP_GRPC_TLS_KEY": "/k.pem",
                             "LLMP_GRPC_TLS_CA": "/ca.pem"}).grpc_tls
    assert (str(tls.cert), str(tls.key), str(tls.ca)) == ("/c.pem", "/k.pem", "/ca.pem")


def test_triton_intra_op_threads_reach_the_models_batching_config():
    from services.inference.model_repository import BatchingConfig

    assert BatchingConfig.from_settings(Settings.from_env({})).intra_op_threads == 0  # every core
    settings = Settings.from_env({"LLMP_TRITON_INTRA_OP_THREADS": "3"})
    assert BatchingConfig.from_settings(settings).intra_op_threads == 3
