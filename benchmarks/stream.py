"""Training from features.h5 without holding the log-mel (issue 21): read time and peak memory, lazy vs eager.

    python benchmarks/stream.py [--features data/features.h5] [--repeats 5] [--sessions 24000 100000]

* read: one epoch of training batches (params.yaml's train.batch_size, the DataModule's sampler and seed),
  the log-mel read from features.h5 (heimdall.data.H5Rows) vs indexed in memory as before; the whole
  DataLoader epoch (SessionBatches vs the TensorDataset it replaced); the HDF5 read strategies H5Rows chose
  between; load_features itself (the log-mel's finiteness pass) vs reading everything.
* memory: peak RSS (VmHWM) of a fresh interpreter that runs load_features and one epoch of training and
  validation batches, lazy vs eager (the eager arm rebuilds the old path: the log-mel read whole, TensorDatasets).
  --sessions N ... also measures features.h5 files of N sessions made by repeating the file's rows (written
  to --workdir, 57 KB per session on disk; the eager arm only up to --eager-up-to sessions).
The page cache holds the file in every run (it was just written or read): cold-disk reads are not measured.
Prints the tables of docs/performance.md and writes benchmarks/results/stream.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
import _bench as B
import h5py, numpy as np, torch
from torch.utils.data import DataLoader, TensorDataset
from heimdall.data import load_features
from heimdall.training import LocalizationDataModule
after_imports = B.peak_rss_mib()
path, mode, batch = Path({path!r}), {mode!r}, {batch}
t = time.perf_counter()
fs = load_features(path)
if mode == "eager":  # the path this replaced: the log-mel read whole and checked, then TensorDatasets
    with h5py.File(path, "r") as f:
        fs.logmel = f["features/logmel_db"][()]
    assert np.isfinite(fs.logmel).all()
    def dataset(idx):
        inputs = list(fs.model_inputs(idx))
        return TensorDataset(*inputs, torch.from_numpy(fs.target_enu_m[idx].astype(np.float32)))
    train = DataLoader(dataset(fs.indices("train")), batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(dataset(fs.indices("val")), batch_size=max(batch, 256))
else:
    dm = LocalizationDataModule(fs, batch, True, 0)
    train, val = dm.train_dataloader(), dm.val_dataloader()
load_s = time.perf_counter() - t
t = time.perf_counter()
n = sum(len(b[0]) for b in train) + sum(len(b[0]) for b in val)
print(json.dumps({{"mode": mode, "sessions": len(fs.split), "after_imports_mib": after_imports,
                  "peak_rss_mib": B.peak_rss_mib(), "load_s": load_s, "epoch_s": time.perf_counter() - t,
                  "rows": n}}))
"""


def epoch_batches(n_train: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """The positions of one epoch's batches, as the DataModule's RandomSampler draws them."""
    import torch

    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).numpy()
    return [perm[s:s + batch] for s in range(0, n_train, batch)]


