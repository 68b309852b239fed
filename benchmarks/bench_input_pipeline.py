"""Input pipeline: shards -> augmented 300x300 batches, ours (ShardLoader) vs the VOC folder.

    .venv/bin/python benchmarks/bench_input_pipeline.py
    .venv/bin/python benchmarks/bench_input_pipeline.py --repeats 15 --voc-root /data/VOCdevkit

Data: the ``trainval`` image set (395 images on ``voc2007-mini``) of a VOCdevkit folder
(``--voc-root``, the folder holding ``VOC2007``). Both sides run the same paired transform object
(``ssd.transforms.build_transform(300, strength=1.0, train=True)``) and yield the same batches:
float32 (B, 3, 300, 300) images and a list of target dicts, B = 32.

- Ours: ``ShardLoader(ShardStream(ShardSet.open(dir), transform, train=True, seed), B,
  num_workers=w)``, ``set_epoch(e)`` before each epoch, on shards written by
  ``ssd.data.convert.convert(VocReader(root, "2007:trainval"), dir, shard_size=64)``.
- Both sides as the trainer consumes them: the transform is built with ``normalize=False``, so
  workers hand over uint8 batches, and ``ssd.transforms.normalize`` runs on each batch in the
  main process (on the CPU here, timed; the trainer runs it on the device). The hand-off is the
  same on both sides, so the ratio measures the reading.
- Peer (what a user of torchvision would write): ``torchvision.datasets.VOCDetection(parent of
  root, year="2007", image_set="trainval")`` in a map-style Dataset that turns the PIL image into
  a uint8 (3, H, W) tensor (``pil_to_tensor``) and the annotation dict into boxes (N, 4) float
  (x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax, our convention), labels (index of the 20 VOC
  class names + 1) and difficult flags, then applies the same transform;
  ``DataLoader(shuffle=True, batch_size=B, num_workers=w, collate_fn=pack_batch, drop_last=True)``.
- **The same collate on both sides** (issue 18): the folder loader's workers collate with our
  ``ssd.data.streaming.pack_batch`` (images stacked, targets packed into a few tensors) and the
  main process unpacks the targets with ``unpack_targets``, as ``ShardLoader`` does. Packing has
  nothing to do with shards against folders (before, the folder side collated per sample,
  handing over 3 tensors per image, which charged the folder side for a collate a user can
  change in one line); so the ratio measures reading, decoding and splitting the work.

Cases: training transform with 1 and 2 loader workers, and the evaluation transform
(``build_transform(300, 0.0, train=False, min_size=0.0)``, ``ShardStream(train=False)``, peer
without shuffle or drop_last) with 1 worker. A repeat is one whole epoch; samples/s counts the
samples actually delivered (384 = 12 x 32 per training epoch on both sides, 395 per evaluation
epoch). Epochs alternate ours / peer (and which goes first), all cases within each repeat, after
one warm-up epoch per side and case. Ratio = ours samples/s / peer samples/s at the same number of
workers (> 1: ours faster). Workers are started per epoch on both sides (no persistent workers),
as each side does by default. The main process runs at ``--threads`` (1) torch threads; DataLoader
workers run at 1 thread each (torch sets that in every worker).

Also measured: shard writing throughput (images/s of ``convert`` with 1 and 2 workers, fresh
output folder each time), the shards' size against the source's (JPEGs + XMLs of the converted
ids), determinism (dataset.json content hashes of all conversions equal), the CPU time per
sample of the main process and of the loader workers in each timed epoch, a per-sample profile
of each stage (single thread, in this process; plus what handing ready samples from one loader
worker to the main process costs, with each side's target dict), and, before any timing, that
both sides decode the same data: for every id, image tensors (max abs difference reported:
decode_jpeg vs PIL), boxes, labels and difficult flags (exactly equal).

Not a test: without the VOC data the script exits with a message (run_all.py skips it).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import case_result, finish, get_args_parser, stats
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.datasets import VOCDetection
from torchvision.transforms.v2.functional import pil_to_tensor

from ssd.data.convert import convert
from ssd.data.sharding import worker_split
from ssd.data.shards import (
    ShardSet,
    read_samples,
)
from ssd.data.streaming import ShardLoader, ShardStream, decode_sample, pack_batch, unpack_targets
from ssd.data.voc import VOC_CLASSES, VocReader
from ssd.transforms import build_transform, normalize

NAME = "input_pipeline"
DEFAULT_VOC_ROOT = Path("/work/shared/datasets/voc2007-mini/VOCdevkit")
YEAR, IMAGE_SET = "2007", "trainval"
SIZE = 300
GOAL = 1.5
CLASS_INDEX = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
#: the table's columns (see ``_common.markdown_table``)
TABLE = {"unit": "samples/s", "peer": "folder", "ratio": "ours / folder", "digits": 0}


# --------------------------------------------------------------------------------------------
# The peer: torchvision's VOCDetection in the Dataset a user would write


def voc_target(annotation: dict[str, Any]) -> dict[str, torch.Tensor]:
    """VOCDetection's annotation dict -> our target: boxes (N, 4) float32 in continuous pixels
    (x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax), labels int64, difficult bool."""
    objects = annotation["annotation"].get("object", [])
    boxes, labels, difficult = [], [], []
    for obj in objects:
        b = obj["bndbox"]
        boxes.append(
            [float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])]
        )
        labels.append(CLASS_INDEX[obj["name"]])
        difficult.append(obj.get("difficult", "0") == "1")
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
    }


class FolderDataset(Dataset):
    """VOCDetection -> (uint8 (3, H, W), target), then ``transform`` (None: no transform)."""

    def __init__(self, voc: VOCDetection, transform=None) -> None:
        self.voc = voc
        self.transform = transform

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int):
        pil, annotation = self.voc[index]
        image, target = pil_to_tensor(pil), voc_target(annotation)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def image_id(voc: VOCDetection, index: int) -> int:
    return int(Path(voc.images[index]).stem)


# --------------------------------------------------------------------------------------------
# Shard writing


def tree_bytes(paths: list[Path]) -> tuple[int, int]:
    """(apparent bytes, bytes allocated on disk) of ``paths``."""
    apparent = allocated = 0
    for path in paths:
        st = path.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


def measure_writing(root: Path, tmp: Path, repeats: int) -> tuple[dict[str, Any], Path]:
    """Convert trainval with 1 and 2 workers into fresh folders (one untimed warm-up first,
    kept for the loaders); images/s per case, content hashes, sizes."""
    logs: list[str] = []

    def run(workers: int, out: Path):
        start = time.perf_counter()
        report = convert(VocReader(root, f"{YEAR}:{IMAGE_SET}"), out, shard_size=64,
                         workers=workers, progress=False, log=logs.append)
        return time.perf_counter() - start, report

    keep = tmp / "shards"
    _, first = run(1, keep)
    hashes = {first.info["content_hash"]}
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for r in range(repeats):
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"w{workers}-"))
            elapsed, report = run(workers, out)
            seconds[workers].append(elapsed)
            hashes.add(report.info["content_hash"])
            shutil.rmtree(out)
    written = first.written
    # source: the JPEG and the XML of every converted id
    tasks = {t.key: t for t in VocReader(root, f"{YEAR}:{IMAGE_SET}").tasks()}
    keys = [key for key, _, _ in read_samples(ShardSet.open(keep))]
    voc = root / f"VOC{YEAR}"
    source = [voc / "JPEGImages" / f"{tasks[k].image_id}.jpg" for k in keys]
    source += [voc / "Annotations" / f"{tasks[k].image_id}.xml" for k in keys]
    shard_files = sorted(keep.glob("shard-*.tar"))
    src_bytes, src_alloc = tree_bytes(source)
    shard_bytes, shard_alloc = tree_bytes(shard_files)
    all_bytes, all_alloc = tree_bytes([*shard_files, keep / "dataset.json"])
    result = {
        "images": written,
        "listed": first.listed,
        "shards": len(shard_files),
        "shard_size": 64,
        "reencoded": first.info["num_reencoded"],
        "problems": len(first.problems),
        "cases": [
            {"workers": w, "images_per_s": stats([written / s for s in seconds[w]], "images/s"),
             "seconds": seconds[w]}
            for w in (1, 2)
        ],
        "content_hashes": sorted(hashes),
        "deterministic": len(hashes) == 1,
        "conversions_compared": 1 + 2 * repeats,
        "sizes": {
            "source_files": len(source),
            "source_bytes": src_bytes,
            "source_allocated_bytes": src_alloc,
            "shard_files": len(shard_files),
            "shard_bytes": shard_bytes,
            "shard_allocated_bytes": shard_alloc,
            "shard_plus_index_bytes": all_bytes,
            "shard_plus_index_allocated_bytes": all_alloc,
            "ratio": all_bytes / src_bytes,
            "ratio_allocated": all_alloc / src_alloc,
        },
        "log_lines": logs[:20],
    }
    return result, keep


# --------------------------------------------------------------------------------------------
# Equal data


def check_same_data(shards: ShardSet, voc: VOCDetection) -> dict[str, Any]:
    """Every sample of the shards (no transform) against the folder dataset's, by image id."""
    ours = {}
    for image, target in ShardStream(shards, None, train=False):
        ours[int(target["image_id"])] = (image, target)
    folder = FolderDataset(voc)
    assert len(ours) == len(folder), f"{len(ours)} shard samples, {len(folder)} folder images"
    max_diff, differing, pixels = 0, 0, 0
    for index in range(len(folder)):
        image, target = folder[index]
        mine, my_target = ours[image_id(voc, index)]
        assert mine.shape == image.shape and mine.dtype == image.dtype, f"index {index}: shape"
        diff = (mine.to(torch.int16) - image.to(torch.int16)).abs()
        max_diff = max(max_diff, int(diff.max()))
        differing += int(diff.any())
        pixels += int((diff > 0).sum())
        for key in ("boxes", "labels", "difficult"):
            assert torch.equal(my_target[key], target[key]), f"index {index}: {key} differ"
    return {
        "checked": len(folder),
        "boxes_labels_difficult_equal": True,
        "image_max_abs_diff": max_diff,
        "images_with_any_difference": differing,
        "differing_values": pixels,
    }


