"""Search regions: how much map a person must search to find the transmitter with probability p.

Two summaries of a position posterior, each judged by coverage (the fraction of sessions whose
truth lies inside the region; calibrated when it equals p) and by area (km²):

* the **highest-posterior-density (HPD) region** on the map grid: the fewest most probable cells
  holding at least p of the posterior mass. A session is covered when its truth's cell (the grid
  cell nearest the true position) is in the set; a truth outside the grid (more than half a cell
  beyond its edge cells) is never covered. Cells tied with the last cell admitted count as inside.
  Area = number of cells × cell area.
* the **Gaussian ellipse** (the shipped single-Gaussian summary): {Mahalanobis² ≤ −2 ln(1 − p)},
  area π·sqrt(det Σ)·(−2 ln(1 − p)) (the χ²₂ quantile of level p is −2 ln(1 − p)).

numpy only (and heimdall.evaluation's metrics); the HPD search sorts in batches so memory stays bounded (batch × cells floats).
"""

from __future__ import annotations

import numpy as np

from heimdall.evaluation import mahalanobis_sq

LEVELS = (0.50, 0.68, 0.90, 0.95)
# The reliability diagram's nominal levels (the headline LEVELS among them).
RELIABILITY_LEVELS = tuple(sorted({*np.round(np.arange(0.05, 0.96, 0.05), 2).tolist(), *LEVELS}))


def level_key(p: float) -> str:
    """'p50', 'p68', 'p90', 'p95': the key of a level in metrics files."""
    return f"p{round(100 * p):02d}"


def chi2_2_quantile(p) -> np.ndarray:
    """The squared Mahalanobis radius of a 2-D Gaussian's p-level ellipse: −2 ln(1 − p)."""
    return -2.0 * np.log1p(-np.asarray(p, dtype=np.float64))


def grid_cell_index(target: np.ndarray, east0_m: float, north0_m: float, spacing_m: float,
                    n_east: int, n_north: int) -> np.ndarray:
    """(N,) flat index (row-major: north row × n_east + east column) of the grid cell nearest each
    target (N, 2); -1 for a target more than half a cell outside the grid."""
    target = np.asarray(target, dtype=np.float64)
    col = np.rint((target[:, 0] - east0_m) / spacing_m).astype(np.int64)
    row = np.rint((target[:, 1] - north0_m) / spacing_m).astype(np.int64)
    inside = (col >= 0) & (col < n_east) & (row >= 0) & (row < n_north)
    return np.where(inside, row * n_east + col, -1)


def hpd_regions(prob: np.ndarray, truth_cell: np.ndarray, levels=LEVELS, batch: int = 128
                ) -> tuple[np.ndarray, np.ndarray]:
    """HPD regions of the posteriors ``prob`` (N, G) (rows sum to 1) at each of ``levels``.

    Returns ``(n_cells (N, L) int, covered (N, L) bool)``: the number of cells in each region and
    whether the truth's cell (``truth_cell`` (N,), -1 = outside the grid) is in it.
    """
    prob = np.asarray(prob)
    levels = np.asarray(levels, dtype=np.float64)
    truth_cell = np.asarray(truth_cell, dtype=np.int64)
    n = len(prob)
    n_cells = np.empty((n, len(levels)), dtype=np.int64)
    covered = np.zeros((n, len(levels)), dtype=bool)
    for s in range(0, n, batch):
        p = np.asarray(prob[s:s + batch], dtype=np.float64)
        p = p / p.sum(1, keepdims=True)
        desc = -np.sort(-p, axis=1)
        cum = np.cumsum(desc, axis=1)
        # k = fewest cells with cumulative mass >= level (rounding: never more than every cell)
        k = np.stack([np.searchsorted(row, levels - 1e-12, side="left") + 1 for row in cum])
        k = np.minimum(k, p.shape[1])
        # admit cells tied with the last one admitted (so membership depends on probability only)
        last = np.take_along_axis(desc, k - 1, axis=1)  # (b, L)
        k = np.stack([np.searchsorted(-row, -lst, side="right") for row, lst in zip(desc, last)])
        n_cells[s:s + batch] = k
        t = truth_cell[s:s + batch]
        inside = t >= 0
        p_truth = np.where(inside, p[np.arange(len(p)), np.maximum(t, 0)], -np.inf)
        covered[s:s + batch] = inside[:, None] & (p_truth[:, None] >= last)
    return n_cells, covered


def gaussian_regions(mean: np.ndarray, cov: np.ndarray, target: np.ndarray, levels=LEVELS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """p-level ellipses of Gaussians (mean (N, 2), cov (N, 2, 2)): ``(area_m2 (N, L), covered (N, L))``."""
    m2 = mahalanobis_sq(mean, cov, np.asarray(target, dtype=np.float64))
    r2 = chi2_2_quantile(levels)
    area = np.pi * np.sqrt(np.linalg.det(cov))[:, None] * r2[None, :]
    return area, m2[:, None] <= r2[None, :]


def summarise(area_km2: np.ndarray, covered: np.ndarray, levels=LEVELS) -> dict[str, dict[str, float]]:
    """{level_key: {coverage, median_area_km2, mean_area_km2}} over sessions (rows)."""
    return {level_key(p): {"coverage": float(covered[:, j].mean()),
                           "median_area_km2": float(np.median(area_km2[:, j])),
                           "mean_area_km2": float(area_km2[:, j].mean())}
            for j, p in enumerate(levels)}
