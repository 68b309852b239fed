"""VocReader: hand-written VOCdevkit folders in tmp_path, plus the shared VOC2007 subset."""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
from pathlib import Path

import pytest

from ssd.data.records import SampleError
from ssd.data.voc import (
    VOC_CLASSES,
    VocReader,
    parse_image_sets,
    to_voc_pixels,
    voc_image_id,
    voc_key,
)

SIZE = "<size><width>500</width><height>375</height><depth>3</depth></size>"


def _object(name: str, box: tuple[int, int, int, int] | None, extra: str = "") -> str:
    bndbox = ("<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>"
              .format(*box) if box else "")
    return f"<object><name>{name}</name>{extra}{bndbox}</object>"


def _write_xml(devkit: Path, image_id: str, objects: list[str], year: str = "2007",
               size: str = SIZE) -> Path:
    path = devkit / f"VOC{year}" / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"<filename>{image_id}.jpg</filename>{size}{''.join(objects)}"
    path.write_text(f"<annotation>{body}</annotation>")
    return path


def _write_set(devkit: Path, split: str, ids: list[str], year: str = "2007") -> None:
    path = devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def _read_one(tmp_path: Path, objects: list[str], **kwargs):
    devkit = tmp_path / "VOCdevkit"
    _write_xml(devkit, "000001", objects)
    _write_set(devkit, "train", ["000001"])
    reader = VocReader(devkit, "2007:train", **kwargs)
    return reader.read(reader.tasks()[0])


# -- image sets ---------------------------------------------------------------------------------

def test_parse_image_sets() -> None:
    assert parse_image_sets("2007:trainval+2012:trainval") == [
        ("2007", "trainval"), ("2012", "trainval")]
    assert parse_image_sets("synthetic:train") == [("synthetic", "train")]
    assert parse_image_sets(" 2007:test ") == [("2007", "test")]


@pytest.mark.parametrize("bad", ["", "2007", "2007:", ":train", "2007:train+", "2007-train",
                                 "20 07:train", "2007:train:val", "2007:train,2012:train"])
