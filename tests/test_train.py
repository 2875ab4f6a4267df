"""Stage train end to end on a tiny campaign: outputs, metrics contract, MLflow, determinism, bad input."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import tiny_params_dict, write_params
from heimdall.cli import main
from heimdall.contracts import SPLIT_CODES
from heimdall.evaluation import gaussian_metrics
from heimdall.params import load_params
from heimdall.stages import train

TINY_TRAIN = {
    "train.max_epochs": 2, "train.batch_size": 32, "train.radio_map.spacing_km": 4.0,
    "model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.cnn_width": 4,
}


def _params(tmp_path, **extra):
    return load_params(write_params(tmp_path / "params.yaml", tiny_params_dict(240, **{**TINY_TRAIN, **extra})))


def _run(tmp_path, features, **extra):
    params = _params(tmp_path, **extra)
    out = tmp_path / "models"
    summary = train.run(params, features, out / "model.ckpt", out / "metrics", out / "plots", progress=False)
    return summary, out


@pytest.fixture(scope="module")
def trained(tiny_campaign, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    _, _, features = tiny_campaign
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        summary, out = _run(tmp, features)
    return summary, out, tmp, features


def test_outputs_and_metrics_contract(trained):
    summary, out, _, _ = trained
    assert (out / "model.ckpt").exists()
    test = json.loads((out / "metrics/test.json").read_text())
    for key in ("n_test", "mean_error_m", "median_error_m", "p90_error_m", "nll", "coverage_1sigma",
                "coverage_2sigma", "crlb_rmse_m"):
        assert np.isfinite(test[key]), key
    assert test["n_test"] == 36
    for name in ("knn", "ml_logdistance", "kriged_map", "oracle"):
        assert test["baselines"][name]["mean_error_m"] > 0 and np.isfinite(test["baselines"][name]["median_error_m"])
    assert 0 <= test["coverage_1sigma"] <= test["coverage_2sigma"] <= 1
    tr = json.loads((out / "metrics/train.json").read_text())
    assert tr["epochs"] == 2 and tr["wall_time_s"] > 0 and np.isfinite(tr["final_val_loss"])
    for name in ("learning_curve.csv", "error_cdf.csv", "calibration.csv", "map.png", "error_cdf.png",
                 "calibration.png", "learning_curves.png"):
        assert (out / "plots" / name).stat().st_size > 0, name


def test_model_beats_centroid_guess(trained, tiny_campaign):
    # plumbing check on a tiny campaign: better than always answering the training centroid
    _, out, _, features = trained
    test = json.loads((out / "metrics/test.json").read_text())
    with h5py.File(features) as f:
        pos, split = f["sessions/target_enu_m"][()], f["sessions/split"][()]
    centroid = pos[split == SPLIT_CODES["train"]].mean(0)
    centroid_median = np.median(np.linalg.norm(pos[split == SPLIT_CODES["test"]] - centroid, axis=1))
    assert test["median_error_m"] < centroid_median


def test_checkpoint_loads_without_pickle_and_predicts_same(trained):
    _, out, _, features = trained
    payload = torch.load(out / "model.ckpt", weights_only=True)  # no arbitrary code
    assert payload["format"] == train.CKPT_FORMAT
    model, _ = train.load_checkpoint(out / "model.ckpt")
    from heimdall.data import load_features
    fs = load_features(features)
    idx = fs.indices("test")[:8]
    a = train.predict(model, fs, idx)
    b = train.predict(model, fs, idx)
    assert np.allclose(a[0], b[0]) and np.isfinite(a[1]).all()


def test_mlflow_run_has_params_metrics_tags_and_artifacts(trained):
    import mlflow

    summary, _, tmp, _ = trained
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.lr"] == "0.002"
    assert "test.median_error_m" in run.data.metrics and "val_loss" in run.data.metrics
    assert "git_commit" in run.data.tags and "features_md5" in run.data.tags
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test.json", "train.json", "map.png"} <= names


def _coverage(mean, cov, target):
    m = gaussian_metrics(mean, cov, target)
    return m["coverage_1sigma"], m["coverage_2sigma"]


def test_covariance_weights_calibrate_a_gaussian_at_both_levels():
    rng = np.random.default_rng(0)
    n = 4000
    local = np.broadcast_to(np.diag([4.0, 1.0]), (n, 2, 2)).copy()
    remote = np.broadcast_to(np.eye(2) * 1e-4, (n, 2, 2)).copy()  # no far-away alternatives
    target = rng.multivariate_normal([0, 0], np.diag([4.0, 1.0]), size=n)  # errors really are N(0, local)
    a, b = train.choose_covariance_weights(np.zeros((n, 2)), local, remote, target)
    c1, c2 = _coverage(np.zeros((n, 2)), a * local + b * remote, target)
    assert abs(c1 - train.COVERAGE_1SIGMA) < 0.03 and abs(c2 - train.COVERAGE_2SIGMA) < 0.02
    assert 0.75 < a < 1.35  # the posterior spread itself, unscaled


def test_covariance_weights_put_2sigma_first_on_heavy_tailed_errors():
    # 75 % of sessions on the right mode (error ~ local), 25 % on a wrong one (error ~ 8x farther,
    # remote part proportional): no Gaussian matches both levels; 2σ must still be met.
    rng = np.random.default_rng(1)
    n = 4000
    wrong = rng.random(n) < 0.25
    local = np.broadcast_to(np.eye(2), (n, 2, 2)).copy()
    remote = np.eye(2) * rng.uniform(0.5, 20.0, size=n)[:, None, None]
    target = rng.normal(size=(n, 2)) * np.where(wrong, 8.0, 1.0)[:, None]
    a, b = train.choose_covariance_weights(np.zeros((n, 2)), local, remote, target)
    c1, c2 = _coverage(np.zeros((n, 2)), a * local + b * remote, target)
    assert abs(c2 - train.COVERAGE_2SIGMA) <= 0.015
    assert c1 > train.COVERAGE_1SIGMA  # the price, in 1σ, of heavy tails


def test_two_trainings_give_identical_weights(tiny_campaign, tmp_path, monkeypatch):
    _, _, features = tiny_campaign
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    extra = {"train.max_epochs": 1}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _run(tmp_path / name, features, **extra)
    a = torch.load(tmp_path / "a/models/model.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b/models/model.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli_train(tmp_path, features, capsys, **extra):
    params = write_params(tmp_path / "p.yaml", tiny_params_dict(240, **{**TINY_TRAIN, **extra}))
    ckpt = tmp_path / "out/model.ckpt"
    code = main(["train", "--params", str(params), "--features", str(features), "--out", str(ckpt),
                 "--metrics-dir", str(tmp_path / "out/metrics"), "--plots-dir", str(tmp_path / "out/plots"),
                 "--no-progress"])
    return code, capsys.readouterr().err, ckpt


def test_features_missing_a_dataset(tiny_campaign, tmp_path, capsys):
    _, _, features = tiny_campaign
    bad = tmp_path / "features.h5"
    shutil.copy(features, bad)
    with h5py.File(bad, "a") as f:
        del f["features/rss_dbm"]
    code, err, ckpt = _cli_train(tmp_path, bad, capsys)
    assert code == 1 and "features/rss_dbm" in err and not ckpt.exists()


def test_non_finite_features_rejected(tiny_campaign, tmp_path, capsys):
    _, _, features = tiny_campaign
    bad = tmp_path / "features.h5"
    shutil.copy(features, bad)
    with h5py.File(bad, "a") as f:
        rss = f["features/rss_dbm"][()]
        rss[3, 2] = np.nan
        f["features/rss_dbm"][...] = rss
    code, err, ckpt = _cli_train(tmp_path, bad, capsys)
    assert code == 1 and "non-finite" in err and "rss_dbm" in err and not ckpt.exists()


def test_empty_train_split_rejected(tiny_campaign, tmp_path, capsys):
    _, _, features = tiny_campaign
    bad = tmp_path / "features.h5"
    shutil.copy(features, bad)
    with h5py.File(bad, "a") as f:
        split = f["sessions/split"][()]
        split[split == SPLIT_CODES["train"]] = SPLIT_CODES["val"]
        f["sessions/split"][...] = split
    code, err, ckpt = _cli_train(tmp_path, bad, capsys)
    assert code == 1 and "train split is empty" in err and not ckpt.exists()


@pytest.mark.parametrize("lr", [0, -1e-3])
def test_non_positive_lr_rejected(tiny_campaign, tmp_path, capsys, lr):
    _, _, features = tiny_campaign
    code, err, ckpt = _cli_train(tmp_path, features, capsys, **{"train.lr": lr})
    assert code == 1 and "train.lr" in err and len(err.strip().splitlines()) == 1 and not ckpt.exists()


def test_batch_larger_than_train_split_is_clamped(tiny_campaign, tmp_path, monkeypatch):
    _, _, features = tiny_campaign
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    summary, out = _run(tmp_path, features, **{"train.batch_size": 10_000, "train.max_epochs": 1})
    assert (out / "model.ckpt").exists() and summary["epochs"] == 1


def test_ddp_strategy_trains_on_two_processes_and_writes_once(tiny_campaign, tmp_path):
    """train.strategy: ddp with 2 CPU devices (gloo): Lightning launches a second process; the run
    completes, rank 0 alone writes the outputs and logs one MLflow run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    _, _, features = tiny_campaign
    params = write_params(tmp_path / "p.yaml", tiny_params_dict(240, **{
        **TINY_TRAIN, "train.max_epochs": 1, "train.accelerator": "cpu", "train.devices": 2, "train.strategy": "ddp"}))
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    exe = Path(sys.executable).parent / "heimdall"
    proc = subprocess.run(
        [str(exe), "train", "--params", str(params), "--features", str(features), "--out", str(out / "model.ckpt"),
         "--metrics-dir", str(out / "metrics"), "--plots-dir", str(out / "plots"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line.split(": ", 1)[1]) for line in proc.stderr.splitlines()
                 if line.startswith("heimdall train: ")]
    assert sorted(s.get("global_rank", 0) for s in summaries) == [0, 1]
    test = json.loads((out / "metrics/test.json").read_text())
    assert np.isfinite(test["median_error_m"])
    assert (out / "model.ckpt").stat().st_size > 0
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
