"""Paired ``(image, target) -> (image, target)`` augmentations and the SSD training preset.

The policy is the SSD paper's (Liu et al. 2016, section 2.2 "Data augmentation" and section 3.6
"Data augmentation is crucial"), as implemented by the Caffe reference and ssd.pytorch
``utils/augmentations.py``::

    PhotometricDistort -> Expand (zoom out) -> IoUCrop ("MinIoURandomCrop") -> HorizontalFlip
        -> Resize -> SanitizeBoxes -> ToRelativeBoxes -> Normalize

Conventions (see ARCHITECTURE.md, "Contracts"):

- ``image``: ``uint8`` tensor (3, H, W), RGB, as ``torchvision.io.decode_jpeg`` returns it. Every
  geometric and colour step keeps it ``uint8`` (cheap to copy, crop and resize); only
  :class:`Normalize`, the last step, makes it ``float32``.
- ``target``: a dict with ``"boxes"`` float (N, 4) xyxy in **absolute pixels of the current
  image** and ``"labels"`` int64 (N,). The other keys in :data:`PER_OBJECT_KEYS` (``difficult``,
  ``iscrowd``, ``truncated``) are per-object tensors of length N, filtered together with the
  boxes whenever a box is dropped. Every other key (``image_id``, ``width``, ``height``, ...) passes through
  untouched. N may be 0. Transforms never modify their inputs; they return new dicts.
- After :class:`ToRelativeBoxes` the boxes are xyxy in [0, 1] of the output image.

``strength`` in [0, 1] is the single knob (``AugmentConfig.strength``): 0 is resize + normalise
only, bit for bit the evaluation transform; 1 is the paper's policy. In between every random op
scales monotonically (see each class): its probability is ``strength`` times the paper's, and its
magnitude range shrinks linearly towards the identity.

Cost (one CPU core, as in a DataLoader worker; 500 x 375 input, 300 x 300 output): about 5 ms
per sample at strength 1 (colour ops ~3 ms, resize ~1.3 ms), 0.6 ms for the eval transform.

Randomness: every random transform draws from an optional ``torch.Generator`` (the global RNG when
None), so a seeded generator makes a run reproducible. In DataLoader workers prefer None: torch
seeds the global RNG differently in each worker, whereas a generator object is copied into every
worker with the same state and would repeat the same augmentations in each of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssd.boxes import PER_OBJECT_KEYS, box_iou, clip_boxes

Target = dict[str, Any]
TransformFn = Callable[[Tensor, Target], tuple[Tensor, Target]]

#: Defaults of ``AugmentConfig.mean`` / ``.std`` (ImageNet RGB statistics in [0, 1] units).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Target keys holding one entry per object; they are filtered together whenever boxes are dropped.


# --------------------------------------------------------------------------------------------
# helpers


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return strength


def _select(target: Target, keep: Tensor) -> Target:
    """New target with every per-object entry indexed by ``keep`` ((N,) bool or int64 indices)."""
    out = dict(target)
    for key in PER_OBJECT_KEYS:
        if key in out:
            out[key] = out[key][keep]
    return out


def _with_boxes(target: Target, boxes: Tensor) -> Target:
    out = dict(target)
    out["boxes"] = boxes
    return out


def check_sample(image: Tensor, target: Target) -> None:
    """Raise if ``image`` / ``target`` break the input contract (cheap; run once per sample)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise TypeError(
            f"image must be a uint8 (3, H, W) RGB tensor, got {image.dtype} {tuple(image.shape)}"
        )
    boxes = target.get("boxes")
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"target['boxes'] must be a (N, 4) xyxy tensor, got {shape}")
    if not boxes.is_floating_point():
        raise TypeError(f"target['boxes'] must be floating point, got {boxes.dtype}")
    n = boxes.shape[0]
    for key in PER_OBJECT_KEYS:
        value = target.get(key)
        if value is not None and (not isinstance(value, Tensor) or value.shape[:1] != (n,)):
            raise ValueError(f"target[{key!r}] must be a tensor of length N={n} like the boxes")


