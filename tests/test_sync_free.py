"""The training step without host syncs (issue 17): matching, hard negative mining, the loss and
the step never make the host wait for the device; the non-finite guard still stops a run, at
the next log point; the results equal the previous (syncing) implementation's; ``train.compile``
gives the same losses; ``amp=auto`` picks fp16 with a GradScaler on GPUs without bf16."""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ssd.boxes import encode
from ssd.config import load_config
from ssd.data.synthetic import CLASSES, SyntheticDetection
from ssd.engine import MeanMeter, StepRunner, build_optimizer, collate, metrics_to_host
from ssd.loss import MultiBoxLoss, hard_negative_mask
from ssd.matching import assign_max_iou, pad_targets, targets_from_assignment
from ssd.models import build_model
from ssd.train_hooks import Progress, StepProgress
from ssd.train_loop import HookBase, TrainLoop
from ssd.training import amp_dtype_for
from ssd.transforms import build_transform


@pytest.fixture(autouse=True)
def static_matching(monkeypatch):
    """The accelerator's matching and loss paths: on a CPU, matching and the cross-entropy's
    backward take host shortcuts (reading values costs nothing there; tests/test_matching.py and
    tests/test_loss.py check both paths equal), which this module's guard would rightly refuse."""
    from ssd import loss, matching

    monkeypatch.setattr(matching, "HOST_SHORTCUTS_ON_CPU", False)
    monkeypatch.setattr(loss, "HOST_SHORTCUTS_ON_CPU", False)


class HostSync(AssertionError):
    """A device-to-host read on the training path."""


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise HostSync(f"host sync: {name}")

    return refuse


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def no_host_syncs() -> Iterator[None]:
    """Make every way a tensor's value reaches Python raise :class:`HostSync`: ``item``,
    ``tolist``, ``bool`` / ``float`` / ``int`` / ``index`` of a tensor, ``nonzero`` and its
    relatives (data-dependent shapes) and boolean-mask indexing. On a CPU these are not syncs,
    but each one is on a GPU, so a step that passes here makes none there either."""
    patches = {
        (Tensor, name): _refuse(f"Tensor.{name}")
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero",
                     "masked_select", "argwhere", "unique", "numpy")
    }
    patches |= {(torch, name): _refuse(f"torch.{name}")
                for name in ("nonzero", "masked_select", "argwhere", "unique", "unique_consecutive")}
    getitem, setitem = Tensor.__getitem__, Tensor.__setitem__

    def checked_getitem(self, index):
        if _has_bool_index(index):
            raise HostSync("host sync: boolean-mask indexing")
        return getitem(self, index)

    def checked_setitem(self, index, value):
        if _has_bool_index(index):
            raise HostSync("host sync: boolean-mask assignment")
        return setitem(self, index, value)

    patches[(Tensor, "__getitem__")] = checked_getitem
    patches[(Tensor, "__setitem__")] = checked_setitem
    saved = {key: getattr(*key) for key in patches}
    try:
        for (owner, name), fn in patches.items():
            setattr(owner, name, fn)
        yield
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


# --- the implementation before issue 17 (git 9c7a15c), kept as the reference -----------------


def _old_targets_from_assignment(assigned, priors, gt_boxes, gt_labels, variances=(0.1, 0.2)):
    batch, num_priors = assigned.shape
    positive = assigned >= 0
    if gt_labels.shape[1] == 0:
        return gt_labels.new_zeros((batch, num_priors)), priors.new_zeros((batch, num_priors, 4))
    labels = torch.cat((gt_labels.new_zeros((batch, 1)), gt_labels), 1).gather(1, assigned + 1)
    image_idx, prior_idx = positive.nonzero(as_tuple=True)
    matched_boxes = gt_boxes[image_idx, assigned[image_idx, prior_idx]]
    box_targets = priors.new_zeros((batch, num_priors, 4))
    box_targets[image_idx, prior_idx] = encode(matched_boxes.to(priors.dtype), priors[prior_idx], variances)
    return labels, box_targets


