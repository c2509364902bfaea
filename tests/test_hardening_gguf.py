"""Hostile and unsupported GGUF files: each is refused with one StepstreamError line naming the
file, the key or tensor and the value, before anything the size of a model is allocated.

The files are real ones made hostile: the tiny checkpoint converted by our converter, or
quantized by llama.cpp's own quantizer, then edited (metadata rewritten with gguf-py's
writer, or header bytes patched where gguf-py's tensor directory puts them).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

import quant
import runtime
from runtime.base.errors import StepstreamError
from tests.helpers.gguf_edit import rewrite

V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def base(tiny_gguf):
    return tiny_gguf("q4_k_m")


class Hang(Exception):
    pass


def _hang(signum, frame):
    raise Hang("opening the file took over 60 s")


def _refused(path: Path, match: str) -> str:
    """runtime.load(path) raises StepstreamError matching `match`, naming the file, on one line,
    within 60 s, with a traced peak allocation below the file's size."""
    import runtime.loader

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    tracemalloc.start()
    try:
        with pytest.raises(StepstreamError, match=match) as e:
            runtime.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert peak < path.stat().st_size, (peak, msg)
    return msg


# ------------------------------------------------------------------ 6a: formats the kernels lack

def _llama_quantize(src: Path, dst: Path, preset: str) -> set[str]:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return {t.tensor_type for t in gguf.GGUFReader(dst).tensors}


@pytest.fixture(scope="module")
def llama_files(tiny_gguf, tmp_path_factory):
    """llama_files(preset) -> (path, tensor types) of the f32 file quantized by llama.cpp (cached)."""
    d, made = tmp_path_factory.mktemp("llq"), {}

    def get(preset: str):
        if preset not in made:
            made[preset] = (d / f"tiny-{preset}.gguf", _llama_quantize(tiny_gguf("f32"), d / f"tiny-{preset}.gguf", preset))
        return made[preset]

    return get


def _repo_root() -> Path:
    return Path(runtime.__file__).resolve().parent.parent  # the code under test, wherever it is


