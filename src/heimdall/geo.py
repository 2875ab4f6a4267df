"""WGS-84 geodetic <-> local East-North-Up (metres) conversions.

All positions are regressed in an ENU frame around a fixed origin (never in degrees):
metres are isotropic, so a Gaussian error model and ellipses mean what they say.
Exact ECEF-based transforms, not a flat-earth approximation.
"""

from __future__ import annotations

import numpy as np

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)


def network_origin(lat_deg, lon_deg) -> tuple[float, float, float]:
    """The ENU origin of a receiver network: mean latitude/longitude, at 0 m altitude."""
    return float(np.mean(lat_deg)), float(np.mean(lon_deg)), 0.0


def geodetic_to_ecef(lat_deg, lon_deg, alt_m):
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    alt = np.asarray(alt_m, dtype=np.float64)
    n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
    x = (n + alt) * np.cos(lat) * np.cos(lon)
    y = (n + alt) * np.cos(lat) * np.sin(lon)
    z = (n * (1 - WGS84_E2) + alt) * np.sin(lat)
    return x, y, z


def ecef_to_geodetic(x, y, z):
    """Bowring's method with two refinements: sub-millimetre for terrestrial points."""
    x, y, z = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
    lon = np.arctan2(y, x)
    p = np.hypot(x, y)
    lat = np.arctan2(z, p * (1 - WGS84_E2))
    for _ in range(3):
        n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
        alt = p / np.cos(lat) - n
        lat = np.arctan2(z, p * (1 - WGS84_E2 * n / (n + alt)))
    n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
    alt = p / np.cos(lat) - n
    return np.degrees(lat), np.degrees(lon), alt


def _rotation(lat0_deg: float, lon0_deg: float) -> np.ndarray:
    lat0, lon0 = np.radians(lat0_deg), np.radians(lon0_deg)
    sl, cl, so, co = np.sin(lat0), np.cos(lat0), np.sin(lon0), np.cos(lon0)
    # rows: east, north, up unit vectors in ECEF
    return np.array([[-so, co, 0.0], [-sl * co, -sl * so, cl], [cl * co, cl * so, sl]])


def geodetic_to_enu(lat_deg, lon_deg, alt_m, origin: tuple[float, float, float]):
    """Return (east, north, up) in metres relative to ``origin = (lat, lon, alt)``."""
    x, y, z = geodetic_to_ecef(lat_deg, lon_deg, alt_m)
    x0, y0, z0 = geodetic_to_ecef(*origin)
    d = np.stack([x - x0, y - y0, z - z0])
    enu = np.tensordot(_rotation(origin[0], origin[1]), d, axes=1)
    return enu[0], enu[1], enu[2]


def enu_to_geodetic(east, north, up, origin: tuple[float, float, float]):
    """Inverse of :func:`geodetic_to_enu`: (lat_deg, lon_deg, alt_m)."""
    enu = np.stack([np.asarray(v, dtype=np.float64) for v in (east, north, up)])
    d = np.tensordot(_rotation(origin[0], origin[1]).T, enu, axes=1)
    x0, y0, z0 = geodetic_to_ecef(*origin)
    return ecef_to_geodetic(d[0] + x0, d[1] + y0, d[2] + z0)
