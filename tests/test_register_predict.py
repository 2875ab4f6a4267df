"""Stage register (MLflow registry, aliases, lineage tags, registry.json + registry.store.json) and
`heimdall predict`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import tiny_params_dict, write_params
from heimdall.errors import HeimdallError
from heimdall.params import load_params
from heimdall.predict import ellipse_axes, predict_sessions
from heimdall.stages import register
from heimdall.tracking import redact_uri


def _test_json(path, median, n_test=10):
    path.write_text(json.dumps({"n_test": n_test, "median_error_m": median, "mean_error_m": 2 * median,
                                "coverage_1sigma": 0.4, "baselines": {"knn": {"median_error_m": 3 * median}}}))
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/registry.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_champion_moves_only_on_improvement(exported, store, tmp_path):
    onnx_path = exported[0]
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict()))
    out = tmp_path / "registry.json"
    runs = [(5000.0, True, "1"), (6000.0, False, "1"), (4000.0, True, "3"), (4000.0, False, "3")]
    for i, (median, promoted, champion) in enumerate(runs, start=1):
        # (n_test varies so that every call is a different registration, see the idempotency test)
        summary = register.run(params, onnx_path, _test_json(tmp_path / "test.json", median, n_test=i), out)
        record = json.loads(out.read_text())  # what the inputs determine
        reg = json.loads(register.store_path(out).read_text())  # what the store decided
        assert record["registration_key"] == reg["registration_key"] and record["onnx_md5"] == reg["tags"]["onnx_md5"]
        assert reg["version"] == str(i) and summary["version"] == str(i)
        assert reg["promoted_to_champion"] is promoted
        assert reg["champion_version"] == champion
        assert "candidate" in reg["aliases"]
        assert ("champion" in reg["aliases"]) is promoted
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias("heimdall-localization", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("heimdall-localization", "candidate").version) == "4"
    mv = client.get_model_version("heimdall-localization", "3")
    assert float(mv.tags["test.median_error_m"]) == 4000.0
    assert mv.tags["onnx_md5"] == reg["tags"]["onnx_md5"] and len(mv.tags["onnx_md5"]) == 32
    assert "git_commit" in mv.tags and "features_md5" in mv.tags


def test_champion_loads_in_a_fresh_process_and_predicts_like_the_file(exported, trained, store, tmp_path):
    onnx_path = exported[0]
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict()))
    register.run(params, onnx_path, _test_json(tmp_path / "test.json", 1234.0), tmp_path / "registry.json")
    _, features = trained
    from heimdall.data import load_features

    fs = load_features(features)
    idx = fs.indices("test")[:16]
    names = ("logmel", "rss_dbm", "snr_db", "present", "has_iq", "receiver_id")
    feeds = {n: t.numpy() for n, t in zip(names, fs.model_inputs(idx))}
    np.savez(tmp_path / "feeds.npz", **feeds)
    code = (
        "import sys, numpy as np, mlflow, onnxruntime as ort\n"
        "m = mlflow.onnx.load_model('models:/heimdall-localization@champion')\n"
        "s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n"
        "f = dict(np.load(sys.argv[1]))\n"
        "np.savez(sys.argv[2], *s.run(None, f))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")], check=True)
    got = np.load(tmp_path / "out.npz")
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[f"arr_{i}"], w)


def test_rerun_registers_exactly_once(exported, store, tmp_path):
    """Same model + same metrics (a rerun after a failure part-way): the version is reused."""
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict()))
    metrics = _test_json(tmp_path / "test.json", 777.0)
    first = register.run(params, exported[0], metrics, tmp_path / "r1.json")
    second = register.run(params, exported[0], metrics, tmp_path / "r2.json")
    assert first["version"] == second["version"] == "1"
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient(store).search_model_versions("name = 'heimdall-localization'")) == 1


def test_unreachable_mlflow_server_fails_clearly(exported, tmp_path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://heimdall:S3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict()))
    t0 = time.monotonic()
    with pytest.raises(HeimdallError) as err:
        register.run(params, exported[0], _test_json(tmp_path / "test.json", 1.0), tmp_path / "registry.json")
    assert time.monotonic() - t0 < 60
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "S3cret" not in msg and "\n" not in msg
    assert not (tmp_path / "registry.json").exists()
    assert not register.store_path(tmp_path / "registry.json").exists()


def test_registry_json_has_no_secrets(exported, tmp_path, monkeypatch):
    # SQLAlchemy accepts credentials in a sqlite URI's netloc? No: use a URI with a password query
    # value that MLflow ignores for sqlite, and credentials in the tracking URI itself.
    sentinel = "S3ntinel-Pa55word"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/reg.db")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", sentinel)
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict()))
    register.run(params, exported[0], _test_json(tmp_path / "test.json", 1.0), tmp_path / "registry.json")
    assert sentinel not in (tmp_path / "registry.json").read_text()
    assert sentinel not in register.store_path(tmp_path / "registry.json").read_text()
    assert redact_uri(f"postgresql+psycopg2://heimdall:{sentinel}@db:5432/mlflow") == \
        "postgresql+psycopg2://db:5432/mlflow"
    assert sentinel not in redact_uri(f"http://h:5000/?token={sentinel}")


def test_register_errors_are_clear(tmp_path, store):
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params_dict()))
    with pytest.raises(HeimdallError, match="ONNX model not found"):
        register.run(params, tmp_path / "missing.onnx", tmp_path / "t.json", tmp_path / "r.json")
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(HeimdallError, match="median_error_m"):
        register.run(params, tmp_path / "m.onnx", tmp_path / "t.json", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_ellipse_geometry():
    # variance 9 km² east, 1 km² north -> major axis east (azimuth 90°), semi-axes 3 km / 1 km
    e = ellipse_axes(np.diag([9e6, 1e6]), 1.0)
    assert e["semi_major_m"] == pytest.approx(3000) and e["semi_minor_m"] == pytest.approx(1000)
    assert e["orientation_deg"] == pytest.approx(90)
    c = np.array([[5e6, 4e6], [4e6, 5e6]])  # major axis along north-east
    assert ellipse_axes(c, 2.0)["orientation_deg"] == pytest.approx(45)
    assert ellipse_axes(c, 2.0)["semi_major_m"] == pytest.approx(2 * 3000)


def test_predict_positions_fall_inside_their_3sigma_ellipse(exported, tiny_campaign):
    from heimdall.data import load_features

    _, sessions, features = tiny_campaign
    fs = load_features(features)
    results = predict_sessions(sessions, exported[0])
    assert [r["session_id"] for r in results] == list(fs.session_id)
    d2 = []
    for r, target in zip(results, fs.target_enu_m):
        cov = np.asarray(r["covariance_m2"])
        assert np.isfinite(cov).all() and np.linalg.eigvalsh(cov).min() > 0
        assert -90 <= r["latitude_deg"] <= 90 and r["receivers_used"]
        err = np.array([r["east_m"], r["north_m"]]) - target
        assert r["error_m"] == pytest.approx(float(np.hypot(*err)), rel=1e-6, abs=0.5)
        d2.append(float(err @ np.linalg.solve(cov, err)))
    assert np.mean(np.array(d2) <= 9.0) > 0.75  # inside the 3σ ellipse (ideal 98.9 %)


def test_predict_matches_the_features_file(exported, tiny_campaign):
    """predict recomputes features from sessions.h5; the result equals the model run on features.h5."""
    from heimdall.data import load_features

    _, sessions, features = tiny_campaign
    fs = load_features(features)
    ids = [str(fs.session_id[i]) for i in (5, 0, 17)]  # any order
    results = predict_sessions(sessions, exported[0], ids)
    assert [r["session_id"] for r in results] == ids
    names = ("logmel", "rss_dbm", "snr_db", "present", "has_iq", "receiver_id")
    feeds = {n: t.numpy() for n, t in zip(names, fs.model_inputs(np.array([5, 0, 17])))}
    enu, _, latlon, *_ = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"]).run(None, feeds)
    for r, e, ll in zip(results, enu, latlon):
        assert r["east_m"] == pytest.approx(float(e[0]), abs=1.0)
        assert r["latitude_deg"] == pytest.approx(float(ll[0]), abs=1e-5)
    with pytest.raises(HeimdallError, match="not found"):
        predict_sessions(sessions, exported[0], ["no-such-session"])


def test_predict_cli(exported, tiny_campaign):
    _, sessions, _ = tiny_campaign
    from heimdall.data import load_features

    sid = str(load_features(tiny_campaign[2]).session_id[3])
    out = subprocess.run([sys.executable, "-m", "heimdall", "predict", "--sessions", str(sessions), "--model",
                          str(exported[0]), "--session-id", sid, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["session_id"] == sid and set(r["ellipse_1sigma"]) == {"semi_major_m", "semi_minor_m", "orientation_deg"}
    bad = subprocess.run([sys.executable, "-m", "heimdall", "predict", "--sessions", str(sessions), "--model",
                          str(sessions)], capture_output=True, text=True)
    assert bad.returncode == 1 and "not a loadable ONNX model" in bad.stderr and "Traceback" not in bad.stderr


def test_predict_refuses_malformed_and_oversized_inputs(exported, tiny_campaign, tmp_path, monkeypatch):
    import heimdall.predict as predict

    _, sessions, _ = tiny_campaign
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(HeimdallError) as err:
        predict_sessions(garbage, exported[0])
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(sessions.read_bytes()[:50_000])
    with pytest.raises(HeimdallError):
        predict_sessions(truncated, exported[0])
    monkeypatch.setattr(predict, "MAX_SESSIONS", 5)
    with pytest.raises(HeimdallError, match="at most 5"):
        predict_sessions(sessions, exported[0])
    monkeypatch.setattr(predict, "MAX_IQ_SAMPLES", 100)
    with pytest.raises(HeimdallError, match="exceeds the limit"):
        predict_sessions(sessions, exported[0], ["whatever"])


# ---- search regions, modes, --geojson -----------------------------------------------------------

def _graph_outputs(onnx_path, fs, idx) -> dict:
    """The exported graph run directly on features.h5's inputs of sessions ``idx`` (one batch)."""
    from heimdall.contracts import OUTPUT_NAMES

    names = ("logmel", "rss_dbm", "snr_db", "present", "has_iq", "receiver_id")
    feeds = {n: t.numpy() for n, t in zip(names, fs.model_inputs(np.asarray(idx)))}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds)))


