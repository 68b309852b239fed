"""Tests for ssd.transforms: hand-computed geometry, colour ops against independent references,
and invariants of the full SSD preset over many seeds. CPU only, a few seconds."""

from __future__ import annotations

import colorsys
import dataclasses

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from ssd.boxes import box_iou
from ssd.config import AugmentConfig
from ssd.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Expand,
    HorizontalFlip,
    IoUCrop,
    Normalize,
    PhotometricDistort,
    Resize,
    SanitizeBoxes,
    ToRelativeBoxes,
    ZoomOut,
    build_transform,
    crop,
    expand,
    hflip,
    normalize,
    photometric_distort,
    resize,
)

RED, GREEN, BLUE, YELLOW = (250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run like a DataLoader worker (torch uses one thread there). On a shared 2-core box,
    intra-op threads on these small images only wait on each other: 100x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_target(boxes, labels=None, **extra) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if labels is None:
        labels = torch.arange(1, boxes.shape[0] + 1)
    return {"boxes": boxes, "labels": torch.as_tensor(labels, dtype=torch.int64), **extra}


def paint(image: torch.Tensor, box, colour) -> None:
    """Fill integer xyxy ``box`` of a (3, H, W) uint8 image with ``colour`` in place."""
    x1, y1, x2, y2 = (int(v) for v in box)
    image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)


def colour_sample(rng: torch.Generator) -> tuple[torch.Tensor, dict]:
    """A 200 x 300 grey image with four disjoint boxes, each painted its label's colour."""
    image = torch.full((3, 200, 300), 128, dtype=torch.uint8)
    boxes = [[10, 10, 110, 90], [150, 20, 290, 100], [20, 120, 100, 190], [160, 115, 280, 195]]
    for box, colour in zip(boxes, (RED, GREEN, BLUE, YELLOW), strict=True):
        paint(image, box, colour)
    labels = torch.tensor([1, 2, 3, 4])
    target = make_target(
        boxes, labels, difficult=labels % 2 == 0, iscrowd=labels % 3, image_id=42, width=300
    )
    return image, target


def random_sample(rng: torch.Generator, n: int, height: int = 120, width: int = 160):
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=rng)
    xy = torch.rand(n, 2, generator=rng) * torch.tensor([width, height])
    wh = torch.rand(n, 2, generator=rng) * torch.tensor([width, height]) * 0.6 + 1
    boxes = torch.cat((xy, (xy + wh).minimum(torch.tensor([width, height]))), dim=1)
    labels = torch.randint(1, 21, (n,), generator=rng)
    target = {
        "boxes": boxes, "labels": labels, "difficult": labels % 2 == 0, "iscrowd": labels % 3,
        "image_id": torch.tensor([7]), "height": height, "width": width,
    }
    return image, target


# --------------------------------------------------------------------------------------------
# flip


def test_hflip_maps_x_exactly_and_moves_the_content_with_the_boxes():
    image = torch.zeros((3, 4, 10), dtype=torch.uint8)
    paint(image, (1, 0, 3, 2), RED)
    target = make_target([[1, 0, 3, 2], [0, 1, 10, 4], [2.5, 1, 7.25, 3]], image_id=5)
    before = target["boxes"].clone()

    out_image, out = hflip(image, target)

    expected = torch.tensor([[7, 0, 9, 2], [0, 1, 10, 4], [2.75, 1, 7.5, 3]])
    assert torch.equal(out["boxes"], expected)
    assert torch.equal(out_image, image.flip(-1))
    red = torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)
    assert (out_image[:, 0:2, 7:9] == red).all() and not (out_image[:, 0:2, 1:3] == red).all()
    assert torch.equal(out["labels"], target["labels"]) and out["image_id"] == 5
    assert torch.equal(target["boxes"], before)  # input untouched


def test_horizontal_flip_probability_follows_strength():
    image, target = colour_sample(gen(0))
    always = HorizontalFlip(generator=gen(0), p=1.0)
    never = HorizontalFlip(0.0, generator=gen(0))
    default = HorizontalFlip(generator=gen(0))
    assert torch.equal(always(image, target)[0], image.flip(-1))
    assert all(never(image, target)[0] is image for _ in range(50))
    flips = sum(default(image, target)[0] is not image for _ in range(400))
    assert 150 < flips < 250  # p = 0.5 at strength 1


# --------------------------------------------------------------------------------------------
# expand / zoom out


