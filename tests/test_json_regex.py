"""runtime.text.json_regex, the automaton behind `pattern`, `format`, `minLength` and
`maxLength`, checked against references, never against itself: `re.search` (the test
jsonschema applies to `pattern`) on every short string over small alphabets, jsonschema's
format checker and the standard library's parsers on strings the automaton writes in random
walks, and Python's own character classes code point by code point."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import random
import re
import sys
import time
import uuid
from email.headerregistry import Address

import jsonschema
import pytest

from runtime.text.json_regex import FORMAT_MAX_LEN, FORMATS, WRITABLE, PatternError, StringRule

CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER
NEW_SYNTAX = sys.version_info >= (3, 11)  # atomic groups and possessive quantifiers; fromisoformat's Z


def _writable(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in WRITABLE)


def _walk(rule: StringRule, text: str):
    """The state after text, or None when a step refused it."""
    s = rule.start
    for i, ch in enumerate(text):
        s = rule.step(s, ord(ch), i)
        if s is None:
            return None
    return s


def _accepts(rule: StringRule, text: str) -> bool:
    s = _walk(rule, text)
    return s is not None and rule.accepts(s, len(text))


def _strings(alphabet: str, longest: int):
    for n in range(longest + 1):
        for chars in itertools.product(alphabet, repeat=n):
            yield "".join(chars)


def test_writable_is_the_json_string_characters():
    want = {0x08, 0x09, 0x0A, 0x0C, 0x0D} | set(range(0x20, 0xD800)) | set(range(0xE000, 0x110000))
    assert {cp for lo, hi in WRITABLE for cp in range(lo, hi + 1)} == want
    rule = StringRule()
    for cp in [*range(0, 0x20), 0xD800, 0xDBFF, 0xDFFF, 0x110000, -1]:
        assert (rule.step(rule.start, cp, 0) is not None) == (cp in want), hex(cp)
    assert not rule.may_take(rule.start, 0xD800, 0xDFFF, 0)
    assert rule.may_take(rule.start, 0xD800, 0xE000, 0)


# ------------------------------------------------------------------ re.search, both ways

# (pattern, alphabet, exact beyond ASCII): a pattern with \d \w \s or their negations keeps
# their ASCII members only (a subset of Python's), so it is complete on ASCII strings only
PATTERNS = [
    ("", "ab\n", True),
    ("abc", "abc", True),
    ("a.c", "ac\né", True),
    ("^[a-z0-9_]+$", "a_9-", True),
    ('^[^"\\\\]*$', 'a"\\é', True),
    (r"\d+", "1a\u0663", False),
    (r"^\w\W\s\S$", "a !\t", False),
    (r"^\D+$", "1aé", False),
    (r"^[^\d\s]+$", "1a \u0663", False),
    (r"\.\-", ".-a", True),
    (r"^\x41\u00e9$", "Aéa", True),
    ("^a*b+c?$", "abc", True),
    ("^(ab){2}$", "ab", True),
    ("^a{2,}$", "ab", True),
    ("^a{1,3}b$", "ab", True),
    ("^a*?b+?c??$", "abc", True),
    ("^(?:ab|c){1,2}?$", "abc", True),
    ("(?P<n>ab)+c", "abc", True),
    ("^(a|bc)*$", "abc", True),
    ("^a|b$", "abc", True),
    (r"\Aab\Z", "ab\n", True),
    ("a$", "a\nb", True),
    ("^$", "a\n", True),
    ("(^a|b)c", "abc", True),
    ("a|^$", "ab", True),
    ("[^a]b", "ab\n", True),
    (r"^[\d\-]{2}$", "1-a\u0663", False),
    ("x*", "xy", True),
    ("^(a*)*$", "ab", True),
    ("^(a?){3}$", "ab", True),
    ("(a|)b$", "ab", True),
    ("^[ab]{0,2}c{0}$", "abc", True),
    ("^(?:a|b|)(?:c|)$", "abc", True),
    ("a\\Z|^b", "ab\n", True),
]


@pytest.mark.parametrize("pattern, alphabet, exact", PATTERNS)
def test_pattern_agrees_with_re_search(pattern, alphabet, exact):
    rule = StringRule(pattern)
    longest = {2: 8, 3: 6, 4: 5}.get(len(alphabet), 4)
    found = 0
    for text in _strings(alphabet, longest):
        got, want = _accepts(rule, text), re.search(pattern, text) is not None
        if got:
            assert want, f"{pattern!r} accepted {text!r}, which re.search refuses"
        # Python's $ also matches before a final newline; the automaton's only at the end
        elif want and not text.endswith("\n") and (exact or text.isascii()):
            raise AssertionError(f"{pattern!r} refused {text!r}, which re.search accepts")
        found += got
    assert found  # the comparison saw matches


@pytest.mark.parametrize("pattern, min_len, max_len, alphabet", [
    (r"^[a-z]+\d?$", 3, 5, "ab1"),
    ("ab", 0, 2, "abc"),
    ("", 2, 3, "ab"),
    ("a|bc", 2, 4, "abc"),
    ("^(ab)*$", 2, 6, "ab"),
    ("b", 0, 1, "ab"),
    ("^a+$", 4, None, "ab"),
    ("a.b", 5, 5, "ab"),
])
def test_lengths_agree_with_re_search(pattern, min_len, max_len, alphabet):
    rule = StringRule(pattern, min_len, max_len)
    found = 0
    for text in _strings(alphabet, {2: 8, 3: 6}[len(alphabet)]):
        want = re.search(pattern, text) is not None and min_len <= len(text) <= (max_len or len(text))
        assert _accepts(rule, text) == want, text
        found += want
    assert found
    if (pattern, max_len) == ("ab", 2):
        assert [t for t in _strings("abc", 4) if _accepts(rule, t)] == ["ab"]


@pytest.mark.parametrize("pattern, min_len, max_len, fragment", [
    ("a^", 0, None, "no string satisfies"),
    ("$a", 0, None, "no string satisfies"),
    (r"a\Zb", 0, None, "no string satisfies"),
    ("^a{5}$", 0, 3, "no string satisfies"),
    ("^\x00$", 0, None, "no string satisfies"),  # a character structured output never writes
    ("^[\ud800-\udfff]$", 0, None, "no string satisfies"),
    ("a", 3, 2, "min_len 3 is more than max_len 2"),
    ("a", -1, None, "min_len must be a non-negative integer"),
    ("a", 0, 2.5, "max_len must be a non-negative integer"),
    (r"(a)\1", 0, None, "backreference"),
    ("(?=a)a", 0, None, "lookahead"),
    ("(?!a)b", 0, None, "negative lookahead"),
    ("(?<=a)b", 0, None, "lookbehind"),
    ("(?<!a)b", 0, None, "negative lookbehind"),
    ("(?i)a", 0, None, "inline flag (?i)"),
    ("(?i:a)b", 0, None, "inline flags (?i:...)"),
    ("(?s).", 0, None, "inline flag (?s)"),
    ("(a)?(?(1)b|c)", 0, None, "conditional group"),
    (r"\bword\b", 0, None, "word boundary"),
    (r"a\B", 0, None, "non-boundary"),
    ("(?>ab)", 0, None, "atomic group" if NEW_SYNTAX else "not a valid regular expression"),
    ("a++", 0, None, "possessive quantifier" if NEW_SYNTAX else "not a valid regular expression"),
    ("(", 0, None, "not a valid regular expression: missing ), unterminated subpattern"),
    ("a{2,1}", 0, None, "not a valid regular expression"),
    ("a{99999999999999999999}", 0, None, "not a valid regular expression: the repetition number is too large"),
    ("(?:" * 1000 + "a" + ")" * 1000, 0, None, "nests its groups too deeply"),
    ("a{5000}", 0, None, "more than 4000 automaton states"),
    ("^(?:a?){1000}$", 0, None, "more than 200000 automaton transitions"),
    ("(?:a{100}){100}", 0, None, "more than 4000 automaton states"),
])
def test_refused_with_a_reason(pattern, min_len, max_len, fragment):
    with pytest.raises(PatternError, match=re.escape(fragment)) as err:
        StringRule(pattern, min_len, max_len)
    assert isinstance(err.value, ValueError)


def test_unknown_format_is_refused():
    with pytest.raises(PatternError, match="format 'color' is not one structured output enforces"):
        StringRule.for_format("color")


def test_empty_repetition_costs_nothing():
    start = time.perf_counter()
    rule = StringRule("^(?:){100000000}a(?:b?){0,3}$")
    assert time.perf_counter() - start < 1.0
    assert [t for t in _strings("ab", 5) if _accepts(rule, t)] == ["a", "ab", "abb", "abbb"]


# ------------------------------------------------------------------ classes against Python's

CLASSES = [r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", r"[^\d]", r"[^\w-]", r"[\D]", r"[\s\d]", ".",
           r'[^"\\]', r"[^a-z]", r"[a-zé-ë]", r"[^\u00e0-\u00ff\n]"]
HAS_CATEGORY = re.compile(r"\\[dDwWsS]")
EVERY_CHARACTER = "".join(map(chr, range(0x110000)))


def _python_refuses(cls: str) -> list[tuple[int, int]]:
    """The runs of code points Python's class refuses, every code point examined."""
    out, nxt = [], 0
    for m in re.finditer(f"(?:{cls})+", EVERY_CHARACTER):
        if m.start() > nxt:
            out.append((nxt, m.start() - 1))
        nxt = m.end()
    return out + ([(nxt, 0x10FFFF)] if nxt <= 0x10FFFF else [])


