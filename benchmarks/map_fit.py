"""One receiver's radio-map GP fit, exact against sparse, as its training readings grow: wall time, peak
memory and accuracy against the field the readings were drawn from.

    python benchmarks/map_fit.py [--readings 3600 8000 14400 60000] [--exact-max 14400]

The readings are a stationary random field with the default campaign's fitted kernel (RBF, 5 dB signal,
3.4 km length scale: benchmarks/results/map_data.json) plus 2 dB noise, uniform over the default
campaign's ~180 x 150 km area. Both fits get the true hyper-parameters (the hyper-parameter search is
the same 800-reading subsample for both) and compute 500 leave-one-out residuals, as the train stage
does (heimdall.gp.exact_gp / sparse_gp). One BLAS thread, as in the train stage. Peak memory is
tracemalloc's peak of the fit (numpy's allocations). Map RMS: posterior mean minus the true field at
2,000 points away from the edges. Prints a table, writes benchmarks/results/map_fit.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from heimdall.gp import exact_gp, sparse_gp  # noqa: E402

SIGNAL_DB, LENGTH_KM, NOISE_DB, AREA_KM = 5.0, 3.4, 2.0, (180.0, 150.0)


def field(seed: int, n_waves: int = 1000):
    """A stationary random field with an RBF covariance (random Fourier features)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_waves, 2)) / LENGTH_KM
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    return lambda x: SIGNAL_DB * np.sqrt(2 / n_waves) * np.cos(x @ w.T + phase).sum(axis=1)


def fit(method: str, x, e, truth, query) -> dict:
    fn = exact_gp if method == "exact" else sparse_gp
    tracemalloc.start()
    t = time.perf_counter()
    gp, _, loo = fn(x, e, SIGNAL_DB, LENGTH_KM, NOISE_DB, loo_index=np.arange(500))
    wall = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"method": method, "fit_s": round(wall, 2), "peak_mib": round(peak / 2**20),
            "basis_points": len(gp.basis_km), "map_rms_db": float(np.sqrt(np.mean((gp.predict(query) - truth) ** 2))),
            "loo_rms_db": float(np.sqrt(np.mean(loo**2)))}


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--readings", nargs="+", type=int, default=[3600, 8000, 14400, 60000])
    ap.add_argument("--exact-max", type=int, default=14400, help="skip the exact fit beyond this many readings")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    f = field(0)
    rng = np.random.default_rng(1)
    query = np.stack([rng.uniform(10, AREA_KM[0] - 10, 2000), rng.uniform(10, AREA_KM[1] - 10, 2000)], axis=1)
    truth = f(query)
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for n in args.readings:
            x = np.stack([rng.uniform(0, AREA_KM[0], n), rng.uniform(0, AREA_KM[1], n)], axis=1)
            e = f(x) + NOISE_DB * rng.standard_normal(n)
            for method in ("exact", "sparse"):
                if method == "exact" and n > args.exact_max:
                    continue
                rows.append({"readings": n, **fit(method, x, e, truth, query)})
                print(f"{n} readings, {method}: {rows[-1]['fit_s']} s", flush=True)
    print(B.table(["readings", "GP", "basis points", "fit s", "peak MiB", "map RMS dB", "LOO RMS dB"],
                  [[r["readings"], r["method"], r["basis_points"], r["fit_s"], r["peak_mib"], f"{r['map_rms_db']:.3f}",
                    f"{r['loo_rms_db']:.3f}"] for r in rows]))
    print(f"wrote {B.save('map_fit', {'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
