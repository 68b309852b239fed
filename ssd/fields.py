"""Field checks for the config dataclasses: one rule per field, checked when a section is built.

Every config dataclass (``ssd.priors.PriorSpec``, the sections of ``ssd.config``,
``ssd.postprocess.PostprocessConfig``) declares one rule per field and calls :func:`check_fields`
in ``__post_init__``: a bad value is refused where the config is built, not later inside every
training worker. This module imports nothing from ``ssd``, so every config module can use it.

A refusal is one line, "KEY must be REQUIREMENT, got VALUE": "optim.lr must be a number >= 0,
got 'abc'" (wrong type: the type and the range), "augment.strength must be in [0, 1], got 1.5"
(out of range: the range).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar


class _Refused(Exception):
    """Raised by a rule: the value does not meet ``requirement`` (the words after "must be")."""

    def __init__(self, requirement: str) -> None:
        super().__init__(requirement)
        self.requirement = requirement


def _in_range(x: float, text: str) -> bool:
    """Whether ``x`` lies in the range written ``text``: "> 0", ">= 1", "[0, 1)", "(0, 1]", ..."""
    if text.startswith(">="):
        return x >= float(text[2:])
    if text.startswith(">"):
        return x > float(text[1:])
    low, high = (float(bound) for bound in text[1:-1].split(","))
    above = low <= x if text[0] == "[" else low < x
    below = x <= high if text[-1] == "]" else x < high
    return above and below


def show(value: Any) -> str:
    """A value as a message shows it: tuples as lists, the way YAML and overrides write them."""

    def plain(v: Any) -> Any:
        return [plain(item) for item in v] if isinstance(v, (list, tuple)) else v

    return repr(plain(value))


def _range_words(text: str) -> str:
    return f"in {text}" if text[0] in "[(" else text


class Rule:
    """The allowed values of one field."""

    @property
    def text(self) -> str:
        """What a value must be, completing "KEY must be ...": "a number in [0, 1]"."""
        raise NotImplementedError

    @property
    def plural(self) -> str:
        """The same for the items of a list, completing "a list of ...": "numbers in [0, 1]"."""
        raise NotImplementedError

    def __call__(self, value: Any) -> Any:
        """The value, normalised (e.g. "1e-3" -> 0.001, [1, 2] -> (1, 2)); raises _Refused."""
        raise NotImplementedError

    def sentence(self, key: str, value: Any, requirement: str) -> str:
        return f"{key} must be {requirement}, got {show(value)}"


@dataclass(frozen=True)
class _Ranged(Rule):
    """A number rule with a range such as "> 0" or "[0, 1)"; ``noun`` is (singular, plural)."""

    range: str
    noun: ClassVar[tuple[str, str]]

    @property
    def text(self) -> str:
        return f"{self.noun[0]} {_range_words(self.range)}"

    @property
    def plural(self) -> str:
        return f"{self.noun[1]} {_range_words(self.range)}"


@dataclass(frozen=True)
class Num(_Ranged):
    """A finite int or float (not a bool) in ``range``: Num("> 0"), Num("[0, 1)")."""

    noun: ClassVar[tuple[str, str]] = ("a number", "numbers")

    def __call__(self, value: Any) -> Any:
        number = value
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 and 5e-4, having no dot, as strings: take a string
            # that reads as a number, so that `optim.lr=1e-3` works ('abc' is still refused).
            try:
                number = float(value)
            except ValueError:
                raise _Refused(self.text) from None
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise _Refused(self.text)
        if not isinstance(number, numbers.Integral) and not math.isfinite(number):
            raise _Refused(self.text)  # inf, nan (an int is finite, and may be too large for a float)
        if not _in_range(number, self.range):
            raise _Refused(_range_words(self.range))
        # ints stay ints (a run logged "3" before, and still does); numpy scalars become floats
        return number if isinstance(number, (int, float)) else float(number)


@dataclass(frozen=True)
class Int(_Ranged):
    """An int (not a bool; a float without a fraction, e.g. 2.0, is taken as 2) in ``range``."""

    noun: ClassVar[tuple[str, str]] = ("an integer", "integers")

    def __call__(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Refused(self.text)
        if not isinstance(value, numbers.Integral) and not float(value).is_integer():
            raise _Refused(self.text)
        if not _in_range(int(value), self.range):
            raise _Refused(_range_words(self.range))
        return int(value)


class Bool(Rule):
    text = "true or false"  # type: ignore[assignment]
    plural = "booleans"  # type: ignore[assignment]

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _Refused(self.text)
        return value


class Str(Rule):
    text = "a non-empty string"  # type: ignore[assignment]
    plural = "non-empty strings"  # type: ignore[assignment]

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise _Refused(self.text)
        return value


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of names."""

    choices: tuple[str, ...]

    @property
    def text(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or value not in self.choices:
            raise _Refused(self.text)
        return value

    def sentence(self, key: str, value: Any, requirement: str) -> str:
        return f"unknown {key} {show(value)}: must be {requirement}"


@dataclass(frozen=True)
class Seq(Rule):
    """A list or tuple of ``item`` values, stored as a tuple (the config dataclasses are frozen
    and hashable). ``length``: exactly that many; ``increasing``: strictly increasing items."""

    item: Rule
    length: int | None = None
    nonempty: bool = False
    increasing: bool = False

    @property
    def text(self) -> str:
        words = ("a", "non-empty" if self.nonempty else "",
                 "strictly increasing" if self.increasing else "", "list of",
                 "" if self.length is None else str(self.length), self.item.plural)
        return " ".join(word for word in words if word)

    @property
    def plural(self) -> str:
        return f"lists of {self.item.plural}"

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _Refused(self.text)
        if (self.length is not None and len(value) != self.length) or (self.nonempty and not value):
            raise _Refused(self.text)
        try:
            items = tuple(self.item(v) for v in value)
        except _Refused:
            raise _Refused(self.text) from None
        if self.increasing and any(a >= b for a, b in itertools.pairwise(items)):
            raise _Refused(self.text)
        return items


@dataclass(frozen=True)
class Maybe(Rule):
    """None (YAML null) or a value of ``rule``."""

    rule: Rule

    @property
    def text(self) -> str:
        return f"null or {self.rule.text}"

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.rule(value)
        except _Refused as refused:
            # a wrong type names null as well; a number out of range names only the range
            wrong_type = refused.requirement == self.rule.text
            raise _Refused(self.text if wrong_type else refused.requirement) from None


@dataclass(frozen=True)
class OrName(Rule):
    """A value of ``rule`` or one of the names ``names`` (e.g. an integer >= 1 or "auto")."""

    rule: Rule
    names: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.rule.text} or " + " or ".join(repr(n) for n in self.names)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str) and value in self.names:
            return value
        try:
            return self.rule(value)
        except _Refused as refused:
            # a wrong type names the names as well; a number out of range names only the range
            wrong_type = refused.requirement == self.rule.text
            raise _Refused(self.text if wrong_type else refused.requirement) from None


def check_fields(obj: Any, section: str, error: type[Exception], **rules: Rule) -> None:
    """Check each field of the frozen dataclass ``obj`` against its rule, in field order, and store
    the normalised values; raise ``error`` naming the first bad one as ``section.field``.

    Every field needs a rule (and every rule a field): a field added later cannot go unchecked.
    """
    names = [f.name for f in dataclasses.fields(obj)]
    if sorted(names) != sorted(rules):
        raise TypeError(f"{type(obj).__name__}: rules for {sorted(rules)}, fields {sorted(names)}")
    for name in names:
        value, rule = getattr(obj, name), rules[name]
        try:
            normal = rule(value)
        except _Refused as refused:
            raise error(rule.sentence(f"{section}.{name}", value, refused.requirement)) from None
        if normal is not value:
            object.__setattr__(obj, name, normal)
