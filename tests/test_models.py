"""Tests of ssd.models: shapes, prior alignment, head widths, spec checks, backbone weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision
from torch import nn

from ssd.config import Config, ModelConfig, load_config
from ssd.models import ARCHITECTURES, SSD, build_model, load_backbone_weights
from ssd.models.heads import flatten_level
from ssd.models.vgg import convert_torchvision_vgg16
from ssd.priors import PriorSpec

# (shipped config, arch it names, batch): every architecture through its real preset.
SHIPPED = [
    ("tiny", "tiny", 2),
    ("mobilenetv1_ssd300", "mobilenetv1_ssd", 2),
    ("mobilenetv2_ssdlite300", "mobilenetv2_ssdlite", 2),
    ("ssd300_vgg16", "vgg16_ssd300", 1),
    ("ssd512_vgg16", "vgg16_ssd512", 1),
]


def tiny_cfg(num_classes: int = 5, **model: object) -> Config:
    return Config(
        model=ModelConfig(arch="tiny", num_classes=num_classes, **model),  # type: ignore[arg-type]
        priors=PriorSpec.preset("tiny"),
    )


@pytest.fixture(scope="module")
def tiny_model() -> SSD:
    torch.manual_seed(0)
    return build_model(tiny_cfg(num_classes=5)).eval()


def test_architectures_are_the_documented_names() -> None:
    assert set(ARCHITECTURES) == {arch for _, arch, _ in SHIPPED}


@pytest.mark.parametrize(("config", "arch", "batch"), SHIPPED, ids=[s[1] for s in SHIPPED])
def test_output_shapes_for_every_architecture(config: str, arch: str, batch: int) -> None:
    cfg = load_config(config, ["model.num_classes=7"])
    assert cfg.model.arch == arch
    model = build_model(cfg).eval()
    assert model.num_classes == 7 and model.prior_spec == cfg.priors
    size = cfg.priors.image_size
    with torch.no_grad():
        loc, logits = model(torch.randn(batch, 3, size, size))
    num_priors = cfg.priors.num_priors()
    assert num_priors == cfg.priors.generate().shape[0]
    assert loc.shape == (batch, num_priors, 4)
    assert logits.shape == (batch, num_priors, 7)
    assert torch.isfinite(loc).all() and torch.isfinite(logits).all()


def test_vgg16_ssd300_parameter_count_equals_torchvision() -> None:
    ours = build_model(load_config("ssd300_vgg16", ["model.num_classes=21"]))
    reference = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=21
    )
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert 26_000_000 < count < 26_600_000  # the ~26.3M of the paper's SSD300 at 21 classes


def test_heads_follow_the_aspect_ratios_of_the_spec() -> None:
    base = PriorSpec.preset("tiny")
    wide = base.replace(aspect_ratios=((2, 3),) * 5)  # 6 boxes per cell everywhere
    assert base.boxes_per_location() != wide.boxes_per_location()
    for spec in (base, wide):
        model = build_model(Config(model=ModelConfig(arch="tiny", num_classes=3), priors=spec))
        widths = [
            (loc.out_channels, conf.out_channels)
            for loc, conf in zip(model.head.loc, model.head.conf)
        ]
        assert widths == [(a * 4, a * 3) for a in spec.boxes_per_location()]
        with torch.no_grad():
            loc, logits = model.eval()(torch.zeros(1, 3, 128, 128))
        assert loc.shape == (1, spec.num_priors(), 4) and logits.shape == (1, spec.num_priors(), 3)


def test_separable_heads_for_ssdlite_plain_convs_otherwise() -> None:
    lite = build_model(load_config("mobilenetv2_ssdlite300"))
    head = lite.head.conf[0]
    assert isinstance(head, nn.Sequential)
    depthwise, pointwise = head[0], head[-1]
    assert depthwise.groups == depthwise.in_channels == 576 and depthwise.kernel_size == (3, 3)
    assert isinstance(head[1], nn.BatchNorm2d) and isinstance(head[2], nn.ReLU6)
    assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == 6 * 21
    tiny = build_model(tiny_cfg())
    assert isinstance(tiny.head.conf[0], nn.Conv2d) and tiny.head.conf[0].kernel_size == (3, 3)


@pytest.mark.parametrize(
    "changes",
    [
        {"feature_maps": (17, 8, 4, 2, 1)},  # wrong size at one level
        {"feature_maps": (16, 8, 4, 2), "aspect_ratios": ((2,),) * 4, "steps": None},  # levels
        {"image_size": 256, "steps": None},  # the backbone then gives (32, 16, 8, 4, 2)
    ],
)
def test_spec_that_does_not_fit_the_architecture_raises_a_clear_error(changes: dict) -> None:
    spec = PriorSpec.preset("tiny").replace(**changes)
    cfg = Config(model=ModelConfig(arch="tiny"), priors=spec)
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    message = str(err.value)
    assert "tiny" in message
    assert str(tuple(spec.feature_maps)) in message  # expected
    actual = (32, 16, 8, 4, 2) if spec.image_size == 256 else (16, 8, 4, 2, 1)
    assert str(actual) in message


def test_mobilenet_spec_mismatch_names_arch_and_sizes() -> None:
    cfg = load_config("mobilenetv1_ssd300", ["priors.feature_maps=[38, 19, 10, 5, 3, 1]"])
    with pytest.raises(ValueError, match=r"mobilenetv1_ssd.*\(19, 10, 5, 3, 2, 1\).*\(38, 19"):
        build_model(cfg)


def test_bad_model_settings_raise() -> None:
    with pytest.raises(ValueError, match="unknown model.arch 'resnet'"):
        build_model(Config(model=ModelConfig(arch="resnet")))
    with pytest.raises(ValueError, match="num_classes"):
        build_model(tiny_cfg(num_classes=1))
    with pytest.raises(ValueError, match="width_mult"):
        build_model(load_config("ssd300_vgg16", ["model.width_mult=0.5"]))


def test_forward_rejects_an_input_size_other_than_the_specs(tiny_model: SSD) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        tiny_model(torch.zeros(1, 3, 160, 160))


def test_width_mult_scales_the_mobilenets() -> None:
    for config in ("mobilenetv1_ssd300", "mobilenetv2_ssdlite300"):
        full = build_model(load_config(config))
        half = build_model(load_config(config, ["model.width_mult=0.5"])).eval()
        full_n = sum(p.numel() for p in full.backbone.parameters())
        half_n = sum(p.numel() for p in half.backbone.parameters())
        assert half_n < 0.5 * full_n
        with torch.no_grad():
            loc, _ = half(torch.zeros(1, 3, 300, 300))
        assert loc.shape == (1, 3000, 4)


# ---------------------------------------------------------------- output order == prior order
@contextlib.contextmanager
def _replaced_outputs(convs_and_fns):
    """Within the block, each (conv, fn) pair's conv returns ``fn(output)`` instead."""
    handles = [conv.register_forward_hook(lambda m, i, o, fn=fn: fn(o)) for conv, fn in convs_and_fns]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _level_offsets(spec: PriorSpec) -> list[int]:
    counts = [f * f * a for f, a in zip(spec.feature_maps, spec.boxes_per_location())]
    return [sum(counts[:i]) for i in range(len(counts))]


