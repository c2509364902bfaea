"""The AVX-512 VNNI GEMM steps as native functions, compiled once per host and cached: the GEMM
calls them through their addresses.

Why not inline or link them into the GEMM: Numba builds a parallel kernel as four code
libraries (the loop body, two wrappers, the kernel), and each links the code of the ones below
it and optimizes and compiles all of it again. The eight step bodies (Q4_K and Q6_K, 8, 4, 2
and 1 tokens, a few thousand instructions each) went through LLVM four times: more than half of
the GEMM's 11 s of compile time on a first run. Here they are compiled once, into a library of
their own kept in the kernel cache, and the GEMM holds only an indirect call per group of 16
rows and tokens (a few nanoseconds against microseconds of work). The cached GEMM holds no
address: `addresses()` gives them at run time, as an argument.

Each format's four steps are a library of their own, compiled the first time a GEMM of that
format runs (a Q4_K_M file never compiles the Q2_K steps). Its cache file sits beside this
module's kernels in Numba's cache directory, named by the format and a key over the sources that
emit the code (quant.jit.source_stamp: this module and what it imports), the host CPU and its
features, and the Numba and llvmlite versions. It is written under a temporary name, then
renamed; a file that does not load is compiled again and replaced.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.compiler_lock import global_compiler_lock
from numba.core.registry import cpu_target
from numba.extending import intrinsic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..jit import source_stamp
from .avx512_vnni import AVAILABLE, DECODED, STEP_TOKENS, decode_codegen, step_codegen

FORMATS = ("q4_k", "q6_k", "q5_k", "q2_k", "q3_k", "iq4_xs", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q8_0",
           "iq3_s")
SLOTS = len(STEP_TOKENS) + 1  # a GEMM's steps array: FORMATS[f]'s step of STEP_TOKENS[k] tokens at
# SLOTS f + k, and its decoder at SLOTS f + SLOTS - 1 (avx512_vnni.DECODED formats; 0 for the others)
_I64 = ir.IntType(64)
_FNTY = ir.FunctionType(ir.VoidType(), [_I64] * 11)
_SIG = types.none(*([types.int64] * 11))
_DECODE_FNTY = ir.FunctionType(ir.VoidType(), [_I64] * 4)
_DECODE_SIG = types.none(*([types.int64] * 4))


def _symbol(fmt: str, n_tok: int) -> str:
    return f"stepstream_vnni_{fmt}_step{n_tok}"


def _decoder_symbol(fmt: str) -> str:
    return f"stepstream_vnni_{fmt}_decode16"


@nb.njit(cache=True)
def _anchor():  # its cache directory is where the steps' library is kept
    return 0


def _cache_file(codegen, fmt: str) -> Path:
    key = hashlib.sha256(repr((source_stamp(os.path.abspath(__file__)), codegen.magic_tuple(),
                               nb.__version__, __import__("llvmlite").__version__)).encode()).hexdigest()[:24]
    return Path(_anchor._cache._cache_path) / f"vnni_steps-{fmt}-{key}.lib"


def _compile(codegen, fmt: str):
    library = codegen.create_library(f"stepstream_vnni_steps_{fmt}")
    library.enable_object_caching()
    context = cpu_target.target_context
    for n_tok in STEP_TOKENS:
        module = library.create_ir_module(_symbol(fmt, n_tok))
        fn = ir.Function(module, _FNTY, _symbol(fmt, n_tok))
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        step_codegen(fmt, n_tok)(context, builder, _SIG, list(fn.args))
        builder.ret_void()
        library.add_ir_module(module)
    if fmt in DECODED:
        module = library.create_ir_module(_decoder_symbol(fmt))
        fn = ir.Function(module, _DECODE_FNTY, _decoder_symbol(fmt))
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        decode_codegen(fmt)(context, builder, _DECODE_SIG, list(fn.args))
        builder.ret_void()
        library.add_ir_module(module)
    library.finalize()
    return library


def _load(codegen, path: Path, fmt: str):
    try:
        library = codegen.unserialize_library(pickle.loads(path.read_bytes()))
        library.get_pointer_to_function(_symbol(fmt, STEP_TOKENS[0]))  # resolves, or raises
        if fmt in DECODED:
            library.get_pointer_to_function(_decoder_symbol(fmt))
        return library
    except Exception:  # a missing, partial or foreign file: compiled again below
        return None


def _save(library, path: Path) -> None:
    data = pickle.dumps(library.serialize_using_object_code())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:  # a read-only cache directory: compiled again next time, as Numba does
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


@contextmanager
def _exclusive(path: Path):
    """Held by one process at a time (a lock file beside the cache file), so that a process that
    finds another compiling the steps (runtime.model.precompile's helper) waits and loads them.
    Without fcntl, or where the lock file cannot be made, no lock: each may compile them."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_suffix(".lock"), "a+b")
    except OSError:
        f = None
    try:
        if f is not None and fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes, or when its process dies
        yield
    finally:
        if f is not None:
            f.close()


_LIBRARY = []  # keeps the compiled code alive for the process
source = None  # where addresses() found the steps: "cache" or "compiled" (None: not yet asked)


@lru_cache(maxsize=None)
def addresses(fmt: str) -> np.ndarray:
    """int64 [SLOTS]: the addresses of format fmt's steps (a name of FORMATS), STEP_TOKENS[k] tokens
    at k, then its decoder's (0 if it has none). Only where avx512_vnni.AVAILABLE."""
    if not AVAILABLE:
        raise RuntimeError("the AVX-512 VNNI steps do not compile on this host")
    if fmt not in FORMATS:
        raise ValueError(f"no VNNI steps for {fmt} (have: {', '.join(FORMATS)})")
    codegen = cpu_target.target_context.codegen()
    path = _cache_file(codegen, fmt)
    global source
    with global_compiler_lock, _exclusive(path):  # one process compiles them; the others then load them
        library, source = _load(codegen, path, fmt), "cache"
        if library is None:
            library, source = _compile(codegen, fmt), "compiled"
            _save(library, path)
    _LIBRARY.append(library)
    decoder = library.get_pointer_to_function(_decoder_symbol(fmt)) if fmt in DECODED else 0
    return np.array([library.get_pointer_to_function(_symbol(fmt, n)) for n in STEP_TOKENS] + [decoder], np.int64)


@lru_cache(maxsize=None)
def steps_for(fmt: str) -> np.ndarray:
    """int64 [SLOTS len(FORMATS)]: a GEMM's steps argument for matrices of format fmt: its slots
    at SLOTS f .. SLOTS f + SLOTS - 1 (f its index in FORMATS), zeros elsewhere (the GEMM reads
    no other format's)."""
    out = np.zeros(SLOTS * len(FORMATS), np.int64)
    f = FORMATS.index(fmt)
    out[SLOTS * f:SLOTS * (f + 1)] = addresses(fmt)
    out.setflags(write=False)
    return out


@intrinsic
def call_step(typingctx, address, w, row_bytes, nsb, xq, xq_stride, xs, xs_stride, xd, xd_stride, out, out_stride):
    """Call the step at `address` (from addresses) on one group: the 11 int64 arguments of
    avx512_vnni.step_codegen."""
    def codegen(context, builder, signature, args):
        fn = builder.inttoptr(args[0], _FNTY.as_pointer())
        builder.call(fn, args[1:])
        return context.get_dummy_value()
    return types.none(*([types.int64] * 12)), codegen


@intrinsic
def call_decoder(typingctx, address, w, row_bytes, nsb, out):
    """Call the decoder at `address` (from addresses) on one group of 16 rows: the 4 int64
    arguments of avx512_vnni.decode_codegen."""
    def codegen(context, builder, signature, args):
        fn = builder.inttoptr(args[0], _DECODE_FNTY.as_pointer())
        builder.call(fn, args[1:])
        return context.get_dummy_value()
    return types.none(*([types.int64] * 5)), codegen