def _old_multibox_loss(loc_pred, cls_logits, labels, box_targets, neg_ratio=3.0, loc_weight=1.0):
    positive = labels > 0
    num_pos = positive.sum().clamp(min=1).to(loc_pred.dtype)
    loc_loss = F.smooth_l1_loss(loc_pred[positive].float(), box_targets[positive].float(), reduction="sum", beta=1.0)
    ce = F.cross_entropy(cls_logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    keep = positive | hard_negative_mask(ce, positive, neg_ratio)
    conf_loss = (ce * keep).sum()
    loss_loc, loss_conf = loc_loss / num_pos, conf_loss / num_pos
    return {"loss": loss_conf + loc_weight * loss_loc, "loss_loc": loss_loc, "loss_conf": loss_conf,
            "num_pos": positive.sum().float()}


# --- helpers ----------------------------------------------------------------------------------


def _tiny(overrides=(), images=16, batch=8):
    cfg = load_config("tiny", [f"model.num_classes={len(CLASSES) + 1}", f"train.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    tf = build_transform(cfg.priors.image_size, 1.0, train=True)
    batches = list(torch.utils.data.DataLoader(SyntheticDetection(images, transform=tf), batch_size=batch,
                                               collate_fn=collate))
    model = build_model(cfg)
    return cfg, model, batches


def _random_batch(batch, num_gt, num_priors, seed):
    g = torch.Generator().manual_seed(seed)
    priors = torch.cat((torch.rand(num_priors, 2, generator=g), torch.rand(num_priors, 2, generator=g) * 0.4 + 0.02), 1)
    xy = torch.rand(batch, num_gt, 2, generator=g) * 0.6
    boxes = torch.cat((xy, xy + torch.rand(batch, num_gt, 2, generator=g) * 0.4 + 0.01), -1)
    mask = torch.rand(batch, num_gt, generator=g) > 0.3
    labels = torch.randint(1, 21, (batch, num_gt), generator=g)
    return priors, boxes, labels, mask


# --- the guard itself -------------------------------------------------------------------------


def test_the_guard_catches_each_kind_of_sync_and_restores_torch():
    x, mask = torch.arange(6.0), torch.arange(6) > 2
    for sync in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: float(x[0]),
                 lambda: x.nonzero(), lambda: torch.nonzero(mask), lambda: x[mask],
                 lambda: x.__setitem__(mask, 0.0), lambda: int(x[1])):
        with no_host_syncs(), pytest.raises(HostSync):
            sync()
    assert x[mask].tolist() == [3.0, 4.0, 5.0] and (x > 1).any()  # everything restored


# --- no syncs ----------------------------------------------------------------------------------


def test_matching_and_loss_make_no_host_sync():
    priors, boxes, labels, mask = _random_batch(4, 6, 500, seed=1)
    loc = torch.randn(4, 500, 4, requires_grad=True)
    logits = torch.randn(4, 500, 21, requires_grad=True)
    with no_host_syncs():
        assigned = assign_max_iou(priors, boxes, mask, 0.5)
        target_labels, box_targets = targets_from_assignment(assigned, priors, boxes, labels)
        losses = MultiBoxLoss(3.0)(loc, logits, target_labels, box_targets)
        losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and loc.grad is not None


@pytest.mark.parametrize("overrides", [(), ("optim.grad_clip=1.0",)])
def test_a_training_step_makes_no_host_sync(overrides):
    cfg, model, batches = _tiny(overrides)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5)
    runner = StepRunner(model, cfg, optimizer, scheduler)
    meter = MeanMeter()
    for images, targets in batches:
        with no_host_syncs():
            metrics = runner.step(images, targets)
            meter.add(metrics, images.shape[0])
    assert {k for k, v in metrics.items() if isinstance(v, Tensor)} == {"loss", "loss_loc", "loss_conf", "num_pos"}
    assert all(not v.requires_grad for v in metrics.values() if isinstance(v, Tensor))
    assert isinstance(metrics["lr"], float)
    runner.check_finite()  # a sync, at a log point: fine
    means = meter.means()
    assert means["steps"] == 2 and all(isinstance(means[k], float) for k in ("loss", "loss_loc", "lr"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_makes_no_cuda_sync():
    cfg, model, batches = _tiny()
    device = torch.device("cuda", 0)
    model = model.to(device)
    runner = StepRunner(model, cfg, build_optimizer(model, cfg.optim), device=device)
    runner.step(*batches[0])  # warm-up: lazy initialisation (cuDNN, allocator) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = runner.step(*batches[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["loss"].device.type == "cuda"
    runner.check_finite()


# --- equal to the previous implementation ------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 3, 8732), (8, 40, 2000), (3, 5, 17)])
def test_targets_are_bit_equal_to_the_nonzero_implementation(shape):
    priors, boxes, labels, mask = _random_batch(*shape, seed=sum(shape))
    assigned = assign_max_iou(priors, boxes, mask, 0.5)
    want = _old_targets_from_assignment(assigned, priors, boxes, labels)
    got = targets_from_assignment(assigned, priors, boxes, labels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_targets_of_real_batches_are_bit_equal():
    _cfg, model, batches = _tiny(images=16)
    priors = model.coding.priors(torch.device("cpu"))
    for _, targets in batches:
        boxes, labels, mask = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets])
        assigned = model.coding.matcher(priors, boxes, mask)
        want = _old_targets_from_assignment(assigned, priors, boxes, labels)
        got = model.coding.targets(boxes, labels, mask)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("neg_ratio", [3.0, 0.5])
def test_loss_and_gradients_equal_the_masked_indexing_implementation(neg_ratio):
    priors, boxes, labels, mask = _random_batch(4, 6, 3000, seed=7)
    target_labels, box_targets = targets_from_assignment(assign_max_iou(priors, boxes, mask), priors, boxes, labels)
    g = torch.Generator().manual_seed(3)
    loc0, logits0 = torch.randn(4, 3000, 4, generator=g), torch.randn(4, 3000, 21, generator=g)
    results = []
    for fn in (_old_multibox_loss, lambda *a: MultiBoxLoss(neg_ratio, 1.5)(*a)):
        loc, logits = loc0.clone().requires_grad_(), logits0.clone().requires_grad_()
        if fn is _old_multibox_loss:
            losses = fn(loc, logits, target_labels, box_targets, neg_ratio, 1.5)
        else:
            losses = fn(loc, logits, target_labels, box_targets)
        losses["loss"].backward()
        results.append((losses, loc.grad, logits.grad))
    (want, want_loc, want_logits), (got, got_loc, got_logits) = results
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_loc, want_loc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)


def test_mean_meter_sums_on_the_device_and_reads_once():
    meter = MeanMeter()
    for value in (1.0, 2.0, 4.5):
        meter.add({"loss": torch.tensor(value), "lr": 0.1}, images=2)
    means = meter.means()
    assert means["loss"] == pytest.approx(2.5) and means["lr"] == pytest.approx(0.1)
    assert means["steps"] == 3 and means["images"] == 6
    assert metrics_to_host({"a": torch.tensor(1.5), "b": 2.0}) == {"a": 1.5, "b": 2.0}


# --- the non-finite guard ----------------------------------------------------------------------


class _Record(HookBase):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.epochs = 0

    def after_step(self) -> None:
        self.steps.append(self.loop.step)

    def after_epoch(self) -> None:
        self.epochs += 1


def _poisoned(batches, at: int):
    """The batches with a NaN pixel in batch ``at`` (0-based): that step's loss is NaN."""
    out = []
    for i, (images, targets) in enumerate(batches):
        if i == at:
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        out.append((images, targets))
    return out


def test_a_non_finite_loss_raises_at_the_next_log_point():
    cfg, model, batches = _tiny(images=12, batch=2)  # 6 steps
    runner = StepRunner(model, cfg, build_optimizer(model, cfg.optim))
    record = _Record()
    progress = StepProgress(Progress(1, 6, enabled=False), log_every=2, global_batch=2, tracker=None)
    loop = TrainLoop(runner, _poisoned(batches, at=2), [progress, record], steps_per_epoch=6)
    with pytest.raises(FloatingPointError) as err:
        loop.train(0, 1)
    # iteration 2 (step 3) went bad; the log point after step 4 found it; no epoch end ran
    assert record.steps == [1, 2, 3] and record.epochs == 0
    message = str(err.value)
    assert "non-finite loss nan at iteration 2 " in message
    assert "found by the check of iterations 2..3" in message
    assert "lower optim.lr, raise optim.warmup_iters or set optim.grad_clip" in message


def test_a_non_finite_loss_raises_before_the_epoch_hooks_without_log_points():
    cfg, model, batches = _tiny(images=8, batch=2)  # 4 steps
    runner = StepRunner(model, cfg, build_optimizer(model, cfg.optim))
    record = _Record()
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at iteration 1 .*iterations 0\.\.3"):
        TrainLoop(runner, _poisoned(batches, at=1), [record], steps_per_epoch=4).train(0, 1)
    assert record.steps == [1, 2, 3, 4] and record.epochs == 0  # no evaluation or checkpoint of NaN weights


def test_a_diverging_lr_is_caught():
    cfg, model, batches = _tiny(["optim.lr=1e6", "optim.warmup_iters=0"], images=16, batch=2)
    runner = StepRunner(model, cfg, build_optimizer(model, cfg.optim))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        runner.train_epoch(batches)


# --- torch.compile -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_step_gives_the_same_losses():
    """Each step from the same weights and optimizer state: the same losses and the same update.
    Steps are compared one at a time: compiled kernels round differently (~1e-7), and hard
    negative mining is discontinuous, so a near-tied negative can flip. Free-running, such flips
    compound (CI once saw 8e-4 relative in the third step's loss); from the same state they move
    an update by 0.2-0.3 % of its norm (measured), a wrong gradient by far more."""
    runners = {}
    for compiled in (False, True):
        cfg, model, batches = _tiny([f"train.compile={str(compiled).lower()}"], images=12, batch=4)
        runners[compiled] = StepRunner(model, cfg, build_optimizer(model, cfg.optim))
        assert runners[compiled].compile is compiled
    eager, compiled = runners[False], runners[True]
    for images, targets in batches:
        compiled.model.load_state_dict(eager.model.state_dict())
        # a deep copy: load_state_dict would share the momentum buffers, which both steps update
        compiled.optimizer.load_state_dict(copy.deepcopy(eager.optimizer.state_dict()))
        before = [p.detach().clone() for p in eager.model.parameters()]
        want = eager.step(images, targets)
        got = compiled.step(images, targets)
        for key in ("loss", "loss_loc", "loss_conf", "num_pos"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
        update = {name: torch.cat([(p.detach() - b).flatten() for p, b in zip(runner.model.parameters(), before)])
                  for name, runner in (("eager", eager), ("compiled", compiled))}
        assert update["eager"].norm() > 0
        assert (update["compiled"] - update["eager"]).norm() <= 1e-2 * update["eager"].norm()


# --- precision choice --------------------------------------------------------------------------


def test_amp_auto_is_fp16_with_a_scaler_on_gpus_without_bf16(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    seen = []

    def bf16(including_emulation=True):
        seen.append(including_emulation)
        return including_emulation  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert amp_dtype_for("auto", cuda) == torch.float16
    assert seen == [False]  # emulated bf16 (slow) does not count
    with pytest.raises(ValueError, match="V100 has no bf16 support"):
        amp_dtype_for("bf16", cuda)
    assert amp_dtype_for("none", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype_for("auto", cuda) == torch.bfloat16 and amp_dtype_for("bf16", cuda) == torch.bfloat16


def test_fp16_steps_use_a_grad_scaler():
    cfg, model, batches = _tiny(["optim.grad_clip=5.0"], images=4, batch=2)
    runner = StepRunner(model, cfg, build_optimizer(model, cfg.optim), amp_dtype=torch.float16)
    assert isinstance(runner.scaler, torch.amp.GradScaler)
    assert StepRunner(model, cfg, build_optimizer(model, cfg.optim), amp_dtype=torch.bfloat16).scaler is None
    for images, targets in batches:
        runner.step(images, targets)
    runner.check_finite()
    assert runner.iteration == 2 and "scale" in runner.scaler.state_dict()


def test_the_checkpoint_report_saves_the_fp16_scaler():
    from types import SimpleNamespace

    from ssd.train_hooks import CheckpointReport

    cfg, model, _ = _tiny(images=2, batch=2)
    optimizer = build_optimizer(model, cfg.optim)
    runner = StepRunner(model, cfg, optimizer, amp_dtype=torch.float16)
    saves = []
    hook = CheckpointReport(lambda metrics, save: saves.append(save), cfg, list(CLASSES), optimizer, None, {})
    hook.loop = SimpleNamespace(runner=runner, epoch_number=1, epoch_metrics={"loss": 1.0})
    hook.after_epoch()
    # the host copy that save writes into training.pt
    assert saves[0].keywords["state"].training["scaler"] == runner.scaler.state_dict()
