"""Tests for ssd.evaluation (COCO via pycocotools, VOC devkit AP) and pipelines/evaluate.py."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssd.evaluation import (
    COCO_STAT_NAMES,
    CocoEvaluator,
    VocEvaluator,
    coco_evaluate,
    voc_ap,
    voc_evaluate,
)

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["cat", "dog", "bird"]


# --------------------------------------------------------------------------------------------
# Synthetic COCO data
# --------------------------------------------------------------------------------------------


def make_coco_set(
    seed: int = 0, cat_ids: tuple[int, ...] = (1, 2, 3), num_images: int = 8, crowd: bool = True
) -> tuple[dict, list[dict]]:
    """A GT dict and a results list: several classes and images, crowd boxes, all sizes.

    Coordinates are integers (exact in float32 and in x+w), scores are float32-representable,
    so the tensor path (CocoEvaluator) and the JSON path see bit-identical numbers.
    """
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    sides = {"small": (8, 28), "medium": (40, 90), "large": (120, 300)}
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id, "width": 640, "height": 480, "file_name": f"{img_id}.jpg"})
        # The last image has no ground truth at all: only false positives.
        n_gt = 0 if img_id == num_images else int(rng.integers(2, 7))
        for _ in range(n_gt):
            lo, hi = sides[rng.choice(list(sides))]
            w, h = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
            x, y = int(rng.integers(0, 640 - w)), int(rng.integers(0, 480 - h))
            cat = int(rng.choice(cat_ids))
            is_crowd = int(crowd and rng.random() < 0.15)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": is_crowd,
                }
            )
            if rng.random() < 0.8:  # a detection near the object, localisation of varying quality
                j = rng.integers(-6, 7, size=4)
                bw, bh = max(1, w + int(j[2])), max(1, h + int(j[3]))
                dets.append(
                    {
                        "image_id": img_id,
                        "category_id": cat,
                        "bbox": [x + int(j[0]), y + int(j[1]), bw, bh],
                        "score": float(np.float32(rng.random())),
                    }
                )
                if rng.random() < 0.2:  # a duplicate at lower score
                    dets.append({**dets[-1], "score": float(np.float32(rng.random() * 0.5))})
        for _ in range(int(rng.integers(0, 4))):  # false positives
            w, h = int(rng.integers(8, 200)), int(rng.integers(8, 200))
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [int(rng.integers(0, 640 - w)), int(rng.integers(0, 480 - h)), w, h],
                    "score": float(np.float32(rng.random())),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def pycocotools_stats(
    gt_path: Path, det_path: Path, cat_ids: list[int] | None = None
) -> np.ndarray:
    """The reference: pycocotools called the documented way, on files."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(det_path))
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


@pytest.fixture()
def coco_files(tmp_path: Path) -> tuple[dict, list[dict], Path, Path]:
    # Category ids with gaps, as in COCO (1..90).
    gt, dets = make_coco_set(seed=0, cat_ids=(1, 5, 90))
    return gt, dets, write_json(tmp_path / "gt.json", gt), write_json(tmp_path / "det.json", dets)


# --------------------------------------------------------------------------------------------
# coco_evaluate
# --------------------------------------------------------------------------------------------


def test_coco_evaluate_matches_pycocotools(coco_files) -> None:
    gt, dets, gt_path, det_path = coco_files
    # The data must exercise what it claims to: crowd boxes and every area range.
    assert any(a["iscrowd"] for a in gt["annotations"])
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32**2 and any(32**2 < a < 96**2 for a in areas) and max(areas) > 96**2

    ref = pycocotools_stats(gt_path, det_path)
    for src_gt, src_det in ((gt_path, det_path), (gt, dets), (str(gt_path), str(det_path))):
        got = coco_evaluate(src_gt, src_det)
        assert list(got) == [*COCO_STAT_NAMES, "per_class_AP", "per_class_AP50", "pr_curve50"]
        assert [got[k] for k in COCO_STAT_NAMES] == pytest.approx(ref.tolist(), abs=1e-12)
        assert all(type(got[k]) is float for k in COCO_STAT_NAMES)
    # A non-trivial operating point, so that a wrong number cannot pass by being 0 or 1.
    assert 0.1 < got["AP"] < 0.95
    json.dumps(got)  # JSON-able


