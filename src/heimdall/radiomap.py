"""Forward radio maps: predicted mean RSS of every receiver as a function of transmitter position.

Three maps share one representation, :class:`RadioMapGrid` (mean RSS at 0 dBm TX power on a
regular ENU grid, plus a per-receiver residual std for the likelihood):

* :func:`fit_log_distance` — the textbook law ``y_ij = P_j + c_i - 10 n log10(d_ij / 1 km)``
  learned from training sessions. The TX power ``P_j`` of every session is unknown, so it is
  profiled out by centring each session over its receivers; what is left is linear in ``n`` and the
  receiver constants ``c_i`` (identified up to one common constant, see ``anchor_offset_db``).
* :func:`fit_kriged_map` — the log-distance law plus, per receiver, a Gaussian-process map of the
  residual (the shadowing a site survey can learn), alternating between re-estimating ``P_j`` and
  refitting the GPs.
* :meth:`RadioMapGrid.from_scenario` — the simulator's true map: the oracle.

Numpy/scipy/scikit-learn only. Positions are ENU metres; GP internals work in kilometres so the
kernel hyper-parameters are of order one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.spatial.distance import cdist

# The far-field law is meaningless closer than this (the simulator uses the same floor).
MIN_DISTANCE_M = 10.0
# Readings below this SNR are dominated by thermal noise (the receiver reports signal + noise, so
# they saturate at the noise floor): they are left out when a map is *fitted*.
DEFAULT_FIT_MIN_SNR_DB = 10.0
DEFAULT_GRID_SPACING_M = 1000.0
DEFAULT_GRID_MARGIN_M = 10_000.0
# Rows of the (points x training points) kernel matrix evaluated at once when predicting a GP:
# 4096 x ~4000 float64 is ~130 MB.
_GP_PREDICT_CHUNK = 4096
# Training points farther than this many RBF length scales from a query point are ignored:
# their kernel weight is below exp(-6^2 / 2) = 1.5e-8.
_GP_CUTOFF_LENGTHS = 6.0
# Grid points tabulated per call of a map function (bounds memory: 8192 x 1024 features = 64 MB).
_GRID_CHUNK = 8192

Bounds = tuple[float, float, float, float]  # (east_min, east_max, north_min, north_max), metres


# ---- small shared helpers -----------------------------------------------------------------------
def usable_mask(present: np.ndarray, snr: np.ndarray | None, min_snr_db: float | None) -> np.ndarray:
    """(N, R) readings to use: present and, when SNR is known, at least ``min_snr_db``."""
    mask = np.asarray(present, dtype=bool).copy()
    if snr is not None and min_snr_db is not None:
        mask &= np.asarray(snr) >= min_snr_db
    return mask


def receiver_distance_m(east, north, rx_enu: np.ndarray) -> np.ndarray:
    """3-D distance (..., R) from transmitters at ground level (up = 0) to every receiver."""
    east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
    de = east[..., None] - rx_enu[:, 0]
    dn = north[..., None] - rx_enu[:, 1]
    du = rx_enu[:, 2]
    return np.maximum(np.sqrt(de**2 + dn**2 + du**2), MIN_DISTANCE_M)


def bounds_around(pos: np.ndarray, margin_m: float = DEFAULT_GRID_MARGIN_M) -> Bounds:
    """Bounding box of positions (N, 2) plus ``margin_m`` on every side."""
    pos = np.asarray(pos, dtype=np.float64)
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    return (lo[0] - margin_m, hi[0] + margin_m, lo[1] - margin_m, hi[1] + margin_m)


def profile_tx_power(rss: np.ndarray, map_db: np.ndarray, usable: np.ndarray, weights=None):
    """Profile the unknown TX power out of every session.

    Returns ``(power (N,), residual (N, R))`` with power the weighted mean of ``rss - map_db``
    over the usable readings and residual ``rss - power - map_db`` (0 where not usable). Sessions
    with no usable reading get power 0.
    """
    w = usable * (1.0 if weights is None else np.asarray(weights, dtype=np.float64))
    diff = np.where(usable, rss - map_db, 0.0)
    wsum = w.sum(axis=1)
    power = np.where(wsum > 0, (w * diff).sum(axis=1) / np.maximum(wsum, 1e-300), 0.0)
    return power, np.where(usable, diff - power[:, None], 0.0)


def residual_sigma(residual: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per-receiver std (R,) of profiled residuals, corrected for the fitted session power.

    Centring a session of n readings removes one degree of freedom: each reading keeps a fraction
    (1 - 1/n) of its variance on average. Sessions with a single reading carry no information.
    """
    n_used = usable.sum(axis=1, keepdims=True)
    dof = np.where(usable & (n_used > 1), 1.0 - 1.0 / np.maximum(n_used, 1), 0.0)
    ss = np.where(dof > 0, residual**2, 0.0).sum(axis=0)
    return np.sqrt(ss / np.maximum(dof.sum(axis=0), 1e-12))


