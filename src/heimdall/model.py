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

3. **What a person searches** (``locate``): the same posterior, tempered by a calibrated region
   temperature, as cell probabilities whose highest-density regions holding calibrated masses are
   the search regions (heimdall.regions), and its few modes as a Gaussian mixture. The Gaussian of
   part 2 is kept for compatibility: one Gaussian cannot describe a multi-modal posterior.

The layers of part 1 and the Gaussian loss are in heimdall.layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from heimdall.contracts import (
    FEATURE_NORMALIZATION_KEYS,
    REGION_LEVELS,
    RELIABILITY_LEVELS,
)
from heimdall.layers import (  # noqa: F401 (re-exported)
    MaskedSelfAttention,
    SpectrogramEncoder,
    chol_2x2,
    gaussian_nll,
)
from heimdall.modes import disc_offsets, posterior_modes
from heimdall.txpower import profile_tx_power, profile_tx_power_general


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
    # "scale": when no cell explains the readings (best cell's chi-square per degree of freedom > 1, e.g.
    # a receiver's gain moved), divide the likelihood cost by that ratio (a per-session noise scale);
    # "posterior": that, and the whole posterior (likelihood, fingerprints, the network's prior) tempered by
    # the same ratio: the map and the network are both wrong about this session, not only the noise
    misfit: str = "none"
    # > 0: evidence from this many nearest training fingerprints joins the posterior (calibrated fp_weight)
    fingerprint_k: int = 0
    # > 0: Student-t readings with this many degrees of freedom (txpower.profile_tx_power_general)
    likelihood_nu: float = 0.0


