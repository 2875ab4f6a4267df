"""extract_features against its compute floor and a naive stage, and its peak memory at 1x/2x/4x.

    python benchmarks/features.py [--repeats 3] [--scales 1 2 4] [--workdir DIR]

All three are measured side by side in this one process, on the same sessions.h5 (the default
campaign of params.yaml, simulated into --workdir first with heimdall.simulator.export_campaign):

* floor  - the same log-mel computation (heimdall.features.LogMelFrontend) on the campaign's IQ
           already in memory as complex64, at the best batch size of a sweep;
* stage  - heimdall.stages.extract_features.run: open sessions.h5 ... renamed features.h5
           (interpreter start-up and imports measured separately, in fresh interpreters);
* naive  - per-(session, receiver) HDF5 read, one torchaudio call, per-row write.

Memory: the stage runs in a fresh interpreter per campaign size (6,000 x scale sessions); peak RSS
is the process's ru_maxrss. Prints the tables of docs/performance.md and writes
benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from heimdall.features import LogMelFrontend, iq_int16_to_complex  # noqa: E402
from heimdall.simulator import export_campaign  # noqa: E402
from heimdall.stages import extract_features  # noqa: E402  (the stage is what this benchmark measures)

BATCH_SESSIONS_SWEEP = (1, 4, 16, 64, 256, 1024)


def make_sessions(path: Path, n_sessions: int) -> float:
    if path.exists():
        return 0.0
    p = B.params({"export_sessions.n_sessions": n_sessions})
    wall, _ = B.timed(lambda: export_campaign(p, path, progress=False))
    print(f"  simulated {n_sessions:,} sessions -> {path} in {wall:.1f} s", flush=True)
    return wall


def frontend_for(path: Path, p) -> LogMelFrontend:
    with h5py.File(path, "r") as f:
        fs, s = float(f.attrs["sample_rate_hz"]), int(f.attrs["n_samples"])
    e = p.extract_features
    return LogMelFrontend(fs, s, e.n_fft, e.n_mels, e.n_frames)


def floor_pass(iq: torch.Tensor, frontend: LogMelFrontend, batch_sessions: int) -> float:
    """Seconds for the log-mel of every (session, receiver) series already in memory."""
    n = iq.shape[0]
    t = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, batch_sessions):
            frontend(iq[start:start + batch_sessions])
    return time.perf_counter() - t


def naive_stage(sessions: Path, out: Path, frontend: LogMelFrontend, p) -> float:
    """What a first draft would do: one HDF5 read, one torchaudio call and one write per row."""
    t = time.perf_counter()
    with h5py.File(sessions, "r") as src, h5py.File(out, "w") as dst:
        m = src["measurements"]
        n, r = m["present"].shape
        logmel = dst.create_dataset("features/logmel_db", (n, r, p.n_mels, p.n_frames), "f4")
        rss = dst.create_dataset("features/rss_dbm", (n, r), "f4")
        for i in range(n):
            for j in range(r):
                if not m["has_iq"][i, j]:
                    continue
                iq = iq_int16_to_complex(m["iq"][i, j], m["iq_scale"][i, j])
                with torch.no_grad():
                    logmel[i, j] = frontend(iq).numpy()
                rss[i, j] = m["rss_dbm"][i, j]
    return time.perf_counter() - t


def import_seconds(repeats: int) -> float:
    code = ("import time, json; t = time.perf_counter(); import heimdall.cli, heimdall.stages.extract_features; "
            "print(json.dumps({'s': time.perf_counter() - t}))")
    return B.median([B.run_python(code)["s"] for _ in range(repeats)])


def throughput(sessions: Path, work: Path, repeats: int) -> dict:
    p = B.params()
    frontend = frontend_for(sessions, p)
    with h5py.File(sessions, "r") as f:
        n, r = f["measurements/present"].shape
        t_load = time.perf_counter()
        iq_mem = iq_int16_to_complex(f["measurements/iq"][()], f["measurements/iq_scale"][()])
        load_s = time.perf_counter() - t_load
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("  batch sweep of the floor (sessions per call):", flush=True)
    floor_pass(iq_mem[:64], frontend, 16)  # warm-up
    sweep = {}
    for b in BATCH_SESSIONS_SWEEP:
        sweep[b] = floor_pass(iq_mem, frontend, b)
        print(f"    {b:5d} sessions ({b * r:5d} series): {n / sweep[b]:8.0f} sessions/s", flush=True)
    best_b = min(sweep, key=sweep.get)

    floor, stage, naive = [], [], []
    out = work / "features.h5"
    for k in range(repeats):
        floor.append(floor_pass(iq_mem, frontend, best_b))
        stage.append(B.timed(lambda: extract_features.run(p, sessions, out, progress=False))[0])
        out.unlink()
        naive.append(naive_stage(sessions, work / "naive.h5", frontend, p.extract_features))
        (work / "naive.h5").unlink()
        print(f"  repeat {k + 1}/{repeats}: floor {floor[-1]:.2f} s, stage {stage[-1]:.2f} s, "
              f"naive {naive[-1]:.2f} s", flush=True)
    del iq_mem
    res = {
        "sessions": n, "receivers": r, "repeats": repeats,
        "iq_load_to_memory_s": load_s,
        "floor_best_batch_sessions": best_b,
        "floor_sweep_sessions_per_s": {str(b): n / s for b, s in sweep.items()},
        "floor_s": B.median(floor), "stage_s": B.median(stage), "naive_s": B.median(naive),
        "floor_runs_s": floor, "stage_runs_s": stage, "naive_runs_s": naive,
        "stage_batch_sessions": p.extract_features.batch_sessions,
        "imports_s": import_seconds(repeats),
    }
    res["stage_over_floor"] = res["stage_s"] / res["floor_s"]
    res["stage_speedup_vs_naive"] = res["naive_s"] / res["stage_s"]
    return res


MEMORY_CHILD = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
import _bench as B
from heimdall.stages import extract_features
p = B.params()
base = B.peak_rss_mib()
t = time.perf_counter()
extract_features.run(p, Path({sessions!r}), Path({out!r}), progress=False)
print(json.dumps({{"wall_s": time.perf_counter() - t, "peak_rss_mib": B.peak_rss_mib(), "after_imports_mib": base}}))
"""


