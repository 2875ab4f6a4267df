"""Resource budgets: a stage estimates the memory (and disk) its params and data demand *before* allocating,
and refuses with one line naming the param or the data that drives the estimate.

The memory budget is ``HEIMDALL_MEMORY_BUDGET_GB`` (GiB, a positive number); unset, 80 % of the memory this
process may use (the machine's RAM, or its cgroup limit when lower). docs/reliability.md "Memory".
The estimates are deliberately generous upper bounds of the arrays a stage holds at once (measured on the
default params, docs/performance.md); they are a guard against params or data off by orders of magnitude,
not an accounting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from heimdall.errors import HeimdallError

BUDGET_ENV = "HEIMDALL_MEMORY_BUDGET_GB"
DEFAULT_FRACTION = 0.8
GIB = float(1 << 30)


def _machine_bytes() -> float:
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, float(text))
    return total


def memory_budget_bytes() -> float:
    """The memory budget in bytes (HEIMDALL_MEMORY_BUDGET_GB, else 80 % of the machine's or cgroup's memory)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_FRACTION * _machine_bytes()
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < 1e6):
        raise HeimdallError(f"{BUDGET_ENV}={raw!r}: expected a positive number of GiB (e.g. 8)")
    return value * GIB


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.1f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / (1 << 20):,.1f} MiB"


def check_memory(what: str, need_bytes: float, fix: str) -> None:
    """Refuse (one line) when ``need_bytes`` exceeds the budget. ``what``: the param/data and its value."""
    budget = memory_budget_bytes()
    if need_bytes > budget:
        raise HeimdallError(f"{what} needs ~{gib(need_bytes)} of memory, over the budget of {gib(budget)} "
                            f"({BUDGET_ENV}); {fix}")


