"""``heimdall predict``: sessions.h5 + an exported model -> position, error ellipses, receivers used,
calibrated search regions (area per level) and the posterior's modes (candidate areas).

The model is a local ONNX file or an MLflow model URI (``models:/heimdall-localization@champion``).
Features are computed by the same code as the extract_features stage (heimdall.features.featurize_block)
with the front-end settings stored in the ONNX metadata; receivers are matched to the model's
receiver table by name. Normalisation is inside the graph.

Search regions come from the graph's ``cell_probability`` on the metadata's ``grid``: the level-p
region is the HPD set holding ``regions.mass`` of the probability (heimdall.regions.hpd_thresholds),
exactly the sets the evaluate stage's test metrics count. The (batch, cells) probabilities live one
batch at a time; with ``geojson=True`` each session's map features are drawn in that batch too.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from heimdall import geo
from heimdall.contracts import OUTPUT_NAMES
from heimdall.errors import HeimdallError
from heimdall.features import LogMelFrontend, featurize_block
from heimdall.regions import grid_cell_index, hpd_thresholds, level_key

# Refuse inputs that would not fit a reasonable machine: a sessions file is read in batches, but
# one row of IQ and the number of sessions a call answers are bounded.
MAX_SESSIONS = 100_000
MAX_IQ_SAMPLES = 10_000_000
# the search regions drawn in --geojson maps (the model's levels include them)
GEOJSON_LEVELS = (0.5, 0.9)
# the private key under which predict_sessions(geojson=True) returns a session's GeoJSON Features
GEOJSON_KEY = "_geojson"


def resolve_model(model: str | Path, workdir: Path) -> Path:
    """A local .onnx path, or an MLflow model URI downloaded into ``workdir``."""
    text = str(model)
    if "://" not in text and not text.startswith("models:/"):
        return Path(text)
    import mlflow

    from heimdall.tracking import redact_uri, scrub, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(workdir)))
    except Exception as e:  # noqa: BLE001 - any registry/store failure is the user's URI or server
        raise HeimdallError(f"{text}: cannot fetch the model from MLflow at {redact_uri(tracking_uri())}: "
                            f"{scrub(str(e).strip().splitlines()[0])}") from None
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise HeimdallError(f"{text}: the MLflow model holds no .onnx file")
    return found[0]


def ellipse_axes(cov: np.ndarray, k: float) -> dict:
    """k-σ ellipse {x : xᵀ Σ⁻¹ x ≤ k²} of a 2×2 ENU covariance: semi-axes (m) and the major axis'
    azimuth (degrees clockwise from north, in [0, 180))."""
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 0.0)
    east, north = evecs[:, 1]  # major axis
    return {"semi_major_m": float(k * math.sqrt(evals[1])), "semi_minor_m": float(k * math.sqrt(evals[0])),
            "orientation_deg": float(math.degrees(math.atan2(east, north)) % 180.0)}


def _select_rows(all_ids: np.ndarray, session_ids: list[str] | None, path: Path) -> np.ndarray:
    if not session_ids:
        rows = np.arange(len(all_ids))
    else:
        index = {sid: i for i, sid in enumerate(all_ids)}
        missing = [s for s in session_ids if s not in index]
        if missing:
            raise HeimdallError(f"{path}: session id {missing[0]!r} not found ({len(missing)} missing)")
        rows = np.array([index[s] for s in session_ids], dtype=np.int64)
    if len(rows) > MAX_SESSIONS:
        raise HeimdallError(f"{path}: {len(rows)} sessions requested; predict answers at most {MAX_SESSIONS} "
                            "per call (select some with --session-id)")
    return rows


def _region_metadata(meta: dict, model) -> tuple[dict, np.ndarray, np.ndarray]:
    """(grid, levels (L,), masses (L,)) from the model's metadata; one-line error if absent or malformed."""
    grid, reg = meta.get("grid"), meta.get("regions")
    keys = {"east0_m", "north0_m", "spacing_m", "n_east", "n_north"}
    if not (isinstance(grid, dict) and keys <= grid.keys() and isinstance(reg, dict)
            and {"levels", "mass"} <= reg.keys() and isinstance(reg["levels"], list) and isinstance(reg["mass"], list)
            and len(reg["levels"]) == len(reg["mass"]) > 0):
        raise HeimdallError(f"{model}: ONNX metadata has no search-region grid/levels ('grid', 'regions'); "
                            "re-export the model")
    for k in ("east0_m", "north0_m"):
        _number(grid[k], f"grid.{k}", model)
    _number(grid["spacing_m"], "grid.spacing_m", model, lambda x: x > 0, " > 0")
    for k in ("n_east", "n_north"):
        _count(grid[k], f"grid.{k}", model)
    if grid["n_east"] * grid["n_north"] > MAX_GRID_CELLS:
        raise HeimdallError(f"{model}: ONNX metadata grid has {grid['n_east']}×{grid['n_north']} cells "
                            f"(more than {MAX_GRID_CELLS:,}); re-export the model")
    levels = np.array([_number(v, f"regions.levels[{i}]", model, lambda x: 0 < x < 1, " in (0, 1)")
                       for i, v in enumerate(reg["levels"])])
    masses = np.array([_number(v, f"regions.mass[{i}]", model, lambda x: 0 < x <= 1, " in (0, 1]")
                       for i, v in enumerate(reg["mass"])])
    if (np.diff(levels) <= 0).any():
        raise HeimdallError(f"{model}: ONNX metadata regions.levels {levels.tolist()} are not increasing")
    return grid, levels, masses


