"""Fuzzing the GGUF open path: a real small GGUF (the tiny checkpoint quantized by llama.cpp)
with its header, metadata and tensor directory mutated (bit flips, truncations, byte splices,
boundary values written over counts, lengths, types and offsets), then opened with
runtime.load, which reads the header, builds the config, binds the weights and builds the
model without running it.

Every input must either load or raise StepstreamError: never another exception, never more
than a few seconds (a hang), and never a traced allocation larger than the file (plus 1 MiB).

    pytest tests/test_hardening_gguf_fuzz.py                   # bounded: 200 examples, derandomized (~9 s)
    STEPSTREAM_FUZZ_EXAMPLES=20000 pytest tests/test_hardening_gguf_fuzz.py -s    # a longer campaign
    python -m tests.test_hardening_gguf_fuzz --atheris -runs=N     # coverage-guided (atheris, libFuzzer flags)

The campaign prints how many inputs loaded and how many were refused.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import struct
import sys
import tempfile
import tracemalloc
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime.base.errors import StepstreamError

EXAMPLES = int(os.environ.get("STEPSTREAM_FUZZ_EXAMPLES", "200"))
LONG = "STEPSTREAM_FUZZ_EXAMPLES" in os.environ
TIME_LIMIT_S = 20  # one open; a clean refusal takes milliseconds, a valid load ~0.1 s
BOUNDARY = (0, 1, 2, 3, 4, 7, 31, 32, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
            2**62, 2**63 - 1, 2**63, 2**64 - 1)


SLACK = 1 << 20  # the interpreter's own bookkeeping (messages, tracebacks): a fixed 1 MiB over the file


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"opening took over {TIME_LIMIT_S} s")


def open_once(path: Path) -> str:
    """'loaded' or 'refused'; anything else is a finding and raises AssertionError."""
    size = path.stat().st_size
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    tracemalloc.start()
    try:
        runtime.load(path)
        outcome = "loaded"
    except StepstreamError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
        outcome = "refused"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert peak < size + SLACK, f"peak traced allocation {peak} bytes, file {size} bytes"
    return outcome


def structure_positions(path: Path) -> list[int]:
    """Byte positions of every count, length, type and offset in the header (found by gguf-py)."""
    r = gguf.GGUFReader(path)
    pos = [4, 8, 16]  # version, tensor count, metadata count
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        at = f.offset
        pos += [at, at + 8 + len(key.encode())]  # key length, value type
        v = at + 8 + len(key.encode()) + 4
        pos.append(v)  # scalar, string length or array element type
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            pos.append(v + 4)  # array length
    for t in r.tensors:
        at = t.field.offset
        dims = at + 8 + len(t.name.encode()) + 4
        pos += [at, dims - 4] + [dims + 8 * i for i in range(len(t.shape))]
        pos += [dims + 8 * len(t.shape), dims + 8 * len(t.shape) + 4]  # type, offset
    return pos


def _mutation(header_len: int, structural: list[int]):
    """A strategy of functions header bytes -> header bytes."""
    pos = st.one_of(st.sampled_from(structural), st.integers(0, header_len - 1))

    def flip(p, bit):
        return lambda b: b[:p] + bytes([b[p] ^ (1 << bit)]) + b[p + 1 :] if p < len(b) else b

    def word(p, value, width):
        return lambda b: b[:p] + struct.pack("<Q" if width == 8 else "<I", value % (1 << 8 * width)) + b[p + width :]

    def splice(p, junk, delete):
        return lambda b: b[:p] + junk + b[p + delete :]

    return st.one_of(
        st.builds(flip, pos, st.integers(0, 7)),
        st.builds(word, pos, st.sampled_from(BOUNDARY) | st.integers(0, 2**64 - 1), st.sampled_from([4, 8])),
        st.builds(splice, pos, st.binary(max_size=16), st.integers(0, 16)),
    )


class _Target:
    """The mutated file on disk: a header of unchanged length is written over a kept copy of the
    seed (9 MB need not be rewritten per example); anything else is written whole."""

    def __init__(self, path: Path, data: bytes, header_len: int):
        self.path, self.data, self.header_len = path, data, header_len
        self.path.write_bytes(data)
        self.intact = True

    def write(self, header: bytes, cut: int | None) -> Path:
        if cut is None and len(header) == self.header_len:
            if not self.intact:
                self.path.write_bytes(self.data)
            with open(self.path, "r+b") as f:
                f.write(header)
            self.intact = True
        else:
            self.path.write_bytes((header + self.data[self.header_len :])[:cut])
            self.intact = False
        return self.path


@pytest.fixture(scope="module")
def seed(tiny_gguf, tmp_path_factory):
    """The tiny f32 file quantized by llama.cpp to Q4_K_M: 9 MB, a 39 KB header."""
    import llama_cpp

    out = tmp_path_factory.mktemp("fuzz") / "seed-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tiny_gguf("f32")).encode(), str(out).encode(), ctypes.byref(params)) == 0
    runtime.load(out)  # imports and compiled kernels, once, outside the measured opens
    assert open_once(out) == "loaded"
    return out


def test_fuzz_gguf_open_path(seed, tmp_path):
    data = seed.read_bytes()
    header_len = int(gguf.GGUFReader(seed).data_offset)
    structural = structure_positions(seed)
    outcomes = collections.Counter()
    target = _Target(tmp_path / "m.gguf", data, header_len)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_mutation(header_len, structural), min_size=1, max_size=4),
           st.none() | st.integers(0, header_len + 64))
    def one(mutations, cut):
        header = data[:header_len]
        for m in mutations:
            header = m(header)
        outcomes[open_once(target.write(header, cut))] += 1

    one()
    print(f"\nGGUF fuzz: {sum(outcomes.values())} inputs, {outcomes['loaded']} loaded, {outcomes['refused']} refused "
          "with StepstreamError, 0 other exceptions, hangs or oversized allocations")
    assert outcomes["refused"] > EXAMPLES // 4  # the mutations do reach the checks


def _instrument(atheris) -> None:
    """Coverage feedback from the modules of the open path (instrumenting numpy too would only
    slow each run)."""
    import inspect

    from runtime.base import config, gguf_file, gguf_header, tensor_shapes

    for module in (gguf_header, gguf_file, config, tensor_shapes):
        for obj in vars(module).values():
            funcs = [obj] if inspect.isfunction(obj) else \
                [v for v in vars(obj).values() if inspect.isfunction(v)] if inspect.isclass(obj) else []
            for fn in funcs:
                if fn.__module__ == module.__name__:
                    atheris.instrument_func(fn)


def _atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing with atheris over the same open path, seeded with the header of
    a real file. Needs a seed GGUF: set STEPSTREAM_FUZZ_SEED, or one is made from the tiny model."""
    import atheris

    seed_path = os.environ.get("STEPSTREAM_FUZZ_SEED")
    if seed_path is None:
        from convert.converter import convert
        from convert.mini import write_mini

        d = Path(tempfile.mkdtemp(prefix="ggufseed"))
        seed_path = d / "seed.gguf"
        convert(write_mini(d / "ckpt", "tiny", seed=0), seed_path, "q4_k_m", progress=False)
    data = Path(seed_path).read_bytes()
    header_len = int(gguf.GGUFReader(seed_path).data_offset)
    target = Path(tempfile.mkdtemp(prefix="ggufuzz")) / "m.gguf"
    outcomes = collections.Counter()

    def one(header: bytes) -> None:
        target.write_bytes(header + data[header_len:])
        outcomes[open_once(target)] += 1
        if sum(outcomes.values()) % 1000 == 0:
            print(f"GGUF fuzz (atheris): {dict(outcomes)}", flush=True)

    runtime.load(seed_path)  # imports and compiled kernels, outside the timed opens
    _instrument(atheris)
    corpus = Path(tempfile.mkdtemp(prefix="ggufcorpus"))
    (corpus / "seed").write_bytes(data[:header_len])
    print(f"GGUF fuzz (atheris): corpus and crash files in {corpus}", flush=True)
    atheris.Setup([sys.argv[0], str(corpus), f"-artifact_prefix={corpus}/", *argv], one)
    atheris.Fuzz()


if __name__ == "__main__":
    if "--atheris" in sys.argv:
        _atheris_main([a for a in sys.argv[1:] if a != "--atheris"])
    else:
        sys.exit(pytest.main([__file__, "-s"]))
