"""Structured outputs (`response_format: json_schema`, pydantic models through the `openai`
client's `.parse`), which were refused: the schema's recognizer (runtime.text.json_schema)
against the `jsonschema` library on random schemas, their instances and edits of them; replies
through the Python API and a live server, with models that write a chosen text
(tests/helpers/scripted_model.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.text import json_constraint as J
from runtime.text.json_schema import JsonSchemaGrammar, SchemaError, grammar_for
from tests.helpers.scripted_model import write_scripted_model

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def _feed(g: JsonSchemaGrammar, data: bytes):
    s = g.start()
    for c in data:
        s = g.step(s, c)
        if s is None:
            return None
    return s


def _accepts(g, data: bytes) -> bool:
    s = _feed(g, data)
    return s is not None and g.complete(s)


# ------------------------------------------------------------------ random schemas and instances

def _schema(rng: random.Random, depth: int, defs: dict):
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "optional"]
    if depth < 3:
        kinds += ["array", "object", "object", "free", "ref"]
    kind = rng.choice(kinds)
    if kind == "enum":
        return {"enum": rng.sample(["a", "b c", "é", 1, 2.5, True, None, "1"], rng.randint(1, 3))}
    if kind == "optional":
        return {"anyOf": [_schema(rng, depth + 1, defs), {"type": "null"}]}
    if kind == "array":
        return {"type": "array", "items": _schema(rng, depth + 1, defs)}
    if kind == "object":
        props = {f"k{i}{rng.choice(['', ' x', 'é'])}": _schema(rng, depth + 1, defs) for i in range(rng.randint(0, 3))}
        required = [k for k in props if rng.random() < 0.7]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if kind == "free":
        return {"type": "object"}
    if kind == "ref":
        name = f"D{len(defs)}"
        defs[name] = None
        defs[name] = _schema(rng, depth + 1, defs)
        return {"$ref": f"#/$defs/{name}"}
    return {"type": kind}


def _resolve(schema, root):
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def _instance(rng: random.Random, schema, root):
    schema = _resolve(schema, root)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return _instance(rng, rng.choice(schema["anyOf"]), root)
    kind = schema.get("type")
    if kind == "string":
        return rng.choice(["", "x", 'a "q" \\ /', "é中😀", "line\nbreak", "\t"])
    if kind == "integer":
        return rng.choice([0, -7, 12, 10**18])
    if kind == "number":
        return rng.choice([0, -1.5, 3e-7, 1e300, 42])
    if kind == "boolean":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "array":
        return [_instance(rng, schema["items"], root) for _ in range(rng.randint(0, 3))]
    if "properties" in schema:
        return {k: _instance(rng, v, root) for k, v in schema["properties"].items()
                if k in schema["required"] or rng.random() < 0.5}
    return rng.choice([{}, {"a": 1}, {"b": [True, None, "x"], "c": {"d": -0.5}}])


def _cases(n: int):
    rng = random.Random(7)
    for i in range(n):
        defs: dict = {}
        root = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
        for k in range(rng.randint(1, 4)):
            root["properties"][f"p{k}"] = _schema(rng, 1, defs)
            if rng.random() < 0.8:
                root["required"].append(f"p{k}")
        if defs:
            root["$defs"] = defs
        yield root, [_instance(rng, root, root) for _ in range(4)]


def _text(value, style: int) -> bytes:
    return json.dumps(value, ensure_ascii=bool(style % 2), indent=2 if style == 2 else None,
                      separators=(",", ":") if style == 1 else None).encode()


def test_every_instance_of_a_random_schema_is_accepted_byte_by_byte():
    for schema, instances in _cases(150):
        g = JsonSchemaGrammar(schema)
        for k, value in enumerate(instances):
            jsonschema.validate(value, schema)  # the generator's own check
            data = _text(value, k % 3)
            s = g.start()
            for i, c in enumerate(data):
                assert not g.complete(s) or i == 0, data[:i]
                s = g.step(s, c)
                assert s is not None, (schema, data, i)
            assert g.complete(s), (schema, data)


def test_what_it_accepts_the_jsonschema_library_validates():
    """Sound: every edited document it completes is valid JSON that `jsonschema` accepts."""
    rng = random.Random(3)
    pieces = [b"", b",", b":", b"{", b"}", b"[", b"]", b'"', b"null", b"1", b"1.5", b"-", b"true", b'"x"', b'"p0"',
              b'"p1":', b" ", b"e3", b"\\u00e9", b'"k0":0,'] + [b" ", b"\n", b"0", b"a"] * 3  # (more edits that keep it valid)
    accepted = rejected = 0
    for schema, instances in _cases(300):
        g = JsonSchemaGrammar(schema)
        for value in instances:
            doc = bytearray(_text(value, rng.randint(0, 2)))
            for _ in range(rng.randint(1, 2)):
                at = rng.randint(0, len(doc))
                doc[at:at + rng.randint(0, 1)] = rng.choice(pieces)
            doc = bytes(doc)
            if _accepts(g, doc):
                accepted += 1
                parsed = json.loads(doc.decode("utf-8"), parse_constant=lambda c: 1 / 0)
                jsonschema.validate(parsed, schema)
            else:
                rejected += 1
    assert accepted > 100 and rejected > 300, (accepted, rejected)  # both kinds came up


@pytest.mark.parametrize("doc", [b'{"a": 1}', b'{"name": "x", "extra": 1}', b'{"name": 3}', b'{}',
                                 b'{"name": "x", "n": 1.5}', b'{"n": 2, "name": "x"}'])
def test_what_a_strict_schema_refuses(doc):
    """Missing, extra, mistyped and reordered keys (the order is the schema's, as OpenAI's strict
    mode writes it); an integer with a fraction."""
    g = JsonSchemaGrammar({"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                           "required": ["name"], "additionalProperties": False})
    assert not _accepts(g, doc)
    assert _accepts(g, b'{"name": "x", "n": 2}') and _accepts(g, b'{"name":"x"}')


def test_a_recursive_schema_nests():
    tree = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v", "kids"], "additionalProperties": False}},
        "$ref": "#/$defs/node"}
    g = JsonSchemaGrammar(tree)
    doc = {"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}
    assert _accepts(g, json.dumps(doc).encode()) and not _accepts(g, b'{"v": 1, "kids": [{"v": 2}]}')


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}, r"#/properties/n uses 'multipleOf'"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "uri-reference"}}},
     "format 'uri-reference' is not enforced"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required names"),
    ({"$ref": "#/$defs/missing"}, "leads nowhere"),
    ({"type": "decimal"}, "no JSON Schema type"),
])
def test_keywords_it_cannot_enforce_are_refused_by_name(schema, words):
    with pytest.raises(SchemaError, match=words):
        JsonSchemaGrammar(schema)


def test_the_mask_is_the_set_of_tokens_that_continue():
    m = runtime.load(SHIPPED, n_threads=1, n_ctx=64)
    vocab = J.vocabulary(m.tokenizer)
    g = JsonSchemaGrammar({"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"type": "number"}},
                           "required": ["kind"], "additionalProperties": False})
    for prefix in [b"", b"{", b'{"ki', b'{"kind": "', b'{"kind": "dog"', b'{"kind": "dog", "n": 1']:
        s = _feed(g, prefix)
        want = [(not vocab.silent[t] and _feed_from(g, s, vocab.pieces[t]) is not None) or
                (t in vocab.eog and g.complete(s)) for t in range(len(vocab.pieces))]
        assert list(vocab.mask(s, g)) == want, prefix


def _feed_from(g, s, data: bytes):
    for c in data:
        s = g.step(s, c)
        if s is None:
            return None
    return s


# ------------------------------------------------------------------ through the model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "kind"], "additionalProperties": False}
REPLIES = {"valid": '{"name": "Tom", "age": 3, "kind": "cat"} Thanks',
           "wrong": '{"name": "Tom", "age": 3.5, "kind": "cow"}'}
MSGS = [{"role": "user", "content": "Describe the cat."}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("json-schema")
    return {name: write_scripted_model(SHIPPED, root / f"{name}.gguf", text) for name, text in REPLIES.items()}


def _fmt(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


def test_a_valid_reply_passes_and_a_wrong_one_is_steered(files):
    m = runtime.load(files["valid"], n_threads=1, n_ctx=512)
    r = m.create_chat_completion(MSGS, max_tokens=60, temperature=0, response_format=_fmt())
    assert r["choices"][0]["message"]["content"] == '{"name": "Tom", "age": 3, "kind": "cat"}'
    assert r["choices"][0]["finish_reason"] == "stop"
    # llama-cpp-python's spelling of the same
    r = m.create_chat_completion(MSGS, max_tokens=60, temperature=0, response_format={"type": "json_object",
                                                                                       "schema": SCHEMA})
    assert r["choices"][0]["message"]["content"] == '{"name": "Tom", "age": 3, "kind": "cat"}'
    m = runtime.load(files["wrong"], n_threads=1, n_ctx=512)
    for temperature in (0, 0.7):
        r = m.create_chat_completion(MSGS, max_tokens=60, temperature=temperature, seed=2, response_format=_fmt())
        text = r["choices"][0]["message"]["content"]
        assert _feed(JsonSchemaGrammar(SCHEMA), text.encode()) is not None, text
        if r["choices"][0]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)


def test_refusals_are_named(files):
    m = runtime.load(files["valid"], n_threads=1, n_ctx=512)
    with pytest.raises(StepstreamError, match="'multipleOf'"):
        m.create_chat_completion(MSGS, max_tokens=4, response_format=_fmt({"type": "integer", "multipleOf": 2}))
    with pytest.raises(SchemaError, match="needs"):
        grammar_for({"type": "json_schema"})


def test_pydantic_models_through_the_openai_clients_parse(files):
    """The `openai` client's structured outputs: `.parse(response_format=Model)` sends the model's
    strict schema and parses the reply into it."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from typing import Literal

    from pydantic import BaseModel

    from tests.helpers.live_server import live_server

    class Pet(BaseModel):
        name: str
        age: int
        kind: Literal["cat", "dog"]

    with live_server(files["valid"], "--alias", "m") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") else \
            client.beta.chat.completions.parse
        r = parse(model="m", messages=MSGS, max_tokens=60, temperature=0, response_format=Pet)
        assert r.choices[0].message.parsed == Pet(name="Tom", age=3, kind="cat")
        with pytest.raises(openai.BadRequestError, match="multipleOf"):
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, response_format=_fmt(
                {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}))


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "number"}, [b"12", b"-1.5e3", b"0"], [b"01", b"1.", b"-"]),
    ({"type": "integer"}, [b"7", b"-0"], [b"7.5", b"1e3"]),
    ({}, [b"3", b'"x"', b"[1, {}]", b"null"], [b"nul", b"[1,"]),
    ({"enum": [1, 12]}, [b"1", b"12"], [b"2", b"123"]),
])
def test_a_root_that_is_no_object(schema, good, bad):
    """A number at the root ends with the reply (nothing follows it to end it): complete there."""
    g = JsonSchemaGrammar(schema)
    for doc in good:
        assert _accepts(g, doc), doc
        jsonschema.validate(json.loads(doc), schema)
    for doc in bad:
        assert not _accepts(g, doc), doc