# a grid the graph's (batch, cells) probabilities can hold in memory: 16 M cells
MAX_GRID_CELLS = 1 << 24


def _number(v, key: str, model, ok=lambda x: True, expect: str = "") -> float:
    """A finite JSON number from the ONNX metadata that ``ok`` accepts, or one line naming the key."""
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)):
        raise HeimdallError(f"{model}: ONNX metadata {key} is {v!r}, expected a finite number{expect} "
                            "(tampered or corrupt model; re-export it)")
    return float(v)


def _count(v, key: str, model) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20):
        raise HeimdallError(f"{model}: ONNX metadata {key} is {v!r}, expected a positive integer "
                            "(tampered or corrupt model; re-export it)")
    return v


def _checked_metadata(meta: dict, model) -> tuple[dict, tuple[float, float, float], list[str]]:
    """The front-end settings, the ENU origin and the receiver names of an exported model, each value
    checked (finite, in range, unique names): a tampered metadata value is one line, never a traceback
    or a NaN in the output."""
    fe = meta.get("frontend")
    if not (isinstance(fe, dict) and {"sample_rate_hz", "n_fft", "n_mels", "n_frames"} <= fe.keys()):
        raise HeimdallError(f"{model}: ONNX metadata has no log-mel front-end settings (re-export the model)")
    _number(fe["sample_rate_hz"], "frontend.sample_rate_hz", model, lambda x: x > 0, " > 0")
    for k in ("n_fft", "n_mels", "n_frames"):
        _count(fe[k], f"frontend.{k}", model)
    o = meta.get("origin")
    if not (isinstance(o, dict) and {"latitude_deg", "longitude_deg", "altitude_m"} <= o.keys()):
        raise HeimdallError(f"{model}: ONNX metadata has no origin (re-export the model)")
    origin = (_number(o["latitude_deg"], "origin.latitude_deg", model, lambda x: abs(x) <= 90, " in [-90, 90]"),
              _number(o["longitude_deg"], "origin.longitude_deg", model, lambda x: abs(x) <= 180, " in [-180, 180]"),
              _number(o["altitude_m"], "origin.altitude_m", model))
    rx = meta.get("receivers")
    if not (isinstance(rx, list) and rx and all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in rx)):
        raise HeimdallError(f"{model}: ONNX metadata 'receivers' is not a list of named receivers (re-export the model)")
    names = [r["name"] for r in rx]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise HeimdallError(f"{model}: ONNX metadata receivers name {dup!r} twice: receiver names must be unique")
    return fe, origin, names


