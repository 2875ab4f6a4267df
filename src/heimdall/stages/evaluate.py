"""Stage evaluate: models/model.ckpt + data/features.h5 -> models/metrics/test.json, the comparison
table (models/metrics/compare/*.json) and the evaluation plots.

The model's test-split accuracy and calibration beside the baselines (kNN fingerprinting, ML on a
log-distance law, ML on the kriged map the model itself inverts) and the physical limit (ML on the
simulator's true map, the Cramér-Rao bound) on the same sessions, and the search regions (HPD
regions of the model's and the oracle's grid posteriors, the Gaussian's ellipses). A stage of its own so that
changing how the model is judged or drawn never retrains it (docs/model.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from heimdall import baselines, regions, tracking
from heimdall.atomic import md5_file, write_json
from heimdall.calibration import calibration_sessions, model_grid, model_grid_cells
from heimdall.checkpoint import check_features_match, load_checkpoint
from heimdall.contracts import RELIABILITY_LEVELS
from heimdall.budget import check_features_file
from heimdall.data import load_features
from heimdall.errors import HeimdallError
from heimdall.evaluation import gaussian_metrics
from heimdall.model import LocalizationNet
from heimdall.params import Params
from heimdall.plots import (
    MAP_LEVELS,
    map_sessions,
    write_evaluation_plots,
    write_search_region_map,
    write_search_region_plots,
)
from heimdall.radiomap import RadioMapGrid, true_map_sigma_db
from heimdall.runner import estimate

BASELINES = ("knn", "ml_logdistance", "kriged_map", "oracle")
# The headline table `dvc metrics show` prints: one file per method, the same few columns each.
COMPARE_KEYS = ("mean_error_m", "median_error_m", "p90_error_m", "frac_within_5km", "frac_top_mode_within_5km",
                "coverage_2sigma", "coverage_hpd90", "area_hpd90_km2", "coverage_ellipse90", "area_ellipse90_km2")


def model_radio_map(model: LocalizationNet) -> RadioMapGrid:
    """The learned map inside the model as a RadioMapGrid (what the kriged-map baseline scores)."""
    east0, north0, spacing, n_east, n_north = model_grid(model)
    return RadioMapGrid(east0_m=east0, north0_m=north0, spacing_m=spacing,
                        mean_db=model.map_mean_db.numpy().reshape(-1, n_north, n_east),
                        sigma_db=model.map_sigma_db.double().numpy())


def _hpd(logit_batches, truth_cell: np.ndarray, temperature: float, mass: np.ndarray, cell_km2: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """HPD regions of softmax(logits / temperature) holding ``mass`` (L,): (area_km2 (N, L), covered (N, L))."""
    n_cells, covered = regions.tempered_hpd_regions(logit_batches, truth_cell, [temperature], mass)
    return n_cells[0] * cell_km2, covered[0]


def model_posteriors(model: LocalizationNet, features, idx: np.ndarray, shown: np.ndarray | None = None):
    """One pass of ``model.locate`` over sessions ``idx``: its search regions at every
    RELIABILITY_LEVELS (the calibrated masses, computed as ``heimdall predict`` does from the cell
    probabilities) and its modes. Returns ``(area_km2 (N, L), covered (N, L), modes (weight (N, K),
    mean (N, K, 2)), {position in idx: cell probabilities (G,)} for the positions in ``shown``)``."""
    import torch

    target = features.target_enu_m[idx]
    truth, cell_km2 = model_grid_cells(model, target)
    mass = model.region_mass.double().numpy()
    shown = np.asarray([] if shown is None else shown, dtype=np.int64)
    n_cells, covered, weights, means, kept = [], [], [], [], {}
    s = 0
    with torch.no_grad():
        for inputs in features.input_batches(idx):
            _, _, prob, weight, mean, _ = (t.double().numpy() for t in model.locate(*inputs))
            n, c = regions.hpd_regions(prob, truth[s:s + len(prob)], mass)
            n_cells.append(n)
            covered.append(c)
            weights.append(weight)
            means.append(mean)
            kept.update({int(r): prob[r - s] for r in shown[(shown >= s) & (shown < s + len(prob))]})
            s += len(prob)
    return (np.concatenate(n_cells) * cell_km2, np.concatenate(covered),
            (np.concatenate(weights), np.concatenate(means)), kept)


def mode_metrics(weight: np.ndarray, mean: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """How useful the published modes are: how often the most probable one (and any one) lies
    within 5 km of the truth, how many hold at least 1 % of the mass, and how much mass they hold."""
    used = weight >= 0.01
    dist = np.linalg.norm(mean - target[:, None, :], axis=2)
    return {"frac_top_mode_within_5km": float(np.mean(dist[:, 0] < 5e3)),
            "frac_any_mode_within_5km": float(np.mean(((dist < 5e3) & used).any(1))),
            "mean_modes_over_1pct": float(used.sum(1).mean()), "mean_top_weight": float(weight[:, 0].mean()),
            "mean_elsewhere": float(np.clip(1.0 - weight.sum(1), 0.0, 1.0).mean())}


def search_regions(model: LocalizationNet, features, idx: np.ndarray, mean: np.ndarray, cov: np.ndarray,
                   min_snr_db: float | None, shown: np.ndarray | None = None) -> tuple[dict, dict, dict]:
    """Search regions on sessions ``idx`` (heimdall.regions, docs/model.md "Search regions"):
    the model's calibrated HPD regions on its map grid, its modes, the ellipses of its Gaussian
    summary (mean, cov), and on synthetic data the oracle's HPD regions on the same grid cells.
    Returns (the test.json section, {method: observed coverage at RELIABILITY_LEVELS} for the
    reliability diagram, {position in idx: calibrated cell probabilities} for ``shown`` positions).

    Oracle posterior: the simulator's true mean map evaluated at the model's cell centres, the
    fading sigma per receiver estimated from the training split (as the oracle baseline does),
    the same TX-power profiling (heimdall.txpower), a flat prior; calibrated the same way as the
    model on the validation split's oracle posteriors: region temperature
    (regions.choose_region_temperature), then one mass per level (regions.conformal_masses).
    """
    levels = RELIABILITY_LEVELS
    head = [levels.index(p) for p in regions.LEVELS]
    target = features.target_enu_m[idx]
    area_m2, inside = regions.gaussian_regions(mean, cov, target, levels)
    found = {"gaussian_ellipse": (area_m2 / 1e6, inside)}
    section: dict = {"levels": list(regions.LEVELS)}
    if not model.has_map:  # no grid: only the Gaussian's ellipses
        return ({**section, "gaussian_ellipse": regions.summarise(area_m2[:, head] / 1e6, inside[:, head])},
                {"gaussian_ellipse": inside.mean(0)}, {})
    truth, cell_km2 = model_grid_cells(model, target)
    area, covered, (weight, mode_mean), kept = model_posteriors(model, features, idx, shown)
    found["model_hpd"] = (area, covered)
    calibration = {"model_hpd": {"temperature": float(model.region_temperature),
                                 "mass": model.region_mass.double().numpy()[head].round(6).tolist()}}
    if features.scenario_json() is not None:
        from heimdall.params import ScenarioParams
        from heimdall.simulator import Scenario

        scenario = Scenario(ScenarioParams.model_validate_json(features.scenario_json()))
        tr = features.indices("train")
        sigma = true_map_sigma_db(scenario, features.rss_dbm[tr], features.present[tr], features.target_enu_m[tr],
                                  features.snr_db[tr].astype(np.float64), min_snr_db)
        east, north = model.grid_east_m.double().numpy(), model.grid_north_m.double().numpy()
        true_db = np.concatenate([scenario.mean_rss_dbm(east[i:i + 8192], north[i:i + 8192], np.zeros(len(east[i:i + 8192])))
                                  for i in range(0, len(east), 8192)]).T  # (R, G)

        def oracle_logits(rows):
            return baselines.map_log_posterior(true_db, sigma, features.rss_dbm[rows], features.present[rows])

        va = calibration_sessions(features)  # the sessions the model's regions were calibrated on
        val_truth, _ = model_grid_cells(model, features.target_enu_m[va])
        tau = regions.choose_region_temperature(oracle_logits(va), val_truth)["temperature"]
        mass = regions.conformal_masses(oracle_logits(va), val_truth, tau, levels)
        found["oracle_hpd"] = _hpd(oracle_logits(idx), truth, tau, mass, cell_km2)
        calibration["oracle_hpd"] = {"temperature": tau, "mass": mass[head].round(6).tolist()}
    section = {**section, "cell_area_km2": cell_km2,
               "frac_truth_outside_grid": float(np.mean(truth < 0)),
               "calibration": calibration,
               **{name: regions.summarise(a[:, head], c[:, head], regions.LEVELS) for name, (a, c) in found.items()},
               "modes": mode_metrics(weight, mode_mean, target)}
    return section, {name: c.mean(0) for name, (_, c) in found.items()}, {"probabilities": kept, "modes": (weight, mode_mean)}


def _p90(summary: dict, tag: str) -> dict[str, float]:
    """A method's 90 % search region as compare-table columns: coverage_<tag>, area_<tag>_km2 (median)."""
    return {f"coverage_{tag}": summary["p90"]["coverage"], f"area_{tag}_km2": summary["p90"]["median_area_km2"]}


