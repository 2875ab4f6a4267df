"""search_map: grid search regions -> (Multi)Polygons in ENU and lon/lat, GeoJSON Features."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from heimdall import geo
from heimdall.search_map import (
    enu_geometry_to_lonlat,
    feature_collection,
    region_polygon_enu,
    session_features,
)

ORIGIN = (40.0, -105.0, 1600.0)
SPACING = 1000.0
GRID = {"east0_m": -19500.0, "north0_m": -14500.0, "spacing_m": SPACING, "n_east": 40, "n_north": 30}


def two_blobs() -> np.ndarray:
    """(G,) bool: a 10×8 block with a 2×3 hole (cols 3-12, rows 4-11) and a disjoint disc."""
    m = np.zeros((GRID["n_north"], GRID["n_east"]), dtype=bool)
    m[4:12, 3:13] = True
    m[7:9, 6:9] = False  # the hole
    rr, cc = np.mgrid[0:30, 0:40]
    m |= (rr - 20) ** 2 + (cc - 28) ** 2 <= 16
    return m.ravel()


def n_holes(geom) -> int:
    return sum(len(p.interiors) for p in shapely.get_parts(geom))


def back_to_enu(geom, origin=ORIGIN):
    """lon/lat geometry -> ENU metres of its h = 0 points (the inverse of the conversion)."""
    def fn(lonlat):
        e, n, _ = geo.geodetic_to_enu(lonlat[:, 1], lonlat[:, 0], np.zeros(len(lonlat)), origin)
        return np.stack([e, n], axis=1)
    return shapely.transform(geom, fn)


def test_enu_polygon_parts_area_and_hole():
    inside = two_blobs()
    poly = region_polygon_enu(inside, GRID)
    assert poly.is_valid and poly.geom_type == "MultiPolygon"
    assert shapely.get_num_geometries(poly) == 2
    assert poly.area == inside.sum() * SPACING**2  # exact: edges are shared bit for bit
    assert n_holes(poly) == 1
    hole = shapely.Polygon(max(shapely.get_parts(poly), key=lambda p: p.area).interiors[0])
    assert hole.area == 6 * SPACING**2
    # the hole's cells are not covered, a cell of the block is
    assert not poly.contains(shapely.Point(GRID["east0_m"] + 7 * SPACING, GRID["north0_m"] + 7 * SPACING))
    assert poly.contains(shapely.Point(GRID["east0_m"] + 4 * SPACING, GRID["north0_m"] + 5 * SPACING))
    # bounds follow the cell edges (centre ± spacing/2)
    assert poly.bounds[0] == GRID["east0_m"] + 2.5 * SPACING
    assert poly.bounds[1] == GRID["north0_m"] + 3.5 * SPACING


def test_empty_and_full_and_bad_shape():
    g = GRID["n_east"] * GRID["n_north"]
    assert region_polygon_enu(np.zeros(g, bool), GRID).is_empty
    full = region_polygon_enu(np.ones(g, bool), GRID)
    assert full.geom_type == "Polygon" and full.area == g * SPACING**2 and n_holes(full) == 0
    with pytest.raises(ValueError):
        region_polygon_enu(np.ones(g - 1, bool), GRID)
    assert enu_geometry_to_lonlat(region_polygon_enu(np.zeros(g, bool), GRID), ORIGIN).is_empty


def test_diagonal_touching_cells_stay_valid():
    m = np.zeros((GRID["n_north"], GRID["n_east"]), dtype=bool)
    m[::2, ::2] = True  # checkerboard quarter: cells touch only at corners
    m[1::2, 1::2] = True
    poly = region_polygon_enu(m.ravel(), GRID)
    assert poly.is_valid and poly.area == m.sum() * SPACING**2
    ll = enu_geometry_to_lonlat(poly, ORIGIN)
    assert ll.is_valid and abs(back_to_enu(ll).area / poly.area - 1) < 1e-5


def test_lonlat_order_area_and_ground():
    enu = region_polygon_enu(two_blobs(), GRID)
    ll = enu_geometry_to_lonlat(enu, ORIGIN)
    assert ll.is_valid and shapely.get_num_geometries(ll) == 2 and n_holes(ll) == 1
    xy = shapely.get_coordinates(ll)
    assert np.all(np.abs(xy[:, 0] + 105.0) < 0.3) and np.all(np.abs(xy[:, 1] - 40.0) < 0.2)  # (lon, lat)
    assert np.all(np.round(xy, 7) == xy)
    # back on the ellipsoid's ENU: the area is the cell count's (rounding to 1e-7° ≈ 1 cm)
    back = back_to_enu(ll)
    assert abs(back.area / enu.area - 1) < 1e-5
    assert back.symmetric_difference(enu).area < 1e-4 * enu.area


def test_far_vertices_land_on_the_ellipsoid():
    """A cell 120 km out: the vertices are the h = 0 points, not the up = 0 tangent plane (~1.1 km
    up there, which would shift them ~20 m sideways)."""
    grid = {"east0_m": 120_000.0, "north0_m": 0.0, "spacing_m": 500.0, "n_east": 1, "n_north": 1}
    ll = enu_geometry_to_lonlat(region_polygon_enu(np.ones(1, bool), grid), ORIGIN)
    xy = shapely.get_coordinates(ll)
    e, n, _ = geo.geodetic_to_enu(xy[:, 1], xy[:, 0], np.zeros(len(xy)), ORIGIN)
    assert np.allclose(sorted(set(np.round(e, 1))), [119_750.0, 120_250.0], atol=0.05)
    assert np.allclose(sorted(set(np.round(n, 1))), [-250.0, 250.0], atol=0.05)


def test_threshold_is_inclusive():
    g = GRID["n_east"] * GRID["n_north"]
    prob = np.zeros(g)
    prob[[0, 1, 41]] = [0.25, 0.2, 0.2]
    feats = session_features("s", prob, np.array([0.2]), np.array([0.5]), np.array([3.0]), [],
                             np.array([40.0, -105.0]), GRID, ORIGIN, draw_levels=(0.5,))
    region = back_to_enu(shape(feats[0]["geometry"]))
    assert abs(region.area / (3 * SPACING**2) - 1) < 1e-5
    feats = session_features("s", prob, np.array([0.2000001]), np.array([0.5]), np.array([1.0]), [],
                             np.array([40.0, -105.0]), GRID, ORIGIN, draw_levels=(0.5,))
    assert abs(back_to_enu(shape(feats[0]["geometry"])).area / SPACING**2 - 1) < 1e-5


def posterior() -> np.ndarray:
    """A two-bump posterior on GRID (sums to 1)."""
    rr, cc = np.mgrid[0:30, 0:40]
    p = np.exp(-((rr - 12) ** 2 + (cc - 10) ** 2) / 8.0) + 0.5 * np.exp(-((rr - 20) ** 2 + (cc - 30) ** 2) / 5.0)
    return (p / p.sum()).ravel()


def make_features(prob):
    levels = np.array([0.5, 0.68, 0.9, 0.95])
    order = np.argsort(-prob)
    cum = np.cumsum(prob[order])
    thresholds = np.array([prob[order][np.searchsorted(cum, lv)] for lv in levels])
    areas = np.array([(prob >= t).sum() for t in thresholds]) * SPACING**2 / 1e6
    lat, lon, _ = geo.enu_to_geodetic(-9000.0, -2000.0, 0.0, ORIGIN)
    modes = [{"weight": 0.3, "latitude_deg": 40.05, "longitude_deg": -104.88},
             {"weight": 0.7, "latitude_deg": float(lat), "longitude_deg": float(lon)}]
    return session_features("sess-7", prob, thresholds, levels, areas, modes, np.array([lat, lon]), GRID,
                             ORIGIN), thresholds, areas


def test_session_features_nest_and_rank():
    prob = posterior()
    feats, thresholds, areas = make_features(prob)
    assert np.all(np.diff(thresholds) < 0)
    kinds = [f["properties"]["kind"] for f in feats]
    assert kinds == ["search_region", "search_region", "mode", "mode", "estimate"]
    assert all(f["type"] == "Feature" and f["properties"]["session_id"] == "sess-7" for f in feats)
    r90, r50 = feats[0], feats[1]
    assert (r90["properties"]["level"], r50["properties"]["level"]) == (0.9, 0.5)
    assert r90["properties"]["area_km2"] == areas[2] and r50["properties"]["area_km2"] == areas[0]
    p90, p50 = shape(r90["geometry"]), shape(r50["geometry"])
    assert p90.buffer(1e-9).contains(p50) and p90.area > p50.area
    for feat, level_area in ((r90, areas[2]), (r50, areas[0])):
        assert abs(back_to_enu(shape(feat["geometry"])).area / 1e6 / level_area - 1) < 1e-5
    modes = [f for f in feats if f["properties"]["kind"] == "mode"]
    assert [m["properties"]["rank"] for m in modes] == [1, 2]
    assert [m["properties"]["weight"] for m in modes] == [0.7, 0.3]
    assert modes[1]["geometry"] == {"type": "Point", "coordinates": (-104.88, 40.05)}
    est = shape(feats[-1]["geometry"])
    assert p50.contains(est)  # the estimate sits in the heavier bump's 50 % region
    with pytest.raises(ValueError, match="0.8"):
        session_features("s", prob, thresholds, np.array([0.5, 0.68, 0.9, 0.95]), areas, [],
                         np.array([40.0, -105.0]), GRID, ORIGIN, draw_levels=(0.8,))


def test_feature_collection_json_round_trip():
    feats, _, _ = make_features(posterior())
    fc = feature_collection(feats)
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    text = json.dumps(fc)
    back = json.loads(text)
    assert back["type"] == "FeatureCollection" and len(back["features"]) == len(feats)
    for f0, f1 in zip(feats, back["features"], strict=True):
        g0, g1 = shape(f0["geometry"]), shape(f1["geometry"])
        assert g1.is_valid and g1.geom_type == g0.geom_type and g1.equals_exact(g0, 0.0)
        assert f1["properties"] == f0["properties"]


def test_speed_170_grid():
    rng = np.random.default_rng(7)
    n = 170
    grid = {"east0_m": -84_500.0, "north0_m": -84_500.0, "spacing_m": SPACING, "n_east": n, "n_north": n}
    rr, cc = np.mgrid[0:n, 0:n]
    field = np.zeros((n, n))
    for r0, c0, s in zip(rng.uniform(20, 150, 6), rng.uniform(20, 150, 6), rng.uniform(8, 18, 6), strict=True):
        field += np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * s * s))
    field += 0.05 * rng.standard_normal((n, n))  # ragged edges, specks and holes
    inside = (field >= np.sort(field.ravel())[-5000]).ravel()
    t0 = time.perf_counter()
    enu = region_polygon_enu(inside, grid)
    ll = enu_geometry_to_lonlat(enu, ORIGIN)
    text = json.dumps(feature_collection([{"type": "Feature", "geometry": shapely.geometry.mapping(ll),
                                           "properties": {}}]))
    dt = time.perf_counter() - t0
    print(f"170x170 grid, {inside.sum()} cells, {shapely.get_num_geometries(enu)} parts, {n_holes(enu)} holes, "
          f"{shapely.get_num_coordinates(ll)} vertices, {len(text) / 1e3:.0f} kB: {dt * 1e3:.0f} ms")
    assert enu.is_valid and ll.is_valid and enu.area == inside.sum() * SPACING**2
    assert dt < 1.0
