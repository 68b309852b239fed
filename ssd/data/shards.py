"""WebDataset shards: the on-disk format, and streaming them to training and evaluation.

Format (written by ``ssd.data.convert``; contract in DESIGN.md section 3):
    DIR/shard-000000.tar ...   each sample is ``{key}.jpg`` (JPEG bytes) + ``{key}.json``:
        {"boxes": [[x1, y1, x2, y2], ...] absolute pixels, "labels": [1..C], "difficult": [..],
         "truncated": [..], "iscrowd": [..], "width", "height", "image_id", "source"}
    DIR/dataset.json           classes, source-id -> label mapping, shards with sample counts and
                               sha256, totals, problem counts, a content hash

Streaming. Every (rank, DataLoader worker) reads its own part of the shards
(``ssd.data.sharding``), so no sample is read twice in an epoch. In training every rank runs
exactly ``steps_per_epoch`` full batches (DDP needs equal step counts): the largest number that
the smallest possible rank share can fill, whatever the permutation. The few samples beyond it in an epoch are not lost: the permutation changes which
they are every epoch. In evaluation nothing is shuffled, augmented or cut: every sample is seen
exactly once across all ranks, and batches are full except the last.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shlex
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import Tensor

from ssd import storage
from ssd.boxes import PER_OBJECT_KEYS
from ssd.data.sharding import ShardSlice, rank_slices, shard_order, steps_per_epoch, worker_split

FORMAT_NAME = "ssd-webdataset"
FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
SHARD_PATTERN = "shard-{:06d}.tar"

#: ``s3://`` URLs are streamed in-process by ``pyarrow.fs`` (``ssd.storage``; endpoint and
#: credentials from the AWS variables, ``AWS_ENDPOINT_URL`` for MinIO). Setting this variable
#: reads them with a shell command instead (``{url}`` is replaced), e.g.
#: ``SSD_S3_COMMAND="aws s3 cp {url} -"`` or ``"mc cat {url}"``.
S3_COMMAND_ENV = "SSD_S3_COMMAND"


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    if mode != "rb":
        raise ValueError(f"{url}: shards on object storage are read-only here (mode {mode!r})")
    return storage.open_input(url)


# WebDataset opens URLs through its scheme table, which has no s3 entry: ours streams the object.
wds.gopen_schemes.setdefault("s3", _open_s3)


class ShardFormatError(ValueError):
    """A dataset.json or shard that does not follow the format; the message names the file."""


# --------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes samples into ``shard-%06d.tar`` files, deterministically and atomically.

    A shard is closed after ``max_samples`` samples, or before a sample that would take it past
    ``max_bytes``. Tar headers carry no time or user, so the same samples give the same bytes.
    Each shard is written to a temporary name and renamed when complete.
    """

    def __init__(self, out_dir: str | Path, max_samples: int = 1000, max_bytes: int | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._current: dict[str, Any] = {}

    def write(self, key: str, jpg: bytes, meta: dict[str, Any]) -> None:
        """Append one sample; ``meta`` is the sample's JSON (see the module docstring)."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        meta_bytes = encode_json(meta)
        size = _tar_size(len(jpg)) + _tar_size(len(meta_bytes))
        if self._tar is not None and (
            self._current["samples"] >= self.max_samples
            or (self.max_bytes is not None and tar_file_size(self._current["bytes"] + size) > self.max_bytes)
        ):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", meta_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self._current["samples"] += 1
        self._current["objects"] += len(meta.get("labels", ()))
        self._current["bytes"] += size

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns one dict per shard (url, samples, objects, bytes, sha256)."""
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._current = {"url": name, "samples": 0, "objects": 0, "bytes": 0}
        # Closed in _close_shard (a shard outlives this call, so no context manager here).
        self._file = _HashingFile(open(self.out_dir / (name + ".tmp"), "wb"))  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        name = self._current["url"]
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self._current["bytes"] = self._file.size
        self._current["sha256"] = self._file.hexdigest()
        self.shards.append(self._current)
        self._tar = self._file = None


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, file) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._file.close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _tar_size(n: int) -> int:
    """Bytes a member of ``n`` bytes takes in a tar: a 512-byte header plus padded data."""
    return 512 + (n + 511) // 512 * 512


