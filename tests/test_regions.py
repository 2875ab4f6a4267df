"""Search regions (heimdall.regions) on posteriors with known answers, and the evaluate stage's
search_regions section on the tiny campaign."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from heimdall import regions


def two_mode_posterior() -> np.ndarray:
    """100 cells: mode A (cells 0-9, 0.05 each = 0.5), mode B (cells 20-29, 0.04 each = 0.4), the
    other 80 cells 0.1 / 80 each."""
    p = np.full(100, 0.1 / 80)
    p[0:10] = 0.05
    p[20:30] = 0.04
    return p


def test_hpd_two_modes_known_sets():
    prob = np.tile(two_mode_posterior(), (5, 1))
    truth = np.array([5, 25, 50, -1, 9])
    n_cells, covered = regions.hpd_regions(prob, truth, levels=(0.5, 0.9, 0.95), batch=2)
    # 50 %: mode A exactly; 90 %: A and B; 95 %: needs 40 of the 80 tied background cells, so all
    # 80 are admitted (membership depends on probability only)
    assert n_cells.tolist() == [[10, 20, 100]] * 5
    assert covered.tolist() == [[True, True, True], [False, True, True], [False, False, True],
                                [False, False, False], [True, True, True]]
    # shuffling the cells changes nothing
    perm = np.random.default_rng(0).permutation(100)
    inv = np.argsort(perm)
    n2, c2 = regions.hpd_regions(prob[:, perm], inv[np.maximum(truth, 0)] * (truth >= 0) - (truth < 0),
                                 levels=(0.5, 0.9, 0.95))
    assert (n2 == n_cells).all() and (c2 == covered).all()


def test_grid_cell_index():
    # 3 x 4 grid (north rows x east columns), spacing 100 m, first cell centred at (1000, 2000)
    target = np.array([[1000, 2000], [1349, 2000], [1351, 2000], [1300, 2149], [1300, 2151], [951, 2000],
                       [1300, 2249], [1300, 2251]])
    idx = regions.grid_cell_index(target, 1000.0, 2000.0, 100.0, n_east=4, n_north=3)
    assert idx.tolist() == [0, 3, -1, 7, 11, 0, 11, -1]


def test_gaussian_hpd_area_matches_ellipse():
    """A Gaussian tabulated on a fine grid: its HPD regions are its ellipses, so their areas agree
    with π·sqrt(det Σ)·(−2 ln(1 − p)) within the cells along the boundary."""
    spacing = 0.25  # km
    ax = np.arange(-40, 40 + 1e-9, spacing)
    east, north = (v.ravel() for v in np.meshgrid(ax, ax))
    cov = np.array([[25.0, 6.0], [6.0, 9.0]])  # km²
    d = np.stack([east - 1.0, north + 2.0], 1)
    m2 = np.einsum("gi,ij,gj->g", d, np.linalg.inv(cov), d)
    prob = np.exp(-0.5 * m2)
    prob /= prob.sum()
    levels = regions.LEVELS
    n_cells, _ = regions.hpd_regions(prob[None], np.array([0]), levels)
    hpd_area = n_cells[0] * spacing**2
    area, _ = regions.gaussian_regions(np.array([[1.0, -2.0]]), cov[None], np.array([[1.0, -2.0]]), levels)
    expected = np.pi * np.sqrt(np.linalg.det(cov)) * -2 * np.log(1 - np.array(levels))
    np.testing.assert_allclose(area[0], expected, rtol=1e-12)
    # boundary band: perimeter (≤ 2π·longest semi-axis) × one cell
    r = np.sqrt(np.linalg.eigvalsh(cov).max() * -2 * np.log(1 - np.array(levels)))
    assert (np.abs(hpd_area - expected) <= 2 * np.pi * r * spacing).all(), (hpd_area, expected)
    assert (np.abs(hpd_area / expected - 1) < 0.03).all()


def test_coverage_of_truths_drawn_from_the_posterior_is_nominal():
    """Self-consistency: truths drawn from each session's own (multi-modal) posterior fall in its
    p-level HPD region with frequency ≈ p (slightly above: a region holds at least p)."""
    rng = np.random.default_rng(1)
    n, g = 3000, 400
    x = np.arange(g)
    prob = np.empty((n, g))
    for i in range(n):
        centres = rng.uniform(0, g, 3)
        widths = rng.uniform(3, 30, 3)
        w = rng.dirichlet(np.ones(3))
        prob[i] = (w[:, None] * np.exp(-0.5 * ((x - centres[:, None]) / widths[:, None]) ** 2)).sum(0) + 1e-6
    prob /= prob.sum(1, keepdims=True)
    truth = np.array([rng.choice(g, p=p) for p in prob])
    levels = regions.RELIABILITY_LEVELS
    _, covered = regions.hpd_regions(prob, truth, levels)
    observed = covered.mean(0)
    tol = 3 * np.sqrt(np.array(levels) * (1 - np.array(levels)) / n) + 0.01
    assert (np.abs(observed - np.array(levels)) <= tol).all(), dict(zip(levels, observed))
    # the Gaussian ellipse is calibrated for truths drawn from the Gaussian
    cov = np.array([[4.0, 1.0], [1.0, 2.0]])
    pts = rng.multivariate_normal([0, 0], cov, size=20000)
    _, inside = regions.gaussian_regions(np.zeros((20000, 2)), np.tile(cov, (20000, 1, 1)), pts, regions.LEVELS)
    np.testing.assert_allclose(inside.mean(0), regions.LEVELS, atol=0.012)


def test_evaluate_search_regions(trained):
    """test.json's search_regions section, the compare rows and the reliability CSV on the tiny
    campaign (one-epoch model): the oracle's posterior (the true map) needs less area than the
    model's at 90 %."""
    ckpt, _ = trained
    metrics = ckpt.parent / "metrics"
    test = json.loads((metrics / "test.json").read_text())
    sr = test["search_regions"]
    assert sr["levels"] == [0.5, 0.68, 0.9, 0.95]
    keys = ["p50", "p68", "p90", "p95"]
    for method in ("model_hpd", "gaussian_ellipse", "oracle_hpd"):
        assert list(sr[method]) == keys
        cov = [sr[method][k]["coverage"] for k in keys]
        area = [sr[method][k]["median_area_km2"] for k in keys]
        assert cov == sorted(cov) and area == sorted(area) and area[0] > 0, (method, sr[method])
        if method != "gaussian_ellipse":  # HPD areas are whole cells
            cells = np.array([sr[method][k]["mean_area_km2"] for k in keys]) * test["n_test"] / sr["cell_area_km2"]
            np.testing.assert_allclose(cells, np.round(cells), atol=1e-6)
    # an ellipse's area is π·sqrt(det Σ)·χ²₂(p): the levels' areas are in the ratio of the quantiles
    q = -2 * np.log(1 - np.array(sr["levels"]))
    ell = np.array([sr["gaussian_ellipse"][k]["mean_area_km2"] for k in keys])
    np.testing.assert_allclose(ell / ell[0], q / q[0], rtol=1e-9)
    assert sr["oracle_hpd"]["p90"]["median_area_km2"] < sr["model_hpd"]["p90"]["median_area_km2"]
    model = json.loads((metrics / "compare/model.json").read_text())
    oracle = json.loads((metrics / "compare/oracle.json").read_text())
    assert model["coverage_hpd90"] == pytest.approx(sr["model_hpd"]["p90"]["coverage"], abs=1e-4)
    assert model["area_ellipse90_km2"] == pytest.approx(sr["gaussian_ellipse"]["p90"]["median_area_km2"], abs=0.06)
    assert oracle["area_hpd90_km2"] == pytest.approx(sr["oracle_hpd"]["p90"]["median_area_km2"], abs=0.06)
    assert "coverage_ellipse90" not in oracle
    modes = sr["modes"]
    assert 0 <= modes["frac_top_mode_within_5km"] <= modes["frac_any_mode_within_5km"] <= 1
    assert 1 <= modes["mean_modes_over_1pct"] <= 4 and 0 < modes["mean_top_weight"] <= 1
    assert model["frac_top_mode_within_5km"] == pytest.approx(modes["frac_top_mode_within_5km"], abs=1e-4)
    with open(ckpt.parent / "plots/evaluate/search_regions.csv") as f:
        rows = list(csv.DictReader(f))
    nominal = [float(r["nominal"]) for r in rows]
    assert nominal == list(regions.RELIABILITY_LEVELS)
    at90 = rows[nominal.index(0.9)]
    for method in ("model_hpd", "gaussian_ellipse", "oracle_hpd"):
        assert float(at90[method]) == pytest.approx(sr[method]["p90"]["coverage"])
    assert (ckpt.parent / "plots/evaluate/search_regions.png").stat().st_size > 1000


