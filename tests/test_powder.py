"""The real POWDER 462.7 MHz RSS dataset through the production path (issue 7), on a real PostgreSQL.

A few hundred rows of ../shared/datasets/powder-frs-462mhz are imported with `heimdall db
import-powder`, exported with `export_sessions.source: postgres` and the preset
benchmarks/powder.params.yaml, featurised and trained briefly: plumbing and sanity, not the
benchmark (benchmarks/powder.py, docs/results.md).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FAST_EXPORT, REPO_ROOT, tiny_params_dict, train_and_evaluate, write_params
from heimdall.db.connect import Database
from heimdall.db.powder import import_powder, read_receivers, read_samples
from heimdall.errors import HeimdallError
from heimdall.params import load_params
from heimdall.stages import export_onnx, export_sessions, extract_features

pytestmark = pytest.mark.slow

DATASET = REPO_ROOT.parent / "shared" / "datasets" / "powder-frs-462mhz"
CSV, RECEIVERS = DATASET / "single_tx.csv", DATASET / "location_coordinates.json"
PRESET = REPO_ROOT / "benchmarks" / "powder.params.yaml"
EVERY = 14  # every 14th row: 358 samples spread over the campus and the three months

needs_dataset = pytest.mark.skipif(not CSV.exists(), reason=f"POWDER dataset not at {DATASET}")


def _rows() -> tuple[list[str], list[list[str]]]:
    with open(CSV, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    if not CSV.exists():
        pytest.skip(f"POWDER dataset not at {DATASET}")
    header, rows = _rows()
    path = tmp_path_factory.mktemp("powder") / "subset.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows[::EVERY])
    return path


@pytest.fixture(scope="module")
def powder_db(postgres_server, subset):
    url = postgres_server.create_database("powder_" + uuid.uuid4().hex[:8])
    summary = import_powder(subset, RECEIVERS, Database(url), progress=False)
    yield url, summary
    postgres_server.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _expected(path: Path) -> dict:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    fixed = [i for i, h in enumerate(header) if h not in ("timestamp", "tx_x_coord", "tx_y_coord")
             and not h.startswith("bus-")]
    bus = [i for i, h in enumerate(header) if h.endswith("_rss")]
    heard = sum(float(r[i]) != -101 for r in rows for i in fixed)
    return {"rows": len(rows), "fixed": len(fixed), "bus": len(bus), "heard": heard,
            "bus_heard": sum(float(r[i]) != -101 for r in rows for i in bus), "first": rows[0], "header": header}


@needs_dataset
def test_import_maps_rows_onto_the_schema_and_is_idempotent(postgres_server, powder_db, subset):
    url, summary = powder_db
    exp = _expected(subset)
    assert exp["fixed"] == 29 and exp["bus"] == 11
    assert summary["samples"] == summary["sessions_inserted"] == exp["rows"]
    assert summary["measurements"] == summary["measurements_inserted"] == exp["heard"]
    assert summary["stations"] == 29
    assert summary["bus_receivers_skipped"] == 11 and summary["bus_readings_skipped"] == exp["bus_heard"] > 0
    assert summary["readings_not_received"] == exp["rows"] * 29 - exp["heard"]
    dbname = url.rsplit("/", 1)[1]

    def one(sql):
        return postgres_server.execute(sql, dbname=dbname)

    assert one("SELECT count(*) FROM heimdall.websdr_stations") == [(29,)]
    assert one("SELECT approval_status, count(*) FROM heimdall.recording_sessions GROUP BY 1") == [
        ("approved", exp["rows"])]
    # no IQ, no SNR, one frequency, RSS exactly as in the file
    assert one("SELECT count(*) FROM heimdall.measurements WHERE iq_data_location IS NOT NULL "
               "OR snr_db IS NOT NULL OR frequency_hz <> 462700000") == [(0,)]
    first, header = exp["first"], exp["header"]
    got = one("""SELECT to_char(s.session_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), k.latitude, k.longitude,
                        w.name, m.signal_strength_db
                 FROM heimdall.recording_sessions s JOIN heimdall.known_sources k ON k.id = s.known_source_id
                 JOIN heimdall.measurements m ON m.recording_session_id = s.id
                 JOIN heimdall.websdr_stations w ON w.id = m.websdr_station_id
                 WHERE s.session_start = %s::timestamptz""".replace("%s", "'" + first[0] + "+00'"))
    assert {g[0] for g in got} == {first[0]}
    assert got[0][1] == float(first[header.index("tx_x_coord")]) and got[0][2] == float(first[header.index("tx_y_coord")])
    readings = {name: float(first[header.index(name)]) for name in {g[3] for g in got}}
    assert {g[3]: g[4] for g in got} == readings and all(v > -101 for v in readings.values())
    heard = [h for i, h in enumerate(header) if not h.startswith(("bus-", "timestamp", "tx_"))
             and float(first[i]) != -101]
    assert sorted(heard) == sorted(readings)

    again = import_powder(subset, RECEIVERS, Database(url), progress=False)
    assert again["sessions_inserted"] == 0 and again["measurements_inserted"] == 0
    assert one("SELECT count(*) FROM heimdall.measurements") == [(exp["heard"],)]


@needs_dataset
def test_bad_files_fail_with_one_line_naming_the_row(tmp_path):
    header, rows = _rows()
    receivers = read_receivers(RECEIVERS)
    bad = [list(r) for r in rows[:3]]
    bad[1][header.index("tx_x_coord")] = "north"
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *bad])
    with pytest.raises(HeimdallError, match=r"bad\.csv:3: column 'tx_x_coord': not a number"):
        read_samples(path, receivers, None)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([[*header, "mystery"], *[[*r, "1"] for r in rows[:2]]])
    with pytest.raises(HeimdallError, match="column 'mystery' is neither a receiver"):
        read_samples(path, receivers, None)
    (tmp_path / "rx.json").write_text('{"a": [40.7, 200.0]}')
    with pytest.raises(HeimdallError, match="not a latitude/longitude"):
        read_receivers(tmp_path / "rx.json")


def test_import_powder_has_help():
    proc = subprocess.run([sys.executable, "-m", "heimdall", "db", "import-powder", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--receivers" in proc.stdout and "-101" in proc.stdout


@needs_dataset
def test_export_features_train_on_powder(powder_db, tmp_path, monkeypatch):
    url, summary = powder_db
    monkeypatch.setenv("HEIMDALL_DB_URL", url)
    preset = yaml.safe_load(PRESET.read_text())
    # short training: plumbing, not the benchmark
    short = {"train.max_epochs": 3, "model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1}
    d = tiny_params_dict(10, **{**preset, **short})
    params = load_params(write_params(tmp_path / "params.yaml", d))
    sessions, features = tmp_path / "sessions.h5", tmp_path / "features.h5"
    out = export_sessions.run(params, sessions, progress=False)
    assert out["sessions"] == summary["samples"] and out["receivers"] == 29
    assert out["receivers_rss_only"] == summary["measurements"]
    feats = extract_features.run(params, sessions, features, progress=False)
    assert min(feats["split"].values()) > 0

    train_and_evaluate(params, features, tmp_path)
    test = json.loads((tmp_path / "metrics/test.json").read_text())
    assert set(test["baselines"]) == {"knn", "ml_logdistance", "kriged_map"}  # no oracle without a scenario
    assert "crlb_rmse_m" not in test
    from heimdall.data import load_features

    fs = load_features(features)
    te, tr = fs.indices("test"), fs.indices("train")
    centroid = float(np.linalg.norm(fs.target_enu_m[te] - fs.target_enu_m[tr].mean(axis=0), axis=1).mean())
    for key in ("mean_error_m", "median_error_m", "p90_error_m", "coverage_1sigma", "coverage_2sigma", "nll"):
        assert np.isfinite(test[key])
    assert test["mean_error_m"] < 0.8 * centroid, (test["mean_error_m"], centroid)
    assert test["baselines"]["knn"]["mean_error_m"] < centroid
    # the preset's model (misfit: posterior widens the network's prior inside the graph) exports
    # through the parity gate (every test session, ONNX Runtime against PyTorch)
    assert preset["model.misfit"] == "posterior"
    export_onnx.run(tmp_path / "model.ckpt", features, tmp_path / "model.onnx", tmp_path / "metrics/onnx.json",
                    **FAST_EXPORT)
    parity = json.loads((tmp_path / "metrics/onnx.json").read_text())
    assert parity["parity"]["n_sessions"] == len(te), parity