def test_cli_refuses_llama_file_with_missing_format(llama_files, monkeypatch, capsys):
    """`stepstream run` on a llama.cpp file holding a type the kernels lack: exit 2, one line
    naming the file, a tensor and its type, no traceback. Every type llama.cpp writes runs now
    (test_quant_formats_llama's presets), so Q3_K, which the Q2_K preset writes beside Q2_K, is
    taken out of the kernels' table, as a format they lacked. The refusal comes before anything
    compiles. (This test ran the file in a `stepstream run` process while it had no missing
    type: 80 s of compiling kernels, for what the presets' tests run.)"""
    from runtime.cli import main

    path, types = llama_files("Q2_K")
    assert {gguf.GGMLQuantizationType.Q2_K, gguf.GGMLQuantizationType.Q3_K} <= types
    assert all(t in quant.FORMATS for t in types)  # as the file is, it runs
    monkeypatch.delitem(quant.FORMATS, gguf.GGMLQuantizationType.Q3_K)
    capsys.readouterr()  # llama.cpp's quantizer's log, when the file was made here
    assert main(["run", "-m", str(path), "-p", "hi", "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "tensor '" in lines[0] and "stored as Q3_K" in lines[0], lines[0]


def test_load_names_first_tensor_in_missing_format(llama_files, monkeypatch):
    """llama.cpp's Q5_0 preset on the tiny model (Q5_0, with fallbacks for rows that are not
    a multiple of 256) with Q5_0 taken out of the kernels' table, as a format they lacked: the
    load is refused, naming a Q5_0 tensor, before anything compiles. (The file runs as it is:
    test_quant_formats_llama's presets.)"""
    path, types = llama_files("Q5_0")
    assert gguf.GGMLQuantizationType.Q5_0 in types
    monkeypatch.delitem(quant.FORMATS, gguf.GGMLQuantizationType.Q5_0)
    msg = _refused(path, r"tensor '.*' is stored as Q5_0, a format stepstream cannot run")
    assert "Q5_0," not in msg.split("it runs")[1]


def test_format_check_follows_quant_formats(base, monkeypatch):
    """The check reads the kernels' table: take Q4_K out of it and a Q4_K file is refused."""
    monkeypatch.delitem(quant.FORMATS, gguf.GGMLQuantizationType.Q4_K)
    msg = _refused(base, r"is stored as Q4_K, a format stepstream cannot run")
    assert "Q4_K," not in msg.split("it runs")[1]


# ------------------------------------------------------------------ 8: hostile tensor directory

def _tensor_info(path: Path) -> dict[str, dict[str, int]]:
    """Byte positions of each tensor's directory entry (found by gguf-py, not by us)."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        name = t.name.encode()
        dims = t.field.offset + 8 + len(name) + 4
        n_dims = len(t.shape)
        out[t.name] = {"dims": dims, "n_dims": n_dims, "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4,
                       "rel": int(t.data_offset - r.data_offset), "n_bytes": int(t.n_bytes)}
    return out


def _patched(base: Path, dst: Path, edits: list[tuple[int, str, int]]) -> Path:
    shutil.copyfile(base, dst)
    with open(dst, "r+b") as f:
        for pos, fmt, value in edits:
            f.seek(pos)
            f.write(struct.pack(fmt if fmt[0] in "<>" else "<" + fmt, value))
    return dst


def test_tensor_offset_past_end(base, tmp_path):
    info = _tensor_info(base)["blk.1.ffn_up_exps.weight"]
    bad = _patched(base, tmp_path / "past.gguf", [(info["offset"], "Q", 1 << 40)])
    _refused(bad, r"tensor 'blk.1.ffn_up_exps.weight' .* past the end of the file")


def test_overlapping_tensors(base, tmp_path):
    infos = _tensor_info(base)
    a, b = infos["blk.1.ffn_up_exps.weight"], infos["blk.1.attn_q.weight"]
    bad = _patched(base, tmp_path / "overlap.gguf", [(b["offset"], "Q", a["rel"] + 32 * 8)])
    _refused(bad, r"tensors .*blk.1.(ffn_up_exps|attn_q).* overlap")


def test_tensor_size_inconsistent_with_shape(base, tmp_path):
    """A shape grown so the tensor runs into the next one (or off the file)."""
    info = _tensor_info(base)["blk.1.ffn_gate_exps.weight"]
    bad = _patched(base, tmp_path / "grown.gguf", [(info["dims"] + 8 * 2, "Q", 64)])  # 16 experts -> 64
    _refused(bad, r"blk.1.ffn_gate_exps.weight.*(overlap|past the end)")


def test_row_not_whole_blocks(base, tmp_path):
    info = _tensor_info(base)["blk.1.attn_q.weight"]
    bad = _patched(base, tmp_path / "row.gguf", [(info["dims"], "Q", 100)])
    _refused(bad, r"tensor 'blk.1.attn_q.weight' has rows of 100 weights, not a multiple of the Q\d_K block of 256")


def test_unknown_tensor_type(base, tmp_path):
    info = _tensor_info(base)["output_norm.weight"]
    bad = _patched(base, tmp_path / "type.gguf", [(info["type"], "I", 77)])
    _refused(bad, r"tensor 'output_norm.weight' has type id 77")


def test_misaligned_tensor(base, tmp_path):
    info = _tensor_info(base)["output_norm.weight"]
    bad = _patched(base, tmp_path / "align.gguf", [(info["offset"], "Q", info["rel"] + 4)])
    _refused(bad, r"tensor 'output_norm.weight' starts at data offset \d+, not a multiple of the alignment 32")


def test_too_many_dimensions(base, tmp_path):
    info = _tensor_info(base)["output_norm.weight"]
    bad = _patched(base, tmp_path / "dims.gguf", [(info["dims"] - 4, "I", 1 << 30)])
    _refused(bad, r"tensor 'output_norm.weight' has 1073741824 dimensions")


def test_header_counts_beyond_the_file(base, tmp_path):
    _refused(_patched(base, tmp_path / "ntensors.gguf", [(8, "Q", 1 << 62)]), r"declares \d+ metadata keys and "
             r"4611686018427387904 tensors, more than its \d+ bytes can hold")
    _refused(_patched(base, tmp_path / "nkv.gguf", [(16, "Q", 1 << 40)]), r"declares 1099511627776 metadata keys")


def _field_pos(path: Path, key: str) -> int:
    """Byte position of a metadata value (after key and type), by gguf-py."""
    f = gguf.GGUFReader(path).fields[key]
    return f.offset + 8 + len(key.encode()) + 4


def test_array_length_beyond_the_file(base, tmp_path):
    """gguf-py's reader would loop over 2^40 elements of an array that is not there."""
    pos = _field_pos(base, "step35.attention.head_count") + 4  # after the element type
    _refused(_patched(base, tmp_path / "alen.gguf", [(pos, "Q", 1 << 40)]),
             r"step35.attention.head_count.*1099511627776 values of INT32.*truncated or corrupt")
    pos = _field_pos(base, "tokenizer.ggml.tokens") + 4
    _refused(_patched(base, tmp_path / "slen.gguf", [(pos, "Q", 1 << 58)]),
             r"tokenizer.ggml.tokens.*strings.*truncated or corrupt")


def test_string_length_beyond_the_file(base, tmp_path):
    pos = _field_pos(base, "general.architecture")
    _refused(_patched(base, tmp_path / "str.gguf", [(pos, "Q", 1 << 50)]), r"general.architecture.*string 1 of 1 .*"
             r"\(1125899906842624 bytes\) runs past the end of the file")


def test_name_and_key_lengths(base, tmp_path):
    """Found by atheris: a key length spanning the rest of the file made the old reader (and the
    first version of ours) copy and decode megabytes, twice the file at peak."""
    rest = base.stat().st_size - 40
    _refused(_patched(base, tmp_path / "key.gguf", [(24, "Q", rest)]),
             rf"metadata key 0 at byte 24 is {rest} bytes long, over the 65536 allowed")
    at = gguf.GGUFReader(base).tensors[0].field.offset
    _refused(_patched(base, tmp_path / "name.gguf", [(at, "Q", 64)]), r"name of tensor 0 .* is 64 bytes long, over "
                                                                      r"the 63 allowed")


def test_big_endian_and_old_versions(base, tmp_path):
    _refused(_patched(base, tmp_path / "be.gguf", [(4, ">I", 3)]), "big-endian")
    _refused(_patched(base, tmp_path / "v1.gguf", [(4, "I", 1)]), "GGUF version 1")


# ------------------------------------------------------------------ 8: metadata that sizes allocations

def _typed_rewrite(src: Path, dst: Path, key: str, value, vtype: V, sub: V | None = None) -> Path:
    """A copy with one key's value and type replaced (gguf_edit.rewrite keeps the old type)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for k, field in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if k == key:
            w.add_key_value(k, value, vtype, sub)
        else:
            w.add_key_value(k, field.contents(), field.types[0], field.types[1] if field.types[0] == V.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


METADATA_CASES = {
    # name: (change, expected message)
    "window_zero": ({"step35.attention.sliding_window": 0}, r"sliding_window is 0"),
    "window_huge": ({"step35.attention.sliding_window": 2**32 - 1}, r"sliding_window is 4294967295, must be in 0..2147483647"),
    "context_zero": ({"step35.context_length": 0}, r"context_length is 0, must be in 1\.\."),
    "context_huge": ({"step35.context_length": 2**32 - 1}, r"context_length is 4294967295, must be in 1\.\.2147483647"),
    "heads_negative": ({"step35.attention.head_count": [2, -4, 4, 4, 2, 4, 4]}, r"block 1 has -4 query heads"),
    "heads_zero_kv": ({"step35.attention.head_count_kv": [1, 0, 1, 1, 1, 1, 1]}, r"block 1 has 4 query heads and 0 KV"),
    "heads_vs_tensors": ({"step35.attention.head_count": [2, 8, 4, 4, 2, 4, 4]},
                         r"tensor 'blk.1.attn_q.weight' has shape \[512, 256\], the metadata \(.*head_count\[1\]=8.*"
                         r"implies \[1024, 256\]"),
    "kv_heads_vs_tensors": ({"step35.attention.head_count_kv": [1, 2, 1, 1, 1, 1, 1]},
                            r"tensor 'blk.1.attn_k.weight' has shape \[128, 256\].*implies \[256, 256\]"),
    "experts_vs_tensors": ({"step35.expert_count": 64}, r"tensor 'blk.1.ffn_gate_inp.weight' has shape \[16, 256\].*"
                                                        r"expert_count=64.*implies \[64, 256\]"),
    "experts_huge": ({"step35.expert_count": 2**32 - 1}, r"ffn_gate_inp.weight' has shape \[16, 256\].*4294967295"),
    "experts_used_zero": ({"step35.expert_used_count": 0}, r"expert_used_count=0 must be in 1\.\..*=16"),
    "experts_used_over": ({"step35.expert_used_count": 17}, r"expert_used_count=17 must be in 1\.\..*=16"),
    "head_dim_zero": ({"step35.attention.key_length": 0, "step35.attention.value_length": 0},
                      r"key_length is 0, must be at least 4"),
    "head_dim_vs_tensors": ({"step35.attention.key_length": 64, "step35.attention.value_length": 64},
                            r"tensor 'blk.0.attn_q.weight' has shape \[256, 256\].*key_length=64.*implies \[128, 256\]"),
    "hidden_vs_tensors": ({"step35.embedding_length": 512}, r"tensor 'token_embd.weight' has shape \[704, 256\].*"
                                                            r"embedding_length=512.*implies \[704, 512\]"),
    "block_count_huge": ({"step35.block_count": 2**32 - 1}, r"block_count is 4294967295, must be in 1\.\.\d+"),
    "block_count_zero": ({"step35.block_count": 0}, r"block_count is 0, must be in 1\.\."),
    "expert_ffn_vs_tensors": ({"step35.expert_feed_forward_length": 4096}, r"ffn_gate_exps.weight' has shape "
                                                                           r"\[16, 256, 256\].*implies \[16, 4096, 256\]"),
    "bos_outside_vocab": ({"tokenizer.ggml.bos_token_id": 10**6}, r"bos_token_id is 1000000, not a token id below the "
                                                                  r"vocabulary size 704"),
    "token_types_short": ({"tokenizer.ggml.token_type": [1] * 10}, r"token_type lists 10 entries but token_embd.weight "
                                                                   r"has 704 rows"),
    "rms_eps_zero": ({"step35.attention.layer_norm_rms_epsilon": 0.0}, r"layer_norm_rms_epsilon is 0.0, must be above 0"),
    "rms_eps_nan": ({"step35.attention.layer_norm_rms_epsilon": float("nan")}, r"layer_norm_rms_epsilon is nan, "
                                                                               r"expected a finite number"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_metadata_driving_allocations(base, tmp_path, case):
    change, match = METADATA_CASES[case]
    bad = tmp_path / f"{case}.gguf"
    rewrite(base, bad, change=change)
    _refused(bad, match)


TYPED_CASES = {
    "context_string": ("step35.context_length", "65536", V.STRING, None, r"context_length is '65536', expected an "
                                                                          r"integer"),
    "window_float": ("step35.attention.sliding_window", 16.5, V.FLOAT32, None, r"sliding_window is 16.5, expected an "
                                                                                r"integer"),
    "heads_strings": ("step35.attention.head_count", ["4"] * 7, V.ARRAY, V.STRING, r"head_count\[0\] is '4', expected "
                                                                                   r"an integer"),
    "heads_wrong_length": ("step35.attention.head_count", [4] * 9, V.ARRAY, V.INT32, r"head_count has 9 entries, "
                                                                                     r"step35.block_count is 7"),
}


@pytest.mark.parametrize("case", list(TYPED_CASES))
def test_metadata_of_the_wrong_type(base, tmp_path, case):
    key, value, vtype, sub, match = TYPED_CASES[case]
    _refused(_typed_rewrite(base, tmp_path / f"{case}.gguf", key, value, vtype, sub), match)


def test_metadata_text_not_utf8(base, tmp_path):
    pos = _field_pos(base, "general.architecture") + 8
    _refused(_patched(base, tmp_path / "utf8.gguf", [(pos, "B", 0xFF)]), r"general.architecture.*not UTF-8")


def test_valid_files_still_load_and_agree(base, llama_files, tiny_gguf):
    """The stricter reader takes every file the suite makes, and reads gguf-py's values."""
    from runtime.base.gguf_file import GGUFModelFile

    for path in (base, tiny_gguf("f32"), llama_files("Q2_K")[0]):
        f, r = GGUFModelFile(path), gguf.GGUFReader(path)
        assert [t.name for t in r.tensors] == list(f.tensors)
        for t in r.tensors:
            ours = f.tensors[t.name]
            assert ours.offset == t.data_offset and ours.qtype == t.tensor_type
            assert ours.data.shape == t.data.shape and ours.data.dtype == t.data.dtype
            assert np.array_equal(np.asarray(ours.data), np.asarray(t.data))
        for key, field in r.fields.items():
            if not key.startswith("GGUF."):
                assert f.get(key) == field.contents(), key
