"""Profiling the unknown transmitter power out of RSS readings: the one implementation.

RSS in dBm is ``P + m_i(x) + noise`` with ``P`` the unknown TX power and ``m_i(x)`` receiver i's
radio map at 0 dBm. For a candidate position the Gaussian likelihood is maximised in closed form by
the weighted mean of the residuals ``rss_i - m_i(x)``; what is left is a weighted chi-square.

Written with operators that numpy arrays and torch tensors share (``@``, ``.sum(-1)``, broadcasting),
so the model (torch, exported to ONNX), the radio-map fit and the baselines (numpy) run the same code.
Receivers are the second axis and the sums over them are matrix products: the layout onnxruntime
runs fastest (a ReduceSum over a strided receiver axis is ~5x slower there, measured).
"""

from __future__ import annotations


def profile_tx_power(resid, weight):
    """Profile the TX power out of every session at every candidate position.

    resid: (B, R, K) RSS minus the map's mean at 0 dBm TX power, per session, receiver and
        candidate position (any value where the weight is 0).
    weight: (B, R) inverse residual variance (1/dB²) of each usable reading, 0 where unusable.

    Returns ``(power (B, K), chi2 (B, K))``: the weighted-mean TX power and the weighted sum of
    squared residuals about it. A session without a usable reading gets power 0 and chi2 0.
    """
    total = weight.sum(-1)
    w_norm = weight / (total + (total == 0))[:, None]  # no usable reading: 0 / 1, not 0 / 0
    power = (w_norm[:, None, :] @ resid)[:, 0, :]
    chi2 = (weight[:, None, :] @ (resid - power[:, None, :]) ** 2)[:, 0, :]
    return power, chi2


def profile_tx_power_general(resid, weight, nu: float = 0.0, iterations: int = 3):
    """As :func:`profile_tx_power`, with a weight per candidate position and optionally Student-t
    residuals (torch only; sums over receivers as reductions, slower in onnxruntime than the MatMuls).

    weight: (B, R, K) inverse residual variance of each reading at each candidate (the map's σ may
        differ between cells), or (B, R) as in profile_tx_power.
    nu: 0 for Gaussian residuals; > 0 for Student-t with ``nu`` degrees of freedom, so one reading far
        from the map (a receiver whose gain moved, a season's change) costs ~log of its residual
        instead of its square and cannot outvote the rest. The power is then found by iteratively
        reweighted least squares (``iterations`` steps from the Gaussian solution: a fixed count, so the
        exported graph is a fixed chain of tensor ops).

    Returns ``(power (B, K), cost (B, K))``: cost = Σ w r² (Gaussian) or Σ (ν + 1) log(1 + w r² / ν)
    (→ Σ w r² as ν → ∞).
    """
    w = weight if weight.dim() == 3 else weight[:, :, None]
    total = w.sum(1)
    power = (w * resid).sum(1) / (total + (total == 0))
    for _ in range(iterations if nu > 0 else 0):
        u = w * (nu + 1.0) / (nu + w * (resid - power[:, None, :]) ** 2)  # (B, R, K) IRLS weights
        total = u.sum(1)
        power = (u * resid).sum(1) / (total + (total == 0))
    z = w * (resid - power[:, None, :]) ** 2
    return power, (z.sum(1) if nu <= 0 else ((nu + 1.0) * (z / nu).log1p()).sum(1))
