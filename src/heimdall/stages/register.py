"""Stage register: models/model.onnx -> a new version of the MLflow registered model.

1. Log the ONNX file to MLflow (``mlflow.onnx.log_model``, CPU execution provider, one file) in a
   run tagged with its lineage: git commit, the dvc.lock md5s of data/features.h5 and
   models/model.onnx, ``DVC_EXP_NAME`` when DVC runs an experiment, and the test metrics.
2. Register it as a new version of ``register.model_name`` with the same tags.
3. Alias ``candidate`` -> the new version. Alias ``champion`` moves to it only if its test
   ``median_error_m`` is strictly lower than the current champion's (or there is no champion); a
   production run (no test split: nothing measured) never takes it by itself.
4. Write ``models/registry.json`` (DVC output: model name, registration key, ONNX md5, test metrics —
   what the inputs determine, byte-identical on a rerun) and ``models/registry.store.json`` beside it
   (git-ignored: version, aliases, run id, tracking URI without credentials — what the store decided).

DVC declares registry.json ``cache: false``: DVC's run-cache could otherwise "restore" the stage
without running it, and a registry entry cannot be restored from a cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
from pathlib import Path

from heimdall.atomic import md5_file, write_json
from heimdall.errors import HeimdallError
from heimdall.params import Params
from heimdall.tracking import artifact_location, dvc_lock_md5, git_commit, redact_uri, scrub, tracking_uri

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
# the test metrics copied onto the run (as metrics) and the model version (as tags, "test.<key>")
TEST_KEYS = ("n_test", "median_error_m", "mean_error_m", "p90_error_m", "rmse_m", "nll",
             "coverage_1sigma", "coverage_2sigma", "crlb_rmse_m")


def store_path(registry_json: str | Path) -> Path:
    """Where register writes what the MLflow store decided (version, aliases, run): beside registry.json."""
    return Path(registry_json).with_suffix(".store.json")


def _test_metrics(path: Path) -> dict[str, float]:
    try:
        test = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HeimdallError(f"{path}: cannot read the test metrics: {e}") from None
    if test.get("production_run") is True and test.get("n_test") == 0:
        return {"n_test": 0.0}  # nothing held out (evaluate.PRODUCTION_NOTE): registered, never champion by itself
    out = {k: float(test[k]) for k in TEST_KEYS if isinstance(test.get(k), (int, float))}
    if not math.isfinite(out.get("median_error_m", math.nan)):
        raise HeimdallError(f"{path}: no finite 'median_error_m' (the champion rule needs it)")
    for name, b in (test.get("baselines") or {}).items():
        if isinstance(b, dict) and isinstance(b.get("median_error_m"), (int, float)):
            out[f"baselines.{name}.median_error_m"] = float(b["median_error_m"])
    return out


def _signature(onnx_path: Path):
    """Tensor signature of the graph (dynamic axes as -1) so MLflow's model page documents it."""
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def specs(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorSpec(dtype, shape, v.name))
        return Schema(out)

    return ModelSignature(inputs=specs(proto.graph.input), outputs=specs(proto.graph.output)), proto


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location())
    except MlflowException as e:  # created concurrently (another register, or train)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise e from None
        return exp.experiment_id


