"""The SSD augmentation of a batch on the training device (CUDA or CPU), from JPEG bytes.

The CPU path (``ssd.transforms.build_transform``) augments one image at a time in loader workers
(~5 ms of CPU per image). Here loader workers only draw the parameters
(``ssd.transforms.sample_augment_params``, the one sampler of both paths: microseconds, no
pixels) and the training process does the pixel work on a whole batch:

1. decode: :func:`decode_jpegs` (``torchvision.io.decode_jpeg`` on a list; nvJPEG on CUDA);
2. geometry: zoom-out + IoU crop + resize as ONE resampling per image (:func:`resample`): the
   output shows one rectangle of the zoom-out canvas, so that rectangle is cut out of the image
   (padded with the fill colour where it leaves the image; only then is memory allocated) and
   resized with the CPU path's own ``resize`` (bilinear, antialias). ``grid_sample`` would be the
   literal affine map, but it has no antialiasing, and a zoomed-out canvas is shrunk by up to
   ~7x: it would alias where the CPU path does not. The flip is one batched ``flip`` after it;
3. colour: :func:`photometric_batch` on the (B, 3, S, S) batch with per-image parameters, after
   the resize (fewer pixels, one set of kernels for the batch) instead of before it as on the
   CPU. Pixels of the zoom-out fill are left untouched through an analytic coverage mask, as the
   CPU path paints the fill after the colour ops;
4. boxes: :func:`augment_target`, the CPU path's box arithmetic with the same parameters, in the
   same float ops (equal bit for bit), then ``SanitizeBoxes`` and ``ToRelativeBoxes``'s rules.

How close to the CPU path (``tests/test_device_augment.py`` measures it): boxes, labels and
flags are equal exactly. Images differ only because the colour ops run after the resize instead
of before it (they are not linear: clamping, HSV) and are rounded once: geometry alone is bit for
bit the CPU path's on the CPU device; with colour on, mean abs difference ~1 grey level. At
strength 0 the output is the eval transform's (resize only) exactly.

Images: uint8 (3, H, W) RGB in, uint8 (B, 3, S, S) out (the step normalises on the device,
``ssd.engine.network_input``). Boxes: float (N, 4) xyxy in absolute pixels of the input image in,
float32 xyxy in [0, 1] of the output out (as ``build_transform``'s).

Note: this module imports ``ssd.transforms`` (the sampler and the colour maths), which
ARCHITECTURE.md's rule "the data layer does not import augmentation" did not foresee.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ssd.boxes import clip_boxes
from ssd.transforms import (
    IMAGENET_MEAN,
    AugmentParams,
    _hcv_to_rgb,
    _rgb_to_hcv,
    _select,
    mean_fill,
    resize,
    sample_augment_params,
)

Target = dict[str, Any]


def decode_jpegs(datas: Sequence[Tensor | bytes], device: torch.device | str = "cpu") -> tuple[list[Tensor], list[int]]:
    """Decode a batch of JPEGs to uint8 (3, H, W) RGB on ``device``.

    One ``decode_jpeg`` call on the list (nvJPEG's batched decode on CUDA; libjpeg-turbo on CPU).
    If the batch call fails (a CMYK, corrupt, ... image that the device decoder rejects), the
    images are decoded one by one, an image the device rejects again is decoded on the CPU
    (libjpeg-turbo reads what nvJPEG does not) and moved, and only images no decoder reads are
    left out.

    Args:
        datas: encoded JPEGs, each a 1-D uint8 CPU tensor or bytes.
    Returns:
        images, and the indices into ``datas`` they come from (all of them unless some failed).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [d if isinstance(d, Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    device = torch.device(device)
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)), list(range(len(tensors)))
    except RuntimeError:
        images, kept = [], []
        for i, data in enumerate(tensors):
            for where in dict.fromkeys((device, torch.device("cpu"))):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device))
                except RuntimeError:
                    continue
                kept.append(i)
                break
        return images, kept


# --------------------------------------------------------------------------------------------
# geometry


