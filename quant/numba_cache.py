"""Numba's on-disk cache made safe for several processes compiling the same function at once.

Numba names a function's cached machine code by a counter: the first signature saved goes to
``f.1.nbc``, the next one to ``f.2.nbc``, and the index ``f.nbi`` maps each signature to its
file. Two processes that compile different signatures of one kernel at the same time (two
pytest-xdist workers, a server beside a benchmark, an f16 and a q8_0 KV cache variant) both
read the same index, both pick ``f.1.nbc``, and the last index written can then map one
signature to the other's code: the next process to load it runs the wrong machine code and
crashes. This was seen as repeated segfaults when kernels were loaded from a shared cache.

Here each file is named by a hash of its index key and the source stamp, so a name only ever
holds the code of one signature of one version of the source. The code is written before the
index names it (both atomically, by Numba's own temporary-file-and-rename), so a reader never
finds an index entry whose file is missing or holds something else. Two writers may still
each drop the other's new index entry; that costs a compile later, never a wrong load.

Symbol names. Numba names a compiled function's machine code by its qualified name, its
argument types and a per-process counter (``FunctionIdentity``'s unique id, ``...B3v57...``
in the symbol). Two functions with one qualified name and one set of argument types are told
apart by that counter alone: closures made by one factory (our kernels built per format set,
``few_kernels.build(formats).gemv``), or an overload's ``impl`` closing over another kernel.
Within one process the counter keeps them apart; across processes it does not. A kernel
compiled in one process for one format set and a kernel compiled in another for another
set can carry the same symbol, and when a third process loads both from the cache and
compiles a caller of one of them, the call is linked to whichever definition the JIT met
first: the kernel of the other format set runs, on matrices it cannot read. (Seen as a
few-token projection left unwritten, and a NaN softmax reported as a division by zero.)
So each process starts the counter at a random 40-bit multiple of 2**20: while each compiles
fewer than 2**20 functions, two processes' symbols can only meet when they draw the same
multiple, a chance of 2**-40 per pair of processes.

Parallel callees loaded from the cache. A kernel that uses parfors records, in its cache entry,
that loading it must first start Numba's thread pool (``reload_init``: the symbols its parallel
loops call are defined then). A caller inherits that record from the libraries it links, but
Numba gives a library rebuilt from the cache an empty record. So a kernel compiled in a process
that loaded its parallel callee from the cache (the decode step's attention half calling the
cached GEMV) was cached without it, and a later process that called it first, before any other
parallel kernel, jumped to address 0 (seen as a segfault of the first decode step, reproduced
by tests/test_numba_cache.py). _rebuild gives the rebuilt library its record back.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import secrets

import numba.core.caching as _caching
from numba.core.bytecode import FunctionIdentity
from numba.core.compiler import CompileResult

_FILE = getattr(_caching, "IndexDataCacheFile", None)


def _data_name(cache_file, key) -> str:
    """The data file of `key`: the function's base name and a digest of the key and the stamp."""
    digest = hashlib.sha256(pickle.dumps((key, cache_file._source_stamp), protocol=4)).hexdigest()[:24]
    return f"{cache_file._index_name[: -len('.nbi')]}.{digest}.nbc"


def _save(self, key, data) -> None:
    """IndexDataCacheFile.save: the code under its own name first, then the index entry."""
    name = _data_name(self, key)
    self._save_data(name, data)
    overloads = self._load_index()  # as fresh as possible: another process may have added entries
    if overloads.get(key) != name:
        overloads[key] = name
        self._save_index(overloads)


UID_BLOCK = 1 << 20  # unique ids a process may take before it could reach another's range


def _random_unique_ids() -> None:
    """Start this process's function-identity counter at a random multiple of UID_BLOCK
    (see the module doc: symbol names); once per process, before any compile needs it."""
    if not getattr(FunctionIdentity, "_stepstream_random", False):
        FunctionIdentity._unique_ids = itertools.count(UID_BLOCK * (1 + secrets.randbits(40)))
        FunctionIdentity._stepstream_random = True


_REBUILD = CompileResult.__dict__.get("_rebuild")


def _rebuild(cls, *args, **kwargs):
    """CompileResult._rebuild (a cached kernel loaded), its library given the kernel's reload_init."""
    cres = _REBUILD.__func__(cls, *args, **kwargs)
    if cres.reload_init:
        cres.library._reload_init.update(cres.reload_init)
    return cres


def install() -> list[str]:
    """Replace IndexDataCacheFile.save, keep rebuilt libraries' reload_init and randomize the
    symbol counter in this process, each where this Numba has the parts; the parts it lacks,
    named (empty when all are in)."""
    missing = []
    needed = ("_save_data", "_load_index", "_save_index")
    if _FILE is None or not all(hasattr(_FILE, n) for n in needed):
        missing.append("per-signature cache file names (numba.core.caching.IndexDataCacheFile)")
    elif _FILE.save is not _save:
        _FILE.save = _save
    if isinstance(_REBUILD, classmethod) and hasattr(CompileResult, "reload_init"):
        if CompileResult.__dict__["_rebuild"] is _REBUILD:
            CompileResult._rebuild = classmethod(_rebuild)
    else:
        missing.append("parallel callees' reload_init kept (numba.core.compiler.CompileResult._rebuild)")
    if isinstance(getattr(FunctionIdentity, "_unique_ids", None), itertools.count):
        _random_unique_ids()
    else:
        missing.append("per-process symbol names (numba.core.bytecode.FunctionIdentity._unique_ids)")
    return missing
