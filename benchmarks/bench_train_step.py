"""One VGG16-SSD300 training step on CPU (forward, loss, backward, SGD step), ours vs torchvision.

    .venv/bin/python benchmarks/bench_train_step.py                # warmup 1, repeats 5
    .venv/bin/python benchmarks/bench_train_step.py --threads 1 --repeats 7
    .venv/bin/python benchmarks/bench_train_step.py --nchw --out benchmarks/results/train_step_nchw.json

Ours: ``build_model(load_config("ssd300_vgg16"))`` driven by ``ssd.engine.StepRunner.step`` (the
real step: ``pad_targets`` + ``match_priors`` + forward + ``MultiBoxLoss`` + ``zero_grad`` +
``backward`` + ``SGD.step``). Peer: torchvision's
``ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)`` in train mode,
``loss_dict = model(images_list, targets_list)``, ``sum(loss_dict.values())`` + the same
``zero_grad`` / ``backward`` / ``SGD(lr 1e-3, momentum 0.9, weight decay 5e-4)`` step.

**The same memory layout on both sides** (issue 18): channels_last by default (ours through
``train.channels_last``, the default; torchvision through ``model.to(memory_format=
torch.channels_last)``, which makes its convolutions run channels_last on its NCHW batch), both
NCHW with ``--nchw``. Both fp32. The layout is in the case name. (Before, ours ran channels_last
and torchvision NCHW, which measured the layout as much as the code: 1.13x, against a tie with
equal layouts.)

Inputs: batch 4 of seeded random 300x300 images and 1..8 random boxes each, fp32. Ours gets the
images ImageNet-normalised (our data pipeline normalises before batching) and boxes in [0, 1];
torchvision gets the same images in [0, 1] and boxes in pixels: its GeneralizedRCNNTransform
normalises (set to the same ImageNet mean/std) and "resizes" 300 -> 300 inside the step (a
bilinear pass over 4 x 3 x 300 x 300 values, small beside the network). Both start from the same
weights (torchvision's initialisation, copied into ours).

Equal work is checked before timing: both networks have the same parameter shapes (26.3 M
parameters, 8732 priors); torchvision's initial weights are copied into ours and both forward
passes must give the same (loc, logits) on the same normalised input.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from _common import case_result, finish, get_args_parser, time_side_by_side
from torchvision.models.detection import ssd300_vgg16

from ssd.config import load_config
from ssd.engine import StepRunner
from ssd.models import build_model

NAME = "train_step"
SIZE = 300


def make_batch(batch: int, max_gt: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=g)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, max_gt + 1, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.5 + 0.05
        xy = torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat((xy, xy + wh), dim=1))
        labels.append(torch.randint(1, 21, (n,), generator=g))
    return images, boxes, labels


def tv_to_ours_state(tv_state: dict, ours_state: dict) -> OrderedDict:
    """Map torchvision's SSD300-VGG16 state dict onto ours (same layers, other names/order)."""
    tv_feat = [k for k in tv_state if k.startswith("backbone.") and k != "backbone.scale_weight"]
    ours_feat = [k for k in ours_state if k.startswith("features.") and "l2norm" not in k]
    pairs = list(zip(ours_feat, tv_feat))
    pairs.append(("features.l2norm.weight", "backbone.scale_weight"))
    tv_reg = [k for k in tv_state if k.startswith("head.regression_head.")]
    tv_cls = [k for k in tv_state if k.startswith("head.classification_head.")]
    pairs += zip([k for k in ours_state if k.startswith("head.loc.")], tv_reg)
    pairs += zip([k for k in ours_state if k.startswith("head.conf.")], tv_cls)
    assert len(pairs) == len(ours_state) == len(tv_state), "layer counts differ"
    out = OrderedDict()
    for ours_key, tv_key in pairs:
        assert ours_state[ours_key].shape == tv_state[tv_key].shape, (ours_key, tv_key)
        out[ours_key] = tv_state[tv_key]
    return out


