"""Stage extract_features: data/sessions.h5 -> data/features.h5.

Streams sessions in batches (bounded memory: one batch of IQ at a time), computes per-receiver
log-mel spectrograms with torchaudio, puts receivers and targets in the ENU frame, assigns the
train/val/test split and computes normalisation statistics from the training split only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from heimdall import contracts as c
from heimdall import geo
from heimdall.atomic import atomic_path, h5_create, write_failure
from heimdall.budget import check_extract_features
from heimdall.errors import HeimdallError
from heimdall.features import LogMelFrontend, featurize_block
from heimdall.params import Params
from heimdall.sessions_file import open_sessions
from heimdall.splits import assign_split

log = logging.getLogger(__name__)
EARTH_MEAN_RADIUS_KM = 6371.0088

_COPIED_SESSION_FIELDS = (
    "session_id", "group_id", "start_time_unix_s", "frequency_hz",
    "tx_latitude_deg", "tx_longitude_deg", "tx_power_dbm",
)
_COPIED_RECEIVER_FIELDS = ("name", "latitude_deg", "longitude_deg", "altitude_m")


class _RunningMoments:
    """Streaming mean/std (float64 sums) over the rows a mask selects."""

    def __init__(self, shape=()):
        self.n = 0
        self.s = np.zeros(shape)
        self.ss = np.zeros(shape)

    def add(self, values: np.ndarray) -> None:  # values: (k, *shape)
        v = values.astype(np.float64)
        self.n += v.shape[0]
        self.s += v.sum(axis=0)
        self.ss += (v * v).sum(axis=0)

    def result(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0:
            raise HeimdallError(f"extract_features: no training rows with {what}; cannot normalise")
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.ss / self.n - mean**2, 0.0))
        return mean, np.maximum(std, 1e-6)


def run(params: Params, sessions_path: Path, out: Path, progress: bool = True) -> dict:
    p = params.extract_features
    torch.set_num_threads(max(1, torch.get_num_threads()))
    src, dims = open_sessions(sessions_path)
    try:
        check_extract_features(p, dims["N"], dims["R"], dims["S"], p.n_frames, out)
    except BaseException:
        src.close()
        raise
    with src, atomic_path(out) as tmp:
        try:
            summary = _extract(src, dims, p, sessions_path, tmp, progress)
        except OSError as e:  # HDF5 read errors inside a damaged file surface here
            if write_failure(e, tmp):
                raise  # the output's disk: atomic_path names the output
            raise HeimdallError(f"{sessions_path}: read failed (truncated or corrupt?): {e}") from None
    return summary


def _extract(src: h5py.File, dims: dict, p, sessions_path: Path, path: Path, progress: bool) -> dict:
    n, r, s = dims["N"], dims["R"], dims["S"]
    rate_hz = float(src.attrs["sample_rate_hz"])
    rx = {k: src[f"receivers/{k}"][()] for k in _COPIED_RECEIVER_FIELDS}
    sess = {k: src[f"sessions/{k}"][()] for k in _COPIED_SESSION_FIELDS}
    bad_rx = ~np.isfinite(rx["latitude_deg"]) | ~np.isfinite(rx["longitude_deg"]) | ~np.isfinite(rx["altitude_m"])
    if bad_rx.any():
        raise HeimdallError(f"{sessions_path}: receiver row {int(np.argmax(bad_rx))} has a non-finite position")
    bad_tx = ~np.isfinite(sess["tx_latitude_deg"]) | ~np.isfinite(sess["tx_longitude_deg"])
    if bad_tx.any():
        raise HeimdallError(f"{sessions_path}: session row {int(np.argmax(bad_tx))} has no finite ground-truth position")
    ids = sess["session_id"]
    if len(np.unique(ids)) != n:
        raise HeimdallError(f"{sessions_path}: duplicate session ids")
    # Targets no receiver could have heard (a GPS fix without a position at 0, 0) are excluded before the split
    # and the normalisation, and counted: one of them would size the radio map to the globe.
    keep = nearest_receiver_km(sess["tx_latitude_deg"], sess["tx_longitude_deg"], rx["latitude_deg"],
                               rx["longitude_deg"]) <= p.max_target_distance_km
    outside = int((~keep).sum())
    if outside == n:
        raise HeimdallError(f"{sessions_path}: every session's transmitter is farther than "
                            f"extract_features.max_target_distance_km={p.max_target_distance_km:g} from every receiver")
    if outside:
        log.warning("%s: %d session(s) excluded, transmitter farther than extract_features.max_target_distance_km="
                    "%g from every receiver (first: row %d, %s)", sessions_path, outside, p.max_target_distance_km,
                    int(np.argmax(~keep)), ids[np.argmax(~keep)])
        sess = {k: v[keep] for k, v in sess.items()}
        n = int(keep.sum())

    origin = (*p.origin, 0.0) if p.origin is not None else geo.network_origin(rx["latitude_deg"], rx["longitude_deg"])
    rx_enu = np.stack(geo.geodetic_to_enu(rx["latitude_deg"], rx["longitude_deg"], rx["altitude_m"], origin), axis=1)
    te, tn, _ = geo.geodetic_to_enu(sess["tx_latitude_deg"], sess["tx_longitude_deg"], np.zeros(n), origin)
    target = np.stack([te, tn], axis=1)
    split = assign_split(
        p.split.strategy,
        target_enu_m=target,
        group_id=sess["group_id"],
        val_fraction=p.split.val_fraction,
        test_fraction=p.split.test_fraction,
        block_size_m=p.split.block_size_km * 1e3,
        seed=p.split.seed,
        start_time_unix_s=sess["start_time_unix_s"],
        session_id=sess["session_id"],
        target_latlon=np.stack([sess["tx_latitude_deg"], sess["tx_longitude_deg"]], 1),
        test_from=p.split.test_from,
        test_until=p.split.test_until,
        test_area=p.split.test_area,
        test_ids_file=p.split.test_ids_file,
    )
    is_train = split == c.SPLIT_CODES["train"]

    try:
        frontend = LogMelFrontend(rate_hz, s, p.n_fft, p.n_mels, p.n_frames)
    except ValueError as e:
        raise HeimdallError(f"extract_features: {e}") from None

    layout = {fld.path: fld for fld in c.FEATURES_LAYOUT}
    logmel_stats, rss_stats, snr_stats = _RunningMoments(p.n_mels), _RunningMoments(), _RunningMoments()
    skipped_nonfinite = 0
    no_receivers = 0
    with h5_create(path) as f:
        f.attrs.update({
            "format": c.FEATURES_FORMAT,
            "format_version": c.FORMAT_VERSION,
            "source": src.attrs.get("source", "unknown"),
            "origin_latitude_deg": origin[0],
            "origin_longitude_deg": origin[1],
            "origin_altitude_m": origin[2],
            "sample_rate_hz": rate_hz,
            "n_fft": p.n_fft,
            "hop_length": frontend.hop_length,
            "n_mels": p.n_mels,
            "n_frames": p.n_frames,
            "split_strategy": p.split.strategy,
        })
        if "scenario_json" in src.attrs:
            f.attrs["scenario_json"] = src.attrs["scenario_json"]
        for k, v in rx.items():
            c.create(f, layout[f"receivers/{k}"], v.shape)[...] = v
        c.create(f, layout["receivers/enu_m"], rx_enu.shape)[...] = rx_enu
        for k, v in sess.items():
            c.create(f, layout[f"sessions/{k}"], v.shape)[...] = v
        c.create(f, layout["sessions/target_enu_m"], target.shape)[...] = target
        c.create(f, layout["sessions/split"], split.shape)[...] = split

        b = p.batch_sessions
        logmel = c.create(
            f, layout["features/logmel_db"], (n, r, p.n_mels, p.n_frames),
            chunks=(min(b, n), r, p.n_mels, p.n_frames),
        )
        out_rss = c.create(f, layout["features/rss_dbm"], (n, r))
        out_snr = c.create(f, layout["features/snr_db"], (n, r))
        out_present = c.create(f, layout["features/present"], (n, r))
        out_has_iq = c.create(f, layout["features/has_iq"], (n, r))

        m = src["measurements"]
        n_in, written = len(keep), 0
        with tqdm(total=n_in, desc="extract_features", unit="session", disable=None if progress else True) as bar:
            for start in range(0, n_in, b):
                src_sl = slice(start, min(n_in, start + b))
                rows = keep[src_sl]
                sl = slice(written, written + int(rows.sum()))
                rows = slice(None) if sl.stop - sl.start == src_sl.stop - src_sl.start else rows  # no copy
                written = sl.stop
                bar.update(src_sl.stop - src_sl.start)
                if sl.stop == sl.start:
                    continue
                feats, skipped = featurize_block(
                    *(m[k][src_sl][rows] for k in ("present", "rss_dbm", "snr_db", "has_iq", "iq_scale")),
                    m["iq"][src_sl][rows],  # (B, R, S, 2) int16: one contiguous read of whole chunks
                    frontend,
                )
                skipped_nonfinite += skipped
                no_receivers += int((~feats["present"].any(axis=1)).sum())
                mel, rss, snr = feats["logmel_db"], feats["rss_dbm"], feats["snr_db"]
                present, has_iq = feats["present"], feats["has_iq"]
                logmel[sl] = mel
                out_rss[sl], out_snr[sl] = rss, snr
                out_present[sl], out_has_iq[sl] = present, has_iq

                tr = is_train[sl]
                sel = has_iq & tr[:, None]
                logmel_stats.add(mel[sel].transpose(0, 2, 1).reshape(-1, p.n_mels))  # every frame a row
                rss_stats.add(rss[present & tr[:, None]])
                snr_stats.add(snr[present & tr[:, None]])

        have_iq = logmel_stats.n > 0
        lm_mean, lm_std = logmel_stats.result("IQ") if have_iq else (np.zeros(p.n_mels), np.ones(p.n_mels))
        rss_mean, rss_std = rss_stats.result("a present receiver")
        snr_mean, snr_std = snr_stats.result("a present receiver")
        norm = {
            "logmel_mean_db": lm_mean, "logmel_std_db": lm_std,
            "rss_mean_dbm": rss_mean, "rss_std_db": rss_std,
            "snr_mean_db": snr_mean, "snr_std_db": snr_std,
            "target_mean_m": target[is_train].mean(axis=0), "target_std_m": target[is_train].std(axis=0),
        }
        for k, v in norm.items():
            fld = layout[f"normalization/{k}"]
            c.create(f, fld, np.shape(v))[...] = v

    counts = {name: int((split == code).sum()) for name, code in c.SPLIT_CODES.items()}
    # Sessions left with no usable receiver are kept (the model answers with its prior; metrics stay
    # finite) and counted, so a bad export is visible in the stage summary.
    return {"sessions": n, "receivers": r, "split": counts, "skipped_nonfinite_measurements": skipped_nonfinite,
            "sessions_without_receivers": no_receivers, "sessions_outside_area": outside}


def nearest_receiver_km(lat, lon, rx_lat, rx_lon) -> np.ndarray:
    """Great-circle distance (km, spherical Earth) from every position to its nearest receiver."""
    p1, p2 = np.radians(np.asarray(lat, float))[:, None], np.radians(np.asarray(rx_lat, float))[None]
    dlon = np.radians(np.asarray(lon, float))[:, None] - np.radians(np.asarray(rx_lon, float))[None]
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return (2 * EARTH_MEAN_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))).min(axis=1)
