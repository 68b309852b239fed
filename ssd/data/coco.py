"""COCO reader: an images folder and an ``instances_*.json`` -> ``Record`` objects.

Labels. Categories sorted by id get contiguous labels 1..C (COCO's ids 1..90 have gaps); ``classes``
holds their names in that order and ``id_mapping`` maps ``str(category_id)`` -> label. Given an
explicit ``classes`` list, that list and order are used instead and categories are matched by name;
annotations of a category outside it are ``unknown_class`` and dropped.

Boxes. COCO's ``bbox`` is ``[x, y, w, h]`` in continuous pixel coordinates (floats); a record's box
is ``[x, y, x + w, y + h]``, not rounded and not clipped (the converter clips and reports).
``iscrowd`` is kept as a flag (absent -> False); COCO has no ``difficult`` / ``truncated``
(all False).

Images. ``file_name``, ``width``, ``height`` and ``id`` are required; an entry missing one, a
repeated image id, or a second image whose key equals an earlier one is left out and reported in
``listing_problems``. Images without annotations are kept as records with no objects unless
``drop_empty`` (their count is ``num_dropped_empty``). The key is ``file_name`` without its
extension, every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (``000000000009.jpg`` ->
``000000000009``). ``read`` never opens the image: the converter does, converting grayscale and
CMYK JPEGs (COCO has a few) to RGB and reporting a missing image as ``missing_image``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ssd.data.records import Problem, Record

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class _Image:
    id: int
    file_name: str
    width: int
    height: int
    key: str


@dataclass(frozen=True)
class _Annotation:
    """The fields a record needs, kept instead of the JSON entry (which holds the masks)."""

    index: int  # position in the file's ``annotations`` list
    id: Any
    category_id: Any
    bbox: Any
    iscrowd: Any


class CocoReader:
    """Reads a COCO instances JSON (parsed once, here); see the module docstring for conventions.

    Args:
        images_dir: the folder holding the images (``file_name`` is relative to it).
        annotations_file: the instances JSON.
        drop_empty: leave out images that have no annotation at all.
        classes: optional class names; label ``i + 1`` is ``classes[i]``; categories match by name.

    A missing ``annotations_file`` is a FileNotFoundError; unreadable or malformed JSON, a missing
    or malformed top-level ``images`` / ``categories``, or a malformed category is a ValueError
    naming the file (and the field). ``annotations`` may be absent (test-set files have none).

    ``tasks()`` returns image ids (ints), sorted.
    """

    def __init__(self, images_dir: str | Path, annotations_file: str | Path,
                 drop_empty: bool = False, classes: Sequence[str] | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        self.drop_empty = drop_empty
        self.given_classes = list(classes) if classes is not None else None
        self.listing_problems: list[Problem] = []
        self.num_dropped_empty = 0
        data = self._load()
        self.classes, self.id_mapping = self._map_categories(data["categories"])
        self._images: dict[int, _Image] = {}
        self._annotations: dict[int, list[_Annotation]] = {}
        self._list(data["images"], data.get("annotations") or [])

    # -- listing -----------------------------------------------------------------------------

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"{self.annotations_file}: {what}")

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.annotations_file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"COCO annotations file {self.annotations_file} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._fail(f"cannot read the COCO JSON: {err}") from None
        if not isinstance(data, dict):
            raise self._fail(f"expected a JSON object at the top level, got {type(data).__name__}")
        for name in ("images", "categories", "annotations"):
            value = data.get(name)
            if isinstance(value, list) or (name == "annotations" and value is None):
                continue  # annotations may be absent (test-set files)
            state = "missing" if name not in data else f"a {type(value).__name__}"
            raise self._fail(f"top-level '{name}' must be a list, but it is {state}")
        return data

    def _map_categories(self, categories: list[Any]) -> tuple[tuple[str, ...], dict[str, int]]:
        """Categories -> (class names, {str(category id): label})."""
        by_id: dict[int, str] = {}
        for i, cat in enumerate(categories):
            if not (isinstance(cat, dict) and _is_int(cat.get("id"))
                    and isinstance(cat.get("name"), str)):
                raise self._fail(
                    f"categories[{i}] needs an integer 'id' and a string 'name', got {cat!r}")
            if cat["id"] in by_id:
                raise self._fail(f"categories[{i}]: category id {cat['id']} appears twice")
            by_id[cat["id"]] = cat["name"]
        self._category_names = by_id
        ordered = sorted(by_id.items())
        if self.given_classes is None:
            names = tuple(name for _, name in ordered)
            if not names:
                raise self._fail("'categories' is empty")
            if len(set(names)) != len(names):
                raise self._fail("category names repeat; pass the class list (classes=...)")
            return names, {str(cid): label for label, (cid, _) in enumerate(ordered, start=1)}
        names = tuple(self.given_classes)
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"classes must be a non-empty list of unique names, got {list(names)!r}")
        label_of = {name: i + 1 for i, name in enumerate(names)}
        return names, {str(cid): label_of[name] for cid, name in ordered if name in label_of}

    def _list(self, images: list[Any], annotations: list[Any]) -> None:
        file = str(self.annotations_file)
        seen_ids: set[int] = set()  # every image id in the file, kept or not
        valid: list[tuple[int, int, _Image]] = []
        for i, entry in enumerate(images):
            image_or_error = _parse_image(entry)
            if isinstance(image_or_error, str):
                self.listing_problems.append(Problem(
                    "malformed_annotation", file, f"images[{i}]: {image_or_error}; image skipped"))
                if isinstance(entry, dict) and _is_int(entry.get("id")):
                    seen_ids.add(entry["id"])
                continue
            seen_ids.add(image_or_error.id)
            valid.append((image_or_error.id, i, image_or_error))
        keys: dict[str, str] = {}
        for image_id, i, image in sorted(valid, key=lambda t: t[:2]):  # by id, then file order
            if image_id in self._images:
                self.listing_problems.append(Problem(
                    "duplicate_image", file,
                    f"images[{i}] ({image.file_name}): image id {image_id} is already used by "
                    f"{self._images[image_id].file_name}; skipped"))
                continue
            if image.key in keys:
                self.listing_problems.append(Problem(
                    "duplicate_image", file,
                    f"images[{i}] ({image.file_name}, id {image_id}): its key {image.key!r} is "
                    f"already used by {keys[image.key]}; skipped"))
                continue
            keys[image.key] = image.file_name
            self._images[image_id] = image
            self._annotations[image_id] = []
        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                self.listing_problems.append(Problem(
                    "malformed_object", file,
                    f"annotations[{i}]: expected an object, got {ann!r}; dropped"))
                continue
            image_id = ann.get("image_id")
            if not (_is_int(image_id) and image_id in seen_ids):
                self.listing_problems.append(Problem(
                    "malformed_object", file,
                    f"annotations[{i}] (id {ann.get('id')!r}): image_id {image_id!r} is not an "
                    "image in the file; dropped"))
                continue
            if image_id in self._annotations:  # not an image skipped above (already reported)
                self._annotations[image_id].append(_Annotation(
                    i, ann.get("id"), ann.get("category_id"), ann.get("bbox"),
                    ann.get("iscrowd", 0)))
        self._task_ids = sorted(self._images)
        if self.drop_empty:
            kept = [i for i in self._task_ids if self._annotations[i]]
            self.num_dropped_empty = len(self._task_ids) - len(kept)
            self._task_ids = kept

    # -- protocol ----------------------------------------------------------------------------

    def tasks(self) -> list[int]:
        """Image ids, sorted (without annotation-less images when ``drop_empty``)."""
        return list(self._task_ids)

    def read(self, task: int) -> tuple[Record, list[Problem]]:
        """The record of image ``task``; bad annotations are dropped and returned as problems."""
        image = self._images[task]
        file = str(self.annotations_file)
        record = Record(
            key=image.key,
            image_path=str(self.images_dir / image.file_name),
            image_id=image.id,
            width=image.width,
            height=image.height,
            source=f"coco:{image.file_name}",
            annotation_file=file,
        )
        problems: list[Problem] = []
        for ann in self._annotations[task]:
            where = f"annotation id {ann.id} (annotations[{ann.index}], image {image.file_name})"
            known = _is_int(ann.category_id)
            label = self.id_mapping.get(str(ann.category_id)) if known else None
            if label is None:
                name = self._category_names.get(ann.category_id) if known else None
                why = ("is not among the categories" if name is None
                       else f"({name!r}) is not in the class list")
                problems.append(Problem("unknown_class", file,
                                        f"{where}: category_id {ann.category_id!r} {why}; dropped"))
                continue
            bbox = ann.bbox
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
                problems.append(Problem(
                    "malformed_object", file,
                    f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]; dropped"))
                continue
            if ann.iscrowd not in (0, 1):  # True/False compare equal to 1/0
                problems.append(Problem("malformed_object", file,
                                        f"{where}: iscrowd {ann.iscrowd!r} is not 0 or 1; dropped"))
                continue
            x, y, w, h = (float(v) for v in bbox)
            record.boxes.append([x, y, x + w, y + h])
            record.labels.append(label)
            record.difficult.append(False)
            record.truncated.append(False)
            record.iscrowd.append(bool(ann.iscrowd))
        return record, problems

    def describe(self) -> dict[str, Any]:
        """The source, for dataset.json."""
        return {
            "type": "coco",
            "images": str(self.images_dir),
            "annotations": str(self.annotations_file),
            "drop_empty": self.drop_empty,
            "dropped_empty": self.num_dropped_empty,
            "classes": self.given_classes,
        }


def coco_key(file_name: str) -> str:
    """Sample key of an image: ``file_name`` without extension, unsafe characters -> ``_``."""
    path = PurePosixPath(file_name)
    return _KEY_UNSAFE.sub("_", str(path.with_suffix("") if path.suffix else path))


def _parse_image(entry: Any) -> _Image | str:
    """An ``images`` entry -> ``_Image``, or what is wrong with it."""
    if not isinstance(entry, dict):
        return f"expected an object, got {entry!r}"
    for name in ("id", "file_name", "width", "height"):
        if name not in entry:
            return f"missing '{name}'"
    if not _is_int(entry["id"]):
        return f"'id' is {entry['id']!r}, not an integer"
    file_name = entry["file_name"]
    if not isinstance(file_name, str) or not file_name.strip():
        return f"'file_name' is {file_name!r}, not a file name"
    for name in ("width", "height"):
        value = entry[name]
        if not (_is_finite(value) and float(value).is_integer() and value > 0):
            return f"'{name}' is {value!r}, not a positive integer"
    key = coco_key(file_name)
    return _Image(entry["id"], file_name, int(entry["width"]), int(entry["height"]), key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
