"""features.h5 -> the model's inputs for training and evaluation. The per-reading scalars, positions and ids
are held in memory (~250 bytes per session); the log-mel (57 KB per session: 100,000 sessions are 5.7 GB) is
read from the file by rows on demand (``H5Rows``). The Lightning DataModule is in heimdall.training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from heimdall import contracts as c
from heimdall.errors import HeimdallError

from heimdall.contracts import INPUT_NAMES  # noqa: F401  (re-exported: the model inputs' names)


READ_ROWS = 256  # sessions per HDF5 read (load_features' finiteness pass, H5Rows): 14.6 MB of default log-mel


class H5Rows:
    """A read-only (N, ...) HDF5 dataset read by rows on demand: ``rows[key]`` for an int, a slice, or an
    integer (or length-N boolean) index array returns a numpy array in the order asked (unsorted and repeated
    indices included), read in runs of consecutive rows of at most READ_ROWS rows.

    The file is reopened for every read (0.4-1.5 ms; an epoch of 66 batches of 64 random rows reads in 0.4-0.7 s,
    docs/performance.md): no handle outlives a read, so the object pickles and forks, and the file may be opened
    again elsewhere in the process. A read from a file changed since load_features is refused. The chunk cache is
    off (_uncached): with it, every random row read its whole chunk (64 sessions, 3.7 MB), ~45 ms per batch of 64.
    """

    def __init__(self, path: str | Path, name: str, shape: tuple[int, ...], dtype, signature: tuple):
        self.path, self.name = Path(path), name
        self.shape, self.dtype, self._signature = tuple(shape), np.dtype(dtype), signature

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"H5Rows({str(self.path)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype=None, copy=None):
        raise TypeError(f"{self!r} is read lazily: index it (rows[idx]; rows[:] reads it whole)")

    def _rows(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, slice):
            return np.arange(*key.indices(n))
        if isinstance(key, tuple):  # numpy would read (rows, more axes): not supported here
            raise TypeError(f"{self!r}: index with a slice or a 1-D index array, got a tuple")
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"{self!r}: boolean index of shape {idx.shape}, expected ({n},)")
            return np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"{self!r}: index with a slice or a 1-D index array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"{self!r}: index out of range for {n} rows")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self[np.array([key])][0]
        idx = self._rows(key)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        if len(idx) == 0:
            return out
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        uniq, first = np.unique(srt, return_index=True)  # first: where each row starts in srt
        try:
            with h5py.File(self.path, "r") as f:
                if _signature(f, self.path) != self._signature:
                    raise HeimdallError(f"{self.path}: changed since load_features read it (rewritten or replaced?); "
                                        "load it again")
                ds = _uncached(f, self.name)
                for p in range(0, len(uniq), READ_ROWS):  # READ_ROWS distinct rows at a time, in file order
                    u = uniq[p:p + READ_ROWS]
                    buf = np.empty((len(u), *self.shape[1:]), self.dtype)
                    runs = np.r_[np.flatnonzero(np.diff(u) != 1) + 1, len(u)]  # ends of runs of consecutive rows
                    for a, b in zip(np.r_[0, runs[:-1]], runs):
                        buf[a:b] = ds[int(u[a]):int(u[a]) + int(b - a)]
                    lo, hi = first[p], (first[p + READ_ROWS] if p + READ_ROWS < len(uniq) else len(srt))
                    out[order[lo:hi]] = buf if hi - lo == len(u) else buf[np.searchsorted(u, srt[lo:hi])]
        except (OSError, KeyError) as e:
            raise HeimdallError(f"{self.path}: read of '{self.name}' failed (truncated or corrupt?): {e}") from None
        return out


def _uncached(f: h5py.File, name: str) -> h5py.Dataset:
    """The dataset with its chunk cache off, set on the dataset itself: a file's cache is its first opener's in
    the process (a second h5py.File of the same path shares it), and with a cache every random row read its whole
    chunk (measured: 7x slower with another handle open)."""
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl), readonly=True)  # readonly: h5py caches its reader


def _signature(f: h5py.File, path: Path) -> tuple:
    """The open file's identity (device, inode, size, mtime): a file replaced under the same name differs."""
    try:
        st = os.fstat(f.id.get_vfd_handle())
    except (TypeError, ValueError, OSError):  # a driver without a file descriptor
        st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _first_non_finite(ds: h5py.Dataset) -> tuple[int, ...] | None:
    """Index of the first non-finite value of an (N, ...) dataset, read READ_ROWS rows at a time."""
    for a in range(0, ds.shape[0], READ_ROWS):
        block = ds[a:a + READ_ROWS]
        bad = ~np.isfinite(block)
        if bad.any():
            i = np.argwhere(bad)[0]
            return (a + int(i[0]), *(int(j) for j in i[1:]))
    return None