# --------------------------------------------------------------------------------------------
# Profile (single thread, this process)


class _Replay(IterableDataset):
    """Yields ready samples (fresh copies of their target tensors, as a real pipeline makes)."""

    def __init__(self, samples: list, keys: tuple[str, ...], n: int) -> None:
        self.samples, self.keys, self.n = samples, keys, n

    def __iter__(self):
        for i in range(self.n):
            image, target = self.samples[i % len(self.samples)]
            yield image, {k: target[k].clone() for k in self.keys}


def _stack_images(samples: list) -> Tensor:
    """The image-only transfer row's collate (no target to pack)."""
    return torch.stack([image for image, _ in samples])


def transfer_cost(samples: list, keys: tuple[str, ...], batch: int, n: int, runs: int) -> float:
    """ms per sample for a DataLoader worker to hand over ready samples (nothing to compute:
    ``pack_batch``, move the batch and its packed target tensors to shared memory, receive),
    1 worker."""
    times = []
    for _ in range(runs):
        loader = DataLoader(_Replay(samples, keys, n), batch_size=batch, num_workers=1,
                            collate_fn=pack_batch if keys else _stack_images)
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append((time.perf_counter() - start) / n * 1e3)
    return statistics.median(times)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run_stages(compose, image, target, acc: dict[str, float]):
    for t in compose.transforms:
        name = type(t).__name__
        (image, target), dt = _timed(t, image, target)
        acc[name] = acc.get(name, 0.0) + dt
    return image, target