def test_expand_shifts_boxes_by_the_offset_and_content_follows():
    image = torch.full((3, 20, 30), 60, dtype=torch.uint8)
    paint(image, (5, 4, 15, 12), RED)
    target = make_target([[5, 4, 15, 12]], difficult=torch.tensor([True]))

    canvas, out = expand(image, target, (50, 70), top=7, left=11, fill=(1, 2, 3))

    assert canvas.shape == (3, 50, 70) and canvas.dtype == torch.uint8
    assert torch.equal(out["boxes"], torch.tensor([[16.0, 11, 26, 19]]))
    assert (canvas[:, 11:19, 16:26] == torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)).all()
    assert torch.equal(canvas[:, 7:27, 11:41], image)
    fill = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert torch.equal(canvas[:, 0, 0], fill) and torch.equal(canvas[:, 49, 69], fill)
    assert torch.equal(canvas[:, 27, 11], fill) and torch.equal(canvas[:, 7, 41], fill)
    assert torch.equal(out["difficult"], target["difficult"])
    with pytest.raises(ValueError):
        expand(image, target, (25, 30), top=6, left=0, fill=(0, 0, 0))


def test_random_expand_fills_with_mean_and_respects_the_strength_scaled_ratio():
    image, target = colour_sample(gen(0))
    mean_colour = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
    assert ZoomOut is Expand
    for strength, max_ratio in ((1.0, 4.0), (0.5, 2.5)):
        transform = Expand(strength, generator=gen(1), p=1.0)
        assert transform.max_ratio == max_ratio  # 1 + 3 * strength
        ratios = []
        for _ in range(30):
            canvas, out = transform(image, target)
            ratio = canvas.shape[-1] / image.shape[-1]
            assert 1.0 <= ratio <= max_ratio + 1e-6
            ratios.append(ratio)
            kept = out["boxes"].int().tolist()
            for box, colour in zip(kept, (RED, GREEN, BLUE, YELLOW), strict=True):
                patch = canvas[:, box[1] : box[3], box[0] : box[2]]
                assert (patch == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all()
            # The canvas is as large as the image in at least one corner direction's margin:
            corners = canvas[:, [0, 0, -1, -1], [0, -1, 0, -1]].T  # (4, 3)
            if ratio > 1.05:
                assert (corners == mean_colour).all(dim=1).any()
        assert max(ratios) > 1 + 0.6 * (max_ratio - 1)  # the range is actually used
    assert Expand(0.0, generator=gen(0))(image, target)[0] is image


# --------------------------------------------------------------------------------------------
# IoU crop


def test_crop_keeps_exactly_the_boxes_whose_centre_is_inside_and_clips_them():
    image = torch.randint(0, 256, (3, 100, 100), dtype=torch.uint8, generator=gen(0))
    boxes = [
        [10, 10, 30, 30],  # centre (20, 20) inside -> clipped on the top edge
        [50, 40, 90, 80],  # centre (70, 60) right of the crop -> dropped
        [40, 0, 58, 20],  # centre (49, 10) inside -> clipped on top
        [10, 40, 20, 60],  # centre (15, 50) exactly on the left edge -> dropped (strict)
        [0, 0, 90, 90],  # centre (45, 45) inside, contains the crop -> the whole crop
    ]
    target = make_target(
        boxes, [1, 2, 3, 4, 5], difficult=torch.tensor([False, True, False, True, True]),
        iscrowd=torch.tensor([0, 1, 0, 0, 1]), image_id=3,
    )
    rect = (15, 5, 60, 50)

    out_image, out = crop(image, target, rect)

    assert torch.equal(out_image, image[:, 5:50, 15:60])
    expected = torch.tensor([[0.0, 5, 15, 25], [25, 0, 43, 15], [0, 0, 45, 45]])
    assert torch.equal(out["boxes"], expected)
    assert out["labels"].tolist() == [1, 3, 5]
    assert out["difficult"].tolist() == [False, False, True]
    assert out["iscrowd"].tolist() == [0, 0, 1]
    assert out["image_id"] == 3


def test_sample_rect_satisfies_the_min_iou_constraint():
    sampler = IoUCrop(generator=gen(0))
    height, width = 120, 160
    smaller = 0
    for seed in range(40):
        _, target = random_sample(gen(seed), 4, height, width)
        boxes = target["boxes"]
        for min_iou in (0.1, 0.3, 0.5, 0.7, 0.9):
            rect = sampler.sample_rect(boxes, height, width, min_iou)
            if rect is None:
                continue
            x1, y1, x2, y2 = rect.tolist()
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            # sides at least 0.3 of the image's (less one pixel of flooring)
            assert x2 - x1 >= 0.3 * width - 1 and y2 - y1 >= 0.3 * height - 1
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = (centres > rect[:2]) & (centres < rect[2:])
            kept = inside.all(dim=1)
            iou = box_iou(rect[None].float(), boxes)[0]
            assert (iou[kept] >= min_iou).any(), (seed, min_iou, rect, boxes)
            smaller += (x2 - x1) * (y2 - y1) < 0.9 * width * height
    assert smaller > 50  # it really crops, not just returns the whole image


def test_sample_rect_fails_cleanly_when_the_constraint_is_impossible():
    # a 2 x 2 box can never reach IoU 0.5 with a patch of side >= 0.3 * 100
    boxes = torch.tensor([[10.0, 10, 12, 12]])
    assert IoUCrop(generator=gen(0)).sample_rect(boxes, 100, 100, 0.5) is None
    assert IoUCrop(generator=gen(0)).sample_rect(boxes, 100, 100, 0.0) is not None


def test_iou_crop_drops_boxes_with_their_flags_and_keeps_n0_whole():
    image, target = colour_sample(gen(0))
    transform = IoUCrop(generator=gen(3), options=(0.1,))  # never the whole image
    dropped = 0
    for _ in range(40):
        out_image, out = transform(image, target)
        n = out["boxes"].shape[0]
        assert 1 <= n <= 4 and out["labels"].shape == (n,) and out["difficult"].shape == (n,)
        assert torch.equal(out["difficult"], out["labels"] % 2 == 0)
        assert torch.equal(out["iscrowd"], out["labels"] % 3)
        h, w = out_image.shape[-2:]
        assert (out["boxes"] >= 0).all() and (out["boxes"][:, 2] <= w).all()
        assert (out["boxes"][:, 3] <= h).all()
        dropped += n < 4
    assert dropped > 0
    empty = make_target([])
    assert IoUCrop(generator=gen(0))(image, empty)[0] is image


def test_iou_crop_strength_scales_probability_and_min_side():
    assert IoUCrop(0.5).min_scale == pytest.approx(0.65)  # 1 - 0.7 * strength
    assert IoUCrop(1.0).min_scale == pytest.approx(0.3)
    image, target = colour_sample(gen(0))
    never = IoUCrop(0.0, generator=gen(0), options=(0.1,))
    assert all(never(image, target)[0] is image for _ in range(20))


# --------------------------------------------------------------------------------------------
# colour


def test_hsv_round_trip_is_exact_and_hue_matches_torchvision():
    image = torch.randint(0, 256, (3, 37, 41), dtype=torch.uint8, generator=gen(0))
    image[:, 0, :5] = 77  # some grey pixels (chroma 0)
    assert torch.equal(photometric_distort(image, saturation=1.0, hue=0.0), image)
    for degrees in (18.0, -18.0, 7.3):
        ours = photometric_distort(image, hue=degrees)
        reference = F.adjust_hue(image, degrees / 360.0)
        assert (ours.int() - reference.int()).abs().max() <= 1


def test_saturation_matches_colorsys():
    image = torch.randint(0, 256, (3, 6, 7), dtype=torch.uint8, generator=gen(1))
    for factor in (0.5, 1.5):
        ours = photometric_distort(image, saturation=factor)
        pixels = zip(image.reshape(3, -1).T.tolist(), ours.reshape(3, -1).T.tolist(), strict=True)
        for pixel, out in pixels:
            h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in pixel))
            expected = colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)
            assert all(abs(o - round(e * 255)) <= 1 for o, e in zip(out, expected, strict=True))


