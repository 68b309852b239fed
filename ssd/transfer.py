"""Start a detector from another one trained on other classes (COCO-pretrain -> VOC-finetune).

Everything but the class head has the same shape in both models when their architectures and
prior specs are compatible (:func:`check_compatible`), and is copied as it is: the backbone, the
extra layers and the box-regression head. The class head is copied *per class*: the logits of
target class ``t`` start as those of the source class it corresponds to (:func:`map_classes`:
VOC's ``aeroplane`` is COCO's ``airplane``, ...), the background from the background, and a class
without a counterpart keeps its fresh initialisation.

Class-head layout (``ssd.models.heads``): the last conv of each level's class predictor has
``A_l * C`` output channels, channel ``a * C + c`` holding class ``c`` of anchor ``a``. Viewing
its weight (A*C, ...) as (A, C, ...) makes the copy one index operation per level.

Pure PyTorch, no MLflow: the caller brings the source checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssd.config import Config

#: PASCAL VOC name -> MS-COCO name where the two datasets name the same class differently
VOC_TO_COCO: dict[str, str] = {
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
}

#: state-dict prefix of the class predictors (``SSDHead.conf``)
CLASS_HEAD_PREFIX = "head.conf."


class IncompatibleModels(ValueError):
    """The source model cannot initialise the target one; the message says what differs."""


def map_classes(
    target: Sequence[str], source: Sequence[str], aliases: Mapping[str, str] = VOC_TO_COCO
) -> list[int | None]:
    """For each target class, the 1-based source label it starts from, or None.

    A target class matches the source class of the same name, else the one its alias names
    (``aliases`` is applied in both directions, so COCO -> VOC works too). Names compare
    case-insensitively with surrounding spaces ignored.

    Args:
        target: the target's C_t class names (label k is ``target[k - 1]``).
        source: the source's C_s class names.
    Returns:
        C_t entries; entry k - 1 is the source label (1..C_s) for target label k, or None.
    """
    def key(name: str) -> str:
        return name.strip().lower()

    index = {key(name): label for label, name in enumerate(source, start=1)}
    both_ways = {key(a): key(b) for a, b in aliases.items()} | {key(b): key(a) for a, b in aliases.items()}
    out: list[int | None] = []
    for name in target:
        label = index.get(key(name))
        if label is None and key(name) in both_ways:
            label = index.get(both_ways[key(name)])
        out.append(label)
    return out


def check_compatible(source: Config, target: Config) -> list[str]:
    """Raise :class:`IncompatibleModels` unless ``source``'s weights fit ``target`` (except the
    class count); return warnings about differences that fit but change the meaning.

    Required: the same architecture and width, and the same prior layout per level (the same
    number of source levels and boxes per location), so that every box-regression and class
    predictor has the same anchors. Warned: boxes per location that match in number but come
    from different aspect ratios (each anchor slot then regresses a different default box).
    """
    problems = []
    if source.model.arch != target.model.arch:
        problems.append(f"architecture {source.model.arch!r} vs {target.model.arch!r}")
    if source.model.width_mult != target.model.width_mult:
        problems.append(f"model.width_mult {source.model.width_mult} vs {target.model.width_mult}")
    boxes_s, boxes_t = source.priors.boxes_per_location(), target.priors.boxes_per_location()
    if tuple(boxes_s) != tuple(boxes_t):
        problems.append(f"boxes per location {tuple(boxes_s)} (prior spec {source.priors.name!r}) vs "
                        f"{tuple(boxes_t)} (prior spec {target.priors.name!r})")
    if problems:
        raise IncompatibleModels("the source model cannot initialise this one: " + "; ".join(problems)
                                 + ". Use the same model.arch and a prior spec with the same boxes per location.")
    warnings = []
    ratios_s, ratios_t = _ratios(source), _ratios(target)
    if ratios_s != ratios_t:
        warnings.append(f"aspect ratios differ ({ratios_s} vs {ratios_t}): the box regressors are transferred "
                        "slot by slot, but some slots now predict offsets for other default boxes")
    if source.priors.image_size != target.priors.image_size:
        warnings.append(f"input size {source.priors.image_size} vs {target.priors.image_size}: the weights fit, "
                        "but the objects' scales in feature-map cells change")
    return warnings


def finetune_config(source: Config, base: Config | None, overrides: Sequence[str], num_classes: int) -> Config:
    """The config of a run that starts from a model trained with ``source``.

    The ``model`` and ``priors`` sections are the source's (the weights were trained for them;
    ``model.backbone_weights`` is dropped, every weight comes from the source), with
    ``model.num_classes`` set to ``num_classes``; the other sections (loss, augmentation,
    optimiser, schedule, post-processing) are ``base``'s, or the source's when ``base`` is None.
    ``overrides`` (``section.key=value``) apply last, priors included: a prior spec that no
    longer fits is refused later by :func:`check_compatible`.

    Raises:
        ssd.config.ConfigError: an unknown key or an invalid value in ``overrides``.
    """
    from ssd.config import apply_overrides, config_from_dict

    data = (base or source).to_dict()
    kept = source.to_dict()
    data["model"] = {**kept["model"], "backbone_weights": None}
    data["priors"] = kept["priors"]
    return config_from_dict(apply_overrides(data, [f"model.num_classes={num_classes}", *overrides]))


def _ratios(cfg: Config) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(r) for r in level) for level in cfg.priors.aspect_ratios)


@dataclass(frozen=True)
class TransferReport:
    """What :func:`transfer_weights` did."""

    #: tensors copied whole (backbone, extras, box head, class-independent class-head parts)
    copied: int
    #: class-head tensors copied class by class
    remapped: int
    #: target class name -> source class name it starts from
    mapped: dict[str, str]
    #: target classes that start fresh
    fresh: list[str]

    def summary(self) -> str:
        pairs = ", ".join(f"{t}<-{s}" if t != s else t for t, s in self.mapped.items()) or "none"
        return (f"transferred {self.copied} tensors whole and {self.remapped} class-head tensors by class; "
                f"{len(self.mapped)} classes from the source ({pairs}); "
                f"{len(self.fresh)} fresh ({', '.join(self.fresh) or 'none'})")


def transfer_weights(
    target: nn.Module,
    source_state: Mapping[str, Tensor],
    num_anchors: Sequence[int],
    target_classes: Sequence[str],
    source_classes: Sequence[str],
    aliases: Mapping[str, str] = VOC_TO_COCO,
) -> TransferReport:
    """Load ``source_state`` into ``target`` (in place), class head remapped by class.

    Args:
        target: the freshly built target SSD (its fresh class rows stay as they are).
        source_state: the source SSD's state dict (same architecture and anchors per level).
        num_anchors: boxes per location A_l of each level (both models).
        target_classes, source_classes: class names, background excluded.
        aliases: extra name correspondences (:func:`map_classes`).
    Raises:
        IncompatibleModels: keys or shapes that do not correspond (checked before anything is
            written, so the target is untouched then).
    """
    state = target.state_dict()
    c_t, c_s = len(target_classes) + 1, len(source_classes) + 1  # with the background
    labels = map_classes(target_classes, source_classes, aliases)
    # target label k (0 = background) <- source label rows[k]; only mapped ones are copied
    pairs = [(0, 0)] + [(t, s) for t, s in enumerate(labels, start=1) if s is not None]
    dst_index = torch.tensor([t for t, _ in pairs])
    src_index = torch.tensor([s for _, s in pairs])

    missing = sorted(set(state) - set(source_state))
    unexpected = sorted(set(source_state) - set(state))
    if missing or unexpected:
        raise IncompatibleModels(f"state dicts differ: missing in the source {missing[:5]}, not in the target "
                                 f"{unexpected[:5]}")
    updates: dict[str, Tensor] = {}
    remapped = 0
    for name, current in state.items():
        value = source_state[name]
        level = _class_predictor_level(name, current, value, num_anchors, c_t, c_s)
        if level is not None:
            a = num_anchors[level]
            src = value.reshape(a, c_s, *value.shape[1:])
            out = current.clone().reshape(a, c_t, *current.shape[1:])
            out[:, dst_index] = src[:, src_index].to(out.dtype)
            updates[name] = out.reshape(current.shape)
            remapped += 1
        elif value.shape != current.shape:
            raise IncompatibleModels(f"{name}: source shape {tuple(value.shape)} vs target {tuple(current.shape)}")
        else:
            updates[name] = value
    target.load_state_dict(updates)
    mapped = {target_classes[t - 1]: source_classes[s - 1] for t, s in pairs if t > 0}
    fresh = [name for name, s in zip(target_classes, labels, strict=True) if s is None]
    return TransferReport(copied=len(updates) - remapped, remapped=remapped, mapped=mapped, fresh=fresh)


def _class_predictor_level(
    name: str, target: Tensor, source: Tensor, num_anchors: Sequence[int], c_t: int, c_s: int
) -> int | None:
    """The level of a class-dependent class-head tensor (output channels A_l * C), else None.

    ``head.conf.<level>.weight|bias`` for plain predictors, ``head.conf.<level>.3.weight|bias``
    (the pointwise conv) for SSDLite's separable ones; their depthwise conv and BN are
    class-independent and copied whole.
    """
    if not name.startswith(CLASS_HEAD_PREFIX):
        return None
    level = int(name[len(CLASS_HEAD_PREFIX):].split(".")[0])
    a = num_anchors[level]
    if target.ndim == 0 or target.shape[0] != a * c_t or source.shape[0] != a * c_s:
        return None
    if target.shape[1:] != source.shape[1:]:
        raise IncompatibleModels(f"{name}: source shape {tuple(source.shape)} vs target {tuple(target.shape)}")
    return level


def initial_state(
    cfg: Config,
    target_classes: Sequence[str],
    source_state: Mapping[str, Tensor],
    source_cfg: Config,
    source_classes: Sequence[str],
) -> tuple[dict[str, Tensor], TransferReport, list[str]]:
    """The target's initial state dict: built from ``cfg`` exactly as a fresh run builds it
    (``torch.manual_seed(cfg.train.seed)``, so the fresh class rows are the ones a run from
    scratch would have), then filled from the source.

    Returns (state dict, report, compatibility warnings). Raises IncompatibleModels.
    """
    from ssd.models import build_model

    warnings = check_compatible(source_cfg, cfg)
    torch.manual_seed(cfg.train.seed)
    # No pretrained backbone file: every backbone weight comes from the source.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
    model = build_model(cfg)
    report = transfer_weights(model, source_state, cfg.priors.boxes_per_location(), target_classes, source_classes)
    return model.state_dict(), report, warnings
