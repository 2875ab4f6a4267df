"""MLflow server mode: the production layout (docker-compose.yml) with real processes.

`mlflow server` keeps runs and the model registry in PostgreSQL and streams artifacts to S3
(SeaweedFS here, MinIO in production). The pipeline talks to it through MLFLOW_TRACKING_URI only:
this process has no database password and no S3 keys, so every artifact must go through the server.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import FAST_EXPORT, TINY_TRAIN, tiny_params_dict, train_and_evaluate, write_params
from heimdall.contracts import OUTPUT_NAMES
from heimdall.params import load_params
from heimdall.stages import export_onnx, register

pytestmark = pytest.mark.slow

MODEL = "heimdall-localization"


@pytest.fixture
def client_env(mlflow_server, monkeypatch):
    """A client that knows only the server URL (no AWS keys, no S3 endpoint, no database)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL",
                "HEIMDALL_S3_ENDPOINT_URL", "PGPASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return mlflow_server


def test_train_and_register_against_the_server_then_load_the_champion(client_env, tiny_campaign, postgres_server,
                                                                      s3_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    server = client_env
    _, _, features = tiny_campaign
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict(240, **TINY_TRAIN)))
    summary = train_and_evaluate(params, features, tmp_path)
    onnx_path = tmp_path / "model.onnx"
    export_onnx.run(tmp_path / "model.ckpt", features, onnx_path, tmp_path / "metrics/onnx.json", **FAST_EXPORT)
    reg = register.run(params, onnx_path, tmp_path / "metrics/test.json", tmp_path / "registry.json")
    registry = json.loads(register.store_path(tmp_path / "registry.json").read_text())  # what the store decided
    assert registry["tracking_uri"] == server.url
    assert reg["version"] == registry["version"]

    # The training run: in PostgreSQL, with its metrics, and its artifacts in S3 (through the server).
    client = MlflowClient(server.url)
    run = client.get_run(summary["mlflow_run_id"])
    test_json = json.loads((tmp_path / "metrics/test.json").read_text())
    assert run.data.metrics["test.median_error_m"] == pytest.approx(test_json["median_error_m"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not direct S3
    assert {"test.json", "train.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    rows = postgres_server.execute("SELECT status FROM runs WHERE run_uuid = %s", dbname=server.backend_database,
                                   args=(run.info.run_id,))
    assert rows == [("FINISHED",)]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/test.json") for k in keys), keys[:20]
    assert any(k.endswith("model.onnx") for k in keys), "the registered ONNX file is not in S3"

    # The registry: the new version is champion (the first one), tagged with the file's md5.
    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert str(mv.version) == registry["version"]
    assert mv.tags["onnx_md5"] == registry["tags"]["onnx_md5"]
    assert float(mv.tags["test.median_error_m"]) == pytest.approx(test_json["median_error_m"])

    # Loaded back from the registry it is the same graph: identical outputs to the local file.
    from heimdall.data import load_features

    fs = load_features(features)
    names = ("logmel", "rss_dbm", "snr_db", "present", "has_iq", "receiver_id")
    feeds = {n: t.numpy() for n, t in zip(names, fs.model_inputs(fs.indices("test")[:16]))}
    proto = mlflow.onnx.load_model(f"models:/{MODEL}@champion")
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(got) == len(want) == len(OUTPUT_NAMES)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert np.isfinite(want[0]).all()


def test_concurrent_registrations_on_the_server_keep_one_version(client_env, exported, tmp_path):
    """Two `heimdall register` at once against the server (no file lock can serialise them): a fresh registered
    model, one version per registration key in the end, and the aliases and both records name it."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    name = "heimdall-race"
    params = write_params(tmp_path / "params.yaml", tiny_params_dict(**{"register.model_name": name}))
    metrics = tmp_path / "test.json"
    metrics.write_text(json.dumps({"n_test": 10, "median_error_m": 321.0}))
    outs = [tmp_path / f"r{i}" / "registry.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "heimdall", "register", "--params", str(params), "--model",
                               str(exported[0]), "--test-metrics", str(metrics), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for out in outs]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    records = [json.loads(o.read_text()) for o in outs]
    stores = [json.loads(register.store_path(o).read_text()) for o in outs]
    client = MlflowClient(client_env.url)
    versions = client.search_model_versions(records[0]["find_version"])
    assert records[0] == records[1] and len(versions) == 1, [v.version for v in versions]
    version = str(versions[0].version)
    assert {s["version"] for s in stores} == {version}
    for alias in ("candidate", "champion"):
        assert str(client.get_model_version_by_alias(name, alias).version) == version
