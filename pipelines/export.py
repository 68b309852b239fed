"""Export a trained or registered SSD to ONNX, check it with onnxruntime, log it to the registry.

    python pipelines/export.py --model models:/ssd-voc@champion --format onnx --out model.onnx
    python pipelines/export.py --model models:/ssd-voc/3 --out model-raw.onnx --no-nms
    python pipelines/export.py --model runs/exp/checkpoints/best --out model.onnx --exporter torchscript

``--model`` is a model reference as ``pipelines/predict.py`` takes it (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, ``models:/m-...``, or a checkpoint folder),
looked up at ``--mlflow-uri`` (default ``$MLFLOW_TRACKING_URI``, else the local store).

The graph takes a uint8 (B, 3, S, S) RGB batch (B dynamic; each image warped to S x S) and does
the normalisation, the network, softmax and box decoding; with NMS (default) it outputs
``num_detections``, ``boxes`` (xyxy in [0, 1]), ``scores``, ``labels`` padded to the config's
``top_k`` per image; with ``--no-nms`` it outputs per prior ``boxes`` and ``scores``, for
``ssd.onnx_postprocess.postprocess_outputs`` (numpy only). The file's metadata (``ssd.*``)
names the classes, the input size, the thresholds and the outputs (``ssd/export.py``).

After writing, the file is run with onnxruntime on a random batch and compared with PyTorch
(to 1e-4); a mismatch removes the file and exits with status 1 and one line. When ``--model``
names a registered version, the file is logged to that version's run under ``onnx/`` and the
version gets the tags ``onnx/uri``, ``onnx/nms``, ``onnx/opset``, ``onnx/exporter``,
``onnx/sha256`` (``--no-log`` skips this).

The default exporter is torch.export-based (``dynamo``): torch's default and maintained one;
the TorchScript exporter is deprecated in torch and writes opsets <= 20. Both give the same
outputs (tests/test_export.py). The default opset, 20, is torch 2.14's default for both; the
graph's ops are the same at 20-23 (checked), and 20 runs on older runtimes too.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout too


def get_args_parser() -> argparse.ArgumentParser:
    from ssd.export import DEFAULT_OPSET, EXPORTERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint folder")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    p.add_argument("--out", type=Path, required=True, help="the file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--no-nms", action="store_true",
                   help="output per-prior boxes and scores (no NMS in the graph); post-process with "
                        "ssd.onnx_postprocess.postprocess_outputs")
    p.add_argument("--exporter", choices=list(EXPORTERS), default="dynamo",
                   help="torch.export-based (default) or the legacy TorchScript tracer")
    p.add_argument("--mlflow-uri", help="tracking/registry URI (default $MLFLOW_TRACKING_URI, else the local "
                                        "SQLite store)")
    p.add_argument("--no-log", action="store_true", help="do not log the file to a registered version's run")
    return p


def resolve(reference: str, mlflow_uri: str | None, dst: Path) -> tuple[Any, str | None]:
    """``ssd.registry.resolve_model`` with errors as ``SystemExit("error: ...")``; also the
    tracking URI used (None for a checkpoint folder)."""
    from ssd.registry import ModelReferenceError, registry_uri_for, resolve_model

    tracking_uri = registry_uri_for(reference, mlflow_uri)
    try:
        return resolve_model(reference, tracking_uri, dst=dst), tracking_uri
    except ModelReferenceError as err:
        raise SystemExit(f"error: --model {err}") from None


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Export, check, log; returns what was done (paths, differences, the logged URI)."""
    from ssd.export import OnnxMismatch, check_onnx, export_onnx
    from ssd.serving import Detector

    if args.opset < 18:
        raise SystemExit(f"error: --opset {args.opset}: the exporters need opset >= 18")
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: ONNX export needs {', '.join(missing)}: pip install -e '.[export]'")
    with tempfile.TemporaryDirectory(prefix="ssd-export-") as tmp:
        resolved, tracking_uri = resolve(args.model, args.mlflow_uri, Path(tmp))
        try:
            detector = Detector.from_checkpoint(resolved.checkpoint)
        except (OSError, ValueError, RuntimeError) as err:
            raise SystemExit(f"error: --model {args.model}: cannot load its checkpoint: {err}") from None
    nms = not args.no_nms
    try:
        path = export_onnx(detector.model, detector.cfg, detector.classes, args.out, nms=nms, opset=args.opset,
                           exporter=args.exporter)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        checked = check_onnx(path, detector.model, detector.cfg)
    except OnnxMismatch as err:
        path.unlink()  # nobody should pick up a file that computes something else
        raise SystemExit(f"error: the exported file does not match PyTorch (removed {path}): {err}") from None
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB, opset {args.opset}, {args.exporter}, "
          f"{'NMS in the graph' if nms else 'no NMS'}); onnxruntime matches PyTorch on a random batch of "
          f"{checked.batch}: boxes to {checked.max_box_diff:.2g}, scores to {checked.max_score_diff:.2g}"
          + (f", {checked.detections} detections" if nms else ""), flush=True)
    result: dict[str, Any] = {"path": str(path), "nms": nms, "opset": args.opset, "exporter": args.exporter,
                              "check": checked, "logged_uri": None}
    if resolved.name and resolved.version and not args.no_log:
        from ssd.registry import log_version_artifact

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        tags = {"onnx/nms": str(nms).lower(), "onnx/opset": str(args.opset), "onnx/exporter": args.exporter,
                "onnx/sha256": digest}
        try:
            uri = log_version_artifact(tracking_uri, resolved.name, resolved.version, path, "onnx", tags)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types; the file is written anyway
            raise SystemExit(f"error: wrote {path} but cannot log it to {resolved.label}: {err}") from None
        print(f"logged to {resolved.label} as {uri} (version tags onnx/*)", flush=True)
        result["logged_uri"] = uri
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