@pytest.fixture(scope="module")
def predicted(exported, tiny_campaign):
    """predict_sessions on every session of the tiny campaign (with GeoJSON features), and the metadata."""
    from heimdall.export.runtime import load_onnx_session

    _, sessions, _ = tiny_campaign
    _, meta = load_onnx_session(exported[0])
    return predict_sessions(sessions, exported[0], geojson=True), meta


def test_predict_search_regions_are_the_graphs_hpd_regions(exported, tiny_campaign, predicted):
    from heimdall.data import load_features
    from heimdall.regions import hpd_thresholds

    results, meta = predicted
    levels, mass = meta["regions"]["levels"], meta["regions"]["mass"]
    fs = load_features(tiny_campaign[2])
    idx = np.arange(0, len(results), 7)
    # the same sessions, in one batch, through predict's own path (sessions.h5 -> features -> graph)
    mine = predict_sessions(tiny_campaign[1], exported[0], [str(fs.session_id[i]) for i in idx])
    prob = _graph_outputs(exported[0], fs, idx)["cell_probability"]
    assert prob.shape == (len(idx), meta["grid"]["n_east"] * meta["grid"]["n_north"])
    _, n_cells = hpd_thresholds(prob, mass)
    want = n_cells * meta["grid"]["spacing_m"] ** 2 / 1e6
    for r, w in zip(mine, want):
        assert [g["level"] for g in r["search_regions"]] == pytest.approx(levels)
        assert [g["area_km2"] for g in r["search_regions"]] == pytest.approx(w.tolist(), rel=1e-12)
    for r in results:  # nested regions: area grows with the level, and stays within the grid
        areas = [g["area_km2"] for g in r["search_regions"]]
        assert all(0 < a <= b for a, b in itertools.pairwise(areas))
        assert areas[-1] <= prob.shape[1] * meta["grid"]["spacing_m"] ** 2 / 1e6 * (1 + 1e-12)


