"""A procedural detection dataset: coloured shapes on textured backgrounds.

It is the default data of the demo and the tests, so it must need no download and be learnable by
the tiny model in CPU minutes, yet not be trivial: six shape classes in random colours (colour
does not give the class away), sizes from 7% to 60% of the image's short side, textured
backgrounds with distractor stripes, and partial occlusion (objects drawn later cover earlier
ones; the box is the visible extent, and mostly hidden objects are not annotated).

Everything is a pure function of ``(seed, index)``, so any worker can render any sample. Split
``s`` of a dataset with seed ``seed`` is ``render_sample(i, seed + SPLIT_SEED_OFFSETS[s])``.

:mod:`ssd.data.synthetic_layouts` writes the dataset to disk in the real PASCAL VOC and MS-COCO
layouts (``write_voc``, ``write_coco``), so the real readers read it. The dependency is one-way:
that module imports this one, never the reverse.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")

#: an object whose visible part is below this fraction of its drawn area is not annotated
MIN_VISIBLE_FRACTION = 0.4

#: split ``s`` of a dataset with seed ``seed`` renders ``render_sample(i, seed + offset[s])``
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "val": 10_000, "test": 20_000}


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: a colour gradient, coarse noise blobs, pixel noise and a few stripes."""
    base = rng.uniform(40, 215, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    ys = np.linspace(-0.5, 0.5, height)[:, None, None]
    xs = np.linspace(-0.5, 0.5, width)[None, :, None]
    image = base + ys * slope[0] + xs * slope[1]
    # Smooth texture: low-resolution noise upsampled bilinearly (hard-edged blocks would look like
    # the "square" class and teach the model to ignore edges).
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(128, 22, size=(cells, cells, 3)).clip(0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float64)
    image = image + smooth - 128
    image = image + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring_points(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(start + 2 * math.pi * k / n), cy + radius * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if kind == "square":
        return ring_points(4, r * math.sqrt(2), angle + math.pi / 4)
    if kind == "triangle":
        return ring_points(3, r * 1.15, angle - math.pi / 2)
    if kind == "diamond":  # a rhombus: elongated along one axis
        return [(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)]
    raise ValueError(kind)


def _shape_extent(
    kind: str, cx: float, cy: float, r: float, angle: float
) -> tuple[float, float, float, float]:
    """Continuous (x1, y1, x2, y2) extent of the shape ``_draw_object`` draws, before clipping."""
    if kind in ("circle", "ring", "cross"):
        return cx - r, cy - r, cx + r, cy + r
    xs, ys = zip(*_shape_polygon(kind, cx, cy, r, angle))
    return min(xs), min(ys), max(xs), max(ys)


def _draw_object(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill: int) -> None:
    """Draw one shape of class ``kind`` with value ``fill`` (into an 'L' mask)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif kind == "cross":
        t = r * 0.35
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, r, angle), fill=fill)


def render_sample(
    index: int, seed: int = 0, min_size: int = 128, max_size: int = 256, max_objects: int = 6
) -> tuple[Tensor, dict[str, Tensor]]:
    """Render sample ``index`` of the dataset with ``seed``.

    Returns:
        image: (3, H, W) uint8 RGB with H, W in [min_size, max_size].
        target: ``boxes`` (N, 4) float32 xyxy absolute pixels (continuous: a box covering pixel
            columns 3..7 is x1=3, x2=8), ``labels`` (N,) int64 in 1..len(CLASSES), and
            ``truncated`` (N,) bool: the drawn shape extends beyond the image border (VOC's
            meaning), judged from the shape's exact outline (on 4,000 random shapes this agreed
            with rasterising it on a padded canvas every time). The box is the visible extent
            either way; occlusion by other objects does not count as truncation.
    """
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = _background(rng, height, width)

    # Distractor stripes: straight bars of random colour that are not objects.
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 6)))
    image = np.asarray(canvas).copy()

    # Objects: an id map records which object owns each pixel, for occlusion-aware boxes.
    owner = np.zeros((height, width), dtype=np.int16)
    classes: list[int] = []
    drawn_area: list[int] = []
    truncated: list[bool] = []
    short_side = min(height, width)
    for obj in range(1, int(rng.integers(1, max_objects + 1)) + 1):
        kind_index = int(rng.integers(len(CLASSES)))
        # Log-uniform radius relative to the image (many small objects, some large ones): the
        # diameter spans 7% to 60% of the short side, so at any input size the smallest objects
        # stay near the smallest prior (10% of the input for the tiny preset).
        r = float(np.exp(rng.uniform(math.log(short_side * 0.035), math.log(short_side * 0.3))))
        cx = float(rng.uniform(0, width))
        cy = float(rng.uniform(0, height))
        angle = float(rng.uniform(0, 2 * math.pi))
        mask_image = Image.new("L", (width, height), 0)
        _draw_object(ImageDraw.Draw(mask_image), CLASSES[kind_index], cx, cy, r, angle, 255)
        mask = np.asarray(mask_image) > 0
        if not mask.any():
            continue
        colour = rng.integers(0, 256, 3)
        # Shading so shapes are not flat fills: brightness varies across the object.
        shade = 0.75 + 0.5 * (np.linspace(0, 1, width)[None, :] if rng.random() < 0.5 else np.linspace(0, 1, height)[:, None])
        shaded = np.clip(colour[None, None, :] * np.broadcast_to(shade, (height, width))[..., None], 0, 255)
        image[mask] = shaded[mask].astype(np.uint8)
        owner[mask] = obj
        classes.append(kind_index + 1)
        drawn_area.append(int(mask.sum()))
        x1, y1, x2, y2 = _shape_extent(CLASSES[kind_index], cx, cy, r, angle)
        truncated.append(x1 < 0 or y1 < 0 or x2 > width or y2 > height)

    boxes, labels, flags = [], [], []
    for obj, (label, area, cut) in enumerate(zip(classes, drawn_area, truncated), start=1):
        visible = owner == obj
        count = int(visible.sum())
        if count < MIN_VISIBLE_FRACTION * area or count < 12:
            continue
        ys, xs = np.nonzero(visible)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(label)
        flags.append(cut)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "truncated": torch.tensor(flags, dtype=torch.bool),
    }
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target


class SyntheticDetection(torch.utils.data.Dataset):
    """``num_images`` rendered samples, optionally passed through a paired transform.

    ``cache=True`` renders every sample once up front (about 7 ms each) and keeps the uint8
    images in memory, so epochs after the first cost only the transform.

    Targets hold ``render_sample``'s ``boxes``, ``labels`` and ``truncated``, plus ``image_id``
    and ``orig_size``.
    """

    classes = CLASSES

    def __init__(self, num_images: int, seed: int = 0, transform=None, cache: bool = False) -> None:
        self.num_images = num_images
        self.seed = seed
        self.transform = transform
        self._cache = [self._render(i) for i in range(num_images)] if cache else None

    def _render(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = render_sample(index, self.seed)
        target["image_id"] = torch.tensor(index)
        target["orig_size"] = torch.tensor(image.shape[1:])  # (H, W)
        return image, target

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        image, target = self._cache[index] if self._cache is not None else self._render(index)
        if self.transform is not None:
            image, target = self.transform(image, dict(target))  # transforms return new dicts
        return image, target

