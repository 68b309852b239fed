import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from ssd.priors import PRESETS, PriorSpec, PriorSpecError


def test_ssd300_count_and_first_last_priors_from_paper_formulas():
    spec = PriorSpec.preset("ssd300_vgg16")
    priors = spec.generate()
    # 38^2*4 + 19^2*6 + 10^2*6 + 5^2*6 + 3^2*4 + 1*4
    assert priors.shape == (8732, 4) == (spec.num_priors(), 4)
    assert spec.boxes_per_location() == (4, 6, 6, 6, 4, 4)
    first = priors[:4]
    c = 0.5 * 8 / 300
    s = 30 / 300
    extra = math.sqrt(30 * 60) / 300
    expected = [
        [c, c, s, s],
        [c, c, extra, extra],
        [c, c, s * math.sqrt(2), s / math.sqrt(2)],
        [c, c, s / math.sqrt(2), s * math.sqrt(2)],
    ]
    assert torch.allclose(first, torch.tensor(expected), atol=1e-6)
    # last level: one 300-px cell centred at 0.5; last box has ratio 1/2 of s=264/300 (h clipped)
    last = priors[-1]
    assert torch.allclose(last, torch.tensor([0.5, 0.5, 0.88 / math.sqrt(2), 1.0]), atol=1e-6)
    # second cell of level 1 is one step (8 px) to the right: row-major order
    assert priors[4, 0].item() == pytest.approx(1.5 * 8 / 300)
    assert priors[4, 1].item() == pytest.approx(c)
    assert priors[38 * 4, 1].item() == pytest.approx(1.5 * 8 / 300)  # next row


def test_ssd300_equals_torchvision_default_boxes_with_the_same_scales():
    spec = PriorSpec.preset("ssd300_vgg16")
    scales = [m / 300 for m in spec.min_sizes] + [spec.max_sizes[-1] / 300]
    gen = DefaultBoxGenerator(
        [list(r) for r in spec.aspect_ratios], scales=scales, steps=list(spec.steps), clip=True
    )
    grids = [[f, f] for f in spec.feature_maps]
    expected = gen._grid_default_boxes(grids, [300, 300], dtype=torch.float32)
    # torchvision clamps only w, h; the 10x10 level's last centre is 9.5 * 32 / 300 > 1, which our
    # clip (like ssd.pytorch's) also clamps, so every prior lies in [0, 1].
    assert expected[:, :2].max() > 1
    assert torch.allclose(spec.generate(), expected.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize(
    "name,count", [("ssd512_vgg16", 24564), ("mobilenetv1_ssd300", 3000), ("mobilenetv2_ssdlite300", 3000)]
)
def test_preset_counts(name, count):
    spec = PriorSpec.preset(name)
    assert spec.generate().shape == (count, 4)


def test_all_priors_in_unit_range():
    for spec in PRESETS.values():
        p = spec.generate()
        assert p.min() >= 0 and p.max() <= 1


def test_linear_scale_rule_matches_paper():
    spec = PriorSpec(image_size=300, feature_maps=(10, 5, 3, 1), aspect_ratios=((),) * 4, s_min=0.2, s_max=0.8)
    lows, highs = spec.scales()
    # s_k = s_min + (s_max - s_min)(k-1)/(m-1), m = 4: 0.2, 0.4, 0.6, 0.8; extrapolated 1.0
    assert lows == pytest.approx((0.2, 0.4, 0.6, 0.8))
    assert highs == pytest.approx((0.4, 0.6, 0.8, 1.0))
    p = spec.generate()
    assert p.shape == (100 * 2 + 25 * 2 + 9 * 2 + 2, 4)
    assert p[0, 2].item() == pytest.approx(0.2)
    assert p[1, 2].item() == pytest.approx(math.sqrt(0.2 * 0.4))


def test_first_level_scale():
    lows, highs = PriorSpec.preset("tiny").scales()
    assert lows == pytest.approx((0.1, 0.2, 0.2 + 0.7 / 3, 0.2 + 1.4 / 3, 0.9))
    assert highs[-1] == pytest.approx(0.9 + 0.7 / 3)


def test_no_extra_box_and_aspect_ratio_changes_box_count():
    spec = PriorSpec.preset("tiny").replace(extra_box=False, aspect_ratios=((2, 3),) * 5)
    assert spec.boxes_per_location() == (5,) * 5
    assert spec.generate().shape[0] == 5 * (256 + 64 + 16 + 4 + 1)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_serialisation_round_trip(fmt):
    for spec in PRESETS.values():
        text = spec.to_json() if fmt == "json" else spec.to_yaml()
        back = PriorSpec.from_json(text) if fmt == "json" else PriorSpec.from_yaml(text)
        assert back == spec
        assert torch.equal(back.generate(), spec.generate())


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"s_min": 0.9, "s_max": 0.2}, "s_min"),
        ({"aspect_ratios": ((2,),)}, "aspect_ratios"),
        ({"aspect_ratios": ((1,),) * 5}, "aspect_ratios"),
        ({"feature_maps": (16, 8, 0, 2, 1)}, "feature_maps"),
        ({"steps": (8, 16)}, "steps"),
    ],
)
def test_invalid_specs_name_the_field(changes, field):
    with pytest.raises(PriorSpecError, match=field):
        PriorSpec.preset("tiny").replace(**changes)


