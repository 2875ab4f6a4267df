"""Radio maps and classical baselines behave as the physics says (real scenarios, no mocks)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from conftest import default_params_dict

from heimdall.baselines import KNN_K_CANDIDATES, crlb_rmse, evaluate_baselines, grid_mle, knn, tune_knn_k
from heimdall.params import ScenarioParams
from heimdall.gp import ResidualGP, _rbf, exact_gp, inducing_grid, sparse_gp
from heimdall.kriging import fit_kriged_map
from heimdall.radiomap import RadioMapGrid, fit_log_distance, power_and_residual
from heimdall.simulator import Scenario, free_space_loss_1km_db


def _scenario(**overrides) -> Scenario:
    d = copy.deepcopy(default_params_dict()["scenario"])
    d.update(overrides)
    return Scenario(ScenarioParams.model_validate(d))


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return _scenario()


def _sessions(scenario: Scenario, n: int, seed: int, fading_db: float, margin_m: float = 0.0):
    """Transmitters uniform in the area (shrunk by margin_m), powers uniform in the configured range,
    measured RSS = true mean + Gaussian fading; 10% outages. Returns (pos, power, rss, present)."""
    rng = np.random.default_rng(seed)
    e0, e1, n0, n1 = scenario.area
    pos = np.stack([rng.uniform(e0 + margin_m, e1 - margin_m, n), rng.uniform(n0 + margin_m, n1 - margin_m, n)], 1)
    power = rng.uniform(*scenario.params.tx_power_dbm, n)
    mean = scenario.mean_rss_dbm(pos[:, 0], pos[:, 1], power)
    rss = mean + fading_db * rng.standard_normal(mean.shape)
    present = rng.random(mean.shape) >= 0.1
    return pos, power, rss, present


def test_oracle_mle_recovers_noise_free_position_within_a_cell(scenario):
    spacing = 1000.0
    grid = RadioMapGrid.from_scenario(scenario, scenario.area, spacing, sigma_db=2.0)
    pos, power, rss, present = _sessions(scenario, 40, seed=1, fading_db=0.0, margin_m=5e3)
    rss = scenario.mean_rss_dbm(pos[:, 0], pos[:, 1], power)  # exactly the true map
    present[:20] = True  # half with every receiver, half with random outages
    # Three readings fit (east, north, power) exactly at more than one place: keep >= 4.
    present[present.sum(axis=1) < 4] = True
    est, extras = grid_mle(grid, rss, present)
    err = np.linalg.norm(est - pos, axis=1)
    assert err.max() < spacing, err.max()
    assert np.abs(extras["tx_power_dbm"] - power).max() < 1.0  # the oracle map is absolute
    assert not extras["fallback"].any()


def test_grid_sample_is_exact_for_a_linear_map():
    def plane(east, north):
        return np.stack([0.001 * east - 0.002 * north + 3.0, -0.0005 * east + 1.0], axis=-1)

    grid = RadioMapGrid.from_function(plane, (-5e3, 5e3, -3e3, 4e3), 700.0, sigma_db=[1.0, 1.0])
    rng = np.random.default_rng(0)
    e, n = rng.uniform(-5e3, 4.8e3, 100), rng.uniform(-3e3, 3.9e3, 100)
    np.testing.assert_allclose(grid.sample(e, n), plane(e, n), atol=1e-3)  # float32 storage
    assert grid.sample(e.reshape(10, 10), n.reshape(10, 10)).shape == (10, 10, 2)


def test_log_distance_fit_recovers_exponent_and_gains_without_shadowing():
    world = _scenario(shadowing_sigma_db=0.0)
    pos, _, rss, present = _sessions(world, 400, seed=2, fading_db=1.0)
    anchor = -free_space_loss_1km_db(world.params.frequency_mhz)
    model = fit_log_distance(rss, present, world.rx_enu, pos, anchor_offset_db=anchor)
    assert abs(model.exponent - world.params.path_loss_exponent) < 0.2
    # Receiver constants = -FSPL(1 km) + gain, identifiable up to their common mean.
    gains = world.gain_offset_db - world.gain_offset_db.mean()
    np.testing.assert_allclose(model.offset_db - anchor, gains, atol=0.3)
    np.testing.assert_allclose(model.sigma_db, 1.0, atol=0.15)  # the residual is the added noise


def test_kriged_map_reduces_held_out_residual_vs_log_distance(scenario):
    pos, _, rss, present = _sessions(scenario, 1500, seed=3, fading_db=2.0)
    train, held = slice(0, 1200), slice(1200, None)
    law = fit_log_distance(rss[train], present[train], scenario.rx_enu, pos[train])
    kriged = fit_kriged_map(rss[train], present[train], scenario.rx_enu, pos[train], n_hyper_subsample=300, n_loo=200)

    def held_out_rms(model):
        _, residual = power_and_residual(rss[held], model.mean_db(pos[held, 0], pos[held, 1]), present[held])
        return np.sqrt(np.sum(residual**2) / np.sum(present[held]))

    rms_law, rms_kriged = held_out_rms(law), held_out_rms(kriged)
    assert rms_kriged < 0.8 * rms_law, (rms_kriged, rms_law)
    # The grid is a faithful tabulation of the model it came from.
    grid = RadioMapGrid.from_fitted(kriged, spacing_m=1000.0)
    e, n = pos[held, 0], pos[held, 1]
    assert np.abs(grid.sample(e, n) - kriged.mean_db(e, n)).mean() < 0.1
    assert np.all(np.isfinite(kriged.sigma_db)) and np.all(kriged.sigma_db > 1.0)


def test_tiled_gp_prediction_matches_dense_posterior_mean():
    rng = np.random.default_rng(4)
    train = rng.uniform(0, 60, (500, 2))
    gp = ResidualGP(train, rng.standard_normal(500), 0.7, 5.0, 3.5, 2.0)
    query = rng.uniform(-5, 65, (2000, 2))
    dense = _rbf(query, train, 5.0, 3.5) @ gp.alpha + 0.7
    np.testing.assert_allclose(gp.predict(query), dense, atol=1e-5)


def _random_field(rng, length_km: float, signal_db: float, n_waves: int = 400):
    """A stationary field with an RBF covariance of that length and std (random Fourier features)."""
    w = rng.standard_normal((n_waves, 2)) / length_km
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    return lambda x: signal_db * np.sqrt(2 / n_waves) * np.cos(x @ w.T + phase).sum(axis=1)


def test_sparse_gp_matches_the_exact_gp_mean_and_leave_one_out_residuals():
    """Same kernel, same hyper-parameters: the inducing-point posterior mean differs from the exact one by
    a small fraction of the map's own error, and so do its closed-form leave-one-out residuals."""
    rng = np.random.default_rng(11)
    field = _random_field(rng, 3.0, 5.0)
    x = rng.uniform(0, 60, (1500, 2))
    e = field(x) + 2.0 * rng.standard_normal(1500) + 4.0
    loo_index = np.arange(0, 1500, 5)
    exact, fitted_exact, loo_exact = exact_gp(x, e, 5.0, 3.0, 2.0, loo_index=loo_index)
    sparse, fitted_sparse, loo_sparse = sparse_gp(x, e, 5.0, 3.0, 2.0, loo_index=loo_index)
    assert len(sparse.basis_km) == 26**2 and sparse.train_km is x  # 60 km / 2.4 km + 1 per side; readings kept
    query = rng.uniform(5, 55, (2000, 2))
    map_error = np.sqrt(np.mean((exact.predict(query) - 4.0 - field(query)) ** 2))
    gap = np.sqrt(np.mean((sparse.predict(query) - exact.predict(query)) ** 2))
    assert 0.5 < map_error < 2.5 and gap < 0.05 * map_error, (gap, map_error)  # measured 0.016 vs 0.97 dB
    np.testing.assert_allclose(fitted_sparse, fitted_exact, atol=0.15)
    assert np.sqrt(np.mean((loo_sparse - loo_exact) ** 2)) < 0.05 * np.sqrt(np.mean(loo_exact**2))