def test_brightness_contrast_and_order():
    image = torch.tensor([[[0, 100, 230, 255]], [[10, 50, 90, 200]], [[255, 0, 128, 64]]],
                         dtype=torch.uint8)
    bright = photometric_distort(image, brightness=32.0)
    assert torch.equal(bright, (image.int() + 32).clamp(0, 255).to(torch.uint8))
    contrast = photometric_distort(image, contrast=1.5)
    assert torch.equal(contrast, (image.float() * 1.5).clamp(0, 255).round().to(torch.uint8))
    # contrast saturates at 255, so applying it before or after the HSV ops differs
    first = photometric_distort(image, contrast=1.5, saturation=0.5, contrast_first=True)
    last = photometric_distort(image, contrast=1.5, saturation=0.5, contrast_first=False)
    by_hand_first = photometric_distort(photometric_distort(image, contrast=1.5), saturation=0.5)
    by_hand_last = photometric_distort(photometric_distort(image, saturation=0.5), contrast=1.5)
    assert not torch.equal(first, last)
    assert (first.int() - by_hand_first.int()).abs().max() <= 1
    assert (last.int() - by_hand_last.int()).abs().max() <= 1


def test_photometric_distort_strength_and_target():
    image, target = colour_sample(gen(0))
    off = PhotometricDistort(0.0, generator=gen(0))
    assert all(off(image, target)[0] is image for _ in range(20))
    on = PhotometricDistort(generator=gen(0), p=1.0)
    out_image, out_target = on(image, target)
    assert out_target is target and out_image.dtype == torch.uint8
    assert not torch.equal(out_image, image)
    half = PhotometricDistort(0.5)
    assert half.p == 0.25 and half.brightness_delta == 16 and half.hue_delta == 9
    assert half.contrast_range == (0.75, 1.25) and half.saturation_range == (0.75, 1.25)


