"""Streaming Hugging Face Step-3.5 checkpoint -> GGUF conversion.

The plan is made from headers alone: every checkpoint tensor is matched to the layout
(or skipped for a stated reason), shapes and dtypes are checked against config.json, and
every GGUF tensor's format and byte size are fixed. Only then is data touched, one
tensor (or one expert slice of a fused [E, I, H] tensor) at a time, so peak memory is
one slice plus its quantized copy, whatever the model size. The GGUF is written under a
temporary name and renamed when complete (convert.output_file); on any error or interrupt
the temporary file is removed, and an existing output is never replaced unless forced.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import quant
from convert import layout, policy
from convert.gguf_meta import add_hparams, llama3_rope_factors
from convert.output_file import check_output, open_part, part_name, publish, remove_stale_parts
from convert.hf_config import HFConfig
from convert.safetensors_io import SUPPORTED_DTYPES, Checkpoint
from convert.tokenizer_gguf import add_tokenizer, read_tokenizer
from quant.formats import row_bytes
from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import ARCH, ROPE_FREQS
from runtime.base.system import current_rss_bytes, peak_rss_bytes, reset_peak_rss


@dataclass(frozen=True)
class PlannedTensor:
    spec: layout.TensorSpec
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    fallback: bool  # the wanted format did not fit the row length


@dataclass
class Summary:
    out_path: str
    ftype: str
    n_tensors: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    by_type: dict[str, list[int]] = field(default_factory=dict)  # name -> [count, bytes]
    fallbacks: list[str] = field(default_factory=list)
    n_weights: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    seconds: float = 0.0
    start_rss_bytes: int = 0
    peak_rss_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        data = sum(b for _, b in self.by_type.values())
        return 8.0 * data / max(self.n_weights, 1)

    def add(self, t: PlannedTensor, in_bytes: int) -> None:
        """Count a tensor written from in_bytes of checkpoint data."""
        self.in_bytes += in_bytes
        self.n_tensors += 1
        self.n_weights += t.spec.n_elements
        entry = self.by_type.setdefault(t.qtype.name, [0, 0])
        entry[0] += 1
        entry[1] += t.nbytes
        if t.fallback:
            self.fallbacks.append(t.spec.gguf_name)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bits_per_weight"] = self.bits_per_weight
        d["input_mb_per_s"] = self.in_bytes / 1e6 / max(self.seconds, 1e-9)
        return d

    def text(self) -> str:
        lines = [f"wrote {self.out_path}: {self.n_tensors} tensors, {self.out_bytes / 1e6:.1f} MB, "
                 f"{self.bits_per_weight:.2f} bits/weight over {self.n_weights / 1e6:.1f} M weights"]
        for name, (count, nbytes) in sorted(self.by_type.items()):
            lines.append(f"  {name:>5}: {count:4d} tensors, {nbytes / 1e6:10.1f} MB")
        if self.fallbacks:
            lines.append(f"  {len(self.fallbacks)} tensors fell back to another format (row length): {', '.join(self.fallbacks[:4])}{' ...' if len(self.fallbacks) > 4 else ''}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        lines.append(f"  {self.in_bytes / 1e6:.1f} MB read in {self.seconds:.1f} s ({self.in_bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s), "
                     f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB (at start {self.start_rss_bytes / 2**20:.0f} MiB)")
        return "\n".join(lines)


def plan(cfg: HFConfig, ckpt: Checkpoint, ftype: str) -> tuple[list[PlannedTensor], dict[str, str]]:
    """Match checkpoint tensors to the layout; fail on anything missing, unknown or misshapen."""
    specs = layout.checkpoint_layout(cfg)
    expected = {s.hf_name: s for s in specs}
    skipped: dict[str, str] = {}
    for name in ckpt.names():
        if name in expected:
            continue
        reason = next((why for suffix, why in layout.SKIPPABLE_SUFFIXES.items() if name.endswith(suffix)), None)
        if reason is None:
            raise StepstreamError(f"{ckpt.file_of(name)}: tensor {name!r} is not part of the Step-3.5 layout implied by config.json")
        skipped[name] = reason
    planned = []
    for s in specs:
        if s.hf_name not in ckpt.weight_map:
            raise StepstreamError(f"{ckpt.dir}: tensor {s.hf_name!r} (shape {list(s.shape)}) is missing from the checkpoint")
        entry = ckpt.entry(s.hf_name)
        where = ckpt.file_of(s.hf_name)
        if entry.dtype not in SUPPORTED_DTYPES:
            raise StepstreamError(f"{where}: tensor {s.hf_name!r} has dtype {entry.dtype}; supported dtypes are {', '.join(SUPPORTED_DTYPES)}")
        if entry.shape != s.shape:
            raise StepstreamError(f"{where}: tensor {s.hf_name!r} has shape {list(entry.shape)}, but config.json implies {list(s.shape)}")
        q = policy.choose(s, ftype)
        rows = s.n_elements // s.shape[-1]
        planned.append(PlannedTensor(s, q, rows * row_bytes(q, s.shape[-1]), q != policy.wanted(s, ftype)))
    return planned, skipped


def _check_finite(x: np.ndarray, name: str, where: Path, index: int | None) -> None:
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.ravel()))[0])
        part = f" (expert {index})" if index is not None else ""
        raise StepstreamError(f"{where}: tensor {name!r}{part} holds NaN or Inf (first at flat index {bad})")


def _encode(x: np.ndarray, t: PlannedTensor) -> bytes:
    rows = x.reshape(-1, t.spec.shape[-1])
    return quant.quantize(np.ascontiguousarray(rows, dtype=np.float32), t.qtype).tobytes()


def _check_paths(hf_dir: Path, out: Path, force: bool) -> None:
    if not hf_dir.is_dir():
        raise StepstreamError(f"{hf_dir}: not a directory")
    check_output(out, force)
    remove_stale_parts(out)


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, ftype: str = policy.DEFAULT_TYPE,
            *, tokenizer_pre: str | None = None, progress: bool = True, name: str | None = None,
            force: bool = False) -> Summary:
    """Convert `hf_dir` to the GGUF `out_path`; an existing `out_path` is an error unless `force`."""
    if ftype not in policy.TYPES:
        raise StepstreamError(f"unknown --type {ftype!r}; choose one of {', '.join(policy.TYPES)}")
    t0 = time.perf_counter()
    reset_peak_rss()
    start_rss = current_rss_bytes()
    hf_dir, out = Path(hf_dir), Path(out_path)
    _check_paths(hf_dir, out, force)
    cfg = HFConfig.load(hf_dir)
    ckpt = Checkpoint(hf_dir)
    planned, skipped = plan(cfg, ckpt, ftype)
    tok = read_tokenizer(hf_dir, cfg.vocab_size, tokenizer_pre)
    rope_factors = llama3_rope_factors(cfg)

    summary = Summary(str(out), ftype, skipped=skipped, start_rss_bytes=start_rss)
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    tmp = part_name(out)
    try:
        open_part(out).close()
        add_hparams(writer, cfg, name or hf_dir.resolve().name, policy.FILE_TYPE[ftype])
        add_tokenizer(writer, tok)
        for t in planned:
            writer.add_tensor_info(t.spec.gguf_name, t.spec.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        if rope_factors is not None:
            writer.add_tensor_info(ROPE_FREQS, rope_factors.shape, rope_factors.dtype, rope_factors.nbytes)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        bar = _progress_bar(ckpt, planned, ftype) if progress else None
        for t in planned:
            writer.write_padding(f, f.tell())
            _write_tensor(f, ckpt, t)
            summary.add(t, ckpt.entry(t.spec.hf_name).nbytes)
            if bar:
                bar.update(ckpt.entry(t.spec.hf_name).nbytes)
        if rope_factors is not None:
            writer.write_padding(f, f.tell())
            f.write(rope_factors.tobytes())
            summary.n_tensors += 1
        if bar:
            bar.close()
        f.flush()
        os.fsync(f.fileno())
        writer.close()
        publish(tmp, out, force)
    except BaseException:
        try:
            writer.close()
        finally:  # even if a second Ctrl-C lands in close()
            tmp.unlink(missing_ok=True)
        raise
    summary.out_bytes = out.stat().st_size
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _progress_bar(ckpt: Checkpoint, planned: list[PlannedTensor], ftype: str):
    from tqdm import tqdm

    return tqdm(total=sum(ckpt.entry(t.spec.hf_name).nbytes for t in planned), unit="B", unit_scale=True,
                unit_divisor=1024, desc=f"convert {ftype}", dynamic_ncols=True)


def _write_tensor(f, ckpt: Checkpoint, t: PlannedTensor) -> None:
    """One tensor's GGUF bytes at f's position: read (one expert slice at a time), checked, encoded."""
    start = f.tell()
    where = ckpt.file_of(t.spec.hf_name)
    slices = range(t.spec.shape[0]) if t.spec.role == layout.EXPERTS else [None]
    for index in slices:
        x = ckpt.read(t.spec.hf_name, index)
        _check_finite(x, t.spec.hf_name, where, index)
        if t.spec.role == layout.NORM:
            x = x + np.float32(1.0)
        f.write(_encode(x, t))
        del x
    if f.tell() - start != t.nbytes:
        raise AssertionError(f"{t.spec.gguf_name}: wrote {f.tell() - start} bytes, planned {t.nbytes}")


def count_types(path: str | os.PathLike) -> Counter:
    """Tensor formats in a GGUF file, for checks and tests."""
    return Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
