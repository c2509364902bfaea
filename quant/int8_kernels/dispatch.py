"""Switching on a matrix's format inside a kernel, compiled only for the formats a model has.

A kernel that multiplies matrices of several formats (a decode step's projections, a token's
experts) picks each matrix's row code at run time from its format code. Compiling every
format's row code into every kernel was most of the first run's compile time, for formats
the file does not even hold. So such a kernel is built for a *format set*: an integer with a
bit per format (FORMAT_BIT), a compile-time constant of the kernel (a closure variable, which
Numba's cache keys on), and `switch` tables compile only the entries the set names.

    f = switch({Q4_K: row_dot_q4_k, Q6_K: row_dot_q6_k, ...}, arity=4)
    f(formats, qtype, *args)      in Numba code: table[qtype](*args), formats a literal: a chain
                                  of tests on the set's formats only (any number of them)
                                  in Python: the same call, on any format of the table
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T
from numba import types
from numba.core.errors import TypingError
from numba.extending import overload

from ..jit import ALWAYS_INLINED

# format codes as the kernels see them
Q8_0, Q4_K, Q5_K, Q6_K = int(T.Q8_0), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
Q2_K, Q3_K = int(T.Q2_K), int(T.Q3_K)
Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.IQ4_NL)
IQ4_XS = int(T.IQ4_XS)
IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S = int(T.IQ2_XXS), int(T.IQ2_XS), int(T.IQ2_S), int(T.IQ3_XXS), int(T.IQ3_S)
IQ1_S, IQ1_M, TQ1_0, TQ2_0 = int(T.IQ1_S), int(T.IQ1_M), int(T.TQ1_0), int(T.TQ2_0)
FORMAT_BIT = {Q4_K: 1, Q6_K: 2, Q5_K: 4, Q8_0: 8, Q2_K: 16, Q3_K: 32, Q4_0: 64, Q4_1: 128, Q5_0: 256, Q5_1: 512,
              IQ4_NL: 1024, IQ4_XS: 2048, IQ2_XXS: 1 << 12, IQ2_XS: 1 << 13, IQ2_S: 1 << 14, IQ3_XXS: 1 << 15,
              IQ3_S: 1 << 16, IQ1_S: 1 << 17, IQ1_M: 1 << 18, TQ1_0: 1 << 19, TQ2_0: 1 << 20}
BYTES_PER_256 = {Q4_K: 144, Q6_K: 210, Q5_K: 176, Q8_0: 272, Q2_K: 84, Q3_K: 110,  # GGUF bytes of 256 columns
                 Q4_0: 144, Q4_1: 160, Q5_0: 176, Q5_1: 192, IQ4_NL: 144, IQ4_XS: 136,
                 IQ2_XXS: 66, IQ2_XS: 74, IQ2_S: 82, IQ3_XXS: 98, IQ3_S: 110, IQ1_S: 50, IQ1_M: 56, TQ1_0: 54,
                 TQ2_0: 66}


def format_set(qtypes) -> int:
    """The format set (an int, a bit per format) of these format codes; unknown ones are left out."""
    bits = 0
    for q in qtypes:
        bits |= FORMAT_BIT.get(int(q), 0)
    return bits


def _chain(entries, arity: int):
    """Numba source of impl(formats, qtype, a0 .. a{arity-1}): the entries' functions tested in
    order by their format code, the last one taking any code the others do not match (callers
    make sure the set holds every format they pass: int8_kernels checks). Written out as text
    because Numba inlines neither a call with *args nor a loop over functions."""
    args = ", ".join(f"a{i}" for i in range(arity))
    lines = [f"def impl(formats, qtype, {args}):"]
    scope = {}
    for i, (code, fn) in enumerate(entries):
        scope[f"f{i}"] = fn
        if i < len(entries) - 1:
            lines += [f"    if qtype == {int(code)}:", f"        return f{i}({args})"]
        else:
            lines.append(f"    return f{i}({args})")
    exec("\n".join(lines), scope)  # noqa: S102 (our own text: names and integer codes)
    return scope["impl"]


def switch(table: dict, arity: int):
    """A function f(formats, qtype, *args) = table[qtype](*args) for Numba code (see module doc);
    the table's functions take `arity` arguments."""
    found: dict[tuple, object] = {}
    args = ", ".join(f"a{i}" for i in range(arity))
    scope = {"table": table}
    exec(f"def f(formats, qtype, {args}):\n    return table[int(qtype)]({args})", scope)  # noqa: S102
    f = scope["f"]

    def typer(formats, qtype, *rest):
        if not isinstance(formats, types.IntegerLiteral):
            raise TypingError("the format set must be a compile-time integer (a closure variable of the kernel)")
        bits = formats.literal_value
        if bits not in found:
            entries = [(code, fn) for code, fn in table.items() if FORMAT_BIT[code] & bits]
            if not entries:
                raise TypingError(f"format set {bits} names none of this table's formats")
            found[bits] = _chain(entries, arity)
        return found[bits]

    # overload needs the typer's parameters spelled as f's are
    scope = {"typer": typer}
    exec(f"def _f(formats, qtype, {args}):\n    return typer(formats, qtype, {args})", scope)  # noqa: S102
    overload(f, **ALWAYS_INLINED)(scope["_f"])
    return f
