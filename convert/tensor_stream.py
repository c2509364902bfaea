"""One tensor's GGUF bytes, streamed from the checkpoint in row chunks and written as they come.

Shape legend
    E   expert slices of a fused [E, ...] tensor (1 for any other tensor)
    R   rows of one slice (all dimensions but the last)
    C   row length, the last dimension
    r   rows of one chunk, at most CHUNK_WEIGHTS // C (at least 1)

Every quantizer works row by row (K-quants per row, Q8_0/Q4_0 per 32-weight block, floats
per element), so cutting a slice into chunks of whole rows gives the same bytes as encoding
it whole, while memory stays at two chunks whatever the tensor: a 128K x 4096 embedding is
read 512 rows at a time, not as 2 GB of float32. A reader thread reads and widens the next
chunk while the current one is quantized (the quantizers are Numba kernels that release the
GIL and run their rows on every core), so the disk and the cores work at the same time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numba as nb
import numpy as np
import quant
from gguf import GGMLQuantizationType as Q
from quant.formats import get_format
from convert import fp8_source, layout
from convert.safetensors_io import Checkpoint
from runtime.base import interrupts
from runtime.base.errors import StepstreamError

CHUNK_WEIGHTS = 1 << 21  # 8 MiB of float32 per chunk; two chunks are alive at a time

def writer(qtype) -> Callable[[np.ndarray], np.ndarray]:
    """The quantizer of `qtype`: float32 [R, C] -> GGUF bytes uint8 [R, row_bytes]. Raises
    StepstreamError for a format stepstream reads but cannot write, so a plan that needs one
    fails before any data is touched."""
    q = Q(qtype)
    probe = np.zeros((1, get_format(q).block_size), np.float32)
    try:
        quant.quantize(probe, q)
    except ValueError as e:
        raise StepstreamError(f"cannot write {q.name} tensors: {e}") from None
    return lambda x: quant.quantize(x, q)


# Where the float16 fields of each written format's blocks sit (byte offsets in a block): a
# magnitude beyond float16's 65504 there, after the quantizer's division, becomes Inf.
_F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.IQ4_NL: (0,)}


def overflows(qtype, data: np.ndarray) -> bool:
    """Whether GGUF bytes `data` (uint8 [R, row_bytes]) hold an Inf or NaN where the format keeps
    halves or bfloat16s: F16 and BF16 values, the quantized formats' float16 scales."""
    q = Q(qtype)
    if q in (Q.F16, Q.BF16):
        exp = 0x7C00 if q == Q.F16 else 0x7F80
        return bool(np.any((data.view(np.uint16) & exp) == exp))
    fields = _F16_FIELDS.get(q)
    if not fields or data.size == 0:
        return False
    blocks = data.reshape(-1, get_format(q).block_bytes)
    return any(bool(np.any((np.ascontiguousarray(blocks[:, o:o + 2]).view(np.uint16) & 0x7C00) == 0x7C00))
               for o in fields)


@dataclass(frozen=True)
class Chunk:
    index: int | None  # expert slice, or None for a tensor read whole
    start: int  # first element, in the whole tensor
    count: int  # elements, a whole number of rows
    offset: int  # first element, in its slice (for error messages)