@pytest.mark.parametrize("cls", CLASSES)
def test_class_is_a_subset_of_pythons(cls):
    rule = StringRule(f"^{cls}$")
    for lo, hi in _python_refuses(cls):  # no code point Python refuses is taken
        assert not rule.may_take(rule.start, lo, hi, 0), f"{cls} takes some of {lo:#x}..{hi:#x}"
    # and step agrees with may_take, code point by code point, on a sample
    rng = random.Random(len(cls))
    sample = [*range(0, 0x800), *rng.sample(range(0x800, 0x110000), 20000), 0xD7FF, 0xE000, 0x10FFFF]
    one = re.compile(cls)
    for cp in sample:
        s = rule.step(rule.start, cp, 0)
        took = s is not None and rule.accepts(s, 1)
        assert took == rule.may_take(rule.start, cp, cp, 0), hex(cp)
        python = one.fullmatch(chr(cp)) is not None and _writable(cp)
        if took:
            assert python, f"{cls} took {cp:#x}, which Python's class refuses"
        elif python and (cp < 0x80 or not HAS_CATEGORY.search(cls)):
            raise AssertionError(f"{cls} refused {cp:#x}")  # exact on ASCII, and everywhere without \d \w \s


# ------------------------------------------------------------------ formats against their checkers

