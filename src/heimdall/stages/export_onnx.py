"""Stage export_onnx: models/model.ckpt -> one self-contained ONNX file, verified and benchmarked.

The exported graph takes the model's six inputs (names and units as in ``heimdall.data``, batch axis
dynamic, receiver count fixed) and returns three outputs:

- ``position_enu_m``  (B, 2) float32: east, north in metres around the network's ENU origin;
- ``covariance_m2``   (B, 2, 2) float32: the position covariance in m²;
- ``position_latlon`` (B, 2) float64: WGS-84 latitude, longitude in degrees of the point on the
  ellipsoid (h = 0) whose ENU east/north are ``position_enu_m`` — the exact inverse of how the
  training targets were defined (``geo.geodetic_to_enu(lat, lon, 0, origin)``, extract_features).
  Computed in the graph in float64 (a float32 latitude has a 4e-6° = 0.4 m ulp).

Everything a consumer needs travels in ``metadata_props`` (JSON values; see :func:`load_onnx_session`):
ENU origin, receiver table (order = ``receiver_id``), feature normalisation, model config, input/output
descriptions, params hash, git commit, checkpoint digest and the parity tolerance. There are no
absolute paths and no timestamps in the file: two exports of one checkpoint are byte-identical.

**The refinement is re-expressed for onnxruntime.** ``LocalizationNet.refine`` keeps the radio-map
grid as (G, 2) and contracts the covariance with ``einsum("bg,bgi,bgj->bij")``. Traced verbatim, that
runs no faster in onnxruntime than eager PyTorch (batch 1, 2-core CPU: ~17 ms with ORT's Einsum kernel,
~5.6 ms with the Einsum rewritten to a MatMul, vs ~6.5 ms eager): broadcasts whose innermost axis has
length 2 and ReduceSum over the strided receiver axis dominate ORT's profile. :class:`PlanarRefinement`
computes the same posterior with the grid as two (G,) planes, receiver sums as MatMuls and the two
covariance parts as one weighted sum: ~1.25 ms. The network part is traced from the model itself.
Drift between the two is caught twice: the stage's parity gate (the whole test split, ONNX vs the
PyTorch model's own ``forward``) and ``tests/test_export_onnx.py`` (PlanarRefinement vs
``model.refine`` in torch). ``refinement="traced"`` exports ``LocalizationNet.forward`` verbatim (with
the Einsum -> MatMul graph pass) when the two have to diverge for a while.

**The parity gate and its units.** The model runs in float32 with positions ~1e5 m, where one float32
ulp is 8-16 mm; PyTorch's own float32 answer differs from a float64 evaluation of the same math by up
to ~3 cm and, for the covariance (a 34k-cell weighted sum of ~1e10 m² terms), by ~3e-5 relative. An
absolute 1e-4 m / 1e-4 m² tolerance is therefore impossible for any correct export. The gate compares
each output in a documented scale and fails when the largest exceeds ``max_abs_diff`` (1e-4):

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

No output is written unless export, simplification, ``onnx.checker`` and the gate all pass; the file
is written beside its target and renamed (``atomic_path``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heimdall import geo
from heimdall.atomic import atomic_path
from heimdall.data import INPUT_NAMES, FeatureSet, load_features
from heimdall.errors import HeimdallError
from heimdall.model import LocalizationNet

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

ONNX_FORMAT = "heimdall.localization-net.onnx"
ONNX_FORMAT_VERSION = 1
OUTPUT_NAMES = ("position_enu_m", "covariance_m2", "position_latlon")
DEFAULT_OPSET = 20
GEODESY_TOL_DEG = 1e-7
# metadata_props keys whose values are JSON documents (the others are plain strings)
JSON_METADATA_KEYS = ("origin", "receivers", "normalization", "model_config", "frontend", "inputs", "outputs",
                      "parity")
# features.h5 attributes that define the log-mel front end (heimdall predict recomputes features with them)
FRONTEND_KEYS = ("sample_rate_hz", "n_fft", "n_mels", "n_frames", "hop_length")

# post-export graph pass: edits the ModelProto in place and/or returns a replacement
GraphTransform = Callable[["onnx.ModelProto"], "onnx.ModelProto | None"]


# ---------------------------------------------------------------------------------------------
# The exported module


class EnuToGeodetic(nn.Module):
    """ENU (east, north) metres -> WGS-84 (lat, lon) degrees of the ellipsoid point (h = 0), float64.

    Exact, closed form: the point is ``P = P0 + u·Û`` with ``P0 = O + e·Ê + n·N̂`` (ECEF) and ``u`` the
    root near zero of the quadratic ``(Px² + Py²)/a² + Pz²/b² = 1``; on the ellipsoid the geodetic
    latitude is exactly ``atan2(z, p·(1 − e²))`` (no Bowring iteration needed at h = 0) and the
    longitude ``atan2(y, x)``. onnxruntime has no float64 Atan kernel, so each ``atan2`` is a float32
    ``atan2`` refined by one Newton step in float64 on ``x·sinθ − y·cosθ = 0`` (its second derivative
    vanishes at the root: cubic convergence, 1e-7 rad -> 1e-21 rad).

    Every constant is a float64 buffer: Python scalars would be baked into the graph as float32.
    """

    def __init__(self, origin: Sequence[float]):
        super().__init__()
        lat0, lon0, alt0 = (float(v) for v in origin)
        rot = geo._rotation(lat0, lon0)  # rows: east, north, up unit vectors in ECEF
        o = np.array(geo.geodetic_to_ecef(lat0, lon0, alt0), dtype=np.float64)
        a2 = geo.WGS84_A**2
        w = np.array([1 / a2, 1 / a2, 1 / (a2 * (1 - geo.WGS84_E2))])
        up = rot[2]
        f64 = lambda v: torch.tensor(np.asarray(v, dtype=np.float64))  # noqa: E731
        self.register_buffer("en_to_ecef", f64(rot[:2]))  # (2, 3)
        self.register_buffer("origin_ecef", f64(o))  # (3,)
        self.register_buffer("up", f64(up))  # (3,)
        self.register_buffer("w", f64(w))  # (3,) ellipsoid quadratic form
        self.register_buffer("w_up", f64(w * up))
        self.register_buffer("quad_a", f64(float(np.sum(w * up * up))))
        self.register_buffer("one", f64(1.0))
        self.register_buffer("one_minus_e2", f64(1.0 - geo.WGS84_E2))
        self.register_buffer("rad_to_deg", f64(180.0 / math.pi))

    @staticmethod
    def _atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.atan2(y.float(), x.float()).double()
        s, c = torch.sin(t), torch.cos(t)
        return t - (x * s - y * c) / (x * c + y * s)

    def forward(self, enu: torch.Tensor) -> torch.Tensor:
        p0 = enu.double() @ self.en_to_ecef + self.origin_ecef  # (B, 3)
        b = 2.0 * (p0 * self.w_up).sum(-1)
        c = (p0 * p0 * self.w).sum(-1) - self.one
        # stable root of A u² + B u + C = 0 nearest zero (B > 0: up points out of the ellipsoid)
        u = -2.0 * c / (b + torch.sqrt(b * b - 4.0 * self.quad_a * c))
        p = p0 + u[:, None] * self.up
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        lat = self._atan2(z, torch.sqrt(x * x + y * y) * self.one_minus_e2)
        lon = self._atan2(y, x)
        return torch.stack([lat, lon], -1) * self.rad_to_deg


class PlanarRefinement(nn.Module):
    """``LocalizationNet.refine`` re-expressed for onnxruntime (same math, ~5x faster there).

    The grid is held as two (G,) planes instead of (G, 2) (ORT broadcasts over a length-2 innermost
    axis slowly), the sums over receivers are MatMuls (ORT's ReduceSum over a strided axis is slow),
    and ``a·Σ local·ddᵀ + b·Σ (post − local)·ddᵀ`` is one sum with the combined weight
    ``a·local + b·(post − local)`` instead of two Einsums (ORT's Einsum kernel is slow).

    Mirrors ``LocalizationNet.likelihood_cost`` / ``posterior`` line by line: when those change,
    change this too (``tests/test_export_onnx.py`` compares the two in torch, and the stage's parity
    gate fails until they agree) — or export with ``refinement="traced"``.
    """

    def __init__(self, model: LocalizationNet):
        super().__init__()
        self.model = model  # shares the buffers (map, calibration constants)
        self.register_buffer("grid_e", model.grid_enu_m[:, 0].clone())
        self.register_buffer("grid_n", model.grid_enu_m[:, 1].clone())

    def likelihood_cost(self, rss_dbm, present, receiver_id):
        m = self.model
        w = present.float() / (m.map_sigma_db[receiver_id] ** 2)  # (B, R)
        resid = rss_dbm[..., None] - m.map_mean_db[receiver_id]  # (B, R, G)
        w_norm = (w / w.sum(1, keepdim=True).clamp_min(1e-9))[:, None, :]  # (B, 1, R)
        power = w_norm @ resid  # (B, 1, G): profiled TX power
        cost = (w[:, None, :] @ (resid - power) ** 2)[:, 0, :]
        power = power[:, 0, :]
        outside = F.relu(m.power_range_dbm[0] - power) + F.relu(power - m.power_range_dbm[1])
        return cost + (outside / 3.0) ** 2

    def posterior(self, cost, prior_mean, prior_cov):
        m = self.model
        ge, gn = self.grid_e[None], self.grid_n[None]  # (1, G)
        pc = prior_cov * m.prior_scale**2
        det = pc[:, 0, 0] * pc[:, 1, 1] - pc[:, 0, 1] * pc[:, 1, 0]
        de, dn = ge - prior_mean[:, 0:1], gn - prior_mean[:, 1:2]  # (B, G)
        maha = (de**2 * pc[:, 1, 1, None] - 2 * de * dn * pc[:, 0, 1, None] + dn**2 * pc[:, 0, 0, None]) / det[:, None]
        logits = -0.5 * cost / m.likelihood_temperature - 0.5 * maha
        mode = logits.argmax(dim=1)
        me, mn = self.grid_e[mode][:, None], self.grid_n[mode][:, None]
        near = (((ge - me) ** 2 + (gn - mn) ** 2) <= m.mode_radius_m2).float()
        post = torch.softmax(logits, dim=1)
        local = post * near
        total = local.sum(1, keepdim=True).clamp_min(1e-30)
        mean_e = (local * ge).sum(1, keepdim=True) / total
        mean_n = (local * gn).sum(1, keepdim=True) / total
        de, dn = ge - mean_e, gn - mean_n
        weight = m.cov_scale_local * local + m.cov_scale_remote * (post - local)
        cee, cen, cnn = (weight * de * de).sum(1), (weight * de * dn).sum(1), (weight * dn * dn).sum(1)
        cell = m.cell_var_m2 * m.cov_scale_local
        cov = torch.stack([torch.stack([cee + cell, cen], -1), torch.stack([cen, cnn + cell], -1)], -2)
        return torch.cat([mean_e, mean_n], 1), cov

    def forward(self, prior_mean, prior_cov, rss_dbm, present, receiver_id):
        return self.posterior(self.likelihood_cost(rss_dbm, present, receiver_id), prior_mean, prior_cov)


REFINEMENTS = ("planar", "traced")


class ExportModule(nn.Module):
    """LocalizationNet + in-graph geodesy: the six inputs -> the three named outputs.

    ``refinement="planar"`` (default) runs the network from the model and the likelihood refinement
    through :class:`PlanarRefinement`; ``"traced"`` exports ``LocalizationNet.forward`` verbatim
    (always in step with model.py, ~5x slower in onnxruntime).
    """

    def __init__(self, model: LocalizationNet, origin: Sequence[float], refinement: str = "planar"):
        super().__init__()
        if refinement not in REFINEMENTS:
            raise HeimdallError(f"export_onnx.refinement: must be one of {', '.join(REFINEMENTS)}, got {refinement!r}")
        self.model = model
        self.refinement = PlanarRefinement(model) if model.has_map and refinement == "planar" else None
        self.geodetic = EnuToGeodetic(origin)

    def forward(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        if self.refinement is None:
            mean, cov = self.model(logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
        else:
            mean, cov = self.model.network_metric(logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
            mean, cov = self.refinement(mean, cov, rss_dbm, present, receiver_id)
        return mean, cov, self.geodetic(mean)


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


# ---------------------------------------------------------------------------------------------
# Export: trace, clean, simplify, describe


def _io_descriptions(model: LocalizationNet) -> tuple[list[dict], list[dict]]:
    c = model.config
    r = c.n_receivers
    inputs = [
        {"name": "logmel", "dtype": "float32", "shape": ["batch", r, c.n_mels, c.n_frames], "unit": "dB",
         "description": "per-receiver log-mel spectrogram (raw dB; normalised inside the graph); "
                        "any value where has_iq = 0"},
        {"name": "rss_dbm", "dtype": "float32", "shape": ["batch", r], "unit": "dBm",
         "description": "received signal strength per receiver slot; any value where present = 0"},
        {"name": "snr_db", "dtype": "float32", "shape": ["batch", r], "unit": "dB",
         "description": "signal-to-noise ratio per receiver slot"},
        {"name": "present", "dtype": "float32", "shape": ["batch", r], "unit": "0/1",
         "description": "1 where the receiver heard the session, 0 where it was offline/absent"},
        {"name": "has_iq", "dtype": "float32", "shape": ["batch", r], "unit": "0/1",
         "description": "1 where the receiver's IQ (hence logmel) is available"},
        {"name": "receiver_id", "dtype": "int64", "shape": ["batch", r], "unit": "index",
         "description": "row of the 'receivers' table for each slot (normally 0..R-1)"},
    ]
    outputs = [
        {"name": "position_enu_m", "dtype": "float32", "shape": ["batch", 2], "unit": "m",
         "description": "estimated transmitter position: east, north around 'origin'"},
        {"name": "covariance_m2", "dtype": "float32", "shape": ["batch", 2, 2], "unit": "m^2",
         "description": "position covariance (east, north), calibrated on the validation split"},
        {"name": "position_latlon", "dtype": "float64", "shape": ["batch", 2], "unit": "deg",
         "description": "WGS-84 latitude, longitude of position_enu_m on the ellipsoid (h = 0)"},
    ]
    return inputs, outputs


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout and logs every optimizer pass at INFO: keep the stage's
    log readable (its failures still raise)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_dynamo(module: nn.Module, example: tuple[torch.Tensor, ...], opset: int):
    import onnx  # noqa: F401  (fail early with the real import error)

    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(
            module, example, dynamo=True, external_data=False, opset_version=opset, optimize=True,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES), verbose=False,
        )
    return program.model_proto


def _export_torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], opset: int):
    import onnx

    buf = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(
            module, example, buf, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_axes={n: {0: "batch"} for n in (*INPUT_NAMES, *OUTPUT_NAMES)},
        )
    return onnx.load_from_string(buf.getvalue())


def export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], opset: int = DEFAULT_OPSET,
                 exporter: str = "auto"):
    """Trace ``module`` to an ONNX ModelProto -> (proto, exporter used).

    ``exporter``: ``dynamo`` (torch.export based, preferred), ``torchscript`` (legacy tracer), or
    ``auto`` = dynamo, falling back to torchscript if dynamo raises (logged with its reason).
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise HeimdallError(f"export_onnx.exporter: must be auto, dynamo or torchscript, got {exporter!r}")
    module.eval()
    if exporter in ("auto", "dynamo"):
        try:
            return _export_dynamo(module, example, opset), "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure -> fallback or one-line error
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if exporter == "dynamo":
                raise HeimdallError(f"ONNX export (dynamo) failed: {reason}") from e
            log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", reason)
    try:
        return _export_torchscript(module, example, opset), "torchscript"
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeimdallError(f"ONNX export (torchscript) failed: {reason}") from e


def _clear_debug(msg) -> None:
    if hasattr(msg, "doc_string"):
        msg.doc_string = ""
    if hasattr(msg, "metadata_props"):
        del msg.metadata_props[:]


def strip_debug_info(model) -> None:
    """Remove what the exporter records about the tracing machine (stack traces with absolute source
    paths, fx node dumps, name scopes) from nodes, values, initializers and functions, in place."""
    import onnx

    def graph(g):
        _clear_debug(g)
        for seq in (g.input, g.output, g.value_info, g.initializer, g.sparse_initializer):
            for v in seq:
                _clear_debug(v)
        for node in g.node:
            _clear_debug(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        graph(sub)

    graph(model.graph)
    for fn in model.functions:
        _clear_debug(fn)
        for node in fn.node:
            _clear_debug(node)
    del model.metadata_props[:]


def rewrite_einsum_contractions(model) -> int:
    """Graph pass: ``Einsum("bg,bgi,bgj->bij", w, x, y)`` (any letters) -> ``MatMul(Transpose(w[..., None] * x), y)``.

    Same contraction; onnxruntime's Einsum kernel is ~5x slower for it (it is what
    ``LocalizationNet.posterior`` uses for the covariance). Returns the number of nodes rewritten.
    """
    import onnx
    from onnx import helper, numpy_helper

    axes_name = "heimdall_einsum_last_axis"
    nodes, n = [], 0
    for node in model.graph.node:
        eq = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
        eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
        lhs, _, out = eq.partition("->")
        ops = lhs.split(",")
        if node.op_type != "Einsum" or len(ops) != 3 or len(node.input) != 3:
            nodes.append(node)
            continue
        (w, x, y) = ops
        if not (len(w) == 2 and len(x) == len(y) == 3 and x[:2] == y[:2] == w and len(set(w + x[2] + y[2])) == 4
                and out == w[0] + x[2] + y[2]):
            nodes.append(node)
            continue
        p = (node.name or node.output[0]) + "_as_matmul"
        nodes += [
            helper.make_node("Unsqueeze", [node.input[0], axes_name], [p + "_w"], name=p + "_unsqueeze"),
            helper.make_node("Mul", [p + "_w", node.input[1]], [p + "_wx"], name=p + "_mul"),
            helper.make_node("Transpose", [p + "_wx"], [p + "_wxt"], perm=[0, 2, 1], name=p + "_transpose"),
            helper.make_node("MatMul", [p + "_wxt", node.input[2]], [node.output[0]], name=p + "_matmul"),
        ]
        n += 1
    if n:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if axes_name not in {i.name for i in model.graph.initializer}:
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes_name))
        onnx.checker.check_model(model)
    return n


def simplify_graph(model):
    from onnxsim import simplify

    try:
        simplified, ok = simplify(model)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"onnxsim failed on the exported graph: {str(e).strip().splitlines()[0]}") from e
    if not ok:
        raise HeimdallError("onnxsim: the simplified graph failed its own check")
    return simplified


