"""The box coding round trip: a network that outputs exactly its training targets gets its ground
truth back, through the evaluation path and through serving, for the paper's variances and for
others (training encodes with ``matching.variances``; decoding once used the defaults regardless).
Both sides take the coding from the model (``model.coding``), the one owner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssd.config import load_config
from ssd.engine import StepRunner, build_optimizer, predict
from ssd.matching import pad_targets
from ssd.models import build_model
from ssd.serving import Detector

GT = torch.tensor([[0.30, 0.30, 0.70, 0.62]])  # xyxy in [0, 1]


class _Oracle(nn.Module):
    """Outputs the training targets of one image: the encoded box at matched priors, a
    confident class there and background elsewhere."""

    def __init__(self, coding, box_targets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.coding = coding
        self.loc = box_targets  # (1, P, 4)
        self.logits = torch.full((1, labels.shape[1], num_classes), -10.0)
        self.logits.scatter_(2, labels[..., None], 10.0)
        self.anchor = nn.Parameter(torch.zeros(1))  # a module with a device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images.shape[0]
        return self.loc.expand(batch, -1, -1), self.logits.expand(batch, -1, -1)


@pytest.mark.parametrize("variances", [(0.1, 0.2), (0.2, 0.2), (0.05, 0.5)])
def test_targets_decode_back_to_the_ground_truth(variances):
    cfg = load_config("tiny", ["model.num_classes=3", f"matching.variances=[{variances[0]}, {variances[1]}]"])
    model = build_model(cfg)
    assert model.coding.coder.variances == variances
    # training: the step's targets come from the model's coding
    trainer = StepRunner(model, cfg, build_optimizer(model, cfg.optim))
    labels, box_targets = trainer.coding.targets(*pad_targets([GT], [torch.tensor([1])]))
    assert int((labels > 0).sum()) >= 1
    oracle = _Oracle(model.coding, box_targets, labels, cfg.model.num_classes)
    size = cfg.priors.image_size

    # the evaluation path (ssd.evaluation and training's sample pictures call predict so)
    images = torch.zeros(1, 3, size, size)
    (det,) = predict(oracle, images, cfg.postprocess)
    assert det["labels"][0] == 1
    torch.testing.assert_close(det["boxes"][0], GT[0], atol=1e-5, rtol=0)

    # serving: a Detector built with the config decodes with its variances, in original pixels
    detector = Detector(oracle, cfg, ["a", "b"])
    (served,) = detector.predict_tensors([torch.zeros(3, 2 * size, size, dtype=torch.uint8)])  # H = 2 x W
    expected = GT[0] * torch.tensor([size, 2 * size, size, 2 * size])
    torch.testing.assert_close(served["boxes"][0], expected, atol=1e-3, rtol=0)


def test_a_served_checkpoint_decodes_with_its_own_variances(tmp_path):
    from ssd.checkpoint import save_checkpoint

    cfg = load_config("tiny", ["model.num_classes=3", "matching.variances=[0.2, 0.3]"])
    save_checkpoint(tmp_path / "ckpt", model=build_model(cfg), epoch=1, step=1, config=cfg, classes=["a", "b"])
    detector = Detector.from_checkpoint(tmp_path / "ckpt")
    assert detector.model.coding.coder.variances == (0.2, 0.3)


def test_a_matching_strategy_is_one_class_and_a_config_value(monkeypatch):
    """A new assigner registered in ssd.matching is selectable by config and drives the step."""
    from ssd import matching

    calls = []

    class EveryPriorToTheFirstBox:
        def __init__(self, cfg) -> None:
            self.cfg = cfg

        def __call__(self, priors, gt_boxes, gt_mask):
            calls.append(priors.shape[0])
            return torch.where(gt_mask[:, :1], 0, -1).expand(gt_mask.shape[0], priors.shape[0])

    monkeypatch.setitem(matching.MATCHERS, "first_box", EveryPriorToTheFirstBox)
    cfg = load_config("tiny", ["model.num_classes=3", "matching.strategy=first_box", "train.batch_size=2"])
    model = build_model(cfg)
    labels, box_targets = model.coding.targets(*pad_targets([GT, GT], [torch.tensor([2]), torch.tensor([1])]))
    assert labels[0].eq(2).all() and labels[1].eq(1).all()
    priors = model.coding.priors()
    torch.testing.assert_close(box_targets[1], model.coding.coder.encode(GT.expand(len(priors), 4), priors))
    trainer = StepRunner(model, cfg, build_optimizer(model, cfg.optim))
    size = cfg.priors.image_size
    trainer.step(torch.zeros(2, 3, size, size), [{"boxes": GT, "labels": torch.tensor([1])}] * 2)
    assert calls[-1] == cfg.priors.num_priors()