def profile(shards: ShardSet, voc: VOCDetection, passes: int, batch: int) -> dict[str, Any]:
    """Mean ms per sample of each stage, median over ``passes`` passes over all samples."""
    from xml.etree.ElementTree import parse as et_parse

    from PIL import Image

    train_tf = build_transform(SIZE, strength=1.0, train=True)
    eval_tf = build_transform(SIZE, 0.0, train=False, min_size=0.0)
    stream = ShardStream(shards, None, train=False)
    n = shards.num_samples
    runs: dict[str, list[float]] = {}

    def add(key: str, total: float) -> None:
        runs.setdefault(key, []).append(total / n * 1e3)

    torch.manual_seed(0)
    for _ in range(passes):
        raws, t = _timed(lambda: list(stream.raw_samples()))
        add("ours: read shard bytes (tar, all members)", t)
        decode = 0.0
        train_acc: dict[str, float] = {}
        eval_acc: dict[str, float] = {}
        train_outputs = []
        for raw in raws:
            (image, target), dt = _timed(decode_sample, raw)
            decode += dt
            out = run_stages(train_tf, image, target, train_acc)
            if len(train_outputs) < batch:
                train_outputs.append(out)
            run_stages(eval_tf, image, target, eval_acc)
        add("ours: decode_sample (decode_jpeg + JSON -> tensors)", decode)
        for name, total in train_acc.items():
            add(f"augmentation: {name}", total)
        add("augmentation: total, strength 1", sum(train_acc.values()))
        for name, total in eval_acc.items():
            add(f"eval transform: {name}", total)
        add("eval transform: total", sum(eval_acc.values()))
        del raws
        # collate: stacking B float32 300x300 images, packing the targets (both sides, in the worker)
        _, t = _timed(pack_batch, train_outputs)
        runs.setdefault("collate (pack_batch: stack B images, pack targets)", []).append(
            t / len(train_outputs) * 1e3
        )

        pil_t = to_tensor_t = xml_t = target_t = item_t = 0.0
        for index in range(len(voc)):
            start = time.perf_counter()
            pil = Image.open(voc.images[index]).convert("RGB")
            t1 = time.perf_counter()
            pil_to_tensor(pil)
            t2 = time.perf_counter()
            annotation = VOCDetection.parse_voc_xml(et_parse(voc.annotations[index]).getroot())
            t3 = time.perf_counter()
            voc_target(annotation)
            t4 = time.perf_counter()
            _, dt = _timed(voc.__getitem__, index)
            pil_t += t1 - start
            to_tensor_t += t2 - t1
            xml_t += t3 - t2
            target_t += t4 - t3
            item_t += dt
        add("folder: PIL open + decode + convert('RGB')", pil_t)
        add("folder: pil_to_tensor", to_tensor_t)
        add("folder: XML parse (ElementTree + parse_voc_xml)", xml_t)
        add("folder: annotation dict -> tensors", target_t)
        add("folder: VOCDetection.__getitem__ (PIL + XML)", item_t)
    # handing samples from a loader worker to the main process: the image alone, with the
    # folder dataset's 3 target tensors, with the ones ShardStream yields
    ours_keys = tuple(train_outputs[0][1])
    folder_keys = ("boxes", "labels", "difficult")
    ours_label = f"transfer worker -> main, per sample: float32 image + shard target ({len(ours_keys)} tensors)"
    folder_label = "transfer worker -> main, per sample: float32 image + folder target (3 tensors)"
    for label, keys in (("transfer worker -> main, per sample: float32 image only", ()),
                        (folder_label, folder_keys), (ours_label, ours_keys)):
        runs[label] = [transfer_cost(train_outputs, keys, batch, 12 * batch, passes)]
    per_sample = {key: statistics.median(v) for key, v in runs.items()}
    transfer = {"ours": per_sample[ours_label], "folder": per_sample[folder_label]}
    ours_read = (per_sample["ours: read shard bytes (tar, all members)"]
                 + per_sample["ours: decode_sample (decode_jpeg + JSON -> tensors)"])
    peer_read = (per_sample["folder: VOCDetection.__getitem__ (PIL + XML)"]
                 + per_sample["folder: pil_to_tensor"]
                 + per_sample["folder: annotation dict -> tensors"])
    aug = per_sample["augmentation: total, strength 1"]
    evl = per_sample["eval transform: total"]
    # the transfer runs include collate, and the per-epoch worker start
    sums = {
        "ours_read_decode": ours_read,
        "folder_read_decode": peer_read,
        "ours_train": ours_read + aug + transfer["ours"],
        "folder_train": peer_read + aug + transfer["folder"],
        "ours_eval": ours_read + evl + transfer["ours"],
        "folder_eval": peer_read + evl + transfer["folder"],
    }
    return {
        "ms_per_sample": per_sample,
        "passes": passes,
        "samples": n,
        "sums_ms": sums,
        "predicted_ratio": {
            "read_decode_only": peer_read / ours_read,
            "train": sums["folder_train"] / sums["ours_train"],
            "eval": sums["folder_eval"] / sums["ours_eval"],
            "train_equal_transfer": (peer_read + aug) / (ours_read + aug),
            "eval_equal_transfer": (peer_read + evl) / (ours_read + evl),
        },
    }


