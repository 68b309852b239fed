import pytest
import torch
from torchvision.models.detection import ssd300_vgg16

from ssd.boxes import box_iou, cxcywh_to_xyxy
from ssd.postprocess import PostprocessConfig, postprocess
from ssd.priors import PriorSpec


def _outputs(batch, priors, classes, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, priors, 4, generator=g) * 0.5
    logits = torch.randn(batch, priors, classes, generator=g) * scale
    return loc, logits


def _sorted(boxes, scores, labels):
    order = torch.argsort(scores, descending=True, stable=True)
    return boxes[order], scores[order], labels[order]


def test_dense_path_equals_torchvision_ssd_postprocess_detections():
    # Random outputs: nearly every prior can pass 0.01, so the dense pre-NMS top-k runs.
    priors = PriorSpec.preset("ssd300_vgg16").generate()
    loc, logits = _outputs(2, priors.shape[0], 21, seed=0)
    ours = postprocess(loc, logits, priors, PostprocessConfig(), image_sizes=[(300, 300)] * 2)
    assert [len(d["scores"]) for d in ours] == [200, 200]
    _assert_same(ours, _torchvision_reference(loc, logits, priors, 200))


def test_thresholds_top_k_and_sorting():
    priors = PriorSpec.preset("tiny").generate()
    loc, logits = _outputs(3, priors.shape[0], 5, seed=1)
    params = PostprocessConfig(score_threshold=0.2, top_k=17)
    out = postprocess(loc, logits, priors, params)
    assert len(out) == 3
    for det in out:
        assert len(det["scores"]) <= 17
        assert (det["scores"] > 0.2).all()
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        assert det["labels"].min() >= 1 and det["labels"].max() <= 4
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 1
        # per class, no two kept boxes overlap more than the NMS threshold
        for c in det["labels"].unique():
            b = det["boxes"][det["labels"] == c]
            iou = box_iou(b, b).fill_diagonal_(0)
            assert iou.max() <= 0.45 + 1e-6 if len(b) > 1 else True


def test_image_sizes_scale_boxes_to_pixels():
    priors = PriorSpec.preset("tiny").generate()
    loc, logits = _outputs(2, priors.shape[0], 3, seed=2)
    unit = postprocess(loc, logits, priors)
    pixels = postprocess(loc, logits, priors, image_sizes=torch.tensor([[100, 200], [50, 40]]))
    assert torch.allclose(pixels[0]["boxes"], unit[0]["boxes"] * torch.tensor([200, 100, 200, 100]))
    assert torch.allclose(pixels[1]["boxes"], unit[1]["boxes"] * torch.tensor([40, 50, 40, 50]))


def test_empty_when_nothing_passes():
    priors = PriorSpec.preset("tiny").generate()
    loc = torch.zeros(2, priors.shape[0], 4)
    logits = torch.zeros(2, priors.shape[0], 3)
    logits[..., 0] = 20  # background everywhere
    for method in ("nms", "soft_linear", "soft_gaussian"):
        out = postprocess(loc, logits, priors, PostprocessConfig(method=method))
        assert [len(d["scores"]) for d in out] == [0, 0]


def _reference_soft_nms(boxes, scores, method, nt, sigma, thresh):
    """Bodla et al. algorithm 1, one group, plain Python."""
    boxes, scores = boxes.clone(), scores.clone()
    kept = []
    alive = list(range(len(scores)))
    alive = [i for i in alive if scores[i] > thresh]
    while alive:
        best = max(alive, key=lambda i: scores[i].item())
        if scores[best] <= thresh:
            break
        kept.append((best, scores[best].item()))
        alive.remove(best)
        for i in alive:
            iou = box_iou(boxes[best : best + 1], boxes[i : i + 1]).item()
            if method == "soft_linear":
                scores[i] *= (1 - iou) if iou >= nt else 1.0
            else:
                scores[i] *= torch.exp(torch.tensor(-(iou**2) / sigma)).item()
        alive = [i for i in alive if scores[i] > thresh]
    return kept


@pytest.mark.parametrize("method", ["soft_linear", "soft_gaussian"])
def test_soft_nms_equals_reference(method):
    torch.manual_seed(0)
    P = 40
    priors = torch.cat((torch.rand(P, 2) * 0.6 + 0.2, torch.rand(P, 2) * 0.2 + 0.1), 1)
    loc = torch.zeros(2, P, 4)
    logits = torch.randn(2, P, 3) * 2
    params = PostprocessConfig(method=method, score_threshold=0.05, top_k=1000, pre_nms_top_k=0)
    out = postprocess(loc, logits, priors, params)
    boxes = cxcywh_to_xyxy(priors).clamp(0, 1)
    probs = logits.softmax(-1)
    for b in range(2):
        expected = []
        for c in (1, 2):
            for idx, score in _reference_soft_nms(boxes, probs[b, :, c], method, 0.45, 0.5, 0.05):
                expected.append((score, c, boxes[idx]))
        expected.sort(key=lambda t: -t[0])
        assert len(out[b]["scores"]) == len(expected)
        assert torch.allclose(out[b]["scores"], torch.tensor([e[0] for e in expected]), atol=1e-5)
        assert out[b]["labels"].tolist() == [e[1] for e in expected]
        assert torch.allclose(out[b]["boxes"], torch.stack([e[2] for e in expected]), atol=1e-6)