def memory(work: Path, scales: list[int], base_sessions: int) -> dict:
    rows = {}
    for k in scales:
        sessions = work / f"sessions_x{k}.h5"
        sim_s = make_sessions(sessions, base_sessions * k)
        child = MEMORY_CHILD.format(bench=str(Path(__file__).resolve().parent), sessions=str(sessions),
                                    out=str(work / f"features_x{k}.h5"))
        res = B.run_python(child)
        res.update(sessions=base_sessions * k, sessions_h5_mib=sessions.stat().st_size / 2**20,
                   simulate_s=sim_s)
        rows[k] = res
        print(f"  x{k}: {res['sessions']:,} sessions, peak RSS {res['peak_rss_mib']:.0f} MiB "
              f"(after imports {res['after_imports_mib']:.0f} MiB), {res['wall_s']:.1f} s", flush=True)
        (work / f"features_x{k}.h5").unlink()
        if k != 1:
            sessions.unlink()
    first = rows[min(rows)]["peak_rss_mib"]
    return {"by_scale": {str(k): v for k, v in rows.items()},
            "peak_growth_max_vs_min_scale": rows[max(rows)]["peak_rss_mib"] / first - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="campaign sizes for memory")
    ap.add_argument("--sessions", type=int, default=None,
                    help="base campaign size (default: export_sessions.n_sessions of params.yaml)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/features.json)")
    args = ap.parse_args()

    base_n = args.sessions or B.params().export_sessions.n_sessions
    work = args.workdir or Path(tempfile.mkdtemp(prefix="heimdall-bench-features-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sessions = work / "sessions_x1.h5"
        print(f"extract_features benchmark in {work}", flush=True)
        make_sessions(sessions, base_n)
        tp = throughput(sessions, work, args.repeats)
        mem = memory(work, sorted(set(args.scales) | {1}), base_n)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    n = tp["sessions"]
    print(f"\nextract_features, campaign of {n:,} sessions x {tp['receivers']} receivers, "
          f"median of {tp['repeats']} runs:")
    print(B.table(
        ["what", "seconds", "sessions/s", "vs floor"],
        [["floor (IQ in memory, best batch " + str(tp["floor_best_batch_sessions"]) + " sessions)",
          tp["floor_s"], n / tp["floor_s"], 1.0],
         ["stage (open sessions.h5 .. renamed features.h5)", tp["stage_s"], n / tp["stage_s"], tp["stage_over_floor"]],
         ["naive stage (per-row read, call, write)", tp["naive_s"], n / tp["naive_s"], tp["naive_s"] / tp["floor_s"]],
         ["interpreter start-up + imports (separate)", tp["imports_s"], "", ""]],
    ))
    print(f"stage / floor = {tp['stage_over_floor']:.2f} (target <= 2); "
          f"stage vs naive = {tp['stage_speedup_vs_naive']:.1f}x (target >= 3)")
    print("\npeak memory of the stage (fresh interpreter per size):")
    print(B.table(
        ["sessions", "sessions.h5 MiB", "peak RSS MiB", "after imports MiB", "stage s", "sessions/s"],
        [[v["sessions"], v["sessions_h5_mib"], v["peak_rss_mib"], v["after_imports_mib"], v["wall_s"],
          v["sessions"] / v["wall_s"]] for v in mem["by_scale"].values()],
    ))
    print(f"peak RSS growth, largest vs smallest campaign: {100 * mem['peak_growth_max_vs_min_scale']:+.1f}% "
          "(target <= +20%)")
    path = B.save("features", {"throughput": tp, "memory": mem}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
