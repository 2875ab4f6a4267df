"""``heimdall db seed --from-simulation``: a simulated campaign written the way production stores it.

The campaign is the synthetic export of the given params (same simulator, same seeds), so a
postgres export of the seeded database can be compared session by session with the synthetic
sessions.h5. Layout: one station row per simulated receiver, one known source per session (the
simulator draws every transmitter position afresh), every session approved, one measurement per
receiver that heard it, and its IQ as a complex64 ``.npy`` in S3 at
``sessions/<session_id>/websdr_<station_id>.npy``. IQ is uploaded before the rows that point at
it are committed; rows use deterministic ids and ``ON CONFLICT DO NOTHING``, so a re-seed is a no-op.
"""

from __future__ import annotations

import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np
import psycopg2
from psycopg2.extras import execute_values
from tqdm import tqdm

from heimdall.db import migrate
from heimdall.db.connect import SCHEMA, Database
from heimdall.iqstore import IQStore, encode_npy, iq_key
from heimdall.params import Params

SEED_NAMESPACE = uuid.UUID("0b8f4f43-6a0e-4c54-8d8e-5f1d6c1e7a10")
UPLOAD_THREADS = 8


def _uid(*parts: object) -> str:
    return str(uuid.uuid5(SEED_NAMESPACE, "/".join(map(str, parts))))


def seed_from_simulation(params: Params, db: Database, progress: bool = True) -> dict:
    from heimdall.simulator import export_campaign

    exp = params.export_sessions
    params = params.model_copy(update={"export_sessions": exp.model_copy(update={"source": "synthetic"})})
    init = migrate.init(db)
    store = IQStore(exp.postgres.s3_bucket)
    store.ensure_bucket()
    with tempfile.TemporaryDirectory(prefix="heimdall-seed-") as tmp:
        h5 = Path(tmp) / "sessions.h5"
        export_campaign(params, h5, progress=progress)
        with h5py.File(h5, "r") as f:
            summary = _write(f, db, store, exp.duration_s, progress)
    return {"database": db.display, "bucket": store.bucket, "migrations_applied": init["applied"], **summary}


def _write(f: h5py.File, db: Database, store: IQStore, duration_s: float, progress: bool) -> dict:
    rx = {k: f[f"receivers/{k}"][()] for k in ("name", "latitude_deg", "longitude_deg", "altitude_m")}
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in rx["name"]]
    ses = {k: f[f"sessions/{k}"][()] for k in ("session_id", "start_time_unix_s", "frequency_hz",
                                                "tx_latitude_deg", "tx_longitude_deg", "tx_power_dbm")}
    sids = [s.decode() if isinstance(s, bytes) else str(s) for s in ses["session_id"]]
    m = f["measurements"]
    present, rss, snr = m["present"][()], m["rss_dbm"][()], m["snr_db"][()]
    n = len(sids)
    rate_hz, n_samples = int(f.attrs["sample_rate_hz"]), int(f.attrs["n_samples"])

    station_rows = [
        (_uid("station", name), name, f"http://{name.lower().replace(' ', '-')}.websdr.invalid/", "IT",
         float(rx["latitude_deg"][j]), float(rx["longitude_deg"][j]), int(round(rx["altitude_m"][j])),
         None, None, True)
        for j, name in enumerate(names)
    ]
    station_ids = [row[0] for row in station_rows]
    starts = [datetime.fromtimestamp(float(t), tz=timezone.utc) for t in ses["start_time_unix_s"]]
    source_rows, session_rows, meas_rows, uploads = [], [], [], []
    for i, sid in enumerate(sids):
        source_id = _uid("source", sid)
        freq = int(round(float(ses["frequency_hz"][i])))
        source_rows.append((source_id, f"sim-tx-{i:06d}", freq, float(ses["tx_latitude_deg"][i]),
                            float(ses["tx_longitude_deg"][i]), float(ses["tx_power_dbm"][i]), "simulated", True, None))
        session_rows.append((sid, source_id, f"sim-session-{i:06d}", starts[i],
                             starts[i] + timedelta(seconds=duration_s), duration_s, "completed", "approved", None))
        for j, station_id in enumerate(station_ids):
            if not present[i, j]:
                continue
            key = iq_key(sid, station_id)
            meas_rows.append((starts[i], _uid("measurement", sid, station_id), station_id, sid, freq,
                              float(rss[i, j]), None if np.isnan(snr[i, j]) else float(snr[i, j]), None,
                              key, "npy", rate_hz, n_samples, duration_s))
            uploads.append((i, j, key))

    # IQ first: a committed measurement row must never point at an object that is not there.
    store.client  # create the client (and check credentials) in this thread
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool, tqdm(
        total=len(uploads), desc="seed IQ -> S3", unit="obj", disable=None if progress else True
    ) as bar:
        # h5py is not thread-safe for reads: read in this thread, upload in the pool.
        futures = []
        for i, j, key in uploads:
            counts = m["iq"][i, j].astype(np.float32)
            field = (counts * np.float32(m["iq_scale"][i, j])).view(np.complex64)[:, 0]
            futures.append(pool.submit(store.put, key, encode_npy(field)))
            if len(futures) >= 4 * UPLOAD_THREADS:
                for fut in futures:
                    fut.result()
                    bar.update()
                futures = []
        for fut in futures:
            fut.result()
            bar.update()

    conn = db.connect()
    try:
        with conn, conn.cursor() as cur:
            execute_values(cur, f"""INSERT INTO {SCHEMA}.websdr_stations (id, name, url, country, latitude,
                longitude, altitude_asl, frequency_min_hz, frequency_max_hz, is_active) VALUES %s
                ON CONFLICT DO NOTHING""", station_rows)
            execute_values(cur, f"""INSERT INTO {SCHEMA}.known_sources (id, name, frequency_hz, latitude,
                longitude, power_dbm, source_type, is_validated, error_margin_meters) VALUES %s
                ON CONFLICT DO NOTHING""", source_rows)
            execute_values(cur, f"""INSERT INTO {SCHEMA}.recording_sessions (id, known_source_id, session_name,
                session_start, session_end, duration_seconds, status, approval_status, uncertainty_meters)
                VALUES %s ON CONFLICT DO NOTHING""", session_rows)
            execute_values(cur, f"""INSERT INTO {SCHEMA}.measurements ("timestamp", id, websdr_station_id,
                recording_session_id, frequency_hz, signal_strength_db, snr_db, frequency_offset_hz,
                iq_data_location, iq_data_format, iq_sample_rate, iq_samples_count, duration_seconds)
                VALUES %s ON CONFLICT DO NOTHING""", meas_rows, page_size=1000)
    except psycopg2.Error as e:
        raise db.error(e, "seed failed") from None
    finally:
        conn.close()
    return {"stations": len(station_rows), "sessions": n, "measurements": len(meas_rows),
            "iq_objects": len(uploads)}