def test_inducing_grid_covers_the_readings_within_its_budget(caplog):
    rng = np.random.default_rng(12)
    x = np.vstack([rng.uniform(0, 40, (300, 2)), rng.uniform(100, 140, (300, 2))])  # two far clusters
    u = inducing_grid(x, 2.0, 10_000)
    spacing = np.diff(np.unique(u[:, 0]))[0]
    assert spacing == pytest.approx(1.6)  # 0.8 length scales
    # no node in the empty middle (> 3 length scales from every reading), every reading near a node
    assert not np.any((u[:, 0] > 50) & (u[:, 0] < 90) & (u[:, 1] > 50) & (u[:, 1] < 90))
    assert cdist(x, u).min(axis=1).max() < spacing
    with caplog.at_level("WARNING", logger="heimdall.kriging"):
        coarse = inducing_grid(x, 2.0, 400)
    assert len(coarse) <= 400 and "smoother than its length scale" in caplog.text


def test_sparse_and_exact_kriged_maps_agree_on_the_default_scenario(scenario):
    pos, _, rss, present = _sessions(scenario, 1500, seed=3, fading_db=2.0)
    train, held = slice(0, 1200), slice(1200, None)
    fits = {gp: fit_kriged_map(rss[train], present[train], scenario.rx_enu, pos[train], n_hyper_subsample=300,
                               n_loo=200, gp=gp) for gp in ("exact", "sparse")}
    e, n = pos[held, 0], pos[held, 1]
    true = scenario.mean_rss_dbm(e, n, np.zeros(len(e)))

    def map_rms(model):
        diff = model.mean_db(e, n) - true
        diff -= np.sum(diff * present[held]) / present[held].sum()  # TX power is profiled out: no common offset
        return np.sqrt(np.sum(diff**2 * present[held]) / present[held].sum())

    rms = {gp: map_rms(m) for gp, m in fits.items()}
    assert abs(rms["sparse"] - rms["exact"]) < 0.02 * rms["exact"], rms
    np.testing.assert_allclose(fits["sparse"].sigma_db, fits["exact"].sigma_db, rtol=0.02)
    assert all(gp.readings_km is not None for gp in fits["sparse"].gps)  # expanded over inducing points
    assert all(gp.readings_km is None for gp in fits["exact"].gps)
    # receivers fitted in two processes: the same map (the random draws stay in the parent)
    two = fit_kriged_map(rss[train], present[train], scenario.rx_enu, pos[train], n_hyper_subsample=300, n_loo=200,
                         gp="sparse", n_jobs=2)
    np.testing.assert_array_equal(two.mean_db(e, n), fits["sparse"].mean_db(e, n))
    np.testing.assert_array_equal(two.sigma_db, fits["sparse"].sigma_db)
    with pytest.raises(ValueError, match="gp='dense'"):
        fit_kriged_map(rss[train], present[train], scenario.rx_enu, pos[train], gp="dense")


