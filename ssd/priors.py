"""Prior (default) boxes from a declarative, serialisable spec.

SSD (Liu et al. 2016, section 2.2 "Choosing scales and aspect ratios for default boxes") tiles
every feature map of size f_k with boxes centred at ((j + 0.5) * step_k, (i + 0.5) * step_k).
At level k the boxes have scale s_k and aspect ratios a in {1, r, 1/r for r in ratios_k}, plus an
extra square box of scale sqrt(s_k * s_{k+1}). Scales either come from explicit per-level
``min_sizes`` / ``max_sizes`` in pixels (the reference Caffe and ssd.pytorch numbers) or from the
paper's linear rule ``s_k = s_min + (s_max - s_min) (k - 1) / (m - 1)``.

Order of the generated priors (the heads' output order must match): level by level, row-major over
the cells of a level (row i outer, column j inner), and within a cell: the s_k square box, the
extra sqrt(s_k * s_{k+1}) square box, then for each ratio r the (r, 1/r) pair. This is the order
of the Caffe reference, ssd.pytorch and torchvision's ``DefaultBoxGenerator``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ssd.fields import Bool, Int, Maybe, Num, Seq, Str, check_fields, show


class PriorSpecError(ValueError):
    """A prior spec that cannot be built; the message names the offending field."""


def _tuple(value: Any) -> Any:
    """Lists from YAML/JSON become tuples so the frozen spec stays hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


