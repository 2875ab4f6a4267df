"""The exported model: onnxruntime vs eager PyTorch, batch-1 latency and batch-64 throughput.

    python benchmarks/onnx.py [--model models/model.onnx] [--checkpoint models/model.ckpt] [--repeats 3]

Both runtimes in this one process on the same test sessions (heimdall.export.latency.benchmark,
the code export_onnx uses for models/metrics/onnx.timings.json), 1 and 2 intra-op threads each; repeated
--repeats times and reported as medians. Writes benchmarks/results/onnx.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from heimdall.checkpoint import load_checkpoint  # noqa: E402
from heimdall.data import load_features  # noqa: E402
from heimdall.export.latency import benchmark  # noqa: E402


@torch.no_grad()
def torch_throughput(model, inputs, runs: int = 10) -> float:
    model(*inputs)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(*inputs)
        times.append(time.perf_counter() - t)
    return inputs[0].shape[0] / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", type=Path, default=B.REPO / "models" / "model.onnx")
    ap.add_argument("--checkpoint", type=Path, default=B.REPO / "models" / "model.ckpt")
    ap.add_argument("--features", type=Path, default=B.REPO / "data" / "features.h5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=300, help="batch-1 calls per runtime and thread count")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for p in (args.model, args.checkpoint, args.features):
        if not p.exists():
            sys.exit(f"{p}: not found; run `dvc repro export_onnx` (or `dvc pull`) first")

    blob = args.model.read_bytes()
    model, _ = load_checkpoint(args.checkpoint)
    fs = load_features(args.features)
    te = fs.indices("test")
    runs = []
    for k in range(args.repeats):
        r = benchmark(blob, model, fs, te, runs=args.runs, warmup=20, throughput_batch=64, throughput_runs=20,
                      budget_s=60.0)
        batch = fs.model_inputs(np.resize(te, 64))
        r["torch_batch64_throughput_sessions_per_s"] = torch_throughput(model, batch)
        runs.append(r)
        print(f"  repeat {k + 1}: ORT p50 {r['p50_latency_ms_batch1']:.3f} ms ({r['ort_intra_op_threads']} thr), "
              f"torch p50 {r['torch_p50_latency_ms_batch1']:.3f} ms ({r['torch_threads']} thr), "
              f"ORT batch-64 {r['batch64_throughput_sessions_per_s']:.0f}/s", flush=True)

    keys = ("p50_latency_ms_batch1", "p99_latency_ms_batch1", "torch_p50_latency_ms_batch1",
            "torch_p99_latency_ms_batch1", "batch64_throughput_sessions_per_s",
            "torch_batch64_throughput_sessions_per_s")
    med = {k: B.median([r[k] for r in runs]) for k in keys}
    med["speedup_vs_torch_p50"] = B.median([r["torch_p50_latency_ms_batch1"] / r["p50_latency_ms_batch1"]
                                            for r in runs])
    print(f"\n{args.model} ({args.model.stat().st_size / 1e6:.1f} MB), median of {args.repeats}:")
    print(B.table(["runtime", "batch-1 p50 ms", "batch-1 p99 ms", "batch-64 sessions/s"], [
        ["onnxruntime (CPU EP)", med["p50_latency_ms_batch1"], med["p99_latency_ms_batch1"],
         med["batch64_throughput_sessions_per_s"]],
        ["eager PyTorch", med["torch_p50_latency_ms_batch1"], med["torch_p99_latency_ms_batch1"],
         med["torch_batch64_throughput_sessions_per_s"]],
    ]))
    print(f"onnxruntime p50 {med['p50_latency_ms_batch1']:.2f} ms (target <= 2), "
          f"{med['speedup_vs_torch_p50']:.2f}x faster than eager PyTorch (target >= 1.5x)")
    path = B.save("onnx", {"repeats": args.repeats, "median": med, "runs": runs}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