# --------------------------------------------------------------------------------------------
# functional core: deterministic, exact, testable by hand


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror left-right. Boxes (N, 4) xyxy pixels: ``x1, x2 -> W - x2, W - x1``."""
    width = image.shape[-1]
    x1, y1, x2, y2 = target["boxes"].unbind(-1)
    # Swap x1/x2 while mirroring so the box stays x1 <= x2.
    boxes = torch.stack((width - x2, y1, width - x1, y2), dim=-1)
    return image.flip(-1), _with_boxes(target, boxes)


def expand(
    image: Tensor, target: Target, canvas_size: tuple[int, int], top: int, left: int,
    fill: Sequence[int],
) -> tuple[Tensor, Target]:
    """Paste ``image`` at (top, left) on a (canvas_h, canvas_w) canvas of colour ``fill``.

    The paper's "zoom out" (section 3.6): objects get smaller relative to the network input.

    Args:
        image: (C, H, W); ``canvas_size`` must hold it at (top, left).
        target: boxes (N, 4) xyxy pixels of ``image``; returned shifted by (left, top).
        fill: one value per channel, in the image's dtype units (0..255 for uint8).
    """
    channels, height, width = image.shape
    canvas_h, canvas_w = canvas_size
    if top < 0 or left < 0 or top + height > canvas_h or left + width > canvas_w:
        raise ValueError(
            f"a {height}x{width} image at (top={top}, left={left}) does not fit a "
            f"{canvas_h}x{canvas_w} canvas"
        )
    canvas = torch.empty((channels, canvas_h, canvas_w), dtype=image.dtype)
    canvas.copy_(torch.tensor(fill, dtype=image.dtype).view(channels, 1, 1))  # broadcast fill
    canvas[:, top : top + height, left : left + width] = image
    boxes = target["boxes"]
    offset = torch.tensor([left, top, left, top], dtype=boxes.dtype)
    return canvas, _with_boxes(target, boxes + offset)


def crop(image: Tensor, target: Target, rect: Sequence[int] | Tensor) -> tuple[Tensor, Target]:
    """Crop to ``rect`` = (x1, y1, x2, y2) integer pixels, half-open: columns x1..x2-1.

    As in the reference implementations a box is kept only if its centre lies strictly inside
    the crop; it is then clipped to the crop and expressed in the crop's pixels. Dropped boxes take
    their per-object entries (labels, flags) with them.

    Returns:
        image (C, y2 - y1, x2 - x1) (a view of ``image``), target with boxes (N', 4) xyxy pixels.
    """
    x1, y1, x2, y2 = (int(v) for v in rect)
    boxes = target["boxes"]
    corner = torch.tensor([x1, y1], dtype=boxes.dtype)
    far = torch.tensor([x2, y2], dtype=boxes.dtype)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
    keep = ((centres > corner) & (centres < far)).all(dim=1)  # (N,)
    out = _select(target, keep)
    out["boxes"] = clip_boxes(out["boxes"] - corner.repeat(2), y2 - y1, x2 - x1)
    return image[:, y1:y2, x1:x2], out


def resize(image: Tensor, target: Target, size: tuple[int, int]) -> tuple[Tensor, Target]:
    """Warp to (out_h, out_w) ignoring the aspect ratio (as SSD does), bilinear with antialias.

    Works on uint8 directly (torchvision's native uint8 path). Boxes (N, 4) xyxy pixels are scaled
    to the output's pixels.
    """
    height, width = image.shape[-2:]
    out_h, out_w = size
    if (height, width) != (out_h, out_w):
        image = F.resize(
            image, [out_h, out_w], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    boxes = target["boxes"]
    sx, sy = out_w / width, out_h / height
    return image, _with_boxes(target, boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype))


def _rgb_to_hcv(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(3, H, W) float RGB (any scale) -> hue*6 in [0, 6), chroma C = max - min, value V = max.

    Chroma instead of saturation (S = C / V) saves a division both ways, and the formulas are
    scale-free, so the image stays in 0..255 units. The sextant is picked with float 0/1 masks
    from ``sign`` instead of ``max(dim=0)`` indices or bool ``where``: on CPU those are 2x (where)
    to 10x (argmax over the channel dim) slower than this whole function.
    """
    r, g, b = image.unbind(0)
    value = torch.maximum(torch.maximum(r, g), b)  # (H, W)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    # 1 where the channel is the maximum (V - x >= 0, so sign is 0 or 1); ties go to R, then G,
    # and at ties either formula gives the same hue.
    is_r = 1 - torch.sign(value - r)
    is_g = (1 - torch.sign(value - g)) * (1 - is_r)
    is_b = 1 - is_r - is_g
    # Grey pixels (C = 0) get hue 0 (numerators are 0 there).
    hue6 = (is_r * (g - b) + is_g * (b - r) + is_b * (r - g)) / chroma.clamp_min(1e-6)
    hue6 = hue6 + 2 * is_g + 4 * is_b
    return _mod6(hue6), chroma, value


def _mod6(x: Tensor) -> Tensor:
    """x mod 6 in [0, 6) (floor-based; faster than ``%`` on CPU)."""
    return x - 6 * torch.floor(x * (1 / 6))


def _hcv_to_rgb(hue6: Tensor, chroma: Tensor, value: Tensor) -> Tensor:
    """Inverse of :func:`_rgb_to_hcv` by the closed-form HSV -> RGB: channel (R, G, B) =
    V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6 and n = 5, 3, 1. -> (3, H, W)."""
    # (3, 1, ..., 1) on hue6's device: also works for a batch laid out channel-first, (3, B, H, W)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hue6.dtype, device=hue6.device).view(3, *[1] * hue6.ndim)
    k = _mod6(n + hue6)  # (3, H, W)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def photometric_distort(
    image: Tensor,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: float | None = None,
    contrast_first: bool = True,
) -> Tensor:
    """The reference's colour ops with fixed parameters; None skips an op.

    Order as in ssd.pytorch ``PhotometricDistort``: brightness, then either (contrast, saturation,
    hue) or (saturation, hue, contrast). Values saturate to [0, 255] after every op as in the
    Caffe reference (which works on 8-bit images); the result is rounded once at the end.

    Args:
        image: uint8 (3, H, W) RGB.
        brightness: added to every pixel, in 0..255 units.
        contrast: every pixel multiplied by it (the reference scales; no blend with a mean).
        saturation: HSV saturation multiplied by it.
        hue: HSV hue shifted by it, in degrees.
    Returns:
        uint8 (3, H, W); ``image`` itself when every op is None.
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"photometric_distort expects a uint8 image, got {image.dtype}")
    if brightness is None and contrast is None and saturation is None and hue is None:
        return image
    x = image.to(torch.float32)  # a new tensor: the in-place ops below never touch ``image``
    if brightness is not None:
        x = x.add_(brightness).clamp_(0, 255)
    if contrast is not None and contrast_first:
        x = x.mul_(contrast).clamp_(0, 255)
    if hue is not None:
        h6, c, v = _rgb_to_hcv(x)
        if saturation is not None:
            # S = C / V, so scaling S and saturating it at 1 is scaling C and capping it at V.
            c = torch.minimum(c * saturation, v)
        x = _hcv_to_rgb(h6 + hue / 60.0, c, v).clamp_(0, 255)
    elif saturation is not None:
        # Saturation alone keeps H and V, and every channel is V - C * (a function of H), so
        # the channels' distances to V scale with C: no hue needed (about twice as fast).
        r, g, b = x.unbind(0)
        v = torch.maximum(torch.maximum(r, g), b)
        c = v - torch.minimum(torch.minimum(r, g), b)
        gain = torch.minimum(c * saturation, v) / c.clamp_min(1e-6)
        x = (v - (v - x) * gain).clamp_(0, 255)
    if contrast is not None and not contrast_first:
        x = x.mul_(contrast).clamp_(0, 255)
    return x.round_().to(torch.uint8)


# --------------------------------------------------------------------------------------------
# random transforms (the paper's policy, scaled by strength)


class RandomTransform:
    """Base of the random transforms: holds ``strength`` and the optional generator."""

    def __init__(self, strength: float = 1.0, *, generator: torch.Generator | None = None) -> None:
        self.strength = _check_strength(strength)
        self.generator = generator

    def _rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) float32 draws from this transform's generator (global RNG if None)."""
        return torch.rand(*shape, generator=self.generator)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength})"


