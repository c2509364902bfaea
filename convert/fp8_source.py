"""An FP8 checkpoint's weights: their scales found and checked before any data is read, and each
chunk dequantized to float32 as it is read.

Step-3.5-Flash-FP8, like DeepSeek-V3's FP8 checkpoints, declares in config.json

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

and stores each quantized weight `X.weight` as F8_E4M3 codes beside `X.weight_scale_inv`: one
scale per 128 x 128 block, [..., ceil(R / 128), ceil(C / 128)] for a weight [..., R, C] (a fused
expert tensor [E, R, C] has a grid per expert). The weight is code value x scale, in float32
(quant.fp8), which is what transformers, vLLM and llama.cpp's converter compute before anything
else; the result is then quantized to the chosen GGUF type like a bf16 checkpoint's weights.
Without `weight_block_size`, each matrix (each expert) has one scale, `X.weight_scale_inv` as
transformers writes it or `X.weight_scale` as vLLM names it. Whatever the checkpoint left
unquantized (Step-3.5-Flash-FP8 quantizes the routed experts only) stays bf16 and is read as such:
a tensor's dtype, not `modules_to_not_convert`, says which it is, as in llama.cpp's converter.
Every scale is read and checked when the conversion is planned, before any weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convert import layout
from convert.hf_config import HFConfig, JsonFields, shown
from convert.safetensors_io import Checkpoint, to_f32
from quant import fp8
from runtime.base.errors import StepstreamError

# X.weight -> X.weight_scale_inv, the block scales (and, without weight_block_size, one per
# matrix, as transformers writes them); X.weight_scale, vLLM's name for a per-matrix scale
BLOCK_SUFFIX = "_scale_inv"
SCALE_SUFFIXES = (BLOCK_SUFFIX, "_scale")
SCALE_DTYPES = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class Scheme:
    """What config.json's quantization_config declares."""
    block: tuple[int, int] | None  # weight_block_size (rows, columns); None: one scale per matrix
    source: str


@dataclass(frozen=True)
class Scales:
    """Where one FP8 weight's scales are, and how they tile it."""
    name: str  # the checkpoint tensor of scales
    dtype: str  # the weight's codes: F8_E4M3 or F8_E5M2
    block: tuple[int, int]  # rows and columns of weights per scale (a whole matrix when per-matrix)
    grid: tuple[int, int]  # (SR, SC) scales per matrix


def scheme(cfg: HFConfig, source: str = "config.json") -> Scheme | None:
    """The checkpoint's FP8 scheme, None for an unquantized checkpoint; any other quantization
    (GPTQ, AWQ, NVFP4, INT8...) is refused in one line."""
    fields = JsonFields(cfg.raw, source).nested("quantization_config")
    if fields is None:
        return None
    method = fields.get("quant_method", str)
    if method != "fp8":
        raise StepstreamError(f"{source}: quantization_config.quant_method is {shown(method)}: stepstream converts "
                              "bf16 checkpoints and FP8 ones with block scales (quant_method \"fp8\", as "
                              "stepfun-ai/Step-3.5-Flash-FP8); convert stepfun-ai/Step-3.5-Flash or its -FP8")
    block = fields.get("weight_block_size", list, None)
    if block is not None:
        if len(block) != 2:
            raise StepstreamError(f"{source}: quantization_config.weight_block_size must be [rows, columns], "
                                  f"got {shown(block)}")
        block = tuple(fields.check(b, int, f"weight_block_size[{k}]", "positive") for k, b in enumerate(block))
    return Scheme(block, source)


def identity(cfg: HFConfig) -> str:
    """What of config.json decides how the weights are read (for a resumed conversion's key)."""
    import json

    return json.dumps(cfg.raw.get("quantization_config"), sort_keys=True)


