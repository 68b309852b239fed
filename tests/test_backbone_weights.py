"""Pretrained backbones by default (issue 16): ``model.backbone_weights`` sources, the VGG16
fc6/fc7 decimation, refusals, and the normalisation that follows the weights.

No network: torchvision's published files are stood in for by random-init ``vgg16()`` /
``mobilenet_v2()`` state dicts saved under the file names torchvision uses, in a temporary
``TORCH_HOME``; the offline case simulates the network's absence, and every download is a failure.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from ssd import storage
from ssd.config import ConfigError, load_config
from ssd.engine import network_input
from ssd.models import (
    BackboneWeights,
    BackboneWeightsUnavailable,
    build_model,
    resolve_backbone_weights,
)
from ssd.models import weights as weights_module

VGG_FILE = "vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
MNV2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision MobileNet_V2_Weights.IMAGENET1K_V1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def use_torch_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Point TORCH_HOME and torch.hub at ``home``; returns the checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored after the test
    torch.hub.set_dir(str(home / "hub"))
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    return checkpoints


def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A TORCH_HOME holding random-init torchvision vgg16 / mobilenet_v2 state dicts under the
    published file names; built once (the VGG16 file is 528 MB)."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(vgg, checkpoints / VGG_FILE)
    mnv2 = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(mnv2, checkpoints / MNV2_FILE)
    return home, vgg, mnv2


@pytest.fixture
def offline(monkeypatch):
    """No network: name resolution fails (as on these machines), and a download is an error."""

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    no_download(monkeypatch)


@pytest.fixture(scope="module")
def vgg_resolved(published):
    """The default ssd300_vgg16 config resolved against ``published`` (read once)."""
    home, _, _ = published
    with pytest.MonkeyPatch.context() as mp:
        use_torch_home(mp, home)
        no_download(mp)
        cfg = load_config("ssd300_vgg16")
        return cfg, resolve_backbone_weights(cfg)


# ------------------------------------------------------------------ the default: imagenet
def test_default_vgg16_preset_loads_the_cached_torchvision_file_with_no_flag(
    published, vgg_resolved
) -> None:
    home, vgg, _ = published
    cfg, weights = vgg_resolved
    assert cfg.model.backbone_weights == "imagenet"
    assert isinstance(weights, BackboneWeights) and weights.input_convention == "rgb"
    path = home / "hub" / "checkpoints" / VGG_FILE
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "VGG16_Weights.IMAGENET1K_V1" in weights.source and str(path) in weights.source

    torch.manual_seed(1)
    model = build_model(cfg, backbone=weights)
    convs = [i for i, layer in enumerate(model.backbone) if isinstance(layer, nn.Conv2d)]
    assert convs[:13] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv1_1..conv5_3
    for i in convs[:13]:
        assert torch.equal(model.backbone[i].weight, vgg[f"features.{i}.weight"]), i
        assert torch.equal(model.backbone[i].bias, vgg[f"features.{i}.bias"]), i

    # fc6 -> conv6: (4096, 25088) as (4096, 512, 7, 7), every 4th filter, taps 0, 3, 6, dilation 6
    every4th, taps = torch.arange(0, 4096, 4), torch.tensor([0, 3, 6])
    fc6 = vgg["classifier.0.weight"].reshape(4096, 512, 7, 7)
    conv6 = model.backbone[31]
    assert conv6.dilation == (6, 6) and conv6.padding == (6, 6) and conv6.kernel_size == (3, 3)
    want6 = fc6.index_select(0, every4th).index_select(2, taps).index_select(3, taps)
    assert torch.equal(conv6.weight, want6)
    assert torch.equal(conv6.bias, vgg["classifier.0.bias"].index_select(0, every4th))
    # fc7 -> conv7: every 4th filter and every 4th input, 1x1
    fc7 = vgg["classifier.3.weight"].index_select(0, every4th).index_select(1, every4th)
    conv7 = model.backbone[33]
    assert conv7.kernel_size == (1, 1)
    assert torch.equal(conv7.weight, fc7.reshape(1024, 1024, 1, 1))
    assert torch.equal(conv7.bias, vgg["classifier.3.bias"].index_select(0, every4th))
    # the 1000-way classifier has no SSD counterpart; nothing else is in the state
    assert set(weights.state) == set(model.backbone.state_dict())


def test_build_model_alone_never_fetches_imagenet(published, monkeypatch, tmp_path) -> None:
    """Tests and benchmarks build the presets all the time: no read, no probe, no download."""
    home, vgg, _ = published
    use_torch_home(monkeypatch, tmp_path / "empty")

    def no_probe(*args, **kwargs):
        raise AssertionError("build_model probed the network")

    monkeypatch.setattr(weights_module, "network_reachable", no_probe)
    no_download(monkeypatch)
    for preset in ("ssd300_vgg16", "mobilenetv2_ssdlite300"):
        cfg = load_config(preset)
        assert cfg.model.backbone_weights == "imagenet"
        build_model(cfg)  # keeps its initialisation
    # with the file in the cache too: build_model(cfg) does not read it
    use_torch_home(monkeypatch, home)
    model = build_model(load_config("ssd300_vgg16"))
    assert not torch.equal(model.backbone[0].weight, vgg["features.0.weight"])


def test_mobilenetv2_preset_loads_torchvision_weights(published, monkeypatch) -> None:
    home, _, mnv2 = published
    use_torch_home(monkeypatch, home)
    no_download(monkeypatch)
    cfg = load_config("mobilenetv2_ssdlite300")
    weights = resolve_backbone_weights(cfg)
    assert "MobileNet_V2_Weights.IMAGENET1K_V1" in weights.source
    model = build_model(cfg, backbone=weights)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, mnv2[f"features.{key}"]), key
    # what the driver ships to the workers through Ray pickles whole
    again = pickle.loads(pickle.dumps(weights))
    assert again.sha256 == weights.sha256 and again.state.keys() == weights.state.keys()


def test_ssd512_preset_uses_the_same_published_vgg16() -> None:
    cfg = load_config("ssd512_vgg16")
    assert cfg.model.backbone_weights == "imagenet" and cfg.augment.input_convention == "rgb"
    assert weights_module.published_weights(cfg.model.arch).url.endswith("/" + VGG_FILE)


# ------------------------------------------------------------------ offline
def test_offline_with_an_empty_cache_is_one_line_within_3_s(monkeypatch, tmp_path, offline) -> None:
    checkpoints = use_torch_home(monkeypatch, tmp_path / "torch")
    cfg = load_config("ssd300_vgg16")
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsUnavailable) as caught:
        resolve_backbone_weights(cfg)
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    assert elapsed < 3.0, elapsed
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert VGG_FILE in message and str(checkpoints) in message  # the file and the cache folder
    assert "model.backbone_weights=PATH|s3://" in message  # pre-staged elsewhere
    assert "model.backbone_weights=none" in message  # or from scratch
    assert not any(checkpoints.iterdir())


def test_offline_error_is_bounded_when_name_resolution_hangs(monkeypatch, tmp_path) -> None:
    use_torch_home(monkeypatch, tmp_path / "torch")
    no_download(monkeypatch)

    def slow_dns(*args, **kwargs):  # a resolver that never answers in time
        time.sleep(5)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsUnavailable, match=MNV2_FILE):
        resolve_backbone_weights(load_config("mobilenetv2_ssdlite300"))
    assert time.perf_counter() - start < 3.0


# ------------------------------------------------------------------ refusals
def test_nan_weights_are_refused_naming_the_tensor(published, monkeypatch, tmp_path, offline) -> None:
    _, _, mnv2 = published
    checkpoints = use_torch_home(monkeypatch, tmp_path / "torch")
    broken = dict(mnv2)
    broken["features.3.conv.1.0.weight"] = mnv2["features.3.conv.1.0.weight"].clone()
    broken["features.3.conv.1.0.weight"][2, 0, 1, 1] = float("nan")
    torch.save(broken, checkpoints / MNV2_FILE)
    with pytest.raises(ValueError, match=r"tensor features\.3\.conv\.1\.0\.weight .*1 NaN/Inf"):
        resolve_backbone_weights(load_config("mobilenetv2_ssdlite300"))
    # IMAGENET1K_FEATURES-like: a classifier of NaN / Inf
    broken = dict(mnv2)
    broken["classifier.1.weight"] = torch.full_like(mnv2["classifier.1.weight"], float("inf"))
    torch.save(broken, checkpoints / MNV2_FILE)
    with pytest.raises(ValueError, match=r"tensor classifier\.1\.weight \(1000, 1280\)"):
        resolve_backbone_weights(load_config("mobilenetv2_ssdlite300"))


def test_a_wrong_architecture_is_refused_naming_the_keys(
    published, monkeypatch, tmp_path, offline
) -> None:
    _, vgg, mnv2 = published
    checkpoints = use_torch_home(monkeypatch, tmp_path / "torch")
    torch.save(mnv2, checkpoints / VGG_FILE)  # MobileNetV2 under VGG16's name
    cfg = load_config("ssd300_vgg16")
    with pytest.raises(ValueError, match=r"do not fit the vgg16_ssd300 backbone: unexpected keys: "
                                         r"0\.0\.weight.*missing keys: 0\.bias"):
        resolve_backbone_weights(cfg)
    # a VGG16 whose conv5_3 has the wrong shape (features only: fc6/fc7 are optional)
    features = {k: v for k, v in vgg.items() if k.startswith("features.")}
    features["features.28.weight"] = torch.zeros(256, 512, 3, 3)
    path = tmp_path / "vgg16_features.pth"
    torch.save(features, path)
    bad = load_config("ssd300_vgg16", [f"model.backbone_weights={path}"])
    with pytest.raises(ValueError, match=r"shape mismatches: 28\.weight \(file \(256, 512, 3, 3\), "
                                         r"model \(512, 512, 3, 3\)\)"):
        resolve_backbone_weights(bad)
    with pytest.raises(ValueError, match=r"28\.weight"):  # the same check in build_model
        build_model(bad)


def test_mobilenetv1_and_tiny_refuse_imagenet_in_one_line() -> None:
    with pytest.raises(ConfigError, match="torchvision has no MobileNetV1") as caught:
        load_config("mobilenetv1_ssd300", ["model.backbone_weights=imagenet"])
    assert "\n" not in str(caught.value) and "model.backbone_weights=none" in str(caught.value)
    with pytest.raises(ConfigError, match="no published ImageNet weights for tiny"):
        load_config("tiny", ["model.backbone_weights=imagenet"])
    assert load_config("mobilenetv1_ssd300").model.backbone_weights == "none"
    assert load_config("tiny").model.backbone_weights is None


def test_imagenet_weights_need_width_1(monkeypatch, tmp_path, offline) -> None:
    use_torch_home(monkeypatch, tmp_path / "torch")
    cfg = load_config("mobilenetv2_ssdlite300", ["model.width_mult=0.5"])  # builds from scratch
    build_model(cfg)
    with pytest.raises(ConfigError, match=r"model\.width_mult=1\.0, got 0\.5"):
        resolve_backbone_weights(cfg)


# ------------------------------------------------------------------ from scratch
@pytest.mark.parametrize("value", ["none", "null"])
def test_none_trains_from_scratch(published, monkeypatch, value) -> None:
    home, vgg, _ = published
    use_torch_home(monkeypatch, home)  # the file is there, and unused
    cfg = load_config("ssd300_vgg16", [f"model.backbone_weights={value}"])
    assert resolve_backbone_weights(cfg) is None
    model = build_model(cfg)
    assert not torch.equal(model.backbone[0].weight, vgg["features.0.weight"])


# ------------------------------------------------------------------ other sources
def _tiny_backbone_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in build_model(load_config("tiny")).backbone.state_dict().items()}
    path = tmp_path / "tiny_backbone.pt"
    torch.save(state, path)
    return path, state


def test_s3_and_url_sources(monkeypatch, tmp_path, offline) -> None:
    path, state = _tiny_backbone_file(tmp_path)
    data = path.read_bytes()
    read: list[str] = []

    def fake_read_bytes(location):
        read.append(location)
        return data

    monkeypatch.setattr(storage, "read_bytes", fake_read_bytes)
    cfg = load_config("tiny", ["model.backbone_weights=s3://weights/tiny_backbone.pt"])
    weights = resolve_backbone_weights(cfg)
    assert read == ["s3://weights/tiny_backbone.pt"]
    assert weights.sha256 == hashlib.sha256(data).hexdigest()
    model = build_model(cfg, backbone=weights)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    # an http(s) URL already in torch.hub's cache is read from there, with no network
    checkpoints = use_torch_home(monkeypatch, tmp_path / "torch")
    (checkpoints / "tiny-0123abcd.pt").write_bytes(data)
    url = load_config("tiny", ["model.backbone_weights=https://example.org/w/tiny-0123abcd.pt"])
    assert resolve_backbone_weights(url).sha256 == weights.sha256


# ------------------------------------------------------------------ normalisation
def test_normalisation_follows_the_weights_convention(vgg_resolved, monkeypatch, tmp_path) -> None:
    cfg, weights = vgg_resolved
    assert weights.input_convention == cfg.augment.input_convention == "rgb"
    assert cfg.augment.mean == IMAGENET_MEAN and cfg.augment.std == IMAGENET_STD
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    got = network_input(batch, cfg, torch.device("cpu"), torch.contiguous_format)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(got, (batch / 255 - mean) / std, atol=1e-5)

    # a Caffe-style file (ssd.pytorch's vgg16_reducedfc.pth): BGR, 0-255 minus (104, 117, 123)
    path, _ = _tiny_backbone_file(tmp_path)
    caffe = load_config("tiny", [f"model.backbone_weights={path}", "augment.input_convention=caffe_bgr"])
    assert resolve_backbone_weights(caffe).input_convention == "caffe_bgr"
    got = network_input(batch, caffe, torch.device("cpu"), torch.contiguous_format)
    want = batch.flip(1).float() - torch.tensor([104.0, 117.0, 123.0]).view(3, 1, 1)
    assert torch.equal(got, want)


def test_normalisation_that_conflicts_with_the_weights_is_an_error(
    monkeypatch, tmp_path, offline
) -> None:
    use_torch_home(monkeypatch, tmp_path / "torch")  # empty: the check comes before any read
    with pytest.raises(ConfigError, match=r"augment\.mean=\[0\.5, 0\.5, 0\.5\] conflicts with "
                                          r"augment\.input_convention=rgb, whose mean is \[0\.485"):
        load_config("ssd300_vgg16", ["augment.mean=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"augment\.mean=\[104, 117, 123\] conflicts with "
                                          r"augment\.input_convention=caffe_bgr"):
        load_config("tiny", ["augment.input_convention=caffe_bgr", "augment.mean=[104, 117, 123]"])
    wrong = load_config("ssd300_vgg16", ["augment.input_convention=caffe_bgr"])
    with pytest.raises(ConfigError, match=r"augment\.input_convention=caffe_bgr conflicts with the "
                                          r"backbone weights model\.backbone_weights=imagenet, "
                                          r"which take rgb input"):
        resolve_backbone_weights(wrong)
    # free statistics (no convention) with weights: checked against the weights' rgb
    path, _ = _tiny_backbone_file(tmp_path)
    free = load_config("tiny", [f"model.backbone_weights={path}", "augment.std=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"augment\.mean/std \(.*std \(0\.5, 0\.5, 0\.5\)\) "
                                          r"conflict with the backbone weights"):
        resolve_backbone_weights(free)
    # the same statistics without weights are fine
    load_config("tiny", ["augment.std=[0.5, 0.5, 0.5]"])


def test_the_resolved_config_round_trips(vgg_resolved) -> None:
    """What a checkpoint stores (the resolved config) reads back the same."""
    from ssd.config import config_from_dict

    cfg, _ = vgg_resolved
    assert config_from_dict(cfg.to_dict()) == cfg
    caffe = load_config("tiny", ["augment.input_convention=caffe_bgr"])
    assert config_from_dict(caffe.to_dict()) == caffe
    buffer = io.StringIO(caffe.to_yaml())
    assert "input_convention: caffe_bgr" in buffer.getvalue()


def test_a_training_job_refuses_missing_imagenet_weights_before_ray(monkeypatch, tmp_path, offline) -> None:
    """pipelines/train.py with the default ssd300_vgg16 config and an empty cache: the one-line
    error as the job's exit message, before any Ray cluster starts, within 3 s."""
    import importlib.util
    import sys

    from ssd.data.convert import ensure_synthetic_shards

    data = ensure_synthetic_shards(tmp_path / "data", 40, 8, log=lambda _: None)
    checkpoints = use_torch_home(monkeypatch, tmp_path / "torch")
    spec = importlib.util.spec_from_file_location("_train_script", Path(__file__).parents[1] / "pipelines" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.get_args_parser().parse_args(
        ["--config", "ssd300_vgg16", "--data", str(data), "--workers", "1", "--address", "local", "--no-mlflow",
         "--storage-path", str(tmp_path / "runs")])
    start = time.perf_counter()
    with pytest.raises(SystemExit) as caught:
        script.main(args)
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert VGG_FILE in message and str(checkpoints) in message and "model.backbone_weights=none" in message
    assert elapsed < 3.0, elapsed
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
