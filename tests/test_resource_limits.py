"""Resources bounded by what params and data demand: every stage estimates its memory before allocating and
refuses with one line naming the param or the data (and the estimate) over HEIMDALL_MEMORY_BUDGET_GB; a target
no receiver could hear (a GPS fix without a position at 0, 0) is excluded and counted, never sizing the map."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import TINY_TRAIN, tiny_params_dict, write_params
from heimdall.data import load_features
from heimdall.errors import HeimdallError
from heimdall.params import load_params
from heimdall.stages import extract_features, train


def _cli(tmp_path, *args, budget_gb=None):
    env = {k: v for k, v in os.environ.items() if k != "HEIMDALL_MEMORY_BUDGET_GB"}
    if budget_gb is not None:
        env["HEIMDALL_MEMORY_BUDGET_GB"] = str(budget_gb)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "heimdall", *map(str, args), "--no-progress"], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("key, value, budget, named", [
    ("export_sessions.n_sessions", 10_000_000, 4, "export_sessions.n_sessions=10000000"),
    ("export_sessions.duration_s", 1e6, None, "export_sessions.duration_s=1e+06"),  # the default budget
])
def test_export_sessions_refuses_params_beyond_the_memory_budget(tmp_path, key, value, budget, named):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict(160, **{key: value}))
    out = tmp_path / "sessions.h5"
    r, took = _cli(tmp_path, "export-sessions", "--params", params, "--out", out, budget_gb=budget)
    assert r.returncode == 1, r.stderr[-2000:]
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("heimdall export-sessions: error: "), r.stderr[-2000:]
    assert named in line and "GiB of memory" in line and "HEIMDALL_MEMORY_BUDGET_GB" in line
    assert not out.exists() and took < 60  # refused before allocating, not after minutes of work


def test_memory_budget_env_is_validated_and_respected(tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict(160))
    out = tmp_path / "sessions.h5"
    r, _ = _cli(tmp_path, "export-sessions", "--params", params, "--out", out, budget_gb="lots")
    assert r.returncode == 1 and "HEIMDALL_MEMORY_BUDGET_GB='lots'" in r.stderr and not out.exists()
    r, _ = _cli(tmp_path, "export-sessions", "--params", params, "--out", out, budget_gb=0.01)  # 10 MiB
    assert r.returncode == 1 and "export_sessions.duration_s" in r.stderr and not out.exists()
    r, _ = _cli(tmp_path, "export-sessions", "--params", params, "--out", out)  # the default budget: fine
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
    r, _ = _cli(tmp_path, "extract-features", "--params", params, "--sessions", out, "--out", tmp_path / "f.h5",
                budget_gb=0.001)
    assert r.returncode == 1 and "extract_features.batch_sessions=32" in r.stderr and "of memory" in r.stderr
    assert not (tmp_path / "f.h5").exists()


@pytest.fixture(scope="module")
def gps_zero(tiny_campaign, tmp_path_factory):
    """The tiny campaign's sessions.h5 with one training transmitter at (0, 0): a GPS fix without a position."""
    _, sessions, features = tiny_campaign
    row = int(load_features(features).indices("train")[0])  # same order as sessions.h5
    d = tmp_path_factory.mktemp("gps_zero")
    path = d / "sessions.h5"
    shutil.copy(sessions, path)
    with h5py.File(path, "r+") as f:
        for k in ("tx_latitude_deg", "tx_longitude_deg"):
            v = f[f"sessions/{k}"][()]
            v[row] = 0.0
            f[f"sessions/{k}"][...] = v
        bad_id = f["sessions/session_id"][row]
    return path, bad_id.decode() if isinstance(bad_id, bytes) else str(bad_id)


def test_target_without_a_position_is_excluded_and_counted(tiny_campaign, gps_zero, tmp_path):
    params, _, reference = tiny_campaign
    path, bad_id = gps_zero
    out = tmp_path / "features.h5"
    summary = extract_features.run(params, path, out, progress=False)
    assert summary["sessions_outside_area"] == 1 and summary["sessions"] == 239
    fs, ref = load_features(out), load_features(reference)
    ids = [s.decode() if isinstance(s, bytes) else str(s) for s in fs.session_id]
    assert bad_id not in ids and len(ids) == 239
    # the normalisation only saw plausible targets: the train split's spread is the area's, not the globe's
    assert np.all(np.abs(fs.target_enu_m) < 500e3)
    assert np.all(fs.normalization["target_std_m"] < 2 * ref.normalization["target_std_m"])
    # the rule is a param: a bound that keeps it keeps it
    loose = load_params(write_params(tmp_path / "loose.yaml",
                                     tiny_params_dict(240, **{"extract_features.max_target_distance_km": 20000})))
    assert extract_features.run(loose, path, tmp_path / "loose.h5", progress=False)["sessions_outside_area"] == 0


