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
    assert np.isfinite(fs.logmel[:]).all() and np.isfinite(fs.rss_dbm).all()
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
    assert np.isfinite(load_features(out).logmel[:]).all()


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
    assert np.isfinite(fs.logmel[:]).all()


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
    assert np.array_equal(fs.logmel[:], ref.logmel[:]) and np.array_equal(fs.rss_dbm, ref.rss_dbm)
    # ~1,000 km north of the others (the ENU origin, their mean, moves ~140 km with it)
    assert fs.receiver_enu_m[0, 1] - fs.receiver_enu_m[1:, 1].max() > 900e3


# --- issue 20: identities and physical values are checked where they enter ---------------------

def test_file_of_the_other_kind_or_without_attributes_is_a_one_line_error(small, tmp_path):
    """features.h5 given as --sessions (and the reverse), or a file whose format attributes are gone:
    one line naming the file and the attribute (the attributes used to be read after closing: traceback)."""
    params, sessions, features = small
    result = _extract(params, features, tmp_path / "f.h5")
    assert isinstance(result, HeimdallError) and "'format'" in str(result) and str(features) in str(result)
    with pytest.raises(HeimdallError, match="attribute 'format'"):
        load_features(sessions)
    for attrs in ({"format": None}, {"format_version": None}, {"format_version": "one"},
                  {"format_version": np.array([1, 2])}, {"format": b"heimdall.sessions\xff"}):
        f_path = _copy(sessions, tmp_path, "s.h5")
        with h5py.File(f_path, "r+") as f:
            for k, v in attrs.items():
                if v is None:
                    del f.attrs[k]
                else:
                    f.attrs[k] = v
        result = _extract(params, f_path, tmp_path / "f.h5")
        assert isinstance(result, HeimdallError) and str(f_path) in str(result), attrs


def _set(f: h5py.File, dataset: str, row: int, value) -> None:
    ds = f[dataset]
    arr = ds.asstr()[()].astype(object) if h5py.check_string_dtype(ds.dtype) else ds[()]
    arr[row] = value
    ds[...] = arr


BAD_IDENTITIES = [
    ("receivers/name", 2, "@0", "duplicates row 0"),  # "@0": the name of row 0
    ("receivers/name", 1, " ", "row 1 is empty"),
    ("receivers/latitude_deg", 1, 91.0, "receivers/latitude_deg row 1"),
    ("receivers/latitude_deg", 0, np.nan, "receivers/latitude_deg row 0"),
    ("receivers/longitude_deg", 2, -180.5, "receivers/longitude_deg row 2"),
    ("receivers/altitude_m", 2, np.inf, "receivers/altitude_m row 2"),
    ("sessions/frequency_hz", 3, np.nan, "sessions/frequency_hz row 3"),
    ("sessions/frequency_hz", 4, 0.0, "sessions/frequency_hz row 4"),
    ("sessions/frequency_hz", 5, -145e6, "sessions/frequency_hz row 5"),
    ("sessions/frequency_hz", 6, np.inf, "sessions/frequency_hz row 6"),
    ("sessions/tx_latitude_deg", 7, 95.0, "sessions/tx_latitude_deg row 7"),
]


@pytest.mark.parametrize(("dataset", "row", "value", "expected"), BAD_IDENTITIES)
def test_duplicate_receivers_bad_positions_and_frequencies_are_refused(small, tmp_path, dataset, row, value,
                                                                       expected):
    """In sessions.h5 (extract_features, predict) and in features.h5 (train, evaluate): a duplicate or
    empty receiver name, a position that is not a coordinate, a NaN / 0 / negative frequency -> one line
    naming the dataset and row, no output."""
    params, sessions, features = small
    for src in (sessions, features):
        f_path = _copy(src, tmp_path, "x.h5")
        with h5py.File(f_path, "r+") as f:
            if value == "@0":
                value = f["receivers/name"].asstr()[0]
            _set(f, dataset, row, value)
        if src == sessions:
            result = _extract(params, f_path, tmp_path / "f.h5")
        else:
            with pytest.raises(HeimdallError) as info:
                load_features(f_path)
            result = info.value
        assert isinstance(result, HeimdallError) and expected in str(result), (src.name, result)
        assert str(f_path) in str(result) and "\n" not in str(result)