@dataclass(frozen=True)
class PriorSpec:
    """Declarative description of the prior boxes of an SSD.

    Attributes:
        image_size: side of the square network input in pixels (300 for SSD300).
        feature_maps: side of each source feature map, e.g. (38, 19, 10, 5, 3, 1).
        aspect_ratios: per level, the ratios r > 0 (r != 1) that add an (r, 1/r) pair of boxes.
        steps: per level, the distance in input pixels between neighbouring prior centres;
            ``None`` means ``image_size / feature_map``.
        min_sizes: per level, the s_k box side in input pixels; ``None`` uses the linear rule.
        max_sizes: per level, s_{k+1} in pixels for the extra box; required with ``min_sizes``
            when ``extra_box`` is on.
        s_min, s_max: the linear rule's smallest and largest scale (fractions of the input).
        first_level_scale: if set, the first level uses this scale and the linear rule spans the
            remaining levels (the paper's SSD300 gives conv4_3 the scale 0.1, section 3.1).
        extra_box: add the sqrt(s_k * s_{k+1}) square box at every level.
        clip: clamp all four generated values (cx, cy, w, h) to [0, 1], as ssd.pytorch does.
            torchvision clamps only (w, h), which leaves centres such as SSD300's 10x10 level's
            last column (9.5 * 32 / 300 = 1.013) outside the image.
    """

    image_size: int
    feature_maps: tuple[int, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    steps: tuple[float, ...] | None = None
    min_sizes: tuple[float, ...] | None = None
    max_sizes: tuple[float, ...] | None = None
    s_min: float = 0.2
    s_max: float = 0.9
    first_level_scale: float | None = None
    extra_box: bool = True
    clip: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for name in ("feature_maps", "aspect_ratios", "steps", "min_sizes", "max_sizes"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        # Each field on its own (type and range), then what only fields together can break.
        # Scales are fractions of the input side: at most 1, a box as large as the image.
        sizes = Maybe(Seq(Num("> 0")))
        check_fields(
            self, "priors", PriorSpecError,
            image_size=Int(">= 1"),
            feature_maps=Seq(Int(">= 1"), nonempty=True),
            aspect_ratios=Seq(Seq(Num("> 0"))),
            steps=sizes,
            min_sizes=sizes,
            max_sizes=sizes,
            s_min=Num("(0, 1]"),
            s_max=Num("(0, 1]"),
            first_level_scale=Maybe(Num("(0, 1]")),
            extra_box=Bool(),
            clip=Bool(),
            name=Str(),
        )
        levels = len(self.feature_maps)
        for name in ("aspect_ratios", "steps", "min_sizes", "max_sizes"):
            value = getattr(self, name)
            if value is not None and len(value) != levels:
                raise PriorSpecError(
                    f"priors.{name} must have one entry per level of priors.feature_maps "
                    f"({levels}), got {len(value)}: {show(value)}"
                )
        for level, ratios in enumerate(self.aspect_ratios):
            if 1 in ratios:
                raise PriorSpecError(
                    f"priors.aspect_ratios[{level}] must hold ratios > 0 other than 1 "
                    f"(1 is always present), got {show(ratios)}"
                )
        if self.min_sizes is None:
            if self.max_sizes is not None:
                raise PriorSpecError(
                    f"priors.max_sizes must be null when priors.min_sizes is null, "
                    f"got {show(self.max_sizes)}"
                )
            if not self.s_min < self.s_max:
                raise PriorSpecError(
                    f"priors.s_min must be < priors.s_max ({self.s_max!r}), got {self.s_min!r}"
                )
            if self.first_level_scale is not None and levels < 3:
                raise PriorSpecError(
                    f"priors.first_level_scale must be null with fewer than 3 levels ({levels}), "
                    f"got {self.first_level_scale!r}"
                )
        else:
            if self.extra_box and self.max_sizes is None:
                raise PriorSpecError(
                    "priors.max_sizes must be a list of numbers > 0 when priors.extra_box is on, "
                    "got None"
                )
            if self.max_sizes is not None and any(
                mx <= mn for mn, mx in zip(self.min_sizes, self.max_sizes)
            ):
                raise PriorSpecError(
                    f"priors.max_sizes must exceed priors.min_sizes level by level, got "
                    f"max_sizes={show(self.max_sizes)}, "
                    f"min_sizes={show(self.min_sizes)}"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def num_levels(self) -> int:
        return len(self.feature_maps)

    def boxes_per_location(self) -> tuple[int, ...]:
        """Number of priors per feature-map cell at each level (the heads' anchor count)."""
        return tuple(1 + int(self.extra_box) + 2 * len(r) for r in self.aspect_ratios)

    def num_priors(self) -> int:
        return sum(f * f * n for f, n in zip(self.feature_maps, self.boxes_per_location()))

    def level_steps(self) -> tuple[float, ...]:
        if self.steps is not None:
            return tuple(float(s) for s in self.steps)
        return tuple(self.image_size / f for f in self.feature_maps)

    def scales(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-level (s_k, s_{k+1}) as fractions of the input size.

        With the linear rule, s_{m+1} extends the line by one more step, so the last level's extra
        box is larger than s_max, as in the paper's reference implementation.
        """
        if self.min_sizes is not None:
            lows = tuple(s / self.image_size for s in self.min_sizes)
            if self.max_sizes is None:
                return lows, lows
            return lows, tuple(s / self.image_size for s in self.max_sizes)
        levels = self.num_levels
        linear_levels = levels - 1 if self.first_level_scale is not None else levels
        step = (self.s_max - self.s_min) / max(linear_levels - 1, 1)
        linear = [self.s_min + step * k for k in range(linear_levels + 1)]  # one past the end
        if self.first_level_scale is not None:
            linear = [self.first_level_scale, *linear]
        return tuple(linear[:levels]), tuple(linear[1 : levels + 1])

    # ------------------------------------------------------------------ generation
    def generate(self, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """All priors as a (P, 4) tensor of (cx, cy, w, h) in [0, 1] of the network input."""
        lows, highs = self.scales()
        levels = []
        for f, step, s_k, s_next, ratios in zip(
            self.feature_maps, self.level_steps(), lows, highs, self.aspect_ratios
        ):
            # Box shapes of one cell, in the documented order: (A, 2) widths/heights.
            shapes = [(s_k, s_k)]
            if self.extra_box:
                extra = math.sqrt(s_k * s_next)
                shapes.append((extra, extra))
            for r in ratios:
                root = math.sqrt(r)
                shapes += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
            wh = torch.tensor(shapes, dtype=torch.float64)  # (A, 2)
            centres_1d = (torch.arange(f, dtype=torch.float64) + 0.5) * step / self.image_size
            cy, cx = torch.meshgrid(centres_1d, centres_1d, indexing="ij")  # row-major cells
            centres = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2)  # (f*f, 1, 2)
            level = torch.cat(
                (centres.expand(-1, len(shapes), 2), wh.expand(f * f, -1, -1)), dim=-1
            )  # (f*f, A, 4)
            levels.append(level.reshape(-1, 4))
        priors = torch.cat(levels)
        if self.clip:
            priors = priors.clamp(0.0, 1.0)
        return priors.to(dtype=dtype, device=device)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, not tuples) that YAML and JSON write and :meth:`from_dict` reads."""

        def plain(value: Any) -> Any:
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PriorSpecError(
                f"unknown PriorSpec field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PriorSpec:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> PriorSpec:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    def replace(self, **changes: Any) -> PriorSpec:
        """A copy with some fields changed (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> PriorSpec:
        """One of the named presets in :data:`PRESETS`."""
        try:
            return PRESETS[name]
        except KeyError:
            raise PriorSpecError(
                f"unknown prior preset {name!r}; known presets: {sorted(PRESETS)}"
            ) from None


#: the prior layout both MobileNet SSDs at 300 share (six levels from a stride-16 map)
_MOBILENET_300: dict[str, Any] = {
    "image_size": 300,
    "feature_maps": (19, 10, 5, 3, 2, 1),
    "steps": (16, 32, 64, 100, 150, 300),
    "min_sizes": (60, 105, 150, 195, 240, 285),
    "max_sizes": (105, 150, 195, 240, 285, 330),
    "aspect_ratios": ((2, 3),) * 6,
}

# The reference numbers, each from the implementation the paper's results come from.
PRESETS: dict[str, PriorSpec] = {
    # SSD300 (paper section 3.1; Caffe ssd_pascal.py / ssd.pytorch `voc` config): conv4_3 at
    # scale 0.1, then 0.2..0.9 with the Caffe integer-percent step of 17; 8732 priors.
    "ssd300_vgg16": PriorSpec(
        name="ssd300_vgg16",
        image_size=300,
        feature_maps=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(30, 60, 111, 162, 213, 264),
        max_sizes=(60, 111, 162, 213, 264, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    # SSD300 for COCO (paper section 3.4: conv4_3 at 0.07, then 0.15..0.87; Caffe ssd_coco.py,
    # ssd.pytorch's `coco` config, torchvision's ssd300_vgg16 scales): smaller boxes than VOC's.
    "ssd300_vgg16_coco": PriorSpec(
        name="ssd300_vgg16_coco",
        image_size=300,
        feature_maps=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(21, 45, 99, 153, 207, 261),
        max_sizes=(45, 99, 153, 207, 261, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    # SSD512 (Caffe ssd_pascal_512.py): conv4_3 at 0.07, then 0.15..0.9; 24564 priors.
    "ssd512_vgg16": PriorSpec(
        name="ssd512_vgg16",
        image_size=512,
        feature_maps=(64, 32, 16, 8, 4, 2, 1),
        steps=(8, 16, 32, 64, 128, 256, 512),
        min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
        max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    # MobileNetV1-SSD at 300 (the widely used pytorch-ssd reference config): six levels from a
    # stride-16 map, scales 0.2..0.95 of a 300 input, ratios {2, 3} everywhere; 3000 priors.
    "mobilenetv1_ssd300": PriorSpec(name="mobilenetv1_ssd300", **_MOBILENET_300),
    # MobileNetV2-SSDLite at 300 (MobileNetV2 paper, section 6.2, with the same prior layout).
    "mobilenetv2_ssdlite300": PriorSpec(name="mobilenetv2_ssdlite300", **_MOBILENET_300),
    # Tiny: a 128-pixel input with five levels (strides 8..128) for CPU tests and the demo; the
    # paper's linear rule with a small first scale so 10-pixel objects still get a prior.
    "tiny": PriorSpec(
        name="tiny",
        image_size=128,
        feature_maps=(16, 8, 4, 2, 1),
        steps=(8, 16, 32, 64, 128),
        s_min=0.2,
        s_max=0.9,
        first_level_scale=0.1,
        aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)),
    ),
}