# ---- log-distance law ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LogDistanceModel:
    """``mean RSS_i(x) = P + offset_db[i] - 10 exponent log10(d_i(x) / 1 km)``."""

    exponent: float
    offset_db: np.ndarray  # (R,) receiver constant c_i: -(loss at 1 km) + gain
    rx_enu: np.ndarray  # (R, 3)
    sigma_db: np.ndarray  # (R,) residual std of the training readings around the law
    train_bounds_m: Bounds  # bounding box of the training targets (no margin)

    def mean_db(self, east, north) -> np.ndarray:
        """Predicted mean RSS (..., R) at 0 dBm TX power."""
        d = receiver_distance_m(east, north, self.rx_enu)
        return self.offset_db - 10.0 * self.exponent * np.log10(d / 1e3)


def fit_log_distance(
    rss: np.ndarray,
    present: np.ndarray,
    rx_enu: np.ndarray,
    pos: np.ndarray,
    snr: np.ndarray | None = None,
    min_snr_db: float | None = DEFAULT_FIT_MIN_SNR_DB,
    anchor_offset_db: float = 0.0,
) -> LogDistanceModel:
    """Least-squares fit of the log-distance law on training sessions with unknown TX powers.

    Parameters
    ----------
    rss, present, snr : (N, R) measured RSS (dBm), presence mask, optional SNR (dB).
    rx_enu : (R, 3) receiver ENU positions (m).
    pos : (N, 2) true transmitter (east, north) of the training sessions (m).
    min_snr_db : readings below it are left out of the fit (None keeps all present readings).
    anchor_offset_db : the mean of the receiver constants. Only differences between receivers are
        identifiable when every session's power is unknown; anchoring the mean at minus the
        free-space loss at 1 km makes the profiled power read as TX power in dBm.
    """
    rss = np.asarray(rss, dtype=np.float64)
    rx_enu = np.asarray(rx_enu, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    n_rx = rx_enu.shape[0]
    usable = usable_mask(present, snr, min_snr_db)
    usable &= (usable.sum(axis=1) >= 2)[:, None]  # one reading says nothing once P is profiled
    if not usable.any():
        raise ValueError("fit_log_distance: no session has two usable readings")

    log_d = np.log10(receiver_distance_m(pos[:, 0], pos[:, 1], rx_enu) / 1e3)  # (N, R)
    n_used = usable.sum(axis=1, keepdims=True)

    def centred(values):  # subtract each session's mean over its usable readings
        mean = np.where(usable, values, 0.0).sum(axis=1, keepdims=True) / np.maximum(n_used, 1)
        return values - mean

    one_hot = np.broadcast_to(np.eye(n_rx), (rss.shape[0], n_rx, n_rx))  # [j, i, :] = e_i
    one_hot_mean = (usable[:, :, None] * one_hot).sum(axis=1, keepdims=True) / np.maximum(n_used, 1)[..., None]
    design = np.concatenate(
        [-10.0 * centred(log_d)[..., None], one_hot - one_hot_mean], axis=2
    )[usable]  # (readings, 1 + R)
    target = centred(rss)[usable]
    # Min-norm least squares: the common constant of c (its null space) comes out as sum(c) = 0.
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    exponent, offset = float(coef[0]), coef[1:] - coef[1:].mean() + anchor_offset_db

    model_db = offset - 10.0 * exponent * log_d
    _, residual = profile_tx_power(rss, model_db, usable)
    return LogDistanceModel(
        exponent=exponent,
        offset_db=offset,
        rx_enu=rx_enu,
        sigma_db=residual_sigma(residual, usable),
        train_bounds_m=bounds_around(pos, 0.0),
    )


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
    loo_sq_sum, loo_count = np.zeros(n_rx), np.zeros(n_rx)
    for it in range(n_iterations):
        weights = 1.0 / np.square(law.sigma_db)
        _, residual = profile_tx_power(rss, law_db + gp_at_train, usable, weights)
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

    sigma = np.sqrt(loo_sq_sum / np.maximum(loo_count, 1))
    return KrigedMapModel(law, tuple(gps), sigma, law.train_bounds_m)


# ---- the common grid representation -------------------------------------------------------------
@dataclass
class RadioMapGrid:
    """Mean RSS of every receiver on a regular ENU grid, at 0 dBm TX power (RSS = P + mean_db).

    Cell (row h, column w) is centred at ``(east0_m + w * spacing_m, north0_m + h * spacing_m)``.
    ``sigma_db`` is the per-receiver residual std (measurement + map error) for the likelihood.
    """

    east0_m: float
    north0_m: float
    spacing_m: float
    mean_db: np.ndarray  # (R, H, W) float32
    sigma_db: np.ndarray  # (R,)

    @property
    def n_receivers(self) -> int:
        return self.mean_db.shape[0]

    @property
    def east_m(self) -> np.ndarray:
        return self.east0_m + self.spacing_m * np.arange(self.mean_db.shape[2])

    @property
    def north_m(self) -> np.ndarray:
        return self.north0_m + self.spacing_m * np.arange(self.mean_db.shape[1])

    @property
    def bounds(self) -> Bounds:
        e, n = self.east_m, self.north_m
        return (float(e[0]), float(e[-1]), float(n[0]), float(n[-1]))

    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(east, north) of every cell, each (H, W)."""
        return np.meshgrid(self.east_m, self.north_m)

    @classmethod
    def from_function(
        cls, mean_db_fn: Callable, bounds: Bounds, spacing_m: float, sigma_db
    ) -> RadioMapGrid:
        """Tabulate ``mean_db_fn(east, north) -> (..., R)`` on a grid covering ``bounds``."""
        e0, e1, n0, n1 = bounds
        n_east = int(np.ceil((e1 - e0) / spacing_m - 1e-9)) + 1
        n_north = int(np.ceil((n1 - n0) / spacing_m - 1e-9)) + 1
        east, north = np.meshgrid(e0 + spacing_m * np.arange(n_east), n0 + spacing_m * np.arange(n_north))
        east, north = east.ravel(), north.ravel()
        # In chunks: the true map materialises (points x Fourier features) per receiver.
        mean = np.concatenate([
            np.asarray(mean_db_fn(east[i : i + _GRID_CHUNK], north[i : i + _GRID_CHUNK]))
            for i in range(0, east.size, _GRID_CHUNK)
        ]).reshape(n_north, n_east, -1)  # (H, W, R)
        return cls(
            east0_m=float(e0),
            north0_m=float(n0),
            spacing_m=float(spacing_m),
            mean_db=np.ascontiguousarray(np.moveaxis(mean, -1, 0), dtype=np.float32),
            sigma_db=np.asarray(sigma_db, dtype=np.float64),
        )

    @classmethod
    def from_log_distance(
        cls,
        model: LogDistanceModel,
        bounds: Bounds | None = None,
        spacing_m: float = DEFAULT_GRID_SPACING_M,
        margin_m: float = DEFAULT_GRID_MARGIN_M,
    ) -> RadioMapGrid:
        """Grid of a log-distance model; default bounds: training targets' box + ``margin_m``."""
        bounds = bounds or _expand(model.train_bounds_m, margin_m)
        return cls.from_function(model.mean_db, bounds, spacing_m, model.sigma_db)

    @classmethod
    def from_kriged(
        cls,
        model: KrigedMapModel,
        bounds: Bounds | None = None,
        spacing_m: float = DEFAULT_GRID_SPACING_M,
        margin_m: float = DEFAULT_GRID_MARGIN_M,
    ) -> RadioMapGrid:
        """Grid of a kriged map; default bounds: training targets' box + ``margin_m``."""
        bounds = bounds or _expand(model.train_bounds_m, margin_m)
        return cls.from_function(model.mean_db, bounds, spacing_m, model.sigma_db)

    @classmethod
    def from_scenario(
        cls,
        scenario,
        bounds: Bounds | None = None,
        spacing_m: float = DEFAULT_GRID_SPACING_M,
        margin_m: float = DEFAULT_GRID_MARGIN_M,
        *,
        sigma_db=None,
        rss: np.ndarray | None = None,
        present: np.ndarray | None = None,
        pos: np.ndarray | None = None,
        snr: np.ndarray | None = None,
        min_snr_db: float | None = DEFAULT_FIT_MIN_SNR_DB,
    ) -> RadioMapGrid:
        """The simulator's true map (the oracle).

        ``sigma_db`` is given, or estimated as the fading scatter of training readings
        (``rss``, ``present``, ``pos``, optional ``snr``) around the true map, with each
        session's power profiled out. Default bounds: the training targets' box + ``margin_m``
        when ``pos`` is given, else the scenario's area.
        """
        if sigma_db is None:
            if rss is None or present is None or pos is None:
                raise ValueError("from_scenario: give sigma_db or training rss, present and pos")
            pos = np.asarray(pos, dtype=np.float64)
            usable = usable_mask(present, snr, min_snr_db)
            true_db = scenario.mean_rss_dbm(pos[:, 0], pos[:, 1], np.zeros(len(pos)))
            _, residual = profile_tx_power(np.asarray(rss, dtype=np.float64), true_db, usable)
            sigma_db = residual_sigma(residual, usable)
        sigma_db = np.broadcast_to(np.asarray(sigma_db, dtype=np.float64), (scenario.n_receivers,)).copy()
        if bounds is None:
            bounds = bounds_around(pos, margin_m) if pos is not None else tuple(scenario.area)

        def true_mean_db(east, north):
            return scenario.mean_rss_dbm(east, north, np.zeros(np.shape(east)))

        return cls.from_function(true_mean_db, bounds, spacing_m, sigma_db)

    def sample(self, east, north) -> np.ndarray:
        """Bilinear interpolation of the map at positions: (..., R). Outside the grid: edge value."""
        east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        _, n_h, n_w = self.mean_db.shape
        fx = np.clip((east - self.east0_m) / self.spacing_m, 0.0, n_w - 1)
        fy = np.clip((north - self.north0_m) / self.spacing_m, 0.0, n_h - 1)
        x0 = np.minimum(fx.astype(np.int64), max(n_w - 2, 0))
        y0 = np.minimum(fy.astype(np.int64), max(n_h - 2, 0))
        x1, y1 = np.minimum(x0 + 1, n_w - 1), np.minimum(y0 + 1, n_h - 1)
        wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]
        m = np.moveaxis(self.mean_db, 0, -1)  # (H, W, R) view
        top = m[y0, x0] * (1 - wx) + m[y0, x1] * wx
        bottom = m[y1, x0] * (1 - wx) + m[y1, x1] * wx
        return top * (1 - wy) + bottom * wy


def _expand(bounds: Bounds, margin_m: float) -> Bounds:
    e0, e1, n0, n1 = bounds
    return (e0 - margin_m, e1 + margin_m, n0 - margin_m, n1 + margin_m)