class LocalizationNet(nn.Module):
    """See module docstring. All inputs are raw physical units; normalisation is inside."""

    def __init__(self, config: ModelConfig, receiver_enu_m: torch.Tensor, normalization: dict[str, torch.Tensor],
                 radio_map: dict[str, torch.Tensor] | None = None, fingerprints: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        c = config
        if c.inputs not in ("spectrogram", "scalars", "both"):
            raise ValueError(f"model.inputs must be spectrogram, scalars or both, got {c.inputs!r}")
        if c.head not in ("direct", "receivers"):
            raise ValueError(f"model.head must be direct or receivers, got {c.head!r}")
        if c.misfit not in ("none", "scale", "posterior") or not c.likelihood_nu >= 0:
            raise ValueError(f"model.misfit must be none, scale or posterior (got {c.misfit!r}), likelihood_nu >= 0")
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
            # receivers the training sessions did not map (radiomap.UNMAPPED_SIGMA_DB): never in the
            # network's input either (their embeddings never learned anything)
            self.register_buffer("receiver_mapped", (self.map_sigma_db < 1e3).float(), persistent=False)
            self.has_map_var = "excess_var_db2" in radio_map  # (R, G) the map's variance beyond σ² per cell
            if self.has_map_var:
                self.register_buffer("map_excess_var_db2", radio_map["excess_var_db2"].float().clone())
            grid = radio_map["grid_enu_m"].float()  # (G, 2), stored as two planes (see likelihood_cost)
            self.register_buffer("grid_east_m", grid[:, 0].clone())
            self.register_buffer("grid_north_m", grid[:, 1].clone())
            self.register_buffer("cell_var_m2", radio_map["cell_var_m2"].float().reshape(()))
            # neighbourhood of the mode averaged for the point estimate: 2.5 cells (12 cells squared * 0.52)
            self.register_buffer("mode_radius_m2", (radio_map["cell_var_m2"].float() * 12 * 2.5**2).reshape(()))
            # plausible TX power range (dBm on the map's scale), from the training sessions
            self.register_buffer("power_range_dbm", radio_map["power_range_dbm"].float().reshape(2))
            # the grid is regular and row-major (north rows of east cells): its shape, for the mode search
            spacing = math.sqrt(12.0 * float(radio_map["cell_var_m2"]))
            n_east = int(round(float(grid[:, 0].max() - grid[:, 0].min()) / spacing)) + 1
            self.grid_shape = (grid.shape[0] // n_east, n_east)
            disc_rows, disc_cols = disc_offsets()
            self.register_buffer("disc_rows", disc_rows, persistent=False)
            self.register_buffer("disc_cols", disc_cols, persistent=False)
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
        # ... and the region mass for each of RELIABILITY_LEVELS (regions.conformal_masses): the HPD
        # region of that tempered posterior holding region_mass[j] covers RELIABILITY_LEVELS[j] of the
        # validation truths. Default: mass = level (uncalibrated).
        self.register_buffer("region_mass", torch.tensor(RELIABILITY_LEVELS, dtype=torch.float32))
        # Fingerprint evidence (config.fingerprint_k > 0, needs the map): the training sessions' RSS
        # vectors (absent: fp_floor_dbm) and positions; weight and kernel width calibrated on validation.
        self.has_fingerprints = c.fingerprint_k > 0 and radio_map is not None
        if self.has_fingerprints:
            if fingerprints is None:
                raise ValueError("model.fingerprint_k > 0 needs the training fingerprints")
            self.register_buffer("fp_rss_dbm", fingerprints["rss_dbm"].float().clone())  # (N, R)
            self.register_buffer("fp_east_m", fingerprints["east_m"].float().clone())  # (N,)
            self.register_buffer("fp_north_m", fingerprints["north_m"].float().clone())
            self.register_buffer("fp_floor_dbm", fingerprints["floor_dbm"].float().reshape(()))
            self.register_buffer("fp_weight", torch.tensor(0.0))
            self.register_buffer("fp_bandwidth_m", torch.tensor(1.0))
        self.region_columns = [RELIABILITY_LEVELS.index(p) for p in REGION_LEVELS]  # the published levels

    def _mapped(self, present, receiver_id):
        """present (float), less the receivers without a map (a model without a map: unchanged)."""
        present = present.float()
        return present * self.receiver_mapped[receiver_id] if self.has_map else present

    # -- the network ------------------------------------------------------------------------
    def network(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        """Network-only Gaussian in normalised position units: (mean (B,2), chol (B,2,2))."""
        b, r = rss_dbm.shape
        present = self._mapped(present, receiver_id)
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
        """(B, G) chi-square of the readings at every grid cell, TX power profiled out (and, with the
        options, widened by the misfit, with the map's variance and the fingerprint evidence)."""
        return self._cost_and_misfit(rss_dbm, present, receiver_id)[0]

    def prior_and_cost(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        """The posterior's two parts: the network's Gaussian prior (mean (B, 2), covariance (B, 2, 2),
        ENU metres) and the likelihood cost (B, G). With ``misfit: posterior`` the prior covariance is
        widened by the session's misfit ratio k (the cost is already tempered by k: likelihood_cost)."""
        prior_mean, prior_cov = self.network_metric(logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
        cost, ratio = self._cost_and_misfit(rss_dbm, present, receiver_id)
        if self.config.misfit == "posterior":
            prior_cov = prior_cov * ratio[..., None]
        return prior_mean, prior_cov, cost

    def _cost_and_misfit(self, rss_dbm, present, receiver_id):
        """(likelihood cost (B, G), misfit ratio (B, 1): the best cell's chi-square per degree of
        freedom, at least 1; None with ``misfit: none``)."""
        # Every present reading counts, weak ones too: "this receiver barely hears it" is information
        # (measured: dropping readings below 10 dB SNR doubled the oracle's median error).
        present, nu = self._mapped(present, receiver_id), self.config.likelihood_nu
        var = self.map_sigma_db[receiver_id] ** 2  # (B, R)
        resid = rss_dbm[..., None] - self.map_mean_db[receiver_id]  # (B, R, G)
        if self.has_map_var:  # σ² per cell: larger where the map is far from its training readings
            var = var[..., None] + self.map_excess_var_db2[receiver_id]  # (B, R, G)
            power, chi2 = profile_tx_power_general(resid, present[..., None] / var, nu)
        elif nu > 0:
            power, chi2 = profile_tx_power_general(resid, present / var, nu)
        else:
            power, chi2 = profile_tx_power(resid, present / var)
        # A cell that needs an implausible TX power to explain the readings is unlikely: a soft
        # prior, flat inside the training sessions' power range and Gaussian (3 dB) outside.
        outside = F.relu(self.power_range_dbm[0] - power) + F.relu(power - self.power_range_dbm[1])
        cost = chi2 + (outside / 3.0) ** 2
        ratio = None
        if self.config.misfit != "none":
            # The map's σ was fitted where it was trained. Readings that no cell explains (a receiver's
            # gain moved, another season) would otherwise make a confidently wrong posterior: estimate
            # the session's noise scale from the best cell's misfit per degree of freedom (TX power is
            # one fitted parameter) and widen by it; never sharpen (a scale below 1 stays 1).
            dof = (present.float().sum(1, keepdim=True) - 1.0).clamp_min(1.0)
            ratio = (cost.min(1, keepdim=True).values / dof).clamp_min(1.0)
            cost = cost / ratio
        if self.has_map_var:  # the likelihood's normalisation Σ log σ² differs between cells
            cost = cost + (present[..., None] * var.log()).sum(1)
        if self.has_fingerprints:
            # fp_weight · log evidence in the posterior, written as a cost (logits = −cost / 2T)
            cost = cost - (2.0 * self.likelihood_temperature * self.fp_weight) * self.fingerprint_evidence(
                rss_dbm, present, receiver_id)
        if self.config.misfit == "posterior":
            # Temper the whole posterior by k too (prior_and_cost widens the prior): a gain that moved
            # biases the best cell, and the network read the same readings. Measured on the POWDER family
            # (docs/model.md "Misfit"): April held out 2σ coverage 0.38 -> 0.84 at the same mean error.
            cost = cost / ratio
        return cost, ratio

    def fingerprint_evidence(self, rss_dbm, present, receiver_id):
        """(B, G) log evidence of every cell from the ``fingerprint_k`` training sessions nearest in
        RSS (Euclidean over receivers, absent = fp_floor_dbm; distance-weighted, as fingerprinting
        does): log Σ_j w_j exp(−|cell − x_j|² / 2h²), max 0. Where training sessions are dense and a
        session repeats a known place, this is sharper than any map; the map keeps the rest."""
        present = self._mapped(present, receiver_id)
        q = torch.where(present > 0, rss_dbm, self.fp_floor_dbm)  # (B, R) in slot order
        q = torch.zeros_like(q).scatter(1, receiver_id, q)  # in receiver order, as fp_rss_dbm
        # differences, not |q|² − 2q·x + |x|² (float32 cancellation flipped near ties between ORT and torch)
        d2 = ((q[:, None, :] - self.fp_rss_dbm[None]) ** 2).sum(-1)  # (B, N)
        neg, idx = (-d2).topk(self.config.fingerprint_k, dim=1)  # (B, k) nearest
        w = 1.0 / (torch.sqrt(-neg) + 1e-3)
        log_w = torch.log(w / w.sum(1, keepdim=True))
        de = self.grid_east_m - self.fp_east_m[idx][..., None]  # (B, k, G)
        dn = self.grid_north_m - self.fp_north_m[idx][..., None]
        ev = torch.logsumexp(log_w[..., None] - (de * de + dn * dn) / (2.0 * self.fp_bandwidth_m**2), dim=1)
        return ev - ev.max(1, keepdim=True).values

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
        return self._gaussian_summary(self._posterior_logits(cost, prior_mean, prior_cov, east, north), east, north)

    def _gaussian_summary(self, logits, east, north, mode=None):
        # Point estimate: the posterior mode, refined by the posterior mean of its neighbourhood.
        # RSS with unknown power often leaves far-away secondary modes; the global posterior mean
        # would fall between them. (``mode``: a given best cell per session, for the parity gate.)
        mode = logits.argmax(dim=1) if mode is None else mode
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

    # -- search regions and modes (the calibrated posterior, not its Gaussian) -------------------
    def region_probability(self, logits):
        """(B, G) the calibrated posterior softmax(logits / τ) over the grid cells, whose HPD regions
        holding region_mass are the search regions (heimdall.regions.hpd_thresholds: a full sort of
        the cells, done outside the graph: in onnxruntime it alone took 2.2 ms of a 2 ms budget)."""
        return torch.softmax(logits / self.region_temperature, dim=1)

    def posterior_modes(self, prob):
        """The posterior's modes as a Gaussian mixture (weight (B, K), mean (B, K, 2), covariance
        (B, K, 2, 2)), most probable first: heimdall.modes.posterior_modes on this model's grid."""
        return posterior_modes(prob, self.grid_shape, self.grid_east_m, self.grid_north_m, self.cell_var_m2,
                               self.disc_rows, self.disc_cols)
    def locate(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        """Everything the exported graph answers (contracts.OUTPUT_NAMES, less the lat/lon the export
        adds): position (B, 2), covariance (B, 2, 2) as ``forward``; the calibrated cell
        probabilities (B, G) (``region_probability``); the modes (``posterior_modes``). Needs a map."""
        if not self.has_map:
            raise ValueError("search regions and modes need the radio map (a model without one has only its Gaussian)")
        prior_mean, prior_cov, cost = self.prior_and_cost(logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
        east, north = self.grid_east_m[None], self.grid_north_m[None]
        logits = self._posterior_logits(cost, prior_mean, prior_cov, east, north)
        mean, cov = self._gaussian_summary(logits, east, north)
        prob = self.region_probability(logits)
        return (mean, cov, prob, *self.posterior_modes(prob))

    def forward(self, logmel, rss_dbm, snr_db, present, has_iq, receiver_id):
        """-> position_enu_m (B, 2), covariance_m2 (B, 2, 2): the posterior's Gaussian summary (a model
        without a map: the network's Gaussian)."""
        inputs = (logmel, rss_dbm, snr_db, present, has_iq, receiver_id)
        if not self.has_map:
            return self.network_metric(*inputs)
        prior_mean, prior_cov, cost = self.prior_and_cost(*inputs)
        return self.posterior(cost, prior_mean, prior_cov)