def check_same_network(ours: torch.nn.Module, tv: torch.nn.Module) -> dict:
    """Copy torchvision's weights into a twin of ours and compare the head outputs."""
    twin = build_model(load_config("ssd300_vgg16"))
    twin.load_state_dict(tv_to_ours_state(tv.state_dict(), twin.state_dict()))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        twin.eval()
        tv.eval()
        loc, logits = twin(x)
        head = tv.head(list(tv.backbone(x).values()))
        tv.train()
    loc_err = (loc - head["bbox_regression"]).abs().max().item()
    cls_err = (logits - head["cls_logits"]).abs().max().item()
    scale = max(head["bbox_regression"].abs().max().item(), head["cls_logits"].abs().max().item())
    assert loc.shape == head["bbox_regression"].shape and logits.shape == head["cls_logits"].shape
    assert max(loc_err, cls_err) <= 1e-4 * max(scale, 1.0), (loc_err, cls_err, scale)
    return {
        "parameters": sum(p.numel() for p in ours.parameters()),
        "peer_parameters": sum(p.numel() for p in tv.parameters()),
        "priors": loc.shape[1],
        "max_abs_diff_loc": loc_err,
        "max_abs_diff_logits": cls_err,
    }


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=5, warmup=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-gt", type=int, default=8)
    parser.add_argument(
        "--nchw",
        action="store_true",
        help="both sides in NCHW (ours: train.channels_last=false) instead of channels_last",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = load_config("ssd300_vgg16", ["train.channels_last=false"] if args.nchw else [])
    ours_model = build_model(cfg).train()
    tv_model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).train()
    check = check_same_network(ours_model, tv_model)
    # Same start and same network input on both sides: our model starts from torchvision's
    # initial weights, and torchvision's transform normalises with our mean/std (its default
    # std of 1/255 feeds a 0..255-scaled input that makes a randomly initialised VGG diverge
    # within a few SGD steps). The transform does the same work either way.
    ours_model.load_state_dict(tv_to_ours_state(tv_model.state_dict(), ours_model.state_dict()))
    tv_model.transform.image_mean = list(cfg.augment.mean)
    tv_model.transform.image_std = list(cfg.augment.std)
    if not args.nchw:  # the same layout as ours (StepRunner puts ours in cfg's format)
        tv_model.to(memory_format=torch.channels_last)

    images, boxes, labels = make_batch(args.batch, args.max_gt, args.seed)
    mean = torch.tensor(cfg.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
    ours_images = (images - mean) / std
    ours_opt, tv_opt = sgd(ours_model), sgd(tv_model)
    trainer = StepRunner(ours_model, cfg, ours_opt)  # converts the model to cfg's memory format
    ours_targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    tv_images = list(images)
    tv_targets = [{"boxes": b * SIZE, "labels": lab} for b, lab in zip(boxes, labels)]
    losses: dict[str, list[float]] = {"ours": [], "peer": []}

    def ours_step():
        # the step returns device tensors; float() reads it, as the peer side reads loss.item()
        losses["ours"].append(float(trainer.step(ours_images, ours_targets)["loss"]))

    def peer_step():
        loss_dict = tv_model(tv_images, tv_targets)
        loss = sum(loss_dict.values())
        tv_opt.zero_grad(set_to_none=True)
        loss.backward()
        tv_opt.step()
        losses["peer"].append(loss.item())

    ours_t, peer_t = time_side_by_side(ours_step, peer_step, args.repeats, args.warmup, args.number)
    for side, values in losses.items():
        assert all(torch.isfinite(torch.tensor(values))), f"{side}: non-finite loss {values}"
    layout = "NCHW" if args.nchw else "channels_last"
    case = f"VGG16-SSD300, B={args.batch}, 300x300, 21 classes, fp32, both {layout}"
    return finish(
        NAME,
        args,
        "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        [case_result(case, ours_t, peer_t, goal=1.0, note="aim 1.2x")],
        equivalence={"checked": True, **check},
        layout={"ours": layout, "peer": layout},
        losses=losses,
    )


if __name__ == "__main__":
    main()
