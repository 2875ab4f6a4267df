"""The parity gate: the exported graph vs the PyTorch model on the whole test split.

**Units.** The model runs in float32 with positions ~1e5 m, where one float32 ulp is 8-16 mm;
PyTorch's own float32 answer differs from a float64 evaluation of the same math by up to ~3 cm and,
for the covariance (a 34k-cell weighted sum of ~1e10 m² terms), by ~3e-5 relative. An absolute
1e-4 m / 1e-4 m² tolerance is therefore impossible for any correct export. The gate compares each
output in a documented scale and fails when the largest exceeds ``max_abs_diff`` (1e-4):

- ``position_enu_m``: absolute difference in **kilometres** (1e-4 km = 0.1 m: ~10 ulps, vs a 1 km map
  grid and kilometre-scale errors);
- ``covariance_m2``: absolute difference **relative to the session's largest covariance element**
  (its largest variance), dimensionless;
- ``position_latlon``: absolute difference in **degrees**.

The raw differences (m, m², deg) are reported beside them. Separately, the graph's latitude/longitude
are checked against ``heimdall.geo`` (from the graph's own ENU output) to :data:`GEODESY_TOL_DEG`.
A posterior whose two best cells are within float32 rounding of each other can make the two runtimes
pick different modes (a ~1 km jump): that fails the gate, correctly, since the exported model would
answer differently for that session.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from heimdall import geo
from heimdall.contracts import INPUT_NAMES, OUTPUT_NAMES
from heimdall.data import FeatureSet
from heimdall.errors import HeimdallError
from heimdall.model import LocalizationNet

def ground_latlon(east, north, origin: Sequence[float], iterations: int = 6) -> np.ndarray:
    """Reference (numpy, heimdall.geo): (lat, lon) degrees of the h = 0 point with ENU east/north.

    Iterates ``up`` so that ``geo.enu_to_geodetic(east, north, up)`` lands on the ellipsoid (the
    residual height shrinks by ~1e-3 per step). Returns (n, 2).
    """
    east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
    up = np.zeros_like(east)
    for _ in range(iterations):
        lat, lon, alt = geo.enu_to_geodetic(east, north, up, origin)
        up = up - alt
    lat, lon, _ = geo.enu_to_geodetic(east, north, up, origin)
    return np.stack([lat, lon], 1)


def feeds_of(inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(t.numpy()) for n, t in zip(INPUT_NAMES, inputs)}


@torch.no_grad()
def parity(session, model: LocalizationNet, geodetic: torch.nn.Module, features: FeatureSet, idx: np.ndarray,
           origin: Sequence[float], batch: int = 128) -> dict:
    """ONNX vs the PyTorch model on sessions ``idx`` (batched): per-output differences, scaled and raw.

    The reference is ``model(...)`` (LocalizationNet.forward, float32, eager) for position and
    covariance, and the float64 geodesy applied to the PyTorch position for lat/lon. Non-finite
    ONNX outputs count as an infinite difference.
    """
    model.eval()
    pos_m, cov_m2, cov_rel, ll_deg, geod = [], [], [], [], []
    for s in range(0, len(idx), batch):
        inputs = features.model_inputs(idx[s:s + batch])
        ref_pos, ref_cov = model(*inputs)
        ref_ll = geodetic(ref_pos).numpy()
        ref_pos, ref_cov = ref_pos.double().numpy(), ref_cov.double().numpy()
        pos, cov, ll = (np.asarray(o, dtype=np.float64) for o in session.run(list(OUTPUT_NAMES), feeds_of(inputs)))
        n = len(ref_pos)
        if pos.shape != (n, 2) or cov.shape != (n, 2, 2) or ll.shape != (n, 2):
            raise HeimdallError(f"ONNX output shapes {pos.shape}, {cov.shape}, {ll.shape} for a batch of {n}")

        def absdiff(a, b):
            d = np.abs(a - b).reshape(n, -1).max(1)
            return np.where(np.isfinite(d), d, np.inf)

        pos_m.append(absdiff(pos, ref_pos))
        d_cov = absdiff(cov, ref_cov)
        cov_m2.append(d_cov)
        cov_rel.append(d_cov / np.maximum(np.abs(ref_cov).reshape(n, -1).max(1), 1e-30))
        ll_deg.append(absdiff(ll, ref_ll))
        finite = np.isfinite(pos).all(1)
        ref = np.full((n, 2), np.nan)
        ref[finite] = ground_latlon(pos[finite, 0], pos[finite, 1], origin)
        geod.append(absdiff(ll, ref))
    cat = lambda parts: float(np.concatenate(parts).max()) if parts else 0.0  # noqa: E731
    out = {
        "n_sessions": int(len(idx)),
        "position_km": cat(pos_m) / 1e3,
        "covariance_rel": cat(cov_rel),
        "latlon_deg": cat(ll_deg),
        "position_m": cat(pos_m),
        "covariance_m2": cat(cov_m2),
        "geodesy_max_err_deg": cat(geod),
    }
    out["max_abs_diff"] = max(out["position_km"], out["covariance_rel"], out["latlon_deg"])
    return out
