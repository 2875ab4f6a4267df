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
- ``position_latlon``: absolute difference in **degrees**;
- ``cell_probability`` and ``mode_weight``: absolute difference (probability);
- ``region_area_km2``: difference beyond one boundary cell, relative to the region's area;
- ``mode_enu_m``, ``mode_covariance_m2``, ``mode_latlon``: as position, covariance and lat/lon.

The raw differences (m, m², deg) are reported beside them. Separately, the graph's latitude/longitude
are checked against ``heimdall.geo`` (from the graph's own ENU output) to :data:`GEODESY_TOL_DEG`.
The point estimate is the posterior's best cell refined by its neighbourhood: a discontinuous function
of the logits. Where two cells' logits are within float32 rounding of each other (measured: 1 session
in 1,045 of a POWDER member, logits −8.649437 and −8.649438, cells 250 m apart) the runtimes can pick
different ones. That is not an export error, and failing the whole pipeline for it made a correct
model unexportable. So where the graph's position is not the model's, the gate
takes, among the cells within :data:`NEAR_TIE_REL` of the best in the model's own logits, the one
nearest to the graph's position, and compares the graph's position and covariance with the model's
summary around that cell; a graph that picks a cell the model does not rate as (near-)best fails.
Such sessions are counted (``argmax_near_ties``). (The graph's cell cannot be read off its cell
probabilities: on a flat posterior many cells' float32 probabilities are equal.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from heimdall import geo, regions
from heimdall.contracts import INPUT_NAMES, OUTPUT_NAMES
from heimdall.data import FeatureSet
from heimdall.errors import HeimdallError
from heimdall.model import LocalizationNet

# two cells whose logits differ by less than this (relative to the best's magnitude, at least 1e-5
# absolute) are a float32 near-tie: a few ulps of the sums of ~30 terms of magnitude ~100 that form them
NEAR_TIE_REL = 1e-5
# the scaled differences the gate compares with max_abs_diff (the others are reported beside them)
GATED = ("position_km", "covariance_rel", "latlon_deg", "cell_probability", "region_area_rel", "mode_weight",
         "mode_km", "mode_covariance_rel", "mode_latlon_deg")


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


def _matching(mode: np.ndarray, ref_mode: np.ndarray) -> np.ndarray:
    """(n, K) the order of ``mode`` (n, K, 2) that best matches ``ref_mode``: the permutation with the
    least largest distance between counterparts (identity first, so a tie keeps the given order)."""
    perms = np.array(list(itertools.permutations(range(mode.shape[1]))))  # (P, K), identity first
    dist = np.linalg.norm(mode[:, perms] - ref_mode[:, None], axis=-1)  # (n, P, K)
    dist = np.where(np.isfinite(dist), dist, np.inf).max(-1)
    return perms[dist.argmin(1)]


def feeds_of(inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(t.numpy()) for n, t in zip(INPUT_NAMES, inputs)}


def _near_tie_reference(model: LocalizationNet, inputs, graph_pos: np.ndarray, ref_pos: np.ndarray,
                        ref_cov: np.ndarray) -> int:
    """Where the graph's position differs from the model's (> 0.1 m) and the model's logits have
    near-ties for the best cell, replace (in place) the reference position and covariance by the model's
    summary around the near-tied cell nearest to the graph's position (the cell the graph must have
    picked, if it computes what the model does). Returns the number of such sessions."""
    if not model.has_map:
        return 0
    differs = torch.from_numpy(~(np.abs(graph_pos - ref_pos).max(1) <= 0.1))
    if not differs.any():
        return 0
    prior_mean, prior_cov, cost = model.prior_and_cost(*inputs)
    logits = model.posterior_logits(cost, prior_mean, prior_cov)
    best = logits.max(1, keepdim=True).values
    tied = logits >= best - NEAR_TIE_REL * best.abs().clamp_min(1.0)  # (B, G), the best cell included
    gp = torch.from_numpy(np.nan_to_num(graph_pos, nan=0.0)).float()
    d2 = (model.grid_east_m[None] - gp[:, :1]) ** 2 + (model.grid_north_m[None] - gp[:, 1:]) ** 2
    cell = torch.where(tied, d2, torch.full_like(d2, float("inf"))).argmin(1)
    swap = differs & (cell != logits.argmax(1))
    if swap.any():
        east, north = model.grid_east_m[None], model.grid_north_m[None]
        pos, cov = model._gaussian_summary(logits[swap], east, north, mode=cell[swap])
        ref_pos[swap.numpy()], ref_cov[swap.numpy()] = pos.double().numpy(), cov.double().numpy()
    return int(swap.sum())


@torch.no_grad()
def parity(session, model: LocalizationNet, geodetic: torch.nn.Module, features: FeatureSet, idx: np.ndarray,
           origin: Sequence[float], batch: int = 128) -> dict:
    """ONNX vs the PyTorch model on sessions ``idx`` (batched): per-output differences, scaled and raw.

    The reference is ``model.locate(...)`` (float32, eager) for position, covariance and cell
    probabilities, ``model.posterior_modes`` of the graph's cell probabilities for the modes, and the
    float64 geodesy applied to the PyTorch positions for lat/lon. Non-finite ONNX outputs count as
    an infinite difference. Search-region areas may differ by one boundary cell (the two runtimes'
    float32 cumulative sums differ in the last bits, so the cell where the mass reaches the level can
    differ; measured: ~1 % of regions); more than that counts.
    """
    model.eval()
    cell_km2 = float(model.cell_var_m2) * 12.0 / 1e6
    mass = model.region_mass.double().numpy()[model.region_columns]
    n_ties = 0
    d: dict[str, list] = {k: [] for k in ("pos_m", "cov_m2", "cov_rel", "ll", "geod", "prob", "area", "weight",
                                          "mode_m", "mode_cov_rel", "mode_ll")}
    for s in range(0, len(idx), batch):
        inputs = features.model_inputs(idx[s:s + batch])
        raw = session.run(list(OUTPUT_NAMES), feeds_of(inputs))
        ref_pos, ref_cov, ref_prob = (t.double().numpy() for t in model.locate(*inputs)[:3])
        n_ties += _near_tie_reference(model, inputs, np.asarray(raw[0], dtype=np.float64), ref_pos, ref_cov)
        # The modes are a discontinuous function of the probabilities (which cell is a peak, which
        # four are the highest): float32 differences between the runtimes' probabilities flip near-ties
        # (measured: a diffuse one-epoch posterior, 4 % modes, 4 km apart). So the graph's modes are
        # checked against posterior_modes of the graph's own probabilities, and those probabilities
        # against the model's: together, the graph computes what the model does.
        ref_w, ref_mode, ref_mode_cov = (t.double().numpy() for t in model.posterior_modes(torch.from_numpy(raw[3])))
        ref_ll = geodetic(torch.from_numpy(ref_pos).float()).numpy()
        ref_mode_ll = geodetic(torch.from_numpy(ref_mode.reshape(-1, 2)).float()).numpy().reshape(ref_mode.shape)
        out = [np.asarray(o, dtype=np.float64) for o in raw]
        pos, cov, ll, prob, w, mode, mode_cov, mode_ll = out
        n = len(ref_pos)
        expected = (ref_pos, ref_cov, ref_ll, ref_prob, ref_w, ref_mode, ref_mode_cov, ref_mode_ll)
        if [o.shape for o in out] != [e.shape for e in expected]:
            raise HeimdallError(f"ONNX output shapes {[o.shape for o in out]} for a batch of {n}")

        def absdiff(a, b):
            diff = np.abs(a - b).reshape(n, -1).max(1)
            return np.where(np.isfinite(diff), diff, np.inf)

        def rel(a, b):  # per session, relative to its largest |element|
            return absdiff(a, b) / np.maximum(np.abs(b).reshape(n, -1).max(1), 1e-30)

        d["pos_m"].append(absdiff(pos, ref_pos))
        d["cov_m2"].append(absdiff(cov, ref_cov))
        d["cov_rel"].append(rel(cov, ref_cov))
        d["ll"].append(absdiff(ll, ref_ll))
        finite = np.isfinite(pos).all(1)
        ground = np.full((n, 2), np.nan)
        ground[finite] = ground_latlon(pos[finite, 0], pos[finite, 1], origin)
        d["geod"].append(absdiff(ll, ground))
        d["prob"].append(absdiff(prob, ref_prob))
        # the search regions each runtime's probabilities give (predict's post-processing)
        ref_area = regions.hpd_thresholds(ref_prob, mass)[1] * cell_km2
        area = np.full_like(ref_area, np.inf)
        ok = np.isfinite(prob).all(1) & (prob.sum(1) > 0)
        area[ok] = regions.hpd_thresholds(prob[ok], mass)[1] * cell_km2
        slack = np.maximum(np.abs(area - ref_area) - cell_km2 * 1.001, 0.0)
        d["area"].append((slack / ref_area).max(1))
        # modes of (nearly) equal weight may come in either order: compare each with its counterpart
        perm = _matching(mode, ref_mode)
        w, mode, mode_cov, mode_ll = (np.take_along_axis(a, perm.reshape(n, -1, *([1] * (a.ndim - 2))), 1)
                                      for a in (w, mode, mode_cov, mode_ll))
        d["weight"].append(absdiff(w, ref_w))
        d["mode_m"].append(absdiff(mode, ref_mode))
        d["mode_cov_rel"].append(rel(mode_cov, ref_mode_cov))
        d["mode_ll"].append(absdiff(mode_ll, ref_mode_ll))
    cat = {k: float(np.concatenate(v).max()) if v else 0.0 for k, v in d.items()}
    out = {
        "n_sessions": int(len(idx)),
        "position_km": cat["pos_m"] / 1e3,
        "covariance_rel": cat["cov_rel"],
        "latlon_deg": cat["ll"],
        "cell_probability": cat["prob"],
        "region_area_rel": cat["area"],
        "mode_weight": cat["weight"],
        "mode_km": cat["mode_m"] / 1e3,
        "mode_covariance_rel": cat["mode_cov_rel"],
        "mode_latlon_deg": cat["mode_ll"],
        "position_m": cat["pos_m"],
        "covariance_m2": cat["cov_m2"],
        "geodesy_max_err_deg": cat["geod"],
        "argmax_near_ties": n_ties,
    }
    out["max_abs_diff"] = max(out[k] for k in GATED)
    return out