def test_coco_per_class_ap_matches_pycocotools_per_category(coco_files) -> None:
    gt, _, gt_path, det_path = coco_files
    got = coco_evaluate(gt_path, det_path)["per_class_AP"]
    assert list(got) == ["class1", "class5", "class90"]
    for cat in gt["categories"]:
        ref = pycocotools_stats(gt_path, det_path, cat_ids=[cat["id"]])[0]
        assert got[cat["name"]] == pytest.approx(ref, abs=1e-12), cat
    assert len(set(got.values())) > 1  # classes differ: a per-class index mix-up would show
    # class_names overrides the GT names.
    renamed = coco_evaluate(gt_path, det_path, class_names={1: "a", 5: "b", 90: "c"})
    assert list(renamed["per_class_AP"]) == ["a", "b", "c"]
    assert list(renamed["per_class_AP"].values()) == list(got.values())


def test_coco_evaluate_does_not_mutate_inputs(coco_files) -> None:
    gt, dets, _, _ = coco_files
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    coco_evaluate(gt, dets)
    # pycocotools writes 'ignore' into GT and 'id'/'area'/'segmentation' into results.
    assert gt == gt_before and dets == dets_before


def test_coco_perfect_detector_gives_ap_one() -> None:
    gt, _ = make_coco_set(seed=1, crowd=False)
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    got = coco_evaluate(gt, dets)
    for key in ("AP", "AP50", "AP75", "AR100"):  # not AR1: one detection per image
        assert got[key] == pytest.approx(1.0), key
    assert all(v == pytest.approx(1.0) for v in got["per_class_AP"].values())
    assert all(v == pytest.approx(1.0) for v in got["per_class_AP50"].values())


def test_coco_empty_detections_give_zero(tmp_path: Path) -> None:
    gt, _ = make_coco_set(seed=2)
    det_path = write_json(tmp_path / "empty.json", [])
    for dets in ([], det_path):
        got = coco_evaluate(gt, dets)
        # Every area range has GT in this set, so pycocotools' answer is 0 everywhere.
        assert all(got[k] == 0.0 for k in COCO_STAT_NAMES), got
        assert got["per_class_AP"] == {"class1": 0.0, "class2": 0.0, "class3": 0.0}
        assert got["per_class_AP50"] == {"class1": 0.0, "class2": 0.0, "class3": 0.0}


def test_coco_per_class_ap50_hand_built() -> None:
    # "perfect": one GT, one exact detection.
    # "half": GT A (image 1) and GT B (image 2, never detected); an FP at .95 far from
    #   everything, then a TP at .8 on A with IoU 36/50 = .72 (box 50x36 inside A's 50x50).
    #   Ranked: FP, TP -> recall 0, .5; precision 0, .5. pycocotools' envelope: .5 for recall
    #   thresholds 0, .01, ..., .50 (51 points), 0 above .50 (50 points): AP50 = 25.5 / 101.
    #   The TP is a hit at IoU thresholds .50, .55, .60, .65, .70 and an FP at .75..95 (AP 0
    #   there): AP@[.5:.95] = 5 / 10 * 25.5 / 101.
    # "absent": no GT, one detection -> -1 everywhere.
    gt = {
        "images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 640, "height": 480}],
        "categories": [
            {"id": 1, "name": "perfect"},
            {"id": 2, "name": "half"},
            {"id": 3, "name": "absent"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 50, 50]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [300, 300, 50, 50]},
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [400, 200, 30, 30], "score": 0.95},
        {"image_id": 1, "category_id": 2, "bbox": [100, 100, 50, 36], "score": 0.8},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.5},
    ]
    got = coco_evaluate(gt, dets)
    assert got["per_class_AP50"] == pytest.approx(
        {"perfect": 1.0, "half": 25.5 / 101, "absent": -1.0}, abs=1e-12
    )
    assert got["per_class_AP"] == pytest.approx(
        {"perfect": 1.0, "half": 0.5 * 25.5 / 101, "absent": -1.0}, abs=1e-12
    )
    # summarize's AP50 averages over the categories with GT.
    assert got["AP50"] == pytest.approx((1.0 + 25.5 / 101) / 2, abs=1e-12)
    curve = got["pr_curve50"]
    assert curve["recall"] == pytest.approx(np.linspace(0, 1, 101).tolist(), abs=1e-12)
    assert list(curve["precision"]) == ["perfect", "half", "absent"]
    assert curve["precision"]["perfect"] == pytest.approx([1.0] * 101, abs=1e-12)
    assert curve["precision"]["half"] == pytest.approx([0.5] * 51 + [0.0] * 50, abs=1e-12)
    assert curve["precision"]["absent"] == [-1.0] * 101


