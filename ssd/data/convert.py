"""Convert a dataset reader's records into WebDataset shards, in parallel and deterministically.

The reader (``VocReader``, ``CocoReader``) lists light tasks; worker processes read each task's
annotation and image, validate and convert the image (``ssd.data.images``), clip or drop bad
boxes (``check_boxes``), and return the sample's bytes. The parent writes them in source order,
so the same input always gives the same shard bytes, whatever the number of workers.

Bad input never stops a default run and is never silent: each problem is printed with its file,
counted, written to ``problems.txt``, and summarised in a table at the end. With ``strict=True``
the first problem (in source order) stops the run and no dataset.json is written.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ssd.data.images import ImageError, prepare_image
from ssd.data.records import PROBLEM_KINDS, Problem, Record, SampleError, check_boxes
from ssd.data.shards import (
    DATASET_JSON,
    FORMAT_NAME,
    FORMAT_VERSION,
    ShardWriter,
    content_hash,
    encode_json,
)

#: problems of one kind printed one by one before the rest are only counted (all are in problems.txt)
MAX_PRINTED_PER_KIND = 10


class Reader(Protocol):
    classes: tuple[str, ...]
    id_mapping: dict[str, int]
    listing_problems: list[Problem]

    def tasks(self) -> list[Any]: ...
    def read(self, task: Any) -> tuple[Record, list[Problem]]: ...
    def describe(self) -> dict[str, Any]: ...


class ConversionError(Exception):
    """A problem in strict mode; ``problem`` says which and where."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"strict mode: {problem}")
        self.problem = problem


@dataclass
class ConversionReport:
    """What a conversion did: dataset.json's content plus counts for the summary."""

    info: dict[str, Any]
    problems: list[Problem]
    listed: int
    written: int
    objects: int
    reencoded: Counter = field(default_factory=Counter)  # reason -> images re-encoded
    source_image_bytes: int = 0
    shard_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    key: str
    jpg: bytes
    meta: dict[str, Any]
    problems: list[Problem]
    reencoded: str | None  # the reason, when re-encoded
    source_bytes: int


@dataclass
class _Skipped:
    problems: list[Problem]  # the last one is the reason for the skip


_WORKER_READER: Reader | None = None


def _init_worker(reader: Reader) -> None:
    global _WORKER_READER
    _WORKER_READER = reader


def _prepare(task: Any) -> _Prepared | _Skipped:
    return prepare_record(_WORKER_READER, task)


def prepare_record(reader: Reader, task: Any) -> _Prepared | _Skipped:
    """Read one task and return its shard sample, or why it was skipped (runs in a worker)."""
    try:
        record, problems = reader.read(task)
    except SampleError as err:
        return _Skipped([err.problem])
    path = record.image_path
    annotation = record.annotation_file or record.source or path
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return _Skipped([*problems, Problem("missing_image", path, f"image file not found (annotated in {annotation})")])
    except OSError as err:
        return _Skipped([*problems, Problem("missing_image", path, f"cannot read the image file: {err}")])
    try:
        image = prepare_image(data)
    except ImageError as err:
        return _Skipped([*problems, Problem("corrupt_image", path, str(err))])
    if (image.width, image.height) != (record.width, record.height):
        return _Skipped([*problems, Problem(
            "size_mismatch", annotation,
            f"the annotation says {record.width}x{record.height} but the image {path} is "
            f"{image.width}x{image.height}")])
    problems = [*problems, *check_boxes(record, image.width, image.height, annotation)]
    meta = {
        "boxes": record.boxes,
        "labels": record.labels,
        "difficult": record.difficult,
        "truncated": record.truncated,
        "iscrowd": record.iscrowd,
        "width": image.width,
        "height": image.height,
        "image_id": record.image_id,
        "source": record.source,
    }
    return _Prepared(record.key, image.data, meta, problems, image.reason if image.reencoded else None, len(data))


