"""The whole pipeline from a fresh clone: full `dvc repro` wall time per stage, then no-op `dvc repro`.

    python benchmarks/pipeline.py [--noop-repeats 5] [--setup]

Clones this repository's HEAD (committed files only) into a temp dir and runs the README's main
job there. Setup is excluded and reported separately: by default the clone reuses this
interpreter's environment (the clone's own src/ first on PYTHONPATH); with --setup the README's
install step (`python3 -m venv .venv && pip install -r requirements.lock && pip install --no-deps -e .`,
through this machine's pip configuration) is timed first in the clone. Per-stage times are the
`wall_time_s` each `heimdall <verb>` prints on its last line. MLflow writes to the clone's own sqlite
store. Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

STAGES = ("export_sessions", "extract_features", "train", "evaluate", "export_onnx", "register")
SUMMARY = re.compile(r"^heimdall ([a-z-]+): (\{.*\})\s*$")


def sh(cmd: str, cwd: Path, env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--noop-repeats", type=int, default=5)
    ap.add_argument("--setup", action="store_true", help="also time the README's install step in the clone")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=B.REPO,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print("note: the working tree has uncommitted changes; the clone measures HEAD", flush=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=B.REPO, capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="heimdall-bench-pipeline-"))
    clone = work / "heimdall"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEIMDALL_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    res: dict = {"commit": head}
    try:
        res["clone_s"], _ = sh(f"git clone --quiet {B.REPO} {clone}", work, env)
        if args.setup:
            res["setup_s"], _ = sh("python3 -m venv .venv && . .venv/bin/activate && "
                                   "pip install --quiet -r requirements.lock && pip install --quiet --no-deps -e .",
                                   clone, env)
            env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
        else:
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
            env["PYTHONPATH"] = str(clone / "src")
        print(f"full `dvc repro` in {clone} ...", flush=True)
        res["full_repro_s"], log = sh("dvc repro", clone, env)
        stage_s = {}
        for line in log.splitlines():
            m = SUMMARY.match(line.strip())
            if m:
                stage_s[m.group(1).replace("-", "_")] = json.loads(m.group(2)).get("wall_time_s")
        res["stage_wall_s"] = stage_s
        _, status = sh("dvc status --json", clone, env)
        res["status_after"] = status.strip()
        noop = []
        for _ in range(args.noop_repeats):
            wall, out = sh("dvc repro", clone, env)
            noop.append(wall)
        res["noop_repro_runs_s"] = noop
        res["noop_repro_s"] = B.median(noop)
        res["noop_last_output"] = out.strip()[-300:]
    finally:
        if args.keep:
            print(f"kept {clone}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows = [[s, res["stage_wall_s"].get(s, "")] for s in STAGES]
    rows += [["dvc overhead (total - stages)", res["full_repro_s"] - sum(v for v in res["stage_wall_s"].values() if v)],
             ["full dvc repro", res["full_repro_s"]],
             [f"no-op dvc repro (median of {args.noop_repeats})", res["noop_repro_s"]],
             ["setup (README install step)", res.get("setup_s", "not measured (--setup)")],
             ["git clone", res["clone_s"]]]
    print(f"\nfresh clone of {head[:10]}, default params:")
    print(B.table(["step", "seconds"], rows))
    print(f"full repro {res['full_repro_s'] / 60:.1f} min (target <= 15); no-op {res['noop_repro_s']:.2f} s (target <= 5)")
    path = B.save("pipeline", res, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