def tar_file_size(member_bytes: int) -> int:
    """Size of a tar file whose members take ``member_bytes``: plus the 1 KiB end marker, padded
    to whole 10 KiB records (Python's tarfile, like GNU tar, writes whole records)."""
    return -(-(member_bytes + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_hash(classes: Sequence[str], shards: Sequence[dict[str, Any]]) -> str:
    """sha256 over the class list and every shard's sha256, in order: equal hashes, equal data."""
    digest = hashlib.sha256(encode_json(list(classes)))
    for shard in shards:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading the index


@dataclass(frozen=True)
class ShardSet:
    """The shards of one dataset split: URLs with their sample counts, and the class names."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.urls) != len(self.counts):
            raise ValueError(f"{len(self.urls)} shard URLs but {len(self.counts)} counts")
        if not self.urls:
            raise ShardFormatError("a shard set needs at least one shard")

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        """Classes including background (what ``model.num_classes`` must be)."""
        return len(self.classes) + 1

    @classmethod
    def open(cls, spec: str | os.PathLike) -> ShardSet:
        """Open a split from a directory holding ``dataset.json``, or a ``dataset.json`` path/URL.

        URLs may be ``s3://...`` (see ``S3_COMMAND_ENV``), ``http(s)://...``, or any
        WebDataset URL; shard names in dataset.json are resolved relative to its location.
        """
        spec = os.fspath(spec)
        location = spec if spec.endswith(".json") else _join(spec, DATASET_JSON)
        if _is_local(location) and not Path(location).is_file():
            raise FileNotFoundError(f"no {DATASET_JSON} at {location} (pipelines/make_shards.py writes it)")
        try:
            with wds.gopen(to_readable_url(location), "rb") as stream:
                info = json.loads(stream.read())
        except json.JSONDecodeError as err:
            raise ShardFormatError(f"{location}: not valid JSON ({err})") from err
        return cls.from_info(info, base=location.rsplit("/", 1)[0] if "/" in location else ".", where=location)

    @classmethod
    def from_info(cls, info: dict[str, Any], base: str, where: str = DATASET_JSON) -> ShardSet:
        """Build from a parsed dataset.json whose shard URLs are relative to ``base``."""
        for name in ("format", "classes", "shards"):
            if name not in info:
                raise ShardFormatError(f"{where}: missing field {name!r}")
        if info["format"] != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
            raise ShardFormatError(
                f"{where}: format {info['format']!r} v{info.get('version')} is not "
                f"{FORMAT_NAME!r} v{FORMAT_VERSION}")
        try:
            urls = tuple(_join(base, shard["url"]) for shard in info["shards"])
            counts = tuple(int(shard["samples"]) for shard in info["shards"])
        except (KeyError, TypeError) as err:
            raise ShardFormatError(f"{where}: every entry of 'shards' needs 'url' and 'samples' ({err})") from err
        return cls(urls, counts, tuple(info["classes"]), info)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def join_spec(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a folder or a URL: ``join_spec("s3://b/voc", "train")`` is
    ``"s3://b/voc/train"`` (``Path`` would collapse the ``//``)."""
    return _join(os.fspath(base), name)


def _join(base: str, name: str) -> str:
    if "://" in name or name.startswith(("/", "pipe:")):
        return name
    return storage.join(base, name)


def to_readable_url(url: str) -> str:
    """The URL WebDataset opens: ``s3://`` becomes a ``pipe:`` command when ``$SSD_S3_COMMAND``
    is set (else WebDataset streams it with ``_open_s3``); other URLs pass through."""
    command = os.environ.get(S3_COMMAND_ENV)
    if url.startswith("s3://") and command:
        # replace, not str.format: shell commands have braces of their own
        return "pipe:" + command.replace("{url}", shlex.quote(url))
    return url


# --------------------------------------------------------------------------------------------
# Streaming


def decode_sample(sample: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """A raw shard sample -> (image (3, H, W) uint8 RGB, target with absolute-pixel boxes).

    Decoding uses torchvision's JPEG decoder (libjpeg-turbo), straight from the tar bytes.
    """
    # imported here, not at the top: torchvision's import (~1.3 s) would slow every script that
    # only opens a shard set (and its failure on a bad path); the import is cached after the first
    from torchvision.io import ImageReadMode, decode_jpeg

    meta = json.loads(sample["json"])
    data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
    image = decode_jpeg(data, mode=ImageReadMode.RGB)
    n = len(meta["labels"])
    target = {
        "boxes": torch.tensor(meta["boxes"], dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor(meta["labels"], dtype=torch.int64),
        "difficult": torch.tensor(meta.get("difficult", [False] * n), dtype=torch.bool),
        "iscrowd": torch.tensor(meta.get("iscrowd", [False] * n), dtype=torch.bool),
        "image_id": torch.tensor(int(meta["image_id"])),
        "orig_size": torch.tensor([image.shape[1], image.shape[2]]),  # (H, W)
    }
    return image, target


def _select(target: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    return {k: (v[keep] if k in PER_OBJECT_KEYS else v) for k, v in target.items()}


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's samples for one epoch, decoded and transformed; split across DataLoader workers.

    Args:
        shards: the split to read.
        transform: paired transform ``(image uint8 (3,H,W), target) -> (image, target)``
            (``ssd.transforms.build_transform``); None yields decoded images.
        train: shuffle shards and samples, and drop crowd regions (and, unless
            ``keep_difficult``, difficult objects) from the targets. Evaluation keeps them:
            the evaluators treat both as regions to ignore.
        rank, world_size: this process's place among the data-parallel ranks.
        seed: shuffling seed; the epoch is mixed in (``set_epoch``).
        shuffle_buffer: samples held for shuffling inside each worker (train only).
    """

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable | None = None,
        *,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        keep_difficult: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shards = shards
        self.transform = transform
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.keep_difficult = keep_difficult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_slices(self) -> list[ShardSlice]:
        order = shard_order(len(self.shards.urls), self.seed, self.epoch, shuffle=self.train)
        return rank_slices(self.shards.counts, order, self.world_size, self.rank)

    def num_rank_samples(self) -> int:
        """Samples this rank reads this epoch (before any training cut)."""
        return sum(s.kept(self.shards.counts[s.shard]) for s in self.rank_slices())

    def raw_samples(self, num_workers: int = 1, worker: int = 0) -> Iterator[dict[str, Any]]:
        """Undecoded samples (``__key__``, ``jpg``, ``json``) of this (rank, worker), in read order."""
        slices, step, offset = worker_split(self.rank_slices(), num_workers, worker)
        kept = 0
        for piece in slices:
            url = to_readable_url(self.shards.urls[piece.shard])
            position = 0
            for sample in wds.tarfile_samples([{"url": url}]):
                take = (piece.base + position) % piece.step == piece.offset
                position += 1
                if not take:
                    continue
                kept += 1
                if (kept - 1) % step == offset:
                    yield sample
            if position != self.shards.counts[piece.shard]:
                raise ShardFormatError(
                    f"{self.shards.urls[piece.shard]}: {position} samples, but dataset.json says "
                    f"{self.shards.counts[piece.shard]}")

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        info = torch.utils.data.get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        samples: Iterator[dict[str, Any]] = self.raw_samples(num_workers, worker)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            samples = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            image, target = decode_sample(sample)
            if self.train:
                keep = ~target["iscrowd"]
                if not self.keep_difficult:
                    keep &= ~target["difficult"]
                if not bool(keep.all()):
                    target = _select(target, keep)
            if self.transform is not None:
                image, target = self.transform(image, target)
            yield image, target


def pack_batch(samples: list) -> tuple[Tensor, dict[str, Tensor]]:
    """Collate in a DataLoader worker: images stacked, targets packed into a few tensors.

    Every tensor a worker hands to the main process costs a shared-memory segment and a file
    descriptor on each side (about 0.1 ms in all); six small tensors per target made that the
    main process's biggest cost. Packed, a batch is a handful of tensors whatever its size:
    per-object keys concatenated over images with ``counts`` (B,), per-image keys stacked.
    """
    images, targets = zip(*samples)
    packed = {"counts": torch.tensor([len(t["labels"]) for t in targets])}
    for key in targets[0]:
        values = [t[key] for t in targets]
        packed[key] = torch.cat(values) if key in PER_OBJECT_KEYS else torch.stack(values)
    return torch.stack(images), packed


def unpack_targets(packed: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """The inverse of ``pack_batch``'s target packing: one dict of views per image."""
    counts = packed["counts"].tolist()
    columns = {
        key: (value.split(counts) if key in PER_OBJECT_KEYS else value.unbind(0))
        for key, value in packed.items() if key != "counts"
    }
    return [{key: column[i] for key, column in columns.items()} for i in range(len(counts))]


class ShardLoader:
    """Batches of one rank's share of a shard set, for one epoch per iteration.

    Training yields exactly ``len(self)`` full batches on every rank. Evaluation yields every
    sample of this rank once, in full batches except the last. Call ``set_epoch`` before each
    epoch (it reshuffles; workers are started per epoch so they see it).
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        num_workers: int = 2,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._train_steps = (
            steps_per_epoch(stream.shards.counts, stream.world_size, batch_size) if stream.train else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        if self._train_steps is not None:
            return self._train_steps
        return math.ceil(self.stream.num_rank_samples() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, list[dict[str, Tensor]]]]:
        # Workers batch their own samples; the last batch of each worker is partial, so batches
        # are re-cut here into full ones (training must run the same full steps on every rank).
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=pack_batch,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        limit = len(self) if self._train_steps is not None else None
        produced = 0
        batches = ((images, unpack_targets(packed)) for images, packed in loader)
        for batch in rebatch(batches, self.batch_size, drop_last=self._train_steps is not None):
            yield batch
            produced += 1
            if limit is not None and produced == limit:
                return
        if limit is not None and produced < limit:
            raise RuntimeError(
                f"rank {self.stream.rank} produced {produced} of {limit} batches: the shards hold "
                f"fewer samples than dataset.json says")


def rebatch(batches, batch_size: int, drop_last: bool) -> Iterator[tuple[Tensor, list[dict[str, Tensor]]]]:
    """Re-cut a stream of (images (b,...), targets) batches into batches of exactly ``batch_size``.

    Full batches pass through untouched (no copy); partial ones are joined. The final remainder
    is yielded unless ``drop_last``.
    """
    pending_images: list[Tensor] = []
    pending_targets: list[dict[str, Tensor]] = []
    pending = 0
    for images, targets in batches:
        if pending == 0 and len(targets) == batch_size:
            yield images, targets
            continue
        pending_images.append(images)
        pending_targets.extend(targets)
        pending += len(targets)
        while pending >= batch_size:
            joined = torch.cat(pending_images)
            yield joined[:batch_size], pending_targets[:batch_size]
            pending_images = [joined[batch_size:]] if pending > batch_size else []
            pending_targets = pending_targets[batch_size:]
            pending -= batch_size
    if pending and not drop_last:
        yield torch.cat(pending_images), pending_targets


def read_samples(shards: ShardSet) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Every sample of ``shards`` in order as ``(key, jpg bytes, meta dict)``: for checks and tools."""
    for url in shards.urls:
        for sample in wds.tarfile_samples([{"url": to_readable_url(url)}]):
            yield sample["__key__"], sample["jpg"], json.loads(sample["json"])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