def run(params: Params, onnx_path: str | Path, test_metrics_path: str | Path, out: str | Path) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    onnx_path, test_metrics_path, out = Path(onnx_path), Path(test_metrics_path), Path(out)
    p = params.registry
    if not onnx_path.exists():
        raise HeimdallError(f"{onnx_path}: ONNX model not found (run the export_onnx stage first)")
    metrics = _test_metrics(test_metrics_path)
    onnx_md5 = md5_file(onnx_path)
    lock_md5 = dvc_lock_md5(onnx_path.as_posix())
    if lock_md5 not in ("unknown", onnx_md5):
        log.warning("dvc.lock records md5 %s for %s but the file has %s; tagging the file's", lock_md5, onnx_path,
                    onnx_md5)
    tags = {
        "git_commit": git_commit(),
        "features_md5": dvc_lock_md5("data/features.h5"),
        "onnx_md5": onnx_md5,
        **({"dvc_exp_name": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),
        **{f"test.{k}": repr(v) for k, v in metrics.items()},
    }
    # Idempotency: a rerun after a failure part-way (e.g. the server went away after the version was
    # created) finds that version instead of registering the same model and metrics twice.
    key = hashlib.sha256(json.dumps({"onnx_md5": onnx_md5, "test": metrics}, sort_keys=True).encode()).hexdigest()
    tags["registration_key"] = key
    # Bounded waits on an unreachable server (MLflow's own defaults retry for minutes); the user's
    # settings win.
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(var, value)
    uri = tracking_uri()
    safe_uri = redact_uri(uri)
    mlflow.set_tracking_uri(uri)

    # Concurrency: registrations on one local store (sqlite, file) are serialised by a file lock, from the
    # store's creation to the aliases; on a server, two registrations of one key may both create a version,
    # and both then keep the lowest one (the other is deleted), so the aliases and registry.json agree.
    with _store_lock(uri):
        client = MlflowClient(uri)
        try:
            _ensure_registered(client, p.model_name)
            find = f"name = '{p.model_name}' and tags.registration_key = '{key}'"
            existing = client.search_model_versions(find)
            if existing:
                mv = min(existing, key=lambda v: int(v.version))
                run_id = mv.run_id
                log.info("%s version %s already registers this model with these metrics: reusing it", p.model_name,
                         mv.version)
            else:
                mv, run_id = _log_and_register(client, p, tags, metrics, onnx_path)
                mv, run_id = _dedupe(client, p.model_name, find, mv, run_id)
            version, aliases, promoted, champ, champ_err = _set_aliases(client, p.model_name, version=str(mv.version),
                                                                        metrics=metrics)
        except MlflowException as e:
            raise HeimdallError(f"MLflow at {safe_uri}: {scrub(str(e).strip().splitlines()[0])}") from None
    return _write_records(p, key, onnx_md5, metrics, version, aliases, run_id, safe_uri, promoted, champ, champ_err,
                          tags, out)


def _set_aliases(client, name: str, version: str, metrics: dict):
    from mlflow.exceptions import MlflowException

    client.set_registered_model_alias(name, CANDIDATE, version)

    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    champ_err = float(champ.tags.get("test.median_error_m", "inf")) if champ is not None else math.inf
    # a production run measured nothing: it never becomes champion by itself, not even in an empty
    # registry (promote it by hand: docs/operations.md "Production runs")
    promoted = "median_error_m" in metrics and metrics["median_error_m"] < champ_err
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    aliases = sorted(client.get_model_version(name, version).aliases)
    return version, aliases, promoted, champ, champ_err


def _write_records(p, key, onnx_md5, metrics, version, aliases, run_id, safe_uri, promoted, champ, champ_err,
                   tags, out: Path) -> dict:
    # registry.json (the DVC output) holds what the inputs determine, so reruns and fresh clones give
    # the same bytes; what the store decided (version, aliases, run) depends on its history and goes
    # beside it, git-ignored: registry.store.json. The registration key finds the version again.
    record = {
        "name": p.model_name,
        "registration_key": key,
        "find_version": f"name = '{p.model_name}' and tags.registration_key = '{key}'",
        "onnx_md5": onnx_md5,
        "test": metrics,
    }
    store = {
        "name": p.model_name,
        "version": version,
        "aliases": aliases,
        "model_uri": f"models:/{p.model_name}/{version}",
        "run_id": run_id,
        "tracking_uri": safe_uri,
        "promoted_to_champion": promoted,
        "champion_version": version if promoted else (str(champ.version) if champ is not None else None),
        "test_median_error_m": metrics.get("median_error_m"),
        "previous_champion_median_error_m": None if champ is None else champ_err,
        "registration_key": key,
        "tags": tags,
    }
    write_json(store_path(out), store)
    write_json(out, record)
    log.info("registered %s version %s (%s)", p.model_name, version, ", ".join(aliases))
    return {"name": p.model_name, "version": version, "aliases": aliases, "promoted_to_champion": promoted}


def _log_and_register(client, p, tags: dict, metrics: dict, onnx_path: Path):
    """Log the ONNX file in a new run and create a model version from it -> (version, run id)."""
    import mlflow

    signature, proto = _signature(onnx_path)
    experiment_id = _experiment_id(client, p.mlflow_experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or "register",
                          tags={**tags, "heimdall.stage": "register"}) as active:
        mlflow.log_metrics({f"test_{k.replace('.', '_')}": v for k, v in metrics.items()})
        info = mlflow.onnx.log_model(
            proto, name="model", signature=signature, onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,  # one self-contained file, like models/model.onnx
        )
        run_id = active.info.run_id
    # model_id: an MLflow server rejects a models:/ source without it (the embedded store does not)
    mv = client.create_model_version(p.model_name, info.model_uri, run_id=run_id, tags=tags,
                                     model_id=info.model_id)
    return mv, run_id


def _ensure_registered(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Heimdall LocalizationNet (ONNX): WebSDR receivers' "
                                           "features -> transmitter position with a 2x2 covariance.")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another registration created it meanwhile: fine
                raise


def _dedupe(client, name: str, find: str, mv, run_id: str):
    """After creating ``mv``: if a concurrent registration created a version with the same key too, every
    process keeps the lowest version and deletes its own extra one -> (kept version, its run id)."""
    same = client.search_model_versions(find)
    if len(same) <= 1:
        return mv, run_id
    keep = min(same, key=lambda v: int(v.version))
    if str(keep.version) != str(mv.version):
        log.warning("%s version %s registers the same model concurrently: keeping it, deleting version %s", name,
                    keep.version, mv.version)
        client.delete_model_version(name, str(mv.version))
    return keep, keep.run_id


def _store_path(uri: str) -> Path | None:
    """The lock file of a local store (sqlite database, file store), None for a server."""
    from urllib.parse import urlsplit

    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        return None if db in ("", ":memory:") else Path(db).with_name(Path(db).name + ".register.lock")
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return Path(parts.path) / ".register.lock"
    return None


@contextlib.contextmanager
def _store_lock(uri: str):
    """Exclusive inter-process lock on a local store for the duration of a registration (nothing on servers)."""
    path = _store_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
