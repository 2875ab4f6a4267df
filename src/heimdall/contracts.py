"""The HDF5 data contracts, declared once. docs/data-contracts.md mirrors these tables and a
test keeps the two in step; readers validate every file against them before using it.

Dimension symbols: N sessions, R receivers, S IQ samples, M mel bands, F frames.
dtype "str" is a variable-length UTF-8 string; "bool" is stored as HDF5 enum-bool (numpy bool).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from heimdall.errors import HeimdallError

SESSIONS_FORMAT = "heimdall.sessions"
FEATURES_FORMAT = "heimdall.features"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# The model's six inputs (PyTorch forward arguments and ONNX graph inputs, in this order) and the
# exported graph's outputs; docs/inference.md describes each.
INPUT_NAMES = ("logmel", "rss_dbm", "snr_db", "present", "has_iq", "receiver_id")
OUTPUT_NAMES = ("position_enu_m", "covariance_m2", "position_latlon", "cell_probability",
                "mode_weight", "mode_enu_m", "mode_covariance_m2", "mode_latlon")
# Search regions: the nominal levels published (test.json, heimdall predict, the ONNX metadata's region
# masses), and the levels the model is calibrated at (the reliability diagram's; REGION_LEVELS among them).
REGION_LEVELS = (0.50, 0.68, 0.90, 0.95)
RELIABILITY_LEVELS = tuple(sorted({*(round(0.05 * i, 2) for i in range(1, 20)), *REGION_LEVELS}))
# The posterior's modes published as a Gaussian mixture: at most this many (unused slots weigh 0).
N_MODES = 4
# The feature statistics the model carries inside (buffers of the same names), from normalization/*.
FEATURE_NORMALIZATION_KEYS = ("logmel_mean_db", "logmel_std_db", "rss_mean_dbm", "rss_std_db", "snr_mean_db",
                              "snr_std_db")


@dataclass(frozen=True)
class Field:
    path: str
    dtype: str
    shape: tuple[str, ...]
    unit: str
    description: str


SESSIONS_LAYOUT: tuple[Field, ...] = (
    Field("receivers/name", "str", ("R",), "", "station name, unique"),
    Field("receivers/station_id", "str", ("R",), "", "source-specific station id (UUID for postgres)"),
    Field("receivers/latitude_deg", "float64", ("R",), "deg", "WGS-84 latitude"),
    Field("receivers/longitude_deg", "float64", ("R",), "deg", "WGS-84 longitude"),
    Field("receivers/altitude_m", "float64", ("R",), "m", "antenna altitude above sea level"),
    Field("sessions/session_id", "str", ("N",), "", "unique session id"),
    Field("sessions/group_id", "str", ("N",), "", "known source / transmitter track the session belongs to"),
    Field("sessions/start_time_unix_s", "float64", ("N",), "s", "session start, UTC seconds since 1970"),
    Field("sessions/frequency_hz", "float64", ("N",), "Hz", "carrier frequency"),
    Field("sessions/tx_latitude_deg", "float64", ("N",), "deg", "ground-truth transmitter latitude"),
    Field("sessions/tx_longitude_deg", "float64", ("N",), "deg", "ground-truth transmitter longitude"),
    Field("sessions/tx_power_dbm", "float32", ("N",), "dBm", "hidden truth for evaluation only; NaN if unknown"),
    Field("measurements/present", "bool", ("N", "R"), "", "receiver delivered a measurement"),
    Field("measurements/rss_dbm", "float32", ("N", "R"), "dBm", "reported signal strength; NaN if absent"),
    Field("measurements/snr_db", "float32", ("N", "R"), "dB", "reported SNR; NaN if absent or unknown"),
    Field("measurements/has_iq", "bool", ("N", "R"), "", "IQ recording available"),
    Field("measurements/iq", "int16", ("N", "R", "S", "2"), "count", "complex baseband, last axis (I, Q); 0 where no IQ"),
    Field("measurements/iq_scale", "float32", ("N", "R"), "sqrt(mW)/count", "calibration: iq * iq_scale is the field in sqrt(mW)"),
)
SESSIONS_ATTRS: dict[str, str] = {
    "format": f"'{SESSIONS_FORMAT}'",
    "format_version": "int, currently 1",
    "source": "'synthetic' or 'postgres'",
    "sample_rate_hz": "float, IQ sample rate (all rows)",
    "n_samples": "int, IQ samples per row (S)",
    "scenario_json": "synthetic only: the scenario params that define the true radio map",
    "campaign_seed": "synthetic only: export_sessions.seed",
}

FEATURES_LAYOUT: tuple[Field, ...] = (
    Field("receivers/name", "str", ("R",), "", "station name (same order as sessions.h5)"),
    Field("receivers/latitude_deg", "float64", ("R",), "deg", "WGS-84 latitude"),
    Field("receivers/longitude_deg", "float64", ("R",), "deg", "WGS-84 longitude"),
    Field("receivers/altitude_m", "float64", ("R",), "m", "antenna altitude"),
    Field("receivers/enu_m", "float64", ("R", "3"), "m", "receiver position (east, north, up) in the ENU frame"),
    Field("sessions/session_id", "str", ("N",), "", "as in sessions.h5"),
    Field("sessions/group_id", "str", ("N",), "", "as in sessions.h5"),
    Field("sessions/start_time_unix_s", "float64", ("N",), "s", "as in sessions.h5"),
    Field("sessions/frequency_hz", "float64", ("N",), "Hz", "as in sessions.h5"),
    Field("sessions/tx_latitude_deg", "float64", ("N",), "deg", "ground truth"),
    Field("sessions/tx_longitude_deg", "float64", ("N",), "deg", "ground truth"),
    Field("sessions/tx_power_dbm", "float32", ("N",), "dBm", "hidden truth (evaluation only)"),
    Field("sessions/target_enu_m", "float64", ("N", "2"), "m", "ground-truth (east, north) in the ENU frame: the regression target"),
    Field("sessions/split", "uint8", ("N",), "", "0 train, 1 val, 2 test"),
    Field("features/logmel_db", "float32", ("N", "R", "M", "F"), "dBm per band", "log-mel power spectrogram; 0 where has_iq is false"),
    Field("features/rss_dbm", "float32", ("N", "R"), "dBm", "reported signal strength; 0 where absent"),
    Field("features/snr_db", "float32", ("N", "R"), "dB", "reported SNR; 0 where absent"),
    Field("features/present", "bool", ("N", "R"), "", "receiver delivered a measurement"),
    Field("features/has_iq", "bool", ("N", "R"), "", "log-mel computed from IQ"),
    Field("normalization/logmel_mean_db", "float32", ("M",), "dB", "train-split mean per band over rows with IQ"),
    Field("normalization/logmel_std_db", "float32", ("M",), "dB", "train-split std per band"),
    Field("normalization/rss_mean_dbm", "float32", (), "dBm", "train-split mean over present receivers"),
    Field("normalization/rss_std_db", "float32", (), "dB", "train-split std over present receivers"),
    Field("normalization/snr_mean_db", "float32", (), "dB", "train-split mean over present receivers"),
    Field("normalization/snr_std_db", "float32", (), "dB", "train-split std over present receivers"),
    Field("normalization/target_mean_m", "float64", ("2",), "m", "train-split mean of target_enu_m"),
    Field("normalization/target_std_m", "float64", ("2",), "m", "train-split std of target_enu_m"),
)
FEATURES_ATTRS: dict[str, str] = {
    "format": f"'{FEATURES_FORMAT}'",
    "format_version": "int, currently 1",
    "source": "copied from sessions.h5",
    "origin_latitude_deg": "ENU origin latitude (deg)",
    "origin_longitude_deg": "ENU origin longitude (deg)",
    "origin_altitude_m": "ENU origin altitude (m), 0",
    "sample_rate_hz": "IQ sample rate the spectrogram was computed at",
    "n_fft": "FFT size", "hop_length": "STFT hop (samples)", "n_mels": "M", "n_frames": "F",
    "split_strategy": "random | spatial_blocks | by_group",
    "scenario_json": "synthetic only: copied from sessions.h5",
}


def _dtype_ok(ds: h5py.Dataset, dtype: str) -> bool:
    if dtype == "str":
        return h5py.check_string_dtype(ds.dtype) is not None
    return ds.dtype == np.dtype(dtype)


def open_checked(path: str | Path, fmt: str) -> h5py.File:
    """Open a Heimdall HDF5 file read-only, or raise a one-line HeimdallError saying why not."""
    path = Path(path)
    if not path.exists():
        raise HeimdallError(f"{path}: file not found (run the previous stage first)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise HeimdallError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None
    try:  # read the attributes while the file is open: the message quotes them after it is closed
        found, version = _attr_text(f, "format"), _attr_text(f, "format_version")
        if found != repr(fmt):
            raise HeimdallError(f"{path}: attribute 'format' is {found}, expected {fmt!r} (is this a {fmt} file?)")
        if version != repr(FORMAT_VERSION):
            raise HeimdallError(f"{path}: unsupported format_version {version}, expected {FORMAT_VERSION}")
    except BaseException:
        f.close()
        raise
    return f


def _attr_text(f: h5py.File, key: str) -> str:
    """repr of a scalar attribute as Python sees it ('heimdall.sessions', 1), or why it is not one."""
    try:
        v = f.attrs[key]
    except KeyError:
        return "missing"
    except (OSError, TypeError, ValueError) as e:  # an attribute h5py cannot decode
        return f"unreadable ({type(e).__name__})"
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():  # 1.0 written by another tool is still version 1
        v = int(v)
    return repr(v)[:80] if isinstance(v, (str, int)) and not isinstance(v, bool) else f"a {type(v).__name__} value"


def check_identities(f: h5py.File, path: str | Path) -> None:
    """Identities and physical values both file kinds carry, checked where they enter: unique non-empty
    receiver names, finite WGS-84 receiver positions, a finite positive carrier frequency per session,
    ground truth (where known) a latitude/longitude. One-line HeimdallError naming the row."""
    try:
        names = list(f["receivers/name"].asstr()[()])
        lat, lon = f["receivers/latitude_deg"][()], f["receivers/longitude_deg"][()]
        alt, freq = f["receivers/altitude_m"][()], f["sessions/frequency_hz"][()]
        tx_lat, tx_lon = f["sessions/tx_latitude_deg"][()], f["sessions/tx_longitude_deg"][()]
    except UnicodeDecodeError:
        raise HeimdallError(f"{path}: receivers/name is not valid UTF-8") from None
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name.strip():
            raise HeimdallError(f"{path}: receivers/name row {i} is empty")
        if name in seen:
            raise HeimdallError(f"{path}: receivers/name row {i} duplicates row {seen[name]} ({name!r}): "
                                "receiver names must be unique")
        seen[name] = i
    for what, v, bound in (("latitude_deg", lat, 90.0), ("longitude_deg", lon, 180.0), ("altitude_m", alt, 1e5)):
        bad = ~(np.abs(v) <= bound)  # NaN fails the comparison
        if bad.any():
            i = int(np.argmax(bad))
            raise HeimdallError(f"{path}: receivers/{what} row {i} ({names[i]!r}) is {v[i]!r}, not in "
                                f"[-{bound:g}, {bound:g}]")
    bad = ~(np.isfinite(freq) & (freq > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise HeimdallError(f"{path}: sessions/frequency_hz row {i} is {freq[i]!r}: a carrier frequency must be "
                            "finite and > 0")
    for what, v, bound in (("tx_latitude_deg", tx_lat, 90.0), ("tx_longitude_deg", tx_lon, 180.0)):
        bad = np.isfinite(v) & ~(np.abs(v) <= bound)  # NaN: truth unknown (allowed; extract_features needs it)
        if bad.any():
            i = int(np.argmax(bad))
            raise HeimdallError(f"{path}: sessions/{what} row {i} is {v[i]!r}, not in [-{bound:g}, {bound:g}]")


def validate_layout(f: h5py.File, layout: tuple[Field, ...], path: str | Path) -> dict[str, int]:
    """Check every dataset of ``layout`` exists with its dtype and consistent shapes.

    Returns the resolved dimension sizes, e.g. {"N": 6000, "R": 7, ...}.
    """
    dims: dict[str, int] = {}
    for fld in layout:
        if fld.path not in f:
            raise HeimdallError(f"{path}: missing dataset '{fld.path}'")
        ds = f[fld.path]
        if not isinstance(ds, h5py.Dataset):
            raise HeimdallError(f"{path}: '{fld.path}' is not a dataset")
        if not _dtype_ok(ds, fld.dtype):
            raise HeimdallError(f"{path}: dataset '{fld.path}' has dtype {ds.dtype}, expected {fld.dtype}")
        if len(ds.shape) != len(fld.shape):
            raise HeimdallError(f"{path}: dataset '{fld.path}' has shape {ds.shape}, expected {fld.shape}")
        for sym, size in zip(fld.shape, ds.shape):
            expected = int(sym) if sym.isdigit() else dims.setdefault(sym, size)
            if size != expected:
                raise HeimdallError(
                    f"{path}: dataset '{fld.path}' has shape {ds.shape}; dimension {sym} should be {expected}"
                )
    return dims


def create(f: h5py.File, fld: Field, shape: tuple[int, ...], **kwargs) -> h5py.Dataset:
    dtype = STR if fld.dtype == "str" else np.dtype(fld.dtype)
    return f.create_dataset(fld.path, shape=shape, dtype=dtype, **kwargs)


def field(layout: tuple[Field, ...], path: str) -> Field:
    for fld in layout:
        if fld.path == path:
            return fld
    raise KeyError(path)
