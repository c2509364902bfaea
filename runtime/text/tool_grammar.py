"""A forced tool call's grammar (`tool_choice` "required" or a named function): the reply
continues the call the prompt opened into one the parser reads (runtime.text.tool_calls), with
a function that was offered, only its parameters, each at most once, the required ones all,
and each value one its schema accepts.

The markup is the chat template's:

    <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n ... </function>\\n</tool_call>

The prompt ends inside it: after `<function=` ("required": the model picks the function) or
after `<function=NAME>\\n` (a named one). A value whose schema allows a string (or that has
no schema) is text up to `</parameter>`, as the parser reads it; any other value is JSON that
the parameter's schema accepts (runtime.text.json_schema), or text where that schema is one
the recognizer cannot enforce. After `</tool_call>` the reply is free, as in any reply: more
text, or more calls, which the parser reads as it reads them without a grammar.

A state is a tuple; free text is `thinking` (every printing token is a candidate, and the
sampler checks the one it draws), so only the call itself costs masks.

    g = ToolCallGrammar(tools, name=None); s = g.start(); s = g.step(s, byte) ...; g.complete(s)
"""

from __future__ import annotations

import re

import json

from runtime.text.json_constraint import _UTF8_LEADS
from runtime.text.json_regex import StringRule
from runtime.text.json_schema import _LITERAL, _STRING, JsonSchemaGrammar, SchemaError
from runtime.text.tool_calls import _allowed_types

_END_VALUE = b"</parameter>"
_END_CALL = b"</function>\n</tool_call>"
_PARAM_NAME = re.compile(r"[^<>\n]+")  # what the parser reads as a parameter's name


class _Function:
    """One offered function: its parameters' value readers, by name, and the required ones."""

    def __init__(self, spec: dict):
        self.name = spec["function"]["name"]
        schema = spec["function"].get("parameters") or {}
        props = schema.get("properties") or {}
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        self.values: dict[str, JsonSchemaGrammar | None] = {}  # None: text up to </parameter>
        for key, sub in props.items():
            if not _PARAM_NAME.fullmatch(key) or key.strip() != key:
                continue  # a name the parser cannot read back: never written
            self.values[key] = _value_reader(sub, defs, schema)
        required = schema.get("required") or []
        self.required = frozenset(k for k in required if k in self.values)


def _value_reader(sub, defs: dict, root: dict):
    """None (text up to </parameter>), a StringRule over the text (a string with a pattern,
    format, length or enum), or a JsonSchemaGrammar (a value of any other type)."""
    types = _allowed_types(sub, root, {})
    try:
        g = JsonSchemaGrammar({**sub, **defs} if isinstance(sub, dict) else sub)
    except SchemaError:
        return None  # (a schema the recognizer cannot enforce: its value is not checked)
    if types is None or "string" in types:  # the parser keeps such a value as the text it was
        return _text_rule(g) if types == {"string"} else None
    return g


def _text_rule(g: JsonSchemaGrammar) -> StringRule | None:
    """A string schema's rule over the text itself (no JSON quotes or escapes), with no `<`, so
    that the value cannot hold the </parameter> that would end it early."""
    node = g.nodes[g.root]
    if node[0] == _LITERAL:  # enum or const strings
        values = [json.loads(form) for form in node[1]]
        pattern = "^(?:" + "|".join(re.escape(v) for v in sorted(set(values)) if "<" not in v) + ")$"
        return StringRule(pattern)
    if node[0] != _STRING:
        return None
    rule = node[1].rule if node[1] is not None else StringRule(None)
    return _NoAngle(rule)


class _NoAngle:
    """A StringRule that also refuses `<`."""

    def __init__(self, rule: StringRule):
        self.rule, self.start = rule, rule.start

    def step(self, state, cp: int, count: int):
        return None if cp == 0x3C else self.rule.step(state, cp, count)

    def accepts(self, state, count: int) -> bool:
        return self.rule.accepts(state, count)

    def may_take(self, state, lo: int, hi: int, count: int) -> bool:
        return self.rule.may_take(state, lo, hi, count)  # (only for characters past ASCII)


