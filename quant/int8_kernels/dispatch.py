"""Switching on a matrix's format inside a kernel, compiled only for the formats a model has.

A kernel that multiplies matrices of several formats (a decode step's projections, a token's
experts) picks each matrix's row code at run time from its format code. Compiling every
format's row code into every kernel was most of the first run's compile time, for formats
the file does not even hold. So such a kernel is built for a *format set*: an integer with a
bit per format (FORMAT_BIT), a compile-time constant of the kernel (a closure variable, which
Numba's cache keys on), and `switch` tables compile only the entries the set names.

    f = switch({Q4_K: row_dot_q4_k, Q6_K: row_dot_q6_k, ...}, arity=4)
    f(formats, qtype, *args)      in Numba code: table[qtype](*args), formats a literal
                                  in Python: the same call, on any format of the table
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T
from numba import types
from numba.core.errors import TypingError
from numba.extending import overload

# format codes as the kernels see them
Q8_0, Q4_K, Q5_K, Q6_K = int(T.Q8_0), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
FORMAT_BIT = {Q4_K: 1, Q6_K: 2, Q5_K: 4, Q8_0: 8}


def format_set(qtypes) -> int:
    """The format set (an int, a bit per format) of these format codes; unknown ones are left out."""
    bits = 0
    for q in qtypes:
        bits |= FORMAT_BIT.get(int(q), 0)
    return bits


def _slots(entries):
    """For up to four (code, function) entries: the functions tested first (f0, f1, f2, None
    where unused), whether each is used (closure constants: Numba prunes the branches of the
    unused ones before typing), their codes, and the last entry's function, which takes any
    code the others do not match. Callers make sure the set holds every format they pass
    (int8_kernels checks)."""
    n = len(entries)
    tested = [fn for _, fn in entries[:-1]] + [None] * (4 - n)
    codes = [code for code, _ in entries[:-1]] + [-1] * (4 - n)
    return tested[:3], (n >= 2, n >= 3, n >= 4), codes[:3], entries[-1][1]


def switch(table: dict, arity: int):
    """A function f(formats, qtype, *args) = table[qtype](*args) for Numba code (see module doc);
    the table's functions take `arity` arguments. Numba cannot inline a call with *args, hence
    one spelled-out signature per arity the kernels use."""
    found: dict[int, tuple] = {}

    def slots_for(formats):
        if not isinstance(formats, types.IntegerLiteral):
            raise TypingError("the format set must be a compile-time integer (a closure variable of the kernel)")
        bits = formats.literal_value
        if bits not in found:
            entries = [(code, fn) for code, fn in table.items() if FORMAT_BIT[code] & bits]
            if not entries:
                raise TypingError(f"format set {bits} names none of this table's formats")
            found[bits] = _slots(entries)
        return found[bits]

    makers = {4: _switch4, 5: _switch5, 12: _switch12}
    if arity not in makers:
        raise ValueError(f"no format switch of arity {arity}")
    return makers[arity](table, slots_for)


def _two_at_most(slots, arity: int) -> None:
    if slots[1][1]:
        raise TypingError(f"{arity}-argument switches take two formats at most")


def _switch4(table, slots_for):
    def f(formats, qtype, a, b, c, d):
        return table[int(qtype)](a, b, c, d)

    @overload(f, inline="always")
    def _f(formats, qtype, a, b, c, d):
        (f0, f1, f2), (use0, use1, use2), (c0, c1, c2), last = slots_for(formats)

        def impl4(formats, qtype, a, b, c, d):
            if use0:
                if qtype == c0:
                    return f0(a, b, c, d)
            if use1:
                if qtype == c1:
                    return f1(a, b, c, d)
            if use2:
                if qtype == c2:
                    return f2(a, b, c, d)
            return last(a, b, c, d)
        return impl4
    return f


def _switch5(table, slots_for):
    def f(formats, qtype, a, b, c, d, e):
        return table[int(qtype)](a, b, c, d, e)

    @overload(f, inline="always")
    def _f(formats, qtype, a, b, c, d, e):
        slots = slots_for(formats)
        _two_at_most(slots, 5)
        (f0, _, _), (use0, _, _), (c0, _, _), last = slots

        def impl5(formats, qtype, a, b, c, d, e):
            if use0:
                if qtype == c0:
                    return f0(a, b, c, d, e)
            return last(a, b, c, d, e)
        return impl5
    return f


def _switch12(table, slots_for):
    def f(formats, qtype, a, b, c, d, e, f_, g, h, i, j, k, m):
        return table[int(qtype)](a, b, c, d, e, f_, g, h, i, j, k, m)

    @overload(f, inline="always")
    def _f(formats, qtype, a, b, c, d, e, f_, g, h, i, j, k, m):
        slots = slots_for(formats)
        _two_at_most(slots, 12)
        (f0, _, _), (use0, _, _), (c0, _, _), last = slots

        def impl12(formats, qtype, a, b, c, d, e, f_, g, h, i, j, k, m):
            if use0:
                if qtype == c0:
                    return f0(a, b, c, d, e, f_, g, h, i, j, k, m)
            return last(a, b, c, d, e, f_, g, h, i, j, k, m)
        return impl12
    return f
