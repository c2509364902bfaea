"""Streaming Hugging Face Step-3.5 checkpoint -> GGUF conversion.

The plan is made from headers alone: every checkpoint tensor is matched to the layout
(or skipped for a stated reason), shapes and dtypes are checked against config.json, and
every GGUF tensor's format and byte size are fixed. Only then is data touched, in chunks
of whole rows that never cross an expert slice (convert.tensor_stream), so peak memory is
two chunks and their quantized copies, whatever the model size; the quantizers use every
core. The GGUF is written under a temporary name and renamed when complete
(convert.output_file); on any error or interrupt the temporary file is removed, unless the
run was asked to --resume, and an existing output is never replaced unless forced. After
each tensor the data is fsynced and a progress record names the tensors complete
(convert.resume), so a killed conversion can be continued to the same bytes.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numba
import numpy as np
from gguf.gguf_writer import WriterState

from convert import fp8_source, layout, policy
from convert import resume as resume_record
from convert.gguf_meta import add_hparams, llama3_rope_factors
from convert.output_file import check_output, open_part, part_name, publish, remove_stale_parts
from runtime.base.paths import written_path
from convert.tensor_stream import load_kernels, write_tensor, writer
from convert.hf_config import HFConfig
from convert.safetensors_io import SUPPORTED_DTYPES, Checkpoint
from convert.tokenizer_gguf import add_tokenizer, read_tokenizer
from quant.formats import row_bytes
from runtime.base import interrupts
from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import ARCH, ROPE_FREQS
from runtime.base.system import current_rss_bytes, peak_rss_bytes, reset_peak_rss


# Step-3.5-Flash's weights (196.81 B, the model card's count), 372 GB as the released bf16
# checkpoint, about half that as its FP8 one: the ETA is in weights, which both hold the same.
REAL_MODEL_WEIGHTS = 196.81e9


@dataclass(frozen=True)
class PlannedTensor:
    spec: layout.TensorSpec
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    fallback: bool  # the wanted format did not fit the row length
    scales: fp8_source.Scales | None = None  # an FP8 weight's block scales

    def in_bytes(self, ckpt: Checkpoint) -> int:
        """The checkpoint bytes it is read from: the weight, and an FP8 weight's scales."""
        return ckpt.entry(self.spec.hf_name).nbytes + (ckpt.entry(self.scales.name).nbytes if self.scales else 0)


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
    in_weights: int = 0  # weights read by this run (a resumed run's earlier tensors excluded)
    out_bytes: int = 0
    seconds: float = 0.0
    convert_seconds: float = 0.0  # reading, quantizing and writing tensors: what scales with size
    convert_cpu_seconds: float = 0.0  # CPU time of all threads meanwhile
    resumed_tensors: int = 0  # complete in the .part this run continued (not counted in in_bytes)
    start_rss_bytes: int = 0
    peak_rss_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        data = sum(b for _, b in self.by_type.values())
        return 8.0 * data / max(self.n_weights, 1)

    def add(self, t: PlannedTensor, in_bytes: int) -> None:
        """Count a tensor written from in_bytes of checkpoint data (0: written by the interrupted
        run this one continued; it is in the file, its reading was not this run's)."""
        self.in_bytes += in_bytes
        self.in_weights += t.spec.n_elements if in_bytes else 0
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
        d["convert_mb_per_s"] = self.convert_rate / 1e6
        d["eta_real_model_seconds"] = self.eta_seconds(REAL_MODEL_WEIGHTS)
        return d

    @property
    def convert_rate(self) -> float:
        """Checkpoint bytes per second while converting tensors (setup excluded: it does not grow)."""
        return self.in_bytes / max(self.convert_seconds, 1e-9)

    def eta_seconds(self, weights: float) -> float:
        """Seconds to convert `weights` at this run's rate in weights (bytes would count an FP8
        checkpoint's weights at half a bf16 one's)."""
        return weights * self.convert_seconds / max(self.in_weights, 1)

    def text(self) -> str:
        lines = [f"wrote {self.out_path}: {self.n_tensors} tensors, {self.out_bytes / 1e6:.1f} MB, "
                 f"{self.bits_per_weight:.2f} bits/weight over {self.n_weights / 1e6:.1f} M weights"]
        for name, (count, nbytes) in sorted(self.by_type.items()):
            lines.append(f"  {name:>5}: {count:4d} tensors, {nbytes / 1e6:10.1f} MB")
        if self.fallbacks:
            lines.append(f"  {len(self.fallbacks)} tensors fell back to another format (row length): {', '.join(self.fallbacks[:4])}{' ...' if len(self.fallbacks) > 4 else ''}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        if self.resumed_tensors:
            lines.append(f"  resumed: {self.resumed_tensors} tensors were complete in the interrupted conversion")
        lines.append(f"  {self.in_bytes / 1e6:.1f} MB read in {self.seconds:.1f} s ({self.in_bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s), "
                     f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB (at start {self.start_rss_bytes / 2**20:.0f} MiB)")
        eta = self.eta_seconds(REAL_MODEL_WEIGHTS)
        lines.append(f"  input {self.convert_rate / 1e6:.1f} MB/s ({self.in_weights / max(self.convert_seconds, 1e-9) / 1e6:.1f} "
                     f"M weights/s) while converting tensors; at this rate Step-3.5-Flash's "
                     f"{REAL_MODEL_WEIGHTS / 1e9:.0f} B weights (372 GB in bf16) take {_duration(eta)} (ETA)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{max(seconds, 0) / 60:.1f} min"


def plan(cfg: HFConfig, ckpt: Checkpoint, ftype: str,
         fp8: fp8_source.Scheme | None = None) -> tuple[list[PlannedTensor], dict[str, str]]:
    """Match checkpoint tensors to the layout; fail on anything missing, unknown or misshapen.
    `fp8`: the checkpoint's FP8 scheme, when its config.json declares one."""
    specs = layout.checkpoint_layout(cfg)
    expected = {s.hf_name for s in specs}
    skipped: dict[str, str] = {}
    for name in ckpt.names():
        if name in expected:
            continue
        weight = fp8_source.weight_of(name)
        if weight is not None and weight in expected:
            continue  # read with its weight, which scales_of below pairs it with
        reason = layout.skip_reason(cfg, name) or fp8_source.skip_reason(name, fp8, expected, cfg)
        if reason is None:
            raise StepstreamError(f"{ckpt.file_of(name)}: tensor {name!r} is not part of the Step-3.5 layout implied by config.json")
        skipped[name] = reason
    for name, shard in ckpt.unlisted().items():  # as transformers, which loads what the index names
        skipped[f"{name} ({shard.name})"] = "in a shard, but not named by the index: not read"
    planned = []
    model = policy.ModelFacts.of(cfg)
    for s in specs:
        if s.hf_name not in ckpt.weight_map:
            raise StepstreamError(f"{ckpt.dir}: tensor {s.hf_name!r} (shape {list(s.shape)}) is missing from the checkpoint")
        entry = ckpt.entry(s.hf_name)
        where = ckpt.file_of(s.hf_name)
        if entry.dtype not in SUPPORTED_DTYPES:
            raise StepstreamError(f"{where}: tensor {s.hf_name!r} has dtype {entry.dtype}; supported dtypes are {', '.join(SUPPORTED_DTYPES)}")
        if entry.shape != s.shape:
            raise StepstreamError(f"{where}: tensor {s.hf_name!r} has shape {list(entry.shape)}, but config.json implies {list(s.shape)}")
        scales = fp8_source.scales_of(ckpt, s.hf_name, s.shape, s.role == layout.EXPERTS, fp8)
        q = policy.choose(s, ftype, model)
        rows = s.n_elements // s.shape[-1]
        planned.append(PlannedTensor(s, q, rows * row_bytes(q, s.shape[-1]), q != policy.wanted(s, ftype, model),
                                     scales))
    return planned, skipped


def load_writers(planned: list[PlannedTensor], ftype: str, progress: bool) -> None:
    """Load each planned format's quantizer (compile it, the first run after an install: 20-25 s
    for Q4_K and Q6_K on two cores) before the progress bar, saying so when `progress`; a format
    stepstream cannot write fails here, before any data is read."""
    if progress:
        print("loading the quantizers...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        for q in sorted({t.qtype for t in planned}):
            try:
                writer(q)
            except StepstreamError as e:
                first = next(t.spec.gguf_name for t in planned if t.qtype == q)
                raise StepstreamError(f"--type {ftype}: tensor {first!r} needs {q.name}, which stepstream cannot "
                                      f"write ({e})") from None
    except BaseException:
        if progress:
            print(file=sys.stderr, flush=True)  # the error that follows gets a line of its own
        raise
    if progress:
        seconds = time.perf_counter() - t0
        print(f" compiled in {seconds:.0f} s (first run after an install; cached from now on)" if seconds > 3
              else " done", file=sys.stderr, flush=True)


def _file_bytes(header: bytes, planned: list[PlannedTensor], rope_factors) -> int:
    """The output's size: the header, then each tensor's data padded to the alignment."""
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    size = len(header)
    for nbytes in [t.nbytes for t in planned] + ([rope_factors.nbytes] if rope_factors is not None else []):
        size += -size % align + nbytes
    return size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _check_space(out: Path, needed: int) -> None:
    """Refuse to start a conversion whose output cannot fit on its file system."""
    import shutil

    try:
        usage = shutil.disk_usage(out.parent if str(out.parent) else ".")
    except OSError:
        return
    if usage.total == 0:  # a pseudo file system (/proc) reports no size: the write will say what is wrong
        return
    free = usage.free
    if needed > free:
        raise StepstreamError(f"{out}: the output needs {_mb(needed)} more, but its file system has {_mb(free)} free")


def model_name(hf_dir: Path) -> str:
    """general.name by default: the checkpoint directory's name, or for a Hugging Face cache
    snapshot (models--ORG--NAME/snapshots/COMMIT) the repository's NAME, not the commit hash."""
    d = hf_dir.resolve()
    repo = d.parent.parent.name
    if d.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo.split("--", 2)[2]
    return d.name


def _check_paths(hf_dir: Path, out: Path, force: bool) -> None:
    if not hf_dir.is_dir():
        raise StepstreamError(f"{hf_dir}: not a directory")
    check_output(out, force, hf_dir)


def _header(writer: gguf.GGUFWriter) -> bytes:
    """Everything before the tensor data (header, metadata, tensor infos), as bytes.

    Written into memory rather than the file so a resumed run can compare it with the start
    of the file it continues, and hash it into the conversion key."""
    buf = io.BytesIO()
    writer.fout = [buf]  # gguf writes to fout; the writer then skips opening a file
    writer.state = WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.fout = None
    return buf.getvalue()


def _open_output(out: Path, header: bytes, key: str, resume: bool, force: bool) -> tuple[object, resume_record.Progress]:
    """The `.part` to write, positioned after its last complete tensor: a dead conversion's
    with the same key when resuming, else a new one holding the header. A dead conversion's
    `.part` with complete tensors that this run does not continue (another key, or no
    --resume) is discarded only with `force`: a plain run used to delete it, and for the real
    checkpoint that is up to an hour and a half of work."""
    tmp = part_name(out)
    progress = resume_record.adopt(out, key) if resume else None
    if progress is None and not force:  # an interrupted conversion's work is discarded only with --force
        other = resume_record.other_conversion(out)
        if other is not None and resume:
            part, done = other
            raise StepstreamError(f"{part}: an interrupted conversion to {out.name} ({done} tensors complete) was made "
                                  f"with other options, another checkpoint or another stepstream; --resume continues "
                                  f"only the same conversion. Run it with its own options, or add --force to discard it")
        if other is not None:
            part, done = other
            raise StepstreamError(f"{part}: an interrupted conversion to {out.name} ({done} tensors complete) is kept "
                                  f"for --resume; run the same command with --resume to continue it, or add --force "
                                  f"to discard it and start over")
    remove_stale_parts(out)
    if progress is not None:
        f = open(tmp, "r+b")
        if f.read(len(header)) == header and progress.end >= len(header) and os.fstat(f.fileno()).st_size >= progress.end:
            f.truncate(progress.end)
            f.seek(progress.end)
            return f, progress
        f.close()  # a record that does not describe its file: start over
    f = open_part(out)
    f.write(header)
    return f, resume_record.Progress(key, 0, len(header))


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, ftype: str = policy.DEFAULT_TYPE,
            *, tokenizer_pre: str | None = None, progress: bool = True, name: str | None = None,
            force: bool = False, resume: bool = False, threads: int | None = None) -> Summary:
    """Convert `hf_dir` to the GGUF `out_path`; an existing `out_path` is an error unless `force`.

    `resume`: continue the `.part` of an interrupted conversion of the same checkpoint with
    the same options, and keep this run's `.part` when it stops early (Ctrl-C, SIGTERM, an
    error such as a full disk).
    `threads`: quantizer threads (default: every core)."""
    if ftype not in policy.TYPES:
        raise StepstreamError(f"unknown --type {ftype!r}; choose one of {', '.join(policy.TYPES)}")
    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise StepstreamError(f"--threads {threads}: choose 1..{numba.config.NUMBA_NUM_THREADS}")
        numba.set_num_threads(threads)
    t0 = time.perf_counter()
    load_kernels()  # code, not data: counted in the start RSS
    reset_peak_rss()
    start_rss = current_rss_bytes()
    hf_dir, out = Path(hf_dir), Path(out_path)
    _check_paths(hf_dir, out, force)
    out = written_path(out)  # through a symlink: its target, beside which the .part is written
    cfg = HFConfig.load(hf_dir)
    fp8 = fp8_source.scheme(cfg, str(hf_dir / "config.json"))
    ckpt = Checkpoint(hf_dir)
    planned, skipped = plan(cfg, ckpt, ftype, fp8)
    tok = read_tokenizer(hf_dir, cfg.vocab_size, tokenizer_pre)
    rope_factors = llama3_rope_factors(cfg)

    summary = Summary(str(out), ftype, skipped=skipped, start_rss_bytes=start_rss)
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    add_hparams(writer, cfg, name or model_name(hf_dir), policy.FILE_TYPE[ftype])
    add_tokenizer(writer, tok)
    for t in planned:
        writer.add_tensor_info(t.spec.gguf_name, t.spec.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    if rope_factors is not None:
        writer.add_tensor_info(ROPE_FREQS, rope_factors.shape, rope_factors.dtype, rope_factors.nbytes)
    header = _header(writer)
    key = resume_record.conversion_key(header, ckpt, fp8_source.identity(cfg))
    total = _file_bytes(header, planned, rope_factors)
    # Before compiling the writers' kernels, not after (a review: a full disk was found only once
    # they had loaded); a .part left here is either continued or replaced, so its bytes count as free.
    _check_space(out, total - _size(part_name(out)))
    load_writers(planned, ftype, progress)

    tmp = part_name(out)
    f = bar = None
    keep = False
    try:
        f, done = _open_output(out, header, key, resume, force)
        _check_space(out, total - f.tell())
        summary.resumed_tensors = done.done
        for t in planned[:done.done]:
            summary.add(t, 0)
        bar = _progress_bar(ckpt, planned[done.done:], ftype) if progress else None
        t1, cpu1 = time.perf_counter(), time.process_time()
        # Ctrl-C and SIGTERM are acted on between chunks, where this thread holds none of the
        # locks it shares with the reader (raised anywhere, they could leave one held: a hang)
        with interrupts.held_back(), ThreadPoolExecutor(1, thread_name_prefix="convert-read") as reader:
            for k, t in enumerate(planned):
                if k < done.done:
                    continue
                writer.write_padding(f, f.tell())
                start = f.tell()
                n = write_tensor(f, ckpt, t.spec, t.qtype, reader, bar.update if bar else None, t.scales)
                if n != t.nbytes or f.tell() - start != t.nbytes:
                    raise AssertionError(f"{t.spec.gguf_name}: wrote {n} bytes, planned {t.nbytes}")
                summary.add(t, t.in_bytes(ckpt))
                f.flush()
                os.fsync(f.fileno())  # the record must never claim bytes that are not on disk
                resume_record.save(tmp, resume_record.Progress(key, k + 1, f.tell()))
        summary.convert_seconds = time.perf_counter() - t1
        summary.convert_cpu_seconds = time.process_time() - cpu1
        if rope_factors is not None:
            writer.write_padding(f, f.tell())
            f.write(rope_factors.tobytes())
            summary.n_tensors += 1
        if bar:
            bar.close()
        f.flush()
        os.fsync(f.fileno())
        f.close()
        publish(tmp, out, force)
        resume_record.remove(tmp)
    except OSError as e:  # a full disk, a file system gone read-only, an I/O error
        _end_bar(bar)
        keep = resume  # for the next --resume; its record stops at the last complete tensor
        at = f.tell() if f is not None and not f.closed else 0
        kept = f"; {tmp.name} is kept: the same command with --resume continues it" if keep else ""
        raise StepstreamError(f"{out}: cannot write the output ({e.strerror or e}) after {_mb(at)} of "
                              f"{_mb(total)}{kept}") from None
    except BaseException as e:  # Ctrl-C, SIGTERM, a bad tensor: with --resume the work so far is kept
        _end_bar(bar)
        keep = resume
        if keep and isinstance(e, KeyboardInterrupt):
            print(f"\nkept {tmp} (the tensors complete so far): the same command with --resume continues it",
                  file=sys.stderr, flush=True)
        raise
    finally:
        try:
            if f is not None:
                f.close()
        except OSError:
            pass
        if not keep:  # even if a second Ctrl-C lands in close()
            try:
                resume_record.remove(tmp)
            except OSError:  # a read-only file system: the error that stopped the run is the one to see
                pass
    summary.out_bytes = out.stat().st_size
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _end_bar(bar) -> None:
    """Close the progress bar before a failure's lines, so that they start lines of their own
    (left to the garbage collector, it was drawn again below the error)."""
    if bar is not None:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a terminal gone: the failure is what matters
            pass


def _progress_bar(ckpt: Checkpoint, planned: list[PlannedTensor], ftype: str):
    from tqdm import tqdm

    return tqdm(total=sum(ckpt.entry(t.spec.hf_name).nbytes for t in planned), unit="B", unit_scale=True,
                unit_divisor=1000, desc=f"convert {ftype}", dynamic_ncols=True)  # MB and MB/s, as the summary


def count_types(path: str | os.PathLike) -> Counter:
    """Tensor formats in a GGUF file, for checks and tests."""
    return Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