def weight_of(name: str) -> str | None:
    """The weight whose scales tensor `name` would be (X.weight_scale_inv, X.weight_scale), else None."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(".weight" + suffix):
            return name[:-len(suffix)]
    return None


def skip_reason(name: str, plan: Scheme | None, expected: set[str], cfg: HFConfig) -> str | None:
    """Why an FP8 checkpoint's tensor is left out (None: it is not one to leave out): the
    activation scale of a weight in the layout, or the scales of a weight that is itself skipped."""
    if plan is not None and name.endswith(".input_scale") and name[:-len("input_scale")] + "weight" in expected:
        return ("an FP8 activation scale: stepstream's activations stay float32, or int8 with scales of "
                "their own")
    weight = weight_of(name)
    if weight is not None and (why := layout.skip_reason(cfg, weight)) is not None:
        return f"the scales of {weight!r}, which is not converted: {why}"
    return None


def scales_of(ckpt: Checkpoint, name: str, shape: tuple[int, ...], experts: bool,
              plan: Scheme | None) -> Scales | None:
    """The scales of checkpoint tensor `name` (None: it is not FP8), checked against its shape and
    the scheme, and their values read and checked; a weight without its scales, or scales without
    an FP8 weight, is an error."""
    where = ckpt.file_of(name)
    dtype = ckpt.entry(name).dtype
    suffixes = (BLOCK_SUFFIX,) if plan is not None and plan.block is not None else SCALE_SUFFIXES
    present = [name + suffix for suffix in SCALE_SUFFIXES if name + suffix in ckpt.weight_map]
    if dtype not in fp8.DTYPES:
        if present:
            raise StepstreamError(f"{ckpt.file_of(present[0])}: tensor {present[0]!r} scales {name!r}, which is "
                                  f"{dtype}, not FP8")
        return None
    if plan is None:
        raise StepstreamError(f"{where}: tensor {name!r} is {dtype}, but config.json has no quantization_config "
                              "(quant_method \"fp8\") to say how it is scaled")
    found = [n for n in present if n[len(name):] in suffixes]
    if not found:
        raise StepstreamError(f"{where}: tensor {name!r} is {dtype} without its scales "
                              f"{' or '.join(repr(name + x) for x in suffixes)}")
    if len(present) > 1:
        raise StepstreamError(f"{where}: tensor {name!r} has two tensors of scales, {present[0]!r} and "
                              f"{present[1]!r}; which one applies is not clear")
    scale_name = found[0]
    if len(shape) != (3 if experts else 2):
        raise StepstreamError(f"{where}: tensor {name!r} is {dtype}, but only matrices and fused expert tensors "
                              f"can be FP8 here; its shape is {list(shape)}")
    entry = ckpt.entry(scale_name)
    if entry.dtype not in SCALE_DTYPES:
        raise StepstreamError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} has dtype {entry.dtype}; "
                              f"scales must be {', '.join(SCALE_DTYPES)}")
    lead, (rows, cols) = shape[:-2], shape[-2:]
    block = plan.block or (rows, cols)
    sr, sc = fp8.grid(rows, cols, block)
    if plan.block is not None:
        ok = entry.shape == (*lead, sr, sc)
        want = f"{list((*lead, sr, sc))} (weight_block_size {list(block)} over {list(shape)})"
    else:
        ok = entry.shape in ([(*lead,), (*lead, 1), (*lead, 1, 1)] if lead else [(), (1,)])
        want = f"one scale per {'expert, ' + str([*lead]) if lead else 'matrix, [] or [1]'}"
    if not ok:
        raise StepstreamError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} has shape {list(entry.shape)}; "
                              f"expected {want}")
    _check_values(ckpt, scale_name, dtype)
    return Scales(scale_name, dtype, block, (sr, sc))


def _check_values(ckpt: Checkpoint, scale_name: str, codes: str) -> None:
    """Every scale finite, not negative (a quantizer divides by a block's largest magnitude), and
    small enough that no code times it overflows float32; checked before any weight is read (the
    real model's scales are 46 MB, its weights 190 GB)."""
    entry = ckpt.entry(scale_name)
    values = to_f32(ckpt.read_raw(scale_name, 0, math.prod(entry.shape)), entry.dtype)
    table = fp8.table(codes)
    limit = np.finfo(np.float32).max / np.abs(table[np.isfinite(table)]).max()
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0) & (values <= limit)))
    if bad.size:
        i = int(bad[0])
        v = float(values[i])
        why = ("is NaN or Inf" if not math.isfinite(v) else "is negative" if v < 0
               else f"times the largest {codes} value overflows float32")
        raise StepstreamError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} holds scale {v:g} at flat index "
                              f"{i}, which {why}")


def dequantize_chunk(ckpt: Checkpoint, s: Scales, codes: np.ndarray, matrix: int, row0: int, cols: int) -> np.ndarray:
    """float32 [n * cols] of FP8 codes uint8 [n * cols], rows row0.. of matrix `matrix` (the
    expert, 0 for a plain matrix): reads the scale rows they need (scales_of checked them)."""
    n = codes.size // cols
    sr, sc = s.grid
    lo = row0 // s.block[0]
    hi = (row0 + n - 1) // s.block[0] + 1 if n else lo
    scales = to_f32(ckpt.read_raw(s.name, (matrix * sr + lo) * sc, (hi - lo) * sc), ckpt.entry(s.name).dtype)
    return fp8.dequantize(codes.reshape(n, cols), s.dtype, scales.reshape(hi - lo, sc), row0, s.block).reshape(-1)
