"""Tool calls' grammars: every call a reply writes is one the parser (runtime.text.tool_calls)
reads, naming an offered function, with only its parameters, each at most once, the required
ones all, and each value one its schema accepts; no value holds `</parameter>` or
`</tool_call>`, which the parser would read as the value's end or the call's.

The markup is the chat template's:

    <tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n ... </function>\n</tool_call>

A value whose schema allows a string (or that has no schema) is text up to `</parameter>`, as
the parser reads it, held to the schema's pattern, format, lengths or enum where it is a
string's alone; any other value is JSON that the parameter's schema accepts
(runtime.text.json_schema), or text where that schema is one the recognizer cannot enforce.
A call may instead be Hermes' JSON, `{"name": NAME, "arguments": {...}}`, which the parser reads
too.

ToolCallGrammar (`tool_choice` "required" or a named function): the prompt ends inside a call,
after `<function=` ("required": the model picks the function) or after `<function=NAME>\n`
(a named one), and the reply finishes it. AutoToolGrammar ("auto"): the reply is free until it
writes `<tool_call>` outside reasoning, as under llama-server's lazy grammars. After a call,
either way, the reply is free again, and any further call it opens is held as this one was.

A state is a tuple; free text is `thinking` (every printing token is a candidate, and the
sampler checks the one it draws), so only the call itself costs masks.

    g = ToolCallGrammar(tools, name=None); s = g.start(); s = g.step(s, byte) ...; g.complete(s)
"""

from __future__ import annotations

import json
import re

from runtime.text.json_constraint import _UTF8_LEADS
from runtime.text.json_regex import PatternError, StringRule
from runtime.text.json_schema import _ANYOF, _LITERAL, _STRING, JsonSchemaGrammar, SchemaError
from runtime.text.tool_calls import _allowed_types

_END_VALUE = b"</parameter>"
_END_CALL = b"</function>\n</tool_call>"
# what the parser reads as the end of a value and of the call, wherever they come: never inside a
# value (a free text value's own </parameter> ends it)
_CUTS = (_END_VALUE, b"</tool_call>")
_TAIL = max(map(len, _CUTS))
_OPEN, _CALL_CLOSE = b"<tool_call>", b"</tool_call>"
_THINK, _END_THINK = b"<think>", b"</think>"
_PARAM_NAME = re.compile(r"[^<>\n]+")  # what the parser reads as a parameter's name


class _Function:
    """One offered function: its parameters' value readers, by name, and the required ones. A
    required name that `properties` lacks is a parameter of any value (free text)."""

    def __init__(self, spec: dict):
        self.name = spec["function"]["name"]
        schema = spec["function"].get("parameters") or {}
        props = dict(schema.get("properties") or {})
        required = [k for k in schema.get("required") or [] if isinstance(k, str)]
        for key in required:
            props.setdefault(key, {})
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        self.values: dict = {}  # None: text up to </parameter>; else a StringRule or JsonSchemaGrammar
        for key, sub in props.items():
            if not _PARAM_NAME.fullmatch(key) or key.strip() != key or sub is False:
                continue  # a name the parser cannot read back, or a value no schema allows: never written
            self.values[key] = _value_reader(sub, defs, schema)
        self.required = frozenset(k for k in required if k in self.values)


def _value_reader(sub, defs: dict, root: dict):
    """None (text up to </parameter>), a StringRule over the text itself (a string schema with a
    pattern, format, length, enum or const), or a JsonSchemaGrammar (a value of another type).
    A schema the recognizer cannot enforce leaves the value free text."""
    types = _allowed_types(sub, root, {})
    try:
        g = JsonSchemaGrammar({**sub, **defs} if isinstance(sub, dict) else sub, finite=True)
        if types is None or "string" in types:  # the parser keeps such a value as the text it was
            return _text_rule(g) if types == {"string"} else None
    except (SchemaError, PatternError):
        return None
    return g


def _text_rule(g: JsonSchemaGrammar) -> StringRule | None:
    """A string schema's rule over the text itself (no JSON quotes or escapes); None for any
    string, or for a union of string schemas no one rule states."""
    at = g.root
    while g.nodes[at][0] == _ANYOF and len(g.nodes[at][1]) == 1:  # a $ref, allOf or type list
        at = g.nodes[at][1][0]
    node = g.nodes[at]
    if node[0] == _LITERAL:  # enum or const strings
        values = sorted({json.loads(form) for form in node[1]})
        return StringRule("^(?:" + "|".join(re.escape(v) for v in values) + ")$")
    if node[0] != _STRING or node[1] is None:
        return None
    return node[1].rule