def test_grid_posterior_is_the_posterior_the_model_summarises(trained):
    """runner.grid_posterior's cell probabilities are the ones LocalizationNet.posterior summarises:
    the point estimate is the posterior mean of the mode's neighbourhood, so it lies within the
    mode radius of the most probable cell."""
    from heimdall.checkpoint import load_checkpoint
    from heimdall.data import load_features
    from heimdall.runner import estimate, grid_posterior

    ckpt, features_path = trained
    model, _ = load_checkpoint(ckpt)
    features = load_features(features_path)
    idx = features.indices("test")
    prob = np.concatenate(list(grid_posterior(model, features.input_batches(idx, batch=16))))
    assert prob.shape == (len(idx), model.grid_east_m.numel())
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-9)
    mode = prob.argmax(1)
    mean, _ = estimate(model, features.input_batches(idx))
    grid = model.grid_enu_m.double().numpy()
    dist = np.linalg.norm(mean - grid[mode], axis=1)
    assert (dist <= np.sqrt(float(model.mode_radius_m2)) + 1.0).all(), dist.max()


def test_tempered_hpd_regions_match_hpd_regions():
    """tempered_hpd_regions at τ is hpd_regions of softmax(logits / τ), for an array or batches."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (37, 200))
    logits[0, :50] = -np.inf  # impossible cells
    truth = rng.integers(-1, 200, 37)
    temps = (0.5, 1.0, 2.0)
    n_cells, covered = regions.tempered_hpd_regions(logits, truth, temps, regions.LEVELS, batch=8)
    n_b, c_b = regions.tempered_hpd_regions((logits[s:s + 10] for s in range(0, 37, 10)), truth, temps)
    assert (n_b == n_cells).all() and (c_b == covered).all()
    for i, tau in enumerate(temps):
        p = np.exp((logits - logits.max(1, keepdims=True)) / tau)
        n_ref, c_ref = regions.hpd_regions(p / p.sum(1, keepdims=True), truth, regions.LEVELS)
        assert (n_ref == n_cells[i]).all() and (c_ref == covered[i]).all(), tau


def test_choose_region_temperature_recovers_a_known_temperature():
    """Truths drawn from Gaussian posteriors whose logits were built twice too sharp (log density ×
    2, i.e. variance / 2): the chosen region temperature is 2 and the coverage after it is nominal;
    at τ = 1 the regions under-cover."""
    rng = np.random.default_rng(3)
    n, g = 2000, 300
    x = np.arange(g)
    centre = rng.uniform(100, 200, n)
    sigma = rng.uniform(5, 20, n)
    truth = np.rint(centre + sigma * rng.standard_normal(n)).astype(np.int64)
    logits = 2 * (-0.5 * ((x - centre[:, None]) / sigma[:, None]) ** 2)
    chosen = regions.choose_region_temperature(logits, truth)
    assert chosen["temperature"] == 2.0, chosen["temperature"]
    np.testing.assert_allclose(chosen["coverage"], regions.LEVELS, atol=0.03)
    at1 = next(r for r in chosen["table"] if r["temperature"] == 1.0)
    assert (np.array(at1["coverage"]) < np.array(regions.LEVELS) - 0.05).all(), at1
    assert min(r["loss"] for r in chosen["table"]) == next(
        r["loss"] for r in chosen["table"] if r["temperature"] == chosen["temperature"])
    # the same problem built twice too wide: τ = 1/2
    assert regions.choose_region_temperature(logits / 4, truth)["temperature"] == 0.5


def test_calibrate_regions_on_the_tiny_campaign(trained, tmp_path):
    """calibrate_regions (train stage) chooses a τ whose validation coverage is at least as close to
    nominal as τ = 1's, then region masses whose validation coverage is at least nominal at every
    level (conformal); the checkpoint, train.json and test.json carry the same τ and masses; a
    checkpoint written before either existed loads with τ = 1 and mass = level."""
    import torch

    from heimdall.calibration import calibrate_regions, model_grid_cells
    from heimdall.checkpoint import load_checkpoint
    from heimdall.data import load_features
    from heimdall.runner import grid_log_posterior

    ckpt, features_path = trained
    model, _ = load_checkpoint(ckpt)
    features = load_features(features_path)
    tau = float(model.region_temperature)
    train = json.loads((ckpt.parent / "metrics/train.json").read_text())["calibration"]
    test = json.loads((ckpt.parent / "metrics/test.json").read_text())["search_regions"]
    cal = test["calibration"]
    assert train["region_temperature"] == tau == cal["model_hpd"]["temperature"]
    assert cal["oracle_hpd"]["temperature"] in regions.REGION_TEMPERATURES
    mass = model.region_mass.double().numpy()[model.region_columns]
    np.testing.assert_allclose(mass, [train["region_mass"][regions.level_key(p)] for p in regions.LEVELS], atol=1e-7)
    np.testing.assert_allclose(cal["model_hpd"]["mass"], mass, atol=1e-6)
    assert (np.diff(model.region_mass.numpy()) >= 0).all()  # nested regions

    va = features.indices("val")
    truth, _ = model_grid_cells(model, features.target_enu_m[va])
    _, covered = regions.tempered_hpd_regions(grid_log_posterior(model, features.input_batches(va)), truth,
                                              [1.0, tau], regions.LEVELS)
    loss = ((covered.mean(1) - np.array(regions.LEVELS)) ** 2).sum(1)
    assert loss[1] <= loss[0] + 1e-12, (tau, covered.mean(1))
    np.testing.assert_allclose(covered[1].mean(0), [train["val_region_coverage_temperature_only"][regions.level_key(p)]
                                                    for p in regions.LEVELS])
    # with the masses: at least nominal on validation, by less than one session plus ties
    _, covered = regions.tempered_hpd_regions(grid_log_posterior(model, features.input_batches(va)), truth,
                                              [tau], model.region_mass.double().numpy())
    cov = covered[0].mean(0)
    assert (cov >= np.array(regions.RELIABILITY_LEVELS) - 1e-9).all(), cov
    all_mass, nominal = model.region_mass.numpy(), np.array(regions.RELIABILITY_LEVELS)
    assert (cov[all_mass < 1.0 - 1e-6] <= nominal[all_mass < 1.0 - 1e-6] + 2.5 / len(va)).all(), cov
    # recalibrating from τ = 1 chooses the same τ (the posterior it tempers does not depend on τ)
    model.region_temperature.fill_(1.0)
    assert calibrate_regions(model, features)["region_temperature"] == tau == float(model.region_temperature)

    payload = torch.load(ckpt, weights_only=True)
    del payload["state_dict"]["region_temperature"], payload["state_dict"]["region_mass"]
    torch.save(payload, tmp_path / "old.ckpt")
    old, _ = load_checkpoint(tmp_path / "old.ckpt")
    assert float(old.region_temperature) == 1.0
    np.testing.assert_allclose(old.region_mass.numpy(), regions.RELIABILITY_LEVELS)


def test_hpd_membership_is_the_hpd_set():
    """hpd_membership marks the cells hpd_regions counts (ties inside), and the truth's cell exactly
    when hpd_regions says the truth is covered."""
    rng = np.random.default_rng(4)
    prob = np.vstack([two_mode_posterior(), rng.dirichlet(np.full(100, 0.3), 7)])
    truth = rng.integers(-1, 100, len(prob))
    levels = (0.5, 0.68, 0.9, 0.95)
    member = regions.hpd_membership(prob, levels)
    n_cells, covered = regions.hpd_regions(prob, truth, levels)
    assert (member.sum(2) == n_cells).all()
    inside = member[np.arange(len(prob)), :, np.maximum(truth, 0)] & (truth >= 0)[:, None]
    assert (inside == covered).all()
    assert member[0, 0].nonzero()[0].tolist() == list(range(10))  # mode A is the 50 % region
    # each region is the most probable cells: every cell inside is at least as probable as any outside
    for i in range(len(prob)):
        for j in range(len(levels)):
            assert prob[i][member[i, j]].min() > prob[i][~member[i, j]].max(initial=-1.0)


def test_search_region_map_draws_the_hpd_cells(tmp_path):
    """write_search_region_map writes the PNG, and the cells it fills are exactly the 50 % / 90 % HPD
    regions (regions.hpd_membership / hpd_regions); deterministic bytes; no grid: ellipses only."""
    from heimdall.plots import MAP_LEVELS, map_sessions, write_search_region_map

    n_east, n_north, spacing = 30, 20, 1000.0
    grid = (-15000.0, -10000.0, spacing, n_east, n_north)
    ee, nn = np.meshgrid(grid[0] + np.arange(n_east) * spacing, grid[1] + np.arange(n_north) * spacing)
    cells = np.stack([ee.ravel(), nn.ravel()], 1)
    rng = np.random.default_rng(5)
    k = 6
    target = rng.uniform([-12000, -8000], [12000, 8000], (k, 2))
    prob = np.empty((k, len(cells)))
    for j in range(k):  # two modes: one at the truth, a weaker one elsewhere
        other = rng.uniform([-12000, -8000], [12000, 8000])
        d1 = ((cells - target[j]) ** 2).sum(1) / (2 * 2000.0**2)
        d2 = ((cells - other) ** 2).sum(1) / (2 * 1500.0**2)
        prob[j] = np.exp(-d1) + 0.5 * np.exp(-d2) + 1e-9
    prob /= prob.sum(1, keepdims=True)
    mean = target + rng.normal(0, 1000, (k, 2))
    cov = np.tile(np.diag([4e6, 9e6]), (k, 1, 1))
    rx = np.array([[-10000.0, 0, 0], [10000, 5000, 0], [0, -9000, 0]])
    png, layers = write_search_region_map(tmp_path, prob, grid, np.arange(k), target, mean, cov, rx, ["a", "b", "c"])
    assert png == tmp_path / "search_regions_map.png" and png.stat().st_size > 10_000
    member = regions.hpd_membership(prob, MAP_LEVELS)
    assert layers.shape == (k, n_north, n_east)
    for i, _ in enumerate(MAP_LEVELS):  # layer value ≥ i + 1 <=> inside the (i+1)-th largest region
        assert ((layers.reshape(k, -1) >= len(MAP_LEVELS) - i) == member[:, i]).all()
    truth_cell = regions.grid_cell_index(target, grid[0], grid[1], spacing, n_east, n_north)
    n_cells, covered = regions.hpd_regions(prob, truth_cell, MAP_LEVELS)
    assert ((layers.reshape(k, -1)[:, None, :] >= np.array([2, 1])[None, :, None]).sum(2) == n_cells).all()
    assert (layers.reshape(k, -1)[np.arange(k), truth_cell] >= 1).tolist() == covered[:, 1].tolist()
    first = png.read_bytes()
    write_search_region_map(tmp_path, prob, grid, np.arange(k), target, mean, cov, rx, ["a", "b", "c"])
    assert png.read_bytes() == first
    _, none = write_search_region_map(tmp_path / "nogrid", None, None, np.arange(2), target[:2], mean[:2], cov[:2],
                                      rx, ["a", "b", "c"])
    assert none is None and (tmp_path / "nogrid/search_regions_map.png").exists()
    # the drawn sessions: fixed, distinct, within the split
    assert map_sessions(900).tolist() == map_sessions(900).tolist() and len(set(map_sessions(900))) == 6
    assert map_sessions(4).tolist() == [0, 1, 2, 3]


def test_evaluate_draws_the_calibrated_regions_of_a_few_sessions(trained):
    """The evaluate stage keeps the drawn sessions' calibrated probabilities and modes from its one
    pass over the posterior: they equal runner.grid_posterior (τ = the model's region temperature)
    for those sessions, and search_regions_map.png is written."""
    from heimdall.checkpoint import load_checkpoint
    from heimdall.data import load_features
    from heimdall.plots import map_sessions
    from heimdall.runner import estimate, grid_posterior
    from heimdall.stages.evaluate import search_regions

    ckpt, features_path = trained
    assert (ckpt.parent / "plots/evaluate/search_regions_map.png").stat().st_size > 10_000
    model, _ = load_checkpoint(ckpt)
    features = load_features(features_path)
    te = features.indices("test")
    mean, cov = estimate(model, features.input_batches(te))
    shown = map_sessions(len(te))
    _, _, drawn = search_regions(model, features, te, mean, cov, None, shown)
    kept = drawn["probabilities"]
    assert sorted(kept) == shown.tolist()
    expected = np.concatenate(list(grid_posterior(model, features.input_batches(te[shown]))))
    # model.locate's float32 softmax vs grid_posterior's float64 one
    np.testing.assert_allclose(np.stack([kept[int(r)] for r in shown]), expected, rtol=2e-4, atol=1e-9)
    weight, mode_mean = drawn["modes"]
    assert weight.shape == (len(te), 4) and mode_mean.shape == (len(te), 4, 2)


def test_conformal_masses_calibrate_every_level_where_one_temperature_cannot():
    """Posteriors of the right width but, for 40 % of sessions, with a second, wrong mode 3× as
    probable as the right one (a mis-specified mixture): no single τ is calibrated at every level
    (best loss 0.0145: 0.47 / 0.76 / 0.97 / 0.99), while the conformal masses chosen on one half of the
    sessions cover each level on the other half within ±0.03; masses increase with the level."""
    rng = np.random.default_rng(5)
    n, g = 4000, 400
    x = np.arange(g)
    centre = rng.uniform(80, 320, n)
    decoy = np.where(rng.random(n) < 0.4, centre + rng.choice([-60, 60], n), np.nan)
    truth = np.rint(centre + 6 * rng.standard_normal(n)).astype(np.int64)
    dens = np.exp(-0.5 * ((x - centre[:, None]) / 6) ** 2)
    dens += 3.0 * np.nan_to_num(np.exp(-0.5 * ((x - decoy[:, None]) / 6) ** 2))
    logits = np.log(dens + 1e-300)
    cal, held = slice(0, n // 2), slice(n // 2, n)
    chosen = regions.choose_region_temperature(logits[cal], truth[cal])
    assert min(r["loss"] for r in chosen["table"]) > 0.01, chosen["coverage"]
    levels = np.array(regions.LEVELS)
    mass = regions.conformal_masses(logits[cal], truth[cal], chosen["temperature"], levels)
    assert (np.diff(mass) > 0).all() and (mass <= 1).all()
    _, covered = regions.tempered_hpd_regions(logits[held], truth[held], [chosen["temperature"]], mass)
    np.testing.assert_allclose(covered[0].mean(0), levels, atol=0.03)
    # on the calibration half itself: at least nominal, by less than 1/n (plus ties)
    _, covered = regions.tempered_hpd_regions(logits[cal], truth[cal], [chosen["temperature"]], mass)
    assert (covered[0].mean(0) >= levels).all() and (covered[0].mean(0) <= levels + 2 / (n // 2)).all()
    # truths outside the grid are never covered: with half of them outside, levels above 50 % need the whole grid
    outside = truth.copy()
    outside[::2] = -1
    assert regions.conformal_masses(logits, outside, 1.0, [0.9])[0] == 1.0
