"""PASCAL VOC reader: a VOCdevkit folder and ``YEAR:SPLIT`` image sets -> ``Record`` objects.

Layout (the devkit's)::

    root/                              the VOCdevkit folder, passed as ``root``
      VOC{year}/ImageSets/Main/{split}.txt   one image id per line
      VOC{year}/Annotations/{id}.xml
      VOC{year}/JPEGImages/{id}.jpg

Pixel convention. VOC coordinates are 1-based inclusive integer pixel indices: ``xmin = 1`` is the
first pixel column and ``xmax`` is the last column the box covers, so the devkit computes the width
as ``xmax - xmin + 1``. Records use continuous 0-based coordinates (``records.py``), hence::

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax      (width = x2 - x1 = xmax - xmin + 1)

``to_voc_pixels`` is the inverse, for writers of VOC-layout data. Boxes are not clipped here: the
converter clips them to the real image size and reports it (``check_boxes``).

Keys and ids. The sample key is ``{year}_{id}`` (``2007_000005``) unless the id already starts with
``{year}_`` (``2012_000123`` stays as is; VOC2012's ``2008_000123`` becomes ``2012_2008_000123``, so
a VOC2012 id can never collide with a VOC2007 key). ``image_id`` is the id's digits read as one
integer (``000005`` -> 5, ``2008_000123`` -> 2008000123); an id that is not digit groups joined by
``_`` (or has more than 18 digits) gets a stable hash instead: the first 8 bytes of the SHA-1 of the
id, as a big-endian integer shifted right by one bit so that it fits in an int64.

``read`` parses the XML only: it never opens the image, and does not check that the image exists
(the converter reports a missing image as ``missing_image``, naming the annotation). The image is
expected at ``JPEGImages/{id}.jpg`` whatever the XML's ``<filename>`` says, as in the devkit.
"""

from __future__ import annotations

import hashlib
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd.data.records import Problem, Record, SampleError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

_SET_TOKEN = re.compile(r"([A-Za-z0-9]+):([A-Za-z0-9_-]+)")
_NUMERIC_ID = re.compile(r"[0-9]+(?:_[0-9]+)*")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SETS_FORM = "YEAR:SPLIT[+YEAR:SPLIT...], e.g. '2007:trainval+2012:trainval'"


def parse_image_sets(sets: str) -> list[tuple[str, str]]:
    """``"2007:trainval+2012:trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``.

    YEAR is any ``[A-Za-z0-9]+`` (``synthetic:train`` reads ``VOCsynthetic``); SPLIT is any
    ``[A-Za-z0-9_-]+``. Spaces around the tokens are ignored. Bad syntax is a ValueError.
    """
    tokens = [token.strip() for token in sets.split("+")]
    parsed: list[tuple[str, str]] = []
    for token in tokens:
        match = _SET_TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(f"bad VOC image sets {sets!r} (at {token!r}); expected {_SETS_FORM}")
        parsed.append((match.group(1), match.group(2)))
    return parsed


def to_voc_pixels(box: Sequence[float]) -> tuple[int, int, int, int]:
    """Continuous ``[x1, y1, x2, y2]`` -> VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)``.

    The inverse of the reader's conversion: ``(x1 + 1, y1 + 1, x2, y2)``, each rounded half up to
    an int (so integral boxes round-trip exactly). No clipping.
    """
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"expected 4 finite numbers [x1, y1, x2, y2], got {list(box)!r}")
    x1, y1, x2, y2 = values
    xmin, ymin, xmax, ymax = (math.floor(v + 0.5) for v in (x1 + 1, y1 + 1, x2, y2))
    return xmin, ymin, xmax, ymax


def voc_image_id(image_id: str) -> int:
    """The integer ``image_id`` of a VOC id (see the module docstring): digits, or a stable hash."""
    digits = image_id.replace("_", "")
    if _NUMERIC_ID.fullmatch(image_id) and len(digits) <= 18:
        return int(digits)
    return int.from_bytes(hashlib.sha1(image_id.encode()).digest()[:8], "big") >> 1


def voc_key(year: str, image_id: str) -> str:
    """Sample key: ``{year}_{id}`` unless the id starts with ``{year}_``; unsafe chars -> ``_``."""
    key = image_id if image_id.startswith(f"{year}_") else f"{year}_{image_id}"
    return _KEY_UNSAFE.sub("_", key)