class ToolCallGrammar:
    """The rest of a forced call, then the reply as under "auto" (start, step, complete, thinking)."""

    def __init__(self, tools: list[dict], name: str | None):
        self.functions = {t["function"]["name"]: _Function(t) for t in tools}
        self.name = name  # the named function; None: the model names one of them
        self.hermes = {t["function"]["name"]: _hermes_grammar(t) for t in tools}

    # states:
    #   ("lit", alternatives)              fixed texts, each (bytes left, the state after it)
    #   ("params", function, written)      after a value: the next <parameter= or </function>
    #   ("text", function, key, written, tail)         a free text value; tail: its last bytes
    #   ("json", function, key, written, inner, tail)  a JSON value (inner: its recognizer's state)
    #   ("rule", function, key, written, (rule state, characters, pending UTF-8, newline held), tail)
    #   ("watch", in reasoning, tail, spoken)  free text; tail: its last bytes, which may open a tag;
    #                                      spoken: text other than blanks before them (since the reply
    #                                      began, reasoning ended or a call closed)
    #   ("open",)                          after `<tool_call>\n`: the markup or the JSON
    #   ("hermes", ((name, inner), ...), tail)  the JSON, one reading per function it may name

    after_call = ("watch", False, b"", False)  # the state a finished call (or reasoning) leads to

    def start(self, in_reasoning: bool = False):
        if self.name is not None:
            return self._params(self.name, frozenset())
        return self._names()

    def _names(self):
        return ("lit", tuple((f"{n}>\n".encode(), ("params", n, frozenset())) for n in self.functions))

    def _params(self, fn: str, written: frozenset):
        """The texts that may follow a function's opening or a value."""
        f = self.functions[fn]
        alts = [(f"<parameter={k}>\n".encode(), ("value", fn, k, written)) for k in f.values if k not in written]
        if f.required <= written:
            alts.append((_END_CALL, self.after_call))
        return ("lit", tuple(alts))

    @staticmethod
    def thinking(s) -> bool:
        return s[0] == "watch"

    @staticmethod
    def complete(s) -> bool:
        return s[0] == "watch"

    def step(self, s, c: int):
        kind = s[0]
        if kind == "watch":
            _, reasoning, tail, spoken = s
            tail += bytes((c,))
            if len(tail) > len(_OPEN):
                spoken = spoken or _says(tail[:-len(_OPEN)])
                tail = tail[-len(_OPEN):]
            if reasoning:
                return self.after_call if tail.endswith(_END_THINK) else ("watch", True, tail, False)
            if tail.endswith(_OPEN):
                return ("lit", ((b"\n", ("open",)),))
            if tail.endswith(_THINK) and not spoken and not _says(tail[:-len(_THINK)]):
                return ("watch", True, b"", False)  # at the start, or after reasoning or a call: reasoning
            return ("watch", False, tail, spoken)
        if kind == "open":
            if c == 0x3C:  # <function=
                return ("lit", ((b"function=", ("names",)),))
            if c != 0x7B:  # {
                return None
            alts = tuple((fn, g.step(g.start(), c)) for fn, g in self.hermes.items())
            return ("hermes", tuple(a for a in alts if a[1] is not None), b"{")
        if kind == "hermes":
            if c == 0x0A and any(self.hermes[fn].complete(inner) for fn, inner in s[1]):
                return ("lit", ((_CALL_CLOSE, self.after_call),))
            tail = _tail(s[2], c)
            if tail.endswith(_CALL_CLOSE):  # the parser would end the call inside the JSON
                return None
            alts = tuple((fn, self.hermes[fn].step(inner, c)) for fn, inner in s[1])
            alts = tuple(a for a in alts if a[1] is not None)
            return ("hermes", alts, tail) if alts else None
        if kind == "lit":
            alts = tuple((text[1:], after) for text, after in s[1] if text[0] == c)
            if not alts:
                return None
            done = [after for text, after in alts if not text]
            if done:  # (the texts are distinct and none is another's start: one ends at a time)
                return self._enter(done[0])
            return ("lit", alts)
        _, fn, key, written = s[:4]
        if kind == "text":
            tail = _tail(s[4], c)
            if tail.endswith(_END_VALUE):  # the parser ends the value at its first </parameter>
                return ("lit", ((b"\n", ("params", fn, written | {key})),))
            return None if _cut(tail) else ("text", fn, key, written, tail)
        if kind == "json":
            g, inner = self.functions[fn].values[key], s[4]
            if c == 0x0A and g.complete(inner):  # the value is whole: nothing of it may follow
                return ("lit", ((_END_VALUE + b"\n", ("params", fn, written | {key})),))
            tail = _tail(s[5], c)
            inner = None if _cut(tail) else g.step(inner, c)
            return None if inner is None else ("json", fn, key, written, inner, tail)
        return self._rule_step(s, c)

    def _enter(self, after: tuple):
        """The state a finished fixed text leads to."""
        if after[0] == "names":
            return self._names()
        if after[0] == "params":
            return self._params(after[1], after[2])
        if after[0] == "value":
            _, fn, key, written = after
            g = self.functions[fn].values[key]
            if g is None:
                return ("text", fn, key, written, b"")
            if isinstance(g, JsonSchemaGrammar):
                return ("json", fn, key, written, g.start(), b"")
            return ("rule", fn, key, written, (g.start, 0, None, False), b"")
        return after  # ("open",) or self.after_call

    def _rule_step(self, s, c: int):
        """A text value under a StringRule: its UTF-8 read into characters (a byte is taken only
        when some character it begins is). A newline is held: "\n<" where the rule accepts the
        text ends the value, as the parser reads `\n</parameter>`; anything else makes it a
        character of the value."""
        _, fn, key, written, (state, count, pending, held), tail = s
        rule = self.functions[fn].values[key]
        if held:
            if c == 0x3C and rule.accepts(state, count):
                return ("lit", ((b"/parameter>\n", ("params", fn, written | {key})),))
            state = rule.step(state, 0x0A, count)  # the newline was the value's
            if state is None:
                return None
            count += 1
        if c == 0x0A and pending is None:
            if rule.accepts(state, count) or rule.step(state, 0x0A, count) is not None:
                return ("rule", fn, key, written, (state, count, None, True), _tail(tail, c))
            return None
        tail = _tail(tail, c)
        if _cut(tail):
            return None
        if pending is None:
            if c < 0x80:
                nxt = rule.step(state, c, count)
                return None if nxt is None else ("rule", fn, key, written, (nxt, count + 1, None, False), tail)
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
                return None if nxt is None else ("rule", fn, key, written, (nxt, count + 1, None, False), tail)
            pending = (left - 1, 0x80, 0xBF, value)
        left, lo, hi, value = pending
        shift = 6 * (left - 1)
        first = ((value << 6) | (lo & 0x3F)) << shift
        last = (((value << 6) | (hi & 0x3F)) << shift) | ((1 << shift) - 1)
        if not rule.may_take(state, first, last, count):
            return None
        return ("rule", fn, key, written, (state, count, pending, False), tail)


