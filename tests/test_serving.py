"""ssd.serving.Detector: every input kind gives the same detections, in original pixels."""

from __future__ import annotations

import pytest
import torch
from torchvision.io import encode_png

from ssd.checkpoint import save_checkpoint
from ssd.config import load_config
from ssd.engine import predict
from ssd.models import build_model
from ssd.serving import COLUMNS, Detector
from ssd.transforms import build_transform

CLASSES = [f"class{i}" for i in range(1, 7)]


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 (3, H, W): smooth blobs on noise, so a random model finds a few hundred boxes."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 5, 6), generator=g, dtype=torch.uint8)
    base = torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="bilinear")[0]
    noise = torch.randint(-20, 21, (3, height, width), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("tiny", ["model.num_classes=7"])
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("serving") / "ckpt"
    save_checkpoint(path, model=model, epoch=1, step=10, config=cfg, classes=CLASSES)
    return path


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint)


def _png(tmp_path, image: torch.Tensor, name: str = "a.png"):
    data = encode_png(image).numpy().tobytes()
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def test_path_bytes_array_and_tensor_give_identical_rows(detector, tmp_path):
    image = _image(80, 96, seed=1)
    path, data = _png(tmp_path, image)
    array = image.permute(1, 2, 0).numpy()  # (H, W, 3)
    per_kind = [detector.predict([item]) for item in (path, str(path), data, array, image)]
    assert per_kind[0], "a random model should still detect something at score 0.01"
    assert all(rows == per_kind[0] for rows in per_kind)
    assert list(per_kind[0][0]) == list(COLUMNS)
    # Mixed in one batch: the same detections (up to batched-convolution rounding), each
    # tagged with its position in the input.
    mixed = detector.predict([path, data, array, image])
    for index in range(4):
        got = [r for r in mixed if r["image"] == index]
        assert [r["label"] for r in got] == [r["label"] for r in per_kind[0]]
        for a, b in zip(got, per_kind[0]):
            assert [a[k] for k in COLUMNS[3:]] == pytest.approx([b[k] for k in COLUMNS[3:]], abs=1e-4)


def test_boxes_are_in_original_pixels_like_a_hand_run_evaluation(detector, checkpoint):
    cfg = detector.cfg
    size = cfg.priors.image_size
    model = build_model(cfg)
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True))
    transform = build_transform(size, 0.0, train=False, min_size=0.0, normalize=True,
                                mean=cfg.augment.mean, std=cfg.augment.std)
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    images = [_image(80, 96, seed=2), _image(120, 64, seed=3)]  # landscape and portrait
    rows = detector.predict(images, batch_size=2)
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        x, _ = transform(image, empty)
        x = x[None].contiguous(memory_format=torch.channels_last)  # as cfg.train.channels_last
        (det,) = predict(model, x, cfg.postprocess, image_sizes=torch.tensor([[size, size]]))
        want = det["boxes"] * torch.tensor([width / size, height / size] * 2)
        got = [r for r in rows if r["image"] == index]
        assert len(got) == len(det["scores"]) > 0
        boxes = torch.tensor([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in got])
        torch.testing.assert_close(boxes, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.tensor([r["score"] for r in got]), det["scores"])
        assert [r["label"] for r in got] == det["labels"].tolist()
        assert [r["class_name"] for r in got] == [CLASSES[k - 1] for k in det["labels"].tolist()]
        assert boxes[:, 2].max() <= width + 1e-3 and boxes[:, 3].max() <= height + 1e-3


def _unmatched(rows: list[dict], others: list[dict], tol: float) -> list[dict]:
    """The rows of ``rows`` without a partner in ``others``: same image and label, score and
    box within ``tol``, each partner used once (best scores first)."""
    free = list(others)
    left = []
    for row in sorted(rows, key=lambda r: -r["score"]):
        partner = next((o for o in free if o["image"] == row["image"] and o["label"] == row["label"]
                        and all(abs(o[k] - row[k]) <= tol for k in COLUMNS[3:])), None)
        if partner is None:
            left.append(row)
        else:
            free.remove(partner)
    return left


def test_batching_does_not_change_results(detector):
    """The same detections one image at a time and batched, up to batched-convolution rounding
    (1e-4). A random model gives hundreds of nearly tied scores, so rounding may swap two tied
    detections' order, or which of two tied detections makes an image's top-k cut: only
    detections within the tolerance of their image's lowest kept score may lack a partner."""
    images = [_image(80, 96, seed=4), _image(60, 60, seed=5), _image(100, 90, seed=6)]
    one_by_one = detector.predict(images, batch_size=1)
    batched = detector.predict(images, batch_size=16)
    assert {r["image"] for r in one_by_one} == {0, 1, 2}
    for a, b in ((one_by_one, batched), (batched, one_by_one)):
        lowest = {i: min(r["score"] for r in a if r["image"] == i) for i in range(3)}
        left = _unmatched(a, b, tol=1e-4)
        assert all(r["score"] <= lowest[r["image"]] + 1e-4 for r in left), left[:3]
        assert len(left) <= 2, left
    for rows in (one_by_one, batched):  # each image's rows best first, images in input order
        keys = [(r["image"], -r["score"]) for r in rows]
        assert keys == sorted(keys)
    assert detector.predict([]) == []


def test_bad_inputs_name_their_index(detector, tmp_path):
    good = _image(80, 96, seed=7)
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (42, TypeError, "image 1: unsupported input type int"),
        (good.permute(1, 2, 0).numpy().astype("float32"), TypeError, "image 1: an array must be"),
        (good.permute(1, 2, 0), TypeError, r"image 1: a tensor must be \(3, H, W\) uint8"),
        (tmp_path / "missing.png", ValueError, "image 1: cannot read file .*missing.png"),
        (tmp_path / "notes.txt", ValueError, "image 1: cannot decode file .*notes.txt"),
        (b"", ValueError, "image 1: cannot decode 0 bytes"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            detector.predict([good, bad])
    with pytest.raises(TypeError, match="wrap it in a list"):
        detector.predict(good)
    with pytest.raises(ValueError, match="batch_size"):
        detector.predict([good], batch_size=0)


def test_class_names_must_match_the_model(detector):
    with pytest.raises(ValueError, match="expected 6"):
        Detector(detector.model, detector.cfg, CLASSES[:-1])
