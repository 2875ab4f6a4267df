"""Kriged radio maps: the log-distance law plus a per-receiver Gaussian-process map of the residual
(the shadowing a site survey can learn), and the map the model's likelihood refinement uses.

Positions are ENU metres; GP internals work in kilometres so the kernel hyper-parameters are of order one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.spatial.distance import cdist

from heimdall.errors import HeimdallError
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

# Rows of the (points x training points) kernel matrix evaluated at once when predicting a GP:
# 4096 x ~4000 float64 is ~130 MB.
_GP_PREDICT_CHUNK = 4096
# Nearest training readings of a local GP's variance (ResidualGP.local_variance): an upper bound of the
# exact GP's, tight where the nearest readings decide it (near data, and far from all of it).
LOCAL_VARIANCE_POINTS = 16
# Training points farther than this many RBF length scales from a query point are ignored:
# their kernel weight is below exp(-6^2 / 2) = 1.5e-8.
_GP_CUTOFF_LENGTHS = 6.0


# ---- Gaussian-process residual maps -------------------------------------------------------------
@dataclass(frozen=True)
class ResidualGP:
    """Exact GP posterior mean of one receiver's residual map (RBF kernel + white noise)."""

    train_km: np.ndarray  # (n, 2) training positions in km
    alpha: np.ndarray  # (n,) (K + noise I)^-1 (e - mean)
    prior_mean_db: float
    signal_std_db: float
    length_km: float  # RBF length scale l in exp(-d^2 / (2 l^2))
    noise_std_db: float

    def predict(self, points_km: np.ndarray) -> np.ndarray:
        """Posterior mean (P,) at points (P, 2) in km.

        The RBF kernel is local, so points are processed in square tiles, each against the
        training points within ``_GP_CUTOFF_LENGTHS`` length scales of the tile: the neglected
        terms are below exp(-18) of the signal variance (exact to ~1e-6 dB), and the cost drops
        from (points x all training points) to (points x nearby ones).
        """
        points_km = np.asarray(points_km, dtype=np.float64).reshape(-1, 2)
        out = np.empty(points_km.shape[0])
        cutoff = _GP_CUTOFF_LENGTHS * self.length_km
        tile = max(2.0 * cutoff, 1e-9)
        cell = np.floor((points_km - points_km.min(axis=0)) / tile).astype(np.int64)
        key = cell[:, 0] * (cell[:, 1].max() + 1) + cell[:, 1]
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
        for idx in np.split(order, starts[1:]):
            for sub in np.array_split(idx, -(-len(idx) // _GP_PREDICT_CHUNK)):
                pts = points_km[sub]
                lo, hi = pts.min(axis=0) - cutoff, pts.max(axis=0) + cutoff
                near = np.all((self.train_km >= lo) & (self.train_km <= hi), axis=1)
                k_cross = _rbf(pts, self.train_km[near], self.signal_std_db, self.length_km)
                out[sub] = k_cross @ self.alpha[near]
        return out + self.prior_mean_db


    def local_variance(self, points_km: np.ndarray, n_near: int = LOCAL_VARIANCE_POINTS,
                       leave_self_out: bool = False) -> np.ndarray:
        """Posterior variance (P,) of the residual map at points (P, 2) in km, from each point's
        ``n_near`` nearest training points only (a local GP: exact where a few points decide it, an
        upper bound elsewhere; O(P · n_near³) instead of O(P · n²)). ``leave_self_out``: for training
        points themselves, without their own reading (what a leave-one-out residual sees)."""
        from scipy.spatial import cKDTree

        points_km = np.asarray(points_km, dtype=np.float64).reshape(-1, 2)
        k = min(n_near + int(leave_self_out), len(self.train_km))
        _, idx = cKDTree(self.train_km).query(points_km, k=k)
        idx = idx.reshape(len(points_km), k)[:, int(leave_self_out):]
        s2, out = self.signal_std_db**2, np.empty(len(points_km))
        for i in range(0, len(points_km), _GP_PREDICT_CHUNK):
            near = self.train_km[idx[i:i + _GP_PREDICT_CHUNK]]  # (c, m, 2)
            d2 = ((near[:, :, None] - near[:, None]) ** 2).sum(-1)
            gram = s2 * np.exp(-0.5 * d2 / self.length_km**2) + self.noise_std_db**2 * np.eye(near.shape[1])
            cross = s2 * np.exp(-0.5 * ((near - points_km[i:i + _GP_PREDICT_CHUNK, None]) ** 2).sum(-1)
                                / self.length_km**2)
            out[i:i + _GP_PREDICT_CHUNK] = s2 - np.einsum("cm,cm->c", cross, np.linalg.solve(gram, cross[..., None])[..., 0])
        return np.maximum(out, 0.0)


def _rbf(a_km: np.ndarray, b_km: np.ndarray, signal_std: float, length: float) -> np.ndarray:
    return signal_std**2 * np.exp(-0.5 * cdist(a_km, b_km, "sqeuclidean") / length**2)


def _fit_gp_hyperparameters(x_km, e, n_subsample: int, rng) -> tuple[float, float, float]:
    """(signal std, length scale km, noise std) maximising the marginal likelihood on a subsample."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    if len(e) > n_subsample:
        idx = rng.choice(len(e), n_subsample, replace=False)
        x_km, e = x_km[idx], e[idx]
    var = max(float(np.var(e)), 1e-2)
    kernel = ConstantKernel(0.75 * var, (1e-2, 1e3)) * RBF(3.0, (0.2, 200.0)) + WhiteKernel(
        0.25 * var, (1e-3, 1e3)
    )
    gpr = GaussianProcessRegressor(kernel, normalize_y=False, n_restarts_optimizer=0, random_state=0)
    gpr.fit(x_km, e - e.mean())
    k = gpr.kernel_
    return (
        float(np.sqrt(k.k1.k1.constant_value)),
        float(k.k1.k2.length_scale),
        float(np.sqrt(k.k2.noise_level)),
    )


def _exact_gp(x_km, e, signal_std, length_km, noise_std, loo_index=None):
    """Exact posterior with all points.

    Returns (ResidualGP, in-sample posterior mean (n,), leave-one-out residuals at ``loo_index``
    or None).
    """
    prior_mean = float(e.mean())
    k = _rbf(x_km, x_km, signal_std, length_km)
    k[np.diag_indices_from(k)] += noise_std**2
    chol = cho_factor(k, lower=True, overwrite_a=True, check_finite=False)
    alpha = cho_solve(chol, e - prior_mean, check_finite=False)
    # In-sample posterior mean: K_f alpha = (K_f + s^2 I) alpha - s^2 alpha.
    fitted = e - noise_std**2 * alpha
    loo = None
    if loo_index is not None:
        # Leave-one-out residual of a GP in closed form: alpha_i / [K^-1]_ii (Rasmussen & Williams
        # eq. 5.12), with [K^-1]_ii = |L^-1 e_i|^2 computed only for the requested columns.
        unit = np.zeros((len(e), len(loo_index)))
        unit[loo_index, np.arange(len(loo_index))] = 1.0
        l_inv_cols = solve_triangular(chol[0], unit, lower=True, check_finite=False)
        loo = alpha[loo_index] / np.einsum("ij,ij->j", l_inv_cols, l_inv_cols)
    gp = ResidualGP(x_km, alpha, prior_mean, signal_std, length_km, noise_std)
    return gp, fitted, loo


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
) -> KrigedMapModel:
    """Log-distance fit plus per-receiver GP residual maps learned from the training sessions.

    Each iteration re-estimates every session's power with the current map (law + GP), recomputes
    the residuals ``e_ij = y_ij - P_j - law_i(x_j)`` and refits the GPs on them. Hyper-parameters
    (signal std, length scale, noise std) are chosen by marginal likelihood on ``n_hyper_subsample``
    readings per receiver in the first iteration and kept; the posterior mean then uses every
    training reading (exact Cholesky solve). ``sigma_db`` is the RMS of exact leave-one-out
    residuals of the last iteration (at ``n_loo`` random readings per receiver), so it includes
    the map's own error, not just the fading.

    ``blas_threads`` caps BLAS threads during the fit (None: library default). OpenBLAS threads
    busy-wait: with another process on a 2-core machine, 2 threads made the 800-point Cholesky
    factorisations of the hyper-parameter search ~40x and the 3,600-point ones ~4x slower than
    1 thread (the whole default-campaign fit: 97 s instead of 25 s), while on an idle machine the
    second thread saved only ~15% (21 s instead of 26 s).
    """
    from threadpoolctl import threadpool_limits

    if blas_threads is None:
        return _fit_kriged_map(rss, present, rx_enu, pos, snr, min_snr_db, anchor_offset_db,
                               n_iterations, n_hyper_subsample, n_loo, seed)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _fit_kriged_map(rss, present, rx_enu, pos, snr, min_snr_db, anchor_offset_db,
                               n_iterations, n_hyper_subsample, n_loo, seed)


def _fit_kriged_map(rss, present, rx_enu, pos, snr, min_snr_db, anchor_offset_db, n_iterations,
                    n_hyper_subsample, n_loo, seed) -> KrigedMapModel:
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
    hyper: list[tuple[float, float, float]] = []
    gps: list[ResidualGP] = []
    loo_sq_sum, loo_count, loo_var = np.zeros(n_rx), np.zeros(n_rx), np.zeros(n_rx)
    for it in range(n_iterations):
        weights = 1.0 / np.square(law.sigma_db)
        _, residual = power_and_residual(rss, law_db + gp_at_train, usable, weights)
        e_all = residual + gp_at_train  # residual w.r.t. the law alone, with the new powers
        last = it == n_iterations - 1
        gps = []
        for r in range(n_rx):
            rows = usable[:, r]
            x_r, e_r = pos_km[rows], e_all[rows, r]
            if it == 0:
                hyper.append(_fit_gp_hyperparameters(x_r, e_r, n_hyper_subsample, rng))
            loo_index = rng.choice(len(e_r), min(n_loo, len(e_r)), replace=False) if last else None
            gp, fitted, loo = _exact_gp(x_r, e_r, *hyper[r], loo_index=loo_index)
            gps.append(gp)
            gp_at_train[:, r] = 0.0
            gp_at_train[rows, r] = fitted
            if last:
                loo_sq_sum[r], loo_count[r] = np.sum(loo**2), len(loo)
                loo_var[r] = gp.local_variance(x_r[loo_index], leave_self_out=True).mean()

    sigma = np.sqrt(loo_sq_sum / np.maximum(loo_count, 1))
    return KrigedMapModel(law, tuple(gps), sigma, law.train_bounds_m, loo_var)


def fit_training_map(features: FeatureSet, spacing_m: float, margin_m: float, min_snr_db: float | None,
                     seed: int, uncertainty: bool = False) -> RadioMapGrid:
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
                            min_snr_db, anchor, seed=seed)
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
