"""The box coding of one SSD: its priors, the box coder and the matcher, owned by one object.

Training encodes targets and inference decodes outputs with the same variances only if both read
them from the same place; :class:`BoxCoding` is that place (as torchvision's ``SSD.box_coder``).
``build_model`` attaches one to every SSD (``model.coding``); the step, evaluation, serving and
prior analysis take priors, coder and matcher from it and never generate priors themselves::

    coding = model.coding
    labels, box_targets = coding.targets(gt_boxes, gt_labels, gt_mask)   # training
    detections = coding.detect(loc, logits, params, image_sizes)          # inference

The config section ``matching`` (:class:`MatchingConfig`) chooses the strategy (a class registered
in ``ssd.matching.MATCHERS``), its IoU threshold and the variances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssd.boxes import DEFAULT_VARIANCES, decode, encode
from ssd.fields import Num, OneOf, Seq, check_fields
from ssd.matching import MATCHERS, targets_from_assignment
from ssd.postprocess import PostprocessConfig, postprocess
from ssd.priors import PriorSpec


@dataclass(frozen=True)
class MatchingConfig:
    """How priors are assigned to ground truth and how boxes are encoded (paper section 2.2)."""

    #: a matcher registered in ``ssd.matching.MATCHERS``; "max_iou" is the paper's
    strategy: str = "max_iou"
    #: IoU at or above which a prior matches a ground-truth box (the forced best match per box
    #: applies regardless)
    iou_threshold: float = 0.5
    #: (centre, size) variances of the box encoding (the paper's reference code: 0.1, 0.2)
    variances: tuple[float, float] = DEFAULT_VARIANCES

    def __post_init__(self) -> None:
        from ssd.config import ConfigError  # ssd.config imports this module

        check_fields(
            self, "matching", ConfigError,
            strategy=OneOf(tuple(MATCHERS)),
            # 0 would match every prior to some box (padding included); 1 only exact copies
            iou_threshold=Num("(0, 1]"),
            variances=Seq(Num("> 0"), length=2),  # the encoding divides by them
        )


@dataclass(frozen=True)
class BoxCoder:
    """SSD's offsets with variances (paper eq. 2): ``ssd.boxes.encode`` / ``decode``."""

    variances: tuple[float, float] = DEFAULT_VARIANCES

    def encode(self, boxes: Tensor, priors: Tensor) -> Tensor:
        """(..., P, 4) xyxy boxes -> (..., P, 4) offsets from the (P, 4) cxcywh priors."""
        return encode(boxes, priors, self.variances)

    def decode(self, offsets: Tensor, priors: Tensor) -> Tensor:
        """(..., P, 4) offsets -> (..., P, 4) xyxy boxes in the priors' units."""
        return decode(offsets, priors, self.variances)


class BoxCoding:
    """The priors of a prior spec with the box coder and matcher that go with them.

    Priors are generated once (on the CPU) and cached per device, so every user of one model
    shares one tensor per device.
    """

    def __init__(self, spec: PriorSpec, matching: MatchingConfig | None = None) -> None:
        self.spec = spec
        self.matching = matching or MatchingConfig()
        self.coder = BoxCoder(tuple(self.matching.variances))
        self.matcher = MATCHERS[self.matching.strategy](self.matching)
        self._priors: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> BoxCoding:
        return cls(cfg.priors, cfg.matching)

    @property
    def num_priors(self) -> int:
        return self.spec.num_priors()

    def priors(self, device: torch.device | str = "cpu") -> Tensor:
        """(P, 4) cxcywh in [0, 1], row p aligned with the model's output row p."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._priors:
            cpu = self._priors.get(torch.device("cpu"))
            if cpu is None:
                cpu = self._priors[torch.device("cpu")] = self.spec.generate()
            self._priors[device] = cpu.to(device)
        return self._priors[device]

    def targets(self, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Training targets of a padded batch (``ssd.matching.pad_targets``), on its device.

        Returns:
            labels (B, P) int64 (0: background) and box_targets (B, P, 4) encoded offsets.
        """
        priors = self.priors(gt_boxes.device)
        assigned = self.matcher(priors, gt_boxes, gt_mask)
        return targets_from_assignment(assigned, priors, gt_boxes, gt_labels, self.coder.variances)

    def detect(
        self,
        loc: Tensor,
        logits: Tensor,
        params: PostprocessConfig | None = None,
        image_sizes: Tensor | list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Network outputs (B, P, 4), (B, P, C) -> per-image detections (``ssd.postprocess``),
        decoded with this coding's priors and variances."""
        return postprocess(loc, logits, self.priors(loc.device), params, image_sizes=image_sizes,
                           variances=self.coder.variances)

    def __repr__(self) -> str:
        return (f"BoxCoding({self.spec.name!r}, {self.num_priors} priors, {self.matching.strategy}, "
                f"iou>={self.matching.iou_threshold}, variances={self.coder.variances})")
