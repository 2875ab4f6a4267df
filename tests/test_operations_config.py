"""The committed operations config: .dvc/config's remote and docker-compose.yml agree with the code.

There is no Docker engine on the test machines, so the compose file is checked as data: the
services the docs promise, the buckets the code and .dvc/config use, the MLflow server wiring that
tests/test_mlflow_server.py runs for real, and no secret other than labelled local defaults.
"""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import yaml
from configobj import ConfigObj

from conftest import REPO_ROOT
from heimdall.params import PostgresSourceParams

COMPOSE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dvc_config() -> ConfigObj:
    return ConfigObj(str(REPO_ROOT / ".dvc/config"))


def test_dvc_default_remote_is_minio_without_credentials(dvc_config):
    assert dvc_config["core"]["remote"] == "minio"
    remote = dvc_config['remote "minio"']
    assert remote["url"] == "s3://heimdall-dvc/pipeline"
    assert remote["endpointurl"] == "http://localhost:9000"
    secretish = {k for k in remote if re.search(r"key|secret|password|token|credential|profile", k)}
    assert not secretish, f"credentials committed in .dvc/config: {secretish}"
    # where the docs send them instead: git-ignored
    assert "/config.local" in (REPO_ROOT / ".dvc/.gitignore").read_text().split()


def test_compose_services_and_buckets(compose, dvc_config):
    services = compose["services"]
    assert {"minio", "buckets", "postgres", "mlflow"} <= set(services)
    assert "9000:9000" in services["minio"]["ports"]  # .dvc/config's endpointurl
    buckets = services["buckets"]["environment"]["BUCKETS"].split()
    dvc_bucket = dvc_config['remote "minio"']["url"].removeprefix("s3://").split("/")[0]
    iq_bucket = PostgresSourceParams().s3_bucket
    assert set(buckets) == {dvc_bucket, iq_bucket, "mlflow-artifacts"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"


def test_compose_mlflow_server_wiring(compose):
    mlflow = compose["services"]["mlflow"]
    args = dict(a.split("=", 1) if "=" in a else (a, True) for a in mlflow["command"][2:])
    backend = args["--backend-store-uri"]
    assert backend.startswith("postgresql+psycopg2://") and backend.endswith("@postgres:5432/mlflow")
    assert ":" not in backend.split("//", 1)[1].split("@")[0], "password in the backend URI"
    assert args["--serve-artifacts"] is True
    assert args["--artifacts-destination"].startswith("s3://mlflow-artifacts/")
    env = mlflow["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"} <= set(env)
    assert mlflow["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    # the image: the pipeline's own mlflow pin, plus the S3 and PostgreSQL drivers
    dockerfile = mlflow["build"]["dockerfile_inline"]
    assert f"mlflow=={version('mlflow')}" in dockerfile
    assert "boto3" in dockerfile and f"psycopg2-binary=={version('psycopg2-binary')}" in dockerfile


def test_compose_has_only_labelled_overridable_default_secrets(compose):
    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        else:
            yield path, node

    secrets = [(p, v) for p, v in walk(compose) if re.search(r"PASSWORD|SECRET", p.split(".")[-1])]
    assert len(secrets) >= 4
    for path, value in secrets:
        assert re.fullmatch(r"\$\{[A-Z_]+:-[a-z]+\}", str(value)), f"{path}: {value!r} is not an overridable default"
    assert "LOCAL-DEVELOPMENT DEFAULT CREDENTIALS" in COMPOSE.read_text()
    assert "/.env" in (REPO_ROOT / ".gitignore").read_text().split()
