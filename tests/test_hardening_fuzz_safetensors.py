"""Fuzzing the safetensors header path: SafetensorsFile (header framing, JSON, every entry) and
Checkpoint (the index and its shard names), then a read of every tensor the header accepted.

Every input must either open or raise StepstreamError (one line, naming the file): never another
exception, never more than a few seconds (a hang), and never an allocation driven by what the
header claims. Inputs come from five families: a valid shard with mutated bytes (bit flips,
boundary values written over the length and offsets, splices, truncations), headers built from
hostile field values, arbitrary JSON as header, raw bytes, and indexes with hostile shard names.

    pytest tests/test_hardening_fuzz_safetensors.py                  # bounded: ~550 examples, derandomized
    STEPSTREAM_FUZZ_EXAMPLES=20000 pytest tests/test_hardening_fuzz_safetensors.py -s  # a longer campaign
    python -m tests.test_hardening_fuzz_safetensors --atheris [-atheris_runs=N]      # coverage-guided (atheris)

The examples are split between the families (mutations and hostile headers get the most); the
run prints how many inputs opened and how many were refused.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import struct
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from convert.safetensors_header import DTYPE_BITS
from convert.safetensors_io import Checkpoint, SafetensorsFile, SafetensorsWriter
from runtime.base.errors import StepstreamError

EXAMPLES = int(os.environ.get("STEPSTREAM_FUZZ_EXAMPLES", "200"))
LONG = "STEPSTREAM_FUZZ_EXAMPLES" in os.environ
TIME_LIMIT_S = 10  # one open and read; a refusal takes well under a millisecond
BOUNDARY = (0, 1, 2, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
            2**62, 2**63 - 1, 2**63, 2**64 - 1)
# Python's JSON objects cost a few tens of bytes per byte of header in the worst case ("{}" is a
# 64-byte dict); an allocation the header *claims* (2**40 elements) would be far past this bound.
JSON_FACTOR, SLACK = 64, 2**20
OUTCOMES: collections.Counter = collections.Counter()
REASONS: collections.Counter = collections.Counter()  # refusal messages, file names and values blanked
WORST = {"peak": 0, "size": 0, "ratio": 0.0}  # largest traced peak; worst peak/size over files of 1 KiB or more


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"took over {TIME_LIMIT_S} s")


def _guarded(path: Path, action, named: Path | None = None) -> str:
    """Run action(); 'opened' or 'refused'. Anything else is a finding and raises AssertionError.

    A refusal is one line naming `named` (default: the file itself)."""
    size = path.stat().st_size if path.is_file() else 0
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    tracemalloc.start()
    try:
        action()
        outcome = "opened"
    except StepstreamError as e:
        assert "\n" not in str(e) and str(named or path) in str(e), str(e)
        outcome = "refused"
        REASONS[_reason(str(e), path)] += 1
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert peak <= JSON_FACTOR * size + SLACK, f"peak traced allocation {peak} bytes, file {size} bytes"
    if peak > WORST["peak"]:
        WORST.update(peak=peak, size=size)
    if size >= 1024:
        WORST["ratio"] = max(WORST["ratio"], peak / size)
    OUTCOMES[outcome] += 1
    return outcome


def _reason(msg: str, path: Path) -> str:
    msg = msg.replace(str(path.parent), "DIR")
    msg = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "X", msg)
    msg = re.sub(r"\(.*\)", "(...)", msg)
    return re.sub(r"-?\d+", "N", msg.split(";")[0])[:90]


def _open_and_read(path: Path) -> None:
    f = SafetensorsFile(path)
    size = path.stat().st_size
    hlen = struct.unpack("<Q", path.read_bytes()[:8])[0]
    for name, e in f.entries.items():
        assert 8 + hlen <= e.begin <= e.end <= size, (name, e)  # inside the data area
        assert DTYPE_BITS[e.dtype] * int(np.prod(e.shape, dtype=object)) == 8 * e.nbytes
        if e.dtype in ("F32", "F16", "BF16"):
            x = f.read(name)
            assert x.shape == e.shape and x.dtype == np.float32
            if e.shape and e.shape[0]:  # the converter's expert-slice read
                assert f.read(name, e.shape[0] - 1).shape == e.shape[1:]


def check_shard_bytes(path: Path, raw: bytes) -> str:
    path.write_bytes(raw)
    return _guarded(path, lambda: _open_and_read(path))


# --- family 1: a valid shard, its bytes mutated ---------------------------------------------

def seed_shard(path: Path) -> Path:
    """A small real shard: every supported dtype, an empty tensor, a scalar, an expert-like 3-D tensor."""
    rng = np.random.default_rng(0)
    w = SafetensorsWriter(path)
    tensors = {"a.weight": ("BF16", (4, 8, 16)), "b.bias": ("F32", (16,)), "c.norm": ("F16", (32,)),
               "d.empty": ("F32", (0, 4)), "e.scalar": ("F32", ())}
    for name, (dtype, shape) in tensors.items():
        w.add(name, dtype, shape)
    for name, (dtype, shape) in tensors.items():
        w.write(name, rng.standard_normal(shape).astype(np.float32) if shape else np.float32(1.5))
    w.close()
    return path


def _offset_positions(raw: bytes) -> list[int]:
    """Byte positions of the header length and of every digit run in the header (offsets, dims)."""
    hlen = struct.unpack("<Q", raw[:8])[0]
    pos, i = [0], 8
    while i < 8 + hlen:
        if raw[i:i + 1].isdigit() and not raw[i - 1:i].isdigit():
            pos.append(i)
        i += 1
    return pos


def _mutation(size: int, structural: list[int]):
    pos = st.one_of(st.sampled_from(structural), st.integers(0, size - 1))

    def flip(p, bit):
        return lambda b: b[:p] + bytes([b[p] ^ (1 << bit)]) + b[p + 1:] if p < len(b) else b

    def word(p, value):  # a little-endian u64 over the header length, or a decimal over a JSON number
        if p == 0:
            return lambda b: struct.pack("<Q", value % 2**64) + b[8:]
        return lambda b: b[:p] + str(value).encode() + b[p:].lstrip(b"0123456789")

    def signed(p, value):
        return lambda b: b[:p] + b"-" + str(value).encode() + b[p:].lstrip(b"0123456789")

    def splice(p, junk, delete):
        return lambda b: b[:p] + junk + b[p + delete:]

    def cut(p):
        return lambda b: b[:p]

    number = st.sampled_from(BOUNDARY) | st.integers(0, 2**70)
    return st.one_of(
        st.builds(flip, pos, st.integers(0, 7)),
        st.builds(word, pos, number),
        st.builds(signed, pos, number),
        st.builds(splice, pos, st.binary(max_size=16) | st.sampled_from([b"[", b"]", b"{", b"}", b",", b'"', b"\\"]),
                  st.integers(0, 16)),
        st.builds(cut, st.integers(0, size + 8)),
    )


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    path = seed_shard(tmp_path_factory.mktemp("seed") / "seed.safetensors")
    assert check_shard_bytes(path, path.read_bytes()) == "opened"
    return path.read_bytes()


def test_fuzz_mutated_shards(seed, tmp_path):
    target = tmp_path / "m.safetensors"
    structural = _offset_positions(seed)
    before = OUTCOMES.copy()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_mutation(len(seed), structural), min_size=1, max_size=4))
    def one(mutations):
        b = seed
        for m in mutations:
            b = m(b)
        check_shard_bytes(target, b)

    one()
    _report("mutated shards", before)
    assert OUTCOMES["refused"] - before["refused"] > EXAMPLES // 4  # the mutations do reach the checks


# --- family 2: headers built from hostile field values --------------------------------------

_INT = st.sampled_from(BOUNDARY) | st.integers(-2**70, 2**70) | st.sampled_from([-1, -8, -16])
_ANY = st.none() | st.booleans() | st.floats(allow_nan=True) | st.text(max_size=8) | _INT
_DTYPE = st.sampled_from(list(DTYPE_BITS)) | st.sampled_from(["f32", "Q4_K", "", "BF16 "]) | _ANY
_SHAPE = st.lists(st.sampled_from([0, 1, 2, 3, 4, 16]) | _INT, max_size=4) | _ANY
_OFFSETS = st.lists(_INT | st.integers(0, 256), min_size=0, max_size=3) | _ANY
_ENTRY = st.fixed_dictionaries({}, optional={"dtype": _DTYPE, "shape": _SHAPE, "data_offsets": _OFFSETS}) | _ANY
_NAMES = st.text(max_size=12) | st.just("__metadata__")


@st.composite
def hostile_shards(draw) -> bytes:
    header = draw(st.dictionaries(_NAMES, _ENTRY, max_size=5))
    if draw(st.booleans()):  # some well-formed entries too, so the cross-entry checks run
        at = 0
        for k in range(draw(st.integers(1, 4))):
            dtype = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "F4"]))
            shape = draw(st.lists(st.integers(0, 6), max_size=3))
            n = DTYPE_BITS[dtype] * int(np.prod(shape, dtype=object)) // 8
            start = max(0, at + draw(st.sampled_from([0, 0, 0, -2, 2])))
            header[f"ok.{k}"] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + n]}
            at = start + n
    blob = json.dumps(header).encode()
    hlen = draw(st.sampled_from([len(blob)] * 6 + [0, len(blob) + 1, len(blob) - 1]) | st.sampled_from(BOUNDARY))
    return struct.pack("<Q", hlen % 2**64) + blob + draw(st.binary(max_size=300))


def test_fuzz_hostile_headers(tmp_path):
    target = tmp_path / "h.safetensors"
    before = OUTCOMES.copy()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck))
    @given(hostile_shards())
    def one(raw):
        check_shard_bytes(target, raw)

    one()
    _report("hostile headers", before)


# --- family 3 and 4: arbitrary JSON as header, raw bytes ---------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.floats() | _INT | st.text(max_size=6),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                     max_leaves=20)


def test_fuzz_json_and_raw_bytes(tmp_path):
    target = tmp_path / "j.safetensors"
    before = OUTCOMES.copy()

    @settings(max_examples=max(EXAMPLES // 2, 1), deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck))
    @given(_JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64), st.binary(max_size=64), st.booleans())
    def one(blob, tail, framed):
        check_shard_bytes(target, (struct.pack("<Q", len(blob)) + blob if framed else blob) + tail)

    one()
    _report("JSON and raw bytes", before)


# --- family 5: indexes with hostile shard names -------------------------------------------------

_SHARD_NAMES = st.sampled_from(["../x.safetensors", "/etc/passwd", "..", ".", "", "a/../../b", "..\\b", "C:\\x",
                                "C:x", "sub/../seed.safetensors", "seed.safetensors", "\0", "//x", "seed.safetensors/"]) \
    | st.text(alphabet="./\\:abx\0", max_size=10) | _ANY


def test_fuzz_index_shard_names(seed, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "seed.safetensors").write_bytes(seed)
    index = d / Checkpoint.INDEX
    inside = os.path.realpath(d)
    before = OUTCOMES.copy()

    def open_checkpoint():
        ck = Checkpoint(d)
        for shard in ck.shards.values():  # opened: every shard named lies inside the directory
            assert os.path.normpath(shard.path).startswith(str(d) + os.sep), shard.path
            assert os.path.realpath(shard.path).startswith(inside + os.sep), shard.path

    @settings(max_examples=max(EXAMPLES // 2, 1), deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(["a.weight", "b.bias", "c.norm", "zz"]), _SHARD_NAMES, max_size=4)
           | _JSON, st.booleans())
    def one(weight_map, wrapped):
        index.write_text(json.dumps({"weight_map": weight_map} if wrapped else weight_map))
        _guarded(index, open_checkpoint, named=d)

    one()
    _report("index shard names", before)


def _report(family: str, before: collections.Counter) -> None:
    now = OUTCOMES - before
    print(f"\nsafetensors fuzz, {family}: {sum(now.values())} inputs, {now['opened']} opened, {now['refused']} refused "
          f"with StepstreamError, 0 other exceptions, hangs or oversized allocations "
          f"(so far: largest traced peak {WORST['peak']} bytes, for a {WORST['size']}-byte file; "
          f"worst peak over files of 1 KiB or more {WORST['ratio']:.2f}x the file); {len(REASONS)} distinct refusals so far")
    if LONG:
        for reason, n in REASONS.most_common():
            print(f"  {n:7d}  {reason}")


def _atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing of the shard open-and-read path with atheris, seeded with a real shard."""
    import atheris

    work = Path(tempfile.mkdtemp(prefix="stfuzz"))
    corpus = work / "corpus"
    corpus.mkdir()
    seed_shard(corpus / "seed")
    target = work / "m.safetensors"

    def one(raw: bytes) -> None:
        check_shard_bytes(target, raw)
        if sum(OUTCOMES.values()) % 5000 == 0:
            print(f"safetensors fuzz (atheris): {dict(OUTCOMES)}, largest peak {WORST['peak']} bytes "
                  f"({WORST['size']}-byte file), worst {WORST['ratio']:.2f}x over files >= 1 KiB", flush=True)

    import inspect

    from convert import safetensors_header, safetensors_index, safetensors_io

    for mod in (safetensors_header, safetensors_index, safetensors_io):  # coverage feedback from our code
        for obj in vars(mod).values():
            funcs = [obj] if inspect.isfunction(obj) else \
                [f for f in vars(obj).values() if inspect.isfunction(f)] if inspect.isclass(obj) else []
            for f in funcs:
                if f.__module__ == mod.__name__:
                    atheris.instrument_func(f)
    atheris.Setup([sys.argv[0], str(corpus), *argv], one)
    atheris.Fuzz()


if __name__ == "__main__":
    if "--atheris" in sys.argv:
        _atheris_main([a for a in sys.argv[1:] if a != "--atheris"])
    else:
        sys.exit(pytest.main([__file__, "-s"]))