def resample(image: Tensor, params: AugmentParams, size: int, fill: Sequence[int]) -> Tensor:
    """Zoom-out + crop + resize of one image as one cut-and-resize (the flip is left to the batch).

    Args:
        image: uint8 (3, H, W) with (H, W) = (params.height, params.width), on any device.
        fill: the zoom-out colour, 0..255 per channel (``ssd.transforms.mean_fill``).
    Returns:
        uint8 (3, size, size), not flipped.
    """
    if tuple(image.shape[-2:]) != (params.height, params.width):
        raise ValueError(f"params drawn for {params.height}x{params.width}, image is {tuple(image.shape[-2:])}")
    x1, y1, x2, y2, left, top = params.region()
    # the part of the image inside the rectangle, in the image's pixels
    ix1, iy1 = max(x1 - left, 0), max(y1 - top, 0)
    ix2, iy2 = min(x2 - left, params.width), min(y2 - top, params.height)
    if (ix1, iy1, ix2, iy2) == (x1 - left, y1 - top, x2 - left, y2 - top):
        region = image[:, iy1:iy2, ix1:ix2]  # inside the image: a view, no copy
    else:
        # only the visible rectangle of the canvas is materialised, never the whole canvas
        region = torch.tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1)
        region = region.expand(3, y2 - y1, x2 - x1).clone()
        if ix2 > ix1 and iy2 > iy1:
            region[:, iy1 + top - y1 : iy2 + top - y1, ix1 + left - x1 : ix2 + left - x1] = image[:, iy1:iy2, ix1:ix2]
    # the CPU path's own resize (bilinear, antialias; skipped at the same size), boxes unused
    empty: Target = {"boxes": torch.zeros(0, 4)}
    return resize(region, empty, (size, size))[0]


def _spans(params: Sequence[AugmentParams], size: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]],
                                                                 list[bool]]:
    """Each image's rectangle in output pixels, as x and y spans, and whether it leaves any
    zoom-out fill visible (from the parameters alone: host arithmetic, no device work)."""
    spans_x, spans_y, fill = [], [], []
    for p in params:
        x1, y1, x2, y2, left, top = p.region()
        sx, sy = size / (x2 - x1), size / (y2 - y1)
        a, b = (left - x1) * sx, (left + p.width - x1) * sx
        if p.flip:
            a, b = size - b, size - a
        c, d = (top - y1) * sy, (top + p.height - y1) * sy
        fill.append(a > 0 or c > 0 or b < size or d < size)
        spans_x.append((a, b))
        spans_y.append((c, d))
    return spans_x, spans_y, fill


def fill_flags(params: Sequence[AugmentParams], size: int) -> list[bool]:
    """Whether each image's output shows some zoom-out fill (where :func:`image_coverage` < 1)."""
    return _spans(params, size)[2]


def image_coverage(params: Sequence[AugmentParams], size: int, device: torch.device | str) -> Tensor | None:
    """The share of each output pixel covered by the image rather than the zoom-out fill.

    The image's rectangle in output pixels is known from the parameters, so the coverage is the
    exact area overlap of each (size x size) pixel with it, separable in x and y: no resampling.

    Returns:
        float32 (B, 1, S, S) in [0, 1], or None when no image of the batch shows any fill.
    """
    spans_x, spans_y, fill = _spans(params, size)
    if not any(fill):
        return None
    j = torch.arange(size, dtype=torch.float32, device=device)  # pixel j covers [j, j + 1)

    def cover(spans: list[tuple[float, float]]) -> Tensor:  # (B, S)
        lo, hi = torch.tensor(spans, dtype=torch.float32, device=device).unbind(-1)
        return (torch.minimum(j + 1, hi[:, None]) - torch.maximum(j, lo[:, None])).clamp_(0, 1)

    return (cover(spans_y)[:, :, None] * cover(spans_x)[:, None, :]).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# colour


def has_colour(p: AugmentParams) -> bool:
    return p.brightness is not None or p.contrast is not None or p.saturation is not None or p.hue is not None


