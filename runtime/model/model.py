"""A loaded Step-3.5 model: its blocks, expert provider, KV cache and position.

    h = embed(tokens)
    for each trunk block: h = block(h)         (prefill: a chunk; decode: one token)
    logits = output(norm(h))

Tokens are evaluated at the cache's current position; `trim(n)` rolls it back. `prefill`,
`decode` and `decode_few` are the ways through the blocks; `eval` cuts a token list into chunks
of n_batch and sends a chunk of one token to `decode`, one of a few (an MTP verify pass) to
`decode_few` where every block fuses its steps, the rest to `prefill`. All give the same bits.

Every evaluation is all or nothing. Blocks write their keys and values as they run, so an
exception inside the forward pass (an expert read error, Ctrl-C, MemoryError) would leave the
first blocks a chunk ahead of the rest; instead the cache and the token history roll back to
where the evaluation began (runtime.model.kv_cache), and the next evaluation gives the same
logits as a model that never saw the failed one.

The model's other faces are mixins, one concern each: the MTP heads (runtime.model.mtp_heads),
prompt reuse and saved states (runtime.model.prompt_reuse), and llama-cpp-python's methods
(runtime.model.llama_api).

Shape legend:  T tokens   H hidden   V vocab
"""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import replace

import numba
import numpy as np
from quant.int8_kernels import format_set

from runtime.base import system
from runtime.base.config import ModelConfig
from runtime.base.errors import ContextExceeded, StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.options import RuntimeOptions
from runtime.model.block import Block
from runtime.model.decode_plan import FEW_TOKENS, DecodeBuffers
from runtime.model.experts import ExpertProvider
from runtime.model.ffn import guess_experts
from runtime.model import few_kernels, kv_checkpoint, kv_types, mtp, precompile
from runtime.model.kv_cache import CacheStateError, KVCache
from runtime.model.llama_api import CallableCount, LlamaApi, TokenView
from runtime.model.matrix import matmul, matvec_q8, q8_group, rows
from runtime.model.mtp_heads import MtpHeads
from runtime.model.ops import rms_norm
from runtime.model.prompt_reuse import PromptReuse
from runtime.model.serial import serialized
from runtime.model.weights import ModelWeights
from runtime.text.tokenizer import Tokenizer


