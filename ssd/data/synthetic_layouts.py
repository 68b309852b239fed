"""Write the synthetic dataset to disk in the real PASCAL VOC and MS-COCO layouts.

The synthetic data then reaches training through the same readers as VOC and COCO
(``ssd/data/voc.py``, ``ssd/data/coco.py``), so the demo exercises the real input path.

``write_voc(root, {"train": 1536, "val": 128})`` writes::

    root/VOCdevkit/VOCsynthetic/
        JPEGImages/train000000.jpg ...      ids f"{split}{index:06d}", unique across splits
        Annotations/train000000.xml ...     genuine VOC XML, boxes 1-based inclusive integers
        ImageSets/Main/{train,val}.txt      the ids of each split (+ trainval.txt if both)
        classes.txt                         CLASSES, one per line, in label order

``write_coco(root, {"train": 1536, "val": 128})`` writes::

    root/train/000000000000.jpg ...         f"{index:012d}.jpg", one folder per split
    root/val/000000000000.jpg ...
    root/annotations/instances_{train,val}.json

Sample ``index`` of split ``s`` is ``render_sample(index, seed + SPLIT_SEED_OFFSETS[s])`` in both
layouts, so the same dataset written twice holds pixel-identical images (and, since the JPEG
settings are fixed, identical JPEG bytes). Every file is a pure function of the arguments: no
timestamps, JSON with sorted keys and fixed separators, baseline 4:2:0 JPEGs from Pillow.

Images are rendered, encoded and written in ``workers`` processes (spawned, so no forked OpenMP
or CUDA state; a script that calls the writers with ``workers > 1`` needs the usual
``if __name__ == "__main__":`` guard); the annotation files are written by the calling process
from the workers' records.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from ssd.data.synthetic import CLASSES, SPLIT_SEED_OFFSETS, render_sample

#: COCO category id of each class in CLASSES order; deliberately not 1..C (COCO's own ids have
#: gaps), so a reader's category id -> label mapping is exercised
COCO_CATEGORY_IDS: tuple[int, ...] = (1, 2, 4, 5, 7, 9)

#: COCO image id of sample ``index`` of split ``s`` is ``offset[s] + index + 1`` (unique across
#: splits; at most ``MAX_IMAGES_PER_SPLIT`` images per split)
COCO_IMAGE_ID_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000}
MAX_IMAGES_PER_SPLIT = 1_000_000

VOC_DATASET = "VOCsynthetic"


@dataclass(frozen=True)
class _Record:
    """What the annotation writers need of one rendered image (boxes: continuous integer xyxy)."""

    split: str
    index: int
    width: int
    height: int
    boxes: tuple[tuple[int, int, int, int], ...]
    labels: tuple[int, ...]
    truncated: tuple[bool, ...]


def voc_id(split: str, index: int) -> str:
    """The VOC image id of sample ``index`` of ``split`` (``"train000012"``)."""
    return f"{split}{index:06d}"


def coco_image_id(split: str, index: int) -> int:
    """The COCO image id of sample ``index`` of ``split`` (unique across splits)."""
    return COCO_IMAGE_ID_OFFSETS[split] + index + 1


def _render_and_save(
    task: tuple[str, int], *, seed: int, quality: int, path_of: Callable[[str, int], Path]
) -> _Record:
    """Render one sample, write it as a baseline RGB JPEG to ``path_of(split, index)``."""
    split, index = task
    image, target = render_sample(index, seed + SPLIT_SEED_OFFSETS[split])
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(
        buffer, format="JPEG", quality=quality
    )
    path_of(split, index).write_bytes(buffer.getvalue())
    boxes = target["boxes"]
    if not torch.equal(boxes, boxes.round()):  # render_sample's boxes are pixel-aligned
        raise AssertionError(f"non-integral synthetic box in {split} {index}: {boxes}")
    return _Record(
        split=split,
        index=index,
        width=int(image.shape[2]),
        height=int(image.shape[1]),
        boxes=tuple(tuple(int(v) for v in box) for box in boxes.tolist()),
        labels=tuple(int(v) for v in target["labels"].tolist()),
        truncated=tuple(bool(v) for v in target["truncated"].tolist()),
    )


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core already; avoid oversubscription


def _default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _render_all(
    splits: Mapping[str, int],
    seed: int,
    workers: int | None,
    quality: int,
    path_of: Callable[[str, int], Path],
) -> dict[str, list[_Record]]:
    """Render every image of ``splits`` once, in parallel; records per split in index order."""
    tasks = [(split, index) for split, count in splits.items() for index in range(count)]
    render = partial(_render_and_save, seed=seed, quality=quality, path_of=path_of)
    workers = _default_workers() if workers is None else workers
    workers = min(workers, len(tasks))
    if workers <= 1:
        records = [render(task) for task in tasks]
    else:
        # spawn, not fork: the caller may hold OpenMP/CUDA/Ray threads that a fork would copy in a
        # broken state. Spawned workers import the caller's main module, hence the main guard;
        # without one, a worker fails to start and this raises BrokenProcessPool (a Pool would
        # restart it forever).
        context = multiprocessing.get_context("spawn")
        chunksize = max(1, min(32, len(tasks) // (4 * workers)))
        try:
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
                records = list(pool.map(render, tasks, chunksize=chunksize))  # ordered like tasks
        except BrokenProcessPool as err:
            raise RuntimeError(
                "a rendering worker died; if it failed to start, the calling script needs an "
                "`if __name__ == '__main__':` guard (or pass workers=0 to render in process)"
            ) from err
    out: dict[str, list[_Record]] = {split: [] for split in splits}
    for record in records:
        out[record.split].append(record)
    return out


def _check_args(splits: Mapping[str, int], quality: int, workers: int | None) -> None:
    for split, count in splits.items():
        if split not in SPLIT_SEED_OFFSETS:
            raise ValueError(
                f"unknown split {split!r}; expected one of {sorted(SPLIT_SEED_OFFSETS)}"
            )
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 0 <= count <= MAX_IMAGES_PER_SPLIT
        ):
            raise ValueError(
                f"split {split!r}: image count must be an int in "
                f"[0, {MAX_IMAGES_PER_SPLIT}], got {count!r}"
            )
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be None or >= 0, got {workers}")


def _text(parent: ET.Element, tag: str, text: object) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = str(text)
    return element


def _names(class_names: Sequence[str] | None) -> tuple[str, ...]:
    """The written class names: ``class_names`` (one per class of CLASSES, in order) or CLASSES."""
    if class_names is None:
        return CLASSES
    names = tuple(class_names)
    if len(names) != len(CLASSES) or len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise ValueError(f"class_names must be {len(CLASSES)} distinct non-empty names (one per class of "
                         f"{CLASSES}), got {list(names)}")
    return names


def _voc_xml(record: _Record, seed: int, names: Sequence[str] = CLASSES) -> str:
    """The genuine VOC annotation of one image (as VOC2007/2012 ``Annotations/*.xml``)."""
    image_id = voc_id(record.split, record.index)
    root = ET.Element("annotation")
    _text(root, "folder", VOC_DATASET)
    _text(root, "filename", f"{image_id}.jpg")
    source = ET.SubElement(root, "source")
    _text(source, "database", "The VOCsynthetic Database")
    _text(source, "annotation", "ssd.data.synthetic")
    _text(
        source,
        "image",
        f"render_sample({record.index}, seed={seed + SPLIT_SEED_OFFSETS[record.split]})",
    )
    size = ET.SubElement(root, "size")
    _text(size, "width", record.width)
    _text(size, "height", record.height)
    _text(size, "depth", 3)
    _text(root, "segmented", 0)
    for (x1, y1, x2, y2), label, truncated in zip(record.boxes, record.labels, record.truncated):
        obj = ET.SubElement(root, "object")
        _text(obj, "name", names[label - 1])
        _text(obj, "pose", "Unspecified")
        _text(obj, "truncated", int(truncated))
        _text(obj, "difficult", 0)
        bndbox = ET.SubElement(obj, "bndbox")
        # VOC: 1-based pixel indices, inclusive; continuous x1 (first column, 0-based) -> x1 + 1,
        # continuous x2 (exclusive) -> x2 (the last column, 1-based)
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            _text(bndbox, tag, value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def write_voc(
    root: str | os.PathLike,
    splits: Mapping[str, int],
    seed: int = 0,
    workers: int | None = None,
    quality: int = 95,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the synthetic dataset as ``root/VOCdevkit/VOCsynthetic`` in the PASCAL VOC layout.

    Args:
        root: output folder (created; files already there are overwritten, others left alone).
        splits: images per split, e.g. ``{"train": 1536, "val": 128}``; names from
            ``SPLIT_SEED_OFFSETS``. ``trainval.txt`` is written too when train and val both are.
        seed: dataset seed; split ``s`` renders ``render_sample(i, seed + SPLIT_SEED_OFFSETS[s])``.
        workers: rendering processes; None = the usable CPU cores, 0 or 1 = in this process.
        quality: JPEG quality (Pillow's scale; baseline, 4:2:0, no EXIF).
        class_names: the names written for the classes of ``CLASSES`` (in that order), e.g.
            VOC names for a transfer test; default ``CLASSES``.

    Returns:
        The ``VOCdevkit`` folder: read it with year ``"synthetic"`` and the names in classes.txt.
    """
    _check_args(splits, quality, workers)
    names = _names(class_names)
    devkit = Path(root) / "VOCdevkit"
    base = devkit / VOC_DATASET
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    path_of = partial(_voc_jpeg_path, base / "JPEGImages")
    records = _render_all(splits, seed, workers, quality, path_of)
    for split_records in records.values():
        for record in split_records:
            xml = _voc_xml(record, seed, names)
            (base / "Annotations" / f"{voc_id(record.split, record.index)}.xml").write_text(
                xml, encoding="utf-8"
            )
    image_sets = {
        split: [voc_id(r.split, r.index) for r in recs] for split, recs in records.items()
    }
    if "train" in image_sets and "val" in image_sets:
        image_sets["trainval"] = sorted(image_sets["train"] + image_sets["val"])
    for name, ids in image_sets.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text(
            "".join(f"{i}\n" for i in ids), encoding="utf-8"
        )
    (base / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return devkit


def _voc_jpeg_path(folder: Path, split: str, index: int) -> Path:
    return folder / f"{voc_id(split, index)}.jpg"


def _coco_jpeg_path(root: Path, split: str, index: int) -> Path:
    return root / split / f"{index:012d}.jpg"


def _coco_instances(split: str, records: Sequence[_Record], seed: int, names: Sequence[str] = CLASSES) -> dict:
    """The genuine COCO ``instances_*.json`` content of one split."""
    images, annotations = [], []
    for record in records:
        image_id = coco_image_id(split, record.index)
        images.append(
            {
                "id": image_id,
                "file_name": f"{record.index:012d}.jpg",
                "width": record.width,
                "height": record.height,
                "license": 1,
            }
        )
        for (x1, y1, x2, y2), label in zip(record.boxes, record.labels):
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,  # unique within the file
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[label - 1],
                    "bbox": [float(x1), float(y1), w, h],
                    # COCO's area is the segmentation mask's; ours is the box's, w * h
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[float(v) for v in (x1, y1, x2, y1, x2, y2, x1, y2)]],
                }
            )
    render_seed = seed + SPLIT_SEED_OFFSETS[split]
    return {
        "info": {
            "description": f"ssd.data.synthetic, split {split}, seed {render_seed}",
            "version": "1.0",
            "contributor": "ssd.data.synthetic",
            "url": "",
            "year": None,
            "date_created": "",  # empty on purpose: the files must not depend on when written
        },
        "licenses": [{"id": 1, "name": "procedurally generated", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cat_id, "name": name, "supercategory": "shape"}
            for cat_id, name in zip(COCO_CATEGORY_IDS, names)
        ],
    }


def write_coco(
    root: str | os.PathLike,
    splits: Mapping[str, int],
    seed: int = 0,
    workers: int | None = None,
    quality: int = 95,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the synthetic dataset under ``root`` in the MS-COCO layout.

    Images go to ``root/{split}/{index:012d}.jpg``, annotations to
    ``root/annotations/instances_{split}.json``: category ids ``COCO_CATEGORY_IDS`` (with gaps),
    image ids ``coco_image_id(split, index)``, bbox ``[x, y, w, h]`` in continuous pixels, area
    ``w * h`` (the box's area: there are no masks), segmentation the box polygon, iscrowd 0.
    Arguments as :func:`write_voc`. Returns ``root``.
    """
    _check_args(splits, quality, workers)
    names = _names(class_names)
    root = Path(root)
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    records = _render_all(splits, seed, workers, quality, partial(_coco_jpeg_path, root))
    for split, split_records in records.items():
        content = json.dumps(
            _coco_instances(split, split_records, seed, names), sort_keys=True, separators=(",", ":")
        )
        (root / "annotations" / f"instances_{split}.json").write_text(
            content + "\n", encoding="utf-8"
        )
    return root
