"""Shared helpers of the performance benchmarks (docs/performance.md): params with overrides (and
written to a file for the CLI), the `heimdall <verb>` CLI in a child process, medians of repeated
runs, the machine's description, tables and JSON results.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def params(overrides: dict | None = None, base: Path = REPO / "params.yaml"):
    """params.yaml with dotted-key overrides ({"export_sessions.n_sessions": 1000}), validated."""
    from heimdall.params import Params

    raw = yaml.safe_load(base.read_text())
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return Params.model_validate(raw)


def write_params(params, path: Path) -> Path:
    """Write validated params (from ``params()``) as a params.yaml the CLI reads with ``--params``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False))
    return path


def heimdall(verb: str, *args, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``heimdall <verb> <args> --no-progress`` (this interpreter's CLI) -> the summary it prints
    on its last stderr line (``heimdall <verb>: {...}``, including ``wall_time_s``)."""
    cmd = [sys.executable, "-m", "heimdall", *verb.split(), *(str(a) for a in args), "--no-progress"]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, text=True, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"heimdall {verb} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = proc.stderr.strip().splitlines()[-1]
    return json.loads(line.split(": ", 1)[1])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs) -> float:
    return float(statistics.median(xs))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import h5py
    import torch
    import torchaudio

    cpu = cpu_model()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(), "torch": torch.__version__, "torchaudio": torchaudio.__version__,
        "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: VmHWM of /proc/self/status. (ru_maxrss would
    be wrong in a child: Linux carries the parent's high-water mark over fork/vfork + exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_python(code: str, cwd: Path = REPO) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, text=True, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def save(name: str, result: dict, out: Path | None = None) -> Path:
    """Write the benchmark's JSON (default benchmarks/results/<name>.json: the committed results that
    docs/performance.md quotes; pass ``out`` for a trial run)."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2) + "\n")
    return path
