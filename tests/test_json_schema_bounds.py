"""Structured outputs with the keywords pydantic writes beyond types: number bounds (`ge`, `gt`,
`le`, `lt`), list lengths (`min_length` on a list: minItems/maxItems), `dict[str, T]`
(additionalProperties as a schema) and a single `allOf` around a `$ref`. The recognizer is
compared with the `jsonschema` library: every document it completes validates (sound), every
instance drawn from the schema is accepted (complete), and a random walk over the bytes it
allows never reaches a state with no way on (live: a constraint must not trap the model)."""

from __future__ import annotations

import itertools
import json
import random

import jsonschema
import pytest

from runtime.text.json_schema import JsonSchemaGrammar, SchemaError

POOL = [-10**20, -7, -2.5, -1, -0.5, 0, 0.1, 0.25, 1, 3, 7, 42, 100, 10**20]


def _accepts(g, data: bytes) -> bool:
    s = g.start()
    for c in data:
        s = g.step(s, c)
        if s is None:
            return False
    return g.complete(s)


def _bounds(rng: random.Random, integer: bool) -> dict:
    while True:
        out = {}
        for key in rng.sample(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"], rng.randint(1, 2)):
            out[key] = rng.choice(POOL)
        try:
            JsonSchemaGrammar({"type": "integer" if integer else "number", **out})
        except SchemaError:
            continue  # (bounds no value satisfies)
        return out


def _schema(rng: random.Random, depth: int) -> dict:
    kinds = ["integer", "number", "string", "null"]
    if depth < 3:
        kinds += ["array", "map", "object", "allof", "list", "tuple"]
    kind = rng.choice(kinds)
    if kind in ("integer", "number"):
        return {"type": kind, **_bounds(rng, kind == "integer")}
    if kind == "list":  # a type list with one type's keywords: they do not apply to the other
        return {"type": ["integer", "null"], **_bounds(rng, True)}
    if kind == "array":
        out = {"type": "array", "items": _schema(rng, depth + 1)}
        least = rng.choice([None, 0, 1, 2])
        most = rng.choice([None, 0, 1, 3])
        if least is not None:
            out["minItems"] = least
        if most is not None and (least or 0) <= most:
            out["maxItems"] = most
        return out
    if kind == "map":
        return {"type": "object", "additionalProperties": _schema(rng, depth + 1)}
    if kind == "tuple":
        out = {"type": "array", "prefixItems": [_schema(rng, depth + 1) for _ in range(rng.randint(1, 2))]}
        out["items"] = rng.choice([False, _schema(rng, depth + 1)])
        out["minItems"] = rng.randint(0, len(out["prefixItems"]))
        return out
    if kind == "object":
        props = {f"k{i}": _schema(rng, depth + 1) for i in range(rng.randint(1, 3))}
        return {"type": "object", "properties": props, "required": [k for k in props if rng.random() < 0.6],
                "additionalProperties": False}
    if kind == "allof":
        return {"allOf": [_schema(rng, depth + 1)], "description": "pydantic's annotated $ref"}
    return {"type": kind}


def _instance(rng: random.Random, s: dict):
    if "allOf" in s:
        return _instance(rng, s["allOf"][0])
    kind = s["type"]
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind in ("integer", "number"):
        pool = [v for v in POOL + [0.3, 12, 99.5, 8] if (kind == "number" or float(v).is_integer())]
        pool = [int(v) if kind == "integer" else v for v in pool]
        ok = [v for v in pool if jsonschema.Draft202012Validator({**s, "type": kind}).is_valid(v)]
        return rng.choice(ok) if ok else None
    if kind == "string":
        return rng.choice(["", "a b", "é"])
    if kind == "null":
        return None
    if kind == "array" and "prefixItems" in s:
        prefix = s["prefixItems"]
        n = rng.randint(s["minItems"], len(prefix) + (0 if s["items"] is False else 2))
        return [_instance(rng, prefix[i] if i < len(prefix) else s["items"]) for i in range(n)]
    if kind == "array":
        n = rng.randint(s.get("minItems", 0), s.get("maxItems", 3))
        return [_instance(rng, s["items"]) for _ in range(n)]
    if "additionalProperties" in s and "properties" not in s:
        return {f"x{i}": _instance(rng, s["additionalProperties"]) for i in range(rng.randint(0, 2))}
    return {k: _instance(rng, v) for k, v in s["properties"].items() if k in s["required"] or rng.random() < 0.5}


def _cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        schema = {"type": "object", "properties": {f"p{k}": _schema(rng, 1) for k in range(rng.randint(1, 3))},
                  "additionalProperties": False}
        schema["required"] = list(schema["properties"])
        yield schema, rng


def test_every_instance_is_accepted():
    checked = 0
    for schema, rng in _cases(120, 5):
        g = JsonSchemaGrammar(schema)
        for _ in range(4):
            value = _instance(rng, schema)
            if not jsonschema.Draft202012Validator(schema).is_valid(value):
                continue  # (a bound the pool has no value for)
            doc = json.dumps(value, indent=rng.choice([None, 1])).encode()
            assert _accepts(g, doc), (schema, doc)
            checked += 1
    assert checked > 300


def _walk(g, rng: random.Random, budget: int) -> bytes | None:
    """A random document, byte by byte among the bytes allowed; None when a state allows no byte
    yet is not complete (a dead end). Closing bytes are favoured so that most walks finish."""
    s, out = g.start(), bytearray()
    for _ in range(budget):
        allowed = [c for c in range(256) if g.step(s, c) is not None]
        if g.complete(s) and (not allowed or rng.random() < 0.3):
            return bytes(out)
        if not allowed:
            return None
        closing = [c for c in allowed if c in b'}],"']
        c = rng.choice(closing if closing and rng.random() < 0.4 else allowed)
        s = g.step(s, c)
        out.append(c)
    return b""  # (too long: neither finished nor stuck)


def test_random_walks_never_trap_and_always_validate():
    """Live and sound: from every state reached some byte goes on or the value is complete, and
    every completed walk is a document jsonschema accepts."""
    rng = random.Random(11)
    for schema, _ in _cases(40, 9):
        g = JsonSchemaGrammar(schema)
        for _ in range(3):
            doc = _walk(g, rng, 400)
            assert doc is not None, schema
            # a walk that favours closing bytes finishes: one that runs on found no way to close
            # (digits past a bound, say), a trap the byte test alone does not see
            assert doc, schema
            jsonschema.Draft202012Validator(schema).validate(json.loads(doc))


@pytest.mark.parametrize("bounds", [
    {"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0, "exclusiveMaximum": 1}, {"minimum": 0.1},
    {"maximum": -2.5}, {"exclusiveMinimum": -1, "maximum": 42}, {"minimum": 1e20}, {"exclusiveMaximum": 0.25},
    {"minimum": 7, "maximum": 7}, {"minimum": 0.1, "maximum": 0.1}])
@pytest.mark.parametrize("kind", ["number", "integer"])
def test_every_short_number_text_is_judged_as_jsonschema_judges_it(kind, bounds):
    """All number texts of up to 4 bytes: each one accepted validates; each one that validates is
    accepted when its exact value lies between the floats the bounds allow (a text like 0.10 for
    a minimum of 0.1 is kept; 0.0999999999999999999, which rounds up to 0.1, need not be)."""
    schema = {"type": kind, **bounds}
    try:
        g = JsonSchemaGrammar(schema)
    except SchemaError:
        assert kind == "integer" and not any(jsonschema.Draft202012Validator(schema).is_valid(i)
                                             for i in range(-100, 101))
        return
    validator = jsonschema.Draft202012Validator(schema)
    kept = 0
    for n in range(1, 5):
        for chars in itertools.product("-0123456789.", repeat=n):
            text = "".join(chars)
            try:
                value = json.loads(text)
            except ValueError:
                assert not _accepts(g, text.encode()), text
                continue
            ok = _accepts(g, text.encode())
            if ok:
                assert validator.is_valid(value), text
                kept += 1
            elif validator.is_valid(value) and not (kind == "integer" and "." in text):
                raise AssertionError(f"{text} validates but was refused")
    assert kept or bounds.get("minimum") == 1e20


def test_bounds_that_no_value_meets_and_malformed_counts_are_refused_by_name():
    for schema, words in [({"type": "integer", "minimum": 0.2, "maximum": 0.8}, "no integer lies within"),
                          ({"type": "number", "minimum": 2, "exclusiveMaximum": 2}, "no number lies within"),
                          ({"type": "number", "minimum": "1"}, "minimum must be a finite number"),
                          ({"type": "number", "exclusiveMinimum": True}, "draft-4 boolean form"),
                          ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 is more than the 2 items it may hold"),
                          ({"type": "array", "maxItems": -1}, "maxItems must be a non-negative integer"),
                          ({"type": "string", "minimum": 1}, "type 'string' beside minimum"),
                          ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf is supported with one schema"),
                          ({"type": "object", "additionalProperties": {"type": "integer", "multipleOf": 3}},
                           "additionalProperties uses 'multipleOf'")]:
        with pytest.raises(SchemaError, match=words):
            JsonSchemaGrammar(schema)


def test_pydantic_constrained_fields_compile_and_hold():
    """The schema pydantic writes for constrained fields, a dict field and a nested model."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Annotated, Optional

    class Inner(pydantic.BaseModel):
        score: Annotated[float, pydantic.Field(ge=0, le=1)]

    class Outer(pydantic.BaseModel):
        n: Annotated[int, pydantic.Field(gt=0, lt=10)]
        tags: Annotated[list[str], pydantic.Field(min_length=1, max_length=2)]
        counts: dict[str, int]
        inner: Inner
        maybe: Optional[Annotated[int, pydantic.Field(ge=5)]] = None

    schema = Outer.model_json_schema()
    g = JsonSchemaGrammar(schema)
    good = Outer(n=3, tags=["a"], counts={"x": 1, "y": -2}, inner=Inner(score=0.5), maybe=7).model_dump_json()
    assert _accepts(g, good.encode())
    for bad in ['"n":0', '"n":10', '"tags":[]', '"tags":["a","b","c"]', '"counts":{"x":1.5}', '"score":1.01',
                '"maybe":4']:
        key = bad.split(":")[0]
        doc = json.loads(good)
        doc_text = json.dumps(doc, separators=(",", ":"))
        start = doc_text.index(key + ":")
        end = start + len(key) + 1
        depth, i = 0, end
        while depth or doc_text[i] not in ",}":  # the old value's end
            depth += doc_text[i] in "[{" and 1 or doc_text[i] in "]}" and -1 or 0
            i += 1
        edited = doc_text[:start] + bad + doc_text[i:]
        assert not _accepts(g, edited.encode()), edited
        with pytest.raises(pydantic.ValidationError):
            Outer.model_validate_json(edited)
    rng = random.Random(2)
    for _ in range(10):
        doc = _walk(g, rng, 600)
        assert doc is not None
        if doc:
            Outer.model_validate_json(doc)


def test_a_number_stuck_on_digits_is_stopped_where_it_can_still_end():
    """A model writing 0.000... for ever raised int()'s 4,300-digit ValueError (a review)."""
    from runtime.text.json_number import MAX_CHARS

    for schema, lead in [({"type": "number", "minimum": 0, "maximum": 1}, b"0."),
                         ({"type": "integer", "minimum": 0}, b"1"),
                         ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, b"0.")]:
        g = JsonSchemaGrammar(schema)
        s = g.start()
        for c in lead:
            s = g.step(s, c)
        n = len(lead)
        while g.step(s, ord("0")) is not None:
            s = g.step(s, ord("0"))
            n += 1
        assert n <= MAX_CHARS
        ways = [c for c in b"0123456789" if g.step(s, c) is not None]
        assert g.complete(s) or ways, (schema, n)  # it ends here, or a digit still leads somewhere


@pytest.mark.parametrize("schema", [
    {"$defs": {"S": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/S"}}}, "$ref": "#/$defs/S"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"], "additionalProperties": False}])
def test_a_schema_with_no_finite_value_is_refused(schema):
    """They compiled, and the reply nested [[[[... until the frames ran out, then had no way on."""
    with pytest.raises(SchemaError, match="no finite value"):
        JsonSchemaGrammar(schema)


def test_values_are_begun_only_where_they_can_end_within_the_frames():
    """A recursive schema whose smallest value nests: past the frames a value that would have to
    nest deeper is not begun (the reply closes instead), where it used to be left unfinishable."""
    tree = {"$defs": {"T": {"anyOf": [{"type": "array", "minItems": 1, "maxItems": 1, "items": {"$ref": "#/$defs/T"}},
                                      {"type": "object", "properties": {"k": {"$ref": "#/$defs/T"}},
                                       "required": ["k"], "additionalProperties": False},
                                      {"type": "integer"}]}}, "$ref": "#/$defs/T"}
    g = JsonSchemaGrammar(tree)
    rng = random.Random(1)
    for _ in range(3):
        s, out = g.start(), bytearray()
        while not g.complete(s):  # open while anything opens, then whatever comes
            allowed = [c for c in range(256) if g.step(s, c) is not None and c not in b" \t\n\r"]
            assert allowed, (len(out), bytes(out[-40:]))
            opening = [c for c in allowed if c in b'[{"k:']
            c = rng.choice(opening or allowed)
            s = g.step(s, c)
            out.append(c)
        assert out.count(b"[") + out.count(b"{") > 100
        jsonschema.validate(json.loads(out), tree)


def test_tuples_follow_prefix_items():
    """pydantic's tuple[int, str] (prefixItems, with min/maxItems) and a tuple with items: false."""
    pydantic = pytest.importorskip("pydantic")

    class Pair(pydantic.BaseModel):
        pair: tuple[int, str]
        rest: tuple[bool, ...]

    schema = Pair.model_json_schema()
    g = JsonSchemaGrammar(schema)
    assert _accepts(g, b'{"pair": [1, "a"], "rest": [true, false]}')
    for bad in (b'{"pair": [1], "rest": []}', b'{"pair": ["a", 1], "rest": []}', b'{"pair": [1, "a", 2], "rest": []}'):
        assert not _accepts(g, bad), bad
    rng = random.Random(6)
    for _ in range(10):
        doc = _walk(g, rng, 600)
        assert doc
        Pair.model_validate_json(doc)
    closed = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "null"}], "items": False}
    g = JsonSchemaGrammar(closed)
    assert _accepts(g, b"[1, null]") and _accepts(g, b"[1]") and not _accepts(g, b"[1, null, 2]")
    for _ in range(10):
        doc = _walk(g, rng, 100)
        jsonschema.validate(json.loads(doc), closed)
    with pytest.raises(SchemaError, match="minItems 3 is more than the 2 items"):
        JsonSchemaGrammar({**closed, "minItems": 3})
