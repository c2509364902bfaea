"""The converter at scale: the same bytes from lanes, chunks and threads, --resume, bounded memory, the ETA.

References: the SHA-256 of the K-quant bytes for fixed inputs (Q4_K and Q5_K as the plain
numpy reference in tests/helpers/kquant_reference.py gives them, Q6_K as the one-sub-block-at-a-time
kernels of main before the lane kernels wrote it); quant.quantize of whole slices read with the old
whole-tensor path; an uninterrupted conversion's bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import numba
import numpy as np
import pytest

import quant
from convert import converter, layout, policy, resume, tensor_stream
from convert.hf_config import HFConfig
from convert.mini import PRESETS, write_mini
from convert.output_file import part_name
from convert.safetensors_io import Checkpoint
from runtime.base.errors import StepstreamError
from tests.helpers.quant_data import golden_inputs

REPO = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType


# sha256 of quantize(x) over golden_inputs(): Q6_K as the kernels of commit 9e8b3be wrote it; Q4_K and
# Q5_K as the float32 kernels write it, which tests/helpers/kquant_reference.py gives too
# (test_quant_kquant.py)
GOLDEN = {
    Q.Q4_K: "e6a1534b96a2432bac06c44e8979e8a565019a25a084086b314255f46ec4d7a0",
    Q.Q5_K: "c633d8b8b5e7a74095453d4b9a6f3f8dbcea0ffb9c182e4950697e182d204474",
    Q.Q6_K: "817ea3b1d6b03607d5a035ad32a86e8ad026d940d83d05b03e0bd3b0d20023e1",
}


@pytest.mark.parametrize("qtype", list(GOLDEN), ids=lambda q: q.name)
def test_kquant_bytes_are_those_of_the_serial_kernels(qtype):
    h = hashlib.sha256()
    for x in golden_inputs():
        h.update(quant.quantize(x, qtype).tobytes())
    assert h.hexdigest() == GOLDEN[qtype]


def test_chunks_cover_each_slice_in_whole_rows():
    got = list(tensor_stream.chunks((3, 5, 4), layout.EXPERTS, 8))
    assert [(c.index, c.start, c.count, c.offset) for c in got] == [
        (e, 20 * e + o, n, o) for e in range(3) for o, n in ((0, 8), (8, 8), (16, 4))]
    got = list(tensor_stream.chunks((7, 4), layout.ATTN, 10))  # 2 rows a chunk
    assert [(c.index, c.start, c.count) for c in got] == [(None, 0, 8), (None, 8, 8), (None, 16, 8), (None, 24, 4)]
    assert [c.count for c in tensor_stream.chunks((5,), layout.NORM, 2)] == [5]  # one row, never cut


@pytest.fixture
def threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def test_chunked_and_threaded_conversion_is_byte_identical(tiny_ckpt, tiny_gguf, tmp_path, monkeypatch, threads):
    reference = tiny_gguf("q4_k_m").read_bytes()
    monkeypatch.setattr(tensor_stream, "CHUNK_WEIGHTS", 20_000)  # 78 rows: 4 chunks an expert slice, the last ragged
    for n, name in ((1, "serial"), (numba.config.NUMBA_NUM_THREADS, "parallel")):
        out = tmp_path / f"{name}.gguf"
        converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, threads=n)
        assert out.read_bytes() == reference, f"{name} conversion in small chunks differs"
    # and against an independent path: whole slices read by Checkpoint.read, quantized at once
    reader = gguf.GGUFReader(tmp_path / "serial.gguf")
    tensors = {t.name: t for t in reader.tensors}
    ck = Checkpoint(tiny_ckpt)
    for spec in layout.checkpoint_layout(HFConfig.load(tiny_ckpt)):
        if spec.role not in (layout.EXPERTS, layout.ATTN, layout.EMBED):
            continue
        x = ck.read(spec.hf_name, 2 if spec.role == layout.EXPERTS else None)
        want = quant.quantize(np.ascontiguousarray(x.reshape(-1, spec.shape[-1])), policy.choose(spec, "q4_k_m"))
        got = np.asarray(tensors[spec.gguf_name].data).reshape(-1)
        if spec.role == layout.EXPERTS:
            got = got[2 * want.size:3 * want.size]
        np.testing.assert_array_equal(got, want.reshape(-1), err_msg=spec.gguf_name)


def _interrupt_at(monkeypatch, k: int):
    """Make the conversion raise KeyboardInterrupt while writing its k-th tensor (after part of it)."""
    real = converter.write_tensor
    seen = []

    def write(f, ckpt, spec, *args):
        seen.append(spec)
        if len(seen) == k:
            f.write(b"half a tensor")
            raise KeyboardInterrupt
        return real(f, ckpt, spec, *args)

    monkeypatch.setattr(converter, "write_tensor", write)


def _dir(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def _pretend_dead(out: Path, tmp_path: Path) -> Path:
    """Rename this process's kept .part (and record) to a dead process's, as after a real interrupt."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = part_name(out, gone.pid)
    os.rename(part_name(out), dead)
    os.rename(resume.record_path(part_name(out)), resume.record_path(dead))
    return dead