class AutoToolGrammar(ToolCallGrammar):
    """tool_choice "auto": the reply is free text (no masks) until it opens a call; the call is
    then one that the parser reads, in either of its forms, and the reply is free again after
    it. The opening is `<tool_call>` in content; in reasoning (the prompt left `<think>` open,
    or the reply opened one) markup is text, as the parser reads it, until `</think>`.

    After `<tool_call>` comes a newline, then the template's `<function=NAME>` markup (as a
    forced call's, ToolCallGrammar) or Hermes' JSON, `{"name": NAME, "arguments": {...}}`, the
    name an offered function's and the arguments an object its parameters' schema accepts (any
    object where the recognizer cannot enforce that schema), then a newline and `</tool_call>`.

    A reply that opens a call must finish it: the end of text is refused inside one. A `<think>`
    opens reasoning where the parser's does: at the start, or after reasoning or a call with only
    blanks since; after other text it is text. (Non-ASCII characters count as blanks here, so a
    `<think>` after text of them alone keeps to reasoning, and a call in it is left free: this
    grammar never constrains what the parser reads as reasoning.)"""

    def __init__(self, tools: list[dict]):
        super().__init__(tools, None)

    def start(self, in_reasoning: bool = False):
        return ("watch", in_reasoning, b"", False)


def _hermes_grammar(spec: dict) -> JsonSchemaGrammar:
    """`{"name": NAME, "arguments": ARGS}` for one function: ARGS its parameters, as the markup
    form takes them (only the parameters it names, a required name missing from them of any
    value), or any object where the recognizer refuses that schema."""
    fn = spec["function"]
    params = fn.get("parameters") or {}
    props = dict(params.get("properties") or {})
    required = [k for k in params.get("required") or [] if isinstance(k, str)]
    for key in required:
        props.setdefault(key, {})
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    args = {**{k: v for k, v in params.items() if k not in defs}, "type": "object", "properties": props,
            "required": list(dict.fromkeys(required))}

    def call(arguments, defs):
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": _rebased(arguments)},
                "required": ["name", "arguments"], **_rebased(defs)}

    try:
        return JsonSchemaGrammar(call(args, defs), finite=True)
    except (SchemaError, PatternError):  # (the fallback holds no definitions, which may be what failed)
        return JsonSchemaGrammar(call({"type": "object"}, {}), finite=True)


_BLANKS = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")  # the ASCII characters str.strip() strips


def _says(data: bytes) -> bool:
    """Whether bytes hold text the parser reads as more than blanks (an ASCII character other than
    whitespace; other characters, which may be blanks, are left out: a `<think>` after them opens
    reasoning here, so a call after it is left free rather than reasoning constrained)."""
    return any(b < 0x80 and b not in _BLANKS for b in data)


def _rebased(schema):
    """A parameters schema's local $refs, pointing into it, made to point into the Hermes schema
    that holds it at #/properties/arguments (those into $defs or definitions, which that schema
    holds at its root, are kept)."""
    if isinstance(schema, list):
        return [_rebased(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebased(v) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and not ref.startswith(("#/$defs/", "#/definitions/")):
        out["$ref"] = "#/properties/arguments" + ref[1:]
    return out


def _tail(tail: bytes, c: int) -> bytes:
    return (tail + bytes((c,)))[-_TAIL:]


def _cut(tail: bytes) -> bool:
    """Whether a value's bytes end in what the parser would read as its end or the call's."""
    return any(tail.endswith(cut) for cut in _CUTS)
