"""Tests for ssd.reporting: per-class table, PR plot, detection grid, the report directory."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.draw import PALETTE
from ssd.evaluation import CocoEvaluator, VocEvaluator
from ssd.reporting import (
    GT_COLOR,
    REPORT_FILES,
    detection_grid,
    mean_row,
    per_class_table,
    plot_pr_curves,
    write_eval_report,
    write_per_class_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["cat", "dog", "bird"]

# A hand-made result: "dog" has no GT (-1 in COCO, NaN in VOC).
COCO = {
    "AP50": 0.625,
    "per_class_AP": {"cat": 0.5, "dog": -1.0, "bird": 0.25},
    "per_class_AP50": {"cat": 0.75, "dog": -1.0, "bird": 0.5},
}
VOC = {"mAP": 0.6, "per_class_AP": {"cat": 0.8, "dog": math.nan, "bird": 0.4}}


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def test_per_class_table_rows_and_mean() -> None:
    rows = per_class_table(COCO)
    assert rows == [
        {"class": "cat", "AP": 0.5, "AP50": 0.75},
        {"class": "dog", "AP": -1.0, "AP50": -1.0},
        {"class": "bird", "AP": 0.25, "AP50": 0.5},
    ]
    rows = per_class_table(COCO, VOC)
    assert [r["class"] for r in rows] == NAMES
    assert [list(r) for r in rows] == [["class", "AP", "AP50", "VOC07_AP"]] * 3
    assert rows[0]["VOC07_AP"] == 0.8 and math.isnan(rows[1]["VOC07_AP"])
    # The mean leaves out -1 and NaN: (0.5 + 0.25) / 2, (0.75 + 0.5) / 2, (0.8 + 0.4) / 2.
    assert mean_row(rows) == pytest.approx(
        {"class": "mean", "AP": 0.375, "AP50": 0.625, "VOC07_AP": 0.6}, abs=1e-12
    )
    # A column without a valid entry averages to NaN, not to -1 or 0.
    empty = mean_row([{"class": "x", "AP": -1.0}])
    assert math.isnan(empty["AP"])


def test_per_class_table_needs_the_per_class_keys() -> None:
    with pytest.raises(ValueError, match="per_class_AP50"):
        per_class_table({"per_class_AP": {"cat": 0.5}})


def test_write_per_class_table_csv_and_markdown(tmp_path: Path) -> None:
    paths = write_per_class_table(per_class_table(COCO, VOC), tmp_path / "new")
    assert [p.name for p in paths] == ["per_class_ap.csv", "per_class_ap.md"]

    with paths[0].open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == [*NAMES, "mean"]
    assert list(table[0]) == ["class", "AP", "AP50", "VOC07_AP"]
    # Full precision and the raw "no GT" markers in the CSV.
    assert float(table[0]["AP"]) == 0.5 and float(table[1]["AP50"]) == -1.0
    assert math.isnan(float(table[1]["VOC07_AP"]))
    assert [float(table[3][k]) for k in ("AP", "AP50", "VOC07_AP")] == pytest.approx(
        [0.375, 0.625, 0.6], abs=1e-12
    )

    assert paths[1].read_text().splitlines() == [
        "| class | AP | AP50 | VOC07_AP |",
        "|:---|---:|---:|---:|",
        "| cat | 0.500 | 0.750 | 0.800 |",
        "| dog | n/a | n/a | n/a |",
        "| bird | 0.250 | 0.500 | 0.400 |",
        "| **mean** | 0.375 | 0.625 | 0.600 |",
    ]


# --------------------------------------------------------------------------------------------
# PR curves
# --------------------------------------------------------------------------------------------


def _pr_curve() -> dict:
    recall = [i / 100 for i in range(101)]
    return {
        "recall": recall,
        "precision": {
            "cat": [1.0] * 60 + [0.5] * 20 + [0.0] * 21,
            "dog": [-1.0] * 101,  # no GT: skipped
            "bird": [0.8] * 101,
        },
    }


def test_plot_pr_curves_writes_a_png(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    labels = []
    original = Axes.plot

    def recording_plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    path = plot_pr_curves(_pr_curve(), tmp_path / "sub" / "pr.png", title="test")
    assert path == tmp_path / "sub" / "pr.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    with Image.open(path) as img:
        img.verify()
    # One line per class with GT, the legend carrying each class's AP50 (the curve's mean).
    assert labels == [f"cat ({(60 + 10) / 101:.3f})", "bird (0.800)"]


def test_plot_pr_curves_without_any_class(tmp_path: Path) -> None:
    curve = {"recall": [0.0, 1.0], "precision": {"dog": [-1.0, -1.0]}}
    path = plot_pr_curves(curve, tmp_path / "pr.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="3 precisions for 2 recalls"):
        plot_pr_curves({"recall": [0.0, 1.0], "precision": {"x": [1, 1, 1]}}, tmp_path / "b.png")


# --------------------------------------------------------------------------------------------
# Detection grid
# --------------------------------------------------------------------------------------------

H, W, PAD = 40, 60, 2


def _empty_det() -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}


def _origin(index: int, columns: int) -> tuple[int, int]:
    """Top-left (y, x) of image ``index`` in make_grid's layout with padding 2."""
    row, col = divmod(index, columns)
    return PAD + row * (H + PAD), PAD + col * (W + PAD)


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_detection_grid_layout_and_pixels(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    # Textured images (values 60..189, never a palette colour exactly by accident at the
    # probed pixels: those are checked against the input, not against a constant).
    images = torch.randint(60, 190, (5, 3, H, W), generator=gen, dtype=torch.uint8)
    detections = [
        _empty_det(),  # image 0: nothing
        {  # image 1: a confident cat
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
        },
        {  # image 2: a detection below the threshold: not drawn
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
            "scores": torch.tensor([0.1]),
            "labels": torch.tensor([2]),
        },
        _empty_det(),  # image 3: ground truth only
        _empty_det(),  # image 4: nothing
    ]
    no_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    ground_truth = [no_gt, no_gt, no_gt, {"boxes": [[5, 5, 50, 35]], "labels": [3]}, no_gt]
    path = detection_grid(
        images, detections, NAMES, tmp_path / "grid.png", ground_truth=ground_truth, columns=4
    )
    grid = _read_png(path)
    # N = 5, 4 columns -> 2 rows: make_grid's (rows * (H + 2) + 2, cols * (W + 2) + 2).
    assert grid.shape == (3, 2 * (H + PAD) + PAD, 4 * (W + PAD) + PAD)

    def tile(i: int) -> torch.Tensor:
        y, x = _origin(i, 4)
        return grid[:, y : y + H, x : x + W]

    # Untouched images come back exactly (lossless PNG).
    for i in (0, 2, 4):
        assert torch.equal(tile(i), images[i]), i
    # Image 1: the box's left edge (x = 10, below the caption) has the class colour; pixels
    # far from the box are unchanged.
    t1 = tile(1)
    assert not torch.equal(t1[:, 28, 10], images[1][:, 28, 10])
    assert tuple(t1[:, 28, 10].tolist()) == PALETTE[0]
    assert tuple(t1[:, 30, 20].tolist()) == PALETTE[0]  # bottom edge
    assert torch.equal(t1[:, 35:, 40:], images[1][:, 35:, 40:])
    assert torch.equal(t1[:, :8, :], images[1][:, :8, :])
    # Image 3: the GT box edge in the GT colour, its inside unchanged (no caption for GT).
    t3 = tile(3)
    assert tuple(t3[:, 20, 5].tolist()) == GT_COLOR
    assert tuple(t3[:, 5, 30].tolist()) == GT_COLOR
    assert torch.equal(t3[:, 8:32, 8:47], images[3][:, 8:32, 8:47])
    # The three empty slots of the second row are padding (0).
    y, x = _origin(5, 4)
    assert (grid[:, y:, x:] == 0).all()


def test_detection_grid_zero_detections_and_no_gt(tmp_path: Path) -> None:
    image = torch.full((1, 3, H, W), 128, dtype=torch.uint8)
    path = detection_grid(image, [_empty_det()], NAMES, tmp_path / "g.png")
    grid = _read_png(path)
    # make_grid returns a single image as it is, without padding.
    assert torch.equal(grid, image[0])
    # Empty ground truth too.
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    path = detection_grid(image, [_empty_det()], NAMES, tmp_path / "h.png", ground_truth=no_gt)
    assert torch.equal(_read_png(path), grid)


def test_detection_grid_rejects_bad_input(tmp_path: Path) -> None:
    image = torch.zeros(1, 3, H, W, dtype=torch.uint8)
    det = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "scores": [0.9], "labels": [4]}
    with pytest.raises(ValueError, match=r"labels must be in 1..3"):
        detection_grid(image, [det], NAMES, tmp_path / "x.png")
    with pytest.raises(ValueError, match="1 images but 2 detection entries"):
        detection_grid(image, [_empty_det(), _empty_det()], NAMES, tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        detection_grid(image.float(), [_empty_det()], NAMES, tmp_path / "x.png")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _tiny_eval() -> tuple[dict, dict, tuple]:
    """A real COCO and VOC result on 3 images; "bird" has no ground truth."""
    coco, voc = CocoEvaluator(NAMES), VocEvaluator(NAMES)
    images = torch.full((3, 3, H, W), 100, dtype=torch.uint8)
    gts = [
        {"boxes": torch.tensor([[5.0, 5.0, 25.0, 25.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 10.0, 55.0, 35.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    dets = [
        {  # the cat, found
            "boxes": torch.tensor([[5.0, 5.0, 25.0, 24.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
        },
        {  # a higher-scoring false dog, then the dog
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 10.0, 55.0, 35.0]]),
            "scores": torch.tensor([0.95, 0.6]),
            "labels": torch.tensor([2, 2]),
        },
        _empty_det(),
    ]
    for i, (g, d) in enumerate(zip(gts, dets, strict=True)):
        for evaluator in (coco, voc):
            evaluator.add(i, W, H, g["boxes"], g["labels"], d["boxes"], d["scores"], d["labels"])
    return coco.compute(), voc.compute(), (images, dets, gts)


def test_write_eval_report_writes_the_four_files(tmp_path: Path) -> None:
    coco, voc, sample = _tiny_eval()
    assert coco["per_class_AP50"] == pytest.approx({"cat": 1.0, "dog": 0.5, "bird": -1.0})
    out = tmp_path / "eval" / "epoch_3"
    paths = write_eval_report(out, coco, NAMES, voc=voc, sample=sample)
    assert [p.name for p in paths] == list(REPORT_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
    md = (out / "per_class_ap.md").read_text()
    assert "| cat | 1.000 | 1.000 | 1.000 |" in md
    assert "| bird | n/a | n/a | n/a |" in md
    assert "| dog | " in md and "**mean**" in md
    for name in ("pr_curves.png", "detections.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(out / "detections.png") as img:
        assert img.size == (3 * (W + PAD) + PAD, H + 2 * PAD)

    # Without a sample (and without VOC): the three other files, overwritten in place.
    paths = write_eval_report(out, coco, NAMES)
    assert [p.name for p in paths] == list(REPORT_FILES[:3])
    assert "VOC07_AP" not in (out / "per_class_ap.md").read_text()


def test_write_eval_report_checks_class_names(tmp_path: Path) -> None:
    coco, _, _ = _tiny_eval()
    with pytest.raises(ValueError, match="not the classes"):
        write_eval_report(tmp_path, coco, ["cat", "bird", "dog"])
