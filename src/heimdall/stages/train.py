"""Stage train: data/features.h5 -> models/model.ckpt, models/metrics/train.json, learning curves.

1. Fit the forward radio map (log-distance + GP residual per receiver) on the training split.
2. Train LocalizationNet's receiver-set network (Lightning, Gaussian NLL, early stopping on val).
3. Calibrate the likelihood refinement on the validation split.
Test metrics, baselines and their plots are the evaluate stage's. Wall-clock timings go to MLflow
and models/metrics/train.timings.json (not a DVC output: reruns must give identical md5s).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from heimdall import tracking
from heimdall.atomic import md5_file, write_json
from heimdall.calibration import calibrate_refinement, calibrate_regions
from heimdall.budget import check_features_file, check_radio_map
from heimdall.checkpoint import save_checkpoint
from heimdall.data import FeatureSet, load_features
from heimdall.errors import HeimdallError
from heimdall.gp import gp_fit_bytes
from heimdall.kriging import fit_training_map, training_power_range
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.params import Params
from heimdall.radiomap import RadioMapGrid, bounds_around
from heimdall.runner import estimate

log = logging.getLogger(__name__)


def model_config(params: Params, features: FeatureSet) -> ModelConfig:
    m = params.model
    return ModelConfig(
        n_receivers=features.n_receivers, n_mels=features.logmel.shape[2], n_frames=features.logmel.shape[3], inputs=m.inputs,
        cnn_width=m.cnn_width, cnn_depth=m.cnn_depth, cnn_pool=m.cnn_pool, d_model=m.d_model, n_heads=m.n_heads,
        n_layers=m.n_layers, dropout=m.dropout, head=m.head, misfit=m.misfit, fingerprint_k=m.fingerprint_k,
        likelihood_nu=m.likelihood_nu,
    )


def training_fingerprints(features: FeatureSet) -> dict[str, torch.Tensor]:
    """The training split's RSS vectors (absent: 1 dB below the weakest training reading) and positions."""
    tr = features.indices("train")
    rss, present = features.rss_dbm[tr].astype(np.float32), features.present[tr]
    floor = float(rss[present].min()) - 1.0
    return {"rss_dbm": torch.from_numpy(np.where(present, rss, floor).astype(np.float32)),
            "east_m": torch.from_numpy(features.target_enu_m[tr, 0].astype(np.float32)),
            "north_m": torch.from_numpy(features.target_enu_m[tr, 1].astype(np.float32)),
            "floor_dbm": torch.tensor(floor)}


def radio_map_tensors(grid: RadioMapGrid, power_range_dbm: tuple[float, float]) -> dict[str, torch.Tensor]:
    east, north = grid.cell_centres()
    return {
        "power_range_dbm": torch.tensor(power_range_dbm),
        "mean_db": torch.from_numpy(grid.mean_db.reshape(grid.n_receivers, -1).copy()),
        "sigma_db": torch.from_numpy(np.asarray(grid.sigma_db, dtype=np.float32)),
        "grid_enu_m": torch.from_numpy(np.stack([east.ravel(), north.ravel()], 1).astype(np.float32)),
        "cell_var_m2": torch.tensor(grid.spacing_m**2 / 12.0),
    } | ({} if grid.excess_var_db2 is None else
         {"excess_var_db2": torch.from_numpy(grid.excess_var_db2.reshape(grid.n_receivers, -1).copy())})


