-- Heimdall production schema (the subset the training pipeline reads), plain PostgreSQL 15.
-- In production `measurements` is a TimescaleDB hypertable; nothing here needs TimescaleDB.
-- IF NOT EXISTS everywhere: applying this to a database that already has the production tables
-- is a no-op, so `heimdall db init` is safe to point at an existing deployment.

CREATE SCHEMA IF NOT EXISTS heimdall;

CREATE TABLE IF NOT EXISTS heimdall.websdr_stations (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name             varchar(255) NOT NULL UNIQUE,
    url              varchar(512),
    country          varchar(100),
    latitude         double precision NOT NULL,
    longitude        double precision NOT NULL,
    altitude_asl     integer,
    frequency_min_hz bigint,
    frequency_max_hz bigint,
    is_active        boolean NOT NULL DEFAULT true
);

CREATE TABLE IF NOT EXISTS heimdall.known_sources (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                varchar(255) NOT NULL,
    frequency_hz        bigint,
    latitude            double precision,
    longitude           double precision,
    power_dbm           double precision,
    source_type         varchar(50),
    is_validated        boolean NOT NULL DEFAULT false,
    error_margin_meters double precision
);

CREATE TABLE IF NOT EXISTS heimdall.recording_sessions (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    known_source_id    uuid REFERENCES heimdall.known_sources (id),
    session_name       varchar(255) NOT NULL,
    session_start      timestamptz NOT NULL,
    session_end        timestamptz,
    duration_seconds   double precision,
    status             varchar(50) NOT NULL DEFAULT 'pending',
    approval_status    varchar(20) NOT NULL DEFAULT 'pending'
                       CHECK (approval_status IN ('pending', 'approved', 'rejected')),
    uncertainty_meters double precision
);

CREATE TABLE IF NOT EXISTS heimdall.measurements (
    "timestamp"          timestamptz NOT NULL,
    id                   uuid NOT NULL DEFAULT gen_random_uuid(),
    websdr_station_id    uuid NOT NULL REFERENCES heimdall.websdr_stations (id),
    recording_session_id uuid REFERENCES heimdall.recording_sessions (id),
    frequency_hz         bigint NOT NULL,
    signal_strength_db   double precision,
    snr_db               double precision,
    frequency_offset_hz  integer,
    iq_data_location     varchar(512),
    iq_data_format       varchar(20),
    iq_sample_rate       integer,
    iq_samples_count     integer,
    duration_seconds     double precision,
    PRIMARY KEY ("timestamp", id)
);

CREATE INDEX IF NOT EXISTS measurements_session_idx
    ON heimdall.measurements (recording_session_id, websdr_station_id);
CREATE INDEX IF NOT EXISTS recording_sessions_approval_idx
    ON heimdall.recording_sessions (approval_status, session_start);
