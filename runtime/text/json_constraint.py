"""JSON mode (OpenAI's `response_format: {"type": "json_object"}`): the reply is one JSON object.

A byte-level recognizer of JSON text (RFC 8259) runs beside the sampler. A token is allowed when
its bytes continue what was generated into a prefix of some JSON object; end-of-generation is
allowed only once the object is closed. The sampler draws as usual and keeps the token when it
is allowed; otherwise the tokens that cannot continue are masked and it draws again, which is
llama.cpp's way with a grammar (its sampler's fast path, then the grammar applied to all logits).

    state = TOP ... feed bytes ... DONE

A state is a small tuple (hashable), so the mask of allowed tokens is cached per state: it is
found by walking a byte trie of the vocabulary, pruning every subtree whose prefix no JSON can
continue (`candidates`). Outside strings at most MAX_WS whitespace bytes may follow one another,
and none the closing brace, as llama.cpp's JSON grammar bounds them, so a model stuck on blanks
cannot run forever.

A reply that starts in reasoning (the prompt opened `<think>`) is free text until `</think>`;
the JSON comes after it, as the reply parser reads the content after it.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict

import numpy as np

MAX_WS = 24  # consecutive whitespace bytes outside strings (llama.cpp's JSON grammar: a newline and 20 blanks)
MAX_LEADING_WS = 2  # before the object: the blank line a template's layout puts after </think>
MAX_DEPTH = 128  # nested objects and arrays
END_THINK = b"</think>"

# modes
TOP, VALUE, VALUE_OR_END, KEY_OR_END, KEY, COLON, AFTER, STRING, NUMBER, LITERAL, DONE, THINK = range(12)

_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
_ESCAPES = frozenset(b'"\\/bfnrt')
# a UTF-8 lead byte -> (continuation bytes, the range of the first one): RFC 3629's table, no
# overlong forms, no surrogates, nothing past U+10FFFF
_UTF8_LEADS = {**{c: (1, 0x80, 0xBF) for c in range(0xC2, 0xE0)}, 0xE0: (2, 0xA0, 0xBF),
               **{c: (2, 0x80, 0xBF) for c in range(0xE1, 0xED)}, 0xED: (2, 0x80, 0x9F),
               0xEE: (2, 0x80, 0xBF), 0xEF: (2, 0x80, 0xBF), 0xF0: (3, 0x90, 0xBF),
               0xF1: (3, 0x80, 0xBF), 0xF2: (3, 0x80, 0xBF), 0xF3: (3, 0x80, 0xBF), 0xF4: (3, 0x80, 0x8F)}
# number sub-states: the bytes that continue each one
_SIGN, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS = range(8)
_NUMBER_ENDS = frozenset((_ZERO, _INT, _FRAC, _EXP_DIGITS))  # a number may stop here


def _number_step(sub: int, c: int) -> int | None:
    digit = c in _DIGITS
    if sub == _SIGN:
        return _ZERO if c == 0x30 else _INT if digit else None
    if sub in (_ZERO, _INT, _FRAC):
        if digit and sub != _ZERO:
            return sub
        if c == 0x2E and sub != _FRAC:  # .
            return _DOT
        return _EXP if c in (0x65, 0x45) else None  # e E
    if sub == _DOT:
        return _FRAC if digit else None
    if sub == _EXP:
        return _EXP_SIGN if c in (0x2B, 0x2D) else _EXP_DIGITS if digit else None
    return _EXP_DIGITS if digit else None  # _EXP_SIGN, _EXP_DIGITS


def start(in_reasoning: bool = False) -> tuple:
    """The state before the reply's first byte."""
    return (THINK, "", b"", 0) if in_reasoning else (TOP, "", None, 0)


def _after_value(stack: str) -> tuple:
    return (AFTER, stack, None, 0) if stack else (DONE, "", None, 0)


