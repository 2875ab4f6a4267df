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
from heimdall.data import INPUT_NAMES, load_features
from heimdall.errors import HeimdallError
from heimdall.params import load_params
from heimdall.stages import export_onnx, train

def test_export_succeeds_and_parity_holds(exported, trained):
    path, metrics, summary = exported
    fs = load_features(trained[1])
    assert summary["exporter"] == "dynamo" and metrics["exporter"] == "dynamo"
    assert metrics["parity"]["n_sessions"] == len(fs.indices("test"))  # the whole test split
    assert 0 <= metrics["max_abs_diff"] <= metrics["max_abs_diff_threshold"] == 1e-4
    assert metrics["parity"]["geodesy_max_err_deg"] <= export_onnx.GEODESY_TOL_DEG
    assert metrics["size_bytes"] == path.stat().st_size > 0
    for key in ("p50_latency_ms_batch1", "p99_latency_ms_batch1", "torch_p50_latency_ms_batch1",
                "batch64_throughput_sessions_per_s"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temp files left


@pytest.mark.parametrize("batch", [1, 5])
def test_named_outputs_dynamic_batch_match_torch(exported, trained, batch):
    path, _, _ = exported
    session, _ = export_onnx.load_onnx_session(path)
    assert tuple(i.name for i in session.get_inputs()) == INPUT_NAMES
    assert tuple(o.name for o in session.get_outputs()) == export_onnx.OUTPUT_NAMES
    model, _ = train.load_checkpoint(trained[0])
    fs = load_features(trained[1])
    inputs = fs.model_inputs(fs.indices("test")[:batch])
    pos, cov, latlon = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    assert pos.shape == (batch, 2) and cov.shape == (batch, 2, 2) and latlon.shape == (batch, 2)
    assert pos.dtype == np.float32 and cov.dtype == np.float32 and latlon.dtype == np.float64
    with torch.no_grad():
        ref_pos, ref_cov = (t.numpy() for t in model(*inputs))
    assert np.abs(pos - ref_pos).max() < 0.1  # metres
    assert (np.abs(cov - ref_cov).max((1, 2)) / np.abs(ref_cov).max((1, 2))).max() < 1e-4


def test_metadata(exported, trained):
    path, _, _ = exported
    _, meta = export_onnx.load_onnx_session(path)
    fs = load_features(trained[1])
    assert meta["format"] == export_onnx.ONNX_FORMAT
    assert meta["git_commit"] == FAST["commit"] and meta["params_hash"] == FAST["params_hash"]
    assert [r["name"] for r in meta["receivers"]] == list(fs.receiver_names)
    assert [r["receiver_id"] for r in meta["receivers"]] == list(range(fs.n_receivers))
    np.testing.assert_allclose([[r["latitude_deg"], r["longitude_deg"], r["altitude_m"]] for r in meta["receivers"]],
                               fs.receiver_latlon)
    assert (meta["origin"]["latitude_deg"], meta["origin"]["longitude_deg"], meta["origin"]["altitude_m"]) == fs.origin
    assert set(meta["normalization"]) == set(fs.normalization)
    np.testing.assert_allclose(meta["normalization"]["logmel_mean_db"], fs.normalization["logmel_mean_db"])
    assert meta["model_config"]["d_model"] == 16 and meta["model_config"]["n_receivers"] == fs.n_receivers
    assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
    assert [o["name"] for o in meta["outputs"]] == list(export_onnx.OUTPUT_NAMES)
    assert all(d["unit"] and d["description"] for d in meta["inputs"] + meta["outputs"])
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
    session, meta = export_onnx.load_onnx_session(path)
    fs = load_features(trained[1])
    inputs = fs.model_inputs(fs.indices("test"))
    pos, _, latlon = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    origin = fs.origin
    ref = export_onnx.ground_latlon(pos[:, 0], pos[:, 1], origin)
    assert np.abs(latlon - ref).max() < 1e-7
    # and the other way round: geo's forward transform of the graph's lat/lon (at h = 0) is its ENU output
    e, n, _ = geo.geodetic_to_enu(latlon[:, 0], latlon[:, 1], np.zeros(len(latlon)), origin)
    assert np.abs(np.stack([e, n], 1) - pos.astype(np.float64)).max() < 1e-6


def test_geodesy_module_over_a_wide_area():
    origin = (44.97, 8.153, 0.0)
    rng = np.random.default_rng(0)
    lat, lon = origin[0] + rng.uniform(-3, 3, 5000), origin[1] + rng.uniform(-4, 4, 5000)
    e, n, _ = geo.geodetic_to_enu(lat, lon, np.zeros_like(lat), origin)
    out = export_onnx.EnuToGeodetic(origin)(torch.from_numpy(np.stack([e, n], 1))).numpy()
    assert np.abs(out - np.stack([lat, lon], 1)).max() < 1e-9


def test_planar_refinement_matches_model_refine(trained):
    """PlanarRefinement re-expresses LocalizationNet.refine for onnxruntime: fails when model.py drifts."""
    model, _ = train.load_checkpoint(trained[0])
    fs = load_features(trained[1])
    inputs = fs.model_inputs(fs.indices("test"))
    with torch.no_grad():
        prior = model.network_metric(*inputs)
        ref_pos, ref_cov = model.refine(*prior, inputs[1], inputs[3], inputs[5])
        pos, cov = export_onnx.PlanarRefinement(model)(*prior, inputs[1], inputs[3], inputs[5])
    assert (pos - ref_pos).abs().max() < 0.1
    assert ((cov - ref_cov).abs().amax((1, 2)) / ref_cov.abs().amax((1, 2))).max() < 1e-4


def test_load_onnx_session_rejects_other_files(tmp_path):
    with pytest.raises(HeimdallError, match="not found"):
        export_onnx.load_onnx_session(tmp_path / "missing.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    with pytest.raises(HeimdallError, match="not a Heimdall"):
        export_onnx.load_onnx_session(tmp_path / "other.onnx")
