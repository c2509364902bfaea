"""quant.numba_cache: Numba's on-disk cache names each compiled signature's file by its key, so
processes compiling different signatures of one kernel at once never map a signature to
another's machine code (Numba numbers the files from a shared counter: two processes reading
the same index both pick `f.1.nbc`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numba.core.caching as caching

import quant.jit  # noqa: F401  (installs the naming)
from quant import numba_cache

STAMP = ("mtime", 123)


def _file(tmp_path, stamp=STAMP):
    return caching.IndexDataCacheFile(str(tmp_path), "mod.kernel-12.py311", stamp)


def test_installed_by_quant_jit():
    assert caching.IndexDataCacheFile.save is numba_cache._save
    assert numba_cache.install() == []  # this Numba has both parts (and installing again is harmless)


def test_one_name_per_key_and_source_version(tmp_path):
    a, b = _file(tmp_path), _file(tmp_path, ("mtime", 124))
    n1, n2 = numba_cache._data_name(a, ("sig-int64",)), numba_cache._data_name(a, ("sig-float64",))
    assert n1 != n2 and n1 == numba_cache._data_name(_file(tmp_path), ("sig-int64",))
    assert numba_cache._data_name(b, ("sig-int64",)) != n1  # an edited source never reuses a name
    assert re.fullmatch(r"mod\.kernel-12\.py311\.[0-9a-f]{24}\.nbc", n1)


def test_a_stale_index_loses_an_entry_never_maps_it_to_other_code(tmp_path):
    """Process B saves with the index it read before process A saved (its view is stale): A's
    entry is dropped from the index, but every name still holds its own key's code."""
    a, b = _file(tmp_path), _file(tmp_path)
    b._load_index = lambda: {}  # B read the index before A wrote it
    a.save(("sig-int64",), "code for int64")
    b.save(("sig-float64",), "code for float64")
    reader = _file(tmp_path)
    assert reader.load(("sig-float64",)) == "code for float64"
    assert reader.load(("sig-int64",)) in (None, "code for int64")
    for key, code in ((("sig-int64",), "code for int64"), (("sig-float64",), "code for float64")):
        assert reader._load_data(numba_cache._data_name(reader, key)) == code


def test_counter_names_would_cross(tmp_path):
    """The defect this module removes, on Numba's own naming: A's index entry and B's code
    under the same counter name make A's signature load B's code."""
    a, b = _file(tmp_path), _file(tmp_path)
    name_a = a._data_name(1)
    name_b = b._data_name(1)  # B read the same (empty) index: the same first free number
    assert name_a == name_b
    a._save_index({("sig-int64",): name_a})
    b._save_data(name_b, "code for float64")
    assert _file(tmp_path).load(("sig-int64",)) == "code for float64"  # the wrong machine code


KERNEL = textwrap.dedent("""
    import sys
    import numba
    import quant.jit  # noqa: F401
    @numba.njit(cache=True)
    def twice(x):
        return x + x
    x = {"int": 21, "float": 1.25, "both": None}[sys.argv[1]]
    if x is None:
        print(twice(21), twice(1.25))
    else:
        print(twice(x))
""")


def test_concurrent_compiles_of_two_signatures_load_back(tmp_path):
    """Two processes compile two signatures of one cached function at the same time; a third
    loads both from the cache and gets each one's own result."""
    script = tmp_path / "kernel_mod.py"
    script.write_text(KERNEL)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(script), kind], env=env, stdout=subprocess.PIPE, text=True)
             for kind in ("int", "float")]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert outs == [["42"], ["2.5"]]
    done = subprocess.run([sys.executable, str(script), "both"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["42", "2.5"], done.stderr
    names = [n for _, _, files in os.walk(tmp_path / "cache") for n in files if n.endswith(".nbc")]
    assert names and all(re.search(r"\.[0-9a-f]{24}\.nbc$", n) for n in names), names


FACTORY = textwrap.dedent("""
    import sys
    from functools import lru_cache
    import numba
    import numpy as np
    import quant.jit  # noqa: F401

    @lru_cache(maxsize=None)
    def build(k):  # as few_kernels.build(formats): closures with one name, told apart by k
        @numba.njit(parallel=True, cache=True)
        def fill(out):
            for i in numba.prange(out.shape[0]):
                out[i] = np.sin(np.float64(i)) * 0.0 + k

        @numba.njit
        def caller(out):  # compiled in the process that runs it, linked to a cached `fill`
            fill(out)
            return out.sum()
        return fill, caller

    out = np.zeros(100)
    for arg in sys.argv[1:]:
        fill, caller = build(int(arg[0]))
        if arg[1] == "f":
            fill(out)
            print(out.sum())
        else:
            print(caller(out))
""")


def test_closures_cached_by_two_processes_keep_their_own_code(tmp_path):
    """Process A caches the closure for k=1, process B the one for k=2, each with the same
    history, so Numba's per-process counter gives both the same symbol. A third process loads
    both and compiles a caller of the k=2 one: it must run k=2's code (it ran k=1's, 100.0,
    before each process's counter started at a random offset)."""
    script = tmp_path / "factory_mod.py"
    script.write_text(FACTORY)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(*args):
        done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return [float(v) for v in done.stdout.split()]

    assert run("1f") == [100.0] and run("2f") == [200.0]
    assert run("2f", "1f", "1c", "2c") == [200.0, 100.0, 100.0, 200.0]


def test_each_process_starts_its_own_symbol_counter():
    code = ("import quant.jit, numba\n"
            "from numba.core.bytecode import FunctionIdentity as F\n"
            "print(F.from_function(lambda: 0).unique_id)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ids = [int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=120, check=True).stdout) for _ in range(3)]
    assert len(set(ids)) == 3 and all(i >= numba_cache.UID_BLOCK for i in ids), ids


PARALLEL_CALLEE = textwrap.dedent("""
    import sys
    import quant.jit  # noqa: F401  (installs quant.numba_cache)
    import numba as nb
    import numpy as np

    @nb.njit(parallel=True, cache=True)
    def total(a):
        s = 0.0
        for i in nb.prange(a.shape[0]):
            s += a[i]
        return s

    @nb.njit(cache=True)
    def caller(a):
        return total(a) + 1.0

    print((total if sys.argv[1] == "callee" else caller)(np.ones(10)))
""")


def test_a_caller_cached_against_a_cached_parallel_callee_loads_first(tmp_path):
    """Process A caches a parallel kernel; process B loads it from the cache and compiles and
    caches a caller; process C loads the caller and calls it before any parallel kernel. The
    caller's entry must still start the thread pool on load (Numba dropped that from libraries
    rebuilt from the cache: C jumped to address 0, as the decode step's first call did)."""
    script = tmp_path / "parallel_mod.py"
    script.write_text(PARALLEL_CALLEE)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    outs = []
    for role in ("callee", "caller", "caller"):
        done = subprocess.run([sys.executable, str(script), role], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{role}: exit {done.returncode}\n{done.stderr[-2000:]}"
        outs.append(float(done.stdout.split()[-1]))
    assert outs == [10.0, 11.0, 11.0]
