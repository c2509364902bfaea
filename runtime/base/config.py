"""The model's hyperparameters, read once from GGUF metadata, validated, then frozen.

Blocks 0..n_layers-1 are the trunk; n_layers..n_blocks-1 are the MTP blocks (GGUF's
`block_count` counts both). Every per-block tuple covers all blocks. Nothing here is
guessed from tensor sizes or file names: a missing or inconsistent key is an error.

Every value that sizes an allocation is checked before anything is allocated: its type
(an integer key holding a string or 2.5 is refused), its range, and its agreement with
the shapes of the tensors in the file (runtime.base.tensor_shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.gguf_schema import ARCH, GATING_NONE, GATING_SIGMOID, OUTPUT, ROUTER, TOKEN_EMBD, Key
from runtime.base.tensor_shapes import check_tensor_shapes

ROPE_BASE_SWA_DEFAULT = 10000.0  # llama.cpp's step35 sliding-layer RoPE base when the file names none

MAX_POSITIONS = 2**31 - 1  # positions are int32 in llama.cpp (llama_pos)


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    hidden: int  # H
    vocab: int  # V
    head_dim: int  # D
    n_layers: int  # trunk blocks
    n_mtp: int  # MTP blocks declared in metadata (their tensors may be absent)
    context_length: int  # training context
    # attention, per block
    sliding: tuple[bool, ...]
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_rot: tuple[int, ...]  # rotated dims: D on sliding blocks, D/2 on full ones
    window: int  # W: a sliding query at p sees keys p-W < k <= p
    rope_base_full: float
    rope_base_sliding: float
    # feed-forward
    moe: tuple[bool, ...]  # per block: routed experts (else a dense MLP)
    dense_ffn: int
    n_expert: int  # E
    n_expert_used: int  # K
    expert_ffn: int  # I
    shared_ffn: int  # S
    expert_scale: float
    expert_norm: bool
    swiglu_limit: tuple[float, ...]  # routed experts, per block; 0 = no clamp
    swiglu_limit_shared: tuple[float, ...]  # shared expert and dense MLPs
    # misc
    rms_eps: float

    @property
    def n_blocks(self) -> int:
        return self.n_layers + self.n_mtp

    @classmethod
    def from_gguf(cls, f: GGUFModelFile) -> ModelConfig:
        m = _Metadata(f)
        sliding, n_head, n_head_kv = _attention(m)
        hidden = m.num(Key.EMBEDDING_LENGTH, lo=1)
        head_dim = _head_dim(m, hidden, n_head[0])
        moe, n_expert, n_used = _moe(m)
        context = m.num(Key.CONTEXT_LENGTH, lo=1, hi=MAX_POSITIONS)
        # A window past the context masks nothing any position can reach: it runs as the context
        # (llama.cpp runs such files too).
        window = min(m.num(Key.SLIDING_WINDOW, 0, lo=0, hi=MAX_POSITIONS), context)
        if any(sliding) and window <= 0:
            raise StepstreamError(f"{m.src}: sliding blocks present but {Key.SLIDING_WINDOW} is {window}")
        base_full = m.num(Key.ROPE_BASE, 10000.0, float, lo=0.0, open_lo=True)
        _refuse_position_scaling(m)
        ffn = m.values(Key.FFN_LENGTH, 0, lo=0)  # llama.cpp may store it per block
        cfg = cls(
            hidden=hidden,
            vocab=_vocab_size(f),
            head_dim=head_dim,
            n_layers=m.n_layers,
            n_mtp=m.n_mtp,
            context_length=context,
            sliding=sliding,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_rot=tuple(head_dim if s else head_dim // 2 for s in sliding),
            window=window,
            rope_base_full=base_full,
            # Without the key, llama.cpp's step35 keeps its default of 10000 (not freq_base).
            rope_base_sliding=m.num(Key.ROPE_BASE_SWA, ROPE_BASE_SWA_DEFAULT, float, lo=0.0, open_lo=True),
            moe=moe,
            dense_ffn=max(ffn),
            n_expert=n_expert,
            n_expert_used=n_used,
            expert_ffn=m.num(Key.EXPERT_FFN, 0, lo=0),
            shared_ffn=m.num(Key.SHARED_FFN, 0, lo=0),
            expert_scale=m.num(Key.EXPERT_SCALE, 1.0, float),
            expert_norm=m.num(Key.EXPERT_NORM, False, bool),
            swiglu_limit=_clamps(m, Key.CLAMP_EXP),
            swiglu_limit_shared=_clamps(m, Key.CLAMP_SHEXP),
            rms_eps=m.num(Key.RMS_EPS, kind=float, lo=0.0, open_lo=True),
        )
        check_tensor_shapes(f, cfg)
        return cfg


class _Metadata:
    """A step35 file's metadata, read with errors that name the file, the key and the value."""

    def __init__(self, f: GGUFModelFile):
        self.f, self.src = f, str(f.path)
        arch = f.get(Key.ARCHITECTURE, None)
        if arch != ARCH:
            raise StepstreamError(f"{self.src}: architecture is {arch!r}; stepstream runs only {ARCH!r} (Step-3.5) models")
        # Every block has tensors (MTP blocks may be left out), so the tensor count bounds the
        # block count before any per-block tuple is built.
        self.n_blocks = self.num(Key.BLOCK_COUNT, lo=1, hi=max(1, len(f.tensors)))
        self.n_mtp = self.num(Key.NEXTN, 0)
        if not 0 <= self.n_mtp < self.n_blocks:
            raise StepstreamError(f"{self.src}: {Key.NEXTN}={self.n_mtp} must be below {Key.BLOCK_COUNT}={self.n_blocks}")
        self.n_layers = self.n_blocks - self.n_mtp

    def num(self, key, default=GGUFModelFile._MISSING, kind=int, lo=None, hi=None, open_lo=False):
        """One value of type `kind` (int, float or bool), within lo..hi when given."""
        v = self.f.get(key, default)
        if isinstance(v, list):
            raise StepstreamError(f"{self.src}: {key} should be one value, found an array of {len(v)}")
        return self._check(key, v, kind, lo, hi, open_lo)

    def per_block(self, key, default=GGUFModelFile._MISSING, kind=int, lo=None, hi=None) -> tuple:
        """One value per block (trunk and MTP): an array of block_count, or one value for all."""
        n = self.f.array_len(key)
        if self.f.has(key) and self.f.fields[key].item is not None and n != self.n_blocks:
            raise StepstreamError(f"{self.src}: {key} has {n} entries, {Key.BLOCK_COUNT} is {self.n_blocks}")
        v = self.f.get(key, default)
        if not isinstance(v, list):
            return tuple([self._check(key, v, kind, lo, hi)] * self.n_blocks)
        return tuple(self._check(f"{key}[{i}]", x, kind, lo, hi) for i, x in enumerate(v))

    def values(self, key, default=GGUFModelFile._MISSING, kind=int, lo=None, hi=None) -> tuple:
        """One value or an array of any length (at least one), each checked."""
        v = self.f.get(key, default)
        if not isinstance(v, list):
            return (self._check(key, v, kind, lo, hi),)
        if not v:
            raise StepstreamError(f"{self.src}: {key} is an empty array")
        return tuple(self._check(f"{key}[{i}]", x, kind, lo, hi) for i, x in enumerate(v))

    def _check(self, key, v, kind, lo, hi, open_lo=False):
        ok = {int: isinstance(v, int) and not isinstance(v, bool), bool: isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}[kind]
        if not ok:
            want = {int: "an integer", bool: "true or false", float: "a finite number"}[kind]
            raise StepstreamError(f"{self.src}: {key} is {v!r}, expected {want}")
        v = kind(v)
        if lo is not None and (v < lo or (open_lo and v == lo)) or hi is not None and v > hi:
            bounds = f"{'above' if open_lo else 'at least'} {lo}" if hi is None else f"in {lo}..{hi}"
            raise StepstreamError(f"{self.src}: {key} is {v}, must be {bounds}")
        return v


