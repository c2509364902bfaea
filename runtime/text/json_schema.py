"""Structured outputs (`response_format: {"type": "json_schema", ...}`): the reply is a JSON
value that the schema accepts.

The schema is compiled into a byte-level recognizer of the same kind as JSON mode's
(runtime.text.json_constraint, whose Vocabulary masks tokens by it): a state is a set of
stacks (alternatives, for `anyOf` and optional keys), each frame one value being written.
It covers what OpenAI's strict mode and pydantic models write: objects with `properties`
(keys in the schema's order, `required` ones always, the others optional; no other keys),
free-form objects, maps (`additionalProperties` as a schema: pydantic's `dict[str, T]`), arrays
of `items` (with `minItems`/`maxItems`) and tuples (`prefixItems`), strings, numbers and integers (with `minimum`,
`maximum` and the exclusive ones: runtime.text.json_number), booleans, null, `enum`, `const`,
`anyOf`/`oneOf`, a single `allOf`, a list of types, and `$ref` into `$defs`/`definitions`
(recursion included), and strings with `pattern`, `format`, `minLength` and `maxLength`
(runtime.text.json_string reads their bytes into characters for runtime.text.json_regex's
rules). A keyword that would constrain values further (`multipleOf`, `uniqueItems`, ...) is
refused by name rather than ignored: what is generated always validates, and no constraint
leaves the model a prefix it cannot finish.

Whitespace between tokens is bounded as in JSON mode (MAX_WS in a row); none may follow the
value. A reply that starts in reasoning reasons freely until `</think>`.
"""

from __future__ import annotations

import json

from urllib.parse import unquote

from runtime.base.errors import StepstreamError
from runtime.text import json_constraint as J
from runtime.text.json_number import Bounds, BoundsError
from runtime.text.json_regex import FORMATS, PatternError, StringRule
from runtime.text.json_string import CLOSED, ConstrainedString

MAX_FRAMES = 128  # values nested in one another
MAX_ALTERNATIVES = 256  # stacks followed at once: past it, the first ones (in a fixed order) are kept

# keywords that say nothing about which values are valid (or that this recognizer honours)
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment",
                          "deprecated", "readOnly", "writeOnly", "strict", "$defs", "definitions"})
# the keywords that constrain values of one type only (JSON Schema ignores them for the others)
_TYPED = {"object": frozenset({"properties", "required", "additionalProperties"}),
          "array": frozenset({"items", "prefixItems", "minItems", "maxItems"}),
          "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
          "string": frozenset({"minLength", "maxLength", "pattern", "format"})}
_TYPED["integer"] = _TYPED["number"]
_ANY_TYPED = frozenset().union(*_TYPED.values())
_HONOURED = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}) | _ANY_TYPED
_STRING, _NUMBER, _INTEGER, _LITERAL, _OBJECT, _FREE_OBJECT, _ARRAY, _ANY, _ANYOF, _MAP = range(10)
_INFINITE = 1 << 30  # the height of a node with no finite value
# formats that name what a string is for, not a syntax (pydantic's SecretStr, bytes, Path): no
# validator checks them, and any string has them
_ANNOTATION_FORMATS = frozenset({"password", "binary", "path"})


class SchemaError(StepstreamError):
    """A schema this recognizer cannot honour, named by the place in it."""


