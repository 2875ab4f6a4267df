"""Stage export_onnx on a tiny trained model: parity gate, named outputs with a dynamic batch,
metadata, byte-identical re-export, a tampered graph failing the gate, in-graph geodesy vs heimdall.geo."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import FAST_EXPORT as FAST
from heimdall import geo
from heimdall.checkpoint import load_checkpoint
from heimdall.contracts import INPUT_NAMES, OUTPUT_NAMES
from heimdall.data import load_features
from heimdall.errors import HeimdallError
from heimdall.export.graph import EnuToGeodetic
from heimdall.export.parity import ground_latlon
from heimdall.export.runtime import GEODESY_TOL_DEG, ONNX_FORMAT, load_onnx_session
from heimdall.stages import export_onnx

def test_export_succeeds_and_parity_holds(exported, trained):
    path, metrics, summary = exported
    fs = load_features(trained[1])
    assert metrics["parity"]["n_sessions"] == len(fs.indices("test"))  # the whole test split
    assert 0 <= metrics["max_abs_diff"] <= metrics["max_abs_diff_threshold"] == 1e-4
    assert metrics["parity"]["geodesy_max_err_deg"] <= GEODESY_TOL_DEG
    assert metrics["size_bytes"] == path.stat().st_size > 0
    # latencies are measurements of this machine: beside the DVC-tracked metrics, not in them
    timings = json.loads(path.parent.joinpath("metrics/export.timings.json").read_text())
    for key in ("p50_latency_ms_batch1", "p99_latency_ms_batch1", "torch_p50_latency_ms_batch1",
                "batch64_throughput_sessions_per_s"):
        assert key not in metrics and np.isfinite(timings[key]) and timings[key] > 0, key
    assert summary["p50_latency_ms_batch1"] == timings["p50_latency_ms_batch1"]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temp files left


@pytest.mark.parametrize("batch", [1, 5])
def test_named_outputs_dynamic_batch_match_torch(exported, trained, batch):
    path, _, _ = exported
    session, _ = load_onnx_session(path)
    assert tuple(i.name for i in session.get_inputs()) == INPUT_NAMES
    assert tuple(o.name for o in session.get_outputs()) == OUTPUT_NAMES
    model, _ = load_checkpoint(trained[0])
    fs = load_features(trained[1])
    inputs = fs.model_inputs(fs.indices("test")[:batch])
    pos, cov, latlon, prob, weight, mode, mode_cov, mode_latlon = session.run(
        None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    g = model.grid_east_m.numel()
    assert pos.shape == (batch, 2) and cov.shape == (batch, 2, 2) and latlon.shape == (batch, 2)
    assert prob.shape == (batch, g) and weight.shape == (batch, 4) and mode.shape == (batch, 4, 2)
    assert mode_cov.shape == (batch, 4, 2, 2) and mode_latlon.shape == (batch, 4, 2)
    assert pos.dtype == np.float32 and cov.dtype == np.float32 and latlon.dtype == np.float64
    assert prob.dtype == np.float32 and mode_latlon.dtype == np.float64
    with torch.no_grad():
        ref_pos, ref_cov = (t.numpy() for t in model(*inputs))
        ref = [t.numpy() for t in model.locate(*inputs)]
    assert np.abs(pos - ref_pos).max() < 0.1  # metres
    assert (np.abs(cov - ref_cov).max((1, 2)) / np.abs(ref_cov).max((1, 2))).max() < 1e-4
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    assert np.abs(prob - ref[2]).max() < 1e-6 and np.abs(weight - ref[3]).max() < 1e-5
    assert np.abs(mode - ref[4]).max() < 0.1
    assert (np.diff(weight, axis=1) <= 0).all() and (weight.sum(1) <= 1 + 1e-5).all()
    # forward's point estimate and locate's are the same numbers (one posterior, two summaries)
    np.testing.assert_array_equal(ref[0], ref_pos)


def test_metadata(exported, trained):
    path, _, _ = exported
    _, meta = load_onnx_session(path)
    fs = load_features(trained[1])
    assert meta["format"] == ONNX_FORMAT
    assert meta["params_hash"] == FAST["params_hash"] and "git_commit" not in meta  # the file is content only
    assert meta["checkpoint_md5"] == __import__("hashlib").md5(trained[0].read_bytes()).hexdigest()
    assert [r["name"] for r in meta["receivers"]] == list(fs.receiver_names)
    assert [r["receiver_id"] for r in meta["receivers"]] == list(range(fs.n_receivers))
    np.testing.assert_allclose([[r["latitude_deg"], r["longitude_deg"], r["altitude_m"]] for r in meta["receivers"]],
                               fs.receiver_latlon)
    assert (meta["origin"]["latitude_deg"], meta["origin"]["longitude_deg"], meta["origin"]["altitude_m"]) == fs.origin
    assert set(meta["normalization"]) == set(fs.normalization)
    np.testing.assert_allclose(meta["normalization"]["logmel_mean_db"], fs.normalization["logmel_mean_db"])
    assert meta["model_config"]["d_model"] == 16 and meta["model_config"]["n_receivers"] == fs.n_receivers
    assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUT_NAMES)
    assert all(d["unit"] and d["description"] for d in meta["inputs"] + meta["outputs"])
    # the grid and the region masses: enough to turn cell_probability into the calibrated regions
    model, _ = load_checkpoint(trained[0])
    grid = meta["grid"]
    assert grid["n_east"] * grid["n_north"] == model.grid_east_m.numel()
    col, row = np.arange(model.grid_east_m.numel()) % grid["n_east"], np.arange(model.grid_east_m.numel()) // grid["n_east"]
    np.testing.assert_allclose(grid["east0_m"] + col * grid["spacing_m"], model.grid_east_m.numpy(), atol=0.5)
    np.testing.assert_allclose(grid["north0_m"] + row * grid["spacing_m"], model.grid_north_m.numpy(), atol=0.5)
    assert meta["regions"]["levels"] == [0.5, 0.68, 0.9, 0.95]
    np.testing.assert_allclose(meta["regions"]["mass"], model.region_mass.numpy()[model.region_columns], rtol=1e-7)
    assert meta["regions"]["temperature"] == pytest.approx(float(model.region_temperature))
    # no machine-specific paths (the exporter records stack traces with absolute source paths)
    blob = path.read_bytes()
    for needle in (str(path.parent), str(trained[0].parent), "/home/", "/root/", "/tmp/", ".py\""):
        assert needle.encode() not in blob, needle


def _scale_largest_initializer(model: onnx.ModelProto) -> None:
    """Tamper: scale the largest float32 weight by 1.01 (what a bad graph pass could do)."""
    init = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
               key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(init) * np.float32(1.01)
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))


@pytest.fixture(scope="module")
def second_export(trained, tmp_path_factory):
    """A second export of the same checkpoint whose graph is tampered with before verification.

    One export serves two tests (each dynamo export costs ~10 s): the ``graph_transform`` hook records
    the finished graph's bytes — exactly what the stage writes (``SerializeToString(deterministic=True)``)
    — then corrupts it, so the parity gate must fail the stage.
    """
    out = tmp_path_factory.mktemp("tampered") / "models"
    seen: list[bytes] = []

    def record_then_tamper(model: onnx.ModelProto) -> onnx.ModelProto:
        seen.append(model.SerializeToString(deterministic=True))
        _scale_largest_initializer(model)
        return model

    with pytest.raises(HeimdallError) as err:
        export_onnx.run(*trained, out / "model.onnx", out / "export.json", graph_transform=record_then_tamper, **FAST)
    return seen[0], err.value, out


def test_two_exports_are_byte_identical(exported, second_export):
    path, _, _ = exported
    untampered, _, _ = second_export
    assert untampered == path.read_bytes()


def test_tampered_graph_fails_the_gate(second_export):
    _, err, out = second_export
    assert "parity failed" in str(err) and len(str(err).splitlines()) == 1
    assert not (out / "model.onnx").exists() and not (out / "export.json").exists()
    assert not out.exists() or not any(out.iterdir())  # no temp files either


def test_latlon_output_matches_heimdall_geo(exported, trained):
    path, _, _ = exported
    session, meta = load_onnx_session(path)
    fs = load_features(trained[1])
    inputs = fs.model_inputs(fs.indices("test"))
    out = dict(zip(OUTPUT_NAMES, session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})))
    pos, latlon = out["position_enu_m"], out["position_latlon"]
    origin = fs.origin
    ref = ground_latlon(pos[:, 0], pos[:, 1], origin)
    assert np.abs(latlon - ref).max() < 1e-7
    mode = out["mode_enu_m"].reshape(-1, 2)
    ref = ground_latlon(mode[:, 0], mode[:, 1], origin)
    assert np.abs(out["mode_latlon"].reshape(-1, 2) - ref).max() < 1e-7
    # and the other way round: geo's forward transform of the graph's lat/lon (at h = 0) is its ENU output
    e, n, _ = geo.geodetic_to_enu(latlon[:, 0], latlon[:, 1], np.zeros(len(latlon)), origin)
    assert np.abs(np.stack([e, n], 1) - pos.astype(np.float64)).max() < 1e-6


def test_geodesy_module_over_a_wide_area():
    origin = (44.97, 8.153, 0.0)
    rng = np.random.default_rng(0)
    lat, lon = origin[0] + rng.uniform(-3, 3, 5000), origin[1] + rng.uniform(-4, 4, 5000)
    e, n, _ = geo.geodetic_to_enu(lat, lon, np.zeros_like(lat), origin)
    out = EnuToGeodetic(origin)(torch.from_numpy(np.stack([e, n], 1))).numpy()
    assert np.abs(out - np.stack([lat, lon], 1)).max() < 1e-9


def test_refinement_cost_matches_its_definition_in_float64(trained):
    """The exported refinement is the model's own (nothing re-expresses it): check the model's
    likelihood cost against its definition, evaluated independently in float64 at a few cells:
    min over the TX power P of Σ_i (rss_i − P − m_i(x))² / σ_i² plus the soft power prior."""
    model, _ = load_checkpoint(trained[0])
    fs = load_features(trained[1])
    idx = fs.indices("test")[:4]
    logmel, rss, snr, present, has_iq, rid = fs.model_inputs(idx)
    with torch.no_grad():
        cost = model.likelihood_cost(rss, present, rid).double().numpy()
    m = model.map_mean_db.double().numpy()
    sigma = model.map_sigma_db.double().numpy()
    lo, hi = model.power_range_dbm.double().numpy()
    cells = np.random.default_rng(0).choice(m.shape[1], 16, replace=False)
    for b in range(len(idx)):
        use = present[b].numpy() > 0
        y, w = rss[b].double().numpy()[use], 1.0 / sigma[use] ** 2
        for g in cells:
            resid = y - m[use, g]
            p = np.sum(w * resid) / np.sum(w)
            expected = np.sum(w * (resid - p) ** 2) + (max(lo - p, 0.0, p - hi) / 3.0) ** 2
            assert cost[b, g] == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_load_onnx_session_rejects_other_files(tmp_path):
    with pytest.raises(HeimdallError, match="not found"):
        load_onnx_session(tmp_path / "missing.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    with pytest.raises(HeimdallError, match="not a Heimdall"):
        load_onnx_session(tmp_path / "other.onnx")


def test_near_tie_best_cell_is_accepted_only_within_float32_rounding(trained, monkeypatch):
    """Where the graph's position is not the model's, the gate compares it with the model's summary
    around another cell only if that cell's logit is within NEAR_TIE_REL of the best (a float32
    near-tie: measured once in 1,045 POWDER sessions). With no tolerance a graph answering at the least
    probable cell keeps the model's reference (so the gate fails); with every cell "tied" the
    reference follows the cell nearest to the graph's answer."""
    from heimdall.export import parity as P

    ckpt, features_path = trained
    model, _ = load_checkpoint(ckpt)
    fs = load_features(features_path)
    inputs = fs.model_inputs(fs.indices("test")[:8])
    with torch.no_grad():
        pos, cov, prob = (t.double().numpy() for t in model.locate(*inputs)[:3])
    worst = model.grid_enu_m.double().numpy()[prob.argmin(1)]  # a graph answering at the worst cell
    ref_pos, ref_cov = pos.copy(), cov.copy()
    monkeypatch.setattr(P, "NEAR_TIE_REL", 0.0)
    with torch.no_grad():
        assert P._near_tie_reference(model, inputs, worst, ref_pos, ref_cov) == 0
        assert P._near_tie_reference(model, inputs, pos, ref_pos, ref_cov) == 0  # agreeing: nothing to do
    np.testing.assert_array_equal(ref_pos, pos)
    monkeypatch.setattr(P, "NEAR_TIE_REL", 1e9)
    with torch.no_grad():
        assert P._near_tie_reference(model, inputs, worst, ref_pos, ref_cov) == 8
    radius = float(model.mode_radius_m2) ** 0.5
    assert np.all(np.linalg.norm(ref_pos - worst, axis=1) <= radius)
    assert np.all(np.linalg.eigvalsh(ref_cov) > 0)
