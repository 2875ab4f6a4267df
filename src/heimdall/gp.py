"""Gaussian-process maps of one receiver's residual (RBF kernel + white noise): the exact GP and the sparse
inducing-point GP the radio map (heimdall.kriging) fits per receiver, their hyper-parameter search, and the
posterior mean / local variance they answer with.

Positions are kilometres here (the kernel hyper-parameters are then of order one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.spatial.distance import cdist

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
# Sparse GP (sparse_gp): inducing points on a square grid at this many length scales. The RBF kernel's
# spectrum is negligible beyond ~3 / l, so a grid finer than ~l loses little of the map. Measured on a
# random field (l = 3.4 km, 4,000 readings over 180 x 150 km, noise 2 dB): map RMS 1.614 dB at 0.6 l
# (6,750 points, 8.0 s) and 0.8 l (3,876, 1.8 s), 1.617 at 1.0 l (2,484, 0.9 s).
INDUCING_SPACING_LENGTHS = 0.8
# ... kept only within this many length scales of a reading (farther, the posterior is the prior mean)
INDUCING_REACH_LENGTHS = 3.0
# at most this many inducing points per receiver: the m x m system is 8 m² bytes (8,000: 512 MB)
DEFAULT_MAX_INDUCING = 8000
# gp="auto": a receiver with up to this many training readings gets the exact GP, more the sparse one. The
# default campaign (~3,600 readings per receiver) stays exact. Measured per receiver and iteration, one
# BLAS thread: exact 1.7 / 10.6 / 48.4 s at 3,600 / 8,000 / 14,400 readings, sparse 2.3 / 2.1 / 2.6 s
# (and 4.6 s at 60,000: about linear once the inducing system, ~3,900 points here, is paid for).
EXACT_GP_MAX_READINGS = 5000
GP_METHODS = ("auto", "exact", "sparse")


# ---- Gaussian-process residual maps -------------------------------------------------------------
@dataclass(frozen=True)
class ResidualGP:
    """GP posterior mean of one receiver's residual map (RBF kernel + white noise) as a kernel expansion
    ``prior_mean + sum_j alpha_j k(x, basis_j)``: over the training readings (exact GP) or over a grid of
    inducing points (sparse GP, :func:`sparse_gp`)."""

    basis_km: np.ndarray  # (n, 2) positions of the expansion in km: training readings, or inducing points
    alpha: np.ndarray  # (n,) exact: (K + noise I)^-1 (e - mean); sparse: the inducing weights
    prior_mean_db: float
    signal_std_db: float
    length_km: float  # RBF length scale l in exp(-d^2 / (2 l^2))
    noise_std_db: float
    readings_km: np.ndarray | None = None  # (n_readings, 2) the training readings when basis_km is not them

    @property
    def train_km(self) -> np.ndarray:
        """(n, 2) the training readings' positions in km (what the local variance conditions on)."""
        return self.basis_km if self.readings_km is None else self.readings_km

    def predict(self, points_km: np.ndarray) -> np.ndarray:
        """Posterior mean (P,) at points (P, 2) in km.

        The RBF kernel is local, so points are processed in square tiles, each against the
        basis points within ``_GP_CUTOFF_LENGTHS`` length scales of the tile: the neglected
        terms are below exp(-18) of the signal variance (exact to ~1e-6 dB), and the cost drops
        from (points x all basis points) to (points x nearby ones).
        """
        points_km = np.asarray(points_km, dtype=np.float64).reshape(-1, 2)
        out = np.empty(points_km.shape[0])
        for sub, near in _local_blocks(points_km, self.basis_km, _GP_CUTOFF_LENGTHS * self.length_km):
            k_cross = _rbf(points_km[sub], self.basis_km[near], self.signal_std_db, self.length_km)
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


