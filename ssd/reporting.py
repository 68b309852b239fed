"""Evaluation artifacts: a per-class AP table, precision-recall curves, a grid of detections.

Pure functions over the metric dicts of :mod:`ssd.evaluation` and per-image tensors; no Ray and no
MLflow (``ssd.tracking`` uploads what :func:`write_eval_report` writes). Plots use matplotlib's
Agg canvas through the object API (no pyplot, no global backend switch), imported inside the
plotting function so that importing this module stays cheap.

Inputs (ARCHITECTURE.md, "Contracts"):

- ``coco``: the dict of :func:`ssd.evaluation.coco.coco_evaluate` / ``CocoEvaluator.compute``, with
  ``per_class_AP``, ``per_class_AP50`` and ``pr_curve50``; -1 marks a class without ground truth.
- ``voc``: the dict of ``VocEvaluator.compute`` (``{"mAP", "per_class_AP"}``); NaN marks a class
  without ground truth.
- Images: uint8 (N, 3, H, W) RGB. Boxes: (K, 4) ``x1, y1, x2, y2`` in pixels of those images;
  labels int 1..C (``class_names[label - 1]``).

The files have fixed names (:data:`REPORT_FILES`), so each evaluation of a run overwrites the
same artifact paths.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from ssd.draw import PALETTE

__all__ = [
    "REPORT_FILES",
    "detection_grid",
    "mean_row",
    "per_class_table",
    "plot_pr_curves",
    "write_eval_report",
    "write_per_class_table",
]

#: The files :func:`write_eval_report` writes (``detections.png`` only with a sample).
REPORT_FILES: tuple[str, ...] = (
    "per_class_ap.csv",
    "per_class_ap.md",
    "pr_curves.png",
    "detections.png",
)

#: Ground truth's colour in the detection grid (the class palette, ``ssd.draw.PALETTE``, has no
#: green for this reason).
GT_COLOR: tuple[int, int, int] = (0, 255, 0)

_GRID_PADDING = 2  # make_grid's default, named because the layout depends on it


# --------------------------------------------------------------------------------------------
# Per-class table
# --------------------------------------------------------------------------------------------


def _valid(value: Any) -> bool:
    """A metric value that counts: a finite number >= 0 (-1 and NaN mean "no ground truth")."""
    return value is not None and math.isfinite(float(value)) and float(value) >= 0


def per_class_table(coco: Mapping[str, Any], voc: Mapping[str, Any] | None = None) -> list[dict]:
    """One row per class, in the class order of ``coco["per_class_AP"]``.

    Args:
        coco: a COCO result dict with ``per_class_AP`` and ``per_class_AP50`` ({name: float}).
        voc: optionally a VOC result dict with ``per_class_AP`` ({name: float}); a class it
            lacks gets NaN.
    Returns:
        ``[{"class": name, "AP": float, "AP50": float, "VOC07_AP": float (only with voc)}, ...]``
        with the values as given (-1 / NaN kept: see :func:`mean_row` for the averaging rule).
    Raises:
        ValueError: ``coco`` lacks the per-class keys, or the two per-class dicts differ in
            classes.
    """
    for key in ("per_class_AP", "per_class_AP50"):
        if key not in coco:
            raise ValueError(f"coco result has no '{key}' (keys: {sorted(coco)})")
    ap, ap50 = coco["per_class_AP"], coco["per_class_AP50"]
    if list(ap) != list(ap50):
        raise ValueError(
            f"per_class_AP and per_class_AP50 differ in classes: {list(ap)} vs {list(ap50)}"
        )
    rows = []
    for name in ap:
        row: dict[str, Any] = {"class": name, "AP": float(ap[name]), "AP50": float(ap50[name])}
        if voc is not None:
            row["VOC07_AP"] = float(voc["per_class_AP"].get(name, math.nan))
        rows.append(row)
    return rows


def mean_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"class": "mean", column: mean}`` over the numeric columns of ``rows``.

    Each column averages only its valid entries (finite and >= 0), i.e. classes without ground
    truth (-1 in COCO results, NaN in VOC results) are left out, as ``COCOeval.summarize`` and
    the VOC mAP do; a column with no valid entry gets NaN.
    """
    columns = [k for k in (rows[0] if rows else {}) if k != "class"]
    out: dict[str, Any] = {"class": "mean"}
    for col in columns:
        values = [float(r[col]) for r in rows if _valid(r[col])]
        out[col] = sum(values) / len(values) if values else math.nan
    return out