@pytest.mark.parametrize(("key", "value"), [("logmel_std_db", 0.0), ("rss_std_db", 0.0), ("snr_std_db", -1.0),
                                            ("target_std_m", 0.0), ("rss_std_db", np.nan)])
def test_degenerate_normalisation_std_is_refused(small, tmp_path, key, value):
    """A std of 0 (or negative, NaN) divides the model's inputs: it trained to NaN and exited 0."""
    _, _, features = small
    f_path = _copy(features, tmp_path, "f.h5")
    with h5py.File(f_path, "r+") as f:
        arr = f[f"normalization/{key}"][()]
        f[f"normalization/{key}"][...] = np.full_like(arr, value) if np.ndim(arr) == 0 else \
            np.where(np.arange(arr.size).reshape(arr.shape) == 0, value, arr)
    with pytest.raises(HeimdallError, match=f"normalization.{key}"):
        load_features(f_path)


_ATTR_VALUES = st.one_of(st.none(), st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=6),
                         st.binary(max_size=6), st.booleans(), st.lists(st.integers(-5, 5), min_size=1, max_size=3))
_DTYPES = st.sampled_from(["int8", "int64", "float16", "float32", "float64", "bool", "S3", "str"])


def _corrupt(f: h5py.File, datasets: list[str], data) -> None:
    """One random corruption: an attribute deleted or set to any value, or a dataset rewritten in another
    dtype (and maybe one random value)."""
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(f.attrs.keys()) + ["extra"]))
        value = data.draw(_ATTR_VALUES)
        if value is None:
            f.attrs.pop(key, None)
        else:
            f.attrs[key] = np.array(value) if isinstance(value, list) else \
                (np.void(value) if isinstance(value, bytes) else value)
        return
    name = data.draw(st.sampled_from(sorted(d for d in datasets if not d.endswith("/iq"))))
    ds = f[name]
    dtype = data.draw(_DTYPES)
    arr = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
    if data.draw(st.booleans()) and np.size(arr):  # one random value
        flat = np.array(arr, dtype=object).reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.one_of(
            st.floats(allow_nan=True), st.integers(-2**31, 2**31), st.text(max_size=5)))
        arr = flat.reshape(np.shape(arr))
    del f[name]
    try:
        new = np.asarray(arr).astype(h5py.string_dtype() if dtype == "str" else dtype)
    except (ValueError, TypeError, OverflowError):
        new = np.zeros(np.shape(arr), dtype="float32")
    f.create_dataset(name, data=new)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_attribute_and_dtype_corruption(small, tmp_path, data):
    """Property (issue 20): any attribute deleted or set to any value, any dataset rewritten in any dtype
    or with random values, in sessions.h5 (extract_features) or features.h5 (load_features): the file
    loads or the reader raises a one-line HeimdallError — never another exception."""
    params, sessions, features = small
    kind = data.draw(st.sampled_from(["sessions", "features"]))
    f_path = _copy(sessions if kind == "sessions" else features, tmp_path, "x.h5")
    with h5py.File(f_path, "r+") as f:
        datasets: list[str] = []
        f.visit(lambda name: datasets.append(name) if isinstance(f[name], h5py.Dataset) else None)
        for _ in range(data.draw(st.integers(1, 3))):
            try:
                _corrupt(f, datasets, data)
            except (ValueError, TypeError):  # h5py cannot store that value: no corruption this round
                pass
    if kind == "sessions":
        (tmp_path / "f.h5").unlink(missing_ok=True)  # tmp_path is shared by the examples
        _extract(params, f_path, tmp_path / "f.h5")  # fails the test on any exception but HeimdallError
    else:
        try:
            load_features(f_path)
        except HeimdallError as e:
            assert "\n" not in str(e)