def test_parse_image_sets_rejects_bad_syntax(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_image_sets(bad)
    assert repr(bad) in str(err.value) and "YEAR:SPLIT" in str(err.value)


def test_missing_set_file_names_path_and_existing_splits(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_set(devkit, "train", [])
    _write_set(devkit, "val", [])
    _write_set(devkit, "aeroplane_train", [])  # a per-class file: not a split
    with pytest.raises(FileNotFoundError) as err:
        VocReader(devkit, "2007:trainval")
    message = str(err.value)
    assert str(devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt") in message
    assert message.endswith("splits there: train, val")


def test_year_folder_as_root_suggests_parent(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_xml(devkit, "000001", [])
    _write_set(devkit, "train", ["000001"])
    with pytest.raises(FileNotFoundError) as err:
        VocReader(devkit / "VOC2007", "2007:train")
    assert f"pass its parent {devkit}" in str(err.value)
    with pytest.raises(FileNotFoundError, match="VOC folders there: VOC2007"):
        VocReader(devkit, "2012:train")


def test_duplicate_ids_across_sets_read_once(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    for i in ("000001", "000002", "000003"):
        _write_xml(devkit, i, [])
    _write_set(devkit, "train", ["000003", "000001"])
    _write_set(devkit, "trainval", ["000001", "000002", "000003"])
    reader = VocReader(devkit, "2007:train+2007:trainval")
    assert [t.image_id for t in reader.tasks()] == ["000003", "000001", "000002"]
    problems = reader.listing_problems
    assert [p.kind for p in problems] == ["duplicate_image", "duplicate_image"]
    assert problems[0].file.endswith("trainval.txt")
    assert "image 000001 of 2007:trainval is already listed by 2007:train" in problems[0].message
    assert "image 000003" in problems[1].message


def test_distinct_ids_with_one_key_or_image_id_are_skipped(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_set(devkit, "train", ["5", "0005", "a.b", "a_b"], year="x")
    reader = VocReader(devkit, "x:train")
    assert [t.image_id for t in reader.tasks()] == ["5", "a.b"]
    assert [p.message for p in reader.listing_problems] == [
        "image 0005 of x:train has the same image_id 5 as x:5; skipped",
        "image a_b of x:train has the same key 'x_a_b' as x:a.b; skipped",
    ]


def test_set_file_with_two_columns_is_an_error(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_set(devkit, "cat_train", ["000001  1"])
    with pytest.raises(ValueError, match=r"cat_train.txt line 1: expected one image id per line"):
        VocReader(devkit, "2007:cat_train")


# -- objects ------------------------------------------------------------------------------------

def test_one_based_inclusive_to_continuous(tmp_path: Path) -> None:
    record, problems = _read_one(tmp_path, [_object("dog", (1, 1, 10, 20)),
                                            _object("cat", (48, 240, 195, 371))])
    assert problems == []
    # xmin=1 is pixel column 0; xmax=10 is the last column covered, so the box spans [0, 10)
    assert record.boxes == [[0.0, 0.0, 10.0, 20.0], [47.0, 239.0, 195.0, 371.0]]
    assert record.labels == [12, 8]  # dog, cat: 1-based positions in VOC_CLASSES
    assert (record.width, record.height) == (500, 375)
    assert record.iscrowd == [False, False]


def test_part_boxes_are_not_objects(tmp_path: Path) -> None:
    parts = ("<part><name>head</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax>"
             "<ymax>9</ymax></bndbox></part>"
             "<part><name>hand</name><bndbox><xmin>2</xmin><ymin>30</ymin><xmax>6</xmax>"
             "<ymax>34</ymax></bndbox></part>")
    # the parts come before the object's own <bndbox> on purpose: a descendant search would
    # find a part's box first
    record, problems = _read_one(tmp_path, [_object("person", (3, 4, 50, 60), extra=parts),
                                            _object("dog", (1, 1, 10, 10))])
    assert problems == []
    assert record.labels == [15, 12]
    assert record.boxes == [[2.0, 3.0, 50.0, 60.0], [0.0, 0.0, 10.0, 10.0]]


def test_difficult_and_truncated_kept(tmp_path: Path) -> None:
    record, _ = _read_one(tmp_path, [
        _object("cat", (1, 1, 5, 5), "<truncated>0</truncated><difficult>1</difficult>"),
        _object("cat", (1, 1, 5, 5), "<truncated>1</truncated><difficult>0</difficult>"),
        _object("cat", (1, 1, 5, 5)),  # no flags: False
    ])
    assert record.difficult == [True, False, False]
    assert record.truncated == [False, True, False]


def test_unknown_class_dropped_with_file_and_class(tmp_path: Path) -> None:
    record, problems = _read_one(tmp_path, [_object(" cat ", (1, 1, 5, 5)),
                                            _object("unicorn", (1, 1, 5, 5)),
                                            _object("dog", (2, 2, 6, 6))])
    assert record.labels == [8, 12]  # " cat " is stripped
    assert record.boxes == [[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 6.0, 6.0]]
    assert len(problems) == 1
    problem = problems[0]
    assert problem.kind == "unknown_class" and problem.action == "drop_object"
    assert problem.file == str(tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml")
    assert "object 1" in problem.message and "'unicorn'" in problem.message


def test_custom_class_list(tmp_path: Path) -> None:
    objects = [_object("cat", (1, 1, 5, 5)), _object("dog", (1, 1, 5, 5))]
    record, problems = _read_one(tmp_path, objects, classes=("dog",))
    assert record.labels == [1]
    assert [p.kind for p in problems] == ["unknown_class"]


def _raw_object(coords: str) -> str:
    return f"<object><name>cat</name><bndbox>{coords}</bndbox></object>"


@pytest.mark.parametrize("obj, field", [
    (_object("cat", None), "no <bndbox>"),
    (_raw_object("<xmin>1</xmin><ymin>1</ymin><xmax>x</xmax><ymax>5</ymax>"), "<xmax>"),
    (_raw_object("<xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"), "<ymax>"),
    (_raw_object("<xmin>nan</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"), "<xmin>"),
    (_object("", (1, 1, 5, 5)), "no <name>"),
    (_object("cat", (1, 1, 5, 5), "<difficult>yes</difficult>"), "<difficult>"),
])
def test_malformed_object_dropped(tmp_path: Path, obj: str, field: str) -> None:
    record, problems = _read_one(tmp_path, [_object("dog", (1, 1, 5, 5)), obj])
    assert record.labels == [12]
    assert [p.kind for p in problems] == ["malformed_object"]
    assert problems[0].file.endswith("000001.xml")
    assert problems[0].message.startswith("object 1") and field in problems[0].message


def test_malformed_xml_skips_sample(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_xml(devkit, "000001", [])
    (devkit / "VOC2007" / "Annotations" / "000001.xml").write_text("<annotation><size>")
    _write_set(devkit, "train", ["000001", "000002"])  # 000002.xml does not exist
    reader = VocReader(devkit, "2007:train")
    first, second = reader.tasks()
    with pytest.raises(SampleError) as err:
        reader.read(first)
    assert err.value.problem.kind == "malformed_annotation"
    assert err.value.problem.file.endswith("000001.xml")
    assert "000001.xml" in str(err.value)
    with pytest.raises(SampleError, match="annotation file not found") as err:
        reader.read(second)
    assert err.value.problem.file.endswith("000002.xml")


@pytest.mark.parametrize("size, field", [
    ("", "<size>/<width>"),
    ("<size><width>500</width></size>", "<size>/<height>"),
    ("<size><width>0</width><height>375</height></size>", "<size>/<width>"),
    ("<size><width>500</width><height>big</height></size>", "<size>/<height>"),
])
def test_missing_or_bad_size_skips_sample(tmp_path: Path, size: str, field: str) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_xml(devkit, "000001", [], size=size)
    _write_set(devkit, "train", ["000001"])
    reader = VocReader(devkit, "2007:train")
    with pytest.raises(SampleError) as err:
        reader.read(reader.tasks()[0])
    assert err.value.problem.kind == "malformed_annotation" and field in err.value.problem.message


# -- keys, ids, paths ---------------------------------------------------------------------------

def test_keys_and_image_ids() -> None:
    assert voc_key("2007", "000005") == "2007_000005"
    assert voc_key("2012", "2012_000123") == "2012_000123"
    assert voc_key("2012", "2008_000123") == "2012_2008_000123"
    assert voc_key("synthetic", "a.b c") == "synthetic_a_b_c"
    assert voc_image_id("000005") == 5
    assert voc_image_id("2008_000123") == 2008000123
    expected = int.from_bytes(hashlib.sha1(b"img-a").digest()[:8], "big") >> 1
    assert voc_image_id("img-a") == expected and 0 <= expected < 2**63


def test_record_paths_and_source(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_xml(devkit, "000007", [_object("cat", (1, 1, 5, 5))], year="synthetic")
    _write_set(devkit, "train", ["000007"], year="synthetic")
    reader = VocReader(devkit, "synthetic:train", classes=("cat",))
    record, problems = reader.read(reader.tasks()[0])  # no image on disk: read does not open it
    assert problems == []
    assert record.key == "synthetic_000007" and record.image_id == 7
    assert record.image_path == str(devkit / "VOCsynthetic" / "JPEGImages" / "000007.jpg")
    assert record.annotation_file == str(devkit / "VOCsynthetic" / "Annotations" / "000007.xml")
    assert record.source == "voc:VOCsynthetic/000007"
    assert reader.id_mapping == {"cat": 1}
    assert reader.describe() == {"type": "voc", "root": str(devkit), "sets": "synthetic:train",
                                 "classes": ["cat"]}


def test_reader_and_tasks_pickle(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _write_xml(devkit, "000001", [_object("cat", (1, 1, 5, 5))])
    _write_set(devkit, "train", ["000001"])
    reader = VocReader(devkit, "2007:train")
    task = reader.tasks()[0]
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.read(pickle.loads(pickle.dumps(task))) == reader.read(task)


def test_to_voc_pixels_round_trip(tmp_path: Path) -> None:
    assert to_voc_pixels([0, 0, 10, 20]) == (1, 1, 10, 20)
    assert to_voc_pixels([9.6, 0.4, 30.5, 19.5]) == (11, 1, 31, 20)  # rounded half up
    with pytest.raises(ValueError):
        to_voc_pixels([0, 0, float("inf"), 1])
    boxes = [[0.0, 0.0, 10.0, 20.0], [47.0, 239.0, 500.0, 375.0], [3.0, 4.0, 4.0, 5.0]]
    record, problems = _read_one(tmp_path, [_object("cat", to_voc_pixels(b)) for b in boxes])
    assert problems == [] and record.boxes == boxes


# -- the shared VOC2007 subset ------------------------------------------------------------------

def _shared_devkit() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    base = Path(os.environ.get("SSD_SHARED_DATASETS") or default)
    devkit = base / "voc2007-mini" / "VOCdevkit"
    if not (devkit / "VOC2007").is_dir():
        pytest.skip(f"shared VOC2007 subset not found at {devkit} (set SSD_SHARED_DATASETS)")
    return devkit


@pytest.mark.integration
def test_shared_voc2007_mini() -> None:
    devkit = _shared_devkit()
    assert len(VocReader(devkit, "2007:trainval").tasks()) == 395
    assert len(VocReader(devkit, "2007:test").tasks()) == 205
    reader = VocReader(devkit, "2007:trainval+2007:test")
    tasks = reader.tasks()
    assert len(tasks) == 600 and reader.listing_problems == []
    labels: collections.Counter[int] = collections.Counter()
    difficult = truncated = 0
    records = {}
    for task in tasks:
        record, problems = reader.read(task)
        assert problems == [], problems
        assert Path(record.image_path).is_file()
        labels.update(record.labels)
        difficult += sum(record.difficult)
        truncated += sum(record.truncated)
        records[record.key] = record
    assert sum(labels.values()) == 1940
    assert (difficult, truncated) == (399, 953)
    assert sorted(labels) == list(range(1, 21)) and labels[VOC_CLASSES.index("person") + 1] == 620
    # 000162: a tvmonitor and a person whose five <part> boxes (feet, hands, head) are not objects
    tv_person = records["2007_000162"]
    assert tv_person.labels == [20, 15]
    assert tv_person.boxes == [[305.0, 226.0, 380.0, 299.0], [195.0, 142.0, 309.0, 369.0]]
    first = records["2007_000005"]
    assert first.image_id == 5 and first.source == "voc:VOC2007/000005"


@pytest.mark.integration
def test_shared_voc2007_sizes_match_images() -> None:
    image_module = pytest.importorskip("PIL.Image")
    reader = VocReader(_shared_devkit(), "2007:trainval+2007:test")
    for task in reader.tasks():
        record, _ = reader.read(task)
        with image_module.open(record.image_path) as image:  # reads the header only
            assert image.size == (record.width, record.height), record.key
