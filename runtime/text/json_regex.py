"""JSON Schema's string keywords for structured output: `pattern`, `format`, `minLength` and
`maxLength`, enforced one code point at a time.

runtime.text.json_schema decodes a string's bytes (UTF-8 and escapes) into code points and asks
a StringRule about each one:

    s = rule.start ... s = rule.step(s, cp, count) ... rule.accepts(s, count)

A pattern is read by Python's own regex parser, so its syntax is exactly `re`'s, and becomes a
position automaton: an NFA without epsilon moves whose every state but the initial one is
entered on one character class. A rule's state is the set of NFA states reached, as an int
bitset (state 0 is the initial one). Successors are found lazily and cached per (state,
interval), the intervals splitting the code points so that each class holds all or none of one.

Sound against `re.search`, the test jsonschema applies: every class is a subset of Python's
(\\d, \\w, \\s keep their ASCII members, a negated class holding one of them keeps ASCII only),
`$` holds only at the very end, and a construct whose meaning an automaton cannot follow
(backreferences, lookaround, \\b, flags, atomic groups) is refused by name.

Lengths are exact: the lengths that finish a match from each NFA state are precomputed (they
are ultimately periodic, so bits up to the period's end say it all), and a step is refused when
no completion fits [min_len, max_len]. A state that `step` returns can always be finished.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.text.json_formats import FORMAT_MAX_LEN, FORMATS

try:
    from re import _parser as _sre  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

MAX_STATES = 4000  # NFA states (one per character a pattern spells out: {1000} repeats count)
_MAX_NODES = 4 * MAX_STATES  # nodes while building, epsilon ones included
_MAX_HORIZON = 20_000  # lengths examined before their period must show
_MAX_PROFILE = 1 << 25  # layers x states examined (bytes) before then
_MAX_EDGES = 200_000  # transitions between NFA states ((a?){1000} has half a million)
_CACHE_LIMIT = 1 << 17  # cached transitions per rule; past it the cache starts again

# The characters a constrained string may hold: \b \t \n \f \r (written as JSON escapes), then
# everything from the space on but the surrogates. Other control characters are never written.
WRITABLE = ((0x08, 0x0A), (0x0C, 0x0D), (0x20, 0xD7FF), (0xE000, 0x10FFFF))


_ASCII = ((0, 0x7F),)
_CATEGORY_ESCAPES = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
                     "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W"}
_REFUSED = {"GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group (?(...)...)",
            "ATOMIC_GROUP": "an atomic group (?>...)",
            "POSSESSIVE_REPEAT": "a possessive quantifier (*+, ++, ?+ or {m,n}+)",
            "AT_BOUNDARY": "a word boundary \\b", "AT_NON_BOUNDARY": "a non-boundary \\B",
            ("ASSERT", 1): "a lookahead (?=...)", ("ASSERT_NOT", 1): "a negative lookahead (?!...)",
            ("ASSERT", -1): "a lookbehind (?<=...)", ("ASSERT_NOT", -1): "a negative lookbehind (?<!...)"}
_FLAG_LETTERS = ((re.IGNORECASE, "i"), (re.LOCALE, "L"), (re.MULTILINE, "m"), (re.DOTALL, "s"),
                 (re.VERBOSE, "x"), (re.ASCII, "a"))


class PatternError(StepstreamError, ValueError):
    """A pattern, format or length window this module cannot enforce, or one no string satisfies."""


# ---------------------------------------------------------------- character classes
#
# A class is a tuple of sorted, disjoint, non-adjacent inclusive (lo, hi) code point ranges.

def _merge(ranges) -> tuple:
    """The ranges as a class: sorted, overlaps and neighbours joined."""
    out: list = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(cls: tuple) -> tuple:
    """Every code point the class lacks."""
    out, nxt = [], 0
    for lo, hi in cls:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    return tuple(out) + (((nxt, 0x10FFFF),) if nxt <= 0x10FFFF else ())


def _intersect(a: tuple, b: tuple) -> tuple:
    """The code points both classes hold."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


_CATEGORY = {name: _merge((c, c) for c in range(128) if re.fullmatch(escape, chr(c)))
             for name, escape in _CATEGORY_ESCAPES.items()}  # each escape's ASCII members, as re has them
_DOT = _complement(((0x0A, 0x0A),))


