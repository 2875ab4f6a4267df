"""Running a LocalizationNet over batches of inputs (evaluation, calibration, benchmarks): its
estimates, and its posterior over the map grid as numpy arrays. The model's math is in heimdall.model."""

from __future__ import annotations

import torch

from heimdall.model import LocalizationNet


@torch.no_grad()
def grid_log_posterior(model: LocalizationNet, input_batches):
    """Yield each batch's posterior logits (B, G) (float64 numpy, unnormalised, untempered: region
    temperature 1) over the model's map grid (needs a map)."""
    model.eval()
    for inputs in input_batches:
        mean, cov, cost = model.prior_and_cost(*inputs)
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
