"""Train/val/test assignment. The test set must be honestly unseen, and held out the way the
deployed model will meet new data (docs/data-contracts.md "Splits"):

* ``random``: sessions are i.i.d. (the simulator draws every transmitter position afresh). On real
  data, consecutive samples of one trip are seconds and metres apart: a random split leaks them;
* ``by_group``: all sessions of one known source / track stay in one split;
* ``spatial_blocks``: sessions are grouped by square map blocks of ``block_size_km`` around
  their true position, so near-duplicate positions (one walk, one parked car) never straddle
  train and test;
* ``time``: the future is held out: test = sessions starting in [``test_from``, ``test_until``)
  (ISO 8601 dates or datetimes, UTC unless an offset is given; either bound may be left open), or,
  with neither, the latest ``test_fraction`` of sessions;
* ``area``: a place is held out: test = sessions whose transmitter is inside ``test_area``
  [lat_min, lon_min, lat_max, lon_max] (degrees);
* ``list``: an explicit held-out list: test = the session ids in ``test_ids_file`` (one per line,
  ``#`` comments; a file under ``splits/``, which the extract_features stage depends on).

``test_fraction: 0`` with random, by_group, spatial_blocks or time (without bounds) is a production
run: no test split, every labelled session but validation trains (a deployed model should learn from
all the data; its accuracy is what a run with a test split measured).

Whatever the test split, validation (early stopping and every calibration) is carved out of the
rest, never out of test: for ``time``, ``area`` and ``list`` it is ``val_fraction`` of the rest (not
of all sessions: a month holding 77 % of the data left 411 training sessions otherwise), by time (the
latest: the nearest to what the model will meet) for ``time``, by spatial blocks for ``area`` and
``list``; as before for the first three.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from heimdall.contracts import SPLIT_CODES
from heimdall.errors import HeimdallError

log = logging.getLogger(__name__)
STRATEGIES = ("random", "by_group", "spatial_blocks", "time", "area", "list")


def _assign_groups(groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Shuffle whole groups, then fill test, then val, up to their session fractions."""
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    n = len(groups)
    group_split = np.full(len(uniq), SPLIT_CODES["train"], dtype=np.uint8)
    filled = 0
    targets = ((SPLIT_CODES["test"], test_fraction * n), (SPLIT_CODES["val"], (test_fraction + val_fraction) * n))
    it = iter(order)
    for code, upto in targets:
        if upto <= filled:
            continue
        for g in it:
            group_split[g] = code
            filled += counts[g]
            if filled >= upto:
                break
    return group_split[inverse]


def _block_keys(target_enu_m: np.ndarray, block_size_m: float) -> np.ndarray:
    block = np.floor(np.asarray(target_enu_m) / block_size_m).astype(np.int64)
    return block[:, 0] * 1_000_003 + block[:, 1]


def parse_time(text: str, what: str) -> float:
    """ISO 8601 date or datetime -> UTC seconds (naive = UTC); one-line error naming the param."""
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        raise HeimdallError(f"extract_features.split.{what}: {text!r} is not an ISO 8601 date or datetime") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def read_ids_file(path: str | Path) -> set[str]:
    """Session ids from a held-out list (one per line; blank lines and ``#`` comments ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise HeimdallError(f"extract_features.split.test_ids_file: {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise HeimdallError(f"extract_features.split.test_ids_file: {path}: not UTF-8 text") from None
    ids = {line.split("#", 1)[0].strip() for line in lines}
    ids.discard("")
    if not ids:
        raise HeimdallError(f"extract_features.split.test_ids_file: {path}: no session id in it")
    return ids


def _carve_val(split: np.ndarray, keys: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Mark val among the non-test rows: whole groups ``keys`` (shuffled) up to ``val_fraction`` of
    them (of the rest, not of all sessions: a large held-out set must not starve training)."""
    rest = np.flatnonzero(split != SPLIT_CODES["test"])
    sub = _assign_groups(keys[rest], val_fraction, 0.0, seed)
    out = split.copy()
    out[rest[sub == SPLIT_CODES["val"]]] = SPLIT_CODES["val"]
    return out


