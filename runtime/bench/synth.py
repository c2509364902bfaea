"""Random-weight Step-3.5 GGUF files at any width, written straight from random bytes.

No checkpoint and no quantization: each quantized tensor is random nibbles under fixed
block scales chosen so a matrix maps unit-RMS inputs to unit-RMS outputs (zero-mean
weights of std 1/sqrt(cols)), which keeps activations finite through many layers.
Metadata and tensor names come from the converter's own tables (convert.gguf_meta,
convert.layout), so the runtime reads these files exactly as converted ones.
Tensors are streamed one expert slice at a time: memory stays bounded at real widths.
The file is written as the converter writes its own (convert.output_file): under `.NAME.PID.part`,
published by an atomic rename that replaces an existing file only when forced, and a killed
run's temporary file is removed by the next run to the same output.

The header carries a placeholder byte-level BPE vocabulary of the file's size (the 256 byte
tokens, then "t0", "t1", ... and an end token), so that llama.cpp, which refuses a file
without a tokenizer, loads the same file: `bench --llama-cpp` and `--sweep-ram` compare both
engines on it. Text in it spells bytes and those filler names; the benchmarks draw token ids.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

from convert import layout
from convert.gguf_meta import add_hparams
from convert.hf_config import HFConfig
from convert.output_file import check_output, part_name, pid_alive, publish, remove_stale_parts
from runtime.base.paths import written_path
from convert.policy import FILE_TYPE
from quant import row_bytes
from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import Key
from runtime.text.tokenizer import byte_alphabet

ARCH = "step35"
QTYPES = {"q4_k": Q.Q4_K, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K}
_F32_ROLES = {layout.NORM, layout.ROUTER, layout.ROUTER_BIAS}

# Block layouts (ggml): bytes per block and where the scale fields sit.
#   Q4_K (144 B, 256 weights): d f16, dmin f16, 12 B packed 6-bit scales/mins, 128 B nibbles;
#        w = d*sc*q - dmin*m. All 12 scale bytes set so sc = m = 8; dmin = 7.5 d -> zero mean.
#   Q6_K (210 B, 256 weights): 128 B ql, 64 B qh, 16 int8 scales, d f16; w = d*sc*(q - 32).
#   Q8_0 (34 B, 32 weights): d f16, 32 int8.
_Q4K_SCALES = np.array([8] * 8 + [0x88] * 4, dtype=np.uint8)
_Q4K_STD = 8 * np.sqrt((16 ** 2 - 1) / 12)  # weight std per unit d
_Q6K_STD = 8 * np.sqrt((64 ** 2 - 1) / 12)
_Q8_STD = np.sqrt((256 ** 2 - 1) / 12)


def _raw_config(moe_layers, dense_layers, hidden, n_head_full, n_head_sliding, n_kv, head_dim, window,
                n_expert, top_k, expert_ffn, shared_ffn, dense_ffn, vocab, mtp=0) -> dict:
    n = dense_layers + moe_layers
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
    return {
        "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5",
        "hidden_size": hidden, "num_hidden_layers": n, "vocab_size": vocab,
        "num_attention_heads": n_head_full, "num_attention_groups": n_kv, "head_dim": head_dim,
        "intermediate_size": dense_ffn,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": n_head_sliding,
                                    "num_attention_groups": n_kv, "head_dim": head_dim, "true_head_dim": head_dim},
        "layer_types": types,
        "partial_rotary_factors": [1.0 if t == "sliding_attention" else 0.5 for t in types],
        "rope_theta": [5_000_000.0 if t == "full_attention" else 10_000.0 for t in types],
        "rope_scaling": None, "sliding_window": window, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-5,
        "moe_layers_enum": ",".join(str(i) for i in range(dense_layers, n)),
        "moe_every_n_layer": 1, "moe_num_experts": n_expert, "moe_top_k": top_k,
        "moe_intermediate_size": expert_ffn, "share_expert_dim": shared_ffn,
        "moe_router_activation": "sigmoid", "moe_router_scaling_factor": 3.0,
        "norm_expert_weight": True, "use_moe_router_bias": True, "need_fp32_gate": True,
        "swiglu_limits": [7.0 if i >= dense_layers and i % 2 else 0.0 for i in range(n)],
        "swiglu_limits_shared": [16.0 if i % 3 == 0 else 0.0 for i in range(n)],
        "num_nextn_predict_layers": mtp, "tie_word_embeddings": False,
    }


MIN_VOCAB = 258  # the 256 byte tokens, one filler, the end token
MAX_LAYERS = 45  # Step-3.5-Flash's blocks (3 dense, 42 MoE): a synth file is at most the real model's depth


def add_placeholder_vocab(writer: gguf.GGUFWriter, vocab: int) -> None:
    """A byte-level BPE ("gpt2", GPT-2's split) of `vocab` tokens: ids 0-255 the bytes, then
    fillers "t0", "t1", ... (merges make "t0".."t9"), and the last id an end-of-text token."""
    tokens = byte_alphabet() + [f"t{i}" for i in range(vocab - 257)] + ["<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * (vocab - 1) + [gguf.TokenType.CONTROL]
    writer.add_string(Key.TOK_MODEL, "gpt2")
    writer.add_string(Key.TOK_PRE, "gpt-2")
    writer.add_array(Key.TOK_LIST, tokens)
    writer.add_array(Key.TOK_TYPES, [int(t) for t in types])
    writer.add_array(Key.TOK_MERGES, [f"t {d}" for d in range(min(10, vocab - 257))])
    writer.add_uint32(Key.TOK_EOS, vocab - 1)
    writer.add_bool(Key.TOK_ADD_BOS, False)
    writer.add_bool(Key.TOK_ADD_EOS, False)


def _qtype(spec: layout.TensorSpec, q: Q) -> Q:
    if spec.role in _F32_ROLES:
        return Q.F32
    if spec.role == layout.OUTPUT:
        return Q.Q6_K
    return q


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int, std: float) -> np.ndarray:
    """[rows, row_bytes] uint8: valid `qtype` blocks of zero-mean weights with about `std`."""
    rb = row_bytes(qtype, cols)
    n = rows * rb
    raw = rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(rows, rb)  # 10x rng.bytes
    if qtype == Q.Q4_K:
        b = raw.reshape(-1, 144)
        d = np.float16(std / _Q4K_STD)
        b[:, 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        b[:, 2:4] = np.frombuffer(np.float16(7.5 * np.float32(d)).tobytes(), np.uint8)
        b[:, 4:16] = _Q4K_SCALES
    elif qtype == Q.Q6_K:
        b = raw.reshape(-1, 210)
        b[:, 192:208] = 8
        b[:, 208:210] = np.frombuffer(np.float16(std / _Q6K_STD).tobytes(), np.uint8)
    elif qtype == Q.Q8_0:
        b = raw.reshape(-1, 34)
        b[:, 0:2] = np.frombuffer(np.float16(std / _Q8_STD).tobytes(), np.uint8)
    else:
        raise StepstreamError(f"synth: no random block writer for {qtype.name}")
    return raw


def _f32_values(spec: layout.TensorSpec, rng, router_scale: float, bias_skew: float) -> np.ndarray:
    if spec.role == layout.NORM:  # GGUF norms hold 1 + w
        return (1.0 + 0.05 * rng.standard_normal(spec.shape)).astype(np.float32)
    if spec.role == layout.ROUTER:  # unit-scale logits for unit-RMS inputs
        return (rng.standard_normal(spec.shape) * (router_scale / np.sqrt(spec.shape[-1]))).astype(np.float32)
    return (bias_skew * rng.standard_normal(spec.shape)).astype(np.float32)  # router bias


def _std(spec: layout.TensorSpec) -> float:
    return 1.0 if spec.role == layout.EMBED else 1.0 / np.sqrt(spec.shape[-1])


def _remove_legacy_parts(out: Path) -> None:
    """Remove `NAME.partPID` files, the temporary name of earlier versions, left by dead runs
    (killed with SIGKILL): part_name's `.NAME.PID.part` ones go with remove_stale_parts."""
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe only on POSIX
        return
    prefix = f"{out.name}.part"
    try:
        candidates = list(out.parent.iterdir())
    except OSError:
        return
    for p in candidates:
        pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def write_synth(path: str | os.PathLike, *, moe_layers: int = 3, dense_layers: int = 1, hidden: int = 4096,
                n_head_full: int = 64, n_head_sliding: int = 96, n_kv: int = 8, head_dim: int = 128, window: int = 512,
                n_expert: int = 288, top_k: int = 8, expert_ffn: int = 1280, shared_ffn: int = 1280,
                dense_ffn: int = 11264, vocab: int = 128896, qtype: str = "q4_k", router_scale: float = 1.0,
                bias_skew: float = 0.0, seed: int = 0, progress: bool = True, force: bool = False, mtp: int = 0) -> Path:
    """Write a random-weight Step-3.5 GGUF to `path` (via a temporary name); return the path.

    An existing `path` is an error unless `force`."""
    if qtype not in QTYPES:
        raise StepstreamError(f"synth: unknown qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    if moe_layers < 1:  # what synth is for: experts to stream, place and plan (plan refuses a file without)
        raise StepstreamError(f"synth: --moe-layers {moe_layers}: the model needs at least one MoE layer, "
                              f"whose experts stream")
    if dense_layers < 0:
        raise StepstreamError(f"synth: --dense-layers {dense_layers} must be 0 or more")
    if moe_layers + dense_layers > MAX_LAYERS:
        raise StepstreamError(f"synth: --moe-layers {moe_layers} and --dense-layers {dense_layers} make "
                              f"{moe_layers + dense_layers} layers; Step-3.5-Flash has {MAX_LAYERS} (3 dense, 42 MoE), "
                              f"the most synth writes")
    for flag, v in (("--hidden", hidden), ("--expert-ffn", expert_ffn), ("--shared-ffn", shared_ffn),
                    ("--dense-ffn", dense_ffn)):
        if v <= 0 or v % 256:
            raise StepstreamError(f"synth: {flag} {v} must be a positive multiple of 256 (Q4_K/Q6_K blocks)")
    if vocab < MIN_VOCAB:
        raise StepstreamError(f"synth: --vocab {vocab} must be at least {MIN_VOCAB} (256 byte tokens, a filler, an end token)")
    if n_head_full % n_kv or n_head_sliding % n_kv:
        raise StepstreamError(f"synth: --heads {n_head_full} and --heads-sliding {n_head_sliding} must be multiples "
                              f"of --kv-heads {n_kv}")
    if not 1 <= top_k <= n_expert:
        raise StepstreamError(f"synth: --top-k {top_k} must be 1 to --experts {n_expert}")
    if not (math.isfinite(router_scale) and router_scale > 0 and math.isfinite(bias_skew) and bias_skew >= 0):
        raise StepstreamError(f"synth: the router scale ({router_scale}) must be finite and positive, the bias skew "
                              f"({bias_skew}) finite and 0 or more")
    if not 0 <= mtp <= 3:
        raise StepstreamError(f"synth: --mtp {mtp}: Step-3.5-Flash has 3 MTP heads; give 0 to 3")
    raw = _raw_config(moe_layers, dense_layers, hidden, n_head_full, n_head_sliding, n_kv, head_dim, window,
                      n_expert, top_k, expert_ffn, shared_ffn, dense_ffn, vocab, mtp)
    cfg = HFConfig.from_dict(raw, "synth")
    q = QTYPES[qtype]
    specs = layout.checkpoint_layout(cfg)
    plan = []
    for s in specs:
        t = _qtype(s, q)
        rows = s.n_elements // s.shape[-1]
        plan.append((s, t, rows * row_bytes(t, s.shape[-1])))
    out = Path(path)
    check_output(out, force)
    out = written_path(out)  # through a symlink: its target, beside which the .part is written
    remove_stale_parts(out)
    _remove_legacy_parts(out)
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    add_hparams(writer, cfg, "synth-step35", FILE_TYPE.get(qtype, FILE_TYPE["q4_k"]))
    add_placeholder_vocab(writer, vocab)
    for s, t, n in plan:
        writer.add_tensor_info(s.gguf_name, s.shape, np.dtype(np.float32), n, raw_dtype=t)
    header = _header(writer)
    total = _file_bytes(len(header), [n for _, _, n in plan], writer.data_alignment)
    _check_space(out, total)
    tmp = part_name(out)
    try:  # opened before any work: a place where no file can be made fails here, in one line
        f = open(tmp, "wb")
    except OSError as e:
        raise StepstreamError(f"{out}: cannot write the synthetic model: cannot create {tmp.name} in "
                              f"{out.parent.absolute()} ({e.strerror})") from None
    bar = None
    try:
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="synth", dynamic_ncols=True)
        f.write(header)
        for k, (s, t, n) in enumerate(plan):
            writer.write_padding(f, f.tell())
            start = f.tell()
            rng = np.random.default_rng([seed, k])
            if t == Q.F32:
                f.write(_f32_values(s, rng, router_scale, bias_skew).tobytes())
            else:
                cols = s.shape[-1]
                rows = s.n_elements // cols
                step = max(1, (32 << 20) // row_bytes(t, cols))  # ~32 MB per write
                for r0 in range(0, rows, step):
                    f.write(random_blocks(rng, t, min(step, rows - r0), cols, _std(s)).tobytes())
            if f.tell() - start != n:
                raise AssertionError(f"{s.gguf_name}: wrote {f.tell() - start} bytes, planned {n}")
            if bar:
                bar.update(n)
        f.flush()
        os.fsync(f.fileno())  # the rename must never publish bytes that are not on disk
        f.close()
        publish(tmp, out, force)
    except OSError as e:  # a full disk, a file system gone read-only, an I/O error: the part goes below
        at = _tell(f)
        _discard(f, tmp)
        raise StepstreamError(f"{out}: cannot write the synthetic model ({e.strerror or e}) after "
                              f"{_mb(at)} of {_mb(total)}; nothing was written under that name") from None
    except BaseException:
        _discard(f, tmp)
        raise
    finally:
        if bar:
            bar.close()
    return out


def _header(writer: gguf.GGUFWriter) -> bytes:
    """Everything before the tensor data (header, metadata, tensor infos), as convert.converter
    builds it: in memory, so that the file's size is known before anything is written."""
    buf = io.BytesIO()
    writer.fout, writer.state = [buf], WriterState.EMPTY  # the writer then opens no file
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.fout = None
    return buf.getvalue()


def _file_bytes(header: int, tensors: list[int], align: int) -> int:
    """The file's size: the header, then each tensor's data padded to the alignment."""
    size = header
    for n in tensors:
        size += -size % align + n
    return size


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _check_space(out: Path, needed: int) -> None:
    """Refuse, before writing, a file its file system cannot hold (as `convert` does)."""
    try:
        free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    except OSError:
        return
    if needed > free:
        raise StepstreamError(f"{out}: the synthetic model needs {_mb(needed)} ({needed:,} bytes), but its file "
                              f"system has {_mb(free)} ({free:,} bytes) free")


def _tell(f) -> int:
    try:
        return f.tell()
    except (OSError, ValueError):  # closed
        return 0


def _discard(f, tmp: Path) -> None:
    """Close and remove the temporary file; a close that fails (the data it flushes has no room)
    or a file system gone read-only does not hide the error that stopped the run."""
    try:
        f.close()
    except OSError:
        pass
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def synth_timed(path, **kw) -> tuple[Path, int, float]:
    """write_synth plus (bytes written, seconds)."""
    t0 = time.perf_counter()
    out = write_synth(path, **kw)
    return out, out.stat().st_size, time.perf_counter() - t0