def chunks(shape: tuple[int, ...], role: str, chunk_weights: int) -> Iterator[Chunk]:
    """The chunks of a tensor in file order: whole rows, never across an expert slice."""
    cols = shape[-1] if shape else 1
    n = 1
    for d in shape:
        n *= d
    n_slices = shape[0] if role == layout.EXPERTS else 1
    per_slice = n // n_slices if n_slices else 0
    step = max(1, chunk_weights // max(cols, 1)) * cols
    for e in range(n_slices):
        for off in range(0, per_slice, step):
            yield Chunk(e if role == layout.EXPERTS else None, e * per_slice + off, min(step, per_slice - off), off)


@nb.njit(cache=True, nogil=True)
def widen_bf16(bits, out):
    """out uint32 [n], the bits of a float32 buffer, = bf16 bits uint16 [n] << 16."""
    for i in range(bits.shape[0]):
        out[i] = np.uint32(bits[i]) << np.uint32(16)


@nb.njit(cache=True, nogil=True)
def first_non_finite(bits):
    """Index of the first NaN or Inf among float32 bits uint32 [n], or -1. One pass that
    vectorizes (an OR over the exponents), a second only when something is found."""
    exp = np.uint32(0x7F800000)
    hit = np.uint32(0)
    for i in range(bits.shape[0]):
        hit |= np.uint32((bits[i] & exp) == exp)
    if hit:
        for i in range(bits.shape[0]):
            if (bits[i] & exp) == exp:
                return i
    return -1


def load_kernels() -> None:
    """Load the reader's kernels now. The first Numba kernel a process loads brings LLVM with
    it (about 60 MiB of RSS, once): a fixed cost the converter takes before it measures its
    starting RSS, so that growth with the model stays visible on its own."""
    widen_bf16(np.zeros(1, np.uint16), np.zeros(1, np.uint32))
    first_non_finite(np.zeros(1, np.uint32))


def _load(ckpt: Checkpoint, name: str, where: Path, role: str, c: Chunk, cols: int,
          scales: fp8_source.Scales | None) -> np.ndarray:
    """float32 [count] of one chunk, checked finite, norms given their +1, FP8 codes scaled."""
    raw = ckpt.read_raw(name, c.start, c.count)
    if scales is not None:
        x = fp8_source.dequantize_chunk(ckpt, scales, raw, c.index or 0, c.offset // cols, cols)
    elif raw.dtype == np.uint16:  # bf16 bits
        x = np.empty(c.count, np.float32)
        widen_bf16(raw, x.view(np.uint32))
    else:
        x = raw.astype(np.float32)
    bad = first_non_finite(x.view(np.uint32))
    if bad >= 0:
        part = f" (expert {c.index})" if c.index is not None else ""
        raise StepstreamError(f"{where}: tensor {name!r}{part} holds NaN or Inf (first at flat index {c.offset + bad})")
    if role == layout.NORM:
        x += np.float32(1.0)
    return x


def write_tensor(f, ckpt: Checkpoint, spec: layout.TensorSpec, qtype, reader: ThreadPoolExecutor,
                 progress: Callable[[int], None] | None = None, scales: fp8_source.Scales | None = None) -> int:
    """Write one tensor's GGUF bytes at f's position; returns the bytes written.

    `reader` (one thread) reads chunk k+1 while chunk k is quantized; `progress` is told the
    checkpoint bytes of each chunk once it is written. `scales`: an FP8 weight's."""
    where = ckpt.file_of(spec.hf_name)
    width = ckpt.entry(spec.hf_name).nbytes // max(spec.n_elements, 1)
    cols = spec.shape[-1]
    quantize = writer(qtype)

    def encode(x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, by name
            data = quantize(x)
        if overflows(qtype, data):
            raise StepstreamError(f"{where}: tensor {spec.hf_name!r} holds values too large for {Q(qtype).name} "
                                  f"(largest magnitude {float(np.abs(x).max()):.3g}: its float16 values or scales "
                                  f"would be Inf); convert with --type bf16 or f32, or check the checkpoint")
        return data

    written = 0
    pending = None
    for c in chunks(spec.shape, spec.role, CHUNK_WEIGHTS):
        interrupts.check()  # a Ctrl-C or SIGTERM held back meanwhile (see runtime.base.interrupts)
        nxt = reader.submit(_load, ckpt, spec.hf_name, where, spec.role, c, cols, scales)
        if pending is not None:
            written += _encode(f, pending, cols, encode, width, progress)
        pending = nxt
    if pending is not None:
        written += _encode(f, pending, cols, encode, width, progress)
    return written


def _encode(f, future, cols: int, encode, width: int, progress) -> int:
    x = future.result()
    data = encode(x.reshape(-1, cols))
    f.write(memoryview(data).cast("B"))
    if progress is not None:
        progress(x.size * width)
    return data.nbytes
