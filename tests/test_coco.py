"""CocoReader: hand-written instances JSON in tmp_path, plus the shared COCO 2017 subset."""

from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from ssd.data.coco import CocoReader, coco_key

# Categories out of id order and with gaps (1, 3, 90): labels follow the sorted ids.
CATEGORIES = [
    {"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"},
]
IMAGES = [
    {"id": 30, "file_name": "b.jpg", "width": 640, "height": 480},
    {"id": 10, "file_name": "a.jpg", "width": 320, "height": 240},
    {"id": 20, "file_name": "empty.jpg", "width": 100, "height": 100},
]
ANNOTATIONS = [
    {"id": 100, "image_id": 10, "category_id": 3, "bbox": [10.5, 20.25, 30.0, 40.125],
     "iscrowd": 0},
    {"id": 101, "image_id": 10, "category_id": 90, "bbox": [0, 0, 1.5, 2.5], "iscrowd": 1},
    {"id": 102, "image_id": 30, "category_id": 1, "bbox": [1, 2, 3, 4]},  # no iscrowd: False
    {"id": 103, "image_id": 30, "category_id": 2, "bbox": [1, 2, 3, 4], "iscrowd": 0},
    {"id": 104, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0},
    {"id": 105, "image_id": 30, "category_id": 1, "bbox": [1, 2, 3], "iscrowd": 0},
]