def _modes(weight: np.ndarray, enu: np.ndarray, cov: np.ndarray, latlon: np.ndarray) -> list[dict]:
    """The used mode slots (weight > 0) of one session, most probable first."""
    order = [k for k in np.argsort(-weight, kind="stable") if weight[k] > 0]
    return [{"weight": float(weight[k]),
             "latitude_deg": float(latlon[k, 0]), "longitude_deg": float(latlon[k, 1]),
             "east_m": float(enu[k, 0]), "north_m": float(enu[k, 1]),
             "covariance_m2": cov[k].astype(float).tolist(),
             "ellipse_1sigma": ellipse_axes(cov[k].astype(np.float64), 1.0)} for k in order]


def predict_sessions(sessions_path: str | Path, model: str | Path, session_ids: list[str] | None = None,
                     batch: int = 64, geojson: bool = False) -> list[dict]:
    """One dict per session: position (lat/lon and ENU), covariance, 1σ/2σ ellipses, receivers used,
    ``search_regions`` ([{level, area_km2}] per level of the model), ``modes`` (used slots, most
    probable first: weight, lat/lon, ENU, covariance, 1σ ellipse) and ``elsewhere_probability``; where
    the file has the ground truth, ``error_m`` and ``truth_in_region`` ({"p50": bool, ...}: the truth's
    grid cell is in the level's region, as the test metrics count it).

    ``geojson=True``: each dict also carries its GeoJSON Features (heimdall.search_map.session_features:
    the 50 % and 90 % regions, the modes, the estimate) under ``GEOJSON_KEY``, drawn batch by batch so
    that the cell probabilities are never all in memory; pop it before serialising the result."""
    from heimdall.export.runtime import load_onnx_session
    from heimdall.sessions_file import open_sessions

    sessions_path = Path(sessions_path)
    with tempfile.TemporaryDirectory(prefix="heimdall-predict-") as work:
        onnx_path = resolve_model(model, Path(work))
        session, meta = load_onnx_session(onnx_path, intra_op_threads=1)
    fe, origin, model_rx = _checked_metadata(meta, model)
    grid, levels, masses = _region_metadata(meta, model)
    n_grid = int(grid["n_east"]) * int(grid["n_north"])
    cell_km2 = float(grid["spacing_m"]) ** 2 / 1e6
    if geojson:
        from heimdall.search_map import session_features

        missing = [lv for lv in GEOJSON_LEVELS if not np.isclose(levels, lv, rtol=0.0, atol=1e-9).any()]
        if missing:
            raise HeimdallError(f"{model}: the model's region levels {levels.tolist()} lack {missing} (re-export the model)")

    src, dims = open_sessions(sessions_path)
    with src:
        if dims["S"] > MAX_IQ_SAMPLES:
            raise HeimdallError(f"{sessions_path}: {dims['S']} IQ samples per row exceeds the limit {MAX_IQ_SAMPLES}")
        rate = float(src.attrs["sample_rate_hz"])
        if not math.isclose(rate, float(fe["sample_rate_hz"]), rel_tol=1e-9):
            raise HeimdallError(f"{sessions_path}: IQ sample rate {rate:g} Hz differs from the model's "
                                f"{fe['sample_rate_hz']:g} Hz")
        try:
            frontend = LogMelFrontend(rate, dims["S"], int(fe["n_fft"]), int(fe["n_mels"]), int(fe["n_frames"]))
        except ValueError as e:
            raise HeimdallError(f"{sessions_path}: {e}") from None
        file_rx = list(src["receivers/name"].asstr()[()])
        slot = np.array([model_rx.index(n) if n in model_rx else -1 for n in file_rx])
        known = slot >= 0
        if not known.any():
            raise HeimdallError(f"{sessions_path}: none of its receivers {file_rx} is in the model's table {model_rx}")
        ids = src["sessions/session_id"].asstr()[()]
        rows = _select_rows(ids, session_ids, sessions_path)
        truth = np.stack([src["sessions/tx_latitude_deg"][()], src["sessions/tx_longitude_deg"][()]], 1)
        has_truth = np.isfinite(truth).all(1)
        # same metric as the test metrics: ENU distance to the h = 0 truth (extract_features' targets)
        truth_enu = np.full((len(truth), 2), np.nan)
        te, tn, _ = geo.geodetic_to_enu(truth[has_truth, 0], truth[has_truth, 1], np.zeros(int(has_truth.sum())), origin)
        truth_enu[has_truth] = np.stack([te, tn], 1)
        m = src["measurements"]
        results: list[dict] = []
        r_model = len(model_rx)
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            order = np.argsort(chunk)  # h5py reads need increasing indices
            sel = chunk[order]
            feats, _ = featurize_block(m["present"][sel], m["rss_dbm"][sel], m["snr_db"][sel], m["has_iq"][sel],
                                       m["iq_scale"][sel], m["iq"][sel], frontend)
            inv = np.argsort(order)
            feats = {k: v[inv][:, known] for k, v in feats.items()}  # back to the requested order
            b = len(chunk)
            feeds = {
                "logmel": np.zeros((b, r_model, *feats["logmel_db"].shape[2:]), np.float32),
                "rss_dbm": np.zeros((b, r_model), np.float32), "snr_db": np.zeros((b, r_model), np.float32),
                "present": np.zeros((b, r_model), np.float32), "has_iq": np.zeros((b, r_model), np.float32),
                "receiver_id": np.broadcast_to(np.arange(r_model, dtype=np.int64), (b, r_model)).copy(),
            }
            s = slot[known]
            feeds["logmel"][:, s] = feats["logmel_db"]
            feeds["rss_dbm"][:, s], feeds["snr_db"][:, s] = feats["rss_dbm"], feats["snr_db"]
            feeds["present"][:, s], feeds["has_iq"][:, s] = feats["present"], feats["has_iq"]
            graph_out = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds)))
            enu, cov, latlon = graph_out["position_enu_m"], graph_out["covariance_m2"], graph_out["position_latlon"]
            prob = graph_out["cell_probability"]
            bad = [k for k, v in graph_out.items() if not np.isfinite(v).all()]
            if bad:  # never a NaN in --json / --geojson: a graph that answers NaN is broken or tampered
                i = int(np.flatnonzero(~np.isfinite(graph_out[bad[0]].reshape(b, -1)).all(1))[0])
                raise HeimdallError(f"{model}: the graph's {', '.join(bad)} is not finite for session "
                                    f"{str(ids[chunk[i]])!r} (tampered or corrupt model; re-export it)")
            if prob.shape != (b, n_grid):
                raise HeimdallError(f"{model}: cell_probability has {prob.shape[1]} cells; its metadata grid "
                                    f"{grid['n_east']}×{grid['n_north']} (re-export the model)")
            # hpd_thresholds normalises the rows exactly so: membership compares like with like
            p64 = np.asarray(prob, dtype=np.float64)
            p64 = p64 / p64.sum(1, keepdims=True)
            threshold, n_cells = hpd_thresholds(prob, masses)  # (b, L)
            area_km2 = n_cells * cell_km2
            cell = grid_cell_index(np.where(has_truth[chunk, None], truth_enu[chunk], 0.0), float(grid["east0_m"]),
                                   float(grid["north0_m"]), float(grid["spacing_m"]), int(grid["n_east"]),
                                   int(grid["n_north"]))
            p_truth = np.where(cell >= 0, p64[np.arange(b), np.maximum(cell, 0)], -np.inf)
            covered = p_truth[:, None] >= threshold  # (b, L)
            for i, row in enumerate(chunk):
                used = [model_rx[j] for j in range(r_model) if feeds["present"][i, j] > 0]
                out = {
                    "session_id": str(ids[row]),
                    "latitude_deg": float(latlon[i, 0]), "longitude_deg": float(latlon[i, 1]),
                    "east_m": float(enu[i, 0]), "north_m": float(enu[i, 1]),
                    "covariance_m2": cov[i].astype(float).tolist(),
                    "ellipse_1sigma": ellipse_axes(cov[i].astype(np.float64), 1.0),
                    "ellipse_2sigma": ellipse_axes(cov[i].astype(np.float64), 2.0),
                    "receivers_used": used,
                }
                out["search_regions"] = [{"level": float(lv), "area_km2": float(a)}
                                         for lv, a in zip(levels, area_km2[i])]
                out["modes"] = _modes(graph_out["mode_weight"][i], graph_out["mode_enu_m"][i], graph_out["mode_covariance_m2"][i],
                                      graph_out["mode_latlon"][i])
                out["elsewhere_probability"] = max(0.0, 1.0 - sum(m["weight"] for m in out["modes"]))
                if not used:
                    out["warning"] = "no usable receiver: the position is the model's prior"
                if has_truth[row]:
                    te, tn = truth_enu[row]
                    out["error_m"] = float(math.hypot(enu[i, 0] - te, enu[i, 1] - tn))
                    out["truth_in_region"] = {level_key(lv): bool(c) for lv, c in zip(levels, covered[i])}
                if geojson:
                    out[GEOJSON_KEY] = session_features(out["session_id"], p64[i], threshold[i], levels, area_km2[i],
                                                        out["modes"], latlon[i], grid, origin, GEOJSON_LEVELS)
                results.append(out)
    ignored = [n for n, k in zip(file_rx, known) if not k]
    for r in results:
        if ignored:
            r["receivers_ignored"] = ignored
    return results