def _class_of(items: list) -> tuple:
    """A bracketed class (or \\d, \\W, ...) from re's parse: literals and ranges exactly, a category
    by its ASCII members; negated, the complement, within ASCII when a category is involved."""
    negated = bool(items) and items[0][0].name == "NEGATE"
    members, category = [], False
    for op, av in items[negated:]:
        if op.name == "LITERAL":
            members.append((av, av))
        elif op.name == "RANGE":
            members.append(av)
        elif op.name == "CATEGORY" and av.name in _CATEGORY:
            members.extend(_CATEGORY[av.name])
            category = True
        else:
            raise PatternError(f"the class item {op.name} {av} is not supported")
    cls = _merge(members)
    if not negated:
        return cls
    return _intersect(_complement(cls), _ASCII) if category else _complement(cls)


# ---------------------------------------------------------------- the automaton

@dataclass(frozen=True)
class _Automaton:
    """A position automaton: state j > 0 is entered on classes[j] only; 0 is the start."""

    classes: tuple  # classes[j]: the code points that enter state j (classes[0] is empty)
    succ: tuple  # succ[j]: bitset of the states one character after j
    final: int  # bitset of the states where a match may end


def _bits(x: int) -> list[int]:
    """The indices of x's set bits, lowest first."""
    s, out = bin(x)[:1:-1], []
    i = s.find("1")
    while i >= 0:
        out.append(i)
        i = s.find("1", i + 1)
    return out


class _Builder:
    """Thompson's construction over re's parse tree. Nodes are joined by epsilon moves (plain;
    `begin` ones valid at position 0 only, for ^ and \\A; `end` ones at the end only, for $ and
    \\Z) and by character edges, each into a fresh node: edge j is the automaton's state j."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.plain: list[list[int]] = []
        self.begin: list[list[int]] = []
        self.end: list[list[int]] = []
        self.out: list[int] = []  # node -> bitset of the edges leaving it
        self.classes: list[tuple] = [()]
        self.enters: list[int] = [-1]  # edge -> the node it enters

    def node(self) -> int:
        if len(self.out) >= _MAX_NODES:
            raise self.too_large()
        for moves in (self.plain, self.begin, self.end):
            moves.append([])
        self.out.append(0)
        return len(self.out) - 1

    def char(self, src: int, cls: tuple) -> int:
        dst = self.node()
        cls = _intersect(cls, WRITABLE)
        if cls:  # a class no writable character is in leaves dst unreachable
            if len(self.classes) > MAX_STATES:
                raise self.too_large()
            self.out[src] |= 1 << len(self.classes)
            self.classes.append(cls)
            self.enters.append(dst)
        return dst

    def too_large(self) -> PatternError:
        return PatternError(f"pattern {self.pattern!r} needs more than {MAX_STATES} automaton states (repetition "
                            "counts multiply them), more than structured output enforces")

    def refuse(self, what: str) -> PatternError:
        return PatternError(f"pattern {self.pattern!r} uses {what}, which structured output cannot enforce")

    def emit(self, items, src: int) -> int:
        """Edges that spell `items` from node src; the node where they end."""
        for op, av in items:
            src = self.emit_one(op.name, av, src)
        return src

    def emit_one(self, name: str, av, src: int) -> int:
        if name == "LITERAL":
            return self.char(src, ((av, av),))
        if name == "NOT_LITERAL":
            return self.char(src, _complement(((av, av),)))
        if name == "ANY":
            return self.char(src, _DOT)
        if name == "IN":
            return self.char(src, _class_of(av))
        if name == "BRANCH":
            end = self.node()
            for alternative in av[1]:
                self.plain[self.emit(alternative, src)].append(end)
            return end
        if name == "SUBPATTERN":
            _group, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise self.refuse(f"inline flags {_flag_text(add_flags, del_flags)[:-1]}:...)")
            return self.emit(body, src)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):  # lazy or greedy: the same strings match
            return self.repeat(*av, src)
        if name == "AT" and av.name in ("AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"):
            dst = self.node()
            (self.begin if "BEGINNING" in av.name else self.end)[src].append(dst)
            return dst
        what = _REFUSED.get(av.name if name == "AT" else (name, av[0]) if name.startswith("ASSERT") else name)
        raise self.refuse(what or f"the construct {name}")

    def repeat(self, lo: int, hi: int, body, src: int) -> int:
        for _ in range(lo):
            before = len(self.out)
            src = self.emit(body, src)
            if len(self.out) == before:  # the body spells nothing: one copy stands for all
                break
        if hi == _sre.MAXREPEAT:
            head = self.node()
            self.plain[src].append(head)
            tail = self.emit(body, head)
            if tail != head:
                self.plain[tail].append(head)
            return head
        exits = [src]
        for _ in range(hi - lo):
            before = len(self.out)
            src = self.emit(body, src)
            exits.append(src)
            if len(self.out) == before:
                break
        end = self.node()
        for node in exits:
            self.plain[node].append(end)
        return end

    def automaton(self, start: int, final: int) -> _Automaton:
        """The epsilon-free automaton: a state's successors are the edges leaving the nodes its
        epsilon moves reach; it is final when they reach `final`, across $ moves too."""
        n = len(self.out)
        reach = _closure(self.out, self.plain)
        ends = _closure([int(i == final) for i in range(n)], [p + e for p, e in zip(self.plain, self.end)])
        firsts = _walk(start, (self.plain, self.begin), self.out)  # position 0: ^ holds
        empty = _walk(start, (self.plain, self.begin, self.end), [int(i == final) for i in range(n)])
        succ = (firsts,) + tuple(reach[node] for node in self.enters[1:])
        if sum(out.bit_count() for out in succ) > _MAX_EDGES:
            raise PatternError(f"pattern {self.pattern!r} needs more than {_MAX_EDGES} automaton transitions "
                               "(optional parts repeated many times), more than structured output enforces")
        final_bits = int(bool(empty)) | sum(1 << j for j, node in enumerate(self.enters) if j and ends[node])
        return _Automaton(tuple(self.classes), succ, final_bits)


def _closure(init: list[int], moves: list[list[int]]) -> list[int]:
    """For each node, init's value or-ed over the nodes its moves reach (moves may form cycles)."""
    val = list(init)
    changed = True
    while changed:
        changed = False
        for node in range(len(val) - 1, -1, -1):
            v = val[node]
            for m in moves[node]:
                v |= val[m]
            if v != val[node]:
                val[node], changed = v, True
    return val


