"""Physics-based simulator of a WebSDR direction-finding campaign (the embedded default source).

The world (receivers, terrain-like shadowing, receiver gains, noise floors) is fixed by
``scenario.seed``; the campaign (transmitter positions, powers, fading, outages, IQ) by
``export_sessions.seed``. Everything is a pure function of params, so the same params give
byte-identical sessions.h5. The formulas are written down in docs/simulator.md.

The simulator also exposes the *true radio map* (:meth:`Scenario.mean_rss_dbm`) so the
evaluation can compute an oracle estimator and a Cramér–Rao bound: the practical limit
for any learner on this data.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heimdall import geo
from heimdall.radiomap import free_space_loss_1km_db  # noqa: F401  (the simulator's anchor; re-exported)
from heimdall.params import ExportSessionsParams, Params, ScenarioParams

# Sessions generated per RNG block. Part of the output's definition (changing it changes the
# bytes of the IQ noise), so it is a constant, not a tuning knob.
SIM_BLOCK_SESSIONS = 200
# Fading is slow (Doppler <= a few Hz over a fraction of a second): compute the complex gain on
# a coarse time grid and interpolate, instead of summing sinusoids at every sample.
FADING_KNOTS = 33
N_SCATTERERS = 16
# Minimum 3-D distance used in the path-loss law (the far-field law is meaningless closer).
MIN_DISTANCE_M = 10.0
CAMPAIGN_EPOCH_UNIX_S = 1767225600.0  # 2026-01-01T00:00:00Z
SESSION_NAMESPACE = uuid.UUID("6f1c7f1e-3c55-4d1e-9a53-4ee2d1a0b001")
INT16_FULL_SCALE = 32000.0


@dataclass(frozen=True)
class Campaign:
    """Per-session hidden truth and channel draws of one simulated campaign (no IQ)."""

    session_id: np.ndarray  # (N,) str
    start_time_unix_s: np.ndarray  # (N,) f8
    tx_east_m: np.ndarray  # (N,)
    tx_north_m: np.ndarray
    tx_latitude_deg: np.ndarray
    tx_longitude_deg: np.ndarray
    tx_power_dbm: np.ndarray
    present: np.ndarray  # (N, R) bool
    rician_k_db: np.ndarray  # (N, R)
    doppler_hz: np.ndarray  # (N, R)
    carrier_offset_hz: np.ndarray  # (N, R) receiver tuning error


class Scenario:
    """The simulated world. ``Scenario(params)`` is deterministic in ``params.seed``."""

    def __init__(self, params: ScenarioParams):
        self.params = params
        p = params
        self.names = [r.name for r in p.receivers]
        self.rx_lat = np.array([r.latitude for r in p.receivers])
        self.rx_lon = np.array([r.longitude for r in p.receivers])
        self.rx_alt = np.array([r.altitude_m for r in p.receivers])
        self.origin = geo.network_origin(self.rx_lat, self.rx_lon)
        e, n, u = geo.geodetic_to_enu(self.rx_lat, self.rx_lon, self.rx_alt, self.origin)
        self.rx_enu = np.stack([e, n, u], axis=1)  # (R, 3)
        margin = p.area_margin_km * 1e3
        self.area = (e.min() - margin, e.max() + margin, n.min() - margin, n.max() + margin)

        rng = np.random.default_rng([p.seed, 0])
        n_rx, m = len(p.receivers), p.shadowing_n_features
        # Shadowing: one stationary Gaussian random field per receiver with covariance
        # sigma^2 exp(-d^2 / L^2) (correlation 1/e at the correlation length L), drawn as
        # random Fourier features: omega ~ N(0, 2/L^2 I), phase ~ U(0, 2 pi).
        length_m = p.shadowing_correlation_km * 1e3
        self.shadow_omega = rng.normal(0.0, np.sqrt(2.0) / length_m, size=(n_rx, m, 2))
        self.shadow_phase = rng.uniform(0.0, 2 * np.pi, size=(n_rx, m))
        self.gain_offset_db = rng.uniform(-p.receiver_gain_offset_db, p.receiver_gain_offset_db, n_rx)
        self.noise_floor_dbm = p.noise_floor_dbm + rng.uniform(
            -p.noise_floor_spread_db, p.noise_floor_spread_db, n_rx
        )
        self.fspl_1km_db = free_space_loss_1km_db(p.frequency_mhz)

    @property
    def n_receivers(self) -> int:
        return len(self.names)

    # ---- the true radio map -------------------------------------------------------------
    def _distance_m(self, east, north):
        east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        de = east[..., None] - self.rx_enu[:, 0]
        dn = north[..., None] - self.rx_enu[:, 1]
        du = self.params.tx_height_m - self.rx_enu[:, 2]
        return np.maximum(np.sqrt(de**2 + dn**2 + du**2), MIN_DISTANCE_M), de, dn

    def path_loss_db(self, east, north) -> np.ndarray:
        """Mean path loss (..., R): free-space loss at 1 km + 10 n log10(d / 1 km)."""
        d, _, _ = self._distance_m(east, north)
        return self.fspl_1km_db + 10.0 * self.params.path_loss_exponent * np.log10(d / 1e3)

    def shadowing_db(self, east, north) -> np.ndarray:
        """Shadowing field of every receiver at the given positions: (..., R) dB."""
        east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        pts = np.stack([east.ravel(), north.ravel()], axis=1)  # (P, 2)
        m = self.params.shadowing_n_features
        amp = self.params.shadowing_sigma_db * np.sqrt(2.0 / m)
        out = np.empty((pts.shape[0], self.n_receivers))
        for r in range(self.n_receivers):
            out[:, r] = amp * np.cos(pts @ self.shadow_omega[r].T + self.shadow_phase[r]).sum(axis=1)
        return out.reshape(*east.shape, self.n_receivers)

    def mean_rss_dbm(self, east, north, tx_power_dbm) -> np.ndarray:
        """True mean received power (..., R) in dBm: the radio map the model has to learn."""
        tx = np.asarray(tx_power_dbm, dtype=np.float64)[..., None]
        return (
            tx - self.path_loss_db(east, north) + self.shadowing_db(east, north) + self.gain_offset_db
        )

    def mean_rss_gradient(self, east, north) -> np.ndarray:
        """d(mean RSS)/d(east, north) in dB/m, shape (..., R, 2) (TX power does not enter)."""
        east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        d, de, dn = self._distance_m(east, north)
        k = -10.0 * self.params.path_loss_exponent / np.log(10.0) / d**2
        grad = np.stack([k * de, k * dn], axis=-1)  # (..., R, 2)
        pts = np.stack([east.ravel(), north.ravel()], axis=1)
        m = self.params.shadowing_n_features
        amp = self.params.shadowing_sigma_db * np.sqrt(2.0 / m)
        g_sh = np.empty((pts.shape[0], self.n_receivers, 2))
        for r in range(self.n_receivers):
            s = -amp * np.sin(pts @ self.shadow_omega[r].T + self.shadow_phase[r])  # (P, M)
            g_sh[:, r, :] = s @ self.shadow_omega[r]
        return grad + g_sh.reshape(*east.shape, self.n_receivers, 2)

    def noise_power_dbm(self, sample_rate_hz: float) -> np.ndarray:
        """Noise power (R,) in the complex baseband of the given sample rate."""
        return self.noise_floor_dbm + 10.0 * np.log10(sample_rate_hz / self.params.noise_bandwidth_hz)

    # ---- one campaign ---------------------------------------------------------------------
    def draw_campaign(self, export: ExportSessionsParams, seed: int) -> Campaign:
        p, n, n_rx = self.params, export.n_sessions, self.n_receivers
        rng = np.random.default_rng([p.seed, 1, seed])
        e0, e1, n0, n1 = self.area
        east = rng.uniform(e0, e1, n)
        north = rng.uniform(n0, n1, n)
        lat, lon, _ = geo.enu_to_geodetic(east, north, np.full(n, p.tx_height_m), self.origin)
        tx_power = rng.uniform(p.tx_power_dbm[0], p.tx_power_dbm[1], n)
        present = rng.random((n, n_rx)) >= p.outage_probability
        k_db = rng.uniform(p.rician_k_db[0], p.rician_k_db[1], (n, n_rx))
        doppler = rng.uniform(p.doppler_hz[0], p.doppler_hz[1], (n, n_rx))
        offset = rng.uniform(-100.0, 100.0, (n, n_rx))
        gaps = rng.exponential(600.0, n)  # sessions every ~10 minutes
        ids = np.array([str(uuid.uuid5(SESSION_NAMESPACE, f"{p.seed}/{seed}/{i}")) for i in range(n)])
        return Campaign(
            session_id=ids,
            start_time_unix_s=CAMPAIGN_EPOCH_UNIX_S + np.cumsum(gaps),
            tx_east_m=east,
            tx_north_m=north,
            tx_latitude_deg=lat,
            tx_longitude_deg=lon,
            tx_power_dbm=tx_power,
            present=present,
            rician_k_db=k_db,
            doppler_hz=doppler,
            carrier_offset_hz=offset,
        )

    def iq_blocks(
        self, campaign: Campaign, export: ExportSessionsParams, seed: int
    ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Yield (session slice, arrays) blocks of IQ and receiver-reported measurements.

        arrays: ``iq`` (B, R, S, 2) int16, ``iq_scale`` (B, R) f4 (sqrt(mW) per count),
        ``rss_dbm`` / ``snr_db`` (B, R) f4 (NaN where the receiver was offline).
        """
        n = len(campaign.session_id)
        for block, start in enumerate(range(0, n, SIM_BLOCK_SESSIONS)):
            sl = slice(start, min(n, start + SIM_BLOCK_SESSIONS))
            rng = np.random.default_rng([self.params.seed, 2, seed, block])
            yield sl, self._simulate_block(campaign, sl, export, rng)

    def _simulate_block(self, c: Campaign, sl: slice, export: ExportSessionsParams, rng) -> dict:
        p = self.params
        rate_hz, s = float(export.sample_rate_hz), export.n_samples
        b, n_rx = sl.stop - sl.start, self.n_receivers
        t = np.arange(s) / rate_hz

        # NBFM voice-like transmission: band-limited (300-3000 Hz) random audio, peak-normalised,
        # frequency-modulated with the configured peak deviation. One waveform per session,
        # heard by every receiver.
        audio = np.fft.rfft(rng.standard_normal((b, s)), axis=1)
        f = np.fft.rfftfreq(s, 1 / rate_hz)
        audio[:, (f < 300) | (f > 3000)] = 0
        audio = np.fft.irfft(audio, n=s, axis=1)
        audio /= np.maximum(np.abs(audio).max(axis=1, keepdims=True), 1e-12)
        phase = 2 * np.pi * p.fm_deviation_hz * np.cumsum(audio, axis=1) / rate_hz
        tx_wave = np.exp(1j * phase).astype(np.complex64)  # (B, S), unit power

        # Rician fading per (session, receiver): LOS + sum of scatterers with Doppler, computed on
        # a coarse grid and linearly interpolated (the process is smooth at these Dopplers).
        k = 10 ** (c.rician_k_db[sl] / 10)[..., None]  # (B, R, 1)
        fd = c.doppler_hz[sl][..., None, None]  # (B, R, 1, 1)
        tk = np.linspace(0, t[-1], FADING_KNOTS)
        los_angle = rng.uniform(0, 2 * np.pi, (b, n_rx, 1))
        los_phase = rng.uniform(0, 2 * np.pi, (b, n_rx, 1))
        los = np.exp(1j * (2 * np.pi * fd[..., 0] * np.cos(los_angle) * tk + los_phase))
        ang = rng.uniform(0, 2 * np.pi, (b, n_rx, N_SCATTERERS, 1))
        ph = rng.uniform(0, 2 * np.pi, (b, n_rx, N_SCATTERERS, 1))
        scat = np.exp(1j * (2 * np.pi * fd * np.cos(ang) * tk + ph)).sum(axis=2) / np.sqrt(N_SCATTERERS)
        h_knots = np.sqrt(k / (k + 1)) * los + np.sqrt(1 / (k + 1)) * scat  # (B, R, K)
        pos = t / t[-1] * (FADING_KNOTS - 1)
        i0 = np.minimum(pos.astype(np.int64), FADING_KNOTS - 2)
        w = (pos - i0).astype(np.float64)
        h = h_knots[..., i0] * (1 - w) + h_knots[..., i0 + 1] * w  # (B, R, S)

        mean_dbm = self.mean_rss_dbm(c.tx_east_m[sl], c.tx_north_m[sl], c.tx_power_dbm[sl])
        amp = np.sqrt(10 ** (mean_dbm / 10))[..., None]  # sqrt(mW)
        lo = np.exp(2j * np.pi * c.carrier_offset_hz[sl][..., None] * t)
        signal = (amp * h * lo).astype(np.complex64) * tx_wave[:, None, :]

        noise_mw = 10 ** (self.noise_power_dbm(rate_hz) / 10)  # (R,)
        noise_std = np.sqrt(noise_mw / 2).astype(np.float32)[None, :, None]
        y = np.empty((b, n_rx, s, 2), dtype=np.float32)
        y[..., 0] = signal.real + noise_std * rng.standard_normal((b, n_rx, s), dtype=np.float32)
        y[..., 1] = signal.imag + noise_std * rng.standard_normal((b, n_rx, s), dtype=np.float32)

        present = c.present[sl]
        y[~present] = 0.0
        # What the receiver reports: total channel power (S-meter) and SNR against its floor.
        power_mw = (y.astype(np.float64) ** 2).sum(axis=-1).mean(axis=-1)  # (B, R)
        with np.errstate(divide="ignore"):
            rss = 10 * np.log10(power_mw)
            snr = 10 * np.log10(np.maximum(power_mw / noise_mw - 1.0, 1e-3))
        rss[~present] = np.nan
        snr[~present] = np.nan

        # int16 storage with a per-(session, receiver) calibrated scale, like a receiver ADC
        # with its gain setting recorded: value_sqrt_mW = count * iq_scale.
        peak = np.abs(y).max(axis=(2, 3))
        scale = np.where(peak > 0, peak / INT16_FULL_SCALE, 0.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[..., None, None]
        iq = np.rint(y / safe).astype(np.int16)
        return {
            "iq": iq,
            "iq_scale": scale,
            "rss_dbm": rss.astype(np.float32),
            "snr_db": snr.astype(np.float32),
        }


def export_campaign(params: Params, path: Path, progress: bool = True) -> dict:
    """Simulate the campaign of ``params`` (scenario, export_sessions) into a sessions.h5 at ``path``."""
    from heimdall.sessions_file import write_sessions

    exp = params.export_sessions
    scenario = Scenario(params.scenario)
    campaign = scenario.draw_campaign(exp, exp.seed)
    n = exp.n_sessions
    scenario_json = json.dumps(params.scenario.model_dump(mode="json"), sort_keys=True)

    def blocks():
        for sl, arrays in scenario.iq_blocks(campaign, exp, exp.seed):
            present = campaign.present[sl]
            yield sl, {"present": present, "has_iq": present, **arrays}

    write_sessions(
        path,
        attrs={
            "source": "synthetic",
            "sample_rate_hz": float(exp.sample_rate_hz),
            "n_samples": exp.n_samples,
            "scenario_json": scenario_json,
            "campaign_seed": exp.seed,
        },
        receivers={
            "name": np.array(scenario.names, dtype=object),
            "station_id": np.array([f"sim-{i}" for i in range(scenario.n_receivers)], dtype=object),
            "latitude_deg": scenario.rx_lat,
            "longitude_deg": scenario.rx_lon,
            "altitude_m": scenario.rx_alt,
        },
        sessions={
            "session_id": campaign.session_id.astype(object),
            # i.i.d. transmitter positions: every session is its own transmitter
            "group_id": campaign.session_id.astype(object),
            "start_time_unix_s": campaign.start_time_unix_s,
            "frequency_hz": np.full(n, params.scenario.frequency_mhz * 1e6),
            "tx_latitude_deg": campaign.tx_latitude_deg,
            "tx_longitude_deg": campaign.tx_longitude_deg,
            "tx_power_dbm": campaign.tx_power_dbm,
        },
        n_samples=exp.n_samples,
        blocks=blocks(),
        progress=progress,
    )
    return {
        "source": "synthetic",
        "sessions": n,
        "receivers": scenario.n_receivers,
        "receiver_outages": int((~campaign.present).sum()),
    }