def photometric_batch(images: Tensor, params: Sequence[AugmentParams], coverage: Tensor | None = None,
                      per_image: bool | None = None) -> Tensor:
    """``ssd.transforms.photometric_distort`` on a batch, each image with its own parameters.

    Same formulas and order (brightness; contrast before or after the HSV ops; saturation and hue
    in the HCV form; clamping to [0, 255] after each op). Two schedules, equal bit for bit:
    batched (one op over the batch, an op that is off for an image getting its identity
    parameter, 0 or 1, which is exact; the HSV and saturation-only forms on the images that need
    them), the default on GPUs; and per image (only the ops each image drew, in place on its
    slice: no work for the ops it did not draw), the default on the CPU, where every pass over
    the batch costs its full memory traffic.

    Args:
        images: float32 (B, 3, H, W) RGB in 0..255, not modified.
        coverage: (B, 1, H, W) image share of each pixel (:func:`image_coverage`): the result is
            blended back to the input by it, so the zoom-out fill keeps its colour; images that
            show no fill (coverage 1 everywhere) are left out of the blend.
        per_image: the schedule (None: per image on the CPU, batched elsewhere).
    Returns:
        float32 (B, 3, H, W) in [0, 255], not rounded.
    """
    batch, device = images.shape[0], images.device
    if len(params) != batch:
        raise ValueError(f"{len(params)} params for {batch} images")
    if per_image is None:
        per_image = device.type == "cpu"
    fills = [bool(f) for f in fill_flags(params, images.shape[-1])] if coverage is not None else [False] * batch
    if per_image:
        out = images.clone()
        for i, p in enumerate(params):
            if has_colour(p):
                out[i] = _photometric_one(images[i], p, coverage[i] if fills[i] else None)
        return out

    def column(values: list[float]) -> Tensor:  # (len, 1, 1, 1), built on the host: no device sync
        return torch.tensor(values, dtype=torch.float32, device=device).view(len(values), 1, 1, 1)

    brightness = column([p.brightness if p.brightness is not None else 0.0 for p in params])
    contrast_before = column([p.contrast if p.contrast is not None and p.contrast_first else 1.0 for p in params])
    contrast_after = column([p.contrast if p.contrast is not None and not p.contrast_first else 1.0 for p in params])
    x = (images + brightness).clamp_(0, 255)
    x = x.mul_(contrast_before).clamp_(0, 255)
    with_hue = [i for i, p in enumerate(params) if p.hue is not None]
    saturation_only = [i for i, p in enumerate(params) if p.hue is None and p.saturation is not None]
    if with_hue:
        idx = torch.tensor(with_hue, device=device)
        saturation = column([params[i].saturation if params[i].saturation is not None else 1.0
                             for i in with_hue])[:, 0]  # (b, 1, 1)
        hue = column([params[i].hue for i in with_hue])[:, 0]
        # channel-first (3, b, H, W): the single-image helpers unbind channels on dim 0
        x[idx] = _hsv(x[idx].transpose(0, 1), saturation, hue).transpose(0, 1)
    if saturation_only:
        idx = torch.tensor(saturation_only, device=device)
        saturation = column([params[i].saturation for i in saturation_only])
        x[idx] = _saturation(x[idx], saturation, channel_dim=1)
    x = x.mul_(contrast_after).clamp_(0, 255)
    blend = [i for i in range(batch) if fills[i]]
    if blend:
        idx = torch.tensor(blend, device=device)
        start = images[idx]
        x[idx] = start + coverage[idx] * (x[idx] - start)
    return x


def _scalar(value: float, device: torch.device) -> Tensor:
    """A (1, 1, 1) float32 parameter: the batched schedule's column entry for one image, so both
    schedules compute in the same precision."""
    return torch.tensor([value], dtype=torch.float32, device=device).view(1, 1, 1)


def _photometric_one(image: Tensor, p: AugmentParams, coverage: Tensor | None) -> Tensor:
    """One image (3, H, W) float32 through the ops it drew; ``photometric_batch``'s per-image
    schedule (the batched one's arithmetic, op for op)."""
    device = image.device
    x = image.clone()
    if p.brightness is not None:
        x.add_(_scalar(p.brightness, device)).clamp_(0, 255)
    if p.contrast is not None and p.contrast_first:
        x.mul_(_scalar(p.contrast, device)).clamp_(0, 255)
    if p.hue is not None:
        x = _hsv(x, _scalar(p.saturation if p.saturation is not None else 1.0, device)[0],
                 _scalar(p.hue, device)[0])
    elif p.saturation is not None:
        x = _saturation(x, _scalar(p.saturation, device), channel_dim=0)
    if p.contrast is not None and not p.contrast_first:
        x.mul_(_scalar(p.contrast, device)).clamp_(0, 255)
    if coverage is not None:
        x = image + coverage * (x - image)
    return x


