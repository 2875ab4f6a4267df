"""Re-calibrate the POWDER experiments' checkpoints offline with other covariance-weight rules.

    python benchmarks/powder.py --workdir /tmp/pw --split-seeds 1 2 3 4   # keeps the experiments
    python benchmarks/powder_calibration.py --workdir /tmp/pw

For every experiment in the kept repo (`dvc exp apply` + `dvc checkout`), the checkpoint's refinement
(temperature, prior width) is kept and only the two covariance weights (a local, b remote;
heimdall/calibration.py)
are re-chosen on the validation split by each rule, then scored on the test split. This isolates the
rule: the point estimates, and so every error metric, are unchanged. Prints a table, writes
benchmarks/results/powder_calibration.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from _bench import save  # benchmarks/ is on sys.path when this runs as a script

REPO = Path(__file__).resolve().parents[1]


def rules(cov_at, scales, c1, c2, shipped: tuple[float, float]) -> dict[str, tuple[float, float]]:
    grid = [(a, b, *cov_at("val", a, b)) for a in scales for b in scales]
    out = {"former: 1σ and 2σ misses, L1": min(grid, key=lambda g: abs(g[2] - c1) + abs(g[3] - c2))[:2]}
    common = [(s, s, *cov_at("val", s, s)) for s in np.geomspace(0.05, 20.0, 200)]
    out["2σ only, one common scale"] = min(common, key=lambda g: abs(g[3] - c2))[:2]
    out["shipped: 2σ first (within 0.01), then 1σ"] = shipped
    return out


def evaluate(repo: Path) -> dict:
    from heimdall import calibration as C
    from heimdall.checkpoint import load_checkpoint
    from heimdall.data import load_features
    from heimdall.evaluation import ellipse_coverage, mahalanobis_sq
    from heimdall.runner import estimate

    model, _ = load_checkpoint(repo / "models/model.ckpt")
    fs = load_features(repo / "data/features.h5")
    parts = {}
    with torch.no_grad():
        for name in ("val", "test"):
            idx = fs.indices(name)
            covs = []
            for local, remote in ((1.0, 0.0), (0.0, 1.0)):
                model.cov_scale_local.fill_(local)
                model.cov_scale_remote.fill_(remote)
                mean, cov = estimate(model, fs.input_batches(idx))
                covs.append(cov)
            parts[name] = (mean, *covs, fs.target_enu_m[idx])

    def cov_at(name, a, b):
        mean, lc, rc, t = parts[name]
        d2 = mahalanobis_sq(mean, a * lc + b * rc, t)
        return ellipse_coverage(d2, 1), ellipse_coverage(d2, 2)

    result = {}
    mean, lc, rc, t = parts["val"]
    shipped = C.choose_covariance_weights(mean, lc, rc, t)
    for rule, (a, b) in rules(cov_at, C.COV_SCALES, C.COVERAGE_1SIGMA, C.COVERAGE_2SIGMA, shipped).items():
        result[rule] = {"a": float(a), "b": float(b), "val": cov_at("val", a, b), "test": cov_at("test", a, b)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", type=Path, required=True, help="the --workdir of a benchmarks/powder.py run")
    args = ap.parse_args()
    repo = args.workdir / "repo"
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    shown = subprocess.run(["dvc", "exp", "ls", "--name-only"], cwd=repo, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    exps = sorted((e for e in shown if e.startswith("powder")), key=lambda e: (e != "powder", e))
    table = {}
    for exp in exps:
        for cmd in (["dvc", "exp", "apply", exp], ["dvc", "checkout", "-q"]):
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        table[exp] = evaluate(repo)
    names = list(next(iter(table.values())))
    print("| experiment | " + " | ".join(f"{n}: test 1σ / 2σ" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for exp, res in table.items():
        print(f"| {exp} | " + " | ".join(f"{r['test'][0]:.3f} / {r['test'][1]:.3f}" for r in res.values()) + " |")
    means = {n: np.mean([[table[e][n]["test"][0], table[e][n]["test"][1]] for e in table], axis=0) for n in names}
    print("| mean | " + " | ".join(f"{m[0]:.3f} / {m[1]:.3f}" for m in means.values()) + " |")
    print(f"wrote {save('powder_calibration', {'experiments': table}).relative_to(REPO)}")


if __name__ == "__main__":
    main()
