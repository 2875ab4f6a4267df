"""Classical RSS-only localization baselines and the Cramér–Rao bound, for judging learned models.

* :func:`grid_mle` — maximum-likelihood position on a :class:`~heimdall.radiomap.RadioMapGrid`
  (log-distance, kriged or true map) with the unknown TX power profiled out;
* :func:`knn` — RSS fingerprinting against the training sessions;
* :func:`crlb_rmse` — the Cramér–Rao lower bound on position RMSE under the true map;
* :func:`evaluate_baselines` — all of the above on a features.h5 (fit on train, k tuned on val,
  scored on test).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from heimdall.kriging import fit_kriged_map
from heimdall.radiomap import (
    DEFAULT_FIT_MIN_SNR_DB,
    DEFAULT_GRID_MARGIN_M,
    DEFAULT_GRID_SPACING_M,
    RadioMapGrid,
    bounds_around,
    fit_log_distance,
    free_space_loss_1km_db,
    mapped_receivers,
    usable_mask,
)
from heimdall.txpower import profile_tx_power

# SNR threshold of the likelihood: None keeps every present reading. Weak readings carry the
# useful fact "this receiver barely hears it" and scatter only a little more than strong ones (the
# reported RSS includes the noise: +1.2 dB at 5 dB SNR). On the default campaign's validation split
# dropping them only hurt (oracle median 1.6 km with all readings, 1.7 at >= 3 dB, 3.5 at >= 10 dB).
DEFAULT_MLE_MIN_SNR_DB: float | None = None
MIN_READINGS = 3  # x, y and the unknown TX power
KNN_K_CANDIDATES = (1, 2, 3, 5, 8, 12, 20, 30)


# ---- maximum likelihood on a radio-map grid ------------------------------------------------------
def grid_mle(
    grid: RadioMapGrid,
    rss: np.ndarray,
    present: np.ndarray,
    snr: np.ndarray | None = None,
    min_snr_db: float | None = DEFAULT_MLE_MIN_SNR_DB,
    *,
    refine: bool = True,
    refine_spacing_m: float = 100.0,
    refine_half_width_cells: float = 1.5,
    tx_power_range_dbm: tuple[float, float] | None = None,
    fallback_pos: np.ndarray | None = None,
    chunk_sessions: int = 32,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Maximum-likelihood transmitter position of every session on a radio map.

    Likelihood: ``rss_i ~ N(P + mean_db_i(x), sigma_db_i^2)`` over the usable readings, with the
    TX power ``P`` profiled out analytically (its weighted-mean estimate), minimised over every grid
    cell, then over a finer local grid (``refine_spacing_m``, +-``refine_half_width_cells`` cells
    around the best cell, bilinear map via :meth:`RadioMapGrid.sample`). With
    ``tx_power_range_dbm`` the power estimate is confined to that range (a uniform prior on the TX
    power, in the map's units: only meaningful for an absolutely calibrated map such as the oracle
    or an anchored fit); the default leaves it free.

    Usable readings: present and SNR >= ``min_snr_db``. A session with fewer than 3 usable readings
    uses all its present readings; with fewer than 3 present the position is not identifiable
    (unknown power leaves at most a curve), so it gets ``fallback_pos`` (default: the grid centre,
    the prior mean under a uniform prior) and ``extras['fallback']`` is True. Never NaN.

    Returns
    -------
    pos : (N, 2) estimated (east, north) in metres.
    extras : ``tx_power_dbm`` (N,) profiled power (relative to the map's constant), ``cost`` (N,)
        weighted sum of squared residuals at the estimate, ``n_used`` (N,) readings used,
        ``fallback`` (N,) bool.
    """
    rss = np.asarray(rss, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    n_sessions, n_rx = rss.shape
    if n_rx != grid.n_receivers:
        raise ValueError(f"grid_mle: rss has {n_rx} receivers, the grid {grid.n_receivers}")
    usable = usable_mask(present, snr, min_snr_db)
    too_few = usable.sum(axis=1) < MIN_READINGS
    usable[too_few] = present[too_few]
    fallback = usable.sum(axis=1) < MIN_READINGS
    usable[fallback] = False

    weights = usable / np.square(grid.sigma_db)  # (N, R); 0 where not used
    y = np.where(usable, rss, 0.0)
    east, north = grid.cell_centres()
    cell_east, cell_north = east.ravel(), north.ravel()
    maps = grid.mean_db.reshape(n_rx, -1).astype(np.float64)  # (R, G)

    pos = np.empty((n_sessions, 2))
    power = np.zeros(n_sessions)
    cost = np.zeros(n_sessions)
    todo = np.flatnonzero(~fallback)
    for start in range(0, len(todo), chunk_sessions):
        rows = todo[start : start + chunk_sessions]
        w = weights[rows]
        grid_power, grid_cost = _profiled(y[rows][:, :, None] - maps, w, tx_power_range_dbm)  # (B, G)
        best = np.argmin(grid_cost, axis=1)
        pos[rows, 0], pos[rows, 1] = cell_east[best], cell_north[best]
        power[rows] = grid_power[np.arange(len(rows)), best]
        cost[rows] = grid_cost[np.arange(len(rows)), best]
        if refine:
            pos[rows], power[rows], cost[rows] = _refine(
                grid, pos[rows], y[rows], w, refine_spacing_m, refine_half_width_cells, tx_power_range_dbm
            )

    if fallback.any():
        e0, e1, n0, n1 = grid.bounds
        default = np.array([(e0 + e1) / 2, (n0 + n1) / 2])
        pos[fallback] = default if fallback_pos is None else np.asarray(fallback_pos, dtype=np.float64)
    extras = {"tx_power_dbm": power, "cost": cost, "n_used": usable.sum(axis=1), "fallback": fallback}
    return pos, extras


def _profiled(resid: np.ndarray, weight: np.ndarray, power_range) -> tuple[np.ndarray, np.ndarray]:
    """TX power and cost (B, K) at every candidate, the power optionally confined to ``power_range``
    (the cost is quadratic in the power around its free optimum: clipping adds Σw·(clipped − free)²)."""
    power, cost = profile_tx_power(resid, weight)
    if power_range is not None:
        clipped = np.clip(power, *power_range)
        cost = cost + weight.sum(-1)[:, None] * (clipped - power) ** 2
        power = clipped
    return power, cost


def _refine(grid: RadioMapGrid, start_pos, y, w, spacing_m: float, half_width_cells: float, power_range):
    """Minimise the profiled cost on a fine local grid around each session's best cell."""
    half = half_width_cells * grid.spacing_m
    offsets = np.arange(-half, half + 1e-6, spacing_m)
    de, dn = (v.ravel() for v in np.meshgrid(offsets, offsets))  # (K,)
    e0, e1, n0, n1 = grid.bounds
    east = np.clip(start_pos[:, 0:1] + de, e0, e1)  # (B, K)
    north = np.clip(start_pos[:, 1:2] + dn, n0, n1)
    resid = y[:, :, None] - np.moveaxis(grid.sample(east, north), 1, 2)  # (B, R, K)
    power, cost = _profiled(resid, w, power_range)
    best = np.argmin(cost, axis=1)
    rows = np.arange(len(best))
    return np.stack([east[rows, best], north[rows, best]], axis=1), power[rows, best], cost[rows, best]


def map_log_posterior(map_db: np.ndarray, sigma_db: np.ndarray, rss: np.ndarray, present: np.ndarray,
                      batch: int = 32):
    """Yield the posterior logits (b, G) (unnormalised log probabilities, temperature 1) of ``batch``
    sessions at a time on a radio map tabulated at G cells (``map_db`` (R, G), 0 dBm TX power):
    Gaussian likelihood with per-receiver ``sigma_db`` over every present reading, TX power profiled
    out (:func:`profile_tx_power`), a flat prior over the cells. With the simulator's true map this
    is the oracle's posterior: what the readings say when the map is known exactly."""
    map_db = np.asarray(map_db, dtype=np.float64)
    inv_var = 1.0 / np.square(np.asarray(sigma_db, dtype=np.float64))
    for s in range(0, len(rss), batch):
        weight = np.asarray(present[s:s + batch], dtype=np.float64) * inv_var  # (b, R)
        resid = np.asarray(rss[s:s + batch], dtype=np.float64)[:, :, None] - map_db  # (b, R, G)
        _, chi2 = profile_tx_power(np.where(weight[:, :, None] > 0, resid, 0.0), weight)
        yield -0.5 * chi2


# ---- k-nearest-neighbour fingerprinting ---------------------------------------------------------
def _fingerprints(rss: np.ndarray, present: np.ndarray, fill_db: np.ndarray) -> np.ndarray:
    """RSS vectors with each session's mean removed (the unknown TX power shifts all receivers
    alike, so only the *shape* across receivers locates the transmitter). Missing receivers are
    imputed with ``fill_db`` + the session's power level before centring (see :func:`knn`)."""
    rss = np.asarray(rss, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    n_present = present.sum(axis=1, keepdims=True)
    # Session power level relative to the training means, from the receivers heard.
    level = np.where(present, rss - fill_db, 0.0).sum(axis=1, keepdims=True) / np.maximum(n_present, 1)
    filled = np.where(present, rss, fill_db + level)
    return filled - filled.mean(axis=1, keepdims=True)


def knn(
    train_rss: np.ndarray,
    train_present: np.ndarray,
    train_pos: np.ndarray,
    query_rss: np.ndarray,
    query_present: np.ndarray,
    k: int = 5,
) -> np.ndarray:
    """k-nearest-neighbour fingerprinting: mean position (Nq, 2) of the k closest training sessions.

    Fingerprint = RSS across receivers with the session mean removed (power-invariant). A missing
    receiver is imputed as its training mean RSS shifted by the session's level (its mean offset
    from the training means over the receivers heard), i.e. "as loud as the others suggest",
    so an outage neither pulls the fingerprint towards a floor nor towards an average session.
    Median validation error on the default campaign, best k each: raw RSS with a floor fill
    28.3 km, raw with the training-mean fill 26.7, centred with the mean fill 24.9, this 25.3
    (equal within noise; the level-shifted fill is kept because it stays consistent when several
    receivers are missing). A distance over only the receivers both sessions share was worse
    (32 km): it favours matches on few receivers.
    """
    from sklearn.neighbors import NearestNeighbors

    train_present = np.asarray(train_present, dtype=bool)
    train_rss = np.asarray(train_rss, dtype=np.float64)
    fill_db = np.where(train_present, train_rss, 0.0).sum(axis=0) / np.maximum(train_present.sum(axis=0), 1)
    train_fp = _fingerprints(train_rss, train_present, fill_db)
    query_fp = _fingerprints(query_rss, query_present, fill_db)
    k = int(min(max(k, 1), len(train_fp)))
    _, idx = NearestNeighbors(n_neighbors=k).fit(train_fp).kneighbors(query_fp)
    return np.asarray(train_pos, dtype=np.float64)[idx].mean(axis=1)


def tune_knn_k(
    train_rss: np.ndarray,
    train_present: np.ndarray,
    train_pos: np.ndarray,
    val_rss: np.ndarray,
    val_present: np.ndarray,
    val_pos: np.ndarray,
    candidates=KNN_K_CANDIDATES,
) -> tuple[int, dict[int, float]]:
    """k from ``candidates`` with the lowest median validation error; also {k: median error m}."""
    errors = {}
    for k in candidates:
        pred = knn(train_rss, train_present, train_pos, val_rss, val_present, k)
        errors[int(k)] = float(np.median(np.linalg.norm(pred - np.asarray(val_pos), axis=1)))
    return min(errors, key=errors.get), errors


# ---- Cramér–Rao bound ---------------------------------------------------------------------------
def crlb_rmse(scenario, pos: np.ndarray, present: np.ndarray, sigma_db) -> np.ndarray:
    """Cramér–Rao bound on the position RMSE (N,) in metres under the true map.

    Unknowns (east, north, P); Fisher information ``J = H^T diag(1/sigma^2) H`` with rows
    ``[d mu_i/d east, d mu_i/d north, 1]`` over the present receivers; the bound is
    ``sqrt(trace of the position block of J^-1)``. ``sigma_db`` is a scalar or per receiver (R,).
    Sessions with fewer than 3 present receivers (or a singular J) get +inf: no unbiased estimator
    has finite variance there.
    """
    pos = np.asarray(pos, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    grad = scenario.mean_rss_gradient(pos[:, 0], pos[:, 1])  # (N, R, 2) dB/m
    jac = np.concatenate([grad, np.ones(grad.shape[:2] + (1,))], axis=2)  # (N, R, 3)
    inv_var = present / np.square(np.broadcast_to(np.asarray(sigma_db, dtype=np.float64), present.shape[1:]))
    fisher = np.einsum("nri,nr,nrj->nij", jac, inv_var, jac)
    # Scale to km so the three unknowns have comparable magnitudes before checking conditioning.
    scale = np.array([1e3, 1e3, 1.0])
    fisher_km = fisher * scale[:, None] * scale[None, :]
    eig = np.linalg.eigvalsh(fisher_km)
    ok = (present.sum(axis=1) >= MIN_READINGS) & (eig[:, 0] > 1e-10 * np.maximum(eig[:, -1], 1e-300))
    out = np.full(len(pos), np.inf)
    if ok.any():
        cov_km = np.linalg.inv(fisher_km[ok])
        out[ok] = 1e3 * np.sqrt(np.maximum(cov_km[:, 0, 0] + cov_km[:, 1, 1], 0.0))
    return out


# ---- everything on one features file ------------------------------------------------------------
def _error_summary(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    err = np.linalg.norm(pred - truth, axis=1)
    return {
        "mean_error_m": float(err.mean()),
        "median_error_m": float(np.median(err)),
        "p90_error_m": float(np.percentile(err, 90)),
        # RSS-only errors are bimodal (a locked-on mode near the CRLB and far ambiguous solutions):
        # the fraction in the good mode says more than a median that can fall between the modes.
        "frac_within_5km": float(np.mean(err < 5e3)),
    }


def load_rss_features(features_path: str | Path) -> dict:
    """The RSS-only view of a features.h5 (validated against the data contract)."""
    from heimdall import contracts as c

    path = Path(features_path)
    f = c.open_checked(path, c.FEATURES_FORMAT)
    with f:
        c.validate_layout(f, c.FEATURES_LAYOUT, path)
        data = {
            "rss": f["features/rss_dbm"][()].astype(np.float64),
            "snr": f["features/snr_db"][()].astype(np.float64),
            "present": f["features/present"][()],
            "rx_enu": f["receivers/enu_m"][()],
            "pos": f["sessions/target_enu_m"][()],
            "split": f["sessions/split"][()],
            "frequency_hz": f["sessions/frequency_hz"][()],
            "scenario_json": f.attrs.get("scenario_json"),
            "origin": (
                float(f.attrs["origin_latitude_deg"]),
                float(f.attrs["origin_longitude_deg"]),
                float(f.attrs["origin_altitude_m"]),
            ),
        }
    return data


def evaluate_baselines(features_path: str | Path, **kwargs) -> dict:
    """:func:`baseline_suite` on a features.h5 file (fit on train, k on val, scored on test)."""
    return baseline_suite(load_rss_features(features_path), source=str(features_path), **kwargs)[0]


def baseline_suite(
    d: dict,
    *,
    source: str = "features",
    spacing_m: float = DEFAULT_GRID_SPACING_M,
    margin_m: float = DEFAULT_GRID_MARGIN_M,
    fit_min_snr_db: float = DEFAULT_FIT_MIN_SNR_DB,
    mle_min_snr_db: float | None = DEFAULT_MLE_MIN_SNR_DB,
    knn_candidates=KNN_K_CANDIDATES,
    kriging_iterations: int = 2,
    tx_power_range_dbm: tuple[float, float] | None = None,
    kriged_grid: RadioMapGrid | None = None,
    seed: int = 0,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Fit every baseline on the train split (kNN's k tuned on val), score on the test split.

    ``d`` is the RSS-only view of a features file (:func:`load_rss_features`). Returns
    (results, per-session test errors by baseline). results: {"knn", "ml_logdistance",
    "kriged_map", ["oracle"]} each with ``mean_error_m``, ``median_error_m``, ``p90_error_m``,
    ``frac_within_5km`` and ``wall_s`` (fit + predict), plus ``crlb_rmse_m`` (median over test
    sessions of the per-session bound sqrt(trace), as the evaluation contract defines it) and
    ``crlb_rms_m`` (RMS over finite sessions). Oracle and CRLB need ``scenario_json`` (synthetic
    data); without it they are left out. A ``kriged_grid`` already fitted on the same train split
    (the train stage's) is reused instead of fitting another. ``tx_power_range_dbm`` is passed to
    :func:`grid_mle` (learned maps are anchored at free-space loss so their power estimate is
    roughly in dBm).
    """
    from heimdall import contracts as c
    split = d["split"]
    tr, va, te = (split == c.SPLIT_CODES[s] for s in ("train", "val", "test"))
    if not (tr.any() and te.any()):
        raise ValueError(f"{source}: needs train and test sessions")
    rss, snr, present, pos, rx_enu = d["rss"], d["snr"], d["present"], d["pos"], d["rx_enu"]
    # Anchor learned maps at free-space loss so their profiled power reads as TX power in dBm.
    anchor = -free_space_loss_1km_db(float(np.median(d["frequency_hz"])) / 1e6)
    bounds = bounds_around(pos[tr], margin_m)
    fallback_pos = pos[tr].mean(axis=0)
    results: dict = {"n_train": int(tr.sum()), "n_val": int(va.sum()), "n_test": int(te.sum())}
    errors: dict[str, np.ndarray] = {}

    def score(name: str, pred: np.ndarray, started: float, **info) -> None:
        errors[name] = np.linalg.norm(pred - pos[te], axis=1)
        results[name] = {**_error_summary(pred, pos[te]), "wall_s": time.perf_counter() - started, **info}

    def score_map(name: str, grid: RadioMapGrid, started: float, **info) -> None:
        pred, _ = grid_mle(grid, rss[te], present[te], snr[te], mle_min_snr_db,
                           tx_power_range_dbm=tx_power_range_dbm, fallback_pos=fallback_pos)
        score(name, pred, started, **info)

    # kNN fingerprinting (k on val; without a val split, k from train by itself is meaningless)
    started = time.perf_counter()
    if va.any():
        k, _ = tune_knn_k(rss[tr], present[tr], pos[tr], rss[va], present[va], pos[va], knn_candidates)
    else:
        k = 5
    score("knn", knn(rss[tr], present[tr], pos[tr], rss[te], present[te], k), started, k=k)

    # the maps are fitted on the receivers the training sessions heard often enough (as the model's)
    m = mapped_receivers(present[tr], snr[tr], fit_min_snr_db)
    started = time.perf_counter()
    law = fit_log_distance(rss[tr][:, m], present[tr][:, m], rx_enu[m], pos[tr], snr[tr][:, m], fit_min_snr_db, anchor)
    score_map("ml_logdistance", RadioMapGrid.from_fitted(law, bounds, spacing_m).expanded(m), started,
              exponent=law.exponent)

    started = time.perf_counter()
    if kriged_grid is None:
        kriged = fit_kriged_map(rss[tr][:, m], present[tr][:, m], rx_enu[m], pos[tr], snr[tr][:, m], fit_min_snr_db,
                                anchor, n_iterations=kriging_iterations, seed=seed)
        kriged_grid = RadioMapGrid.from_fitted(kriged, bounds, spacing_m).expanded(m)
    score_map("kriged_map", kriged_grid, started)

    if d.get("scenario_json") is not None:
        from heimdall.params import ScenarioParams
        from heimdall.simulator import Scenario

        scenario = Scenario(ScenarioParams.model_validate_json(d["scenario_json"]))
        if not np.allclose(scenario.origin, d["origin"], atol=1e-9):
            raise ValueError(f"{source}: ENU origin {d['origin']} differs from the scenario's "
                             f"{scenario.origin}; the true map would be shifted")
        started = time.perf_counter()
        oracle = RadioMapGrid.from_scenario(
            scenario, bounds, spacing_m, rss=rss[tr], present=present[tr], pos=pos[tr], snr=snr[tr],
            min_snr_db=fit_min_snr_db,
        )
        score_map("oracle", oracle, started, sigma_db=float(np.sqrt(np.mean(oracle.sigma_db**2))))
        bound = crlb_rmse(scenario, pos[te], present[te], oracle.sigma_db)
        finite = np.isfinite(bound)
        results["crlb_rmse_m"] = float(np.median(bound[finite]))
        results["crlb_rms_m"] = float(np.sqrt(np.mean(bound[finite] ** 2)))
    return results, errors
