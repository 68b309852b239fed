"""Matching (ssd/matching.py). Every test runs on both implementations: the static-shape one
(what accelerators run) and the CPU's host shortcuts; a last group checks them equal bit for bit."""

from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import SSDMatcher

from ssd import matching
from ssd.boxes import box_iou, cxcywh_to_xyxy, decode, encode
from ssd.matching import assign_max_iou, match_priors, pad_targets, targets_from_assignment


@pytest.fixture(autouse=True, params=["host", "static"])
def implementation(request, monkeypatch):
    monkeypatch.setattr(matching, "HOST_SHORTCUTS_ON_CPU", request.param == "host")
    return request.param


# Four priors along a row (cx, cy, w, h): unit squares of side 0.2 at x = 0.1, 0.3, 0.5, 0.7.
PRIORS = torch.tensor(
    [[0.1, 0.5, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2]]
)


def _match(boxes, labels, **kw):
    gt_boxes, gt_labels, gt_mask = pad_targets([torch.tensor(b) for b in boxes], [torch.tensor(lab) for lab in labels])
    return match_priors(PRIORS, gt_boxes, gt_labels, gt_mask, **kw)


def test_threshold_assigns_every_prior_above_05():
    # GT covers priors 0 and 1 exactly side by side: IoU with each is 0.5 (0.04 / 0.08)
    labels, targets = _match([[[0.0, 0.4, 0.4, 0.6]]], [[3]])
    assert labels.tolist() == [[3, 3, 0, 0]]
    assert torch.allclose(decode(targets[0, :2], PRIORS[:2]), torch.tensor([[0.0, 0.4, 0.4, 0.6]] * 2), atol=1e-6)


def test_bipartite_step_forces_the_best_prior_below_threshold():
    # A small box inside prior 2: IoU 0.01/0.04 = 0.25 < 0.5, still matched to prior 2 only.
    labels, _ = _match([[[0.45, 0.45, 0.55, 0.55]]], [[7]])
    assert labels.tolist() == [[0, 0, 7, 0]]


def test_contested_best_prior_goes_to_the_later_ground_truth():
    # Two identical small boxes want prior 2; the later one (label 5) keeps it, as ssd.pytorch.
    labels, _ = _match([[[0.45, 0.45, 0.55, 0.55], [0.46, 0.45, 0.54, 0.55]]], [[4, 5]])
    assert labels.tolist() == [[0, 0, 5, 0]]


def test_ties_in_best_prior_take_the_first_prior():
    # Box straddling priors 1 and 2 equally (IoU 1/3 each): the first maximum (prior 1) is forced.
    labels, _ = _match([[[0.3, 0.4, 0.5, 0.6]]], [[2]])
    assert labels.tolist() == [[0, 2, 0, 0]]