def assign_split(
    strategy: str,
    *,
    target_enu_m: np.ndarray,
    group_id: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    block_size_m: float,
    seed: int,
    start_time_unix_s: np.ndarray | None = None,
    session_id: np.ndarray | None = None,
    target_latlon: np.ndarray | None = None,
    test_from: str | None = None,
    test_until: str | None = None,
    test_area: tuple[float, float, float, float] | None = None,
    test_ids_file: str | None = None,
) -> np.ndarray:
    n = len(group_id)
    train, val, test = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]
    if strategy == "random":
        split = np.full(n, train, dtype=np.uint8)
        perm = np.random.default_rng(seed).permutation(n)
        n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
        split[perm[:n_test]] = test
        split[perm[n_test : n_test + n_val]] = val
    elif strategy == "by_group":
        split = _assign_groups(np.asarray(group_id).astype(str), val_fraction, test_fraction, seed)
    elif strategy == "spatial_blocks":
        split = _assign_groups(_block_keys(target_enu_m, block_size_m), val_fraction, test_fraction, seed)
    elif strategy == "time":
        t = np.asarray(start_time_unix_s, dtype=np.float64)
        order = np.argsort(t, kind="stable")
        split = np.full(n, train, dtype=np.uint8)
        if test_from is None and test_until is None:
            split[order[n - int(round(test_fraction * n)):]] = test
        else:
            lo = parse_time(test_from, "test_from") if test_from is not None else -np.inf
            hi = parse_time(test_until, "test_until") if test_until is not None else np.inf
            if not lo < hi:
                raise HeimdallError(f"extract_features.split: test_from {test_from} is not before test_until {test_until}")
            split[(t >= lo) & (t < hi)] = test
        rest = order[split[order] != test]  # the training part, oldest first
        split[rest[len(rest) - int(round(val_fraction * len(rest))):]] = val
    elif strategy == "area":
        if test_area is None:
            raise HeimdallError("extract_features.split.test_area: strategy 'area' needs [lat_min, lon_min, lat_max, lon_max]")
        lat_min, lon_min, lat_max, lon_max = test_area
        ll = np.asarray(target_latlon, dtype=np.float64)
        inside = (ll[:, 0] >= lat_min) & (ll[:, 0] <= lat_max) & (ll[:, 1] >= lon_min) & (ll[:, 1] <= lon_max)
        split = np.where(inside, test, train).astype(np.uint8)
        split = _carve_val(split, _block_keys(target_enu_m, block_size_m), val_fraction, seed)
    elif strategy == "list":
        if test_ids_file is None:
            raise HeimdallError("extract_features.split.test_ids_file: strategy 'list' needs a file of session ids")
        wanted = read_ids_file(test_ids_file)
        ids = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in session_id])
        held = np.isin(ids, sorted(wanted))
        unknown = len(wanted) - int(held.sum())
        if unknown:  # e.g. filtered out by the export (too few receivers): counted, not fatal
            log.warning("extract_features.split.test_ids_file: %s: %d of its %d session ids are not in the "
                        "sessions file (first: %r)", test_ids_file, unknown, len(wanted),
                        sorted(wanted - set(ids[held]))[0])
        split = np.where(held, test, train).astype(np.uint8)
        split = _carve_val(split, _block_keys(target_enu_m, block_size_m), val_fraction, seed)
    else:
        raise HeimdallError(f"extract_features.split.strategy: unknown strategy '{strategy}'")
    counts = {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}
    # test_fraction 0 (random, by_group, spatial_blocks, time without bounds): a production run, no test
    production = test_fraction == 0 and strategy in ("random", "by_group", "spatial_blocks", "time") and \
        test_from is None and test_until is None
    empty = [name for name, k in counts.items() if k == 0 and not (name == "test" and production)]
    if empty:
        raise HeimdallError(
            f"extract_features.split: strategy '{strategy}' left the {'/'.join(empty)} split empty "
            f"({counts}); use more sessions, smaller blocks or larger fractions"
        )
    return split