def test_run_takes_a_schema_as_llama_cpp_takes_it(capsys, tmp_path):
    """`stepstream run -j SCHEMA` / `-jf FILE`, llama.cpp's flags: the text is a value the schema
    accepts, and a schema it cannot enforce is one line before the model loads."""
    from runtime.cli import main

    for temp in ("0", "1"):
        assert main(["run", "-m", str(SHIPPED), "-p", "Answer: ", "-n", "20", "--temp", temp, "-t", "1",
                     "--no-display-prompt", "-j", '{"enum": ["yes", "no"]}']) == 0
        out, err = capsys.readouterr()
        assert out.strip() in ('"yes"', '"no"') and "[stop]" in err, (out, err)  # (a blank or two may lead)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                                  "additionalProperties": False}))
    assert main(["run", "-m", str(SHIPPED), "-p", "x", "-n", "40", "--temp", "0.7", "-t", "1", "--no-display-prompt",
                 "-jf", str(schema)]) == 0
    out, err = capsys.readouterr()
    if "[stop]" in err:
        jsonschema.validate(json.loads(out), json.loads(schema.read_text()))
    assert main(["run", "-m", str(SHIPPED), "-p", "x", "-j", '{"type": "integer", "multipleOf": 2}']) == 2
    assert capsys.readouterr().err.startswith("error: -j/--json-schema: the schema at # uses 'multipleOf'")