PRODUCTION_NOTE = ("a production run (extract_features.split.test_fraction: 0): every labelled session but "
                   "validation trained this model and none was held out, so there is no accuracy to report; "
                   "the same params with a test split measure it")


def _production_run(params: Params, ckpt_path: Path, metrics_dir: Path, plots_dir: Path) -> dict:
    """No test split: say so in test.json and the compare table instead of inventing numbers."""
    write_json(metrics_dir / "test.json", {"n_test": 0, "production_run": True, "note": PRODUCTION_NOTE})
    write_json(metrics_dir / "compare" / "model.json", {"n_test": 0})
    plots_dir.mkdir(parents=True, exist_ok=True)
    client, run_id = tracking.run_for_checkpoint(params.train.mlflow_experiment, md5_file(ckpt_path))
    client.set_tag(run_id, "heimdall.production_run", "true")
    return {"n_test": 0, "production_run": True, "mlflow_run_id": run_id}


def run(params: Params, features_path: Path, ckpt_path: Path, metrics_dir: Path, plots_dir: Path) -> dict:
    t_start = time.perf_counter()
    model, payload = load_checkpoint(ckpt_path)
    check_features_file(features_path, "evaluate")
    features = load_features(features_path)
    check_features_match(payload, model, features, features_path)
    te = features.indices("test")
    if len(te) == 0:
        return _production_run(params, ckpt_path, metrics_dir, plots_dir)
    target = features.target_enu_m[te]
    mean, cov = estimate(model, features.input_batches(te))
    net_mean, net_cov = estimate(model, features.input_batches(te), network_only=True)
    test = {"n_test": int(len(te)), **gaussian_metrics(mean, cov, target)}
    test["network_only"] = gaussian_metrics(net_mean, net_cov, target)
    frac = float(np.mean(np.linalg.norm(mean - target, axis=1) < 5e3))
    test["frac_within_5km"] = frac

    t = time.perf_counter()
    rm = params.train.radio_map
    base, base_errors = baselines.baseline_suite(
        features.rss_view(), source=str(features_path), spacing_m=rm.spacing_km * 1e3, margin_m=rm.margin_km * 1e3,
        fit_min_snr_db=rm.min_snr_db, kriged_grid=model_radio_map(model) if model.has_map else None,
        seed=params.train.seed,
    )
    timings = {"baselines_s": time.perf_counter() - t}
    timings.update({f"{k}_s": base[k].pop("wall_s") for k in BASELINES if k in base})
    test["baselines"] = {k: base[k] for k in BASELINES if k in base}
    if "crlb_rmse_m" in base:
        test["crlb_rmse_m"] = base["crlb_rmse_m"]
    t = time.perf_counter()
    shown = map_sessions(len(te))
    test["search_regions"], reliability, drawn = search_regions(model, features, te, mean, cov, rm.min_snr_db, shown)
    timings["search_regions_s"] = time.perf_counter() - t
    bad = [k for k, v in tracking.flatten(test).items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise HeimdallError(f"evaluation produced non-finite metrics ({', '.join(bad[:3])}); nothing written")

    write_json(metrics_dir / "test.json", test)
    sr = test["search_regions"]
    rows = {"model": {**test, **(_p90(sr["model_hpd"], "hpd90") if "model_hpd" in sr else {}),
                      **_p90(sr["gaussian_ellipse"], "ellipse90"), **sr.get("modes", {})},
            "network_only": {**test["network_only"], "frac_within_5km": float(np.mean(
        np.linalg.norm(net_mean - target, axis=1) < 5e3))}, **test["baselines"]}
    if "oracle_hpd" in sr:
        rows["oracle"] = {**rows["oracle"], **_p90(sr["oracle_hpd"], "hpd90")}
    for name, values in rows.items():
        write_json(metrics_dir / "compare" / f"{name}.json",
                   {k: round(float(values[k]), 4 if k.startswith(("frac", "coverage")) else 1)
                    for k in COMPARE_KEYS if k in values})
    pngs = write_evaluation_plots(plots_dir, mean, cov, target, features.receiver_enu_m, features.receiver_names, base_errors)
    pngs += write_search_region_plots(plots_dir, RELIABILITY_LEVELS, reliability)
    kept = drawn.get("probabilities")
    prob = np.stack([kept[int(r)] for r in shown]) if kept else None
    modes = tuple(m[shown] for m in drawn["modes"]) if kept else None
    mass = model.region_mass.double().numpy()[[RELIABILITY_LEVELS.index(p) for p in MAP_LEVELS]]
    pngs.append(write_search_region_map(
        plots_dir, prob, model_grid(model) if prob is not None else None, shown, target[shown], mean[shown],
        cov[shown], features.receiver_enu_m, features.receiver_names, masses=mass, modes=modes)[0])

    timings["wall_time_s"] = time.perf_counter() - t_start
    tracking.write_timings(metrics_dir / "test.json", timings)
    client, run_id = tracking.run_for_checkpoint(params.train.mlflow_experiment, md5_file(ckpt_path))
    for k, v in {**{f"test.{k}": v for k, v in tracking.numbers(test).items()}, **timings}.items():
        client.log_metric(run_id, k, v)
    for p in [metrics_dir / "test.json", *pngs]:
        client.log_artifact(run_id, str(p))
    return {"median_error_m": round(test["median_error_m"], 1),
            "knn_median_error_m": round(test["baselines"]["knn"]["median_error_m"], 1), "mlflow_run_id": run_id}
