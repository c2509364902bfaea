"""llama-server's own request fields beside OpenAI's: its forms of `logit_bias` (texts, `false`),
`json_schema`, `grammar` (GBNF) and its other samplers' settings, read for /v1/completions,
chat, the Responses API and its native /completion alike."""

from __future__ import annotations

import json
import math
import re

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.server.body_fields import ApiError, _get, _range
from runtime.text.gbnf_grammar import GbnfGrammar
from runtime.text.json_schema import JsonSchemaGrammar


BANNED = -float(np.finfo(np.float32).max)  # llama-server's `false` bias (-inf there): the token is never drawn
_ID = re.compile(r"\s*([+-]?[0-9]+)")  # a key llama.cpp's strtol reads whole as a token id


def add_bias(a: float, b: float) -> float:
    """Two biases one token gets, added as llama.cpp adds them; a ban stays a ban, and the sum
    stays within float32 (a sum at its lowest bans)."""
    if a <= BANNED or b <= BANNED:
        return BANNED
    return max(BANNED, min(-BANNED, a + b))


def _logit_bias(body: dict) -> tuple[tuple, tuple]:
    """OpenAI's `logit_bias` ({"token id": bias}, biases -100..100), or llama-server's forms: a
    list of [token id or text, bias] pairs (any bias; a token named twice gets both, added), text
    keys, and `false` for a bias (the token banned). Returns SamplingParams' (id, bias) pairs
    and the (text, bias) pairs whose tokens the model gives (app.model_request, where the ids
    are also checked against the vocabulary)."""
    bias = body.get("logit_bias")
    if bias is None:
        return (), ()
    if isinstance(bias, list):  # llama-server's [[id or text, bias], ...]
        if not all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], (int, str)) and not isinstance(x[0], bool)
                   for x in bias):
            raise ApiError(400, "'logit_bias' as a list must hold [token id or text, bias] pairs", param="logit_bias",
                           code="invalid_value")
        items = [(k, v, None) if isinstance(k, int) else (None, v, k) for k, v in bias]
        bound = None
    elif isinstance(bias, dict):  # keys are ids as llama.cpp's strtol reads them whole, else texts
        items = []
        for k, v in bias.items():
            m = _ID.fullmatch(k)
            items.append((int(m.group(1)), v, None) if m else (None, v, k))
        bound = 100  # (OpenAI's range)
    else:
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to biases", param="logit_bias",
                       code="invalid_type")
    if len(items) > 1024:  # OpenAI's limit: 300; each costs a step's work
        raise ApiError(400, f"'logit_bias' holds {len(items)} tokens, more than 1024", param="logit_bias",
                       code="invalid_value")
    pairs, texts = {}, []
    for tok, value, text in items:
        what = f"token {tok}" if text is None else json.dumps(text)[:40]
        if value is False:
            value = BANNED
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                bound is not None and not -bound <= value <= bound):
            limits = "a number from -100 to 100" if bound is not None else "a finite number"
            raise ApiError(400, f"'logit_bias' value for {what} must be {limits}, or false to ban it, got "
                                f"{json.dumps(value)[:40]}", param="logit_bias", code="invalid_value")
        if text is not None:  # llama-server's: each of the text's tokens biased
            if not text:
                raise ApiError(400, "'logit_bias' names an empty text", param="logit_bias", code="invalid_value")
            texts.append((text, float(value)))
            continue
        if tok < 0:
            raise ApiError(400, f"'logit_bias' names {tok}, which is not a token id", param="logit_bias",
                           code="invalid_value")
        if tok in pairs and bound is not None:  # OpenAI's object ("5" and "05"): one bias a token
            raise ApiError(400, f"'logit_bias' names token {tok} twice", param="logit_bias", code="invalid_value")
        pairs[tok] = add_bias(pairs.get(tok, 0.0), float(value))
    return tuple(sorted(pairs.items())), tuple(texts)


