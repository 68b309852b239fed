"""ssd.transfer (class-by-class head transfer) and the training options it feeds: initial weights
and a frozen backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssd.checkpoint import load_checkpoint
from ssd.config import load_config
from ssd.data.convert import ensure_synthetic_shards
from ssd.models import build_model
from ssd.training import RunOptions, run_training
from ssd.transfer import (
    VOC_TO_COCO,
    IncompatibleModels,
    check_compatible,
    finetune_config,
    initial_state,
    map_classes,
    transfer_weights,
)

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
COCO_SUBSET = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "boat", "bird", "cat",
               "dog", "horse", "sheep", "cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv",
               "kite", "donut"]


def test_every_voc_class_has_its_coco_counterpart():
    labels = map_classes(VOC, COCO_SUBSET)
    assert None not in labels
    pairs = {voc: COCO_SUBSET[label - 1] for voc, label in zip(VOC, labels, strict=True)}
    for voc, coco in VOC_TO_COCO.items():
        assert pairs[voc] == coco
    assert pairs["person"] == "person" and pairs["dog"] == "dog"  # the rest by name


def test_unmatched_classes_and_the_reverse_direction():
    assert map_classes(["Tvmonitor ", "zebra", "kite"], ["kite", "tv"]) == [2, None, 1]
    assert map_classes(["airplane", "couch"], ["sofa", "aeroplane"]) == [2, 1]  # COCO <- VOC


SOURCE = ["airplane", "dog", "tv", "kite"]
TARGET = ["aeroplane", "tvmonitor", "horse", "dog"]
# target label -> source label (0 is the background): horse (3) has no counterpart
EXPECTED = {0: 0, 1: 1, 2: 3, 4: 2}


@pytest.mark.parametrize("preset", ["tiny", "mobilenetv2_ssdlite300"])
def test_class_head_rows_are_copied_exactly_by_mapped_class(preset):
    torch.manual_seed(0)
    source = build_model(load_config(preset, [f"model.num_classes={len(SOURCE) + 1}"])).eval()
    torch.manual_seed(1)
    cfg = load_config(preset, [f"model.num_classes={len(TARGET) + 1}"])
    target = build_model(cfg).eval()
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source.state_dict(), cfg.priors.boxes_per_location(), TARGET, SOURCE)

    assert report.mapped == {"aeroplane": "airplane", "tvmonitor": "tv", "dog": "dog"}
    assert report.fresh == ["horse"]
    src_state, dst_state = source.state_dict(), target.state_dict()
    anchors = cfg.priors.boxes_per_location()
    remapped = 0
    for name, value in dst_state.items():
        level = int(name.split(".")[2]) if name.startswith("head.conf.") else None
        if level is not None and value.ndim > 0 and value.shape[0] == anchors[level] * (len(TARGET) + 1):
            remapped += 1
            a = anchors[level]
            dst = value.reshape(a, len(TARGET) + 1, -1)
            src = src_state[name].reshape(a, len(SOURCE) + 1, -1)
            for t, s in EXPECTED.items():
                assert torch.equal(dst[:, t], src[:, s]), (name, t)
            assert torch.equal(dst[:, 3], fresh[name].reshape(a, len(TARGET) + 1, -1)[:, 3])  # horse: fresh
        else:
            assert torch.equal(value, src_state[name]), name
    assert remapped == report.remapped == 2 * len(anchors)  # weight + bias per level

    # The same through the networks: a mapped class's logits are its source class's logits,
    # and the boxes are the source's boxes (this also checks the head's channel layout).
    images = torch.randn(2, 3, cfg.priors.image_size, cfg.priors.image_size)
    with torch.no_grad():
        loc_s, logits_s = source(images)
        loc_t, logits_t = target(images)
    torch.testing.assert_close(loc_t, loc_s)
    for t, s in EXPECTED.items():
        torch.testing.assert_close(logits_t[..., t], logits_s[..., s])


def test_incompatible_priors_or_architectures_are_refused():
    tiny = load_config("tiny", ["model.num_classes=5"])
    fewer_boxes = load_config("tiny", ["model.num_classes=5", "priors.extra_box=false"])
    with pytest.raises(IncompatibleModels, match=r"boxes per location \(4, 6, 6, 4, 4\).*vs \(3, 5, 5, 3, 3\)"):
        check_compatible(tiny, fewer_boxes)
    with pytest.raises(IncompatibleModels, match="architecture 'tiny' vs 'mobilenetv2_ssdlite'"):
        check_compatible(tiny, load_config("mobilenetv2_ssdlite300", ["model.num_classes=5"]))
    other_ratios = load_config("tiny", ["model.num_classes=5", "priors.aspect_ratios=[[3],[2,4],[2,3],[3],[3]]"])
    warnings = check_compatible(tiny, other_ratios)  # same count, other shapes: usable, but said
    assert len(warnings) == 1 and "aspect ratios differ" in warnings[0]
    assert check_compatible(tiny, load_config("tiny", ["model.num_classes=9"])) == []


def test_a_finetune_keeps_the_sources_model_and_priors_and_takes_the_rest_from_its_base():
    source = load_config("tiny", ["model.num_classes=81", "priors.s_min=0.15", "optim.lr=0.3",
                                  "train.eval_every=10", "model.backbone_weights=/weights.pth"])
    cfg = finetune_config(source, load_config("tiny"), ["optim.momentum=0.8"], num_classes=21)
    assert cfg.priors == source.priors and cfg.priors.s_min == 0.15  # what the weights were trained for
    assert cfg.model.num_classes == 21 and cfg.model.backbone_weights is None and cfg.model.arch == "tiny"
    assert (cfg.optim.lr, cfg.train.eval_every, cfg.optim.momentum) == (0.05, "auto", 0.8)  # the base's, then overrides
    alone = finetune_config(source, None, [], num_classes=21)  # no base: the source's training settings
    assert (alone.optim.lr, alone.train.eval_every) == (0.3, 10)


def test_initial_state_keeps_a_scratch_runs_fresh_rows():
    source_cfg = load_config("tiny", [f"model.num_classes={len(SOURCE) + 1}"])
    source = build_model(source_cfg)
    cfg = load_config("tiny", [f"model.num_classes={len(TARGET) + 1}", "train.seed=3"])
    state, report, warnings = initial_state(cfg, TARGET, source.state_dict(), source_cfg, SOURCE)
    torch.manual_seed(3)
    scratch = build_model(cfg).state_dict()
    name = "head.conf.0.weight"
    a = cfg.priors.boxes_per_location()[0]
    horse = 3
    assert torch.equal(state[name].reshape(a, 5, -1)[:, horse], scratch[name].reshape(a, 5, -1)[:, horse])
    assert report.fresh == ["horse"] and warnings == []


# --- the training options: initial weights and a frozen backbone -----------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", 32, 8, log=lambda _: None)


def _train(shards: Path, tmp_path: Path, overrides: list[str], **kwargs) -> list[Path]:
    cfg = load_config("tiny", ["model.num_classes=7", "train.batch_size=8", "optim.warmup_iters=1",
                               "train.eval_every=100", *overrides])
    saved: list[Path] = []

    def report(metrics, save):
        if save is not None:
            saved.append(save(tmp_path / f"epoch-{metrics['epoch']}"))

    options = RunOptions(train_data=str(shards / "train"), val_data=str(shards / "val"), log_every=100,
                         sample_images=0)
    run_training(cfg, options, report=report, **kwargs)
    return saved


def test_a_run_starts_from_the_initial_state(shards, tmp_path):
    cfg = load_config("tiny", ["model.num_classes=7"])
    torch.manual_seed(42)
    model = build_model(cfg)
    init = model.state_dict()
    # lr 0 and no weight decay: the parameters stay exactly where the run started (a run from
    # scratch starts elsewhere: seed 0)
    saved = _train(shards, tmp_path, ["train.epochs=1", "optim.lr=0", "optim.weight_decay=0"], init_state=init)
    final = load_checkpoint(saved[-1]).model
    assert all(torch.equal(final[k], init[k]) for k, _ in model.named_parameters())


def test_the_backbone_is_frozen_for_the_first_epochs_then_trains(shards, tmp_path):
    cfg = load_config("tiny", ["model.num_classes=7"])
    torch.manual_seed(0)
    start = build_model(cfg).state_dict()
    saved = _train(shards, tmp_path, ["train.epochs=2", "train.freeze_backbone_epochs=1"])
    first, second = load_checkpoint(saved[0]).model, load_checkpoint(saved[1]).model
    backbone = [k for k in start if k.startswith("features.backbone.")]
    others = [k for k in start if not k.startswith("features.backbone.") and start[k].is_floating_point()]
    # frozen: weights AND BatchNorm running statistics unchanged during epoch 1
    assert all(torch.equal(first[k], start[k]) for k in backbone)
    assert any(k.endswith("running_mean") for k in backbone)
    assert sum(not torch.equal(first[k], start[k]) for k in others) > len(others) // 2
    # thawed in epoch 2
    assert all(not torch.equal(second[k], first[k]) for k in backbone if k.endswith(("weight", "running_mean")))


def test_a_negative_freeze_is_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="freeze_backbone_epochs must be >= 0"):
        _train(shards, tmp_path, ["train.epochs=1", "train.freeze_backbone_epochs=-1"])
