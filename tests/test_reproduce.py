"""Reproducing any earlier model: an S3 DVC remote, experiments, and byte-identical reruns.

One temporary clone of the pipeline (tiny params) with the repository's own .dvc/config, its
`minio` remote pointed at a SeaweedFS S3 server on loopback, goes through the life of a model:

  v1: `dvc repro`, `dvc repro -f` again (same bytes), commit + tag, `dvc push`
  v2: `dvc exp run --queue -S train.lr=...` + `dvc queue start`, `dvc exp show --json`,
      `dvc exp apply`, commit + tag, `dvc push`; `dvc metrics diff` / `dvc plots diff` v1 v2
  a fresh clone elsewhere: `git checkout v1 && dvc pull` gives v1's model.onnx byte for byte

The pipeline runs three times in all (about a minute each on 2 cores), so the tests share it.
Every DVC process logs to the clone's default MLflow store (<repo>/mlflow.db), which is what the
queued experiment must find too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, TINY_TRAIN, tiny_params_dict, copy_pipeline

pytestmark = pytest.mark.slow

REMOTE = "minio"          # the remote .dvc/config defines (the repository's own file is used)
BUCKET = "heimdall-dvc"   # its bucket
OUTS = ("data/sessions.h5", "data/features.h5", "models/model.ckpt", "models/model.onnx")
# git-tracked (uncached) outputs, byte-identical on a forced rerun too (timings live in *.timings.json)
METRICS = ("models/metrics/train.json", "models/metrics/test.json", "models/metrics/compare/model.json",
           "models/registry.json")
# the `dvc metrics show` table: one file per method (the evaluate stage's compare/ directory)
COMPARE = {f"models/metrics/compare/{m}.json" for m in
           ("model", "network_only", "knn", "ml_logdistance", "kriged_map", "oracle")}
V2_LR = 0.0005            # train.lr of the v2 experiment (params.yaml has 0.002)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - DVC's own content hash


def _env(**extra) -> dict:
    """The environment DVC (and the stages it runs) gets: no AWS credentials, no MLflow override."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # hermetic: no ~/.aws files, no EC2 metadata probing when credentials are missing
    env.update(DVC_NO_ANALYTICS="1", AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", MLFLOW_DISABLE_TELEMETRY="true")
    env.update(extra)
    return env


def _run(args, cwd, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _ran(proc: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


def _commit(repo: Path, message: str, tag: str) -> str:
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", message], repo)
    _run(["git", "tag", tag], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


def _registered(repo: Path) -> dict:
    """The model version models/registry.json records, as <repo>/mlflow.db has it: {version, tags}.

    registry.json holds what the inputs determine (a rerun writes the same bytes); the version the
    store gave is found again by its registration key (registry.store.json beside it is git-ignored,
    so `dvc exp apply` does not bring an experiment's back)."""
    from mlflow.tracking import MlflowClient

    record = json.loads((repo / "models/registry.json").read_text())
    found = MlflowClient(f"sqlite:///{repo}/mlflow.db").search_model_versions(record["find_version"])
    assert len(found) == 1, [v.version for v in found]
    return {"version": str(found[0].version), "tags": dict(found[0].tags), "record": record}


def _assert_clean(repo: Path, env=None) -> None:
    """Workspace matches dvc.lock and git: nothing to reproduce, nothing uncommitted."""
    out = _run(["dvc", "status", "--json"], repo, env).stdout
    assert json.loads(out) == {}, out
    assert _run(["git", "status", "--porcelain"], repo).stdout == ""


def _assert_in_sync_with_remote(repo: Path, env=None, remote: str = REMOTE) -> None:
    out = _run(["dvc", "status", "-c", "-r", remote, "--json"], repo, env).stdout
    assert json.loads(out) == {}, out


@pytest.fixture(scope="module")
def weed():
    """This module's own S3 server (one test kills and restarts it)."""
    import services

    yield from services.serve("S3 (SeaweedFS)", services.weed_process())


@pytest.fixture(scope="module")
def v1(weed, tmp_path_factory):
    """The origin clone at tag v1, pushed; facts about its two forced reproductions."""
    s3 = weed.server
    s3.client().create_bucket(Bucket=BUCKET)
    repo = tmp_path_factory.mktemp("reproduce") / "origin"
    repo.mkdir()
    copy_pipeline(repo)
    shutil.copy(REPO_ROOT / ".gitignore", repo / ".gitignore")  # ignores mlflow.db, mlartifacts/
    params = tiny_params_dict(120, **TINY_TRAIN, **{"export_onnx.latency_runs": 10})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    shutil.copy(REPO_ROOT / ".dvc/config", repo / ".dvc/config")
    # Site-specific settings and secrets go to .dvc/config.local (git-ignored), as docs/operations.md says.
    _run(["dvc", "remote", "modify", "--local", REMOTE, "endpointurl", s3.endpoint_url], repo)
    _run(["dvc", "remote", "modify", "--local", REMOTE, "access_key_id", s3.access_key], repo)
    _run(["dvc", "remote", "modify", "--local", REMOTE, "secret_access_key", s3.secret_key], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "pipeline"], repo)

    # Both runs before the v1 commit, so that it records their outputs.
    first = _run(["dvc", "repro"], repo)
    first_md5 = {p: _md5(repo / p) for p in (*OUTS, *METRICS)}
    first_registry = json.loads((repo / "models/registry.store.json").read_text())
    # Same commit, everything forced: every stage really runs again (no run-cache restore).
    second = _run(["dvc", "repro", "-f"], repo)
    second_md5 = {p: _md5(repo / p) for p in (*OUTS, *METRICS)}
    second_registry = json.loads((repo / "models/registry.store.json").read_text())

    rev = _commit(repo, "v1", "v1")
    push = _run(["dvc", "push"], repo)
    return {"repo": repo, "s3": s3, "rev": rev, "md5": second_md5, "first_md5": first_md5,
            "ran": (_ran(first), _ran(second)), "registry": (first_registry, second_registry),
            "test": json.loads((repo / "models/metrics/test.json").read_text()), "push": push,
            "registered": _registered(repo)}


@pytest.fixture(scope="module")
def v2(v1):
    """A queued experiment with another learning rate, applied and committed as tag v2, pushed."""
    repo = v1["repo"]
    _run(["dvc", "exp", "run", "--queue", "-n", "lr-low", "-S", f"train.lr={V2_LR}"], repo)
    _run(["dvc", "queue", "start"], repo)
    deadline = time.monotonic() + 480
    while True:  # the worker runs in the background; wait until the task leaves the queue
        status = _run(["dvc", "queue", "status"], repo).stdout
        line = next((ln for ln in status.splitlines() if " lr-low " in f" {ln} "), "")
        if re.search(r"\b(Success|Failed)\b", line):
            break
        assert time.monotonic() < deadline, f"queued experiment still not done:\n{status}"
        time.sleep(2)
    logs = _run(["dvc", "queue", "logs", "lr-low"], repo, check=False)
    assert "Success" in line, f"{status}\n{logs.stdout[-3000:]}{logs.stderr[-2000:]}"
    show = json.loads(_run(["dvc", "exp", "show", "--json"], repo).stdout)

    _run(["dvc", "exp", "apply", "lr-low"], repo)
    rev = _commit(repo, "v2: train.lr lower", "v2")
    _run(["dvc", "push"], repo)
    return {"rev": rev, "md5": {p: _md5(repo / p) for p in (*OUTS, *METRICS)}, "show": show, "logs": logs.stdout + logs.stderr,
            "test": json.loads((repo / "models/metrics/test.json").read_text()),
            "registry": _registered(repo)}


def test_forced_rerun_from_one_commit_gives_the_same_bytes(v1):
    first_ran, second_ran = v1["ran"]
    stages = {"export_sessions", "extract_features", "train", "evaluate", "export_onnx", "register"}
    assert first_ran == second_ran == stages
    assert v1["md5"] == v1["first_md5"], "a forced rerun changed an output"
    # Same model file and same test metrics -> the register stage recognises the registration.
    first, second = v1["registry"]
    assert first["version"] == second["version"] == "1"
    assert second["tags"]["onnx_md5"] == v1["md5"]["models/model.onnx"]
    assert v1["registered"]["version"] == "1"  # registry.json finds it again in the store


def test_v1_is_committed_clean_and_pushed(v1):
    repo = v1["repo"]
    _assert_clean(repo)
    _assert_in_sync_with_remote(repo)
    keys = [o["Key"] for o in v1["s3"].client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    onnx = v1["md5"]["models/model.onnx"]
    assert f"pipeline/files/md5/{onnx[:2]}/{onnx[2:]}" in keys  # DVC 3 layout under the remote's url


def test_credentials_stay_out_of_git(v1):
    repo = v1["repo"]
    secret = v1["s3"].secret_key
    assert secret in (repo / ".dvc/config.local").read_text()
    tracked = _run(["git", "ls-files"], repo).stdout.split()
    assert ".dvc/config.local" not in tracked and ".dvc/config" in tracked
    for path in tracked:
        assert secret not in (repo / path).read_text(errors="replace"), path
    assert secret not in _run(["git", "log", "-p", "--all"], repo).stdout
    assert secret not in v1["push"].stdout + v1["push"].stderr


def test_queued_experiment_is_listed_and_logs_to_the_repository_store(v1, v2):
    repo = v1["repo"]
    # dvc exp show --json: the experiment under the v1 baseline, with its params and test metrics
    baseline = next(b for b in v2["show"] if b["rev"] == v1["rev"])
    exps = {r["name"]: r["data"] for e in baseline["experiments"] or [] for r in e["revs"]}
    assert "lr-low" in exps, list(exps)
    data = exps["lr-low"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == V2_LR
    assert COMPARE <= set(data["metrics"]), list(data["metrics"])
    shown = data["metrics"]["models/metrics/compare/model.json"]["data"]
    assert {"median_error_m", "p90_error_m", "coverage_2sigma"} <= set(shown)
    # nll and 1σ coverage are not in the table; the experiment's test.json (brought back by `exp apply`) has them
    assert {"median_error_m", "p90_error_m", "nll", "coverage_1sigma", "coverage_2sigma"} <= set(v2["test"])
    assert shown["median_error_m"] == round(v2["test"]["median_error_m"], 1)  # what `exp apply` brought back
    assert baseline["data"]["metrics"]["models/metrics/compare/model.json"]["data"]["median_error_m"] == \
        round(v1["test"]["median_error_m"], 1)

    # The queue ran in a temporary clone, yet its train and register runs are in <repo>/mlflow.db:
    # the registry there now has version 2, and the runs carry the experiment's name.
    assert v2["registry"]["version"] == "2"
    assert v2["registry"]["tags"]["dvc_exp_name"] == "lr-low"
    db = sqlite3.connect(repo / "mlflow.db")
    try:
        exp_runs = db.execute("SELECT r.name FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                              "WHERE t.key = 'dvc_exp_name' AND t.value = 'lr-low'").fetchall()
        lr = db.execute("SELECT p.value FROM params p JOIN tags t ON t.run_uuid = p.run_uuid "
                        "WHERE t.key = 'dvc_exp_name' AND t.value = 'lr-low' AND p.key = 'train.lr'").fetchall()
        versions = db.execute("SELECT version FROM model_versions ORDER BY version").fetchall()
    finally:
        db.close()
    assert len(exp_runs) == 2, exp_runs  # the train run (evaluate logs into it too) and the register run
    assert lr == [(str(V2_LR),)]
    assert versions == [(1,), (2,)]
    assert not list((repo / ".dvc/tmp/exps").rglob("mlflow.db")), "an experiment logged to a temporary store"
    # Lineage comes from the experiment's own dvc.lock, not the parent's (which still described v1).
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    onnx_lock = next(o["md5"] for o in lock["stages"]["export_onnx"]["outs"] if o["path"] == "models/model.onnx")
    assert v2["registry"]["tags"]["onnx_md5"] == onnx_lock == v2["md5"]["models/model.onnx"]
    assert "dvc.lock records md5" not in v2["logs"]


def test_v2_differs_where_it_should(v1, v2):
    repo = v1["repo"]
    _assert_clean(repo)
    _assert_in_sync_with_remote(repo)
    same = ("data/sessions.h5", "data/features.h5")  # a train param: the data stages did not rerun
    assert {p: v2["md5"][p] for p in same} == {p: v1["md5"][p] for p in same}
    assert v2["md5"]["models/model.ckpt"] != v1["md5"]["models/model.ckpt"]
    assert v2["md5"]["models/model.onnx"] != v1["md5"]["models/model.onnx"]


def test_metrics_and_plots_diff_between_tags(v1, v2, tmp_path):
    repo = v1["repo"]
    diff = json.loads(_run(["dvc", "metrics", "diff", "v1", "v2", "--json"], repo).stdout)
    median = diff["models/metrics/compare/model.json"]["median_error_m"]
    assert median["old"] == round(v1["test"]["median_error_m"], 1)
    assert median["new"] == round(v2["test"]["median_error_m"], 1)
    assert median["diff"] == pytest.approx(median["new"] - median["old"])

    plots = json.loads(_run(["dvc", "plots", "diff", "v1", "v2", "--json", "-o", str(tmp_path / "plots")],
                            repo).stdout)["data"]
    assert {"learning_curve", "error_quantiles_km", "calibration", "models/plots/evaluate/map.png"} <= set(plots)
    curve = plots["learning_curve"][0]
    assert curve["revisions"] == ["v1", "v2"]
    rows = curve["content"]["data"]["values"]
    assert {r["rev"] for r in rows} == {"v1", "v2"}
    val = {rev: [float(r["val_loss"]) for r in rows if r["rev"] == rev and r["field"] == "val_loss"]
           for rev in ("v1", "v2")}
    with open(repo / "models/plots/train/learning_curve.csv") as fh:  # the workspace is at v2
        assert val["v2"] == [float(r["val_loss"]) for r in csv.DictReader(fh)]
    assert len(val["v1"]) == len(val["v2"]) == 1 and val["v1"] != val["v2"]  # one epoch each, another lr
    assert _run(["git", "status", "--porcelain"], repo).stdout == ""  # rendered outside the repo


def test_fresh_clone_pulls_v1_byte_for_byte(v1, v2, tmp_path):
    s3 = v1["s3"]
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(v1["repo"]), str(clone)], tmp_path)
    _run(["git", "checkout", "-q", "v1"], clone)
    # A user of the committed config only has to say where MinIO is (here: loopback)...
    _run(["dvc", "remote", "modify", "--local", REMOTE, "endpointurl", s3.endpoint_url], clone)

    # ...and who they are. Without credentials: DVC's own error, and nothing half-written.
    denied = _run(["dvc", "pull"], clone, check=False)
    assert denied.returncode != 0
    message = denied.stdout + denied.stderr
    assert "failed to connect to s3" in message and "Unable to locate credentials" in message, message[-2000:]
    assert not any((clone / p).exists() for p in OUTS)
    assert not [p for p in (clone / "data").rglob("*") if p.is_file() and p.name != ".gitignore"]

    # With credentials from the standard AWS variables: v1's outputs, byte for byte.
    creds = _env(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key)
    _run(["dvc", "pull"], clone, creds)
    assert {p: _md5(clone / p) for p in (*OUTS, *METRICS)} == v1["md5"]
    _assert_clean(clone, creds)
    _assert_in_sync_with_remote(clone, creds)

    # and v2 the same way
    _run(["git", "checkout", "-q", "v2"], clone)
    _run(["dvc", "pull"], clone, creds)
    assert {p: _md5(clone / p) for p in (*OUTS, *METRICS)} == v2["md5"]
    _assert_clean(clone, creds)


def test_push_completes_after_the_s3_server_crashed_mid_push(v1, weed):
    """SIGSTOP freezes the server with the push's requests in flight; SIGKILL crashes it there."""
    import signal

    repo, s3 = v1["repo"], v1["s3"]
    s3.client().create_bucket(Bucket="heimdall-dvc-crash")
    _run(["dvc", "remote", "add", "--local", "crash", "s3://heimdall-dvc-crash/pipeline"], repo)
    for key, value in (("endpointurl", s3.endpoint_url), ("access_key_id", s3.access_key),
                       ("secret_access_key", s3.secret_key)):
        _run(["dvc", "remote", "modify", "--local", "crash", key, value], repo)

    os.kill(weed.proc.pid, signal.SIGSTOP)
    push = subprocess.Popen(["dvc", "push", "-r", "crash"], cwd=repo, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(4)
        assert push.poll() is None, "the push finished against a frozen server"
        weed.kill()  # SIGKILL also ends the stopped process
        out, _ = push.communicate(timeout=300)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode != 0, out[-2000:]

    weed.start()  # same data directory, ports and credentials
    assert _run(["dvc", "status", "-c", "-r", "crash", "--json"], repo).stdout.strip() not in ("{}", "")
    _run(["dvc", "push", "-r", "crash"], repo)
    _assert_in_sync_with_remote(repo, remote="crash")
    _assert_in_sync_with_remote(repo)  # the main remote survived the crash as well


def test_queued_run_logs_to_dvc_root_but_reads_lineage_from_its_clone(tmp_path, monkeypatch):
    """What DVC gives a queued experiment's stage: cwd = a clone under .dvc/tmp/exps/, DVC_ROOT = the
    parent repository. The store is the parent's; dvc.lock md5s are the clone's (fast, no DVC run)."""
    from heimdall import tracking

    parent = tmp_path / "repo"
    clone = parent / ".dvc/tmp/exps/tmpabc123"
    for root, md5 in ((parent, "a" * 32), (clone, "b" * 32)):
        (root / ".dvc").mkdir(parents=True, exist_ok=True)
        (root / "dvc.lock").write_text(yaml.safe_dump(
            {"schema": "2.0", "stages": {"export_onnx": {"outs": [{"path": "models/model.onnx", "md5": md5}]}}}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(parent))
    monkeypatch.chdir(clone)
    assert tracking.tracking_uri() == f"sqlite:///{parent.resolve()}/mlflow.db"
    assert tracking.workspace_root() == clone.resolve()
    assert tracking.dvc_lock_md5("models/model.onnx") == "b" * 32