def check_disk(path: Path, need_bytes: float, what: str) -> None:
    """Refuse (one line) when the output's filesystem has less free space than ``need_bytes``."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise HeimdallError(f"{path}: {what} needs ~{gib(need_bytes)} on disk, {gib(free)} free there")


# ---- estimates ----------------------------------------------------------------------------------------
# bytes per (session, receiver, sample) the simulator holds at once in a block (complex128 fading, LO,
# signal, float32/64 noise and power, int16 counts and their temporaries), and per (session, sample)
SIM_BYTES_PER_SAMPLE = 160
SIM_BYTES_PER_SESSION_SAMPLE = 64
# per session of the campaign (ids, truth, per-receiver draws) and per (session, receiver)
SESSION_BYTES = 600
SESSION_RECEIVER_BYTES = 48


def export_sessions_memory(n_sessions: int, n_receivers: int, n_samples: int, block_sessions: int) -> tuple[float, float]:
    """(bytes that grow with the number of sessions, bytes of one block of IQ) for an export."""
    b = min(block_sessions, n_sessions)
    per_sessions = n_sessions * (SESSION_BYTES + SESSION_RECEIVER_BYTES * n_receivers)
    per_block = b * n_samples * (SIM_BYTES_PER_SAMPLE * n_receivers + SIM_BYTES_PER_SESSION_SAMPLE)
    return float(per_sessions), float(per_block)


def check_export_sessions(exp, n_sessions: int, n_receivers: int, block_sessions: int, out: Path | None = None,
                          sessions_from: str = "export_sessions.n_sessions") -> None:
    """An export's memory (and the output's disk) against the budget, naming what drives it: ``sessions_from``
    (the param, or the database) for the sessions, export_sessions.duration_s x sample_rate_hz for a block."""
    n, s = n_sessions, exp.n_samples
    per_sessions, per_block = export_sessions_memory(n, n_receivers, s, block_sessions)
    if per_sessions >= per_block:
        what, fix = f"{sessions_from}={n} ({n_receivers} receivers)", f"lower {sessions_from}"
    else:
        what = (f"export_sessions.duration_s={exp.duration_s:g} x sample_rate_hz={exp.sample_rate_hz} "
                f"({s:,} samples per recording, {n_receivers} receivers)")
        fix = "lower export_sessions.duration_s or sample_rate_hz"
    check_memory(what, per_sessions + per_block, fix)
    if out is not None:  # int16 I/Q counts dominate the file
        check_disk(out, 4.0 * n * n_receivers * s, f"{sessions_from}={n} x {s:,} samples x {n_receivers} receivers "
                   "of IQ")


def check_extract_features(p, n_sessions: int, n_receivers: int, n_samples: int, n_frames_hop: int, out: Path) -> None:
    """extract_features: one batch of IQ and spectrograms in memory, the whole output on disk."""
    b, r = min(p.batch_sessions, n_sessions), n_receivers
    # int16 IQ, complex64 IQ and its scaled copy; the two-sided spectrogram (complex STFT + power) and the mel image
    per_batch = b * r * (20 * n_samples + 16 * p.n_fft * n_frames_hop + 12 * p.n_mels * p.n_frames)
    per_sessions = n_sessions * (SESSION_BYTES + SESSION_RECEIVER_BYTES * r)
    if per_batch >= per_sessions:
        what = (f"extract_features.batch_sessions={p.batch_sessions} x n_fft={p.n_fft} x n_frames={p.n_frames} "
                f"({n_samples:,} samples per recording, {r} receivers)")
        fix = "lower extract_features.batch_sessions"
    else:
        what, fix = f"the input's {n_sessions} sessions ({r} receivers)", "export fewer sessions"
    check_memory(what, per_batch + per_sessions, fix)
    check_disk(out, 4.0 * n_sessions * r * p.n_mels * p.n_frames,
               f"{n_sessions} sessions x {r} receivers x n_mels={p.n_mels} x n_frames={p.n_frames} of log-mel")


# per (session, receiver) of a features.h5 held in memory: rss, snr (float32), present, has_iq (bool), and the
# float64 / float32 copies the radio map, baselines and model inputs make of them
FEATURE_READING_BYTES = 32
# log-mel copies of the largest batch at once: the H5Rows read block and the batch it fills, the augmented and
# normalised tensors of the network's first layer
LOGMEL_BATCH_COPIES = 4
# log-mel rows a stage reads at once, at least: H5Rows' and load_features' pieces (heimdall.data.READ_ROWS), the
# validation loader's batch (max(train.batch_size, 256)); evaluation and export batches are 128
MIN_BATCH_ROWS = 256


def _features_parts(path: Path, batch_rows: int) -> tuple[float, float, int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            n, r, m, fr = f["features/logmel_db"].shape
    except Exception:  # noqa: BLE001 - not this check's business: load_features names the problem
        return 0.0, 0.0, 0
    per_sessions = float(n) * (SESSION_BYTES + FEATURE_READING_BYTES * r)
    return per_sessions, float(LOGMEL_BATCH_COPIES) * max(batch_rows, MIN_BATCH_ROWS) * r * m * fr * 4, n


def features_memory(path: Path, batch_rows: int = MIN_BATCH_ROWS) -> tuple[float, int]:
    """(bytes load_features and the stages' batches hold, sessions) of a features.h5, from its dataset shapes;
    (0, 0) if unreadable (the reader then reports what is wrong with the file). The log-mel is not held: it
    is read by batches of at most max(``batch_rows``, 256) sessions (heimdall.data.H5Rows)."""
    per_sessions, per_batch, n = _features_parts(path, batch_rows)
    return per_sessions + per_batch, n


def check_features_file(path: Path, stage: str, batch_rows: int = MIN_BATCH_ROWS) -> None:
    """The features a stage holds (scalars of every session, log-mel of one batch) against the budget."""
    per_sessions, per_batch, n = _features_parts(path, batch_rows)
    if per_sessions >= per_batch:
        what, fix = f"{path}: {n} sessions of scalar features ({stage} holds them whole)", "fewer sessions"
    else:
        what = f"{path}: log-mel batches of {max(batch_rows, MIN_BATCH_ROWS)} sessions ({stage})"
        fix = "a smaller train.batch_size, or extract_features.n_mels / n_frames"
    check_memory(what, per_sessions + per_batch, fix)


# per map cell: tabulation (coordinates, float64 means, float32 grids) per receiver, and per session of a
# batch the (batch, cells) float32 tensors of the posterior and their gradients
GRID_BYTES_PER_CELL = 64
GRID_BYTES_PER_CELL_RECEIVER = 40
GRID_BYTES_PER_CELL_SESSION = 64
GRID_EVAL_BATCH = 128  # sessions per evaluation batch (FeatureSet.input_batches)


def check_radio_map(bounds_m, radio_map, n_receivers: int, batch_size: int, n_train: int = 0,
                    gp_fit_bytes: float = 0.0) -> None:
    """The GP fit over ``n_train`` training sessions (``gp_fit_bytes``: heimdall.gp.gp_fit_bytes) and the
    radio-map grid (the training targets' box + margin at spacing) against the budget, before fitting."""
    check_memory(f"train.radio_map.gp={radio_map.gp}: a GP fit over up to {n_train:,} training readings per receiver",
                 gp_fit_bytes, "train.radio_map.gp: sparse (memory bounded by its inducing points), or fewer sessions")
    e0, e1, n0, n1 = bounds_m
    spacing = radio_map.spacing_km * 1e3
    n_east = int((e1 - e0) // spacing) + 2
    n_north = int((n1 - n0) // spacing) + 2
    cells = float(n_east) * n_north
    per_cell = GRID_BYTES_PER_CELL + GRID_BYTES_PER_CELL_RECEIVER * n_receivers + \
        GRID_BYTES_PER_CELL_SESSION * max(batch_size, GRID_EVAL_BATCH)
    box = f"{(e1 - e0) / 1e3 - 2 * radio_map.margin_km:,.0f} x {(n1 - n0) / 1e3 - 2 * radio_map.margin_km:,.0f} km"
    check_memory(f"train.radio_map: spacing_km={radio_map.spacing_km:g} over the training targets' {box} box + "
                 f"margin_km={radio_map.margin_km:g} = a {n_east:,} x {n_north:,} grid ({cells:,.0f} cells)",
                 cells * per_cell, "raise train.radio_map.spacing_km, lower margin_km, or exclude targets far from "
                 "the receivers (extract_features.max_target_distance_km)")