class PhotometricDistort(RandomTransform):
    """Random brightness, contrast, saturation and hue (the paper's "photo-metric distortions").

    At strength 1, as ssd.pytorch / the Caffe reference: each op with probability 0.5;
    brightness delta U(-32, 32); contrast U(0.5, 1.5); saturation U(0.5, 1.5); hue delta
    U(-18, 18) degrees; contrast before or after the HSV ops with probability 0.5 each.
    ssd.pytorch's extra random channel swap is left out, as in the Caffe SSD recipe
    (``random_order_prob: 0``).

    Strength s: each probability is 0.5 s; the deltas are scaled by s and the factor ranges
    shrink to [1 - 0.5 s, 1 + 0.5 s]. The target is unchanged.
    """

    def __init__(
        self,
        strength: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        p: float = 0.5,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
    ) -> None:
        super().__init__(strength, generator=generator)
        s = self.strength
        self.p = p * s
        self.brightness_delta = brightness_delta * s
        self.contrast_range = (1 - (1 - contrast_range[0]) * s, 1 + (contrast_range[1] - 1) * s)
        self.saturation_range = (
            1 - (1 - saturation_range[0]) * s, 1 + (saturation_range[1] - 1) * s
        )
        self.hue_delta = hue_delta * s

    def sample(self) -> dict[str, Any]:
        """One draw of :func:`photometric_distort`'s keyword arguments (None: op skipped)."""
        u = self._rand(9).tolist()  # 4 gates, 4 magnitudes, 1 order
        p = self.p

        def uniform(lo: float, hi: float, t: float) -> float:
            return lo + (hi - lo) * t

        d, (clo, chi), (slo, shi), hd = (
            self.brightness_delta, self.contrast_range, self.saturation_range, self.hue_delta
        )
        return {
            "brightness": uniform(-d, d, u[1]) if u[0] < p else None,
            "contrast": uniform(clo, chi, u[3]) if u[2] < p else None,
            "saturation": uniform(slo, shi, u[5]) if u[4] < p else None,
            "hue": uniform(-hd, hd, u[7]) if u[6] < p else None,
            "contrast_first": u[8] < 0.5,
        }

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return photometric_distort(image, **self.sample()), target