class Model(MtpHeads, PromptReuse, LlamaApi):
    def __init__(self, file: GGUFModelFile, cfg: ModelConfig, weights: ModelWeights,
                 provider: ExpertProvider, options: RuntimeOptions, placement=None, gpu=None, gpu_placement=None,
                 tokenizer: Tokenizer | None = None):
        self.file = file
        self.cfg = cfg
        self.weights = weights
        self.provider = provider
        self.options = options
        self.placement = placement  # offload.placement.Placement when experts stream from disk
        self.n_ctx = CallableCount(options.context(cfg.context_length))
        # The formats of this file that take int8 activations: every int8 kernel is compiled for
        # exactly this set, once (quant.int8_kernels.dispatch). 0 keeps activations float32.
        self.int8 = format_set(t.qtype for t in file.tensors.values()) if options.activations == "q8" else 0
        self.blocks = [Block(cfg, i, w, weights.rope_factors, self.int8) for i, w in enumerate(weights.blocks)]
        # The GPU tier (runtime.model.gpu.executor) runs the trunk on the card with its KV cache in VRAM.
        self.gpu, self.gpu_placement = gpu, gpu_placement
        # Its keys and values in the options' types (runtime.model.kv_types); the GPU tier's stay
        # float32 in VRAM (runtime.model.gpu.kv).
        for kind in options.kv_types:
            kv_types.check_head_dim(kind, cfg.head_dim, file.path.name)
        self.cache = gpu.cache if gpu is not None else KVCache(
            cfg.n_head_kv[: cfg.n_layers], cfg.head_dim, cfg.sliding[: cfg.n_layers], cfg.window, self.n_ctx,
            options.rollback, options.kv_types)
        self.buffers = DecodeBuffers.for_model(cfg, max(layer.capacity for layer in self.cache.layers))
        # A chunk of 2..FEW_TOKENS tokens goes through the few-token kernels when every trunk block
        # fuses both halves of a step (runtime.model.few_kernels); else through prefill.
        self._few = gpu is None and all(b.plan.fused for b in self.blocks[: cfg.n_layers])
        self._output_q8 = q8_group([weights.output], self.int8)
        # The MTP heads' input projections and output heads, prepared for one-call products of a
        # few rows (few_kernels: norm, int8 rounding and GEMV in one call, matmul's bits).
        self._mtp_q8 = [(q8_group([nw.eh_proj], self.int8), q8_group([nw.head], self.int8)) for nw in weights.nextn]
        self._few_proj = few_kernels.build(self.int8) if self.int8 else None
        self._tokenizer = tokenizer  # None: built on first use
        # What a saved state names its model by (read now: the file may be renamed or deleted later)
        self._state_identity = f"{file.path.name} ({file.nbytes} bytes)"
        self._tokens: list[int] = []  # the ids the cache holds, position by position
        self._evaluating = False  # inside an all-or-nothing evaluation (see _atomically)
        # One thread's call at a time (runtime.model.serial). A generation also holds it across each of
        # its steps (check that the cache is still its own, evaluate, sample): see `lock`.
        self._lock = threading.RLock()
        # Bumped by every change to what the cache holds (an evaluation, trim, reset): a generator
        # compares it with its own last change to notice that another generation ran meanwhile.
        self.version = 0
        self.closed = False
        # The compute threads of n_threads: Numba's count is the calling thread's own (a worker
        # thread, asyncio.to_thread or the server's engine got the default, and a second model's
        # load changed the first's), so every call sets it on its thread (_own_threads).
        self._threads = system.threads_for(options.n_threads) if options.n_threads is not None else None
        self._checkpoint: kv_checkpoint.KVCheckpoint | None = None  # rings at the end of the last prompt
        # Read ahead: before block i runs, guess block i+1's experts with its router.
        self._read_ahead = options.prefetch and provider.prefetches
        self._drafter: mtp.Drafter | None = None  # the MTP heads' state, made on first use
        # Seconds of a trunk pass by its length, measured by warm_up and updated by every
        # speculative generation: where the MTP draft-length chooser starts.
        self.step_seconds: dict[int, float] = {}

    # ------------------------------------------------------------------ state

    def _own_threads(self) -> None:
        if self._threads is not None and numba.get_num_threads() != self._threads:
            numba.set_num_threads(self._threads)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def n_vocab(self) -> int:
        return self.cfg.vocab

    def n_embd(self) -> int:
        return self.cfg.hidden

    def token_bos(self) -> int:
        """The BOS token's id, -1 when the file names none (llama.cpp's LLAMA_TOKEN_NULL)."""
        bos = self.tokenizer.bos_id
        return -1 if bos is None else bos

    def token_eos(self) -> int:
        eos = self.tokenizer.eos_id
        return -1 if eos is None else eos

    @property
    def history(self) -> "TokenView":
        """Token ids held by the cache: a read-only view (it was the live list, and an edit of the
        same length made prefix reuse trust tokens the cache never held)."""
        return TokenView(self._tokens)

    @property
    def name(self) -> str:
        return self.file.path.name

    @serialized
    def reset(self) -> None:
        self.version += 1
        self.cache.reset()
        self._tokens = []
        self._checkpoint = None
        if self._drafter is not None:
            self._drafter.reset()

    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock. The token loop (runtime.generation) holds it from the
        check that the cache is still its generation's to the next token's sampling: taken per
        call only, another thread's evaluation could slip between the check and the step, and
        both generations went on from each other's tokens without an error (a review's finding)."""
        return self._lock

    @serialized
    def warm_up(self) -> float:
        """Evaluate a prefill chunk, a chunk of a few tokens and one token alone, then forget them,
        so that every kernel a run needs is loaded: from Numba's cache in a fraction of a second,
        or compiled on the first run after an install (tens of seconds). Each way through the
        blocks has kernels of its own (a prefill chunk: more than FEW_TOKENS tokens, the GEMM;
        2..FEW_TOKENS: the few-token kernels of short prompts, chat turns and MTP verify passes;
        one token: the decode step), and a server says it is ready only after this, so none
        of them may be left for a request to compile. The prefill chunk's tokens repeat the few
        chunk's five, which gives experts with one token and with several (both the GEMV and
        the GEMM paths run) and reads hardly more experts from disk than five tokens do. When
        the load option mtp drafts, also the heads' kernels, and the trunk's pass times by
        length (step_seconds, where the draft-length chooser starts). Returns the seconds it took."""
        t0 = time.perf_counter()
        self.reset()
        room = self.n_ctx - 1  # one position left for the decode step; a short context holds fewer
        five = [i % self.cfg.vocab for i in range(max(1, min(5, room)))]
        chunk = (five * (FEW_TOKENS // len(five) + 2))[: min(FEW_TOKENS + 1, self.options.n_batch, room)]
        with precompile.alongside(self):  # on a first run, a second process compiles too
            if len(chunk) > len(five):  # the prefill path (a chunk is at most n_batch tokens)
                self.eval(chunk)
                self.reset()
            self.eval(five)
            if self.n_ctx > len(five):
                self.eval(five[:1])
                if self._drafts and self.n_ctx > len(five) + 1:  # the heads' kernels: a fill and a draft
                    self.drafter.truncate(0)
                    self.eval_prompt(five + five[:1], mtp=True)
                    self.mtp_draft(five[1], self.n_mtp)
                    self._drafter = None  # made again by the first generation that drafts
        self.reset()
        if self._drafts and self.n_ctx > 2 * len(five):
            # Streaming, each pass reads the experts it misses from disk, and five rounds of four
            # lengths through a cache still cold read several times the experts' bytes before the
            # first token (a review: 3.7 GB where the warm-up alone read 1.0 GB); one round
            # starts the chooser, which goes on measuring the passes it runs.
            self._time_steps(five, rounds=1 if self.placement is not None else 5)
            self.reset()
        stats = getattr(self.provider, "stats", None)
        if stats is not None:  # the run's figures (--stats, bench --json) are the run's own
            stats.restart()
            cache = getattr(self.provider, "cache", None)
            if cache is not None:
                cache.forget_prefetches()
            refill = getattr(self.provider, "refill", None)
            if refill is not None and self.placement is not None and self.placement.filled:
                refill()  # fill_cache: what the warm-up's passes evicted
        return time.perf_counter() - t0

    @serialized
    def trim(self, n: int) -> None:
        """Forget the last n evaluated positions."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):  # 2.5 left the cache and history apart
            raise StepstreamError(f"trim(n): n must be an integer number of positions, got {n!r}")
        n = int(n)
        self.version += 1
        self.cache.trim(n)
        del self._tokens[len(self._tokens) - n :]
        if self._checkpoint is not None and self.n_past < self._checkpoint.n_past:
            self._checkpoint = None
        if self._drafter is not None:
            self._drafter.truncate(self.n_past)

    def close(self) -> None:
        """Stop the expert reads and free what the model holds: the expert cache, the KV cache,
        the weights, the MTP heads' state, the scratch buffers, and the file's descriptors and
        the pages its maps brought in, as llama-cpp-python's close frees its context and model
        (a review: 20 closed models still referenced held 250 MiB and 40 descriptors). The model
        evaluates nothing after this; tokenize and detokenize still work. `with runtime.load(...)
        as model:` closes it at the block's end.
        A call or a generation's step running in another thread ends first (the experts freed
        under it, the in-RAM table emptied in mid-pass: a raw KeyError, a review's finding);
        `closed` is set before the lock is taken, so a generation stops at its next step instead
        of holding the lock to the end of its text."""
        self.closed = True
        with self._lock:
            if self.file.closed:
                return
            self.provider.close()
            # (not `version`: a generation stepped after this says the model was closed, not stale)
            self._tokens, self._checkpoint, self._drafter = [], None, None
            if self.gpu is None:
                self.cache.release()
            else:  # the card's cache, weights and expert slots go with the executor
                self.cache = KVCache((), self.cfg.head_dim, (), self.cfg.window, self.n_ctx, self.options.rollback)
                self.gpu = None
            self.buffers = self._output_q8 = self._few_proj = None
            self._mtp_q8, self.blocks = [], []
            self.weights = replace(self.weights, embed=None, out_norm=None, output=None, rope_factors=None,
                                   blocks=[], nextn=[])
            self.file.close()

    # ------------------------------------------------------------------ compute

    def _check_tokens(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise StepstreamError(f"tokens must be a 1-D sequence of ids, got shape {list(ids.shape)}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise StepstreamError(f"tokens must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        bad = ids[(ids < 0) | (ids >= self.cfg.vocab)]
        if bad.size:
            raise StepstreamError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.cfg.vocab - 1})")
        if self.n_past + ids.size > self.n_ctx:
            raise ContextExceeded(
                f"{ids.size} tokens after {self.n_past} cached positions exceed the context of {self.n_ctx} "
                f"(load with a larger n_ctx, at most the model's {self.cfg.context_length})"
            )
        return ids

    def _guess_next(self, i: int, h: np.ndarray) -> None:
        """Start reading block i+1's likely experts while block i runs (h [T, H]: block i's input)."""
        if self._read_ahead and i + 1 < self.cfg.n_layers and self.blocks[i + 1].moe:
            nxt = self.blocks[i + 1]
            self.provider.prefetch(i + 1, guess_experts(nxt.spec, nxt.weights, h))

    def _check_open(self) -> None:
        if self.closed:
            raise StepstreamError(f"{self.file.path}: the model was closed; load it again to evaluate")

    def _atomically(self, step, ids: np.ndarray) -> np.ndarray:
        """step(ids), with the cache and history rolled back to their state before it if anything
        (BaseException: Ctrl-C too) escapes. Nested calls join the outer evaluation."""
        if self._evaluating:
            return step(ids)
        self._check_open()
        self.file.check_unchanged()  # a file cut short under the map would be a SIGBUS, not an error
        if len(self._tokens) != self.n_past:
            raise CacheStateError(f"the model's history holds {len(self._tokens)} tokens and its cache "
                                  f"{self.n_past} positions: reset the model")
        n0 = len(self._tokens)
        self.cache.begin()
        self._evaluating = True
        try:
            with self.file.evaluating():  # no other process may cut the file short meanwhile
                out = step(ids)
        except BaseException as e:
            self.cache.abort()
            del self._tokens[n0:]
            if isinstance(e, (ZeroDivisionError, StepstreamError)) and self.file.problem() is not None:
                self.file.check_unchanged()  # the weights changed under the evaluation: say that, not its symptom
            if isinstance(e, ZeroDivisionError):  # a kernel compiled with fast-math, meeting NaN or Inf
                raise StepstreamError(f"{self.file.path}: NaN or Inf in the forward pass at positions "
                                      f"{n0}..{n0 + ids.size - 1}: the blocks' hidden states are already "
                                      f"non-finite; the evaluation was rolled back") from None
            raise
        finally:
            self._evaluating = False
        self.cache.commit()
        self.version += 1
        return out

    @serialized
    def prefill(self, tokens) -> np.ndarray:
        """Evaluate a chunk of tokens at the current position, all at once; the last trunk
        block's hidden states [T, H] (pre-norm)."""
        return self._atomically(self._prefill, self._check_tokens(tokens))

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        if self.gpu is not None:  # in chunks the sliding rings can take (runtime.model.gpu.executor)
            return np.concatenate([self._gpu_step(ids[a : a + self.gpu.chunk]) for a in range(0, ids.size, self.gpu.chunk)])
        pos = np.arange(self.n_past, self.n_past + ids.size, dtype=np.int64)
        h = rows(self.weights.embed, ids)  # [T, H]
        for i, kv in enumerate(self.cache.layers):
            self._guess_next(i, h)
            h = self.blocks[i].prefill(h, pos, kv, self.provider)
        self.cache.advance(ids.size)
        self._tokens.extend(ids.tolist())
        return h

    @serialized
    def decode(self, token: int) -> np.ndarray:
        """Evaluate one token at the current position; the last trunk block's hidden state [1, H]."""
        return self._atomically(self._decode, self._check_tokens([token]))

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        pos = self.n_past
        if self.gpu is not None:
            return self._gpu_step(ids)
        h = rows(self.weights.embed, ids)[0]  # [H], updated in place by every block
        for i, kv in enumerate(self.cache.layers):
            self._guess_next(i, h[None])
            self.blocks[i].decode(h, pos, kv, self.provider, self.buffers)
        self.cache.advance(1)
        self._tokens.append(int(ids[0]))
        return h[None]

    def _decode_few(self, ids: np.ndarray) -> np.ndarray:
        """A few tokens (2..FEW_TOKENS) through the blocks' few-token kernels: the bits of as many
        decode steps, at about the cost of one on a small model; hidden states [T, H]."""
        pos = self.n_past
        h = np.ascontiguousarray(rows(self.weights.embed, ids), dtype=np.float32)  # [T, H], updated in place
        for i, kv in enumerate(self.cache.layers):
            self._guess_next(i, h)
            self.blocks[i].decode_tokens(h, pos, kv, self.provider, self.buffers)
        self.cache.advance(ids.size)
        self._tokens.extend(ids.tolist())
        return h

    def _gpu_step(self, ids: np.ndarray) -> np.ndarray:
        h = self.gpu.run(rows(self.weights.embed, ids), self.n_past)
        self.cache.advance(ids.size)
        self._tokens.extend(ids.tolist())
        return h

    @serialized
    def hidden(self, tokens) -> np.ndarray:
        """Evaluate tokens after the cached ones, n_batch at a time; hidden states [T, H] (pre-norm)."""
        return self._hidden_states(tokens, last_only=False)

    def _hidden_states(self, tokens, last_only: bool) -> np.ndarray:
        """hidden(tokens), or only its last row [1, H] when last_only and no MTP heads read them:
        a long prompt's [T, H] rows (16 KiB a token at hidden 4096) are then never all held."""
        start, ids = self.n_past, self._check_tokens(tokens)
        keep = not last_only or self._drafter is not None
        h = self._atomically(lambda chunk_ids: self._hidden(chunk_ids, keep), ids)
        if self._drafter is not None:  # the MTP heads read the trunk's hidden states later
            self._drafter.record(start, h, ids.tolist())
        return h[-1:].copy() if last_only else h  # a copy: a view would keep every row alive

    def _hidden(self, ids: np.ndarray, keep: bool = True) -> np.ndarray:
        out = []
        for a in range(0, ids.size, self.options.n_batch):
            chunk = ids[a : a + self.options.n_batch]
            h = (self._decode(chunk) if chunk.size == 1 else
                 self._decode_few(chunk) if self._few and chunk.size <= FEW_TOKENS else self._prefill(chunk))
            if keep:
                out.append(h)
            else:
                out = [h[-1:].copy()]  # not a view: the chunk's rows are freed
        if not out:
            return np.zeros((0, self.cfg.hidden), np.float32)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def output(self, h: np.ndarray) -> np.ndarray:
        """Logits [T, V] float32 of hidden states [T, H]."""
        self._check_open()
        self.file.check_unchanged()  # the output head is read from the map, as the blocks are
        with self.file.evaluating():
            return self._output(h)

    def _output(self, h: np.ndarray) -> np.ndarray:
        if self.gpu is not None:
            return self.gpu.output(h)
        if self._output_q8 is not None and 2 <= h.shape[0] <= FEW_TOKENS:
            return self.project_few(h, self.weights.out_norm, self._output_q8)
        # One row takes the decode GEMV (same bits): a run that never passes 2..8 rows here then
        # never compiles the few-token projection, a sixth of a cold start's compile time.
        x = rms_norm(h, self.weights.out_norm, self.cfg.rms_eps)
        if x.shape[0] == 1 and self._output_q8 is not None:
            return matvec_q8(self._output_q8, x)
        return matmul(x, self.weights.output, self.int8).astype(np.float32)

    def project_few(self, h: np.ndarray, norm: np.ndarray, g) -> np.ndarray:
        """g's rows times rms_norm(h, norm) for a few rows h [T <= FEW_TOKENS, H] -> [T, g.rows], in
        one call (g: an int8 group, matrix.q8_group); the bits of rms_norm and matmul."""
        h = np.ascontiguousarray(h, dtype=np.float32)
        out = np.empty((h.shape[0], g.rows), np.float32)
        self._few_proj.norm_project(norm, np.float32(self.cfg.rms_eps), h.shape[0], h, g.qt, g.addr, g.rb, g.starts,
                                    self.buffers.few, out)
        return out

    @serialized
    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens after the cached ones: logits of the last token [V], or of all [T, V]."""
        n = self.n_past
        h = self._hidden_states(tokens, last_only=not all_logits)
        if h.shape[0] == 0:
            raise StepstreamError("eval needs at least one token")
        logits = self.output(h) if all_logits else self.output(h)[0]
        if not np.isfinite(logits).all():
            self._refuse_non_finite(h, all_logits, self.n_past - n)
        return logits

    def _refuse_non_finite(self, h: np.ndarray, all_logits: bool, n: int) -> None:
        """Roll back the positions just evaluated and say where NaN/Inf came from: the blocks'
        hidden states, or the output head (output_norm.weight, output.weight) on finite ones.
        Weights that hold NaN or Inf (a damaged file, a bad conversion) end here; sampling from
        such logits would raise deep in numpy or emit nothing."""
        first = self.n_past - n
        self.trim(n)
        self.file.check_unchanged()  # weights rewritten on disk under the evaluation: that, not NaN, is the news
        rows = h if all_logits else h[-1:]
        if not np.isfinite(rows).all():
            where = "the blocks' hidden states are already non-finite"
        else:
            where = "the output head (output_norm.weight, output.weight) holds non-finite values"
        raise StepstreamError(f"{self.file.path}: NaN or Inf logits at positions {first}..{first + n - 1}: "
                              f"{where}; the evaluation was rolled back")

    def scored_logits(self, tokens, first: int, rows: int = 16):
        """Logits of positions first .. len(tokens)-2 after `tokens` evaluated from an empty cache,
        as blocks of at most `rows` rows [r, V]: only the hidden states [T, H] and one block are
        held, where logits() holds [T, V] (perplexity's way). The rows of `logits(tokens)` to the
        bit with int8 activations (the default); with float32 activations the output product's
        rounding depends on the rows it takes together (within 2e-6 here)."""
        with self._lock:
            self._own_threads()
            self.reset()
            h = self.hidden(tokens)
        end = h.shape[0] - 1
        for a in range(first, end, rows):
            with self._lock:
                self._own_threads()
                block = self.output(h[a : min(a + rows, end)])
            if not np.isfinite(block).all():
                where = "the blocks' hidden states are" if not np.isfinite(h[a:end]).all() else "the output head is"
                raise StepstreamError(f"{self.file.path}: NaN or Inf logits at positions {a}..{min(a + rows, end) - 1}: "
                                      f"{where} non-finite")
            yield block

    @serialized
    def logits(self, tokens) -> np.ndarray:
        """[T, V] float32 logits of every position, evaluated from an empty cache."""
        self.reset()
        return self.eval(tokens, all_logits=True)