class JsonSchemaGrammar:
    """A compiled schema (start, step, complete, thinking), for json_constraint.JsonObjectReply."""

    def __init__(self, schema, finite: bool = False):
        """finite: every number and integer the schema types is held within +-10^300, as one with
        bounds is (written without an exponent), so Python reads it as a finite float or an int
        (a tool call's arguments must be JSON again: `1e999` reads as infinity)."""
        self.finite = finite
        self.nodes: list = []
        self._refs: dict[str, int] = {}
        self._dropped = 0  # anyOf branches left out (_branches)
        self._root_schema = schema
        try:
            self.root = self._build(schema, "#", root=True)
            for key in ("$defs", "definitions"):  # the ones no $ref uses are checked too, as jsonschema checks them
                for name, sub in (schema.get(key) or {}).items() if isinstance(schema, dict) else ():
                    self._build(sub, f"#/{key}/{name}")
        except RecursionError:
            raise SchemaError("the schema nests too deeply") from None
        self._check_cycles()
        self.height = self._heights()
        if self.height[self.root] > MAX_FRAMES:
            raise SchemaError("the schema has no finite value: it requires itself (a required property, or minItems "
                              "over a $ref back to it)" if self.height[self.root] == _INFINITE else
                              f"the schema's smallest value nests {self.height[self.root]} values deep, more than "
                              f"{MAX_FRAMES}")

    # ---------------------------------------------------------------- compiling
    #
    # Every keyword that constrains values is honoured, alone or with the ones it is known to
    # combine with here (enum or const with type; annotations anywhere); any other combination
    # is refused, never partly applied: what the recognizer lets through always validates.

    def _build(self, s, where: str, root: bool = False) -> int:
        if s is True or s == {}:
            return self._add((_ANY,))
        if not isinstance(s, dict):
            raise SchemaError(f"the schema at {where} is not a JSON Schema object")
        unknown = sorted(set(s) - _ANNOTATIONS - _HONOURED - ({"$id"} if root else set()))
        if unknown:
            raise SchemaError(f"the schema at {where} uses {', '.join(repr(k) for k in unknown)}, which the JSON Schema "
                              "constraint does not enforce (it enforces type, properties, required, "
                              "additionalProperties, items, prefixItems, minItems, maxItems, minimum, maximum, "
                              "exclusiveMinimum, exclusiveMaximum, minLength, maxLength, pattern, format, enum, "
                              "const, anyOf/oneOf, a single allOf and $ref)")
        for key in ("title", "description", "$comment", "$id", "$schema"):
            if key in s and not isinstance(s[key], str):  # a malformed schema, which jsonschema refuses too
                raise SchemaError(f"the schema at {where}: {key} must be a string")
        if "$id" in s and "#" in s["$id"].rstrip("#"):
            raise SchemaError(f"the schema at {where}: $id may not hold a fragment")
        if "properties" in s and not isinstance(s["properties"], dict):
            raise SchemaError(f"the schema at {where}: properties must be an object")
        for key in ("$defs", "definitions"):
            if key in s and (not isinstance(s[key], dict) or not all(isinstance(v, (dict, bool)) for v in s[key].values())):
                raise SchemaError(f"the schema at {where}: {key} must be an object of schemas")
        given = set(s) & _HONOURED
        if "$ref" in s:
            if given != {"$ref"}:
                raise SchemaError(f"the schema at {where}: $ref beside {', '.join(sorted(given - {'$ref'}))} is not "
                                  "supported")
            return self._ref(s["$ref"], where)
        if "allOf" in s:  # one schema (pydantic's way to annotate a $ref): that schema
            branches = s["allOf"]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"the schema at {where}: allOf must be a non-empty list")
            if len(branches) > 1 or given != {"allOf"}:
                raise SchemaError(f"the schema at {where}: allOf is supported with one schema and nothing beside it")
            return self._build(branches[0], f"{where}/allOf/0")
        if "enum" in s or "const" in s:
            return self._literal(s, given, where)
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = s[key]
                if not isinstance(branches, list) or not branches:
                    raise SchemaError(f"the schema at {where}: {key} must be a non-empty list")
                if given != {key}:
                    raise SchemaError(f"the schema at {where}: {key} beside other constraints is not supported")
                at = self._add(None)
                dropped = self._dropped
                built = tuple(self._branches(key, branches, where))
                if key == "oneOf" and self._dropped != dropped:  # its branches' types are no longer all told
                    raise SchemaError(f"the schema at {where}: oneOf over an anyOf with a branch the recognizer "
                                      "cannot enforce is not supported")
                if key == "oneOf" and not self._disjoint(built):  # exactly one must match
                    raise SchemaError(f"the schema at {where}: oneOf with branches that may accept the same value is "
                                      "not supported (anyOf is)")
                # the branches that are literals read as one (an anyOf of many consts is one reading)
                literals = [b for b in built if self.nodes[b] is not None and self.nodes[b][0] == _LITERAL]
                if len(literals) > 1:
                    merged = self._add((_LITERAL, tuple(sorted({t for b in literals for t in self.nodes[b][1]}))))
                    built = tuple(b for b in built if b not in literals) + (merged,)
                self.nodes[at] = (_ANYOF, built)
                return at
        kind = s.get("type")
        if kind is None:
            if given:
                raise SchemaError(f"the schema at {where} has {', '.join(sorted(given))} but no type")
            return self._add((_ANY,))
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) for k in kind) or len(set(kind)) != len(kind):
                raise SchemaError(f"the schema at {where}: type must be a type name or a list of distinct ones")
            # each type with its own keywords: the others do not apply to it
            return self._add((_ANYOF, tuple(self._build({key: v for key, v in s.items() if key not in _ANY_TYPED
                                                         or key in _TYPED.get(k, ())} | {"type": k},
                                                        f"{where}/type/{i}")
                                            for i, k in enumerate(kind))))
        foreign = given & (_ANY_TYPED - _TYPED.get(kind, frozenset()))
        if foreign:
            raise SchemaError(f"the schema at {where}: type {kind!r} beside {', '.join(sorted(foreign))} is not "
                              "supported")
        if kind == "string":
            return self._add((_STRING, self._string_rule(s, where)))
        if kind in ("number", "integer"):
            if self.finite:  # the sides the schema leaves open, closed at +-10^300
                s = dict(s)
                if not {"minimum", "exclusiveMinimum"} & s.keys():
                    s["minimum"] = -10**300
                if not {"maximum", "exclusiveMaximum"} & s.keys():
                    s["maximum"] = 10**300
            return self._add((_NUMBER if kind == "number" else _INTEGER, self._bounds(s, kind, where)))
        if kind == "boolean":
            return self._add((_LITERAL, (b"false", b"true")))
        if kind == "null":
            return self._add((_LITERAL, (b"null",)))
        if kind == "array":
            return self._array(s, where)
        if kind == "object":
            return self._object(s, where)
        raise SchemaError(f"the schema at {where}: type {kind!r} is no JSON Schema type")

    def _branches(self, key: str, branches: list, where: str):
        """The nodes of anyOf's or oneOf's branches. An anyOf branch the recognizer cannot enforce
        is left out while another remains (pydantic's Decimal: a number, or a string whose
        pattern has a lookahead): every value written matches a branch kept, so it validates.
        Each branch of a oneOf is kept (leaving one out could let a value match two)."""
        errors = []
        for i, b in enumerate(branches):
            mark, refs = len(self.nodes), dict(self._refs)
            try:
                yield self._build(b, f"{where}/{key}/{i}")
            except SchemaError as e:
                if key == "oneOf":
                    raise
                del self.nodes[mark:]  # what the branch began: nothing else refers to it
                self._refs = refs
                self._dropped += 1
                errors.append(e)
        if len(errors) == len(branches):
            raise errors[0]

    def _array(self, s: dict, where: str) -> int:
        """(_ARRAY, items or None, minItems, maxItems, prefixItems): item i follows prefixItems[i],
        then `items` (None: `items: false`, no more)."""
        at = self._add(None)
        least, most = self._count(s, "minItems", where), self._count(s, "maxItems", where)
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise SchemaError(f"the schema at {where}: prefixItems must be a list of schemas")
        prefix = tuple(self._build(p, f"{where}/prefixItems/{i}") for i, p in enumerate(prefix))
        items = None if s.get("items", {}) is False else self._build(s.get("items", {}), f"{where}/items")
        if items is None:
            most = len(prefix) if most is None else min(most, len(prefix))
        if most is not None and least > most:
            raise SchemaError(f"the schema at {where}: minItems {least} is more than the {most} items it may hold")
        self.nodes[at] = (_ARRAY, items, least, most, prefix)
        return at

    @staticmethod
    def _item(array: tuple, i: int) -> int | None:
        """The node of an array's item i (None: it may hold no such item)."""
        prefix = array[4]
        return prefix[i] if i < len(prefix) else array[1]

    @staticmethod
    def _count(s: dict, key: str, where: str) -> int | None:
        """A count keyword (minItems, maxLength...): a non-negative integer; None when absent."""
        if key not in s:
            return 0 if key.startswith("min") else None
        n = s[key]
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise SchemaError(f"the schema at {where}: {key} must be a non-negative integer, not {n!r}")
        return n

    def _string_rule(self, s: dict, where: str) -> ConstrainedString | None:
        least, most = self._count(s, "minLength", where), self._count(s, "maxLength", where)
        pattern, fmt = s.get("pattern"), s.get("format")
        if pattern is not None and not isinstance(pattern, str):
            raise SchemaError(f"the schema at {where}: pattern must be a string")
        if fmt is not None and not isinstance(fmt, str):
            raise SchemaError(f"the schema at {where}: format must be a string")
        if fmt in _ANNOTATION_FORMATS:
            fmt = None
        if fmt is not None and fmt not in FORMATS:
            raise SchemaError(f"the schema at {where}: format {fmt!r} is not enforced (these are: "
                              f"{', '.join(sorted(FORMATS))})")
        if pattern is None and fmt is None and least == 0 and most is None:
            return None
        try:
            return ConstrainedString(StringRule(pattern, least, most, anchored_formats=(fmt,) if fmt else ()))
        except PatternError as e:
            raise SchemaError(f"the schema at {where}: {e}") from None

    @staticmethod
    def _bounds(s: dict, kind: str, where: str) -> Bounds | None:
        keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        if not any(k in s for k in keys):
            return None
        for k in ("exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(s.get(k), bool):  # draft 4's form, which 2020-12 validators read as no number
                raise SchemaError(f"the schema at {where}: {k} must be a number (the draft-4 boolean form is not "
                                  "supported)")
        try:
            return Bounds(integer=kind == "integer", minimum=s.get("minimum"), maximum=s.get("maximum"),
                          exclusive_minimum=s.get("exclusiveMinimum"), exclusive_maximum=s.get("exclusiveMaximum"))
        except BoundsError as e:
            raise SchemaError(f"the schema at {where}: {e}") from None

    def _literal(self, s: dict, given: set, where: str) -> int:
        """enum and/or const, with type: the values all of them allow."""
        if given - {"enum", "const", "type"}:
            raise SchemaError(f"the schema at {where}: enum or const beside "
                              f"{', '.join(sorted(given - {'enum', 'const', 'type'}))} is not supported")
        values = s["enum"] if "enum" in s else [s["const"]]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"the schema at {where}: enum must be a non-empty list")
        if "const" in s and "enum" in s:
            values = [v for v in values if _same(v, s["const"])]
        if "type" in s:
            kinds = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not all(isinstance(k, str) for k in kinds):
                raise SchemaError(f"the schema at {where}: type must be a type name or a list of them")
            values = [v for v in values if any(_is_type(v, k) for k in kinds)]
        if not values:
            raise SchemaError(f"the schema at {where}: no value satisfies its enum, const and type together")
        return self._add((_LITERAL, tuple(sorted({form for v in values for form in _forms(v)}))))

    def _object(self, s: dict, where: str) -> int:
        props = s.get("properties")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required) \
                or len(set(required)) != len(required):
            raise SchemaError(f"the schema at {where}: required must be a list of distinct property names")
        if props is None:
            if required:
                raise SchemaError(f"the schema at {where}: required without properties is not supported")
            if s.get("additionalProperties") is False:
                return self._add((_LITERAL, (b"{}",)))
            extra = s.get("additionalProperties", True)
            if extra in (True, {}):
                return self._add((_FREE_OBJECT,))
            at = self._add(None)  # a map (pydantic's dict[str, T]): any keys, each value of that schema
            self.nodes[at] = (_MAP, self._build(extra, f"{where}/additionalProperties"))
            return at
        if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
            raise SchemaError(f"the schema at {where}: properties must be an object")
        if any(r not in props for r in required):
            raise SchemaError(f"the schema at {where}: required names {[r for r in required if r not in props]!r}, "
                              "which properties does not hold")
        at = self._add(None)
        keys = tuple((_forms(k), self._build(v, f"{where}/properties/{k}"), k in required) for k, v in props.items())
        self.nodes[at] = (_OBJECT, keys)
        return at

    def _ref(self, ref, where: str) -> int:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"the schema at {where}: $ref {ref!r} is not a reference inside the schema")
        if ref in self._refs:
            return self._refs[ref]
        target = self._root_schema
        pointer = unquote(ref[1:])  # a URI fragment: percent-encoded, then RFC 6901
        if pointer and not pointer.startswith("/"):
            raise SchemaError(f"the schema at {where}: $ref {ref!r} is not a JSON Pointer")
        for part in pointer.split("/")[1:] if pointer else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise SchemaError(f"the schema at {where}: $ref {ref!r} leads nowhere")
        at = self._add(None)  # a reference may lead back here: the slot exists before its schema is built
        self._refs[ref] = at
        self.nodes[at] = (_ANYOF, (self._build(target, ref),))
        return at

    def _kinds(self, node: int, seen: frozenset = frozenset()) -> frozenset[str]:
        """The JSON types a node's values may have (numbers and integers as one)."""
        n = self.nodes[node]
        if n is None or node in seen:
            return frozenset({"any"})
        kind = n[0]
        if kind == _ANYOF:
            return frozenset().union(*(self._kinds(b, seen | {node}) for b in n[1]))
        if kind == _LITERAL:
            return frozenset({_kind_of_text(t) for t in n[1]})
        return frozenset({{_STRING: "string", _NUMBER: "number", _INTEGER: "number", _OBJECT: "object",
                           _FREE_OBJECT: "object", _MAP: "object", _ARRAY: "array"}.get(kind, "any")})

    def _disjoint(self, branches: tuple) -> bool:
        """Whether no value could match two of the branches (told by their types; conservative)."""
        seen: set = set()
        for b in branches:
            kinds = self._kinds(b)
            if "any" in kinds or kinds & seen:
                return False
            seen |= kinds
        return True

    def _check_cycles(self) -> None:
        """Refuse references that lead back to themselves before any value starts (a $ref to itself,
        an anyOf holding the root): they would recurse for ever on the first byte."""
        state: dict[int, int] = {}  # node -> 1 on the path, 2 done

        def visit(node: int) -> None:
            if state.get(node) == 2:
                return
            if state.get(node) == 1:
                raise SchemaError("the schema has a $ref that leads back to itself before any value starts")
            state[node] = 1
            n = self.nodes[node]
            if n[0] == _ANYOF:
                for b in n[1]:
                    visit(b)
            state[node] = 2

        for i in range(len(self.nodes)):
            visit(i)

    def _heights(self) -> list[int]:
        """For each node, the frames its smallest value nests (_INFINITE: it has no finite value,
        a cycle through required properties or minItems). A value is begun only where its
        height fits, so no reading ever waits for a value that cannot end."""
        h = [_INFINITE] * len(self.nodes)
        changed = True
        while changed:
            changed = False
            for i, n in enumerate(self.nodes):
                kind = n[0]
                if kind == _ANYOF:
                    new = min(h[b] for b in n[1])
                elif kind == _ARRAY:  # its first minItems items must be written
                    new = 1 + max((h[self._item(n, j)] for j in range(min(n[2], len(n[4]) + 1))), default=0)
                elif kind == _OBJECT:
                    new = 1 + max([h[value] for _, value, required in n[1] if required], default=0)
                else:
                    new = 1
                new = min(new, _INFINITE)
                if new < h[i]:
                    h[i], changed = new, True
        return h

    def _add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # ---------------------------------------------------------------- recognizing
    #
    # A state: ("think", tail) before `</think>`, or ("json", frozenset of stacks). A stack is a
    # tuple of frames, the innermost last; the empty stack is a finished value. Frames:
    #   (_OBJECT, node, i, phase, aux)  i: the next property; phase 0 "{", 1 a key or "}", 2 in a
    #                                   key (aux: its bytes left), 3 ":", 4 the value, 5 "," or "}",
    #                                   6 a key after ","; aux elsewhere: whitespace so far
    #   (_ARRAY, node, phase, ws, n)    phase 0 "[", 1 an item or "]", 2 "," or "]", 3 an item; n items begun
    #   (_MAP, node, phase, aux)        as _OBJECT's phases, any key (aux in a key: json_constraint's string aux)
    #   (_STRING, node, phase, aux)     phase 0 '"', 1 inside (aux: json_constraint's string aux, or the
    #                                   ConstrainedString's when the string has a rule)
    #   (_NUMBER or _INTEGER, node, sub, text)  sub None before the first byte; text: the bytes so far
    #                                   when the number has bounds, else None
    #   (_LITERAL, node, alternatives left)
    #   (_FREE_OBJECT or _ANY, node, json_constraint state)

    def start(self, in_reasoning: bool = False):
        if in_reasoning:
            return ("think", b"")
        return ("json", frozenset(((("lead", 0),),)))

    @staticmethod
    def thinking(s) -> bool:
        return s[0] == "think"

    def complete(self, s) -> bool:
        """Whether the reply so far is a whole value (a number at the root ends with the reply)."""
        return s[0] == "json" and any(not st or (len(st) == 1 and self._number_may_end(st[0])) for st in s[1])

    def _number_may_end(self, frame: tuple) -> bool:
        """Whether a number frame (or a free value holding a bare number) is a whole number now."""
        if frame[0] in (_NUMBER, _INTEGER):
            bounds = self.nodes[frame[1]][1]
            return frame[2] in J._NUMBER_ENDS and (bounds is None or bounds.accepts(frame[3]))
        return frame[0] == _ANY and frame[2][0] == J.NUMBER and frame[2][1] == "" and frame[2][2] in J._NUMBER_ENDS

    def step(self, s, c: int):
        if s[0] == "think":
            tail = (s[1] + bytes((c,)))[-len(J.END_THINK):]
            return ("json", frozenset(((("lead", 0),),))) if tail == J.END_THINK else ("think", tail)
        out = set()
        for stack in s[1]:
            out.update(self._advance(stack, c))
        if not out:
            return None
        if len(out) > MAX_ALTERNATIVES:  # each reading can be finished alone: dropping some loses no way on
            out = sorted(out, key=repr)[:MAX_ALTERNATIVES]
        return ("json", frozenset(out))

    def _advance(self, stack: tuple, c: int) -> list[tuple]:
        """The stacks after byte c (none: it cannot come here)."""
        if not stack:
            return []  # the value is complete: nothing may follow it
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "lead":  # before the root value: a little whitespace, as JSON mode allows
            if c in J._WS:
                return [(("lead", top[1] + 1),)] if top[1] < J.MAX_LEADING_WS else []
            return self._start((), self.root, c)
        if kind == _OBJECT:
            return self._object_step(top, rest, c)
        if kind == _ARRAY:
            return self._array_step(top, rest, c)
        if kind == _MAP:
            return self._map_step(top, rest, c)
        if kind == _STRING:
            rule = self.nodes[top[1]][1]
            if top[2] == 0:
                if c != 0x22:
                    return []
                return [rest + ((_STRING, top[1], 1, rule.start() if rule else (False, 0, 0, 0, 0, 0)),)]
            if rule is not None:
                nxt = rule.step(top[3], c)
                if nxt is None:
                    return []
                return [self._child_done(rest)] if nxt == CLOSED else [rest + ((_STRING, top[1], 1, nxt),)]
            nxt = J.step((J.STRING, "", top[3], 0), c)
            if nxt is None:
                return []
            if nxt[0] == J.DONE:  # the closing quote
                return [self._child_done(rest)]
            return [rest + ((_STRING, top[1], 1, nxt[2]),)]
        if kind in (_NUMBER, _INTEGER):
            _, node, sub, text = top
            bounds = self.nodes[node][1]
            if sub is None:
                nxt = J._SIGN if c == 0x2D else J._ZERO if c == 0x30 else J._INT if c in J._DIGITS else None
            else:
                nxt = J._number_step(sub, c)
                if nxt == J._DOT and kind == _INTEGER or nxt == J._EXP and (kind == _INTEGER or bounds):
                    nxt = None  # (a bounded number is written without an exponent)
            if nxt is not None:
                if bounds is None:
                    return [rest + ((kind, node, nxt, None),)]
                text = (text or b"") + bytes((c,))
                return [rest + ((kind, node, nxt, text),)] if bounds.feasible(text) else []
            if sub in J._NUMBER_ENDS and (bounds is None or bounds.accepts(text)):
                return self._advance(self._child_done(rest), c)  # the number ended before c: c is its holder's
            return []
        if kind == _LITERAL:
            alts = tuple(a[1:] for a in top[2] if a and a[0] == c)
            out = []
            if any(a for a in alts):
                out.append(rest + ((_LITERAL, top[1], tuple(a for a in alts if a)),))
            if b"" in alts:
                out.append(self._child_done(rest))
            return out
        if kind in (_FREE_OBJECT, _ANY):
            inner = top[2]
            if inner[0] == J.NUMBER and inner[1] == "" and J._number_step(inner[2], c) is None:
                if inner[2] in J._NUMBER_ENDS:
                    return self._advance(self._child_done(rest), c)
                return []
            nxt = J.step(inner, c)
            if nxt is None:
                return []
            if nxt[0] == J.DONE:
                return [self._child_done(rest)]
            return [rest + ((kind, top[1], nxt),)]
        raise AssertionError(kind)

    def _start(self, rest: tuple, node: int, c: int) -> list[tuple]:
        """A value of `node` begins with byte c below the frames `rest`."""
        if len(rest) + self.height[node] > MAX_FRAMES:
            return []  # (its smallest value would nest past the frames: never begun, so never a trap)
        n = self.nodes[node]
        kind = n[0]
        if kind == _ANYOF:
            out = []
            for branch in n[1]:
                out.extend(self._start(rest, branch, c))
            return out
        if kind == _OBJECT:
            frame = (_OBJECT, node, 0, 0, 0)
        elif kind == _ARRAY:
            frame = (_ARRAY, node, 0, 0, 0)
        elif kind == _MAP:
            frame = (_MAP, node, 0, 0)
        elif kind == _STRING:
            frame = (_STRING, node, 0, None)
        elif kind in (_NUMBER, _INTEGER):
            frame = (kind, node, None, None)
        elif kind == _LITERAL:
            frame = (_LITERAL, node, n[1])
        elif kind == _FREE_OBJECT:
            frame = (_FREE_OBJECT, node, (J.KEY_OR_END, "{", None, 0)) if c == 0x7B else None
            return [rest + (frame,)] if frame else []
        else:  # _ANY: json_constraint's recognizer, from this value's first byte
            inner = J._value("", c)
            return [rest + ((_ANY, node, inner),)] if inner is not None else []
        return self._advance(rest + (frame,), c)

    def _child_done(self, rest: tuple) -> tuple:
        """The stack once the value on top of `rest` is complete."""
        if not rest:
            return ()
        parent = rest[-1]
        if parent[0] == _OBJECT:
            return rest[:-1] + ((_OBJECT, parent[1], parent[2], 5, 0),)
        if parent[0] == _ARRAY:
            return rest[:-1] + ((_ARRAY, parent[1], 2, 0, parent[4]),)
        if parent[0] == _MAP:
            return rest[:-1] + ((_MAP, parent[1], 5, 0),)
        raise AssertionError(parent)

    def _fits(self, rest: tuple, node: int) -> bool:
        """Whether a value of `node` can be begun and finished inside the container on top of `rest`."""
        return len(rest) + 1 + self.height[node] <= MAX_FRAMES

    def _keys_from(self, keys: tuple, i: int) -> list[int]:
        """The properties that may come next from i on: each up to the first required one."""
        out = []
        for j in range(i, len(keys)):
            out.append(j)
            if keys[j][2]:
                break
        return out

    def _object_step(self, top: tuple, rest: tuple, c: int) -> list[tuple]:
        _, node, i, phase, aux = top
        keys = self.nodes[node][1]
        if phase == 0:
            return [rest + ((_OBJECT, node, 0, 1, 0),)] if c == 0x7B else []
        if phase == 2:  # inside a key's bytes
            if c != aux[0]:
                return []
            return [rest + ((_OBJECT, node, i, 2, aux[1:]) if len(aux) > 1 else (_OBJECT, node, i, 3, 0),)]
        if c in J._WS:
            if aux >= J.MAX_WS:
                return []
            return [rest + ((_OBJECT, node, i, phase, aux + 1),)]
        if phase in (1, 6):
            out = []
            if phase == 1 and all(not keys[j][2] for j in range(i, len(keys))) and c == 0x7D:  # }
                out.append(self._child_done(rest))
            for j in self._keys_from(keys, i):
                if not self._fits(rest, keys[j][1]):
                    continue
                for key in keys[j][0]:  # the key as written, or with its non-ASCII escaped
                    if key[0] == c:
                        out.append(rest + ((_OBJECT, node, j, 2, key[1:]),))
            return out
        if phase == 3:
            return [rest + ((_OBJECT, node, i, 4, 0),)] if c == 0x3A else []
        if phase == 4:
            return self._start(rest + ((_OBJECT, node, i, 4, 0),), keys[i][1], c)
        # phase 5: after a value
        if c == 0x2C and any(self._fits(rest, keys[j][1]) for j in self._keys_from(keys, i + 1)):
            return [rest + ((_OBJECT, node, i + 1, 6, 0),)]
        if c == 0x7D and all(not keys[j][2] for j in range(i + 1, len(keys))):
            return [self._child_done(rest)]
        return []

    def _array_step(self, top: tuple, rest: tuple, c: int) -> list[tuple]:
        _, node, phase, ws, n = top
        array = self.nodes[node]
        least, most = array[2], array[3]
        if phase == 0:
            return [rest + ((_ARRAY, node, 1, 0, 0),)] if c == 0x5B else []
        if c in J._WS:
            return [rest + ((_ARRAY, node, phase, ws + 1, n),)] if ws < J.MAX_WS else []
        if c == 0x5D and phase in (1, 2) and n >= least:
            return [self._child_done(rest)]
        item = self._item(array, n)  # the next item's node
        if phase == 1 and (most is None or most > 0) and item is not None or phase == 3:
            return self._start(rest + ((_ARRAY, node, phase, 0, n + 1),), item, c)
        if phase == 2 and c == 0x2C and (most is None or n < most) and item is not None and self._fits(rest, item):
            return [rest + ((_ARRAY, node, 3, 0, n),)]
        return []

    def _map_step(self, top: tuple, rest: tuple, c: int) -> list[tuple]:
        """An object of any keys whose values all follow one schema: _OBJECT's phases, free keys."""
        _, node, phase, aux = top
        if phase == 0:
            return [rest + ((_MAP, node, 1, 0),)] if c == 0x7B else []
        if phase == 2:  # inside a key
            nxt = J.step((J.STRING, "", aux, 0), c)
            if nxt is None:
                return []
            return [rest + ((_MAP, node, 3, 0) if nxt[0] == J.COLON else (_MAP, node, 2, nxt[2]),)]
        if c in J._WS:
            return [rest + ((_MAP, node, phase, aux + 1),)] if aux < J.MAX_WS else []
        if phase in (1, 6) and c == 0x22 and self._fits(rest, self.nodes[node][1]):
            return [rest + ((_MAP, node, 2, (True, 0, 0, 0, 0, 0)),)]
        if phase in (1, 5) and c == 0x7D:
            return [self._child_done(rest)]
        if phase == 3:
            return [rest + ((_MAP, node, 4, 0),)] if c == 0x3A else []
        if phase == 5 and c == 0x2C and not self._fits(rest, self.nodes[node][1]):
            return []
        if phase == 4:
            return self._start(rest + ((_MAP, node, 4, 0),), self.nodes[node][1], c)
        if phase == 5 and c == 0x2C:
            return [rest + ((_MAP, node, 6, 0),)]
        return []


