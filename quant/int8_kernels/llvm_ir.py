"""LLVM IR building blocks shared by the AVX2 and AVX-512 VNNI intrinsics.

Addresses are i64 values (the kernels pass raw addresses); loads are unaligned unless
the caller knows better. `outlined` makes an intrinsic's code one function per kernel,
called wherever the kernel uses it, instead of a copy at every use (compile time).
"""

from __future__ import annotations

import weakref

from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils, types

I32 = ir.IntType(32)


def declare(builder, name: str, ret, args):
    """The function `name` (an LLVM intrinsic) of type ret(args), declared once per module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def load(builder, addr, offset: int, typ):
    """The value of LLVM type `typ` (a vector or a scalar) at address addr + offset."""
    ptr = builder.inttoptr(builder.add(addr, ir.Constant(addr.type, offset)), typ.as_pointer())
    return builder.load(ptr, align=1)


def shuffle(builder, vec, indices):
    """vec's lanes picked by `indices` (one vector operand)."""
    mask = ir.Constant(ir.VectorType(I32, len(indices)), list(indices))
    return builder.shuffle_vector(vec, ir.Constant(vec.type, ir.Undefined), mask)


# Numba's fast-math pass gives every float instruction that has no flags of its own the
# caller's flags ("fast": reassociation and contraction included). The float arithmetic of
# the row dots must be the same sequence of roundings in every kernel that inlines them (a
# one-token GEMV and a many-token GEMM of the same row agree to the bit), so it carries a
# flag that permits neither: "nsz" (only the sign of a zero may change).
PINNED = ("nsz",)


def _pinned(instr):
    instr.flags.extend(PINNED)
    return instr


def fadd(builder, a, b):
    """a + b, rounded once, whatever the enclosing kernel's fast-math flags."""
    return _pinned(builder.fadd(a, b))


def fsub(builder, a, b):
    """a - b, rounded once (see fadd)."""
    return _pinned(builder.fsub(a, b))


def fmul(builder, a, b):
    """a * b, rounded once and never fused into an add (see fadd)."""
    return _pinned(builder.fmul(a, b))


# ---------------------------------------------------------------- one body per kernel

_PLACEHOLDER = "stepstream_outlined_body"
_BODIES: dict[str, str] = {}  # name -> IR of a module defining it as _PLACEHOLDER, built once per process
_LINKED: "weakref.WeakKeyDictionary[object, dict[str, str]]" = weakref.WeakKeyDictionary()  # library -> symbols


def outlined(name: str, codegen):
    """The codegen of an intrinsic that calls one LLVM function holding the code
    codegen(context, builder, signature, args) emits, instead of emitting it at every call.

    Why: a row dot or a GEMM step is thousands of instructions, and a kernel used to get its
    own copy at every place it is inlined into (a fused FFN has the same row dot in several
    loops, a format switch is compiled once on its own before it is inlined). Each copy was
    built again by llvmlite in Python and optimized again by LLVM: most of a first run's
    compile time. Now the function is built once per process (its IR text kept here), parsed
    into each kernel's code library once, and called; LLVM still inlines it where it finds
    that pays. The arguments are integers (addresses, sizes), so a call costs a few
    nanoseconds next to a row's work. The bits do not change: every float step of these
    bodies carries its own flags (PINNED), which no caller's fast-math flags override.

    The function's symbol is `name`, weak_odr: the linker keeps it even before the caller's
    code refers to it (it drops an unreferenced linkonce or internal one), a kernel that links
    in others holding it (its parallel loops' bodies, a called kernel) keeps one copy, and the
    JIT takes any one of the identical definitions, as it does for Numba's own linked
    functions. So `name` must say everything the code depends on (format, tokens, kind); the
    unoptimized copy of a typing-only compile has a name of its own."""

    def call(context, builder, signature, args):
        void = signature.return_type == types.none
        ret = ir.VoidType() if void else context.get_value_type(signature.return_type)
        fnty = ir.FunctionType(ret, [a.type for a in args])
        library = context.active_code_library
        symbols = _LINKED.setdefault(library, {})
        if name not in symbols:
            if name not in _BODIES:
                _BODIES[name] = _body(library, context, signature, fnty, codegen, void)
            text, symbol = _BODIES[name], name
            if "optnone" in builder.function.attributes:  # a typing-only compile (quant.jit.ALWAYS_INLINED)
                text, symbol = _unoptimized(text), f"{name}.unoptimized"
            library.add_llvm_module(llvm.parse_assembly(text.replace(f"@{_PLACEHOLDER}", f'@"{symbol}"')))
            symbols[name] = symbol
        result = builder.call(cgutils.get_or_insert_function(builder.module, fnty, symbols[name]), args)
        return context.get_dummy_value() if void else result

    return call


def _body(library, context, signature, fnty, codegen, void: bool) -> str:
    module = library.create_ir_module(_PLACEHOLDER)  # the target's triple and data layout
    fn = ir.Function(module, fnty, _PLACEHOLDER)
    fn.linkage = "weak_odr"
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    value = codegen(context, builder, signature, list(fn.args))
    if void:
        builder.ret_void()
    else:
        builder.ret(value)
    text = str(module).replace(f'@"{_PLACEHOLDER}"', f"@{_PLACEHOLDER}")  # llvmlite quotes names
    assert text.count(f"@{_PLACEHOLDER}(") == 1, "the body's symbol is spelled otherwise"
    return text


def _unoptimized(text: str) -> str:
    """The body's IR with the function left unoptimized (optnone needs noinline), as the typing-only
    compile that holds it: llvmlite writes a definition's attributes between its ")" and "{"."""
    head = text.index(f"@{_PLACEHOLDER}(")
    brace = text.index(")\n{", head)
    return text[:brace] + ") noinline optnone" + text[brace + 1:]