class Expand(RandomTransform):
    """Zoom out: place the image at a random spot of a canvas ``ratio`` times larger per side,
    filled with the mean colour (paper section 3.6: "zoom out", up to 16x the area).

    At strength 1: probability 0.5, ratio U(1, 4), as ssd.pytorch ``Expand``. Strength s:
    probability 0.5 s, ratio U(1, 1 + 3 s). Boxes (N, 4) xyxy pixels are shifted by the offset.
    """

    def __init__(
        self,
        strength: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        p: float = 0.5,
        max_ratio: float = 4.0,
        fill: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        super().__init__(strength, generator=generator)
        self.p = p * self.strength
        self.max_ratio = 1 + (max_ratio - 1) * self.strength
        # The fill is the mean colour so that it normalises to ~0, as the reference's.
        self.fill = tuple(round(255 * float(m)) for m in fill)

    def sample(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """One draw for a (height, width) image: (canvas_h, canvas_w, top, left), or None."""
        gate, r, ty, tx = self._rand(4).tolist()
        if gate >= self.p:
            return None
        ratio = 1 + (self.max_ratio - 1) * r
        canvas_h, canvas_w = int(height * ratio), int(width * ratio)
        top, left = int((canvas_h - height) * ty), int((canvas_w - width) * tx)
        return canvas_h, canvas_w, top, left

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        drawn = self.sample(*image.shape[-2:])
        if drawn is None:
            return image, target
        canvas_h, canvas_w, top, left = drawn
        return expand(image, target, (canvas_h, canvas_w), top, left, self.fill)


#: ``ZoomOut`` is the paper's name for :class:`Expand` (torchvision v2 calls it RandomZoomOut).
ZoomOut = Expand


class IoUCrop(RandomTransform):
    """The paper's patch sampling (section 2.2), ssd.pytorch's ``RandomSampleCrop``.

    Options, as the Caffe reference's batch samplers: the whole image; a patch whose IoU with some
    object is at least 0.1, 0.3, 0.5, 0.7 or 0.9; or any patch. A patch has sides U(0.3, 1) of the
    image's and aspect h/w in [0.5, 2]. A patch is valid only if some box's centre lies inside it
    and, for a min-IoU option, one of those boxes reaches the IoU. Each option gets up to 50
    tries; as in Caffe, the option is drawn uniformly among those that found a patch (the whole
    image always does), which is also ssd.pytorch's "retry another option" loop in distribution,
    but bounded. With no boxes nothing can satisfy a constraint and the image is kept whole.

    All tries of all options are drawn at once and tested with one (K, T, N) IoU, no Python loop.

    Strength s: the sampler runs with probability s (otherwise the whole image), and the minimum
    patch side is 1 - 0.7 s of the image's.
    """

    #: None = the whole image; 0.0 = any patch (centre constraint only).
    DEFAULT_OPTIONS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)

    def __init__(
        self,
        strength: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        options: Sequence[float | None] = DEFAULT_OPTIONS,
        min_scale: float = 0.3,
        aspect_range: tuple[float, float] = (0.5, 2.0),
        trials: int = 50,
    ) -> None:
        super().__init__(strength, generator=generator)
        self.options = tuple(options)
        self.min_ious = [o for o in self.options if o is not None]
        self.whole = None in self.options
        self.min_scale = 1 - (1 - min_scale) * self.strength
        self.aspect_range = aspect_range
        self.trials = trials

    def sample_rects(
        self, boxes: Tensor, height: int, width: int, min_ious: Sequence[float]
    ) -> tuple[Tensor, Tensor]:
        """Try ``trials`` random patches for each min IoU at once.

        Args:
            boxes: (N, 4) xyxy pixels.
            min_ious: K thresholds (0 = any patch holding a box centre).
        Returns:
            rects (K, 4) int64 xyxy pixels, half-open (the first valid try of each option), and
            found (K,) bool; a row of ``rects`` means nothing where ``found`` is False.
        """
        k, t = len(min_ious), self.trials
        u = self._rand(k, t, 4).to(boxes.dtype)  # (K, T, 4): w, h, left, top
        lo = self.min_scale
        w = width * (lo + (1 - lo) * u[..., 0])  # (K, T)
        h = height * (lo + (1 - lo) * u[..., 1])
        left = ((width - w) * u[..., 2]).floor()
        top = ((height - h) * u[..., 3]).floor()
        # Integer pixels, as the reference's int(left), int(left + w).
        rects = torch.stack((left, top, (left + w).floor(), (top + h).floor()), dim=-1)
        aspect = h / w
        ok = (aspect >= self.aspect_range[0]) & (aspect <= self.aspect_range[1])
        ok &= (rects[..., 2] > rects[..., 0]) & (rects[..., 3] > rects[..., 1])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
        inside = (
            (centres > rects[..., None, :2]) & (centres < rects[..., None, 2:])
        ).all(dim=-1)  # (K, T, N)
        iou = box_iou(rects, boxes)  # (K, T, N)
        thresholds = torch.tensor(min_ious, dtype=iou.dtype).view(k, 1, 1)
        ok &= (inside & (iou >= thresholds)).any(dim=-1)  # (K, T)
        first = ok.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum
        return rects[torch.arange(k), first].to(torch.int64), ok.any(dim=1)

    def sample_rect(
        self, boxes: Tensor, height: int, width: int, min_iou: float
    ) -> Tensor | None:
        """One option: (4,) int64 xyxy patch in pixels, or None if ``trials`` tries all failed."""
        rects, found = self.sample_rects(boxes, height, width, [min_iou])
        return rects[0] if bool(found[0]) else None

    def sample(self, boxes: Tensor, height: int, width: int) -> Tensor | None:
        """One draw for a (height, width) image with ``boxes`` (N, 4) xyxy pixels: the patch
        (4,) int64 xyxy pixels, half-open, or None for the whole image."""
        gate, pick = self._rand(2).tolist()
        if gate >= self.strength or boxes.shape[0] == 0 or not self.min_ious:
            return None
        rects, found = self.sample_rects(boxes, height, width, self.min_ious)
        # Choose uniformly among the options that succeeded (at most 7: not a loop over boxes).
        candidates: list[Tensor | None] = [None] if self.whole else []
        candidates += [rect for rect, ok in zip(rects, found.tolist(), strict=True) if ok]
        if not candidates:
            return None
        return candidates[int(pick * len(candidates))]

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        rect = self.sample(target["boxes"], *image.shape[-2:])
        if rect is None:
            return image, target
        return crop(image, target, rect)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, options={self.options})"


