import dataclasses

import pytest
import yaml

from ssd.coding import MatchingConfig
from ssd.config import (
    _SECTIONS,
    CONFIG_DIR,
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    config_from_dict,
    load_config,
    read_stages,
)
from ssd.models import ARCHITECTURES
from ssd.postprocess import PostprocessConfig
from ssd.priors import PriorSpec

#: the one-stage presets (two-stage pipeline recipes are tested in tests/test_recipes.py)
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if read_stages(p) is None)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name):
    cfg = load_config(name)
    assert isinstance(cfg.priors, PriorSpec)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_preset_names_its_prior_spec():
    cfg = load_config("ssd300_vgg16")
    assert cfg.priors == PriorSpec.preset("ssd300_vgg16")
    assert cfg.model.arch == "vgg16_ssd300"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("tiny", ["optim.lr=0.05", "loss.neg_ratio=2", "priors.aspect_ratios=[[2],[2],[2],[2],[2]]"])
    assert cfg.optim.lr == 0.05
    assert cfg.loss.neg_ratio == 2
    assert cfg.priors.boxes_per_location() == (4,) * 5


def test_linear_rule_overrides_on_the_tiny_preset():
    cfg = load_config("tiny", ["priors.s_min=0.3", "priors.s_max=0.95"])
    assert cfg.priors.scales()[0][1] == pytest.approx(0.3)