def run(params: Params, features_path: Path, ckpt_path: Path, metrics_path: Path, plots_dir: Path,
        progress: bool = True, callbacks: tuple = ()) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from heimdall.training import LocalizationDataModule, LocalizationModule, write_learning_curve

    t_start = time.perf_counter()
    tp, rm = params.train, params.train.radio_map
    L.seed_everything(tp.seed, workers=True, verbose=False)
    # cuBLAS needs a fixed workspace to be deterministic on a GPU (harmless on CPU).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)

    check_features_file(features_path, "train", tp.batch_size)
    features = load_features(features_path)
    if params.model.inputs in ("spectrogram", "both") and not features.has_iq.any():
        raise HeimdallError(f"model.inputs: '{params.model.inputs}' needs spectrograms but {features_path} has no IQ; "
                            "use model.inputs: scalars")
    n_train = len(features.indices("train"))
    if tp.batch_size > n_train:
        log.warning("train.batch_size %d > %d training sessions: using %d", tp.batch_size, n_train, n_train)

    check_radio_map(bounds_around(features.target_enu_m[features.indices("train")], rm.margin_km * 1e3), rm,
                    features.n_receivers, tp.batch_size, n_train, gp_fit_bytes(rm.gp, n_train))
    t = time.perf_counter()
    grid = fit_training_map(features, rm.spacing_km * 1e3, rm.margin_km * 1e3, rm.min_snr_db, tp.seed, rm.uncertainty,
                            rm.gp, rm.n_jobs)
    timings = {"radio_map_fit_s": time.perf_counter() - t}
    log.info("radio map: %d x %d cells, residual sigma %s dB", grid.mean_db.shape[2], grid.mean_db.shape[1],
             np.round(grid.sigma_db, 2))

    norm = {k: torch.from_numpy(np.asarray(v)) for k, v in features.normalization.items()}
    model = LocalizationNet(model_config(params, features), torch.from_numpy(features.receiver_enu_m), norm,
                            radio_map_tensors(grid, training_power_range(grid, features)),
                            training_fingerprints(features) if params.model.fingerprint_k else None)
    epochs = tp.epochs(n_train)
    if epochs < tp.max_epochs:
        log.info("train: %d epochs (train.max_samples=%d over %d training sessions; max_epochs %d)", epochs,
                 tp.max_samples, n_train, tp.max_epochs)
    module = LocalizationModule(model, tp.lr, tp.weight_decay, epochs, tp.augment_power_db,
                                tp.augment_drop_receiver)
    datamodule = LocalizationDataModule(features, tp.batch_size, params.model.inputs != "scalars", tp.seed)
    logger = tracking.mlflow_logger(params)
    with tempfile.TemporaryDirectory(prefix="heimdall-train-") as tmp:
        best = ModelCheckpoint(dirpath=tmp, monitor="val_loss", mode="min", save_top_k=1, save_weights_only=True)
        trainer = L.Trainer(
            max_epochs=epochs, accelerator=tp.accelerator, devices=tp.devices, strategy=tp.strategy,
            num_nodes=tp.num_nodes, deterministic=True, gradient_clip_val=tp.gradient_clip, logger=logger,
            callbacks=[best, EarlyStopping(monitor="val_loss", mode="min", patience=tp.patience), *callbacks],
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=10,
        )
        t = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        timings["fit_s"] = time.perf_counter() - t
        if trainer.interrupted:
            raise KeyboardInterrupt
        if trainer.global_rank != 0:  # multi-device strategies: rank 0 alone calibrates and writes outputs
            return {"global_rank": trainer.global_rank}
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    model.eval()

    t = time.perf_counter()
    calibration = calibrate_refinement(model, features)
    # then the search regions' temperature on the calibrated posterior (point estimate unchanged)
    calibration.update(calibrate_regions(model, features))
    timings["calibration_s"] = time.perf_counter() - t
    history = module.history
    best_epoch = min(history, key=lambda h: h["val_loss"]) if history else None
    metrics = {
        "epochs": len(history),
        "best_epoch": int(best_epoch["epoch"]) if best_epoch else 0,
        "best_val_loss": best_epoch["val_loss"] if best_epoch else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_val_loss": history[-1]["val_loss"] if history else None,
        "calibration": {k: v for k, v in calibration.items() if k not in ("grid", "region_grid")},
        "radio_map": {"cells": int(grid.mean_db.shape[1] * grid.mean_db.shape[2]),
                      "sigma_db": [float(s) for s in grid.sigma_db]},
    }
    _refuse_non_finite(model, metrics, features)

    save_checkpoint(model, features.receiver_names, features.receiver_latlon, features.origin, ckpt_path)
    write_json(metrics_path, metrics)
    pngs = write_learning_curve(plots_dir, history) if history else []

    timings["wall_time_s"] = time.perf_counter() - t_start
    tracking.write_timings(metrics_path, timings)
    run_id, client = logger.run_id, logger.experiment
    for k, v in {**tracking.numbers(metrics), **timings}.items():
        client.log_metric(run_id, k, v)
    for k, v in {**tracking.run_tags(features_path), "checkpoint_md5": md5_file(ckpt_path)}.items():
        client.set_tag(run_id, k, v)
    for p in [metrics_path, *pngs]:
        client.log_artifact(run_id, str(p))
    client.set_terminated(run_id)
    return {"epochs": metrics["epochs"], "val_median_error_m": round(calibration["val_median_error_m"], 1),
            "mlflow_run_id": run_id}


def _non_finite_paths(value, key: str = "") -> list[str]:
    """Dotted keys of every non-finite number in a metrics tree (dicts, lists, numpy, tensors)."""
    if isinstance(value, dict):
        return [b for k, v in value.items() for b in _non_finite_paths(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [b for i, v in enumerate(value) for b in _non_finite_paths(v, f"{key}[{i}]")]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (float, np.floating, np.ndarray)) and not isinstance(value, bool):
        arr = np.asarray(value)
        return [key] if arr.dtype.kind in "fc" and not np.isfinite(arr).all() else []
    return []


def _refuse_non_finite(model: LocalizationNet, metrics: dict, features: FeatureSet | None = None) -> None:
    """No stage exits 0 with non-finite weights or metrics: every parameter and buffer (persistent or
    not), every number of the metrics (lists and numpy scalars included) and the model's answer on a
    few validation sessions must be finite, or nothing is written."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [k for k, v in tensors if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise HeimdallError(f"training produced non-finite weights ({', '.join(bad[:3])}); nothing written")
    bad = _non_finite_paths(metrics)
    if bad:
        raise HeimdallError(f"training produced non-finite metrics ({', '.join(bad[:3])}); nothing written")
    if features is not None and len(features.indices("val")):
        mean, cov = estimate(model, features.input_batches(features.indices("val")[:32]))
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise HeimdallError("training produced a model whose estimates are non-finite on the validation "
                                "split; nothing written")
