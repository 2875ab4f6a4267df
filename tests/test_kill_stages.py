"""Kill every stage at random points (SIGKILL and SIGTERM): no output is ever left half-written, and
the next `dvc repro` succeeds with outputs byte-identical to an uninterrupted run."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import TINY_TRAIN, tiny_params_dict
from test_dvc_pipeline import _env, _run, pipeline_repo  # noqa: F401 - fixture reused

pytestmark = pytest.mark.slow

STAGES = ("export_sessions", "extract_features", "train", "evaluate", "export_onnx", "register")
VERBS = {"export_sessions": "export-sessions", "extract_features": "extract-features", "train": "train",
         "evaluate": "evaluate", "export_onnx": "export-onnx", "register": "register"}
# outputs whose bytes must be reproducible (registry.json records what the inputs determine; the version
# the store gave is in the git-ignored registry.store.json beside it, which differs by design)
OUTPUTS = ("data/sessions.h5", "data/features.h5", "models/model.ckpt", "models/metrics/train.json",
           "models/metrics/test.json", "models/metrics/compare/model.json", "models/model.onnx",
           "models/registry.json")
# the JSON and CSV outputs a stage writes besides the files above (checked complete after every kill)
JSON_OUTPUTS = ("models/metrics/train.json", "models/metrics/test.json", "models/metrics/onnx.json")
CSV_OUTPUTS = ("models/plots/train/learning_curve.csv", "models/plots/evaluate/error_cdf.csv",
               "models/plots/evaluate/calibration.csv")
PNG_END = b"IEND\xaeB`\x82"  # a PNG's last chunk: a truncated PNG lacks it
ROUNDS = 4  # kills per stage: every stage is killed twice with SIGTERM and twice with SIGKILL
N_KILLS = ROUNDS * len(STAGES)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tiny_pipeline_params() -> dict:
    return tiny_params_dict(120, **{**TINY_TRAIN, "export_onnx.latency_runs": 10})


def _assert_outputs_valid(repo: Path) -> None:
    """Every output that exists is a complete, readable file of its kind."""
    from heimdall import contracts as c
    from heimdall.checkpoint import load_checkpoint
    from heimdall.export.runtime import load_onnx_session

    for rel, fmt, layout in (("data/sessions.h5", c.SESSIONS_FORMAT, c.SESSIONS_LAYOUT),
                             ("data/features.h5", c.FEATURES_FORMAT, c.FEATURES_LAYOUT)):
        if (repo / rel).exists():
            with c.open_checked(repo / rel, fmt) as f:
                c.validate_layout(f, layout, repo / rel)
    if (repo / "models/model.ckpt").exists():
        load_checkpoint(repo / "models/model.ckpt")
    if (repo / "models/model.onnx").exists():
        load_onnx_session(repo / "models/model.onnx")
    for path in [*(repo / rel for rel in JSON_OUTPUTS), *(repo / "models/metrics/compare").glob("*.json")]:
        if path.exists():
            assert json.loads(path.read_text()), f"{path}: empty"
    for rel in CSV_OUTPUTS:
        if (repo / rel).exists():
            with open(repo / rel, newline="") as fh:
                rows = list(csv.DictReader(fh))
            assert rows and all(None not in r and None not in r.values() for r in rows), f"{rel}: truncated"
    for path in (repo / "models/plots").rglob("*.png"):
        assert path.read_bytes().endswith(PNG_END), f"{path}: truncated PNG"
    if (repo / "models/registry.json").exists():
        assert yaml.safe_load((repo / "models/registry.json").read_text())["registration_key"]
    if (repo / "models/registry.store.json").exists():
        assert yaml.safe_load((repo / "models/registry.store.json").read_text())["version"]


def _stage_process(dvc: subprocess.Popen, verb: str, timeout_s: float) -> psutil.Process | None:
    """The `heimdall <verb>` process DVC started, once it exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and dvc.poll() is None:
        try:
            for child in psutil.Process(dvc.pid).children(recursive=True):
                cmd = child.cmdline()
                if any(a.endswith("heimdall") for a in cmd) and verb in cmd:
                    return child
        except psutil.Error:
            pass
        time.sleep(0.02)
    return None


def _kill_once(repo: Path, stage: str, delay_s: float, sig: signal.Signals, kills: list) -> bool:
    """Run one stage (forced) and send it ``sig`` ``delay_s`` after its process appears."""
    dvc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=repo, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc = _stage_process(dvc, VERBS[stage], timeout_s=60)
        assert proc is not None, f"stage {stage}: its process never appeared"
        time.sleep(delay_s)
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return False  # it finished first
        kills.append((stage, sig.name, delay_s))
        dvc.wait(timeout=120)
        return True
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()


def test_random_kills_never_corrupt_and_repro_recovers(pipeline_repo):
    repo = pipeline_repo
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_pipeline_params(), sort_keys=False))

    # Uninterrupted reference, stage by stage, to learn how long each stage's process lives.
    durations = {}
    for stage in STAGES:
        dvc = subprocess.Popen(["dvc", "repro", "-s", stage], cwd=repo, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        proc = _stage_process(dvc, VERBS[stage], timeout_s=60)
        assert proc is not None, f"stage {stage}: its process never appeared"
        started = time.monotonic()
        try:
            proc.wait(timeout=300)  # returns when it exits (DVC, its parent, reaps it)
        except psutil.NoSuchProcess:
            pass
        durations[stage] = time.monotonic() - started
        assert dvc.wait(timeout=120) == 0, f"reference run of {stage} failed"
    reference = {rel: _md5(repo / rel) for rel in OUTPUTS}

    rng = random.Random(20261123)
    kills: list[tuple[str, str, float]] = []
    for i in range(N_KILLS):
        stage = STAGES[i % len(STAGES)]
        sig = signal.SIGKILL if (i // len(STAGES)) % 2 else signal.SIGTERM  # each stage gets both signals
        upper = 0.8 * durations[stage]
        for _attempt in range(4):  # a machine busier during the reference run: retry with a shorter delay
            if _kill_once(repo, stage, rng.uniform(0.0, upper), sig, kills):
                break
            upper *= 0.5
        _assert_outputs_valid(repo)

    assert len(kills) == N_KILLS, f"only {len(kills)} kills landed"
    assert {k[0] for k in kills} == set(STAGES)
    assert {(k[0], k[1]) for k in kills} == {(s, sig) for s in STAGES for sig in ("SIGTERM", "SIGKILL")}

    _run(["dvc", "repro"], repo)
    _assert_outputs_valid(repo)
    assert {rel: _md5(repo / rel) for rel in OUTPUTS} == reference
    status = _run(["dvc", "status"], repo)
    assert "up to date" in status
    assert not list(repo.rglob(".*.tmp-*")), "temporaries left behind after a successful run"
