"""``heimdall <verb>``: one verb per pipeline stage (dvc.yaml calls these), plus helpers.

Errors in the user's input or environment print one line and exit 1; Ctrl-C exits 130.
Either way a stage leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

# Nothing phones home: set before dvc / mlflow are imported anywhere in this process.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

from heimdall import __version__  # noqa: E402
from heimdall.errors import HeimdallError  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def _cmd_export_sessions(args) -> dict:
    from heimdall.params import load_params
    from heimdall.stages import export_sessions

    return export_sessions.run(load_params(args.params), args.out, progress=not args.no_progress)


def _cmd_extract_features(args) -> dict:
    from heimdall.params import load_params
    from heimdall.stages import extract_features

    return extract_features.run(load_params(args.params), args.sessions, args.out, progress=not args.no_progress)


def _cmd_train(args) -> dict:
    from heimdall.params import load_params
    from heimdall.stages import train

    return train.run(load_params(args.params), args.features, args.out, args.metrics, args.plots_dir,
                     progress=not args.no_progress)


def _cmd_evaluate(args) -> dict:
    from heimdall.params import load_params
    from heimdall.stages import evaluate

    return evaluate.run(load_params(args.params), args.features, args.checkpoint, args.metrics_dir, args.plots_dir)


def _cmd_export_onnx(args) -> dict:
    from heimdall.params import load_params
    from heimdall.stages import export_onnx

    params = load_params(args.params)
    p = params.export_onnx
    summary = export_onnx.run(
        args.checkpoint, args.features, args.out, args.metrics,
        params_hash=params.section_hash("scenario", "export_sessions", "extract_features", "model", "train"),
        opset=p.opset, max_abs_diff=p.max_abs_diff, latency_runs=p.latency_runs,
    )
    return {k: summary[k] for k in ("max_abs_diff", "size_bytes", "p50_latency_ms_batch1",
                                    "torch_p50_latency_ms_batch1") if k in summary}


def _cmd_register(args) -> dict:
    from heimdall.params import load_params
    from heimdall.stages import register

    return register.run(load_params(args.params), args.model, args.test_metrics, args.out)


def _cmd_predict(args) -> dict:
    from heimdall.predict import GEOJSON_KEY, format_table, predict_sessions

    if args.geojson is not None:  # before minutes of prediction, and atomic_path would create the folder
        folder = args.geojson.parent
        if not folder.is_dir():
            raise HeimdallError(f"--geojson {args.geojson}: directory {folder} does not exist")
        if args.geojson.is_dir():
            raise HeimdallError(f"--geojson {args.geojson}: is a directory, expected a file name")
    results = predict_sessions(args.sessions, args.model, args.session_id or None, geojson=args.geojson is not None)
    features = [f for r in results for f in r.pop(GEOJSON_KEY, [])]
    if args.geojson is not None:
        from heimdall.atomic import atomic_path
        from heimdall.search_map import feature_collection

        text = json.dumps(feature_collection(features), allow_nan=False, separators=(",", ":"))
        with atomic_path(args.geojson) as tmp:
            tmp.write_text(text + "\n")
    if args.json:
        # ensure_ascii: control characters in session ids stay escaped; allow_nan=False: valid JSON or an error
        print(json.dumps(results if len(results) != 1 or not args.session_id else results[0], indent=2,
                         allow_nan=False, ensure_ascii=True))
    else:
        print(format_table(results))
    errors = [r["error_m"] for r in results if "error_m" in r]
    summary = {"sessions": len(results)}
    if errors:
        summary["median_error_m"] = round(float(sorted(errors)[len(errors) // 2]), 1)
    covered = [r["truth_in_region"]["p90"] for r in results if "p90" in r.get("truth_in_region", {})]
    if covered:
        summary["truth_in_90pct_region"] = round(sum(covered) / len(covered), 3)
    if args.geojson is not None:
        summary["geojson"] = str(args.geojson)
    return summary


def _cmd_validate(args) -> dict:
    from heimdall.params import load_params

    load_params(args.params)
    return {"params": str(args.params), "valid": True}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heimdall",
        description="Heimdall training pipeline: locate 2 m / 70 cm transmitters from WebSDR receivers. "
        "Each verb is one DVC stage and reads its section of params.yaml; run them all with `dvc repro`.",
    )
    parser.add_argument("--version", action="version", version=f"heimdall {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser(
        "export-sessions",
        help="labelled sessions (simulator or PostgreSQL+S3) -> data/sessions.h5",
        description="Export labelled recording sessions to one HDF5 file. source: synthetic simulates a "
        "WebSDR campaign from params.yaml (scenario, export_sessions); source: postgres reads approved "
        "sessions from HEIMDALL_DB_URL and IQ from S3.",
    )
    _common(p)
    p.add_argument("--out", type=Path, default=Path("data/sessions.h5"), help="output file (default: %(default)s)")
    p.set_defaults(func=_cmd_export_sessions)

    p = sub.add_parser(
        "extract-features",
        help="data/sessions.h5 -> data/features.h5 (log-mel, RSS/SNR, ENU targets, split, normalisation)",
        description="Compute per-receiver log-mel spectrograms (torchaudio) and scalar features, ENU "
        "positions, the train/val/test split and training-set normalisation statistics.",
    )
    _common(p)
    p.add_argument("--sessions", type=Path, default=Path("data/sessions.h5"), help="input (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("data/features.h5"), help="output file (default: %(default)s)")
    p.set_defaults(func=_cmd_extract_features)

    p = sub.add_parser(
        "train",
        help="data/features.h5 -> models/model.ckpt, models/metrics/train.json, models/plots/train/",
        description="Fit the learned radio map, train LocalizationNet (Lightning, Gaussian NLL, early stopping) "
        "and calibrate its uncertainty on the validation split. Logs to MLflow (MLFLOW_TRACKING_URI, default "
        "sqlite:///<repo>/mlflow.db); wall-clock timings go to <metrics>.timings.json (not DVC-tracked).",
    )
    _common(p)
    p.add_argument("--features", type=Path, default=Path("data/features.h5"), help="input (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("models/model.ckpt"), help="checkpoint (default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=Path("models/metrics/train.json"), help="(default: %(default)s)")
    p.add_argument("--plots-dir", type=Path, default=Path("models/plots/train"), help="(default: %(default)s)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="models/model.ckpt -> models/metrics/test.json, models/metrics/compare/, models/plots/evaluate/",
        description="Score the trained model on the test split beside the baselines (kNN, ML log-distance, "
        "kriged map) and the physical limit (oracle: the true map; the Cramér-Rao bound) on the same "
        "sessions; write the comparison table `dvc metrics show` prints, the plots, and log to the "
        "checkpoint's MLflow run.",
    )
    _common(p)
    p.add_argument("--features", type=Path, default=Path("data/features.h5"), help="input (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=Path("models/model.ckpt"), help="(default: %(default)s)")
    p.add_argument("--metrics-dir", type=Path, default=Path("models/metrics"), help="(default: %(default)s)")
    p.add_argument("--plots-dir", type=Path, default=Path("models/plots/evaluate"), help="(default: %(default)s)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "export-onnx",
        help="models/model.ckpt -> models/model.onnx (single file, verified against PyTorch) + metrics",
        description="Export the trained model to one self-contained ONNX file with a dynamic batch axis, "
        "simplify it (onnxsim), check it (onnx.checker), verify it with onnxruntime against the PyTorch "
        "model on the whole test split (no output if it differs by more than export_onnx.max_abs_diff) and "
        "measure its latency. See docs/inference.md.",
    )
    _common(p)
    p.add_argument("--checkpoint", type=Path, default=Path("models/model.ckpt"), help="(default: %(default)s)")
    p.add_argument("--features", type=Path, default=Path("data/features.h5"), help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("models/model.onnx"), help="(default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=Path("models/metrics/onnx.json"), help="(default: %(default)s)")
    p.set_defaults(func=_cmd_export_onnx)

    from heimdall.db.cli import add_parser as add_db_parser

    add_db_parser(sub)

    p = sub.add_parser(
        "register",
        help="models/model.onnx -> a new MLflow registry version (aliases candidate/champion) + models/registry.json",
        description="Log the ONNX model to MLflow and register a new version of register.model_name, tagged "
        "with git commit, dvc.lock md5s and the test metrics. Alias 'candidate' -> the new version; 'champion' "
        "moves only if its test median error beats the current champion's. MLFLOW_TRACKING_URI selects the "
        "store (default sqlite:///<repo>/mlflow.db).",
    )
    _common(p)
    p.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="(default: %(default)s)")
    p.add_argument("--test-metrics", type=Path, default=Path("models/metrics/test.json"),
                   help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("models/registry.json"), help="(default: %(default)s)")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser(
        "predict",
        help="locate the transmitter of sessions in a sessions.h5 with an exported model",
        description="Compute features exactly as extract_features does and run the ONNX model: prints "
        "position (lat, lon), the 1σ ellipse (semi-axes, azimuth of the major axis from north) and the "
        "receivers used, then per session its candidate areas: the posterior's modes (probability, lat,lon; "
        "the probability elsewhere) and the calibrated search regions (area holding the transmitter with "
        "probability 50/68/90/95 %; with ground truth, the smallest one holding it). --json adds the 2σ "
        "ellipse, covariances and each mode's ellipse. MODEL is a .onnx file or an MLflow URI such as "
        "models:/heimdall-localization@champion.",
    )
    p.add_argument("--sessions", type=Path, default=Path("data/sessions.h5"), help="(default: %(default)s)")
    p.add_argument("--model", default="models/model.onnx", help="ONNX file or models:/NAME@ALIAS (default: %(default)s)")
    p.add_argument("--session-id", action="append", metavar="ID", help="only this session (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--geojson", type=Path, metavar="FILE",
                   help="also write a GeoJSON FeatureCollection of the predicted sessions: per session the 50 %% "
                   "and 90 %% search regions (polygons, with their area), the modes (points, with their "
                   "probability) and the estimate (point); WGS-84 lon/lat (EPSG:4326), opens in QGIS or "
                   "geojson.io. Written atomically; the directory must exist")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("validate", help="check a params file against the schema", description="Validate params.yaml: "
                       "every problem is listed with its dotted key path.")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.set_defaults(func=_cmd_validate)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Same bits on every x86-64 machine: cap numpy/OpenBLAS/ATen/MKL/oneDNN at AVX2 and pin threads,
    # before any of them is loaded (docs/reproducibility.md). In a process that already loaded them
    # (tests calling main()), pinning now would not reach them: leave that process as it is.
    from heimdall import numerics

    if not numerics.loaded_readers():
        numerics.pin_cpu_numerics()
    args = build_parser().parse_args(argv)
    # SIGTERM (dvc, CI, kill) unwinds like Ctrl-C, so temporary outputs are cleaned up.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.perf_counter()
    try:
        summary = args.func(args)
    except HeimdallError as e:
        print(f"heimdall {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"heimdall {args.verb}: error: out of memory (the estimate before allocating missed it): lower the "
              "params that size the data, or run on a larger machine (docs/reliability.md \"Memory\")", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        from heimdall.atomic import write_failure

        reason = write_failure(e)
        if reason is None and not isinstance(e, OSError):
            raise
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        first = (reason or e.strerror or str(e)).strip().splitlines()
        print(f"heimdall {args.verb}: error: {where}{first[0] if first else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"heimdall {args.verb}: interrupted; no output written", file=sys.stderr)
        return 130
    summary = {**summary, "wall_time_s": round(time.perf_counter() - t0, 2)}
    print(f"heimdall {args.verb}: " + json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
