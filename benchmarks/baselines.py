"""Print the RSS-only baselines on a features file: python benchmarks/baselines.py [features.h5].

Fits every radio map on the train split (kNN's k tuned on val), scores on the test split, and
prints mean/median/p90 localization error with wall times (fit + predict). Oracle and the
Cramér–Rao bound need the file's scenario_json (synthetic campaigns).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from heimdall.baselines import evaluate_baselines

SCORE_KEYS = ("mean_error_m", "median_error_m", "p90_error_m", "frac_within_5km", "wall_s")
ROWS = (
    ("knn", "kNN fingerprinting"),
    ("ml_logdistance", "ML, log-distance map"),
    ("kriged_map", "ML, kriged map"),
    ("oracle", "ML, true map (oracle)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", nargs="?", default="data/features.h5", type=Path)
    parser.add_argument("--tx-power-range", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                        help="confine the ML power estimate to [LO, HI] dBm (default: free)")
    args = parser.parse_args()

    started = time.perf_counter()
    res = evaluate_baselines(args.features, tx_power_range_dbm=args.tx_power_range)
    total = time.perf_counter() - started

    print(f"{args.features}: train {res['n_train']}, val {res['n_val']}, test {res['n_test']} sessions"
          + (f"; TX power confined to {args.tx_power_range} dBm" if args.tx_power_range else ""))
    print(f"{'baseline':<24}{'mean km':>9}{'median km':>11}{'p90 km':>9}{'<5 km':>7}{'wall s':>9}  notes")
    for key, label in ROWS:
        if key not in res:
            continue
        r = res[key]
        notes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k not in SCORE_KEYS)
        print(f"{label:<24}{r['mean_error_m'] / 1e3:>9.1f}{r['median_error_m'] / 1e3:>11.2f}"
              f"{r['p90_error_m'] / 1e3:>9.1f}{r['frac_within_5km']:>7.0%}{r['wall_s']:>9.1f}  {notes}")
    if "crlb_rmse_m" in res:
        print(f"{'Cramer-Rao bound':<24}{'rms':>9}{'median km':>11}")
        print(f"{'(true map, oracle sigma)':<24}{res['crlb_rms_m'] / 1e3:>9.2f}{res['crlb_rmse_m'] / 1e3:>11.2f}")
    print(f"total wall time {total:.1f} s")


if __name__ == "__main__":
    main()