def test_predict_modes_are_sorted_weighted_and_geolocated(predicted):
    from heimdall.search_map import ground_lonlat

    results, meta = predicted
    o = meta["origin"]
    origin = (o["latitude_deg"], o["longitude_deg"], o["altitude_m"])
    for r in results:
        modes = r["modes"]
        weights = [m["weight"] for m in modes]
        assert 1 <= len(modes) <= meta["regions"]["n_modes"]
        assert weights == sorted(weights, reverse=True) and all(0 < w <= 1 for w in weights)
        assert sum(weights) <= 1 + 1e-5
        assert r["elsewhere_probability"] == pytest.approx(max(0.0, 1 - sum(weights)), abs=1e-12)
        assert 0 <= r["elsewhere_probability"] <= 1
        for m in modes:
            assert np.linalg.eigvalsh(np.asarray(m["covariance_m2"])).min() > 0
            assert m["ellipse_1sigma"] == pytest.approx(ellipse_axes(np.asarray(m["covariance_m2"]), 1.0))
        top = modes[0]  # the graph's lat/lon = its ENU mean carried to the ellipsoid by heimdall.geo
        (lon, lat), = ground_lonlat(np.array([top["east_m"]]), np.array([top["north_m"]]), origin)
        assert top["latitude_deg"] == pytest.approx(lat, abs=1e-6)
        assert top["longitude_deg"] == pytest.approx(lon, abs=1e-6)


