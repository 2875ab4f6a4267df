"""The POWDER 462.7 MHz benchmark: the real RSS dataset through the production path, end to end.

    python benchmarks/powder.py [--data ../shared/datasets/powder-frs-462mhz]

1. starts a throwaway PostgreSQL 15 (tests/services.py; binaries in /usr/lib/postgresql/15/bin or
   HEIMDALL_TEST_PG_BIN) and loads the dataset with `heimdall db import-powder`;
2. copies this checkout (git's tracked + untracked-not-ignored files) into a fresh temporary git repo
   and runs `dvc exp run -n powder -S ...` there with the preset benchmarks/powder.params.yaml
   (source: postgres, RSS-only model, spatially held-out split), so the whole unchanged pipeline runs;
3. reads the evaluate stage's models/metrics/test.json (and train.json, and the git-ignored
   *.timings.json beside them) from the workspace after each experiment, checks that the comparison
   table `dvc exp show --json` reports (models/metrics/compare/*.json) is the one on disk and agrees
   with test.json, and prints the table of docs/results.md.

Nothing is written to this checkout; the product never reads ../shared (only this script does).
`--print-exp-command` prints the `dvc exp run` line for an existing database instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "benchmarks" / "powder.params.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "powder-frs-462mhz"
EXP_NAME = "powder"


def preset() -> dict:
    return yaml.safe_load(PRESET.read_text())


def exp_command(name: str = EXP_NAME, split_seed: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["dvc", "exp", "run", "-n", name]
    for key, value in preset().items():
        args += ["-S", f"{key}={value}"]
    for item in extra:  # --set: an experiment on top of the preset
        args += ["-S", item]
    if split_seed is not None:  # another spatial split: which 250 m blocks are val / test
        args += ["-S", f"extract_features.split.seed={split_seed}"]
    return args


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def _run(args: list[str], cwd: Path, env: dict, quiet: bool = False) -> str:
    print("$ " + shlex.join(args), flush=True)
    proc = subprocess.run(args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not quiet or proc.returncode:
        print(proc.stdout[-4000:], flush=True)
    if proc.returncode:
        raise SystemExit(f"benchmarks/powder.py: {args[0]} {args[1]} failed with exit status {proc.returncode}")
    return proc.stdout


def copy_checkout(dest: Path) -> None:
    """This checkout's source (tracked + untracked-not-ignored files) as a fresh git repo at dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _find_exp(node, name: str):
    """The `dvc exp show --json` entry of experiment ``name`` (the schema nests by baseline)."""
    if isinstance(node, dict):
        if node.get("name") == name and isinstance(node.get("data"), dict):
            return node["data"]
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_exp(child, name)
        if found is not None:
            return found
    return None


def machine() -> str:
    from _bench import cpu_model  # benchmarks/ is on sys.path when this runs as a script

    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def read_outputs(repo: Path) -> dict:
    """The workspace's metrics after a `dvc exp run`: test.json, train.json, the comparison table
    (compare/*.json) and the wall-clock timings of train and evaluate (*.timings.json, not DVC outputs)."""
    m = repo / "models" / "metrics"
    return {"test": json.loads((m / "test.json").read_text()), "train": json.loads((m / "train.json").read_text()),
            "compare": {p.stem: json.loads(p.read_text()) for p in sorted((m / "compare").glob("*.json"))},
            "timings": {**json.loads((m / "train.timings.json").read_text()),
                        **json.loads((m / "test.timings.json").read_text())}}


def check_against_exp_show(exp: dict, out: dict, name: str) -> None:
    """`dvc exp show` holds the comparison table of this experiment, equal to the files on disk, and its
    model row agrees with test.json."""
    shown = {Path(k).stem: v["data"] for k, v in (exp.get("metrics") or {}).items() if "compare" in Path(k).parts}
    if shown != out["compare"]:
        raise SystemExit(f"benchmarks/powder.py: dvc exp show's compare metrics of '{name}' differ from "
                         "models/metrics/compare/*.json")
    for k, v in out["compare"]["model"].items():
        if abs(v - out["test"][k]) > 0.51 * 10 ** -(4 if k.startswith(("frac", "coverage")) else 1):
            raise SystemExit(f"benchmarks/powder.py: compare/model.json {k} {v} is not test.json's {out['test'][k]}")