class ToolCallGrammar:
    """The rest of a forced call, then free text (start, step, complete, thinking)."""

    def __init__(self, tools: list[dict], name: str | None):
        self.functions = {t["function"]["name"]: _Function(t) for t in tools}
        self.name = name  # the named function; None: the model names one of them

    # states:
    #   ("lit", alternatives)              fixed texts, each (bytes left, the state after it)
    #   ("params", function, written)      after a value: the next <parameter= or </function>
    #   ("text", function, key, written, tail)   a text value; tail: its last bytes
    #   ("json", function, key, written, inner)  a JSON value (inner: its recognizer's state)
    #   ("free", tail)                     after the call

    def start(self, in_reasoning: bool = False):
        if self.name is not None:
            return self._params(self.name, frozenset())
        return ("lit", tuple((f"{n}>\n".encode(), ("params", n, frozenset())) for n in self.functions))

    def _params(self, fn: str, written: frozenset):
        """The texts that may follow a function's opening or a value."""
        f = self.functions[fn]
        alts = [(f"<parameter={k}>\n".encode(), ("value", fn, k, written)) for k in f.values if k not in written]
        if f.required <= written:
            alts.append((_END_CALL, ("free", b"")))
        return ("lit", tuple(alts))

    @staticmethod
    def thinking(s) -> bool:
        return s[0] == "free"

    @staticmethod
    def complete(s) -> bool:
        return s[0] == "free"

    def step(self, s, c: int):
        kind = s[0]
        if kind == "free":
            return ("free", b"")
        if kind == "lit":
            alts = tuple((text[1:], after) for text, after in s[1] if text[0] == c)
            if not alts:
                return None
            done = [after for text, after in alts if not text]
            if done:  # (the texts are distinct and none is another's start: one ends at a time)
                return self._enter(done[0])
            return ("lit", alts)
        if kind == "rule":
            return self._rule_step(s, c)
        if kind == "text":
            _, fn, key, written, tail = s
            tail = (tail + bytes((c,)))[-len(_END_VALUE):]
            if tail == _END_VALUE:  # the parser ends the value at its first </parameter>
                return ("lit", ((b"\n", ("params", fn, written | {key})),))
            return ("text", fn, key, written, tail)
        _, fn, key, written, inner = s  # "json"
        g = self.functions[fn].values[key]
        if c == 0x0A and g.complete(inner):  # the value is whole: nothing of it may follow
            return ("lit", ((_END_VALUE + b"\n", ("params", fn, written | {key})),))
        inner = g.step(inner, c)
        return None if inner is None else ("json", fn, key, written, inner)

    def _enter(self, after: tuple):
        """The state a finished fixed text leads to."""
        if after[0] == "params":
            return self._params(after[1], after[2])
        if after[0] == "value":
            _, fn, key, written = after
            g = self.functions[fn].values[key]
            if g is None:
                return ("text", fn, key, written, b"")
            if isinstance(g, JsonSchemaGrammar):
                return ("json", fn, key, written, g.start())
            return ("rule", fn, key, written, (g.start, 0, None))
        return after  # ("free", b"")

    def _rule_step(self, s, c: int):
        """A text value under a StringRule: its UTF-8 read into characters (a byte is taken only
        when some character it begins is); the value ends, with a newline and </parameter>,
        where the rule accepts it."""
        _, fn, key, written, (state, count, pending) = s
        rule = self.functions[fn].values[key]
        if pending is None:
            if c == 0x0A and rule.accepts(state, count):
                return ("lit", ((_END_VALUE + b"\n", ("params", fn, written | {key})),))
            if c < 0x80:
                nxt = rule.step(state, c, count)
                return None if nxt is None else ("rule", fn, key, written, (nxt, count + 1, None))
            lead = _UTF8_LEADS.get(c)
            if lead is None:
                return None
            left, lo, hi = lead
            pending = (left, lo, hi, c & (0x3F >> left))
        else:
            left, lo, hi, value = pending
            if not lo <= c <= hi:
                return None
            value = value << 6 | (c & 0x3F)
            if left == 1:
                nxt = rule.step(state, value, count)
                return None if nxt is None else ("rule", fn, key, written, (nxt, count + 1, None))
            pending = (left - 1, 0x80, 0xBF, value)
        left, lo, hi, value = pending
        shift = 6 * (left - 1)
        first = ((value << 6) | (lo & 0x3F)) << shift
        last = (((value << 6) | (hi & 0x3F)) << shift) | ((1 << shift) - 1)
        if not rule.may_take(state, first, last, count):
            return None
        return ("rule", fn, key, written, (state, count, pending))
