import pytest
import torch

from ssd.config import OptimConfig, load_config
from ssd.data.synthetic import CLASSES, SyntheticDetection
from ssd.engine import (
    StepRunner,
    build_optimizer,
    build_scheduler,
    collate,
    lr_factor,
    network_input,
)
from ssd.models import build_model
from ssd.transforms import build_transform


def test_lr_schedule_hand_computed():
    cfg = OptimConfig(warmup_iters=4, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    factors = [lr_factor(cfg, i, 100) for i in (0, 3, 4, 49, 50, 74, 75, 99)]
    assert factors == pytest.approx([0.2, 0.8, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    cos = OptimConfig(warmup_iters=0, schedule="cosine")
    assert lr_factor(cos, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(OptimConfig(schedule="linear", warmup_iters=0), 1, 10)


def _tiny_setup(overrides=(), images=16, strength=0.0):
    cfg = load_config("tiny", [f"model.num_classes={len(CLASSES) + 1}", "train.batch_size=8", *overrides])
    torch.manual_seed(0)
    tf = build_transform(cfg.priors.image_size, strength, train=True)
    batches = list(torch.utils.data.DataLoader(SyntheticDetection(images, transform=tf), batch_size=8, collate_fn=collate))
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    return cfg, model, optimizer, batches


@pytest.mark.slow
def test_tiny_end_to_end_loss_falls():
    cfg, model, optimizer, batches = _tiny_setup(["optim.warmup_iters=5", "optim.lr=0.01"])
    trainer = StepRunner(model, cfg, optimizer, build_scheduler(optimizer, cfg.optim, 60), "cpu")
    first = trainer.train_epoch(batches)["loss"]
    for _ in range(28):
        last = trainer.train_epoch(batches)["loss"]
    assert trainer.iteration == 58
    assert last < 0.6 * first, (first, last)


def test_non_finite_loss_stops_with_a_clear_error():
    cfg, model, optimizer, batches = _tiny_setup()
    images, targets = batches[0]
    images = images.clone()
    images[0, 0, 0, 0] = float("nan")
    runner = StepRunner(model, cfg, optimizer)
    runner.step(images, targets)  # no host sync in the step: the loss is checked at log points
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at iteration 0 .*lower optim.lr"):
        runner.check_finite()


def test_uint8_batches_are_normalised_on_the_device_like_in_the_workers():
    cfg = load_config("tiny", [f"model.num_classes={len(CLASSES) + 1}"])
    size = cfg.priors.image_size
    data = SyntheticDetection(4, transform=build_transform(size, 0.0, train=False, normalize=False))
    ref = SyntheticDetection(4, transform=build_transform(size, 0.0, train=False))
    raw, _ = collate([data[i] for i in range(4)])
    want, _ = collate([ref[i] for i in range(4)])
    assert raw.dtype == torch.uint8 and want.dtype == torch.float32
    got = network_input(raw, cfg, torch.device("cpu"), torch.channels_last)
    assert torch.allclose(got, want, atol=1e-5) and got.is_contiguous(memory_format=torch.channels_last)
    assert network_input(want, cfg, torch.device("cpu"), torch.contiguous_format) is want  # float: as is