class HorizontalFlip(RandomTransform):
    """Mirror left-right with probability 0.5 s (0.5 at strength 1, as the reference)."""

    def __init__(
        self, strength: float = 1.0, *, generator: torch.Generator | None = None, p: float = 0.5
    ) -> None:
        super().__init__(strength, generator=generator)
        self.p = p * self.strength

    def sample(self) -> bool:
        """One draw: mirror or not."""
        return self._rand(1).item() < self.p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if not self.sample():
            return image, target
        return hflip(image, target)


# --------------------------------------------------------------------------------------------
# one image's random draws, shared by the CPU path and the device path (ssd.device_augment)


@dataclass(frozen=True)
class AugmentParams:
    """Every random draw of one image's SSD augmentation (small, picklable: loader workers send it).

    Attributes:
        height, width: the input image's size the draws were made for.
        brightness, contrast, saturation, hue, contrast_first: :func:`photometric_distort`'s
            arguments (None: that op is off).
        expand: zoom-out ``(canvas_h, canvas_w, top, left)`` (the image pasted at (top, left) on a
            mean-colour canvas), or None.
        crop: the IoU crop ``(x1, y1, x2, y2)``, integer pixels of the canvas (of the image when
            ``expand`` is None), half-open; None keeps the whole canvas.
        flip: mirror left-right after the crop.
    """

    height: int
    width: int
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    contrast_first: bool = True
    expand: tuple[int, int, int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    flip: bool = False

    def photometric(self) -> dict[str, Any]:
        """Keyword arguments of :func:`photometric_distort`."""
        return {"brightness": self.brightness, "contrast": self.contrast, "saturation": self.saturation,
                "hue": self.hue, "contrast_first": self.contrast_first}

    def region(self) -> tuple[int, int, int, int, int, int]:
        """The geometry as one map: ``(x1, y1, x2, y2, left, top)``: the output shows the half-open
        rectangle x1..x2, y1..y2 of the canvas (before the flip), in which the image sits at
        (left, top); canvas pixels outside the image are the fill colour."""
        if self.expand is None:
            canvas_h, canvas_w, top, left = self.height, self.width, 0, 0
        else:
            canvas_h, canvas_w, top, left = self.expand
        x1, y1, x2, y2 = self.crop if self.crop is not None else (0, 0, canvas_w, canvas_h)
        return x1, y1, x2, y2, left, top


def sample_augment_params(
    height: int, width: int, boxes: Tensor, strength: float = 1.0, *,
    generator: torch.Generator | None = None,
) -> AugmentParams:
    """Draw one image's augmentation: photometric, zoom-out, min-IoU crop, flip, in this order.

    The one sampler of both paths: the CPU transform (:class:`SSDAugment`, ``build_transform``)
    and the device path (loader workers draw, ``ssd.device_augment`` applies) call it, so
    the distributions are the same by construction. The draws are those of the individual
    transforms (``PhotometricDistort``, ``Expand``, ``IoUCrop``, ``HorizontalFlip``) chained, in
    the same order from the same generator, so the result is bit for bit the old chain's.

    Args:
        height, width: the input image's size (no pixels are needed).
        boxes: (N, 4) float xyxy absolute pixels of the input image (the crop's IoU rule).
        strength: 0..1, as ``build_transform``.
        generator: as ``build_transform`` (None: torch's global RNG).
    """
    photometric = PhotometricDistort(strength, generator=generator).sample()
    expanded = Expand(strength, generator=generator).sample(height, width)
    canvas_h, canvas_w = height, width
    if expanded is not None:
        canvas_h, canvas_w, top, left = expanded
        # the same float op as ``expand``, so the crop's IoU sees the boxes the CPU chain sees
        boxes = boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)
    rect = IoUCrop(strength, generator=generator).sample(boxes, canvas_h, canvas_w)
    flip = HorizontalFlip(strength, generator=generator).sample()
    return AugmentParams(
        height, width, **photometric, expand=expanded,
        crop=None if rect is None else tuple(int(v) for v in rect.tolist()), flip=flip,
    )


