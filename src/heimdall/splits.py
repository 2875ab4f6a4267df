"""Train/val/test assignment. The test set must be honestly unseen:

* ``random``: sessions are i.i.d. (the simulator draws every transmitter position afresh);
* ``by_group``: all sessions of one known source / track stay in one split;
* ``spatial_blocks``: sessions are grouped by square map blocks of ``block_size_km`` around
  their true position, so near-duplicate positions (one walk, one parked car) never straddle
  train and test.
"""

from __future__ import annotations

import numpy as np

from heimdall.contracts import SPLIT_CODES
from heimdall.errors import HeimdallError


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
        for g in it:
            group_split[g] = code
            filled += counts[g]
            if filled >= upto:
                break
    return group_split[inverse]


def assign_split(
    strategy: str,
    *,
    target_enu_m: np.ndarray,
    group_id: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    block_size_m: float,
    seed: int,
) -> np.ndarray:
    n = len(group_id)
    if strategy == "random":
        split = np.full(n, SPLIT_CODES["train"], dtype=np.uint8)
        perm = np.random.default_rng(seed).permutation(n)
        n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
        split[perm[:n_test]] = SPLIT_CODES["test"]
        split[perm[n_test : n_test + n_val]] = SPLIT_CODES["val"]
    elif strategy == "by_group":
        split = _assign_groups(np.asarray(group_id).astype(str), val_fraction, test_fraction, seed)
    elif strategy == "spatial_blocks":
        block = np.floor(np.asarray(target_enu_m) / block_size_m).astype(np.int64)
        keys = block[:, 0] * 1_000_003 + block[:, 1]
        split = _assign_groups(keys, val_fraction, test_fraction, seed)
    else:
        raise HeimdallError(f"extract_features.split.strategy: unknown strategy '{strategy}'")
    counts = {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}
    empty = [name for name, k in counts.items() if k == 0]
    if empty:
        raise HeimdallError(
            f"extract_features.split: strategy '{strategy}' left the {'/'.join(empty)} split empty "
            f"({counts}); use more sessions, smaller blocks or larger fractions"
        )
    return split