def _md_cell(value: Any) -> str:
    return f"{float(value):.3f}" if _valid(value) else "n/a"


def write_per_class_table(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``per_class_ap.csv`` and ``per_class_ap.md`` into ``out_dir`` (created if missing).

    Both end with the :func:`mean_row`. The CSV keeps full precision and the raw values (-1 /
    ``nan`` for a class without ground truth); the markdown table shows 3 decimals and ``n/a``
    for those.

    Args:
        rows: the output of :func:`per_class_table`.
        out_dir: directory to write into.
    Returns:
        ``[csv path, markdown path]``.
    """
    if not rows:
        raise ValueError("write_per_class_table: no rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    all_rows = [*rows, mean_row(rows)]

    csv_path = out_dir / "per_class_ap.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(all_rows)  # floats as repr: full precision, "-1.0" / "nan" kept

    md_path = out_dir / "per_class_ap.md"
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    for i, row in enumerate(all_rows):
        name = str(row["class"]).replace("|", "\\|")
        if i == len(all_rows) - 1:
            name = f"**{name}**"  # the mean row
        lines.append("| " + " | ".join([name] + [_md_cell(row[c]) for c in columns[1:]]) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [csv_path, md_path]


# --------------------------------------------------------------------------------------------
# Precision-recall curves
# --------------------------------------------------------------------------------------------


def plot_pr_curves(
    pr_curve50: Mapping[str, Any],
    path: str | Path,
    title: str = "Precision-recall at IoU 0.50",
) -> Path:
    """Plot one precision-recall line per class and save it as a PNG.

    Args:
        pr_curve50: ``{"recall": (R,) floats, "precision": {name: (R,) floats}}`` as in the
            COCO result (R = 101); -1 entries mean "no ground truth": a class whose entries are
            all -1 is skipped, other -1 entries are not drawn.
        path: the PNG to write (parent directories are created).
        title: the figure title.
    Returns:
        ``path``. The legend gives each class's AP50, the mean of its valid precisions (what
        ``per_class_AP50`` is); with no class to draw the figure says so.
    """
    # Object API on an Agg canvas: no pyplot state, no global backend switch, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recall = [float(r) for r in pr_curve50["recall"]]
    curves = []
    for name, precision in pr_curve50["precision"].items():
        p = [float(v) for v in precision]
        if len(p) != len(recall):
            raise ValueError(f"class {name!r}: {len(p)} precisions for {len(recall)} recalls")
        valid = [v for v in p if v > -1]
        if valid:
            curves.append((name, [v if v > -1 else math.nan for v in p], sum(valid) / len(valid)))

    ncol = 1 + len(curves) // 25  # COCO's 80 classes: 4 legend columns
    fig = Figure(figsize=(6 + 2.2 * ncol, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = _colormap(len(curves))
    for i, (name, precision, ap50) in enumerate(curves):
        # steps-post: pycocotools' precision at recall threshold r holds until the next one.
        ax.plot(
            recall,
            precision,
            color=cmap[i],
            linewidth=1.2,
            drawstyle="steps-post",
            label=f"{name} ({ap50:.3f})",
        )
    if not curves:
        ax.text(0.5, 0.5, "no class has ground truth", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(
            title="class (AP50)",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="x-small",
            ncol=ncol,
            frameon=False,
        )
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _colormap(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinguishable colours (tab10/tab20 while they last, then a continuous map)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Detection grid
# --------------------------------------------------------------------------------------------


def _boxes_in_image(boxes: Any, height: int, width: int, what: str) -> Tensor:
    """(K, 4) float xyxy pixels clamped into the image (so that every edge stays visible)."""
    b = torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)
    if not torch.isfinite(b).all():
        raise ValueError(f"{what}: boxes have non-finite values")
    if (b[:, 2:] < b[:, :2]).any():
        raise ValueError(f"{what}: boxes must be xyxy with x2 >= x1 and y2 >= y1")
    b[:, 0::2] = b[:, 0::2].clamp(0, width - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, height - 1)
    return b


def _labels(labels: Any, count: int, num_classes: int, what: str) -> list[int]:
    out = torch.as_tensor(labels).detach().cpu().reshape(-1).to(torch.int64).tolist()
    if len(out) != count:
        raise ValueError(f"{what}: {len(out)} labels for {count} boxes")
    bad = [v for v in out if not 1 <= v <= num_classes]
    if bad:
        raise ValueError(f"{what}: labels must be in 1..{num_classes}, got {sorted(set(bad))}")
    return out


def detection_grid(
    images: Tensor | Sequence[Tensor],
    detections: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    path: str | Path,
    *,
    ground_truth: Sequence[Mapping[str, Any]] | None = None,
    score_threshold: float = 0.3,
    columns: int = 4,
) -> Path:
    """Draw ground truth and detections on each image, tile them, save a PNG.

    Ground truth is drawn first, 1 px in :data:`GT_COLOR` without captions; detections with
    ``score >= score_threshold`` on top, 2 px in their class's :data:`ssd.draw.PALETTE` colour
    with a ``"name score"`` caption (torchvision's ``draw_bounding_boxes``). Boxes are clamped into
    the image. Images are tiled by ``make_grid(nrow=columns, padding=2)``: the PNG is
    ``(rows * (H + 2) + 2) x (min(N, columns) * (W + 2) + 2)`` with ``rows = ceil(N / columns)``
    and padding value 0 (black); a single image comes back unpadded, ``H x W``, as make_grid
    returns it.

    Args:
        images: uint8 (N, 3, H, W) RGB, or N uint8 (3, H, W) tensors of one size.
        detections: per image ``{"boxes": (K, 4) xyxy pixels of that image, "scores": (K,),
            "labels": (K,) int 1..C}``; K may be 0.
        class_names: the C class names; label ``l`` is ``class_names[l - 1]``.
        path: the PNG to write (parent directories are created).
        ground_truth: optionally per image ``{"boxes": (G, 4) xyxy pixels, "labels": (G,)}``;
            G may be 0.
        score_threshold: detections scoring below it are not drawn.
        columns: images per grid row.
    Returns:
        ``path``.
    """
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(f"images: expected (N, 3, H, W), got {tuple(images.shape)}")
    batch = list(images)
    if not batch:
        raise ValueError("detection_grid: no images")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if len(detections) != len(batch):
        raise ValueError(f"{len(batch)} images but {len(detections)} detection entries")
    if ground_truth is not None and len(ground_truth) != len(batch):
        raise ValueError(f"{len(batch)} images but {len(ground_truth)} ground-truth entries")
    num_classes = len(class_names)

    drawn = []
    for i, image in enumerate(batch):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image {i}: expected uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        image = image.detach().cpu()
        height, width = image.shape[1:]
        if ground_truth is not None:
            gt = ground_truth[i]
            boxes = _boxes_in_image(gt["boxes"], height, width, f"ground_truth[{i}]")
            _labels(gt["labels"], len(boxes), num_classes, f"ground_truth[{i}]")
            if len(boxes):
                image = draw_bounding_boxes(image, boxes, colors=GT_COLOR, width=1)
        det = detections[i]
        boxes = _boxes_in_image(det["boxes"], height, width, f"detections[{i}]")
        scores = torch.as_tensor(det["scores"], dtype=torch.float32).detach().cpu().reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"detections[{i}]: {len(scores)} scores for {len(boxes)} boxes")
        labels = _labels(det["labels"], len(boxes), num_classes, f"detections[{i}]")
        keep = (scores >= score_threshold).nonzero().flatten().tolist()
        if keep:
            # Lowest score first, so that the most confident box and caption end up on top.
            keep.sort(key=lambda k: float(scores[k]))
            image = draw_bounding_boxes(
                image,
                boxes[keep],
                labels=[f"{class_names[labels[k] - 1]} {float(scores[k]):.2f}" for k in keep],
                colors=[PALETTE[(labels[k] - 1) % len(PALETTE)] for k in keep],
                width=2,
                fill_labels=True,  # black text on a box-coloured background: readable anywhere
            )
        drawn.append(image)

    grid = make_grid(torch.stack(drawn), nrow=columns, padding=_GRID_PADDING)  # (3, H', W')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")
    return path


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def write_eval_report(
    out_dir: str | Path,
    coco: Mapping[str, Any],
    class_names: Sequence[str],
    voc: Mapping[str, Any] | None = None,
    sample: tuple[Tensor, Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]] | None]
    | None = None,
) -> list[Path]:
    """Write the evaluation artifacts of one evaluation into ``out_dir``.

    Files (:data:`REPORT_FILES`): ``per_class_ap.csv`` and ``per_class_ap.md``
    (:func:`write_per_class_table`), ``pr_curves.png`` (:func:`plot_pr_curves`) and, with a
    ``sample``, ``detections.png`` (:func:`detection_grid`).

    Args:
        out_dir: directory to write into (created if missing; existing files are overwritten).
        coco: a COCO result dict (``CocoEvaluator.compute``).
        class_names: the C class names, in label order; must be the classes of ``coco``.
        voc: optionally a VOC result dict (adds a ``VOC07_AP`` column).
        sample: optionally ``(images uint8 (N, 3, H, W), detections, ground_truth or None)`` as
            :func:`detection_grid` takes them.
    Returns:
        The paths written, in the order above.
    """
    names = [str(n) for n in class_names]
    if list(coco.get("per_class_AP", {})) != names:
        raise ValueError(
            f"class_names {names} are not the classes of the COCO result "
            f"{list(coco.get('per_class_AP', {}))}"
        )
    out_dir = Path(out_dir)
    paths = write_per_class_table(per_class_table(coco, voc), out_dir)
    title = "Precision-recall at IoU 0.50"
    if "AP50" in coco:
        title += f" (AP50 {float(coco['AP50']):.3f})"
    paths.append(plot_pr_curves(coco["pr_curve50"], out_dir / "pr_curves.png", title=title))
    if sample is not None:
        images, detections, ground_truth = sample
        paths.append(
            detection_grid(
                images, detections, names, out_dir / "detections.png", ground_truth=ground_truth
            )
        )
    return paths


def plot_sweep(rows: list[dict], searched: Sequence[str], path: Path, score: str = "best_mAP") -> Path:
    """One panel per searched key: each trial's ``score`` against its value (categorical values,
    e.g. aspect-ratio sets, on an index axis labelled with the values). Trials that never
    trained (score < 0) are left out. Returns ``path`` (PNG)."""


    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trained = [r for r in rows if r.get(score, -1) is not None and r.get(score, -1) >= 0]
    keys = list(searched) or ["trial"]
    columns = min(3, len(keys))
    lines = -(-len(keys) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * lines), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(lines, columns, i + 1)
        values = [r.get(key) for r in trained]
        scores = [r[score] for r in trained]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, scores)
            if key.endswith(".lr") and min(values) > 0:
                ax.set_xscale("log")
        else:
            labels = sorted({json.dumps(v) for v in values})
            ax.scatter([labels.index(json.dumps(v)) for v in values], scores)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([lab if len(lab) <= 18 else lab[:16] + "…" for lab in labels], rotation=30,
                               ha="right", fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