def test_predict_truth_in_region_matches_the_test_metrics_cells(exported, tiny_campaign, predicted):
    """truth_in_region = the evaluate stage's HPD coverage (hpd_regions; the truth's cell from
    features.h5's targets) of the graph's cell_probability."""
    from heimdall.data import load_features
    from heimdall.regions import grid_cell_index, hpd_regions, level_key

    results, meta = predicted
    fs = load_features(tiny_campaign[2])
    g = meta["grid"]
    cells = grid_cell_index(fs.target_enu_m, g["east0_m"], g["north0_m"], g["spacing_m"], g["n_east"], g["n_north"])
    keys = [level_key(p) for p in meta["regions"]["levels"]]
    got = np.array([[r["truth_in_region"][k] for k in keys] for r in results])
    want = np.concatenate([
        hpd_regions(_graph_outputs(exported[0], fs, np.arange(s, min(s + 64, len(results))))["cell_probability"],
                    cells[s:s + 64], meta["regions"]["mass"])[1]
        for s in range(0, len(results), 64)])  # predict's batches
    np.testing.assert_array_equal(got, want)
    coverage = got.mean(0)
    assert all(a <= b for a, b in itertools.pairwise(coverage))  # nested regions
    # measured: 0.99 at 90 % on the one-epoch tiny model (all 240 sessions)
    assert coverage[keys.index("p90")] > 0.75


