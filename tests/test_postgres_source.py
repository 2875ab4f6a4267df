"""export_sessions.source: postgres against a real PostgreSQL 15 cluster and a real S3 server.

One simulated campaign is seeded once (`heimdall db seed --from-simulation` path) into a template
database; every test works on its own copy (CREATE DATABASE ... TEMPLATE), so tests can break the
data in their own way. Seeded IQ objects are never modified: tests that need bad objects write new
keys and point a measurement at them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import tiny_params_dict, write_params, copy_pipeline
from heimdall.db import migrate
from heimdall.db.connect import Database
from heimdall.db.seed import seed_from_simulation
from heimdall.db.source import REQUIRED_COLUMNS
from heimdall.errors import HeimdallError
from heimdall.iqstore import encode_npy
from heimdall.params import load_params
from heimdall.stages import export_sessions, extract_features

pytestmark = pytest.mark.slow

N_SESSIONS = 30
TEMPLATE_DB = "heimdall_seeded"
S3_ENV = ("HEIMDALL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _params(tmp_path: Path, source: str = "postgres", name: str = "params.yaml", **postgres):
    d = tiny_params_dict(N_SESSIONS, **{"export_sessions.source": source})
    if postgres:
        d["export_sessions"]["postgres"] = postgres
    return load_params(write_params(tmp_path / name, d))


@pytest.fixture(scope="session")
def seeded(postgres_server, s3_server, tmp_path_factory):
    """Template database + S3 bucket holding a 30-session simulated campaign; its synthetic export."""
    tmp = tmp_path_factory.mktemp("seeded")
    url = postgres_server.create_database(TEMPLATE_DB)
    params = _params(tmp, source="synthetic")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        summary = seed_from_simulation(params, Database(url), progress=False)
    assert summary["sessions"] == N_SESSIONS and summary["iq_objects"] == summary["measurements"] > 0
    sessions, features = tmp / "synthetic_sessions.h5", tmp / "synthetic_features.h5"
    export_sessions.run(params, sessions, progress=False)
    extract_features.run(params, sessions, features, progress=False)
    return {"sessions": sessions, "features": features, "summary": summary}


@pytest.fixture
def db(postgres_server, s3_server, seeded, monkeypatch, request):
    """A private copy of the seeded database; HEIMDALL_DB_URL and the S3 variables point at it."""
    name = "t_" + uuid.uuid4().hex[:12]
    url = postgres_server.create_database(name, template=TEMPLATE_DB)
    monkeypatch.setenv("HEIMDALL_DB_URL", url)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)

    def sql(statement: str, args=None):
        return postgres_server.execute(statement, dbname=name, args=args)

    yield sql
    postgres_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        out["attrs"] = dict(f.attrs)
        return out


def _str(a) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in a]


def _session_ids(sql) -> list[str]:
    return [r[0] for r in sql("SELECT id::text FROM heimdall.recording_sessions ORDER BY session_start, id")]


# ---- db init / seed ---------------------------------------------------------------------------


def test_db_init_is_idempotent_and_versioned(postgres_server):
    url = postgres_server.create_database("init_" + uuid.uuid4().hex[:8])
    first = migrate.init(Database(url))
    assert first["applied"] == [v for v, _ in migrate.migrations()] and first["applied"]
    assert migrate.init(Database(url))["applied"] == []  # second run: nothing to do
    dbname = url.rsplit("/", 1)[1]
    cols = postgres_server.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'heimdall'", dbname=dbname)
    have = {(t, c) for t, c in cols}
    for table, columns in REQUIRED_COLUMNS.items():
        assert {(table, c) for c in columns} <= have
    for table, column in [("websdr_stations", "is_active"), ("recording_sessions", "session_end"),
                          ("measurements", "iq_samples_count"), ("known_sources", "error_margin_meters")]:
        assert (table, column) in have
    versions = postgres_server.execute("SELECT version FROM heimdall.schema_migrations", dbname=dbname)
    assert [v for (v,) in versions] == first["applied"]


def test_db_verbs_have_help():
    for verb in (["db"], ["db", "init"], ["db", "seed"]):
        proc = subprocess.run([sys.executable, "-m", "heimdall", *verb, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: heimdall db" in proc.stdout


def test_postgres_params_are_validated(tmp_path, capsys):
    from heimdall.cli import main

    d = tiny_params_dict(N_SESSIONS, **{"export_sessions.source": "postgres"})
    d["export_sessions"]["postgres"] = {"start_time": "2026-02-01", "end_time": "2026-01-01", "iq_errors": "x"}
    assert main(["validate", "--params", str(write_params(tmp_path / "p.yaml", d))]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "export_sessions.postgres.iq_errors" in err


# ---- the end-to-end equivalence with the synthetic source --------------------------------------


def test_postgres_export_matches_synthetic_and_is_deterministic(db, seeded, tmp_path):
    params = _params(tmp_path)
    out = tmp_path / "sessions.h5"
    summary = export_sessions.run(params, out, progress=False)
    assert summary["sessions"] == N_SESSIONS and summary["iq_recordings"] == seeded["summary"]["iq_objects"]
    pg, syn = _read(out), _read(seeded["sessions"])
    assert pg["attrs"]["source"] == "postgres" and "scenario_json" not in pg["attrs"]

    # receivers come back ordered by name; map them onto the simulator's order
    names = _str(pg["receivers/name"])
    assert names == sorted(_str(syn["receivers/name"]))
    perm = [_str(syn["receivers/name"]).index(n) for n in names]
    for k in ("latitude_deg", "longitude_deg", "altitude_m"):
        np.testing.assert_array_equal(pg[f"receivers/{k}"], syn[f"receivers/{k}"][perm])
    assert _str(pg["sessions/session_id"]) == _str(syn["sessions/session_id"])
    np.testing.assert_allclose(pg["sessions/start_time_unix_s"], syn["sessions/start_time_unix_s"], atol=1e-6, rtol=0)
    for k in ("frequency_hz", "tx_latitude_deg", "tx_longitude_deg", "tx_power_dbm"):
        np.testing.assert_array_equal(pg[f"sessions/{k}"], syn[f"sessions/{k}"])
    for k in ("present", "rss_dbm", "snr_db", "has_iq", "iq"):
        np.testing.assert_array_equal(pg[f"measurements/{k}"], syn[f"measurements/{k}"][:, perm])
    np.testing.assert_allclose(pg["measurements/iq_scale"], syn["measurements/iq_scale"][:, perm], rtol=1e-6)

    # downstream: the same features (receiver axis permuted), within float tolerance
    feats = tmp_path / "features.h5"
    extract_features.run(params, out, feats, progress=False)
    fp, fs = _read(feats), _read(seeded["features"])
    for k in ("present", "has_iq", "rss_dbm", "snr_db"):
        np.testing.assert_array_equal(fp[f"features/{k}"], fs[f"features/{k}"][:, perm])
    np.testing.assert_allclose(fp["features/logmel_db"], fs["features/logmel_db"][:, perm], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(fp["sessions/split"], fs["sessions/split"])
    np.testing.assert_allclose(fp["sessions/target_enu_m"], fs["sessions/target_enu_m"], atol=1e-6)
    for k in ("logmel_mean_db", "logmel_std_db", "rss_mean_dbm", "rss_std_db", "target_mean_m"):
        np.testing.assert_allclose(fp[f"normalization/{k}"], fs[f"normalization/{k}"], rtol=1e-5, atol=1e-4)

    # unchanged database -> byte-identical file (DVC then skips everything downstream)
    again = tmp_path / "again.h5"
    export_sessions.run(params, again, progress=False)
    assert again.read_bytes() == out.read_bytes()


# ---- acceptance: what is excluded, what is defaulted -------------------------------------------


def test_exclusions_defaults_and_rss_only_sessions(db, tmp_path):
    ids = _session_ids(db)
    db("UPDATE heimdall.recording_sessions SET approval_status = 'pending' WHERE id = %s", (ids[0],))
    db("UPDATE heimdall.recording_sessions SET approval_status = 'rejected' WHERE id = %s", (ids[1],))
    db("""UPDATE heimdall.known_sources SET latitude = NULL, longitude = NULL
          WHERE id = (SELECT known_source_id FROM heimdall.recording_sessions WHERE id = %s)""", (ids[2],))
    db("""UPDATE heimdall.measurements SET iq_data_location = NULL, iq_data_format = NULL,
          iq_sample_rate = NULL, iq_samples_count = NULL WHERE recording_session_id = %s""", (ids[3],))
    (station,) = db("SELECT name FROM heimdall.websdr_stations ORDER BY name LIMIT 1")[0]
    db("UPDATE heimdall.websdr_stations SET altitude_asl = NULL WHERE name = %s", (station,))

    params = _params(tmp_path, default_altitude_m=123.0)
    out = tmp_path / "sessions.h5"
    summary = export_sessions.run(params, out, progress=False)
    assert summary["sessions_by_approval_status"] == {"approved": N_SESSIONS - 2, "pending": 1, "rejected": 1}
    assert summary["excluded_without_ground_truth"] == 1
    assert summary["stations_null_altitude_defaulted"] == 1
    assert summary["sessions"] == N_SESSIONS - 3
    f = _read(out)
    got = _str(f["sessions/session_id"])
    assert got == [i for i in ids if i not in ids[:3]]
    assert f["receivers/altitude_m"][_str(f["receivers/name"]).index(station)] == 123.0

    # the RSS-only session: present receivers with real RSS/SNR, no IQ
    row = got.index(ids[3])
    present = f["measurements/present"][row]
    assert present.any() and not f["measurements/has_iq"][row].any()
    assert np.isfinite(f["measurements/rss_dbm"][row][present]).all()
    assert (f["measurements/iq"][row] == 0).all()
    assert summary["receivers_rss_only"] == int(present.sum())

    feats = tmp_path / "features.h5"
    extract_features.run(params, out, feats, progress=False)
    ff = _read(feats)
    np.testing.assert_array_equal(ff["features/present"][row], present)  # present means "has a measurement"
    assert not ff["features/has_iq"][row].any() and (ff["features/logmel_db"][row] == 0).all()
    np.testing.assert_array_equal(ff["features/rss_dbm"][row][present], f["measurements/rss_dbm"][row][present])
    assert (ff["features/rss_dbm"][row][~present] == 0).all()


def test_rss_only_database_needs_no_s3(db, tmp_path, monkeypatch):
    """The hidden production-like database: measurements without any IQ, and no S3 configured."""
    db("UPDATE heimdall.measurements SET iq_data_location = NULL, iq_data_format = NULL, iq_sample_rate = NULL")
    for k in S3_ENV:
        monkeypatch.delenv(k, raising=False)
    params = _params(tmp_path)
    out = tmp_path / "sessions.h5"
    summary = export_sessions.run(params, out, progress=False)
    f = _read(out)
    assert summary["sessions"] == N_SESSIONS and "iq_recordings" not in summary
    assert f["measurements/present"].any() and not f["measurements/has_iq"].any()
    extract_features.run(params, out, tmp_path / "features.h5", progress=False)
    with h5py.File(tmp_path / "features.h5", "r") as ff:
        assert (ff["features/logmel_db"][()] == 0).all() and ff["features/present"][()].any()


def test_params_filters(db, tmp_path):
    ids = _session_ids(db)
    starts = [r[0] for r in db("SELECT session_start FROM heimdall.recording_sessions ORDER BY session_start, id")]
    params = _params(tmp_path, start_time=starts[5].isoformat(), end_time=starts[20].isoformat())
    out = tmp_path / "window.h5"
    export_sessions.run(params, out, progress=False)
    assert _str(_read(out)["sessions/session_id"]) == ids[5:20]

    db("""UPDATE heimdall.known_sources SET frequency_hz = 433000000, is_validated = false
          WHERE id = (SELECT known_source_id FROM heimdall.recording_sessions WHERE id = %s)""", (ids[7],))
    for name, kw in (("band", {"frequency_min_hz": 144e6, "frequency_max_hz": 146e6}),
                     ("validated", {"validated_sources_only": True})):
        out = tmp_path / f"{name}.h5"
        export_sessions.run(_params(tmp_path, name=f"{name}.yaml", **kw), out, progress=False)
        got = _str(_read(out)["sessions/session_id"])
        assert ids[7] not in got and len(got) == N_SESSIONS - 1, name

    out = tmp_path / "min_rx.h5"
    summary = export_sessions.run(_params(tmp_path, name="min.yaml", min_receivers=7), out, progress=False)
    present = _read(out)["measurements/present"]
    assert (present.sum(axis=1) >= 7).all() and summary["excluded_below_min_receivers"] == N_SESSIONS - len(present)


# ---- faults: one line, no output ----------------------------------------------------------------


def _fails(params, out: Path, *needles: str) -> str:
    with pytest.raises(HeimdallError) as e:
        export_sessions.run(params, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp*"))
    return msg


def test_database_faults(postgres_server, tmp_path, monkeypatch):
    params = _params(tmp_path)
    out = tmp_path / "sessions.h5"
    (port,) = __import__("services").free_ports(1)
    monkeypatch.setenv("HEIMDALL_DB_URL", f"postgresql://heimdall:{postgres_server.password}@127.0.0.1:{port}/x")
    t0 = time.monotonic()
    msg = _fails(params, out, "unreachable after 4 attempts")
    assert time.monotonic() - t0 < 30 and postgres_server.password not in msg

    monkeypatch.setenv("HEIMDALL_DB_URL", postgres_server.url("postgres", password="wrong-password"))
    assert "password" not in _fails(params, out, "authentication failed").replace("password authentication", "")

    monkeypatch.setenv("HEIMDALL_DB_URL", postgres_server.create_database("empty_" + uuid.uuid4().hex[:8]))
    _fails(params, out, "schema 'heimdall' not found")

    monkeypatch.delenv("HEIMDALL_DB_URL")
    _fails(params, out, "HEIMDALL_DB_URL is not set")


def test_missing_and_corrupt_iq_objects_are_skipped_and_counted(db, s3_server, tmp_path, capsys):
    ids = _session_ids(db)
    stations = [r[0] for r in db("SELECT websdr_station_id::text FROM heimdall.measurements "
                                 "WHERE recording_session_id = %s ORDER BY websdr_station_id LIMIT 3", (ids[4],))]
    bad = f"tests/{uuid.uuid4().hex}"
    s3 = s3_server.client()
    s3.put_object(Bucket="heimdall-raw-iq", Key=f"{bad}/corrupt.npy", Body=b"\x93NUMPY garbage")
    s3.put_object(Bucket="heimdall-raw-iq", Key=f"{bad}/short.npy", Body=encode_npy(np.ones(10, np.complex64)))
    for station, key in zip(stations, ("missing.npy", "corrupt.npy", "short.npy")):
        db("UPDATE heimdall.measurements SET iq_data_location = %s WHERE recording_session_id = %s "
           "AND websdr_station_id = %s", (f"{bad}/{key}", ids[4], station))
    out = tmp_path / "sessions.h5"
    summary = export_sessions.run(_params(tmp_path), out, progress=False)
    assert summary["iq_missing_skipped"] == 1 and summary["iq_corrupt_skipped"] == 2
    assert summary["sessions"] == N_SESSIONS
    f = _read(out)
    row = _str(f["sessions/session_id"]).index(ids[4])
    cols = [_str(f["receivers/station_id"]).index(s) for s in stations]
    assert f["measurements/present"][row, cols].all() and not f["measurements/has_iq"][row, cols].any()
    err = capsys.readouterr().err
    assert err.count("warning:") == 3 and "missing.npy: object not found" in err

    _fails(_params(tmp_path, name="strict.yaml", iq_errors="fail"), tmp_path / "strict.h5", bad, "iq_errors: fail")


def test_hostile_iq_locations_and_oversized_objects_are_skipped_and_counted(db, s3_server, tmp_path):
    """One row's IQ location with '..', one in a bucket that does not exist and one object far larger than the
    params imply: each receiver is kept RSS-only and counted; the export goes on (it used to abort, or read the
    object whole)."""
    from heimdall.iqstore import max_object_bytes

    ids = _session_ids(db)
    stations = [r[0] for r in db("SELECT websdr_station_id::text FROM heimdall.measurements "
                                 "WHERE recording_session_id = %s ORDER BY websdr_station_id LIMIT 3", (ids[5],))]
    params = _params(tmp_path)
    big = f"tests/{uuid.uuid4().hex}/long.npy"
    n_big = max_object_bytes(params.export_sessions.n_samples) // 8 + 1000  # a valid recording, far too long
    s3_server.client().put_object(Bucket="heimdall-raw-iq", Key=big, Body=encode_npy(np.ones(n_big, np.complex64)))
    locations = ("sessions/../../etc/passwd.npy", "s3://no-such-bucket-heimdall/a.npy", big)
    for station, location in zip(stations, locations):
        db("UPDATE heimdall.measurements SET iq_data_location = %s WHERE recording_session_id = %s "
           "AND websdr_station_id = %s", (location, ids[5], station))
    out = tmp_path / "sessions.h5"
    summary = export_sessions.run(params, out, progress=False)
    assert summary["sessions"] == N_SESSIONS
    assert summary["iq_bad_location_skipped"] == 1 and summary["iq_unknown_bucket_skipped"] == 1
    assert summary["iq_oversized_skipped"] == 1
    f = _read(out)
    row = _str(f["sessions/session_id"]).index(ids[5])
    cols = [_str(f["receivers/station_id"]).index(s) for s in stations]
    assert f["measurements/present"][row, cols].all() and not f["measurements/has_iq"][row, cols].any()


def test_s3_credential_faults(db, s3_server, tmp_path, monkeypatch):
    params = _params(tmp_path)
    out = tmp_path / "sessions.h5"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    _fails(params, out, "S3 access check in s3://heimdall-raw-iq")

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _fails(params, out, "S3 credentials missing", "AWS_ACCESS_KEY_ID")


def test_session_with_zero_usable_receivers(db, tmp_path):
    ids = _session_ids(db)
    db("UPDATE heimdall.measurements SET signal_strength_db = NULL WHERE recording_session_id = %s", (ids[9],))
    _fails(_params(tmp_path), tmp_path / "sessions.h5", ids[9], "no usable receiver", "empty_sessions")
    out = tmp_path / "skip.h5"
    summary = export_sessions.run(_params(tmp_path, name="skip.yaml", empty_sessions="skip"), out, progress=False)
    assert summary["excluded_without_receivers"] == 1 and ids[9] not in _str(_read(out)["sessions/session_id"])


# ---- secrets --------------------------------------------------------------------------------------


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heimdall", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_no_secret_in_outputs_or_logs(db, postgres_server, s3_server, tmp_path):
    env = dict(os.environ)
    secrets = [postgres_server.password, s3_server.secret_key]
    params = _params(tmp_path)
    logs = [_cli(["db", "init"], env, tmp_path), _cli(["export-sessions", "--no-progress"], env, tmp_path)]
    assert all(p.returncode == 0 for p in logs), [p.stderr for p in logs]
    extract_features.run(params, tmp_path / "data/sessions.h5", tmp_path / "data/features.h5", progress=False)
    # a failing run must not echo the URL either (wrong password: libpq's own message comes back)
    bad = {**env, "HEIMDALL_DB_URL": postgres_server.url(env["HEIMDALL_DB_URL"].rsplit("/", 1)[1], "wr0ng-" + secrets[0])}
    failed = _cli(["export-sessions", "--no-progress", "--out", "other.h5"], bad, tmp_path)
    ours = [ln for ln in failed.stderr.splitlines() if ln.startswith("heimdall ")]
    assert failed.returncode == 1 and len(ours) == 1 and "authentication failed" in ours[0], failed.stderr
    blobs = [p.stdout + p.stderr for p in [*logs, failed]]
    blobs += [(tmp_path / "data" / n).read_bytes().decode("latin-1") for n in ("sessions.h5", "features.h5")]
    for secret in secrets:
        assert not any(secret in b for b in blobs)


# ---- DVC: how the stage reruns when the database changes ---------------------------------------


def test_dvc_refresh_recipe_reruns_downstream_only_when_the_data_changed(db, tmp_path):
    """docs/sources.md: `dvc repro -f -s export_sessions && dvc repro` re-reads the database; the
    export is byte-identical for an unchanged database, so DVC skips everything downstream."""
    import re
    import shutil

    from conftest import REPO_ROOT

    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}

    def _run(args, cwd) -> str:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def _ran(output: str) -> set[str]:
        return set(re.findall(r"Running stage '([^']+)'", output))

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_pipeline(repo)
    _params(repo)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.autostage", "false"]):
        _run(cmd, repo)

    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"export_sessions", "extract_features"}
    assert _ran(_run(["dvc", "repro", "-f", "-s", "export_sessions"], repo)) == {"export_sessions"}
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == set()  # same bytes: nothing downstream

    ids = _session_ids(db)
    db("UPDATE heimdall.recording_sessions SET approval_status = 'rejected' WHERE id = %s", (ids[0],))
    assert _ran(_run(["dvc", "repro", "-f", "-s", "export_sessions"], repo)) == {"export_sessions"}
    assert _ran(_run(["dvc", "repro", "extract_features"], repo)) == {"extract_features"}


def test_database_connections_killed_during_export(db, postgres_server, tmp_path):
    """Every connection of the export's database is terminated while it runs (a server restart as the
    export sees it): a clear error and no output, or a complete export; the next export is identical
    to an undisturbed one."""
    import threading

    params = _params(tmp_path)
    reference = tmp_path / "reference.h5"
    export_sessions.run(params, reference, progress=False)
    dbname = db("SELECT current_database()")[0][0]
    stop = threading.Event()
    killed = []

    def killer():
        while not stop.is_set():
            rows = postgres_server.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                args=(dbname,))
            killed.extend(r for r in rows if r[0])
            time.sleep(0.005)

    out = tmp_path / "sessions.h5"
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        try:
            export_sessions.run(params, out, progress=False)
            outcome = "exported"
        except HeimdallError as e:
            outcome = str(e)
            assert "\n" not in outcome and postgres_server.password not in outcome
    finally:
        stop.set()
        thread.join()
    assert killed, "the killer never found the export's connection"
    if outcome == "exported":
        assert out.read_bytes() == reference.read_bytes()
    else:
        assert not out.exists() and not list(tmp_path.glob(".sessions.h5.tmp-*"))
    export_sessions.run(params, out, progress=False)
    assert out.read_bytes() == reference.read_bytes()


# ---- identities and physical values (issue 20) ---------------------------------------------------


def test_duplicate_station_names_are_refused(db, tmp_path):
    """A database without websdr_stations.name UNIQUE: two stations with one name would be merged into one
    receiver slot downstream -> one line naming both station ids, no sessions.h5."""
    db("ALTER TABLE heimdall.websdr_stations DROP CONSTRAINT websdr_stations_name_key")
    (a, name), (b, _) = db("SELECT id::text, name FROM heimdall.websdr_stations ORDER BY name LIMIT 2")
    db("UPDATE heimdall.websdr_stations SET name = %s WHERE id = %s", (name, b))
    _fails(_params(tmp_path), tmp_path / "sessions.h5", a, b, repr(name), "must be unique")


@pytest.mark.parametrize("value", [None, 0, -145000000])
def test_session_without_a_valid_frequency_is_refused(db, tmp_path, value):
    """NULL (in known_sources and every measurement), 0 or negative frequency: it used to be exported as
    NaN and crash train with a library traceback -> one line naming the session."""
    ids = _session_ids(db)
    db("ALTER TABLE heimdall.measurements ALTER COLUMN frequency_hz DROP NOT NULL")
    db("""UPDATE heimdall.known_sources SET frequency_hz = %s
          WHERE id = (SELECT known_source_id FROM heimdall.recording_sessions WHERE id = %s)""", (value, ids[5]))
    db("UPDATE heimdall.measurements SET frequency_hz = %s WHERE recording_session_id = %s", (value, ids[5]))
    _fails(_params(tmp_path), tmp_path / "sessions.h5", "frequency_hz", "fix or reject")


def test_stations_without_a_position_are_counted(db, tmp_path, capsys):
    """A station with a NULL (or out-of-range) position cannot be placed: its measurements are excluded,
    and the stations and measurements are counted in the summary and a warning — never silently."""
    db("ALTER TABLE heimdall.websdr_stations ALTER COLUMN latitude DROP NOT NULL")
    names = [r[0] for r in db("SELECT name FROM heimdall.websdr_stations ORDER BY name")]
    (n_meas,) = db("""SELECT count(*) FROM heimdall.measurements m JOIN heimdall.websdr_stations w
                      ON w.id = m.websdr_station_id WHERE w.name IN (%s, %s)""", (names[0], names[1]))[0]
    db("UPDATE heimdall.websdr_stations SET latitude = NULL WHERE name = %s", (names[0],))
    db("UPDATE heimdall.websdr_stations SET latitude = 91 WHERE name = %s", (names[1],))
    out = tmp_path / "sessions.h5"
    summary = export_sessions.run(_params(tmp_path), out, progress=False)
    assert summary["stations_without_position_excluded"] == 2
    assert summary["measurements_at_stations_without_position"] == n_meas > 0
    assert "2 station(s) without a valid position" in capsys.readouterr().err
    assert not {names[0], names[1]} & set(_str(_read(out)["receivers/name"]))
