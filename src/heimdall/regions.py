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

from heimdall.contracts import REGION_LEVELS, RELIABILITY_LEVELS
from heimdall.evaluation import mahalanobis_sq

LEVELS = REGION_LEVELS
# RELIABILITY_LEVELS: the reliability diagram's nominal levels (the headline LEVELS among them), at
# which the model's region masses are calibrated (conformal_masses).


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


def _hpd_sorted(desc: np.ndarray, p_truth: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HPD regions from each row's probabilities sorted in descending order ``desc`` (b, G) (rows sum
    to 1) and the truth cell's probability ``p_truth`` (b,) (-inf: outside the grid):
    ``(n_cells (b, L), covered (b, L))``."""
    cum = np.cumsum(desc, axis=1)
    # k = fewest cells with cumulative mass >= level (rounding: never more than every cell)
    k = np.stack([np.searchsorted(row, levels - 1e-12, side="left") + 1 for row in cum])
    k = np.minimum(k, desc.shape[1])
    # admit cells tied with the last one admitted (so membership depends on probability only)
    last = np.take_along_axis(desc, k - 1, axis=1)  # (b, L)
    k = np.stack([np.searchsorted(-row, -lst, side="right") for row, lst in zip(desc, last)])
    return k, p_truth[:, None] >= last


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
        t = truth_cell[s:s + batch]
        p_truth = np.where(t >= 0, p[np.arange(len(p)), np.maximum(t, 0)], -np.inf)
        n_cells[s:s + batch], covered[s:s + batch] = _hpd_sorted(-np.sort(-p, axis=1), p_truth, levels)
    return n_cells, covered



def hpd_thresholds(prob: np.ndarray, levels=LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """The HPD regions of posteriors ``prob`` (N, G) (rows normalised here) at ``levels`` (L,) as
    ``(threshold (N, L), n_cells (N, L))``: a cell is in a region iff its probability >= the
    threshold (the least probable cell admitted), the same sets :func:`hpd_regions` counts.
    What ``heimdall predict`` does with the graph's cell_probability and the metadata's region masses."""
    p = np.asarray(prob, dtype=np.float64)
    return _thresholds(p / p.sum(1, keepdims=True), levels)


def _thresholds(p: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray]:
    desc = -np.sort(-p, axis=1)
    k, _ = _hpd_sorted(desc, np.full(len(p), -np.inf), np.asarray(levels, dtype=np.float64))
    return np.take_along_axis(desc, k - 1, axis=1), k


def hpd_membership(prob: np.ndarray, levels=LEVELS) -> np.ndarray:
    """(N, L, G) bool: whether each cell is in each row's p-level HPD region, for posteriors ``prob``
    (N, G) (rows normalised here). The same sets :func:`hpd_regions` counts (ties with the last cell
    admitted are inside), for drawing a few sessions' regions; N × L × G booleans, so keep N small."""
    p = np.asarray(prob, dtype=np.float64)
    p = p / p.sum(1, keepdims=True)
    last, _ = _thresholds(p, levels)  # (N, L): the least probable cell admitted
    return p[:, None, :] >= last[:, :, None]


