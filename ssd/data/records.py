"""What the dataset readers produce, and how they report bad input.

A reader (``voc.py``, ``coco.py``) turns a dataset in its standard layout into ``Record`` objects:
one per image, with the image's path and its objects in absolute pixel ``x1, y1, x2, y2``
(continuous coordinates: a box covering pixel columns 0..9 has x1 = 0, x2 = 10).

Problems with the input are ``Problem`` values, never silent fixes. Each has a ``kind`` from
``PROBLEM_KINDS`` and an ``action`` saying what happened to the data:

- ``skip_sample``: the whole image is left out (missing or corrupt image, unreadable annotation);
- ``drop_object``: one object is left out (class not in the class list, degenerate box);
- ``clip_object``: one object's box reached outside the image and was clipped to it (kept).

``pipelines/make_shards.py`` counts them, prints each with its file, and with ``--strict`` stops at
the first one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

#: kind -> what happens to the data (the summary table prints them in this order)
PROBLEM_KINDS: dict[str, str] = {
    "missing_image": "skip_sample",
    "corrupt_image": "skip_sample",
    "malformed_annotation": "skip_sample",
    "size_mismatch": "skip_sample",
    "duplicate_image": "skip_sample",
    "malformed_object": "drop_object",
    "unknown_class": "drop_object",
    "degenerate_box": "drop_object",
    "box_clipped": "clip_object",
}


@dataclass(frozen=True)
class Problem:
    """One problem found in the input, with the file it is in and a message a person can act on."""

    kind: str
    file: str
    message: str

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}; expected one of {sorted(PROBLEM_KINDS)}")

    @property
    def action(self) -> str:
        return PROBLEM_KINDS[self.kind]

    def __str__(self) -> str:
        return f"{self.file}: {self.message} [{self.kind}, {self.action.replace('_', ' ')}]"


class SampleError(Exception):
    """Raised inside a reader when a whole sample must be skipped; carries the ``Problem``."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass
class Record:
    """One annotated image from a source dataset, before it is written to a shard.

    Attributes:
        key: stable, unique sample key (the shard's ``__key__``): letters, digits, ``_`` and
            ``-`` only (no dots: WebDataset splits keys at the first dot).
        image_path: the image file.
        image_id: integer id, unique within the dataset (COCO's ``id``; VOC's file name as int).
        width, height: the image size the annotation declares (checked against the image file).
        boxes: per object ``[x1, y1, x2, y2]`` floats, absolute continuous pixels.
        labels: per object int in 1..C (0 is background and never appears here).
        difficult, truncated, iscrowd: per object flags (a source without a flag gives False).
        source: where it came from, for people: e.g. ``voc:VOC2007/000005`` or ``coco:<file>``.
        annotation_file: the file holding the annotation (the XML, or the COCO JSON), named in
            problem messages about its boxes.
    """

    key: str
    image_path: str
    image_id: int
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    iscrowd: list[bool] = field(default_factory=list)
    source: str = ""
    annotation_file: str = ""

    @property
    def num_objects(self) -> int:
        return len(self.labels)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the objects at indices ``keep`` (in that order), in place."""
        for name in ("boxes", "labels", "difficult", "truncated", "iscrowd"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])


def check_boxes(record: Record, width: int, height: int, file: str) -> list[Problem]:
    """Clip ``record``'s boxes to a ``width`` x ``height`` image and drop degenerate ones, in place.

    A box reaching outside the image is clipped to it (``box_clipped``); a box with no area left,
    or with a non-finite coordinate, is dropped (``degenerate_box``). Returns the problems, one per
    affected object, each naming ``file``, the object's label and its box.
    """
    problems: list[Problem] = []
    keep: list[int] = []
    for index, box in enumerate(record.boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            problems.append(Problem("degenerate_box", file, f"{_what(record, index)}: non-finite box {box}"))
            continue
        clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            problems.append(Problem(
                "degenerate_box", file,
                f"{_what(record, index)}: box {_fmt(box)} has no area inside the {width}x{height} image"))
            continue
        if clipped != [x1, y1, x2, y2]:
            problems.append(Problem(
                "box_clipped", file,
                f"{_what(record, index)}: box {_fmt(box)} reaches outside the {width}x{height} image; "
                f"clipped to {_fmt(clipped)}"))
        record.boxes[index] = clipped
        keep.append(index)
    if len(keep) != len(record.boxes):
        record.select(keep)
    return problems


def _what(record: Record, index: int) -> str:
    # Objects are named by label and box, not by index: a reader may already have dropped some
    # objects, so an index into ``record.boxes`` need not match the source file's order.
    return f"object with label {record.labels[index]}"


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"
