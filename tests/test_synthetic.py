import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pycocotools.coco
import pytest
import torch
from PIL import Image, ImageDraw

from ssd.data.synthetic import (
    CLASSES,
    SPLIT_SEED_OFFSETS,
    SyntheticDetection,
    _draw_object,
    _shape_extent,
    render_sample,
)
from ssd.data.synthetic_layouts import COCO_CATEGORY_IDS, write_coco, write_voc


def test_deterministic_per_seed_and_index():
    a_img, a_t = render_sample(5, seed=3)
    b_img, b_t = render_sample(5, seed=3)
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    c_img, _ = render_sample(5, seed=4)
    assert c_img.shape != a_img.shape or not torch.equal(a_img, c_img)


def test_annotations_are_valid_and_varied():
    sizes, labels = [], []
    for i in range(150):
        image, target = render_sample(i)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        h, w = image.shape[1:]
        boxes = target["boxes"]
        assert boxes.shape[0] == target["labels"].shape[0]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        sizes.append((boxes[:, 2:] - boxes[:, :2]).max(dim=1).values)
        labels.append(target["labels"])
    sizes, labels = torch.cat(sizes), torch.cat(labels)
    assert set(labels.tolist()) == set(range(1, len(CLASSES) + 1))
    assert (sizes < 16).sum() > 20, "small objects must be present"
    assert (sizes > 64).sum() > 20, "large objects must be present"


def test_dataset_applies_transform_and_carries_ids():
    ds = SyntheticDetection(4, seed=1, transform=lambda im, t: (im.float(), t))
    image, target = ds[2]
    assert image.dtype == torch.float32
    assert int(target["image_id"]) == 2
    assert set(target) == {"boxes", "labels", "truncated", "image_id", "orig_size"}
    assert target["orig_size"].tolist() == list(render_sample(2, seed=1)[0].shape[1:])