def test_soft_nms_linear_hand_computed():
    # Two boxes of one class shifted by 0.05: IoU = (0.35 * 0.4) / (2 * 0.16 - 0.14) = 7/9 >= 0.45,
    # so linear soft-NMS keeps both with the second decayed by (1 - 7/9); hard NMS drops it.
    priors = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.55, 0.5, 0.4, 0.4]])
    b = cxcywh_to_xyxy(priors)
    iou = box_iou(b[:1], b[1:]).item()
    assert iou == pytest.approx(7 / 9, rel=1e-5)
    logits = torch.log(torch.tensor([[[0.1, 0.9], [0.2, 0.8]]]))
    out = postprocess(torch.zeros(1, 2, 4), logits, priors, PostprocessConfig(method="soft_linear"))[0]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.8 * (1 - 7 / 9)], rel=1e-5)
    hard = postprocess(torch.zeros(1, 2, 4), logits, priors)[0]
    assert hard["scores"].tolist() == pytest.approx([0.9])


def _torchvision_reference(loc, logits, priors, top_k):
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=logits.shape[2], score_thresh=0.01,
                      nms_thresh=0.45, detections_per_img=top_k, topk_candidates=400)
    anchors = cxcywh_to_xyxy(priors) * 300
    batch = loc.shape[0]
    return tv.postprocess_detections({"bbox_regression": loc, "cls_logits": logits}, [anchors] * batch,
                                     [(300, 300)] * batch)


def _assert_same(ours, expected):
    for mine, ref in zip(ours, expected):
        assert len(mine["scores"]) == len(ref["scores"])
        b1, s1, l1 = _sorted(mine["boxes"], mine["scores"], mine["labels"])
        b2, s2, l2 = _sorted(ref["boxes"], ref["scores"], ref["labels"])
        assert torch.allclose(s1, s2, atol=1e-6)
        assert torch.equal(l1, l2)
        assert torch.allclose(b1, b2, atol=1e-3)


def test_sparse_candidate_path_equals_torchvision():
    # "Trained-like": background is confident almost everywhere, so few priors can pass 0.01 and
    # the dense pre-NMS top-k is skipped.
    priors = PriorSpec.preset("ssd300_vgg16").generate()
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(3, priors.shape[0], 4, generator=g) * 0.3
    logits = torch.randn(3, priors.shape[0], 21, generator=g)
    logits[..., 0] += 12
    hot = torch.randint(0, priors.shape[0], (3, 150), generator=g)
    logits[torch.arange(3)[:, None], hot, 0] -= 15
    candidates_per_image = (logits.softmax(-1)[..., 0] < 0.99).sum(1)
    assert candidates_per_image.max() <= 400, "the sparse path would not be taken"
    ours = postprocess(loc, logits, priors, PostprocessConfig(), image_sizes=[(300, 300)] * 3)
    _assert_same(ours, _torchvision_reference(loc, logits, priors, 200))


def test_prefix_doubling_equals_torchvision(monkeypatch):
    # One class everywhere and boxes equal to the priors: NMS suppresses most of every prefix, so
    # the prefix must grow before an image keeps top_k detections.
    import ssd.postprocess as pp

    priors = PriorSpec.preset("ssd300_vgg16").generate()
    g = torch.Generator().manual_seed(4)
    loc = torch.zeros(2, priors.shape[0], 4)
    logits = torch.randn(2, priors.shape[0], 3, generator=g) * 0.1
    distance = (priors[:, :2] - 0.5).norm(dim=1)  # the best scores crowd the image centre
    logits[..., 1] += 5 - 10 * distance
    calls = []
    real = pp._grouped_nms
    monkeypatch.setattr(pp, "_grouped_nms", lambda *a: calls.append(1) or real(*a))
    ours = postprocess(loc, logits, priors, PostprocessConfig(top_k=60), image_sizes=[(300, 300)] * 2)
    assert len(calls) > 1, "the prefix never doubled: the test lost its purpose"
    _assert_same(ours, _torchvision_reference(loc, logits, priors, 60))
