"""LocalizationNet: receivers' features -> transmitter position (ENU metres) with a full 2x2 covariance.

Two parts, one module (so the ONNX export carries everything the estimator needs):

1. A **receiver-set network**. Each present receiver becomes a token: a small ResNet over its
   log-mel spectrogram, an MLP over its scalars (RSS, SNR, present/has-IQ flags), its position and
   a learned receiver embedding. Masked self-attention mixes the tokens (absent receivers are
   masked out, so any subset works) and a masked mean pool feeds a Gaussian head: mean and the
   Cholesky factor of the covariance. Order of receivers does not matter (permutation invariant).

2. A **likelihood refinement over a learned radio map**. A few thousand sessions cannot teach an
   inverse regressor a 5 km-correlated radio map over ~27,000 km², but a per-receiver forward map
   (log-distance + Gaussian-process residual, fitted on the training split) can be inverted:
   for every cell of a grid the RSS likelihood with the unknown TX power profiled out, times the
   network's Gaussian as a prior (it removes the far-away ambiguous solutions RSS alone allows),
   gives a posterior whose mean and covariance are the output. Its temperature and the prior's
   width are calibrated on the validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from heimdall.contracts import FEATURE_NORMALIZATION_KEYS
from heimdall.txpower import profile_tx_power

LOG_2PI = math.log(2 * math.pi)
MASK_VALUE = -1e4  # additive attention mask (finite: keeps ONNX graphs and all-absent rows NaN-free)


@dataclass(frozen=True)
class ModelConfig:
    n_receivers: int
    n_mels: int
    n_frames: int
    inputs: str = "both"  # spectrogram | scalars | both
    cnn_width: int = 8
    cnn_depth: int = 2
    cnn_pool: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    dropout: float = 0.0
    # "direct": the head regresses the mean; "receivers": the mean is an attention-weighted average
    # of the present receivers' positions plus the head's offset (a weighted centroid: generalises to
    # areas without training sessions, where a direct regressor extrapolates poorly).
    head: str = "direct"


# ---------------------------------------------------------------------------------------------
# Loss


def gaussian_nll(mean: torch.Tensor, chol: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 2-D Gaussian negative log-likelihood with covariance L Lᵀ (L lower-triangular).

    NLL = ½ (y−μ)ᵀ Σ⁻¹ (y−μ) + ½ log|Σ| + log 2π, with z = L⁻¹(y−μ) by forward substitution and
    ½ log|Σ| = log L₁₁ + log L₂₂. The diagonal-covariance NLL is the special case L₂₁ = 0.
    """
    d = target - mean
    l11, l21, l22 = chol[..., 0, 0], chol[..., 1, 0], chol[..., 1, 1]
    z1 = d[..., 0] / l11
    z2 = (d[..., 1] - l21 * z1) / l22
    return 0.5 * (z1**2 + z2**2) + torch.log(l11) + torch.log(l22) + LOG_2PI


def chol_2x2(cov: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of (..., 2, 2) SPD matrices, closed form (ONNX-friendly)."""
    a, b, c = cov[..., 0, 0], cov[..., 1, 0], cov[..., 1, 1]
    l11 = torch.sqrt(a)
    l21 = b / l11
    l22 = torch.sqrt(torch.clamp(c - l21**2, min=1e-12))
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([l11, z], -1), torch.stack([l21, l22], -1)], -2)


# ---------------------------------------------------------------------------------------------
# Receiver-set network


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, width)

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


class SpectrogramEncoder(nn.Module):
    """Small ResNet over one receiver's normalised log-mel image (1 x M x F) -> d_model.

    The image is average-pooled first (4 x 4 by default): the location information in a
    spectrogram is mostly its calibrated level and coarse shape, and at full resolution the convs
    would cost ~50x more CPU time per epoch for no measurable gain.
    """

    def __init__(self, width: int, depth: int, d_model: int, pool: int):
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(pool), nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
        w = width
        for i in range(depth):
            layers.append(ResBlock(w))
            if i < depth - 1:  # halve resolution, double width
                layers += [nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU()]
                w *= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(w, d_model)

    def forward(self, x):  # (N, M, F)
        h = self.body(x.unsqueeze(1))
        return self.out(h.mean(dim=(2, 3)))


class MaskedSelfAttention(nn.Module):
    """Pre-norm transformer block over receiver tokens; absent receivers are never attended to."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_mask):  # x (B, R, d), key_mask (B, R) 1 = present
        b, r, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, r, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att + (1.0 - key_mask)[:, None, None, :] * MASK_VALUE
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, r, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.norm2(x)))