def build_metadata(model: LocalizationNet, payload: dict, fs: FeatureSet, *, commit: str, params_hash: str,
                   exporter: str, refinement: str, checkpoint_md5: str, max_abs_diff: float) -> dict[str, str]:
    inputs, outputs = _io_descriptions(model)
    lat, lon, alt = (float(v) for v in payload["origin"])
    latlon_alt = np.asarray(payload["receivers"]["latlon_alt"], dtype=np.float64)
    receivers = [
        {"receiver_id": i, "name": str(name), "latitude_deg": float(latlon_alt[i, 0]),
         "longitude_deg": float(latlon_alt[i, 1]), "altitude_m": float(latlon_alt[i, 2])}
        for i, name in enumerate(payload["receivers"]["name"])
    ]
    norm = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in sorted(fs.normalization.items())}
    config = {**payload["config"], "has_map": bool(model.has_map), "refinement": refinement}
    if model.has_map:
        config["grid_cells"] = int(model.grid_enu_m.shape[0])
    parity = {
        "max_abs_diff": max_abs_diff,
        "position_enu_m": "absolute difference in km",
        "covariance_m2": "absolute difference / the session's largest |covariance element|",
        "position_latlon": "absolute difference in degrees",
        "geodesy_tol_deg": GEODESY_TOL_DEG,
    }
    import onnx
    import onnxsim

    dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
    return {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "origin": dump({"latitude_deg": lat, "longitude_deg": lon, "altitude_m": alt}),
        "receivers": dump(receivers),
        "normalization": dump(norm),
        "model_config": dump(config),
        "frontend": dump({k: fs.attrs[k] for k in FRONTEND_KEYS if k in fs.attrs}),
        "inputs": dump(inputs),
        "outputs": dump(outputs),
        "parity": dump(parity),
        "params_hash": str(params_hash),
        "git_commit": str(commit),
        "checkpoint_md5": checkpoint_md5,
        "exporter": f"torch.onnx.export({exporter}) torch {torch.__version__}; onnx {onnx.__version__}; "
                    f"onnxsim {onnxsim.__version__}",
    }


