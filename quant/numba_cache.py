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
"""

from __future__ import annotations

import hashlib
import pickle

import numba.core.caching as _caching

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


def install() -> bool:
    """Replace IndexDataCacheFile.save in this process; False when this Numba lacks the parts."""
    needed = ("_save_data", "_load_index", "_save_index")
    if _FILE is None or not all(hasattr(_FILE, n) for n in needed):
        return False
    if _FILE.save is not _save:
        _FILE.save = _save
    return True