def test_linear_override_while_sizes_are_explicit_is_an_error_not_a_no_op():
    with pytest.raises(ConfigError, match="min_sizes"):
        load_config("ssd300_vgg16", ["priors.s_min=0.3"])
    cfg = load_config("ssd300_vgg16", ["priors.min_sizes=null", "priors.max_sizes=null", "priors.s_min=0.3"])
    assert cfg.priors.scales()[0][0] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("lr=1", "section.key"),
        ("optim.lr", "key=value"),
        ("priors.s_min=0.95", "s_min"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", [override])


def test_unknown_key_in_a_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: tiny\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.colour"):
        load_config(path)


def test_missing_config_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("does_not_exist")


def test_flat_params_for_logging():
    flat = load_config("tiny").flat()
    assert flat["optim.lr"] == 0.05
    assert flat["priors.feature_maps"] == [16, 8, 4, 2, 1]
    assert isinstance(Config().to_dict(), dict)


# --- every field is type- and range-checked when the config is built -----------------------------

# (override, dotted key, the value as the message shows it, the requirement words)
BAD_VALUES = [
    # the five that used to pass load_config and fail only inside the training workers
    ("optim.lr=abc", "optim.lr", "'abc'", "must be a number >= 0"),
    ("loss.neg_ratio=-1", "loss.neg_ratio", "-1", "must be > 0"),
    ("augment.strength=1.5", "augment.strength", "1.5", "must be in [0, 1]"),
    ("matching.iou_threshold=0", "matching.iou_threshold", "0", "must be in (0, 1]"),
    ("optim.schedule=linear", "optim.schedule", "'linear'", "must be one of 'multistep', 'cosine'"),
    # model
    ("model.arch=resnet", "model.arch", "'resnet'", "must be one of 'vgg16_ssd300'"),
    ("model.arch=3", "model.arch", "3", "must be one of"),
    ("model.num_classes=1", "model.num_classes", "1", "must be >= 2"),
    ("model.num_classes=3.5", "model.num_classes", "3.5", "must be an integer >= 2"),
    ("model.num_classes=true", "model.num_classes", "True", "must be an integer >= 2"),
    ("model.num_classes='21'", "model.num_classes", "'21'", "must be an integer >= 2"),
    ("model.backbone_weights=''", "model.backbone_weights", "''", "must be null or a non-empty string"),
    ("model.backbone_weights=3", "model.backbone_weights", "3", "must be null or a non-empty string"),
    ("model.width_mult=0", "model.width_mult", "0", "must be > 0"),
    ("model.width_mult=[1]", "model.width_mult", "[1]", "must be a number > 0"),
    # loss
    ("loss.neg_ratio=0", "loss.neg_ratio", "0", "must be > 0"),
    ("loss.neg_ratio=.inf", "loss.neg_ratio", "inf", "must be a number > 0"),
    ("loss.loc_weight=-0.5", "loss.loc_weight", "-0.5", "must be >= 0"),
    ("matching.iou_threshold=1.01", "matching.iou_threshold", "1.01", "must be in (0, 1]"),
    ("matching.variances=[0.1]", "matching.variances", "[0.1]", "must be a list of 2 numbers > 0"),
    ("matching.variances=[0.1, 0]", "matching.variances", "[0.1, 0]", "must be a list of 2 numbers > 0"),
    ("matching.variances=0.1", "matching.variances", "0.1", "must be a list of 2 numbers > 0"),
    # augment
    ("augment.strength=-0.1", "augment.strength", "-0.1", "must be in [0, 1]"),
    ("augment.strength=.nan", "augment.strength", "nan", "must be a number in [0, 1]"),
    ("augment.mean=[0.5, 0.5]", "augment.mean", "[0.5, 0.5]", "must be a list of 3 numbers in [0, 1]"),
    ("augment.mean=[104, 117, 123]", "augment.mean", "[104, 117, 123]", "a list of 3 numbers in [0, 1]"),
    ("augment.std=[0.2, 0, 0.2]", "augment.std", "[0.2, 0, 0.2]", "must be a list of 3 numbers in (0, 1]"),
    # optim
    ("optim.lr=-0.1", "optim.lr", "-0.1", "must be >= 0"),
    ("optim.lr=true", "optim.lr", "True", "must be a number >= 0"),
    ("optim.momentum=1", "optim.momentum", "1", "must be in [0, 1)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay", "'-1e-4'", "must be >= 0"),  # YAML: a string
    ("optim.warmup_iters=-1", "optim.warmup_iters", "-1", "must be >= 0"),
    ("optim.warmup_iters=2.5", "optim.warmup_iters", "2.5", "must be an integer >= 0"),
    ("optim.milestones=[0.9, 0.5]", "optim.milestones", "[0.9, 0.5]",
     "must be a strictly increasing list of numbers in (0, 1)"),
    ("optim.milestones=[0.5, 1.0]", "optim.milestones", "[0.5, 1.0]", "strictly increasing list of numbers in (0, 1)"),
    ("optim.milestones=[0.5, 0.5]", "optim.milestones", "[0.5, 0.5]", "strictly increasing list"),
    ("optim.gamma=0", "optim.gamma", "0", "must be in (0, 1]"),
    ("optim.gamma=1.5", "optim.gamma", "1.5", "must be in (0, 1]"),
    ("optim.grad_clip=-1", "optim.grad_clip", "-1", "must be >= 0"),
    ("optim.schedule=null", "optim.schedule", "None", "must be one of 'multistep', 'cosine'"),
    # train
    ("train.epochs=0", "train.epochs", "0", "must be >= 1"),
    ("train.epochs=2.5", "train.epochs", "2.5", "must be an integer >= 1"),
    ("train.epochs='10'", "train.epochs", "'10'", "must be an integer >= 1"),
    ("train.batch_size=0", "train.batch_size", "0", "must be >= 1"),
    ("train.eval_every=0", "train.eval_every", "0", "must be >= 1"),
    ("train.freeze_backbone_epochs=-1", "train.freeze_backbone_epochs", "-1", "must be >= 0"),
    ("train.seed=-1", "train.seed", "-1", "must be in [0, 4294967295]"),
    ("train.seed=4294967296", "train.seed", "4294967296", "must be in [0, 4294967295]"),
    ("train.channels_last=1", "train.channels_last", "1", "must be true or false"),
    # postprocess
    ("postprocess.score_threshold=1", "postprocess.score_threshold", "1", "must be in [0, 1)"),
    ("postprocess.nms_iou=0", "postprocess.nms_iou", "0", "must be in (0, 1]"),
    ("postprocess.top_k=0", "postprocess.top_k", "0", "must be >= 1"),
    ("postprocess.pre_nms_top_k=-1", "postprocess.pre_nms_top_k", "-1", "must be >= 0"),
    ("postprocess.method=nmx", "postprocess.method", "'nmx'", "must be one of 'nms', 'soft_linear'"),
    ("postprocess.soft_sigma=0", "postprocess.soft_sigma", "0", "must be > 0"),
    # priors (PriorSpec)
    ("priors.image_size=abc", "priors.image_size", "'abc'", "must be an integer >= 1"),
    ("priors.feature_maps=[]", "priors.feature_maps", "[]", "must be a non-empty list of integers >= 1"),
    ("priors.s_max=1.5", "priors.s_max", "1.5", "must be in (0, 1]"),
    ("priors.extra_box=maybe", "priors.extra_box", "'maybe'", "must be true or false"),
]


@pytest.mark.parametrize(("override", "key", "shown", "requirement"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_refused_naming_key_value_and_range(override, key, shown, requirement):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{CONFIG_DIR / 'tiny.yaml'}: ")  # the file load_config read
    assert key in message and requirement in message
    assert f", got {shown}" in message or f"{key} {shown}:" in message  # "unknown KEY VALUE: ..."


def test_the_message_reads_key_requirement_value():
    with pytest.raises(ConfigError, match=r": optim\.lr must be a number >= 0, got 'abc'$"):
        load_config("tiny", ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r": augment\.strength must be in \[0, 1\], got 1\.5$"):
        load_config("tiny", ["augment.strength=1.5"])
    with pytest.raises(ConfigError, match=r": unknown optim\.schedule 'linear': must be one of 'multistep', 'cosine'$"):
        load_config("tiny", ["optim.schedule=linear"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        # PyYAML reads 1e-3 (no dot) as a string: a number-like string is taken as the number
        ("optim.lr=1e-3", "optim.lr", 0.001),
        ("optim.weight_decay=5e-4", "optim.weight_decay", 0.0005),
        ("optim.milestones=[5e-1, 8e-1]", "optim.milestones", (0.5, 0.8)),
        ("priors.s_min=1e-1", "priors.s_min", 0.1),
        # the edges of every range
        ("optim.lr=0", "optim.lr", 0),
        ("optim.momentum=0", "optim.momentum", 0),
        ("optim.momentum=0.99", "optim.momentum", 0.99),
        ("optim.warmup_iters=0", "optim.warmup_iters", 0),
        ("optim.milestones=[]", "optim.milestones", ()),
        ("optim.gamma=1", "optim.gamma", 1),
        ("optim.grad_clip=0", "optim.grad_clip", 0),
        ("loss.neg_ratio=0.5", "loss.neg_ratio", 0.5),
        ("loss.loc_weight=0", "loss.loc_weight", 0),
        ("matching.iou_threshold=1", "matching.iou_threshold", 1),
        ("augment.strength=0", "augment.strength", 0),
        ("augment.strength=1", "augment.strength", 1),
        ("augment.mean=[0, 0, 1]", "augment.mean", (0, 0, 1)),
        ("augment.std=[1, 1, 1]", "augment.std", (1, 1, 1)),
        ("train.epochs=1", "train.epochs", 1),
        ("train.epochs=3.0", "train.epochs", 3),  # a float without a fraction is an integer
        ("train.seed=4294967295", "train.seed", 4294967295),
        ("train.freeze_backbone_epochs=50", "train.freeze_backbone_epochs", 50),
        ("model.num_classes=2", "model.num_classes", 2),
        ("model.backbone_weights=null", "model.backbone_weights", None),
        ("model.backbone_weights=/w/vgg.pth", "model.backbone_weights", "/w/vgg.pth"),
        ("postprocess.score_threshold=0", "postprocess.score_threshold", 0),
        ("postprocess.nms_iou=1", "postprocess.nms_iou", 1),
        ("postprocess.pre_nms_top_k=0", "postprocess.pre_nms_top_k", 0),
        ("postprocess.method=soft_gaussian", "postprocess.method", "soft_gaussian"),
    ],
)
def test_good_values_are_accepted_and_normalised(override, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(load_config("tiny", [override]), section), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("section", "name"),
    [(section, f.name) for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)],
)
def test_every_field_of_every_section_is_checked(section, name):
    # a value no field accepts: each field must refuse it, naming itself
    data = {"priors": {"preset": "tiny"}}
    data.setdefault(section, {})[name] = object()
    with pytest.raises(ConfigError, match=rf"^(unknown )?{section}\.{name} .*<object object at"):
        config_from_dict(data)


def test_sections_built_directly_are_checked_too():
    with pytest.raises(ConfigError, match=r"^optim\.lr must be a number >= 0, got 'abc'$"):
        OptimConfig(lr="abc")
    with pytest.raises(ConfigError, match=r"^postprocess\.top_k must be >= 1, got 0$"):
        PostprocessConfig(top_k=0)
    with pytest.raises(ConfigError, match=r"^unknown model\.arch 'resnet'"):
        ModelConfig(arch="resnet")
    assert issubclass(ConfigError, ValueError)  # callers that catch ValueError keep working
    assert MatchingConfig(variances=[0.1, 0.2]).variances == (0.1, 0.2)  # a list becomes a tuple
    assert set(ModelConfig.__dataclass_fields__) and ModelConfig().arch in ARCHITECTURES


def test_a_bad_value_in_a_yaml_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("priors:\n  preset: tiny\nloss:\n  neg_ratio: -3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: loss\.neg_ratio must be > 0, got -3$"):
        load_config(path)
    path.write_text("priors:\n  preset: tiny\noptim:\n  lr: 1e-3\n")  # 1e-3: a string to PyYAML
    assert load_config(path).optim.lr == 0.001


def test_an_override_that_is_not_yaml_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"override 'optim.milestones=\[0.5,': the value is not YAML") as err:
        load_config("tiny", ["optim.milestones=[0.5,"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_through_to_dict_keeps_normalised_values(name):
    cfg = load_config(name, ["optim.lr=1e-3", "train.max_iters=null", "train.epochs=4.0",
                             "matching.variances=[0.1, 0.2]"])
    assert (cfg.optim.lr, cfg.train.epochs) == (0.001, 4) and isinstance(cfg.train.epochs, int)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_keys_that_moved_to_the_matching_section():
    # a config saved before the move (a checkpoint, a registered model) reads the same values
    saved = load_config("tiny").to_dict()
    del saved["matching"]
    saved["loss"] |= {"iou_threshold": 0.6, "variances": [0.2, 0.2]}
    cfg = config_from_dict(saved)
    assert (cfg.matching.iou_threshold, cfg.matching.variances) == (0.6, (0.2, 0.2))
    # an override under the old name points to the new one
    with pytest.raises(ConfigError, match=r"loss\.variances is now matching\.variances$"):
        load_config("tiny", ["loss.variances=[0.2, 0.2]"])
    with pytest.raises(ConfigError, match=r"unknown matching\.strategy 'atss': must be one of 'max_iou'"):
        load_config("tiny", ["matching.strategy=atss"])