def set_metadata(model, metadata: dict[str, str]) -> None:
    import onnx

    del model.metadata_props[:]
    for k in sorted(metadata):
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=metadata[k]))
    model.doc_string = ("Heimdall LocalizationNet: WebSDR receivers' features -> transmitter position "
                        "(ENU m, covariance m^2, WGS-84 lat/lon). See metadata_props.")


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _session(model: bytes | str | Path, intra_op_threads: int | None = None, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=list(providers))


def load_onnx_session(path: str | Path, *, intra_op_threads: int | None = None,
                      providers: Sequence[str] = ("CPUExecutionProvider",)):
    """Open an exported model -> (onnxruntime.InferenceSession, metadata dict).

    The metadata's JSON entries (``origin``, ``receivers``, ``normalization``, ``model_config``,
    ``inputs``, ``outputs``, ``parity``) are decoded; the rest (``format``, ``params_hash``,
    ``git_commit``, ``checkpoint_md5``, ``exporter``...) stay strings. Feed the session a dict of the
    six inputs (numpy, dtypes as in ``metadata["inputs"]``); ``receiver_id`` indexes
    ``metadata["receivers"]``. Raises HeimdallError for a missing or non-Heimdall file.
    """
    path = Path(path)
    if not path.exists():
        raise HeimdallError(f"{path}: ONNX model not found (run the export_onnx stage first)")
    try:
        session = _session(path, intra_op_threads, providers)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"{path}: not a loadable ONNX model: {str(e).strip().splitlines()[0]}") from None
    raw = dict(session.get_modelmeta().custom_metadata_map)
    if raw.get("format") != ONNX_FORMAT:
        raise HeimdallError(f"{path}: not a Heimdall LocalizationNet ONNX model (metadata 'format' missing)")
    if raw.get("format_version") != str(ONNX_FORMAT_VERSION):
        raise HeimdallError(f"{path}: unsupported format_version {raw.get('format_version')!r} "
                            f"(this heimdall reads {ONNX_FORMAT_VERSION})")
    meta: dict = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v) if k in JSON_METADATA_KEYS else v
        except json.JSONDecodeError:
            raise HeimdallError(f"{path}: metadata '{k}' is not valid JSON") from None
    names = tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())
    if names != (INPUT_NAMES, OUTPUT_NAMES):
        raise HeimdallError(f"{path}: unexpected graph signature {names}")
    return session, meta


