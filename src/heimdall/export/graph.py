"""Building the exported graph: LocalizationNet + in-graph geodesy, traced by torch.onnx (dynamo),
stripped of machine-specific debug info, simplified (onnxsim) and described in metadata_props.

The graph takes the model's six inputs (``contracts.INPUT_NAMES``; batch axis dynamic, receiver
count fixed) and returns ``contracts.OUTPUT_NAMES``:

- ``position_enu_m``  (B, 2) float32: east, north in metres around the network's ENU origin;
- ``covariance_m2``   (B, 2, 2) float32: the position covariance in m²;
- ``position_latlon`` (B, 2) float64: WGS-84 latitude, longitude in degrees of the point on the
  ellipsoid (h = 0) whose ENU east/north are ``position_enu_m`` — the exact inverse of how the
  training targets were defined (``geo.geodetic_to_enu(lat, lon, 0, origin)``, extract_features).
  Computed in the graph in float64 (a float32 latitude has a 4e-6° = 0.4 m ulp).

The model's math is traced as model.py writes it (its refinement is already in the layout
onnxruntime runs fastest); nothing here re-expresses it. There are no absolute paths and no
timestamps in the file: two exports of one checkpoint are byte-identical.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from heimdall import geo
from heimdall.contracts import INPUT_NAMES, N_MODES, OUTPUT_NAMES, REGION_LEVELS
from heimdall.errors import HeimdallError
from heimdall.export.runtime import GEODESY_TOL_DEG, ONNX_FORMAT, ONNX_FORMAT_VERSION
from heimdall.model import LocalizationNet

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20
# features.h5 attributes that define the log-mel front end (heimdall predict recomputes features with them)
FRONTEND_KEYS = ("sample_rate_hz", "n_fft", "n_mels", "n_frames", "hop_length")


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


class ExportModule(nn.Module):
    """LocalizationNet.locate + in-graph geodesy: the six inputs -> the eight named outputs."""

    def __init__(self, model: LocalizationNet, origin: Sequence[float]):
        super().__init__()
        if not model.has_map:
            raise HeimdallError("the exported graph answers search regions and modes: the model needs its radio map")
        self.model = model
        self.geodetic = EnuToGeodetic(origin)

    def forward(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        mean, cov, prob, mode_weight, mode_mean, mode_cov = self.model.locate(
            logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
        mode_latlon = self.geodetic(mode_mean.reshape(-1, 2)).reshape(mode_mean.shape)
        return mean, cov, self.geodetic(mean), prob, mode_weight, mode_mean, mode_cov, mode_latlon


def _io_descriptions(model: LocalizationNet) -> tuple[list[dict], list[dict]]:
    c = model.config
    r, g, k = c.n_receivers, int(model.grid_east_m.shape[0]), N_MODES
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
        {"name": "cell_probability", "dtype": "float32", "shape": ["batch", g], "unit": "probability",
         "description": "calibrated posterior probability of each cell of 'grid' (row-major: north rows of "
                        "east cells); sums to 1. The level-p search region: the most probable cells until "
                        "their sum reaches regions.mass[p] (cells tied with the last one included)"},
        {"name": "mode_weight", "dtype": "float32", "shape": ["batch", k], "unit": "probability",
         "description": "probability of each posterior mode's part of the map, most probable first; 0 = no "
                        "mode in this slot; 1 - sum = elsewhere"},
        {"name": "mode_enu_m", "dtype": "float32", "shape": ["batch", k, 2], "unit": "m",
         "description": "each mode's mean: east, north around 'origin'"},
        {"name": "mode_covariance_m2", "dtype": "float32", "shape": ["batch", k, 2, 2], "unit": "m^2",
         "description": "each mode's covariance (east, north)"},
        {"name": "mode_latlon", "dtype": "float64", "shape": ["batch", k, 2], "unit": "deg",
         "description": "WGS-84 latitude, longitude of each mode's mean on the ellipsoid (h = 0)"},
    ]
    return inputs, outputs


def region_description(model: LocalizationNet) -> dict:
    """How to turn cell_probability into the calibrated search regions: {"levels": nominal levels,
    "mass": the mass each level's HPD region holds (calibrated on validation), "temperature": τ,
    "n_modes"} (heimdall.regions.hpd_thresholds does it)."""
    mass = model.region_mass.double().numpy()[model.region_columns]
    return {"levels": list(REGION_LEVELS), "mass": [float(np.float32(m)) for m in mass],
            "temperature": float(model.region_temperature), "n_modes": N_MODES}


def grid_description(model: LocalizationNet) -> dict:
    """The map grid of cell_probability: {east0_m, north0_m, spacing_m, n_east, n_north} (cell g at
    row g // n_east, column g % n_east; centre (east0_m + column·spacing_m, north0_m + row·spacing_m))."""
    east, north = model.grid_east_m.double().numpy(), model.grid_north_m.double().numpy()
    n_north, n_east = model.grid_shape
    return {"east0_m": float(east.min()), "north0_m": float(north.min()),
            "spacing_m": float(np.sqrt(12.0 * float(model.cell_var_m2))), "n_east": int(n_east), "n_north": int(n_north)}


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


def export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], opset: int = DEFAULT_OPSET):
    """Trace ``module`` with torch.onnx's dynamo exporter -> ModelProto (batch axis symbolic)."""
    import onnx  # noqa: F401  (fail early with the real import error)

    module.eval()
    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module, example, dynamo=True, external_data=False, opset_version=opset, optimize=True,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES), verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - any exporter failure -> one-line error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeimdallError(f"ONNX export failed: {reason}") from e
    return program.model_proto


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