def test_crlb_is_finite_and_scales_with_sigma(scenario):
    pos, _, _, present = _sessions(scenario, 50, seed=5, fading_db=0.0)
    present[:] = True
    wide, narrow = crlb_rmse(scenario, pos, present, 2.0), crlb_rmse(scenario, pos, present, 1.0)
    assert np.all(np.isfinite(wide)) and np.all(wide > 0)
    np.testing.assert_allclose(narrow, wide / 2, rtol=1e-9)
    per_rx = crlb_rmse(scenario, pos, present, np.full(scenario.n_receivers, 1.0))
    np.testing.assert_allclose(per_rx, narrow, rtol=1e-9)
    # Losing receivers can only loosen the bound; with < 3 it is infinite, never NaN.
    fewer = present.copy()
    fewer[:, :3] = False
    assert np.all(crlb_rmse(scenario, pos, fewer, 1.0) >= narrow * (1 - 1e-9))
    two = np.zeros_like(present)
    two[:, :2] = True
    assert np.all(np.isinf(crlb_rmse(scenario, pos, two, 1.0)))


def test_fewer_than_three_receivers_gives_finite_fallback(scenario):
    grid = RadioMapGrid.from_scenario(scenario, scenario.area, 4000.0, sigma_db=2.0)
    pos, power, rss, present = _sessions(scenario, 6, seed=6, fading_db=0.0)
    present[:] = True
    present[0] = False  # nothing heard
    present[1, 1:] = False  # one receiver
    present[2, 2:] = False  # two receivers
    snr = np.full(rss.shape, 30.0)
    snr[3, :5] = 1.0  # only two readings above the SNR threshold: relax to all present ones
    est, extras = grid_mle(grid, rss, present, snr, min_snr_db=10.0)
    assert np.all(np.isfinite(est)) and np.all(np.isfinite(extras["tx_power_dbm"]))
    assert extras["fallback"].tolist() == [True, True, True, False, False, False]
    assert extras["n_used"][3] == scenario.n_receivers
    e0, e1, n0, n1 = grid.bounds
    assert np.all((est[:, 0] >= e0) & (est[:, 0] <= e1) & (est[:, 1] >= n0) & (est[:, 1] <= n1))
    # kNN copes with a query that heard nothing, too
    q = knn(rss[3:], present[3:], pos[3:], rss[:3], present[:3], k=2)
    assert np.all(np.isfinite(q))


def test_knn_tuning_finds_the_k_the_data_were_built_for():
    """Every location has exactly 3 training sessions with its fingerprint, at positions whose mean is
    the location (±400 m jitter that cancels): only k = 3 averages the jitter away exactly; k < 3
    keeps some of it, k > 3 pulls in other locations. Validation queries sit on the locations."""
    rng = np.random.default_rng(3)
    n_loc, n_rx = 40, 6
    fingerprints = rng.normal(-90, 15, size=(n_loc, n_rx))  # far apart in fingerprint space
    centres = rng.uniform(-50e3, 50e3, size=(n_loc, 2))
    jitter = np.array([[400.0, 0.0], [-200.0, 346.4], [-200.0, -346.4]])  # sums to zero
    train_rss = np.repeat(fingerprints, 3, axis=0) + rng.normal(0, 1e-3, size=(3 * n_loc, n_rx))
    train_pos = (centres[:, None, :] + jitter[None]).reshape(-1, 2)
    present = np.ones_like(train_rss, dtype=bool)
    k, errors = tune_knn_k(train_rss, present, train_pos, fingerprints, present[:n_loc], centres)
    assert 3 in KNN_K_CANDIDATES and set(errors) == set(KNN_K_CANDIDATES)
    assert k == 3 and errors[3] < 1.0  # metres: the jitter averaged away
    assert errors[1] > 390 and all(errors[c] > 1e3 for c in KNN_K_CANDIDATES if c > 3)


