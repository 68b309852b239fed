"""Run configuration: one frozen dataclass per section, loaded from YAML plus dotted overrides.

    cfg = load_config("tiny", ["optim.lr=0.01", "priors.s_min=0.15"])

``name`` is a preset in ``ssd/configs/`` or a path to a YAML file. Overrides are ``key=value``
with dotted keys and YAML-parsed values; an unknown key is an error that names the key and the
known keys, never a silent no-op (nanoGPT-style configs, but without ``exec``).

The ``priors`` section is a :class:`~ssd.priors.PriorSpec`: ``preset: NAME`` picks a named spec and
any other field overrides it.

Every field is type- and range-checked when its section is built (``ssd.priors.check_fields``), so
a bad value fails here, not inside a training worker, with a one-line ConfigError that names the
key, the value and what is allowed: ``optim.lr must be a number >= 0, got 'abc'``. A number-like
string is taken as the number: PyYAML reads ``1e-3`` (no dot) as a string.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssd.coding import MatchingConfig
from ssd.fields import Bool, Int, Maybe, Num, OneOf, OrName, Seq, Str, check_fields
from ssd.postprocess import PostprocessConfig
from ssd.priors import PriorSpec, PriorSpecError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def _architectures() -> tuple[str, ...]:
    # Imported when a ModelConfig is built, not at the top: ssd.models imports this module. By
    # then both are loaded (this module builds no ModelConfig while importing), and it is cheap.
    from ssd.models import ARCHITECTURES

    return ARCHITECTURES


@dataclass(frozen=True)
class ModelConfig:
    #: one of ssd.models.ARCHITECTURES
    arch: str = "tiny"
    #: number of classes including background (label 0)
    num_classes: int = 21
    #: pretrained backbone weights (ssd.models.weights): "imagenet" (torchvision's published
    #: weights for the arch, from $TORCH_HOME/hub/checkpoints, downloaded there when the network
    #: answers), a local path, an http(s) URL or an s3:// URI of a state dict, or "none" / null
    #: (train from scratch). Read by ssd.models.resolve_backbone_weights(cfg) on the driver;
    #: build_model(cfg) itself never fetches "imagenet".
    backbone_weights: str | None = None
    #: channel multiplier of the MobileNet / tiny backbones
    width_mult: float = 1.0

    def __post_init__(self) -> None:
        check_fields(
            self, "model", ConfigError,
            arch=OneOf(_architectures()),
            num_classes=Int(">= 2"),  # the background and at least one object class
            backbone_weights=Maybe(Str()),
            width_mult=Num("> 0"),
        )
        if self.backbone_weights == "imagenet":
            from ssd.models.weights import published_weights

            try:  # one line naming the arch when torchvision publishes no weights for it
                published_weights(self.arch)
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class LossConfig:
    #: hard negatives kept per positive, per image (paper section 2.2: 3)
    neg_ratio: float = 3.0
    #: weight alpha of the localisation term (paper eq. 1: 1)
    loc_weight: float = 1.0

    def __post_init__(self) -> None:
        check_fields(
            self, "loss", ConfigError,
            # 0 is refused: without negatives the classifier never sees the background class and
            # learns to call every prior an object (the ablation "no mining" is a large ratio).
            neg_ratio=Num("> 0"),
            loc_weight=Num(">= 0"),  # 0: classification only, a meaningful ablation
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strength and the input normalisation.

    The normalisation follows the backbone weights' input convention (``ssd.models.weights``):
    ``rgb`` (torchvision's: RGB, ``(x / 255 - mean) / std`` with ImageNet's statistics) or
    ``caffe_bgr`` (Caffe's: BGR, 0-255 pixels minus (104, 117, 123), std 1). ``mean`` / ``std``
    are always RGB statistics in [0, 1] units (pixels are divided by 255 first), so Caffe's are
    ``(123, 117, 104) / 255`` and ``1 / 255`` here; unset, they are the convention's (ImageNet's
    when ``input_convention`` is null). With a convention set, an explicit ``mean`` / ``std``
    that differs from it is an error naming both; null leaves them free (training from scratch),
    and ``ssd.models.resolve_backbone_weights`` then checks them against the weights' (``rgb``).
    """

    #: 0 = resize only, 1 = the paper's full policy
    strength: float = 1.0
    #: "rgb", "caffe_bgr", or null (no weights-imposed convention: RGB order, free statistics)
    input_convention: str | None = None
    #: RGB means in [0, 1] units; None: the convention's
    mean: tuple[float, float, float] | None = None
    #: RGB standard deviations in [0, 1] units; None: the convention's
    std: tuple[float, float, float] | None = None

    #: the input conventions with their (mean, std) as RGB statistics in [0, 1] units
    CONVENTIONS = (
        ("rgb", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("caffe_bgr", (123 / 255, 117 / 255, 104 / 255), (1 / 255, 1 / 255, 1 / 255)),
    )

    @classmethod
    def convention_stats(cls, convention: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of an input convention, RGB in [0, 1] units; KeyError if unknown."""
        for name, mean, std in cls.CONVENTIONS:
            if name == convention:
                return mean, std
        raise KeyError(convention)

    def __post_init__(self) -> None:
        convention = self.input_convention
        names = tuple(name for name, _, _ in self.CONVENTIONS)
        if convention is not None and convention not in names:
            raise ConfigError(
                f"unknown augment.input_convention {convention!r}: must be null or one of "
                + ", ".join(repr(c) for c in names)
            )
        stats = dict(zip(("mean", "std"), self.convention_stats(convention or "rgb")))
        for name, default in stats.items():
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif convention is not None and self._differs(value, default):
                raise ConfigError(
                    f"augment.{name}={list(value)} conflicts with augment.input_convention="
                    f"{convention}, whose {name} is {[round(v, 6) for v in default]} (RGB, "
                    f"[0, 1] units): drop augment.{name} to use the convention's, or set "
                    f"augment.input_convention=null (free statistics, training from scratch)"
                )
        check_fields(
            self, "augment", ConfigError,
            strength=Num("[0, 1]"),
            input_convention=Maybe(OneOf(names)),
            # RGB statistics in [0, 1] units (ssd.transforms divides pixels by 255 first): the
            # ranges refuse 0-255 values such as Caffe's (104, 117, 123)
            mean=Seq(Num("[0, 1]"), length=3),
            std=Seq(Num("(0, 1]"), length=3),
        )

    @staticmethod
    def _differs(value: Any, default: tuple[float, ...]) -> bool:
        """True when ``value`` is 3 numbers other than ``default`` (malformed values are left
        to the field checks)."""
        try:
            numbers = [float(v) for v in value]
        except (TypeError, ValueError):
            return False
        return len(numbers) == len(default) and any(
            abs(a - b) > 1e-6 * abs(b) for a, b in zip(numbers, default)
        )


#: the LR schedules ``ssd.engine.lr_factor`` implements
SCHEDULES = ("multistep", "cosine")


#: ``optim.milestones`` when neither it nor ``optim.lr_steps`` is given
DEFAULT_MILESTONES = (0.67, 0.89)


@dataclass(frozen=True)
class OptimConfig:
    """SGD and the lr schedule; ``ssd.schedule.plan_schedule`` turns it into iterations.

    LR drops (multistep) come from exactly one of ``lr_steps`` (absolute iterations, the
    references' ``[80000, 100000]``) and ``milestones`` (fractions of the run's iterations); both
    given is an error (``optim.milestones=null`` or ``[]`` clears the fractions). Neither given:
    the default fractions ``DEFAULT_MILESTONES``.

    Linear scaling (Goyal et al. 2017): ``reference_batch`` is the global batch ``lr`` is meant
    for; a run whose ``train.batch_size`` differs uses ``lr * batch_size / reference_batch``,
    after the same ``warmup_iters`` linear warm-up. None: ``lr`` is used as is, whatever the batch.
    """

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: linear warm-up steps up to the (scaled) lr
    warmup_iters: int = 500
    #: "multistep" or "cosine"
    schedule: str = "multistep"
    #: multistep drops as fractions of the total training iterations (None: the default
    #: fractions, or none when ``lr_steps`` is given)
    milestones: tuple[float, ...] | None = None
    #: multistep drops at these absolute iterations instead (e.g. [80000, 100000])
    lr_steps: tuple[int, ...] | None = None
    gamma: float = 0.1
    #: max gradient norm; 0 disables clipping
    grad_clip: float = 0.0
    #: the global batch ``lr`` is for (linear scaling rule); None: the run's own batch
    reference_batch: int | None = None

    def __post_init__(self) -> None:
        milestones_given = self.milestones is not None
        if self.milestones is None:
            object.__setattr__(self, "milestones", () if self.lr_steps is not None else DEFAULT_MILESTONES)
        check_fields(
            self, "optim", ConfigError,
            # 0 is allowed: a run that keeps its initial weights (tests/test_transfer.py checks
            # that a run starts from the given state this way)
            lr=Num(">= 0"),
            momentum=Num("[0, 1)"),  # SGD's momentum; 1 never forgets a gradient
            weight_decay=Num(">= 0"),
            warmup_iters=Int(">= 0"),
            schedule=OneOf(SCHEDULES),
            milestones=Seq(Num("(0, 1)"), increasing=True),
            lr_steps=Maybe(Seq(Int(">= 1"), increasing=True)),
            gamma=Num("(0, 1]"),  # the LR factor at each milestone: 1 keeps it constant
            grad_clip=Num(">= 0"),
            reference_batch=Maybe(Int(">= 1")),
        )
        if self.lr_steps is not None and milestones_given and self.milestones:
            raise ConfigError(
                f"optim.lr_steps={list(self.lr_steps)} and optim.milestones={list(self.milestones)} are both set; "
                "the lr drops come from one of them: add optim.milestones=null to use lr_steps")
        if self.lr_steps is not None and self.schedule != "multistep":
            raise ConfigError(f"optim.lr_steps={list(self.lr_steps)} has no effect with optim.schedule="
                              f"{self.schedule}: drop it or use optim.schedule=multistep")


#: the run's length when neither ``train.epochs`` nor ``train.max_iters`` is given
DEFAULT_EPOCHS = 10


@dataclass(frozen=True)
class TrainConfig:
    """The batch, the run's length and its rhythm (``ssd.schedule.plan_schedule`` has the arithmetic).

    ``batch_size`` is the GLOBAL batch: with W workers each takes ``batch_size / W`` images per
    step (not divisible: an error naming both numbers), so one optimizer step sees
    ``batch_size`` images whatever the number of workers.

    The length is exactly one of ``max_iters`` (optimizer steps; training stops after exactly
    that many, possibly mid-epoch, with a final evaluation and checkpoint) and ``epochs``, a
    shorthand for ``epochs * floor(train samples / batch_size)`` steps (the same with 1 or N
    workers). Both set is an error (``train.epochs=null`` clears the epochs of a preset);
    neither: ``DEFAULT_EPOCHS`` epochs. Evaluation (``eval_every``), checkpoints and the frozen
    backbone count passes over the data, which are epochs except when ``max_iters`` ends the
    last one early (or when an uneven shard split makes a pass a few steps shorter).
    """

    #: the length in epochs (see above); None when ``max_iters`` gives it
    epochs: int | None = None
    #: the length in optimizer steps (the references: 120000); None when ``epochs`` gives it
    max_iters: int | None = None
    #: global batch: images per optimizer step, all workers together
    batch_size: int = 32
    seed: int = 0
    #: validation after every this many epochs (and always after the last), or "auto": after an
    #: epoch whenever that keeps evaluation within ``eval_budget`` of the run's wall time
    #: (``ssd.train_hooks.EvaluationBudget``)
    eval_every: int | str = "auto"
    #: "auto"'s share of wall time for evaluation (the final evaluation is always run)
    eval_budget: float = 0.1
    #: epochs at the start during which the backbone is frozen (no gradients, BatchNorm
    #: statistics fixed): a finetune first fits the new head to the pretrained features
    freeze_backbone_epochs: int = 0
    #: NHWC activations: faster convolutions on GPUs and on this CPU (VGG16-SSD300 1.19x, tiny
    #: 1.29x for a training step, measured with oneDNN in torch 2.14)
    channels_last: bool = True
    #: wrap the model's forward and the loss in torch.compile (ssd.engine.StepRunner)
    compile: bool = False
    #: where the SSD augmentation runs: "cpu" (loader workers, per image), "device" (batched on
    #: the training device after decoding there; ssd.device_augment), "auto" (device on a
    #: GPU, cpu otherwise)
    augment_on: str = "auto"
    #: also a checkpoint every this many optimizer steps (0: only at epochs' ends), and/or
    #: after this many minutes since the last one (0: off; checked at log points). Taken
    #: mid-epoch, a checkpoint resumes after the batches already trained; it is written from a
    #: host copy by a background thread (``ssd.train_hooks.CheckpointReport``)
    checkpoint_every_iters: int = 0
    checkpoint_every_minutes: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_iters is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        check_fields(
            self, "train", ConfigError,
            # null only when max_iters gives the length (keeps "an integer >= 1" in the message)
            epochs=Int(">= 1") if self.epochs is not None else Maybe(Int(">= 1")),
            max_iters=Maybe(Int(">= 1")),
            batch_size=Int(">= 1"),
            seed=Int("[0, 4294967295]"),  # 32 bits: what every seeding API accepts
            eval_every=OrName(Int(">= 1"), ("auto",)),
            eval_budget=Num("(0, 1]"),
            # more than train.epochs is allowed: the backbone then stays frozen for the whole run
            freeze_backbone_epochs=Int(">= 0"),
            channels_last=Bool(),
            compile=Bool(),
            augment_on=OneOf(("auto", "cpu", "device")),
            checkpoint_every_iters=Int(">= 0"),
            checkpoint_every_minutes=Num(">= 0"),
        )
        if self.epochs is not None and self.max_iters is not None:
            raise ConfigError(
                f"train.epochs={self.epochs} and train.max_iters={self.max_iters} are both set; exactly one defines "
                "the run's length: add train.epochs=null to train for max_iters steps (or train.max_iters=null)")


@dataclass(frozen=True)
class RecipeConfig:
    """Where a preset's training recipe comes from and what it should reach: metadata, printed at
    the top of a run's recipe block and logged with its params (``recipe.name`` ...); it changes
    nothing in training. Named recipes (``ssd/configs/ssd300_voc0712.yaml`` ...) set it; a run
    that changes the recipe's batch, length or schedule is told its figure may not hold."""

    #: the recipe's name (the preset's), e.g. "ssd300_voc0712"
    name: str | None = None
    #: its source: paper section, reference implementation and config file
    reference: str | None = None
    #: what it should reach, with the data it is measured on
    expected: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "recipe", ConfigError, name=Maybe(Str()), reference=Maybe(Str()), expected=Maybe(Str()))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    priors: PriorSpec = field(default_factory=lambda: PriorSpec.preset("tiny"))
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, no tuples) that :func:`config_from_dict` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = section.to_dict() if isinstance(section, PriorSpec) else _plain(
                dataclasses.asdict(section)
            )
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for logging as run parameters."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "priors": PriorSpec,
    "matching": MatchingConfig,
    "loss": LossConfig,
    "augment": AugmentConfig,
    "postprocess": PostprocessConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "recipe": RecipeConfig,
}


