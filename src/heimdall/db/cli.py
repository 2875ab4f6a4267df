"""``heimdall db <init|seed|import-powder>``: the database verbs, registered by heimdall.cli."""

from __future__ import annotations

from pathlib import Path


def _cmd_init(args) -> dict:
    from heimdall.db import migrate
    from heimdall.db.connect import Database

    return migrate.init(Database())


def _cmd_seed(args) -> dict:
    from heimdall.db.connect import Database
    from heimdall.db.seed import seed_from_simulation
    from heimdall.errors import HeimdallError
    from heimdall.params import load_params

    if not args.from_simulation:
        raise HeimdallError("db seed: only --from-simulation is supported")
    params = load_params(args.params)
    if args.n_sessions is not None:
        if args.n_sessions < 1:
            raise HeimdallError("db seed: --n-sessions must be >= 1")
        exp = params.export_sessions.model_copy(update={"n_sessions": args.n_sessions})
        params = params.model_copy(update={"export_sessions": exp})
    return seed_from_simulation(params, Database(), progress=not args.no_progress)


def _cmd_import_powder(args) -> dict:
    from heimdall.db.connect import Database
    from heimdall.db.powder import import_powder

    return import_powder(args.csv, args.receivers, Database(), frequency_mhz=args.frequency_mhz,
                         tz_name=args.timezone, progress=not args.no_progress)


def add_parser(sub) -> None:
    """Add the ``db`` verb group to the top-level subparsers."""
    db = sub.add_parser(
        "db",
        help="Heimdall PostgreSQL database: create the schema, seed a simulated campaign, import POWDER",
        description="Database helpers for export_sessions.source: postgres (docs/sources.md). The database "
        "comes from HEIMDALL_DB_URL, the IQ store from HEIMDALL_S3_ENDPOINT_URL and the standard AWS "
        "credential variables.",
    )
    dbsub = db.add_subparsers(dest="db_verb", required=True, metavar="DB_VERB")

    p = dbsub.add_parser(
        "init",
        help="create schema 'heimdall' and its tables (idempotent, versioned migrations)",
        description="Apply the versioned SQL migrations in src/heimdall/migrations/ that the database "
        "(HEIMDALL_DB_URL) has not seen yet, in one transaction. Safe to run repeatedly and on a database "
        "that already holds the production tables.",
    )
    p.set_defaults(func=_cmd_init)

    p = dbsub.add_parser(
        "seed",
        help="write a simulated campaign into PostgreSQL and its IQ into S3 (production layout)",
        description="Simulate the campaign of params.yaml (scenario + export_sessions) and store it the way "
        "production does: stations, one known source and approved session per transmission, one measurement "
        "per receiver, IQ as complex64 .npy at s3://<export_sessions.postgres.s3_bucket>/sessions/<session_id>/"
        "websdr_<station_id>.npy. Runs `db init` first; re-seeding the same campaign is a no-op.",
    )
    p.add_argument("--from-simulation", action="store_true", required=True,
                   help="seed from the simulator (the only source)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.add_argument("--n-sessions", type=int, default=None,
                   help="sessions to simulate (default: export_sessions.n_sessions)")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    p.set_defaults(func=_cmd_seed)

    p = dbsub.add_parser(
        "import-powder",
        help="load the POWDER 462.7 MHz RSS dataset (single_tx.csv + location_coordinates.json)",
        description="Load the POWDER campus RSS dataset into the Heimdall schema (docs/sources.md): one station "
        "per fixed receiver, one known source + one approved recording session per sample (its timestamp kept), "
        "one measurement (signal_strength_db, no SNR, no IQ) per fixed receiver that heard it; -101 dBm = not "
        "received = no row. Bus receivers have no fixed position: skipped and counted. Runs `db init` first; "
        "idempotent (deterministic ids, a second import inserts nothing).",
    )
    p.add_argument("--csv", type=Path, required=True, help="single_tx.csv")
    p.add_argument("--receivers", type=Path, required=True, help="location_coordinates.json")
    p.add_argument("--frequency-mhz", type=float, default=462.7, help="carrier of every sample (default: %(default)s)")
    p.add_argument("--timezone", default="UTC",
                   help="zone of the CSV's timestamps when they carry none (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    p.set_defaults(func=_cmd_import_powder)
