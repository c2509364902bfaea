"""Structured outputs with string keywords (`pattern`, `format`, `minLength`, `maxLength`), which
were refused: the schema's recognizer reads a string's bytes (UTF-8 and JSON's short escapes)
into characters for runtime.text.json_regex's rules. Compared with the `jsonschema` library and
its format checker: random walks over the bytes it allows never trap and always validate; the
instances pydantic writes are accepted; masks over the shipped vocabulary equal each token
checked alone; and a model that writes a wrong string is steered to a valid one."""

from __future__ import annotations

import json
import random
import uuid
from datetime import date, datetime, timezone
from pathlib import Path

import jsonschema
import pytest

import runtime
from runtime.text import json_constraint as J
from runtime.text.json_schema import JsonSchemaGrammar, SchemaError
from tests.helpers.scripted_model import write_scripted_model

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER

STRINGS = [  # (schema, texts it accepts, texts it refuses)
    ({"type": "string", "minLength": 2, "maxLength": 3}, ["ab", "é中😀", 'a"'], ["a", "abcd", ""]),
    ({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}, ["ab-12"], ["ab-1", "Ab-12", "ab-123"]),
    ({"type": "string", "pattern": "x"}, ["x", "axb", "\nx\t"], ["", "ab"]),  # re.search: anywhere
    ({"type": "string", "pattern": '^[^"\\\\]*$', "maxLength": 4}, ["a b", "é/"], ['a"', "a\\", "abcde"]),
    ({"type": "string", "format": "date"}, ["2024-02-29", "1999-12-31"], ["2023-02-29", "2024-13-01", "24-01-01"]),
    ({"type": "string", "format": "date-time"}, ["2024-05-01T10:20:30Z", "2024-05-01T10:20:30.5+02:00"],
     ["2024-05-01 10:20:30Z", "2024-05-01T25:00:00Z"]),
    ({"type": "string", "format": "uuid"}, [str(uuid.UUID(int=7))], ["not-a-uuid"]),
    ({"type": "string", "format": "email", "maxLength": 20}, ["a.b@ex.com"], ["a.b", "x" * 15 + "@ex.com"]),
    ({"type": "string", "format": "ipv4", "pattern": "^10\\."}, ["10.0.0.1"], ["192.168.0.1", "10.0.0.256"]),
    # (what pydantic's HttpUrl writes; jsonschema checks it with rfc3986-validator)
    ({"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083},
     ["https://example.com/a/b?x=1&y=%20#top", "http://[::1]:8080/", "ftp://10.0.0.1"],
     ["example.com", "https://ex ample.com", "https://a.b/%zz"]),

]


def _accepts(g, data: bytes) -> bool:
    s = g.start()
    for c in data:
        s = g.step(s, c)
        if s is None:
            return False
    return g.complete(s)


@pytest.mark.parametrize("schema, good, bad", STRINGS)
def test_strings_are_judged_as_jsonschema_judges_them(schema, good, bad):
    g = JsonSchemaGrammar(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=CHECKER)
    for text in good:
        assert validator.is_valid(text), text
        assert _accepts(g, json.dumps(text, ensure_ascii=False).encode()), text
    for text in bad:
        assert not validator.is_valid(text), text
        assert not _accepts(g, json.dumps(text, ensure_ascii=False).encode()), text


def _walk(g, rng: random.Random, budget: int, bias: bytes) -> bytes | None:
    """Random bytes among those allowed (favouring `bias`, then closing bytes); None at a state
    that allows none and is not complete."""
    s, out = g.start(), bytearray()
    for _ in range(budget):
        allowed = [c for c in range(256) if g.step(s, c) is not None]
        if g.complete(s) and (not allowed or rng.random() < 0.3):
            return bytes(out)
        if not allowed:
            return None
        favoured = [c for c in allowed if c in bias]
        closing = [c for c in allowed if c in b'}]"']
        pick = rng.random()
        c = rng.choice(favoured if favoured and pick < 0.3 else closing if closing and pick < 0.5 else allowed)
        s = g.step(s, c)
        out.append(c)
    return b""


def test_random_walks_through_string_rules_never_trap_and_always_validate():
    """Raw UTF-8 lead bytes, escapes and closing quotes are taken only where some character can
    follow: a walk never reaches a state with no way on, and what it finishes validates."""
    schema = {"type": "object", "additionalProperties": False, "required": [], "properties": {}}
    for i, (sub, _, _) in enumerate(STRINGS):
        schema["properties"][f"s{i}"] = sub
        schema["required"].append(f"s{i}")
    schema["properties"]["list"] = {"type": "array", "items": {"type": "string", "maxLength": 2, "pattern": "^é?"},
                                    "maxItems": 3}
    g = JsonSchemaGrammar(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=CHECKER)
    rng = random.Random(4)
    for _ in range(10):
        doc = _walk(g, rng, 3000, bias="\\é中😀".encode())
        assert doc is not None
        assert doc, "a walk that favours closing bytes ran on"
        validator.validate(json.loads(doc))


def test_escapes_and_raw_characters_count_as_one_character_each():
    g = JsonSchemaGrammar({"type": "string", "maxLength": 2})
    assert _accepts(g, b'"\\n\\""') and _accepts(g, '"😀é"'.encode())
    assert not _accepts(g, b'"\\u0041"')  # \uXXXX is not taken inside a constrained string
    assert not _accepts(g, b'"\\n\\"x"')


def test_what_pydantic_writes_for_constrained_strings_compiles_and_holds():
    pydantic = pytest.importorskip("pydantic")
    from typing import Annotated

    class Event(pydantic.BaseModel):
        code: Annotated[str, pydantic.Field(pattern=r"^[A-Z]{3}-\d{4}$")]
        title: Annotated[str, pydantic.Field(min_length=1, max_length=12)]
        on: date
        at: datetime
        id: uuid.UUID
        page: pydantic.AnyUrl

    schema = Event.model_json_schema()
    g = JsonSchemaGrammar(schema)
    good = Event(code="ABC-1234", title="Launch", on=date(2025, 3, 1),
                 at=datetime(2025, 3, 1, 9, 30, tzinfo=timezone.utc), id=uuid.UUID(int=99),
                 page="https://example.com/launch?day=1")
    assert _accepts(g, good.model_dump_json().encode()), good.model_dump_json()
    rng = random.Random(8)
    for _ in range(8):
        doc = _walk(g, rng, 3000, bias=b"AZ09-")
        assert doc
        Event.model_validate_json(doc)


def test_string_keywords_it_cannot_enforce_are_refused_by_name():
    for schema, words in [({"type": "string", "pattern": "(?<=a)b"}, "lookbehind"),
                          ({"type": "string", "format": "iri"}, "format 'iri' is not enforced"),
                          ({"type": "string", "pattern": "^a{5}$", "maxLength": 3}, "no string"),
                          ({"type": "string", "minLength": 3, "maxLength": 2}, "no string"),
                          ({"type": "string", "pattern": 5}, "pattern must be a string"),
                          ({"type": "string", "format": ["date"]}, "format must be a string"),
                          ({"type": "string", "pattern": "("}, "missing \\)")]:
        with pytest.raises(SchemaError, match=words):
            JsonSchemaGrammar(schema)


def test_the_mask_inside_a_constrained_string_is_the_set_of_tokens_that_continue():
    m = runtime.load(SHIPPED, n_threads=1, n_ctx=64)
    vocab = J.vocabulary(m.tokenizer)
    g = JsonSchemaGrammar({"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                                            "w": {"type": "string", "pattern": "^[a-z ]+$",
                                                                  "maxLength": 6}},
                           "required": ["d", "w"], "additionalProperties": False})
    for prefix in [b'{"d": "', b'{"d": "2024-0', b'{"d": "2024-02-2', b'{"d": "2024-02-29", "w": "ab',
                   b'{"d": "2024-02-29", "w": "abc de']:
        s = g.start()
        for c in prefix:
            s = g.step(s, c)
        want = []
        for t in range(len(vocab.pieces)):
            ok = False
            if not vocab.silent[t]:
                x = s
                for c in vocab.pieces[t]:
                    x = g.step(x, c)
                    if x is None:
                        break
                ok = x is not None
            want.append(ok or (t in vocab.eog and g.complete(s)))
        assert list(vocab.mask(s, g)) == want, prefix
    m.close()


