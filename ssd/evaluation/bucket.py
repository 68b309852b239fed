"""Score the detections of a batch-inference run against annotations in a standard layout.

``pipelines/predict.py --images DIR --annotations PATH`` runs a model over a bucket of images
and then scores what it wrote against:

* a COCO instances JSON (``PATH`` ends in ``.json``), images matched by the file name of
  ``images[].file_name`` (its last path component) = the input file's name;
* a PASCAL VOC year folder (``.../VOCdevkit/VOC2007``) or a VOCdevkit holding one year, with an
  image set (``ImageSets/Main/<image_set>.txt``, default ``test``), images matched by
  ``<id>.jpg`` = the input file's name;
* for shard inputs (``--images SHARDS``), either kind matched by the samples' ``image_id``.

The ground truth is read exactly as ``pipelines/make_shards.py`` converts it (the same readers,
``ssd.data.voc`` / ``ssd.data.coco``, and the same ``check_boxes``: boxes clipped to the image,
degenerate ones dropped; an image whose real size differs from the annotated one is left out, as
the converter leaves it out), and the metric is ``ssd.evaluation.service.results_from_states``,
the one ``pipelines/evaluate.py`` prints: the COCO AP suite (pycocotools), plus the VOC07 11-point
mAP for VOC annotations. So scoring a bucket of images here equals converting the same annotated
images to shards and running ``pipelines/evaluate.py --model ... --data SHARDS``.

Which images count: only input images that the annotations list and that were read. Input images
without an annotation are not scored (counted in ``not_annotated``), annotated images that were
not among the inputs are not either (``annotated_not_given``: the metric covers the images given,
not the whole annotation file), unreadable images are not (``unreadable``), nor images whose
annotation the converter would skip (``annotation_skipped``, with the problems).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssd.data.records import Problem, Record, SampleError, check_boxes

__all__ = ["Annotations", "load_annotations", "score_results"]

#: the VOC image set used when none is given
DEFAULT_VOC_IMAGE_SET = "test"


@dataclass
class Annotations:
    """Ground-truth records of an annotation source, indexed for matching input images.

    Attributes:
        source: the path as given; ``kind``: ``"coco"`` or ``"voc"``.
        classes: the class names (the model's; label ``k`` is ``classes[k - 1]``).
        by_name: image file name -> record; ``by_id``: image id -> record.
        skipped: file name -> the problem that made the converter skip that image.
        problems: every problem met while reading (dropped objects, skipped images).
    """

    source: str
    kind: str
    classes: tuple[str, ...]
    by_name: dict[str, Record] = field(default_factory=dict)
    by_id: dict[int, Record] = field(default_factory=dict)
    skipped: dict[str, Problem] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def voc(self) -> bool:
        return self.kind == "voc"


def _voc_root_and_year(path: Path) -> tuple[Path, str]:
    """(the VOCdevkit folder, the year) of a ``VOC<year>`` folder or of a VOCdevkit with one."""
    match = re.fullmatch(r"VOC([A-Za-z0-9]+)", path.name)
    if match and (path / "Annotations").is_dir():
        return path.parent, match.group(1)
    years = sorted(p.name[3:] for p in path.glob("VOC*") if (p / "Annotations").is_dir())
    if len(years) == 1:
        return path, years[0]
    raise ValueError(
        f"--annotations {path}: not a COCO JSON file (.json) nor a VOC layout: expected a VOC<year> folder "
        f"with Annotations/ (e.g. VOCdevkit/VOC2007) or a VOCdevkit holding one"
        + (f" (it holds {len(years)}: give one of them)" if years else ""))


def load_annotations(path: str | os.PathLike, classes: Sequence[str],
                     image_set: str | None = None) -> Annotations:
    """Read a COCO instances JSON or a VOC layout (see the module docstring) for a model whose
    classes are ``classes``.

    Raises:
        FileNotFoundError: no such file or folder, or no such VOC image set (the message names
            the splits that exist).
        ValueError: a malformed COCO JSON (the reader's message names the file and field), a
            folder that is no VOC layout, or annotations that share no class with the model.
    """
    from ssd.data.coco import CocoReader
    from ssd.data.voc import VocReader

    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"--annotations {location}: no such file or folder")
    if location.is_file():
        if image_set is not None:
            raise ValueError("--image-set is for VOC annotations; a COCO JSON lists its images itself")
        reader: Any = CocoReader(location.parent, location, classes=list(classes))
        kind = "coco"
        if not reader.id_mapping:  # category id -> label, for the categories named like a class
            raise ValueError(f"--annotations {location}: none of its categories is one of the model's "
                             f"classes ({', '.join(list(classes)[:5])}, ...)")
    else:
        root, year = _voc_root_and_year(location)
        reader = VocReader(root, f"{year}:{image_set or DEFAULT_VOC_IMAGE_SET}", classes=tuple(classes))
        kind = "voc"
    found = Annotations(str(location), kind, tuple(classes), problems=list(reader.listing_problems))
    for task in reader.tasks():
        try:
            record, problems = reader.read(task)
        except SampleError as err:  # e.g. a malformed VOC XML: the converter skips the image
            name = f"{task.image_id}.jpg" if kind == "voc" else str(task)
            found.skipped[name] = err.problem
            found.problems.append(err.problem)
            continue
        found.problems += problems
        name = Path(record.image_path).name
        if name in found.by_name:
            raise ValueError(f"--annotations {location}: two images are named {name}; inputs are matched by "
                             "file name, so it must be unique")
        found.by_name[name] = record
        found.by_id[record.image_id] = record
    return found


def score_results(annotations: Annotations, results: Sequence[Any], by_id: bool = False) -> dict[str, Any]:
    """The metrics of ``results`` (``ssd.batch_inference.ImageResult``) against ``annotations``.

    Args:
        by_id: match images by ``image_id`` (shard inputs) instead of by file name.
    Returns:
        ``{"metrics": results_from_states' dict (COCO suite; "VOC07" for VOC), "scored": n,
        "not_annotated": [paths], "annotated_not_given": n, "unreadable": [paths],
        "annotation_skipped": {path: reason}, "problems": n}``; ``metrics`` is None when no
        image could be scored.
    """
    from ssd.evaluation.coco import CocoEvaluator
    from ssd.evaluation.service import results_from_states

    evaluator = CocoEvaluator(list(annotations.classes))
    not_annotated: list[str] = []
    unreadable: list[str] = []
    skipped: dict[str, str] = {}
    matched: set[int] = set()
    for result in results:
        name = result.path.rsplit("/", 1)[-1]
        record = annotations.by_id.get(result.image_id) if by_id else annotations.by_name.get(name)
        if record is None:
            problem = None if by_id else annotations.skipped.get(name)
            if problem is not None:
                skipped[result.path] = str(problem)
            else:
                not_annotated.append(result.path)
            continue
        matched.add(record.image_id)
        if result.error:
            unreadable.append(result.path)
            continue
        if (result.width, result.height) != (record.width, record.height):  # the converter skips it
            skipped[result.path] = (f"the annotation says {record.width}x{record.height} but the image is "
                                    f"{result.width}x{result.height}")
            continue
        record = Record(**{**record.__dict__, "boxes": [list(b) for b in record.boxes],
                           "labels": list(record.labels), "difficult": list(record.difficult),
                           "truncated": list(record.truncated), "iscrowd": list(record.iscrowd)})
        check_boxes(record, result.width, result.height, record.annotation_file)  # clips, as make_shards
        evaluator.add(image_id=record.image_id, width=result.width, height=result.height,
                      gt_boxes=record.boxes, gt_labels=record.labels, det_boxes=result.boxes,
                      det_scores=result.scores, det_labels=result.labels,
                      gt_iscrowd=record.iscrowd, gt_difficult=record.difficult)
    metrics = results_from_states([evaluator.state()], annotations.voc) if len(evaluator) else None
    return {"metrics": metrics, "scored": len(evaluator), "not_annotated": not_annotated,
            "annotated_not_given": len(annotations.by_id) - len(matched), "unreadable": unreadable,
            "annotation_skipped": skipped, "problems": len(annotations.problems)}
