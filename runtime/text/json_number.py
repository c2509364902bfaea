"""A number's bounds in structured output (`minimum`, `maximum`, `exclusiveMinimum`,
`exclusiveMaximum`): which number texts may still be written, digit by digit.

A bounded number is written without an exponent. Its value is judged as the `jsonschema`
library judges it: the text is parsed as JSON is (an int without a fraction, else a float) and
compared with the bounds as Python compares numbers. While it is being written, a prefix is
kept only when some completion's exact decimal value lies in the *safe* interval [lo, hi]: for
`number`, lo is the smallest float that passes the lower bounds and hi the largest that passes
the upper ones (float parsing rounds monotonically, so every value in between parses to a float
that passes); for `integer`, the integers the bounds allow. So no prefix kept is a dead end,
and every number completed passes.

    b = Bounds(minimum=0, maximum=1)          # raises BoundsError when no value fits
    b.feasible(b"0.")  -> True                # some completion lies in [0, 1]
    b.feasible(b"2")   -> False
    b.accepts(b"0.5")  -> True                # a whole number's text
"""

from __future__ import annotations

import math
from fractions import Fraction


MAX_CHARS = 1000  # a bounded number's text (int() takes at most 4,300 digits)


class BoundsError(ValueError):
    """Bounds no number (or integer) satisfies, or that are no numbers."""


def _exact(x, name: str) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or isinstance(x, float) and not math.isfinite(x):
        raise BoundsError(f"{name} must be a finite number, not {x!r}")
    return Fraction(x)


def _float_at_least(r: Fraction, strict: bool) -> float:
    """The smallest float f with f >= r (f > r when strict)."""
    f = float(r)
    if Fraction(f) < r or strict and Fraction(f) == r:
        f = math.nextafter(f, math.inf)
    return f


def _float_at_most(r: Fraction, strict: bool) -> float:
    """The largest float f with f <= r (f < r when strict)."""
    f = float(r)
    if Fraction(f) > r or strict and Fraction(f) == r:
        f = math.nextafter(f, -math.inf)
    return f


class Bounds:
    """The bounds of one `number` or `integer` (None: that side is open)."""

    def __init__(self, *, integer: bool, minimum=None, maximum=None, exclusive_minimum=None, exclusive_maximum=None):
        self.integer = integer
        self._checks = []  # (bound, is_lower, strict) as given, for the final test
        lows, highs = [], []
        for value, name, lower, strict in ((minimum, "minimum", True, False), (maximum, "maximum", False, False),
                                           (exclusive_minimum, "exclusiveMinimum", True, True),
                                           (exclusive_maximum, "exclusiveMaximum", False, True)):
            if value is None:
                continue
            exact = _exact(value, name)
            if not integer and abs(exact) > Fraction(10) ** 300:
                raise BoundsError(f"{name} {value!r} is out of the range a bounded number is written in")
            self._checks.append((value, lower, strict))
            (lows if lower else highs).append(self._safe(exact, lower, strict))
        self.lo = max(lows) if lows else None  # the safe interval, as exact rationals
        self.hi = min(highs) if highs else None
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise BoundsError(f"no {'integer' if integer else 'number'} lies within these bounds")

    def _safe(self, exact: Fraction, lower: bool, strict: bool) -> Fraction:
        if self.integer:
            if lower:
                return Fraction(math.floor(exact) + 1 if strict else math.ceil(exact))
            return Fraction(math.ceil(exact) - 1 if strict else math.floor(exact))
        return Fraction(_float_at_least(exact, strict) if lower else _float_at_most(exact, strict))

    # ---------------------------------------------------------------- prefixes

    def feasible(self, text: bytes) -> bool:
        """Whether the number text written so far (no exponent) has a completion in [lo, hi] of
        at most MAX_CHARS characters."""
        left = MAX_CHARS - len(text)  # characters a completion may add
        if left < 0:
            return False
        negative = text.startswith(b"-")
        body = text[1:] if negative else text
        lo, hi = self.lo, self.hi
        if negative:  # magnitudes m with -m in [lo, hi]
            lo, hi = (None if hi is None else -hi), (None if lo is None else -lo)
        lo = Fraction(0) if lo is None or lo < 0 else lo
        if hi is not None and hi < 0:
            return False
        if not body:  # "-": anything of up to `left` characters
            return self._reaches(lo, hi, left)
        if b"." in body:
            whole, frac = body.split(b".")
            if not frac and left < 1:
                return False  # a digit is owed after the "."
            start = Fraction(int(whole + frac), 10 ** len(frac))
            return self._in_grid(start, start + Fraction(1, 10 ** len(frac)), lo, hi, len(frac) + left)
        n = int(body)
        if body == b"0":  # then only "." and a fraction
            return self._in_grid(Fraction(0), Fraction(1), lo, hi, left - 1)
        for k in range(left + 1):  # k more digits, then perhaps "." and a fraction in what is left
            if self._meets(n * 10 ** k, (n + 1) * 10 ** k, lo, hi, left - k - 1):
                return True
            if hi is not None and n * 10 ** k > hi:
                return False
        return False

    def _meets(self, start: int, end: int, lo: Fraction, hi: Fraction | None, places: int) -> bool:
        """_in_grid for integer-bounded [start, end), without its arithmetic where it cannot hold
        or plainly holds."""
        if end <= lo or hi is not None and start > hi:
            return False
        if start >= lo and (hi is None or start <= hi):
            return True  # start itself
        return self._in_grid(Fraction(start), Fraction(end), lo, hi, places)

    def _reaches(self, lo: Fraction, hi: Fraction | None, left: int) -> bool:
        """Whether a magnitude written in at most `left` characters lies in [lo, hi]: k integer
        digits ([0, 10) for one, [10^(k-1), 10^k) for more), then perhaps a fraction."""
        for k in range(1, left + 1):
            start = 10 ** (k - 1) if k > 1 else 0
            if self._meets(start, 10 ** k, lo, hi, left - k - 1):
                return True
            if hi is not None and start > hi:
                return False
        return False

    def _in_grid(self, start: Fraction, end: Fraction, lo: Fraction, hi: Fraction | None, places: int) -> bool:
        """Whether [start, end) holds a magnitude in [lo, hi] written with at most `places`
        fraction digits (none for an integer, or when places < 1)."""
        places = 0 if self.integer or places < 1 else places
        unit = Fraction(1, 10 ** places)
        first = math.ceil(max(start, lo) / unit) * unit  # the grid's first point from there
        return first < end and (hi is None or first <= hi)

    # ---------------------------------------------------------------- whole numbers

    def accepts(self, text: bytes) -> bool:
        """Whether a whole number's text passes the bounds, parsed and compared as jsonschema does."""
        value = float(text) if b"." in text else int(text)
        for bound, lower, strict in self._checks:
            if lower and not (value > bound if strict else value >= bound):
                return False
            if not lower and not (value < bound if strict else value <= bound):
                return False
        return True