@pytest.mark.parametrize("overrides, named", [
    # (0, 0) kept: a map from Italy to the Gulf of Guinea (4.6 M cells at the default 1 km, ~39 GiB)
    ({"extract_features.max_target_distance_km": 20000, "train.radio_map.spacing_km": 1.0}, "margin_km=10"),
    ({"train.radio_map.spacing_km": 0.06, "train.radio_map.margin_km": 200}, "spacing_km=0.06"),
])
def test_radio_map_grid_beyond_the_budget_is_refused_before_allocating(gps_zero, tiny_campaign, tmp_path, overrides,
                                                                       named, monkeypatch):
    monkeypatch.setenv("HEIMDALL_MEMORY_BUDGET_GB", "8")  # the same verdict on any machine
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict(240, **{**TINY_TRAIN, **overrides})))
    sessions = gps_zero[0] if "extract_features.max_target_distance_km" in overrides else tiny_campaign[1]
    extract_features.run(params, sessions, tmp_path / "features.h5", progress=False)
    t0 = time.monotonic()
    with pytest.raises(HeimdallError) as e:
        train.run(params, tmp_path / "features.h5", tmp_path / "model.ckpt", tmp_path / "train.json",
                  tmp_path / "plots", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.radio_map: ") and named in msg and "GiB of memory" in msg
    assert time.monotonic() - t0 < 60 and not (tmp_path / "model.ckpt").exists()


def test_an_exact_gp_beyond_the_budget_is_refused_and_the_sparse_one_is_bounded(monkeypatch):
    """100,000 sessions: the exact GP's n x n system (~150 GiB) is refused before fitting, naming the param;
    the sparse GP's is bounded by its inducing points whatever the readings (auto picks it beyond 5,000)."""
    from heimdall.budget import check_radio_map
    from heimdall.gp import gp_fit_bytes
    from heimdall.params import RadioMapParams

    monkeypatch.setenv("HEIMDALL_MEMORY_BUDGET_GB", "8")
    box = (0.0, 100e3, 0.0, 100e3)

    def radio_map(gp):
        return RadioMapParams(spacing_km=1.0, margin_km=10.0, min_snr_db=10.0, gp=gp)

    with pytest.raises(HeimdallError) as e:
        check_radio_map(box, radio_map("exact"), 7, 64, 100_000, gp_fit_bytes("exact", 100_000))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.radio_map.gp=exact") and "100,000" in msg and "sparse" in msg
    for gp in ("sparse", "auto"):
        check_radio_map(box, radio_map(gp), 7, 64, 100_000, gp_fit_bytes(gp, 100_000))  # within 8 GiB
    assert gp_fit_bytes("sparse", 100_000) == gp_fit_bytes("sparse", 10**7) < 1.1 * 2**30
    assert gp_fit_bytes("auto", 4_000) == gp_fit_bytes("exact", 4_000) < gp_fit_bytes("auto", 100_000)


def _logmel_only_file(path, n, r=7, m=64, f=32):
    """An HDF5 file with just a (n, r, m, f) float32 log-mel dataset, chunked and never written (a few KB on disk):
    the budget reads the shape alone."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features/logmel_db", (n, r, m, f), "f4", chunks=(64, r, m, f))
    return path


def test_features_budget_does_not_scale_with_the_logmel(tmp_path, monkeypatch):
    """Issue 21: train / evaluate / export_onnx hold the scalar features of every session and the log-mel of one
    batch, never the whole log-mel (57 KB per session): 100,000 sessions pass an 8 GiB budget (the old estimate
    was 10.8 GiB); a huge train.batch_size is still refused, by name."""
    from heimdall.budget import check_features_file, features_memory

    monkeypatch.setenv("HEIMDALL_MEMORY_BUDGET_GB", "8")
    small, big = _logmel_only_file(tmp_path / "6k.h5", 6_000), _logmel_only_file(tmp_path / "100k.h5", 100_000)
    per_session = (features_memory(big)[0] - features_memory(small)[0]) / 94_000
    assert per_session < 1024  # bytes per session: the scalars (the log-mel is 57,344)
    assert features_memory(big)[0] < 0.2 * 2**30
    # 16x the log-mel per session (256 mels x 128 frames: 85 GiB in all) moves only the batch's share
    assert features_memory(_logmel_only_file(tmp_path / "wide.h5", 100_000, m=256, f=128))[0] < 2**30
    check_features_file(big, "train", batch_rows=64)  # not refused
    with pytest.raises(HeimdallError) as e:
        check_features_file(big, "train", batch_rows=10_000_000)
    msg = str(e.value)
    assert "\n" not in msg and "log-mel batches of 10000000 sessions" in msg and "train.batch_size" in msg
    assert "GiB of memory" in msg and "HEIMDALL_MEMORY_BUDGET_GB" in msg
    with pytest.raises(HeimdallError, match=r"100000 sessions of scalar features \(evaluate holds them whole\)"):
        monkeypatch.setenv("HEIMDALL_MEMORY_BUDGET_GB", "0.01")
        check_features_file(big, "evaluate")