def _value(stack: str, c: int) -> tuple | None:
    if c == 0x7B or c == 0x5B:  # { [
        if len(stack) >= MAX_DEPTH:
            return None
        return (KEY_OR_END, stack + "{", None, 0) if c == 0x7B else (VALUE_OR_END, stack + "[", None, 0)
    if c == 0x22:
        return (STRING, stack, (False, 0, 0, 0, 0, 0), 0)
    if c == 0x2D:
        return (NUMBER, stack, _SIGN, 0)
    if c in _DIGITS:
        return (NUMBER, stack, _ZERO if c == 0x30 else _INT, 0)
    rest = {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}.get(c)  # t f n
    return (LITERAL, stack, rest, 0) if rest else None


def step(s: tuple, c: int) -> tuple | None:
    """The state after byte `c`, or None when no JSON object's text goes on so."""
    mode, stack, aux, ws = s
    if mode == STRING:
        # aux: (is_key, in an escape, \u hex digits left, UTF-8 continuation bytes left, the
        # range of the next one: narrower after E0, ED, F0, F4, so only well-formed UTF-8 passes)
        is_key, esc, hex_left, cont, lo, hi = aux
        if cont:
            return (STRING, stack, (is_key, 0, 0, cont - 1, 0x80, 0xBF), 0) if lo <= c <= hi else None
        if hex_left:
            return (STRING, stack, (is_key, 0, hex_left - 1, 0, 0, 0), 0) if c in _HEX else None
        if esc:
            if c in _ESCAPES:
                return (STRING, stack, (is_key, 0, 0, 0, 0, 0), 0)
            return (STRING, stack, (is_key, 0, 4, 0, 0, 0), 0) if c == 0x75 else None  # \u
        if c == 0x22:
            return (COLON, stack, None, 0) if is_key else _after_value(stack)
        if c == 0x5C:
            return (STRING, stack, (is_key, 1, 0, 0, 0, 0), 0)
        if c < 0x20:
            return None  # a control character must be escaped
        if c < 0x80:
            return s
        lead = _UTF8_LEADS.get(c)
        return (STRING, stack, (is_key, 0, 0, *lead), 0) if lead else None
    if mode == NUMBER:
        sub = _number_step(aux, c)
        if sub is not None:
            return (NUMBER, stack, sub, 0)
        return step(_after_value(stack), c) if aux in _NUMBER_ENDS else None
    if mode == LITERAL:
        if c != aux[0]:
            return None
        return (LITERAL, stack, aux[1:], 0) if len(aux) > 1 else _after_value(stack)
    if mode == THINK:
        tail = (aux + bytes((c,)))[-len(END_THINK):]
        return (TOP, "", None, 0) if tail == END_THINK else (THINK, "", tail, 0)
    if c in _WS:  # (none after the object: it ends there, as llama.cpp's grammar ends)
        limit = MAX_LEADING_WS if mode == TOP else 0 if mode == DONE else MAX_WS
        return (mode, stack, aux, ws + 1) if ws < limit else None
    if mode == TOP:
        return (KEY_OR_END, "{", None, 0) if c == 0x7B else None
    if mode == VALUE_OR_END and c == 0x5D:  # ]
        return _after_value(stack[:-1])
    if mode in (VALUE, VALUE_OR_END):
        return _value(stack, c)
    if mode in (KEY_OR_END, KEY):
        if c == 0x22:
            return (STRING, stack, (True, 0, 0, 0, 0, 0), 0)
        return _after_value(stack[:-1]) if mode == KEY_OR_END and c == 0x7D else None  # }
    if mode == COLON:
        return (VALUE, stack, None, 0) if c == 0x3A else None
    if mode == AFTER:
        top = stack[-1]
        if c == 0x2C:  # ,
            return (KEY, stack, None, 0) if top == "{" else (VALUE, stack, None, 0)
        if (c == 0x7D and top == "{") or (c == 0x5D and top == "["):
            return _after_value(stack[:-1])
        return None
    return None  # DONE: the object is whole; only the end of generation may follow


def feed(s: tuple | None, data: bytes) -> tuple | None:
    """The state after `data`, or None."""
    for c in data:
        if s is None:
            return None
        s = step(s, c)
    return s


def complete(s: tuple) -> bool:
    """Whether the text so far is a whole JSON object (whitespace may follow)."""
    return s[0] == DONE


