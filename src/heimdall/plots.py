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



# The search-region map: a few test sessions, fixed by a seeded draw so that the figure is
# reproducible; their 50 % and 90 % HPD regions (heimdall.regions) next to the Gaussian's 90 % ellipse.
MAP_SESSIONS = 6
MAP_LEVELS = (0.50, 0.90)


def map_sessions(n_test: int, k: int = MAP_SESSIONS) -> np.ndarray:
    """The positions (within the test split, ascending) of the sessions the search-region map draws."""
    return np.sort(np.random.default_rng(0).choice(n_test, size=min(k, n_test), replace=False))


def write_search_region_map(plots_dir: Path, prob, grid: tuple, session_ids, target, mean, cov,
                            receiver_enu_m, receiver_names, levels=MAP_LEVELS, masses=None,
                            modes=None) -> tuple[Path, np.ndarray | None]:
    """search_regions_map.png: an overview (receivers, and each drawn session's truth and outer
    region) and one zoomed panel per session with its HPD regions at ``levels`` (filled cells of the
    model's map grid), the truth, the point estimate and the shipped Gaussian's ellipse at the
    outer level.

    ``prob`` (k, G): the sessions' calibrated cell probabilities (None: the model has no map grid,
    only ellipses are drawn); ``grid`` = (east0_m, north0_m, spacing_m, n_east, n_north), cells
    row-major (north row × n_east + east column); ``masses`` (L,): the posterior mass each level's
    region holds (the model's calibrated region masses; default: the levels themselves); ``modes``:
    (weight (k, K), mean (k, K, 2)) drawn as numbered circles. Returns (the PNG path, the drawn layers
    (k, n_north, n_east) int: the number of ``levels`` whose region holds each cell, None without a grid).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from heimdall.regions import chi2_2_quantile, hpd_membership

    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    target, mean, cov = (np.asarray(a, dtype=np.float64) for a in (target, mean, cov))
    rx = np.asarray(receiver_enu_m, dtype=np.float64)[:, :2] / 1e3
    k = len(target)
    r_ell = float(np.sqrt(chi2_2_quantile(levels[-1])))  # the outer level's ellipse in σ
    layers = None
    if prob is not None:
        east0, north0, spacing, n_east, n_north = grid
        member = hpd_membership(prob, levels if masses is None else masses)  # (k, L, G)
        layers = member.sum(1).reshape(k, n_north, n_east)
        extent = (np.array([east0 - spacing / 2, east0 + (n_east - 0.5) * spacing,
                            north0 - spacing / 2, north0 + (n_north - 0.5) * spacing]) / 1e3)
        cell_km2 = spacing**2 / 1e6
    # 0: outside, 1..L: inside the outer .. inner region
    colors = ["#fdd49e", "#fc8d59", "#b30000"][-len(levels):] if len(levels) <= 3 else None
    cmap = ListedColormap(colors or plt.get_cmap("OrRd")(np.linspace(0.3, 0.9, len(levels))))
    names = [f"{round(100 * p)} % HPD region" for p in levels]

    fig = plt.figure(figsize=(17, 7))
    gs = fig.add_gridspec(2, 5)
    over = fig.add_subplot(gs[:, :2])
    if k > 6:
        raise ValueError(f"the search-region map draws at most 6 sessions, not {k}")
    panels = [fig.add_subplot(gs[r, 2 + c]) for r in range(2) for c in range(3)][:k]

    over.scatter(rx[:, 0], rx[:, 1], marker="^", s=70, c="k", label="receivers", zorder=5)
    for name, (x, y) in zip(receiver_names, rx):
        over.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for j in range(k):
        if layers is not None:
            # padded with empty cells so that a region touching the grid's edge is outlined closed
            over.contour((np.arange(-1, n_east + 1) * spacing + east0) / 1e3,
                         (np.arange(-1, n_north + 1) * spacing + north0) / 1e3,
                         np.pad(layers[j] >= 1, 1).astype(float), levels=[0.5], colors=[f"C{j}"], linewidths=0.9)
        over.plot(*(target[j] / 1e3), "*", ms=11, c=f"C{j}", mec="k", mew=0.5, zorder=6)
        over.annotate(str(j + 1), target[j] / 1e3, textcoords="offset points", xytext=(5, -10), fontsize=9,
                      weight="bold", color=f"C{j}")
    pts = [rx, target / 1e3]
    if layers is not None:  # every drawn region inside the overview too
        rows, cols_ = np.nonzero(layers.max(0))
        pts.append(np.stack([east0 + cols_ * spacing, north0 + rows * spacing], 1) / 1e3)
    pts = np.concatenate(pts)
    pad = max(0.05 * float((pts.max(0) - pts.min(0)).max()), 2.0)
    lo, hi = pts.min(0) - pad, pts.max(0) + pad
    over.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="east (km)", ylabel="north (km)", aspect="equal",
             title=f"{k} test sessions (stars, numbered)" + (f": outline of their {names[-1]}" if layers is not None else ""))
    over.legend(loc="lower right", fontsize=8)

    for j, ax in enumerate(panels):
        t, m = target[j] / 1e3, mean[j] / 1e3
        ell = ellipse_outline(mean[j], cov[j], r_ell, n=256) / 1e3
        box = [t, m]
        info = []
        if layers is not None:
            shown = np.ma.masked_equal(layers[j], 0)
            ax.imshow(shown, origin="lower", extent=extent, cmap=cmap, vmin=0.5, vmax=len(levels) + 0.5,
                      interpolation="nearest", zorder=1)
            rows, cols_ = np.nonzero(layers[j])
            box.append(np.stack([east0 + cols_ * spacing, north0 + rows * spacing], 1) / 1e3)
            area = member[j].sum(1) * cell_km2
            info += [f"{round(100 * p)} %: {a:,.0f} km²" for p, a in zip(levels, area)]
        else:
            box.append(ell)
        info.append(f"ellipse {round(100 * levels[-1])} %: "
                    f"{np.pi * np.sqrt(max(np.linalg.det(cov[j]), 0.0)) * r_ell**2 / 1e6:,.0f} km²")
        ax.plot(ell[:, 0], ell[:, 1], c="tab:blue", lw=1.2, zorder=3)
        ax.scatter(rx[:, 0], rx[:, 1], marker="^", s=50, c="k", zorder=5)
        ax.plot(*t, "*", ms=13, c="lime", mec="k", mew=0.8, zorder=6)
        ax.plot(*m, "x", ms=9, mew=2, c="tab:blue", zorder=6)
        if modes is not None:
            for rank, (wt, mm) in enumerate(zip(modes[0][j], modes[1][j] / 1e3)):
                if wt > 0:
                    ax.plot(*mm, "o", ms=7, mfc="none", mec="purple", mew=1.3, zorder=6)
                    ax.annotate(f"{rank + 1}: {100 * wt:.0f} %", mm, textcoords="offset points", xytext=(5, 3),
                                fontsize=7, color="purple", zorder=7)
                    if wt >= 0.1:  # zoom to hold the likely modes (a 2 % one 100 km away would shrink the rest)
                        box.append(mm)
        b = np.concatenate([np.atleast_2d(x) for x in box])
        centre, half = (b.min(0) + b.max(0)) / 2, max(float((b.max(0) - b.min(0)).max()) / 2 * 1.15, 3.0)
        ax.set(xlim=(centre[0] - half, centre[0] + half), ylim=(centre[1] - half, centre[1] + half), aspect="equal")
        ax.set_title(f"{j + 1}: test session #{int(session_ids[j])}", fontsize=9)
        ax.text(0.02, 0.98, "\n".join(info), transform=ax.transAxes, va="top", fontsize=7,
                bbox={"fc": "white", "ec": "0.7", "alpha": 0.85}, zorder=7)
        ax.tick_params(labelsize=7)
    handles = [Patch(color=cmap(i), label=names[len(levels) - 1 - i]) for i in range(len(levels))] if layers is not None else []
    handles += [plt.Line2D([], [], c="tab:blue", lw=1.2, label=f"shipped Gaussian, {round(100 * levels[-1])} % ellipse"),
                plt.Line2D([], [], ls="", marker="x", c="tab:blue", mew=2, label="point estimate"),
                *([plt.Line2D([], [], ls="", marker="o", mfc="none", mec="purple", label="posterior modes (weight)")]
                  if modes is not None else []),
                plt.Line2D([], [], ls="", marker="*", ms=11, c="lime", mec="k", label="truth"),
                plt.Line2D([], [], ls="", marker="^", c="k", label="receiver")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("Search regions of the calibrated posterior (km, east / north)" if layers is not None
                 else "No map grid: Gaussian ellipses only", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return save_figure(fig, plots_dir / "search_regions_map.png"), layers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