# --- issue 21: the log-mel stays in features.h5 and is read by rows (heimdall.data.H5Rows) ---------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(-12, 11), max_size=30), piece=st.integers(1, 8),
       sl=st.tuples(st.none() | st.integers(-15, 15), st.none() | st.integers(-15, 15),
                    st.none() | st.integers(-4, 4).filter(lambda s: s != 0)))
def test_lazy_logmel_rows_equal_the_eager_read(small, rows, piece, sl):
    """Unsorted, repeated and negative indices, slices of any step, ints, boolean masks: exactly what numpy
    indexing of the whole dataset gives, whatever the read piece (features.h5 chunks are 5 sessions here), with
    another handle on the file open (whose chunk cache HDF5 would otherwise impose)."""
    from heimdall import data

    _, _, features = small
    fs = load_features(features)
    with h5py.File(features, "r") as f, pytest.MonkeyPatch.context() as mp:  # read with another handle open
        eager = f["features/logmel_db"][()]
        mp.setattr(data, "READ_ROWS", piece)
        idx = np.array(rows, dtype=np.int64)
        got = fs.logmel[idx]
        assert got.dtype == np.float32 and got.shape == (len(rows), *eager.shape[1:])
        assert np.array_equal(got, eager[idx])
        assert np.array_equal(fs.logmel[slice(*sl)], eager[slice(*sl)])
        if rows:
            assert np.array_equal(fs.logmel[rows[0]], eager[rows[0]])
            mask = np.zeros(len(eager), bool)
            mask[idx] = True
            assert np.array_equal(fs.logmel[mask], eager[mask])
    assert fs.logmel.shape == eager.shape and len(fs.logmel) == len(eager)
    with pytest.raises(IndexError):
        fs.logmel[np.array([len(eager)])]
    with pytest.raises(TypeError, match="read lazily"):
        np.asarray(fs.logmel)


@pytest.mark.parametrize("piece", [256, 4])
def test_non_finite_logmel_is_refused_with_the_dataset_and_index(small, tmp_path, piece, monkeypatch):
    """The log-mel's finiteness is checked at load, piece by piece: the first bad value's index is the file's."""
    from heimdall import data

    monkeypatch.setattr(data, "READ_ROWS", piece)
    _, _, features = small
    for value in (np.nan, -np.inf):
        f_path = _copy(features, tmp_path, "f.h5")
        with h5py.File(f_path, "r+") as f:
            f["features/logmel_db"][9, 2, 10, 5] = value
            f["features/logmel_db"][11, 0, 0, 0] = np.inf  # later: not the one reported
        with pytest.raises(HeimdallError) as info:
            load_features(f_path)
        msg = str(info.value)
        assert msg == f"{f_path}: non-finite value in 'features/logmel_db' at index (9, 2, 10, 5)", msg


def test_logmel_read_from_a_replaced_or_truncated_file_is_a_one_line_error(small, tmp_path):
    """A FeatureSet reads its log-mel later: a file replaced (another extract_features) or cut since load_features
    is refused by name, never read as if it were the one checked."""
    _, _, features = small
    f_path = _copy(features, tmp_path, "f.h5")
    fs = load_features(f_path)
    first = fs.logmel[np.array([3, 1])]
    _copy(features, tmp_path, "f.h5")  # same bytes, a new file
    with pytest.raises(HeimdallError, match="changed since load_features"):
        fs.logmel[np.array([3, 1])]
    fs = load_features(f_path)
    assert np.array_equal(fs.logmel[np.array([3, 1])], first)
    data = f_path.read_bytes()
    with open(f_path, "r+b") as f:  # cut in place: the same file, its log-mel gone
        f.truncate(len(data) // 2)
    with pytest.raises(HeimdallError) as info:
        fs.logmel[:]
    assert str(f_path) in str(info.value) and "\n" not in str(info.value)
