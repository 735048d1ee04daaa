"""Declared parameter constraints (scikit-learn's ``_parameter_constraints`` idea).

A settings spec declares ``constraints``: parameter name -> allowed kinds (:class:`Interval`,
:class:`Options`, :class:`Check`, :class:`ListOf`, or ``None``). :func:`check_params` refuses the
first value no kind accepts, naming the parameter in backticks; :func:`invalid_value` gives a
value a parameter refuses.

Examples
--------
>>> constraints = {"steps": [Interval(int, 1, None)], "objective": [Options(("kl", "mse"))],
...                "max_rows": [None, Interval(int, 1, None, says="positive")]}
>>> check_params(constraints, {"steps": 3, "objective": "kl", "max_rows": None})
>>> check_params(constraints, {"steps": 0, "objective": "kl", "max_rows": None})
Traceback (most recent call last):
  ...
njtc_solve.core.errors.NJTCError: `steps` must be at least 1, not 0
>>> invalid_value(constraints["objective"]), invalid_value(constraints["max_rows"])
('not-an-option', 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from numbers import Integral, Real

from njtc_solve.core.errors import NJTCError

__all__ = ["BOOLEAN", "DEVICE", "Check", "Interval", "ListOf", "Options", "check_params", "check_spec", "invalid_value"]


class Interval:
    """Whole (``int``) or finite real (``float``) numbers between ``low`` and ``high`` (``None``: open).

    ``closed``: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``; booleans are no numbers.
    ``says`` replaces the words after "must be"; ``show_value`` ends the message with the value.
    """

    def __init__(self, kind: type, low=None, high=None, *, closed: str = "both", says: str | None = None,
                 show_value: bool = True):
        self.kind = Integral if kind in (int, Integral) else Real
        self.low, self.high, self.closed, self.show_value = low, high, closed, show_value
        self.says = says or self._words()

    def _words(self) -> str:
        """What the interval accepts, in words."""
        what = "a whole number" if self.kind is Integral else "a finite number"
        low_in, high_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.high is None:
            if self.low is None:
                return what
            if self.kind is Real and self.low == 0 and not low_in:
                return "a positive finite number"
            return f"at least {self.low}" if low_in else f"{what} above {self.low}"
        if self.low is None:
            return f"at most {self.high}" if high_in else f"{what} below {self.high}"
        return f"in {'[' if low_in else '('}{self.low}, {self.high}{']' if high_in else ')'}"

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if self.kind is Real and not math.isfinite(value):
            return False
        low_in, high_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and (value < self.low if low_in else value <= self.low):
            return False
        return self.high is None or (value <= self.high if high_in else value < self.high)

    def invalid(self):
        if self.low is not None:
            return self.low - 1 if self.kind is Integral or self.closed in ("both", "left") else self.low
        if self.high is not None:
            return self.high + 1 if self.kind is Integral or self.closed in ("both", "right") else self.high
        return "not-a-number"


class Options:
    """One of ``values``."""

    def __init__(self, values, *, says: str | None = None, show_value: bool = True):
        self.values, self.show_value = tuple(values), show_value
        self.says = says or f"one of {', '.join(map(str, self.values))}"

    def holds(self, value) -> bool:
        return isinstance(value, (str, int, float, bool, type(None))) and value in self.values

    def invalid(self):
        return "not-an-option"


class Check:
    """A value ``check(value)`` accepts (``True``, or its own NJTCError); ``invalid`` is one it refuses."""

    def __init__(self, check: Callable, *, says: str, invalid, show_value: bool = True):
        self.check, self.says, self.show_value, self._invalid = check, says, show_value, invalid

    def holds(self, value) -> bool:
        return bool(self.check(value))

    def invalid(self):
        return self._invalid


class ListOf:
    """A list, tuple, range or array (never a string) whose every item ``item`` accepts."""

    def __init__(self, item, *, says: str | None = None, show_value: bool = True):
        self.item, self.show_value = item, show_value
        self.says = says or f"a list of values each {item.says}"

    def holds(self, value) -> bool:
        listed = isinstance(value, (list, tuple, range)) or type(value).__name__ == "ndarray"
        return listed and all(self.item.holds(v) for v in value)

    def invalid(self):
        return [self.item.invalid()]


def _device(value) -> bool:
    """Whether ``value`` is a usable device (else check_device's NJTCError)."""
    from njtc_solve.core.models import check_device

    check_device(value)  # its own message: not a device, or CUDA missing
    return True


DEVICE = Check(_device, says="a device (cpu, cuda or cuda:N)", invalid="gpu0")
BOOLEAN = Check(lambda value: isinstance(value, bool) or type(value).__name__ == "bool_", says="True or False",
                invalid="yes")


def _message(name: str, allowed: list, value) -> str:
    """The refusal of ``value`` for parameter ``name``."""
    kinds = [c for c in allowed if c is not None]
    says = " or ".join(c.says for c in kinds) + (" or None" if None in allowed and len(kinds) > 1 else "")
    shown = all(c.show_value for c in kinds)
    return f"`{name}` must be {says}" + (f", not {value!r}" if shown else "")


def check_params(constraints: dict[str, list], values: dict) -> None:
    """Refuse the first of ``values`` that none of its declared kinds accepts, naming it in backticks.

    Parameters
    ----------
    constraints : dict of str to list
        Allowed kinds per parameter; a value is valid when one kind accepts it.
    values : dict
        The values by parameter name.

    Raises
    ------
    NJTCError
        One line, e.g. "`max_rows` must be positive, not 0".
    """
    for name, allowed in constraints.items():
        value = values[name]
        if value is None and None in allowed:
            continue
        if any(c is not None and c.holds(value) for c in allowed):
            continue
        raise NJTCError(_message(name, allowed, value))


def check_spec(spec) -> None:
    """:func:`check_params` over the fields of a settings dataclass and its ``constraints``."""
    check_params(type(spec).constraints, {f.name: getattr(spec, f.name) for f in fields(spec)})


def invalid_value(allowed: list):
    """A value that none of the kinds in ``allowed`` accepts (``None`` where nothing else is refused)."""

    def accepted(value) -> bool:
        if value is None:
            return None in allowed
        try:
            return any(c is not None and c.holds(value) for c in allowed)
        except NJTCError:
            return False

    for value in [c.invalid() for c in allowed if c is not None] + [None]:
        if not accepted(value):
            return value
    raise ValueError(f"no invalid value is known for {allowed!r}")