def _hsv(x: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """Saturation and hue in the HCV form on channel-first ``x`` (3, ...), clamped to [0, 255];
    ``saturation`` and ``hue`` (degrees) broadcast against one channel."""
    h6, c, v = _rgb_to_hcv(x)
    c = torch.minimum(c * saturation, v)  # saturation 1 leaves C exactly (C <= V)
    return _hcv_to_rgb(h6 + hue / 60.0, c, v).clamp_(0, 255)


def _saturation(x: Tensor, saturation: Tensor, channel_dim: int) -> Tensor:
    """Saturation alone (hue kept): each pixel's chroma scaled, its value kept; clamped.
    ``saturation`` broadcasts against ``x`` with its channel dimension of size 1."""
    r, g, b = x.unbind(channel_dim)
    v = torch.maximum(torch.maximum(r, g), b).unsqueeze(channel_dim)
    c = v - torch.minimum(torch.minimum(r, g), b).unsqueeze(channel_dim)
    gain = torch.minimum(c * saturation, v) / c.clamp_min(1e-6)
    return (v - (v - x) * gain).clamp_(0, 255)


# --------------------------------------------------------------------------------------------
# boxes


def augment_target(target: Target, params: AugmentParams, size: int, min_size: float = 1.0) -> Target:
    """One image's target through the augmentation's geometry, ``SanitizeBoxes`` and
    ``ToRelativeBoxes``: the CPU path's float ops in its order, so the boxes are equal bit for bit.

    Cheap (no pixels): loader workers can run it, or the training process on the device.

    Args:
        target: ``boxes`` float (N, 4) xyxy absolute pixels of the input image, ``labels`` (N,),
            optional per-object flags; other keys pass through.
        min_size: boxes narrower or shorter than this many output pixels are dropped.
    Returns:
        a new target: boxes float32 (N', 4) xyxy in [0, 1] of the (S, S) output, per-object
        entries filtered with them.
    """
    out = dict(target)
    boxes = out["boxes"]
    dtype, device = boxes.dtype, boxes.device
    height, width = params.height, params.width
    if params.expand is not None:  # ssd.transforms.expand
        height, width, top, left = params.expand
        boxes = boxes + torch.tensor([left, top, left, top], dtype=dtype, device=device)
    if params.crop is not None:  # ssd.transforms.crop: keep boxes whose centre is inside, clip
        x1, y1, x2, y2 = params.crop
        corner = torch.tensor([x1, y1], dtype=dtype, device=device)
        far = torch.tensor([x2, y2], dtype=dtype, device=device)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
        keep = ((centres > corner) & (centres < far)).all(dim=1)
        out = _select(out, keep)
        boxes = clip_boxes(boxes[keep] - corner.repeat(2), y2 - y1, x2 - x1)
        height, width = y2 - y1, x2 - x1
    if params.flip:  # ssd.transforms.hflip
        bx1, by1, bx2, by2 = boxes.unbind(-1)
        boxes = torch.stack((width - bx2, by1, width - bx1, by2), dim=-1)
    sx, sy = size / width, size / height  # ssd.transforms.resize
    boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=dtype, device=device)
    clipped = clip_boxes(boxes, size, size)  # SanitizeBoxes
    wh = clipped[:, 2:] - clipped[:, :2]
    keep = (wh >= min_size).all(dim=1) & torch.isfinite(boxes).all(dim=1)
    out = _select(out, keep)
    scale = torch.tensor([size, size, size, size], dtype=torch.float32, device=device)  # ToRelativeBoxes
    out["boxes"] = clipped[keep].to(torch.float32) / scale
    return out


# --------------------------------------------------------------------------------------------
# the batch


def augment_images(
    images: Sequence[Tensor], params: Sequence[AugmentParams], size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
) -> Tensor:
    """The pixel side of the augmentation for a batch, on the images' device.

    Args:
        images: B uint8 (3, H_i, W_i) RGB on one device; sizes may differ.
        params: one :class:`~ssd.transforms.AugmentParams` per image, drawn for its size.
        size: output side S.
        mean: RGB mean in [0, 1] units; the zoom-out fill is this colour (as the CPU path's).
    Returns:
        uint8 (B, 3, S, S).
    """
    if len(images) != len(params) or not images:
        raise ValueError(f"{len(images)} images and {len(params)} params (need the same, at least one)")
    device = images[0].device
    fill = mean_fill(mean)
    # the per-image loop is only the cut-and-resize (sizes differ); everything else is batched
    out = torch.stack([resample(image, p, size, fill) for image, p in zip(images, params, strict=True)])
    flips = [i for i, p in enumerate(params) if p.flip]
    if flips:
        idx = torch.tensor(flips, device=device)
        out[idx] = out[idx].flip(-1)
    if not any(has_colour(p) for p in params):
        return out  # strength 0 or no colour op drawn: no float round trip
    coverage = image_coverage(params, size, device)
    if device.type == "cpu":
        # photometric_batch's per-image schedule, in place on the uint8 batch: an image without
        # colour ops is not even converted to float (the same result, bit for bit)
        fills = fill_flags(params, size)
        for i, p in enumerate(params):
            if has_colour(p):
                cover = coverage[i] if coverage is not None and fills[i] else None
                out[i] = _photometric_one(out[i].to(torch.float32), p, cover).round_()
        return out
    coloured = photometric_batch(out.to(torch.float32), params, coverage, per_image=False)
    return coloured.round_().to(torch.uint8)


