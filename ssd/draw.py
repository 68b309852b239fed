"""Draw detections on one image at its own resolution (what ``pipelines/predict.py`` writes).

``ssd.reporting.detection_grid`` tiles small network-size images for evaluation reports; this
draws on a full-size photo instead, so line widths and caption fonts scale with the image.
Images are uint8 (3, H, W) RGB tensors; boxes (K, 4) ``x1, y1, x2, y2`` in pixels of that image;
labels 1..C (``class_names[label - 1]``). Colours: label ``l`` gets ``class_colors(C)[l - 1]``,
the evaluation report's palette while it lasts (so a class has the same colour in both).
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["PALETTE", "class_colors", "draw_detections"]

#: Per-class colours (RGB), label ``l`` gets ``PALETTE[(l - 1) % len(PALETTE)]`` in evaluation
#: reports: matplotlib's tab10 without its green, which is reserved for ground truth
#: (``ssd.reporting.GT_COLOR``).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class: :data:`PALETTE` first, then evenly spaced hues."""
    colors = list(PALETTE[:num_classes])
    extra = num_classes - len(colors)
    for i in range(extra):  # golden-ratio hue steps keep neighbouring labels apart
        r, g, b = colorsys.hsv_to_rgb((0.11 + i * 0.618034) % 1.0, 0.75, 0.95)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # a scalable font with FreeType (Pillow >= 10.1)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _text_color(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 128 else (255, 255, 255)


def draw_detections(
    image: Tensor,
    boxes: Any,
    scores: Any,
    labels: Any,
    class_names: Sequence[str],
    score_threshold: float = 0.0,
) -> Image.Image:
    """The image with a box and a ``"class score"`` caption per detection scoring at least
    ``score_threshold``, as a PIL image of the same size.

    Boxes are drawn lowest score first, so the most confident box and caption end up on top;
    boxes are clamped into the image, captions sit above the box (inside it at the top edge).

    Args:
        image: uint8 (3, H, W) RGB.
        boxes: (K, 4) xyxy pixels of ``image``; scores (K,); labels (K,) int in 1..C.
        class_names: the C class names.
    Raises:
        ValueError: a malformed image, mismatched lengths or a label outside 1..C.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).to(torch.int64)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    bad = sorted({v for v in labels.tolist() if not 1 <= v <= len(class_names)})
    if bad:
        raise ValueError(f"labels must be in 1..{len(class_names)}, got {bad}")

    height, width = image.shape[1:]
    out = Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    keep = sorted((k for k in range(len(scores)) if float(scores[k]) >= score_threshold),
                  key=lambda k: float(scores[k]))
    if not keep:
        return out
    colors = class_colors(len(class_names))
    short = min(height, width)
    line = max(2, round(short / 250))
    font = _font(max(10, round(short / 40)))
    draw = ImageDraw.Draw(out)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    for k in keep:
        x1, y1, x2, y2 = boxes[k].tolist()
        label = int(labels[k])
        color = colors[label - 1]
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        caption = f"{class_names[label - 1]} {float(scores[k]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_w, text_h = right - left + 2 * line, bottom - top + 2 * line
        tx = min(max(x1, 0), max(width - text_w, 0))
        ty = y1 - text_h if y1 - text_h >= 0 else y1  # above the box, else just inside it
        draw.rectangle((tx, ty, tx + text_w, ty + text_h), fill=color)
        draw.text((tx + line - left, ty + line - top), caption, fill=_text_color(color), font=font)
    return out
