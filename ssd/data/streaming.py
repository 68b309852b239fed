"""Streaming shards to training and evaluation: decode, transform, batch.

Every (rank, DataLoader worker) reads its own part of the shards (``ssd.data.sharding``), so no
sample is read twice in an epoch. In training every rank runs exactly ``steps_per_epoch`` full
batches (DDP needs equal step counts): the largest number that the smallest possible rank share
can fill, whatever the permutation. The few samples beyond it in an epoch are not lost: the
permutation changes which they are every epoch. In evaluation nothing is shuffled, augmented or
cut: every sample is seen exactly once across all ranks, and batches are full except the last.

The on-disk format (``ShardSet``, ``dataset.json``) is ``ssd.data.shards``; this module only reads it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch import Tensor

from ssd.boxes import PER_OBJECT_KEYS
from ssd.data.sharding import ShardSlice, rank_slices, shard_order, steps_per_epoch, worker_split
from ssd.data.shards import ShardFormatError, ShardSet, to_readable_url


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The RNG seed of one rank's epoch: the training process's global RNG (``EpochSeed``) and
    its loader workers' seeds (worker ``w``: this + ``w``, torch's rule) derive from it."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


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
    return image, _target(meta, image.shape[1], image.shape[2])


def _target(meta: dict[str, Any], height: int, width: int) -> dict[str, Tensor]:
    """A sample's annotation as a target: boxes (N, 4) float32 xyxy absolute pixels, flags."""
    n = len(meta["labels"])
    return {
        "boxes": torch.tensor(meta["boxes"], dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor(meta["labels"], dtype=torch.int64),
        "difficult": torch.tensor(meta.get("difficult", [False] * n), dtype=torch.bool),
        "iscrowd": torch.tensor(meta.get("iscrowd", [False] * n), dtype=torch.bool),
        "image_id": torch.tensor(int(meta["image_id"])),
        "orig_size": torch.tensor([height, width]),  # (H, W)
    }


def read_sample(sample: dict[str, Any]) -> tuple[Tensor, int, int, dict[str, Tensor]]:
    """A raw shard sample without decoding its pixels (the device-augmentation mode's loader work).

    Returns:
        the JPEG bytes as a 1-D uint8 tensor, the image's height and width (from the sample's
        annotation, or the JPEG header if it lacks them), and the target as ``decode_sample``'s.
    """
    meta = json.loads(sample["json"])
    data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
    height, width = meta.get("height"), meta.get("width")
    if height is None or width is None:
        from ssd.data.images import jpeg_frame

        frame = jpeg_frame(bytes(sample["jpg"]))
        if frame is None:
            raise ShardFormatError(f"{sample.get('__url__', 'a shard')}: sample {sample.get('__key__')!r}: no "
                                   "height/width in its annotation and no size in its JPEG header")
        height, width = frame[2], frame[3]
    return data, int(height), int(width), _target(meta, int(height), int(width))


def _select(target: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    return {k: (v[keep] if k in PER_OBJECT_KEYS else v) for k, v in target.items()}


class PassedOver:
    """What a stream yields, and a collate returns, for samples a resumed run already trained
    on: ``count`` samples whose random draws were made, without their pixels."""

    def __init__(self, count: int = 1) -> None:
        self.count = count


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
        prepare: the device-augmentation mode (``transform`` must be None): no pixel is decoded;
            each sample is ``(jpeg bytes (L,) uint8, *prepare(height, width, target))``, e.g.
            ``ssd.device_augment.DeviceAugment.prepare`` -> (final target, params).
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
        prepare: Callable[[int, int, dict[str, Tensor]], tuple[Any, Any]] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if prepare is not None and transform is not None:
            raise ValueError("a stream either transforms decoded images or prepares raw ones, not both")
        self.shards = shards
        self.transform = transform
        self.prepare = prepare
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.keep_difficult = keep_difficult
        self.epoch = 0
        #: DataLoader worker -> how many of its first samples to pass over (``PassedOver``)
        self.pass_over: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_counts(self, num_workers: int) -> list[int]:
        """Samples each of ``num_workers`` DataLoader workers (0: the main process) reads this epoch."""
        counts = []
        workers = max(1, num_workers)
        for worker in range(workers):
            slices, step, offset = worker_split(self.rank_slices(), workers, worker)
            kept = sum(s.kept(self.shards.counts[s.shard]) for s in slices)
            counts.append(len(range(offset, kept, step)))
        return counts

    def can_pass_over(self) -> bool:
        """Whether a sample's random draws can be made without its pixels (``pass_over``)."""
        return self.prepare is not None or self.transform is None or bool(getattr(self.transform, "drawable", False))

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

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """(image, target) per sample; (jpeg bytes, *prepare(...)) with ``prepare``."""
        info = torch.utils.data.get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        samples: Iterator[dict[str, Any]] = self.raw_samples(num_workers, worker)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            samples = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        pass_over = self.pass_over.get(worker, 0)
        for index, sample in enumerate(samples):
            if index < pass_over:  # trained before a mid-epoch checkpoint: only the random draws
                _, height, width, target = read_sample(sample)
                target = self._train_target(target)
                if self.prepare is not None:
                    self.prepare(height, width, target)
                elif self.transform is not None:
                    self.transform.draw(height, width, target)
                yield PassedOver()
                continue
            if self.prepare is not None:
                data, height, width, target = read_sample(sample)
            else:
                image, target = decode_sample(sample)
            target = self._train_target(target)
            if self.prepare is not None:
                yield data, *self.prepare(height, width, target)
                continue
            if self.transform is not None:
                image, target = self.transform(image, target)
            yield image, target

    def _train_target(self, target: dict[str, Tensor]) -> dict[str, Tensor]:
        """Training drops crowd regions (and, unless ``keep_difficult``, difficult objects)."""
        if not self.train:
            return target
        keep = ~target["iscrowd"]
        if not self.keep_difficult:
            keep &= ~target["difficult"]
        return target if bool(keep.all()) else _select(target, keep)


def pack_batch(samples: list) -> tuple[Tensor, dict[str, Tensor]]:
    """Collate in a DataLoader worker: images stacked, targets packed into a few tensors.

    Every tensor a worker hands to the main process costs a shared-memory segment and a file
    descriptor on each side (about 0.1 ms in all); six small tensors per target made that the
    main process's biggest cost. Packed, a batch is a handful of tensors whatever its size:
    per-object keys concatenated over images with ``counts`` (B,), per-image keys stacked.
    """
    if isinstance(samples[0], PassedOver):
        return _passed_over(samples)
    images, targets = zip(*samples)
    return torch.stack(images), pack_targets(targets)


def _passed_over(samples: list) -> PassedOver:
    if not all(isinstance(sample, PassedOver) for sample in samples):  # ShardLoader cuts whole batches
        raise RuntimeError("a batch mixes passed-over samples with trained ones")
    return PassedOver(len(samples))


def pack_targets(targets) -> dict[str, Tensor]:
    """``pack_batch``'s target packing: per-object keys concatenated with ``counts`` (B,)."""
    packed = {"counts": torch.tensor([len(t["labels"]) for t in targets])}
    for key in targets[0]:
        values = [t[key] for t in targets]
        packed[key] = torch.cat(values) if key in PER_OBJECT_KEYS else torch.stack(values)
    return packed


def pack_raw_batch(samples: list) -> tuple[Tensor, Tensor, list, dict[str, Tensor]]:
    """Collate of the device-augmentation mode: (jpeg bytes, target, params) samples ->
    (all bytes concatenated (sum L,) uint8, lengths (B,), params list, packed targets): a few
    tensors per batch, as ``pack_batch``."""
    if isinstance(samples[0], PassedOver):
        return _passed_over(samples)
    datas, targets, params = zip(*samples)
    return torch.cat(datas), torch.tensor([len(d) for d in datas]), list(params), pack_targets(targets)


def _unpack_raw(datas: Tensor, lengths: Tensor, params: list) -> list[tuple[Tensor, Any]]:
    """``pack_raw_batch``'s inverse for the images: [(jpeg bytes (L,), params)] per sample."""
    return list(zip(datas.split(lengths.tolist()), params, strict=True))


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
    epoch (it reshuffles; workers are started per epoch so they see it), ``skip_next(n)`` to
    start the next pass after its first ``n`` batches (a run resumed mid-epoch), and
    ``set_next_epoch`` to have the next pass's workers start before this pass ends.
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
        self._skip = 0
        self._next_epoch: int | None = None
        self._ahead: tuple[int, Iterator[Any]] | None = None  # the next pass, started early

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def skip_next(self, batches: int) -> None:
        """The next pass starts after its first ``batches`` batches, which are exactly the ones
        an unbroken pass would have yielded first, random draws included: each sample of them
        is read (tar bytes, annotation) and its augmentation drawn, never decoded."""
        self._skip = batches

    def _pass_over_counts(self, stream: ShardStream, batches: int) -> dict[int, int] | None:
        """worker -> samples to pass over so that the first ``batches`` batches are passed over,
        or None when that is not a whole number of each worker's batches (a worker runs out
        within them): then they are decoded and dropped, slower but the same.

        The DataLoader takes batches from its workers round robin (worker ``i % W`` makes batch
        ``i``) while none has run out."""
        workers = max(1, self.num_workers)
        counts = stream.worker_counts(self.num_workers)
        per_worker = [batches // workers + (w < batches % workers) for w in range(workers)]
        if not stream.can_pass_over() or any(b * self.batch_size > n for b, n in zip(per_worker, counts)):
            return None
        return {w: b * self.batch_size for w, b in enumerate(per_worker)}

    def __len__(self) -> int:
        if self._train_steps is not None:
            return self._train_steps
        return math.ceil(self.stream.num_rank_samples() / self.batch_size)

    def set_next_epoch(self, epoch: int | None) -> None:
        """Announce the pass after the next one to run (None: it is the last). When that pass
        hands out its last batch, the next pass's workers start (``num_workers`` > 0):
        they fork and fill their buffers while the last step, evaluation and checkpoint run,
        instead of after them."""
        self._next_epoch = epoch

    def _start(self, epoch: int, skip: int) -> tuple[Iterator[Any], bool]:
        """A started DataLoader iterator over pass ``epoch`` and whether its first ``skip``
        batches come as ``PassedOver`` (False: they come decoded, to be dropped).

        The workers' seeds depend only on (seed, epoch, rank), whenever the pass starts."""
        stream = copy.copy(self.stream)  # this pass's copy (workers pickle it)
        stream.epoch = epoch
        pass_over = self._pass_over_counts(stream, skip) if skip else None
        stream.pass_over = pass_over or {}
        generator = torch.Generator().manual_seed(epoch_seed(stream.seed, epoch, stream.rank))
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=pack_raw_batch if stream.prepare is not None else pack_batch,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            generator=generator,
        )
        return iter(loader), pass_over is not None

    def __iter__(self) -> Iterator[tuple[Tensor, list[dict[str, Tensor]]]]:
        # Workers batch their own samples; the last batch of each worker is partial, so batches
        # are re-cut here into full ones (training must run the same full steps on every rank).
        skip, self._skip = self._skip, 0
        epoch, ahead, self._ahead = self.stream.epoch, self._ahead, None
        if ahead is not None and ahead[0] == epoch and not skip:
            raw, passing_over = ahead[1], False
        else:
            raw, passing_over = self._start(epoch, skip)
        limit = len(self) if self._train_steps is not None else None
        produced = 0
        # a resumed pass's first batches: whole batches of PassedOver (workers made their random
        # draws); otherwise decoded batches dropped below
        trained = (batch for batch in raw if not isinstance(batch, PassedOver))
        if self.stream.prepare is not None:  # images: [(jpeg bytes, params)] per sample
            batches = ((_unpack_raw(datas, lengths, params), unpack_targets(packed))
                       for datas, lengths, params, packed in trained)
        else:
            batches = ((images, unpack_targets(packed)) for images, packed in trained)
        batches = rebatch(batches, self.batch_size, drop_last=self._train_steps is not None)
        if skip:
            produced = skip
            if not passing_over:
                batches = itertools.islice(batches, skip, None)
        if limit is not None and produced >= limit:
            return
        for batch in batches:
            produced += 1
            if limit is not None and produced == limit:
                if self._next_epoch is not None and self.num_workers > 0:  # announced for this pass only
                    self._ahead = (self._next_epoch, self._start(self._next_epoch, 0)[0])
                self._next_epoch = None
                yield batch
                return
            yield batch
        if limit is not None and produced < limit:
            raise RuntimeError(
                f"rank {self.stream.rank} produced {produced} of {limit} batches: the shards hold "
                f"fewer samples than dataset.json says")


def rebatch(batches, batch_size: int, drop_last: bool) -> Iterator[tuple[Tensor, list[dict[str, Tensor]]]]:
    """Re-cut a stream of (images (b,...), targets) batches into batches of exactly ``batch_size``.

    Full batches pass through untouched (no copy); partial ones are joined. The final remainder
    is yielded unless ``drop_last``. ``images`` may also be a list (one entry per sample).
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
            joined = _join(pending_images)
            yield joined[:batch_size], pending_targets[:batch_size]
            pending_images = [joined[batch_size:]] if pending > batch_size else []
            pending_targets = pending_targets[batch_size:]
            pending -= batch_size
    if pending and not drop_last:
        yield _join(pending_images), pending_targets


def _join(parts: list) -> Tensor | list:
    """Tensors concatenated along the batch; lists (raw samples) chained."""
    if isinstance(parts[0], list):
        return [item for part in parts for item in part]
    return torch.cat(parts)
