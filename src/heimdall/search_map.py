"""Search regions and posterior modes as GeoJSON (WGS-84 lon/lat, EPSG:4326) for map tools.

The exported model's posterior lives on a regular grid in the network's ENU frame (metres around
``origin = (lat, lon, alt)``; ONNX metadata ``grid``). A level's search region is the set of cells
with ``cell_probability >= region_threshold``; here it becomes one (Multi)Polygon — the union of
those cells' squares — drawn in ENU metres (exact: area = cells × spacing²), then carried vertex by
vertex to lon/lat. numpy + shapely + heimdall.geo only, so it runs wherever predict runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Point, mapping
from shapely.geometry.base import BaseGeometry

from heimdall import geo

COORD_DECIMALS = 7  # 1e-7 deg ≈ 1 cm: below any grid spacing, keeps the files small
# Heights of the up=0 tangent plane above the ellipsoid (origin at h=0; lat 40°): 196 m at 50 km,
# 783 m at 100 km, 1,761 m at 150 km — dropping them moves a vertex 1.5 m, 12 m, 41 m sideways
# (37 m at 100 km with the origin at h=1,600 m). Training targets and ``position_latlon`` are
# the h = 0 point, so up is iterated onto the ellipsoid instead (residual ×1e-3 per step).
GROUND_ITERATIONS = 3


def _grid_edges(grid: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Cell edge coordinates (n_east+1,), (n_north+1,): shared by neighbours bit for bit, so the
    union sees exactly coincident edges (no slivers, no gaps)."""
    s = float(grid["spacing_m"])
    x = float(grid["east0_m"]) + (np.arange(int(grid["n_east"]) + 1) - 0.5) * s
    y = float(grid["north0_m"]) + (np.arange(int(grid["n_north"]) + 1) - 0.5) * s
    return x, y


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """A valid polygonal geometry: make_valid may return a collection; keep its polygon parts."""
    if geom.is_valid:
        return geom
    parts = shapely.get_parts(shapely.make_valid(geom))
    polys = [q for p in parts for q in shapely.get_parts(p) if q.geom_type == "Polygon" and not q.is_empty]
    return MultiPolygon(polys) if polys else MultiPolygon()


def region_polygon_enu(inside: np.ndarray, grid: Mapping[str, Any]) -> BaseGeometry:
    """Union of the inside cells' squares in ENU metres: a valid (Multi)Polygon with holes.

    Each row's runs of consecutive inside cells become one rectangle (~hundreds of boxes instead
    of ~10⁴ squares), then one ``union_all``. Edges are segmentized at the grid spacing so every
    cell-boundary vertex survives: the lon/lat image of a 100 km straight ENU edge is not straight.
    """
    n_east, n_north = int(grid["n_east"]), int(grid["n_north"])
    mask = np.asarray(inside, dtype=bool)
    if mask.shape != (n_east * n_north,):
        raise ValueError(f"inside has shape {mask.shape}; the grid has {n_east * n_north} cells")
    mask = mask.reshape(n_north, n_east)
    if not mask.any():
        return MultiPolygon()
    padded = np.zeros((n_north, n_east + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)  # +1 where a run starts (at col), -1 one past its end
    rows, start = np.nonzero(step == 1)  # row-major order on both: run k's start pairs with end k
    _, stop = np.nonzero(step == -1)
    x, y = _grid_edges(grid)
    boxes = shapely.box(x[start], y[rows], x[stop], y[rows + 1])
    region = shapely.simplify(shapely.union_all(boxes), 0.0)  # drops collinear leftovers of the union
    region = shapely.segmentize(region, float(grid["spacing_m"]) * (1 + 1e-9))
    return _polygonal(region)


def ground_lonlat(east: np.ndarray, north: np.ndarray, origin: Sequence[float]) -> np.ndarray:
    """(n, 2) lon, lat degrees of the ellipsoid (h = 0) points with these ENU east/north — the
    inverse of how training targets were defined (``geo.geodetic_to_enu(lat, lon, 0, origin)``)."""
    east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
    up = np.zeros_like(east)
    for _ in range(GROUND_ITERATIONS):
        _, _, alt = geo.enu_to_geodetic(east, north, up, tuple(origin))
        up = up - alt
    lat, lon, _ = geo.enu_to_geodetic(east, north, up, tuple(origin))
    return np.stack([lon, lat], axis=1)


def enu_geometry_to_lonlat(geom: BaseGeometry, origin: Sequence[float]) -> BaseGeometry:
    """Every vertex ENU -> (lon, lat) (GeoJSON order), rounded to 7 decimals, still valid."""
    if geom.is_empty:
        return geom

    def to_lonlat(xy: np.ndarray) -> np.ndarray:
        return np.round(ground_lonlat(xy[:, 0], xy[:, 1], origin), COORD_DECIMALS)

    return _polygonal(shapely.transform(geom, to_lonlat))


def _level_index(levels: np.ndarray, level: float) -> int:
    hit = np.flatnonzero(np.isclose(levels, level, rtol=0.0, atol=1e-9))
    if hit.size == 0:
        raise ValueError(f"level {level} is not among the model's region levels {levels.tolist()}")
    return int(hit[0])


def _feature(geom: BaseGeometry, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": mapping(geom), "properties": properties}


def session_features(session_id: str, cell_probability: np.ndarray, region_threshold: np.ndarray,
                     levels: np.ndarray, region_area_km2: np.ndarray, modes: Sequence[Mapping[str, float]],
                     position_latlon: np.ndarray, grid: Mapping[str, Any], origin: Sequence[float],
                     draw_levels: Sequence[float] = (0.5, 0.9)) -> list[dict[str, Any]]:
    """One session's GeoJSON Features: a search region per drawn level (widest first, so the
    narrower ones draw on top), the posterior modes (rank 1 = heaviest) and the point estimate."""
    prob = np.asarray(cell_probability, dtype=np.float64)
    thresholds = np.asarray(region_threshold, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    areas = np.asarray(region_area_km2, dtype=np.float64)
    features = []
    for level in sorted(draw_levels, reverse=True):
        j = _level_index(levels, level)
        region = enu_geometry_to_lonlat(region_polygon_enu(prob >= thresholds[j], grid), origin)
        features.append(_feature(region, {"session_id": session_id, "kind": "search_region",
                                          "level": float(levels[j]), "area_km2": float(areas[j])}))
    ranked = sorted(modes, key=lambda m: -float(m["weight"]))  # stable: ties keep the given order
    for rank, m in enumerate(ranked, start=1):
        point = Point(round(float(m["longitude_deg"]), COORD_DECIMALS), round(float(m["latitude_deg"]), COORD_DECIMALS))
        features.append(_feature(point, {"session_id": session_id, "kind": "mode", "rank": rank,
                                         "weight": float(m["weight"])}))
    lat, lon = (round(float(v), COORD_DECIMALS) for v in np.asarray(position_latlon, dtype=np.float64).reshape(2))
    features.append(_feature(Point(lon, lat), {"session_id": session_id, "kind": "estimate"}))
    return features


def feature_collection(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An RFC 7946 FeatureCollection. No "crs" member: GeoJSON coordinates are WGS-84 lon/lat
    (EPSG:4326, OGC:CRS84 axis order) by definition, and RFC 7946 dropped the member."""
    return {"type": "FeatureCollection", "features": [dict(f) for f in features]}
