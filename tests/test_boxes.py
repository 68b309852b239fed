import math

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from ssd.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    decode,
    encode,
    xyxy_to_cxcywh,
)


def test_conversions_hand_computed_and_round_trip():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    cxcywh = xyxy_to_cxcywh(xyxy)
    assert cxcywh.tolist() == [[30.0, 30.0, 40.0, 20.0]]
    assert torch.equal(cxcywh_to_xyxy(cxcywh), xyxy)


def test_area_clamps_degenerate_boxes():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0]


def test_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    # overlap 1, union 4 + 4 - 1 = 7; identical; disjoint; contained half
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.5]])
    assert torch.allclose(box_iou(a, b), expected)


def test_iou_matches_torchvision_and_broadcasts_over_batch():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 7, 2, generator=g)
    a = torch.cat((xy, xy + torch.rand(3, 7, 2, generator=g)), dim=-1)
    xy = torch.rand(11, 2, generator=g)
    b = torch.cat((xy, xy + torch.rand(11, 2, generator=g)), dim=-1)
    batched = box_iou(a, b)
    assert batched.shape == (3, 7, 11)
    for i in range(3):
        assert torch.allclose(batched[i], tv_box_iou(a[i], b), atol=1e-6)


def test_iou_of_empty_boxes_is_zero_not_nan():
    empty = torch.zeros(1, 4)
    assert box_iou(empty, empty).item() == 0.0


def test_clip():
    boxes = torch.tensor([[-5.0, 3.0, 120.0, 90.0]])
    assert clip_boxes(boxes, height=80, width=100).tolist() == [[0.0, 3.0, 100.0, 80.0]]


def test_encode_hand_computed():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    gt = torch.tensor([[0.42, 0.34, 0.62, 0.74]])  # cx 0.52, cy 0.54, w 0.2, h 0.4
    offsets = encode(gt, priors)
    expected = [
        (0.52 - 0.5) / (0.1 * 0.2),
        (0.54 - 0.5) / (0.1 * 0.4),
        math.log(0.2 / 0.2) / 0.2,
        math.log(0.4 / 0.4) / 0.2,
    ]
    assert torch.allclose(offsets, torch.tensor([expected]), atol=1e-5)
    gt2 = torch.tensor([[0.3, 0.1, 0.7, 0.5]])  # w 0.4 = 2x prior w, h 0.4
    assert offsets.shape == (1, 4)
    assert encode(gt2, priors)[0, 2].item() == pytest.approx(math.log(2) / 0.2, rel=1e-5)


def test_encode_decode_round_trip_batched():
    g = torch.Generator().manual_seed(1)
    priors = torch.cat((torch.rand(50, 2, generator=g), torch.rand(50, 2, generator=g) * 0.5 + 0.05), 1)
    xy = torch.rand(4, 50, 2, generator=g) * 0.5
    boxes = torch.cat((xy, xy + torch.rand(4, 50, 2, generator=g) * 0.4 + 0.01), dim=-1)
    assert torch.allclose(decode(encode(boxes, priors), priors), boxes, atol=1e-5)


def test_encode_matches_torchvision_box_coder():
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(2)
    priors = torch.cat((torch.rand(20, 2, generator=g), torch.rand(20, 2, generator=g) * 0.5 + 0.05), 1)
    xy = torch.rand(20, 2, generator=g) * 0.5
    boxes = torch.cat((xy, xy + torch.rand(20, 2, generator=g) * 0.4 + 0.01), dim=-1)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # 1/variances, as torchvision's SSD
    expected = coder.encode_single(boxes, cxcywh_to_xyxy(priors))
    assert torch.allclose(encode(boxes, priors), expected, atol=1e-4)