def _is_type(value, kind: str) -> bool:
    """JSON Schema's type test (an integer is a number with no fraction: 1.0 is one)."""
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    test = {"string": str, "object": dict, "array": list, "boolean": bool, "null": type(None)}.get(kind)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if test is None:
        raise SchemaError(f"type {kind!r} is no JSON Schema type")
    return isinstance(value, test)


def _same(a, b) -> bool:
    """JSON equality (1 == 1.0, True != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b if type(a) in (int, float) and type(b) in (int, float) else \
        json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _kind_of_text(text: bytes) -> str:
    return {ord("{"): "object", ord("["): "array", ord('"'): "string", ord("t"): "boolean", ord("f"): "boolean",
            ord("n"): "null"}.get(text[0], "number")


def _forms(value) -> tuple[bytes, ...]:
    """A JSON value's texts as literals the reply may hold: compact, with its non-ASCII characters
    as they are or escaped (\\u00e9), as JSON writers do either."""
    try:
        return tuple(sorted({json.dumps(value, ensure_ascii=a, separators=(",", ":"), allow_nan=False).encode()
                             for a in (False, True)}))
    except (TypeError, ValueError):
        raise SchemaError(f"{value!r:.60} in the schema is no JSON value") from None


def grammar_for(response_format: dict) -> JsonSchemaGrammar:
    """The grammar of OpenAI's `{"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}`."""
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise SchemaError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    return JsonSchemaGrammar(spec.get("schema", {}))
