"""GBNF, llama.cpp's grammar format (`--grammar`, the server's `grammar` field, llama-cpp-python's
`LlamaGrammar`), parsed into rules of alternatives.

    root  ::= (expr "=" ws term "\\n")+      # rules: a name, ::=, alternatives separated by |
    expr  ::= term ([-+*/] term)*           # literals, [classes], [^negated], ., (groups)
    num   ::= [0-9]{1,8} ws                 # repetitions: * + ? {m} {m,} {m,n}
    ws    ::= [ \\t\\n]*

A rule is a list of alternatives; an alternative a tuple of elements: a `Chars` (a set of
code points) or an int (another rule). Groups and repetitions become rules of their own, as
llama.cpp rewrites them: `x*` is `R ::= x R | ()`, `x{2,4}` is `x x R2` with `R2 ::= x R1 | ()`
and `R1 ::= x | ()`. A rule ends at the end of its line; inside parentheses lines go on.

Where llama.cpp reads a grammar, so do we, its corners included: `[]` and `[^]` add no
element (they match the empty text, and nothing may repeat them), a `\\U` escape past U+10FFFF
matches no character, and a repetition whose body may match nothing (`("a"?)*`) is followed.
Where it would quietly do something else, the grammar is refused in one line naming the place
(`GrammarError`): a rule defined twice (llama.cpp keeps the last), a count over MAX_REPEAT
(llama.cpp makes an upper bound unbounded), a NUL (llama.cpp stops reading there), token
elements `<...>` (their ids depend on the model; not supported here), and groups nested past
MAX_NESTING (llama.cpp takes them). Left recursion that would grow the stack without end
(`expr ::= expr "+" term`) is refused, as llama.cpp refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.base.errors import StepstreamError

MAX_REPEAT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
MAX_NESTING = 100  # groups within groups (the parser recurses on each)
MAX_ELEMENTS = 200_000  # a grammar whose repetitions expand past this is refused (nested counts multiply)
MAX_CODE_POINT = 0x10FFFF
_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class GrammarError(StepstreamError):
    """A grammar that cannot be used, named by its line and column."""


@dataclass(frozen=True)
class Chars:
    """One code point from `ranges` (inclusive (lo, hi) pairs), or, `negated`, one outside them."""

    ranges: tuple
    negated: bool = False

    def matches(self, cp: int) -> bool:
        return any(lo <= cp <= hi for lo, hi in self.ranges) != self.negated

    def may_match(self, lo: int, hi: int) -> bool:
        """Whether some code point in [lo, hi] matches (for a character still arriving byte by byte)."""
        if not self.negated:
            return any(a <= hi and lo <= b for a, b in self.ranges)
        for a, b in sorted(self.ranges):  # is [lo, hi] wholly covered by the excluded ranges?
            if a > lo:
                return True
            lo = max(lo, b + 1)
            if lo > hi:
                return False
        return True


ANY = Chars(((0, MAX_CODE_POINT),))


@dataclass(frozen=True)
class Grammar:
    """rules[i]: rule i's alternatives, each a tuple of Chars and rule ids; names[i] its name
    (a group's or repetition's: its rule's name, then _ and a number); root: the start rule."""

    rules: tuple
    names: tuple
    root: int


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0
        self.ids: dict[str, int] = {}
        self.rules: list = []  # id -> alternatives (None: used, not yet defined)
        self.names: list[str] = []
        self.defined_at: dict[int, int] = {}  # rule id -> the offset of its definition
        self.used_at: dict[int, int] = {}  # rule id -> the offset of its first use
        self.parent: dict[int, int] = {}  # a group's or repetition's rule -> the rule it was written in
        self.size = 0
        self.depth = 0  # groups open

    # ---------------------------------------------------------------- errors and positions

    def fail(self, message: str, at: int | None = None):
        at = self.pos if at is None else at
        line = self.text.count("\n", 0, at) + 1
        col = at - (self.text.rfind("\n", 0, at) + 1) + 1
        raise GrammarError(f"line {line}, column {col}: {message}")

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.text[i] if i < len(self.text) else ""

    def skip(self, newlines: bool) -> None:
        """Blanks and # comments, and line ends too where `newlines` (inside parentheses, after ::= or |)."""
        text, i = self.text, self.pos
        while i < len(text):
            c = text[i]
            if c == "#":
                while i < len(text) and text[i] not in "\r\n":
                    i += 1
            elif c in " \t" or (newlines and c in "\r\n"):
                i += 1
            else:
                break
        self.pos = i

    # ---------------------------------------------------------------- rules

    def rule_id(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.rules)
            self.rules.append(None)
            self.names.append(name)
        return self.ids[name]

    def new_rule(self, owner: int, alternatives) -> int:
        i = len(self.rules)
        self.rules.append(alternatives)
        self.names.append(f"{self.names[owner]}_{i}")
        self.parent[i] = owner
        return i

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isascii() and (self.text[self.pos].isalnum()
                                                                               or self.text[self.pos] == "-")):
            self.pos += 1
        if self.pos == start:
            self.fail(f"expecting a rule name, found {self.peek()!r}" if self.peek() else "expecting a rule name")
        return self.text[start:self.pos]

    def parse(self) -> Grammar:
        self.skip(True)
        while self.pos < len(self.text):
            start = self.pos
            name = self.name()
            rid = self.rule_id(name)
            if rid in self.defined_at:
                self.fail(f"rule '{name}' is defined twice (first on line "
                          f"{self.text.count(chr(10), 0, self.defined_at[rid]) + 1})", start)
            self.defined_at[rid] = start
            self.skip(False)
            if not self.text.startswith("::=", self.pos):
                self.fail(f"expecting ::= after the rule name '{name}'")
            self.pos += 3
            self.skip(True)
            self.rules[rid] = self.alternatives(rid, nested=False)
            if self.peek() == "\r":
                self.pos += 2 if self.peek(1) == "\n" else 1
            elif self.peek() == "\n":
                self.pos += 1
            elif self.peek():
                self.fail(f"unexpected {self.peek()!r} (expecting the end of the rule)")
            self.skip(True)
        if not self.defined_at:
            raise GrammarError("the grammar has no rules (only blanks and comments)")
        for rid, alts in enumerate(self.rules):
            if alts is None:
                self.fail(f"rule '{self.names[rid]}' is used but never defined", self.used_at[rid])
        if "root" not in self.ids:
            raise GrammarError("the grammar has no rule named 'root' (where it starts)")
        grammar = Grammar(tuple(self.rules), tuple(self.names), self.ids["root"])
        _refuse_left_recursion(grammar, self.parent)
        return grammar

    def alternatives(self, rid: int, nested: bool) -> list:
        alts = [self.sequence(rid, nested)]
        while self.peek() == "|":
            self.pos += 1
            self.skip(True)
            alts.append(self.sequence(rid, nested))
        return alts

    def sequence(self, rid: int, nested: bool) -> tuple:
        items: list[tuple] = []  # one tuple of elements per written item (a literal is one item)
        while self.pos < len(self.text):
            c, start = self.peek(), self.pos
            if c == '"':
                self.pos += 1
                chars = []
                while self.peek() != '"':
                    if not self.peek():
                        self.fail("a literal is not closed (missing \")", start)
                    cp = self.char()
                    chars.append(Chars(((cp, cp),)))
                self.pos += 1
                items.append(tuple(chars))
            elif c == "[":
                chars = self.char_class()
                items.append((chars,) if chars.ranges else ())  # [] and [^] match nothing: no element, as llama.cpp
            elif c == ".":
                self.pos += 1
                items.append((ANY,))
            elif c == "(":
                self.depth += 1
                if self.depth > MAX_NESTING:
                    self.fail(f"groups nest more than {MAX_NESTING} deep")
                self.pos += 1
                self.skip(True)
                group = self.new_rule(rid, None)
                self.rules[group] = self.alternatives(group, nested=True)
                self.depth -= 1
                if self.peek() != ")":
                    self.fail("a group is not closed (expecting ')')", start)
                self.pos += 1
                items.append((group,))
            elif c in "<!":
                self.fail("token elements (<...>, !<...>) are not supported: write the token's text as a literal")
            elif c.isascii() and (c.isalnum() or c == "-"):
                ref = self.rule_id(self.name())
                self.used_at.setdefault(ref, start)
                items.append((ref,))
            elif c in "*+?{":
                if not items or not items[-1]:
                    self.fail(f"{c!r} has nothing before it to repeat")
                lo, hi = self.counts(nested)
                items[-1] = self.repeat(rid, items[-1], lo, hi)
            else:
                break
            self.skip(nested)
        out = tuple(e for item in items for e in item)
        self.size += len(out) + 1
        if self.size > MAX_ELEMENTS:
            self._too_big()
        return out

    def _too_big(self):
        self.fail(f"the grammar expands to more than {MAX_ELEMENTS:,} elements (nested repetitions multiply)")

    def counts(self, nested: bool) -> tuple[int, int | None]:
        c = self.text[self.pos]
        self.pos += 1
        if c != "{":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        self.skip(nested)
        lo = self.integer()
        hi = lo
        self.skip(nested)
        if self.peek() == ",":
            self.pos += 1
            self.skip(nested)
            hi = self.integer() if self.peek().isdigit() else None
            self.skip(nested)
        if self.peek() != "}":
            self.fail("expecting '}' to close the repetition count")
        self.pos += 1
        if hi is not None and hi < lo:
            self.fail(f"the repetition {{{lo},{hi}}} has its largest count below its smallest")
        return lo, hi

    def integer(self) -> int:
        start = self.pos
        while self.peek().isascii() and self.peek().isdigit():
            self.pos += 1
        if self.pos == start:
            self.fail("expecting a number in the repetition count")
        n = int(self.text[start:self.pos])
        if n > MAX_REPEAT:
            self.fail(f"a repetition count of {n} is over the limit of {MAX_REPEAT}", start)
        return n

    def repeat(self, rid: int, item: tuple, lo: int, hi: int | None) -> tuple:
        """item{lo,hi} as llama.cpp rewrites it: lo copies, then optional ones nested in new rules."""
        if self.size + len(item) * (lo + (hi or lo) + 1) > MAX_ELEMENTS:
            self._too_big()
        out = item * lo
        if hi is None:
            loop = self.new_rule(rid, None)
            self.rules[loop] = [item + (loop,), ()]
            return out + (loop,)
        tail = None
        for _ in range(hi - lo):
            tail = self.new_rule(rid, [item + ((tail,) if tail is not None else ()), ()])
        return out + ((tail,) if tail is not None else ())

    # ---------------------------------------------------------------- characters

    def char(self) -> int:
        c = self.peek()
        if c != "\\":
            self.pos += 1
            return ord(c)
        e = self.peek(1)
        if e in _ESCAPES:
            self.pos += 2
            return ord(_ESCAPES[e])
        if e in _HEX_ESCAPES:
            n = _HEX_ESCAPES[e]
            digits = self.text[self.pos + 2:self.pos + 2 + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{e} takes {n} hex digits")
            self.pos += 2 + n
            return int(digits, 16)  # (past U+10FFFF it matches no character, as in llama.cpp)
        self.fail(f"unknown escape \\{e}" if e else "the grammar ends inside an escape")

    def char_class(self) -> Chars:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.peek() != "]":
            if not self.peek():
                self.fail("a character class is not closed (missing ])", start)
            lo = self.char()
            hi = lo
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                hi = self.char()
            ranges.append((lo, hi))  # (a reversed range matches nothing, as in llama.cpp)
        self.pos += 1
        return Chars(tuple(ranges), negated)


def _nullable(grammar: Grammar) -> list[bool]:
    """Which rules can match the empty text (a fixpoint)."""
    null = [False] * len(grammar.rules)
    changed = True
    while changed:
        changed = False
        for rid, alts in enumerate(grammar.rules):
            if not null[rid] and any(all(type(e) is int and null[e] for e in alt) for alt in alts):
                null[rid] = changed = True
    return null


def _components(edges: list[list[int]]) -> list[int]:
    """Each node's strongly connected component (Kosaraju's, without recursion)."""
    n, order, seen = len(edges), [], [False] * len(edges)
    for top in range(n):
        if seen[top]:
            continue
        seen[top] = True
        todo = [(top, iter(edges[top]))]
        while todo:
            node, it = todo[-1]
            nxt = next(it, None)
            if nxt is None:
                order.append(node)
                todo.pop()
            elif not seen[nxt]:
                seen[nxt] = True
                todo.append((nxt, iter(edges[nxt])))
    back = [[] for _ in range(n)]
    for u, vs in enumerate(edges):
        for v in vs:
            back[v].append(u)
    comp = [-1] * n
    for top in reversed(order):
        if comp[top] >= 0:
            continue
        comp[top], todo = top, [top]
        while todo:
            for v in back[todo.pop()]:
                if comp[v] < 0:
                    comp[v] = top
                    todo.append(v)
    return comp


def _refuse_left_recursion(grammar: Grammar, parent: dict[int, int]) -> None:
    """A rule that can begin with itself (through rules that may match nothing first) where the
    way back leaves something to match after it (`expr ::= expr "+" term`) would grow its stack
    without end: refused, as llama.cpp refuses it, naming the rules as written. A way back that
    ends its alternatives (`R ::= G R | ()` with G empty: `("a"?)*`) leaves nothing behind, and
    the recognizer follows it as llama.cpp does."""
    null = _nullable(grammar)
    first: list[list[int]] = []  # rule -> the rules that can begin it
    growing = []  # (rule, a rule that can begin it with something left after it)
    for rid, alts in enumerate(grammar.rules):
        refs = set()
        for alt in alts:
            for k, e in enumerate(alt):
                if type(e) is not int:
                    break
                refs.add(e)
                if k < len(alt) - 1:
                    growing.append((rid, e))
                if not null[e]:
                    break
        first.append(sorted(refs))
    comp = _components(first)
    for u, v in growing:
        if comp[u] != comp[v]:
            continue
        way = {v: None}  # the way back from v to u, for the message
        todo = [v]
        while u not in way:
            node = todo.pop(0)
            for w in first[node]:
                if w not in way and comp[w] == comp[u]:
                    way[w] = node
                    todo.append(w)
        cycle, node = [], u
        while node is not None:
            cycle.append(node)
            node = way[node]
        cycle = [u] + cycle[::-1]  # u -> v -> ... -> u
        written = []  # the cycle by the names written in the grammar
        for r in cycle[:-1]:
            while r in parent:
                r = parent[r]
            if not written or written[-1] != grammar.names[r]:
                written.append(grammar.names[r])
        if len(written) > 1 and written[-1] == written[0]:
            written.pop()
        raise GrammarError(f"left recursion: a rule can begin with itself ({' -> '.join(written + written[:1])}); "
                           f"rewrite it with a repetition, e.g. expr ::= term (\"+\" term)*")


def parse(text: str) -> Grammar:
    """The grammar GBNF `text` describes (GrammarError, with its line and column, if it cannot be used)."""
    if not isinstance(text, str):
        raise GrammarError(f"a grammar is GBNF text, got {type(text).__name__}")
    parser = _Parser(text)
    if "\x00" in text:  # llama.cpp reads a C string: it would stop there, silently
        parser.fail("the grammar holds a NUL character", text.index("\x00"))
    return parser.parse()