def _walk(start: int, move_lists: tuple, value: list[int]) -> int:
    """Or of `value` over the nodes that start reaches by the moves of move_lists."""
    seen, todo, acc = {start}, [start], 0
    while todo:
        node = todo.pop()
        acc |= value[node]
        for moves in move_lists:
            for m in moves[node]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
    return acc


def _flag_text(add: int, drop: int = 0) -> str:
    """Flags as a pattern writes them: (?i), (?s-m)."""
    on = "".join(ch for flag, ch in _FLAG_LETTERS if add & flag)
    off = "".join(ch for flag, ch in _FLAG_LETTERS if drop & flag)
    return f"(?{on}{'-' + off if off else ''})"


def _search_automaton(pattern: str) -> _Automaton:
    """The strings `re.search(pattern, s)` finds a match in (of writable characters; $ only at the end)."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern {pattern!r} is not a string")
    b = _Builder(pattern)
    try:
        re.compile(pattern)
        parsed = _sre.parse(pattern)
        flags = parsed.state.flags & ~re.UNICODE
        if flags:
            raise b.refuse(f"the inline flag {_flag_text(flags)}")
        start = b.node()
        b.plain[b.char(start, WRITABLE)].append(start)  # the match may start anywhere ...
        end = b.emit(parsed, start)
        b.plain[b.char(end, WRITABLE)].append(end)  # ... and end before the string does
    except (re.error, OverflowError) as e:
        raise PatternError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    except RecursionError:
        raise PatternError(f"pattern {pattern!r} nests its groups too deeply") from None
    return _trim(b.automaton(start, end))


def _format_automaton(name: str) -> _Automaton:
    if name not in FORMATS:
        raise PatternError(f"format {name!r} is not one structured output enforces "
                           f"(it enforces {', '.join(sorted(FORMATS))})")
    return _search_automaton(f"^(?:{FORMATS[name]})$")


def _trim(a: _Automaton) -> _Automaton:
    """The states that the start reaches and that reach a final state, renumbered."""
    pred = [0] * len(a.succ)
    for q, out in enumerate(a.succ):
        for t in _bits(out):
            pred[t] |= 1 << q
    keep = _reached(1, a.succ) & _reached(a.final, pred) | 1
    index = {q: i for i, q in enumerate(_bits(keep))}

    def renumber(bits: int) -> int:
        return sum(1 << index[t] for t in _bits(bits & keep))

    return _Automaton(tuple(a.classes[q] for q in index), tuple(renumber(a.succ[q]) for q in index),
                      renumber(a.final))


def _reached(seeds: int, succ) -> int:
    """Bitset of the states reachable from seeds' (themselves included)."""
    seen = frontier = seeds
    while frontier:
        nxt = 0
        for q in _bits(frontier):
            nxt |= succ[q]
        frontier = nxt & ~seen
        seen |= nxt
    return seen