def augment_batch(
    images: Sequence[Tensor], targets: Sequence[Target], params: Sequence[AugmentParams], size: int,
    mean: Sequence[float] = IMAGENET_MEAN, min_size: float = 1.0,
) -> tuple[Tensor, list[Target]]:
    """Images and targets of a batch through the SSD augmentation with fixed ``params``.

    Args:
        images: B uint8 (3, H_i, W_i) RGB on the training device.
        targets: B targets with boxes float (N_i, 4) xyxy absolute pixels (any device).
        params: B parameter draws (``ssd.transforms.sample_augment_params``).
    Returns:
        uint8 (B, 3, S, S) and B targets with boxes float32 (N_i', 4) xyxy in [0, 1]: what
        ``build_transform(S, train=True, normalize=False)`` gives per image, batched.
    """
    out_targets = [augment_target(t, p, size, min_size) for t, p in zip(targets, params, strict=True)]
    return augment_images(images, params, size, mean), out_targets


# --------------------------------------------------------------------------------------------
# training: loader workers prepare, the training process decodes and augments


@dataclass(frozen=True)
class DeviceAugment:
    """The device path's two halves, configured once (``train.augment_on=device``).

    ``prepare`` runs in loader workers (``ShardStream(prepare=...)``): draws the parameters from
    torch's global RNG (seeded differently in each worker, as the CPU path's) and computes the
    final target (boxes only, microseconds). ``__call__`` runs in the training process on the
    device: decode and augment a batch's pixels.
    """

    size: int
    strength: float = 1.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    min_size: float = 1.0

    def prepare(self, height: int, width: int, target: Target) -> tuple[Target, AugmentParams]:
        """(H, W, target with boxes in pixels) -> (target with boxes in [0, 1] of the output, params)."""
        params = sample_augment_params(height, width, target["boxes"], self.strength)
        return augment_target(target, params, self.size, self.min_size), params

    def __call__(self, raw: Sequence[tuple[Tensor, AugmentParams]], targets: Sequence[Target],
                 device: torch.device | str) -> tuple[Tensor, list[Target], list[int]]:
        """Decode and augment a raw batch on ``device``.

        Args:
            raw: per sample (JPEG bytes (L,) uint8, params), as ``ShardLoader`` yields in this mode.
            targets: the prepared targets, one per sample.
        Returns:
            uint8 (B', 3, S, S) on ``device``, the B' targets, and the indices of the samples that
            failed to decode (B' = B minus those).
        """
        datas = [data for data, _ in raw]
        images, kept = decode_jpegs(datas, device)
        failed = sorted(set(range(len(datas))) - set(kept))
        params = [raw[i][1] for i in kept]
        if not images:
            return torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8, device=device), [], failed
        return augment_images(images, params, self.size, self.mean), [targets[i] for i in kept], failed


class DeviceAugmentLoader:
    """A ``ShardLoader`` in the raw mode whose batches are decoded and augmented on ``device``:
    yields what ``StepRunner.step`` takes (uint8 (B, 3, S, S) on the device, targets), so the step
    needs no change. A sample that fails to decode is dropped from its batch, counted in
    ``self.dropped``, and named (its ``image_id``) in the log once."""

    def __init__(self, loader: Any, augment: DeviceAugment, device: torch.device | str) -> None:
        if getattr(loader, "stream", None) is not None and loader.stream.prepare is None:
            raise ValueError("DeviceAugmentLoader needs a ShardLoader over ShardStream(prepare=augment.prepare)")
        self.loader, self.augment, self.device = loader, augment, torch.device(device)
        self.dropped = 0
        self._named: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def skip_next(self, batches: int) -> None:
        """As ``ShardLoader.skip_next``: the skipped batches are never decoded."""
        self.loader.skip_next(batches)

    def set_next_epoch(self, epoch: int | None) -> None:
        self.loader.set_next_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, list[Target]]]:
        for raw, targets in self.loader:
            images, kept_targets, failed = self.augment(raw, targets, self.device)
            if failed:
                self.dropped += len(failed)
                for i in failed:
                    image_id = int(targets[i]["image_id"]) if "image_id" in targets[i] else -1
                    if image_id not in self._named:
                        self._named.add(image_id)
                        print(f"device augmentation: image_id {image_id} failed to decode; dropped from its "
                              f"batch ({self.dropped} dropped so far)", flush=True)
            if not kept_targets:
                # every rank must run the same steps (DDP): a skipped batch would hang the others
                ids = [int(t["image_id"]) for t in targets if "image_id" in t]
                raise ValueError(f"device augmentation: no image of a batch could be decoded (image_ids {ids}); "
                                 "the shards are damaged: re-run make_shards.py")
            yield images, kept_targets
