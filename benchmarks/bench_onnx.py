"""CPU latency of an exported SSD: onnxruntime (ours) vs PyTorch eager (peer), detections out.

    .venv/bin/python benchmarks/bench_onnx.py
    .venv/bin/python benchmarks/bench_onnx.py --presets tiny --batches 1 8 --repeats 20 --threads 2

Both sides take the same uint8 (B, 3, S, S) batch of real photographs (the shared VOC-mini, or
the synthetic images without it) and return detections:

- ours: the file ``ssd.export.export_onnx`` writes (dynamo exporter, normalisation, network,
  softmax, decoding and NonMaxSuppression in the graph), run by onnxruntime's CPU provider with
  ``--threads`` intra-op threads;
- peer: what ``ssd.serving.Detector`` runs on such a batch (``BatchPredictor``: normalisation,
  the network, ``ssd.postprocess``), in PyTorch with ``--threads`` threads.

Models: each preset at random init (no backbone download) with the classification heads'
background bias raised by 6, so that, as with a trained network, most priors are confident
background and few candidates reach NMS (an untrained head's near-uniform scores would make
every prior a candidate of every class and time NMS instead of the network). The batch is
checked to give the same detections on both sides before timing (``ssd.export.check_onnx``).
Reported per case: the median batch time and ms per image; ratio = PyTorch / onnxruntime.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from _common import case_result, finish, get_args_parser, time_side_by_side

ROOT = Path(__file__).resolve().parents[1]
NAME = "onnx"
VOC_IMAGES = ROOT.parent / "shared/datasets/voc2007-mini/VOCdevkit/VOC2007/JPEGImages"


def _model(preset: str):
    from ssd.config import load_config
    from ssd.models import build_model

    cfg = load_config(preset, [] if preset == "tiny" else ["model.backbone_weights=none"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    classes = cfg.model.num_classes
    with torch.no_grad():
        for layer in model.head.conf:
            last = [m for m in layer.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            last.bias.view(-1, classes)[:, 0] += 6.0  # channel a * C + 0: anchor a's background
    return model, cfg, [f"class{i}" for i in range(1, classes)]


def _images(count: int) -> list[torch.Tensor]:
    from ssd.serving import to_image_tensor

    if VOC_IMAGES.is_dir():
        return [to_image_tensor(p, i) for i, p in enumerate(sorted(VOC_IMAGES.glob("*.jpg"))[:count])]
    from ssd.data.synthetic import render_sample

    return [render_sample(i, seed=7)[0] for i in range(count)]


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=20, warmup=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ssd300_vgg16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    from ssd.evaluation.inference import BatchPredictor
    from ssd.export import check_onnx, export_onnx
    from ssd.serving import Detector

    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for preset in args.presets:
            model, cfg, classes = _model(preset)
            path = export_onnx(model, cfg, classes, Path(tmp) / f"{preset}.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            detector = Detector(model, cfg, classes)
            predictor = BatchPredictor(detector.model, cfg, "cpu")
            for batch_size in args.batches:
                batch, _ = detector.preprocess(_images(batch_size))
                checked = check_onnx(path, model, cfg, images=batch)
                feed = {"images": batch.numpy()}

                def ours(feed=feed, session=session):
                    return session.run(None, feed)

                def peer(batch=batch, predictor=predictor):
                    with torch.no_grad():
                        return predictor(batch)

                ours_ms, peer_ms = time_side_by_side(ours, peer, args.repeats, args.warmup, args.number)
                note = (f"{ours_ms['median_ms'] / batch_size:.1f} vs {peer_ms['median_ms'] / batch_size:.1f} "
                        f"ms/image; {checked.detections} detections, equal on both sides")
                cases.append(case_result(f"{preset} batch {batch_size}", ours_ms, peer_ms, goal=1.0, note=note))
                print(f"{preset} batch {batch_size}: {note}", flush=True)
    command = "python benchmarks/bench_onnx.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return finish(NAME, args, command.strip(), cases,
                  table={"peer": "PyTorch", "ratio": "PyTorch / onnxruntime"})


if __name__ == "__main__":
    main()