def test_padding_and_empty_images():
    labels, _ = _match([[[0.45, 0.45, 0.55, 0.55]], []], [[1], []])
    assert labels.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    gt_boxes, gt_labels, gt_mask = pad_targets([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    assert gt_mask.shape == (1, 1) and not gt_mask.any()
    labels, _ = match_priors(PRIORS, gt_boxes, gt_labels, gt_mask)
    assert labels.tolist() == [[0, 0, 0, 0]]


def _random_batch(generator, batch, priors):
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(0, 12, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 0.7
        wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.02
        boxes.append(torch.cat((xy, xy + wh), 1))
        labels.append(torch.randint(1, 21, (n,), generator=generator))
    return boxes, labels


@pytest.mark.parametrize("preset,batch", [("tiny", 8), ("ssd300_vgg16", 16)])
def test_batched_matching_equals_torchvision_ssd_matcher_per_image(preset, batch):
    from ssd.matching import _chunk_size
    from ssd.priors import PriorSpec

    priors = PriorSpec.preset(preset).generate()
    g = torch.Generator().manual_seed(0)
    boxes, labels = _random_batch(g, batch, priors)
    padded = pad_targets(boxes, labels)
    if preset == "ssd300_vgg16":  # the CPU path must really run over several prior chunks
        assert _chunk_size(batch, padded[1].shape[1], len(priors), torch.device("cpu")) < len(priors) // 2
    out_labels, out_targets = match_priors(priors, *padded)
    matcher = SSDMatcher(0.5)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        if len(b) == 0:
            assert (out_labels[i] == 0).all()
            continue
        matches = matcher(box_iou(b, cxcywh_to_xyxy(priors)))  # (P,) gt index or negative
        expected = torch.where(matches >= 0, lab[matches.clamp(min=0)], 0)
        assert torch.equal(out_labels[i], expected)
        pos = matches >= 0
        assert torch.allclose(out_targets[i][pos], encode(b[matches[pos]], priors[pos]), atol=1e-5)


def test_targets_are_zero_off_the_positives_and_threshold_must_be_positive():
    labels, targets = _match([[[0.0, 0.4, 0.4, 0.6]]], [[3]])
    assert targets[labels == 0].abs().sum() == 0
    assert targets[labels > 0].abs().sum() > 0
    with pytest.raises(ValueError, match="iou_threshold"):
        _match([[[0.0, 0.4, 0.4, 0.6]]], [[3]], iou_threshold=0.0)


def test_chunked_matching_equals_one_chunk_and_keeps_the_first_maximum(monkeypatch):
    from ssd import matching

    # Priors 1 and 6 are identical, so they tie as the box's best prior; with chunks of 3 they
    # land in different chunks and the earlier one must still win, as in a single pass.
    priors = torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]] + [[0.1, 0.1, 0.05, 0.05]] * 4
                          + [[0.5, 0.5, 0.2, 0.2], [0.9, 0.2, 0.1, 0.1]])
    gt = pad_targets([torch.tensor([[0.45, 0.45, 0.55, 0.55]])], [torch.tensor([4])])
    g = torch.Generator().manual_seed(5)
    boxes, labels = _random_batch(g, 6, None)
    random_gt = pad_targets(boxes, labels)
    random_priors = torch.cat((torch.rand(300, 2, generator=g), torch.rand(300, 2, generator=g) * 0.4 + 0.02), 1)
    single = [match_priors(priors, *gt), match_priors(random_priors, *random_gt)]
    monkeypatch.setattr(matching, "_chunk_size", lambda *args: 3)
    chunked = [match_priors(priors, *gt), match_priors(random_priors, *random_gt)]
    assert single[0][0].tolist() == [[0, 4, 0, 0, 0, 0, 0, 0]]
    for (l1, t1), (l2, t2) in zip(single, chunked):
        assert torch.equal(l1, l2) and torch.equal(t1, t2)


# --- the two implementations agree bit for bit ----------------------------------------------


def _both(fn):
    """``fn()`` with the host shortcuts off, then on."""
    saved = matching.HOST_SHORTCUTS_ON_CPU
    try:
        matching.HOST_SHORTCUTS_ON_CPU = False
        static = fn()
        matching.HOST_SHORTCUTS_ON_CPU = True
        return static, fn()
    finally:
        matching.HOST_SHORTCUTS_ON_CPU = saved


