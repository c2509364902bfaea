"""How the project's Numba code is compiled and cached: flags, cache keys, the host target.

Cache keys. Numba's cache keys a compiled function on its own source file only. Our
kernels inline functions from other files (row dots, block decoders, LLVM intrinsics), so an
edit of one of those would leave a stale kernel in the cache. Importing this module
registers a cache locator for every file of the project's packages whose source stamp is a
hash of the file *and of every project module it imports, transitively* (found by parsing
the imports), plus the host target facts that decide which code paths compile. Any change
to an inlined source therefore recompiles every kernel that may inline it; nothing else
has to remember to declare its dependencies.

FIXED_ORDER is the fast-math set without reassociation or contraction, for float sums
whose order must not depend on how LLVM vectorizes (the same kernel compiled now and
loaded from the cache must agree to the bit). Numba applies fast-math flags to every float
instruction of the function it compiles, including code inlined into it with
``inline="always"``: a fixed-order helper must therefore be compiled on its own (called,
not inlined) when its caller uses full fast-math.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numba
import numba.core.caching as _caching
from llvmlite import binding as llvm

from quant import numba_cache

FIXED_ORDER = {"nnan", "ninf", "nsz", "arcp", "afn"}  # a set: Numba takes no frozenset; never mutated

# Options of an overload that is always inlined: @overload(f, **ALWAYS_INLINED). To type a call,
# Numba compiles the implementation on its own, to machine code, once per argument types, and
# then inlines its IR into the caller, which compiles it again with the caller's flags; the
# first compile is never run. Without LLVM optimization it costs a fraction (a format switch
# over the AVX-512 GEMM steps took 6 s of a first run's compile time; a few seconds more
# went to the row-dot switches). The inlined code is compiled as the caller's, unchanged.
ALWAYS_INLINED = {"inline": "always", "jit_options": {"_dbg_optnone": True}}
PACKAGES = ("quant", "runtime", "offload", "convert")
_ROOT = Path(__file__).resolve().parent.parent  # the directory holding the packages


def compiles_for(*features: str) -> bool:
    """Whether Numba compiles for the host CPU with all these LLVM features on. False when it
    targets another CPU (NUMBA_CPU_NAME), has AVX off (NUMBA_ENABLE_AVX=0), or is given a
    feature list (NUMBA_CPU_FEATURES) that does not turn each of them on: LLVM would abort on
    intrinsics that need them, so portable kernels must run instead."""
    cfg = numba.config
    if cfg.CPU_NAME not in (None, "host") or not cfg.ENABLE_AVX:
        return False
    if cfg.CPU_FEATURES:
        on = {f[1:] for f in cfg.CPU_FEATURES.split(",") if f.startswith("+")}
        return all(f in on for f in features)
    try:
        host = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return all(host.get(f) for f in features)


def host_target() -> str:
    """The target facts that choose between code paths (part of every cache key)."""
    return f"avx2={compiles_for('avx2', 'f16c')} vnni={compiles_for('avx512f', 'avx512bw', 'avx512vl', 'avx512vnni', 'f16c')}"


# ---------------------------------------------------------------- cache keys

def _module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = _ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# An import statement, found by its text: `from X import NAMES` (NAMES may be parenthesized over
# several lines) or `import NAMES`, at any indentation. Parsing every file with `ast` took
# 0.3-0.5 s of each process's start; this finds the same imports (tests/test_kernel_cache.py
# checks it against `ast` on every project file), and where text in a string looks like an
# import it can only add a file to a stamp, never drop one.
_IMPORT = re.compile(rb"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)|import[ \t]+([^\n]*))", re.M)
_NAME = re.compile(rb"[\w.]+")


def _names(text: bytes) -> list[str]:
    """The imported names of an import list: `a as b, c.d` -> [a, c.d]."""
    text = re.sub(rb"#[^\n]*", b"", text).strip(b"()\\ \t\n")
    names = []
    for part in text.split(b","):
        m = _NAME.match(part.strip())
        if m:
            names.append(m.group().decode())
    return names


@lru_cache(maxsize=None)
def _imports(path: Path) -> frozenset[Path]:
    """Project source files that the module at `path` imports (module- or function-level).
    Memoized: the closures of the ~25 kernel files share most of their files."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for m in _IMPORT.finditer(path.read_bytes()):
        if m.group(3) is not None:
            targets = _names(m.group(3))
        else:
            dots = len(m.group(1)) - len(m.group(1).lstrip(b"."))
            base = m.group(1)[dots:].decode()
            if dots:
                anchor = package[: len(package) - (dots - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{n}" for n in _names(m.group(2))]
        for t in targets:
            f = _module_file(t)
            if f is not None:
                found.add(f)
    return frozenset(found)


def imported_files(path: str) -> set[Path]:
    """The module at `path` and every project module it imports, transitively."""
    seen: set[Path] = set()
    todo = [Path(path).resolve()]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(_imports(p) - seen)
    return seen


@lru_cache(maxsize=None)
def source_stamp(path: str) -> str:
    """Hash of the module at `path`, of every project module it imports transitively, and of
    the host target facts."""
    h = hashlib.sha256(host_target().encode())
    for p in sorted(imported_files(path)):
        h.update(str(p.relative_to(_ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _in_project(py_file: str) -> bool:
    try:
        rel = Path(py_file).resolve().relative_to(_ROOT)
    except ValueError:
        return False
    return rel.parts[0] in PACKAGES and rel.suffix == ".py"


class _ProjectStamp:
    """Mixed into Numba's locators: same cache place, a source stamp over the inlined sources."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _in_project(py_file):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return source_stamp(os.path.abspath(self._py_file))


def _numba(name: str):
    """A class of numba.core.caching (public since Numba 0.61, underscored before)."""
    return getattr(_caching, name, None) or getattr(_caching, "_" + name)


def _register() -> None:
    classes = _numba("CacheImpl")._locator_classes
    if any(issubclass(c, _ProjectStamp) for c in classes):
        return
    bases = [_numba(n) for n in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    classes[:0] = [type(f"Project{b.__name__.lstrip('_')}", (_ProjectStamp, b), {}) for b in bases]


_register()
_MISSING = numba_cache.install()  # cached code named by its key, symbols unique across processes (see there)
if _MISSING:
    warnings.warn("this Numba lacks what stepstream needs for "
                  f"{' and '.join(_MISSING)}: processes sharing the kernel cache may load each other's code",
                  RuntimeWarning, stacklevel=2)


@numba.njit(inline="always", cache=True)
def opaque(n, k):
    """k (which must divide n, n > 0), computed so that LLVM cannot tell it is a constant: with a
    literal trip count LLVM unrolls a short inner loop completely and vectorizes the loop around
    it instead, with gathers, which runs several times slower."""
    return n // (n // k)