def tempered_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / τ) per row, computed exactly as :func:`tempered_hpd_regions` does."""
    lg = np.asarray(logits, dtype=np.float64)
    p = np.exp((lg - lg.max(1, keepdims=True)) / float(temperature))
    return p / p.sum(1, keepdims=True)

# ---- region temperature -------------------------------------------------------------------------
# Candidates for the region temperature τ: region probabilities = softmax(logits / τ); τ > 1 widens
# the regions, τ < 1 sharpens them. 25 values, a factor 2^(1/4) apart, 1.0 among them.
REGION_TEMPERATURES = tuple(float(x) for x in np.round(np.geomspace(0.25, 16.0, 25), 4))


def _logit_batches(logits, batch: int):
    """An (N, G) array in row batches, or an iterable of (b, G) batches as it is."""
    if isinstance(logits, np.ndarray):
        return (logits[s:s + batch] for s in range(0, len(logits), batch))
    return logits


def tempered_hpd_regions(logits, truth_cell: np.ndarray, temperatures, levels=LEVELS, batch: int = 128
                         ) -> tuple[np.ndarray, np.ndarray]:
    """HPD regions of softmax(logits / τ) for each τ in ``temperatures``.

    ``logits``: (N, G) unnormalised log posteriors (any constant per row; -inf allowed for
    impossible cells), or an iterable of (b, G) batches of them (rows in ``truth_cell`` order), so
    that N × G never needs to be in memory at once. Each batch is sorted once: the order of the
    cells does not depend on τ. Returns ``(n_cells (T, N, L), covered (T, N, L))``; with
    τ = 1 the same as :func:`hpd_regions` on softmax(logits).
    """
    temps = np.asarray(temperatures, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    truth_cell = np.asarray(truth_cell, dtype=np.int64)
    n = len(truth_cell)
    n_cells = np.empty((len(temps), n, len(levels)), dtype=np.int64)
    covered = np.zeros((len(temps), n, len(levels)), dtype=bool)
    s = 0
    for lg in _logit_batches(logits, batch):
        lg = np.asarray(lg, dtype=np.float64)
        b = len(lg)
        desc = -np.sort(-lg, axis=1)
        top = desc[:, :1]
        t = truth_cell[s:s + b]
        l_truth = np.where(t >= 0, lg[np.arange(b), np.maximum(t, 0)], -np.inf)[:, None]
        for i, tau in enumerate(temps):
            p = np.exp((desc - top) / tau)
            z = p.sum(1, keepdims=True)
            p_truth = (np.exp((l_truth - top) / tau) / z)[:, 0]
            n_cells[i, s:s + b], covered[i, s:s + b] = _hpd_sorted(p / z, p_truth, levels)
        s += b
    if s != n:
        raise ValueError(f"logits have {s} rows, truth_cell {n}")
    return n_cells, covered


def choose_region_temperature(logits, truth_cell: np.ndarray, levels=LEVELS,
                              candidates=REGION_TEMPERATURES, batch: int = 128) -> dict:
    """The region temperature τ (one of ``candidates``) whose HPD regions' coverage on these sessions
    (validation) is closest to nominal: least Σ over ``levels`` of (coverage − p)²; ties go to the
    smaller median area of the 90 % region (the level nearest 0.9), then the smaller τ. ``logits`` as in
    :func:`tempered_hpd_regions`; pure numpy, so the model and the oracle are calibrated alike.

    Returns {"temperature", "coverage" (L,), "median_cells" (L,), "table": [{temperature, loss,
    coverage, median_cells}] per candidate}.
    """
    levels = np.asarray(levels, dtype=np.float64)
    n_cells, covered = tempered_hpd_regions(logits, truth_cell, candidates, levels, batch)
    coverage = covered.mean(1)  # (T, L)
    median = np.median(n_cells, axis=1)  # (T, L)
    loss = np.round(((coverage - levels) ** 2).sum(1), 12)
    at = int(np.argmin(np.abs(levels - 0.9)))  # tie-break level: 90 % (the nearest one given)
    best = min(range(len(candidates)), key=lambda i: (loss[i], median[i, at], candidates[i]))
    table = [{"temperature": float(c), "loss": float(loss[i]), "coverage": coverage[i].tolist(),
              "median_cells": median[i].tolist()} for i, c in enumerate(candidates)]
    return {"temperature": float(candidates[best]), "coverage": coverage[best].tolist(),
            "median_cells": median[best].tolist(), "table": table}


def conformal_masses(logits, truth_cell: np.ndarray, temperature: float, levels=RELIABILITY_LEVELS,
                     batch: int = 128) -> np.ndarray:
    """Region masses (L,): the HPD region of softmax(logits / τ) holding ``masses[j]`` of the mass
    covers ``levels[j]`` of these sessions' truths (split-conformal calibration on validation).

    One temperature cannot make a multi-modal posterior's HPD regions calibrated at every level at
    once (measured: τ = 2.38 left the 90 % region at 0.874 on validation, 0.862 on test); a per-level
    mass can. Score of a session = the mass of the cells strictly more probable than its truth's
    cell (+inf outside the grid); its region at mass m covers the truth iff score < m. The mass for
    level p is the ⌈(n + 1)·p⌉-th smallest score (capped at 1: the whole grid), so that on
    exchangeable sessions the coverage is at least p (Vovk et al.; Angelopoulos & Bates 2021). The
    cells' order never depends on τ, so regions at different levels stay nested.
    """
    truth_cell = np.asarray(truth_cell, dtype=np.int64)
    scores, s = [], 0
    for lg in _logit_batches(logits, batch):
        p = tempered_probabilities(lg, temperature)
        t = truth_cell[s:s + len(p)]
        p_truth = np.where(t >= 0, p[np.arange(len(p)), np.maximum(t, 0)], np.inf)
        scores.append(np.where(t >= 0, (p * (p > p_truth[:, None])).sum(1), np.inf))
        s += len(p)
    if s != len(truth_cell):
        raise ValueError(f"logits have {s} rows, truth_cell {len(truth_cell)}")
    scores = np.sort(np.concatenate(scores))
    n = len(scores)
    k = np.ceil((n + 1) * np.asarray(levels, dtype=np.float64) - 1e-9).astype(np.int64)  # 1-based rank
    mass = np.where(k <= n, scores[np.minimum(k, n) - 1] + 1e-7, 1.0)
    return np.minimum(mass, 1.0)


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
