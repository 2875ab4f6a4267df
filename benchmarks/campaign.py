"""The whole pipeline at growing campaign sizes: wall time and peak RSS per stage, and accuracy beside
the oracle's, on the synthetic default (issue 21: 6,000 / 24,000 / 100,000 sessions).

    python benchmarks/campaign.py [--sessions 6000 24000 100000] [--duration-s 0.25 ...] [--workdir DIR]
                                  [--keep benchmarks/results/campaign.json]

For each size, params.yaml with `export_sessions.n_sessions` (and, given, `export_sessions.duration_s`:
shorter IQ for large campaigns) overridden runs `heimdall export-sessions`, `extract-features`, `train`,
`evaluate` and `export-onnx` as the pipeline runs them, each in a child process of its own: its wall time
and its peak resident memory (the child's ru_maxrss from wait4) are recorded. From the evaluate stage's
test.json: the model's test median / mean error beside the oracle's (the simulator's true map, same
likelihood search) and kNN's, and the mean area of the 90 % search region beside the oracle's.
(register is left out: it copies the ONNX file into MLflow, independent of the campaign size.)

Prints a table, writes benchmarks/results/campaign.json. Results in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

STAGES = ("export-sessions", "extract-features", "train", "evaluate", "export-onnx")


def run_stage(verb: str, args: list, env: dict, log_path: Path) -> dict:
    """``heimdall <verb> <args>`` in a child process -> {"wall_s", "peak_rss_mib"}; raises on failure."""
    cmd = [sys.executable, "-m", "heimdall", verb, *(str(a) for a in args), "--no-progress"]
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=B.REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"heimdall {verb} failed ({proc.returncode}), see {log_path}:\n"
                           + log_path.read_text()[-3000:])
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}  # Linux: KiB


def campaign(n: int, duration_s: float | None, work: Path, progress=lambda stages: None) -> dict:
    overrides = {"export_sessions.n_sessions": n}
    if duration_s is not None:
        overrides["export_sessions.duration_s"] = duration_s
    p = B.params(overrides)
    d = work / f"{n}"
    d.mkdir(parents=True, exist_ok=True)
    pfile = B.write_params(p, d / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db"}
    sessions, features, models = d / "sessions.h5", d / "features.h5", d / "models"
    argv = {
        "export-sessions": ["--out", sessions],
        "extract-features": ["--sessions", sessions, "--out", features],
        "train": ["--features", features, "--out", models / "model.ckpt", "--metrics", models / "metrics/train.json",
                  "--plots-dir", models / "plots/train"],
        "evaluate": ["--features", features, "--checkpoint", models / "model.ckpt", "--metrics-dir", models / "metrics",
                     "--plots-dir", models / "plots/evaluate"],
        "export-onnx": ["--features", features, "--checkpoint", models / "model.ckpt", "--out", models / "model.onnx",
                        "--metrics", models / "metrics/onnx.json"],
    }
    stages = {}
    for verb in STAGES:
        stages[verb] = run_stage(verb, ["--params", pfile, *argv[verb]], env, d / f"{verb}.log")
        print(f"  {n} sessions: {verb} {stages[verb]['wall_s']} s, peak RSS {stages[verb]['peak_rss_mib']} MiB",
              flush=True)
        progress(stages)
    test = json.loads((models / "metrics/test.json").read_text())
    train = json.loads((models / "metrics/train.json").read_text())
    timings = json.loads((models / "metrics/train.timings.json").read_text())
    regions = test["search_regions"]
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M"), "sessions": n, "duration_s": p.export_sessions.duration_s, "n_test": test["n_test"],
        "epochs": train["epochs"], "radio_map_fit_s": round(timings["radio_map_fit_s"], 1),
        "stages": stages,
        "total_s": round(sum(s["wall_s"] for s in stages.values()), 1),
        "peak_rss_mib": max(s["peak_rss_mib"] for s in stages.values()),
        "model": {k: test[k] for k in ("median_error_m", "mean_error_m")},
        "oracle": {k: test["baselines"]["oracle"][k] for k in ("median_error_m", "mean_error_m")},
        "knn": {k: test["baselines"]["knn"][k] for k in ("median_error_m", "mean_error_m")},
        "kriged_map": {k: test["baselines"]["kriged_map"][k] for k in ("median_error_m", "mean_error_m")},
        "p90_region_km2": {"model": regions["model_hpd"]["p90"]["mean_area_km2"],
                           "model_coverage": regions["model_hpd"]["p90"]["coverage"],
                           "oracle": regions["oracle_hpd"]["p90"]["mean_area_km2"]},
    }


def print_table(rows: list[dict]) -> None:
    """The campaign table (rows in size order; "vs first": ms per session against the smallest size's)."""
    base = rows[0]["total_s"] / rows[0]["sessions"]
    headers = ["sessions", "IQ s", *[f"{v} s" for v in STAGES], "total min", "ms/session", "vs first",
               "peak RSS GiB", "epochs", "median km", "oracle median km", "median / oracle", "mean km",
               "oracle mean km", "kNN median km", "90% region km²", "90% coverage", "oracle 90% km²"]
    print(B.table(headers, [[
        r["sessions"], r["duration_s"], *[r["stages"][v]["wall_s"] for v in STAGES], f"{r['total_s'] / 60:.1f}",
        f"{1e3 * r['total_s'] / r['sessions']:.1f}", f"{r['total_s'] / r['sessions'] / base:.2f}",
        f"{r['peak_rss_mib'] / 1024:.2f}", r["epochs"],
        f"{r['model']['median_error_m'] / 1e3:.2f}", f"{r['oracle']['median_error_m'] / 1e3:.2f}",
        f"{r['model']['median_error_m'] / r['oracle']['median_error_m']:.2f}",
        f"{r['model']['mean_error_m'] / 1e3:.1f}", f"{r['oracle']['mean_error_m'] / 1e3:.1f}",
        f"{r['knn']['median_error_m'] / 1e3:.2f}", f"{r['p90_region_km2']['model']:,.0f}",
        f"{r['p90_region_km2']['model_coverage']:.3f}", f"{r['p90_region_km2']['oracle']:,.0f}"] for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sessions", nargs="+", type=int, default=[6000, 24000, 100000])
    ap.add_argument("--duration-s", nargs="+", type=float, default=None,
                    help="export_sessions.duration_s per size (one value, or one per --sessions; default params.yaml's)")
    ap.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/campaign.json)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="a campaign.json whose rows of other sizes are kept beside this run's (sizes measured "
                         "in separate runs; each row says when it was measured)")
    args = ap.parse_args()
    durations = args.duration_s or [None]
    if len(durations) == 1:
        durations = durations * len(args.sessions)
    if len(durations) != len(args.sessions):
        ap.error("--duration-s: give one value or one per --sessions")
    kept = [r for r in (json.loads(args.keep.read_text())["rows"] if args.keep else [])
            if r["sessions"] not in args.sessions]

    def merged(rows):
        return sorted(kept + rows, key=lambda r: r["sessions"])

    work = args.workdir or Path(tempfile.mkdtemp(prefix="heimdall-campaign-"))
    rows = []
    try:
        for n, dur in zip(args.sessions, durations):
            # the stages measured so far are saved as they finish: a run stopped mid-way keeps them
            rows.append(campaign(n, dur, work, lambda st: B.save("campaign", {"rows": merged(rows),
                                                                              "partial": {n: st}}, args.out)))
            B.save("campaign", {"rows": merged(rows)}, args.out)  # after every size: a long run keeps what it measured
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(merged(rows))
    print(f"wrote {B.save('campaign', {'rows': merged(rows)}, args.out)}")


if __name__ == "__main__":
    main()