# --------------------------------------------------------------------------------------------
# Loader throughput


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def epoch(loader, expected: int, batch: int) -> dict[str, float]:
    """One whole epoch: seconds, samples delivered, and CPU seconds (user + system) of this
    process and of the loader workers (children, counted once they are joined at the end)."""
    main_cpu, child_cpu = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    delivered = 0
    for images, targets in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        assert images.shape[0] == len(targets) <= batch
        delivered += len(targets)
    elapsed = time.perf_counter() - start
    assert delivered == expected, f"{delivered} samples delivered, expected {expected}"
    return {
        "seconds": elapsed,
        "samples": delivered,
        "main_cpu_s": _cpu_seconds(resource.RUSAGE_SELF) - main_cpu,
        "workers_cpu_s": _cpu_seconds(resource.RUSAGE_CHILDREN) - child_cpu,
    }


class NormalizedInMain:
    """A loader as the trainer consumes it: workers hand over uint8 batches (4x fewer bytes)
    and the main process normalises them (here on the CPU, timed; the trainer does it on the
    device). Both sides run this way, so the hand-off is equal and only the reading differs."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets in self.loader:
            if isinstance(targets, dict):  # the folder side's packed targets (ShardLoader unpacks its own)
                targets = unpack_targets(targets)
            yield normalize(images), targets


def build_cases(shards: ShardSet, voc: VOCDetection, batch: int, seed: int) -> list[dict]:
    # both sides: the same transforms without their last step (Normalize), done by the consumer
    train_u8 = build_transform(SIZE, strength=1.0, train=True, normalize=False)
    eval_u8 = build_transform(SIZE, 0.0, train=False, min_size=0.0, normalize=False)
    train_n = len(voc) // batch * batch
    cases = []
    for workers in (1, 2):
        cases.append({
            "label": f"train, strength 1, B={batch}, {workers} worker(s)",
            "workers": workers,
            "expected": train_n,
            "ours": NormalizedInMain(ShardLoader(ShardStream(shards, train_u8, train=True, seed=seed),
                                                 batch, num_workers=workers)),
            "peer": NormalizedInMain(DataLoader(FolderDataset(voc, train_u8), batch_size=batch, shuffle=True,
                                                num_workers=workers, collate_fn=pack_batch, drop_last=True)),
        })
    cases.append({
        "label": f"eval transform, B={batch}, 1 worker",
        "workers": 1,
        "expected": len(voc),
        "ours": NormalizedInMain(ShardLoader(ShardStream(shards, eval_u8, train=False), batch, num_workers=1)),
        "peer": NormalizedInMain(DataLoader(FolderDataset(voc, eval_u8), batch_size=batch, shuffle=False,
                                            num_workers=1, collate_fn=pack_batch, drop_last=False)),
    })
    return cases


def largest_worker_share(stream: ShardStream, workers: int, epoch_index: int) -> int:
    """Samples read by the busiest of ``workers`` loader workers in an epoch (whole shards go to
    workers, so their shares differ by shard sizes)."""
    stream.set_epoch(epoch_index)
    slices = stream.rank_slices()
    shares = []
    for worker in range(workers):
        mine, step, offset = worker_split(slices, workers, worker)
        kept = sum(s.kept(stream.shards.counts[s.shard]) for s in mine)
        shares.append(len(range(offset, kept, step)))
    return max(shares)


def measure_loaders(cases: list[dict], repeats: int, warmup: int, batch: int) -> None:
    """Fill each case's ``rates`` (samples/s per epoch) and ``cpu`` (per-epoch CPU ms per
    sample, main process and workers), interleaved (see the module docstring)."""
    epoch_index = 0

    def one(case: dict, side: str) -> dict[str, float]:
        nonlocal epoch_index
        loader = case[side]
        if side == "ours":
            loader.set_epoch(epoch_index)
            case.setdefault("epochs", []).append(epoch_index)
            epoch_index += 1
        return epoch(loader, case["expected"], batch)

    for case in cases:
        case["rates"] = {"ours": [], "peer": []}
        case["cpu"] = {side: {"main": [], "workers": []} for side in ("ours", "peer")}
        for _ in range(warmup):
            one(case, "ours")
            one(case, "peer")
    for r in range(repeats):
        for case in cases:
            for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                m = one(case, side)
                case["rates"][side].append(m["samples"] / m["seconds"])
                case["cpu"][side]["main"].append(m["main_cpu_s"] / m["samples"] * 1e3)
                case["cpu"][side]["workers"].append(m["workers_cpu_s"] / m["samples"] * 1e3)
        print(f"repeat {r + 1}/{repeats}: " + "; ".join(
            f"{c['label']}: ours {c['rates']['ours'][-1]:.0f}, folder {c['rates']['peer'][-1]:.0f}"
            for c in cases), flush=True)


# --------------------------------------------------------------------------------------------
# Markdown (also used by run_all.py for the docs)


def extra_markdown(result: dict[str, Any]) -> str:
    """Shard writing, sizes, the equality check and the profile, as markdown."""
    w, e, p = result["shard_writing"], result["equivalence"], result["profile"]
    s, mib = w["sizes"], 2**20
    lines = [
        (
            f"Shard writing (`convert`, {w['images']} images into {w['shards']} shards of "
            f"{w['shard_size']}, {len(w['cases'][0]['seconds'])} timed conversions per case, "
            "fresh output folder each):"
        ),
        "",
        "| convert workers | images/s (median ± IQR) |",
        "|---:|---:|",
    ]
    for c in w["cases"]:
        st = c["images_per_s"]
        lines.append(f"| {c['workers']} | {st['median']:.0f} ± {st['iqr']:.0f} |")
    lines += [
        "",
        (
            f"Size: shards + dataset.json {s['shard_plus_index_bytes'] / mib:.2f} MiB against "
            f"{s['source_bytes'] / mib:.2f} MiB of source ({s['source_files']} files: JPEGs + "
            f"XMLs) = **{s['ratio']:.3f}x** (allocated on disk: "
            f"{s['shard_plus_index_allocated_bytes'] / mib:.2f} vs "
            f"{s['source_allocated_bytes'] / mib:.2f} MiB = {s['ratio_allocated']:.3f}x); "
            f"{w['reencoded']} images re-encoded, {w['problems']} problems. Deterministic: "
            f"{'yes' if w['deterministic'] else '**no**'} ({w['conversions_compared']} "
            f"conversions, {len(w['content_hashes'])} distinct content hash(es))."
        ),
        "",
        (
            f"Same data: all {e['checked']} samples, shards (decode_jpeg) vs folder (PIL): "
            "boxes, labels and difficult flags equal; images: max abs difference "
            f"{e['image_max_abs_diff']} ({e['images_with_any_difference']} images with any "
            "difference)."
        ),
        "",
        (
            f"Profile (ms per sample, 1 thread in the main process, median of {p['passes']} "
            f"passes over the {p['samples']} images):"
        ),
        "",
        "| stage | ms / sample |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in p["ms_per_sample"].items()]
    lines += [
        "",
        (
            "CPU time per delivered sample (ms, median over the timed epochs; user + system; "
            "workers counted when joined at the end of each epoch):"
        ),
        "",
        "| case | ours: main | ours: workers | folder: main | folder: workers |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        cpu = c["cpu_ms_per_sample"]
        lines.append(
            f"| {c['case']} | {cpu['ours']['main']:.2f} | {cpu['ours']['workers']:.2f} "
            f"| {cpu['peer']['main']:.2f} | {cpu['peer']['workers']:.2f} |"
        )
    scaling, share = result["worker_scaling_2_over_1"], result["ours_2_workers_busiest_share"]
    lines += [
        "",
        (
            f"Scaling from 1 to 2 loader workers: ours {scaling['ours']:.2f}x, folder "
            f"{scaling['peer']:.2f}x. With 2 workers the busier of our workers read "
            f"{', '.join(map(str, share['samples_read_per_epoch']))} of the "
            f"{share['of']} samples in the timed epochs ({share['needed']} are needed per "
            f"epoch), the folder's {share['needed'] // 2}."
        ),
    ]
    sums, pred = p["sums_ms"], p["predicted_ratio"]
    measured = p.get("measured_ms_per_sample_w1", {})
    lines += [
        "",
        (
            f"Read + decode, ms per sample: ours {sums['ours_read_decode']:.2f}, folder "
            f"{sums['folder_read_decode']:.2f} ({pred['read_decode_only']:.2f}x). (The transfer "
            "rows of the profile hand over float32 samples with each side's target keys, packed "
            "by `pack_batch`; both loaders move packed uint8 batches, see the CPU table.)"
        ),
    ]
    if measured:
        lines[-1] += (
            " Measured with 1 loader worker (1 / throughput): training ours "
            f"{measured['ours_train']:.2f}, folder {measured['folder_train']:.2f}; eval ours "
            f"{measured['ours_eval']:.2f}, folder {measured['folder_eval']:.2f}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=9, warmup=1)
    parser.set_defaults(threads=1)
    parser.add_argument("--voc-root", type=Path, default=DEFAULT_VOC_ROOT,
                        help="VOCdevkit folder (holding VOC2007)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--write-repeats", type=int, default=3,
                        help="timed conversions per worker count")
    parser.add_argument("--profile-passes", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=None, help="where shards are written")
    args = parser.parse_args(argv)
    root = args.voc_root
    if not (root / f"VOC{YEAR}" / "ImageSets" / "Main" / f"{IMAGE_SET}.txt").is_file():
        sys.exit(f"{NAME}: no VOC{YEAR} {IMAGE_SET} set under {root} (the VOCdevkit folder): "
                 "pass --voc-root; this benchmark needs real VOC data")
    if root.name != "VOCdevkit":
        sys.exit(f"{NAME}: torchvision's VOCDetection needs the folder to be named VOCdevkit, "
                 f"got {root}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    voc = VOCDetection(str(root.parent), year=YEAR, image_set=IMAGE_SET)

    tmp = Path(tempfile.mkdtemp(prefix="bench-input-", dir=args.tmp))
    try:
        print(f"writing shards ({args.write_repeats} timed conversions per worker count) ...",
              flush=True)
        writing, shard_dir = measure_writing(root, tmp, args.write_repeats)
        shards = ShardSet.open(shard_dir)
        print("checking that both sides read the same data ...", flush=True)
        equivalence = check_same_data(shards, voc)
        print(f"profiling ({args.profile_passes} passes) ...", flush=True)
        prof = profile(shards, voc, args.profile_passes, args.batch)
        cases = build_cases(shards, voc, args.batch, args.seed)
        print(f"timing loaders ({args.warmup} warm-up + {args.repeats} epochs per side and case)",
              flush=True)
        measure_loaders(cases, args.repeats, args.warmup, args.batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = []
    for case in cases:
        ours_s = stats(case["rates"]["ours"], "samples/s")
        peer_s = stats(case["rates"]["peer"], "samples/s")
        row = case_result(case["label"], ours_s, peer_s, goal=GOAL, higher_is_better=True)
        row["rates_in_order"] = case["rates"]  # samples/s of each timed epoch, in time order
        row["cpu_ms_per_sample"] = {
            side: {who: statistics.median(v) for who, v in case["cpu"][side].items()}
            for side in ("ours", "peer")
        }
        results.append(row)
    by_workers = {c["workers"]: r for c, r in zip(cases[:2], results[:2])}
    scaling = {side: by_workers[2][side]["median"] / by_workers[1][side]["median"]
               for side in ("ours", "peer")}
    w1 = results[0]["ours"]["median"]
    # the timed epochs of ours with 2 workers (after the warm-up): the busiest worker's share
    probe = ShardStream(shards, None, train=True, seed=args.seed)
    shares = [largest_worker_share(probe, 2, e) for e in cases[1]["epochs"][args.warmup:]]
    prof["measured_ms_per_sample_w1"] = {
        "ours_train": 1e3 / w1,
        "folder_train": 1e3 / results[0]["peer"]["median"],
        "ours_eval": 1e3 / results[2]["ours"]["median"],
        "folder_eval": 1e3 / results[2]["peer"]["median"],
    }
    result = finish(
        NAME,
        args,
        "python benchmarks/bench_input_pipeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        results,
        table=TABLE,
        data={"voc_root": str(root), "image_set": f"{YEAR}:{IMAGE_SET}", "images": len(voc),
              "batch": args.batch, "cpu_count": os.cpu_count()},
        worker_scaling_2_over_1=scaling,
        ours_2_workers_busiest_share={
            "samples_read_per_epoch": shares,
            "of": shards.num_samples,
            "needed": cases[1]["expected"],
            "note": "the folder loader's workers split the sampler's batches evenly: "
            f"{cases[1]['expected'] // 2} samples each",
        },
        shard_writing=writing,
        equivalence=equivalence,
        profile=prof,
    )
    print("\n" + extra_markdown(result))
    return result


if __name__ == "__main__":
    main()
