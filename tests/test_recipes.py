"""Named recipes (ssd/configs/ssd300_voc0712.yaml ...): what they train, their ``base:`` chain,
the two-stage recipe of pretrain_finetune.py, the recipe block, and evaluation within a time
budget (``train.eval_every=auto``)."""

from types import SimpleNamespace

import pytest

from ssd.config import ConfigError, load_config, read_stages
from ssd.jobs.pretrain_finetune import PipelineRequest
from ssd.priors import PriorSpec
from ssd.schedule import plan_schedule, recipe_deviations, recipe_title
from ssd.train_hooks import NOT_EVALUATED, SCORE, PeriodicEvaluation, Progress, within_budget

VOC0712_TRAINVAL = 16551  # VOC2007 trainval 5011 + VOC2012 trainval 11540
COCO_TRAIN2017 = 117266  # the train2017 images with annotations (torchvision's training set)


@pytest.mark.parametrize("name, arch, priors", [("ssd300_voc0712", "vgg16_ssd300", "ssd300_vgg16"),
                                                ("ssd512_voc0712", "vgg16_ssd512", "ssd512_vgg16")])
def test_the_voc_recipes_are_the_papers(name, arch, priors):
    cfg = load_config(name)
    assert (cfg.recipe.name, cfg.model.arch, cfg.priors, cfg.model.backbone_weights) == (
        name, arch, PriorSpec.preset(priors), "imagenet")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.gamma) == (1e-3, 0.9, 5e-4, 0.1)
    assert (cfg.loss.neg_ratio, cfg.matching.iou_threshold, cfg.matching.variances) == (3.0, 0.5, (0.1, 0.2))
    assert cfg.augment.strength == 1.0 and cfg.augment.input_convention == "rgb"
    plan = plan_schedule(cfg, VOC0712_TRAINVAL, 4)  # 4 GPUs: 8 images each, the paper's 32 in all
    assert (plan.global_batch, plan.per_worker_batch, plan.iterations, plan.lr_drops) == (32, 8, 120000, (80000, 100000))
    assert plan.lr_effective == pytest.approx(1e-3) and plan.iters_per_epoch == 517
    assert "VOC2007 test mAP" in cfg.recipe.expected and "Table 1" in cfg.recipe.reference
    # the architecture preset trains the same recipe (only the recipe's metadata differs)
    preset = load_config(priors).to_dict()
    assert {k: v for k, v in cfg.to_dict().items() if k != "recipe"} == {k: v for k, v in preset.items()
                                                                          if k != "recipe"}


def test_another_global_batch_scales_the_lr_and_the_iterations():
    # Goyal et al.'s rule: 4x the batch, 4x the lr, a quarter of the iterations (the same images)
    cfg = load_config("ssd300_voc0712", ["train.batch_size=128"])
    plan = plan_schedule(cfg, VOC0712_TRAINVAL, 8)
    assert (plan.per_worker_batch, plan.lr_effective, plan.iterations, plan.lr_drops, plan.warmup_iters) == (
        16, pytest.approx(4e-3), 30000, (20000, 25000), 500)
    lines = plan.recipe_lines()
    assert "set by train.max_iters x 32/128 (given for batch 32)" in lines[2]
    assert "4e-3" in lines[3] or "0.004 = 0.001 x 128/32" in lines[3]
    assert recipe_deviations(cfg) == ["train.batch_size=128 (recipe: 32)"]


def test_the_coco_recipe_is_torchvisions():
    cfg = load_config("ssd300_coco")
    assert (cfg.model.num_classes, cfg.priors.name, cfg.optim.lr, cfg.optim.warmup_iters) == (
        81, "ssd300_vgg16_coco", 2e-3, 1000)
    assert cfg.priors.min_sizes == (21, 45, 99, 153, 207, 261)  # scales 0.07, 0.15, 0.33, ... of 300
    plan = plan_schedule(cfg, COCO_TRAIN2017, 8)  # torchvision: 8 GPUs x 4
    assert (plan.per_worker_batch, plan.iters_per_epoch, plan.iterations) == (4, 3664, 120 * 3664)
    assert plan.lr_drops == (80 * 3664, 110 * 3664)  # the first iterations of epochs 81 and 111, as torchvision
    assert "25.1" in cfg.recipe.expected