def _local_blocks(points_km: np.ndarray, basis_km: np.ndarray, cutoff_km: float):
    """Yield (indices into points, indices into basis): the points in square tiles of side 2 x cutoff
    (at most _GP_PREDICT_CHUNK at a time), each with the basis points within ``cutoff_km`` of the tile.
    The RBF kernel is local, so a kernel product over these pairs costs (points x nearby basis points)."""
    tile = max(2.0 * cutoff_km, 1e-9)
    cell = np.floor((points_km - points_km.min(axis=0)) / tile).astype(np.int64)
    key = cell[:, 0] * (cell[:, 1].max() + 1) + cell[:, 1]
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    for idx in np.split(order, starts[1:]):
        for sub in np.array_split(idx, -(-len(idx) // _GP_PREDICT_CHUNK)):
            pts = points_km[sub]
            lo, hi = pts.min(axis=0) - cutoff_km, pts.max(axis=0) + cutoff_km
            yield sub, np.flatnonzero(np.all((basis_km >= lo) & (basis_km <= hi), axis=1))


def fit_gp_hyperparameters(x_km, e) -> tuple[float, float, float]:
    """(signal std, length scale km, noise std) maximising the marginal likelihood (on a subsample: the
    caller draws it)."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

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


def exact_gp(x_km, e, signal_std, length_km, noise_std, loo_index=None):
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


def inducing_grid(x_km: np.ndarray, length_km: float, max_points: int) -> np.ndarray:
    """(m, 2) inducing points of a sparse GP: a square grid at INDUCING_SPACING_LENGTHS x the length scale
    over the readings' box (coarser if that needs more than ``max_points``), without the nodes farther
    than INDUCING_REACH_LENGTHS length scales from every reading (where the posterior is the prior)."""
    from scipy.spatial import cKDTree

    lo, hi = x_km.min(axis=0), x_km.max(axis=0)
    span = hi - lo
    spacing = INDUCING_SPACING_LENGTHS * length_km
    # the box needs prod(span / spacing + 1) nodes: the smallest spacing that keeps them within max_points
    while np.prod(np.ceil(span / spacing) + 1) > max_points:
        spacing *= 1.02
    if spacing > 1.01 * INDUCING_SPACING_LENGTHS * length_km:
        log.warning("sparse GP: inducing spacing %.2f km (%.2f length scales) to stay within %d points: the map is "
                    "smoother than its length scale %.2f km", spacing, spacing / length_km, max_points, length_km)
    n = (np.ceil(span / spacing) + 1).astype(int)
    axes = [lo[i] + (span[i] - (n[i] - 1) * spacing) / 2 + spacing * np.arange(n[i]) for i in range(2)]
    nodes = np.stack([a.ravel() for a in np.meshgrid(*axes)], axis=1)
    dist, _ = cKDTree(x_km).query(nodes, k=1)
    return nodes[dist <= INDUCING_REACH_LENGTHS * length_km]


def sparse_gp(x_km, e, signal_std, length_km, noise_std, loo_index=None, max_inducing=DEFAULT_MAX_INDUCING):
    """Subset-of-regressors GP on a grid of inducing points u (same kernel and hyper-parameters as
    :func:`exact_gp`): weights w = (noise² K_uu + K_un K_nu)^-1 K_un (e - mean), posterior mean k(x, u) w.

    O(m³ + n · m_local²) time and O(m²) memory for m inducing points and n readings (each reading only
    meets the inducing points within _GP_CUTOFF_LENGTHS length scales), against O(n³) and O(n²) exact.
    Leave-one-out residuals in closed form through Woodbury: with A = noise² K_uu + K_un K_nu the model's
    (Q + noise² I)^-1 is noise^-2 (I - K_nu A^-1 K_un), so LOO_i = (e_i - fitted_i) / (1 - k_i A^-1 k_i^T).
    Returns what :func:`exact_gp` returns.
    """
    u = inducing_grid(x_km, length_km, max_inducing)
    prior_mean = float(e.mean())
    y = e - prior_mean
    cutoff = _GP_CUTOFF_LENGTHS * length_km
    a = np.zeros((len(u), len(u)))
    k_uy = np.zeros(len(u))
    for sub, near in _local_blocks(x_km, u, cutoff):
        k = _rbf(x_km[sub], u[near], signal_std, length_km)
        a[np.ix_(near, near)] += k.T @ k
        k_uy[near] += k.T @ y[sub]
    for s in range(0, len(u), _GP_PREDICT_CHUNK):
        a[s:s + _GP_PREDICT_CHUNK] += noise_std**2 * _rbf(u[s:s + _GP_PREDICT_CHUNK], u, signal_std, length_km)
    # K_uu of a grid finer than the length scale is numerically singular; where readings are sparse nothing
    # else pins those directions down: a jitter of 1e-6 of the prior variance keeps the factorisation stable
    a[np.diag_indices_from(a)] += 1e-6 * (noise_std * signal_std) ** 2
    chol = cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
    w = cho_solve(chol, k_uy, check_finite=False)
    gp = ResidualGP(u, w, prior_mean, signal_std, length_km, noise_std, readings_km=x_km)
    fitted = gp.predict(x_km)
    loo = None
    if loo_index is not None:
        k_loo = _rbf(x_km[loo_index], u, signal_std, length_km)  # (n_loo, m)
        half = solve_triangular(chol[0], k_loo.T, lower=True, check_finite=False)  # L^-1 k^T
        leverage = np.einsum("ij,ij->j", half, half)
        loo = (e[loo_index] - fitted[loo_index]) / np.maximum(1.0 - leverage, 1e-12)
    return gp, fitted, loo


def uses_sparse(gp: str, n_readings: int) -> bool:
    """Whether a receiver with ``n_readings`` training readings gets the sparse GP (``gp``: auto | exact | sparse)."""
    return gp == "sparse" or (gp == "auto" and n_readings > EXACT_GP_MAX_READINGS)


def gp_fit_bytes(gp: str, n_readings: int, max_inducing: int = DEFAULT_MAX_INDUCING) -> float:
    """Peak bytes of one receiver's GP fit with ``n_readings`` readings (``gp`` as fit_kriged_map's): the
    n x n (exact) or at most max_inducing² (sparse) system and its factor's working copy."""
    return 2 * 8.0 * float(max_inducing if uses_sparse(gp, n_readings) else n_readings) ** 2
