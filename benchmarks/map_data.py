"""How close the learned radio map gets to the true one as the campaign grows (synthetic default).

    python benchmarks/map_data.py [--sessions 6000 12000 24000] [--workdir DIR]

The model localizes by likelihood over a radio map learned from the training sessions (log-distance
law + a Gaussian-process residual map per receiver, docs/model.md); the oracle uses the simulator's
true map with the same likelihood search. On the default campaign the two differ by ~5x in median
error. This benchmark asks whether that gap is the estimator's or the data's: for each campaign size
(params.yaml's scenario unchanged, `export_sessions.n_sessions` varied, same 70/15/15 random split)
it runs `heimdall export-sessions` + `heimdall extract-features`, fits the kriged map on the train
split (heimdall.kriging.fit_kriged_map) and reports, on the test split:

* map error: RMS of (learned - true) mean RSS at the test transmitters, over the readings the
  likelihood uses (a common offset removed: TX power is profiled out), beside the readings' own
  scatter around the true map (fading + measurement, the oracle's sigma);
* kriged-map ML and oracle ML localization error (median, mean, fraction within 5 km).

Each size is fitted with every ``--gp`` (train.radio_map.gp: the exact GP, O(n³) in the training readings
per receiver, and the sparse inducing-point GP, about linear) on the same sessions, and the fit's wall time
reported beside its accuracy. Prints a table, writes benchmarks/results/map_data.json. Measured on 2 cores
with the exact GP alone: ~1 min at 6,000 sessions, ~9 min at 24,000. Results in docs/model.md and
docs/performance.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from heimdall.baselines import evaluate_baselines, load_rss_features  # noqa: E402
from heimdall.contracts import SPLIT_CODES  # noqa: E402
from heimdall.params import ScenarioParams  # noqa: E402
from heimdall.kriging import fit_kriged_map  # noqa: E402
from heimdall.radiomap import RadioMapGrid, bounds_around, free_space_loss_1km_db, power_and_residual, usable_mask  # noqa: E402
from heimdall.simulator import Scenario  # noqa: E402


def fit_and_score_kriged_map(features: Path, seed: int, min_snr_db: float, spacing_m: float, margin_m: float,
                             gp: str = "auto"):
    """RMS of learned-minus-true map at the test transmitters (usable readings, common offset
    removed), and the kriged map on the baselines' grid (fitted once, reused by the baselines)."""
    d = load_rss_features(features)
    scenario = Scenario(ScenarioParams.model_validate_json(d["scenario_json"]))
    tr, te = (np.flatnonzero(d["split"] == SPLIT_CODES[name]) for name in ("train", "test"))
    anchor = -free_space_loss_1km_db(float(np.median(d["frequency_hz"])) / 1e6)
    t = time.perf_counter()
    kriged = fit_kriged_map(d["rss"][tr], d["present"][tr], d["rx_enu"], d["pos"][tr], d["snr"][tr],
                            min_snr_db, anchor, seed=seed, gp=gp)
    fit_s = time.perf_counter() - t
    pos = d["pos"][te]
    use = usable_mask(d["present"][te], d["snr"][te], min_snr_db)
    true = scenario.mean_rss_dbm(pos[:, 0], pos[:, 1], np.zeros(len(pos)))
    diff = kriged.mean_db(pos[:, 0], pos[:, 1]) - true
    diff -= np.sum(diff * use) / use.sum()
    _, fading = power_and_residual(d["rss"][te], true, use)

    def rms(x):
        return float(np.sqrt(np.sum(x**2 * use) / use.sum()))

    score = {"gp": gp, "fit_s": round(fit_s, 1), "map_rms_db": rms(diff), "reading_scatter_db": rms(fading),
             "inducing_points": int(np.median([len(g.basis_km) for g in kriged.gps])) if gp != "exact" else None,
             "gp_length_km": float(np.median([gp.length_km for gp in kriged.gps])),
             "gp_signal_db": float(np.median([gp.signal_std_db for gp in kriged.gps])),
             "train_readings_per_receiver": int(np.median(
                 usable_mask(d["present"][tr], d["snr"][tr], min_snr_db).sum(0)))}
    return score, RadioMapGrid.from_fitted(kriged, bounds_around(d["pos"][tr], margin_m), spacing_m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sessions", nargs="+", type=int, default=[6000, 12000, 24000])
    ap.add_argument("--gp", nargs="+", default=["exact", "sparse"], choices=["exact", "sparse", "auto"],
                    help="GP fits to compare on the same sessions (train.radio_map.gp)")
    ap.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/map_data.json)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="heimdall-map-data-"))
    rows = []
    try:
        for n in args.sessions:
            p = B.params({"export_sessions.n_sessions": n})
            sessions, features = work / f"sessions-{n}.h5", work / f"features-{n}.h5"
            t = time.perf_counter()
            if not features.exists():
                pfile = B.write_params(p, work / f"params-{n}.yaml")
                B.heimdall("export-sessions", "--params", pfile, "--out", sessions)
                B.heimdall("extract-features", "--params", pfile, "--sessions", sessions, "--out", features)
                sessions.unlink()
            rm = p.train.radio_map
            for gp in args.gp:
                err, grid = fit_and_score_kriged_map(features, p.train.seed, rm.min_snr_db, rm.spacing_km * 1e3,
                                                     rm.margin_km * 1e3, gp)
                base = evaluate_baselines(features, spacing_m=rm.spacing_km * 1e3, margin_m=rm.margin_km * 1e3,
                                          fit_min_snr_db=rm.min_snr_db, seed=p.train.seed, kriged_grid=grid)
                row = {"sessions": n, "n_train": base["n_train"], "n_test": base["n_test"], **err}
                for key in ("kriged_map", "oracle"):
                    row[key] = {k: base[key][k] for k in ("median_error_m", "mean_error_m", "frac_within_5km")}
                row["wall_s"] = round(time.perf_counter() - t, 1)
                rows.append(row)
                print(f"{n} sessions, gp {gp}: fit {row['fit_s']} s, map RMS {row['map_rms_db']:.2f} dB", flush=True)
                t = time.perf_counter()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    headers = ["sessions", "gp", "fit s", "train", "readings/rx", "map RMS dB", "reading scatter dB", "kriged median km", "oracle median km",
               "kriged/oracle", "kriged <5 km", "oracle <5 km", "kriged mean km", "oracle mean km"]
    print(B.table(headers, [[r["sessions"], r["gp"], r["fit_s"], r["n_train"], r["train_readings_per_receiver"], f"{r['map_rms_db']:.2f}", f"{r['reading_scatter_db']:.2f}",
                             f"{r['kriged_map']['median_error_m'] / 1e3:.2f}", f"{r['oracle']['median_error_m'] / 1e3:.2f}",
                             f"{r['kriged_map']['median_error_m'] / r['oracle']['median_error_m']:.1f}",
                             f"{r['kriged_map']['frac_within_5km']:.1%}", f"{r['oracle']['frac_within_5km']:.1%}",
                             f"{r['kriged_map']['mean_error_m'] / 1e3:.1f}", f"{r['oracle']['mean_error_m'] / 1e3:.1f}"]
                            for r in rows]))
    print(f"wrote {B.save('map_data', {'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
