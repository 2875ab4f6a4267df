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