def _intersection(a: _Automaton, b: _Automaton) -> _Automaton:
    """The strings both automata accept: the reachable pairs of their states."""
    index, pairs, classes, succ = {(0, 0): 0}, [(0, 0)], [()], []
    for p, q in pairs:  # grows while it is read
        out = 0
        for x in _bits(a.succ[p]):
            for y in _bits(b.succ[q]):
                j = index.get((x, y))
                if j is None:
                    cls = _intersect(a.classes[x], b.classes[y])
                    j = index[(x, y)] = len(pairs) if cls else -1
                    if cls:
                        if j > MAX_STATES:
                            raise PatternError(f"the pattern and format together need more than {MAX_STATES} "
                                               "automaton states, more than structured output enforces")
                        pairs.append((x, y))
                        classes.append(cls)
                if j > 0:
                    out |= 1 << j
        succ.append(out)
    if sum(out.bit_count() for out in succ) > _MAX_EDGES:
        raise PatternError(f"the pattern and format together need more than {_MAX_EDGES} automaton transitions, "
                           "more than structured output enforces")
    final = sum(1 << j for j, (p, q) in enumerate(pairs) if a.final >> p & 1 and b.final >> q & 1)
    return _trim(_Automaton(tuple(classes), tuple(succ), final))


def _length_profile(a: _Automaton) -> tuple[list[int], int, int]:
    """For each state, the lengths of the strings that finish a match from it, as a bitset over
    0 .. T+P-1: a length k >= T+P is in the set exactly when T + (k - T) % P is. The states k
    characters from a final one, layer by layer, repeat from layer T on with period P."""
    n = len(a.succ)
    edges = [(q, t) for q, out in enumerate(a.succ) for t in _bits(out)]
    src, dst = (np.array(side, dtype=np.intp) for side in zip(*edges)) if edges else (np.zeros(0, np.intp),) * 2
    layer = np.array([bool(a.final >> q & 1) for q in range(n)])
    layers: list = []
    seen: dict = {}
    while (key := layer.tobytes()) not in seen:
        if len(layers) >= _MAX_HORIZON or len(layers) * n > _MAX_PROFILE:
            raise PatternError(f"the lengths the pattern allows do not repeat within {len(layers)} characters, "
                               "more than structured output enforces")
        seen[key] = len(layers)
        layers.append(layer)
        layer = np.zeros(n, dtype=bool)
        layer[src[layers[-1][dst]]] = True  # the states one character before the last layer
    columns = np.packbits(np.array(layers), axis=0, bitorder="little").T.copy()  # (n, bytes of lengths)
    lengths = [int.from_bytes(row.tobytes(), "little") for row in columns]
    return lengths, seen[key], len(layers) - seen[key]


# ---------------------------------------------------------------- the rule