def _hostname_ok(x: str) -> bool:
    labels = x.split(".")
    ldh = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
    return 1 <= len(x) <= 253 and all(1 <= len(lb) <= 63 and lb[0] != "-" and lb[-1] != "-" and set(lb) <= ldh
                                      for lb in labels)


def _duration_ok(x: str) -> bool:
    """RFC 3339 appendix A, read designator by designator."""
    if not x.startswith("P") or x == "P":
        return False
    date, _, clock = x[1:].partition("T")
    if "T" in x[1:] and not clock:
        return False

    def designators(part: str) -> str | None:
        out, digits = "", ""
        for ch in part:
            if ch.isascii() and ch.isdigit():
                digits += ch
            elif digits:
                out, digits = out + ch, ""
            else:
                return None
        return None if digits else out

    d, t = designators(date), designators(clock)
    if d is None or t is None:
        return False
    if d == "W":
        return not clock
    return d in ("", "Y", "YM", "YMD", "M", "MD", "D") and t in ("", "H", "HM", "HMS", "M", "MS", "S")


def _email_ok(x: str) -> bool:
    local, _, domain = x.rpartition("@")
    atext = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-")
    parsed = Address(addr_spec=x)
    return (parsed.addr_spec == x and all(part and set(part) <= atext for part in local.split("."))
            and "." in domain and _hostname_ok(domain) and len(x) <= 254)


def _uri_ok(x: str) -> bool:
    """RFC 3986's URI rule (rfc3986-validator, what jsonschema checks with), an authority as
    urllib splits it, and pydantic's AnyUrl where pydantic is installed."""
    from urllib.parse import urlsplit

    import rfc3986_validator

    parts = urlsplit(x)
    if not (rfc3986_validator.validate_rfc3986(x, rule="URI") and parts.scheme and parts.netloc):
        return False
    try:
        import pydantic
    except ImportError:
        return True
    try:
        pydantic.TypeAdapter(pydantic.AnyUrl).validate_python(x)
    except pydantic.ValidationError:
        return False
    return True


