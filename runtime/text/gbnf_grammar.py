"""A GBNF grammar (runtime.text.gbnf) as a byte-level recognizer of the kind JSON mode uses
(runtime.text.json_constraint's Vocabulary masks tokens by it): the reply is text the grammar
accepts, and end-of-generation is allowed once the text is complete.

It is llama.cpp's pushdown recognizer. Every element of every alternative has a position in
one flat list; a stack is a tuple of positions, its last the next element to match, always a
character element (`_expand` resolves rule references into one stack per alternative). The
empty stack is a finished text. A state is ("text", stacks, partial): the stacks followed at
once (a grammar may be ambiguous), and the bytes of a character still arriving (a byte-level
token may end inside one): (value so far, bytes left, the next byte's range), or None.

Characters are read as UTF-8 by RFC 3629 (no overlong forms, surrogates or bytes past
U+10FFFF). llama.cpp's decoder is laxer with bytes no valid text holds: it lets a token of a
lone byte F5-FF through `.` or a negated class; here no grammar accepts one.

A reply that starts in reasoning (the prompt opened `<think>`) is free text until `</think>`;
the grammar applies to what follows, as JSON mode's does.
"""

from __future__ import annotations

from runtime.text import json_constraint as J
from runtime.text.gbnf import Grammar, GrammarError, parse

MAX_STACKS = 1024  # stacks followed at once: a byte an ambiguous grammar would need more for is not taken
_STEP_CACHE = 1 << 18  # (state, byte) -> next state entries kept


class GbnfGrammar:
    """GBNF text (or a parsed runtime.text.gbnf.Grammar) as start/step/complete/thinking."""

    def __init__(self, grammar: str | Grammar):
        g = grammar if isinstance(grammar, Grammar) else parse(grammar)
        self.text = "" if isinstance(grammar, Grammar) else grammar  # the GBNF as given
        elems: list = []  # Chars, a rule id (int), or None (an alternative's end)
        starts: list[list[int]] = []  # rule -> its alternatives' first positions
        for alts in g.rules:
            starts.append([])
            for alt in alts:
                starts[-1].append(len(elems))
                elems.extend(alt)
                elems.append(None)
        self._elems, self._starts = elems, starts
        self._expanded: dict = {}
        self._steps: dict = {}
        roots = set()
        for a in starts[g.root]:
            roots.update(self._expand((a,) if elems[a] is not None else ()))
        self._start = ("text", frozenset(roots), None)

    # ---------------------------------------------------------------- the recognizer's interface

    def start(self, in_reasoning: bool = False):
        return ("think", b"") if in_reasoning else self._start

    @staticmethod
    def thinking(s) -> bool:
        return s[0] == "think"

    @staticmethod
    def complete(s) -> bool:
        return s[0] == "text" and s[2] is None and () in s[1]

    def step(self, s, c: int):
        key = (s, c)
        hit = self._steps.get(key, False)
        if hit is not False:
            return hit
        if s[0] == "think":
            tail = (s[1] + bytes((c,)))[-len(J.END_THINK):]
            out = self._start if tail == J.END_THINK else ("think", tail)
        else:
            out = self._step(s[1], s[2], c)
        if len(self._steps) >= _STEP_CACHE:
            self._steps.clear()
        self._steps[key] = out
        return out

    # ---------------------------------------------------------------- stacks

    def _expand(self, stack: tuple) -> tuple:
        """The stacks `stack` stands for, each topped by a character element (or empty)."""
        hit = self._expanded.get(stack)
        if hit is not None:
            return hit
        elems, out, seen, todo = self._elems, {}, set(), [stack]
        while todo:
            st = todo.pop()
            if st in seen:
                continue
            seen.add(st)
            if not st:
                out[st] = None
                continue
            pos = st[-1]
            e = elems[pos]
            if type(e) is not int:
                out[st] = None
                continue
            rest = st[:-1] + ((pos + 1,) if elems[pos + 1] is not None else ())  # (a rule that ends here: no frame)
            for a in self._starts[e]:
                todo.append(rest + (a,) if elems[a] is not None else rest)
        result = tuple(out)
        if len(self._expanded) >= _STEP_CACHE:
            self._expanded.clear()
        self._expanded[stack] = result
        return result

    def _accept(self, stacks: frozenset, cp: int):
        elems, out = self._elems, {}
        for st in stacks:
            if st and elems[st[-1]].matches(cp):
                pos = st[-1] + 1
                out.update(dict.fromkeys(self._expand(st[:-1] + ((pos,) if elems[pos] is not None else ()))))
        if not out:
            return None
        if len(out) > MAX_STACKS:  # a byte that would need more readings is not taken (a mask tries
            return None            # every token's bytes: one of many blanks must not fail the request)
        return ("text", frozenset(out), None)

    def _may_take(self, stacks: frozenset, lo: int, hi: int) -> bool:
        elems = self._elems
        return any(st and elems[st[-1]].may_match(lo, hi) for st in stacks)

    def _step(self, stacks: frozenset, partial, c: int):
        if partial is None:
            if c < 0x80:
                return self._accept(stacks, c) if c else None  # (NUL: never, as llama.cpp, which reads C strings)
            lead = J._UTF8_LEADS.get(c)
            if lead is None:
                return None  # a continuation byte, or a lead no valid UTF-8 has
            n, lo2, hi2 = lead
            value = c & (0x3F >> n)
        else:
            value, n, (lo2, hi2) = partial
            if not lo2 <= c <= hi2:
                return None
            value, n = (value << 6) | (c & 0x3F), n - 1
            if n == 0:
                return self._accept(stacks, value)
            lo2, hi2 = 0x80, 0xBF
        shift = 6 * (n - 1)  # the code points this character can still be
        lo = (value << (6 * n)) | ((lo2 & 0x3F) << shift)
        hi = (value << (6 * n)) | ((hi2 & 0x3F) << shift) | ((1 << shift) - 1)
        if not self._may_take(stacks, lo, hi):
            return None
        return ("text", stacks, (value, n, (lo2, hi2)))


