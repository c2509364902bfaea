"""Everything a caller may choose about running a model, in one frozen object."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from runtime.base.errors import StepstreamError, UnknownOption
from runtime.base.units import parse_bytes

# The KV cache's element types, named as llama.cpp's --cache-type-k/-v name them, and the bytes
# one element takes: q8_0 keeps 32 int8 values and one f16 scale per 32 elements of a head
# (34 bytes per 32). runtime.model.kv_types stores and reads them.
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
KV_BLOCK = {"f32": 1, "f16": 1, "q8_0": 32}  # a head's dim must be a multiple of this
PROMPT_CACHE_AUTO = 8 * 2**30  # the most prompt_cache="auto" takes (llama-server's --cache-ram default)


def check_kv_type(value, what: str = "cache type") -> str:
    """value if it names a KV cache type, else a StepstreamError naming it and the allowed ones."""
    if value not in KV_TYPE_BYTES:
        raise StepstreamError(f"{what} {value!r} is not a KV cache type; choose {', '.join(KV_TYPE_BYTES)}")
    return value


@dataclass(frozen=True)
class RuntimeOptions:
    n_ctx: int | None = None  # positions the cache may hold; None: the model's context, at most 4096; 0: the model's (llama.cpp's 0)
    n_batch: int = 64  # prefill chunk: tokens evaluated together
    n_threads: int | None = None  # compute threads; None leaves the libraries' defaults
    rollback: int = 16  # positions trim(n) can undo on sliding blocks (their ring keeps W + this)
    # "auto": stream when the model does not fit in available memory (minus a reserve), else
    # keep every routed expert resident; "ram" or "stream" to choose.
    experts: str = "auto"
    ram_budget: int | str | None = None  # expert cache size ("6GiB"); implies experts="stream"; None: auto
    # ram_budget as a ceiling: less when the memory limits leave less, instead of a refusal (the RAM
    # sweep sizes its budgets from a measured footprint, closer to the edge than the check's estimate).
    ram_budget_fit: bool = False
    cache_policy: str = "lru"  # lru, lfu, or pinned (hot set from `profile`, LRU for the rest)
    profile: str | None = None  # expert profile to pin the most-used experts from
    prefetch: bool = True  # guess the next layer's experts from the current hidden state and read ahead
    # When streaming: read experts into every free slot of the cache at load (the same number per
    # layer, at the disk's sequential rate), so decoding starts warm instead of missing while the
    # cache fills, as llama.cpp's memory map is read at load. Load takes cache bytes / disk rate longer.
    fill_cache: bool = False
    direct_io: bool = True  # O_DIRECT reads that bypass the page cache
    # "q8": activations rounded to int8 per 256 columns before quantized matmuls, as llama.cpp
    # does; decode then runs on integer dot products. "f32": float32 activations throughout.
    activations: str = "q8"
    # VRAM the GPU tier may take: None keeps everything on the CPU; "auto" takes the free VRAM
    # less a reserve; a size ("12GiB") or bytes. Non-expert weights and the KV cache go first,
    # the hottest routed experts fill the rest (offload.gpu_placement).
    gpu_budget: int | str | None = None
    # Speculative decoding with the file's MTP heads (runtime.generation.speculative): "auto"
    # chooses the draft length each step from measured acceptance and step times (0 when
    # drafting does not pay); 1..3 forces it. Files without MTP heads always decode plainly.
    # The output is the same either way. 0 here, so that the library decodes one token per step
    # unless asked (an expert request is then one token); the command line defaults to "auto".
    mtp: int | str = 0
    # The KV cache's element types (llama.cpp's --cache-type-k / --cache-type-v): "f16" halves
    # the float32 cache (at 256K positions the real model's full-attention blocks need 25.9 GB in
    # float32, 13.0 GB in f16, 6.9 GB in q8_0: `stepstream plan`) and is llama.cpp's default; on the
    # shipped model its logits track float32's: cosine 1 - 1e-6 with float32 activations; with
    # int8 activations, whose rounding amplifies any difference, 0.99992 mean and 98% top-1 over
    # 300 tokens, as q8_0 gives (tests/test_kv_cache_types.py).
    # "q8_0" stores 8-bit values with an f16 scale per 32 (half of f16's bytes), for now at a
    # cost in speed: its attention loops do not vectorize as well (a 1024-token prompt's prefill
    # at 0.6x float32's, decode after it at 0.89x). "f32" is exact. The GPU tier keeps
    # its cache in float32 in VRAM whatever these say (runtime.model.gpu.kv).
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    # Bytes a server may keep of conversations' KV caches beside the live one
    # (runtime.server.prompt_cache; llama-server's --cache-ram), counted in the model's memory at
    # load so the expert cache gives them up. "auto": an eighth of the usable memory, at most
    # 8 GiB (the real model's cache takes 48 KiB a position: 8 GiB keeps 170,000 positions,
    # a 60,000-token agent conversation 2.9 GiB). 0: none (a library call keeps its one cache).
    prompt_cache: int | str = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "RuntimeOptions":
        kwargs = _llama_cpp_keywords(kwargs)
        for name in ("gpu_budget", "prompt_cache"):  # as --gpu-budget and --cache-ram read them
            value = kwargs.get(name)
            if isinstance(value, str) and value.strip().lower() == "auto":
                kwargs[name] = "auto"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UnknownOption(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        for name in ("n_ctx", "n_batch", "n_threads", "rollback"):  # ints (bool is none), or None where allowed
            v = getattr(self, name)
            if not (isinstance(v, numbers.Integral) and not isinstance(v, bool)) and \
                    not (v is None and name in ("n_ctx", "n_threads")):
                raise StepstreamError(f"{name} must be an integer, got {v!r}")
        for name in ("prefetch", "fill_cache", "direct_io", "ram_budget_fit"):
            if not isinstance(getattr(self, name), bool):
                raise StepstreamError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.ram_budget is not None:
            if isinstance(self.ram_budget, bool):  # True is 1 byte to parse_bytes: refused at load, not at the first read
                raise StepstreamError(f"ram_budget={self.ram_budget!r} must be a size (6GiB, 800MiB or bytes)")
            if parse_bytes(self.ram_budget) <= 0:
                raise StepstreamError(f"ram_budget={self.ram_budget!r} must be a positive size (6GiB, 800MiB or bytes)")
            if self.experts == "ram":
                raise StepstreamError("ram_budget sizes the streamed experts' cache; it cannot go with experts='ram'")
        if self.n_ctx is not None and self.n_ctx < 0:
            raise StepstreamError(f"n_ctx must be positive (or 0: the model's context length), got {self.n_ctx}")
        if self.n_batch < 1:
            raise StepstreamError(f"n_batch must be positive, got {self.n_batch}")
        if self.n_threads is not None and self.n_threads < 1:
            raise StepstreamError(f"n_threads must be positive, got {self.n_threads}")
        if self.rollback < 0:
            raise StepstreamError(f"rollback must be >= 0, got {self.rollback}")
        if self.experts not in ("auto", "ram", "stream"):
            raise StepstreamError(f"experts={self.experts!r}: choose 'auto', 'ram' or 'stream'")
        if self.activations not in ("q8", "f32"):
            raise StepstreamError(f"activations={self.activations!r}: choose 'q8' or 'f32'")
        if self.cache_policy not in ("lru", "lfu", "pinned"):
            raise StepstreamError(f"cache_policy={self.cache_policy!r}: choose lru, lfu or pinned")
        if self.gpu_budget is not None:
            if isinstance(self.gpu_budget, bool):  # True is 1 byte to parse_bytes
                raise StepstreamError(f"gpu_budget={self.gpu_budget!r} must be a size (12GiB, 800MiB or bytes) or 'auto'")
            if self.gpu_budget != "auto" and parse_bytes(self.gpu_budget) <= 0:
                raise StepstreamError(f"gpu_budget={self.gpu_budget!r} must be a positive size or 'auto'")
            if self.activations != "q8":
                raise StepstreamError("the GPU tier runs on int8 activations: use activations='q8' with gpu_budget")
            if "q8_0" in (self.cache_type_k, self.cache_type_v):
                # (it was ignored in silence: the card's cache is float32 whatever was asked)
                raise StepstreamError(f"cache_type_k={self.cache_type_k!r}, cache_type_v={self.cache_type_v!r} "
                                      "(-ctk/-ctv): the GPU tier keeps its KV cache in float32 on the card; "
                                      "cache types apply without gpu_budget (--gpu-budget)")
        if self.mtp != "auto" and not (isinstance(self.mtp, int) and not isinstance(self.mtp, bool) and 0 <= self.mtp <= 3):
            raise StepstreamError(f"mtp={self.mtp!r}: choose 'auto' or a draft length 0..3")
        if self.prompt_cache != "auto" and (isinstance(self.prompt_cache, bool) or parse_bytes(self.prompt_cache) < 0):
            raise StepstreamError(f"prompt_cache={self.prompt_cache!r} must be a size (2GiB, 0) or 'auto'")
        check_kv_type(self.cache_type_k, "cache_type_k")
        check_kv_type(self.cache_type_v, "cache_type_v")
        if self.profile is not None and self.experts == "ram":  # it streamed anyway, in silence
            raise StepstreamError("profile pins experts in the streamed experts' cache (--profile); it cannot go with "
                                  "experts='ram' (--no-stream)")
        if self.cache_policy == "pinned" and self.profile is None:
            raise StepstreamError("cache_policy='pinned' (--cache-policy pinned) needs a profile: profile=FILE "
                                  "(--profile FILE), recorded with `stepstream profile`")

    def context(self, model_context: int) -> int:
        """Positions the KV cache may hold: n_ctx, the model's context for 0 (llama.cpp's and
        llama-cpp-python's 0), or without n_ctx the model's context up to 4096."""
        if self.n_ctx == 0:
            return model_context
        return self.n_ctx or min(model_context, 4096)

    def prompt_cache_bytes(self, usable: int) -> int:
        """prompt_cache in bytes; "auto" from the memory a limit leaves (`usable`)."""
        if self.prompt_cache == "auto":
            return min(PROMPT_CACHE_AUTO, max(0, usable) // 8)
        return parse_bytes(self.prompt_cache)

    @property
    def kv_types(self) -> tuple[str, str]:
        """(key type, value type) of the KV cache."""
        return self.cache_type_k, self.cache_type_v

    def streams_by_choice(self) -> bool | None:
        """Whether routed experts stream from disk as the options decide it: True or False, or None
        when that depends on whether the model fits in memory (experts="auto")."""
        if self.experts == "stream" or self.ram_budget is not None or self.profile is not None:
            return True
        if self.experts == "ram":
            return False
        return None


# llama-cpp-python's Llama(...) keywords that change nothing here at these values (a script
# switching over passes them: verbose=False above all); any other value is refused by name.
_LLAMA_CPP_OFF = {"use_mmap": True, "use_mlock": False, "n_gpu_layers": 0, "logits_all": False, "embedding": False,
                  "vocab_only": False, "main_gpu": 0, "tensor_split": None, "numa": False, "lora_path": None,
                  "chat_handler": None, "draft_model": None, "seed": 0xFFFFFFFF,
                  # the rest of Llama.__init__'s keywords, at its defaults (llama-cpp-python 0.3.36)
                  "split_mode": 1, "kv_overrides": None, "n_ubatch": 512, "n_threads_batch": None,
                  "rope_scaling_type": -1, "pooling_type": -1, "attention_type": -1, "rope_freq_base": 0.0,
                  "rope_freq_scale": 0.0, "yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0,
                  "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0, "offload_kqv": True, "flash_attn": False,
                  "op_offload": None, "swa_full": None, "no_perf": False, "last_n_tokens_size": 64, "lora_base": None,
                  "lora_scale": 1.0, "chat_format": None, "tokenizer": None, "type_k": None, "type_v": None,
                  "spm_infill": False}
_LLAMA_CPP_HINTS = {"n_gpu_layers": "; gpu_budget= places weights on a GPU", "seed": "; pass seed= to each call",
                    "type_k": "; cache_type_k='q8_0' (llama.cpp's name) sets the KV cache's type",
                    "type_v": "; cache_type_v='q8_0' sets the KV cache's type",
                    "last_n_tokens_size": "; pass repeat_last_n= to each call"}


def _llama_cpp_keywords(kwargs: dict) -> dict:
    """kwargs without llama-cpp-python's load keywords at values that change nothing; verbose
    takes either value (only llama.cpp's own log lines depend on it)."""
    kwargs = dict(kwargs)
    verbose = kwargs.pop("verbose", False)
    if not isinstance(verbose, bool):
        raise StepstreamError(f"verbose must be True or False, got {verbose!r}")
    if kwargs.get("seed") == -1 and not isinstance(kwargs["seed"], bool):  # llama.cpp's "random", as the default
        kwargs["seed"] = _LLAMA_CPP_OFF["seed"]
    for name, off in _LLAMA_CPP_OFF.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value != off or isinstance(value, bool) != isinstance(off, bool):
                raise StepstreamError(f"{name}={value!r:.80} is not supported (only {off!r}, llama-cpp-python's "
                                      f"default, which changes nothing){_LLAMA_CPP_HINTS.get(name, '')}")
    return kwargs
