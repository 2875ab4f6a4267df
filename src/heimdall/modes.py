"""The posterior's modes as a Gaussian mixture: the one implementation, run inside the exported graph
(LocalizationNet.posterior_modes) and so by calibration, evaluate and predict alike. Torch only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heimdall.contracts import N_MODES

# Two posterior modes are separate when neither is the largest cell within this many cells of the
# other (a (2k+1)² max-pool window): 5 km on the default 1 km grid, the scale of one mode's blob.
MODE_SEPARATION_CELLS = 5


def disc_offsets(w: int = MODE_SEPARATION_CELLS) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) offsets of the cells within ``w`` cells of a cell (a disc)."""
    disc = [(dr, dc) for dr in range(-w, w + 1) for dc in range(-w, w + 1) if dr * dr + dc * dc <= w * w]
    return torch.tensor([d[0] for d in disc]), torch.tensor([d[1] for d in disc])


def posterior_modes(prob, grid_shape, grid_east_m, grid_north_m, cell_var_m2, disc_rows, disc_cols):
    """The modes of cell probabilities ``prob`` (B, G) over a row-major ``grid_shape`` (north rows, east
    columns) grid as a Gaussian mixture of at most N_MODES components: (weight (B, K),
    mean (B, K, 2), covariance (B, K, 2, 2)), most probable first.

    A mode is a cell that is the most probable within MODE_SEPARATION_CELLS of itself (the first in
    row-major order where equal); its part of the map is the cells within that radius that are nearer
    to it than to any other mode; its weight, mean and covariance are the posterior mass and moments
    of that part (plus the cell's own variance). The rest of the mass (diffuse tails) is "elsewhere": 1 − Σ weight. Slots without
    a mode weigh 0 (mean: the map's first cell, covariance: the cell's).

    The weights are calibrated and the alternatives measured worse (docs/model.md "Modes"). Only
    each peak's disc is gathered ((B, K, 81), not (B, K, G)): ~0.1 ms instead of ~1 ms in onnxruntime.
    """
    b, k = prob.shape[0], N_MODES
    n_north, n_east = grid_shape
    w = MODE_SEPARATION_CELLS
    image = prob.reshape(b, 1, n_north, n_east)
    peak = image >= F.max_pool2d(image, 2 * w + 1, stride=1, padding=w)
    # A flat stretch (equal probabilities: a diffuse posterior) has one peak, its first cell in
    # row-major order: a peak must beat, strictly, the window's cells that come before it (the
    # w rows above; the w cells to its left). Without this, onnxruntime and PyTorch picked
    # different cells of a plateau (their TopK break ties differently): modes 4-24 km apart.
    pad = F.pad(image, (w, w, w, 0), value=-1.0)  # probabilities are >= 0
    above = F.max_pool2d(pad, (w, 2 * w + 1), stride=1)[:, :, :n_north]
    left = F.max_pool2d(F.pad(image, (w, 0, 0, 0), value=-1.0), (1, w), stride=1)[:, :, :, :n_east]
    peak = (peak & (image > above) & (image > left)).reshape(b, -1)
    height, cell = torch.where(peak, prob, torch.zeros_like(prob)).topk(k, dim=1)  # (B, K)
    row, col = cell // n_east, cell % n_east
    rr, cc = row[..., None] + disc_rows, col[..., None] + disc_cols  # (B, K, D) disc cells
    on_map = (rr >= 0) & (rr < n_north) & (cc >= 0) & (cc < n_east) & (height > 0)[..., None]
    # nearest peak (in cells, exact integers; ties to the more probable peak); slots without a peak own nothing
    d2 = (rr[..., None] - row[:, None, None, :]) ** 2 + (cc[..., None] - col[:, None, None, :]) ** 2  # (B,K,D,K)
    d2 = d2 + (height <= 0).long()[:, None, None, :] * (4 * (n_north + n_east) ** 2)
    own = d2.argmin(-1) == torch.arange(k)[None, :, None]
    idx = rr.clamp(0, n_north - 1) * n_east + cc.clamp(0, n_east - 1)  # (B, K, D)
    part = prob.gather(1, idx.reshape(b, -1)).reshape(idx.shape) * (on_map & own).to(prob.dtype)
    east, north = grid_east_m[idx], grid_north_m[idx]  # (B, K, D)
    weight = part.sum(-1)  # (B, K)
    total = weight.clamp_min(1e-30)
    me, mn = (part * east).sum(-1) / total, (part * north).sum(-1) / total
    me = torch.where(weight > 0, me, grid_east_m[0])  # an unused slot: the map's first cell
    mn = torch.where(weight > 0, mn, grid_north_m[0])
    de, dn = east - me[..., None], north - mn[..., None]
    cee = (part * de * de).sum(-1) / total + cell_var_m2
    cen = (part * de * dn).sum(-1) / total
    cnn = (part * dn * dn).sum(-1) / total + cell_var_m2
    cov = torch.stack([torch.stack([cee, cen], -1), torch.stack([cen, cnn], -1)], -2)  # (B, K, 2, 2)
    weight, order = weight.topk(k, dim=1)  # most probable first
    mean = torch.stack([me.gather(1, order), mn.gather(1, order)], -1)
    return weight, mean, cov.gather(1, order[..., None, None].expand(b, k, 2, 2))
