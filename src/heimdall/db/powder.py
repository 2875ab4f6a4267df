"""``heimdall db import-powder``: the POWDER 462.7 MHz RSS dataset into the Heimdall schema.

The dataset (University of Utah POWDER testbed, MIT licence) is two files:

* ``single_tx.csv``: one row per sample — ``timestamp``, one RSS column per fixed receiver (dBm on
  each device's own, uncalibrated scale; ``-101`` = not received), ``<bus>_rss/_x/_y`` triples for
  receivers on buses, and the transmitter's ground truth ``tx_x_coord`` (**latitude**) and
  ``tx_y_coord`` (**longitude**);
* ``location_coordinates.json``: ``{receiver: (lat, lon)}`` for the fixed receivers and ``None`` for
  the buses (a Python literal: tuples and ``None``, so it is read with ``ast.literal_eval`` when it
  is not strict JSON).

Mapping onto the production schema (docs/sources.md):

* every fixed receiver → one ``websdr_stations`` row (``altitude_asl`` NULL: the file has none);
* every sample → one ``known_sources`` row (its GPS position, ``frequency_hz``, ``power_dbm`` NULL:
  the nominal 1 W is not on the receivers' uncalibrated scale) and one **approved**
  ``recording_sessions`` row starting at the sample's timestamp;
* every fixed receiver that heard the sample → one ``measurements`` row with ``signal_strength_db``,
  no SNR and no IQ (``iq_data_location`` NULL). ``-101`` → no row.
* bus receivers move and have no station position: they are skipped and counted.

Ids are uuid5 of the sample's timestamp and position (stations: of their name), every insert is
``ON CONFLICT DO NOTHING``: importing the same file twice is a no-op, and a repeated sample is
imported once (counted). Everything is written in one transaction.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg2
from psycopg2.extras import execute_values
from tqdm import tqdm

from heimdall.db import migrate
from heimdall.db.connect import SCHEMA, Database
from heimdall.errors import HeimdallError

POWDER_NAMESPACE = uuid.UUID("6f1d2a4e-3b7c-4e0a-9f55-2d8c1b0e7a31")
NOT_RECEIVED_DBM = -101.0
DEFAULT_FREQUENCY_MHZ = 462.7
TX_LAT_COLUMN, TX_LON_COLUMN = "tx_x_coord", "tx_y_coord"  # sic: x is latitude, y longitude
BUS_SUFFIXES = ("_rss", "_x", "_y")
PAGE_ROWS = 2000


def _uid(*parts: object) -> str:
    return str(uuid.uuid5(POWDER_NAMESPACE, "/".join(map(str, parts))))


def read_receivers(path: Path) -> dict[str, tuple[float, float] | None]:
    """{name: (lat, lon)} of fixed receivers, None for mobile (bus) ones."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise HeimdallError(f"{path}: cannot read receivers file: {e.strerror or e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        try:
            raw = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise HeimdallError(f"{path}: neither JSON nor a Python literal mapping: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise HeimdallError(f"{path}: expected a non-empty mapping {{receiver: [lat, lon] or null}}")
    out: dict[str, tuple[float, float] | None] = {}
    for name, pos in raw.items():
        if pos is None:
            out[str(name)] = None
            continue
        try:
            lat, lon = (float(v) for v in pos)
        except (TypeError, ValueError):
            raise HeimdallError(f"{path}: receiver {name!r}: position must be [lat, lon] or null, got {pos!r}") from None
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise HeimdallError(f"{path}: receiver {name!r}: position ({lat}, {lon}) is not a latitude/longitude")
        out[str(name)] = (lat, lon)
    if not any(v is not None for v in out.values()):
        raise HeimdallError(f"{path}: no fixed receiver (every position is null)")
    return out


def _float(text: str, csv_path: Path, line: int, column: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise HeimdallError(f"{csv_path}:{line}: column {column!r}: not a number: {text!r}") from None
    if not math.isfinite(v):
        raise HeimdallError(f"{csv_path}:{line}: column {column!r}: non-finite value {text!r}")
    return v


def read_samples(csv_path: Path, receivers: dict, tz) -> tuple[list[dict], dict, list[str]]:
    """Parse and check single_tx.csv: ([{start, lat, lon, rss: {receiver: dBm}}], counts, fixed receivers)."""
    fixed = {k for k, v in receivers.items() if v is not None}
    try:
        fh = open(csv_path, newline="", encoding="utf-8")
    except OSError as e:
        raise HeimdallError(f"{csv_path}: cannot read: {e.strerror or e}") from None
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise HeimdallError(f"{csv_path}: empty file")
        col = {name: i for i, name in enumerate(header)}
        for need in ("timestamp", TX_LAT_COLUMN, TX_LON_COLUMN):
            if need not in col:
                raise HeimdallError(f"{csv_path}: missing column {need!r}")
        rx_cols, bus_cols = [], []
        for name in header:
            if name in ("timestamp", TX_LAT_COLUMN, TX_LON_COLUMN):
                continue
            if name in fixed:
                rx_cols.append(name)
            elif name.endswith(BUS_SUFFIXES) and name.rsplit("_", 1)[0] in receivers \
                    and receivers[name.rsplit("_", 1)[0]] is None:
                if name.endswith("_rss"):
                    bus_cols.append(name)
            else:
                raise HeimdallError(f"{csv_path}: column {name!r} is neither a receiver of the receivers file, "
                                    "a bus column (<bus>_rss/_x/_y) nor timestamp/tx_x_coord/tx_y_coord")
        if not rx_cols:
            raise HeimdallError(f"{csv_path}: no column of a fixed receiver")
        counts = {"csv_rows": 0, "bus_receivers_skipped": len(bus_cols), "bus_readings_skipped": 0,
                  "readings_not_received": 0, "samples_without_fixed_receiver": 0, "duplicate_samples": 0}
        samples, seen = [], set()
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise HeimdallError(f"{csv_path}:{line}: {len(row)} fields, the header has {len(header)}")
            counts["csv_rows"] += 1
            ts = row[col["timestamp"]].strip()
            try:
                start = datetime.fromisoformat(ts)
            except ValueError:
                raise HeimdallError(f"{csv_path}:{line}: timestamp {ts!r} is not ISO 8601") from None
            start = start.replace(tzinfo=tz) if start.tzinfo is None else start
            lat = _float(row[col[TX_LAT_COLUMN]], csv_path, line, TX_LAT_COLUMN)
            lon = _float(row[col[TX_LON_COLUMN]], csv_path, line, TX_LON_COLUMN)
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise HeimdallError(f"{csv_path}:{line}: transmitter position ({lat}, {lon}) is not a "
                                    f"latitude ({TX_LAT_COLUMN}) / longitude ({TX_LON_COLUMN})")
            rss = {}
            for name in rx_cols:
                v = _float(row[col[name]], csv_path, line, name)
                if v == NOT_RECEIVED_DBM:
                    counts["readings_not_received"] += 1
                elif v < NOT_RECEIVED_DBM:
                    raise HeimdallError(f"{csv_path}:{line}: column {name!r}: {v} dBm is below the "
                                        f"not-received marker {NOT_RECEIVED_DBM:g}")
                else:
                    rss[name] = v
            for name in bus_cols:
                if _float(row[col[name]], csv_path, line, name) != NOT_RECEIVED_DBM:
                    counts["bus_readings_skipped"] += 1
            if not rss:
                counts["samples_without_fixed_receiver"] += 1
                continue
            key = (start.astimezone(timezone.utc).isoformat(), repr(lat), repr(lon))
            if key in seen:
                counts["duplicate_samples"] += 1
                continue
            seen.add(key)
            samples.append({"key": key, "line": line, "start": start, "lat": lat, "lon": lon, "rss": rss})
    if not samples:
        raise HeimdallError(f"{csv_path}: no sample with a fixed receiver that heard it")
    return samples, counts, rx_cols


def import_powder(csv_path: Path, receivers_path: Path, db: Database, *, frequency_mhz: float = DEFAULT_FREQUENCY_MHZ,
                  tz_name: str = "UTC", progress: bool = True) -> dict:
    """Load the dataset into ``db`` (schema created first). Idempotent. Returns a summary of counts."""
    csv_path, receivers_path = Path(csv_path), Path(receivers_path)
    if not 1.0 < frequency_mhz <= 6000.0:
        raise HeimdallError(f"--frequency-mhz {frequency_mhz}: expected 1 .. 6000 MHz")
    try:
        tz = timezone.utc if tz_name.upper() == "UTC" else ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HeimdallError(f"--timezone {tz_name!r}: unknown time zone (e.g. UTC, America/Denver)") from None
    receivers = read_receivers(receivers_path)
    samples, counts, rx_cols = read_samples(csv_path, receivers, tz)
    used = sorted(rx_cols)
    freq_hz = int(round(frequency_mhz * 1e6))

    init = migrate.init(db)
    station_rows = [(_uid("station", name), name, None, "US", receivers[name][0], receivers[name][1], None,
                     None, None, True) for name in used]
    conn = db.connect()
    inserted = {}
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {SCHEMA}.measurements")
            (before_meas,) = cur.fetchone()
            cur.execute(f"SELECT count(*) FROM {SCHEMA}.recording_sessions")
            (before_sessions,) = cur.fetchone()
            execute_values(cur, f"""INSERT INTO {SCHEMA}.websdr_stations (id, name, url, country, latitude, longitude,
                altitude_asl, frequency_min_hz, frequency_max_hz, is_active) VALUES %s ON CONFLICT DO NOTHING""",
                           station_rows)
            # a station of that name may already exist (another import, production): use its id
            cur.execute(f"SELECT name, id::text, latitude, longitude FROM {SCHEMA}.websdr_stations "
                        "WHERE name = ANY(%s)", (used,))
            station_id = {}
            for name, sid, lat, lon in cur.fetchall():
                if abs(lat - receivers[name][0]) > 1e-6 or abs(lon - receivers[name][1]) > 1e-6:
                    raise HeimdallError(f"{receivers_path}: receiver {name!r} is at ({receivers[name][0]}, "
                                        f"{receivers[name][1]}) but station {name!r} in {db.display} is at "
                                        f"({lat}, {lon})")
                station_id[name] = sid
            with tqdm(total=len(samples), desc="import POWDER", unit="sample",
                      disable=None if progress else True) as bar:
                for page in range(0, len(samples), PAGE_ROWS):
                    sources, sessions, meas = [], [], []
                    for s in samples[page:page + PAGE_ROWS]:
                        source_id, session_id = _uid("source", *s["key"]), _uid("session", *s["key"])
                        stamp = s["start"].astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                        sources.append((source_id, f"powder-tx-{stamp}", freq_hz, s["lat"], s["lon"], None,
                                        "powder", True, None))
                        sessions.append((session_id, source_id, f"powder-{stamp}", s["start"], s["start"], None,
                                         "completed", "approved", None))
                        for name, v in sorted(s["rss"].items()):
                            meas.append((s["start"], _uid("measurement", *s["key"], name), station_id[name],
                                         session_id, freq_hz, v))
                    execute_values(cur, f"""INSERT INTO {SCHEMA}.known_sources (id, name, frequency_hz, latitude,
                        longitude, power_dbm, source_type, is_validated, error_margin_meters) VALUES %s
                        ON CONFLICT DO NOTHING""", sources, page_size=1000)
                    execute_values(cur, f"""INSERT INTO {SCHEMA}.recording_sessions (id, known_source_id,
                        session_name, session_start, session_end, duration_seconds, status, approval_status,
                        uncertainty_meters) VALUES %s ON CONFLICT DO NOTHING""", sessions, page_size=1000)
                    execute_values(cur, f"""INSERT INTO {SCHEMA}.measurements ("timestamp", id, websdr_station_id,
                        recording_session_id, frequency_hz, signal_strength_db) VALUES %s ON CONFLICT DO NOTHING""",
                                   meas, page_size=1000)
                    bar.update(len(sessions))
            cur.execute(f"SELECT count(*) FROM {SCHEMA}.measurements")
            inserted["measurements_inserted"] = cur.fetchone()[0] - before_meas
            cur.execute(f"SELECT count(*) FROM {SCHEMA}.recording_sessions")
            inserted["sessions_inserted"] = cur.fetchone()[0] - before_sessions
    except psycopg2.Error as e:
        raise db.error(e, "import-powder failed") from None
    finally:
        conn.close()
    return {
        "database": db.display, "migrations_applied": init["applied"], "frequency_hz": freq_hz,
        "stations": len(used), "samples": len(samples), "measurements": sum(len(s["rss"]) for s in samples),
        **inserted, **counts,
    }
