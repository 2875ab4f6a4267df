"""MLflow tracking: where runs go, and the lineage tags every run carries.

Default store: an embedded SQLite database at ``<repo>/mlflow.db`` with artifacts under
``<repo>/mlartifacts`` — an absolute path at the repository root (``DVC_ROOT`` when DVC runs the
stage), so `dvc repro`, `dvc exp run` and queued experiments all log to one place.
``MLFLOW_TRACKING_URI`` overrides it (e.g. an MLflow server backed by PostgreSQL + S3).

Lineage (the git commit and the dvc.lock md5s) comes from the *workspace* the stage runs in, which
is not always ``DVC_ROOT``: a queued experiment (`dvc exp run --queue`) runs in a temporary clone
under ``.dvc/tmp/exps/`` with its own dvc.lock, while DVC points ``DVC_ROOT`` at the parent
repository so that its runs land in the parent's store.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def workspace_root() -> Path:
    """The DVC workspace this process runs in: the nearest ancestor of the cwd holding ``.dvc/``.

    DVC runs a stage with the cwd at its workspace (the repository, or an experiment's temporary
    clone); outside DVC this is the checkout the cwd is in.
    """
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / ".dvc").is_dir():
            return d
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DEFAULT_DB}"


def redact_uri(uri: str) -> str:
    """A URI safe to write down: user info (user:password@) and secret-looking query values removed."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(uri)
    out = uri
    if "@" in parts.netloc:
        out = out.replace(parts.netloc, parts.netloc.rsplit("@", 1)[-1], 1)
    if parts.query:
        secret = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "signature")
        query = [(k, "REDACTED" if any(s in k.lower() for s in secret) else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        out = out.replace("?" + parts.query, "?" + urlencode(query), 1)
    return out


def scrub(text: str) -> str:
    """Remove user info from every URL in a message (server errors quote the URL they called)."""
    import re

    return re.sub(r"(//)[^/@\s]+@", r"\1", text)


def artifact_location() -> str | None:
    """Artifact root for experiments created here (only for the embedded default store)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the server decides
    return (repo_root() / DEFAULT_ARTIFACTS).as_uri()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=workspace_root())
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_lock_md5(path: str | Path) -> str:
    """md5 DVC recorded in dvc.lock for an output path ('unknown' outside a DVC pipeline)."""
    lock = workspace_root() / "dvc.lock"
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return "unknown"
    target = Path(path).as_posix()
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == target:
                return str(out.get("md5", "unknown"))
    return "unknown"


def run_tags(features_path: str | Path) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "features_md5": dvc_lock_md5(features_path)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numbers(d: dict) -> dict[str, float]:
    """The finite numbers of a nested dict, keys dotted (what MLflow metrics can hold)."""
    import math

    return {k: float(v) for k, v in flatten(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def write_timings(metrics_path: str | Path, timings: dict[str, float]) -> Path:
    """Wall-clock timings of a stage beside its metrics file, as ``<name>.timings.json``.

    Not a DVC output (git-ignored): timings differ on every run, and DVC-tracked outputs must be
    byte-identical when nothing changed. They also go to MLflow with the stage's run."""
    import json

    from heimdall.atomic import atomic_path

    path = Path(metrics_path).with_suffix(".timings.json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({k: round(float(v), 3) for k, v in timings.items()}, indent=2, sort_keys=True) + "\n")
    return path


def run_for_checkpoint(experiment: str, checkpoint_md5: str):
    """(MlflowClient, run id) of the training run that wrote the checkpoint with this md5 (tag
    ``checkpoint_md5``), or a new run with that tag when there is none (a checkpoint restored by
    ``dvc pull`` on another machine): the evaluate stage logs its test metrics there."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location())
    runs = client.search_runs([exp_id], f"tags.checkpoint_md5 = '{checkpoint_md5}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        return client, runs[0].info.run_id
    run = client.create_run(exp_id, tags={"checkpoint_md5": checkpoint_md5,
                                          mlflow.utils.mlflow_tags.MLFLOW_RUN_NAME: "evaluate"})
    return client, run.info.run_id


def mlflow_logger(params):
    """Lightning's MLFlowLogger on the project's store, with the params this stage used."""
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(
        experiment_name=params.train.mlflow_experiment,
        tracking_uri=tracking_uri(),
        artifact_location=artifact_location(),
        run_name=os.environ.get("DVC_EXP_NAME") or None,
        log_model=False,
    )
    from heimdall.numerics import describe

    used = {s: params.model_dump(mode="json")[s] for s in ("extract_features", "model", "train")}
    # the CPU-numerics pins in effect and what each library dispatches to (docs/reproducibility.md)
    logger.log_hyperparams({**flatten(used), **describe()})
    return logger