def _head_dim(m: _Metadata, hidden: int, n_head0: int) -> int:
    # Without the key llama.cpp takes embedding_length / head_count (of block 0); the tensor
    # shapes are checked against it afterwards.
    head_dim = m.num(Key.KEY_LENGTH, hidden // n_head0, lo=4)
    if m.num(Key.VALUE_LENGTH, head_dim) != head_dim:
        raise StepstreamError(f"{m.src}: key_length {head_dim} != value_length {m.num(Key.VALUE_LENGTH)}; "
                              "Step-3.5 uses one head size")
    if head_dim % 4:
        raise StepstreamError(f"{m.src}: key_length {head_dim} must be a multiple of 4 (half of it is rotated in pairs)")
    if m.f.has(Key.ROPE_DIMS) and m.num(Key.ROPE_DIMS) != head_dim:
        raise StepstreamError(f"{m.src}: {Key.ROPE_DIMS}={m.num(Key.ROPE_DIMS)}; Step-3.5 rotates head_dim on "
                              f"sliding blocks and head_dim/2 on full ones ({head_dim})")
    return head_dim


def _attention(m: _Metadata) -> tuple[tuple[bool, ...], tuple[int, ...], tuple[int, ...]]:
    """(sliding, query heads, KV heads) per block."""
    sliding = m.per_block(Key.SLIDING_PATTERN, kind=bool)
    n_head = m.per_block(Key.HEAD_COUNT)
    n_head_kv = m.per_block(Key.HEAD_COUNT_KV)
    for i, (h, kv) in enumerate(zip(n_head, n_head_kv)):
        if kv <= 0 or h <= 0 or h % kv:
            raise StepstreamError(f"{m.src}: block {i} has {h} query heads and {kv} KV heads; query heads must be "
                                  "a positive multiple of KV heads")
    return sliding, n_head, n_head_kv


def _refuse_position_scaling(m: _Metadata) -> None:
    """Linear, YaRN and LongRoPE position scaling, which llama.cpp applies from these keys and
    stepstream does not implement, are refused rather than ignored (llama3-style scaling comes
    as rope_freqs.weight and runs)."""
    kind = m.f.get(Key.ROPE_SCALING_TYPE, "linear")  # llama.cpp's default when only a factor is given
    key = Key.ROPE_SCALING_FACTOR if m.f.has(Key.ROPE_SCALING_FACTOR) else Key.ROPE_SCALE_LINEAR
    factor = m.f.get(key, 0.0)
    if not isinstance(kind, str) or not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise StepstreamError(f"{m.src}: {Key.ROPE_SCALING_TYPE}={kind!r} and {key}={factor!r} are not a scaling "
                              "type name and a number")
    if kind in ("linear", "yarn", "longrope") and factor not in (0.0, 1.0):
        raise StepstreamError(f"{m.src}: {Key.ROPE_SCALING_TYPE}={kind!r} with {key}={factor:g}: stepstream does not "
                              "implement linear, YaRN or LongRoPE position scaling (llama.cpp applies it), and running "
                              "without it would change every output; remove the keys to run at the trained positions")


SWIGLU_LIMIT_OFF = 1e-6  # llama.cpp clamps only with a limit above this; 0 and below mean no clamp


def _clamps(m: _Metadata, key: str) -> tuple[float, ...]:
    """SwiGLU limits per block, 0.0 where llama.cpp does not clamp (a limit of at most 1e-6,
    negative ones included)."""
    return tuple(x if x > SWIGLU_LIMIT_OFF else 0.0 for x in m.per_block(key, 0.0, float))


def _moe(m: _Metadata) -> tuple[tuple[bool, ...], int, int]:
    """(MoE per block, experts, experts used per token)."""
    gating = m.num(Key.EXPERT_GATING, GATING_SIGMOID)
    if gating not in (GATING_NONE, GATING_SIGMOID):  # llama.cpp's step35 routes NONE (0) with sigmoid too
        raise StepstreamError(f"{m.src}: {Key.EXPERT_GATING}={gating}; Step-3.5 routes with sigmoid ({GATING_SIGMOID})")
    if m.f.has(Key.LEADING_DENSE):
        leading = m.num(Key.LEADING_DENSE)
    else:  # llama.cpp's step35 reads no such key: a block is MoE when it has a router
        leading = 0
        while leading < m.n_layers and f"blk.{leading}.{ROUTER}" not in m.f.tensors:
            leading += 1
    if not 0 <= leading <= m.n_layers:
        raise StepstreamError(f"{m.src}: {Key.LEADING_DENSE}={leading} outside 0..{m.n_layers}")
    n_expert = m.num(Key.EXPERT_COUNT, 0, lo=0)
    moe = tuple(leading <= i < m.n_layers and n_expert > 0 for i in range(m.n_blocks))
    n_used = m.num(Key.EXPERT_USED, 0)
    if any(moe) and not 0 < n_used <= n_expert:
        raise StepstreamError(f"{m.src}: {Key.EXPERT_USED}={n_used} must be in 1..{Key.EXPERT_COUNT}={n_expert}")
    return moe, n_expert, n_used


_TOKEN_IDS = (Key.TOK_BOS, Key.TOK_EOS, Key.TOK_EOT)  # the ones the runtime uses


def _vocab_size(f: GGUFModelFile) -> int:
    """V, the rows of token_embd, checked against the token list, its types, the output matrix
    and the special token ids."""
    embd = f.tensor(TOKEN_EMBD)
    if len(embd.shape) != 2:
        raise StepstreamError(f"{f.path}: {TOKEN_EMBD} has shape {list(embd.shape)}, expected [V, H]")
    V = embd.shape[0]
    for key in (Key.TOK_LIST, Key.TOK_TYPES):
        n = f.array_len(key)
        if n is not None and n != V:
            raise StepstreamError(f"{f.path}: {key} lists {n} entries but {TOKEN_EMBD} has {V} rows")
    out = f.tensors.get(OUTPUT)
    if out is not None and out.shape[:1] != (V,):
        raise StepstreamError(f"{f.path}: {OUTPUT} has shape {list(out.shape)}, {TOKEN_EMBD} has {V} rows")
    for key in _TOKEN_IDS:
        v = f.get(key, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < V):
            raise StepstreamError(f"{f.path}: {key} is {v!r}, not a token id below the vocabulary size {V}")
    return V