def test_flatten_level_maps_channel_a_k_at_cell_i_j_to_row_i_w_j_times_a() -> None:
    a, k, h, w = 3, 4, 2, 5
    out = torch.randn(2, a * k, h, w)
    flat = flatten_level(out, k)
    assert flat.shape == (2, h * w * a, k)
    for i in range(h):
        for j in range(w):
            for anchor in range(a):
                for c in range(k):
                    assert flat[1, (i * w + j) * a + anchor, c] == out[1, anchor * k + c, i, j]


def test_outputs_are_placed_in_prior_order(tiny_model: SSD) -> None:
    """Replace every head conv's output by a code of (level, channel, row, col) and check where
    each value lands in the model output."""
    spec = tiny_model.prior_spec
    offsets = _level_offsets(spec)

    def code(level: int, channels: int, h: int, w: int) -> torch.Tensor:
        ch = torch.arange(channels).view(channels, 1, 1)
        i = torch.arange(h).view(1, h, 1)
        j = torch.arange(w).view(1, 1, w)
        return (level * 1_000_000 + ch * 10_000 + i * 100 + j).double().unsqueeze(0)  # (1,C,H,W)

    replaced = [
        (conv, lambda out, level=level: code(level, *out.shape[1:]).to(out.dtype))
        for level, pair in enumerate(zip(tiny_model.head.loc, tiny_model.head.conf))
        for conv in pair
    ]
    with _replaced_outputs(replaced), torch.no_grad():
        loc_out, conf_out = tiny_model(torch.zeros(1, 3, 128, 128))
    c = tiny_model.num_classes
    for level, (f, a) in enumerate(zip(spec.feature_maps, spec.boxes_per_location())):
        for i, j, anchor in [(0, 0, 0), (0, f - 1, a - 1), (f - 1, 0, 1), (f // 2, f - 1, a // 2)]:
            p = offsets[level] + (i * f + j) * a + anchor
            for k in range(4):
                expected = level * 1_000_000 + (anchor * 4 + k) * 10_000 + i * 100 + j
                assert loc_out[0, p, k].item() == expected
            expected = level * 1_000_000 + (anchor * c + c - 1) * 10_000 + i * 100 + j
            assert conf_out[0, p, c - 1].item() == expected


def test_head_rows_line_up_with_generated_prior_geometry(tiny_model: SSD) -> None:
    """Make each loc head emit, per anchor, its cell centre and the anchor's (w, h) computed from
    the spec independently of the model; the model output must then reproduce generate()."""
    spec = tiny_model.prior_spec
    priors = spec.generate(dtype=torch.float64)
    offsets = _level_offsets(spec)
    lows, highs = spec.scales()

    def geometry(level: int) -> torch.Tensor:
        f, step = spec.feature_maps[level], spec.level_steps()[level]
        s, s_next = lows[level], highs[level]
        shapes = [(s, s), ((s * s_next) ** 0.5,) * 2]
        for r in spec.aspect_ratios[level]:
            shapes += [(s * r**0.5, s / r**0.5), (s / r**0.5, s * r**0.5)]
        centres = (torch.arange(f, dtype=torch.float64) + 0.5) * step / spec.image_size
        out = torch.zeros(1, len(shapes) * 4, f, f, dtype=torch.float64)
        for a, (w, h) in enumerate(shapes):
            out[0, a * 4 + 0] = centres.view(1, f)  # cx varies along columns
            out[0, a * 4 + 1] = centres.view(f, 1)  # cy varies along rows
            out[0, a * 4 + 2], out[0, a * 4 + 3] = w, h
        return out.clamp(0, 1)

    replaced = [
        (conv, lambda out, level=level: geometry(level).to(out.dtype))
        for level, conv in enumerate(tiny_model.head.loc)
    ]
    with _replaced_outputs(replaced), torch.no_grad():
        loc_out, _ = tiny_model(torch.zeros(1, 3, 128, 128))
    assert loc_out.shape[1] == priors.shape[0] == offsets[-1] + spec.feature_maps[-1] ** 2 * 4
    torch.testing.assert_close(loc_out[0].double(), priors, atol=1e-6, rtol=0)


def test_a_local_change_moves_only_the_matching_cells_priors() -> None:
    """Without hooks: a change in the image's top-right corner changes the first level's outputs
    only at cells whose receptive field covers it: first rows, last columns (row-major)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    spec = model.prior_spec
    image = torch.randn(1, 3, 128, 128)
    changed = image.clone()
    changed[:, :, :4, -4:] += 5.0
    with torch.no_grad():
        diff = (model(changed)[0] - model(image)[0]).abs().sum(-1)[0]  # (P,)
    f, a = spec.feature_maps[0], spec.boxes_per_location()[0]
    level0 = diff[: f * f * a].view(f, f, a).sum(-1)  # (rows, cols) under the documented order
    assert level0[0, f - 1] > 0
    assert (level0[4:, :] == 0).all() and (level0[:, : f - 4] == 0).all()  # far cells untouched


# ---------------------------------------------------------------- backbone weights
def test_backbone_weights_from_a_local_file_replace_the_backbone_only(tmp_path) -> None:
    torch.manual_seed(1)
    donor = build_model(tiny_cfg())
    saved = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in donor.backbone.state_dict().items()
    }
    path = tmp_path / "tiny_backbone.pt"
    torch.save(saved, path)

    torch.manual_seed(2)
    plain = build_model(tiny_cfg())
    torch.manual_seed(2)
    loaded = build_model(tiny_cfg(backbone_weights=str(path)))
    for key, value in loaded.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key
        if value.is_floating_point():
            assert not torch.equal(value, plain.backbone.state_dict()[key]), key
    # extras and heads are untouched by the backbone weights
    for key, value in loaded.state_dict().items():
        if not key.startswith("features.backbone."):
            assert torch.equal(value, plain.state_dict()[key]), key


def test_torchvision_vgg16_features_load_into_vgg16_ssd300(tmp_path) -> None:
    torch.manual_seed(3)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}  # vgg16() keys
    path = tmp_path / "vgg16_features.pth"
    torch.save(state, path)
    torch.manual_seed(4)
    model = build_model(load_config("ssd300_vgg16", [f"model.backbone_weights={path}"]))
    convs = [i for i, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]
    assert len(convs) == 13
    for i in convs:
        assert torch.equal(model.backbone[i].weight, features[i].weight)
        assert torch.equal(model.backbone[i].bias, features[i].bias)
    # fc6/fc7 are absent from a features-only file: they keep their xavier init (zero bias)
    assert model.backbone[31].weight.shape == (1024, 512, 3, 3)
    assert torch.count_nonzero(model.backbone[31].bias) == 0


def test_vgg_fc6_fc7_are_subsampled_into_convolutions() -> None:
    # small stand-ins for (4096, 25088) / (4096, 4096): 8 filters -> every 4th -> 2
    fc6_w, fc6_b = torch.randn(8, 512 * 7 * 7), torch.randn(8)
    fc7_w, fc7_b = torch.randn(8, 8), torch.randn(8)
    out = convert_torchvision_vgg16(
        {
            "features.0.weight": torch.ones(1),
            "classifier.0.weight": fc6_w,
            "classifier.0.bias": fc6_b,
            "classifier.3.weight": fc7_w,
            "classifier.3.bias": fc7_b,
            "classifier.6.weight": torch.ones(1000, 8),
        }
    )
    assert set(out) == {"0.weight", "31.weight", "31.bias", "33.weight", "33.bias"}
    fc6 = fc6_w.view(8, 512, 7, 7)
    assert out["31.weight"].shape == (2, 512, 3, 3)
    assert torch.equal(out["31.weight"][1, 5, 2, 1], fc6[4, 5, 6, 3])  # taps 0, 3, 6
    assert torch.equal(out["31.bias"], fc6_b[[0, 4]])
    assert torch.equal(out["33.weight"][:, :, 0, 0], fc7_w[[0, 4]][:, [0, 4]])
    assert torch.equal(out["33.bias"], fc7_b[[0, 4]])


def test_mobilenetv2_loads_torchvision_imagenet_layout(tmp_path) -> None:
    torch.manual_seed(5)
    reference = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)  # features.* + classifier.*
    model = build_model(load_config("mobilenetv2_ssdlite300", [f"model.backbone_weights={path}"]))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference.features.state_dict()[key]), key


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda sd: sd.update({"9.weight": torch.zeros(3)}), "unexpected keys: 9.weight"),
        (lambda sd: sd.pop("0.0.weight"), "missing keys: 0.0.weight"),
        (
            lambda sd: sd.update({"0.0.weight": torch.zeros(16, 3, 5, 5)}),
            r"shape mismatches: 0\.0\.weight",
        ),
    ],
)
def test_backbone_weights_that_do_not_fit_raise_naming_the_file(tmp_path, edit, complaint) -> None:
    state = build_model(tiny_cfg()).backbone.state_dict()
    edit(state)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"broken\.pt.*tiny backbone.*{complaint}"):
        build_model(tiny_cfg(backbone_weights=str(path)))


def test_backbone_weights_file_not_a_state_dict_or_absent(tmp_path) -> None:
    model = build_model(tiny_cfg())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone_weights(model, tmp_path / "nope.pt")
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"list\.pt.*state dict"):
        load_backbone_weights(model, path)


# ---------------------------------------------------------------- training
def test_tiny_model_trains_fast_on_cpu() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_classes=3)).train()
    # the deterministic guard of "small": a few hundred thousand to ~1M parameters
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 1_200_000
    images = torch.randn(8, 3, 128, 128)
    num_priors = model.prior_spec.num_priors()
    target_loc = torch.randn(8, num_priors, 4) * 0.1
    target_cls = torch.randint(0, 3, (8, num_priors))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        loc, logits = model(images)
        return nn.functional.smooth_l1_loss(loc, target_loc) + nn.functional.cross_entropy(
            logits.flatten(0, 1), target_cls.flatten()
        )

    loss = loss_fn()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    first = loss.item()
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    # Speed lives in benchmarks/, never in timed unit tests.
    assert loss.item() < 0.8 * first