def test_unknown_field_and_preset_are_errors():
    with pytest.raises(PriorSpecError, match="bogus"):
        PriorSpec.from_dict({**PriorSpec.preset("tiny").to_dict(), "bogus": 1})
    with pytest.raises(PriorSpecError, match="nope"):
        PriorSpec.preset("nope")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"image_size": "abc"}, "priors.image_size must be an integer >= 1, got 'abc'"),
        ({"image_size": 128.5}, "priors.image_size must be an integer >= 1, got 128.5"),
        ({"feature_maps": (16, 8, 4.5, 2, 1)},
         "priors.feature_maps must be a non-empty list of integers >= 1, got [16, 8, 4.5, 2, 1]"),
        ({"aspect_ratios": ((2,), (2, -3), (2,), (2,), (2,))},
         "priors.aspect_ratios must be a list of lists of numbers > 0, got [[2], [2, -3], [2], [2], [2]]"),
        ({"aspect_ratios": ((2,), (1,), (2,), (2,), (2,))},
         "priors.aspect_ratios[1] must hold ratios > 0 other than 1 (1 is always present), got [1]"),
        ({"steps": (8, 16)}, "priors.steps must have one entry per level of priors.feature_maps (5), got 2: [8, 16]"),
        ({"steps": (8, 16, 0, 64, 128)}, "priors.steps must be null or a list of numbers > 0"),
        ({"s_min": 0.9, "s_max": 0.2}, "priors.s_min must be < priors.s_max (0.2), got 0.9"),
        ({"s_max": 1.5}, "priors.s_max must be in (0, 1], got 1.5"),
        ({"first_level_scale": 0}, "priors.first_level_scale must be in (0, 1], got 0"),
        ({"first_level_scale": "x"}, "priors.first_level_scale must be null or a number in (0, 1], got 'x'"),
        ({"extra_box": 1}, "priors.extra_box must be true or false, got 1"),
        ({"clip": None}, "priors.clip must be true or false, got None"),
        ({"name": ""}, "priors.name must be a non-empty string, got ''"),
    ],
)
def test_invalid_specs_name_key_value_and_range(changes, message):
    with pytest.raises(PriorSpecError) as err:
        PriorSpec.preset("tiny").replace(**changes)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_number_strings_from_yaml_are_numbers():
    # PyYAML reads 1e-1 as a string; the spec takes it as 0.1, as the other config sections do
    spec = PriorSpec.from_yaml(PriorSpec.preset("tiny").to_yaml().replace("s_min: 0.2", "s_min: 2e-1"))
    assert spec.s_min == 0.2 and spec == PriorSpec.preset("tiny")
