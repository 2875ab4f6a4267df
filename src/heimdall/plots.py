"""The evaluate stage's plots: CSV data for `dvc plots` and PNG renderings for people (also MLflow
artifacts). A module of its own so that editing a plot reruns evaluate only, never train."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from heimdall.atomic import save_figure, write_csv
from heimdall.evaluation import ellipse_coverage, mahalanobis_sq

CALIBRATION_K = np.round(np.arange(0.25, 3.01, 0.25), 2)


def calibration_curve(mean, cov, target) -> list[dict]:
    m2 = mahalanobis_sq(mean, cov, target)
    return [{"k_sigma": float(k), "observed": ellipse_coverage(m2, k), "ideal": float(1 - math.exp(-k * k / 2))}
            for k in CALIBRATION_K]


def ellipse_outline(mean, cov, k: float, n: int = 64) -> np.ndarray:
    """(n, 2) points on the k-σ ellipse of a 2-D Gaussian, for drawing."""
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)], 1) * (k * np.sqrt(np.maximum(vals, 0)))
    return mean + circle @ vecs.T


def write_evaluation_plots(plots_dir: Path, mean, cov, target, receiver_enu_m, receiver_names,
                           errors_by_method: dict[str, np.ndarray]) -> list[Path]:
    """The evaluate stage's plots: CSV data for `dvc plots` and PNG renderings for people (also
    MLflow artifacts): error quantiles of the model and every baseline, calibration, map."""
    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    errors = {"model": np.linalg.norm(mean - target, axis=1), **errors_by_method}
    q = np.linspace(0, 1, 101)
    rows = [{"quantile": float(qq), **{f"{k}_km": float(np.quantile(v, qq) / 1e3) for k, v in errors.items()}}
            for qq in q]
    write_csv(plots_dir / "error_cdf.csv", rows)
    calib = calibration_curve(mean, cov, target)
    write_csv(plots_dir / "calibration.csv", calib)
    paths = [plots_dir / "error_cdf.csv", plots_dir / "calibration.csv"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in errors.items():
        s = np.sort(v) / 1e3
        ax.plot(s, np.arange(1, len(s) + 1) / len(s), label=k, lw=2.2 if k == "model" else 1.2)
    ax.set(xscale="log", xlabel="error (km)", ylabel="fraction of test sessions", title="Error CDF, test split")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(save_figure(fig, plots_dir / "error_cdf.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    ks = [c["k_sigma"] for c in calib]
    ax.plot(ks, [c["ideal"] for c in calib], "k--", label="ideal (χ²₂)")
    ax.plot(ks, [c["observed"] for c in calib], "o-", label="model")
    ax.set(xlabel="k (ellipse size in σ)", ylabel="fraction inside k-σ ellipse", title="Calibration, test split")
    ax.legend()
    paths.append(save_figure(fig, plots_dir / "calibration.png"))

    fig, ax = plt.subplots(figsize=(7, 6))
    rx = np.asarray(receiver_enu_m) / 1e3
    ax.scatter(target[:, 0] / 1e3, target[:, 1] / 1e3, s=4, c="0.6", label="test transmitters")
    show = np.random.default_rng(0).choice(len(target), size=min(25, len(target)), replace=False)
    for i in show:
        e = ellipse_outline(mean[i], cov[i], 1.0) / 1e3
        ax.plot(e[:, 0], e[:, 1], lw=0.7, c="tab:blue", alpha=0.7)
        ax.plot([target[i, 0] / 1e3, mean[i, 0] / 1e3], [target[i, 1] / 1e3, mean[i, 1] / 1e3], c="tab:red", lw=0.7)
    ax.scatter(rx[:, 0], rx[:, 1], marker="^", s=70, c="k", label="receivers", zorder=5)
    for name, (x, y) in zip(receiver_names, rx[:, :2]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pad = 15.0
    ax.set_xlim(min(rx[:, 0].min(), target[:, 0].min() / 1e3) - pad, max(rx[:, 0].max(), target[:, 0].max() / 1e3) + pad)
    ax.set_ylim(min(rx[:, 1].min(), target[:, 1].min() / 1e3) - pad, max(rx[:, 1].max(), target[:, 1].max() / 1e3) + pad)
    ax.set(xlabel="east (km)", ylabel="north (km)", aspect="equal",
           title="Test sessions: 1σ ellipses (blue) and errors (red) for 25 of them")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(save_figure(fig, plots_dir / "map.png"))
    return paths


def write_search_region_plots(plots_dir: Path, levels, observed: dict[str, np.ndarray]) -> list[Path]:
    """Reliability diagram of the search regions (heimdall.regions): observed coverage of the truth
    vs the nominal level, per method (model HPD, Gaussian ellipse, oracle HPD where synthetic).
    search_regions.csv for `dvc plots`, search_regions.png for people."""
    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"nominal": float(p), "ideal": float(p), **{k: float(v[j]) for k, v in observed.items()}}
            for j, p in enumerate(levels)]
    write_csv(plots_dir / "search_regions.csv", rows)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0, 1], [0, 1], "k--", label="ideal")
    for k, v in observed.items():
        ax.plot(levels, v, "o-", ms=3, label=k.replace("_", " "))
    ax.set(xlabel="nominal level p", ylabel="fraction of truths inside the p region", xlim=(0, 1), ylim=(0, 1),
           title="Search-region reliability, test split")
    ax.legend(fontsize=8)
    return [plots_dir / "search_regions.csv", save_figure(fig, plots_dir / "search_regions.png")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
