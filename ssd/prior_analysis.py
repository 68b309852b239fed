"""Prior analysis before any training: how well a prior spec covers a dataset's ground truth.

For every ground-truth box, the IoU with every prior gives three numbers:
- *recall*: whether some prior reaches the matching threshold (IoU >= 0.5 in the paper);
- *best IoU*: the highest IoU over all priors;
- *positives*: how many priors reach the threshold (the positives the box makes in training).

They are reported for all boxes and by COCO's size buckets (small < 32^2, medium < 96^2, large,
in original image pixels^2, the boundaries of pycocotools' ``areaRng``), as a markdown table, a
JSON file and a plot. A sweep can skip prior specs whose coverage is too low before training any.

Coordinates. SSD warps every image to a square input, so the priors see a box in coordinates
relative to its image: ground truth is kept as (N, 4) xyxy in [0, 1] (x / W, y / H), priors are
(P, 4) cxcywh in [0, 1], and the IoU is taken between those, exactly as training's matcher
(``ssd.matching``) does it. Areas for the size buckets stay in original pixels^2, as COCO's
evaluation counts them (COCO uses the annotation's segment area; shards keep only boxes, so this
is the box area: a box is never smaller than its segment, so a few objects land one bucket up).
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssd.boxes import box_iou, cxcywh_to_xyxy
from ssd.coding import BoxCoding
from ssd.config import Config
from ssd.data.shards import ShardSet, read_samples
from ssd.jsonsafe import json_safe

#: COCO's size buckets in pixels^2 (pycocotools ``Params.areaRng``): [low, high)
SIZE_BUCKETS: dict[str, tuple[float, float]] = {
    "all": (0.0, math.inf),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, math.inf),
}
STAT_KEYS = ("boxes", "recall", "mean_best_iou", "positives_per_box")


@dataclass
class GroundTruth:
    """The ground-truth boxes of a dataset, pooled over its images.

    Attributes:
        boxes: (N, 4) float32 xyxy relative to each box's image, in [0, 1] (x / W, y / H).
        areas: (N,) float32 box areas in original image pixels^2 (for the size buckets).
        num_images: images the boxes come from (images without boxes included).
    """

    boxes: Tensor
    areas: Tensor
    num_images: int

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"GroundTruth.boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        if self.areas.shape != self.boxes.shape[:1]:
            raise ValueError(
                f"GroundTruth.areas must be (N,) = ({self.boxes.shape[0]},), got {tuple(self.areas.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]


def ground_truth_from_shards(
    shards: ShardSet, max_images: int | None = None, keep_difficult: bool = False
) -> GroundTruth:
    """Collect the ground-truth boxes of a shard set, without decoding any image.

    Crowd regions are left out (training drops them: ``ShardStream(train=True)``), and so are
    difficult objects unless ``keep_difficult`` (the VOC07 metric ignores them; note that
    training keeps them by default, ``ShardStream(keep_difficult=True)``). Boxes are clipped to
    their image, then divided by its size from the sample's ``width``/``height`` (or, when those
    are missing, the JPEG header).

    Args:
        shards: the split to read, in shard order.
        max_images: read only the first this many images (None: all).
        keep_difficult: count difficult objects too (what training matches by default).
    Returns:
        GroundTruth with (N, 4) relative xyxy boxes in [0, 1] and (N,) pixel areas.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    rel_boxes: list[Tensor] = []
    areas: list[Tensor] = []
    num_images = 0
    for _key, jpg, meta in itertools.islice(read_samples(shards), max_images):
        num_images += 1
        n = len(meta["labels"])
        if n == 0:
            continue
        width, height = _image_size(meta, jpg)
        boxes = torch.tensor(meta["boxes"], dtype=torch.float64).reshape(n, 4)  # pixels
        drop = _flags(meta, "iscrowd", n)
        if not keep_difficult:
            drop |= _flags(meta, "difficult", n)
        keep = ~drop
        boxes = boxes[keep]
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        boxes = torch.minimum(boxes.clamp(min=0), scale)  # clip to the image, in pixels
        areas.append((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0))
        rel_boxes.append(boxes / scale)
    if not rel_boxes:
        return GroundTruth(torch.zeros(0, 4), torch.zeros(0), num_images)
    return GroundTruth(torch.cat(rel_boxes).float(), torch.cat(areas).float(), num_images)