def _write(tmp_path: Path, data: Any, name: str = "instances.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _reader(tmp_path: Path, images=IMAGES, annotations=ANNOTATIONS, **kwargs) -> CocoReader:
    data = {"images": images, "categories": CATEGORIES, "annotations": annotations}
    return CocoReader(tmp_path / "images", _write(tmp_path, data), **kwargs)


def test_category_ids_with_gaps_map_to_contiguous_labels(tmp_path: Path) -> None:
    reader = _reader(tmp_path)
    assert reader.classes == ("person", "car", "toothbrush")
    assert reader.id_mapping == {"1": 1, "3": 2, "90": 3}


def test_boxes_labels_and_flags(tmp_path: Path) -> None:
    reader = _reader(tmp_path)
    record, problems = reader.read(10)
    assert problems == []
    # [x, y, w, h] -> [x, y, x + w, y + h], floats as they are (these sums are exact in binary)
    assert record.boxes == [[10.5, 20.25, 40.5, 60.375], [0.0, 0.0, 1.5, 2.5]]
    assert record.labels == [2, 3]
    assert record.iscrowd == [False, True]
    assert record.difficult == [False, False] and record.truncated == [False, False]
    assert (record.key, record.image_id, record.width, record.height) == ("a", 10, 320, 240)
    # the image need not exist: read never opens it
    assert record.image_path == str(tmp_path / "images" / "a.jpg")
    assert record.source == "coco:a.jpg"
    assert record.annotation_file == str(tmp_path / "instances.json")


def test_unknown_category_and_malformed_bbox_dropped(tmp_path: Path) -> None:
    record, problems = _reader(tmp_path).read(30)
    assert record.boxes == [[1.0, 2.0, 4.0, 6.0]]
    assert record.labels == [1] and record.iscrowd == [False]
    assert [p.kind for p in problems] == ["unknown_class", "malformed_object"]
    unknown, malformed = problems
    assert unknown.file == str(tmp_path / "instances.json")
    assert "annotation id 103" in unknown.message and "b.jpg" in unknown.message
    assert "category_id 2 is not among the categories" in unknown.message
    assert "annotation id 105" in malformed.message and "[1, 2, 3]" in malformed.message


def test_annotation_of_missing_image_is_a_listing_problem(tmp_path: Path) -> None:
    reader = _reader(tmp_path)
    assert len(reader.listing_problems) == 1
    problem = reader.listing_problems[0]
    assert problem.kind == "malformed_object"
    assert "annotations[4] (id 104): image_id 99 is not an image" in problem.message


def test_empty_images_kept_or_dropped(tmp_path: Path) -> None:
    reader = _reader(tmp_path)
    assert reader.tasks() == [10, 20, 30]  # sorted by image id, not file order
    record, problems = reader.read(20)
    assert record.num_objects == 0 and record.boxes == [] and problems == []
    assert reader.num_dropped_empty == 0
    dropping = _reader(tmp_path, drop_empty=True)
    assert dropping.tasks() == [10, 30] and dropping.num_dropped_empty == 1
    assert dropping.describe() == {
        "type": "coco", "images": str(tmp_path / "images"),
        "annotations": str(tmp_path / "instances.json"),
        "drop_empty": True, "dropped_empty": 1, "classes": None,
    }


def test_explicit_class_list_maps_by_name(tmp_path: Path) -> None:
    reader = _reader(tmp_path, classes=["car", "person"])
    assert reader.classes == ("car", "person")
    assert reader.id_mapping == {"1": 2, "3": 1}
    record, problems = reader.read(10)
    assert record.labels == [1]
    assert [p.kind for p in problems] == ["unknown_class"]
    assert "category_id 90 ('toothbrush') is not in the class list" in problems[0].message


def test_annotations_field_optional(tmp_path: Path) -> None:
    path = _write(tmp_path, {"images": IMAGES, "categories": CATEGORIES})
    reader = CocoReader(tmp_path, path)
    assert reader.tasks() == [10, 20, 30] and reader.listing_problems == []
    assert reader.read(30)[0].num_objects == 0


@pytest.mark.parametrize("content, field", [
    ('{"images": [', "cannot read the COCO JSON"),
    ("[]", "expected a JSON object"),
    ({"categories": CATEGORIES}, "'images'"),
    ({"images": IMAGES}, "'categories'"),
    ({"images": IMAGES, "categories": {"id": 1}}, "'categories'"),
    ({"images": IMAGES, "categories": [{"id": 1}]}, "categories[0]"),
    ({"images": IMAGES, "categories": CATEGORIES, "annotations": {}}, "'annotations'"),
])
def test_malformed_json_is_a_value_error_naming_the_file(
        tmp_path: Path, content: Any, field: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as err:
        CocoReader(tmp_path, path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_missing_annotations_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoReader(tmp_path, tmp_path / "nope.json")


def test_key_sanitising() -> None:
    assert coco_key("000000000009.jpg") == "000000000009"
    assert coco_key("dir/x y.v2.jpg") == "dir_x_y_v2"
    assert coco_key("noext") == "noext"


def test_duplicate_keys_ids_and_malformed_images(tmp_path: Path) -> None:
    images = [
        {"id": 2, "file_name": "a_b.jpg", "width": 10, "height": 10},
        {"id": 1, "file_name": "a b.jpg", "width": 10, "height": 10},  # same key 'a_b', lower id
        {"id": 1, "file_name": "c.jpg", "width": 10, "height": 10},    # id 1 again
        {"id": 3, "file_name": "d.jpg", "height": 10},                 # no width
        {"id": 4, "file_name": "e.jpg", "width": 0, "height": 10},
    ]
    # an annotation of a skipped image: not reported again
    annotations = [{"id": 7, "image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]}]
    reader = _reader(tmp_path, images=images, annotations=annotations)
    assert reader.tasks() == [1]
    assert reader.read(1)[0].key == "a_b"
    messages = [(p.kind, p.message) for p in reader.listing_problems]
    assert messages == [
        ("malformed_annotation", "images[3]: missing 'width'; image skipped"),
        ("malformed_annotation", "images[4]: 'width' is 0, not a positive integer; image skipped"),
        ("duplicate_image", "images[2] (c.jpg): image id 1 is already used by a b.jpg; skipped"),
        ("duplicate_image",
         "images[0] (a_b.jpg, id 2): its key 'a_b' is already used by a b.jpg; skipped"),
    ]


def test_reader_pickles(tmp_path: Path) -> None:
    reader = _reader(tmp_path)
    assert pickle.loads(pickle.dumps(reader)).read(10) == reader.read(10)


# -- the shared COCO 2017 subset ----------------------------------------------------------------

def _shared_coco() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    base = Path(os.environ.get("SSD_SHARED_DATASETS") or default)
    root = base / "coco2017-mini"
    if not (root / "annotations" / "instances.json").is_file():
        pytest.skip(f"shared COCO subset not found at {root} (set SSD_SHARED_DATASETS)")
    return root


@pytest.mark.integration
def test_shared_coco2017_mini() -> None:
    root = _shared_coco()
    reader = CocoReader(root / "images", root / "annotations" / "instances.json")
    assert len(reader.tasks()) == 549 and reader.listing_problems == []
    assert len(reader.classes) == 80
    assert reader.id_mapping["1"] == 1 and reader.id_mapping["90"] == 80
    assert reader.classes[0] == "person" and reader.classes[-1] == "toothbrush"
    objects = crowd = empty = 0
    labels: collections.Counter[int] = collections.Counter()
    for task in reader.tasks():
        record, problems = reader.read(task)
        assert problems == [], problems
        assert Path(record.image_path).is_file()
        objects += record.num_objects
        crowd += sum(record.iscrowd)
        empty += record.num_objects == 0
        labels.update(record.labels)
    assert (objects, crowd, empty) == (4760, 50, 5)
    dropping = CocoReader(root / "images", root / "annotations" / "instances.json", drop_empty=True)
    assert len(dropping.tasks()) == 544 and dropping.num_dropped_empty == 5
    first = reader.read(9)[0]
    assert first.key == "000000000009" and (first.width, first.height) == (640, 480)
    assert first.boxes[0] == pytest.approx([1.08, 187.69, 612.67, 473.53])


@pytest.mark.integration
def test_shared_coco2017_splits() -> None:
    root = _shared_coco()
    train = CocoReader(root / "images", root / "annotations" / "instances_train2017.json")
    val = CocoReader(root / "images", root / "annotations" / "instances_val2017.json")
    assert (len(train.tasks()), len(val.tasks())) == (343, 206)
    assert train.id_mapping == val.id_mapping and len(train.classes) == 80