#: keys that moved to another section: configs saved before the move (checkpoints, registered
#: models, YAML files) are read with the value in its new place; overrides get a pointer
MOVED_KEYS: dict[str, str] = {
    "loss.iou_threshold": "matching.iou_threshold",
    "loss.variances": "matching.variances",
}


def _move_old_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with ``MOVED_KEYS`` in their current sections (an explicit new key wins)."""
    data = dict(data)
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        section = dict(section)
        value = section.pop(old_key)
        data[old_section] = section
        target = dict(data.get(new_section) or {})
        target.setdefault(new_key, value)
        data[new_section] = target
    return data


def _field_names(cls: type) -> list[str]:
    names = [f.name for f in dataclasses.fields(cls)]
    return names + ["preset"] if cls is PriorSpec else names


def _coerce(cls: type, values: dict[str, Any], section: str) -> Any:
    """Build a section dataclass, turning YAML lists into tuples where the default is a tuple."""
    unknown = sorted(set(values) - set(_field_names(cls)))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; "
            f"known keys in '{section}': {sorted(_field_names(cls))}"
        )
    # The section's __post_init__ checks every value and raises ConfigError naming the key.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"invalid '{section}' section: {err}") from None


def _resolve_priors(values: dict[str, Any]) -> PriorSpec:
    values = dict(values)
    preset = values.pop("preset", None)
    base = PriorSpec.preset(preset).to_dict() if preset else {}
    explicit_sizes = values.get("min_sizes") is not None
    inherited_sizes = "min_sizes" not in values and base.get("min_sizes") is not None
    defaults = {f.name: f.default for f in dataclasses.fields(PriorSpec)}
    # Keys of the linear rule that this section changes (a resolved dump repeats the defaults).
    changed = sorted(
        k
        for k in ("s_min", "s_max", "first_level_scale")
        if k in values and values[k] != base.get(k, defaults[k])
    )
    if changed and (explicit_sizes or inherited_sizes):
        # The linear rule is unused while explicit sizes are set: refuse rather than ignore.
        raise ConfigError(
            f"priors.{changed[0]} has no effect while priors.min_sizes is set"
            f"{' by preset ' + repr(preset) if inherited_sizes else ''}; "
            "add priors.min_sizes=null priors.max_sizes=null to use the linear scale rule"
        )
    base.update(values)
    if preset and "name" not in values:
        base["name"] = preset if not values else f"{preset}+custom"
    try:
        return PriorSpec.from_dict(base)
    except PriorSpecError as err:  # already names the key: "priors.s_min must be ..."
        raise ConfigError(str(err)) from None
    except TypeError as err:  # e.g. a required field missing
        raise ConfigError(f"invalid 'priors' section: {err}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    data = _move_old_keys(data)
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known sections: {sorted(_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section '{name}' must be a mapping, got {values!r}")
        sections[name] = _resolve_priors(values) if cls is PriorSpec else _coerce(cls, values, name)
    return Config(**sections)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (values parsed as YAML)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:  # e.g. "optim.milestones=[0.5,": one line, not YAML's five
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"override {item!r}: the value is not YAML ({problem})") from None
    return set_values(data, values)


def set_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config dict ``data`` with ``{"section.key": value}`` set (values as
    they are: a sweep's sampled values, an override's parsed YAML). Keys are checked here."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {key!r} must be 'section.key'")
        section, name = parts
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown key {key!r}: no section {section!r}; known sections: {sorted(_SECTIONS)}"
            )
        if key in MOVED_KEYS:
            raise ConfigError(f"{key} is now {MOVED_KEYS[key]}")
        if name not in _field_names(_SECTIONS[section]):
            raise ConfigError(
                f"unknown key {key!r}; known keys in '{section}': "
                f"{sorted(_field_names(_SECTIONS[section]))}"
            )
        if data.get(section) is None:
            data[section] = {}
        data[section][name] = value
    return data


def read_yaml_mapping(path: Path, error: type[Exception], top_level: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (empty file: ``{}``); otherwise ``error``
    naming the file: "not valid YAML: ..." or "the top level must be ``top_level``"."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be {top_level}")
    return data


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name (``ssd/configs/<name>.yaml``) or a path; ConfigError
    listing the presets when there is none."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config {str(name_or_path)!r} not found; presets: {presets}")
    return path


def read_preset(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw config dict of a preset or YAML file, with its ``base:`` (a preset name, or a path
    relative to the file) merged under it section by section: a key the file sets wins, every
    other key is the base's. Two-stage pipeline recipes (a ``stages:`` key) are refused here."""
    path = preset_path(name_or_path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p.name) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: 'base' goes round in a circle: {chain}")
    data = read_yaml_mapping(path, ConfigError, "a mapping of sections")
    if "stages" in data:
        raise ConfigError(f"{path.stem} is a two-stage recipe (pretrain, then finetune): run it with "
                          f"pipelines/pretrain_finetune.py --config {path.stem}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a preset name or a YAML path, got {base!r}")
    base_ref: str | Path = base if not Path(base).suffix else path.parent / base
    merged = read_preset(base_ref, (*_seen, path.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def read_stages(name_or_path: str | Path) -> dict[str, Any] | None:
    """A two-stage pipeline recipe's ``stages`` and ``recipe`` (``{"recipe": {...}, "pretrain":
    {"config": NAME, "overrides": [...]}, "finetune": {...}}``), or None for a one-stage config."""
    path = preset_path(name_or_path)
    data = read_yaml_mapping(path, ConfigError, "a mapping")
    stages = data.get("stages")
    if stages is None:
        return None
    if not isinstance(stages, dict) or set(stages) != {"pretrain", "finetune"}:
        raise ConfigError(f"{path}: stages must be a mapping with exactly 'pretrain' and 'finetune'")
    out: dict[str, Any] = {"recipe": data.get("recipe") or {}}
    for stage, spec in stages.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), str):
            raise ConfigError(f"{path}: stages.{stage} must give 'config' (a preset) and optionally 'overrides'")
        overrides = spec.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{path}: stages.{stage}.overrides must be a list of KEY=VALUE strings")
        out[stage] = {"config": spec["config"], "overrides": list(overrides)}
    return out


def load_config(name_or_path: str | Path = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a preset name (``ssd/configs/<name>.yaml``) or a YAML path (with its ``base:``
    chain, :func:`read_preset`), then apply overrides."""
    path = preset_path(name_or_path)
    data = read_preset(path)
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