def test_resume_after_ctrl_c_gives_the_uninterrupted_bytes(tiny_ckpt, tiny_gguf, tmp_path, monkeypatch):
    reference = tiny_gguf("q4_k_m").read_bytes()
    out = tmp_path / "m.gguf"
    with monkeypatch.context() as m:
        _interrupt_at(m, 40)
        with pytest.raises(KeyboardInterrupt):
            converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, resume=True)
    assert not out.exists()
    rec = json.loads(resume.record_path(part_name(out)).read_text())
    assert rec["done"] == 39  # the tensor cut short is not counted
    dead = _pretend_dead(out, tmp_path)
    s = converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, resume=True)
    assert out.read_bytes() == reference
    assert s.resumed_tensors == 39 and "resumed: 39 tensors" in s.text()
    assert s.n_tensors == len(gguf.GGUFReader(out).tensors)
    assert _dir(out) == ["m.gguf"] and not dead.exists()
    # the summary describes the whole file, as an uninterrupted run's does (it counted this run's tensors only)
    whole = converter.convert(tiny_ckpt, tmp_path / "again.gguf", "q4_k_m", progress=False)
    for field in ("n_tensors", "n_weights", "by_type", "fallbacks", "bits_per_weight"):
        assert getattr(s, field) == getattr(whole, field), field


def test_a_full_disk_keeps_the_work_and_a_run_with_the_same_pid_resumes_it(tiny_ckpt, tiny_gguf, tmp_path,
                                                                              monkeypatch):
    """Any error, not only Ctrl-C, keeps a --resume run's .part; and the next run continues it even
    when it gets the same PID (a container's PID 1), whose .part name is its own."""
    reference = tiny_gguf("q4_k_m").read_bytes()
    out = tmp_path / "m.gguf"
    real = converter.write_tensor
    seen = []

    def write(f, ckpt, spec, *args):
        seen.append(spec)
        if len(seen) == 20:
            f.write(b"half a tensor")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, ckpt, spec, *args)

    with monkeypatch.context() as m:
        m.setattr(converter, "write_tensor", write)
        with pytest.raises(StepstreamError, match="No space left on device.*--resume continues it"):
            converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, resume=True)
    assert json.loads(resume.record_path(part_name(out)).read_text())["done"] == 19
    s = converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, resume=True)  # same process, same PID
    assert s.resumed_tensors == 19
    assert out.read_bytes() == reference
    assert _dir(out) == ["m.gguf"]


def test_the_resume_key_covers_the_shards_identity_and_the_quantizer_code(tiny_ckpt, tmp_path, monkeypatch):
    """A copy of the shards with the same names, sizes and modification times is another
    checkpoint; so is the same checkpoint quantized by other code."""
    from convert.safetensors_io import Checkpoint

    key = resume.conversion_key(b"header", Checkpoint(tiny_ckpt))
    assert key == resume.conversion_key(b"header", Checkpoint(tiny_ckpt))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, copy, copy_function=shutil.copy2)  # keeps mtimes, as cp -p does
    assert resume.conversion_key(b"header", Checkpoint(copy)) != key
    monkeypatch.setattr(resume, "_code_digest", lambda: b"other code")
    assert resume.conversion_key(b"header", Checkpoint(tiny_ckpt)) != key