def read_times(path: Path, batch: int, repeats: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from heimdall.data import load_features
    from heimdall.training import LocalizationDataModule

    fs = load_features(path)
    tr = fs.indices("train")
    batches = [tr[b] for b in epoch_batches(len(tr), batch)]
    with h5py.File(path, "r") as f:
        eager = f["features/logmel_db"][()]
    held = fs.logmel
    fs.logmel = eager
    old = TensorDataset(*fs.model_inputs(tr), torch.from_numpy(fs.target_enu_m[tr].astype(np.float32)))
    fs.logmel = held
    dm = LocalizationDataModule(fs, batch, True, 0)

    def h5py_epoch(how: str, cache: int | None):
        # a handle per epoch and no other open: a file's chunk cache is its first opener's in the process
        with h5py.File(path, "r", **({} if cache is None else {"rdcc_nbytes": cache})) as f:
            ds = f["features/logmel_db"]
            if how == "fancy":
                return [ds[np.sort(r)] for r in batches]
            return [[ds[i:i + 1] for i in np.sort(r)] for r in batches]

    def eager_load():
        g = load_features(path)
        with h5py.File(path, "r") as f:
            g.logmel = f["features/logmel_db"][()]
        return np.isfinite(g.logmel).all()

    arms = {  # one epoch each; the alternatives H5Rows chose between (file order, chunk cache off) in between
        "logmel_lazy": lambda: [fs.logmel[r] for r in batches],
        "logmel_memory": lambda: [eager[r] for r in batches],
        "fancy_cache_on": lambda: h5py_epoch("fancy", None),
        "rows_cache_on": lambda: h5py_epoch("rows", None),
        "rows_cache_off": lambda: h5py_epoch("rows", 0),
        "dataloader_lazy": lambda: list(dm.train_dataloader()),
        "dataloader_eager": lambda: list(DataLoader(old, batch_size=batch, shuffle=True,
                                                    generator=torch.Generator().manual_seed(0))),
        "load_features_lazy": lambda: load_features(path),
        "load_features_eager": eager_load,
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):  # interleaved: a busy machine slows every arm alike
        for k, fn in arms.items():
            times[k].append(B.timed(fn)[0])
    return {"batches": len(batches), "batch": batch, "seconds": times,
            **{f"{k}_s": B.median(v) for k, v in times.items()}, **{f"{k}_min_s": min(v) for k, v in times.items()}}


def tiled_copy(src: Path, dst: Path, n: int) -> Path:
    """features.h5 with ``n`` sessions: the source's rows repeated (ids made unique), written 4,096 rows at a
    time, every dataset chunked as in the source (the log-mel as extract_features chunks it)."""
    if dst.exists():
        with h5py.File(dst, "r") as f:
            if len(f["sessions/split"]) == n:
                return dst
    with h5py.File(src, "r") as s, h5py.File(dst, "w") as d:
        d.attrs.update(dict(s.attrs))
        m = len(s["sessions/split"])

        def copy(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            if not name.startswith(("sessions/", "features/")):
                d.create_dataset(name, data=obj[()])
                return
            out = d.create_dataset(name, (n, *obj.shape[1:]), obj.dtype, chunks=obj.chunks)
            for start in range(0, n, m):
                for a in range(0, min(m, n - start), 4096):
                    part = obj[a:min(a + 4096, m, n - start)]
                    if name == "sessions/session_id":
                        part = np.array([f"{v.decode()}-{start + a + k}" for k, v in enumerate(part)], dtype=object)
                    out[start + a:start + a + len(part)] = part

        s.visititems(copy)
    return dst


ARMS = [
    ("logmel_lazy", "log-mel rows from features.h5 (H5Rows)"),
    ("logmel_memory", "log-mel rows from memory (numpy, as before)"),
    ("fancy_cache_on", "  h5py fancy index, chunk cache on"),
    ("rows_cache_on", "  row by row, chunk cache on"),
    ("rows_cache_off", "  row by row, chunk cache off (no copy into a batch)"),
    ("dataloader_lazy", "DataLoader epoch, SessionBatches (lazy)"),
    ("dataloader_eager", "DataLoader epoch, TensorDataset (eager, as before)"),
    ("load_features_lazy", "load_features (the log-mel checked in pieces)"),
    ("load_features_eager", "load_features + the log-mel read whole (as before)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=Path, default=B.REPO / "data/features.h5")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sessions", type=int, nargs="*", default=[],
                    help="also measure peak memory at these many sessions (the file's rows repeated)")
    ap.add_argument("--eager-up-to", type=int, default=24_000,
                    help="measure the eager arm only up to this many sessions (it holds ~100 KB per session)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heimdall-stream-bench"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    batch = B.params().train.batch_size

    reads = read_times(args.features, batch, args.repeats)
    print(f"one epoch of training batches: {reads['batches']} x {batch} sessions; {args.repeats} runs interleaved")
    print(B.table(["what", "median s", "min s", "ms per batch"],
                  [[label, reads[f"{k}_s"], reads[f"{k}_min_s"],
                    1e3 * reads[f"{k}_s"] / (1 if k.startswith("load") else reads["batches"])] for k, label in ARMS]))

    bench = str(Path(__file__).resolve().parent)
    files = [(args.features, None)]
    if args.sessions:
        args.workdir.mkdir(parents=True, exist_ok=True)
        files += [(tiled_copy(args.features, args.workdir / f"features-{n}.h5", n), n) for n in args.sessions]
    runs = []
    for path, n in files:
        for mode in ("eager", "lazy"):
            if mode == "eager" and n is not None and n > args.eager_up_to:
                continue
            runs.append(B.run_python(CHILD.format(bench=bench, path=str(path), mode=mode, batch=batch)))
    print("\npeak RSS, load_features + one epoch of training and validation batches (fresh interpreter)")
    print(B.table(["sessions", "log-mel", "after imports MiB", "peak RSS MiB", "load s", "epoch s"],
                  [[r["sessions"], r["mode"], r["after_imports_mib"], r["peak_rss_mib"], r["load_s"], r["epoch_s"]]
                   for r in runs]))
    path = B.save("stream", {"features": str(args.features), "batch": batch, "repeats": args.repeats,
                             "reads": reads, "memory": runs}, args.out)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
