"""Property tests over the HDF5 readers and feature extraction: damaged, hostile or odd inputs give a
clear HeimdallError or a documented, counted skip — never a traceback, never NaN features."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_params_dict, write_params
from heimdall.data import load_features
from heimdall.errors import HeimdallError
from heimdall.params import load_params
from heimdall.stages import export_sessions, extract_features

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(params, a valid 12-session sessions.h5, its features.h5)."""
    d = tmp_path_factory.mktemp("hardening")
    params = load_params(write_params(d / "params.yaml", tiny_params_dict(12, **{"extract_features.batch_sessions": 5})))
    export_sessions.run(params, d / "sessions.h5", progress=False)
    extract_features.run(params, d / "sessions.h5", d / "features.h5", progress=False)
    return params, d / "sessions.h5", d / "features.h5"


def _extract(params, sessions: Path, out: Path):
    """Run the stage; return its summary, or the HeimdallError. Any other exception fails the test."""
    try:
        return extract_features.run(params, sessions, out, progress=False)
    except HeimdallError as e:
        assert "\n" not in str(e) and str(e)
        assert not out.exists(), "a failed stage left an output"
        return e


def _copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copy(src, dst)
    return dst


def _truncated(src: Path, tmp: Path, fraction: float) -> Path:
    """A copy of ``src`` cut after ``fraction`` of its bytes."""
    data = src.read_bytes()
    cut = tmp / "cut.h5"
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


@SETTINGS
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_sessions_file(small, tmp_path, fraction):
    params, sessions, _ = small
    out = tmp_path / "features.h5"
    result = _extract(params, _truncated(sessions, tmp_path, fraction), out)
    assert isinstance(result, HeimdallError)


@SETTINGS
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_features_file(small, tmp_path, fraction):
    _, _, features = small
    with pytest.raises(HeimdallError):
        load_features(_truncated(features, tmp_path, fraction))


BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 3.4e38, 0.0, -300.0])


@SETTINGS
@given(data=st.data())
def test_hostile_rss_snr_and_iq_scale_values(small, tmp_path, data):
    """NaN/Inf/huge values in RSS, SNR or the IQ calibration scale: dropped and counted, features finite."""
    params, sessions, _ = small
    f_path = _copy(sessions, tmp_path, "s.h5")
    with h5py.File(f_path, "r+") as f:
        m = f["measurements"]
        n, r = m["rss_dbm"].shape
        present = m["present"][()]
        cells = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, r - 1),
                                             st.sampled_from(["rss_dbm", "snr_db", "iq_scale"]), BAD_VALUES),
                                   min_size=1, max_size=12))
        for i, j, name, value in cells:
            arr = m[name][()]
            arr[i, j] = value
            m[name][...] = arr
    out = tmp_path / "f.h5"
    result = _extract(params, f_path, out)
    if isinstance(result, HeimdallError):  # only acceptable when no training RSS is left at all
        assert "no training rows" in str(result)
        return
    fs = load_features(out)  # load_features rejects any non-finite feature
    assert np.isfinite(fs.logmel).all() and np.isfinite(fs.rss_dbm).all()
    final = {(i, j, name): v for i, j, name, v in cells}  # the last write to a cell wins
    dropped = [(i, j) for (i, j, name), v in final.items()
               if name == "rss_dbm" and present[i, j] and not -200 <= v <= 60]
    assert result["skipped_nonfinite_measurements"] >= len(dropped)
    for i, j in dropped:
        assert not fs.present[i, j]


@SETTINGS
@given(value=st.sampled_from([32767, -32768]), fill=st.floats(0.0, 1.0))
def test_saturated_iq_gives_finite_features(small, tmp_path, value, fill):
    params, sessions, _ = small
    f_path = _copy(sessions, tmp_path, "s.h5")
    with h5py.File(f_path, "r+") as f:
        iq = f["measurements/iq"][()]
        k = int(iq.shape[2] * fill)
        iq[0, :, :k, :] = value
        f["measurements/iq"][...] = iq
    out = tmp_path / "f.h5"
    summary = _extract(params, f_path, out)
    assert isinstance(summary, dict)
    assert np.isfinite(load_features(out).logmel).all()


@pytest.mark.parametrize("dataset,bad", [
    ("measurements/rss_dbm", lambda a: np.nan_to_num(a).astype(np.int32)),  # wrong dtype
    ("measurements/present", lambda a: a.astype(np.float32)),        # wrong dtype
    ("measurements/rss_dbm", lambda a: a[:, :-1]),                   # wrong shape
    ("sessions/tx_latitude_deg", lambda a: a[:-1]),                  # wrong length
    ("measurements/iq", lambda a: a[:, :, :0, :]),                   # zero-length IQ
])
def test_wrong_dtype_or_shape_is_a_clear_error(small, tmp_path, dataset, bad):
    params, sessions, _ = small
    f_path = _copy(sessions, tmp_path, "s.h5")
    with h5py.File(f_path, "r+") as f:
        arr = bad(f[dataset][()])
        del f[dataset]
        f.create_dataset(dataset, data=arr)
    result = _extract(params, f_path, tmp_path / "f.h5")
    assert isinstance(result, HeimdallError)
    assert str(f_path) in str(result)


@pytest.mark.parametrize("n_present", [0, 1, 2])
def test_sessions_with_few_receivers_are_kept_and_counted(small, tmp_path, n_present):
    params, sessions, _ = small
    f_path = _copy(sessions, tmp_path, "s.h5")
    with h5py.File(f_path, "r+") as f:
        present = f["measurements/present"][()]
        present[:3] = False
        present[:3, :n_present] = True
        f["measurements/present"][...] = present
    summary = _extract(params, f_path, tmp_path / "f.h5")
    assert isinstance(summary, dict)
    fs = load_features(tmp_path / "f.h5")
    assert (fs.present[:3].sum(1) <= n_present).all()
    assert summary["sessions_without_receivers"] >= (3 if n_present == 0 else 0)
    assert np.isfinite(fs.logmel).all()


def test_duplicate_session_ids(small, tmp_path):
    params, sessions, _ = small
    f_path = _copy(sessions, tmp_path, "s.h5")
    with h5py.File(f_path, "r+") as f:
        ids = f["sessions/session_id"].asstr()[()]
        ids[1] = ids[0]
        f["sessions/session_id"][...] = ids.astype(object)
    result = _extract(params, f_path, tmp_path / "f.h5")
    assert isinstance(result, HeimdallError) and "duplicate session ids" in str(result)


def test_receiver_far_outside_the_map_and_unordered_timestamps(small, tmp_path):
    """Order of sessions in time does not matter; a receiver 1,000 km away is just another receiver."""
    params, sessions, features = small
    f_path = _copy(sessions, tmp_path, "s.h5")
    with h5py.File(f_path, "r+") as f:
        t = f["sessions/start_time_unix_s"][()]
        f["sessions/start_time_unix_s"][...] = t[::-1]
        lat = f["receivers/latitude_deg"][()]
        lat[0] = lat[0] + 9.0
        f["receivers/latitude_deg"][...] = lat
    summary = _extract(params, f_path, tmp_path / "f.h5")
    assert isinstance(summary, dict)
    fs, ref = load_features(tmp_path / "f.h5"), load_features(features)
    assert np.array_equal(fs.logmel, ref.logmel) and np.array_equal(fs.rss_dbm, ref.rss_dbm)
    # ~1,000 km north of the others (the ENU origin, their mean, moves ~140 km with it)
    assert fs.receiver_enu_m[0, 1] - fs.receiver_enu_m[1:, 1].max() > 900e3