@dataclass
class FeatureSet:
    logmel: H5Rows | np.ndarray  # (N, R, M, F) f4, read by rows from features.h5
    rss_dbm: np.ndarray  # (N, R) f4
    snr_db: np.ndarray
    present: np.ndarray  # (N, R) bool
    has_iq: np.ndarray
    target_enu_m: np.ndarray  # (N, 2) f8
    split: np.ndarray  # (N,) u1
    session_id: np.ndarray
    tx_power_dbm: np.ndarray
    frequency_hz: np.ndarray  # (N,)
    receiver_names: list[str]
    receiver_enu_m: np.ndarray  # (R, 3)
    receiver_latlon: np.ndarray  # (R, 3) lat, lon, alt
    origin: tuple[float, float, float]
    normalization: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)

    @property
    def n_receivers(self) -> int:
        return len(self.receiver_names)

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.split == c.SPLIT_CODES[name])

    def scenario_json(self) -> str | None:
        return self.attrs.get("scenario_json")

    def rss_view(self) -> dict:
        """The RSS-only view the baselines take (same keys as baselines.load_rss_features)."""
        return {
            "rss": self.rss_dbm.astype(np.float64), "snr": self.snr_db.astype(np.float64),
            "present": self.present, "rx_enu": self.receiver_enu_m, "pos": self.target_enu_m,
            "split": self.split, "frequency_hz": self.frequency_hz,
            "scenario_json": self.scenario_json(), "origin": self.origin,
        }

    def model_inputs(self, idx: np.ndarray, logmel: bool = True) -> tuple[torch.Tensor, ...]:
        """The model's six inputs for the given sessions (receiver_id = stored receiver order). ``logmel=False``:
        a (n, 1, 1, 1) zero placeholder instead (an RSS-only model; nothing read from the file)."""
        n = len(idx)
        rid = np.tile(np.arange(self.n_receivers, dtype=np.int64), (n, 1))
        return (
            torch.from_numpy(self.logmel[idx]) if logmel else torch.zeros(n, 1, 1, 1),
            torch.from_numpy(self.rss_dbm[idx]),
            torch.from_numpy(self.snr_db[idx]),
            torch.from_numpy(self.present[idx].astype(np.float32)),
            torch.from_numpy(self.has_iq[idx].astype(np.float32)),
            torch.from_numpy(rid),
        )

    def input_batches(self, idx: np.ndarray, batch: int = 128):
        """The model inputs of sessions ``idx`` in batches of ``batch`` (bounded memory)."""
        for s in range(0, len(idx), batch):
            yield self.model_inputs(idx[s:s + batch])


_NORMALIZATION_KEYS = tuple(fld.path.split("/", 1)[1] for fld in c.FEATURES_LAYOUT if fld.path.startswith("normalization/"))


def load_features(path: str | Path) -> FeatureSet:
    """Read and check features.h5: layout, finiteness, non-empty train split. Everything but the log-mel is
    read into memory; the log-mel is checked READ_ROWS sessions at a time and left in the file (H5Rows)."""
    path = Path(path)
    with c.open_checked(path, c.FEATURES_FORMAT) as f:
        c.validate_layout(f, c.FEATURES_LAYOUT, path)
        try:
            c.check_identities(f, path)
            ds = f["features/logmel_db"]
            features = FeatureSet(
                logmel=H5Rows(path, ds.name, ds.shape, ds.dtype, _signature(f, path)),
                rss_dbm=f["features/rss_dbm"][()],
                snr_db=f["features/snr_db"][()],
                present=f["features/present"][()],
                has_iq=f["features/has_iq"][()],
                target_enu_m=f["sessions/target_enu_m"][()],
                split=f["sessions/split"][()],
                session_id=f["sessions/session_id"].asstr()[()],
                tx_power_dbm=f["sessions/tx_power_dbm"][()],
                frequency_hz=f["sessions/frequency_hz"][()],
                receiver_names=list(f["receivers/name"].asstr()[()]),
                receiver_enu_m=f["receivers/enu_m"][()],
                receiver_latlon=np.stack(
                    [f["receivers/latitude_deg"][()], f["receivers/longitude_deg"][()], f["receivers/altitude_m"][()]], 1
                ),
                origin=(float(f.attrs["origin_latitude_deg"]), float(f.attrs["origin_longitude_deg"]),
                        float(f.attrs["origin_altitude_m"])),
                normalization={k: np.asarray(f[f"normalization/{k}"][()]) for k in _NORMALIZATION_KEYS},
                attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()},
            )
            bad = _first_non_finite(ds)  # the log-mel's check, in bounded pieces; the first reported as before
        except (OSError, KeyError) as e:
            raise HeimdallError(f"{path}: read failed (truncated or corrupt?): {e}") from None
        except (TypeError, ValueError) as e:  # an attribute of the wrong kind, text that is not UTF-8
            raise HeimdallError(f"{path}: malformed attribute or text: {e}") from None
    if bad is not None:
        raise HeimdallError(f"{path}: non-finite value in 'features/logmel_db' at index {bad}")
    for name, dataset in (("rss_dbm", "features/rss_dbm"), ("snr_db", "features/snr_db"),
                          ("target_enu_m", "sessions/target_enu_m")):
        arr = getattr(features, name)
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise HeimdallError(f"{path}: non-finite value in '{dataset}' at index {tuple(int(i) for i in bad)}")
    for k, v in features.normalization.items():
        if not np.isfinite(v).all():
            raise HeimdallError(f"{path}: normalization/{k} is not finite")
        # a std divides the inputs (targets): 0 trains to NaN, so it is refused here, by name
        if "_std_" in k and not (v > 0).all():
            raise HeimdallError(f"{path}: normalization/{k} has a value {float(v.min())!r} <= 0 (a std divides "
                                "the model's inputs; re-run extract_features)")
    lat, lon, alt = features.origin
    if not (abs(lat) <= 90 and abs(lon) <= 180 and np.isfinite(alt)):
        raise HeimdallError(f"{path}: attributes origin_latitude_deg / origin_longitude_deg / origin_altitude_m = "
                            f"{features.origin} are not a position")
    if len(features.indices("train")) == 0:
        raise HeimdallError(f"{path}: the train split is empty")
    if len(features.indices("val")) == 0:
        raise HeimdallError(f"{path}: the val split is empty (early stopping and calibration need it)")
    return features  # an empty test split is a production run (heimdall.splits): evaluate says so


def metadata_json(features: FeatureSet) -> str:
    return json.dumps({"receivers": features.receiver_names, "origin": features.origin}, sort_keys=True)
