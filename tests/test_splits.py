"""Splits: the test set is honestly unseen."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall.contracts import SPLIT_CODES
from heimdall.errors import HeimdallError
from heimdall.splits import assign_split


def _walks(n_walks=60, per_walk=40, seed=0):
    """Transmitter tracks: consecutive samples of a walk are metres apart (near-duplicates)."""
    rng = np.random.default_rng(seed)
    starts = rng.uniform(-50_000, 50_000, size=(n_walks, 2))
    steps = rng.normal(0, 30.0, size=(n_walks, per_walk, 2)).cumsum(axis=1)
    pos = (starts[:, None, :] + steps).reshape(-1, 2)
    groups = np.repeat([f"walk-{i}" for i in range(n_walks)], per_walk)
    return pos, groups


def test_spatial_blocks_never_straddle_splits():
    pos, groups = _walks()
    block = 5_000.0
    split = assign_split("spatial_blocks", target_enu_m=pos, group_id=groups, val_fraction=0.15,
                         test_fraction=0.15, block_size_m=block, seed=3)
    keys = [tuple(k) for k in np.floor(pos / block).astype(int)]
    seen: dict = {}
    for k, s in zip(keys, split):
        assert seen.setdefault(k, s) == s, f"block {k} is in two splits"
    for code in SPLIT_CODES.values():
        assert (split == code).sum() > 0
    frac_test = (split == SPLIT_CODES["test"]).mean()
    assert 0.1 < frac_test < 0.3


def test_spatial_blocks_separate_near_duplicates():
    pos, groups = _walks()
    split = assign_split("spatial_blocks", target_enu_m=pos, group_id=groups, val_fraction=0.15,
                         test_fraction=0.15, block_size_m=5_000.0, seed=3)
    train = pos[split == SPLIT_CODES["train"]]
    test = pos[split == SPLIT_CODES["test"]]
    # a test position's nearest training position is never a near-duplicate (< 100 m away)
    # unless it is across a block boundary; at most a few such boundary cases
    d = np.sqrt(((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert (d < 100).mean() < 0.10
    # whereas a random split leaks almost every test point
    rsplit = assign_split("random", target_enu_m=pos, group_id=groups, val_fraction=0.15,
                          test_fraction=0.15, block_size_m=5_000.0, seed=3)
    rtrain, rtest = pos[rsplit == 0], pos[rsplit == 2]
    rd = np.sqrt(((rtest[:, None, :] - rtrain[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert (rd < 100).mean() > 0.9


def test_by_group_keeps_groups_whole():
    pos, groups = _walks()
    split = assign_split("by_group", target_enu_m=pos, group_id=groups, val_fraction=0.2,
                         test_fraction=0.2, block_size_m=1.0, seed=5)
    for g in np.unique(groups):
        assert len(np.unique(split[groups == g])) == 1


def test_split_is_deterministic_in_seed():
    pos, groups = _walks()
    kw = dict(target_enu_m=pos, group_id=groups, val_fraction=0.15, test_fraction=0.15, block_size_m=5e3)
    a = assign_split("spatial_blocks", seed=1, **kw)
    assert np.array_equal(a, assign_split("spatial_blocks", seed=1, **kw))
    assert not np.array_equal(a, assign_split("spatial_blocks", seed=2, **kw))


def test_too_few_groups_is_a_clear_error():
    pos = np.zeros((10, 2))
    with pytest.raises(HeimdallError, match="empty"):
        assign_split("spatial_blocks", target_enu_m=pos, group_id=np.array(["a"] * 10),
                     val_fraction=0.15, test_fraction=0.15, block_size_m=1000.0, seed=0)


def _timed(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 20_000, (n, 2))
    t = 1.6e9 + np.sort(rng.uniform(0, 120 * 86400, n))  # 2020-09-13 ... 2021-01-11
    ids = np.array([f"s{i:04d}".encode() for i in range(n)], dtype=object)  # as h5py reads str datasets
    latlon = np.c_[40 + pos[:, 1] / 111_000, -111 + pos[:, 0] / 85_000]
    return dict(target_enu_m=pos, group_id=ids, val_fraction=0.15, test_fraction=0.2, block_size_m=2_000.0, seed=3,
                start_time_unix_s=t, session_id=ids, target_latlon=latlon)


def test_time_holds_out_the_future_and_validates_on_the_recent_past():
    """strategy time without bounds: test = the latest 20 %, val = the latest 15 % of the rest, so
    train < val < test in time; with bounds: exactly the sessions in [test_from, test_until)
    (a date is midnight UTC), val still the latest of the rest."""
    kw = _timed()
    t = kw["start_time_unix_s"]
    split = assign_split("time", **kw)
    tr, va, te = (t[split == SPLIT_CODES[k]] for k in ("train", "val", "test"))
    assert len(te) == 200 and len(va) == 120 and tr.max() < va.min() < va.max() < te.min()  # val: 15 % of the rest
    split = assign_split("time", **kw, test_from="2020-10-01", test_until="2020-10-15T00:00:00+00:00")
    lo, hi = 1601510400.0, 1602720000.0  # 2020-10-01 / 2020-10-15 UTC
    np.testing.assert_array_equal(split == SPLIT_CODES["test"], (t >= lo) & (t < hi))
    rest = split != SPLIT_CODES["test"]
    assert t[rest & (split == SPLIT_CODES["val"])].min() > t[rest & (split == SPLIT_CODES["train"])].max()
    with pytest.raises(HeimdallError, match="not before"):
        assign_split("time", **kw, test_from="2020-10-15", test_until="2020-10-01")


def test_area_and_list_hold_out_exactly_what_they_name(tmp_path, caplog):
    """area: test = the transmitters inside the box; list: the ids in the file (comments and blank
    lines ignored; unknown ids counted in a warning, not fatal); val comes from whole spatial blocks
    of the rest, never from test."""
    kw = _timed()
    ll = kw["target_latlon"]
    box = (40.05, -110.9, 40.2, -110.7)
    split = assign_split("area", **kw, test_area=box)
    inside = (ll[:, 0] >= box[0]) & (ll[:, 0] <= box[2]) & (ll[:, 1] >= box[1]) & (ll[:, 1] <= box[3])
    assert inside.sum() > 50
    np.testing.assert_array_equal(split == SPLIT_CODES["test"], inside)
    rest = split != SPLIT_CODES["test"]
    assert 0.1 < (split[rest] == SPLIT_CODES["val"]).mean() < 0.2  # 15 % of the rest
    ids_file = tmp_path / "held.txt"
    ids_file.write_text("# held out\ns0003\n\ns0500  # a comment\ns0999\nnot-a-session\n")
    with caplog.at_level("WARNING"):
        split = assign_split("list", **kw, test_ids_file=str(ids_file))
    assert np.flatnonzero(split == SPLIT_CODES["test"]).tolist() == [3, 500, 999]
    assert "1 of its 4 session ids are not in the sessions file" in caplog.text
    blocks = [tuple(b) for b in np.floor(kw["target_enu_m"] / 2_000.0).astype(int)]
    val_blocks = {b for b, s in zip(blocks, split) if s == SPLIT_CODES["val"]}
    train_blocks = {b for b, s in zip(blocks, split) if s == SPLIT_CODES["train"]}
    assert val_blocks and not val_blocks & train_blocks
    ids_file.write_text("nobody\n")
    with pytest.raises(HeimdallError, match="test split empty"):
        assign_split("list", **kw, test_ids_file=str(ids_file))


@pytest.mark.parametrize("strategy", ["random", "spatial_blocks", "by_group", "time"])
def test_test_fraction_zero_is_a_production_split(strategy):
    """test_fraction 0: no test session, val as asked, every other session trains."""
    pos, groups = _walks()
    t = np.arange(len(groups), dtype=float)
    split = assign_split(strategy, target_enu_m=pos, group_id=groups, val_fraction=0.15, test_fraction=0.0,
                         block_size_m=5_000.0, seed=3, start_time_unix_s=t)
    assert not (split == SPLIT_CODES["test"]).any()
    assert (split == SPLIT_CODES["val"]).mean() == pytest.approx(0.15, abs=0.05)
    assert (split == SPLIT_CODES["train"]).mean() == pytest.approx(0.85, abs=0.05)


def test_production_run_trains_on_all_but_val_and_measures_nothing(tiny_campaign, tmp_path, monkeypatch):
    """extract -> train -> evaluate -> export -> register with test_fraction 0: train holds every session
    but val; test.json says production with no errors (no invented numbers); the parity gate runs on
    val; the registered version is a candidate, never champion by itself (not even the first)."""
    import json

    from conftest import FAST_EXPORT, TINY_TRAIN, tiny_params_dict, train_and_evaluate, write_params
    from heimdall.data import load_features
    from heimdall.params import load_params
    from heimdall.stages import export_onnx, extract_features, register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    d = tiny_params_dict(240, **TINY_TRAIN, **{"extract_features.split.test_fraction": 0})
    params = load_params(write_params(tmp_path / "params.yaml", d))
    features_path = tmp_path / "features.h5"
    extract_features.run(params, tiny_campaign[1], features_path, progress=False)
    fs = load_features(features_path)
    assert len(fs.indices("test")) == 0 and len(fs.indices("train")) + len(fs.indices("val")) == 240
    summary = train_and_evaluate(params, features_path, tmp_path)
    assert summary["production_run"] is True
    test = json.loads((tmp_path / "metrics/test.json").read_text())
    assert test["n_test"] == 0 and test["production_run"] is True and "median_error_m" not in test
    assert json.loads((tmp_path / "metrics/compare/model.json").read_text()) == {"n_test": 0}
    export_onnx.run(tmp_path / "model.ckpt", features_path, tmp_path / "model.onnx", tmp_path / "export.json",
                    **FAST_EXPORT)
    assert json.loads((tmp_path / "export.json").read_text())["parity"]["n_sessions"] == len(fs.indices("val"))
    reg = register.run(params, tmp_path / "model.onnx", tmp_path / "metrics/test.json", tmp_path / "registry.json")
    assert reg["promoted_to_champion"] is False and reg["aliases"] == ["candidate"]