def _check_session_features(features: list[dict], result: dict) -> None:
    """One session's GeoJSON Features: valid 90 % ⊇ 50 % region polygons, its modes, its estimate."""
    from shapely.geometry import shape

    sid = result["session_id"]
    assert all(f["type"] == "Feature" and f["properties"]["session_id"] == sid for f in features)
    regions = {f["properties"]["level"]: f for f in features if f["properties"]["kind"] == "search_region"}
    assert sorted(regions) == [0.5, 0.9]
    areas = {g["level"]: g["area_km2"] for g in result["search_regions"]}
    polygons = {}
    for level, f in regions.items():
        geom = shape(f["geometry"])
        assert geom.geom_type in ("Polygon", "MultiPolygon") and geom.is_valid and not geom.is_empty
        assert f["properties"]["area_km2"] == pytest.approx(areas[level])
        polygons[level] = geom
    assert polygons[0.9].contains(polygons[0.5])
    modes = sorted((f for f in features if f["properties"]["kind"] == "mode"), key=lambda f: f["properties"]["rank"])
    assert [f["properties"]["weight"] for f in modes] == pytest.approx([m["weight"] for m in result["modes"]])
    for f, m in zip(modes, result["modes"]):  # GeoJSON points are lon, lat
        assert f["geometry"]["coordinates"] == pytest.approx([m["longitude_deg"], m["latitude_deg"]], abs=1e-7)
    estimate, = (f for f in features if f["properties"]["kind"] == "estimate")
    assert estimate["geometry"]["coordinates"] == pytest.approx([result["longitude_deg"], result["latitude_deg"]],
                                                                abs=1e-7)


def test_predict_geojson_features_per_session(predicted):
    from heimdall.predict import GEOJSON_KEY

    results, _ = predicted
    for r in results[::10]:
        _check_session_features(r[GEOJSON_KEY], r)


