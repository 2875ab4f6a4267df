"""Forward radio maps: predicted mean RSS of every receiver as a function of transmitter position.

Three maps share one representation, :class:`RadioMapGrid` (mean RSS at 0 dBm TX power on a
regular ENU grid, plus a per-receiver residual std for the likelihood):

* :func:`fit_log_distance` — the textbook law ``y_ij = P_j + c_i - 10 n log10(d_ij / 1 km)``
  learned from training sessions. The TX power ``P_j`` of every session is unknown, so it is
  profiled out by centring each session over its receivers; what is left is linear in ``n`` and the
  receiver constants ``c_i`` (identified up to one common constant, see ``anchor_offset_db``).
* :func:`heimdall.kriging.fit_kriged_map` — the log-distance law plus, per receiver, a Gaussian-process map of the
  residual (the shadowing a site survey can learn), alternating between re-estimating ``P_j`` and
  refitting the GPs.
* :meth:`RadioMapGrid.from_scenario` — the simulator's true map: the oracle.

Numpy only (the GP residual maps live in heimdall.kriging). Positions are ENU metres; GP internals work in kilometres so the
kernel hyper-parameters are of order one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from heimdall.txpower import profile_tx_power

if TYPE_CHECKING:
    from heimdall.kriging import KrigedMapModel

# The far-field law is meaningless closer than this (the simulator uses the same floor).
MIN_DISTANCE_M = 10.0
# Readings below this SNR are dominated by thermal noise (the receiver reports signal + noise, so
# they saturate at the noise floor): they are left out when a map is *fitted*.
DEFAULT_FIT_MIN_SNR_DB = 10.0
DEFAULT_GRID_SPACING_M = 1000.0
DEFAULT_GRID_MARGIN_M = 10_000.0
# Grid points tabulated per call of a map function (bounds memory: 8192 x 1024 features = 64 MB).
_GRID_CHUNK = 8192

Bounds = tuple[float, float, float, float]  # (east_min, east_max, north_min, north_max), metres


# ---- small shared helpers -----------------------------------------------------------------------
def free_space_loss_1km_db(frequency_mhz: float) -> float:
    """Friis free-space path loss at 1 km: 32.45 + 20 log10(f / MHz) dB."""
    return 32.45 + 20.0 * np.log10(frequency_mhz)


def usable_mask(present: np.ndarray, snr: np.ndarray | None, min_snr_db: float | None) -> np.ndarray:
    """(N, R) readings to use: present and, when SNR is known, at least ``min_snr_db``."""
    mask = np.asarray(present, dtype=bool).copy()
    if snr is not None and min_snr_db is not None:
        mask &= np.asarray(snr) >= min_snr_db
    return mask


# A receiver the training sessions heard fewer times than this has no learnable map (a receiver added
# after them, or heard in another season only): its readings are left out of the likelihood (and of
# the network's input), never fitted from one or two readings.
MIN_MAP_READINGS = 10
# sigma_db given to a receiver without a map: weight 1/σ² = 1e-8 of a 1 dB one, i.e. no say
UNMAPPED_SIGMA_DB = 1e4


def mapped_receivers(present: np.ndarray, snr: np.ndarray | None, min_snr_db: float | None,
                     min_readings: int = MIN_MAP_READINGS) -> np.ndarray:
    """(R,) bool: receivers with at least ``min_readings`` usable training readings in sessions with
    two or more (what the map fits use); the others have no map."""
    usable = usable_mask(present, snr, min_snr_db)
    usable &= (usable.sum(axis=1) >= 2)[:, None]
    return usable.sum(axis=0) >= min_readings


def receiver_distance_m(east, north, rx_enu: np.ndarray) -> np.ndarray:
    """3-D distance (..., R) from transmitters at ground level (up = 0) to every receiver."""
    east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
    de = east[..., None] - rx_enu[:, 0]
    dn = north[..., None] - rx_enu[:, 1]
    du = rx_enu[:, 2]
    return np.maximum(np.sqrt(de**2 + dn**2 + du**2), MIN_DISTANCE_M)


def bounds_around(pos: np.ndarray, margin_m: float = DEFAULT_GRID_MARGIN_M) -> Bounds:
    """Bounding box of positions (N, 2) plus ``margin_m`` on every side."""
    pos = np.asarray(pos, dtype=np.float64)
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    return (lo[0] - margin_m, hi[0] + margin_m, lo[1] - margin_m, hi[1] + margin_m)


def power_and_residual(rss: np.ndarray, map_db: np.ndarray, usable: np.ndarray, weights=None):
    """Profile the unknown TX power out of every session at its one known position.

    Returns ``(power (N,), residual (N, R))`` with power the weighted mean of ``rss - map_db``
    over the usable readings (:func:`heimdall.txpower.profile_tx_power`) and residual
    ``rss - power - map_db`` (0 where not usable). Sessions with no usable reading get power 0.
    """
    w = usable * (1.0 if weights is None else np.asarray(weights, dtype=np.float64))
    diff = np.where(usable, rss - map_db, 0.0)
    power = profile_tx_power(diff[:, :, None], w)[0][:, 0]
    return power, np.where(usable, diff - power[:, None], 0.0)


def residual_sigma(residual: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per-receiver std (R,) of profiled residuals, corrected for the fitted session power.

    Centring a session of n readings removes one degree of freedom: each reading keeps a fraction
    (1 - 1/n) of its variance on average. Sessions with a single reading carry no information.
    """
    n_used = usable.sum(axis=1, keepdims=True)
    dof = np.where(usable & (n_used > 1), 1.0 - 1.0 / np.maximum(n_used, 1), 0.0)
    ss = np.where(dof > 0, residual**2, 0.0).sum(axis=0)
    return np.sqrt(ss / np.maximum(dof.sum(axis=0), 1e-12))