def test_cached_dataset_equals_rendering_on_demand_and_is_not_mutated_by_transforms():
    def shrink(image, target):
        target["boxes"] = target["boxes"] / 2  # a transform that rebinds a key of its dict
        return image, target

    cached = SyntheticDetection(3, seed=2, transform=shrink, cache=True)
    lazy = SyntheticDetection(3, seed=2, transform=shrink)
    for i in range(3):
        (a, ta), (b, tb) = cached[i], lazy[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    again = cached[0][1]["boxes"]
    assert torch.equal(again, lazy[0][1]["boxes"]), "the cache must not keep transformed boxes"


# --------------------------------------------------------------------------------------------
# truncation flags and the on-disk VOC / COCO layouts


def test_truncated_flags_mark_objects_cut_by_the_border():
    counts = {"cut": 0, "cut_touching": 0, "whole": 0, "whole_touching": 0}
    for i in range(100):
        image, target = render_sample(i)
        h, w = image.shape[1:]
        flags, boxes = target["truncated"], target["boxes"]
        assert flags.dtype == torch.bool and flags.shape == target["labels"].shape
        touching = (boxes[:, 0] <= 0) | (boxes[:, 1] <= 0) | (boxes[:, 2] >= w) | (boxes[:, 3] >= h)
        counts["cut"] += int(flags.sum())
        counts["cut_touching"] += int((flags & touching).sum())
        counts["whole"] += int((~flags).sum())
        counts["whole_touching"] += int((~flags & touching).sum())
    assert counts["cut"] > 50 and counts["whole"] > 50, counts
    # a shape cut by the border shows up at the border (unless occluded there: rare)
    assert counts["cut_touching"] >= 0.95 * counts["cut"], counts
    # a whole shape reaches the border only when its outline ends within the last pixel
    assert counts["whole_touching"] <= 0.06 * counts["whole"], counts


def test_truncation_follows_the_drawn_outline():
    """The flag's geometry (``_shape_extent``) agrees with rasterising the shape on a canvas with
    a margin and looking for pixels outside the image, for shapes of every class near a border."""
    rng = np.random.default_rng(0)
    width, height, pad = 64, 48, 40
    outcomes = []
    for _ in range(400):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        r = float(rng.uniform(3, 25))
        cx, cy = float(rng.uniform(-5, width + 5)), float(rng.uniform(-5, height + 5))
        angle = float(rng.uniform(0, 2 * np.pi))
        canvas = Image.new("L", (width + 2 * pad, height + 2 * pad), 0)
        _draw_object(ImageDraw.Draw(canvas), kind, cx + pad, cy + pad, r, angle, 255)
        drawn = np.asarray(canvas) > 0
        outside = drawn.sum() > drawn[pad : pad + height, pad : pad + width].sum()
        x1, y1, x2, y2 = _shape_extent(kind, cx, cy, r, angle)
        assert (x1 < 0 or y1 < 0 or x2 > width or y2 > height) == outside, (kind, cx, cy, r, angle)
        outcomes.append(outside)
    assert 50 < sum(outcomes) < 350, "both outcomes must be exercised"


def test_split_seed_offsets():
    assert SPLIT_SEED_OFFSETS == {"train": 0, "val": 10_000, "test": 20_000}


SPLITS = {"train": 5, "val": 3}
SEED = 7


def _expected(split, index):
    return render_sample(index, SEED + SPLIT_SEED_OFFSETS[split])


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    devkit = write_voc(root / "voc", SPLITS, seed=SEED, workers=0)
    coco = write_coco(root / "coco", SPLITS, seed=SEED, workers=0)
    # the sample set must exercise what the tests check
    targets = [_expected(s, i)[1] for s, n in SPLITS.items() for i in range(n)]
    flags = torch.cat([t["truncated"] for t in targets])
    assert flags.any() and not flags.all()
    assert set(torch.cat([t["labels"] for t in targets]).tolist()) == set(
        range(1, len(CLASSES) + 1)
    )
    return root, devkit, coco


def _check_jpeg(path: Path, split: str, index: int) -> tuple[int, int]:
    """The JPEG is baseline RGB without EXIF and holds render_sample's image; returns (w, h)."""
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert not im.info.get("progressive") and not im.info.get("progression")
        assert "exif" not in im.info
        decoded = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        size = im.size
    expected = _expected(split, index)[0]
    assert decoded.shape == expected.shape
    # q95 JPEG of a noisy texture: mean error ~4.5 levels; another image differs by tens
    assert (decoded.float() - expected.float()).abs().mean() < 8, "JPEG holds another image"
    return size


def test_voc_layout_matches_render_sample(written):
    _, devkit, _ = written
    assert devkit.name == "VOCdevkit"
    base = devkit / "VOCsynthetic"
    ids = {s: [f"{s}{i:06d}" for i in range(n)] for s, n in SPLITS.items()}
    main = base / "ImageSets" / "Main"
    for split, split_ids in ids.items():
        assert (main / f"{split}.txt").read_text().splitlines() == split_ids
    assert sorted((main / "trainval.txt").read_text().splitlines()) == sorted(
        ids["train"] + ids["val"]
    )
    assert sorted(p.name for p in main.iterdir()) == ["train.txt", "trainval.txt", "val.txt"]
    assert (base / "classes.txt").read_text().splitlines() == list(CLASSES)
    all_ids = ids["train"] + ids["val"]
    assert sorted(p.stem for p in (base / "JPEGImages").iterdir()) == sorted(all_ids)
    assert sorted(p.stem for p in (base / "Annotations").iterdir()) == sorted(all_ids)

    for split, n in SPLITS.items():
        for index in range(n):
            image_id = f"{split}{index:06d}"
            width, height = _check_jpeg(base / "JPEGImages" / f"{image_id}.jpg", split, index)
            root = ET.parse(base / "Annotations" / f"{image_id}.xml").getroot()
            assert root.tag == "annotation"
            assert root.findtext("folder") == "VOCsynthetic"
            assert root.findtext("filename") == f"{image_id}.jpg"
            assert root.find("source") is not None
            assert int(root.findtext("size/width")) == width
            assert int(root.findtext("size/height")) == height
            assert root.findtext("size/depth") == "3" and root.findtext("segmented") == "0"
            _, target = _expected(split, index)
            objects = root.findall("object")
            assert len(objects) == len(target["labels"])
            for obj, box, label, cut in zip(
                objects,
                target["boxes"].tolist(),
                target["labels"].tolist(),
                target["truncated"].tolist(),
            ):
                x1, y1, x2, y2 = box
                assert obj.findtext("name") == CLASSES[label - 1]
                assert obj.findtext("pose") == "Unspecified"
                assert obj.findtext("truncated") == str(int(cut))
                assert obj.findtext("difficult") == "0"
                got = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
                assert got == [str(int(x1) + 1), str(int(y1) + 1), str(int(x2)), str(int(y2))]


def test_coco_layout_matches_render_sample(written):
    _, _, root = written
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "instances_train.json",
        "instances_val.json",
    ]
    assert len(set(COCO_CATEGORY_IDS)) == len(CLASSES) and COCO_CATEGORY_IDS != tuple(
        range(1, len(CLASSES) + 1)
    )
    all_image_ids = []
    for split, n in SPLITS.items():
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert data["categories"] == [
            {"id": cid, "name": name, "supercategory": "shape"}
            for cid, name in zip(COCO_CATEGORY_IDS, CLASSES)
        ]
        label_of = {c["id"]: CLASSES.index(c["name"]) + 1 for c in data["categories"]}
        assert [im["file_name"] for im in data["images"]] == [f"{i:012d}.jpg" for i in range(n)]
        assert sorted(p.name for p in (root / split).iterdir()) == [
            f"{i:012d}.jpg" for i in range(n)
        ]
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for index, im in enumerate(data["images"]):
            all_image_ids.append(im["id"])
            width, height = _check_jpeg(root / split / im["file_name"], split, index)
            assert (im["width"], im["height"]) == (width, height)
            _, target = _expected(split, index)
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            assert len(anns) == len(target["labels"])
            for ann, box, label in zip(anns, target["boxes"].tolist(), target["labels"].tolist()):
                x1, y1, x2, y2 = box
                assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
                assert all(isinstance(v, float) for v in ann["bbox"])
                assert ann["area"] == (x2 - x1) * (y2 - y1)
                assert ann["segmentation"] == [[x1, y1, x2, y1, x2, y2, x1, y2]]
                assert ann["iscrowd"] == 0
                assert label_of[ann["category_id"]] == label
                assert ann["category_id"] == COCO_CATEGORY_IDS[label - 1]
        # the reference COCO API reads it and agrees
        api = pycocotools.coco.COCO(str(path))
        assert sorted(api.getCatIds()) == sorted(COCO_CATEGORY_IDS)
        assert len(api.getAnnIds()) == len(data["annotations"])
    assert len(set(all_image_ids)) == len(all_image_ids), "image ids must be unique across splits"


