"""The family of held-out splits `benchmarks/powder.py --family` runs on the POWDER data (docs/results.md).

Each member holds out data the way a deployed model meets it, built from the public files only, and
every member is run the way the issue's evaluation runs the preset: the held-out sessions are an
explicit list (`split.strategy: list`), and validation (early stopping, every calibration) is carved
out of the rest exactly as the preset carves it (spatial blocks of the preset's `block_size_km`).
Before, the random and month members used `strategy: random` / `time`, whose validation is random
sessions / the latest ones: a calibration no user of the preset gets.

| member | held out (the test split) |
|---|---|
| `random` | 20 % of sessions at random (leaks: consecutive samples of a trip are metres apart) |
| `grid_cells` | the sessions in 20 % of the 250 m grid cells, at random |
| `month_<mon>` | one calendar month (Apr., Jul., Nov. 2022) |
| `outer_area` | the 15 % of sessions farthest from the receivers' centroid |
| `walking`, `cycling`, `driving`, `static` | one mobility kind |

Mobility is inferred: samples are split into trips at gaps over 30 s; a trip's median speed between
consecutive samples gives its kind (static < 0.5 m/s ≤ walking < 2.5 ≤ cycling < 6 ≤ driving).

The reference is the fingerprinting a user would try first (and the issue measured with):
distance-weighted kNN on the raw RSS vector (−101 dBm where not heard), fitted on every
non-held-out session (train + val), k chosen by 5-fold cross-validation on those sessions only.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

MONTHS = {"month_apr": ("2022-04-01", "2022-05-01"), "month_jul": ("2022-07-01", "2022-08-01"),
          "month_nov": ("2022-11-01", "2022-12-01")}
MOBILITY_KINDS = ("static", "walking", "cycling", "driving")
SPEED_EDGES_M_S = (0.5, 2.5, 6.0)
TRIP_GAP_S = 30.0
OUTER_FRACTION = 0.15
HOLDOUT_FRACTION = 0.2  # random and grid_cells
GRID_CELL_M = 250.0
HOLDOUT_SEED = 19
NOT_HEARD_DBM = -101.0
KNN_K = tuple(range(1, 31))


def read_dataset(data: Path) -> dict:
    """Session ids (as `heimdall db import-powder` makes them), start times, positions, from the CSV."""

    from heimdall import geo
    from heimdall.db.powder import _uid, read_receivers, read_samples

    receivers = read_receivers(data / "location_coordinates.json")
    # the timestamps' zone as `heimdall db import-powder` reads them by default (UTC): the ids match
    samples, _, _ = read_samples(data / "single_tx.csv", receivers, timezone.utc)
    lat = np.array([s["lat"] for s in samples])
    lon = np.array([s["lon"] for s in samples])
    rx = np.array([v for v in receivers.values() if v is not None])
    origin = (float(rx[:, 0].mean()), float(rx[:, 1].mean()), 0.0)
    east, north, _ = geo.geodetic_to_enu(lat, lon, np.zeros(len(lat)), origin)
    return {"session_id": np.array([_uid("session", *s["key"]) for s in samples]),
            "t": np.array([s["start"].timestamp() for s in samples]), "east": east, "north": north}


def mobility(t: np.ndarray, east: np.ndarray, north: np.ndarray) -> np.ndarray:
    """Each session's mobility kind (MOBILITY_KINDS), from the median speed of its trip."""
    order = np.argsort(t, kind="stable")
    ts, e, n = t[order], east[order], north[order]
    new_trip = np.r_[True, np.diff(ts) > TRIP_GAP_S]
    trip = np.cumsum(new_trip) - 1
    speed = np.r_[np.nan, np.hypot(np.diff(e), np.diff(n)) / np.maximum(np.diff(ts), 1e-3)]
    speed[new_trip] = np.nan
    kinds = np.empty(len(t), dtype=object)
    for k in range(trip.max() + 1):
        s = speed[trip == k]
        med = float(np.nanmedian(s)) if np.isfinite(s).any() else 0.0  # a lone sample: a spot
        kinds[order[trip == k]] = MOBILITY_KINDS[int(np.searchsorted(SPEED_EDGES_M_S, med, side="right"))]
    return kinds


def members(data: Path) -> dict[str, tuple[list[str], list[str] | None]]:
    """{member: (param overrides, held-out session ids for a `list` split or None)}."""
    d = read_dataset(data)
    ids, rng = d["session_id"], np.random.default_rng(HOLDOUT_SEED)
    out: dict[str, tuple[list[str], list[str] | None]] = {"random": ([], ids[rng.random(len(ids)) < HOLDOUT_FRACTION].tolist())}
    cell = np.floor(d["east"] / GRID_CELL_M).astype(np.int64) * 100_003 + np.floor(d["north"] / GRID_CELL_M).astype(np.int64)
    cells = np.unique(cell)
    out["grid_cells"] = ([], ids[np.isin(cell, cells[rng.random(len(cells)) < HOLDOUT_FRACTION])].tolist())
    for name, (lo, hi) in MONTHS.items():
        t_lo, t_hi = (datetime.fromisoformat(x).replace(tzinfo=timezone.utc).timestamp() for x in (lo, hi))
        out[name] = ([], ids[(d["t"] >= t_lo) & (d["t"] < t_hi)].tolist())
    r = np.hypot(d["east"], d["north"])
    out["outer_area"] = ([], d["session_id"][r >= np.quantile(r, 1 - OUTER_FRACTION)].tolist())
    kinds = mobility(d["t"], d["east"], d["north"])
    for kind in MOBILITY_KINDS:
        out[kind] = ([], d["session_id"][kinds == kind].tolist())
    return out


def reference_knn(features_path: Path, seed: int = 0) -> dict:
    """Distance-weighted kNN on the raw RSS vector, fitted on train + val, k by 5-fold CV there."""
    from sklearn.model_selection import KFold
    from sklearn.neighbors import KNeighborsRegressor

    from heimdall.data import load_features

    f = load_features(features_path)
    x = np.where(f.present, f.rss_dbm, NOT_HEARD_DBM).astype(np.float64)
    y = f.target_enu_m
    fit = np.concatenate([f.indices("train"), f.indices("val")])
    te = f.indices("test")
    cv = {}
    for k in KNN_K:
        errs = []
        for a, b in KFold(5, shuffle=True, random_state=seed).split(fit):
            m = KNeighborsRegressor(n_neighbors=min(k, len(a)), weights="distance").fit(x[fit[a]], y[fit[a]])
            errs.append(np.linalg.norm(m.predict(x[fit[b]]) - y[fit[b]], axis=1))
        cv[k] = float(np.concatenate(errs).mean())
    k = min(cv, key=cv.get)
    pred = KNeighborsRegressor(n_neighbors=k, weights="distance").fit(x[fit], y[fit]).predict(x[te])
    err = np.linalg.norm(pred - y[te], axis=1)
    return {"k": k, "mean_error_m": float(err.mean()), "median_error_m": float(np.median(err)), "n_test": int(len(te))}


def geometric_mean(values) -> float:
    v = [float(x) for x in values]
    return math.exp(sum(math.log(x) for x in v) / len(v))