def test_predict_cli_table_and_geojson(exported, tiny_campaign, tmp_path):
    from heimdall.data import load_features

    _, sessions, features = tiny_campaign
    ids = [str(s) for s in load_features(features).session_id[[2, 9, 30]]]
    out_file = tmp_path / "map.geojson"
    cmd = [sys.executable, "-m", "heimdall", "predict", "--sessions", str(sessions), "--model", str(exported[0]),
           "--geojson", str(out_file)]
    for sid in ids:
        cmd += ["--session-id", sid]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 + 3 * len(ids) and all(len(line) <= 120 for line in lines)
    assert [line.split()[0] for line in lines[1::3]] == [sid[:24] for sid in ids]
    assert all(line.startswith("    modes:   ") and "elsewhere" in line for line in lines[2::3])
    assert all(line.startswith("    regions: 50% ") and "90% " in line and "truth: " in line for line in lines[3::3])
    assert '"truth_in_90pct_region"' in out.stderr
    doc = json.loads(out_file.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    assert not list(tmp_path.glob(".map.geojson.tmp-*"))  # written atomically, nothing left beside it
    want = {r["session_id"]: r for r in predict_sessions(sessions, exported[0], ids)}
    by_session = {}
    for f in doc["features"]:
        by_session.setdefault(f["properties"]["session_id"], []).append(f)
    assert list(by_session) == ids  # one feature set per session, in the requested order
    for sid, feats in by_session.items():
        _check_session_features(feats, want[sid])

    js = subprocess.run([sys.executable, "-m", "heimdall", "predict", "--sessions", str(sessions), "--model",
                         str(exported[0]), "--session-id", ids[0], "--json", "--geojson", str(out_file)],
                        capture_output=True, text=True, check=False)
    assert js.returncode == 0, js.stderr
    r = json.loads(js.stdout)
    assert not any(k.startswith("_") for k in r)
    assert {"search_regions", "modes", "elsewhere_probability", "truth_in_region"} <= r.keys()
    assert r["truth_in_region"] == want[ids[0]]["truth_in_region"]

    bad = subprocess.run([sys.executable, "-m", "heimdall", "predict", "--sessions", str(sessions), "--model",
                          str(exported[0]), "--geojson", str(tmp_path / "no-such-dir" / "map.geojson")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "no-such-dir").exists()


def test_predict_refuses_a_model_without_region_metadata(exported, tiny_campaign, tmp_path):
    import onnx

    proto = onnx.load(str(exported[0]))
    kept = [p for p in proto.metadata_props if p.key not in ("grid", "regions")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "no-regions.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(HeimdallError, match="re-export the model") as err:
        predict_sessions(tiny_campaign[1], old)
    assert "\n" not in str(err.value)


# ---- issue 20: tampered metadata values, control characters in session ids -----------------------

def _tampered(exported_onnx, tmp_path, key: str, edit) -> object:
    """A copy of the model whose metadata JSON ``key`` is replaced by ``edit(decoded value)`` (raw JSON
    text if ``edit`` returns a str)."""
    import onnx

    proto = onnx.load(str(exported_onnx))
    for prop in proto.metadata_props:
        if prop.key == key:
            new = edit(json.loads(prop.value))
            prop.value = new if isinstance(new, str) else json.dumps(new)
    out = tmp_path / f"tampered-{key}.onnx"
    onnx.save(proto, str(out))
    return out


def _set(d: dict, k: str, v) -> dict:
    return {**d, k: v}


TAMPERED = [
    ("origin", lambda o: json.dumps(o).replace(str(o["latitude_deg"]), "NaN", 1), "origin.latitude_deg"),
    ("origin", lambda o: _set(o, "latitude_deg", 500.0), "origin.latitude_deg"),
    ("origin", lambda o: _set(o, "longitude_deg", "east"), "origin.longitude_deg"),
    ("origin", lambda o: _set(o, "altitude_m", float("inf")), "origin.altitude_m"),
    ("origin", lambda o: [1, 2], "no origin"),
    ("grid", lambda g: _set(g, "spacing_m", 0), "grid.spacing_m"),
    ("grid", lambda g: _set(g, "spacing_m", float("nan")), "grid.spacing_m"),
    ("grid", lambda g: _set(g, "n_east", "7"), "grid.n_east"),
    ("grid", lambda g: _set(g, "n_north", -3), "grid.n_north"),
    ("grid", lambda g: _set(g, "n_east", 1.5), "grid.n_east"),
    ("grid", lambda g: _set(g, "east0_m", None), "grid.east0_m"),
    ("regions", lambda r: _set(r, "levels", [float("nan"), *r["levels"][1:]]), "regions.levels[0]"),
    ("regions", lambda r: _set(r, "levels", [*r["levels"][:-1], 2.0]), "regions.levels"),
    ("regions", lambda r: _set(r, "levels", list(reversed(r["levels"]))), "not increasing"),
    ("regions", lambda r: _set(r, "mass", [-1.0, *r["mass"][1:]]), "regions.mass[0]"),
    ("regions", lambda r: _set(r, "mass", "all"), "re-export"),
    ("frontend", lambda f: _set(f, "n_fft", "256"), "frontend.n_fft"),
    ("frontend", lambda f: _set(f, "n_mels", 0), "frontend.n_mels"),
    ("frontend", lambda f: _set(f, "sample_rate_hz", float("inf")), "frontend.sample_rate_hz"),
    ("receivers", lambda r: [r[0], *r[1:-1], {**r[-1], "name": r[0]["name"]}], "twice"),
    ("receivers", lambda r: {"name": "x"}, "receivers"),
]


@pytest.mark.parametrize(("key", "edit", "expected"), TAMPERED, ids=[f"{t[0]}-{i}" for i, t in enumerate(TAMPERED)])
def test_predict_refuses_tampered_metadata_values(exported, tiny_campaign, tmp_path, key, edit, expected):
    """A metadata value that is not what the exporter writes (NaN origin, zero spacing, text for a count,
    levels out of (0, 1), duplicate receiver names): one line naming the key, never a traceback or NaN."""
    model = _tampered(exported[0], tmp_path, key, edit)
    with pytest.raises(HeimdallError) as err:
        predict_sessions(tiny_campaign[1], model)
    assert expected in str(err.value) and str(model) in str(err.value) and "\n" not in str(err.value)


def test_predict_cli_nan_origin_is_an_error_not_invalid_json(exported, tiny_campaign, tmp_path):
    model = _tampered(exported[0], tmp_path, "origin",
                      lambda o: json.dumps(o).replace(str(o["latitude_deg"]), "NaN", 1))
    out = subprocess.run([sys.executable, "-m", "heimdall", "predict", "--sessions", str(tiny_campaign[1]),
                          "--model", str(model), "--json"], capture_output=True, text=True)
    assert out.returncode == 1 and "NaN" not in out.stdout and "Traceback" not in out.stderr
    assert "origin.latitude_deg" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_predict_escapes_control_characters_in_session_ids(exported, tiny_campaign, tmp_path):
    """A session id holding ESC sequences, a newline, BEL or a bidi override: escaped in the table (one
    line per session, no raw control byte reaches the terminal), exact and valid in --json."""
    import shutil

    import h5py

    sessions = tmp_path / "s.h5"
    shutil.copy(tiny_campaign[1], sessions)
    hostile = "evil\x1b[2J\nFAKE ROW\x07\u202edi\u2028x"  # (HDF5 strings cannot hold NUL)
    with h5py.File(sessions, "r+") as f:
        ids = f["sessions/session_id"].asstr()[()].astype(object)
        ids[0] = hostile
        f["sessions/session_id"][...] = ids
    base = [sys.executable, "-m", "heimdall", "predict", "--sessions", str(sessions), "--model", str(exported[0])]
    table = subprocess.run([*base, "--session-id", hostile], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert not any(ch in table.stdout for ch in "\x1b\x07\u202e\u2028")
    lines = table.stdout.splitlines()
    assert lines[1].startswith("evil\\x1b[2J\\nFAKE") and not any(line.startswith("FAKE") for line in lines)
    js = subprocess.run([*base, "--session-id", hostile, "--json"], capture_output=True, text=True)
    assert js.returncode == 0, js.stderr
    assert not any(ord(ch) < 32 and ch != "\n" for ch in js.stdout) and json.loads(js.stdout)["session_id"] == hostile


def _race_register(params, onnx_path, metrics, outs, uri):
    """Start one `heimdall register` per output together on one store; -> their CompletedProcess-like results."""
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, "-m", "heimdall", "register", "--params", str(params), "--model",
                               str(onnx_path), "--test-metrics", str(metrics), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for out in outs]
    return [(p.wait(timeout=600), p.stderr.read()) for p in procs]


def test_concurrent_registrations_register_once_with_consistent_aliases(exported, tmp_path):
    """Two `heimdall register` at once on one (fresh, then existing) sqlite store: both succeed, one version per
    registration key, and both records point at the version the aliases name."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/race.db"
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    for round_, median in enumerate((900.0, 800.0)):  # a fresh store, then one with a champion
        metrics = _test_json(tmp_path / f"test{round_}.json", median)
        outs = [tmp_path / f"r{round_}-{i}" / "registry.json" for i in range(2)]
        for rc, err in _race_register(params, exported[0], metrics, outs, uri):
            assert rc == 0 and "Traceback" not in err, err[-3000:]
        records = [json.loads(o.read_text()) for o in outs]
        stores = [json.loads(register.store_path(o).read_text()) for o in outs]
        assert records[0] == records[1]
        key = records[0]["registration_key"]
        client = MlflowClient(uri)
        versions = client.search_model_versions(f"name = 'heimdall-localization' and tags.registration_key = '{key}'")
        assert len(versions) == 1, [v.version for v in versions]
        version = str(versions[0].version)
        assert {s["version"] for s in stores} == {version}
        assert str(client.get_model_version_by_alias("heimdall-localization", "candidate").version) == version
        assert str(client.get_model_version_by_alias("heimdall-localization", "champion").version) == version
        assert all("candidate" in s["aliases"] and "champion" in s["aliases"] for s in stores)
    assert len(MlflowClient(uri).search_model_versions("name = 'heimdall-localization'")) == 2
