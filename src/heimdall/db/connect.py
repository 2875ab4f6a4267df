"""Connecting to the Heimdall PostgreSQL database from HEIMDALL_DB_URL, without leaking secrets.

The URL (``postgresql://user:password@host:port/dbname`` or a libpq ``key=value`` string) is read
from the environment only, never from params.yaml, so it cannot reach dvc.lock or MLflow. Every
message we print names the database as ``user@host:port/dbname``; any text coming back from libpq
is scrubbed of the password before it is shown.
"""

from __future__ import annotations

import os
import time

import psycopg2
import psycopg2.extensions

from heimdall.errors import HeimdallError

DB_URL_ENV = "HEIMDALL_DB_URL"
SCHEMA = "heimdall"
# Bounded retries for a server that is (re)starting or briefly unreachable: 4 attempts,
# 0.5 + 1 + 2 s apart, each with a 5 s connect timeout -> at most ~25 s before giving up.
CONNECT_ATTEMPTS = 4
CONNECT_TIMEOUT_S = 5
RETRY_DELAY_S = 0.5
# libpq messages that retrying cannot fix (bad credentials, wrong database name).
_PERMANENT = ("authentication failed", "no pg_hba.conf entry", "does not exist", "password", "ssl")


class Database:
    """A parsed HEIMDALL_DB_URL: connect with retries, describe without the password."""

    def __init__(self, url: str | None = None):
        url = url if url is not None else os.environ.get(DB_URL_ENV)
        if not url:
            raise HeimdallError(
                f"{DB_URL_ENV} is not set: export it as postgresql://USER@HOST:PORT/DBNAME "
                "(password via PGPASSWORD or ~/.pgpass, see docs/sources.md)"
            )
        try:
            self._parts = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError:
            raise HeimdallError(f"{DB_URL_ENV}: not a valid PostgreSQL URL or connection string") from None
        self._url = url
        self._secrets = [s for s in (self._parts.get("password"), os.environ.get("PGPASSWORD")) if s]

    @property
    def display(self) -> str:
        p = self._parts
        host = p.get("host") or os.environ.get("PGHOST") or "localhost"
        port = p.get("port") or os.environ.get("PGPORT") or "5432"
        user = p.get("user") or os.environ.get("PGUSER") or ""
        db = p.get("dbname") or os.environ.get("PGDATABASE") or user
        return f"{user}@{host}:{port}/{db}" if user else f"{host}:{port}/{db}"

    def scrub(self, text: str) -> str:
        """``text`` with the password (URL or PGPASSWORD) replaced, on one line."""
        for s in self._secrets:
            text = text.replace(s, "***")
        return " ".join(text.split())

    def connect(self, *, readonly: bool = False, attempts: int = CONNECT_ATTEMPTS):
        """Open a connection (autocommit off). Retries only errors a retry can fix."""
        delay = RETRY_DELAY_S
        for attempt in range(1, attempts + 1):
            try:
                conn = psycopg2.connect(self._url, connect_timeout=CONNECT_TIMEOUT_S,
                                        application_name="heimdall")
            except psycopg2.OperationalError as e:
                msg = self.scrub(str(e))
                if any(k in msg.lower() for k in _PERMANENT):
                    raise HeimdallError(f"database {self.display}: {msg}") from None
                if attempt == attempts:
                    raise HeimdallError(
                        f"database {self.display} unreachable after {attempts} attempts: {msg}"
                    ) from None
                time.sleep(delay)
                delay *= 2
                continue
            if readonly:
                # One snapshot for every query of an export, and no way to write by mistake.
                conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
            return conn
        raise AssertionError("unreachable")

    def error(self, e: Exception, what: str) -> HeimdallError:
        """A one-line HeimdallError for a database error raised while doing ``what``."""
        first = self.scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return HeimdallError(f"database {self.display}: {what}: {first}")