def apply_augment_params(
    image: Tensor, target: Target, params: AugmentParams, fill: Sequence[int]
) -> tuple[Tensor, Target]:
    """The CPU path: photometric -> expand -> crop -> flip with fixed ``params`` (uint8 in and out).

    Args:
        image: uint8 (3, H, W) with (H, W) = (params.height, params.width).
        target: boxes (N, 4) xyxy pixels; returned in pixels of the (cropped) canvas.
        fill: the zoom-out colour, 0..255 per channel.
    """
    if tuple(image.shape[-2:]) != (params.height, params.width):
        raise ValueError(f"params drawn for {params.height}x{params.width}, image is {tuple(image.shape[-2:])}")
    image = photometric_distort(image, **params.photometric())
    if params.expand is not None:
        canvas_h, canvas_w, top, left = params.expand
        image, target = expand(image, target, (canvas_h, canvas_w), top, left, fill)
    if params.crop is not None:
        image, target = crop(image, target, params.crop)
    if params.flip:
        image, target = hflip(image, target)
    return image, target


def mean_fill(mean: Sequence[float] = IMAGENET_MEAN) -> tuple[int, ...]:
    """The zoom-out fill in 0..255 units: the mean colour, so that it normalises to ~0."""
    return tuple(round(255 * float(m)) for m in mean)