# --------------------------------------------------------------------------------------------
# resize / sanitize / normalise


def test_resize_is_antialiased_and_scales_boxes():
    # a 1-pixel checkerboard: bilinear without antialias at scale 3 samples single pixels
    # (0 or 255); with antialias it averages them to mid-grey.
    yy, xx = torch.meshgrid(torch.arange(30), torch.arange(60), indexing="ij")
    image = (((yy + xx) % 2) * 255).to(torch.uint8).expand(3, 30, 60).contiguous()
    target = make_target([[0, 0, 60, 30], [6, 3, 12, 9]])
    out_image, out = resize(image, target, (10, 20))
    assert out_image.shape == (3, 10, 20) and out_image.dtype == torch.uint8
    assert out_image.min() >= 90 and out_image.max() <= 165
    assert torch.allclose(out["boxes"], torch.tensor([[0.0, 0, 20, 10], [2, 1, 4, 3]]))


def test_sanitize_drops_degenerate_boxes_with_their_flags():
    image = torch.zeros((3, 20, 20), dtype=torch.uint8)
    target = make_target(
        [[0, 0, 0.5, 10], [0, 0, 10, 10], [5, 5, 5, 8], [-5, -5, 3, 3], [float("nan"), 0, 4, 4],
         [19.5, 0, 30, 10], [8, 9, 4, 12], [float("-inf"), 0, 4, 4]],
        difficult=torch.tensor([True, False, True, True, False, True, False, True]),
    )
    _, out = SanitizeBoxes(1.0)(image, target)
    assert torch.equal(out["boxes"], torch.tensor([[0.0, 0, 10, 10], [0, 0, 3, 3]]))
    assert out["labels"].tolist() == [2, 4] and out["difficult"].tolist() == [False, True]


def test_to_relative_and_normalize():
    image = torch.zeros((3, 10, 20), dtype=torch.uint8)
    image[:, :, 10:] = 255
    _, out = ToRelativeBoxes()(image, make_target([[0, 0, 20, 10], [5, 2.5, 10, 5]]))
    assert out["boxes"].dtype == torch.float32
    assert torch.allclose(out["boxes"], torch.tensor([[0.0, 0, 1, 1], [0.25, 0.25, 0.5, 0.5]]))
    normalised, _ = Normalize()(image, {})
    as_float = F.to_dtype(image, torch.float32, scale=True)
    reference = F.normalize(as_float, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised, reference, atol=1e-5)


