import pytest
import yaml

from ssd.config import CONFIG_DIR, Config, ConfigError, config_from_dict, load_config
from ssd.priors import PriorSpec


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
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
