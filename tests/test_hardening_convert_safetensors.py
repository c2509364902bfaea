"""Hostile safetensors as converter input: a clear error naming the file and tensor, nothing read
outside the shard's data area, nothing allocated that is larger than the file.

Each case is a shard written byte by byte; the same shard is then put into a copy of the tiny
checkpoint and given to `stepstream convert`, which must exit 2 with that one-line error and
leave no output behind.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc

import numpy as np
import pytest

from convert.safetensors_io import Checkpoint, SafetensorsFile
from runtime.base.errors import StepstreamError
from runtime.cli import main

NAME = "model.norm.weight"  # a real tensor of the tiny checkpoint: [256] bf16


def shard_bytes(header, data: bytes = b"", hlen: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if hlen is None else hlen) + blob + data


def norm_header(**change) -> dict:
    entry = {"dtype": "BF16", "shape": [256], "data_offsets": [0, 512]}
    entry.update(change)
    return {"__metadata__": {"format": "pt"}, NAME: {k: v for k, v in entry.items() if v is not None}}


DATA = np.arange(256, dtype=np.uint16).tobytes()

# case id -> (shard bytes, words the error must hold besides the file name)
CASES = {
    "list-header": (shard_bytes([{"dtype": "BF16"}], DATA), ["JSON list", "not an object"]),
    "no-data-offsets": (shard_bytes(norm_header(data_offsets=None), DATA), [NAME, "data_offsets"]),
    "no-dtype": (shard_bytes(norm_header(dtype=None), DATA), [NAME, "dtype"]),
    "entry-not-object": (shard_bytes({NAME: [0, 512]}, DATA), [NAME, "not an object"]),
    "huge-negative-offsets": (shard_bytes(norm_header(data_offsets=[-2**70, -2**70 + 512]), DATA), [NAME, "negative"]),
    "offsets-into-header": (shard_bytes(norm_header(shape=[8], data_offsets=[-16, 0]), DATA), [NAME, "negative", "header"]),
    "offsets-reversed": (shard_bytes(norm_header(data_offsets=[512, 0]), DATA), [NAME, "end before they begin"]),
    "offsets-past-end": (shard_bytes(norm_header(shape=[1024], data_offsets=[0, 2048]), DATA), [NAME, "past the end"]),
    "offsets-not-integers": (shard_bytes(norm_header(data_offsets=[0.0, 512.5]), DATA), [NAME, "two integers"]),
    "offsets-one-number": (shard_bytes(norm_header(data_offsets=[512]), DATA), [NAME, "two integers"]),
    "shape-product-overflows": (shard_bytes(norm_header(shape=[2**40, 2**40, 2**40], data_offsets=[0, 512]), DATA),
                                [NAME, "holds 512 bytes", "needs"]),
    "shape-overflows-int64-to-match": (shard_bytes(norm_header(shape=[4, 2**62 + 64], data_offsets=[0, 512]), DATA),
                                       [NAME, "holds 512 bytes"]),
    "shape-negative": (shard_bytes(norm_header(shape=[-256], data_offsets=[0, 512]), DATA), [NAME, "non-negative"]),
    "shape-not-list": (shard_bytes(norm_header(shape="256"), DATA), [NAME, "shape"]),
    "dtype-unknown": (shard_bytes(norm_header(dtype="Q9_K"), DATA), [NAME, "unknown dtype", "Q9_K"]),
    "dtype-not-string": (shard_bytes(norm_header(dtype=16), DATA), [NAME, "unknown dtype"]),
    "header-longer-than-file": (shard_bytes(norm_header(), DATA, hlen=10**6), ["header length 1000000", "file holds"]),
    "header-length-2**63": (shard_bytes(norm_header(), DATA, hlen=2**63), ["header length"]),
    "header-length-zero": (shard_bytes(b"", DATA, hlen=0), ["header length 0"]),
    "shorter-than-8-bytes": (b"\x10\x00\x00", ["shorter than the 8-byte"]),
    "header-not-utf8": (shard_bytes(b'{"\xff\xfe": 1}', DATA), ["not UTF-8"]),
    "header-not-json": (shard_bytes(b'{"a": ', DATA), ["not valid JSON"]),
    "header-nested-deeply": (shard_bytes(b"[" * 100_000 + b"]" * 100_000, DATA), ["nested too deeply"]),
    "header-integer-too-long": (shard_bytes(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
                                            DATA), ["not valid JSON"]),
    "tensor-named-twice": (shard_bytes(b'{"%s": {"dtype": "BF16", "shape": [128], "data_offsets": [0, 256]}, '
                                       b'"%s": {"dtype": "BF16", "shape": [128], "data_offsets": [256, 512]}}'
                                       % (NAME.encode(), NAME.encode()), DATA), [NAME, "twice"]),
    "tensors-overlap": (shard_bytes({**norm_header(), "other": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, DATA),
                        [NAME, "'other'", "overlap"]),
    "metadata-not-object": (shard_bytes({**norm_header(), "__metadata__": ["pt"]}, DATA), ["__metadata__", "not an object"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_shard_gives_a_clear_error_and_allocates_little(case, tmp_path):
    raw, words = CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(StepstreamError) as e:
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    # Python's JSON objects for a header cost a few times its bytes; never an allocation the header claims
    assert peak <= 64 * len(raw) + 2**20, f"{case}: {peak} bytes allocated reading a {len(raw)}-byte file"


def test_valid_shard_reads_back(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(shard_bytes(norm_header(), DATA))
    f = SafetensorsFile(path)
    assert f.entries[NAME].begin == path.stat().st_size - 512
    np.testing.assert_array_equal(f.read(NAME).view(np.uint32) >> 16, np.arange(256))


@pytest.fixture
def ckpt(linked_ckpt):
    return linked_ckpt


def _index(d):
    return json.loads((d / Checkpoint.INDEX).read_text())


def _convert(capsys, d, out_dir):
    out_dir.mkdir(exist_ok=True)
    rc = main(["convert", str(d), str(out_dir / "out.gguf"), "--type", "q8_0", "--no-progress"])
    return rc, capsys.readouterr().err, sorted(p.name for p in out_dir.iterdir())


@pytest.mark.parametrize("case", ["list-header", "no-data-offsets", "offsets-into-header", "huge-negative-offsets",
                                  "offsets-past-end", "shape-product-overflows", "dtype-unknown", "header-longer-than-file"])
def test_convert_refuses_a_hostile_shard(case, ckpt, tmp_path, capsys):
    """The checkpoint's shard holding NAME is replaced by a hostile one: exit 2, one line, no output."""
    shard = ckpt / _index(ckpt)["weight_map"][NAME]
    shard.unlink()
    shard.write_bytes(CASES[case][0])
    rc, err, left = _convert(capsys, ckpt, tmp_path / "out")
    assert rc == 2 and str(shard) in err and "Traceback" not in err, err
    for w in CASES[case][1]:
        assert w in err, (w, err)
    assert left == []