class LocalizationNet(nn.Module):
    """See module docstring. All inputs are raw physical units; normalisation is inside."""

    def __init__(self, config: ModelConfig, receiver_enu_m: torch.Tensor, normalization: dict[str, torch.Tensor],
                 radio_map: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        c = config
        if c.inputs not in ("spectrogram", "scalars", "both"):
            raise ValueError(f"model.inputs must be spectrogram, scalars or both, got {c.inputs!r}")
        if c.head not in ("direct", "receivers"):
            raise ValueError(f"model.head must be direct or receivers, got {c.head!r}")
        n = normalization
        # Positions are normalised with one isotropic scale so covariances stay metric.
        pos_scale = torch.sqrt((n["target_std_m"].double() ** 2).mean()).float()
        self.register_buffer("pos_mean", n["target_mean_m"].float().clone())
        self.register_buffer("pos_scale", pos_scale.reshape(()))
        self.register_buffer("receiver_enu_m", receiver_enu_m.float().clone())
        for key in FEATURE_NORMALIZATION_KEYS:
            self.register_buffer(key, n[key].float().clone().reshape(n[key].shape))
        # Data without SNR (e.g. RSS-only datasets: SNR stored as 0 dB) has a degenerate SNR std (the
        # 1e-6 floor): its normalised SNR would be 0 at inference but ±augment_power_db / 1e-6 in
        # training. A constant feature carries no information: switch it off (1.0 otherwise: unchanged).
        self.register_buffer("snr_weight", (self.snr_std_db > 1e-3).float(), persistent=False)

        d = c.d_model
        self.use_spec = c.inputs in ("spectrogram", "both")
        self.use_scalars = c.inputs in ("scalars", "both")
        if self.use_spec:
            self.spec_encoder = SpectrogramEncoder(c.cnn_width, c.cnn_depth, d, c.cnn_pool)
        n_scalar = (2 if self.use_scalars else 0) + 2  # (rss, snr) + (present, has_iq)
        self.scalar_mlp = nn.Sequential(nn.Linear(n_scalar, d), nn.GELU(), nn.Linear(d, d))
        self.position_mlp = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))
        self.receiver_embedding = nn.Embedding(c.n_receivers, d)
        self.fuse = nn.Linear(d * (4 if self.use_spec else 3), d)
        self.blocks = nn.ModuleList(MaskedSelfAttention(d, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.head = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 5))
        if c.head == "receivers":
            self.anchor_score = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))

        # Likelihood refinement (optional: a model without a map is the network alone).
        self.has_map = radio_map is not None
        if radio_map is not None:
            self.register_buffer("map_mean_db", radio_map["mean_db"].float().clone())  # (R, G) at 0 dBm TX
            self.register_buffer("map_sigma_db", radio_map["sigma_db"].float().clone())  # (R,)
            grid = radio_map["grid_enu_m"].float()  # (G, 2), stored as two planes (see likelihood_cost)
            self.register_buffer("grid_east_m", grid[:, 0].clone())
            self.register_buffer("grid_north_m", grid[:, 1].clone())
            self.register_buffer("cell_var_m2", radio_map["cell_var_m2"].float().reshape(()))
            # neighbourhood of the mode averaged for the point estimate: 2.5 cells (12 cells squared * 0.52)
            self.register_buffer("mode_radius_m2", (radio_map["cell_var_m2"].float() * 12 * 2.5**2).reshape(()))
            # plausible TX power range (dBm on the map's scale), from the training sessions
            self.register_buffer("power_range_dbm", radio_map["power_range_dbm"].float().reshape(2))
        # Calibrated on the validation split after training (train stage): likelihood temperature
        # and prior (network) covariance scale.
        self.register_buffer("likelihood_temperature", torch.tensor(1.0))
        self.register_buffer("prior_scale", torch.tensor(1.0))
        self.register_buffer("cov_scale_local", torch.tensor(1.0))
        self.register_buffer("cov_scale_remote", torch.tensor(1.0))
        # Region temperature τ (calibration.calibrate_regions): search regions are the HPD regions of
        # softmax(posterior_logits / τ) (grid_posterior). Used for the regions only: the point
        # estimate and the Gaussian (forward, the ONNX graph) never read it.
        self.register_buffer("region_temperature", torch.tensor(1.0))

    # -- the network ------------------------------------------------------------------------
    def network(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        """Network-only Gaussian in normalised position units: (mean (B,2), chol (B,2,2))."""
        b, r = rss_dbm.shape
        present = present.float()
        has_iq = has_iq.float() * present
        rss = (rss_dbm - self.rss_mean_dbm) / self.rss_std_db * present
        snr = (snr_db - self.snr_mean_db) / self.snr_std_db * present * self.snr_weight
        flags = torch.stack([present, has_iq], dim=-1)
        scalars = torch.cat([torch.stack([rss, snr], dim=-1), flags], -1) if self.use_scalars else flags
        pos = (self.receiver_enu_m[receiver_id] - F.pad(self.pos_mean, (0, 1))) / self.pos_scale
        parts = [self.scalar_mlp(scalars), self.position_mlp(pos), self.receiver_embedding(receiver_id)]
        if self.use_spec:
            spec = (logmel - self.logmel_mean_db[:, None]) / self.logmel_std_db[:, None]
            spec = self.spec_encoder(spec.reshape(b * r, *spec.shape[2:])).reshape(b, r, -1)
            parts.insert(0, spec * has_iq[..., None])
        x = self.fuse(torch.cat(parts, dim=-1))
        for block in self.blocks:
            x = block(x, present)
        w = present[..., None]
        count = w.sum(1).clamp_min(1.0)
        pooled = torch.cat([(x * w).sum(1) / count, (x + (w - 1.0) * 1e4).amax(1) * (count > 0).float()], -1)
        out = self.head(pooled)
        mean = out[:, :2]
        if self.config.head == "receivers":
            score = self.anchor_score(x)[..., 0] + (present - 1.0) * 1e4  # absent receivers: weight 0
            anchor = (torch.softmax(score, dim=1)[..., None] * pos[..., :2]).sum(1)
            mean = mean + anchor
        l11 = F.softplus(out[:, 2]) + 1e-3
        l22 = F.softplus(out[:, 3]) + 1e-3
        zero = torch.zeros_like(l11)
        chol = torch.stack([torch.stack([l11, zero], -1), torch.stack([out[:, 4], l22], -1)], -2)
        return mean, chol

    def network_metric(self, *inputs):
        """Network-only Gaussian in ENU metres: (mean (B,2), covariance (B,2,2))."""
        mean, chol = self.network(*inputs)
        cov = chol @ chol.transpose(-1, -2) * self.pos_scale**2
        return mean * self.pos_scale + self.pos_mean, cov

    # -- likelihood refinement ---------------------------------------------------------------
    # Written in the layout onnxruntime runs fastest (the export traces this code as it is): the grid
    # as two (G,) planes, not (G, 2) (ORT broadcasts over a length-2 innermost axis slowly), sums over
    # receivers as MatMuls (txpower.profile_tx_power), and the covariance as one weighted sum instead
    # of Einsums. Measured at batch 1 on 2 CPU cores: ~1.25 ms in ORT, vs ~5.6-17 ms for the
    # (G, 2) + Einsum form it replaced.

    @property
    def grid_enu_m(self) -> torch.Tensor:
        """(G, 2) east, north of the map's cell centres."""
        return torch.stack([self.grid_east_m, self.grid_north_m], 1)

    def likelihood_cost(self, rss_dbm, present, receiver_id):
        """(B, G) chi-square of the readings at every grid cell, TX power profiled out."""
        # Every present reading counts, weak ones too: "this receiver barely hears it" is information
        # (measured: dropping readings below 10 dB SNR doubled the oracle's median error).
        weight = present.float() / (self.map_sigma_db[receiver_id] ** 2)  # (B, R)
        resid = rss_dbm[..., None] - self.map_mean_db[receiver_id]  # (B, R, G)
        power, chi2 = profile_tx_power(resid, weight)
        # A cell that needs an implausible TX power to explain the readings is unlikely: a soft
        # prior, flat inside the training sessions' power range and Gaussian (3 dB) outside.
        outside = F.relu(self.power_range_dbm[0] - power) + F.relu(power - self.power_range_dbm[1])
        return chi2 + (outside / 3.0) ** 2

    def posterior_logits(self, cost, prior_mean, prior_cov):
        """(B, G) unnormalised log posterior of every grid cell: the tempered likelihood cost plus
        the network's (scaled) Gaussian prior. ``softmax(dim=1)`` gives the cell probabilities
        (heimdall.regions turns them into highest-posterior-density search regions)."""
        return self._posterior_logits(cost, prior_mean, prior_cov, self.grid_east_m[None], self.grid_north_m[None])

    def _posterior_logits(self, cost, prior_mean, prior_cov, east, north):
        # east, north: the (1, G) planes, passed in so that posterior() traces them once (the ONNX
        # export of posterior() is then byte-identical to the unfactored form)
        pc = prior_cov * self.prior_scale**2
        det = pc[:, 0, 0] * pc[:, 1, 1] - pc[:, 0, 1] * pc[:, 1, 0]
        de, dn = east - prior_mean[:, 0:1], north - prior_mean[:, 1:2]  # (B, G)
        maha = (de**2 * pc[:, 1, 1, None] - 2 * de * dn * pc[:, 0, 1, None] + dn**2 * pc[:, 0, 0, None]) / det[:, None]
        return -0.5 * cost / self.likelihood_temperature - 0.5 * maha

    def posterior(self, cost, prior_mean, prior_cov):
        """Posterior over the grid from the likelihood cost and the network's Gaussian prior:
        (mean (B, 2), covariance (B, 2, 2)) in ENU metres."""
        east, north = self.grid_east_m[None], self.grid_north_m[None]  # (1, G)
        logits = self._posterior_logits(cost, prior_mean, prior_cov, east, north)
        # Point estimate: the posterior mode, refined by the posterior mean of its neighbourhood.
        # RSS with unknown power often leaves far-away secondary modes; the global posterior mean
        # would fall between them.
        mode = logits.argmax(dim=1)
        mode_e, mode_n = self.grid_east_m[mode][:, None], self.grid_north_m[mode][:, None]
        near = (((east - mode_e) ** 2 + (north - mode_n) ** 2) <= self.mode_radius_m2).float()
        post = torch.softmax(logits, dim=1)  # (B, G)
        local = post * near
        total = local.sum(1, keepdim=True).clamp_min(1e-30)
        mean_e, mean_n = (local * east).sum(1, keepdim=True) / total, (local * north).sum(1, keepdim=True) / total
        # Covariance: the posterior second moment about the estimate, so the mass of other modes
        # widens the ellipse instead of being ignored. The posterior is a mixture (the mode plus
        # far-away alternatives): a Gaussian calibrated at both 1σ and 2σ needs the two parts
        # weighted separately (fitted on validation): a·Σ local·ddᵀ + b·Σ (post − local)·ddᵀ.
        de, dn = east - mean_e, north - mean_n
        weight = self.cov_scale_local * local + self.cov_scale_remote * (post - local)
        cee, cen, cnn = (weight * de * de).sum(1), (weight * de * dn).sum(1), (weight * dn * dn).sum(1)
        cell = self.cell_var_m2 * self.cov_scale_local
        cov = torch.stack([torch.stack([cee + cell, cen], -1), torch.stack([cen, cnn + cell], -1)], -2)
        return torch.cat([mean_e, mean_n], 1), cov

    def refine(self, prior_mean, prior_cov, rss_dbm, present, receiver_id):
        """Posterior over the map grid: RSS likelihood (TX power profiled out) x network prior."""
        return self.posterior(self.likelihood_cost(rss_dbm, present, receiver_id), prior_mean, prior_cov)

    def forward(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        """-> position_enu_m (B, 2), covariance_m2 (B, 2, 2)."""
        mean, cov = self.network_metric(logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
        if self.has_map:
            mean, cov = self.refine(mean, cov, rss_dbm, present, receiver_id)
        return mean, cov


@torch.no_grad()
def grid_log_posterior(model: LocalizationNet, input_batches):
    """Yield each batch's posterior logits (B, G) (float64 numpy, unnormalised, untempered: region
    temperature 1) over the model's map grid (needs a map)."""
    model.eval()
    for inputs in input_batches:
        mean, cov = model.network_metric(*inputs)
        cost = model.likelihood_cost(inputs[1], inputs[3], inputs[5])
        yield model.posterior_logits(cost, mean, cov).double().numpy()


@torch.no_grad()
def grid_posterior(model: LocalizationNet, input_batches, region_temperature: float | None = None):
    """Yield each batch's search-region cell probabilities (B, G) (float64 numpy, rows sum to 1)
    over the model's map grid: softmax(posterior_logits / τ) with τ = ``region_temperature``
    (default: the model's calibrated ``region_temperature`` buffer). With τ = 1 this is the
    distribution ``model`` summarises as its Gaussian (needs a map)."""
    tau = float(model.region_temperature) if region_temperature is None else float(region_temperature)
    for logits in grid_log_posterior(model, input_batches):
        yield torch.softmax(torch.from_numpy(logits) / tau, dim=1).numpy()


@torch.no_grad()
def estimate(model: LocalizationNet, input_batches, network_only: bool = False) -> tuple:
    """Run ``model`` over an iterable of input batches -> (mean (n, 2), covariance (n, 2, 2)), float64
    numpy, ENU metres. ``network_only``: the network's Gaussian without the map refinement."""
    model.eval()
    means, covs = [], []
    for inputs in input_batches:
        m, c = model.network_metric(*inputs) if network_only else model(*inputs)
        means.append(m.double())
        covs.append(c.double())
    return torch.cat(means).numpy(), torch.cat(covs).numpy()