class StringRule:
    """A string's constraint: `pattern` (re.search semantics, as jsonschema applies it; None: any
    string), every format of `anchored_formats` (the whole string, FORMATS' regex), and a length
    window [min_len, max_len] in code points (len() of the str). StringRule.for_format(name, ...)
    is a format alone; a format also caps max_len by FORMAT_MAX_LEN.

    States are ints (bitsets of automaton states), hashable and meaningful to this rule only;
    `count` is always the number of characters before the one in question.
    Raises PatternError for what it cannot enforce and for a rule no string satisfies."""

    def __init__(self, pattern: str | None = None, min_len: int = 0, max_len: int | None = None, *,
                 anchored_formats: tuple[str, ...] = ()):
        for name, value in (("min_len", min_len), ("max_len", max_len)):
            if value is not None and (type(value) is not int or value < 0):
                raise PatternError(f"{name} must be a non-negative integer, not {value!r}")
        if max_len is not None and min_len > max_len:
            raise PatternError(f"min_len {min_len} is more than max_len {max_len}: no string satisfies both")
        parts = [_format_automaton(name) for name in anchored_formats]
        caps = [FORMAT_MAX_LEN[name] for name in anchored_formats if name in FORMAT_MAX_LEN]
        if caps:
            max_len = min(caps + ([max_len] if max_len is not None else []))
        if pattern is not None or not parts:
            parts.insert(0, _search_automaton(pattern if pattern is not None else ""))
        a = parts[0]
        for b in parts[1:]:
            a = _intersection(a, b)
        self.pattern, self.min_len, self.max_len = pattern, min_len, max_len
        self.anchored_formats = tuple(anchored_formats)
        self.start = 1
        self._succ, self._final = a.succ, a.final
        self._lengths, self._period_start, self._period = _length_profile(a)
        if not self._hits(self._lengths[0], self._cycle(self._lengths[0]), min_len, max_len):
            what = f"pattern {pattern!r}" if pattern is not None else "the rule"
            formats = f" and format {', '.join(anchored_formats)}" if anchored_formats else ""
            raise PatternError(f"no string satisfies {what}{formats} with length {min_len} to "
                               f"{'any' if max_len is None else max_len} (of the characters structured output writes)")
        self._bounds = sorted({x for cls in a.classes for lo, hi in cls for x in (lo, hi + 1)})
        self._masks = _interval_masks(a.classes, self._bounds)
        self._infos: dict = {}  # state -> (successors on any character, lengths, their cycle, final)
        self._next: dict = {}  # (state, interval) -> state or 0
        self._spans: dict = {}  # (state, first interval, last interval) -> the states they lead to

    @classmethod
    def for_format(cls, name: str, min_len: int = 0, max_len: int | None = None) -> StringRule:
        """A string valid for the JSON Schema format `name` (a key of FORMATS)."""
        return cls(None, min_len, max_len, anchored_formats=(name,))

    def step(self, state: int, cp: int, count: int) -> int | None:
        """The state after code point cp, `count` characters in; None when no string that goes on
        so satisfies the rule (cp outside WRITABLE included)."""
        key = (state, bisect_right(self._bounds, cp))
        nxt = self._next.get(key)
        if nxt is None:
            nxt = self._info(state)[0] & self._masks[key[1]]
            _remember(self._next, key, nxt)
        return nxt if nxt and self._fits(nxt, count + 1) else None

    def may_take(self, state: int, lo: int, hi: int, count: int) -> bool:
        """Whether some code point in [lo, hi] has a step from this state."""
        if lo > hi:
            return False
        key = (state, bisect_right(self._bounds, lo), bisect_right(self._bounds, hi))
        targets = self._spans.get(key)
        if targets is None:
            reach = self._info(state)[0]
            targets = tuple({reach & m for m in self._masks[key[1]:key[2] + 1]} - {0})
            _remember(self._spans, key, targets)
        return any(self._fits(t, count + 1) for t in targets)

    def accepts(self, state: int, count: int) -> bool:
        """Whether the string may end here, `count` characters long."""
        return (self.min_len <= count and (self.max_len is None or count <= self.max_len)
                and self._info(state)[3])

    # ------------------------------------------------------------ lengths

    def _fits(self, state: int, count: int) -> bool:
        """Whether a string `count` characters long that has reached `state` can still finish."""
        if self.max_len is None and count >= self.min_len:
            return True  # every state kept reaches a final one
        info = self._info(state)
        hi = None if self.max_len is None else self.max_len - count
        return self._hits(info[1], info[2], max(0, self.min_len - count), hi)

    def _hits(self, lengths: int, cycle: int, lo: int, hi: int | None) -> bool:
        """Whether a length in [lo, hi] (hi None: no end) is in the profile (lengths, its cycle)."""
        if hi is not None and hi < lo:
            return False
        t, p = self._period_start, self._period
        end = t + p
        if lo < end:
            top = end - 1 if hi is None or hi >= end else hi
            if lengths >> lo & ((1 << (top - lo + 1)) - 1):
                return True
            if top == hi:
                return False
            lo = end
        if not cycle:
            return False
        if hi is None or hi - lo + 1 >= p:
            return True
        a, b = (lo - t) % p, (hi - t) % p
        if a <= b:
            return bool(cycle >> a & ((1 << (b - a + 1)) - 1))
        return bool(cycle >> a) or bool(cycle & ((1 << (b + 1)) - 1))

    def _cycle(self, lengths: int) -> int:
        return lengths >> self._period_start & ((1 << self._period) - 1)

    def _info(self, state: int) -> tuple:
        info = self._infos.get(state)
        if info is None:
            reach = lengths = 0
            for q in _bits(state):
                reach |= self._succ[q]
                lengths |= self._lengths[q]
            info = (reach, lengths, self._cycle(lengths), bool(state & self._final))
            _remember(self._infos, state, info)
        return info


def _interval_masks(classes: tuple, bounds: list[int]) -> list[int]:
    """For each interval between bounds (interval i: bounds[i-1] <= cp < bounds[i]), the bitset
    of the states whose class holds it."""
    by_class: dict = {}
    for j, cls in enumerate(classes):
        if j:
            by_class[cls] = by_class.get(cls, 0) | 1 << j
    masks = [0] * (len(bounds) + 1)
    for cls, states in by_class.items():
        for lo, hi in cls:
            for i in range(bisect_right(bounds, lo), bisect_right(bounds, hi) + 1):
                masks[i] |= states
    return masks


def _remember(cache: dict, key, value) -> None:
    """cache[key] = value, starting the cache again when it is full (values are recomputed alike)."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
