"""Stages train + evaluate end to end on a tiny campaign: outputs, metrics contract, MLflow, determinism,
bad input."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_params_dict, train_and_evaluate, write_params

from heimdall import calibration, checkpoint
from heimdall.cli import main
from heimdall.contracts import SPLIT_CODES
from heimdall.data import load_features
from heimdall.evaluation import gaussian_metrics
from heimdall.params import load_params
from heimdall.runner import estimate
from heimdall.stages import evaluate

TINY_TRAIN = {
    "train.max_epochs": 2, "train.batch_size": 32, "train.radio_map.spacing_km": 4.0,
    "model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.cnn_width": 4,
}


def _params(tmp_path, **extra):
    return load_params(write_params(tmp_path / "params.yaml", tiny_params_dict(240, **{**TINY_TRAIN, **extra})))


def _run(tmp_path, features, **extra):
    params = _params(tmp_path, **extra)
    out = tmp_path / "models"
    return train_and_evaluate(params, features, out), out


@pytest.fixture(scope="module")
def trained(tiny_campaign, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    _, _, features = tiny_campaign
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        summary, out = _run(tmp, features)
    return summary, out, tmp, features


def test_outputs_and_metrics_contract(trained):
    summary, out, _, features = trained
    assert (out / "model.ckpt").exists()
    test = json.loads((out / "metrics/test.json").read_text())
    assert test["n_test"] == 36
    # the metrics are what their definitions say, recomputed here from the per-session estimates
    model, _ = checkpoint.load_checkpoint(out / "model.ckpt")
    fs = load_features(features)
    te = fs.indices("test")
    err = np.linalg.norm(estimate(model, fs.input_batches(te))[0] - fs.target_enu_m[te], axis=1)
    assert test["median_error_m"] == pytest.approx(np.median(err), rel=1e-9)
    assert test["mean_error_m"] == pytest.approx(err.mean(), rel=1e-9)
    assert test["p90_error_m"] == pytest.approx(np.percentile(err, 90), rel=1e-9)
    assert test["frac_within_5km"] == pytest.approx(np.mean(err < 5e3))
    assert 0 < test["crlb_rmse_m"] < test["baselines"]["oracle"]["median_error_m"] * 10
    for name in ("knn", "ml_logdistance", "kriged_map", "oracle"):
        b = test["baselines"][name]
        assert 0 < b["median_error_m"] <= b["p90_error_m"] and "wall_s" not in b, name
    assert 0 <= test["coverage_1sigma"] <= test["coverage_2sigma"] <= 1
    # the comparison table `dvc metrics show` prints: one file per method, same numbers as test.json
    compare = {p.stem: json.loads(p.read_text()) for p in (out / "metrics/compare").glob("*.json")}
    assert set(compare) == {"model", "network_only", "knn", "ml_logdistance", "kriged_map", "oracle"}
    assert compare["model"]["median_error_m"] == round(test["median_error_m"], 1)
    assert compare["knn"]["mean_error_m"] == round(test["baselines"]["knn"]["mean_error_m"], 1)
    assert compare["model"]["coverage_2sigma"] == round(test["coverage_2sigma"], 4)
    assert "coverage_2sigma" not in compare["knn"]
    tr = json.loads((out / "metrics/train.json").read_text())
    assert tr["epochs"] == 2 and np.isfinite(tr["final_val_loss"])
    # wall-clock timings are never in DVC-tracked outputs (identical md5s on a rerun), but beside them
    assert not any("wall" in k or k.endswith("_s") for k in _keys(tr) | _keys(test))
    assert json.loads((out / "metrics/train.timings.json").read_text())["wall_time_s"] > 0
    assert json.loads((out / "metrics/test.timings.json").read_text())["baselines_s"] > 0
    for name in ("learning_curve.csv", "learning_curves.png"):
        assert (out / "plots/train" / name).stat().st_size > 0, name
    for name in ("error_cdf.csv", "calibration.csv", "map.png", "error_cdf.png", "calibration.png"):
        assert (out / "plots/evaluate" / name).stat().st_size > 0, name


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_model_beats_centroid_guess(trained, tiny_campaign):
    # plumbing check on a tiny campaign: better than always answering the training centroid
    _, out, _, features = trained
    test = json.loads((out / "metrics/test.json").read_text())
    with h5py.File(features) as f:
        pos, split = f["sessions/target_enu_m"][()], f["sessions/split"][()]
    centroid = pos[split == SPLIT_CODES["train"]].mean(0)
    centroid_median = np.median(np.linalg.norm(pos[split == SPLIT_CODES["test"]] - centroid, axis=1))
    assert test["median_error_m"] < centroid_median


def test_reloaded_checkpoint_reproduces_the_test_metrics(trained, tmp_path):
    """The checkpoint alone (no pickled code) carries everything the estimates depend on: evaluating it
    again, in a fresh output directory, reproduces test.json byte for byte. Fails if a calibration
    constant, the map or a normalisation statistic were not saved, or if evaluation were not deterministic."""
    _, out, tmp, features = trained
    payload = torch.load(out / "model.ckpt", weights_only=True)  # no arbitrary code
    assert payload["format"] == checkpoint.CKPT_FORMAT
    params = _params(tmp)
    again = tmp_path / "again"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        evaluate.run(params, features, out / "model.ckpt", again / "metrics", again / "plots")
    assert (again / "metrics/test.json").read_bytes() == (out / "metrics/test.json").read_bytes()
    for name in ("error_cdf.csv", "calibration.csv", "map.png"):
        assert (again / "plots" / name).read_bytes() == (out / "plots/evaluate" / name).read_bytes(), name


def test_calibration_constants_survive_the_checkpoint(trained):
    _, out, _, _ = trained
    model, _ = checkpoint.load_checkpoint(out / "model.ckpt")
    cal = json.loads((out / "metrics/train.json").read_text())["calibration"]
    assert float(model.likelihood_temperature) == pytest.approx(cal["likelihood_temperature"])
    assert float(model.prior_scale) == pytest.approx(cal["prior_scale"])
    assert float(model.cov_scale_local) == pytest.approx(cal["cov_scale_local"])
    assert float(model.cov_scale_remote) == pytest.approx(cal["cov_scale_remote"])


def test_mlflow_run_has_params_metrics_tags_and_artifacts(trained):
    import mlflow

    summary, _, tmp, _ = trained
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.lr"] == "0.002"
    # train and evaluate log to one run: the evaluate stage finds it by the checkpoint's md5
    assert summary["mlflow_run_id"] == run.info.run_id
    assert "test.median_error_m" in run.data.metrics and "val_loss" in run.data.metrics
    assert "fit_s" in run.data.metrics and "baselines_s" in run.data.metrics  # timings live here
    assert "git_commit" in run.data.tags and "features_md5" in run.data.tags and "checkpoint_md5" in run.data.tags
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test.json", "train.json", "map.png", "learning_curves.png"} <= names


def _coverage(mean, cov, target):
    m = gaussian_metrics(mean, cov, target)
    return m["coverage_1sigma"], m["coverage_2sigma"]


def test_calibration_uses_a_bounded_seeded_subset_of_a_large_validation_split(tiny_campaign, monkeypatch):
    _, _, features = tiny_campaign
    fs = load_features(features)
    va = fs.indices("val")
    np.testing.assert_array_equal(calibration.calibration_sessions(fs), va)  # 36 <= CALIBRATION_MAX_SESSIONS: all of them
    monkeypatch.setattr(calibration, "CALIBRATION_MAX_SESSIONS", 10)
    subset = calibration.calibration_sessions(fs)
    assert len(subset) == 10 and np.all(np.diff(subset) > 0) and np.isin(subset, va).all()
    np.testing.assert_array_equal(calibration.calibration_sessions(fs), subset)  # seeded: the same every run


def test_covariance_weights_calibrate_a_gaussian_at_both_levels():
    rng = np.random.default_rng(0)
    n = 4000
    local = np.broadcast_to(np.diag([4.0, 1.0]), (n, 2, 2)).copy()
    remote = np.broadcast_to(np.eye(2) * 1e-4, (n, 2, 2)).copy()  # no far-away alternatives
    target = rng.multivariate_normal([0, 0], np.diag([4.0, 1.0]), size=n)  # errors really are N(0, local)
    a, b = calibration.choose_covariance_weights(np.zeros((n, 2)), local, remote, target)
    c1, c2 = _coverage(np.zeros((n, 2)), a * local + b * remote, target)
    assert abs(c1 - calibration.COVERAGE_1SIGMA) < 0.03 and abs(c2 - calibration.COVERAGE_2SIGMA) < 0.02
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
    a, b = calibration.choose_covariance_weights(np.zeros((n, 2)), local, remote, target)
    c1, c2 = _coverage(np.zeros((n, 2)), a * local + b * remote, target)
    assert abs(c2 - calibration.COVERAGE_2SIGMA) <= 0.015
    assert c1 > calibration.COVERAGE_1SIGMA  # the price, in 1σ, of heavy tails


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
    # byte-identical outputs: what DVC records in dvc.lock
    for name in ("model.ckpt", "metrics/train.json", "metrics/test.json", "plots/evaluate/map.png",
                 "plots/train/learning_curve.csv"):
        assert (tmp_path / "a/models" / name).read_bytes() == (tmp_path / "b/models" / name).read_bytes(), name


@pytest.mark.parametrize("include_logmel", [True, False])
def test_streamed_batches_equal_the_in_memory_tensor_dataset(tiny_campaign, include_logmel):
    """Issue 21: the DataModule reads each batch's log-mel from features.h5 in one call (SessionBatches); its
    batches are those of the in-memory TensorDataset it replaced, bit for bit and in the same order (same
    sampler, generator and seed), over two epochs of one loader as Lightning iterates it: the same model.ckpt."""
    from torch.utils.data import DataLoader, TensorDataset

    from heimdall.training import LocalizationDataModule

    _, _, features = tiny_campaign
    fs = load_features(features)
    with h5py.File(features, "r") as f:
        logmel = f["features/logmel_db"][()]

    def eager(idx):  # what training.py built before: every tensor of the split in memory
        n = len(idx)
        return TensorDataset(
            torch.from_numpy(logmel[idx]) if include_logmel else torch.zeros(n, 1, 1, 1),
            torch.from_numpy(fs.rss_dbm[idx]), torch.from_numpy(fs.snr_db[idx]),
            torch.from_numpy(fs.present[idx].astype(np.float32)), torch.from_numpy(fs.has_iq[idx].astype(np.float32)),
            torch.from_numpy(np.tile(np.arange(fs.n_receivers, dtype=np.int64), (n, 1))),
            torch.from_numpy(fs.target_enu_m[idx].astype(np.float32)))

    dm = LocalizationDataModule(fs, 32, include_logmel, seed=11)
    old_train = DataLoader(eager(fs.indices("train")), batch_size=32, shuffle=True,
                           generator=torch.Generator().manual_seed(11), drop_last=False)
    old_val = DataLoader(eager(fs.indices("val")), batch_size=256, shuffle=False)
    for new_loader, old_loader, epochs in ((dm.train_dataloader(), old_train, 2), (dm.val_dataloader(), old_val, 1)):
        for _ in range(epochs):
            new, old = list(new_loader), list(old_loader)
            assert len(new) == len(old) == -(-len(old_loader.dataset) // old_loader.batch_size)
            for a, b in zip(new, old):
                assert len(a) == len(b) == 7
                for x, y in zip(a, b):
                    assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def _cli_train(tmp_path, features, capsys, **extra):
    params = write_params(tmp_path / "p.yaml", tiny_params_dict(240, **{**TINY_TRAIN, **extra}))
    ckpt = tmp_path / "out/model.ckpt"
    code = main(["train", "--params", str(params), "--features", str(features), "--out", str(ckpt),
                 "--metrics", str(tmp_path / "out/metrics/train.json"), "--plots-dir", str(tmp_path / "out/plots"),
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


def test_batch_larger_than_train_split_is_clamped_and_max_samples_bounds_the_epochs(tiny_campaign, tmp_path,
                                                                                     monkeypatch):
    _, _, features = tiny_campaign
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    # 168 training sessions: max_samples 200 allows 2 of the 3 epochs
    summary, out = _run(tmp_path, features, **{"train.batch_size": 10_000, "train.max_epochs": 3,
                                               "train.max_samples": 200})
    assert (out / "model.ckpt").exists() and summary["epochs"] == 2


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
         "--metrics", str(out / "metrics/train.json"), "--plots-dir", str(out / "plots"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line.split(": ", 1)[1]) for line in proc.stderr.splitlines()
                 if line.startswith("heimdall train: ")]
    assert sorted(s.get("global_rank", 0) for s in summaries) == [0, 1]
    assert np.isfinite(json.loads((out / "metrics/train.json").read_text())["best_val_loss"])
    assert (out / "model.ckpt").stat().st_size > 0
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1


def test_a_receiver_the_training_sessions_never_heard_is_ignored(tiny_campaign, tmp_path, monkeypatch):
    """A receiver with no training readings (added after the training campaign, or heard in another
    season only) gets no map and no say: train succeeds (it crashed with a NaN map before), the
    checkpoint marks it unmapped, and the model's answers do not depend on what it reports."""
    import torch

    from heimdall.checkpoint import load_checkpoint
    from heimdall.data import load_features
    from heimdall.radiomap import UNMAPPED_SIGMA_DB

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    _, _, features = tiny_campaign
    edited = tmp_path / "features.h5"
    shutil.copy(features, edited)
    with h5py.File(edited, "a") as f:
        present = f["features/present"][()]
        split = f["sessions/split"][()]
        present[split == SPLIT_CODES["train"], 2] = False
        f["features/present"][...] = present
    _run(tmp_path, edited)
    model, _ = load_checkpoint(tmp_path / "models/model.ckpt")
    assert float(model.map_sigma_db[2]) == UNMAPPED_SIGMA_DB and (model.map_sigma_db.numpy()[[0, 1, 3]] < 100).all()
    fs = load_features(edited)
    te = fs.indices("test")
    inputs = list(fs.model_inputs(te))
    assert inputs[3][:, 2].sum() > 0  # the receiver reports in test
    with torch.no_grad():
        before = model.locate(*inputs)
        inputs[1] = inputs[1].clone()
        inputs[1][:, 2] += 25.0  # its gain moved by 25 dB
        after = model.locate(*inputs)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_train_refuses_non_finite_weights(tiny_campaign, tmp_path):
    """Issue 20: a run whose weights went NaN exits non-zero with one line and writes no checkpoint."""
    from lightning.pytorch.callbacks import Callback

    from heimdall.errors import HeimdallError
    from heimdall.stages import train

    class Poison(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

    _, _, features = tiny_campaign
    ckpt, metrics = tmp_path / "model.ckpt", tmp_path / "train.json"
    with pytest.raises(HeimdallError, match="non-finite weights") as info:
        train.run(_params(tmp_path), features, ckpt, metrics, tmp_path / "plots", progress=False,
                  callbacks=(Poison(),))
    assert "\n" not in str(info.value) and not ckpt.exists() and not metrics.exists()


def test_train_refuses_a_non_finite_metric_anywhere_in_the_tree(tiny_campaign, tmp_path, monkeypatch):
    """A NaN inside a list or a numpy scalar of the calibration metrics (where the first guard did not
    look) is refused by its dotted key: no checkpoint, no train.json."""
    from heimdall.errors import HeimdallError
    from heimdall.stages import train

    real = train.calibrate_regions

    def nan_inside(model, features):
        out = real(model, features)
        return {**out, "val_region_coverage_per_level": [0.5, float("nan")], "extra": np.float32("inf")}

    monkeypatch.setattr(train, "calibrate_regions", nan_inside)
    _, _, features = tiny_campaign
    ckpt, metrics = tmp_path / "model.ckpt", tmp_path / "train.json"
    with pytest.raises(HeimdallError, match=r"non-finite metrics \(calibration.val_region_coverage_per_level\[1\], "
                                            r"calibration.extra\)"):
        train.run(_params(tmp_path), features, ckpt, metrics, tmp_path / "plots", progress=False)
    assert not ckpt.exists() and not metrics.exists()


@pytest.mark.parametrize("verb", ["evaluate", "export-onnx"])
def test_evaluate_and_export_refuse_a_checkpoint_with_non_finite_values(trained, tmp_path, capsys, verb):
    """Issue 20: a checkpoint holding NaN (tampered, or written by an older heimdall) is refused by name
    before evaluate reports on it or export ships it: one line, exit 1, no output."""
    _, out, _, features = trained
    payload = torch.load(out / "model.ckpt", map_location="cpu", weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    payload["state_dict"][key] = payload["state_dict"][key].clone().fill_(float("nan"))
    bad = tmp_path / "nan.ckpt"
    torch.save(payload, bad)
    params = write_params(tmp_path / "p.yaml", tiny_params_dict(240, **TINY_TRAIN))
    dest = tmp_path / "out"
    extra = (["--metrics-dir", str(dest / "metrics"), "--plots-dir", str(dest / "plots")] if verb == "evaluate"
             else ["--out", str(dest / "model.onnx"), "--metrics", str(dest / "onnx.json")])
    code = main([verb, "--params", str(params), "--features", str(features), "--checkpoint", str(bad), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "non-finite" in err and key in err
    assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))