@dataclass(frozen=True)
class VocTask:
    """One image to read: ``VOC{year}/Annotations/{image_id}.xml``."""

    year: str
    image_id: str
    key: str


class VocReader:
    """Reads ``root/VOC{year}`` image sets; see the module docstring for conventions.

    Args:
        root: the VOCdevkit folder (the parent of ``VOC2007``).
        sets: ``YEAR:SPLIT`` joined by ``+`` (``parse_image_sets``).
        classes: class names; label ``i + 1`` is ``classes[i]``. Objects of other classes are
            dropped (``unknown_class``).

    The image sets are listed here, so a missing set file fails at construction
    (FileNotFoundError naming it and the splits that exist). An image listed twice (overlapping
    sets) is read once; the repeat is a ``duplicate_image`` in ``listing_problems``.
    """

    def __init__(self, root: str | Path, sets: str = "2007:trainval",
                 classes: Sequence[str] = VOC_CLASSES) -> None:
        self.root = Path(root)
        self.sets = parse_image_sets(sets)
        self.classes: tuple[str, ...] = _check_classes(classes)
        self.id_mapping: dict[str, int] = {name: i + 1 for i, name in enumerate(self.classes)}
        self.listing_problems: list[Problem] = []
        self._tasks = self._list()

    def _year_dir(self, year: str) -> Path:
        folder = self.root / f"VOC{year}"
        if folder.is_dir():
            return folder
        is_year_folder = re.fullmatch(r"VOC[A-Za-z0-9]+", self.root.name) is not None
        if is_year_folder and (self.root / "Annotations").is_dir():
            hint = (f"; {self.root} looks like a VOC year folder itself: "
                    f"pass its parent {self.root.parent}")
        elif (self.root / "VOCdevkit" / f"VOC{year}").is_dir():
            hint = f"; pass {self.root / 'VOCdevkit'} instead"
        else:
            found = sorted(p.name for p in self.root.glob("VOC*") if p.is_dir())
            hint = f" (VOC folders there: {', '.join(found) or 'none'})"
        raise FileNotFoundError(f"no VOC{year} folder in {self.root}: root must be the VOCdevkit "
                                f"folder holding VOC{year}{hint}")

    def _list(self) -> list[VocTask]:
        tasks: list[VocTask] = []
        first_seen: dict[tuple[str, str], str] = {}  # (year, id) -> the set that listed it first
        keys: dict[str, str] = {}                      # key -> "year:id" that has it
        numbers: dict[int, str] = {}                   # image_id -> "year:id" that has it
        for year, split in self.sets:
            set_file = self._year_dir(year) / "ImageSets" / "Main" / f"{split}.txt"
            for image_id in _read_set_file(set_file):
                name = f"{year}:{image_id}"
                where = first_seen.get((year, image_id))
                if where is not None:
                    self.listing_problems.append(Problem(
                        "duplicate_image", str(set_file),
                        f"image {image_id} of {year}:{split} is already listed by {where}; "
                        "read once"))
                    continue
                first_seen[(year, image_id)] = f"{year}:{split}"
                # distinct ids can still collide after sanitising or as numbers (e.g. a custom
                # year with ids '5' and '0005'): skip rather than write two samples with one id
                key, number = voc_key(year, image_id), voc_image_id(image_id)
                if key in keys or number in numbers:
                    clash = (f"key {key!r} as {keys[key]}" if key in keys
                             else f"image_id {number} as {numbers[number]}")
                    self.listing_problems.append(Problem(
                        "duplicate_image", str(set_file),
                        f"image {image_id} of {year}:{split} has the same {clash}; skipped"))
                    continue
                keys[key], numbers[number] = name, name
                tasks.append(VocTask(year, image_id, key))
        return tasks

    def tasks(self) -> list[VocTask]:
        """One task per image: sets in the given order, ids in file order, repeats left out."""
        return list(self._tasks)

    def read(self, task: VocTask) -> tuple[Record, list[Problem]]:
        """Parse one annotation XML (never the image).

        Object problems drop the object and are returned; sample problems raise SampleError.
        """
        folder = self.root / f"VOC{task.year}"
        xml_path = folder / "Annotations" / f"{task.image_id}.xml"
        xml_file = str(xml_path)
        try:
            root = ET.parse(xml_path).getroot()
        except FileNotFoundError:
            raise SampleError(Problem(
                "malformed_annotation", xml_file, "annotation file not found")) from None
        except (ET.ParseError, OSError) as err:
            raise SampleError(Problem(
                "malformed_annotation", xml_file, f"cannot parse the XML: {err}")) from None
        width = _size_field(root, "width", xml_file)
        height = _size_field(root, "height", xml_file)
        record = Record(
            key=task.key,
            image_path=str(folder / "JPEGImages" / f"{task.image_id}.jpg"),
            image_id=voc_image_id(task.image_id),
            width=width,
            height=height,
            source=f"voc:VOC{task.year}/{task.image_id}",
            annotation_file=xml_file,
        )
        problems: list[Problem] = []
        # direct children only: a person's <part> elements carry <name> and <bndbox> of their own
        for index, obj in enumerate(root.findall("object")):
            try:
                name, box, difficult, truncated = _parse_object(obj)
            except ValueError as err:
                problems.append(Problem(
                    "malformed_object", xml_file, f"object {index}: {err}; dropped"))
                continue
            label = self.id_mapping.get(name)
            if label is None:
                problems.append(Problem(
                    "unknown_class", xml_file,
                    f"object {index}: class {name!r} is not one of the {len(self.classes)} "
                    "classes; dropped"))
                continue
            record.boxes.append(box)
            record.labels.append(label)
            record.difficult.append(difficult)
            record.truncated.append(truncated)
            record.iscrowd.append(False)
        return record, problems

    def describe(self) -> dict[str, Any]:
        """The source, for dataset.json."""
        return {
            "type": "voc",
            "root": str(self.root),
            "sets": "+".join(f"{year}:{split}" for year, split in self.sets),
            "classes": list(self.classes),
        }


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    names = tuple(classes)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError(
            f"classes must be a non-empty list of non-empty names, got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes must be unique, got {list(names)!r}")
    return names


