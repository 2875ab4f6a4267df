"""LocalizationNet's building blocks: the Gaussian loss and the receiver-set network's layers
(heimdall.model assembles them; the model's own math, the likelihood refinement and the posterior's
summaries, lives there)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)
MASK_VALUE = -1e4  # additive attention mask (finite: keeps ONNX graphs and all-absent rows NaN-free)


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