# ---------------------------------------------------------------------------------------------
# Verification


def _feeds(inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(t.numpy()) for n, t in zip(INPUT_NAMES, inputs)}


@torch.no_grad()
def parity(session, model: LocalizationNet, geodetic: EnuToGeodetic, fs: FeatureSet, idx: np.ndarray,
           origin: Sequence[float], batch: int = 128) -> dict:
    """ONNX vs the PyTorch model on sessions ``idx`` (batched): per-output differences, scaled and raw.

    The reference is ``model(...)`` (LocalizationNet.forward, float32, eager) for position and
    covariance, and the float64 geodesy applied to the PyTorch position for lat/lon. Non-finite
    ONNX outputs count as an infinite difference.
    """
    model.eval()
    pos_m, cov_m2, cov_rel, ll_deg, geod = [], [], [], [], []
    for s in range(0, len(idx), batch):
        inputs = fs.model_inputs(idx[s:s + batch])
        ref_pos, ref_cov = model(*inputs)
        ref_ll = geodetic(ref_pos).numpy()
        ref_pos, ref_cov = ref_pos.double().numpy(), ref_cov.double().numpy()
        pos, cov, ll = (np.asarray(o, dtype=np.float64) for o in session.run(list(OUTPUT_NAMES), _feeds(inputs)))
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


