"""Kill every stage at random points (SIGKILL and SIGTERM): no output is ever left half-written, and
the next `dvc repro` succeeds with outputs byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
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

STAGES = ("export_sessions", "extract_features", "train", "export_onnx", "register")
VERBS = {"export_sessions": "export-sessions", "extract_features": "extract-features", "train": "train",
         "export_onnx": "export-onnx", "register": "register"}
# outputs whose bytes must be reproducible (registry.json names a registry version: it differs by design)
OUTPUTS = ("data/sessions.h5", "data/features.h5", "models/model.ckpt", "models/model.onnx")
N_KILLS = 20


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tiny_pipeline_params() -> dict:
    return tiny_params_dict(120, **{**TINY_TRAIN, "export_onnx.latency_runs": 10})


def _assert_outputs_valid(repo: Path) -> None:
    """Every output that exists is a complete, readable file of its kind."""
    from heimdall import contracts as c
    from heimdall.stages.export_onnx import load_onnx_session
    from heimdall.stages.train import load_checkpoint

    for rel, fmt, layout in (("data/sessions.h5", c.SESSIONS_FORMAT, c.SESSIONS_LAYOUT),
                             ("data/features.h5", c.FEATURES_FORMAT, c.FEATURES_LAYOUT)):
        if (repo / rel).exists():
            with c.open_checked(repo / rel, fmt) as f:
                c.validate_layout(f, layout, repo / rel)
    if (repo / "models/model.ckpt").exists():
        load_checkpoint(repo / "models/model.ckpt")
    if (repo / "models/model.onnx").exists():
        load_onnx_session(repo / "models/model.onnx")
    if (repo / "models/registry.json").exists():
        assert yaml.safe_load((repo / "models/registry.json").read_text())["version"]


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
        upper = 0.8 * durations[stage]
        for _attempt in range(4):  # a machine busier during the reference run: retry with a shorter delay
            if _kill_once(repo, stage, rng.uniform(0.0, upper), signal.SIGKILL if i % 2 else signal.SIGTERM, kills):
                break
            upper *= 0.5
        _assert_outputs_valid(repo)

    assert len(kills) == N_KILLS, f"only {len(kills)} kills landed"
    assert {k[0] for k in kills} == set(STAGES)

    _run(["dvc", "repro"], repo)
    _assert_outputs_valid(repo)
    assert {rel: _md5(repo / rel) for rel in OUTPUTS} == reference
    status = _run(["dvc", "status"], repo)
    assert "up to date" in status
    assert not list(repo.rglob(".*.tmp-*")), "temporaries left behind after a successful run"
