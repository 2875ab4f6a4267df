"""Loading an exported model with onnxruntime: what ``heimdall predict`` and the parity gate use.

Imports only onnxruntime and json at run time (no torch, no Lightning): loading a model for one
prediction must stay cheap (docs/inference.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from heimdall.contracts import INPUT_NAMES, OUTPUT_NAMES
from heimdall.errors import HeimdallError

ONNX_FORMAT = "heimdall.localization-net.onnx"
# 2: search regions and modes (cell_probability ... mode_latlon), metadata 'grid' and 'regions'
ONNX_FORMAT_VERSION = 2
# the graph's lat/lon vs heimdall.geo from its own ENU output (parity gate; recorded in the metadata)
GEODESY_TOL_DEG = 1e-7
# metadata_props keys whose values are JSON documents (the others are plain strings)
JSON_METADATA_KEYS = ("origin", "receivers", "normalization", "model_config", "frontend", "inputs", "outputs",
                      "parity", "grid", "regions")


def make_session(model: bytes | str | Path, intra_op_threads: int | None = None, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=list(providers))


def load_onnx_session(path: str | Path, *, intra_op_threads: int | None = None,
                      providers: Sequence[str] = ("CPUExecutionProvider",)):
    """Open an exported model -> (onnxruntime.InferenceSession, metadata dict).

    The metadata's JSON entries (``origin``, ``receivers``, ``normalization``, ``model_config``,
    ``inputs``, ``outputs``, ``parity``) are decoded; the rest (``format``, ``params_hash``,
    ``checkpoint_md5``, ``exporter``...) stay strings. Feed the session a dict of the
    six inputs (numpy, dtypes as in ``metadata["inputs"]``); ``receiver_id`` indexes
    ``metadata["receivers"]``. Raises HeimdallError for a missing or non-Heimdall file.
    """
    path = Path(path)
    if not path.exists():
        raise HeimdallError(f"{path}: ONNX model not found (run the export_onnx stage first)")
    try:
        session = make_session(path, intra_op_threads, providers)
    except Exception as e:  # noqa: BLE001
        raise HeimdallError(f"{path}: not a loadable ONNX model: {str(e).strip().splitlines()[0]}") from None
    raw = dict(session.get_modelmeta().custom_metadata_map)
    if raw.get("format") != ONNX_FORMAT:
        raise HeimdallError(f"{path}: not a Heimdall LocalizationNet ONNX model (metadata 'format' missing)")
    if raw.get("format_version") != str(ONNX_FORMAT_VERSION):
        raise HeimdallError(f"{path}: unsupported format_version {raw.get('format_version')!r} "
                            f"(this heimdall reads {ONNX_FORMAT_VERSION})")
    meta: dict = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v) if k in JSON_METADATA_KEYS else v
        except json.JSONDecodeError:
            raise HeimdallError(f"{path}: metadata '{k}' is not valid JSON") from None
    names = tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())
    if names != (INPUT_NAMES, OUTPUT_NAMES):
        raise HeimdallError(f"{path}: unexpected graph signature {names}")
    return session, meta