def grammar_text(grammar) -> str:
    """GBNF text from what callers pass as a grammar: the text itself, or llama-cpp-python's
    LlamaGrammar (which keeps its text as `_grammar`)."""
    if isinstance(grammar, str):
        return grammar
    text = getattr(grammar, "_grammar", None)
    if isinstance(text, str):
        return text
    raise GrammarError(f"a grammar is GBNF text or a LlamaGrammar, got {type(grammar).__name__}")


class LlamaGrammar:
    """llama-cpp-python's LlamaGrammar: `Model.create_completion(prompt, grammar=LlamaGrammar.from_string(g))`.
    The text is checked when the grammar is made, as llama-cpp-python's parser did."""

    def __init__(self, *, _grammar: str):
        self._grammar = _grammar
        self.grammar = GbnfGrammar(_grammar)

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        return cls(_grammar=grammar)

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> "LlamaGrammar":
        """A JSON Schema (as JSON text, as llama-cpp-python takes it): the reply is a value it accepts,
        by the structured-output recognizer (runtime.text.json_schema), not a GBNF translation."""
        import json

        from runtime.text.json_schema import JsonSchemaGrammar

        try:
            schema = json.loads(json_schema)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the JSON Schema is not JSON text ({e})") from None
        out = cls.__new__(cls)
        out._grammar, out.grammar = json_schema, JsonSchemaGrammar(schema)
        return out

    @classmethod
    def from_file(cls, file, verbose: bool = True) -> "LlamaGrammar":
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GrammarError(f"{file}: cannot read the grammar ({e})") from None
        try:
            return cls(_grammar=text)
        except GrammarError as e:
            raise GrammarError(f"{file}: {e}") from None


def compile_grammar(grammar) -> GbnfGrammar:
    """A GbnfGrammar from GBNF text, a LlamaGrammar (ours or llama-cpp-python's) or a GbnfGrammar."""
    if isinstance(grammar, GbnfGrammar):
        return grammar
    if isinstance(grammar, LlamaGrammar):
        return grammar.grammar
    return GbnfGrammar(grammar_text(grammar))