# ---------------------------------------------------------------------------------------------
# Benchmarks


def _percentiles_ms(times_s: list[float]) -> tuple[float, float]:
    t = np.asarray(times_s) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def _time_calls(fn, feeds: list, runs: int, warmup: int, budget_s: float) -> list[float]:
    """Per-call wall times of ``fn`` cycling over ``feeds``; stops early once ``budget_s`` is spent (a
    configuration that is pathologically slow, e.g. 2 threads on a machine whose other core is busy,
    must not stall the stage — the run count actually measured is reported)."""
    for i in range(warmup):
        fn(feeds[i % len(feeds)])
    times: list[float] = []
    start = time.perf_counter()
    for i in range(runs):
        f = feeds[i % len(feeds)]
        t = time.perf_counter()
        fn(f)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return times


@torch.no_grad()
def benchmark(model_bytes: bytes, model: LocalizationNet, fs: FeatureSet, idx: np.ndarray, *, runs: int,
              warmup: int, throughput_batch: int, throughput_runs: int, budget_s: float = 20.0) -> dict:
    """Batch-1 latency (ORT and eager torch, same sessions, same process) and ORT batch throughput.

    Each runtime is measured with 1 and 2 intra-op threads (where the machine has 2 cores); the
    faster p50 is reported with its thread count, and every configuration's p50 and run count beside
    it. Inputs cycle over the first 32 test sessions.
    """
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_options = [1, 2] if n_cpu >= 2 else [1]
    sample = idx[: min(len(idx), 32)]
    singles = [fs.model_inputs(sample[i:i + 1]) for i in range(len(sample))]
    feeds = [_feeds(x) for x in singles]
    out: dict = {"latency_runs_requested": runs, "warmup_runs": warmup, "cpu_count": n_cpu}

    def measure(make_fn, inputs, n_runs, n_warmup, set_threads=None):
        by_threads, best = {}, None
        for threads in thread_options:
            if set_threads is not None:
                set_threads(threads)
            times = _time_calls(make_fn(threads), inputs, n_runs, n_warmup, budget_s)
            p50, p99 = _percentiles_ms(times)
            by_threads[str(threads)] = {"p50_ms": round(p50, 4), "p99_ms": round(p99, 4), "runs": len(times)}
            if best is None or p50 < by_threads[str(best)]["p50_ms"]:
                best = threads
        return best, by_threads

    def ort_fn(threads):
        sess = _session(model_bytes, threads)
        return lambda f: sess.run(None, f)

    best, by = measure(ort_fn, feeds, runs, warmup)
    out.update(p50_latency_ms_batch1=by[str(best)]["p50_ms"], p99_latency_ms_batch1=by[str(best)]["p99_ms"],
               latency_runs=by[str(best)]["runs"], ort_intra_op_threads=best, ort_batch1_by_threads=by)

    model.eval()
    saved = torch.get_num_threads()
    try:
        tbest, tby = measure(lambda threads: (lambda x: model(*x)), singles, runs, warmup, torch.set_num_threads)
    finally:
        torch.set_num_threads(saved)
    out.update(torch_p50_latency_ms_batch1=tby[str(tbest)]["p50_ms"],
               torch_p99_latency_ms_batch1=tby[str(tbest)]["p99_ms"], torch_threads=tbest, torch_batch1_by_threads=tby,
               speedup_vs_torch_p50=round(tby[str(tbest)]["p50_ms"] / by[str(best)]["p50_ms"], 3))

    # throughput: one batch of `throughput_batch` test sessions (cycled if the split is smaller)
    bfeed = [_feeds(fs.model_inputs(np.resize(idx, throughput_batch)))]
    tput = {}
    for threads in thread_options:
        times = _time_calls(ort_fn(threads), bfeed, throughput_runs, 2, budget_s)
        tput[str(threads)] = round(throughput_batch / float(np.median(times)), 2)
    best_t = max(tput, key=tput.get)
    out.update(batch64_throughput_sessions_per_s=tput[best_t], throughput_batch=throughput_batch,
               throughput_threads=int(best_t), throughput_sessions_per_s_by_threads=tput)
    return out