def _flags(meta: dict[str, Any], name: str, n: int) -> Tensor:
    return torch.tensor([bool(v) for v in meta.get(name, [False] * n)], dtype=torch.bool).reshape(n)


def _image_size(meta: dict[str, Any], jpg: bytes) -> tuple[float, float]:
    """(W, H) of a sample: from its meta, or from the JPEG header (no pixels decoded)."""
    if meta.get("width") and meta.get("height"):
        return float(meta["width"]), float(meta["height"])
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as image:  # reads the header only
        width, height = image.size
    return float(width), float(height)


def prior_coverage(
    priors: Tensor, gt: GroundTruth, iou_threshold: float = 0.5, chunk: int = 4096
) -> dict[str, dict[str, float]]:
    """Coverage of ground truth by priors, for all boxes and by COCO size bucket.

    Training's matcher (``ssd.matching.match_priors``) also forces every ground truth's best
    prior to be positive (the bipartite step), so in training every box gets at least one
    positive. ``recall`` here is the fraction that gets one by the threshold rule alone, i.e.
    boxes that do not depend on a single forced, poorly overlapping prior.

    Args:
        priors: (P, 4) cxcywh in [0, 1] (``PriorSpec.generate()``).
        gt: N ground-truth boxes, (N, 4) xyxy in [0, 1], with (N,) areas in pixels^2.
        iou_threshold: IoU at or above which a prior is a positive for a box.
        chunk: ground-truth boxes per IoU block; the block's temporaries take about 3 * chunk * P
            floats (measured: 0.4 GB for 4096 x 8732; 20k boxes x SSD300's priors in 2 s on 2 cores).
    Returns:
        ``{bucket: {"boxes", "recall", "mean_best_iou", "positives_per_box"}}`` for the buckets
        "all", "small" (area < 32^2), "medium" (32^2 <= area < 96^2), "large" (area >= 96^2).
        ``boxes`` is a count; the rest are means over the bucket's boxes, NaN when it is empty.
    """
    if priors.ndim != 2 or priors.shape[-1] != 4:
        raise ValueError(f"priors must be (P, 4) cxcywh, got {tuple(priors.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    prior_boxes = cxcywh_to_xyxy(priors)  # (P, 4) xyxy, unclipped as in the matcher
    gt_boxes = gt.boxes.to(dtype=priors.dtype, device=priors.device)
    best, positives = [], []
    for start in range(0, len(gt), chunk):
        iou = box_iou(gt_boxes[start : start + chunk], prior_boxes)  # (C, P)
        best.append(iou.max(dim=1).values if iou.shape[1] else iou.new_zeros(iou.shape[0]))
        positives.append((iou >= iou_threshold).sum(dim=1))
    best_iou = torch.cat(best).double().cpu() if best else torch.zeros(0, dtype=torch.float64)  # (N,)
    num_pos = torch.cat(positives).double().cpu() if positives else torch.zeros(0, dtype=torch.float64)  # (N,)
    areas = gt.areas.double().cpu()
    out: dict[str, dict[str, float]] = {}
    for name, (low, high) in SIZE_BUCKETS.items():
        mask = (areas >= low) & (areas < high)  # (N,)
        count = int(mask.sum())
        if count == 0:
            out[name] = {"boxes": 0, "recall": math.nan, "mean_best_iou": math.nan, "positives_per_box": math.nan}
            continue
        out[name] = {
            "boxes": count,
            "recall": float((best_iou[mask] >= iou_threshold).double().mean()),
            "mean_best_iou": float(best_iou[mask].mean()),
            "positives_per_box": float(num_pos[mask].mean()),
        }
    return out


def analyze_config(cfg: Config, gt: GroundTruth, iou_threshold: float | None = None) -> dict[str, Any]:
    """Coverage of ``gt`` by the priors of ``cfg``.

    Args:
        cfg: a config; its box coding (``ssd.coding.BoxCoding``: the ``priors`` spec and the
            ``matching`` section) is used.
        gt: the ground truth (see :func:`ground_truth_from_shards`).
        iou_threshold: None uses the config's matching threshold ``matching.iou_threshold`` (0.5).
    Returns:
        ``{"num_priors", "boxes_per_location", "iou_threshold", "num_images", "priors" (the spec
        as a dict), "coverage" (see :func:`prior_coverage`)}``.
    """
    coding = BoxCoding.from_config(cfg)
    threshold = coding.matching.iou_threshold if iou_threshold is None else iou_threshold
    spec = coding.spec
    return {
        "num_priors": spec.num_priors(),
        "boxes_per_location": list(spec.boxes_per_location()),
        "iou_threshold": threshold,
        "num_images": gt.num_images,
        "priors": spec.to_dict(),
        "coverage": prior_coverage(coding.priors(), gt, threshold),
    }


# --------------------------------------------------------------------------------------------
# Reports. A row is (name, result): result is analyze_config's dict, optionally with "values"
# (the sampled search-space values), or {"error": message, ...} for a spec that could not be built.


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def coverage_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table: one line per spec, with the per-bucket box counts in the header.

    Columns: name, priors, recall all / small / medium / large, mean best IoU (all boxes),
    positives per box (all boxes). Rows with sampled ``values`` or an ``error`` are listed
    under the table.
    """
    good = [result for _, result in rows if "error" not in result]
    counts = good[0]["coverage"] if good else {}
    thresholds = {result["iou_threshold"] for result in good}
    threshold = next(iter(thresholds)) if len(thresholds) == 1 else None  # else one per note

    def head(bucket: str) -> str:
        n = counts.get(bucket, {}).get("boxes")
        return f"recall {bucket}" + (f" (n={n})" if n is not None else "")

    header = ["name", "priors", *(head(b) for b in SIZE_BUCKETS), "mean best IoU", "positives/box"]
    if threshold is not None:
        header[2] += f" IoU>={threshold:g}"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    notes = []
    for name, result in rows:
        if "error" in result:
            cells = [name, "-", *("error" for _ in SIZE_BUCKETS), "-", "-"]
            notes.append(f"- {name}: error: {result['error']}")
        else:
            cov = result["coverage"]
            cells = [name, str(result["num_priors"]), *(_fmt(cov[b]["recall"]) for b in SIZE_BUCKETS),
                     _fmt(cov["all"]["mean_best_iou"]), _fmt(cov["all"]["positives_per_box"], 1)]
            values = [f"{k}={_short(v)}" for k, v in (result.get("values") or {}).items()]
            if len(thresholds) > 1:
                values.append(f"IoU>={result['iou_threshold']:g}")
            if values:
                notes.append(f"- {name}: {' '.join(values)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, separators=(",", ":"))


def plot_coverage(rows: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path:
    """Grouped bars per size bucket, one bar per spec: recall (left) and mean best IoU (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [(name, result) for name, result in rows if "error" not in result]
    buckets = list(SIZE_BUCKETS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    width = 0.8 / max(len(good), 1)
    thresholds = sorted({result["iou_threshold"] for _, result in good})
    recall_title = "recall: a prior with IoU >= " + "/".join(f"{t:g}" for t in thresholds)
    for ax, stat, title in ((axes[0], "recall", recall_title), (axes[1], "mean_best_iou", "mean best IoU")):
        for i, (name, result) in enumerate(good):
            values = [result["coverage"][b][stat] for b in buckets]
            xs = [k + (i - (len(good) - 1) / 2) * width for k in range(len(buckets))]
            ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=name)
        counts = good[0][1]["coverage"] if good else {}
        ax.set_xticks(range(len(buckets)),
                      [f"{b}\n(n={counts[b]['boxes']})" if counts else b for b in buckets])
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    if good:  # outside the axes: a sweep's many specs must not hide the bars
        axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(rows: Sequence[tuple[str, dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Write ``coverage.md``, ``coverage.json`` (NaN as null) and ``coverage.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "coverage.md"
    md.write_text(coverage_table(rows))
    js = out_dir / "coverage.json"
    js.write_text(json.dumps({"rows": [{"name": name, **json_safe(result)} for name, result in rows]},
                             indent=2, allow_nan=False) + "\n")
    png = plot_coverage(rows, out_dir / "coverage.png")
    return [md, js, png]