def test_the_two_stage_recipe_runs_with_pretrain_finetune():
    stages = read_stages("ssd300_coco_to_voc")
    assert "81.2" in stages["recipe"]["expected"]
    with pytest.raises(ConfigError, match="ssd300_coco_to_voc is a two-stage recipe.*pretrain_finetune.py "
                                          "--config ssd300_coco_to_voc"):
        load_config("ssd300_coco_to_voc")
    request = PipelineRequest(config="ssd300_coco_to_voc", pretrain=("optim.lr=0.0005",), finetune=("train.seed=3",))
    (config1, overrides1), (config2, overrides2) = request.stage_configs()
    assert (config1, config2) == ("ssd300_coco", "ssd300_voc0712")
    assert overrides1[-1] == "optim.lr=0.0005" and overrides2[-1] == "train.seed=3"  # the user's come last
    pretrain = load_config(config1, list(overrides1[:-1]))
    plan = plan_schedule(pretrain, COCO_TRAIN2017, 4)
    # the paper's COCO schedule (section 3.4): 1e-3 for 160k, 1e-4 and 1e-5 for 40k each
    assert (plan.iterations, plan.lr_drops, plan.lr_effective) == (240000, (160000, 200000), pytest.approx(1e-3))
    assert pretrain.model.num_classes == 81 and pretrain.recipe.name == "ssd300_coco_to_voc/pretrain"
    assert load_config(config2, list(overrides2)).recipe.name == "ssd300_coco_to_voc/finetune"
    # a one-stage preset: both stages from it, as before
    assert PipelineRequest(config="tiny").stage_configs() == (("tiny", ()), ("tiny", ()))


def test_base_presets_merge_section_by_section(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: ssd300_voc0712\noptim:\n  lr: 0.002\nrecipe:\n  name: mine\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.lr_steps, cfg.train.max_iters, cfg.recipe.name) == (2e-3, (80000, 100000),
                                                                                      120000, "mine")
    assert cfg.recipe.expected == load_config("ssd300_voc0712").recipe.expected  # the rest of the section
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text("base: child.yaml\ntrain:\n  batch_size: 64\n")  # a path relative to the file
    assert (load_config(grandchild).train.batch_size, load_config(grandchild).optim.lr) == (64, 2e-3)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="'base' goes round in a circle: loop.yaml -> loop.yaml"):
        load_config(loop)
    with pytest.raises(ConfigError, match="config 'nope' not found"):
        child.write_text("base: nope\n")
        load_config(child)


def test_the_recipe_block_names_the_recipe_and_what_a_run_changed():
    cfg = load_config("ssd300_voc0712", ["train.eval_every=5", "optim.lr=0.002"])
    assert recipe_title(cfg).startswith("ssd300_voc0712 (expected: VOC2007 test mAP")
    assert recipe_deviations(cfg) == ["optim.lr=0.002 (recipe: 0.001)"]  # eval_every changes nothing trained
    assert recipe_deviations(load_config("tiny")) == [] and recipe_title(load_config("tiny")) is None
    from ssd.training import _recipe_extra

    backbone = SimpleNamespace(source="torchvision VGG16_Weights.IMAGENET1K_V1 (decimated)", sha256="ab" * 32,
                               input_convention="rgb")
    extra = _recipe_extra(cfg, backbone, None, False)
    lines = plan_schedule(cfg, VOC0712_TRAINVAL, 2).recipe_lines(None, recipe_title(cfg), extra)
    assert lines[0] == f"recipe: {recipe_title(cfg)}"
    assert lines[6] == "  weights   torchvision VGG16_Weights.IMAGENET1K_V1 (decimated), sha256 abababababababab, input rgb"
    assert lines[7] == "  eval      every 5 epoch(s) and after the last"
    assert lines[8].startswith("  source    Liu et al. 2016")
    assert lines[9].startswith("  changed   from ssd300_voc0712") and "optim.lr=0.002 (recipe: 0.001)" in lines[9]
    auto = _recipe_extra(load_config("ssd300_voc0712"), None, None, True)
    assert auto[0].startswith("weights   the finetune's initial state")
    assert auto[1].startswith("eval      auto: after an epoch when evaluation stays within 10% of the wall time")


def test_eval_every_takes_auto_or_a_whole_number():
    assert load_config("tiny").train.eval_every == "auto" and load_config("tiny").train.eval_budget == 0.1
    assert load_config("tiny", ["train.eval_every=3"]).train.eval_every == 3
    with pytest.raises(ConfigError, match=r"train.eval_every must be an integer >= 1 or 'auto', got 'sometimes'"):
        load_config("tiny", ["train.eval_every=sometimes"])
    with pytest.raises(ConfigError, match=r"train.eval_budget must be"):
        load_config("tiny", ["train.eval_budget=0"])


