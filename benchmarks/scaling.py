"""How export_sessions (simulator) and extract_features cost grows with sessions, receivers and IQ length.

    python benchmarks/scaling.py [--repeats 3] [--sessions 750 1500 3000 6000]

For each configuration (one axis varied at a time, the others at params.yaml's defaults):
* generate - the simulator's arrays for the campaign with no HDF5 writes (draw_campaign + iq_blocks);
* export   - the export_sessions stage (same arrays, written to sessions.h5, renamed);
* features - the extract_features stage on that file.
Both stages run in this process (heimdall.stages.<stage>.run: the stage is what is measured, without
interpreter start-up).
Medians of --repeats runs. Receivers beyond the network's seven are made-up stations placed
around the network (cost benchmark only). Prints the tables of docs/performance.md and writes
benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from heimdall.simulator import Scenario  # noqa: E402
from heimdall.stages import export_sessions, extract_features  # noqa: E402  (the stages are what is measured)


def receivers(n: int) -> list[dict]:
    base = yaml.safe_load((B.REPO / "params.yaml").read_text())["scenario"]["receivers"]
    if n <= len(base):
        return base[:n]
    extra = []
    for i in range(n - len(base)):  # a ring of stations 0.3 deg outside each real one
        rx = base[i % len(base)]
        k = i // len(base) + 1
        extra.append({"name": f"Extra-{i + 1}", "latitude": rx["latitude"] + 0.3 * k * (-1) ** i,
                      "longitude": rx["longitude"] + 0.3 * k, "altitude_m": rx["altitude_m"]})
    return base + extra


def generate_only(p) -> None:
    exp = p.export_sessions
    scenario = Scenario(p.scenario)
    campaign = scenario.draw_campaign(exp, exp.seed)
    for _ in scenario.iq_blocks(campaign, exp, exp.seed):
        pass


def measure(overrides: dict, work: Path, repeats: int) -> dict:
    p = B.params(overrides)
    sessions, features = work / "sessions.h5", work / "features.h5"
    gen, exp, feat = [], [], []
    for _ in range(repeats):
        gen.append(B.timed(lambda: generate_only(p))[0])
        exp.append(B.timed(lambda: export_sessions.run(p, sessions, progress=False))[0])
        feat.append(B.timed(lambda: extract_features.run(p, sessions, features, progress=False))[0])
        size = sessions.stat().st_size
        sessions.unlink()
        features.unlink()
    n = p.export_sessions.n_sessions
    res = {"sessions": n, "receivers": len(p.scenario.receivers), "iq_samples": p.export_sessions.n_samples,
           "generate_s": B.median(gen), "export_s": B.median(exp), "features_s": B.median(feat),
           "sessions_h5_mib": size / 2**20}
    res["export_over_generate"] = res["export_s"] / res["generate_s"]
    print(f"  {n:6d} sessions, {res['receivers']:2d} receivers, {res['iq_samples']:5d} samples: "
          f"generate {res['generate_s']:.2f} s, export {res['export_s']:.2f} s "
          f"({res['export_over_generate']:.2f}x), features {res['features_s']:.2f} s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sessions", type=int, nargs="+", default=[750, 1500, 3000, 6000])
    ap.add_argument("--receivers", type=int, nargs="+", default=[3, 7, 14])
    ap.add_argument("--durations", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0], help="IQ seconds")
    ap.add_argument("--axis-sessions", type=int, default=750, help="sessions for the receivers/IQ-length axes")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="heimdall-bench-scaling-"))
    axes = {}
    try:
        print("sessions axis:", flush=True)
        axes["sessions"] = [measure({"export_sessions.n_sessions": n}, work, args.repeats) for n in args.sessions]
        print("receivers axis:", flush=True)
        axes["receivers"] = [measure({"export_sessions.n_sessions": args.axis_sessions,
                                      "scenario.receivers": receivers(r)}, work, args.repeats)
                             for r in args.receivers]
        print("IQ length axis:", flush=True)
        axes["iq_length"] = [measure({"export_sessions.n_sessions": args.axis_sessions,
                                      "export_sessions.duration_s": d}, work, args.repeats)
                             for d in args.durations]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headers = ["sessions", "receivers", "IQ samples", "generate s", "export s", "export/generate",
               "export sessions/s", "features s", "features sessions/s", "sessions.h5 MiB"]
    for axis, rows in axes.items():
        print(f"\nvarying {axis} (median of {args.repeats}):")
        print(B.table(headers, [[r["sessions"], r["receivers"], r["iq_samples"], r["generate_s"], r["export_s"],
                                 r["export_over_generate"], r["sessions"] / r["export_s"], r["features_s"],
                                 r["sessions"] / r["features_s"], r["sessions_h5_mib"]] for r in rows]))
    s = axes["sessions"]
    per_session = [r["export_s"] / r["sessions"] * 1e3 for r in s]
    print(f"\nexport ms/session across sizes: {', '.join(f'{x:.2f}' for x in per_session)} "
          f"(linear: roughly constant); worst export/generate {max(r['export_over_generate'] for r in s):.2f} "
          "(target <= 2)")
    path = B.save("scaling", {"repeats": args.repeats, "axes": axes}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