class SSDAugment(RandomTransform):
    """The paper's random steps in one transform: :func:`sample_augment_params` then
    :func:`apply_augment_params`; the same output, for a seed, as chaining ``PhotometricDistort``,
    ``Expand``, ``IoUCrop`` and ``HorizontalFlip`` on one generator."""

    def __init__(
        self, strength: float = 1.0, *, generator: torch.Generator | None = None,
        fill: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        super().__init__(strength, generator=generator)
        self.fill = mean_fill(fill)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        return apply_augment_params(image, target, self.draw(height, width, target), self.fill)

    def draw(self, height: int, width: int, target: Target) -> AugmentParams:
        """The random draws of ``__call__`` on an image of this size, without its pixels: a
        resumed run passes over the samples it already trained on this way (``ssd.data.streaming``)."""
        return sample_augment_params(height, width, target["boxes"], self.strength, generator=self.generator)


# --------------------------------------------------------------------------------------------
# deterministic finishing steps


class Resize:
    """Warp to (size, size) (or (h, w)), bilinear with antialias; boxes scaled, still pixels."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return resize(image, target, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class SanitizeBoxes:
    """Clip boxes to the image, then drop those narrower or shorter than ``min_size`` pixels
    (and non-finite ones) with their per-object entries.

    Placed after :class:`Resize`, so ``min_size`` is in output pixels: 1 px of a 300 x 300 input
    is 1/300 in [0, 1]. Such boxes would otherwise become huge ``log(w / prior_w)`` targets.
    """

    def __init__(self, min_size: float = 1.0) -> None:
        self.min_size = min_size

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        boxes = target["boxes"]
        clipped = clip_boxes(boxes, height, width)
        wh = clipped[:, 2:] - clipped[:, :2]  # (N, 2)
        keep = (wh >= self.min_size).all(dim=1) & torch.isfinite(boxes).all(dim=1)
        out = _select(target, keep)
        out["boxes"] = clipped[keep]
        return image, out

    def __repr__(self) -> str:
        return f"SanitizeBoxes(min_size={self.min_size})"


class ToRelativeBoxes:
    """Boxes (N, 4) xyxy pixels -> float32 xyxy in [0, 1] of the current image."""

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        boxes = target["boxes"].to(torch.float32)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, _with_boxes(target, boxes / scale)

    def __repr__(self) -> str:
        return "ToRelativeBoxes()"


#: input conventions (``AugmentConfig.input_convention``) whose network input is BGR
BGR_CONVENTIONS = frozenset({"caffe_bgr"})
_CONVENTIONS = (None, "rgb", "caffe_bgr")


def normalize(
    images: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_convention: str | None = None,
) -> Tensor:
    """uint8 RGB (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` on the images' device.

    ``mean`` / ``std`` are RGB statistics in [0, 1] units whatever the convention. For
    ``input_convention="caffe_bgr"`` the channels are then reversed to BGR: with Caffe's
    statistics (``AugmentConfig.CONVENTIONS``) that is ``x_bgr - (104, 117, 123)`` in 0-255
    units. ``rgb`` or None: RGB order.

    Works on one image or a batch. The trainer calls it on the device when a loader hands over
    uint8 batches (``build_transform(normalize=False)``): 4x less data to move from loader
    workers and to the GPU, and the arithmetic runs where it is cheapest.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if input_convention not in _CONVENTIONS:
        raise ValueError(f"unknown input convention {input_convention!r}: {_CONVENTIONS}")
    shift, scale = _normalize_constants(tuple(mean), tuple(std), input_convention, images.device)
    if input_convention in BGR_CONVENTIONS:
        images = images.flip(-3)
    return images.to(torch.float32).sub_(shift).mul_(scale)


@functools.lru_cache(maxsize=32)
def _normalize_constants(mean: tuple[float, ...], std: tuple[float, ...], input_convention: str | None,
                         device: torch.device) -> tuple[Tensor, Tensor]:
    """(shift, scale), each (3, 1, 1) float32 on ``device``, with ``(x - shift) * scale`` the
    normalisation in 0..255 units. Cached: building them on a GPU every step would be a host to
    device copy, i.e. a wait for the GPU, on every training step."""
    # Folded into one subtract and one multiply in 0..255 units.
    shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
    scale = 1 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255)
    if input_convention in BGR_CONVENTIONS:
        # Statistics computed in float64 so that Caffe's (123, 117, 104) / 255 and 1 / 255 give
        # exactly 123, 117, 104 and 1 in 0..255 units; flipped with the channels.
        shift = (torch.tensor(mean, dtype=torch.float64) * 255).to(torch.float32).flip(0).view(3, 1, 1)
        scale = (1 / (torch.tensor(std, dtype=torch.float64) * 255)).to(torch.float32).flip(0).view(3, 1, 1)
    return shift.to(device), scale.to(device)


class Normalize:
    """uint8 (3, H, W) -> float32 ``(x / 255 - mean) / std``; mean and std in [0, 1] units of
    RGB; BGR channel order out for ``input_convention="caffe_bgr"`` (see :func:`normalize`)."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_convention: str | None = None,
    ) -> None:
        if input_convention not in _CONVENTIONS:
            raise ValueError(f"unknown input convention {input_convention!r}: {_CONVENTIONS}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_convention = input_convention

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if image.dtype != torch.uint8:
            raise TypeError(f"Normalize expects a uint8 image, got {image.dtype}")
        return normalize(image, self.mean, self.std, self.input_convention), target

    def __repr__(self) -> str:
        convention = f", input_convention={self.input_convention!r}" if self.input_convention else ""
        return f"Normalize(mean={self.mean}, std={self.std}{convention})"


class Compose:
    """Apply transforms in order; checks the input sample against the contract first."""

    def __init__(self, transforms: Iterable[TransformFn]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        check_sample(image, target)
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    @property
    def drawable(self) -> bool:
        """Whether ``draw`` can replay this chain's random draws: its only random step is an
        ``SSDAugment`` at the front (``build_transform``'s chains), where it sees the input's size."""
        random_steps = [i for i, t in enumerate(self.transforms) if isinstance(t, RandomTransform)]
        return all(i == 0 and isinstance(self.transforms[i], SSDAugment) for i in random_steps)

    def draw(self, height: int, width: int, target: Target) -> None:
        """Consume exactly the random numbers that ``self(image, target)`` would on an image of
        ``height`` x ``width``, without decoding or touching pixels (see ``drawable``)."""
        if not self.drawable:
            raise TypeError(f"cannot replay the random draws of {self!r} without pixels")
        if self.transforms and isinstance(self.transforms[0], SSDAugment):
            self.transforms[0].draw(height, width, target)

    def __repr__(self) -> str:
        body = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{body}\n])"


def build_transform(
    size: int,
    strength: float = 1.0,
    train: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_convention: str | None = None,
    *,
    generator: torch.Generator | None = None,
    min_size: float = 1.0,
    normalize: bool = True,
) -> Compose:
    """The SSD augmentation preset (train) or resize + normalise (eval).

    The keyword names match ``AugmentConfig``, so
    ``build_transform(300, train=True, **dataclasses.asdict(cfg.augment))`` works.

    Args:
        size: output side S; the image is warped to (3, S, S) as in SSD300 / SSD512.
        strength: 0..1, see the module docstring; ignored when ``train`` is False. At 0 the
            output equals the eval transform's bit for bit.
        mean, std: per-channel RGB statistics in [0, 1] units; the mean is also the zoom-out fill.
        input_convention: the backbone weights' (``AugmentConfig.input_convention``):
            ``caffe_bgr`` makes :class:`Normalize` output BGR; ``rgb`` / None: RGB.
        generator: shared by all random steps (None: torch's global RNG, right for DataLoader
            workers).
        min_size: boxes narrower or shorter than this many output pixels are dropped (in both
            modes, so that strength 0 and eval agree).
        normalize: False leaves the output uint8 for the consumer to normalise (the trainer and
            ``evaluate`` do so on the device for uint8 batches, with the config's mean and std).
    Returns:
        A callable ``(uint8 (3, H, W), target with boxes (N, 4) xyxy pixels)`` ->
        ``(float32 (3, S, S), target with boxes (N', 4) float32 xyxy in [0, 1])`` (uint8
        images when ``normalize`` is False).
    """
    finish: list[TransformFn] = [Resize(size), SanitizeBoxes(min_size), ToRelativeBoxes()]
    if normalize:
        finish.append(Normalize(mean, std, input_convention))
    if not train:
        return Compose(finish)
    strength = _check_strength(strength)
    # one sampler for the CPU and the device path (``sample_augment_params``)
    return Compose([SSDAugment(strength, generator=generator, fill=mean), *finish])
