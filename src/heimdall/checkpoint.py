"""LocalizationNet checkpoints: plain tensors and JSON-able values, loadable with
``torch.load(weights_only=True)`` (no pickled code), everything needed to rebuild the model."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import torch

from heimdall.atomic import atomic_path
from heimdall.contracts import FEATURE_NORMALIZATION_KEYS, RELIABILITY_LEVELS
from heimdall.errors import HeimdallError
from heimdall.model import LocalizationNet, ModelConfig

CKPT_FORMAT = "heimdall.localization-net"
# 2: the radio-map grid is stored as two planes (grid_east_m, grid_north_m) instead of grid_enu_m
CKPT_FORMAT_VERSION = 2
# state_dict entries that are the radio map the refinement inverts
_MAP_KEYS = ("map_mean_db", "map_sigma_db", "grid_east_m", "grid_north_m", "cell_var_m2", "power_range_dbm")


def save_checkpoint(model: LocalizationNet, receiver_names, receiver_latlon_alt: np.ndarray,
                    origin, path: Path) -> None:
    """Write ``model`` with its receiver table (names, lat/lon/alt in model order) and ENU origin."""
    payload = {
        "format": CKPT_FORMAT,
        "format_version": CKPT_FORMAT_VERSION,
        "config": dict(model.config.__dict__),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "receivers": {"name": [str(n) for n in receiver_names],
                      "latlon_alt": torch.from_numpy(np.ascontiguousarray(receiver_latlon_alt, dtype=np.float64))},
        "origin": [float(v) for v in origin],
        "has_map": model.has_map,
    }
    # torch.save to a path reports a full disk as an opaque RuntimeError ("unexpected pos"): measure the size
    # first and turn a failure on a disk without that much room into the OSError it is (torch.save to a buffer
    # would name the archive differently and change the bytes)
    buf = io.BytesIO()
    torch.save(payload, buf)
    size = buf.tell()
    with atomic_path(Path(path)) as tmp:
        try:
            if _free_bytes(tmp.parent) < size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            torch.save(payload, tmp)
        except RuntimeError:
            if _free_bytes(tmp.parent) < size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
            raise


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def load_checkpoint(path: str | Path) -> tuple[LocalizationNet, dict]:
    """-> (the model in eval mode, the payload: receivers, origin, config)."""
    path = Path(path)
    if not path.exists():
        raise HeimdallError(f"{path}: checkpoint not found (run the train stage first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise HeimdallError(f"{path}: not a readable checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise HeimdallError(f"{path}: not a Heimdall LocalizationNet checkpoint")
    if payload.get("format_version") != CKPT_FORMAT_VERSION:
        raise HeimdallError(f"{path}: checkpoint format_version {payload.get('format_version')!r}; this heimdall "
                            f"reads {CKPT_FORMAT_VERSION} (retrain: dvc repro -f -s train)")
    sd = dict(payload["state_dict"])
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:  # evaluate / export_onnx never report on, or ship, a model with NaN / ±Inf inside
        raise HeimdallError(f"{path}: checkpoint holds non-finite values in {', '.join(bad[:3])} (retrain)")
    # written before the region temperature existed (issue 18): τ = 1, the uncalibrated posterior
    sd.setdefault("region_temperature", torch.tensor(1.0))
    sd.setdefault("region_mass", torch.tensor(RELIABILITY_LEVELS, dtype=torch.float32))  # uncalibrated: mass = level
    config = ModelConfig(**payload["config"])
    norm = {k: sd[k] for k in FEATURE_NORMALIZATION_KEYS}
    norm["target_mean_m"] = sd["pos_mean"]
    norm["target_std_m"] = sd["pos_scale"].expand(2)
    radio_map = None
    if payload["has_map"]:
        missing = [k for k in _MAP_KEYS if k not in sd]
        if missing:
            raise HeimdallError(f"{path}: checkpoint has a map but lacks {', '.join(missing)}")
        radio_map = {"mean_db": sd["map_mean_db"], "sigma_db": sd["map_sigma_db"],
                     "grid_enu_m": torch.stack([sd["grid_east_m"], sd["grid_north_m"]], 1),
                     "cell_var_m2": sd["cell_var_m2"], "power_range_dbm": sd["power_range_dbm"]}
        if "map_excess_var_db2" in sd:
            radio_map["excess_var_db2"] = sd["map_excess_var_db2"]
    fingerprints = None
    if "fp_rss_dbm" in sd:
        fingerprints = {"rss_dbm": sd["fp_rss_dbm"], "east_m": sd["fp_east_m"], "north_m": sd["fp_north_m"],
                        "floor_dbm": sd["fp_floor_dbm"]}
    model = LocalizationNet(config, sd["receiver_enu_m"], norm, radio_map, fingerprints)
    model.load_state_dict(sd)
    model.eval()
    return model, payload


def check_features_match(payload: dict, model: LocalizationNet, features, features_path: Path) -> None:
    """``features`` must be the features the checkpoint was trained on (same receivers, frame and scaling)."""
    if list(features.receiver_names) != list(payload["receivers"]["name"]):
        raise HeimdallError(f"{features_path}: receivers {features.receiver_names} differ from the checkpoint's "
                            f"{payload['receivers']['name']}")
    if not np.allclose(np.asarray(features.origin, dtype=np.float64), np.asarray(payload["origin"], dtype=np.float64),
                       rtol=0, atol=1e-9):
        raise HeimdallError(f"{features_path}: ENU origin {features.origin} differs from the checkpoint's "
                            f"{payload['origin']}")
    c = model.config
    if features.logmel.shape[1:] != (c.n_receivers, c.n_mels, c.n_frames):
        raise HeimdallError(f"{features_path}: logmel shape {features.logmel.shape[1:]} does not match the model's "
                            f"{(c.n_receivers, c.n_mels, c.n_frames)}")
    for key in FEATURE_NORMALIZATION_KEYS:
        a = np.asarray(features.normalization[key], dtype=np.float32).ravel()
        b = getattr(model, key).numpy().ravel()
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-6):
            raise HeimdallError(f"{features_path}: normalization '{key}' differs from the checkpoint's "
                                "(features from another extraction?)")
