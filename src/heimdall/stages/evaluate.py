"""Stage evaluate: models/model.ckpt + data/features.h5 -> models/metrics/test.json, the comparison
table (models/metrics/compare/*.json) and the evaluation plots.

The model's test-split accuracy and calibration beside the baselines (kNN fingerprinting, ML on a
log-distance law, ML on the kriged map the model itself inverts) and the physical limit (ML on the
simulator's true map, the Cramér-Rao bound) on the same sessions. A stage of its own so that
changing how the model is judged or drawn never retrains it (docs/model.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from heimdall import baselines, tracking
from heimdall.atomic import md5_file, write_json
from heimdall.checkpoint import check_features_match, load_checkpoint
from heimdall.data import load_features
from heimdall.errors import HeimdallError
from heimdall.evaluation import gaussian_metrics
from heimdall.plots import write_evaluation_plots
from heimdall.model import LocalizationNet, estimate
from heimdall.params import Params
from heimdall.radiomap import RadioMapGrid

BASELINES = ("knn", "ml_logdistance", "kriged_map", "oracle")
# The headline table `dvc metrics show` prints: one file per method, the same few columns each.
COMPARE_KEYS = ("mean_error_m", "median_error_m", "p90_error_m", "frac_within_5km", "coverage_2sigma")


def model_radio_map(model: LocalizationNet) -> RadioMapGrid:
    """The learned map inside the model as a RadioMapGrid (what the kriged-map baseline scores)."""
    east, north = model.grid_east_m.double().numpy(), model.grid_north_m.double().numpy()
    spacing = float(np.sqrt(12.0 * float(model.cell_var_m2)))
    n_east = int(round((east.max() - east.min()) / spacing)) + 1
    n_north = len(east) // n_east
    return RadioMapGrid(east0_m=float(east.min()), north0_m=float(north.min()), spacing_m=spacing,
                        mean_db=model.map_mean_db.numpy().reshape(-1, n_north, n_east),
                        sigma_db=model.map_sigma_db.double().numpy())


def run(params: Params, features_path: Path, ckpt_path: Path, metrics_dir: Path, plots_dir: Path) -> dict:
    t_start = time.perf_counter()
    model, payload = load_checkpoint(ckpt_path)
    features = load_features(features_path)
    check_features_match(payload, model, features, features_path)
    te = features.indices("test")
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
    bad = [k for k, v in tracking.flatten(test).items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise HeimdallError(f"evaluation produced non-finite metrics ({', '.join(bad[:3])}); nothing written")

    write_json(metrics_dir / "test.json", test)
    rows = {"model": test, "network_only": {**test["network_only"], "frac_within_5km": float(np.mean(
        np.linalg.norm(net_mean - target, axis=1) < 5e3))}, **test["baselines"]}
    for name, values in rows.items():
        write_json(metrics_dir / "compare" / f"{name}.json",
                   {k: round(float(values[k]), 4 if k.startswith(("frac", "coverage")) else 1)
                    for k in COMPARE_KEYS if k in values})
    pngs = write_evaluation_plots(plots_dir, mean, cov, target, features.receiver_enu_m, features.receiver_names, base_errors)

    timings["wall_time_s"] = time.perf_counter() - t_start
    tracking.write_timings(metrics_dir / "test.json", timings)
    client, run_id = tracking.run_for_checkpoint(params.train.mlflow_experiment, md5_file(ckpt_path))
    for k, v in {**{f"test.{k}": v for k, v in tracking.numbers(test).items()}, **timings}.items():
        client.log_metric(run_id, k, v)
    for p in [metrics_dir / "test.json", *pngs]:
        client.log_artifact(run_id, str(p))
    return {"median_error_m": round(test["median_error_m"], 1),
            "knn_median_error_m": round(test["baselines"]["knn"]["median_error_m"], 1), "mlflow_run_id": run_id}