STDLIB = {
    "date": datetime.date.fromisoformat,
    "time": lambda x: datetime.time.fromisoformat(x.replace("Z", "+00:00")),
    "date-time": lambda x: datetime.datetime.fromisoformat(x.replace("Z", "+00:00")),
    "uuid": uuid.UUID,
    "ipv4": ipaddress.IPv4Address,
    "ipv6": ipaddress.IPv6Address,
    "email": _email_ok,
    "hostname": _hostname_ok,
    "duration": _duration_ok,
    "uri": _uri_ok,
}

VALID = {
    "date": ["2024-02-29", "2000-02-29", "0001-01-01", "9999-12-31", "2023-04-30", "1999-01-31"],
    "time": ["00:00:00Z", "23:59:59.123456789+05:30", "12:30:00-00:00"],
    "date-time": ["1985-04-12T23:20:50.52Z", "1996-12-19T16:39:57-08:00"],
    "uuid": ["123e4567-e89b-12d3-a456-426614174000", "A987FBC9-4BED-3078-CF07-9141BA07C9F3"],
    "email": ["joe@example.com", "a.b+c@x-y.co.uk", "#!$%&'*+/=?^_`{|}~-@x.io"],
    "ipv4": ["0.0.0.0", "255.255.255.255", "192.168.1.10"],
    "ipv6": ["::", "::1", "1::", "2001:db8::8a2e:370:7334", "::ffff:192.0.2.1", "1:2:3:4:5:6:7:8",
             "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1:2:3:4:5:6:1.2.3.4"],
    "hostname": ["localhost", "example.com", "a-b.c0.d", "x" * 63 + ".com"],
    "duration": ["P1D", "PT1H", "P3Y6M4DT12H30M5S", "P2W", "PT0S", "P1M", "PT36H"],
    "uri": ["https://example.com", "http://a.b:8080/x/y?q=1&r=%2F#frag", "ftp://[2001:db8::1]/", "file://h/p",
            "git+ssh://10.0.0.1:22/r.git", "x://a/~!$&'()*+,;=:@"],
}
INVALID = {
    "date": ["2023-02-29", "2023-02-30", "1900-02-29", "0000-01-01", "2023-13-01", "2023-04-31", "2023-1-01",
             "2023-01-01T", "２０２３-01-01", "2023-01-0\u0663"],
    "time": ["24:00:00Z", "12:00:00", "12:60:00Z", "12:00:60Z", "12:00:00z", "12:00:00.Z", "12:00:00+24:00"],
    "date-time": ["1985-04-12 23:20:50Z", "1985-04-12t23:20:50Z", "2023-02-29T00:00:00Z"],
    "uuid": ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400g"],
    "email": ["joe", "@example.com", "joe@", "a..b@x.io", ".a@x.io", "joe@-x.io", "joe@x", "jo e@x.io"],
    "ipv4": ["256.0.0.1", "01.2.3.4", "1.2.3", "1.2.3.4.5", "1.2.3.４"],
    "ipv6": [":::", "1:2:3:4:5:6:7:8:9", "1::2::3", "12345::", "::1.2.3.04", "::%eth0"],
    "hostname": ["-a.com", "a-.com", "a..b", "a.", "x" * 64 + ".com", "a.1com", "a_b.com"],
    "duration": ["P", "PT", "P1Y2D", "P1DT", "P1H", "P1W1D", "1D", "P-1D", "PT1.5S"],
    "uri": ["example.com", "/path", "https://", "https://a b", "https://a.b/%2", "https://a.b:65536",
            "1http://a", "https://xn--a.com", "file://h:1/p", "mailto:a@b.c", "https://é.com"],
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_examples(name):
    rule = StringRule.for_format(name)
    for text in VALID[name]:
        assert _accepts(rule, text), text
        assert CHECKER.conforms(text, name) if name in CHECKER.checkers else True
        assert STDLIB[name](text) if NEW_SYNTAX or name not in ("time", "date-time") else True
    for text in INVALID[name]:
        assert not _accepts(rule, text), text


def _witness(rule: StringRule, state, count: int) -> int | None:
    """A code point step takes from state, found by halving WRITABLE with may_take; None if none."""
    for lo, hi in WRITABLE:
        if rule.may_take(state, lo, hi, count):
            while lo < hi:
                mid = (lo + hi) // 2
                if rule.may_take(state, lo, mid, count):
                    hi = mid
                else:
                    assert rule.may_take(state, mid + 1, hi, count)
                    lo = mid + 1
            assert rule.step(state, lo, count) is not None, "may_take promised a step"
            return lo
    return None


def _random_walk(rule: StringRule, rng: random.Random, extra: str, stop: float = 0.3, longest: int = 300):
    """A string written by stepping through the rule with random characters it allows, checking at
    each state that it can finish: accepting, or some writable character has a step. None when it
    ran past `longest` characters without stopping."""
    pool = [chr(c) for c in range(0x20, 0x7F)] + list("\t\n\r\x08\x0céñ中😀\U0010fffd") + list(extra)
    s, text = rule.start, ""
    while len(text) <= longest:
        if rule.accepts(s, len(text)) and rng.random() < stop:
            return text
        rng.shuffle(pool)
        ch = next((c for c in pool if rule.step(s, ord(c), len(text)) is not None), None)
        if ch is None:
            cp = _witness(rule, s, len(text))
            if cp is None:
                assert rule.accepts(s, len(text)), f"a dead end after {text!r}"
                return text
            ch = chr(cp)
        s = rule.step(s, ord(ch), len(text))
        text += ch
    return None


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_walks_are_valid(name):
    rng = random.Random(name)
    for min_len, max_len in ((0, None), (0, 12), (10, 40)):
        try:
            rule = StringRule.for_format(name, min_len, max_len)
        except PatternError as e:
            assert "no string satisfies" in str(e)
            continue
        for _ in range(60):
            # (a URI's scheme runs on until a random ':' ends it: a walk may be long)
            text = _random_walk(rule, rng, "", stop=0.15, longest=2000 if name == "uri" else 300)
            assert text is not None
            cap = min(x for x in (max_len, FORMAT_MAX_LEN.get(name), 10**9) if x is not None)
            assert min_len <= len(text) <= cap, text
            assert re.fullmatch(FORMATS[name], text), text
            if name in CHECKER.checkers:
                assert CHECKER.conforms(text, name), text
            if NEW_SYNTAX or name not in ("time", "date-time"):  # 3.10 reads 3 or 6 fraction digits only
                assert STDLIB[name](text), text


def test_pattern_and_format_together():
    rule = StringRule(r"^20(?:2[4-9]|[3-9]\d)", anchored_formats=("date",))
    rng = random.Random(7)
    for _ in range(40):
        text = _random_walk(rule, rng, "")
        assert re.search(r"^20(?:2[4-9]|[3-9]\d)", text) and datetime.date.fromisoformat(text), text
    assert _accepts(rule, "2024-02-29") and not _accepts(rule, "2023-01-01") and not _accepts(rule, "2024-02-30")
    with pytest.raises(PatternError, match="no string satisfies"):
        StringRule("x", anchored_formats=("ipv4",))
    assert FORMAT_MAX_LEN["hostname"] == 253 and StringRule.for_format("hostname", 0, 999).max_len == 253


# ------------------------------------------------------------------ liveness

LIVE = [("", 0, None), ("", 3, 5), (r"^[a-z]+\d?$", 3, 5), ("ab", 0, 2), ("ab", 5, 9), ("^(ab)*$", 3, 9),
        (r"^\d{3}-\d{4}", 0, None), (r"^(?:[^\"\\]|é)*$", 2, 6), ("a|bc|def", 4, 4), (r"^\s*\S+\s*$", 1, 8),
        ("^(?:a{3}|b{5})+$", 7, 16), ("x$", 0, 3), ("^.{2,4}$", 0, None), ("(^a|b)c", 0, 5)]


@pytest.mark.parametrize("pattern, min_len, max_len", LIVE)
def test_random_walks_finish(pattern, min_len, max_len):
    rule = StringRule(pattern, min_len, max_len)
    rng = random.Random(f"{pattern}{min_len}")
    extra = "".join(ch for ch in pattern if ch.isprintable()) * 10 + "0123456789-" * 5  # a match is likelier
    finished = 0
    for _ in range(150):
        text = _random_walk(rule, rng, extra, longest=40)
        if text is None:
            continue
        finished += 1
        assert re.search(pattern, text), text
        assert min_len <= len(text) <= (max_len if max_len is not None else len(text)), text
    assert finished > 30


def test_may_take_is_exact_on_small_ranges():
    rng = random.Random(3)
    for pattern in (r"^[a-zà-ÿ]+\d?$", r"[^\x80-\u07ff]é", "^(?:ab|é|中)*$"):
        rule = StringRule(pattern, 1, 6)
        for _ in range(20):
            text = _random_walk(rule, rng, "é中ÿ", stop=0.2, longest=5) or ""
            s, n = _walk(rule, text), len(text)
            for lo, hi in [(0x00, 0x7F), (0x80, 0x7FF), (0xE0, 0xFF), (0x4E00, 0x4E2F)]:
                brute = any(rule.step(s, cp, n) is not None for cp in range(lo, hi + 1))
                assert rule.may_take(s, lo, hi, n) == brute, (pattern, text, hex(lo))


def test_long_windows_count_exactly():
    """max_len far past the pattern's own lengths: the counts are worked out, not walked."""
    rule = StringRule("^(?:ab)*$", 0, 100_001)
    s = _walk(rule, "ab")
    a = rule.step(s, ord("a"), 99_998)
    assert a is not None and rule.step(a, ord("b"), 99_999) is not None
    assert rule.accepts(rule.step(a, ord("b"), 99_999), 100_000)
    assert rule.step(s, ord("a"), 100_000) is None  # "b" would make 100,002
    rule = StringRule("^(?:abc)+x?$", 100_000, None)
    s = _walk(rule, "abc")
    assert not rule.accepts(s, 99_999) and rule.accepts(s, 100_002)
    x = rule.step(s, ord("x"), 99_999)
    assert x is not None and rule.accepts(x, 100_000)
    assert rule.step(s, ord("x"), 99_998) is None  # 99,999 characters, and x ends it


UNARY = {  # pattern -> which lengths of "a"s it matches, by arithmetic (re backtracks exponentially on long ones)
    "^(?:a{3}|a{5})*$": lambda n: n >= 8 or n in (0, 3, 5, 6),
    "^(?:aa)*a$": lambda n: n % 2 == 1,
    "^(?:a{4}|a{6})+$": lambda n: n >= 4 and n % 2 == 0,
    "^a(?:a{7})*$|^(?:a{5})+$": lambda n: n % 7 == 1 or n > 0 and n % 5 == 0,
    "^(?:a{2}|a{3}){2,4}$": lambda n: 4 <= n <= 12,
    "a{9}": lambda n: n >= 9,
}


@pytest.mark.parametrize("pattern", sorted(UNARY))
def test_windows_over_one_letter(pattern):
    """Over a one-letter alphabet a string is its length: every window, every count, against
    the lengths the pattern matches (windows reach far past the lengths' period)."""
    assert all(UNARY[pattern](n) == (re.search(pattern, "a" * n) is not None) for n in range(30))
    matches = [UNARY[pattern](n) for n in range(700)]
    rng = random.Random(pattern)
    windows = [(rng.randint(0, 250), None) for _ in range(6)] + [(0, rng.randint(0, 300)) for _ in range(6)]
    windows += [tuple(sorted(rng.sample(range(300), 2))) for _ in range(14)] + [(40, 41), (77, 77), (0, 0)]
    for min_len, max_len in windows:
        top = 699 if max_len is None else max_len
        fits = [matches[n] and min_len <= n <= top for n in range(700)]
        if not any(fits):
            with pytest.raises(PatternError, match="no string satisfies"):
                StringRule(pattern, min_len, max_len)
            continue
        rule = StringRule(pattern, min_len, max_len)
        s = rule.start
        for n in range(min(top, 320) + 1):
            assert rule.accepts(s, n) == fits[n], (min_len, max_len, n)
            s = rule.step(s, ord("a"), n)
            assert (s is not None) == any(fits[n + 1:]), (min_len, max_len, n)
            if s is None:
                break


def test_timings():
    """Typical rules compile in well under 50 ms on a fast machine and step in microseconds; the
    bounds here are loose for slow test machines."""
    start = time.perf_counter()
    rule = StringRule(r"^[A-Z][a-z]+(?: [A-Z][a-z]+)*$", 1, 1000)
    assert time.perf_counter() - start < 0.5
    text = "Ada Lovelace Byron " * 3
    s, start = rule.start, time.perf_counter()
    for _ in range(200):
        s = rule.start
        for i, ch in enumerate(text[:-1]):
            s = rule.step(s, ord(ch), i)
    per_step = (time.perf_counter() - start) / (200 * (len(text) - 1))
    assert s is not None and per_step < 50e-6