class Vocabulary:
    """What the recognizer needs of a tokenizer: each token's bytes as the reply shows them, the
    tokens that end generation, those that print nothing (control tokens), and a byte trie."""

    def __init__(self, pieces: list[bytes], eog: frozenset[int], silent: np.ndarray):
        self.pieces, self.eog = pieces, eog
        self.silent = silent  # bool [V]: prints nothing (a control token), EOG or not
        self._masks: OrderedDict = OrderedDict()

    @functools.cached_property
    def trie(self) -> dict:
        """byte -> (children, [token ids ending here]); built at the first mask (a second on the
        real vocabulary), which a reply whose drawn tokens are all allowed never needs."""
        trie: dict = {}
        for tok, piece in enumerate(self.pieces):
            if self.silent[tok] or not piece:
                continue
            node = None
            children = trie
            for c in piece:
                node = children.get(c)
                if node is None:
                    node = children[c] = ({}, [])
                children = node[0]
            node[1].append(tok)
        return trie

    def mask(self, s, grammar=None) -> np.ndarray:
        """bool [V]: the tokens whose bytes continue state `s` of `grammar` (JSON_OBJECT unless
        given), and EOG once it is complete (cached per grammar and state; while reasoning, every
        token that prints, a superset: the sampler checks the one it draws)."""
        grammar = grammar or JSON_OBJECT
        key = (grammar, s)
        hit = self._masks.get(key)
        if hit is not None:
            self._masks.move_to_end(key)
            return hit
        out = np.zeros(len(self.pieces), bool)
        if grammar.thinking(s):
            out[:] = ~self.silent
        else:
            step_ = grammar.step
            todo = [(self.trie, s)]
            while todo:
                children, state = todo.pop()
                for c, (grand, ids) in children.items():
                    nxt = step_(state, c)
                    if nxt is None:
                        continue
                    if ids:
                        out[ids] = True
                    if grand:
                        todo.append((grand, nxt))
        if grammar.complete(s):
            out[list(self.eog)] = True
        self._masks[key] = out
        if len(self._masks) > 64:
            self._masks.popitem(last=False)
        return out


class JsonObject:
    """This module's recognizer as a grammar (start, step, complete, thinking): any JSON object."""

    @staticmethod
    def start(in_reasoning: bool = False) -> tuple:
        return start(in_reasoning)

    step = staticmethod(step)
    complete = staticmethod(complete)

    @staticmethod
    def thinking(s: tuple) -> bool:
        return s[0] == THINK


JSON_OBJECT = JsonObject()


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocabulary(tokenizer) -> Vocabulary:
    """The tokenizer's Vocabulary, built once (its trie, a second on a 128K vocabulary, at its
    first mask)."""
    v = _VOCABS.get(tokenizer)
    if v is None:
        n = len(tokenizer.tokens)
        pieces = [tokenizer.token_bytes(t) for t in range(n)]
        silent = np.array([not p for p in pieces], bool)
        v = _VOCABS[tokenizer] = Vocabulary(pieces, tokenizer.eog_ids, silent)
    return v


class JsonObjectReply:
    """A grammar's recognizer over one reply's tokens, as the sampler asks it: `allows(token)`
    for the token it drew, `candidates()` when that was refused, `take(token)` for the one it
    kept. The grammar is JSON_OBJECT (JSON mode) or a compiled JSON Schema
    (runtime.text.json_schema)."""

    def __init__(self, vocab: Vocabulary, in_reasoning: bool = False, grammar=None):
        self.vocab, self.grammar = vocab, grammar or JSON_OBJECT
        self.state = self.grammar.start(in_reasoning)

    def _feed(self, data: bytes):
        s, step_ = self.state, self.grammar.step
        for c in data:
            s = step_(s, c)
            if s is None:
                return None
        return s

    def allows(self, tok: int) -> bool:
        if tok in self.vocab.eog:
            return self.grammar.complete(self.state)
        if self.vocab.silent[tok]:
            return False
        return self._feed(self.vocab.pieces[tok]) is not None

    def candidates(self) -> np.ndarray:
        return self.vocab.mask(self.state, self.grammar)

    def take(self, tok: int) -> None:
        if tok not in self.vocab.eog:
            self.state = self._feed(self.vocab.pieces[tok])

    @property
    def complete(self) -> bool:
        return self.grammar.complete(self.state)
