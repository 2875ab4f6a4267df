"""``heimdall db init``: apply the versioned SQL migrations in src/heimdall/migrations/.

Each ``NNNN_name.sql`` runs once, in order, and is recorded with its sha256 in
``heimdall.schema_migrations``; all pending migrations run in one transaction (all or nothing); an applied migration whose file has since changed is an
error (migrations are append-only). A transaction-scoped advisory lock makes concurrent inits safe.
The export never reads ``schema_migrations``: production databases created elsewhere work too.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import psycopg2

from heimdall.db.connect import SCHEMA, Database
from heimdall.errors import HeimdallError

_LOCK_KEY = 0x4E1D_A11  # arbitrary, constant: serialises concurrent `heimdall db init`


def migrations() -> list[tuple[str, str]]:
    """[(version, sql)] sorted by version, from the package's migrations/ folder."""
    folder = resources.files("heimdall") / "migrations"
    found = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in found]


def init(db: Database) -> dict:
    conn = db.connect()
    applied_now: list[str] = []
    try:
        with conn:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations ("
                    " version text PRIMARY KEY, sha256 text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur.execute(f"SELECT version, sha256 FROM {SCHEMA}.schema_migrations")
                done = dict(cur.fetchall())
                for version, sql in migrations():
                    digest = hashlib.sha256(sql.encode()).hexdigest()
                    if version in done:
                        if done[version] != digest:
                            raise HeimdallError(
                                f"migration {version}.sql was changed after it was applied to "
                                f"{db.display}; add a new migration instead of editing an applied one"
                            )
                        continue
                    cur.execute(sql)
                    cur.execute(
                        f"INSERT INTO {SCHEMA}.schema_migrations (version, sha256) VALUES (%s, %s)",
                        (version, digest),
                    )
                    applied_now.append(version)
    except psycopg2.Error as e:
        raise db.error(e, "db init failed") from None
    finally:
        conn.close()
    return {"database": db.display, "applied": applied_now, "migrations": len(migrations())}