def test_coco_per_class_ap50_matches_pycocotools_per_category(coco_files) -> None:
    gt, _, gt_path, det_path = coco_files
    got = coco_evaluate(gt_path, det_path)
    ap50 = got["per_class_AP50"]
    assert list(ap50) == ["class1", "class5", "class90"]
    for cat in gt["categories"]:
        ref = pycocotools_stats(gt_path, det_path, cat_ids=[cat["id"]])[1]  # stats[1] = AP50
        assert ap50[cat["name"]] == pytest.approx(ref, abs=1e-12), cat
    # Every class has GT here, so the mean over classes is summarize's AP50.
    assert all(v >= 0 for v in ap50.values())
    assert np.mean(list(ap50.values())) == pytest.approx(got["AP50"], abs=1e-12)
    # Not the AP over .50:.95 under another name.
    assert all(ap50[k] > got["per_class_AP"][k] for k in ap50)


def test_coco_pr_curve50_shape_and_monotone(coco_files) -> None:
    _, _, gt_path, det_path = coco_files
    got = coco_evaluate(gt_path, det_path)
    curve = got["pr_curve50"]
    assert curve["recall"] == pytest.approx(np.linspace(0, 1, 101).tolist(), abs=1e-12)
    assert list(curve["precision"]) == list(got["per_class_AP50"])
    for name, precision in curve["precision"].items():
        p = np.asarray(precision)
        assert p.shape == (101,), name
        assert ((p >= 0) & (p <= 1)).all(), name
        assert (np.diff(p) <= 0).all(), name  # the interpolated envelope never rises
        assert p[0] > p[-1], name  # and is not flat here: a real curve
        assert p.mean() == pytest.approx(got["per_class_AP50"][name], abs=1e-12), name


def test_coco_gt_id_zero_is_not_a_false_positive() -> None:
    # COCOeval stores the matched GT id in dtMatches and reads 0 as "unmatched": a GT with id 0
    # would turn a perfect detection into an FP. coco_evaluate renumbers GT ids.
    gt = {
        "images": [{"id": 7}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 0, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 50]}],
    }
    dets = [{"image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9}]
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda gt, d: gt.pop("annotations"), "'annotations'"),
        (lambda gt, d: gt["annotations"][0].pop("bbox"), "annotations[0]: missing field 'bbox'"),
        (lambda gt, d: d[3].update(category_id=99), "detection [3]: 'category_id' 99"),
        (lambda gt, d: d[2].update(bbox=[1, 2, 3]), "detection [2]: 'bbox'"),
        (lambda gt, d: d[1].update(bbox=[1, 2, "3", 4]), "detection [1]: 'bbox'"),
        (lambda gt, d: d[0].update(image_id=12345), "detection [0]: 'image_id' 12345"),
        (lambda gt, d: d[4].pop("score"), "detection [4]: missing field 'score'"),
        (lambda gt, d: d[5].update(score=float("nan")), "detection [5]: 'score'"),
    ],
)
def test_coco_malformed_input_names_file_and_field(tmp_path: Path, mutate, field: str) -> None:
    gt, dets = make_coco_set(seed=3)
    mutate(gt, dets)
    gt_path = write_json(tmp_path / "bad_gt.json", gt)
    det_path = write_json(tmp_path / "bad_det.json", dets)
    with pytest.raises(ValueError) as err:
        coco_evaluate(gt_path, det_path)
    message = str(err.value)
    assert field in message
    assert str(gt_path) in message or str(det_path) in message