def llama_json_schema(body: dict):
    """llama-server's `json_schema` field (a JSON Schema the reply must match; {} or absent: none)
    as a compiled grammar, or None."""
    schema = body.get("json_schema")
    if schema is None:
        return None  # ({}: any JSON value, as llama-server reads it)
    if not isinstance(schema, dict):
        raise ApiError(400, "'json_schema' must be a JSON Schema object", param="json_schema", code="invalid_type")
    try:
        return JsonSchemaGrammar(schema)
    except StepstreamError as e:
        raise ApiError(400, f"'json_schema': {e}", param="json_schema", code="unsupported") from None


def llama_grammar(body: dict):
    """llama-server's `grammar` field (GBNF text the reply must match; "" or absent: none) as a
    compiled grammar, or None."""
    text = body.get("grammar")
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ApiError(400, "'grammar' must be GBNF text (a string)", param="grammar", code="invalid_type")
    try:
        return GbnfGrammar(text)
    except StepstreamError as e:
        raise ApiError(400, f"'grammar': {e}", param="grammar", code="invalid_value") from None


def llama_samplers(body: dict) -> dict:
    """llama.cpp's other samplers, off unless a request sets them (llama-server's defaults), as
    SamplingParams' keywords: typical_p, xtc_probability, xtc_threshold, top_n_sigma, mirostat
    (with mirostat_tau and mirostat_eta), dynatemp_range and dynatemp_exponent, and DRY's
    dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n and dry_sequence_breakers."""
    typical_p = _get(body, "typical_p", (int, float), 1.0)
    _range("typical_p", typical_p, 0, 1e9)  # (>= 1: off)
    xtc = {name: _get(body, name, (int, float), off) for name, off in (("xtc_probability", 0.0), ("xtc_threshold", 0.1))}
    for name, value in xtc.items():
        _range(name, value, 0, 1)
    top_n_sigma = _get(body, "top_n_sigma", (int, float), -1.0)
    _range("top_n_sigma", top_n_sigma, -1e9, 1e9)  # (<= 0: off)
    mirostat = _get(body, "mirostat", (int,), 0)
    if mirostat not in (0, 1, 2):
        raise ApiError(400, f"'mirostat' must be 0 (off), 1 or 2, got {mirostat}", param="mirostat",
                       code="invalid_value")
    tau, eta = _get(body, "mirostat_tau", (int, float), 5.0), _get(body, "mirostat_eta", (int, float), 0.1)
    _range("mirostat_tau", tau, 0, 1e4)
    _range("mirostat_eta", eta, 0, 1e4)
    dynatemp = {name: _get(body, name, (int, float), off) for name, off in (("dynatemp_range", 0.0),
                                                                             ("dynatemp_exponent", 1.0))}
    _range("dynatemp_range", dynatemp["dynatemp_range"], 0, 100)
    _range("dynatemp_exponent", dynatemp["dynatemp_exponent"], 0, 100)
    dry_fields = {name: _get(body, name, (int, float), off) for name, off in (("dry_multiplier", 0.0), ("dry_base", 1.75))}
    _range("dry_multiplier", dry_fields["dry_multiplier"], 0, 1e4)
    _range("dry_base", dry_fields["dry_base"], 0, 1e4)
    dry_ints = {name: _get(body, name, (int,), off) for name, off in (("dry_allowed_length", 2), ("dry_penalty_last_n", -1))}
    for name, value in dry_ints.items():
        _range(name, value, -1, 2**31 - 1)
    if dry_fields["dry_base"] < 1:  # llama-server's reading: the default base, DRY still on
        dry_fields["dry_base"] = 1.75
    breakers = _get(body, "dry_sequence_breakers", (list,), None)
    if breakers is not None and (not breakers or not all(isinstance(b, str) and b for b in breakers)
                                 or len(breakers) > 16):
        raise ApiError(400, "'dry_sequence_breakers' must be a non-empty list of at most 16 non-empty strings",
                       param="dry_sequence_breakers", code="invalid_value")
    dry = {**{k: float(v) for k, v in dry_fields.items()}, **dry_ints}
    if breakers is not None:
        dry["dry_sequence_breakers"] = tuple(breakers)
    return dict(typical_p=float(typical_p), top_n_sigma=float(top_n_sigma), mirostat=mirostat, **dry,
                mirostat_tau=float(tau), mirostat_eta=float(eta), **{k: float(v) for k, v in dynatemp.items()},
                **{k: float(v) for k, v in xtc.items()})
