"""numba's CUDA simulator, made to hand every thread of a block the same static shared array.

The simulator runs a block's threads as Python threads. A static `cuda.shared.array` is made on
the first call of a kernel launch from its source line: numba looks the line up in a dict and,
on a miss, makes the array (np.empty) and stores it, with no lock between the look-up and the
store (numba 0.68's numba/cuda/simulator/kernelapi.py, FakeCUDAShared.array; numba-cuda has the
same code). When the interpreter switches threads inside that window, two threads each make an
array: one of them then writes to and reads from an array no other thread sees, and the others
read its slot of the stored one uninitialized. quantize_kernel once asked for a shared array
from 256 threads released together by a barrier; about one launch in a hundred got such a
stray thread, so a 16-column activation sum came out as garbage, and the Q4_K / Q5_K min term
of every later product with it (issue 16: the stacked-matvec test failed in 2 of 3 CI runs). A card has no such step:
static shared memory is laid out when the kernel is compiled.

`thread_safe_shared_arrays()` replaces that method with one that looks up and stores under a
lock, keyed as numba keys it (the caller's file and line). Every module that defines a kernel
with a static shared array calls it at import; it does nothing outside the simulator.
"""

from __future__ import annotations

import sys
import threading

import numba
import numpy as np
from numba.np import numpy_support

SIMULATED = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))  # numba's own setting, read at its import

_LOCK = threading.Lock()


def _shared_array(self, shape, dtype, alignment=None):
    """FakeCUDAShared.array: the launch's one array per source line, made once under a lock."""
    if alignment is not None:  # as numba-cuda's simulator, which has the parameter
        raise RuntimeError("Array alignment is not supported in cudasim")
    if isinstance(dtype, numba.types.Type):
        dtype = numpy_support.as_dtype(dtype)
    if shape == 0:  # dynamic shared memory: one buffer, made before the block's threads start
        count = self._dynshared_size // dtype.itemsize
        return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    with _LOCK:
        res = self._allocations.get(key)
        if res is None:
            res = np.empty(shape, dtype)  # uninitialized, as on a card
            self._allocations[key] = res
    return res


def thread_safe_shared_arrays() -> bool:
    """Install the locked shared-array allocator in numba's simulator (once); whether it is in place.
    False when numba runs kernels on a card, or when its simulator lacks the method this replaces."""
    if not SIMULATED:
        return False
    from numba.cuda.simulator import kernelapi

    shared = getattr(kernelapi, "FakeCUDAShared", None)
    if shared is None or not hasattr(shared, "array"):
        return False
    if shared.array is not _shared_array:
        shared.array = _shared_array
    return True
