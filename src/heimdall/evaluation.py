"""Metrics of a Gaussian position estimate (the evaluate stage's plots are in heimdall.plots).

Coverage: the fraction of true positions inside the predicted k-σ ellipse, i.e. with squared
Mahalanobis distance ≤ k². For a calibrated 2-D Gaussian it is 1 − exp(−k²/2): 39.3 % at 1σ,
86.5 % at 2σ (χ² with 2 degrees of freedom).
"""

from __future__ import annotations

import math

import numpy as np


def mahalanobis_sq(mean: np.ndarray, cov: np.ndarray, target: np.ndarray) -> np.ndarray:
    d = target - mean
    inv = np.linalg.inv(cov)
    return np.einsum("ni,nij,nj->n", d, inv, d)


def ellipse_coverage(m2: np.ndarray, k: float) -> float:
    """Fraction of errors inside their k-sigma ellipse (squared Mahalanobis distance <= k²)."""
    return float((m2 <= k * k).mean())


def gaussian_metrics(mean: np.ndarray, cov: np.ndarray, target: np.ndarray) -> dict[str, float]:
    err = np.linalg.norm(mean - target, axis=1)
    m2 = mahalanobis_sq(mean, cov, target)
    logdet = np.log(np.linalg.det(cov))
    nll = 0.5 * m2 + 0.5 * logdet + math.log(2 * math.pi)
    return {
        "mean_error_m": float(err.mean()),
        "median_error_m": float(np.median(err)),
        "p90_error_m": float(np.percentile(err, 90)),
        "rmse_m": float(np.sqrt((err**2).mean())),
        "nll": float(nll.mean()),
        "coverage_1sigma": ellipse_coverage(m2, 1),
        "coverage_2sigma": ellipse_coverage(m2, 2),
        "median_sigma_m": float(np.median(np.sqrt(np.trace(cov, axis1=1, axis2=2) / 2))),
    }
