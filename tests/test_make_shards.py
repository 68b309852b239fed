"""pipelines/make_shards.py end to end: VOC and COCO layouts -> shards -> samples equal the source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssd.data.coco import CocoReader
from ssd.data.shards import ShardSet, read_samples
from ssd.data.streaming import ShardLoader, ShardStream
from ssd.data.synthetic import CLASSES
from ssd.data.synthetic_layouts import write_coco, write_voc
from ssd.data.voc import VOC_CLASSES, VocReader

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "make_shards.py"
SHARED = Path(os.environ.get("SSD_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))

sys.path.insert(0, str(ROOT / "pipelines"))
import make_shards


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--no-progress"], capture_output=True, text=True, timeout=300, check=False)


def shard_samples(out: Path) -> dict[str, tuple[bytes, dict]]:
    return {key: (jpg, meta) for key, jpg, meta in read_samples(ShardSet.open(out))}


@pytest.fixture(scope="module")
def voc_devkit(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"), {"train": 12, "val": 5}, seed=4, workers=1)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"), {"train": 12}, seed=5, workers=1)


def test_voc_round_trip_equals_the_source(voc_devkit, tmp_path):
    args = ["voc", "--root", str(voc_devkit), "--sets", "synthetic:train+synthetic:val", "--classes", ",".join(CLASSES),
            "--out", str(tmp_path), "--shard-size", "5", "--workers", "2"]
    make_shards.main(make_shards.get_args_parser().parse_args(args))
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["classes"] == list(CLASSES) and info["id_mapping"] == {c: i + 1 for i, c in enumerate(CLASSES)}
    assert [s["samples"] for s in info["shards"]] == [5, 5, 5, 2] and info["problems"] == {}

    samples = shard_samples(tmp_path)
    reader = VocReader(voc_devkit, "synthetic:train+synthetic:val", classes=CLASSES)
    assert list(samples) == [task.key for task in reader.tasks()]  # every image, in source order
    objects = 0
    for task in reader.tasks():
        record, problems = reader.read(task)
        jpg, meta = samples[record.key]
        assert problems == []
        assert jpg == Path(record.image_path).read_bytes()  # baseline RGB JPEG kept byte for byte
        assert meta["boxes"] == record.boxes and meta["labels"] == record.labels
        assert meta["difficult"] == record.difficult and meta["truncated"] == record.truncated
        assert (meta["width"], meta["height"], meta["image_id"]) == (record.width, record.height, record.image_id)
        objects += record.num_objects
    assert info["num_objects"] == objects > 17
    assert info["num_truncated"] == sum(sum(meta["truncated"]) for _, meta in samples.values())


def test_coco_round_trip_equals_the_json(coco_root, tmp_path):
    annotations = coco_root / "annotations" / "instances_train.json"
    result = run_cli("coco", "--images", str(coco_root / "train"), "--annotations", str(annotations),
                     "--out", str(tmp_path), "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    assert "12 written of 12 listed" in result.stdout

    source = json.loads(annotations.read_text())
    categories = sorted(c["id"] for c in source["categories"])
    assert categories != list(range(1, len(categories) + 1))  # ids with gaps: the mapping matters
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["id_mapping"] == {str(cid): i + 1 for i, cid in enumerate(categories)}

    samples = {meta["image_id"]: meta for _, meta in shard_samples(tmp_path).values()}
    assert sorted(samples) == sorted(image["id"] for image in source["images"])
    by_image: dict[int, list[dict]] = {}
    for ann in source["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id, meta in samples.items():
        anns = by_image.get(image_id, [])
        assert meta["boxes"] == [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        assert meta["labels"] == [categories.index(a["category_id"]) + 1 for a in anns]
        assert meta["iscrowd"] == [bool(a["iscrowd"]) for a in anns]


def test_same_input_gives_the_same_shard_bytes(coco_root, tmp_path):
    annotations = str(coco_root / "annotations" / "instances_train.json")
    hashes = []
    for out, workers in ((tmp_path / "a", "1"), (tmp_path / "b", "2")):
        assert run_cli("coco", "--images", str(coco_root / "train"), "--annotations", annotations, "--out", str(out),
                       "--shard-size", "5", "--workers", workers).returncode == 0
        hashes.append(json.loads((out / "dataset.json").read_text())["content_hash"])
    assert hashes[0] == hashes[1]
    assert (tmp_path / "a" / "shard-000001.tar").read_bytes() == (tmp_path / "b" / "shard-000001.tar").read_bytes()


def _break_voc(devkit: Path) -> dict[str, str]:
    """Damage a copy of the synthetic VOC set in every way the converter must handle."""
    folder = devkit / "VOCsynthetic"
    ids = (folder / "ImageSets" / "Main" / "train.txt").read_text().split()
    (folder / "JPEGImages" / f"{ids[0]}.jpg").unlink()  # missing image
    corrupt = folder / "JPEGImages" / f"{ids[1]}.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:400])
    (folder / "Annotations" / f"{ids[2]}.xml").write_text("<annotation><size>")  # malformed XML
    xml = folder / "Annotations" / f"{ids[3]}.xml"
    text = xml.read_text()
    name_start = text.index("<name>") + len("<name>")
    xml.write_text(text[:name_start] + "unicorn" + text[text.index("</name>", name_start):])  # unknown class
    xml = folder / "Annotations" / f"{ids[4]}.xml"
    text = xml.read_text()
    xmax_start = text.index("<xmax>") + len("<xmax>")
    xml.write_text(text[:xmax_start] + "100000" + text[text.index("</xmax>", xmax_start):])  # outside: clipped
    return {"missing": ids[0], "corrupt": ids[1], "malformed": ids[2], "unknown": ids[3], "clipped": ids[4]}


def test_bad_input_is_reported_and_no_good_sample_is_lost(tmp_path):
    devkit = write_voc(tmp_path / "src", {"train": 8}, seed=6, workers=1)
    clean = VocReader(devkit, "synthetic:train", classes=CLASSES)
    clean_records = {t.key: clean.read(t)[0] for t in clean.tasks()}
    bad = _break_voc(devkit)
    common = ["voc", "--root", str(devkit), "--sets", "synthetic:train", "--classes", ",".join(CLASSES)]

    result = run_cli(*common, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    log = result.stderr
    assert f"{bad['missing']}.jpg: image file not found" in log
    assert f"{bad['corrupt']}.jpg: cannot decode image" in log
    assert f"{bad['malformed']}.xml" in log and "malformed_annotation" in log
    assert "unicorn" in log and f"{bad['unknown']}.xml" in log
    assert f"{bad['clipped']}.xml" in log and "reaches outside" in log
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["problems"] == {"missing_image": 1, "corrupt_image": 1, "malformed_annotation": 1,
                                "unknown_class": 1, "box_clipped": 1}
    for line in ("missing_image         skip sample         1", "box_clipped           clip object         1"):
        assert line in result.stdout

    samples = shard_samples(tmp_path / "out")
    skipped = {f"synthetic_{bad[k]}" for k in ("missing", "corrupt", "malformed")}
    assert set(samples) == set(clean_records) - skipped  # every other image is there
    unknown = clean_records[f"synthetic_{bad['unknown']}"]
    assert samples[f"synthetic_{bad['unknown']}"][1]["labels"] == unknown.labels[1:]  # only the bad object dropped
    clipped = samples[f"synthetic_{bad['clipped']}"][1]
    assert clipped["boxes"][0][2] == clipped["width"]

    strict = run_cli(*common, "--out", str(tmp_path / "strict"), "--strict")
    assert strict.returncode != 0
    assert "strict mode" in strict.stderr and f"{bad['missing']}" in strict.stderr
    assert not (tmp_path / "strict" / "dataset.json").exists()


def test_synthetic_command_writes_train_and_val_in_both_layouts(tmp_path):
    for layout in ("coco", "voc"):
        out = tmp_path / layout
        result = run_cli("synthetic", "--out", str(out), "--num-images", "10", "--num-val", "4",
                         "--layout", layout, "--shard-size", "4")
        assert result.returncode == 0, result.stderr
        train, val = ShardSet.open(out / "train"), ShardSet.open(out / "val")
        assert (train.num_samples, val.num_samples) == (10, 4) and train.counts == (4, 4, 2)
        assert train.classes == val.classes == CLASSES
    # the same images whichever layout they went through
    coco = {m["source"]: (jpg, m["boxes"], m["labels"]) for jpg, m in shard_samples(tmp_path / "coco" / "train").values()}
    voc = {m["source"]: (jpg, m["boxes"], m["labels"]) for jpg, m in shard_samples(tmp_path / "voc" / "train").values()}
    assert sorted(x[1:] for x in coco.values()) == sorted(x[1:] for x in voc.values())


# ---------------------------------------------------------------------------------------------
# The real datasets in ../shared/datasets (skipped when absent)

VOC_MINI = SHARED / "voc2007-mini" / "VOCdevkit"
COCO_MINI = SHARED / "coco2017-mini"


@pytest.mark.integration
@pytest.mark.skipif(not VOC_MINI.is_dir(), reason=f"no VOC2007 mini at {VOC_MINI}")
def test_voc2007_mini_converts_completely(tmp_path):
    result = run_cli("voc", "--root", str(VOC_MINI), "--sets", "2007:trainval+2007:test", "--out", str(tmp_path),
                     "--shard-size", "100", "--strict")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert (info["num_samples"], info["num_objects"]) == (600, 1940)
    assert (info["num_difficult"], info["num_truncated"], info["num_reencoded"]) == (399, 953, 0)
    assert info["classes"] == list(VOC_CLASSES) and info["objects_per_class"]["person"] == 620
    # every sample read exactly once by 2 ranks x 2 workers in evaluation mode
    shards = ShardSet.open(tmp_path)
    keys = [s["__key__"] for rank in range(2) for w in range(2)
            for s in ShardStream(shards, train=False, rank=rank, world_size=2).raw_samples(2, w)]
    assert len(keys) == len(set(keys)) == 600


@pytest.mark.integration
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"no COCO 2017 mini at {COCO_MINI}")
def test_coco2017_mini_converts_completely(tmp_path):
    annotations = COCO_MINI / "annotations" / "instances.json"
    result = run_cli("coco", "--images", str(COCO_MINI / "images"), "--annotations", str(annotations),
                     "--out", str(tmp_path), "--strict")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "dataset.json").read_text())
    source = json.loads(annotations.read_text())
    assert info["num_samples"] == len(source["images"]) == 549
    assert info["num_objects"] == len(source["annotations"]) == 4760
    assert info["num_iscrowd"] == sum(a["iscrowd"] for a in source["annotations"]) == 50
    assert info["num_reencoded"] == 1  # the grayscale 000000000086.jpg, now RGB
    assert info["id_mapping"]["90"] == 80 and len(info["classes"]) == 80
    reader = CocoReader(COCO_MINI / "images", annotations)
    assert info["classes"] == list(reader.classes)
    # one evaluation pass streams all of it, decoded
    loader = ShardLoader(ShardStream(ShardSet.open(tmp_path), train=False), batch_size=1, num_workers=0)
    assert sum(1 for _ in ShardStream(ShardSet.open(tmp_path), train=False)) == len(loader) == 549
