"""``export_sessions.source: postgres``: approved sessions from the Heimdall database -> sessions.h5.

Reads only the production columns listed in docs/sources.md (schema ``heimdall``: websdr_stations,
known_sources, recording_sessions, measurements), in one read-only REPEATABLE READ transaction so
every query sees the same snapshot. Measurements stream through a server-side cursor in a total
order (session start, session id, station id, timestamp, measurement id) and IQ is fetched from S3
a block of sessions at a time, so memory is bounded and an unchanged database gives a byte-identical
file.

Selection (each exclusion is counted in the summary):
- ``approval_status = 'approved'`` only; pending / rejected sessions are never read;
- the known source must have a position (finite latitude/longitude): that is the ground truth;
- optional params filters: time window, frequency band, validated sources only;
- a receiver is *present* in a session when it has a finite ``signal_strength_db`` at a station
  with a position; sessions need ``min_receivers`` of them. An approved session with none at all is
  a data fault (``empty_sessions: fail``, the default) or is skipped and counted (``skip``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg2

from heimdall.budget import check_export_sessions
from heimdall.db.connect import SCHEMA, Database
from heimdall.errors import HeimdallError
from heimdall.iqstore import (IQStore, IQUnavailable, check_location, decode_npy, max_object_bytes, quantize,
                              split_location)
from heimdall.params import Params
from heimdall.sessions_file import IQ_CHUNK_SESSIONS, write_sessions

# The only tables and columns the export reads (checked up front for a clear error).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "websdr_stations": ("id", "name", "latitude", "longitude", "altitude_asl"),
    "known_sources": ("id", "frequency_hz", "latitude", "longitude", "power_dbm", "is_validated"),
    "recording_sessions": ("id", "known_source_id", "session_start", "approval_status"),
    "measurements": ("timestamp", "id", "websdr_station_id", "recording_session_id", "frequency_hz",
                     "signal_strength_db", "snr_db", "iq_data_location", "iq_data_format", "iq_sample_rate"),
}
BLOCK_SESSIONS = 8 * IQ_CHUNK_SESSIONS  # sessions per IQ fetch/write block
IQ_FETCH_THREADS = 8  # S3 GETs in flight (latency-bound, not CPU-bound)
CURSOR_ITERSIZE = 5000
MAX_WARNINGS = 20  # per-recording warnings printed; the summary always has the full counts

# PostgreSQL float comparisons put NaN above +Infinity, so BETWEEN rejects NaN and infinities.
_STATION_POSITIONED = "w.latitude BETWEEN -90 AND 90 AND w.longitude BETWEEN -180 AND 180"
_USABLE = f"{_STATION_POSITIONED} AND m.signal_strength_db BETWEEN -1e6 AND 1e6"


@dataclass
class _Counts:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + n


def _candidates_sql(p) -> tuple[str, dict]:
    """CTEs ``usable`` / ``candidates`` (approved sessions passing the params filters) + args."""
    where = ["rs.approval_status = 'approved'"]
    args: dict = {}
    if p.start_time is not None:
        where.append("rs.session_start >= %(start_time)s")
        args["start_time"] = p.start_time
    if p.end_time is not None:
        where.append("rs.session_start < %(end_time)s")
        args["end_time"] = p.end_time
    if p.frequency_min_hz is not None:
        where.append("ks.frequency_hz >= %(fmin)s")
        args["fmin"] = p.frequency_min_hz
    if p.frequency_max_hz is not None:
        where.append("ks.frequency_hz <= %(fmax)s")
        args["fmax"] = p.frequency_max_hz
    if p.validated_sources_only:
        where.append("ks.is_validated IS TRUE")
    sql = f"""
    WITH usable AS (
        SELECT m.recording_session_id AS session_id, count(DISTINCT m.websdr_station_id) AS n_rx
        FROM {SCHEMA}.measurements m
        JOIN {SCHEMA}.websdr_stations w ON w.id = m.websdr_station_id
        WHERE {_USABLE}
        GROUP BY m.recording_session_id
    ), candidates AS (
        SELECT rs.id, rs.session_start, rs.known_source_id,
               COALESCE(ks.latitude BETWEEN -90 AND 90 AND ks.longitude BETWEEN -180 AND 180, false)
                   AS has_truth,
               COALESCE(u.n_rx, 0) AS n_rx
        FROM {SCHEMA}.recording_sessions rs
        LEFT JOIN {SCHEMA}.known_sources ks ON ks.id = rs.known_source_id
        LEFT JOIN usable u ON u.session_id = rs.id
        WHERE {' AND '.join(where)}
    ), selected AS (
        SELECT * FROM candidates WHERE has_truth AND n_rx >= %(min_rx)s
    )"""
    args["min_rx"] = p.min_receivers
    return sql, args


def _check_schema(cur, db: Database) -> None:
    cur.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s",
        (SCHEMA,),
    )
    have: dict[str, set[str]] = {}
    for table, column in cur.fetchall():
        have.setdefault(table, set()).add(column)
    if not have:
        raise HeimdallError(f"database {db.display}: schema '{SCHEMA}' not found (or not readable by this user)")
    for table, columns in REQUIRED_COLUMNS.items():
        if table not in have:
            raise HeimdallError(f"database {db.display}: table {SCHEMA}.{table} not found")
        missing = [c for c in columns if c not in have[table]]
        if missing:
            raise HeimdallError(f"database {db.display}: table {SCHEMA}.{table} lacks column(s) {', '.join(missing)}")


def export_postgres(params: Params, path: Path, progress: bool = True, db: Database | None = None) -> dict:
    db = db or Database()
    exp = params.export_sessions
    p = exp.postgres
    conn = db.connect(readonly=True)
    try:
        with conn:
            return _export(conn, db, params, p, path, progress)
    except psycopg2.Error as e:
        raise db.error(e, "export query failed") from None
    finally:
        conn.close()


def _export(conn, db: Database, params: Params, p, path: Path, progress: bool) -> dict:
    exp = params.export_sessions
    counts = _Counts()
    cte, args = _candidates_sql(p)
    with conn.cursor() as cur:
        _check_schema(cur, db)

        cur.execute(f"SELECT approval_status, count(*) FROM {SCHEMA}.recording_sessions GROUP BY 1 ORDER BY 1")
        by_status = {str(k): int(v) for k, v in cur.fetchall()}
        cur.execute(cte + """
            SELECT count(*),
                   count(*) FILTER (WHERE NOT has_truth),
                   count(*) FILTER (WHERE has_truth AND n_rx = 0),
                   count(*) FILTER (WHERE has_truth AND n_rx > 0 AND n_rx < %(min_rx)s)
            FROM candidates""", args)
        n_cand, n_no_truth, n_empty, n_few = cur.fetchone()

        if n_empty and p.empty_sessions == "fail":
            cur.execute(cte + """
                SELECT id::text FROM candidates WHERE has_truth AND n_rx = 0
                ORDER BY session_start, id LIMIT 1""", args)
            (first,) = cur.fetchone()
            raise HeimdallError(
                f"database {db.display}: approved session {first} has no usable receiver (no measurement "
                f"with a signal_strength_db at a positioned station); {n_empty} such session(s). Fix or "
                "reject them, or set export_sessions.postgres.empty_sessions: skip"
            )

        cur.execute(cte + f"""
            SELECT s.id::text, s.known_source_id::text,
                   EXTRACT(EPOCH FROM s.session_start)::float8,
                   COALESCE(ks.frequency_hz,
                            (SELECT min(m.frequency_hz) FROM {SCHEMA}.measurements m
                             WHERE m.recording_session_id = s.id))::float8,
                   ks.latitude, ks.longitude, ks.power_dbm
            FROM selected s JOIN {SCHEMA}.known_sources ks ON ks.id = s.known_source_id
            ORDER BY s.session_start, s.id""", args)
        rows = cur.fetchall()
        if not rows:
            raise HeimdallError(
                f"database {db.display}: no session to export ({by_status.get('approved', 0)} approved, "
                f"{n_no_truth} without a source position, {n_empty} without receivers, {n_few} below "
                f"min_receivers={p.min_receivers}, others outside the params filters)"
            )
        cur.execute(cte + f"""
            SELECT DISTINCT w.id::text, w.name, w.latitude, w.longitude, w.altitude_asl
            FROM selected s
            JOIN {SCHEMA}.measurements m ON m.recording_session_id = s.id
            JOIN {SCHEMA}.websdr_stations w ON w.id = m.websdr_station_id
            WHERE {_USABLE}
            ORDER BY w.name, w.id::text""", args)
        stations = cur.fetchall()
        # stations heard in the exported sessions but without a valid position: excluded, and counted
        cur.execute(cte + f"""
            SELECT count(DISTINCT w.id), count(*)
            FROM selected s
            JOIN {SCHEMA}.measurements m ON m.recording_session_id = s.id
            JOIN {SCHEMA}.websdr_stations w ON w.id = m.websdr_station_id
            WHERE NOT COALESCE({_STATION_POSITIONED}, false)""", args)
        n_unpositioned, n_unpositioned_meas = (int(v) for v in cur.fetchone())

    n, r = len(rows), len(stations)
    check_export_sessions(exp, n, r, BLOCK_SESSIONS, sessions_from=f"database {db.display}: sessions")
    session_ids = np.array([row[0] for row in rows], dtype=object)
    freq = np.array([np.nan if row[3] is None else row[3] for row in rows], dtype=np.float64)
    _check_identities(db, rows, freq, stations)
    if n_unpositioned:
        counts.add("stations_without_position_excluded", n_unpositioned)
        counts.add("measurements_at_stations_without_position", n_unpositioned_meas)
        print(f"heimdall export-sessions: warning: {n_unpositioned} station(s) without a valid position (NULL or "
              f"outside ±90/±180): their {n_unpositioned_meas} measurement(s) are excluded", file=sys.stderr)
    null_alt = [s for s in stations if s[4] is None]
    counts.add("stations_null_altitude_defaulted", len(null_alt))

    sessions = {
        "session_id": session_ids,
        "group_id": np.array([row[1] for row in rows], dtype=object),  # the known source
        "start_time_unix_s": np.array([row[2] for row in rows], dtype=np.float64),
        "frequency_hz": freq,
        "tx_latitude_deg": np.array([row[4] for row in rows], dtype=np.float64),
        "tx_longitude_deg": np.array([row[5] for row in rows], dtype=np.float64),
        "tx_power_dbm": np.array([np.nan if row[6] is None else row[6] for row in rows], dtype=np.float64),
    }
    receivers = {
        "name": np.array([s[1] for s in stations], dtype=object),
        "station_id": np.array([s[0] for s in stations], dtype=object),
        "latitude_deg": np.array([s[2] for s in stations], dtype=np.float64),
        "longitude_deg": np.array([s[3] for s in stations], dtype=np.float64),
        "altitude_m": np.array([p.default_altitude_m if s[4] is None else s[4] for s in stations], dtype=np.float64),
    }
    reader = _MeasurementReader(conn, cte, args, session_ids, [s[0] for s in stations], exp, p, counts)
    write_sessions(
        path,
        attrs={"source": "postgres", "sample_rate_hz": float(exp.sample_rate_hz), "n_samples": exp.n_samples},
        receivers=receivers,
        sessions=sessions,
        n_samples=exp.n_samples,
        blocks=reader.blocks(),
        progress=progress,
    )
    summary = {
        "source": "postgres",
        "database": db.display,
        "sessions": n,
        "receivers": r,
        "sessions_by_approval_status": by_status,
        "approved_matching_filters": int(n_cand),
        "excluded_without_ground_truth": int(n_no_truth),
        "excluded_without_receivers": int(n_empty),
        "excluded_below_min_receivers": int(n_few),
    }
    summary.update(sorted(counts.values.items()))
    return summary


def _check_identities(db: Database, rows: list, freq: np.ndarray, stations: list) -> None:
    """A carrier frequency per session (finite, > 0) and one name per station: a database without the
    NOT NULL / UNIQUE constraints must not export NaN frequencies or merge two receivers by name."""
    bad = ~(np.isfinite(freq) & (freq > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise HeimdallError(f"database {db.display}: session {rows[i][0]} (known source {rows[i][1]}) has frequency_hz "
                            f"{rows[i][3]!r} (NULL, NaN or <= 0 in known_sources and in its measurements); "
                            f"{int(bad.sum())} such session(s): fix or reject them")
    by_name: dict[str, str] = {}
    for station_id, name, *_ in stations:
        if name is None or not str(name).strip():
            raise HeimdallError(f"database {db.display}: station {station_id} has no name")
        if name in by_name:
            raise HeimdallError(f"database {db.display}: stations {by_name[name]} and {station_id} are both named "
                                f"{name!r}: receiver names must be unique (websdr_stations.name UNIQUE)")
        by_name[name] = station_id


class _MeasurementReader:
    """Streams measurement rows in session order and turns them into sessions.h5 blocks."""

    def __init__(self, conn, cte, args, session_ids, station_ids, exp, p, counts: _Counts):
        self.conn, self.cte, self.args = conn, cte, args
        self.index = {sid: i for i, sid in enumerate(session_ids)}
        self.rx_index = {sid: j for j, sid in enumerate(station_ids)}
        self.n, self.r = len(session_ids), len(station_ids)
        self.s, self.rate_hz = exp.n_samples, float(exp.sample_rate_hz)
        self.p, self.counts = p, counts
        self.store = IQStore(p.s3_bucket)
        self.bad_buckets: set[str] = set()
        self.warned = 0

    def _rows(self) -> Iterator[tuple]:
        # Named cursor = server-side: rows arrive CURSOR_ITERSIZE at a time, never all at once.
        with self.conn.cursor(name="heimdall_export_measurements") as cur:
            cur.itersize = CURSOR_ITERSIZE
            cur.execute(self.cte + f"""
                SELECT m.recording_session_id::text, m.websdr_station_id::text,
                       m.signal_strength_db, m.snr_db, m.iq_data_location, m.iq_data_format, m.iq_sample_rate
                FROM selected s
                JOIN {SCHEMA}.measurements m ON m.recording_session_id = s.id
                JOIN {SCHEMA}.websdr_stations w ON w.id = m.websdr_station_id
                WHERE {_STATION_POSITIONED}
                ORDER BY s.session_start, s.id, m.websdr_station_id, m."timestamp", m.id""", self.args)
            yield from cur

    def blocks(self) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        rows = self._rows()
        pending = next(rows, None)
        for start in range(0, self.n, BLOCK_SESSIONS):
            stop = min(self.n, start + BLOCK_SESSIONS)
            acc: dict[tuple[int, int], list] = {}
            while pending is not None:
                i = self.index[pending[0]]
                if i >= stop:
                    break
                if i < start:
                    raise RuntimeError("measurement stream out of session order")
                j = self.rx_index.get(pending[1])
                if j is None:
                    self.counts.add("measurements_at_unused_stations")
                else:
                    acc.setdefault((i - start, j), []).append(pending[2:])
                pending = next(rows, None)
            yield slice(start, stop), self._block(stop - start, acc, start)
        if pending is not None:
            raise RuntimeError("measurement stream has rows past the last session")

    def _block(self, b: int, acc: dict, start: int) -> dict[str, np.ndarray]:
        present = np.zeros((b, self.r), dtype=bool)
        rss = np.full((b, self.r), np.nan, dtype=np.float32)
        snr = np.full((b, self.r), np.nan, dtype=np.float32)
        iq = np.zeros((b, self.r, self.s, 2), dtype=np.int16)
        scale = np.zeros((b, self.r), dtype=np.float32)
        has_iq = np.zeros((b, self.r), dtype=bool)
        fetch: list[tuple[int, int, str, str]] = []
        for (i, j), ms in sorted(acc.items()):
            good = [m for m in ms if m[0] is not None and np.isfinite(m[0])]
            if not good:
                self.counts.add("receivers_without_rss")
                continue
            present[i, j] = True
            if len(ms) > 1:
                self.counts.add("receivers_with_repeated_measurements")
            rss[i, j] = _mean_db([m[0] for m in good])
            snrs = [m[1] for m in good if m[1] is not None and np.isfinite(m[1])]
            snr[i, j] = _mean_db(snrs) if snrs else np.nan
            # IQ: the earliest measurement of this receiver that has a recording.
            with_iq = [m for m in ms if m[2]]
            if not with_iq:
                self.counts.add("receivers_rss_only")
                continue
            location, fmt, rate = with_iq[0][2], with_iq[0][3], with_iq[0][4]
            if fmt not in (None, "npy") or (rate is not None and float(rate) != self.rate_hz):
                self.counts.add("iq_incompatible")
                self._warn(f"{location}: format {fmt!r} at {rate} Hz, export needs npy at {self.rate_hz:g} Hz; RSS only")
                continue
            fetch.append((i, j, *split_location(location, self.p.s3_bucket)))
        if fetch:
            for bucket in sorted({f[2] for f in fetch} - self.bad_buckets):
                try:
                    check_location(bucket, "x")
                    self.store.check_bucket(bucket)  # credentials / access faults: here, once, in this thread
                except (HeimdallError, IQUnavailable) as e:
                    if bucket == self.p.s3_bucket:
                        raise  # the export's own bucket: every recording would fail
                    self.bad_buckets.add(bucket)  # another bucket named by some rows: those rows' fault
                    self._warn(f"{e}; its recordings are skipped")
            with ThreadPoolExecutor(IQ_FETCH_THREADS) as pool:
                results = list(pool.map(self._fetch_one, fetch))
            for (i, j, bucket, key), res in zip(fetch, results):
                if isinstance(res, IQUnavailable):
                    if self.p.iq_errors == "fail":
                        raise HeimdallError(f"{res} (export_sessions.postgres.iq_errors: fail)")
                    self.counts.add(f"iq_{res.kind}_skipped")
                    self._warn(f"{res}; receiver kept with RSS/SNR only")
                    continue
                iq[i, j], scale[i, j] = quantize(res)
                has_iq[i, j] = True
                self.counts.add("iq_recordings")
        return {"present": present, "rss_dbm": rss, "snr_db": snr, "has_iq": has_iq, "iq": iq, "iq_scale": scale}

    def _fetch_one(self, item):
        _, _, bucket, key = item
        try:
            check_location(bucket, key)
            if bucket in self.bad_buckets:
                raise IQUnavailable("unknown_bucket", f"s3://{bucket}/{key}: bucket not readable")
            return decode_npy(self.store.get(bucket, key, max_object_bytes(self.s)), f"s3://{bucket}/{key}", self.s)
        except IQUnavailable as e:
            return e

    def _warn(self, msg: str) -> None:
        self.warned += 1
        if self.warned <= MAX_WARNINGS:
            print(f"heimdall export-sessions: warning: {msg}", file=sys.stderr)
        elif self.warned == MAX_WARNINGS + 1:
            print("heimdall export-sessions: warning: further warnings suppressed (counts in the summary)",
                  file=sys.stderr)


def _mean_db(values: list[float]) -> float:
    """Power mean of dB readings (the mean of linear power, back in dB); one reading is kept as is."""
    if len(values) == 1:
        return values[0]
    v = np.asarray(values, dtype=np.float64)
    return float(10 * np.log10(np.mean(10 ** (v / 10))))
