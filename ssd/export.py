"""ONNX export of a trained SSD: normalisation, network, softmax, box decoding (and NMS) in one
graph that a runtime without the project's code can run.

No Ray and no MLflow here (``pipelines/export.py`` adds the registry)::

    detector = Detector.from_checkpoint("runs/exp/checkpoints/best")
    export_onnx(detector.model, detector.cfg, detector.classes, "model.onnx")
    check_onnx("model.onnx", detector.model, detector.cfg)   # raises OnnxMismatch on a mismatch

The graph's input ``images`` is a uint8 (B, 3, S, S) RGB batch, each image warped to S x S
(bilinear with antialias, as ``ssd.evaluation.inference.eval_transform`` does); B is dynamic.

With NMS (the default) the outputs are padded per image to K = min(``top_k``, C * P) rows:

* ``num_detections`` (B,) int64: how many rows of each image are detections (the rest is 0);
* ``boxes`` (B, K, 4) float32 xyxy in [0, 1] of the input (multiply by the ORIGINAL image's
  width, height, width, height for its pixels);
* ``scores`` (B, K) float32, descending; ``labels`` (B, K) int64 in 1..C (class ``k`` is the
  metadata's ``ssd.classes[k - 1]``).

They are ``ssd.postprocess.postprocess``'s detections: per (image, class) the scores above
``score_threshold``, their ``pre_nms_top_k`` best, ONNX ``NonMaxSuppression`` (IoU strictly
above ``nms_iou`` suppresses, at most ``top_k`` per class), then each image's ``top_k`` best.

Without NMS (``nms=False``) the outputs are ``boxes`` (B, P, 4) float32 xyxy in [0, 1] per prior
and ``scores`` (B, P, C) float32 softmax scores of the foreground classes (column ``k`` is label
``k + 1``); ``ssd.onnx_postprocess.postprocess_outputs`` (numpy only) turns them into the same
detections. Soft-NMS configs export only this way.

The file's ``metadata_props`` say all this (keys ``ssd.*``, :func:`onnx_metadata`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssd.boxes import decode
from ssd.checkpoint import unwrap
from ssd.config import Config
from ssd.transforms import BGR_CONVENTIONS, _normalize_constants

#: the exporters ``export_onnx`` can use: torch.export-based (torch's default since 2.9) or the
#: legacy TorchScript tracer (deprecated in torch, kept for runtimes that want opset <= 20 graphs
#: built the old way)
EXPORTERS = ("dynamo", "torchscript")
#: the opset written by default: torch 2.14's default for both exporters (the TorchScript one
#: supports no newer), every onnxruntime since 1.14 runs it
DEFAULT_OPSET = 20
#: NonMaxSuppression with its score threshold input exists from opset 11; the dynamo exporter
#: implements torch's ops from opset 18 on
MIN_OPSET = 18
#: the tolerance of :func:`check_onnx` on raw outputs (boxes in [0, 1], scores in [0, 1])
TOLERANCE = 1e-4

INPUT_NAME = "images"
NMS_OUTPUTS = ("num_detections", "boxes", "scores", "labels")
RAW_OUTPUTS = ("boxes", "scores")


# --------------------------------------------------------------------------------------------
# NMS as one custom op: eager, it runs torchvision's NMS; exported, it is ONNX NonMaxSuppression
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ssd_export::nms", mutates_args=())
def onnx_nms(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
             score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` (center_point_box=0) in PyTorch.

    Args:
        boxes: (B, P, 4) xyxy, shared by the classes.
        scores: (B, C, P).
        max_per_class: boxes kept per (image, class) at most.
    Returns:
        (N, 3) int64 rows ``(image, class, prior)``: per (image, class), in that order, the boxes
        scoring strictly above ``score_threshold`` that greedy NMS keeps (IoU strictly above
        ``iou_threshold`` suppresses), best first.
    """
    from torchvision.ops import batched_nms

    rows = []
    for b in range(scores.shape[0]):
        cls, prior = (scores[b] > score_threshold).nonzero(as_tuple=True)
        kept = batched_nms(boxes[b, prior], scores[b, cls, prior], cls, iou_threshold)  # best first
        cls, prior = cls[kept], prior[kept]
        order = torch.argsort(cls, stable=True)  # by class, each class still best first
        cls, prior = cls[order], prior[order]
        counts = torch.bincount(cls, minlength=scores.shape[1])
        rank = torch.arange(cls.numel()) - (counts.cumsum(0) - counts)[cls]
        keep = rank < max_per_class
        rows.append(torch.stack((torch.full_like(cls[keep], b), cls[keep], prior[keep]), dim=1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)


@onnx_nms.register_fake
def _onnx_nms_fake(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                   score_threshold: float) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _nms_translation(boxes: Any, scores: Any, max_per_class: int, iou_threshold: float,
                     score_threshold: float) -> Any:
    """The dynamo exporter's translation of :func:`onnx_nms` (ONNX Script)."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(
        boxes, scores,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
        center_point_box=0,
    )


def _nms_symbolic(g: Any, boxes: Any, scores: Any, max_per_class: Any, iou_threshold: Any,
                  score_threshold: Any) -> Any:
    """The TorchScript exporter's translation of :func:`onnx_nms`."""
    from torch.onnx import symbolic_helper

    max_per_class = symbolic_helper._get_const(max_per_class, "i", "max_per_class")
    iou_threshold = symbolic_helper._get_const(iou_threshold, "f", "iou_threshold")
    score_threshold = symbolic_helper._get_const(score_threshold, "f", "score_threshold")
    return g.op("NonMaxSuppression", boxes, scores,
                g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
                center_point_box_i=0)


# --------------------------------------------------------------------------------------------
# The exported module
# --------------------------------------------------------------------------------------------


class ExportableSSD(nn.Module):
    """A trained SSD with its input normalisation, softmax, decoding and optionally NMS.

    Args:
        model: the SSD (``ssd.models.build_model``), returning (loc (B, P, 4), logits
            (B, P, C + 1)); put in eval mode.
        cfg: its config: ``augment`` (mean, std, input convention), ``postprocess`` (for NMS),
            ``priors`` (input size S).
        nms: NMS in the graph (outputs ``NMS_OUTPUTS``) or not (``RAW_OUTPUTS``).
    Forward: uint8 (B, 3, S, S) RGB -> the outputs the module docstring lists.
    """

    def __init__(self, model: nn.Module, cfg: Config, nms: bool = True) -> None:
        super().__init__()
        self.model = unwrap(model).eval()
        coding = self.model.coding
        self.variances = tuple(float(v) for v in coding.coder.variances)
        self.params = cfg.postprocess
        if nms and self.params.method != "nms":
            raise ValueError(
                f"postprocess.method={self.params.method!r}: only plain NMS can run inside the ONNX "
                "graph; export without NMS (--no-nms) and post-process the boxes and scores yourself")
        self.nms = nms
        self.flip_channels = cfg.augment.input_convention in BGR_CONVENTIONS
        # Local copies of the normalisation constants, computed by the function ssd.transforms
        # uses (the same float32 bits) but without its cache: normalising through
        # ssd.transforms.normalize while the exporter traces leaves traced tensors in that cache,
        # which later eager calls would then get.
        shift, scale = _normalize_constants.__wrapped__(
            tuple(cfg.augment.mean), tuple(cfg.augment.std), cfg.augment.input_convention, torch.device("cpu"))
        self.register_buffer("shift", shift.clone().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.clone().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("priors", coding.priors("cpu").clone(), persistent=False)  # (P, 4) cxcywh
        # Python ints, not shapes read in forward: constants in the graph either way, and the
        # TorchScript tracer would warn about every shape it turns into a constant
        self.num_priors = int(self.priors.shape[0])
        self.num_classes = int(cfg.model.num_classes) - 1

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.to(torch.float32)
        if self.flip_channels:  # as ssd.transforms.normalize: flip, then the flipped constants
            x = x.flip(1)
        loc, logits = self.model((x - self.shift) * self.scale)
        scores = logits.float().softmax(dim=-1)[..., 1:]  # (B, P, C) foreground
        # ssd.boxes.decode broadcasts the (P, 4) priors against (B, P, 4): no shape in the graph
        # depends on the example batch
        boxes = decode(loc.float(), self.priors, self.variances).clamp(0.0, 1.0)  # (B, P, 4) xyxy
        if not self.nms:
            return boxes, scores
        return self._detections(boxes, scores)

    def _detections(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        params = self.params
        num_priors, num_classes = self.num_priors, self.num_classes
        per_class = scores.transpose(1, 2).contiguous()  # (B, C, P), NonMaxSuppression's layout
        k = params.pre_nms_top_k
        if 0 < k < num_priors:
            # Only each (image, class)'s k best can be candidates: zero the others (a zero never
            # passes the threshold, which is >= 0).
            best, best_prior = per_class.topk(k, dim=2)
            per_class = torch.zeros_like(per_class).scatter(2, best_prior, best)
        selected = torch.ops.ssd_export.nms(boxes, per_class, params.top_k, params.nms_iou,
                                            params.score_threshold)  # (N, 3) image, class, prior
        # The kept scores in a (B, C * P) matrix, -1 elsewhere; each image's top_k over it.
        flat = (selected[:, 0] * num_classes + selected[:, 1]) * num_priors + selected[:, 2]  # (N,)
        kept = torch.full_like(per_class, -1.0).reshape(-1)
        kept = kept.scatter(0, flat, per_class.reshape(-1)[flat]).reshape(-1, num_classes * num_priors)
        top = min(params.top_k, num_classes * num_priors)
        top_scores, top_index = kept.topk(top, dim=1)  # (B, K), descending
        valid = top_scores >= 0
        labels = torch.where(valid, top_index // num_priors + 1, torch.zeros_like(top_index))
        prior = top_index % num_priors
        top_boxes = boxes.gather(1, prior.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        top_boxes = torch.where(valid.unsqueeze(-1), top_boxes, torch.zeros_like(top_boxes))
        top_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        return valid.sum(dim=1), top_boxes, top_scores, labels


def reference_outputs(model: nn.Module, cfg: Config, images: Tensor) -> tuple[Tensor, Tensor]:
    """What the ONNX graph without NMS should output, computed the way the project's inference
    computes it (``ssd.engine.network_input`` + the model + its box coding).

    Args:
        images: uint8 (B, 3, S, S) RGB.
    Returns:
        boxes (B, P, 4) xyxy in [0, 1] (clamped, as ``ssd.postprocess``), scores (B, P, C).
    """
    from ssd.engine import network_input

    model = unwrap(model).eval()
    with torch.no_grad():
        loc, logits = model(network_input(images, cfg, torch.device("cpu"), torch.contiguous_format))
        coding = model.coding
        boxes = coding.coder.decode(loc.float(), coding.priors("cpu")).clamp(0.0, 1.0)
        return boxes, logits.float().softmax(dim=-1)[..., 1:]


# --------------------------------------------------------------------------------------------
# Export, metadata, check
# --------------------------------------------------------------------------------------------


def onnx_metadata(cfg: Config, classes: list[str], nms: bool, exporter: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported file: what a user without the project needs."""
    params = cfg.postprocess
    size = cfg.priors.image_size
    if nms:
        outputs = ("num_detections (B,) int64: rows of each image that are detections; "
                   "boxes (B, K, 4) float32 xyxy in [0, 1] of the input: multiply by the original "
                   "image's (width, height, width, height); scores (B, K) float32 descending; "
                   "labels (B, K) int64 in 1..C, class ssd.classes[label - 1]; rows past "
                   "num_detections are 0")
    else:
        outputs = ("boxes (B, P, 4) float32 xyxy in [0, 1] of the input per prior; scores (B, P, C) "
                   "float32 softmax score per foreground class (column k is label k + 1); "
                   "detections: ssd.onnx_postprocess.postprocess_outputs with ssd.score_threshold, "
                   "ssd.nms_iou, ssd.pre_nms_top_k, ssd.top_k")
    return {
        "ssd.classes": json.dumps(list(classes)),
        "ssd.input": (f"images: uint8 (B, 3, {size}, {size}) RGB, each image warped to {size}x{size} "
                      "(bilinear, antialias); normalisation is in the graph"),
        "ssd.input_size": str(size),
        "ssd.outputs": outputs,
        "ssd.nms": "in-graph" if nms else "none",
        "ssd.arch": cfg.model.arch,
        "ssd.prior_spec": cfg.priors.name,
        "ssd.num_priors": str(cfg.priors.num_priors()),
        "ssd.variances": json.dumps([float(v) for v in cfg.matching.variances]),
        "ssd.mean": json.dumps([float(v) for v in cfg.augment.mean]),
        "ssd.std": json.dumps([float(v) for v in cfg.augment.std]),
        "ssd.input_convention": str(cfg.augment.input_convention or "rgb"),
        "ssd.score_threshold": repr(float(params.score_threshold)),
        "ssd.nms_iou": repr(float(params.nms_iou)),
        "ssd.pre_nms_top_k": str(int(params.pre_nms_top_k)),
        "ssd.top_k": str(int(params.top_k)),
        "ssd.nms_method": params.method,
        "ssd.exporter": exporter,
    }


def export_onnx(
    model: nn.Module,
    cfg: Config,
    classes: list[str],
    path: str | Path,
    *,
    nms: bool = True,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (weights inside it) with dynamic batch size.

    Args:
        model: the SSD; cfg: its config; classes: its C class names (written to the metadata).
        nms: NMS in the graph (see the module docstring for the outputs either way).
        opset: the default ONNX opset (>= :data:`MIN_OPSET`).
        exporter: one of :data:`EXPORTERS`.
    Raises:
        ValueError: an unknown exporter, an opset it cannot write, a soft-NMS config with
            ``nms=True``.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}: one of {EXPORTERS}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: the exporters write NMS and torch's ops from opset {MIN_OPSET} on")
    if exporter == "torchscript" and opset > DEFAULT_OPSET:
        raise ValueError(f"the TorchScript exporter writes opsets up to {DEFAULT_OPSET}, not {opset}")
    wrapper = ExportableSSD(model, cfg, nms=nms).eval()
    size = cfg.priors.image_size
    # batch 2: a batch of 1 would let torch.export specialise the batch dimension to 1
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    names = list(NMS_OUTPUTS if nms else RAW_OUTPUTS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=names, dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
                custom_translation_table={torch.ops.ssd_export.nms.default: _nms_translation},
                external_data=False, verbose=False)
            proto = program.model_proto
        else:
            import io
            import warnings

            torch.onnx.register_custom_op_symbolic("ssd_export::nms", _nms_symbolic, MIN_OPSET)
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
                # the model's input shape check, traced once for the fixed S x S input
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(
                    wrapper, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=names, dynamic_axes={INPUT_NAME: {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = (f"SSD {cfg.model.arch} ({len(classes)} classes, input {size}x{size}) exported by "
                        "ssd-ray; see the ssd.* metadata")
    for key, value in onnx_metadata(cfg, list(classes), nms, exporter).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(path)
    return path


class OnnxMismatch(RuntimeError):
    """An exported file whose outputs differ from PyTorch's; the message says where and how."""


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check_onnx` compared: the batch size and the largest differences seen."""

    batch: int
    max_box_diff: float
    max_score_diff: float
    detections: int


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime CPU session of ``path`` (one intra-op thread per core, as torch uses)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_metadata(path_or_session: Any) -> dict[str, str]:
    """The ``ssd.*`` metadata of an exported file (a path or an onnxruntime session)."""
    session = onnx_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    return dict(session.get_modelmeta().custom_metadata_map)


def check_onnx(path: str | Path, model: nn.Module, cfg: Config, images: Tensor | None = None,
               seed: int = 0) -> CheckResult:
    """Run the exported file with onnxruntime on ``images`` (default: a random uint8 batch of 2
    from ``seed``) and compare it with PyTorch.

    Without NMS: boxes and scores equal :func:`reference_outputs` to :data:`TOLERANCE`. With NMS:
    the detections equal ``ssd.postprocess.postprocess`` on PyTorch's outputs: the same count,
    and one to one the same label, score and box to :data:`TOLERANCE` (up to the order of
    near-equal scores, see :func:`_pair_detections`).

    Raises:
        OnnxMismatch: naming the output, the image and the difference.
    """
    from ssd.postprocess import postprocess

    size = cfg.priors.image_size
    if images is None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator)
    session = onnx_session(path)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {INPUT_NAME: images.numpy()})))
    boxes, scores = reference_outputs(model, cfg, images)
    if tuple(names) == RAW_OUTPUTS:
        box_diff = _max_diff(got["boxes"], boxes.numpy(), "boxes")
        score_diff = _max_diff(got["scores"], scores.numpy(), "scores")
        return CheckResult(len(images), box_diff, score_diff, 0)
    if tuple(names) != NMS_OUTPUTS:
        raise OnnxMismatch(f"{path}: unexpected outputs {names}")
    unwrapped = unwrap(model)
    with torch.no_grad():
        loc, logits = unwrapped(_normalised(images, cfg))
    want = postprocess(loc.float(), logits.float(), unwrapped.coding.priors("cpu"), cfg.postprocess,
                       variances=unwrapped.coding.coder.variances)
    box_diff = score_diff = 0.0
    total = 0
    for i, det in enumerate(want):
        count = int(got["num_detections"][i])
        if count != len(det["scores"]):
            raise OnnxMismatch(f"{path}: image {i}: {count} detections, PyTorch {len(det['scores'])}")
        total += count
        found = {key: got[key][i, :count] for key in ("boxes", "scores", "labels")}
        box, score = _pair_detections(found, {k: v.numpy() for k, v in det.items()}, f"image {i}")
        box_diff, score_diff = max(box_diff, box), max(score_diff, score)
    return CheckResult(len(images), box_diff, score_diff, total)


def _pair_detections(got: dict[str, np.ndarray], want: dict[str, np.ndarray], where: str) -> tuple[float, float]:
    """Pair each detection of ``got`` with an unpaired one of ``want`` (same label, score and box
    to :data:`TOLERANCE`), in order where possible: two runtimes may order detections whose
    scores differ by float noise either way. Detections scoring within :data:`TOLERANCE` of the
    image's last kept score may differ (which of two near-equal scores makes the top-k is noise
    too). Returns the largest box and score differences; raises OnnxMismatch."""
    unpaired = np.ones(len(want["scores"]), dtype=bool)
    floor = float(want["scores"][-1]) + TOLERANCE if len(want["scores"]) else 0.0
    box_diff = score_diff = 0.0
    for i in range(len(got["scores"])):
        boxes = np.abs(want["boxes"] - got["boxes"][i]).max(axis=1) if len(want["boxes"]) else np.zeros(0)
        scores = np.abs(want["scores"] - got["scores"][i])
        fits = unpaired & (want["labels"] == got["labels"][i]) & (scores <= TOLERANCE) & (boxes <= TOLERANCE)
        if not fits.any():
            if got["scores"][i] <= floor:
                continue
            raise OnnxMismatch(
                f"{where}: detection {i} (label {int(got['labels'][i])}, score {float(got['scores'][i]):.6f}) "
                f"differs from PyTorch's (label {int(want['labels'][i])}, score {float(want['scores'][i]):.6f}) "
                f"by more than {TOLERANCE:g}")
        j = i if fits[i] else int(np.flatnonzero(fits)[0])
        unpaired[j] = False
        box_diff, score_diff = max(box_diff, float(boxes[j])), max(score_diff, float(scores[j]))
    return box_diff, score_diff


def _normalised(images: Tensor, cfg: Config) -> Tensor:
    from ssd.engine import network_input

    return network_input(images, cfg, torch.device("cpu"), torch.contiguous_format)


def _max_diff(got: np.ndarray, want: np.ndarray, what: str) -> float:
    if got.shape != want.shape:
        raise OnnxMismatch(f"{what}: shape {got.shape}, PyTorch {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if got.size else 0.0
    if not diff <= TOLERANCE:  # also catches NaN
        raise OnnxMismatch(f"{what}: differ from PyTorch's by {diff:.3g} > {TOLERANCE:g}")
    return diff
