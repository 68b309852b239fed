"""The box coding round trip: a network that outputs exactly its training targets gets its ground
truth back, through the evaluation path and through serving, for the paper's variances and for
others (training encodes with ``loss.variances``; decoding once used the defaults regardless)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssd.config import load_config
from ssd.engine import predict
from ssd.matching import match_priors
from ssd.serving import Detector

GT = torch.tensor([[0.30, 0.30, 0.70, 0.62]])  # xyxy in [0, 1]


class _Oracle(nn.Module):
    """Outputs the training targets of one image: the encoded box at matched priors, a
    confident class there and background elsewhere."""

    def __init__(self, box_targets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.loc = box_targets  # (1, P, 4)
        self.logits = torch.full((1, labels.shape[1], num_classes), -10.0)
        self.logits.scatter_(2, labels[..., None], 10.0)
        self.anchor = nn.Parameter(torch.zeros(1))  # a module with a device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images.shape[0]
        return self.loc.expand(batch, -1, -1), self.logits.expand(batch, -1, -1)


@pytest.mark.parametrize("variances", [(0.1, 0.2), (0.2, 0.2), (0.05, 0.5)])
def test_targets_decode_back_to_the_ground_truth(variances):
    cfg = load_config("tiny", ["model.num_classes=3", f"loss.variances=[{variances[0]}, {variances[1]}]"])
    priors = cfg.priors.generate()
    labels, box_targets = match_priors(priors, GT[None], torch.tensor([[1]]), torch.tensor([[True]]),
                                       cfg.loss.iou_threshold, cfg.loss.variances)
    assert int((labels > 0).sum()) >= 1
    oracle = _Oracle(box_targets, labels, cfg.model.num_classes)
    size = cfg.priors.image_size

    # the evaluation path (ssd.engine.evaluate and training's sample pictures call predict so)
    images = torch.zeros(1, 3, size, size)
    (det,) = predict(oracle, images, priors, cfg.postprocess, variances=cfg.loss.variances)
    assert det["labels"][0] == 1
    torch.testing.assert_close(det["boxes"][0], GT[0], atol=1e-5, rtol=0)

    # serving: a Detector built with the config decodes with its variances, in original pixels
    detector = Detector(oracle, cfg, ["a", "b"])
    (served,) = detector.predict_tensors([torch.zeros(3, 2 * size, size, dtype=torch.uint8)])  # H = 2 x W
    expected = GT[0] * torch.tensor([size, 2 * size, size, 2 * size])
    torch.testing.assert_close(served["boxes"][0], expected, atol=1e-3, rtol=0)
