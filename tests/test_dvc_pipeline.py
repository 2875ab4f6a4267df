"""dvc repro in a temporary git repo: exactly the stages a change affects rerun."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, tiny_params_dict, copy_pipeline

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(args, cwd) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture
def pipeline_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_pipeline(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(48), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.autostage", "false"], repo)
    return repo


def _set_param(repo: Path, dotted: str, value) -> None:
    d = yaml.safe_load((repo / "params.yaml").read_text())
    node = d
    *parents, leaf = dotted.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def test_only_changed_stages_rerun(pipeline_repo):
    """The data half of the pipeline (`dvc repro extract_features` runs it and its upstream)."""
    repo = pipeline_repo
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"export_sessions", "extract_features"}
    assert (repo / "data/sessions.h5").exists() and (repo / "data/features.h5").exists()

    # nothing changed: nothing runs
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == set()

    # an extract_features param: only extract_features
    _set_param(repo, "extract_features.n_mels", 32)
    status = _run(["dvc", "status", "extract_features"], repo)
    assert "extract_features" in status and "export_sessions" not in status
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"extract_features"}

    # a scenario param: both stages
    _set_param(repo, "scenario.shadowing_sigma_db", 5.0)
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"export_sessions", "extract_features"}

    # an export_sessions param: both stages
    _set_param(repo, "export_sessions.n_sessions", 40)
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"export_sessions", "extract_features"}

    # a source file of extract_features only: only extract_features
    with open(repo / "src/heimdall/splits.py", "a") as fh:
        fh.write("\n# touched\n")
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"extract_features"}
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == set()


def test_failed_stage_leaves_no_output(pipeline_repo):
    repo = pipeline_repo
    _set_param(repo, "extract_features.n_fft", 100000)  # invalid: longer than the IQ (and schema max)
    proc = subprocess.run(["dvc", "repro", "extract_features"], cwd=repo, env=_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "extract_features.n_fft" in proc.stderr + proc.stdout
    assert not (repo / "data/features.h5").exists()
    assert not list((repo / "data").glob(".*tmp*"))


SENTINEL = "Sentinel-Pa55-7f3a9c"


def test_whole_pipeline_reruns_exactly_what_a_change_affects(pipeline_repo, monkeypatch, tmp_path):
    """All six stages; a no-op repro; a train param reruns exactly train, evaluate, export_onnx, register.

    Credentials in the environment (database URL, S3 keys, MLflow password) never reach an output,
    dvc.lock, a log line or the MLflow store."""
    from conftest import TINY_TRAIN

    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("HEIMDALL_DB_URL", f"postgresql://heimdall:{SENTINEL}@127.0.0.1:1/heimdall")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SENTINEL)
    logs = []

    repo = pipeline_repo
    d = tiny_params_dict(120, **{**TINY_TRAIN, "export_onnx.latency_runs": 10})
    (repo / "params.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    stages = {"export_sessions", "extract_features", "train", "evaluate", "export_onnx", "register"}
    logs.append(_run(["dvc", "repro"], repo))
    assert _ran(logs[-1]) == stages
    assert _ran(_run(["dvc", "repro"], repo)) == set()
    registry = yaml.safe_load((repo / "models/registry.store.json").read_text())  # what the store decided
    assert registry["version"] == "1" and "champion" in registry["aliases"]
    assert registry["registration_key"] == yaml.safe_load((repo / "models/registry.json").read_text())["registration_key"]

    _set_param(repo, "train.lr", 0.001)
    logs.append(_run(["dvc", "repro"], repo))
    assert _ran(logs[-1]) == {"train", "evaluate", "export_onnx", "register"}
    registry = yaml.safe_load((repo / "models/registry.store.json").read_text())
    assert registry["version"] == "2" and "candidate" in registry["aliases"]
    assert registry["registration_key"] == yaml.safe_load((repo / "models/registry.json").read_text())["registration_key"]
    assert _ran(_run(["dvc", "repro"], repo)) == set()

    # a source file of evaluate only: evaluate reruns (same test.json), nothing retrains or re-registers
    with open(repo / "src/heimdall/baselines.py", "a") as fh:
        fh.write("\n# touched\n")
    logs.append(_run(["dvc", "repro"], repo))
    assert _ran(logs[-1]) == {"evaluate"}
    assert _ran(_run(["dvc", "repro"], repo)) == set()

    secret = SENTINEL.encode()
    assert not any(SENTINEL in log for log in logs)
    scanned = [p for p in [*repo.rglob("*"), *store.parent.rglob("*")] if p.is_file() and ".git" not in p.parts]
    assert store in scanned and repo / "dvc.lock" in scanned and repo / "models/model.onnx" in scanned
    leaks = [str(p) for p in scanned if secret in p.read_bytes()]
    assert not leaks, f"sentinel password found in {leaks}"
