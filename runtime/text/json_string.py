"""A constrained JSON string's bytes (`pattern`, `format`, `minLength`, `maxLength`): the text
between the quotes decoded into characters, each handed to a StringRule (runtime.text.json_regex).

The model writes such a string's characters as they are (UTF-8) or with JSON's short escapes
(\\" \\\\ \\/ \\b \\f \\n \\r \\t); \\uXXXX is not taken there, so each character is whole
when its last byte arrives. A byte is taken only when some character it begins can still lead
to a string the rule accepts: a UTF-8 lead byte whose characters the pattern refuses, or a
closing quote before the rule is met, is refused where it stands.

    aux = s.start()                       # after the opening quote
    aux = s.step(aux, c) -> aux | CLOSED | None
"""

from __future__ import annotations

from runtime.text import json_constraint as J

CLOSED = "closed"
_SHORT_ESCAPES = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}
_LEAD_BITS = {1: 0x1F, 2: 0x0F, 3: 0x07}  # a lead byte's value bits, by the continuation bytes that follow


class ConstrainedString:
    """A StringRule read from a JSON string's bytes. aux = (rule state, characters so far, pending):
    pending is None, "esc" after a backslash, or (continuation bytes left, the next one's range,
    the value so far) inside a UTF-8 character."""

    def __init__(self, rule):
        self.rule = rule

    def start(self) -> tuple:
        return (self.rule.start, 0, None)

    def step(self, aux: tuple, c: int):
        rule = self.rule
        state, count, pending = aux
        if pending == "esc":
            cp = _SHORT_ESCAPES.get(c)
            return None if cp is None else self._char(state, count, cp)
        if pending is not None:
            left, lo, hi, value = pending
            if not lo <= c <= hi:
                return None
            value = value << 6 | (c & 0x3F)
            if left == 1:
                return self._char(state, count, value)
            return self._partial(state, count, (left - 1, 0x80, 0xBF, value))
        if c == 0x22:
            return CLOSED if rule.accepts(state, count) else None
        if c == 0x5C:
            if any(rule.step(state, cp, count) is not None for cp in _SHORT_ESCAPES.values()):
                return (state, count, "esc")
            return None
        if c < 0x20:
            return None  # a control character must be escaped
        if c < 0x80:
            return self._char(state, count, c)
        lead = J._UTF8_LEADS.get(c)
        if lead is None:
            return None
        left, lo, hi = lead
        return self._partial(state, count, (left, lo, hi, c & _LEAD_BITS[left]))

    def _char(self, state, count: int, cp: int):
        nxt = self.rule.step(state, cp, count)
        return None if nxt is None else (nxt, count + 1, None)

    def _partial(self, state, count: int, pending: tuple):
        """Inside a UTF-8 character: kept when some character with these bytes so far is taken."""
        left, lo, hi, value = pending
        shift = 6 * (left - 1)
        first = ((value << 6) | (lo & 0x3F)) << shift
        last = (((value << 6) | (hi & 0x3F)) << shift) | ((1 << shift) - 1)
        return (state, count, pending) if self.rule.may_take(state, first, last, count) else None
