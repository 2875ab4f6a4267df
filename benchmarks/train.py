"""The train stage: time per epoch, split into waiting for data and computing, plus the stage total.

    python benchmarks/train.py [--features data/features.h5] [--max-epochs N] [--no-evaluate]

Runs the real stage in this process (heimdall.stages.train.run, params.yaml; outputs and MLflow
store in a temp dir: a Lightning callback has to be passed in, which the CLI cannot do) with a
callback that stamps every training batch: "data wait" is the time from the end of one optimiser
step to the start of the next batch (the DataLoader fetching and collating), "compute" is forward +
backward + optimiser step; validation is timed separately. The stage's own breakdown comes from the
timings file it writes beside train.json (train.timings.json: radio-map fit, fit, calibration).
Then, unless --no-evaluate, `heimdall evaluate` on the new checkpoint (the stage that scores the
model and the baselines on the test split), timed from its test.timings.json.
Prints the tables of docs/performance.md and writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402


class EpochTimer(L.Callback):
    def __init__(self):
        self.epochs: list[dict] = []
        self._mark = 0.0

    def on_train_epoch_start(self, trainer, module):
        self._epoch = {"epoch": trainer.current_epoch, "data_wait_s": 0.0, "compute_s": 0.0, "val_s": 0.0,
                       "batches": 0}
        self._t_epoch = self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = time.perf_counter()
        self._epoch["data_wait_s"] += now - self._mark
        self._mark = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self._epoch["compute_s"] += now - self._mark
        self._epoch["batches"] += 1
        self._mark = now

    def on_validation_epoch_start(self, trainer, module):
        self._t_val = time.perf_counter()

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking and hasattr(self, "_epoch"):
            self._epoch["val_s"] += time.perf_counter() - self._t_val

    def on_train_epoch_end(self, trainer, module):
        self._epoch["epoch_s"] = time.perf_counter() - self._t_epoch
        self.epochs.append(self._epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--features", type=Path, default=B.REPO / "data" / "features.h5")
    ap.add_argument("--max-epochs", type=int, default=None, help="override train.max_epochs (default: params.yaml)")
    ap.add_argument("--no-evaluate", action="store_true", help="do not also time the evaluate stage")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.features.exists():
        sys.exit(f"{args.features}: not found; run `dvc repro extract_features` first")

    from heimdall.stages import train

    overrides = {"train.max_epochs": args.max_epochs} if args.max_epochs else {}
    params = B.params(overrides)
    work = Path(tempfile.mkdtemp(prefix="heimdall-bench-train-"))
    mlflow_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    os.environ.update(mlflow_env)
    timer = EpochTimer()
    evaluate = None
    try:
        wall, _ = B.timed(lambda: train.run(params, args.features, work / "model.ckpt", work / "metrics" / "train.json",
                                            work / "plots" / "train", progress=False, callbacks=(timer,)))
        stage = json.loads((work / "metrics" / "train.timings.json").read_text())
        if not args.no_evaluate:
            t = time.perf_counter()
            summary = B.heimdall("evaluate", "--params", B.write_params(params, work / "params.yaml"),
                                 "--features", args.features, "--checkpoint", work / "model.ckpt",
                                 "--metrics-dir", work / "metrics", "--plots-dir", work / "plots" / "evaluate",
                                 env=mlflow_env)
            evaluate = {"process_wall_s": time.perf_counter() - t, "cli_wall_time_s": summary["wall_time_s"],
                        **json.loads((work / "metrics" / "test.timings.json").read_text())}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ep = timer.epochs
    tot = {k: sum(e[k] for e in ep) for k in ("data_wait_s", "compute_s", "val_s", "epoch_s")}
    res = {
        "epochs": len(ep), "batches_per_epoch": ep[0]["batches"] if ep else 0,
        "batch_size": params.train.batch_size, "accelerator": params.train.accelerator,
        "median_epoch_s": B.median([e["epoch_s"] for e in ep]),
        "median_data_wait_s": B.median([e["data_wait_s"] for e in ep]),
        "median_compute_s": B.median([e["compute_s"] for e in ep]),
        "median_val_s": B.median([e["val_s"] for e in ep]),
        "data_wait_fraction": tot["data_wait_s"] / tot["epoch_s"],
        "stage_wall_s": wall,
        "stage_breakdown_s": stage,
        "per_epoch": ep,
    }
    res["other_s"] = res["stage_wall_s"] - stage["radio_map_fit_s"] - stage["fit_s"] - stage["calibration_s"]
    if evaluate:
        res["evaluate"] = evaluate
    print(f"\ntrain: {res['epochs']} epochs x {res['batches_per_epoch']} batches of {res['batch_size']} "
          f"({params.train.accelerator}, {B.machine()['torch_threads']} torch threads), medians per epoch:")
    print(B.table(["per epoch", "seconds", "share of epoch"], [
        ["data wait (DataLoader)", res["median_data_wait_s"], f"{100 * res['median_data_wait_s'] / res['median_epoch_s']:.2f}%"],
        ["forward + backward + step", res["median_compute_s"], f"{100 * res['median_compute_s'] / res['median_epoch_s']:.1f}%"],
        ["validation", res["median_val_s"], f"{100 * res['median_val_s'] / res['median_epoch_s']:.1f}%"],
        ["epoch total", res["median_epoch_s"], "100%"],
    ]))
    print("\nthe whole train stage:")
    print(B.table(["part", "seconds"], [
        ["radio-map fit (kriging)", stage["radio_map_fit_s"]],
        [f"fit ({res['epochs']} epochs incl. validation)", stage["fit_s"]],
        ["calibration on the validation split", stage["calibration_s"]],
        ["load, checkpoint, learning curves, MLflow", res["other_s"]],
        ["total", res["stage_wall_s"]],
    ]))
    if evaluate:
        base = [k for k in ("knn_s", "ml_logdistance_s", "kriged_map_s", "oracle_s") if k in evaluate]
        print("\nthe evaluate stage (`heimdall evaluate`, its own process):")
        print(B.table(["part", "seconds"], [
            *[[f"baseline {k[:-2]} (fit + predict)", evaluate[k]] for k in base],
            ["baselines together", evaluate["baselines_s"]],
            ["model on the test split, metrics, plots, MLflow", evaluate["wall_time_s"] - evaluate["baselines_s"]],
            ["stage total (in the CLI)", evaluate["wall_time_s"]],
            ["process (interpreter start-up and imports included)", evaluate["process_wall_s"]],
        ]))
    path = B.save("train", res, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