def test_a_model_that_writes_a_wrong_string_is_steered_to_a_valid_one(tmp_path):
    schema = {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                               "tag": {"type": "string", "pattern": "^[a-z]{2,4}$"}},
              "required": ["when", "tag"], "additionalProperties": False}
    path = write_scripted_model(SHIPPED, tmp_path / "wrong.gguf", '{"when": "tomorrow", "tag": "Urgent!"}')
    m = runtime.load(path, n_threads=1, n_ctx=512)
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    try:
        for temperature in (0, 0.8):
            r = m.create_chat_completion([{"role": "user", "content": "When?"}], max_tokens=60,
                                         temperature=temperature, seed=3, response_format=fmt)
            text = r["choices"][0]["message"]["content"]
            if r["choices"][0]["finish_reason"] == "stop":
                jsonschema.Draft202012Validator(schema, format_checker=CHECKER).validate(json.loads(text))
            else:
                g = JsonSchemaGrammar(schema)
                s = g.start()
                for c in text.encode():
                    s = g.step(s, c)
                    assert s is not None, text
    finally:
        m.close()


def test_formats_that_only_name_a_use_are_plain_strings():
    """pydantic's SecretStr, bytes and Path write formats no validator checks: any string has them."""
    for fmt in ("password", "binary", "path"):
        g = JsonSchemaGrammar({"type": "string", "format": fmt, "maxLength": 4})
        assert _accepts(g, b'"a b"') and not _accepts(g, b'"abcde"')


def test_uris_that_pydantic_refuses_are_not_written():
    """RFC 3986 URIs that pydantic's AnyUrl refuses (a punycode label that does not decode, a port
    in a file URL): the format leaves them out, and keeps their neighbours."""
    pydantic = pytest.importorskip("pydantic")
    url = pydantic.TypeAdapter(pydantic.AnyUrl)
    g = JsonSchemaGrammar({"type": "string", "format": "uri"})
    for text in ("http://xn--a.com", "HTTP://XN--A.com", "file://a:1", "file://[::1]:2"):
        with pytest.raises(pydantic.ValidationError):
            url.validate_python(text)
        assert not _accepts(g, json.dumps(text).encode()), text
    for text in ("file://a/b", "files://a:2", "fil://a:1", "http://x-n.com:80/"):
        url.validate_python(text)
        assert _accepts(g, json.dumps(text).encode()), text
