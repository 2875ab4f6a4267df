"""Stage export_onnx: models/model.ckpt -> one self-contained ONNX file, verified and benchmarked.

Trace (heimdall.export.graph), check, gate on parity with the PyTorch model over the whole test
split (heimdall.export.parity), measure latency (heimdall.export.latency), and only then write the
file (atomic rename). Everything a consumer needs travels in the graph's ``metadata_props``
(heimdall.export.runtime.load_onnx_session; docs/inference.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from heimdall.atomic import atomic_path, md5_file, write_json
from heimdall.checkpoint import check_features_match, load_checkpoint
from heimdall.contracts import INPUT_NAMES, OUTPUT_NAMES
from heimdall.budget import check_features_file
from heimdall.data import load_features
from heimdall.errors import HeimdallError
from heimdall.export.graph import (
    DEFAULT_OPSET,
    ExportModule,
    build_metadata,
    export_graph,
    set_metadata,
    simplify_graph,
    strip_debug_info,
)
from heimdall.export.latency import benchmark
from heimdall.export.parity import GATED, parity
from heimdall.export.runtime import GEODESY_TOL_DEG, make_session

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# post-export graph pass: edits the ModelProto in place and/or returns a replacement
GraphTransform = Callable[["onnx.ModelProto"], "onnx.ModelProto | None"]


def run(ckpt_path: str | Path, features_path: str | Path, onnx_path: str | Path, metrics_path: str | Path, *,
        params_hash: str, opset: int = DEFAULT_OPSET, max_abs_diff: float = 1e-4,
        latency_runs: int = 300, warmup_runs: int = 20, throughput_batch: int = 64, throughput_runs: int = 10,
        verify_batch: int = 128, graph_transform: GraphTransform | None = None) -> dict:
    """Export ``ckpt_path`` to ``onnx_path``, verify it on the whole test split of ``features_path``
    against the PyTorch model, benchmark it, and write ``metrics_path`` (JSON).

    ``graph_transform`` (optional) is applied to the finished ModelProto before checking and
    verification: the hook for post-export graph passes (quantisation, fusion, surgery), each of which
    must then pass the same parity gate — and the way tests prove the gate catches a broken graph.
    Raises HeimdallError, writing nothing, if any step or the gate fails.
    """
    import onnx

    t0 = time.perf_counter()
    ckpt_path, features_path = Path(ckpt_path), Path(features_path)
    onnx_path, metrics_path = Path(onnx_path), Path(metrics_path)
    if not (max_abs_diff > 0 and math.isfinite(max_abs_diff)):
        raise HeimdallError(f"export_onnx.max_abs_diff: must be a positive number, got {max_abs_diff}")
    if latency_runs < 1 or throughput_runs < 1 or throughput_batch < 1 or verify_batch < 1 or warmup_runs < 0:
        raise HeimdallError("export_onnx: latency_runs, throughput_runs, throughput_batch and verify_batch must be "
                            ">= 1 (warmup_runs >= 0)")

    model, payload = load_checkpoint(ckpt_path)
    check_features_file(features_path, "export_onnx")
    features = load_features(features_path)
    check_features_match(payload, model, features, features_path)
    test_idx = features.indices("test")
    if len(test_idx) == 0:  # a production run (heimdall.splits): parity is a property of the graph, not of
        test_idx = features.indices("val")  # held-out data; check it on the validation sessions
        log.info("no test split (a production run): parity and latency on the %d validation sessions", len(test_idx))
    module = ExportModule(model, payload["origin"]).eval()

    # 1. trace -> clean -> simplify -> describe (-> optional transform) -> check
    t = time.perf_counter()
    example = features.model_inputs(np.resize(test_idx, 2))  # batch 2: keeps the batch axis symbolic
    proto = export_graph(module, example, opset)
    timings = {"export_s": time.perf_counter() - t}
    strip_debug_info(proto)
    proto = simplify_graph(proto)
    strip_debug_info(proto)
    set_metadata(proto, build_metadata(model, payload, features, params_hash=params_hash,
                                       checkpoint_md5=md5_file(ckpt_path), max_abs_diff=max_abs_diff))
    if graph_transform is not None:
        proto = graph_transform(proto) or proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"onnx.checker rejected the exported graph: {str(e).strip().splitlines()[0]}") from None
    names = tuple(i.name for i in proto.graph.input), tuple(o.name for o in proto.graph.output)
    if names != (INPUT_NAMES, OUTPUT_NAMES):
        raise HeimdallError(f"exported graph signature {names} != {(INPUT_NAMES, OUTPUT_NAMES)}")
    blob = proto.SerializeToString(deterministic=True)

    # 2. the parity gate (whole test split, batched)
    t = time.perf_counter()
    try:
        session = make_session(blob)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"onnxruntime cannot load the exported graph: {str(e).strip().splitlines()[0]}") from None
    diffs = parity(session, model, module.geodetic, features, test_idx, payload["origin"], verify_batch)
    timings["verify_s"] = time.perf_counter() - t
    log.info("parity on %d test sessions: position %.3g m, covariance %.3g rel, lat/lon %.3g deg, geodesy %.3g deg",
             diffs["n_sessions"], diffs["position_m"], diffs["covariance_rel"], diffs["latlon_deg"],
             diffs["geodesy_max_err_deg"])
    if not diffs["max_abs_diff"] <= max_abs_diff:
        raise HeimdallError(
            f"ONNX parity failed on {diffs['n_sessions']} test sessions: max difference {diffs['max_abs_diff']:.3g} > "
            f"{max_abs_diff:g} ({', '.join(f'{k} {diffs[k]:.3g}' for k in GATED if diffs[k] > max_abs_diff)}); "
            "nothing written")
    if not diffs["geodesy_max_err_deg"] <= GEODESY_TOL_DEG:
        raise HeimdallError(f"ONNX lat/lon differs from heimdall.geo by {diffs['geodesy_max_err_deg']:.3g} deg "
                            f"> {GEODESY_TOL_DEG:g}; nothing written")

    # 3. benchmarks
    t = time.perf_counter()
    bench = benchmark(blob, model, features, test_idx, runs=latency_runs, warmup=warmup_runs,
                      throughput_batch=throughput_batch, throughput_runs=throughput_runs)
    timings["benchmark_s"] = time.perf_counter() - t

    # 4. outputs
    with atomic_path(onnx_path) as tmp:
        tmp.write_bytes(blob)
    # The DVC-tracked metrics hold what is a property of the file: the gate's result (differences
    # rounded to 2 significant digits: their last bits depend on the CPU's SIMD kernels in
    # onnxruntime), size, digest, opset. Latencies are measurements of this machine: timings file.
    metrics = {
        "max_abs_diff": _round_sig(diffs["max_abs_diff"]),
        "max_abs_diff_threshold": max_abs_diff,
        "parity": {k: (_round_sig(v) if isinstance(v, float) else v) for k, v in diffs.items()},
        "size_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "opset": opset,
        "n_nodes": len(proto.graph.node),
    }
    write_json(metrics_path, metrics)
    timings["wall_time_s"] = time.perf_counter() - t0
    write_json(Path(metrics_path).with_suffix(".timings.json"), {**bench, **timings})
    return {"onnx": str(onnx_path), "size_bytes": len(blob), "max_abs_diff": diffs["max_abs_diff"],
            "p50_latency_ms_batch1": bench["p50_latency_ms_batch1"],
            "torch_p50_latency_ms_batch1": bench["torch_p50_latency_ms_batch1"]}


def _round_sig(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits}g}")