@pytest.mark.parametrize("how", ["dotdot", "absolute", "dotdot-backslash"])
def test_index_shard_names_outside_the_checkpoint_are_refused(how, ckpt, tmp_path, capsys):
    """A valid shard lies outside the checkpoint; an index naming it must not get it read."""
    index = _index(ckpt)
    inside = index["weight_map"][NAME]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(ckpt / inside, outside)  # the same tensors, so only the name can make it fail
    name = {"dotdot": f"../{outside.name}", "absolute": str(outside), "dotdot-backslash": f"..\\{outside.name}"}[how]
    for t, s in index["weight_map"].items():
        if s == inside:
            index["weight_map"][t] = name
    (ckpt / Checkpoint.INDEX).write_text(json.dumps(index))
    rc, err, left = _convert(capsys, ckpt, tmp_path / "out")
    assert rc == 2 and Checkpoint.INDEX in err and repr(name) in err and "inside the checkpoint directory" in err, err
    assert left == []


@pytest.mark.parametrize("index_text, words", [
    ("[1, 2]", ["weight_map"]),
    ('{"weight_map": []}', ["weight_map"]),
    ('{"weight_map": {"model.norm.weight": 7}}', ["model.norm.weight", "7"]),
    ("[" * 100_000, ["nested too deeply"]),
    ('{"weight_map": {"model.norm.weight": ""}}', ["model.norm.weight", "empty"]),
], ids=["list", "weight-map-list", "shard-not-string", "nested", "empty-name"])
def test_malformed_index_is_a_clear_error(index_text, words, ckpt, tmp_path, capsys):
    (ckpt / Checkpoint.INDEX).write_text(index_text)
    rc, err, left = _convert(capsys, ckpt, tmp_path / "out")
    assert rc == 2 and Checkpoint.INDEX in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert left == []