REVIEWED = [  # a review's schemas whose recognizer let through what jsonschema refuses, or crashed
    ({"type": "string", "enum": ["a", 1]}, b"1"),
    ({"type": "boolean", "const": "a"}, b'"a"'),
    ({"enum": [1, 2], "const": 2}, b"1"),
    ({"enum": [1, "a"], "anyOf": [{"type": "string"}]}, b"1"),
    ({"$defs": {"a": {}}, "$ref": "#/$defs/a", "type": "string"}, b"1"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, b"1"),
    ({"oneOf": [{}, {"type": "string"}]}, b'"x"'),
    ({"type": "object", "required": ["a"]}, b"{}"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, b"{}"),
    ({"required": ["a"]}, b"{}"),
    ({"additionalProperties": {"type": "null"}}, b'{"a":1}'),
    ({"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/n"}],
      "$defs": {"n": {"$id": "http://e.com/n", "type": "array", "items": {"$ref": "#"}}}}, b"[1]"),
    ({"$defs": {"a b": {"type": "string"}, "a%20b": {"type": "integer"}}, "$ref": "#/$defs/a%20b"}, b"1"),
    ({"$defs": {"a": {"type": "integer"}, "": {"a": {"type": "string"}}}, "$ref": "#/$defs//a"}, b"1"),
    ({"type": "object", "properties": {"a": {}}, "required": [["a"]]}, b'{"a":1}'),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, b"1"),
    ({"anyOf": [{"$ref": "#"}, {"type": "string"}]}, b'"x"'),
    ({"type": [["string"]]}, b'"x"'),
]