def simplify_graph(model):
    from onnxsim import simplify

    try:
        simplified, ok = simplify(model)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"onnxsim failed on the exported graph: {str(e).strip().splitlines()[0]}") from e
    if not ok:
        raise HeimdallError("onnxsim: the simplified graph failed its own check")
    return simplified


def build_metadata(model: LocalizationNet, payload: dict, features, *, params_hash: str,
                   checkpoint_md5: str, max_abs_diff: float) -> dict[str, str]:
    inputs, outputs = _io_descriptions(model)
    lat, lon, alt = (float(v) for v in payload["origin"])
    latlon_alt = np.asarray(payload["receivers"]["latlon_alt"], dtype=np.float64)
    receivers = [
        {"receiver_id": i, "name": str(name), "latitude_deg": float(latlon_alt[i, 0]),
         "longitude_deg": float(latlon_alt[i, 1]), "altitude_m": float(latlon_alt[i, 2])}
        for i, name in enumerate(payload["receivers"]["name"])
    ]
    norm = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in sorted(features.normalization.items())}
    config = {**payload["config"], "has_map": bool(model.has_map)}
    if model.has_map:
        config["grid_cells"] = int(model.grid_enu_m.shape[0])
    parity = {
        "max_abs_diff": max_abs_diff,
        "position_enu_m": "absolute difference in km",
        "covariance_m2": "absolute difference / the session's largest |covariance element|",
        "position_latlon": "absolute difference in degrees",
        "cell_probability": "absolute difference",
        "region_area_km2": "search-region area from each runtime's cell_probability: difference beyond one boundary cell / the area",
        "mode_weight": "absolute difference",
        "mode_enu_m": "absolute difference in km",
        "mode_covariance_m2": "absolute difference / the mode's largest |covariance element| per session",
        "mode_latlon": "absolute difference in degrees",
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
        "frontend": dump({k: features.attrs[k] for k in FRONTEND_KEYS if k in features.attrs}),
        "inputs": dump(inputs),
        "outputs": dump(outputs),
        "parity": dump(parity),
        "grid": dump(grid_description(model)),
        "regions": dump(region_description(model)),
        "params_hash": str(params_hash),
        "checkpoint_md5": checkpoint_md5,
        "exporter": f"torch.onnx.export(dynamo) torch {torch.__version__}; onnx {onnx.__version__}; "
                    f"onnxsim {onnxsim.__version__}",
    }


def set_metadata(model, metadata: dict[str, str]) -> None:
    import onnx

    del model.metadata_props[:]
    for k in sorted(metadata):
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=metadata[k]))
    model.doc_string = ("Heimdall LocalizationNet: WebSDR receivers' features -> transmitter position "
                        "(ENU m, covariance m^2, WGS-84 lat/lon), calibrated search regions and posterior modes. "
                        "See metadata_props.")
