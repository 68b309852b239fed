"""Search spaces for sweeps: YAML files (``tune_spaces/``) over the training config's dotted keys.

Grammar (one mapping ``space:`` of dotted config key -> distribution or fixed value)::

    include: [priors.yaml]            # optional: other spaces (paths relative to this file) merged
                                      # first; keys given here win
    space:
      priors.s_min: {uniform: [0.1, 0.3]}          # float in [low, high]
      optim.lr: {loguniform: [0.005, 0.1]}        # float, log-uniform, 0 < low < high
      loss.neg_ratio: {randint: [2, 6]}           # int in [low, high)  (2, 3, 4 or 5)
      augment.strength: {choice: [0.0, 0.5, 1.0]} # one value drawn at random per trial
      priors.extra_box: {grid: [true, false]}     # every value; grids are crossed, and each
                                                  # grid point is run --num-samples times
      priors.min_sizes: null                      # anything else: a fixed override

These map one to one onto Ray Tune's ``tune.uniform/loguniform/randint/choice/grid_search``
(``ssd.distributed.tune``); this module itself imports no Ray. A space is checked when loaded,
before any trial: every key must exist in the config, every range must be valid, and every value a
distribution can produce at its edges (each choice, each grid value, the bounds) must give a valid
config on its own, with the key named in the error. What only a combination can break (e.g.
``s_min >= s_max``) is found per trial (``trial_config``), where it fails that trial only.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    read_yaml_mapping,
    set_values,
)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class SpaceError(ValueError):
    """An unusable search space; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` in DISTRIBUTIONS and its arguments (bounds or values)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def edge_values(self) -> list[Any]:
        """Values checked against the config when the space is loaded: the bounds, each choice.

        Every numeric range of the config is an interval, so valid bounds make every value in
        between valid too. A continuous distribution also gets the float just above its low
        bound: its draws have fractions, which an integer key (``train.epochs``) refuses.
        """
        if self.kind in ("uniform", "loguniform"):
            low, high = self.args
            return [low, math.nextafter(low, high), high]
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "uniform":
            return rng.uniform(*self.args)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.args[0]), math.log(self.args[1])))
        if self.kind == "randint":
            return rng.randrange(*self.args)
        return rng.choice(self.args)


@dataclass(frozen=True)
class SearchSpace:
    """A loaded, checked space: searched ``params`` and ``fixed`` overrides, by dotted key."""

    params: dict[str, Param]
    fixed: dict[str, Any]
    source: str = "<memory>"

    @classmethod
    def load(cls, path: str | Path, base: str | Path | Config = "tiny") -> SearchSpace:
        """Read ``path`` (with its includes) and check it against the ``base`` config."""
        params, fixed = _read(Path(path), seen=())
        space = cls(params, fixed, str(path))
        space.check(base)
        return space

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: str | Path | Config = "tiny", source: str = "<memory>") -> SearchSpace:
        params, fixed = _parse(data, source)
        space = cls(params, fixed, source)
        space.check(base)
        return space

    def snapshot(self) -> dict[str, Any]:
        """The loaded space as plain JSON data (includes resolved), for ``from_snapshot``: a
        resumed sweep must not depend on the YAML files still being where they were."""
        return {"params": {k: {"kind": p.kind, "args": list(p.args)} for k, p in self.params.items()},
                "fixed": dict(self.fixed), "source": self.source}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> SearchSpace:
        params = {k: Param(k, v["kind"], tuple(v["args"])) for k, v in data["params"].items()}
        return cls(params, dict(data["fixed"]), data.get("source", "<snapshot>"))

    def check(self, base: str | Path | Config) -> None:
        """Raise SpaceError naming the key when a key or an edge value cannot make a config."""
        base_dict = _base_dict(base)
        try:
            with_fixed = set_values(base_dict, self.fixed)
            config_from_dict(with_fixed)
        except ConfigError as err:
            raise SpaceError(f"{self.source}: fixed values: {err}") from None
        for key, param in self.params.items():
            for value in param.edge_values():
                try:
                    config_from_dict(set_values(with_fixed, {key: value}))
                except ConfigError as err:
                    if value not in param.args:  # the fractional draw of uniform / loguniform
                        raise SpaceError(f"{self.source}: {key}: {param.kind} draws fractional values such as "
                                         f"{value!r}, which give no valid config (use randint for an integer): "
                                         f"{err}") from None
                    raise SpaceError(f"{self.source}: {key}: the value {value!r} gives no valid config: {err}") from None

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid params (one empty point when there are none)."""
        points: list[dict[str, Any]] = [{}]
        for key, param in self.params.items():
            if param.kind == "grid":
                points = [{**p, key: v} for p in points for v in param.args]
        return points

    def sample(self, num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
        """Trial values as Tune would draw them: each grid point ``num_samples`` times, the other
        params drawn at random (fixed values included)."""
        rng = random.Random(seed)
        out = []
        for point in self.grid_points():
            for _ in range(num_samples):
                values = {k: p.sample(rng) for k, p in self.params.items() if p.kind != "grid"}
                out.append({**self.fixed, **point, **values})
        return out


def trial_config(base: str | Path | Config | dict[str, Any], values: dict[str, Any], extra_overrides: list[str] | None = None) -> Config:
    """The full config of one trial: ``base`` + ``extra_overrides`` + the sampled ``values``.

    Raises ConfigError (naming the keys involved) for a combination that cannot be built.
    """
    data = apply_overrides(_base_dict(base), list(extra_overrides or []))
    try:  # the sampled values are set as they are (no text round trip), then checked once
        return config_from_dict(set_values(data, values))
    except ConfigError as err:
        raise ConfigError(f"sampled {json.dumps(values, sort_keys=True, default=str)}: {err}") from None


def _base_dict(base: str | Path | Config | dict[str, Any]) -> dict[str, Any]:
    if isinstance(base, dict):  # already a config dict (a sweep's saved base)
        return base
    cfg = base if isinstance(base, Config) else load_config(base)
    return cfg.to_dict()


def _read(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Param], dict[str, Any]]:
    path = path.resolve()
    if path in seen:
        raise SpaceError(f"{path}: includes itself (via {' -> '.join(str(p) for p in seen)})")
    if not path.is_file():
        raise SpaceError(f"search space {path} not found")
    data = read_yaml_mapping(path, SpaceError, "a mapping with 'space' (and optional 'include')")
    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    includes = data.get("include") or []
    if not isinstance(includes, list):
        raise SpaceError(f"{path}: include must be a list of space files")
    for name in includes:
        inc_params, inc_fixed = _read(path.parent / name, (*seen, path))
        params.update(inc_params)
        fixed.update(inc_fixed)
    own_params, own_fixed = _parse(data, str(path))
    for key in own_params:
        fixed.pop(key, None)
    for key in own_fixed:
        params.pop(key, None)
    params.update(own_params)
    fixed.update(own_fixed)
    return params, fixed


def _parse(data: dict[str, Any], source: str) -> tuple[dict[str, Param], dict[str, Any]]:
    unknown = sorted(set(data) - {"space", "include", "description"})
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key(s) {unknown}; expected 'space', 'include', 'description'")
    space = data.get("space") or {}
    if not isinstance(space, dict):
        raise SpaceError(f"{source}: 'space' must map dotted config keys to distributions")
    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    for key, spec in space.items():
        _check_key(key, source)
        if isinstance(spec, dict):
            params[key] = _param(key, spec, source)
        else:
            fixed[key] = spec
    return params, fixed


def _check_key(key: Any, source: str) -> None:
    if not isinstance(key, str):
        raise SpaceError(f"{source}: key {key!r} is not a dotted 'section.key' string")
    try:
        apply_overrides({}, [f"{key}=null"])
    except ConfigError as err:
        raise SpaceError(f"{source}: {err}") from None


def _param(key: str, spec: dict[str, Any], source: str) -> Param:
    where = f"{source}: {key}"
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise SpaceError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise SpaceError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: loguniform needs 0 < low, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SpaceError(f"{where}: randint needs integer bounds, got {args!r}")
        return Param(key, kind, (low, high))
    return Param(key, kind, tuple(args))
