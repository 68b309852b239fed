"""ssd.search_space: the sweep grammar, its checks, and the shipped tune_spaces/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssd.config import ConfigError
from ssd.search_space import SearchSpace, SpaceError, trial_config

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "tune_spaces"


def _space(data: dict, base: str = "tiny") -> SearchSpace:
    return SearchSpace.from_dict(data, base, source="test.yaml")


@pytest.mark.parametrize(("name", "base"), [("priors", "tiny"), ("loss_aug", "tiny"), ("default", "tiny"),
                                            ("loss_aug", "ssd300_vgg16"), ("priors_ssd300", "ssd300_vgg16")])
def test_shipped_spaces_load_and_every_sample_builds(name, base):
    space = SearchSpace.load(SPACES / f"{name}.yaml", base)
    assert space.params
    for values in space.sample(6, seed=3):
        cfg = trial_config(base, values)
        for key, value in values.items():
            section, field = key.split(".")
            got = getattr(getattr(cfg, section), field)
            assert (list(map(list, got)) if isinstance(value, list) and value and isinstance(value[0], list)
                    else (list(got) if isinstance(got, tuple) else got)) == value


def test_default_space_is_the_union_of_its_includes():
    default = SearchSpace.load(SPACES / "default.yaml")
    parts = [SearchSpace.load(SPACES / f"{n}.yaml") for n in ("priors", "loss_aug")]
    assert default.params == {**parts[0].params, **parts[1].params}


def test_sampling_follows_each_distribution():
    space = _space({"space": {"optim.lr": {"loguniform": [0.01, 0.1]}, "loss.neg_ratio": {"randint": [2, 4]},
                              "augment.strength": {"uniform": [0.25, 0.5]},
                              "priors.extra_box": {"grid": [True, False]}, "train.epochs": 3}})
    samples = space.sample(20, seed=0)
    assert len(samples) == 40  # 2 grid points x 20
    assert [s["priors.extra_box"] for s in samples[:20]] == [True] * 20
    assert {s["loss.neg_ratio"] for s in samples} == {2, 3}  # [low, high)
    assert all(0.01 <= s["optim.lr"] <= 0.1 and 0.25 <= s["augment.strength"] <= 0.5 for s in samples)
    assert all(s["train.epochs"] == 3 for s in samples)  # a fixed value goes into every trial
    lrs = sorted(s["optim.lr"] for s in samples)
    assert lrs[len(lrs) // 2] < 0.055  # log-uniform: the median is near sqrt(0.01 * 0.1) = 0.032
    assert space.sample(5, seed=1) == space.sample(5, seed=1)


@pytest.mark.parametrize(("data", "message"), [
    ({"space": {"optim.learning_rate": {"uniform": [0.1, 0.2]}}}, "unknown key 'optim.learning_rate'"),
    ({"space": {"optimizer.lr": {"uniform": [0.1, 0.2]}}}, "no section 'optimizer'"),
    ({"space": {"optim.lr": {"uniform": [0.2, 0.1]}}}, "optim.lr: uniform needs low < high"),
    ({"space": {"optim.lr": {"loguniform": [0.0, 0.1]}}}, "optim.lr: loguniform needs 0 < low"),
    ({"space": {"loss.neg_ratio": {"randint": [2.5, 4]}}}, "loss.neg_ratio: randint needs integer bounds"),
    ({"space": {"optim.lr": {"gaussian": [0.1, 0.2]}}}, "optim.lr: expected one of"),
    ({"space": {"augment.strength": {"choice": []}}}, "augment.strength: choice needs a non-empty list"),
    ({"space": {"priors.aspect_ratios": {"choice": [[[2], [2]]]}}}, "priors.aspect_ratios: the value"),
    ({"space": {"priors.s_min": {"uniform": [0.1, 0.95]}}}, "priors.s_min: the value 0.95 gives no valid config"),
    ({"spaces": {}}, "unknown top-level key"),
])
def test_invalid_spaces_are_rejected_naming_the_key(data, message):
    with pytest.raises(SpaceError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _space(data)


def test_a_key_that_is_inert_for_the_base_config_is_rejected():
    # ssd300_vgg16's explicit sizes make s_min meaningless: searching it would change nothing
    with pytest.raises(SpaceError, match="priors.s_min: .*has no effect while priors.min_sizes is set"):
        _space({"space": {"priors.s_min": {"uniform": [0.1, 0.2]}}}, base="ssd300_vgg16")


def test_a_combination_that_cannot_be_built_fails_only_its_trial():
    space = _space({"space": {"priors.s_min": {"choice": [0.2, 0.8]}, "priors.s_max": {"choice": [0.7, 0.9]}}})
    assert trial_config("tiny", {"priors.s_min": 0.2, "priors.s_max": 0.7}).priors.s_min == 0.2
    with pytest.raises(ConfigError, match=r'sampled \{"priors.s_max": 0.7, "priors.s_min": 0.8\}'):
        trial_config("tiny", {"priors.s_min": 0.8, "priors.s_max": 0.7})
    assert len(space.params) == 2


def test_includes_resolve_relative_and_detect_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\nspace:\n  optim.lr: {uniform: [0.01, 0.02]}\n"
                                     "  loss.neg_ratio: {randint: [2, 4]}\n  augment.strength: 0.5\n")
    (tmp_path / "b.yaml").write_text("space:\n  optim.lr: {uniform: [0.5, 0.6]}\n  loss.neg_ratio: 4\n"
                                     "  augment.strength: {uniform: [0.0, 1.0]}\n  train.epochs: 3\n")
    space = SearchSpace.load(tmp_path / "a.yaml")
    # the including file wins, whether it turns a fixed value into a search or the reverse
    assert space.params["optim.lr"].args == (0.01, 0.02) and space.params["loss.neg_ratio"].kind == "randint"
    assert space.fixed == {"augment.strength": 0.5, "train.epochs": 3}
    assert set(space.params) == {"optim.lr", "loss.neg_ratio"}
    (tmp_path / "c.yaml").write_text("include: [d.yaml]\n")
    (tmp_path / "d.yaml").write_text("include: [c.yaml]\n")
    with pytest.raises(SpaceError, match="includes itself"):
        SearchSpace.load(tmp_path / "c.yaml")
    with pytest.raises(SpaceError, match="not found"):
        SearchSpace.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("space", "message"), [
    # the same checks as the config's: the key, the value and the range are named
    ({"loss.neg_ratio": {"randint": [-2, 3]}},
     "test.yaml: loss.neg_ratio: the value -2 gives no valid config: loss.neg_ratio must be > 0, got -2"),
    ({"augment.strength": {"uniform": [0, 1.5]}},
     "test.yaml: augment.strength: the value 1.5 gives no valid config: augment.strength must be in [0, 1], got 1.5"),
    ({"matching.iou_threshold": {"uniform": [0.0, 0.7]}},
     "matching.iou_threshold: the value 0.0 gives no valid config: matching.iou_threshold must be in (0, 1], got 0.0"),
    ({"optim.schedule": {"choice": ["cosine", "linear"]}},
     "optim.schedule: the value 'linear' gives no valid config: unknown optim.schedule 'linear': must be one of"),
    ({"optim.milestones": {"grid": [[0.5, 0.8], [0.8, 0.5]]}},
     "must be a strictly increasing list of numbers in (0, 1), got [0.8, 0.5]"),
    ({"optim.lr": "abc"}, "test.yaml: fixed values: optim.lr must be a number >= 0, got 'abc'"),
    # an integer key searched with a continuous distribution: its draws have fractions
    ({"train.epochs": {"uniform": [1, 10]}},
     ("train.epochs: uniform draws fractional values such as 1.0000000000000002, which give no valid config "
      "(use randint for an integer): train.epochs must be an integer >= 1")),
])
def test_edge_values_go_through_the_config_checks(space, message):
    with pytest.raises(SpaceError, match=re.escape(message)) as err:
        _space({"space": space})
    assert "\n" not in str(err.value)


def test_edges_inside_the_ranges_are_accepted():
    space = _space({"space": {"loss.neg_ratio": {"randint": [1, 8]}, "augment.strength": {"uniform": [0, 1]},
                              "optim.lr": {"loguniform": [1e-4, 1e-1]}, "train.epochs": {"randint": [1, 4]},
                              "optim.weight_decay": {"choice": ["5e-4", 0]}}})
    assert set(space.params) == {"loss.neg_ratio", "augment.strength", "optim.lr", "train.epochs",
                                 "optim.weight_decay"}
    for values in space.sample(4, seed=0):
        assert 1 <= trial_config("tiny", values).train.epochs <= 3