@pytest.mark.parametrize("schema, doc", REVIEWED)
def test_what_it_compiles_it_enforces_whole(schema, doc):
    """Every keyword is honoured or the schema is refused; a keyword beside others it does not
    combine with was dropped (enum beside type, $ref beside type, required without properties,
    oneOf as anyOf), references resolved otherwise than RFC 6901, cycles recursed for ever."""
    try:
        g = JsonSchemaGrammar(schema)
    except SchemaError:
        return
    if _accepts(g, doc):
        jsonschema.Draft202012Validator(schema).validate(json.loads(doc))


def test_enum_with_type_keeps_the_values_of_that_type_as_pydantic_writes_them():
    g = JsonSchemaGrammar({"type": "string", "enum": ["cat", "dog", 1]})
    assert _accepts(g, b'"cat"') and not _accepts(g, b"1")
    g = JsonSchemaGrammar({"type": "integer", "enum": [1, 1.0, 2.5]})  # 1.0 is an integer in JSON Schema
    assert _accepts(g, b"1") and _accepts(g, b"1.0") and not _accepts(g, b"2.5")


def test_many_consts_are_one_reading_and_too_many_readings_keep_256_of_them():
    g = JsonSchemaGrammar({"anyOf": [{"const": f"v{i}"} for i in range(300)]})
    assert _accepts(g, b'"v299"') and not _accepts(g, b'"v300"')
    deep = JsonSchemaGrammar({"$defs": {"t": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/t"}},
                                                         {"type": "array", "items": {"$ref": "#/$defs/t"}},
                                                         {"type": "integer"}]}}, "$ref": "#/$defs/t"})
    s = _feed(deep, b"[" * 7)
    assert s is not None and deep.step(s, ord("1")) is not None  # 2^7 readings, under the cap
    # 2^9 readings: 256 kept (the byte was refused, and a review found the reply then had no
    # way on but blanks); each reading can still be finished
    s = _feed(deep, b"[" * 9)
    assert s is not None and len(s[1]) == 256
    assert _accepts(deep, b"[" * 9 + b"1" + b"]" * 9)
    wide = JsonSchemaGrammar({"anyOf": [{"type": "string", "pattern": f"^x{i}$"} for i in range(300)]})
    assert _accepts(wide, b'"x1"')  # (300 readings from the first byte: only blanks were allowed)
    with pytest.raises(SchemaError, match="nests too deeply"):
        nested = {"type": "string"}
        for _ in range(2000):
            nested = {"anyOf": [nested]}
        JsonSchemaGrammar(nested)


