"""Writer for data/sessions.h5 (contract in heimdall.contracts / docs/data-contracts.md).

Every source (simulator, PostgreSQL) hands the writer the same pieces, so all later stages see
one format whatever the data came from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from heimdall import contracts as c
from heimdall.atomic import h5_create
from heimdall.errors import HeimdallError

# IQ chunk = 8 sessions x all receivers x all samples: extract_features reads whole sessions in
# batches, so a chunk is never split by a read, and 8 x 7 x 3000 x 4 B = 672 kB fits HDF5's cache.
IQ_CHUNK_SESSIONS = 8


def write_sessions(
    path: Path,
    *,
    attrs: Mapping[str, object],
    receivers: Mapping[str, np.ndarray],
    sessions: Mapping[str, np.ndarray],
    n_samples: int,
    blocks: Iterable[tuple[slice, Mapping[str, np.ndarray]]],
    progress: bool = True,
) -> None:
    """Write a complete sessions.h5 at ``path`` (callers pass a temporary path, then rename).

    ``receivers`` / ``sessions`` map dataset names (without group) to arrays; ``blocks`` yields
    (session slice, {present, rss_dbm, snr_db, has_iq, iq, iq_scale}) in any order, covering
    every session exactly once. Missing keys in a block default to "no IQ"/"present".
    """
    n = len(sessions["session_id"])
    r = len(receivers["name"])
    layout = {fld.path: fld for fld in c.SESSIONS_LAYOUT}
    # track_times=False everywhere (h5py's default): no wall-clock inside, so same input -> same bytes.
    with h5_create(path) as f:
        f.attrs["format"] = c.SESSIONS_FORMAT
        f.attrs["format_version"] = c.FORMAT_VERSION
        for k, v in attrs.items():
            f.attrs[k] = v
        for group, table, size in (("receivers", receivers, r), ("sessions", sessions, n)):
            for name, values in table.items():
                fld = layout[f"{group}/{name}"]
                arr = np.asarray(values)
                if arr.shape[0] != size:
                    raise ValueError(f"{group}/{name}: {arr.shape[0]} rows, expected {size}")
                ds = c.create(f, fld, arr.shape)
                ds[...] = arr.astype(object) if fld.dtype == "str" else arr.astype(fld.dtype)
        meas = {
            "present": c.create(f, layout["measurements/present"], (n, r)),
            "rss_dbm": c.create(f, layout["measurements/rss_dbm"], (n, r), fillvalue=np.nan),
            "snr_db": c.create(f, layout["measurements/snr_db"], (n, r), fillvalue=np.nan),
            "has_iq": c.create(f, layout["measurements/has_iq"], (n, r)),
            "iq_scale": c.create(f, layout["measurements/iq_scale"], (n, r)),
            "iq": c.create(
                f,
                layout["measurements/iq"],
                (n, r, n_samples, 2),
                chunks=(min(IQ_CHUNK_SESSIONS, max(n, 1)), r, n_samples, 2),
            ),
        }
        written = 0
        with tqdm(total=n, desc="export_sessions", unit="session", disable=None if progress else True) as bar:
            for sl, block in blocks:
                for name, ds in meas.items():
                    if name in block:
                        ds[sl] = block[name]
                written += sl.stop - sl.start
                bar.update(sl.stop - sl.start)
        if written != n:
            raise RuntimeError(f"source produced {written} sessions, expected {n}")


def open_sessions(path: Path) -> tuple[h5py.File, dict[str, int]]:
    """Open a sessions.h5 checked against the contract -> (open file, dimension sizes); the caller closes it."""
    f = c.open_checked(path, c.SESSIONS_FORMAT)
    try:
        dims = c.validate_layout(f, c.SESSIONS_LAYOUT, path)
        if dims["N"] == 0:
            raise HeimdallError(f"{path}: contains no sessions")
        c.check_identities(f, path)
        for key in ("sample_rate_hz", "n_samples"):
            if key not in f.attrs:
                raise HeimdallError(f"{path}: missing attribute '{key}'")
        try:
            n_samples, rate = int(f.attrs["n_samples"]), float(f.attrs["sample_rate_hz"])
        except (TypeError, ValueError, OSError):
            raise HeimdallError(f"{path}: attributes n_samples / sample_rate_hz must be numbers") from None
        if n_samples != dims["S"]:
            raise HeimdallError(f"{path}: attribute n_samples={n_samples} but IQ has {dims['S']}")
        if not (math.isfinite(rate) and rate > 0):
            raise HeimdallError(f"{path}: attribute sample_rate_hz must be finite and > 0, got {rate!r}")
    except OSError as e:  # a damaged dataset read while checking
        f.close()
        raise HeimdallError(f"{path}: read failed (truncated or corrupt?): {e}") from None
    except BaseException:
        f.close()
        raise
    return f, dims