def test_caffe_bgr_normalisation_is_bgr_minus_the_caffe_mean():
    """ssd.pytorch's reduced-fc VGG16: BGR order, 0-255 pixels minus (104, 117, 123), std 1."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 7, 7), dtype=torch.uint8)
    config = AugmentConfig(input_convention="caffe_bgr")
    assert config.mean == pytest.approx((123 / 255, 117 / 255, 104 / 255))
    want = image.flip(0).float() - torch.tensor([104.0, 117.0, 123.0]).view(3, 1, 1)
    normalised, _ = Normalize(config.mean, config.std, config.input_convention)(image, {})
    assert torch.equal(normalised, want)
    batch = torch.stack([image, image.flip(2)])
    assert torch.equal(normalize(batch, config.mean, config.std, "caffe_bgr")[0], want)
    # the preset takes the convention like the other AugmentConfig keys
    transform = build_transform(7, train=False, min_size=0.0, **dataclasses.asdict(config))
    assert torch.equal(transform(image, make_target([[0, 0, 4, 4]]))[0], want)
    # rgb and null: RGB order, as before
    for convention in ("rgb", None):
        rgb = normalize(image, IMAGENET_MEAN, IMAGENET_STD, convention)
        assert torch.equal(rgb, normalize(image, IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match="unknown input convention 'bgr'"):
        normalize(image, input_convention="bgr")


# --------------------------------------------------------------------------------------------
# the preset


def test_strength_zero_equals_eval_bit_for_bit():
    evaluate = build_transform(300, train=False)
    for seed in range(8):
        image, target = random_sample(gen(seed), seed % 4, 100 + 10 * seed, 140 - 5 * seed)
        target["boxes"][:1, 2] = target["boxes"][:1, 0] + 0.2  # a box too thin to keep
        train = build_transform(300, strength=0.0, generator=gen(seed))
        a_image, a = train(image, target)
        b_image, b = evaluate(image, target)
        assert torch.equal(a_image, b_image)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_eval_transform_output_contract():
    image, target = colour_sample(gen(0))
    out_image, out = build_transform(300, train=False)(image, target)
    assert out_image.shape == (3, 300, 300) and out_image.dtype == torch.float32
    assert torch.allclose(out["boxes"], target["boxes"] / torch.tensor([300.0, 200, 300, 200]))
    assert out["image_id"] == 42 and out["width"] == 300


def test_strength_one_invariants_over_many_seeds():
    transform = build_transform(300, strength=1.0, generator=gen(0))
    evaluate = build_transform(300, train=False)
    changed = dropped = 0
    for seed in range(120):
        image, target = random_sample(gen(seed), 1 + seed % 6)
        out_image, out = transform(image, target)
        boxes = out["boxes"]
        n = boxes.shape[0]
        assert out_image.shape == (3, 300, 300) and out_image.dtype == torch.float32
        assert torch.isfinite(out_image).all()
        assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 1 / 300 - 1e-6).all()  # positive, >= 1 px
        assert out["labels"].shape == (n,) and out["labels"].dtype == torch.int64
        assert torch.equal(out["difficult"], out["labels"] % 2 == 0)  # flags still aligned
        assert torch.equal(out["iscrowd"], out["labels"] % 3)
        assert out["image_id"] is target["image_id"] and out["width"] == target["width"]
        changed += not torch.equal(out_image, evaluate(image, target)[0])
        dropped += n < target["boxes"].shape[0]
    assert changed > 100 and dropped > 5  # it does augment


def test_boxes_and_image_content_stay_together_through_the_geometric_chain():
    """Each output box's centre shows its label's colour (photometric off, so colours hold)."""
    strength = 1.0
    g = gen(5)
    transform = Compose([
        Expand(strength, generator=g), IoUCrop(strength, generator=g),
        HorizontalFlip(strength, generator=g), Resize(300), SanitizeBoxes(), ToRelativeBoxes(),
    ])
    colours = torch.tensor([RED, GREEN, BLUE, YELLOW]).float()
    image, target = colour_sample(gen(0))
    for _ in range(60):
        out_image, out = transform(image, target)
        centres = ((out["boxes"][:, :2] + out["boxes"][:, 2:]) / 2 * 300).long().clamp(max=299)
        seen = out_image[:, centres[:, 1], centres[:, 0]].T.float()  # (N', 3)
        assert (seen - colours[out["labels"] - 1]).abs().max() <= 12


def test_empty_targets_work():
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=gen(0))
    target = make_target([], [], difficult=torch.zeros(0, dtype=torch.bool))
    for transform in (build_transform(300, generator=gen(1)), build_transform(300, train=False)):
        for _ in range(10):
            out_image, out = transform(image, target)
            assert out_image.shape == (3, 300, 300)
            assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == torch.float32
            assert out["labels"].shape == (0,) and out["difficult"].shape == (0,)


def test_same_seed_reproduces_and_different_seeds_differ():
    image, target = random_sample(gen(0), 5, 150, 200)

    def run(seed: int) -> list:
        transform = build_transform(300, generator=gen(seed))
        return [transform(image, target) for _ in range(6)]

    first, again, other = run(11), run(11), run(12)
    for (ia, ta), (ib, tb) in zip(first, again, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["labels"], tb["labels"])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_bad_inputs_and_config_defaults():
    with pytest.raises(ValueError):
        build_transform(300, strength=1.5)
    with pytest.raises(ValueError):
        Expand(-0.1)
    image, target = colour_sample(gen(0))
    transform = build_transform(300, train=False)
    with pytest.raises(TypeError):
        transform(image.float(), target)
    with pytest.raises(ValueError):
        transform(image, {**target, "labels": target["labels"][:2]})
    with pytest.raises(ValueError):
        transform(image, {**target, "boxes": target["boxes"].flatten()})
    # the keyword names and defaults line up with AugmentConfig
    config = AugmentConfig()
    assert (config.mean, config.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert build_transform(300, train=True, **dataclasses.asdict(config)) is not None