def _results(reader: Reader, tasks: Sequence[Any], workers: int):
    if workers <= 1:
        for task in tasks:
            yield prepare_record(reader, task)
        return
    # fork: workers inherit the parsed reader (a COCO index can be large) instead of unpickling it
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (reader,)) as pool:
        chunk = max(1, min(16, len(tasks) // (workers * 8) or 1))
        yield from pool.imap(_prepare, tasks, chunksize=chunk)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse to mix with an earlier conversion unless ``overwrite``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob("shard-*.tar*")) + [p for p in (out_dir / DATASET_JSON, out_dir / "problems.txt") if p.exists()]
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds shards ({old[0].name}, ...); pass --overwrite to replace them")
    for path in old:
        path.unlink()


def convert(
    reader: Reader,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    max_shard_bytes: int | None = None,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Convert every task of ``reader`` into shards in ``out_dir`` plus ``dataset.json``.

    Args:
        shard_size: samples per shard; ``max_shard_bytes`` also closes a shard before it grows
            past that size.
        workers: processes (default: all CPU cores).
        strict: stop at the first problem (``ConversionError``), leaving no dataset.json.
        log: where problem lines go (default: stderr).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    start = time.perf_counter()
    prepare_output_dir(out_dir, overwrite)

    printed: Counter = Counter()
    problems: list[Problem] = []

    def report(problem: Problem) -> None:
        if strict:
            raise ConversionError(problem)
        problems.append(problem)
        printed[problem.kind] += 1
        if printed[problem.kind] <= MAX_PRINTED_PER_KIND:
            log(f"warning: {problem}")
        elif printed[problem.kind] == MAX_PRINTED_PER_KIND + 1:
            log(f"warning: more {problem.kind} problems are counted, not printed (all are in problems.txt)")

    writer = ShardWriter(out_dir, max_samples=shard_size, max_bytes=max_shard_bytes)
    tasks = reader.tasks()
    written = objects = source_bytes = 0
    reencoded: Counter = Counter()
    class_counts: Counter = Counter()
    flags: Counter = Counter()
    seen_keys: set[str] = set()
    try:
        for problem in reader.listing_problems:
            report(problem)
        bar = _progress(len(tasks), progress)
        for result in _results(reader, tasks, workers):
            bar.update(1)
            for problem in result.problems:
                report(problem)
            if isinstance(result, _Skipped):
                continue
            if result.key in seen_keys:
                report(Problem("duplicate_image", result.meta["source"], f"sample key {result.key!r} was already written"))
                continue
            seen_keys.add(result.key)
            writer.write(result.key, result.jpg, result.meta)
            written += 1
            objects += len(result.meta["labels"])
            source_bytes += result.source_bytes
            class_counts.update(result.meta["labels"])
            flags.update(difficult=sum(result.meta["difficult"]), iscrowd=sum(result.meta["iscrowd"]),
                         truncated=sum(result.meta["truncated"]))
            if result.reencoded:
                reencoded[result.reencoded] += 1
        bar.close()
        shards = writer.close()
    except BaseException:
        writer.close()
        for path in out_dir.glob("shard-*.tar*"):  # leave nothing half-converted behind
            path.unlink()
        raise
    if written == 0:
        raise ValueError(f"no valid sample in the source ({len(tasks)} listed, {len(problems)} problems)")

    classes = list(reader.classes)
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": classes,
        "id_mapping": reader.id_mapping,
        "source": reader.describe(),
        "shards": shards,
        "num_samples": written,
        "num_objects": objects,
        "objects_per_class": {name: class_counts.get(i + 1, 0) for i, name in enumerate(classes)},
        "num_difficult": flags["difficult"],
        "num_iscrowd": flags["iscrowd"],
        "num_truncated": flags["truncated"],
        "num_reencoded": sum(reencoded.values()),
        "problems": {kind: n for kind in PROBLEM_KINDS if (n := sum(p.kind == kind for p in problems))},
        "content_hash": content_hash(classes, shards),
    }
    if problems:
        (out_dir / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    tmp = out_dir / (DATASET_JSON + ".tmp")
    tmp.write_bytes(encode_json(info))
    os.replace(tmp, out_dir / DATASET_JSON)  # written last: its presence marks a complete conversion

    result = ConversionReport(
        info, problems, listed=len(tasks), written=written, objects=objects, reencoded=reencoded,
        source_image_bytes=source_bytes, shard_bytes=sum(s["bytes"] for s in shards),
        seconds=time.perf_counter() - start,
    )
    dropped_empty = getattr(reader, "num_dropped_empty", 0)
    if dropped_empty:
        result.notes.append(f"{dropped_empty} images without annotations left out (--drop-empty)")
    return result


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def format_summary(report: ConversionReport) -> str:
    """A plain-text table of what was written and what was wrong with the input."""
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(report.reencoded.items()))
    lines = [
        (f"samples: {report.written} written of {report.listed} listed; objects: {report.objects}; "
         f"shards: {len(report.info['shards'])}"),
        (f"images: {sum(report.reencoded.values())} re-encoded" + (f" ({reasons})" if reasons else "")
         + ", the rest kept byte for byte"),
        (f"size: {report.shard_bytes / 2**20:.1f} MiB of shards from "
         f"{report.source_image_bytes / 2**20:.1f} MiB of source images; "
         f"{report.written / max(report.seconds, 1e-9):.0f} images/s"),
        *report.notes,
        "",
        f"{'problem':<22}{'action':<14}{'count':>7}  first file",
    ]
    counts = Counter(p.kind for p in report.problems)
    first: dict[str, str] = {}
    for problem in report.problems:
        first.setdefault(problem.kind, problem.file)
    for kind, action in PROBLEM_KINDS.items():
        lines.append(f"{kind:<22}{action.replace('_', ' '):<14}{counts.get(kind, 0):>7}  {first.get(kind, '')}")
    lines.append(f"{'total':<36}{len(report.problems):>7}")
    return "\n".join(lines)


def make_synthetic_shards(
    out_dir: str | Path,
    splits: dict[str, int],
    *,
    seed: int = 0,
    layout: str = "coco",
    workers: int | None = None,
    class_names: Sequence[str] | None = None,
    **convert_options: Any,
) -> dict[str, ConversionReport]:
    """Write the synthetic dataset in the real COCO (or VOC) layout under ``out_dir/source``, then
    convert each split with the real reader into ``out_dir/<split>`` shards.

    ``convert_options`` go to :func:`convert` (``shard_size``, ``strict``, ``overwrite``, ...).
    ``class_names`` renames the six classes (``write_coco`` / ``write_voc``).

    Going through the standard layout on purpose: the demo and the tests then exercise the same
    readers and converter as real data.
    """
    from ssd.data.coco import CocoReader
    from ssd.data.synthetic import CLASSES
    from ssd.data.synthetic_layouts import write_coco, write_voc
    from ssd.data.voc import VocReader

    out_dir = Path(out_dir)
    convert_options.setdefault("shard_size", 256)  # a handful of shards even for a small set
    if layout == "coco":
        root = write_coco(out_dir / "source" / "coco", splits, seed=seed, workers=workers, class_names=class_names)
        readers = {s: CocoReader(root / s, root / "annotations" / f"instances_{s}.json") for s in splits}
    elif layout == "voc":
        devkit = write_voc(out_dir / "source" / "voc", splits, seed=seed, workers=workers, class_names=class_names)
        readers = {s: VocReader(devkit, f"synthetic:{s}", classes=tuple(class_names or CLASSES)) for s in splits}
    else:
        raise ValueError(f"layout must be 'coco' or 'voc', got {layout!r}")
    return {
        split: convert(reader, out_dir / split, workers=workers, **convert_options)
        for split, reader in readers.items()
    }


def default_data_home() -> Path:
    """Where generated datasets live: ``$SSD_DATA_HOME`` or ``~/.cache/ssd-ray/data``.

    A fixed absolute place, so a ``ray job submit --working-dir .`` job (which runs in a fresh
    copy of the repo) finds the data that an earlier run made.
    """
    return Path(os.environ.get("SSD_DATA_HOME", Path.home() / ".cache" / "ssd-ray" / "data")).expanduser().resolve()


def ensure_synthetic_shards(
    out_dir: str | Path, train_images: int, val_images: int, *, seed: int = 0, log: Callable[[str], None] = print
) -> Path:
    """The synthetic dataset's ``train``/``val`` shards in ``out_dir``, converted now unless a
    complete set of the wanted sizes is already there."""
    from ssd.data.shards import ShardSet

    out_dir = Path(out_dir)
    wanted = {"train": train_images, "val": val_images}
    try:
        if all(ShardSet.open(out_dir / split).num_samples == n for split, n in wanted.items()):
            return out_dir
    except (FileNotFoundError, ValueError):
        pass
    log(f"writing the synthetic dataset ({train_images} + {val_images} images) into {out_dir}")
    start = time.perf_counter()
    make_synthetic_shards(out_dir, wanted, seed=seed, overwrite=True, progress=False, log=log)
    log(f"  done in {time.perf_counter() - start:.0f} s")
    return out_dir