# ---- log-distance law ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LogDistanceModel:
    """``mean RSS_i(x) = P + offset_db[i] - 10 exponent log10(d_i(x) / 1 km)``."""

    exponent: float
    offset_db: np.ndarray  # (R,) receiver constant c_i: -(loss at 1 km) + gain
    rx_enu: np.ndarray  # (R, 3)
    sigma_db: np.ndarray  # (R,) residual std of the training readings around the law
    train_bounds_m: Bounds  # bounding box of the training targets (no margin)

    def mean_db(self, east, north) -> np.ndarray:
        """Predicted mean RSS (..., R) at 0 dBm TX power."""
        d = receiver_distance_m(east, north, self.rx_enu)
        return self.offset_db - 10.0 * self.exponent * np.log10(d / 1e3)


def fit_log_distance(
    rss: np.ndarray,
    present: np.ndarray,
    rx_enu: np.ndarray,
    pos: np.ndarray,
    snr: np.ndarray | None = None,
    min_snr_db: float | None = DEFAULT_FIT_MIN_SNR_DB,
    anchor_offset_db: float = 0.0,
) -> LogDistanceModel:
    """Least-squares fit of the log-distance law on training sessions with unknown TX powers.

    Parameters
    ----------
    rss, present, snr : (N, R) measured RSS (dBm), presence mask, optional SNR (dB).
    rx_enu : (R, 3) receiver ENU positions (m).
    pos : (N, 2) true transmitter (east, north) of the training sessions (m).
    min_snr_db : readings below it are left out of the fit (None keeps all present readings).
    anchor_offset_db : the mean of the receiver constants. Only differences between receivers are
        identifiable when every session's power is unknown; anchoring the mean at minus the
        free-space loss at 1 km makes the profiled power read as TX power in dBm.
    """
    rss = np.asarray(rss, dtype=np.float64)
    rx_enu = np.asarray(rx_enu, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    n_rx = rx_enu.shape[0]
    usable = usable_mask(present, snr, min_snr_db)
    usable &= (usable.sum(axis=1) >= 2)[:, None]  # one reading says nothing once P is profiled
    if not usable.any():
        raise ValueError("fit_log_distance: no session has two usable readings")

    log_d = np.log10(receiver_distance_m(pos[:, 0], pos[:, 1], rx_enu) / 1e3)  # (N, R)
    n_used = usable.sum(axis=1, keepdims=True)

    def centred(values):  # subtract each session's mean over its usable readings
        mean = np.where(usable, values, 0.0).sum(axis=1, keepdims=True) / np.maximum(n_used, 1)
        return values - mean

    one_hot = np.broadcast_to(np.eye(n_rx), (rss.shape[0], n_rx, n_rx))  # [j, i, :] = e_i
    one_hot_mean = (usable[:, :, None] * one_hot).sum(axis=1, keepdims=True) / np.maximum(n_used, 1)[..., None]
    design = np.concatenate(
        [-10.0 * centred(log_d)[..., None], one_hot - one_hot_mean], axis=2
    )[usable]  # (readings, 1 + R)
    target = centred(rss)[usable]
    # Min-norm least squares: the common constant of c (its null space) comes out as sum(c) = 0.
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    exponent, offset = float(coef[0]), coef[1:] - coef[1:].mean() + anchor_offset_db

    model_db = offset - 10.0 * exponent * log_d
    _, residual = power_and_residual(rss, model_db, usable)
    return LogDistanceModel(
        exponent=exponent,
        offset_db=offset,
        rx_enu=rx_enu,
        sigma_db=residual_sigma(residual, usable),
        train_bounds_m=bounds_around(pos, 0.0),
    )


# ---- the common grid representation -------------------------------------------------------------
def true_map_sigma_db(scenario, rss: np.ndarray, present: np.ndarray, pos: np.ndarray,
                      snr: np.ndarray | None = None, min_snr_db: float | None = DEFAULT_FIT_MIN_SNR_DB) -> np.ndarray:
    """(R,) fading scatter of (training) readings around the simulator's true map, each session's
    TX power profiled out: the oracle's likelihood sigma."""
    pos = np.asarray(pos, dtype=np.float64)
    usable = usable_mask(present, snr, min_snr_db)
    true_db = scenario.mean_rss_dbm(pos[:, 0], pos[:, 1], np.zeros(len(pos)))
    _, residual = power_and_residual(np.asarray(rss, dtype=np.float64), true_db, usable)
    sigma = residual_sigma(residual, usable)
    # a receiver without training readings: the oracle still knows its map; assume typical fading
    unseen = (usable & (usable.sum(axis=1, keepdims=True) > 1)).sum(axis=0) == 0
    if unseen.any() and not unseen.all():
        sigma[unseen] = np.median(sigma[~unseen])
    return sigma


@dataclass
class RadioMapGrid:
    """Mean RSS of every receiver on a regular ENU grid, at 0 dBm TX power (RSS = P + mean_db).

    Cell (row h, column w) is centred at ``(east0_m + w * spacing_m, north0_m + h * spacing_m)``.
    ``sigma_db`` is the per-receiver residual std (measurement + map error) for the likelihood.
    """

    east0_m: float
    north0_m: float
    spacing_m: float
    mean_db: np.ndarray  # (R, H, W) float32
    sigma_db: np.ndarray  # (R,)
    # (R, H, W) float32 or None: the map's own variance beyond sigma_db² in each cell (far from training
    # readings the map is a guess: KrigedMapModel.excess_var_db2); None: sigma_db alone everywhere
    excess_var_db2: np.ndarray | None = None

    @property
    def n_receivers(self) -> int:
        return self.mean_db.shape[0]

    @property
    def east_m(self) -> np.ndarray:
        return self.east0_m + self.spacing_m * np.arange(self.mean_db.shape[2])

    @property
    def north_m(self) -> np.ndarray:
        return self.north0_m + self.spacing_m * np.arange(self.mean_db.shape[1])

    @property
    def bounds(self) -> Bounds:
        e, n = self.east_m, self.north_m
        return (float(e[0]), float(e[-1]), float(n[0]), float(n[-1]))

    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(east, north) of every cell, each (H, W)."""
        return np.meshgrid(self.east_m, self.north_m)

    @classmethod
    def from_function(
        cls, mean_db_fn: Callable, bounds: Bounds, spacing_m: float, sigma_db
    ) -> RadioMapGrid:
        """Tabulate ``mean_db_fn(east, north) -> (..., R)`` on a grid covering ``bounds``."""
        e0, e1, n0, n1 = bounds
        n_east = int(np.ceil((e1 - e0) / spacing_m - 1e-9)) + 1
        n_north = int(np.ceil((n1 - n0) / spacing_m - 1e-9)) + 1
        east, north = np.meshgrid(e0 + spacing_m * np.arange(n_east), n0 + spacing_m * np.arange(n_north))
        east, north = east.ravel(), north.ravel()
        # In chunks: the true map materialises (points x Fourier features) per receiver.
        mean = np.concatenate([
            np.asarray(mean_db_fn(east[i : i + _GRID_CHUNK], north[i : i + _GRID_CHUNK]))
            for i in range(0, east.size, _GRID_CHUNK)
        ]).reshape(n_north, n_east, -1)  # (H, W, R)
        return cls(
            east0_m=float(e0),
            north0_m=float(n0),
            spacing_m=float(spacing_m),
            mean_db=np.ascontiguousarray(np.moveaxis(mean, -1, 0), dtype=np.float32),
            sigma_db=np.asarray(sigma_db, dtype=np.float64),
        )

    @classmethod
    def from_fitted(
        cls,
        model: LogDistanceModel | KrigedMapModel,
        bounds: Bounds | None = None,
        spacing_m: float = DEFAULT_GRID_SPACING_M,
        margin_m: float = DEFAULT_GRID_MARGIN_M,
        uncertainty: bool = False,
    ) -> RadioMapGrid:
        """Grid of a fitted map (log-distance law or kriged); default bounds: the training targets'
        box + ``margin_m``. ``uncertainty`` (kriged maps): tabulate the map's excess variance too."""
        bounds = bounds or _expand(model.train_bounds_m, margin_m)
        grid = cls.from_function(model.mean_db, bounds, spacing_m, model.sigma_db)
        if uncertainty:
            east, north = grid.cell_centres()
            var = model.excess_var_db2(east.ravel(), north.ravel())  # (H·W, R)
            grid.excess_var_db2 = np.ascontiguousarray(var.T.reshape(grid.mean_db.shape), dtype=np.float32)
        return grid

    def expanded(self, mapped: np.ndarray) -> RadioMapGrid:
        """This grid of the ``mapped`` receivers (len(mapped) with mapped.sum() == n_receivers) as a grid
        of all of them: the others get mean 0 dB and sigma UNMAPPED_SIGMA_DB (no say in a likelihood)."""
        mapped = np.asarray(mapped, dtype=bool)
        mean = np.zeros((len(mapped), *self.mean_db.shape[1:]), dtype=self.mean_db.dtype)
        mean[mapped] = self.mean_db
        sigma = np.full(len(mapped), UNMAPPED_SIGMA_DB)
        sigma[mapped] = self.sigma_db
        excess = None
        if self.excess_var_db2 is not None:
            excess = np.zeros_like(mean)
            excess[mapped] = self.excess_var_db2
        return RadioMapGrid(self.east0_m, self.north0_m, self.spacing_m, mean, sigma, excess)

    @classmethod
    def from_scenario(
        cls,
        scenario,
        bounds: Bounds | None = None,
        spacing_m: float = DEFAULT_GRID_SPACING_M,
        margin_m: float = DEFAULT_GRID_MARGIN_M,
        *,
        sigma_db=None,
        rss: np.ndarray | None = None,
        present: np.ndarray | None = None,
        pos: np.ndarray | None = None,
        snr: np.ndarray | None = None,
        min_snr_db: float | None = DEFAULT_FIT_MIN_SNR_DB,
    ) -> RadioMapGrid:
        """The simulator's true map (the oracle).

        ``sigma_db`` is given, or estimated as the fading scatter of training readings
        (``rss``, ``present``, ``pos``, optional ``snr``) around the true map, with each
        session's power profiled out. Default bounds: the training targets' box + ``margin_m``
        when ``pos`` is given, else the scenario's area.
        """
        if sigma_db is None:
            if rss is None or present is None or pos is None:
                raise ValueError("from_scenario: give sigma_db or training rss, present and pos")
            sigma_db = true_map_sigma_db(scenario, rss, present, pos, snr, min_snr_db)
        sigma_db = np.broadcast_to(np.asarray(sigma_db, dtype=np.float64), (scenario.n_receivers,)).copy()
        if bounds is None:
            bounds = bounds_around(pos, margin_m) if pos is not None else tuple(scenario.area)

        def true_mean_db(east, north):
            return scenario.mean_rss_dbm(east, north, np.zeros(np.shape(east)))

        return cls.from_function(true_mean_db, bounds, spacing_m, sigma_db)

    def sample(self, east, north) -> np.ndarray:
        """Bilinear interpolation of the map at positions: (..., R). Outside the grid: edge value."""
        east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        _, n_h, n_w = self.mean_db.shape
        fx = np.clip((east - self.east0_m) / self.spacing_m, 0.0, n_w - 1)
        fy = np.clip((north - self.north0_m) / self.spacing_m, 0.0, n_h - 1)
        x0 = np.minimum(fx.astype(np.int64), max(n_w - 2, 0))
        y0 = np.minimum(fy.astype(np.int64), max(n_h - 2, 0))
        x1, y1 = np.minimum(x0 + 1, n_w - 1), np.minimum(y0 + 1, n_h - 1)
        wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]
        m = np.moveaxis(self.mean_db, 0, -1)  # (H, W, R) view
        top = m[y0, x0] * (1 - wx) + m[y0, x1] * wx
        bottom = m[y1, x0] * (1 - wx) + m[y1, x1] * wx
        return top * (1 - wy) + bottom * wy


def _expand(bounds: Bounds, margin_m: float) -> Bounds:
    e0, e1, n0, n1 = bounds
    return (e0 - margin_m, e1 + margin_m, n0 - margin_m, n1 + margin_m)