# ---------------------------------------------------------------------------------------------
# The stage


def _check_features_match(payload: dict, model: LocalizationNet, fs: FeatureSet, features_path: Path) -> None:
    """The verification set must be the one the checkpoint was trained on (same frame and scaling)."""
    if list(fs.receiver_names) != list(payload["receivers"]["name"]):
        raise HeimdallError(f"{features_path}: receivers {fs.receiver_names} differ from the checkpoint's "
                            f"{payload['receivers']['name']}")
    if not np.allclose(np.asarray(fs.origin, dtype=np.float64), np.asarray(payload["origin"], dtype=np.float64),
                       rtol=0, atol=1e-9):
        raise HeimdallError(f"{features_path}: ENU origin {fs.origin} differs from the checkpoint's "
                            f"{payload['origin']}")
    c = model.config
    if fs.logmel.shape[1:] != (c.n_receivers, c.n_mels, c.n_frames):
        raise HeimdallError(f"{features_path}: logmel shape {fs.logmel.shape[1:]} does not match the model's "
                            f"{(c.n_receivers, c.n_mels, c.n_frames)}")
    for key in ("logmel_mean_db", "logmel_std_db", "rss_mean_dbm", "rss_std_db", "snr_mean_db", "snr_std_db"):
        a = np.asarray(fs.normalization[key], dtype=np.float32).ravel()
        b = getattr(model, key).numpy().ravel()
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-6):
            raise HeimdallError(f"{features_path}: normalization '{key}' differs from the checkpoint's "
                                "(features from another extraction?)")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def run(ckpt_path: str | Path, features_path: str | Path, onnx_path: str | Path, metrics_path: str | Path, *,
        commit: str, params_hash: str, opset: int = DEFAULT_OPSET, max_abs_diff: float = 1e-4,
        latency_runs: int = 300, warmup_runs: int = 20, throughput_batch: int = 64, throughput_runs: int = 10,
        verify_batch: int = 128, exporter: str = "auto", refinement: str = "planar",
        graph_transform: GraphTransform | None = None) -> dict:
    """Export ``ckpt_path`` to ``onnx_path``, verify it on the whole test split of ``features_path``
    against the PyTorch model, benchmark it, and write ``metrics_path`` (JSON).

    ``graph_transform`` (optional) is applied to the finished ModelProto before checking and
    verification: the hook for post-export graph passes (quantisation, fusion, surgery), each of which
    must then pass the same parity gate — and the way tests prove the gate catches a broken graph.
    Raises HeimdallError, writing nothing, if any step or the gate fails.
    """
    import onnx

    from heimdall.stages.train import load_checkpoint  # deferred: pulls in Lightning

    t0 = time.perf_counter()
    ckpt_path, features_path = Path(ckpt_path), Path(features_path)
    onnx_path, metrics_path = Path(onnx_path), Path(metrics_path)
    if not (max_abs_diff > 0 and math.isfinite(max_abs_diff)):
        raise HeimdallError(f"export_onnx.max_abs_diff: must be a positive number, got {max_abs_diff}")
    if latency_runs < 1 or throughput_runs < 1 or throughput_batch < 1 or verify_batch < 1 or warmup_runs < 0:
        raise HeimdallError("export_onnx: latency_runs, throughput_runs, throughput_batch and verify_batch must be "
                            ">= 1 (warmup_runs >= 0)")

    model, payload = load_checkpoint(ckpt_path)
    fs = load_features(features_path)
    _check_features_match(payload, model, fs, features_path)
    test_idx = fs.indices("test")
    module = ExportModule(model, payload["origin"], refinement).eval()

    # 1. trace -> clean -> simplify -> describe (-> optional transform) -> check
    t = time.perf_counter()
    example = fs.model_inputs(np.resize(test_idx, 2))  # batch 2: keeps the batch axis symbolic
    proto, used = export_graph(module, example, opset, exporter)
    export_s = time.perf_counter() - t
    strip_debug_info(proto)
    proto = simplify_graph(proto)
    strip_debug_info(proto)
    n_einsum = rewrite_einsum_contractions(proto)
    set_metadata(proto, build_metadata(model, payload, fs, commit=commit, params_hash=params_hash, exporter=used,
                                       refinement=refinement, checkpoint_md5=_md5(ckpt_path),
                                       max_abs_diff=max_abs_diff))
    if graph_transform is not None:
        proto = graph_transform(proto) or proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"onnx.checker rejected the exported graph: {str(e).strip().splitlines()[0]}") from None
    names = tuple(i.name for i in proto.graph.input), tuple(o.name for o in proto.graph.output)
    if names != (INPUT_NAMES, OUTPUT_NAMES):
        raise HeimdallError(f"exported graph signature {names} != {(INPUT_NAMES, OUTPUT_NAMES)}")
    blob = proto.SerializeToString(deterministic=True)

    # 2. the parity gate (whole test split, batched)
    t = time.perf_counter()
    try:
        session = _session(blob)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"onnxruntime cannot load the exported graph: {str(e).strip().splitlines()[0]}") from None
    diffs = parity(session, model, module.geodetic, fs, test_idx, payload["origin"], verify_batch)
    verify_s = time.perf_counter() - t
    log.info("parity on %d test sessions: position %.3g m, covariance %.3g rel, lat/lon %.3g deg, geodesy %.3g deg",
             diffs["n_sessions"], diffs["position_m"], diffs["covariance_rel"], diffs["latlon_deg"],
             diffs["geodesy_max_err_deg"])
    if not diffs["max_abs_diff"] <= max_abs_diff:
        hint = (" (if LocalizationNet.refine changed, update PlanarRefinement or export with refinement='traced')"
                if module.refinement is not None else "")
        raise HeimdallError(
            f"ONNX parity failed on {diffs['n_sessions']} test sessions: max difference {diffs['max_abs_diff']:.3g} > "
            f"{max_abs_diff:g} (position {diffs['position_km']:.3g} km, covariance {diffs['covariance_rel']:.3g} "
            f"relative, lat/lon {diffs['latlon_deg']:.3g} deg); nothing written{hint}")
    if not diffs["geodesy_max_err_deg"] <= GEODESY_TOL_DEG:
        raise HeimdallError(f"ONNX lat/lon differs from heimdall.geo by {diffs['geodesy_max_err_deg']:.3g} deg "
                            f"> {GEODESY_TOL_DEG:g}; nothing written")

    # 3. benchmarks
    t = time.perf_counter()
    bench = benchmark(blob, model, fs, test_idx, runs=latency_runs, warmup=warmup_runs,
                      throughput_batch=throughput_batch, throughput_runs=throughput_runs)
    bench_s = time.perf_counter() - t

    # 4. outputs
    with atomic_path(onnx_path) as tmp:
        tmp.write_bytes(blob)
    metrics = {
        "max_abs_diff": diffs["max_abs_diff"],
        "max_abs_diff_threshold": max_abs_diff,
        "parity": diffs,
        "size_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "exporter": used,
        "refinement": refinement,
        "einsum_rewritten": n_einsum,
        "opset": opset,
        "n_nodes": len(proto.graph.node),
        **bench,
        "export_s": round(export_s, 2),
        "verify_s": round(verify_s, 2),
        "benchmark_s": round(bench_s, 2),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    _write_json(metrics_path, metrics)
    return {"onnx": str(onnx_path), "size_bytes": len(blob), "max_abs_diff": diffs["max_abs_diff"],
            "p50_latency_ms_batch1": bench["p50_latency_ms_batch1"],
            "torch_p50_latency_ms_batch1": bench["torch_p50_latency_ms_batch1"], "exporter": used}
