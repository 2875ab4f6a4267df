"""Metrics of a Gaussian position estimate and the train stage's plots.

Coverage: the fraction of true positions inside the predicted k-σ ellipse, i.e. with squared
Mahalanobis distance ≤ k². For a calibrated 2-D Gaussian it is 1 − exp(−k²/2): 39.3 % at 1σ,
86.5 % at 2σ (χ² with 2 degrees of freedom).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from heimdall.atomic import atomic_path

CALIBRATION_K = np.round(np.arange(0.25, 3.01, 0.25), 2)


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


def calibration_curve(mean, cov, target) -> list[dict]:
    m2 = mahalanobis_sq(mean, cov, target)
    return [{"k_sigma": float(k), "observed": ellipse_coverage(m2, k), "ideal": float(1 - math.exp(-k * k / 2))}
            for k in CALIBRATION_K]


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def ellipse(mean, cov, k: float, n: int = 64) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)], 1) * (k * np.sqrt(np.maximum(vals, 0)))
    return mean + circle @ vecs.T


def write_plots(plots_dir: Path, history: list[dict], test: dict, mean, cov, target, fs, test_idx,
                params, errors_by_method: dict[str, np.ndarray] | None = None) -> list[Path]:
    """CSV data for `dvc plots` and PNG renderings for people (also MLflow artifacts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []

    # learning curves
    if history:
        _write_csv(plots_dir / "learning_curve.csv",
                   [{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_loss": h["val_loss"]} for h in history])
    # error quantiles of the model and every baseline on the same test sessions
    errors = {"model": np.linalg.norm(mean - target, axis=1)}
    errors.update(errors_by_method or {})
    q = np.linspace(0, 1, 101)
    rows = [{"quantile": float(qq), **{f"{k}_km": float(np.quantile(v, qq) / 1e3) for k, v in errors.items()}}
            for qq in q]
    _write_csv(plots_dir / "error_cdf.csv", rows)
    calib = calibration_curve(mean, cov, target)
    _write_csv(plots_dir / "calibration.csv", calib)

    def save(fig, name):
        path = plots_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        pngs.append(path)

    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], label="train (augmented)")
        ax.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], label="val")
        ax.set(xlabel="epoch", ylabel="Gaussian NLL (network, normalised units)", title="Learning curves")
        ax.legend()
        save(fig, "learning_curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in errors.items():
        s = np.sort(v) / 1e3
        ax.plot(s, np.arange(1, len(s) + 1) / len(s), label=k, lw=2.2 if k == "model" else 1.2)
    ax.set(xscale="log", xlabel="error (km)", ylabel="fraction of test sessions", title="Error CDF, test split")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, "error_cdf.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    ks = [c["k_sigma"] for c in calib]
    ax.plot(ks, [c["ideal"] for c in calib], "k--", label="ideal (χ²₂)")
    ax.plot(ks, [c["observed"] for c in calib], "o-", label="model")
    ax.set(xlabel="k (ellipse size in σ)", ylabel="fraction inside k-σ ellipse", title="Calibration, test split")
    ax.legend()
    save(fig, "calibration.png")

    fig, ax = plt.subplots(figsize=(7, 6))
    rx = fs.receiver_enu_m / 1e3
    ax.scatter(target[:, 0] / 1e3, target[:, 1] / 1e3, s=4, c="0.6", label="test transmitters")
    show = np.random.default_rng(0).choice(len(target), size=min(25, len(target)), replace=False)
    for i in show:
        e = ellipse(mean[i], cov[i], 1.0) / 1e3
        ax.plot(e[:, 0], e[:, 1], lw=0.7, c="tab:blue", alpha=0.7)
        ax.plot([target[i, 0] / 1e3, mean[i, 0] / 1e3], [target[i, 1] / 1e3, mean[i, 1] / 1e3], c="tab:red", lw=0.7)
    ax.scatter(rx[:, 0], rx[:, 1], marker="^", s=70, c="k", label="receivers", zorder=5)
    for name, (x, y) in zip(fs.receiver_names, rx[:, :2]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pad = 15.0
    ax.set_xlim(min(rx[:, 0].min(), target[:, 0].min() / 1e3) - pad, max(rx[:, 0].max(), target[:, 0].max() / 1e3) + pad)
    ax.set_ylim(min(rx[:, 1].min(), target[:, 1].min() / 1e3) - pad, max(rx[:, 1].max(), target[:, 1].max() / 1e3) + pad)
    ax.set(xlabel="east (km)", ylabel="north (km)", aspect="equal",
           title="Test sessions: 1σ ellipses (blue) and errors (red) for 25 of them")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "map.png")
    return pngs
