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
Without `weight_block_size`, each matrix (each expert) has one scale. Norms, the router and
whatever the checkpoint left unquantized stay bf16 and are read as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convert.hf_config import HFConfig, JsonFields, shown
from convert.safetensors_io import Checkpoint, to_f32
from quant import fp8
from runtime.base.errors import StepstreamError

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
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


def skip_reason(name: str, plan: Scheme | None) -> str | None:
    """Why an FP8 checkpoint's tensor is left out (None: it is not one it may leave out)."""
    if plan is not None and name.endswith(".input_scale"):
        return ("a static FP8 activation scale (activation_scheme \"static\"): stepstream's activations "
                "stay float32, or int8 with scales of their own")
    return None


def is_scale(name: str) -> bool:
    return name.endswith(".weight" + SCALE_SUFFIX)


def weight_of(scale_name: str) -> str:
    return scale_name[:-len(SCALE_SUFFIX)]


def scales_of(ckpt: Checkpoint, name: str, shape: tuple[int, ...], experts: bool,
              plan: Scheme | None) -> Scales | None:
    """The scales of checkpoint tensor `name` (None: it is not FP8), checked against its shape and
    the scheme; a weight without its scales, or scales without an FP8 weight, is an error."""
    where = ckpt.file_of(name)
    dtype = ckpt.entry(name).dtype
    scale_name = name + SCALE_SUFFIX
    has_scales = scale_name in ckpt.weight_map
    if dtype not in fp8.DTYPES:
        if has_scales:
            raise StepstreamError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} scales {name!r}, which is "
                                  f"{dtype}, not FP8")
        return None
    if plan is None:
        raise StepstreamError(f"{where}: tensor {name!r} is {dtype}, but config.json has no quantization_config "
                              "(quant_method \"fp8\") to say how it is scaled")
    if not has_scales:
        raise StepstreamError(f"{where}: tensor {name!r} is {dtype} without its scales {scale_name!r}")
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
        ok = math.prod(entry.shape) == math.prod(lead)
        want = f"one scale per {'expert' if experts else 'matrix'} ({math.prod(lead)})"
    if not ok:
        raise StepstreamError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} has shape {list(entry.shape)}; "
                              f"expected {want}")
    return Scales(scale_name, dtype, block, (sr, sc))


def dequantize_chunk(ckpt: Checkpoint, s: Scales, codes: np.ndarray, matrix: int, row0: int, cols: int) -> np.ndarray:
    """float32 [n * cols] of FP8 codes uint8 [n * cols], rows row0.. of matrix `matrix` (the
    expert, 0 for a plain matrix): reads the scale rows they need, checked finite."""
    n = codes.size // cols
    sr, sc = s.grid
    lo = row0 // s.block[0]
    hi = (row0 + n - 1) // s.block[0] + 1 if n else lo
    dtype = ckpt.entry(s.name).dtype
    scales = to_f32(ckpt.read_raw(s.name, (matrix * sr + lo) * sc, (hi - lo) * sc), dtype)
    bad = np.flatnonzero(~np.isfinite(scales))
    if bad.size:
        flat = (matrix * sr + lo) * sc + int(bad[0])
        raise StepstreamError(f"{ckpt.file_of(s.name)}: tensor {s.name!r} holds a scale that is NaN or Inf "
                              f"(first at flat index {flat})")
    return fp8.dequantize(codes.reshape(n, cols), s.dtype, scales.reshape(hi - lo, sc), row0, s.block).reshape(-1)