def _read_set_file(path: Path) -> list[str]:
    """Image ids of an ``ImageSets/Main/{split}.txt``, in file order; blank lines ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        splits = ", ".join(_splits(path.parent)) or "none"
        raise FileNotFoundError(
            f"image set file {path} not found; splits there: {splits}") from None
    ids: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:  # e.g. a per-class file "{class}_{split}.txt" given as the split
            raise ValueError(
                f"{path} line {number}: expected one image id per line, got {line.strip()!r}")
        ids.append(fields[0])
    return ids


def _splits(folder: Path) -> list[str]:
    """Split names in ``ImageSets/Main``: stems that are not ``{class}_{another stem}``."""
    stems = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    return [s for s in stems if not any(s.endswith(f"_{t}") for t in stems if t != s)]


def _size_field(root: ET.Element, name: str, file: str) -> int:
    text = root.findtext(f"size/{name}")
    if text is None:
        raise SampleError(Problem("malformed_annotation", file, f"no <size>/<{name}>"))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer() and value > 0):
        raise SampleError(Problem("malformed_annotation", file,
                                  f"<size>/<{name}> is {text.strip()!r}, not a positive integer"))
    return int(value)


def _parse_object(obj: ET.Element) -> tuple[str, list[float], bool, bool]:
    """``<object>`` -> (name, continuous box, difficult, truncated); ValueError if malformed."""
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise ValueError("no <name>")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise ValueError(f"class {name!r}: no <bndbox>")
    coords: list[float] = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = bndbox.findtext(tag)
        try:
            value = float(text) if text is not None else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"class {name!r}: <bndbox>/<{tag}> is {text!r}, not a finite number")
        coords.append(value)
    xmin, ymin, xmax, ymax = coords
    box = [xmin - 1.0, ymin - 1.0, xmax, ymax]  # 1-based inclusive -> continuous 0-based
    return name, box, _flag(obj, "difficult", name), _flag(obj, "truncated", name)


def _flag(obj: ET.Element, tag: str, name: str) -> bool:
    """A 0/1 flag child; absent or empty -> False."""
    text = (obj.findtext(tag) or "").strip()
    if text in ("", "0"):
        return False
    if text == "1":
        return True
    raise ValueError(f"class {name!r}: <{tag}> is {text!r}, expected 0 or 1")
