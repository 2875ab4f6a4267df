"""Kriged radio maps: the log-distance law plus a per-receiver Gaussian-process map of the residual
(the shadowing a site survey can learn), and the map the model's likelihood refinement uses.

Positions are ENU metres; GP internals work in kilometres so the kernel hyper-parameters are of order one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from heimdall.errors import HeimdallError
from heimdall.gp import (
    DEFAULT_MAX_INDUCING,
    GP_METHODS,
    ResidualGP,
    exact_gp,
    fit_gp_hyperparameters,
    sparse_gp,
    uses_sparse,
)
from heimdall.radiomap import (
    DEFAULT_FIT_MIN_SNR_DB,
    MIN_MAP_READINGS,
    UNMAPPED_SIGMA_DB,
    Bounds,
    LogDistanceModel,
    RadioMapGrid,
    bounds_around,
    fit_log_distance,
    free_space_loss_1km_db,
    mapped_receivers,
    power_and_residual,
    usable_mask,
)

if TYPE_CHECKING:
    from heimdall.data import FeatureSet

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class KrigedMapModel:
    """Log-distance law plus a per-receiver GP map of the residual."""

    log_distance: LogDistanceModel
    gps: tuple[ResidualGP, ...]  # one per receiver
    sigma_db: np.ndarray  # (R,) leave-one-out residual std (fading + map error)
    train_bounds_m: Bounds
    # (R,) mean local GP variance at training readings left out: the map error sigma_db already holds
    loo_map_var_db2: np.ndarray | None = None

    def excess_var_db2(self, east, north) -> np.ndarray:
        """(..., R) the map's variance at positions beyond what sigma_db holds (0 near training readings,
        up to the GP's signal variance far from them): the likelihood's σ² there is sigma_db² + this."""
        east = np.asarray(east, dtype=np.float64)
        pts_km = np.stack([east.ravel(), np.asarray(north, dtype=np.float64).ravel()], axis=1) / 1e3
        var = np.stack([gp.local_variance(pts_km) for gp in self.gps], axis=1)
        return np.maximum(var - self.loo_map_var_db2, 0.0).reshape(*east.shape, len(self.gps))

    def mean_db(self, east, north) -> np.ndarray:
        """Predicted mean RSS (..., R) at 0 dBm TX power."""
        east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        base = self.log_distance.mean_db(east, north)
        pts_km = np.stack([east.ravel(), north.ravel()], axis=1) / 1e3
        resid = np.stack([gp.predict(pts_km) for gp in self.gps], axis=1)
        return base + resid.reshape(base.shape)


def fit_kriged_map(
    rss: np.ndarray,
    present: np.ndarray,
    rx_enu: np.ndarray,
    pos: np.ndarray,
    snr: np.ndarray | None = None,
    min_snr_db: float | None = DEFAULT_FIT_MIN_SNR_DB,
    anchor_offset_db: float = 0.0,
    n_iterations: int = 2,
    n_hyper_subsample: int = 800,
    n_loo: int = 500,
    seed: int = 0,
    blas_threads: int | None = 1,
    gp: str = "auto",
    max_inducing: int = DEFAULT_MAX_INDUCING,
    n_jobs: int = 1,
) -> KrigedMapModel:
    """Log-distance fit plus per-receiver GP residual maps learned from the training sessions.

    Each iteration re-estimates every session's power with the current map (law + GP), recomputes
    the residuals ``e_ij = y_ij - P_j - law_i(x_j)`` and refits the GPs on them. Hyper-parameters
    (signal std, length scale, noise std) are chosen by marginal likelihood on ``n_hyper_subsample``
    readings per receiver in the first iteration and kept; the posterior mean then uses every
    training reading (exact Cholesky solve). ``sigma_db`` is the RMS of exact leave-one-out
    residuals of the last iteration (at ``n_loo`` random readings per receiver), so it includes
    the map's own error, not just the fading.

    ``gp``: "exact" (O(n³) per receiver), "sparse" (:func:`heimdall.gp.sparse_gp`, at most ``max_inducing`` inducing
    points: linear in the readings) or "auto" (exact up to EXACT_GP_MAX_READINGS readings, sparse beyond).
    ``n_jobs``: receivers fitted in parallel processes (joblib's loky backend, which limits each worker to
    cores // n_jobs BLAS threads; on a cluster, joblib's dask or ray backend). The fit is the same for any
    value: the random draws stay in this process.

    ``blas_threads`` caps BLAS threads during the fit (None: library default). OpenBLAS threads
    busy-wait: with another process on a 2-core machine, 2 threads made the 800-point Cholesky
    factorisations of the hyper-parameter search ~40x and the 3,600-point ones ~4x slower than
    1 thread (the whole default-campaign fit: 97 s instead of 25 s), while on an idle machine the
    second thread saved only ~15% (21 s instead of 26 s).
    """
    from threadpoolctl import threadpool_limits

    if gp not in GP_METHODS:
        raise ValueError(f"fit_kriged_map: gp={gp!r}, expected one of {GP_METHODS}")
    args = (rss, present, rx_enu, pos, snr, min_snr_db, anchor_offset_db, n_iterations, n_hyper_subsample, n_loo,
            seed, gp, max_inducing, n_jobs)
    if blas_threads is None:
        return _fit_kriged_map(*args)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _fit_kriged_map(*args)


def _fit_receiver(x_km, e, hyper, hyper_idx, loo_index, sparse: bool, max_inducing: int):
    """One receiver's GP fit (a job of its own: receivers are independent given the session powers) ->
    (hyper-parameters, ResidualGP, in-sample posterior mean, LOO residuals or None, mean local variance at
    the LOO readings left out or 0)."""
    if hyper is None:
        hyper = fit_gp_hyperparameters(x_km, e) if hyper_idx is None else \
            fit_gp_hyperparameters(x_km[hyper_idx], e[hyper_idx])
    if sparse:
        gp, fitted, loo = sparse_gp(x_km, e, *hyper, loo_index=loo_index, max_inducing=max_inducing)
    else:
        gp, fitted, loo = exact_gp(x_km, e, *hyper, loo_index=loo_index)
    var = 0.0 if loo_index is None else float(gp.local_variance(x_km[loo_index], leave_self_out=True).mean())
    return hyper, gp, fitted, loo, var


def _fit_kriged_map(rss, present, rx_enu, pos, snr, min_snr_db, anchor_offset_db, n_iterations,
                    n_hyper_subsample, n_loo, seed, gp_method, max_inducing, n_jobs) -> KrigedMapModel:
    from joblib import Parallel, delayed

    rss = np.asarray(rss, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    law = fit_log_distance(rss, present, rx_enu, pos, snr, min_snr_db, anchor_offset_db)
    usable = usable_mask(present, snr, min_snr_db)
    usable &= (usable.sum(axis=1) >= 2)[:, None]
    n_rx = usable.shape[1]
    law_db = law.mean_db(pos[:, 0], pos[:, 1])  # (N, R)
    pos_km = pos / 1e3
    rng = np.random.default_rng(seed)
    n_iterations = max(1, n_iterations)

    gp_at_train = np.zeros_like(law_db)
    hyper: list = [None] * n_rx
    gps: list[ResidualGP] = []
    loo_sq_sum, loo_count, loo_var = np.zeros(n_rx), np.zeros(n_rx), np.zeros(n_rx)
    for it in range(n_iterations):
        weights = 1.0 / np.square(law.sigma_db)
        _, residual = power_and_residual(rss, law_db + gp_at_train, usable, weights)
        e_all = residual + gp_at_train  # residual w.r.t. the law alone, with the new powers
        last = it == n_iterations - 1
        jobs = []
        for r in range(n_rx):  # random draws here, in receiver order: the same fit for any n_jobs
            rows = usable[:, r]
            n_r = int(rows.sum())
            hyper_idx = rng.choice(n_r, n_hyper_subsample, replace=False) if it == 0 and n_r > n_hyper_subsample \
                else None
            loo_index = rng.choice(n_r, min(n_loo, n_r), replace=False) if last else None
            jobs.append(delayed(_fit_receiver)(pos_km[rows], e_all[rows, r], hyper[r], hyper_idx, loo_index,
                                               uses_sparse(gp_method, n_r), max_inducing))
        results = Parallel(n_jobs=n_jobs)(jobs)  # n_jobs=1: in this process, one after the other
        gps = []
        for r, (hyper[r], gp, fitted, loo, var) in enumerate(results):
            gps.append(gp)
            gp_at_train[:, r] = 0.0
            gp_at_train[usable[:, r], r] = fitted
            if it == 0 and gp.readings_km is not None:
                log.info("radio map: receiver %d: sparse GP, %d readings, %d inducing points", r, len(gp.train_km),
                         len(gp.basis_km))
            if last:
                loo_sq_sum[r], loo_count[r], loo_var[r] = np.sum(loo**2), len(loo), var

    sigma = np.sqrt(loo_sq_sum / np.maximum(loo_count, 1))
    return KrigedMapModel(law, tuple(gps), sigma, law.train_bounds_m, loo_var)


def fit_training_map(features: FeatureSet, spacing_m: float, margin_m: float, min_snr_db: float | None,
                     seed: int, uncertainty: bool = False, gp: str = "auto", n_jobs: int = 1) -> RadioMapGrid:
    """The learned forward map on the training split of ``features`` (law + GP residual per receiver),
    tabulated over the training targets' box + ``margin_m``: what the model's refinement inverts.
    ``uncertainty``: with the map's excess variance per cell (RadioMapGrid.excess_var_db2)."""
    tr = features.indices("train")
    rss, snr, present, pos = (features.rss_dbm[tr].astype(np.float64), features.snr_db[tr].astype(np.float64),
                              features.present[tr], features.target_enu_m[tr])
    # anchor the map at free-space loss so the profiled power reads as TX power in dBm
    anchor = -free_space_loss_1km_db(float(np.median(features.frequency_hz)) / 1e6)
    mapped = mapped_receivers(present, snr, min_snr_db)
    if mapped.sum() < 3:
        raise HeimdallError(f"train: only {int(mapped.sum())} receivers have {MIN_MAP_READINGS} or more usable "
                            "training readings; the radio map needs 3 (more training sessions, or another split)")
    if not mapped.all():
        log.warning("train: no map for receivers %s (fewer than %d usable training readings): their readings are "
                    "ignored", [str(n) for n, m in zip(features.receiver_names, mapped) if not m], MIN_MAP_READINGS)
    kriged = fit_kriged_map(rss[:, mapped], present[:, mapped], features.receiver_enu_m[mapped], pos, snr[:, mapped],
                            min_snr_db, anchor, seed=seed, gp=gp, n_jobs=n_jobs)
    return RadioMapGrid.from_fitted(kriged, bounds_around(pos, margin_m), spacing_m,
                                    uncertainty=uncertainty).expanded(mapped)


def training_power_range(grid: RadioMapGrid, features: FeatureSet, lo_pct=1.0, hi_pct=99.0) -> tuple[float, float]:
    """Plausible TX power range on the map's scale: percentiles of the training sessions' powers
    profiled at their true positions (no ground-truth power needed)."""
    tr = features.indices("train")
    pos, rss, present = features.target_enu_m[tr], features.rss_dbm[tr].astype(np.float64), features.present[tr]
    present = present & (grid.sigma_db < UNMAPPED_SIGMA_DB)  # receivers without a map say nothing
    power, _ = power_and_residual(rss, grid.sample(pos[:, 0], pos[:, 1]), present)
    power = power[np.isfinite(power)]
    return float(np.percentile(power, lo_pct)), float(np.percentile(power, hi_pct))
