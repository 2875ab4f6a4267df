"""Shared fixtures: tiny but real campaigns written by the real stages (no mocks)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from heimdall.params import load_params
from heimdall.stages import evaluate, export_onnx, export_sessions, extract_features, train

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests that shell out (dvc, the CLI) need the environment's scripts on PATH and a git identity.
os.environ.setdefault("GIT_AUTHOR_NAME", "heimdall-tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@heimdall.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "heimdall-tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@heimdall.invalid")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def default_params_dict() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def tiny_params_dict(n_sessions: int = 160, **overrides) -> dict:
    """The default params with a small campaign; overrides are 'section.key' -> value."""
    d = copy.deepcopy(default_params_dict())
    d["export_sessions"]["n_sessions"] = n_sessions
    d["extract_features"]["batch_sessions"] = 32
    for dotted, value in overrides.items():
        node = d
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    return d


def write_params(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture
def make_params(tmp_path):
    """Factory: write a tiny params.yaml (with overrides) into tmp_path and return its path."""

    def _make(n_sessions: int = 160, name: str = "params.yaml", **overrides) -> Path:
        return write_params(tmp_path / name, tiny_params_dict(n_sessions, **overrides))

    return _make


@pytest.fixture(scope="session")
def tiny_campaign(tmp_path_factory):
    """(params, sessions.h5, features.h5) of a 240-session campaign, built once per test run."""
    d = tmp_path_factory.mktemp("campaign")
    params = load_params(write_params(d / "params.yaml", tiny_params_dict(240)))
    sessions = d / "sessions.h5"
    features = d / "features.h5"
    export_sessions.run(params, sessions, progress=False)
    extract_features.run(params, sessions, features, progress=False)
    return params, sessions, features


@pytest.fixture(autouse=True, scope="session")
def _isolated_mlflow_store(tmp_path_factory):
    """Tests never log to the repository's (or a user's) MLflow store unless a test says so."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


# Real servers (tests/services.py), started once per test run and only if a test asks for them.
@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (skipped if unavailable; fails under CI=true)."""
    import services

    yield from services.serve("PostgreSQL", services.postgres_server())


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 server on 127.0.0.1 (skipped if unavailable; fails under CI=true)."""
    import services

    yield from services.serve("S3 (SeaweedFS)", services.s3_server())


@pytest.fixture(scope="session")
def mlflow_server(postgres_server, s3_server):
    """`mlflow server` on 127.0.0.1 backed by PostgreSQL (database 'mlflow') + S3 artifacts
    (s3://mlflow-artifacts/artifacts); ``.url`` is the MLFLOW_TRACKING_URI for clients."""
    import services

    yield from services.serve("MLflow server", services.mlflow_server(postgres_server, s3_server))


# A one-epoch, narrow LocalizationNet on the tiny campaign: real training, seconds of CPU.
TINY_TRAIN = {
    "train.max_epochs": 1, "train.batch_size": 32, "train.radio_map.spacing_km": 4.0,
    "model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.cnn_width": 4,
}
# the export stage's defaults benchmark for ~1 minute; tests check the plumbing, not the numbers
FAST_EXPORT = {"latency_runs": 5, "warmup_runs": 1, "throughput_runs": 1, "throughput_batch": 8,
               "params_hash": "feedfacecafe"}


def train_and_evaluate(params, features, out, progress: bool = False) -> dict:
    """The train and evaluate stages as `dvc repro` runs them, into ``out``: model.ckpt,
    metrics/{train,test}.json, metrics/compare/, plots/{train,evaluate}/. Returns both summaries."""
    summary = train.run(params, features, out / "model.ckpt", out / "metrics/train.json", out / "plots/train",
                        progress=progress)
    return {**summary, **evaluate.run(params, features, out / "model.ckpt", out / "metrics", out / "plots/evaluate")}


@pytest.fixture(scope="session")
def trained(tiny_campaign, tmp_path_factory):
    """(checkpoint, features) of a one-epoch tiny LocalizationNet; metrics in <ckpt dir>/metrics."""
    tmp = tmp_path_factory.mktemp("export_train")
    _, _, features = tiny_campaign
    params = load_params(write_params(tmp / "params.yaml", tiny_params_dict(240, **TINY_TRAIN)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        train_and_evaluate(params, features, tmp)
    return tmp / "model.ckpt", features


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """(model.onnx, its metrics dict, the stage summary) of the tiny trained model."""
    ckpt, features = trained
    out = tmp_path_factory.mktemp("export_onnx")
    summary = export_onnx.run(ckpt, features, out / "model.onnx", out / "metrics/export.json", **FAST_EXPORT)
    return out / "model.onnx", json.loads((out / "metrics/export.json").read_text()), summary


def copy_pipeline(repo: Path) -> None:
    """What a checkout's pipeline needs besides params.yaml: dvc.yaml, the source and splits/ (the
    held-out lists extract_features depends on)."""
    import shutil

    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO_ROOT / "splits", repo / "splits")