def test_within_budget_is_the_share_after_the_evaluation():
    # 90 s training, 0 s evaluated, a 10 s evaluation: 10 / 100 = 10 % <= 10 %
    assert within_budget(90.0, 0.0, 10.0, 0.1)
    assert not within_budget(89.0, 0.0, 10.0, 0.1)  # 10 / 99 > 10 %
    assert within_budget(180.0, 10.0, 10.0, 0.1) and not within_budget(170.0, 10.0, 10.0, 0.1)  # 20/200, 20/190


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _auto_run(epochs: int, epoch_seconds: float, eval_seconds: float, first_eval_ratio: float,
              monkeypatch) -> tuple[list[int], list[float]]:
    """Drive PeriodicEvaluation(auto) through ``epochs`` epochs on a fake clock: the epochs it
    evaluated after, and the evaluation share after each epoch."""
    clock = _Clock()
    monkeypatch.setattr("ssd.train_hooks.time.perf_counter", clock)
    evaluated: list[int] = []

    class Validation:
        classes = ("a",)

        def run(self, model):
            clock.now += eval_seconds
            evaluated.append(loop.epoch_number)
            return SimpleNamespace(metrics={SCORE: 0.5}, coco={}, voc=None)

        def sample(self, model, count):
            return None

    loop = SimpleNamespace(runner=SimpleNamespace(model=object()), epoch_metrics={}, epoch_number=0, last_epoch=False)
    hook = PeriodicEvaluation(Validation(), "auto", NOT_EVALUATED, Progress(epochs, 10, enabled=False), None, 0,
                              budget=0.1, first_eval_ratio=first_eval_ratio)
    hook.loop = loop
    shares = []
    for epoch in range(1, epochs + 1):
        loop.epoch_number, loop.last_epoch, loop.epoch_metrics = epoch, epoch == epochs, {SCORE: NOT_EVALUATED}
        hook.before_epoch()
        clock.now += epoch_seconds
        hook.after_epoch()
        shares.append(loop.epoch_metrics["eval_share"])
        assert loop.epoch_metrics["best_mAP"] == (0.5 if evaluated else NOT_EVALUATED)
    return evaluated, shares


def test_auto_evaluation_keeps_within_the_budget_and_always_scores_the_end(monkeypatch):
    # 10 s epochs, 3 s evaluations, first guess 5 s: by hand, the guess allows the first after
    # epoch 5 (5 <= 0.1 x 55); measured 3 s, then 6 (6 <= 6.6), 9 (9 <= 9.9), 11 (12 <= 12.2),
    # 14 (15 <= 15.5), and the last
    evaluated, shares = _auto_run(15, 10.0, 3.0, 0.5, monkeypatch)
    assert evaluated == [5, 6, 9, 11, 14, 15]
    assert all(share <= 0.1 for share in shares[:-1])
    # an evaluation that costs more than the budget of a whole run: only the final one
    evaluated, _ = _auto_run(6, 10.0, 100.0, 20.0, monkeypatch)
    assert evaluated == [6]


def test_a_prestaged_copy_of_the_weights_is_not_a_change():
    cfg = load_config("ssd300_voc0712", ["model.backbone_weights=s3://bucket/weights/vgg16-397923af.pth"])
    assert recipe_deviations(cfg) == []
    other = load_config("ssd300_voc0712", ["model.backbone_weights=/weights/vgg16_reducedfc.pth"])
    assert recipe_deviations(other) == ["model.backbone_weights='/weights/vgg16_reducedfc.pth' (recipe: 'imagenet')"]


def test_epochs_keep_the_recipes_lr_drops_as_fractions():
    from ssd.jobs.train import TrainRequest, epochs_overrides, train_config

    base = load_config("ssd300_voc0712")
    assert epochs_overrides(12, base) == ["train.max_iters=null", "train.epochs=12", "optim.lr_steps=null",
                                          "optim.milestones=[0.666666667, 0.833333333]"]
    assert epochs_overrides(12, base, ["optim.lr_steps=[5]"]) == ["train.max_iters=null", "train.epochs=12"]
    assert epochs_overrides(12, load_config("tiny")) == ["train.max_iters=null", "train.epochs=12"]
    cfg = train_config(TrainRequest(config="ssd300_voc0712", epochs=12), 21)
    plan = plan_schedule(cfg, 3200, 1)  # 100 iterations an epoch, 1200 in all: drops at 800 and 1000
    assert (plan.iterations, plan.lr_drops) == (1200, (800, 1000))