def test_coco_missing_file_is_named(tmp_path: Path) -> None:
    gt, dets = make_coco_set(seed=3)
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_evaluate(missing, dets)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_evaluate(gt, missing)


def test_coco_verbose_goes_to_stderr(coco_files, capsys) -> None:
    _, _, gt_path, det_path = coco_files
    coco_evaluate(gt_path, det_path)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    coco_evaluate(gt_path, det_path, verbose=True)
    loud = capsys.readouterr()
    assert loud.out == "" and "Average Precision" in loud.err


# --------------------------------------------------------------------------------------------
# CocoEvaluator
# --------------------------------------------------------------------------------------------


def _xywh_to_xyxy(boxes: list[list[float]]) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat((b[:, :2], b[:, :2] + b[:, 2:]), dim=1)


def feed(evaluator, gt: dict, dets: list[dict], image_ids=None, crowd_as_difficult=False) -> None:
    """Add images of a COCO set to an evaluator as per-image tensors (labels = category ids)."""
    for img in gt["images"]:
        if image_ids is not None and img["id"] not in image_ids:
            continue
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        ds = [d for d in dets if d["image_id"] == img["id"]]
        crowd = torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool)
        evaluator.add(
            image_id=img["id"],
            width=img["width"],
            height=img["height"],
            gt_boxes=_xywh_to_xyxy([a["bbox"] for a in anns]),
            gt_labels=torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            det_boxes=_xywh_to_xyxy([d["bbox"] for d in ds]),
            det_scores=torch.tensor([d["score"] for d in ds], dtype=torch.float32),
            det_labels=torch.tensor([d["category_id"] for d in ds], dtype=torch.int64),
            # Difficult objects are evaluated as crowd: both spellings must give the same AP.
            gt_iscrowd=None if crowd_as_difficult else crowd,
            gt_difficult=crowd if crowd_as_difficult else None,
        )