def _batch_with_ties(g: torch.Generator, batch: int, max_gt: int) -> tuple[list, list]:
    """Random boxes, some repeated (equal IoUs: ties between boxes), counts 0..max_gt."""
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(0, max_gt + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.8
        wh = torch.rand(n, 2, generator=g) * 0.5 + 0.01
        b = torch.cat((xy, (xy + wh).clamp(max=1.0)), 1)
        if n >= 2:
            b[n // 2] = b[0]  # two identical boxes: the later one must win their priors
        boxes.append(b)
        labels.append(torch.randint(1, 21, (n,), generator=g))
    return boxes, labels


@pytest.mark.parametrize("implementation", ["both"], indirect=True)
@pytest.mark.parametrize("preset,batch,max_gt,threshold", [
    ("tiny", 1, 1, 0.5), ("tiny", 5, 3, 0.5), ("tiny", 8, 30, 0.3),
    ("ssd300_vgg16", 7, 12, 0.5), ("ssd300_vgg16", 32, 42, 0.5), ("ssd300_vgg16", 3, 90, 0.7),
])
def test_host_shortcuts_equal_the_static_path_bit_for_bit(preset, batch, max_gt, threshold):
    from ssd.priors import PriorSpec

    priors = PriorSpec.preset(preset).generate()
    for seed in range(1 if batch >= 32 else 2):  # a second seed where it is cheap
        g = torch.Generator().manual_seed(seed)
        boxes, labels, mask = pad_targets(*_batch_with_ties(g, batch, max_gt))

        def fused(boxes=boxes, labels=labels, mask=mask):
            return match_priors(priors, boxes, labels, mask, iou_threshold=threshold)

        def in_two_steps(boxes=boxes, labels=labels, mask=mask):  # what BoxCoding.targets calls
            return targets_from_assignment(assign_max_iou(priors, boxes, mask, threshold), priors, boxes, labels)

        (l1, t1), (l2, t2) = _both(fused)
        (l3, t3), (l4, t4) = _both(in_two_steps)
        for labels_, targets in ((l2, t2), (l3, t3), (l4, t4)):
            assert torch.equal(l1, labels_) and torch.equal(t1, targets)
        assert (l1 > 0).any() or not mask.any()


@pytest.mark.parametrize("implementation", ["both"], indirect=True)
def test_host_shortcuts_accept_padding_anywhere_and_an_all_empty_batch():
    """The mask need not be a prefix (a caller may pad between boxes); ties keep the first box."""
    from ssd.priors import PriorSpec

    priors = PriorSpec.preset("tiny").generate()
    g = torch.Generator().manual_seed(3)
    boxes, labels = _batch_with_ties(g, 6, 9)
    gt_boxes, gt_labels, gt_mask = pad_targets(boxes, labels)
    holes = torch.rand(gt_mask.shape, generator=g) < 0.3
    gt_mask = gt_mask & ~holes
    gt_boxes = torch.where(holes.unsqueeze(-1), torch.rand(gt_boxes.shape, generator=g), gt_boxes)
    a1, a2 = _both(lambda: assign_max_iou(priors, gt_boxes, gt_mask))
    assert torch.equal(a1, a2)
    real = gt_mask.gather(1, a1.clamp(min=0))
    assert real[a1 >= 0].all()  # only real boxes are ever assigned
    (l1, t1), (l2, t2) = _both(lambda: targets_from_assignment(a1, priors, gt_boxes, gt_labels))
    assert torch.equal(l1, l2) and torch.equal(t1, t2)
    empty = pad_targets([torch.zeros(0, 4)] * 3, [torch.zeros(0, dtype=torch.long)] * 3)
    (l1, t1), (l2, t2) = _both(lambda: match_priors(priors, *empty))
    assert torch.equal(l1, l2) and torch.equal(t1, t2) and not l1.any()


@pytest.mark.parametrize("implementation", ["host"], indirect=True)
def test_pad_targets_places_every_box_and_label():
    g = torch.Generator().manual_seed(11)
    counts = [0, 3, 1, 0, 7, 2]
    boxes = [torch.rand(n, 4, generator=g) if n else torch.zeros(0) for n in counts]  # (0,) as a loader may give
    labels = [torch.randint(1, 9, (n,), generator=g) for n in counts]
    gt_boxes, gt_labels, gt_mask = pad_targets(boxes, labels)
    assert gt_boxes.shape == (6, 7, 4) and gt_labels.dtype == torch.long
    for i, n in enumerate(counts):
        assert gt_mask[i].tolist() == [True] * n + [False] * (7 - n)
        assert torch.equal(gt_boxes[i, :n], boxes[i].reshape(-1, 4)) and not gt_boxes[i, n:].any()
        assert torch.equal(gt_labels[i, :n], labels[i]) and not gt_labels[i, n:].any()
    assert pad_targets([], [])[0].shape == (0, 1, 4)


# --- the CPU path's pruning (ssd.matching._PriorBlocks) ----------------------------------------


def _awkward_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    """(n, 4) xyxy boxes of every kind the pruning must get right: tiny, huge, thin, degenerate
    (zero or negative size), partly or wholly outside [0, 1]."""
    centre = torch.rand(n, 2, generator=g) * 1.4 - 0.2
    size = torch.exp(torch.rand(n, 2, generator=g) * 7 - 6)  # 0.0025 .. 2.7
    boxes = torch.cat((centre - size / 2, centre + size / 2), 1)
    boxes[::7, 2] = boxes[::7, 0]  # zero width
    boxes[3::11, 3] = boxes[3::11, 1] - 0.01  # negative height
    return boxes


@pytest.mark.parametrize("implementation", ["host"], indirect=True)
@pytest.mark.parametrize("preset", ["tiny", "ssd300_vgg16", "random"])
def test_prior_block_bounds_hold_for_every_prior(preset):
    """The bound is never below a computed IoU of the block's priors, and a block said not to
    overlap a box has IoU exactly 0 with it: what makes the pruned path exact."""
    from ssd.priors import PriorSpec

    g = torch.Generator().manual_seed(21)
    if preset == "random":  # no grid at all, sizes over three octaves, some clipped to nothing
        priors = torch.cat((torch.rand(700, 2, generator=g), torch.exp(torch.rand(700, 2, generator=g) * 3 - 4)), 1)
        priors[::50, 2] = 0.0
    else:
        priors = PriorSpec.preset(preset).generate()
    blocks = matching._PriorBlocks(cxcywh_to_xyxy(priors))
    boxes = torch.cat((_awkward_boxes(g, 300), cxcywh_to_xyxy(priors[::97])))  # and priors themselves
    overlaps, bound = blocks.iou_bounds(boxes)
    iou = box_iou(boxes, blocks.xyxy.view(-1, 4)).view(len(boxes), *blocks.index.shape)  # (N, NB, S)
    assert (iou.amax(-1) <= bound).all()
    assert (iou[~overlaps] == 0).all()
    assert sorted(blocks.index[blocks.index < len(priors)].tolist()) == list(range(len(priors)))
    if preset != "random":  # on a grid it does prune: most blocks are skipped by position or size
        assert overlaps.float().mean() < 0.5 and (bound >= 0.5).float().mean() < 0.1


@pytest.mark.parametrize("implementation", ["both"], indirect=True)
def test_host_shortcuts_equal_the_static_path_on_awkward_boxes():
    """Exact threshold IoUs, boxes equal to priors (IoU 1, tied with duplicate priors in other
    blocks), tiny boxes whose best prior is far below the threshold, boxes outside the image or
    degenerate (IoU 0 everywhere: prior 0), 90 boxes in an image."""
    from ssd.priors import PriorSpec

    priors = PriorSpec.preset("ssd300_vgg16").generate()
    priors = torch.cat((priors, priors[[5000, 17, 8000]]))  # duplicates, sorted into other blocks
    g = torch.Generator().manual_seed(8)
    xyxy = cxcywh_to_xyxy(priors)
    exact = xyxy[[100, 2000, 6000]].clone()
    exact[:, 2] = exact[:, 0] + 2 * (exact[:, 2] - exact[:, 0])  # twice as wide: IoU 0.5 exactly
    images = [
        torch.cat((xyxy[[17, 5000, 8000, 8731]], exact)),
        _awkward_boxes(g, 90),
        torch.tensor([[1.5, 1.5, 1.7, 1.8], [0.3, 0.3, 0.3, 0.6], [0.5, 0.5, 0.501, 0.5012]]),
        _awkward_boxes(g, 5),
    ]
    labels = [torch.randint(1, 21, (len(b),), generator=g) for b in images]
    padded = pad_targets(images, labels)
    for threshold in (0.5, 0.35):
        (l1, t1), (l2, t2) = _both(lambda t=threshold: match_priors(priors, *padded, iou_threshold=t))
        assert torch.equal(l1, l2) and torch.equal(t1, t2)
    # image 2's first two boxes overlap no prior: both force prior 0, the later one keeps it
    assigned = assign_max_iou(priors, padded[0], padded[2], 0.5)
    assert assigned[2, 0] == 1 and (assigned[2] == 2).sum() == 1
    assert (l1[0, [17, 5000, 8000]] > 0).all()


VOC_MINI = Path(__file__).resolve().parents[2] / "shared/datasets/voc2007-mini/VOCdevkit"
COCO_MINI = Path(__file__).resolve().parents[2] / "shared/datasets/coco2017-mini"


@pytest.mark.integration
@pytest.mark.parametrize("implementation", ["both"], indirect=True)
@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_host_shortcuts_equal_the_static_path_on_real_boxes(dataset):
    """Every 32-image batch of VOC2007-mini's and COCO2017-mini's boxes, as bench_matching.py
    times them: the same labels and targets bit for bit."""
    import sys

    from ssd.priors import PriorSpec

    root = VOC_MINI if dataset == "voc" else COCO_MINI
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_matching import batches, real_targets

    from ssd.data.coco import CocoReader
    from ssd.data.voc import VocReader

    reader = (VocReader(root, "2007:trainval+2007:test") if dataset == "voc"
              else CocoReader(root / "images", root / "annotations" / "instances.json"))
    priors = PriorSpec.preset("ssd300_vgg16").generate()
    batch_list = batches(*real_targets(reader), 32)
    assert len(batch_list) >= 15
    for boxes, labels in batch_list:
        padded = pad_targets(boxes, labels)
        (l1, t1), (l2, t2) = _both(lambda padded=padded: match_priors(priors, *padded))
        assert torch.equal(l1, l2) and torch.equal(t1, t2)