def test_a_schema_reply_reasons_first_when_the_prompt_opened_it():
    g = JsonSchemaGrammar(SCHEMA)
    s = g.start(in_reasoning=True)
    for c in b'Let me think. {"not": "this"} </thi':
        s = g.step(s, c)
    assert s is not None and g.thinking(s) and not g.complete(s)
    for c in b'nk>\n\n{"name": "Tom", "age": 3, "kind": "dog"}':
        s = g.step(s, c)
        assert s is not None
    assert g.complete(s)


@pytest.mark.parametrize("schema", [{"type": "object", "title": 3}, {"$id": ["x"], "type": "object"},
                                    {"type": "object", "$defs": {"a": 1}}, {"type": "object", "description": None}])
def test_malformed_annotations_are_refused_as_jsonschema_refuses_them(schema):
    with pytest.raises(jsonschema.SchemaError):
        jsonschema.Draft202012Validator.check_schema(schema)
    with pytest.raises(SchemaError):
        JsonSchemaGrammar(schema)


def test_an_anyof_branch_it_cannot_enforce_is_left_out_while_another_remains():
    """pydantic's Decimal is a number or a string whose pattern has a lookahead (a 400 before):
    the number is kept. What is written always matches a kept branch; with no branch left, or
    in a oneOf, the first refusal stands."""
    pydantic = pytest.importorskip("pydantic")
    import decimal

    class Price(pydantic.BaseModel):
        amount: decimal.Decimal
        low: decimal.Decimal = pydantic.Field(ge=0)

    g = JsonSchemaGrammar(Price.model_json_schema())
    assert _accepts(g, b'{"amount": -3.25, "low": 0}') and not _accepts(g, b'{"amount": "3.25", "low": 0}')
    assert not _accepts(g, b'{"amount": 1, "low": -1}')
    rng = random.Random(2)
    for _ in range(6):
        s, out = g.start(), bytearray()
        while not g.complete(s) or rng.random() < 0.7:
            allowed = [c for c in range(256) if g.step(s, c) is not None]
            if not allowed:
                break
            closing = [c for c in allowed if c in b',}']
            c = rng.choice(closing if closing and rng.random() < 0.3 else
                           [c for c in allowed if c in b'0123456789.-"'] or allowed)
            s, out = g.step(s, c), out + bytes((c,))
        assert g.complete(s), bytes(out)
        Price.model_validate_json(bytes(out))
    # a branch that had built a $ref before it failed leaves nothing behind: the $ref is built again
    defs = {"A": {"type": "integer", "minimum": 5}}
    branchy = {"$defs": defs, "anyOf": [
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"type": "integer", "multipleOf": 2}}},
        {"type": "array", "items": {"$ref": "#/$defs/A"}}]}
    g = JsonSchemaGrammar(branchy)
    assert _accepts(g, b"[5, 6]") and not _accepts(g, b"[4]") and not _accepts(g, b'{"a": 5}')
    with pytest.raises(SchemaError, match="#/anyOf/0 uses 'multipleOf'"):
        JsonSchemaGrammar({"anyOf": [{"type": "integer", "multipleOf": 2}, {"type": "string", "pattern": "(?=a)"}]})
    with pytest.raises(SchemaError, match="multipleOf"):
        JsonSchemaGrammar({"oneOf": [{"type": "integer", "multipleOf": 2}, {"type": "string"}]})
    # under a oneOf, a branch left out deeper down would hide that "x" matches two of its branches
    with pytest.raises(SchemaError, match="oneOf over an anyOf"):
        JsonSchemaGrammar({"oneOf": [{"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "(?=x)"}]},
                                     {"type": "string"}]})