def test_both_layouts_hold_the_same_jpeg_bytes(written):
    _, devkit, coco = written
    for split, n in SPLITS.items():
        for index in range(n):
            voc = (devkit / "VOCsynthetic" / "JPEGImages" / f"{split}{index:06d}.jpg").read_bytes()
            assert voc == (coco / split / f"{index:012d}.jpg").read_bytes()


def test_writers_are_deterministic_and_parallel_equals_serial(written, tmp_path):
    root, _, _ = written
    for name, write in (("voc", write_voc), ("coco", write_coco)):
        reference = _tree_bytes(root / name)
        write(tmp_path / "serial" / name, SPLITS, seed=SEED, workers=0)
        assert _tree_bytes(tmp_path / "serial" / name) == reference
        write(tmp_path / "parallel" / name, SPLITS, seed=SEED, workers=2)
        assert _tree_bytes(tmp_path / "parallel" / name) == reference
    write_coco(tmp_path / "other", {"val": 1}, seed=SEED + 1, workers=0)
    assert (tmp_path / "other" / "val" / f"{0:012d}.jpg").read_bytes() != reference[
        "val/000000000000.jpg"
    ]


def test_writers_reject_bad_arguments(tmp_path):
    for kwargs in (
        {"splits": {"trainval": 2}},
        {"splits": {"train": -1}},
        {"splits": {"train": 1.5}},
        {"splits": {"train": 1}, "quality": 0},
        {"splits": {"train": 1}, "workers": -1},
    ):
        for write in (write_voc, write_coco):
            with pytest.raises(ValueError):
                write(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written when the arguments are bad"