def test_ctrl_c_without_resume_removes_the_part(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    _interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(tiny_ckpt, out, "q8_0", progress=False)
    assert _dir(out) == []


def test_resume_of_a_killed_process(tiny_ckpt, tiny_gguf, tmp_path):
    """A real process SIGKILLed in its 30th tensor (no --resume given) is continued by --resume."""
    reference = tiny_gguf("q4_k_m").read_bytes()
    out = tmp_path / "m.gguf"
    script = (
        "import os, signal, sys\n"
        "from convert import converter\n"
        "real, seen = converter.write_tensor, []\n"
        "def write(f, ckpt, spec, *a):\n"
        "    seen.append(spec)\n"
        "    if len(seen) == 30:\n"
        "        f.write(b'x' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(f, ckpt, spec, *a)\n"
        "converter.write_tensor = write\n"
        "converter.convert(sys.argv[1], sys.argv[2], 'q4_k_m', progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_ckpt), str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    parts = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert len(parts) == 1 and json.loads(resume.record_path(parts[0]).read_text())["done"] == 29
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "convert", str(tiny_ckpt), str(out), "--resume",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed: 29 tensors" in r.stdout
    assert out.read_bytes() == reference and _dir(out) == ["m.gguf"]


def test_resume_refuses_a_part_of_other_options_or_a_damaged_one(tiny_ckpt, tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    with monkeypatch.context() as m:
        _interrupt_at(m, 20)
        with pytest.raises(KeyboardInterrupt):
            converter.convert(tiny_ckpt, out, "q8_0", progress=False, resume=True)
    other = _pretend_dead(out, tmp_path)
    with pytest.raises(StepstreamError, match="19 tensors complete.*--force"):  # another --type: the work is kept
        converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, resume=True)
    assert other.exists() and not out.exists()
    s = converter.convert(tiny_ckpt, out, "q4_k_m", progress=False, resume=True, force=True)  # start over
    assert s.resumed_tensors == 0 and out.read_bytes() == tiny_gguf("q4_k_m").read_bytes()
    assert _dir(out) == ["m.gguf"]  # the other conversion's part is gone
    out.unlink()
    with monkeypatch.context() as m:
        _interrupt_at(m, 20)
        with pytest.raises(KeyboardInterrupt):
            converter.convert(tiny_ckpt, out, "q8_0", progress=False, resume=True)
    dead = _pretend_dead(out, tmp_path)
    with open(dead, "r+b") as f:  # its header no longer matches the record's conversion
        f.seek(100)
        f.write(b"\xff")
    s = converter.convert(tiny_ckpt, out, "q8_0", progress=False, resume=True)
    assert s.resumed_tensors == 0 and out.read_bytes() == tiny_gguf("q8_0").read_bytes()
    assert _dir(out) == ["m.gguf"]


def _traced_peak(ckpt: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        converter.convert(ckpt, out, "q4_k_m", progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # tracemalloc traces every allocation of two conversions
def test_memory_does_not_grow_with_the_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    """numpy buffers (traced by tracemalloc) converting a checkpoint 3x larger: the same peak."""
    tiny = PRESETS["tiny"]
    monkeypatch.setitem(PRESETS, "tiny4x", tiny.__class__(**{**tiny.__dict__, "n_expert": 4 * tiny.n_expert}))
    big = write_mini(tmp_path / "big", "tiny4x", seed=1)

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("*.safetensors"))

    assert size(big) > 2.5 * size(tiny_ckpt)
    monkeypatch.setattr(tensor_stream, "CHUNK_WEIGHTS", 1 << 14)
    small_peak = _traced_peak(tiny_ckpt, tmp_path / "a.gguf")
    big_peak = _traced_peak(big, tmp_path / "b.gguf")
    assert big_peak < 1.25 * small_peak, f"peak {small_peak / 2**20:.1f} MiB -> {big_peak / 2**20:.1f} MiB"
    assert big_peak < size(big) / 8


def test_summary_gives_input_rate_and_eta_for_the_real_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    js = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "convert", str(tiny_ckpt), str(out), "--no-progress",
                        "--threads", "1", "--summary-json", str(js)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(js.read_text())
    assert s["in_bytes"] == sum(Checkpoint(tiny_ckpt).entry(n).nbytes for n in Checkpoint(tiny_ckpt).names())
    rate = s["in_bytes"] / s["convert_seconds"]
    assert s["convert_mb_per_s"] == pytest.approx(rate / 1e6)
    # in weights, which the bf16 checkpoint and the FP8 one hold alike (bytes would double an FP8 ETA)
    weights = sum(math.prod(Checkpoint(tiny_ckpt).entry(n).shape) for n in Checkpoint(tiny_ckpt).names())
    assert s["in_weights"] == weights
    eta = 196.81e9 * s["convert_seconds"] / weights
    assert s["eta_real_model_seconds"] == pytest.approx(eta)
    line = next(ln for ln in r.stdout.splitlines() if "ETA" in ln)
    assert f"input {rate / 1e6:.1f} MB/s" in line and "197 B weights (372 GB in bf16)" in line
    minutes = eta / 60
    m = int(round(minutes))
    shown = f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{minutes:.1f} min"
    assert shown in line, (shown, line)
