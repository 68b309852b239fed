"""Batch inference throughput: Ray Data with 1 and 2 CPU actors against today's single-process
``pipelines/predict.py``, on the same images with the same model and the same outputs.

    .venv/bin/python benchmarks/bench_batch_predict.py                  # tiny, 600 VOC-mini images
    .venv/bin/python benchmarks/bench_batch_predict.py --preset ssd300_vgg16 --limit 60

The model is the preset with random weights (seed 0) and VOC's 20 classes, saved as a checkpoint;
the images are the first ``--limit`` JPEGs of ``--images`` (default the 600 of VOC-mini). Every
case runs as its own process, exactly as a user runs it, in rounds (``--repeats``; the cases in
turn, so that load from other processes hits them alike):

- ``single process``: ``predict.py --model CKPT IMAGES... --out DIR --no-draw --device cpu``.
  Timed end to end (interpreter, imports, model, every image, detections.json), and, from a
  second, in-process call of its ``main`` in this benchmark, without the interpreter start.
- ``Ray Data, N actor(s)``: ``predict.py --model CKPT --images DIR --out DIR --actors N
  --address local`` (a private 2-CPU cluster started by the job). Timed end to end, and without
  Ray's start-up (``pipeline_s`` of its summary.json: from the first batch requested to the last
  image received; the model load and writing the tables are outside it too).

images/s = images / seconds. After each round the Ray Data outputs are checked against the
single-process detections.json: the same images, the same number of detections per image, and
at least 99 % of the detections equal (label, score within 1e-4, box within 1e-3 px; see
``compare`` for why not all with random weights); the counts go to the JSON (``output_checks``). Writes
``results/batch_predict[_<preset>].json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS_DIR, library_version, machine_info

VOC_MINI_IMAGES = Path("/work/shared/datasets/voc2007-mini/VOCdevkit/VOC2007/JPEGImages")
PREDICT = ROOT / "pipelines" / "predict.py"


def make_checkpoint(preset: str, folder: Path) -> Path:
    """The preset with random weights (seed 0) and VOC's classes, as a checkpoint."""
    import torch

    from ssd.checkpoint import save_checkpoint
    from ssd.config import load_config
    from ssd.data.voc import VOC_CLASSES
    from ssd.models import build_model

    cfg = load_config(preset, [f"model.num_classes={len(VOC_CLASSES) + 1}", "model.backbone_weights=null"])
    torch.manual_seed(0)
    return save_checkpoint(folder / f"{preset}-random", model=build_model(cfg), epoch=0, step=0, config=cfg,
                           classes=list(VOC_CLASSES))


def run(argv: list[str], env: dict[str, str]) -> float:
    """Seconds that ``python pipelines/predict.py argv`` takes, end to end (fails loudly)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(PREDICT), *argv], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"predict.py {' '.join(argv[:6])} ... failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds


def in_process_single(checkpoint: Path, files: list[Path], out: Path) -> float:
    """Seconds of the single-process mode's ``main`` in this process (no interpreter start)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_predict", PREDICT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.get_args_parser().parse_args(
        ["--model", str(checkpoint), *map(str, files), "--out", str(out), "--no-draw", "--device", "cpu"])
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its line per image
        module.main(args)
    return time.perf_counter() - start


def unmatched(got: list[dict], want: list[dict], score_tol: float = 1e-4, box_tol: float = 1e-3) -> int:
    """How many of one image's wanted detections have no equal in ``got``: each is matched to its
    own got detection of the same label, score within ``score_tol`` and box within ``box_tol``
    px, in any order (tied scores may come in another order)."""
    import numpy as np

    if not got:
        return len(want)
    labels = np.array([g["label"] for g in got])
    scores = np.array([g["score"] for g in got])
    boxes = np.array([[g["x1"], g["y1"], g["x2"], g["y2"]] for g in got])
    free = np.ones(len(got), dtype=bool)
    missing = 0
    for w in want:
        fits = (free & (labels == w["label"]) & (np.abs(scores - w["score"]) <= score_tol)
                & (np.abs(boxes - np.array(w["box"])).max(axis=1) <= box_tol))
        if fits.any():
            free[np.flatnonzero(fits)[0]] = False
        else:
            missing += 1
    return missing


