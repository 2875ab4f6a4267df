"""Splits: the test set is honestly unseen."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall.contracts import SPLIT_CODES
from heimdall.errors import HeimdallError
from heimdall.splits import assign_split


def _walks(n_walks=60, per_walk=40, seed=0):
    """Transmitter tracks: consecutive samples of a walk are metres apart (near-duplicates)."""
    rng = np.random.default_rng(seed)
    starts = rng.uniform(-50_000, 50_000, size=(n_walks, 2))
    steps = rng.normal(0, 30.0, size=(n_walks, per_walk, 2)).cumsum(axis=1)
    pos = (starts[:, None, :] + steps).reshape(-1, 2)
    groups = np.repeat([f"walk-{i}" for i in range(n_walks)], per_walk)
    return pos, groups


def test_spatial_blocks_never_straddle_splits():
    pos, groups = _walks()
    block = 5_000.0
    split = assign_split("spatial_blocks", target_enu_m=pos, group_id=groups, val_fraction=0.15,
                         test_fraction=0.15, block_size_m=block, seed=3)
    keys = [tuple(k) for k in np.floor(pos / block).astype(int)]
    seen: dict = {}
    for k, s in zip(keys, split):
        assert seen.setdefault(k, s) == s, f"block {k} is in two splits"
    for code in SPLIT_CODES.values():
        assert (split == code).sum() > 0
    frac_test = (split == SPLIT_CODES["test"]).mean()
    assert 0.1 < frac_test < 0.3


def test_spatial_blocks_separate_near_duplicates():
    pos, groups = _walks()
    split = assign_split("spatial_blocks", target_enu_m=pos, group_id=groups, val_fraction=0.15,
                         test_fraction=0.15, block_size_m=5_000.0, seed=3)
    train = pos[split == SPLIT_CODES["train"]]
    test = pos[split == SPLIT_CODES["test"]]
    # a test position's nearest training position is never a near-duplicate (< 100 m away)
    # unless it is across a block boundary; at most a few such boundary cases
    d = np.sqrt(((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert (d < 100).mean() < 0.10
    # whereas a random split leaks almost every test point
    rsplit = assign_split("random", target_enu_m=pos, group_id=groups, val_fraction=0.15,
                          test_fraction=0.15, block_size_m=5_000.0, seed=3)
    rtrain, rtest = pos[rsplit == 0], pos[rsplit == 2]
    rd = np.sqrt(((rtest[:, None, :] - rtrain[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert (rd < 100).mean() > 0.9


def test_by_group_keeps_groups_whole():
    pos, groups = _walks()
    split = assign_split("by_group", target_enu_m=pos, group_id=groups, val_fraction=0.2,
                         test_fraction=0.2, block_size_m=1.0, seed=5)
    for g in np.unique(groups):
        assert len(np.unique(split[groups == g])) == 1


def test_split_is_deterministic_in_seed():
    pos, groups = _walks()
    kw = dict(target_enu_m=pos, group_id=groups, val_fraction=0.15, test_fraction=0.15, block_size_m=5e3)
    a = assign_split("spatial_blocks", seed=1, **kw)
    assert np.array_equal(a, assign_split("spatial_blocks", seed=1, **kw))
    assert not np.array_equal(a, assign_split("spatial_blocks", seed=2, **kw))


def test_too_few_groups_is_a_clear_error():
    pos = np.zeros((10, 2))
    with pytest.raises(HeimdallError, match="empty"):
        assign_split("spatial_blocks", target_enu_m=pos, group_id=np.array(["a"] * 10),
                     val_fraction=0.15, test_fraction=0.15, block_size_m=1000.0, seed=0)
