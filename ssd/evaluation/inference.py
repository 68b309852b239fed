"""The model's side of an evaluation: the evaluation transform and batched predictions.

Both are shared by everything that runs a trained model on images it did not train on
(validation during training, scoring, serving), so that they all see the same input and get the
same detections. This module needs no shard reader (no webdataset): serving imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ssd.config import Config
from ssd.engine import network_input, predict
from ssd.transforms import build_transform

__all__ = ["BatchPredictor", "eval_transform"]


def eval_transform(cfg: Config) -> Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]:
    """The evaluation transform: resize to ``cfg.priors.image_size`` only, uint8 out.

    ``min_size=0``: evaluation keeps every annotated object, however small at the network size.
    ``normalize=False``: batches move to the device as bytes and are normalised there
    (:class:`BatchPredictor`), as training does.
    """
    return build_transform(cfg.priors.image_size, 0.0, train=False, min_size=0.0, normalize=False)


class BatchPredictor:
    """Detections for loader batches of ``model``: the network input, the forward pass, decoding.

    Args:
        model: the SSD (already on ``device``); returns (loc (B, P, 4), logits (B, P, C + 1))
            and decodes them with its own box coding (``model.coding``).
        cfg: its config: ``augment`` (mean, std), ``postprocess`` (thresholds, NMS) and
            ``train.channels_last``.
        device: where the network runs.
        amp_dtype: run the network under autocast to this dtype (bf16 on a GPU; None: fp32);
            decoding and NMS always take float32 outputs.
    """

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device | str,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.amp_dtype = amp_dtype
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def __call__(self, images: Tensor, image_sizes: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Detections for a batch (B, 3, S, S) of :func:`eval_transform` output (uint8) or of
        normalised floats: per image ``boxes`` (K, 4) xyxy in pixels of ``image_sizes`` ((B, 2)
        height, width, on ``device``) or in [0, 1] when it is None, ``scores`` (K,), ``labels``
        (K,) in 1..C; on ``device``."""
        batch = network_input(images, self.cfg, self.device, self.memory_format)
        return predict(self.model, batch, self.cfg.postprocess, image_sizes=image_sizes, amp_dtype=self.amp_dtype)