def compare(single_json: Path, batch_out: Path, least_agreement: float = 0.99) -> dict[str, float]:
    """The Ray Data tables against detections.json: the same images with the same number of
    detections each, and at least ``least_agreement`` of the detections equal (:func:`unmatched`);
    raises otherwise.

    Not all of them: with random weights many candidates have scores within float rounding of
    each other, so a candidate at the top-k cut, or a pair overlapping at IoU = the NMS threshold,
    can go either way when the batches are made up differently or the thread count differs (1
    torch thread per actor, 2 in the single process). The single-process mode itself changes a few
    detections between ``--batch-size 16`` and ``5`` (measured: 1 of 9600 on 48 VOC images).
    """
    import pyarrow.parquet as pq

    single = json.loads(single_json.read_text())
    by_path: dict[str, list[dict]] = {}
    for row in pq.read_table(batch_out / "detections.parquet").to_pylist():
        by_path.setdefault(row["path"], []).append(row)
    if set(by_path) - {image["file"] for image in single["images"]}:
        raise AssertionError("Ray Data has detections for images the single process did not see")
    identical = differ = total = 0
    for image in single["images"]:
        got, want = by_path.get(image["file"], []), image["detections"]
        if len(got) != len(want):
            raise AssertionError(f"{image['file']}: {len(got)} detections from Ray Data, {len(want)} single-process")
        missing = unmatched(got, want)
        differ, total = differ + missing, total + len(want)
        identical += missing == 0
    agreement = 1 - differ / max(total, 1)
    if agreement < least_agreement:
        raise AssertionError(f"only {agreement:.2%} of the detections agree")
    return {"images": len(single["images"]), "images_identical": identical, "detections": total,
            "detections_differing": differ, "agreement": agreement}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="model preset, random weights (default tiny)")
    parser.add_argument("--images", type=Path, default=VOC_MINI_IMAGES, help="folder of JPEGs (default VOC-mini)")
    parser.add_argument("--limit", type=int, default=600, help="first N images of the folder (default 600)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the cases (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward, every case (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/batch_predict*.json)")
    args = parser.parse_args(argv)
    out_json = args.out or RESULTS_DIR / ("batch_predict.json" if args.preset == "tiny"
                                          else f"batch_predict_{args.preset}.json")
    files = sorted(args.images.glob("*.jpg"))[:args.limit]
    if not files:
        raise SystemExit(f"error: no JPEGs in {args.images}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cases = ["single process", "Ray Data, 1 actor", "Ray Data, 2 actors"]
    timings: dict[str, dict[str, list[float]]] = {c: {"end_to_end_s": [], "processing_s": [],
                                                      "ray_startup_s": []} for c in cases}
    checks = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = make_checkpoint(args.preset, tmp)
        images = tmp / "images"  # exactly the chosen files (the batch mode reads a folder)
        images.mkdir()
        for path in files:
            os.symlink(path, images / path.name)
        linked = sorted(images.iterdir())
        common = ["--model", str(checkpoint), "--batch-size", str(args.batch_size)]
        for round_ in range(args.repeats):
            for case in cases:
                out = tmp / f"out-{round_}-{case.replace(' ', '_').replace(',', '')}"
                if case == "single process":
                    seconds = run([*common, *map(str, linked), "--out", str(out), "--no-draw", "--device", "cpu"], env)
                    timings[case]["end_to_end_s"].append(seconds)
                    timings[case]["processing_s"].append(in_process_single(checkpoint, linked, tmp / "inproc"))
                    single_json = out / "detections.json"
                else:
                    actors = case.split(", ")[1].split()[0]
                    seconds = run([*common, "--images", str(images), "--out", str(out), "--actors", actors,
                                   "--address", "local"], env)
                    summary = json.loads((out / "summary.json").read_text())
                    timings[case]["end_to_end_s"].append(seconds)
                    timings[case]["processing_s"].append(summary["pipeline_s"])
                    timings[case]["ray_startup_s"].append(summary["ray_startup_s"])
                    checks.append({"round": round_, "case": case, **compare(single_json, out)})
                print(f"round {round_ + 1}: {case}: {seconds:.1f} s end to end, "
                      f"{timings[case]['processing_s'][-1]:.1f} s processing", flush=True)
                if case != "single process":
                    shutil.rmtree(out)
    rows = []
    for case in cases:
        t = timings[case]
        e2e, proc = statistics.median(t["end_to_end_s"]), statistics.median(t["processing_s"])
        rows.append({"case": case, "images": len(files), "end_to_end_s": e2e, "processing_s": proc,
                     "end_to_end_images_per_s": len(files) / e2e, "processing_images_per_s": len(files) / proc,
                     "ray_startup_s": statistics.median(t["ray_startup_s"]) if t["ray_startup_s"] else None,
                     "samples": t})
    base = rows[0]
    for row in rows:
        row["end_to_end_vs_single"] = base["end_to_end_s"] / row["end_to_end_s"]
        row["processing_vs_single"] = base["processing_s"] / row["processing_s"]
    result = {"name": "batch_predict", "command": "python benchmarks/bench_batch_predict.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "code": library_version(), "preset": args.preset,
              "images": str(args.images), "batch_size": args.batch_size, "machine": machine_info(1),
              "uptime": subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip(),
              "rows": rows, "output_checks": checks}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [("| case | end to end s | images/s | vs single | processing s (Ray start-up excluded) | images/s "
             "| vs single | Ray start-up s |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        startup = f"{r['ray_startup_s']:.1f}" if r["ray_startup_s"] is not None else "-"
        lines.append(f"| {r['case']} | {r['end_to_end_s']:.1f} | {r['end_to_end_images_per_s']:.1f} | "
                     f"{r['end_to_end_vs_single']:.2f}x | {r['processing_s']:.1f} | {r['processing_images_per_s']:.1f} | "
                     f"{r['processing_vs_single']:.2f}x | {startup} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