def _with_class_names(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    gt["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    return gt


@pytest.mark.parametrize("crowd_as_difficult", [False, True])
def test_coco_evaluator_matches_coco_evaluate(crowd_as_difficult: bool) -> None:
    gt, dets = make_coco_set(seed=4)
    gt = _with_class_names(gt)
    evaluator = CocoEvaluator(CLASS_NAMES)
    feed(evaluator, gt, dets, crowd_as_difficult=crowd_as_difficult)
    got = evaluator.compute()
    assert got == coco_evaluate(gt, dets)
    assert 0.1 < got["AP"] < 0.95
    assert list(got["per_class_AP"]) == CLASS_NAMES
    # The exports are a valid COCO pair that reproduces the metric.
    exported_gt = evaluator.gt_dict()
    assert [a["iscrowd"] for a in exported_gt["annotations"]] == [
        a["iscrowd"] for a in gt["annotations"]
    ]
    assert coco_evaluate(exported_gt, evaluator.detections()) == got


def test_coco_evaluator_merge_equals_single() -> None:
    gt, dets = make_coco_set(seed=5)
    ids = [img["id"] for img in gt["images"]]
    full = CocoEvaluator(CLASS_NAMES)
    feed(full, gt, dets)
    rank0, rank1 = CocoEvaluator(CLASS_NAMES), CocoEvaluator(CLASS_NAMES)
    feed(rank0, gt, dets, image_ids=set(ids[::2]))
    feed(rank1, gt, dets, image_ids=set(ids[1::2]))
    expected = full.compute()
    assert rank0.compute() != expected  # half the data is a different answer

    gathered = CocoEvaluator.from_states([rank1.state(), rank0.state()])  # any rank order
    assert gathered.gt_dict() == full.gt_dict()
    assert gathered.detections() == full.detections()
    assert gathered.compute() == expected

    rank0.merge(rank1)
    assert len(rank0) == len(ids)
    assert rank0.compute() == expected

    # A padded sampler repeats images: adding one twice keeps one copy.
    feed(rank0, gt, dets, image_ids={ids[0]})
    assert rank0.compute() == expected


def test_coco_evaluator_rejects_bad_labels_and_class_mismatch() -> None:
    evaluator = CocoEvaluator(CLASS_NAMES)
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="gt_labels must be in 1..3"):
        evaluator.add(
            1, 20, 20, box, torch.tensor([0]), box, torch.tensor([0.5]), torch.tensor([1])
        )
    with pytest.raises(ValueError, match="det_scores has 2 entries"):
        evaluator.add(
            1, 20, 20, box, torch.tensor([1]), box, torch.tensor([0.5, 0.4]), torch.tensor([1])
        )
    with pytest.raises(ValueError, match="different class names"):
        evaluator.merge(CocoEvaluator(["x", "y", "z"]))


# --------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------


def test_voc_ap_hand_computed() -> None:
    # 4 positives; ranked detections TP, FP, TP, TP, FP:
    #   cum TP 1 1 2 3 3, cum FP 0 1 1 1 2
    #   recall    .25  .25  .50  .75  .75
    #   precision 1    .5   2/3  .75  .6
    # 11-point (VOC07): t in {0, .1, .2}: max precision over all = 1          -> 3 x 1
    #   t in {.3, .4, .5}: recall >= t at .5/.75/.75, max(2/3, .75, .6) = .75 -> 3 x .75
    #   t in {.6, .7}: recall .75 points, max(.75, .6) = .75                  -> 2 x .75
    #   t in {.8, .9, 1}: no recall that high                                 -> 3 x 0
    #   AP = (3 + 5 * .75) / 11 = 6.75 / 11
    # all-point (VOC2010+): envelope at recall .25 -> 1, .5 -> .75, .75 -> .75, then 0 to 1:
    #   AP = .25 * 1 + .25 * .75 + .25 * .75 = .625
    recall = np.array([0.25, 0.25, 0.5, 0.75, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 0.75, 0.6])
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(6.75 / 11, abs=1e-12)
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.625, abs=1e-12)
    # No detections: AP 0 in both.
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_voc_evaluate_hand_built_case() -> None:
    names = ["cat", "dog", "bird"]
    ground_truths = [
        {  # image 0: cat A; cat D (difficult)
            "boxes": _t([[0, 0, 10, 10], [50, 50, 60, 60]]),
            "labels": torch.tensor([1, 1]),
            "difficult": torch.tensor([False, True]),
        },
        {  # image 1: cat B, cat E (never detected: a miss), dog F on the same spot as B
            "boxes": _t([[0, 0, 20, 20], [40, 40, 60, 60], [0, 0, 20, 20]]),
            "labels": torch.tensor([1, 1, 2]),
        },
    ]
    detections = [
        {  # d1 .9 on A: TP. d2 .8 shifted by 1 px, IoU(A) = 90/110 = .82 > .5, A taken: FP
            # (duplicate). d3 .7 on the difficult D: neither TP nor FP. bird .95: class without GT
            "boxes": _t([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 5, 5]]),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.95]),
            "labels": torch.tensor([1, 1, 1, 3]),
        },
        {  # d4 .6 on B: TP. d5 .5 nowhere: FP. A dog on F: TP for dog (the cat B at IoU 1
            # must not steal it: matching is per class).
            "boxes": _t([[0, 0, 20, 20], [100, 100, 110, 110], [0, 0, 20, 20]]),
            "scores": torch.tensor([0.6, 0.5, 0.3]),
            "labels": torch.tensor([1, 1, 2]),
        },
    ]
    # cat: npos = 3 (A, B, E; D is difficult). Ranked: TP, FP, (ignored), TP, FP
    #   cum TP 1 1 1 2 2, cum FP 0 1 1 1 2
    #   recall    1/3 1/3 1/3 2/3 2/3
    #   precision 1   .5  .5  2/3 .5
    # 11-point: t in {0, .1, .2, .3} -> 1 (4 points); t in {.4, .5, .6} -> max(2/3, .5) = 2/3
    #   (3 points); t >= .7 -> 0.   AP = (4 + 3 * 2/3) / 11 = 6/11
    # all-point: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9
    # dog: one GT, one TP -> 1. bird: no GT -> NaN, left out of the mAP.
    voc07 = voc_evaluate(ground_truths, detections, names)
    assert voc07["per_class_AP"]["cat"] == pytest.approx(6 / 11, abs=1e-12)
    assert voc07["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert math.isnan(voc07["per_class_AP"]["bird"])
    assert voc07["mAP"] == pytest.approx((6 / 11 + 1) / 2, abs=1e-12)

    voc12 = voc_evaluate(ground_truths, detections, names, use_07_metric=False)
    assert voc12["per_class_AP"]["cat"] == pytest.approx(5 / 9, abs=1e-12)
    assert voc12["mAP"] == pytest.approx((5 / 9 + 1) / 2, abs=1e-12)


@pytest.mark.parametrize(("y2", "expected"), [(5.0, 0.0), (6.0, 1.0)])
def test_voc_iou_threshold_is_strict(y2: float, expected: float) -> None:
    # GT 10x10; detection 10x5 has IoU exactly 0.5: not a hit (devkit: ov > 0.5). 10x6: 0.6, hit.
    gts = [{"boxes": _t([[0, 0, 10, 10]]), "labels": torch.tensor([1])}]
    dets = [
        {"boxes": _t([[0, 0, 10, y2]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ]
    assert voc_evaluate(gts, dets, ["x"])["mAP"] == pytest.approx(expected, abs=1e-12)


def devkit_voc_eval(ground_truths, detections, cls, iou_thr=0.5, use_07=True) -> float:
    """py-faster-rcnn's voc_eval loop (one detection at a time), without the +1 pixel."""
    recs = {}
    npos = 0
    for i, g in enumerate(ground_truths):
        m = g["labels"] == cls
        diff = g["difficult"][m]
        recs[i] = {"bbox": g["boxes"][m], "difficult": diff, "det": [False] * int(m.sum())}
        npos += int((~diff).sum())
    image_ids, conf, bb = [], [], []
    for i, d in enumerate(detections):
        m = d["labels"] == cls
        image_ids += [i] * int(m.sum())
        conf += d["scores"][m].tolist()
        bb += d["boxes"][m].tolist()
    order = np.argsort(-np.array(conf), kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for k, j in enumerate(order):
        r, b = recs[image_ids[j]], np.array(bb[j])
        gtb = r["bbox"]
        ovmax, jmax = -np.inf, -1
        if gtb.size > 0:
            iw = np.maximum(np.minimum(gtb[:, 2], b[2]) - np.maximum(gtb[:, 0], b[0]), 0.0)
            ih = np.maximum(np.minimum(gtb[:, 3], b[3]) - np.maximum(gtb[:, 1], b[1]), 0.0)
            inter = iw * ih
            uni = (
                (b[2] - b[0]) * (b[3] - b[1])
                + (gtb[:, 2] - gtb[:, 0]) * (gtb[:, 3] - gtb[:, 1])
                - inter
            )
            ov = inter / uni
            ovmax, jmax = ov.max(), int(ov.argmax())
        if ovmax > iou_thr:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[k], r["det"][jmax] = 1, True
                else:
                    fp[k] = 1
        else:
            fp[k] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07)


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_evaluate_matches_devkit_loop(use_07: bool) -> None:
    rng = np.random.default_rng(6)
    ground_truths, detections = [], []
    for _ in range(30):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, size=(n, 2))
        gt_boxes = np.concatenate([xy, xy + rng.uniform(10, 80, size=(n, 2))], axis=1)
        labels = rng.integers(1, 4, size=n)
        ground_truths.append(
            {"boxes": gt_boxes, "labels": labels, "difficult": rng.random(n) < 0.2}
        )
        # Detections: noisy copies (half of them twice, to make duplicates) plus clutter.
        keep = rng.random(n) < 0.8
        src, src_labels = gt_boxes[keep], labels[keep]
        src = np.concatenate([src, src[: len(src) // 2]])
        src_labels = np.concatenate([src_labels, src_labels[: len(src_labels) // 2]])
        noisy = src + rng.normal(0, 6, size=src.shape)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        # Copies keep their GT's class 85% of the time.
        relabel = rng.random(len(src_labels)) < 0.15
        src_labels = np.where(relabel, rng.integers(1, 4, size=len(src_labels)), src_labels)
        m = int(rng.integers(0, 4))
        cxy = rng.uniform(0, 200, size=(m, 2))
        clutter = np.concatenate([cxy, cxy + rng.uniform(10, 80, size=(m, 2))], axis=1)
        boxes = np.concatenate([noisy, clutter])
        det_labels = np.concatenate([src_labels, rng.integers(1, 4, size=m)])
        detections.append({"boxes": boxes, "scores": rng.random(len(boxes)), "labels": det_labels})
    got = voc_evaluate(ground_truths, detections, CLASS_NAMES, use_07_metric=use_07)
    for c, name in enumerate(CLASS_NAMES, start=1):
        ref = devkit_voc_eval(ground_truths, detections, c, use_07=use_07)
        assert got["per_class_AP"][name] == pytest.approx(ref, abs=1e-12), name
    assert 0.05 < got["mAP"] < 0.95


def test_voc_evaluator_merge_and_matches_voc_evaluate() -> None:
    gt, dets = make_coco_set(seed=7)
    gt = _with_class_names(gt)
    full, rank0, rank1 = (VocEvaluator(CLASS_NAMES) for _ in range(3))
    feed(full, gt, dets, crowd_as_difficult=True)
    ids = [img["id"] for img in gt["images"]]
    feed(rank0, gt, dets, image_ids=set(ids[:3]), crowd_as_difficult=True)
    feed(rank1, gt, dets, image_ids=set(ids[3:]), crowd_as_difficult=True)
    merged = VocEvaluator.from_states([rank0.state(), rank1.state()])
    expected = full.compute()
    assert merged.compute() == expected
    assert rank0.compute() != expected
    # The functional form on the same data.
    per_image = [
        (
            {
                "boxes": r["gt_boxes"],
                "labels": r["gt_labels"],
                "difficult": r["gt_difficult"],
            },
            {"boxes": r["det_boxes"], "scores": r["det_scores"], "labels": r["det_labels"]},
        )
        for r in full.state()["records"]
    ]
    functional = voc_evaluate([g for g, _ in per_image], [d for _, d in per_image], CLASS_NAMES)
    assert functional == expected


# --------------------------------------------------------------------------------------------
# pipelines/evaluate.py
# --------------------------------------------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "pipelines/evaluate.py", *args],
        check=False,  # the tests check returncode themselves
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pipeline_prints_one_json_object(coco_files) -> None:
    _, _, gt_path, det_path = coco_files
    proc = run_script("--coco-gt", str(gt_path), "--detections", str(det_path), "--verbose")
    assert proc.returncode == 0, proc.stderr
    # stdout is exactly one JSON object (pycocotools' report went to stderr with --verbose).
    assert json.loads(proc.stdout) == coco_evaluate(gt_path, det_path)
    assert proc.stdout.count("\n") == 1
    assert "Average Precision" in proc.stderr


def test_pipeline_missing_file_is_a_clear_error(coco_files, tmp_path: Path) -> None:
    _, _, gt_path, _ = coco_files
    missing = tmp_path / "no_such_detections.json"
    proc = run_script("--coco-gt", str(gt_path), "--detections", str(missing))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