def _pct(p: float) -> str:
    return f"{100 * p:.0f}%"


def _km2(a: float) -> str:
    return f"{a:.1f} km²" if a < 10 else f"{a:,.0f} km²"


def printable(text: str) -> str:
    """``text`` with control and format characters (newlines, ESC, bidi overrides...) escaped as
    \\n, \\x1b, \\u202e: a session id from a file can neither break the table nor drive a terminal."""
    import unicodedata

    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
                   for ch in text)


def format_table(results: list[dict]) -> str:
    """One row per session, then two indented lines: its modes (weight, lat,lon; the probability
    elsewhere) and its search regions (level, area; the smallest one holding the truth, if known)."""
    lines = [f"{'session':<24} {'lat':>9} {'lon':>9} {'1σ major×minor km':>18} {'az°':>5} {'rx':>3} {'error km':>9}"]
    for r in results:
        e = r["ellipse_1sigma"]
        err = f"{r['error_m'] / 1e3:9.2f}" if "error_m" in r else f"{'-':>9}"
        lines.append(f"{printable(r['session_id'])[:24]:<24} {r['latitude_deg']:9.4f} {r['longitude_deg']:9.4f} "
                     f"{e['semi_major_m'] / 1e3:8.2f}×{e['semi_minor_m'] / 1e3:<9.2f} {e['orientation_deg']:5.0f} "
                     f"{len(r['receivers_used']):>3} {err}")
        if "modes" in r:
            modes = [f"{_pct(m['weight'])} {m['latitude_deg']:.4f},{m['longitude_deg']:.4f}" for m in r["modes"]
                     if m["weight"] >= 0.01]  # the JSON keeps every mode
            lines.append("    modes:   " + " · ".join([*modes, f"elsewhere {_pct(r['elsewhere_probability'])}"]))
        if "search_regions" in r:
            text = "    regions: " + " · ".join(f"{_pct(g['level'])} {_km2(g['area_km2'])}" for g in r["search_regions"])
            if "truth_in_region" in r:
                hit = [g["level"] for g in r["search_regions"] if r["truth_in_region"].get(level_key(g["level"]))]
                text += (f"   truth: in the {_pct(min(hit))} region" if hit
                         else f"   truth: outside the {_pct(r['search_regions'][-1]['level'])} region")
            lines.append(text)
    return "\n".join(lines)