def test_evaluate_baselines_end_to_end(tiny_campaign):
    _, _, features = tiny_campaign
    res = evaluate_baselines(features, spacing_m=3000.0)
    for name in ("knn", "ml_logdistance", "kriged_map", "oracle"):
        assert np.isfinite(res[name]["mean_error_m"]) and np.isfinite(res[name]["median_error_m"]), name
        assert res[name]["wall_s"] >= 0  # the evaluate stage moves these to its timings file
    assert np.isfinite(res["crlb_rmse_m"]) and res["crlb_rmse_m"] > 0
    # Sanity, not a benchmark: the true map cannot be beaten by much by a map learned from 168 sessions.
    assert res["oracle"]["median_error_m"] < res["ml_logdistance"]["median_error_m"]


def test_local_gp_variance_is_exact_with_all_points_and_an_upper_bound_with_fewer():
    """With every training point among the nearest the local variance is the exact GP posterior
    variance s² − kᵀ(K + σ²I)⁻¹k; with fewer it can only be larger (less data, more doubt); at a
    training point it is below the noise, far away it is the signal variance."""
    rng = np.random.default_rng(5)
    train = rng.uniform(0, 10, (40, 2))
    gp = ResidualGP(train, np.zeros(40), 0.0, 5.0, 2.0, 1.5)
    query = np.vstack([rng.uniform(-5, 15, (200, 2)), [[100.0, 100.0]]])
    k_cross = _rbf(query, train, 5.0, 2.0)
    gram = _rbf(train, train, 5.0, 2.0) + 1.5**2 * np.eye(40)
    exact = 25.0 - np.einsum("ij,ji->i", k_cross, np.linalg.solve(gram, k_cross.T))
    np.testing.assert_allclose(gp.local_variance(query, n_near=40), exact, rtol=1e-6, atol=1e-9)
    local = gp.local_variance(query, n_near=8)
    assert np.all(local >= exact - 1e-9) and local[-1] == pytest.approx(25.0)
    assert gp.local_variance(train[:5], n_near=8).max() < 1.5**2
    # leaving a point's own reading out raises its variance
    assert np.all(gp.local_variance(train, n_near=8, leave_self_out=True) > gp.local_variance(train, n_near=8))


def test_map_excess_variance_is_zero_near_training_readings_and_the_signal_variance_far_away(scenario):
    """Sessions in the west half only: the tabulated excess variance of the kriged map is ~0 among
    them and rises to the GP's signal variance (less what σ already holds) in the empty east."""
    e0, e1, n0, n1 = scenario.area
    pos, _, rss, present = _sessions(scenario, 1200, seed=6, fading_db=2.0)
    west = pos[:, 0] < (e0 + e1) / 2 - 10e3
    kriged = fit_kriged_map(rss[west], present[west], scenario.rx_enu, pos[west], n_hyper_subsample=300, n_loo=200)
    grid = RadioMapGrid.from_fitted(kriged, bounds=scenario.area, spacing_m=5000.0, uncertainty=True)
    assert grid.excess_var_db2.shape == grid.mean_db.shape
    east, north = grid.cell_centres()
    signal_var = np.array([gp.signal_std_db**2 for gp in kriged.gps])  # (R,)
    near = east < (e0 + e1) / 2 - 20e3
    far = east > e1 - 20e3
    excess = np.moveaxis(grid.excess_var_db2, 0, -1)  # (H, W, R)
    assert np.median(excess[near] / signal_var) < 0.05
    # far away: the whole signal variance, less the part σ already holds (the mean leave-one-out variance)
    np.testing.assert_allclose(np.median(excess[far], axis=0), signal_var - kriged.loo_map_var_db2, rtol=0.02)
    assert np.all(kriged.loo_map_var_db2 > 0) and np.all(kriged.loo_map_var_db2 < 0.6 * signal_var)
    assert np.all(np.isfinite(excess)) and excess.min() >= 0.0
    # receivers without a map get no excess
    grown = grid.expanded(np.r_[np.ones(grid.n_receivers, bool), False])
    assert grown.excess_var_db2.shape[0] == grid.n_receivers + 1 and not grown.excess_var_db2[-1].any()
