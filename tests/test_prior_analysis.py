"""ssd.prior_analysis and pipelines/analyze_priors.py: hand-computed coverage, real shards, the CLI."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssd.config import load_config
from ssd.data.convert import ensure_synthetic_shards
from ssd.data.shards import (
    DATASET_JSON,
    FORMAT_NAME,
    FORMAT_VERSION,
    ShardSet,
    ShardWriter,
    read_samples,
)
from ssd.prior_analysis import (
    GroundTruth,
    analyze_config,
    coverage_table,
    ground_truth_from_shards,
    prior_coverage,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "analyze_priors.py"

sys.path.insert(0, str(ROOT / "pipelines"))
import analyze_priors

# Two priors (cxcywh): A is the top-left quarter [0, 0, .5, .5], B the bottom-right one
# [.5, .5, 1, 1]. The third repeats A, so a box identical to A has two positives.
PRIORS = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
GT_BOXES = torch.tensor([
    [0.0, 0.0, 0.5, 0.5],    # = A: IoU 1 with A twice, 0 with B (they only touch at a corner)
    [0.25, 0.0, 0.75, 0.5],  # A shifted by half its width: inter .125, union .375 -> IoU 1/3
    [0.6, 0.0, 0.9, 0.3],    # overlaps nothing: IoU 0
    [0.5, 0.5, 1.0, 1.0],    # = B: IoU 1 with B only
])
# pixels^2: small, medium (50^2), medium (exactly 32^2: medium's lower edge), large (exactly 96^2)
GT_AREAS = torch.tensor([100.0, 2500.0, 1024.0, 9216.0])


def hand_gt() -> GroundTruth:
    return GroundTruth(GT_BOXES.clone(), GT_AREAS.clone(), num_images=2)


def test_hand_computed_coverage_per_bucket():
    cov = prior_coverage(PRIORS, hand_gt(), iou_threshold=0.5)
    # best IoU per box: 1, 1/3, 0, 1; positives (IoU >= .5): 2, 0, 0, 1
    assert cov["all"]["boxes"] == 4
    assert cov["all"]["recall"] == pytest.approx(2 / 4)
    assert cov["all"]["mean_best_iou"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert cov["all"]["positives_per_box"] == pytest.approx(3 / 4)
    assert cov["small"] == pytest.approx({"boxes": 1, "recall": 1.0, "mean_best_iou": 1.0, "positives_per_box": 2.0})
    assert cov["medium"] == pytest.approx({"boxes": 2, "recall": 0.0, "mean_best_iou": 1 / 6, "positives_per_box": 0.0})
    assert cov["large"] == pytest.approx({"boxes": 1, "recall": 1.0, "mean_best_iou": 1.0, "positives_per_box": 1.0})


def test_threshold_below_one_third_counts_the_half_overlapping_box():
    cov = prior_coverage(PRIORS, hand_gt(), iou_threshold=0.3)
    assert cov["all"]["recall"] == pytest.approx(3 / 4)
    assert cov["all"]["positives_per_box"] == pytest.approx((2 + 2 + 0 + 1) / 4)  # box 2 hits A twice
    assert cov["medium"]["recall"] == pytest.approx(1 / 2)


def test_iou_exactly_at_the_threshold_is_a_positive():
    # the top half of A: inter .125, union .25 -> IoU exactly 0.5 (dyadic, exact in float32);
    # the matcher counts IoU >= threshold
    gt = GroundTruth(torch.tensor([[0.0, 0.0, 0.5, 0.25]]), torch.tensor([5000.0]), num_images=1)
    cov = prior_coverage(PRIORS[:2], gt, iou_threshold=0.5)
    assert cov["medium"] == {"boxes": 1, "recall": 1.0, "mean_best_iou": 0.5, "positives_per_box": 1.0}


def test_area_just_below_32_squared_is_small():
    gt = GroundTruth(GT_BOXES[:1], torch.tensor([32.0**2 - 0.5]), num_images=1)
    cov = prior_coverage(PRIORS, gt)
    assert (cov["small"]["boxes"], cov["medium"]["boxes"]) == (1, 0)


def test_empty_bucket_gives_nan_and_zero_boxes():
    gt = GroundTruth(GT_BOXES[:2], torch.tensor([10.0, 20.0]), num_images=1)  # both small
    cov = prior_coverage(PRIORS, gt)
    assert cov["small"]["boxes"] == 2 and cov["all"]["boxes"] == 2
    for bucket in ("medium", "large"):
        assert cov[bucket]["boxes"] == 0
        assert all(math.isnan(cov[bucket][k]) for k in ("recall", "mean_best_iou", "positives_per_box"))


def test_no_ground_truth_at_all():
    cov = prior_coverage(PRIORS, GroundTruth(torch.zeros(0, 4), torch.zeros(0), num_images=3))
    assert all(cov[b]["boxes"] == 0 and math.isnan(cov[b]["recall"]) for b in cov)


def test_chunking_gives_identical_results():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=gen) * 0.8
    wh = torch.rand(300, 2, generator=gen) * 0.5 + 0.01
    gt = GroundTruth(torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=1), torch.rand(300, generator=gen) * 150**2, 1)
    priors = load_config("tiny").priors.generate()
    whole = prior_coverage(priors, gt, chunk=4096)
    assert all(whole[b]["boxes"] > 0 for b in whole)  # every bucket populated, so no NaN below
    for chunk in (1, 7, 299):
        assert prior_coverage(priors, gt, chunk=chunk) == whole


def test_groundtruth_checks_shapes():
    with pytest.raises(ValueError, match="areas"):
        GroundTruth(torch.zeros(3, 4), torch.zeros(2), 1)


# --------------------------------------------------------------------------------------------
# From shards


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def hand_shards(tmp_path) -> ShardSet:
    """Three images: crowd, difficult, an out-of-image box, one without width/height, one empty."""
    writer = ShardWriter(tmp_path, max_samples=2)
    writer.write("a", _jpeg(200, 100), {
        "boxes": [[20, 10, 60, 50], [0, 0, 10, 10], [50, 50, 100, 100], [150, 80, 250, 120]],
        "labels": [1, 1, 2, 2], "iscrowd": [False, True, False, False],
        "difficult": [False, False, True, False], "width": 200, "height": 100, "image_id": 1})
    writer.write("b", _jpeg(64, 32), {"boxes": [[16, 8, 48, 24]], "labels": [1], "image_id": 2})  # size from JPEG
    writer.write("c", _jpeg(40, 40), {"boxes": [], "labels": [], "width": 40, "height": 40, "image_id": 3})
    info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "classes": ["x", "y"], "shards": writer.close()}
    (tmp_path / DATASET_JSON).write_text(json.dumps(info))
    return ShardSet.open(tmp_path)


def test_ground_truth_from_hand_written_shards(hand_shards):
    gt = ground_truth_from_shards(hand_shards)
    assert gt.num_images == 3
    expected = torch.tensor([
        [0.1, 0.1, 0.3, 0.5],     # 20/200, 10/100, 60/200, 50/100
        [0.75, 0.8, 1.0, 1.0],    # [150, 80, 250, 120] clipped to [150, 80, 200, 100]
        [0.25, 0.25, 0.75, 0.75], # 64 x 32 read from the JPEG header
    ])
    torch.testing.assert_close(gt.boxes, expected)
    torch.testing.assert_close(gt.areas, torch.tensor([40.0 * 40, 50.0 * 20, 32.0 * 16]))

    first = ground_truth_from_shards(hand_shards, max_images=1)
    assert first.num_images == 1
    torch.testing.assert_close(first.boxes, expected[:2])

    with_difficult = ground_truth_from_shards(hand_shards, max_images=1, keep_difficult=True)
    torch.testing.assert_close(with_difficult.boxes, torch.tensor([expected[0].tolist(), [0.25, 0.5, 0.5, 1.0],
                                                                   expected[1].tolist()]))
    torch.testing.assert_close(with_difficult.areas, torch.tensor([1600.0, 2500.0, 1000.0]))  # crowd still out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("synthetic"), 64, 8, log=lambda _: None)


def test_ground_truth_from_synthetic_shards(synthetic):
    shards = ShardSet.open(synthetic / "train")
    info = json.loads((synthetic / "train" / DATASET_JSON).read_text())
    gt = ground_truth_from_shards(shards)
    assert gt.num_images == info["num_samples"] == 64
    assert len(gt) == info["num_objects"] - info["num_iscrowd"] - info["num_difficult"] > 0
    assert gt.boxes.min() >= 0 and gt.boxes.max() <= 1
    assert bool((gt.boxes[:, 2:] > gt.boxes[:, :2]).all()) and bool((gt.areas > 0).all())
    # the areas are the pixel boxes' areas: recompute from the samples
    pixel_areas = [(x2 - x1) * (y2 - y1) for _, _, meta in read_samples(shards) for x1, y1, x2, y2 in meta["boxes"]]
    torch.testing.assert_close(gt.areas, torch.tensor(pixel_areas))


def test_more_and_larger_priors_cover_more(synthetic):
    gt = ground_truth_from_shards(ShardSet.open(synthetic / "train"))
    rich = analyze_config(load_config("tiny"), gt)
    poor = analyze_config(load_config("tiny", ["priors.aspect_ratios=[[], [], [], [], []]", "priors.extra_box=false"]), gt)
    assert poor["boxes_per_location"] == [1] * 5 and rich["num_priors"] > poor["num_priors"]
    assert rich["iou_threshold"] == 0.5 and rich["num_images"] == 64
    assert rich["coverage"]["all"]["recall"] > poor["coverage"]["all"]["recall"]
    assert rich["coverage"]["all"]["mean_best_iou"] > poor["coverage"]["all"]["mean_best_iou"]
    assert rich["coverage"]["all"]["positives_per_box"] > poor["coverage"]["all"]["positives_per_box"]


# --------------------------------------------------------------------------------------------
# Reports and the CLI


def test_table_and_report_with_nan_and_error_rows(tmp_path):
    result = analyze_config(load_config("tiny"), GroundTruth(GT_BOXES[:2], torch.tensor([10.0, 20.0]), 1))
    rows = [("ok", result), ("broken", {"error": "priors.s_min 0.9 >= s_max", "values": {"priors.s_min": 0.9}})]
    table = coverage_table(rows)
    assert table.startswith("| name | priors | recall all (n=2) IoU>=0.5 | recall small (n=2) |")
    ok_line = next(line for line in table.splitlines() if line.startswith("| ok |"))
    cells = [cell.strip() for cell in ok_line.strip("|").split("|")]
    assert cells[1] == "1524" and cells[4:6] == ["n/a", "n/a"]  # medium and large are empty
    assert "| broken | - | error | error | error | error | - | - |" in table
    assert "- broken: error: priors.s_min 0.9 >= s_max" in table

    paths = write_report(rows, tmp_path / "report")
    assert [p.name for p in paths] == ["coverage.md", "coverage.json", "coverage.png"]
    assert paths[0].read_text() == table
    data = json.loads(paths[1].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert [r["name"] for r in data["rows"]] == ["ok", "broken"]
    assert data["rows"][0]["coverage"]["medium"] == {"boxes": 0, "recall": None, "mean_best_iou": None,
                                                     "positives_per_box": None}
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_one_config(synthetic, tmp_path, capsys):
    out = tmp_path / "one"
    args = analyze_priors.get_args_parser().parse_args(
        ["--data", str(synthetic), "--config", "tiny", "--out", str(out), "priors.s_min=0.15"])
    rows = analyze_priors.main(args)
    printed = capsys.readouterr().out
    assert "of " + str(synthetic / "train") in printed  # DIR/train was picked
    assert [name for name, _ in rows] == ["tiny priors.s_min=0.15"]
    assert rows[0][1]["priors"]["s_min"] == 0.15
    assert "| tiny priors.s_min=0.15 | 1524 |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["coverage.json", "coverage.md", "coverage.png"]


def test_cli_search_space(synthetic, tmp_path, capsys):
    out = tmp_path / "space"
    args = analyze_priors.get_args_parser().parse_args(
        ["--data", str(synthetic / "train"), "--space", str(ROOT / "tune_spaces" / "priors.yaml"),
         "--samples", "2", "--max-images", "16", "--out", str(out)])
    rows = analyze_priors.main(args)
    assert [name for name, _ in rows] == ["base", "sample-1", "sample-2"]
    assert rows[0][1]["num_images"] == 16 and "values" not in rows[0][1]
    assert all(set(r["values"]) == {"priors.s_min", "priors.s_max", "priors.aspect_ratios", "priors.extra_box"}
               for _, r in rows[1:])
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| sample-2 |" in printed and "- sample-1: priors.s_min=" in printed
    data = json.loads((out / "coverage.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["base", "sample-1", "sample-2"]
    assert (out / "coverage.png").stat().st_size > 0 and sum(line.startswith("| ") for line in (out / "coverage.md").read_text().splitlines()) == 4


def test_cli_lists_an_unbuildable_combination_instead_of_crashing(synthetic, tmp_path, capsys):
    # each value is valid on its own with the tiny base (s_min 0.2, s_max 0.9); s_min 0.85 with
    # s_max 0.8 is not
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  priors.s_min: {choice: [0.85]}\n  priors.s_max: {grid: [0.8, 0.95]}\n")
    args = analyze_priors.get_args_parser().parse_args(
        ["--data", str(synthetic), "--space", str(space), "--samples", "1", "--max-images", "8"])
    rows = analyze_priors.main(args)
    assert [name for name, _ in rows] == ["base", "sample-1", "sample-2"]
    assert "priors.s_min must be < priors.s_max (0.8), got 0.85" in rows[1][1]["error"] and "error" not in rows[2][1]
    assert "| sample-1 | - | error |" in capsys.readouterr().out


def test_cli_missing_data_fails_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-shards"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(missing)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "error" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_folder_without_shards_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        analyze_priors.main(analyze_priors.get_args_parser().parse_args(["--data", str(tmp_path)]))
