"""features.h5 -> the model's inputs for training and evaluation (the whole file fits in memory:
6,000 sessions are ~350 MB of log-mel). The Lightning DataModule is in heimdall.training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from heimdall import contracts as c
from heimdall.errors import HeimdallError

from heimdall.contracts import INPUT_NAMES  # noqa: F401  (re-exported: the model inputs' names)


@dataclass
class FeatureSet:
    logmel: np.ndarray  # (N, R, M, F) f4
    rss_dbm: np.ndarray  # (N, R) f4
    snr_db: np.ndarray
    present: np.ndarray  # (N, R) bool
    has_iq: np.ndarray
    target_enu_m: np.ndarray  # (N, 2) f8
    split: np.ndarray  # (N,) u1
    session_id: np.ndarray
    tx_power_dbm: np.ndarray
    frequency_hz: np.ndarray  # (N,)
    receiver_names: list[str]
    receiver_enu_m: np.ndarray  # (R, 3)
    receiver_latlon: np.ndarray  # (R, 3) lat, lon, alt
    origin: tuple[float, float, float]
    normalization: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)

    @property
    def n_receivers(self) -> int:
        return len(self.receiver_names)

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.split == c.SPLIT_CODES[name])

    def scenario_json(self) -> str | None:
        return self.attrs.get("scenario_json")

    def rss_view(self) -> dict:
        """The RSS-only view the baselines take (same keys as baselines.load_rss_features)."""
        return {
            "rss": self.rss_dbm.astype(np.float64), "snr": self.snr_db.astype(np.float64),
            "present": self.present, "rx_enu": self.receiver_enu_m, "pos": self.target_enu_m,
            "split": self.split, "frequency_hz": self.frequency_hz,
            "scenario_json": self.scenario_json(), "origin": self.origin,
        }

    def model_inputs(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The model's six inputs for the given sessions (receiver_id = stored receiver order)."""
        n = len(idx)
        rid = np.tile(np.arange(self.n_receivers, dtype=np.int64), (n, 1))
        return (
            torch.from_numpy(self.logmel[idx]),
            torch.from_numpy(self.rss_dbm[idx]),
            torch.from_numpy(self.snr_db[idx]),
            torch.from_numpy(self.present[idx].astype(np.float32)),
            torch.from_numpy(self.has_iq[idx].astype(np.float32)),
            torch.from_numpy(rid),
        )

    def input_batches(self, idx: np.ndarray, batch: int = 128):
        """The model inputs of sessions ``idx`` in batches of ``batch`` (bounded memory)."""
        for s in range(0, len(idx), batch):
            yield self.model_inputs(idx[s:s + batch])


_NORMALIZATION_KEYS = tuple(fld.path.split("/", 1)[1] for fld in c.FEATURES_LAYOUT if fld.path.startswith("normalization/"))


def load_features(path: str | Path) -> FeatureSet:
    """Read and check features.h5: layout, finiteness, non-empty train split."""
    path = Path(path)
    with c.open_checked(path, c.FEATURES_FORMAT) as f:
        c.validate_layout(f, c.FEATURES_LAYOUT, path)
        try:
            c.check_identities(f, path)
            features = FeatureSet(
                logmel=f["features/logmel_db"][()],
                rss_dbm=f["features/rss_dbm"][()],
                snr_db=f["features/snr_db"][()],
                present=f["features/present"][()],
                has_iq=f["features/has_iq"][()],
                target_enu_m=f["sessions/target_enu_m"][()],
                split=f["sessions/split"][()],
                session_id=f["sessions/session_id"].asstr()[()],
                tx_power_dbm=f["sessions/tx_power_dbm"][()],
                frequency_hz=f["sessions/frequency_hz"][()],
                receiver_names=list(f["receivers/name"].asstr()[()]),
                receiver_enu_m=f["receivers/enu_m"][()],
                receiver_latlon=np.stack(
                    [f["receivers/latitude_deg"][()], f["receivers/longitude_deg"][()], f["receivers/altitude_m"][()]], 1
                ),
                origin=(float(f.attrs["origin_latitude_deg"]), float(f.attrs["origin_longitude_deg"]),
                        float(f.attrs["origin_altitude_m"])),
                normalization={k: np.asarray(f[f"normalization/{k}"][()]) for k in _NORMALIZATION_KEYS},
                attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()},
            )
        except (OSError, KeyError) as e:
            raise HeimdallError(f"{path}: read failed (truncated or corrupt?): {e}") from None
        except (TypeError, ValueError) as e:  # an attribute of the wrong kind, text that is not UTF-8
            raise HeimdallError(f"{path}: malformed attribute or text: {e}") from None
    for name in ("logmel", "rss_dbm", "snr_db", "target_enu_m"):
        arr = getattr(features, name)
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise HeimdallError(f"{path}: non-finite value in '{name}' at index {tuple(int(i) for i in bad)}")
    for k, v in features.normalization.items():
        if not np.isfinite(v).all():
            raise HeimdallError(f"{path}: normalization/{k} is not finite")
        # a std divides the inputs (targets): 0 trains to NaN, so it is refused here, by name
        if "_std_" in k and not (v > 0).all():
            raise HeimdallError(f"{path}: normalization/{k} has a value {float(v.min())!r} <= 0 (a std divides "
                                "the model's inputs; re-run extract_features)")
    lat, lon, alt = features.origin
    if not (abs(lat) <= 90 and abs(lon) <= 180 and np.isfinite(alt)):
        raise HeimdallError(f"{path}: attributes origin_latitude_deg / origin_longitude_deg / origin_altitude_m = "
                            f"{features.origin} are not a position")
    if len(features.indices("train")) == 0:
        raise HeimdallError(f"{path}: the train split is empty")
    if len(features.indices("val")) == 0:
        raise HeimdallError(f"{path}: the val split is empty (early stopping and calibration need it)")
    return features  # an empty test split is a production run (heimdall.splits): evaluate says so


def metadata_json(features: FeatureSet) -> str:
    return json.dumps({"receivers": features.receiver_names, "origin": features.origin}, sort_keys=True)