def table(test: dict, timings: dict) -> str:
    fit = timings["radio_map_fit_s"] + timings["fit_s"]
    rows = [("LocalizationNet (map x network)", test, fit, True),
            ("  network alone", test["network_only"], timings["fit_s"], True)]
    names = {"knn": "kNN fingerprinting (k on val)", "kriged_map": "ML, kriged map",
             "ml_logdistance": "ML, log-distance map"}
    for key in ("knn", "kriged_map", "ml_logdistance"):
        rows.append((names[key], test["baselines"][key], timings[f"{key}_s"], False))
    out = [f"| estimator | mean m | median m | p90 m | 1σ cov. | 2σ cov. | train s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r, secs, cov in rows:
        c1 = f"{r['coverage_1sigma']:.3f}" if cov else "–"
        c2 = f"{r['coverage_2sigma']:.3f}" if cov else "–"
        out.append(f"| {label} | {r['mean_error_m']:.0f} | {r['median_error_m']:.0f} | {r['p90_error_m']:.0f} | "
                   f"{c1} | {c2} | {secs:.0f} |")
    return "\n".join(out)


def _params_split_seed() -> int:
    return int(yaml.safe_load((REPO / "params.yaml").read_text())["extract_features"]["split"]["seed"])


SPLIT_COLUMNS = (("model mean m", lambda t: t["mean_error_m"]), ("model median m", lambda t: t["median_error_m"]),
                 ("kNN mean m", lambda t: t["baselines"]["knn"]["mean_error_m"]),
                 ("kriged mean m", lambda t: t["baselines"]["kriged_map"]["mean_error_m"]),
                 ("log-dist. mean m", lambda t: t["baselines"]["ml_logdistance"]["mean_error_m"]),
                 ("model vs kNN %", lambda t: 100 * (1 - t["mean_error_m"] / t["baselines"]["knn"]["mean_error_m"])),
                 ("1σ cov.", lambda t: t["coverage_1sigma"]), ("2σ cov.", lambda t: t["coverage_2sigma"]),
                 # the calibrated search regions (docs/model.md): coverage at 50 / 68 / 90 / 95 %, 90 % median area
                 *((f"HPD {k[1:]} % cov.", lambda t, k=k: t["search_regions"]["model_hpd"][k]["coverage"])
                   for k in ("p50", "p68", "p90", "p95")),
                 ("HPD 90 % median km²", lambda t: t["search_regions"]["model_hpd"]["p90"]["median_area_km2"]),
                 ("ellipse 90 % cov.", lambda t: t["search_regions"]["gaussian_ellipse"]["p90"]["coverage"]))


def split_table(splits: dict[int, dict]) -> str:
    """One row per spatial split, then mean and standard deviation across splits."""
    import numpy as np

    out = ["| split seed | n test | " + " | ".join(c for c, _ in SPLIT_COLUMNS) + " |",
           "|---:|---:|" + "---:|" * len(SPLIT_COLUMNS)]
    fmt = lambda v: f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"  # noqa: E731
    values = np.array([[f(t) for _, f in SPLIT_COLUMNS] for t in splits.values()])
    for (seed, t), row in zip(splits.items(), values):
        out.append(f"| {seed} | {t['n_test']} | " + " | ".join(fmt(v) for v in row) + " |")
    out.append("| mean | | " + " | ".join(fmt(v) for v in values.mean(0)) + " |")
    out.append("| std | | " + " | ".join(fmt(v) for v in values.std(0, ddof=1)) + " |")
    return "\n".join(out)


def _save_splits(splits: dict[int, dict], overrides: list[str]) -> None:
    from _bench import save

    name = "powder_splits" + ("-" + "-".join(o.replace("=", "_") for o in overrides) if overrides else "")
    rows = {str(seed): {c: f(t) for c, f in SPLIT_COLUMNS} | {"n_test": t["n_test"]} for seed, t in splits.items()}
    print(f"wrote {save(name, {'overrides': overrides, 'splits': rows}).relative_to(REPO)}")


FAMILY_COLUMNS = ("member", "n test", "model mean m", "kNN mean m (k)", "model / kNN", "2σ cov.",
                  "HPD 50 / 68 / 90 / 95 % cov.", "HPD 90 % median m²")


def family_row(name: str, test: dict, ref: dict) -> dict:
    sr = test["search_regions"]["model_hpd"]
    return {"member": name, "n_test": test["n_test"], "model_mean_error_m": test["mean_error_m"],
            "model_median_error_m": test["median_error_m"], "knn_mean_error_m": ref["mean_error_m"], "knn_k": ref["k"],
            "model_over_knn": test["mean_error_m"] / ref["mean_error_m"], "coverage_2sigma": test["coverage_2sigma"],
            "hpd_coverage": [sr[k]["coverage"] for k in ("p50", "p68", "p90", "p95")],
            "hpd90_median_area_m2": sr["p90"]["median_area_km2"] * 1e6}


def family_table(rows: list[dict]) -> str:
    from powder_family import geometric_mean

    out = ["| " + " | ".join(FAMILY_COLUMNS) + " |", "|---|" + "---:|" * (len(FAMILY_COLUMNS) - 1)]
    for r in rows:
        out.append(f"| {r['member']} | {r['n_test']} | {r['model_mean_error_m']:.0f} | {r['knn_mean_error_m']:.0f} "
                   f"({r['knn_k']}) | {r['model_over_knn']:.2f} | {r['coverage_2sigma']:.2f} | "
                   + " / ".join(f"{c:.2f}" for c in r["hpd_coverage"]) + f" | {r['hpd90_median_area_m2']:,.0f} |")
    out.append(f"| **geometric mean** | | | | **{geometric_mean(r['model_over_knn'] for r in rows):.2f}** | | | |")
    return "\n".join(out)


def run_family(repo, env, data, extra, only=None) -> list[dict]:
    """Every member of powder_family: its held-out split, the pipeline, the reference kNN."""
    import powder_family

    # `dvc exp run -S` leaves its values in the workspace's params.yaml: every member sets every split key
    reset = [f"extract_features.split.{k}=null" for k in ("test_from", "test_until", "test_area", "test_ids_file")]
    reset += ["extract_features.split.test_fraction=0.15"]
    rows = []
    for name, (overrides, ids) in powder_family.members(data).items():
        if only and name not in only:
            continue
        if ids is not None:
            path = repo / "splits" / f"{name}.txt"
            path.write_text("# held out by benchmarks/powder_family.py\n" + "\n".join(ids) + "\n")
            overrides = ["extract_features.split.strategy=list", f"extract_features.split.test_ids_file=splits/{name}.txt"]
        _run(exp_command(f"{EXP_NAME}-{name.replace('_', '-')}", extra=(*reset, *overrides, *extra)), repo, env,
             quiet=True)
        out = read_outputs(repo)
        ref = powder_family.reference_knn(repo / "data" / "features.h5")
        rows.append(family_row(name, out["test"], ref))
        print(family_table(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with single_tx.csv and location_coordinates.json (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temp dir, removed)")
    parser.add_argument("--split-seeds", type=int, nargs="*", default=[], metavar="SEED",
                        help="also run the experiment on these other spatial splits "
                             "(extract_features.split.seed) and print the spread across splits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra param override on top of the preset (repeatable), e.g. train.lr=0.001")
    parser.add_argument("--print-exp-command", action="store_true",
                        help="print the `dvc exp run` command of the preset and exit")
    parser.add_argument("--family", nargs="*", default=None, metavar="MEMBER",
                        help="run the held-out split family instead (benchmarks/powder_family.py: random, "
                             "grid_cells, month_apr/jul/nov, outer_area, static, walking, cycling, driving; "
                             "default all) beside the reference kNN; writes benchmarks/results/powder_family.json")
    args = parser.parse_args()
    if args.print_exp_command:
        print(shlex.join(exp_command(extra=tuple(args.set))))
        return
    csv_path, receivers = args.data / "single_tx.csv", args.data / "location_coordinates.json"
    for p in (csv_path, receivers):
        if not p.exists():
            raise SystemExit(f"benchmarks/powder.py: {p} not found (--data)")

    sys.path.insert(0, str(REPO / "tests"))
    from services import postgres_server  # the tests' throwaway server

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="heimdall-powder-")) if args.workdir is None else args.workdir
    repo = work / "repo"
    try:
        repo.mkdir(parents=True, exist_ok=False)
        copy_checkout(repo)
        with postgres_server() as pg:
            url = pg.create_database("powder")
            env = _env(HEIMDALL_DB_URL=url, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")
            _run(["git", "init", "-q"], repo, env)
            _run(["git", "add", "-A"], repo, env)
            _run(["git", "-c", "user.name=bench", "-c", "user.email=bench@heimdall.invalid", "commit", "-q",
                  "-m", "checkout"], repo, env)
            _run(["heimdall", "db", "import-powder", "--csv", str(csv_path), "--receivers", str(receivers),
                  "--no-progress"], repo, env)
            if args.family is not None:
                sys.path.insert(0, str(REPO / "benchmarks"))
                rows = run_family(repo, env, args.data, tuple(args.set), set(args.family))
                from _bench import save

                print(f"wrote {save('powder_family', {'overrides': args.set, 'members': rows}).relative_to(REPO)}")
                print(f"total {time.perf_counter() - started:.0f} s; machine: {machine()}")
                return
            t0 = time.perf_counter()
            _run(exp_command(extra=tuple(args.set)), repo, env, quiet=True)
            pipeline_s = time.perf_counter() - t0
            outputs = {EXP_NAME: read_outputs(repo)}  # `dvc exp run` leaves its results in the workspace
            for seed in args.split_seeds:  # the sessions are exported once; features onward rerun
                name = f"{EXP_NAME}-split{seed}"
                _run(exp_command(name, seed, tuple(args.set)), repo, env, quiet=True)
                outputs[name] = read_outputs(repo)
            shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env, quiet=True))
        for name, out in outputs.items():
            exp = _find_exp(shown, name)
            if exp is None:
                raise SystemExit(f"benchmarks/powder.py: experiment '{name}' not in `dvc exp show --json`")
            check_against_exp_show(exp, out, name)
        test, train = outputs[EXP_NAME]["test"], outputs[EXP_NAME]["train"]
        n = {k: v for k, v in test["baselines"].items() if k.startswith("n_")}
        print(f"\nPOWDER 462.7 MHz, spatially held-out test split ({test['n_test']} sessions; "
              f"block {preset()['extract_features.split.block_size_km']} km); models/metrics/test.json of "
              f"experiment '{EXP_NAME}'. kNN k = {test['baselines']['knn'].get('k')}. {n or ''}")
        print(table(test, outputs[EXP_NAME]["timings"]))
        knn = test["baselines"]["knn"]["mean_error_m"]
        print(f"model mean error vs kNN: {100 * (1 - test['mean_error_m'] / knn):+.1f} % below; "
              f"calibration {json.dumps({k: v for k, v in train['calibration'].items()})}")
        if args.split_seeds:
            default_seed = preset().get("extract_features.split.seed", _params_split_seed())
            splits = {default_seed: test}
            for seed in args.split_seeds:
                splits[seed] = outputs[f"{EXP_NAME}-split{seed}"]["test"]
            print("\n" + split_table(splits))
            _save_splits(splits, args.set)
        print(f"pipeline (dvc exp run) {pipeline_s:.0f} s, total {time.perf_counter() - started:.0f} s")
        print(f"machine: {machine()}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
