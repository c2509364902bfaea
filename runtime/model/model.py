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

Shape legend:  T tokens   H hidden   V vocab
"""

from __future__ import annotations

import functools
import numbers
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import numba
import numpy as np
from quant.int8_kernels import format_set

from runtime.base import system
from runtime.base.config import ModelConfig
from runtime.base.errors import ContextExceeded, StepstreamError, UnknownOption
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.options import RuntimeOptions
from runtime.generation import Sampler, chat_response, complete, completion_response, generate, sampling_params
from runtime.generation.reasoning_budget import check_message, effort_budget
from runtime.generation.request import Request, run as run_request
from runtime.generation.replies import ChatReply
from runtime.generation.responses import api_shape, completion_from_steps
from runtime.model.block import Block
from runtime.model.decode_plan import FEW_TOKENS, DecodeBuffers
from runtime.model.experts import ExpertProvider
from runtime.model.ffn import guess_experts
from runtime.model import few_kernels, kv_checkpoint, kv_state, kv_types, mtp, precompile
from runtime.model.kv_cache import CacheStateError, KVCache, trimmable
from runtime.model.matrix import matmul, matvec_q8, q8_group, rows
from runtime.model.ops import rms_norm
from runtime.model.weights import ModelWeights
from runtime.text.chat_prompt import chat_ids
from runtime.text.chat_template import check_roles
from runtime.text.tokenizer import Tokenizer
from runtime.text.tool_calls import END_THINK, callable_tools, check_tools, forced_call, starts_in_reasoning
from runtime.text.tool_grammar import AutoToolGrammar, ToolCallGrammar



def _serialized(method):
    """One call at a time on a model: a call from another thread waits for the running one to
    end. The cache, the token history and the MTP heads' state are the model's, not a thread's:
    two threads evaluating at once interleaved their steps, gave wrong logits without a word
    and rolled back each other's work (a review's finding). A re-entrant lock: a method calls
    others freely. A generation from one thread meeting another thread's evaluation between
    its tokens is stale, as with any evaluation between them (loop.generate)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._own_threads()
            return method(self, *args, **kwargs)
    return locked

class Model:
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
        # One thread's call at a time (_serialized). A generation also holds it across each of
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

    @_serialized
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

    @_serialized
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

    @property
    def _drafts(self) -> bool:
        """Whether generation drafts with MTP heads by default (the load option mtp), so that
        warm_up readies the heads' kernels and times the trunk passes a draft length needs."""
        return bool(self.weights.nextn) and self.options.mtp != 0

    def _time_steps(self, ids: list[int], rounds: int = 5) -> None:
        """The seconds of a trunk pass over 1..n_mtp+1 tokens, which the MTP draft-length chooser
        starts from: where a verify pass of k+1 costs k+1 decode steps, auto then never spends a
        step finding out that drafting does not pay. The lengths take turns, `rounds` times, and
        each keeps its fastest: on a shared machine a pass the scheduler preempted takes many
        times as long, and a length measured only while the machine was busy would look dear."""
        self.eval(ids)
        best: dict[int, float] = {}
        for _ in range(rounds):
            for n in range(1, self.n_mtp + 2):
                t0 = time.perf_counter()
                self.eval(ids[:n], all_logits=True)
                best[n] = min(best.get(n, float("inf")), time.perf_counter() - t0)
                self.trim(n)
        self.step_seconds.update(best)

    @_serialized
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

    @_serialized
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

    @_serialized
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

    @_serialized
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

    @_serialized
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

    @_serialized
    def logits(self, tokens) -> np.ndarray:
        """[T, V] float32 logits of every position, evaluated from an empty cache."""
        self.reset()
        return self.eval(tokens, all_logits=True)

    @property
    def n_mtp(self) -> int:
        """MTP heads this file carries (0: no drafting)."""
        return len(self.weights.nextn)

    @_serialized
    def mtp_logits(self, tokens) -> list[np.ndarray]:
        """Teacher-forced drafts of the MTP heads over `tokens`, from an empty cache.

        Entry j is [T-1-j, V]: row t is head j's prediction of token t+2+j, made from the
        token t+1+j and a hidden state at t (the trunk's for j = 0, head j-1's otherwise).
        Each head attends over its own stream of positions with a cache of its own
        (runtime.model.mtp, whose incremental drafts reproduce these rows).
        """
        self._check_open()
        if not self.weights.nextn:
            raise StepstreamError(f"{self.file.path}: this file has no MTP heads")
        self.reset()
        ids = self._check_tokens(tokens)
        h = self.hidden(ids)  # [T, H]
        out = []
        self.file.check_unchanged()  # the heads read embedding rows from the map, as evaluations do
        with self.file.evaluating(), self._heads_pass():
            for j in range(self.n_mtp):
                n = ids.size - 1 - j
                if n <= 0:
                    break
                x = mtp.head_input(self, j, ids[1 + j : 1 + j + n], h[:n])  # [n, H]
                kv = mtp.head_cache(self.cfg, j, n, self.options.kv_types)
                h = np.concatenate([mtp.head_chunk(self, j, x[a : a + self.options.n_batch], a, kv)
                                    for a in range(0, n, self.options.n_batch)])
                out.append(mtp.head_logits(self, j, h))
        return out

    @_serialized
    def mtp_draft(self, pending: int, k: int) -> list[int]:
        """Up to k greedy drafts of the tokens after `pending` (sampled, not yet evaluated),
        from the MTP heads kept in step with the cache (runtime.model.mtp)."""
        self._check_open()
        if not self.weights.nextn:
            raise StepstreamError(f"{self.file.path}: this file has no MTP heads")
        self.file.check_unchanged()  # the heads read embedding rows from the map, as evaluations do
        with self.file.evaluating(), self._heads_pass():
            return self.drafter.draft(int(pending), k)

    @contextmanager
    def _heads_pass(self):
        """Around the MTP heads' own passes: a kernel compiled with fast-math meeting NaN or Inf
        there (a head's weights; a review: a NaN in a head's norm ended the default `run` in a
        ZeroDivisionError traceback) is one line, as in the trunk, and the heads start over."""
        try:
            yield
        except ZeroDivisionError:
            self._drafter = None
            raise StepstreamError(f"{self.file.path}: NaN or Inf in the MTP heads' pass: their weights are not "
                                  "finite; decode without them (--mtp 0, mtp=0)") from None

    @property
    def mtp_draft_seconds(self) -> float:
        """How long the last `mtp_draft` took, not counting the positions the heads caught up
        on after steps without drafting (the cost model wants a draft's steady cost)."""
        return self._drafter.last_seconds if self._drafter is not None else 0.0

    @_serialized
    def forget_drafts(self) -> None:
        """Drop the MTP heads' state, for a generation that does not draft: with it, every trunk
        hidden state from then on was kept for heads that never ran (a review: 2,010 of them,
        16 KiB each on the real model, after one drafting call). A later drafting generation
        starts the heads over, evaluating its prompt again."""
        self._drafter = None

    @property
    def drafter(self) -> mtp.Drafter:
        """The MTP heads' state; made on first use, it follows every later evaluation and trim."""
        if self._drafter is None:
            self._drafter = mtp.Drafter(self)
        return self._drafter

    @_serialized
    def keep_prefix(self, tokens) -> int:
        """Roll the cache back to the longest prefix it shares with `tokens` that it can return
        to, leaving at least the last token to evaluate (its logits are wanted). Returns the
        positions kept: trim when the sliding rings allow it, else the checkpoint taken after
        the last prompt (runtime.model.kv_checkpoint) when the two agree up to it, else 0."""
        tokens = list(tokens)
        common = self._shared_prefix(tokens)
        try:
            self.trim(self.n_past - common)
            return common
        except StepstreamError:  # the sliding rings cannot roll back that far
            pass
        cp = self._checkpoint
        if cp is not None and cp.n_past <= common:
            kv_checkpoint.restore(self.cache, cp)
            del self._tokens[cp.n_past :]
            if self._drafter is not None:
                self._drafter.truncate(cp.n_past)
            return cp.n_past
        self.reset()
        return 0

    def reusable(self, tokens, state: kv_state.SavedState | None = None) -> int:
        """How many leading positions of `tokens` keep_prefix would keep: from the cache as it is,
        or from `state` once loaded (the server's prompt cache chooses among its states by it)."""
        tokens = list(tokens)
        if not tokens:
            return 0
        held, cp = (self._tokens, self._checkpoint) if state is None else (state.tokens, state.checkpoint)
        oldest = ([layer.oldest_kept() for layer in self.cache.layers if layer.ring and layer.n] if state is None
                  else state.oldest_kept())
        n = min(len(held), len(tokens))  # compared as arrays: a server scores every kept state by this
        differ = np.flatnonzero(np.asarray(held[:n], np.int64) != np.asarray(tokens[:n], np.int64))
        common = min(int(differ[0]) if differ.size else n, len(tokens) - 1)
        if trimmable(oldest, len(held), len(held) - common, self.cfg.window):
            return common
        return cp.n_past if cp is not None and cp.n_past <= common else 0

    def _shared_prefix(self, tokens: list) -> int:
        """How many leading tokens the cache shares with `tokens`, leaving at least the last."""
        common = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            common += 1
        return min(common, len(tokens) - 1)

    @_serialized
    def eval_prompt(self, tokens, mtp: bool = False, cancelled=None) -> tuple[np.ndarray | None, int]:
        """(logits [V] after `tokens`, positions reused): evaluates only what the cache does not
        already hold. When the model has sliding-window blocks, their rings are copied afterwards
        (a checkpoint), so that a later prompt sharing these tokens but not what was generated
        after them still reuses them. With `mtp`, the MTP heads are brought in step too: the
        cache keeps only positions whose hidden states the heads still have to read, or
        have read. `cancelled()`, when given, is asked before each batch of n_batch positions:
        when it says so the evaluation stops there (logits None), the cache holding the prompt's
        positions evaluated so far, as a prefix a later prompt may reuse."""
        tokens = list(tokens)
        if len(tokens) > self.n_ctx:  # in the prompt's words, not a tail's after the reused positions
            raise ContextExceeded(f"the prompt is {len(tokens)} tokens, more than the context of {self.n_ctx} "
                                  f"(load with a larger n_ctx, at most the model's {self.cfg.context_length})")
        limit = len(tokens)
        if mtp and self.weights.nextn:
            # The heads first forget what read tokens past the shared prefix: the hidden states
            # they must then catch up from may be ones they had already read and let go, and the
            # trunk has to evaluate those positions again (else no head could draft after them).
            self.drafter.truncate(self._shared_prefix(tokens))
            limit = min(limit, self.drafter.resume_point() + 1)
        kept = self.keep_prefix(tokens[:limit])
        # The rings are copied before the last token, not after it: a prompt that repeats this
        # one (a retried or regenerated request) shares all but its last token, which is always
        # evaluated again for its logits, so it can return here. The forward pass is
        # batch-invariant: evaluating the last token apart gives the same bits. When the heads
        # draft, they follow the prompt a stretch at a time, so that only a stretch's hidden
        # states are held for them (a whole prompt's were: 16 KiB a token on the real model).
        heads = bool(mtp and self.weights.nextn)
        batch = self.options.n_batch
        stretch = 8 * batch if heads else len(tokens)
        for a in range(kept, len(tokens) - 1, stretch):
            end = min(a + stretch, len(tokens) - 1)
            # An evaluation a batch at a time (the same bits: the pass is batch-invariant): a
            # client gone is seen within a batch, and a writer the file's lease holds back gets
            # the file between batches, where the next one's check stops cleanly. The kernel
            # lets it through anyway after lease-break-time (45 s): a whole long prompt in one
            # evaluation outlasted it, and the process died of SIGBUS reading the map.
            for b in range(a, end, batch):
                if cancelled is not None and cancelled():
                    return None, kept
                self.eval(tokens[b : min(b + batch, end)])
            if heads and end < len(tokens) - 1:
                with self._heads_pass():
                    self.drafter.fill()
        if cancelled is not None and cancelled():
            return None, kept
        if any(layer.ring for layer in self.cache.layers) and (self._checkpoint is None
                                                               or self._checkpoint.n_past != self.n_past):
            self._checkpoint = kv_checkpoint.take(self.cache)
        logits = self.eval(tokens[-1:])
        if mtp and self.weights.nextn:
            self.drafter.pin = len(tokens) - 1  # where the same prompt sent again rolls back to
            with self._heads_pass():
                self.drafter.fill()
        return logits, kept

    @_serialized
    def eval_reusing_prefix(self, tokens) -> np.ndarray:
        """Logits [V] after `tokens`, evaluating only what the cache does not already hold."""
        return self.eval_prompt(tokens)[0]

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self.file.check_unchanged()  # its vocabulary is read from the mapped header
            with self.file.evaluating():
                self._tokenizer = Tokenizer.from_gguf(self.file)
        return self._tokenizer

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Like llama-cpp-python: BOS first when the model wants one; `special` parses control tokens."""
        return self.tokenizer.encode(text, add_bos=_flag("add_bos", add_bos) and self.tokenizer.add_bos,
                                     special=_flag("special", special))

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        """The bytes of `tokens`; with `prev_tokens` (llama-cpp-python's), those that `tokens` add
        after them (a token's text may depend on the one before it: a leading space)."""
        special = _flag("special", special)
        if prev_tokens is None or len(prev_tokens) == 0:
            return self.tokenizer.decode_bytes(tokens, special=special)
        before = self.tokenizer.decode_bytes(prev_tokens, special=special)
        both = self.tokenizer.decode_bytes(list(prev_tokens) + list(tokens), special=special)
        return both[len(before):] if both.startswith(before) else self.tokenizer.decode_bytes(tokens, special=special)

    # llama-cpp-python's methods that stepstream does not offer: an AttributeError that says why
    # (hasattr() is False). Properties, not __getattr__: that would also catch an AttributeError
    # raised inside a real property's getter and hide it behind "no attribute".
    create_embedding = property(lambda self: _not_offered("create_embedding"))
    embed = property(lambda self: _not_offered("embed"))
    set_cache = property(lambda self: _not_offered("set_cache"))

    @_serialized
    def save_state(self, checkpoint: bool = False, copy: bool = True) -> kv_state.SavedState:
        """A copy of the KV cache and the tokens it holds (llama-cpp-python's save_state), for
        load_state to return to: a later prompt that starts with these tokens reuses them. With
        `checkpoint`, the state keeps the rings' checkpoint at the last prompt's end too, so that
        after load_state a prompt sharing that prompt but not the reply reuses the prompt.
        Without `copy`, its arrays are views of the cache, valid until the next evaluation (to
        write it to a file without holding a second copy)."""
        self._check_open()
        return kv_state.take(self.cache, self._tokens, self._identity(), self._checkpoint if checkpoint else None,
                             copy=copy)

    def state_nbytes(self, checkpoint: bool = False) -> int:
        """The bytes save_state(checkpoint) would copy now, without copying them."""
        return kv_state.size(self.cache, self._checkpoint if checkpoint else None)

    @_serialized
    def load_state(self, state: kv_state.SavedState) -> None:
        """Make the cache hold what it held at save_state (a state of this file and cache layout;
        another is refused with the cache untouched)."""
        self._check_open()
        kv_state.restore(self.cache, state, self._identity())
        self.version += 1
        self._tokens = list(state.tokens)
        self._checkpoint = state.checkpoint
        # the heads go on from the state's end (mtp.Drafter.start_at); none are made for a model
        # loaded not to draft (their caches would take memory nothing counted)
        if self._drafter is not None or (self.n_mtp and self.options.mtp != 0):
            self.drafter.start_at(state.tokens)

    def _identity(self) -> str:
        return self._state_identity

    def generate(self, tokens, max_tokens: int | None = None, mtp=None, **sampling):
        """Yield sampled token ids after `tokens`, stopping at end-of-generation or max_tokens.

        mtp: "auto" or a draft length 0..3 for speculative decoding with the MTP heads (None:
        the load option `mtp`, 0 by default); the tokens are the same either way.
        Sampling keywords: temperature (or llama-cpp-python's `temp`), top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, seed.
        """
        return generate(self, self._check_tokens_only(tokens), Sampler(sampling_params(**_temp(sampling))), max_tokens,
                        mtp=mtp)

    def create_completion(self, prompt: str | list[int], max_tokens: int | None = 16, stop=None, stream: bool = False,
                          **sampling):
        """OpenAI-shaped text completion (a dict, or an iterator of chunks when streaming) of a
        text or of token ids, as llama-cpp-python takes either.
        max_tokens None or <= 0: until end of text or the end of the context, as llama-cpp-python."""
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = self._check_tokens_only(prompt)
        else:
            ids = self.tokenize(prompt, add_bos=True, special=True)
        mtp = sampling.pop("mtp", None)
        logprobs, echo = sampling.pop("logprobs", None), sampling.pop("echo", False)
        if logprobs is not None or echo is not False:  # llama-cpp-python's log-probabilities and echo
            return self._completion_with_logprobs(prompt, ids, logprobs, echo, max_tokens, stop, stream, mtp, sampling)
        pieces = complete(self, ids, sampling_params(**_temp(sampling)), _no_limit(max_tokens), _stops(stop), mtp=mtp)
        return completion_response(self, ids, pieces, stream)

    def _completion_with_logprobs(self, prompt, ids: list[int], logprobs, echo, max_tokens, stop, stream: bool, mtp,
                                  sampling: dict):
        """create_completion with `logprobs` (the sampled token's and the `logprobs` likeliest
        alternatives' log-probabilities, in llama-cpp-python's and OpenAI's legacy shape) or `echo`
        (the prompt's text before the reply's), run as a server request runs."""
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, numbers.Integral)
                                     or not 0 <= logprobs <= self.cfg.vocab):
            raise StepstreamError(f"logprobs must be None or an integer 0..{self.cfg.vocab}, got {logprobs!r}")
        if not isinstance(echo, bool):
            raise StepstreamError(f"echo must be True or False, got {echo!r}")
        if echo and logprobs is not None:  # as the server: the prompt's own log-probabilities are not computed
            raise StepstreamError("echo with logprobs (the prompt's log-probabilities) is not supported")
        text = prompt if isinstance(prompt, str) else self.detokenize(ids).decode("utf-8", "replace")
        params = sampling_params(**_temp(sampling))
        limit = _no_limit(max_tokens)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)):
            raise StepstreamError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        req = Request(ids, params, limit, _stops(stop), None if logprobs is None else int(logprobs), mtp=mtp)
        return completion_from_steps(self, req, text, run_request(self, req), stream, logprobs is not None, echo)

    def __call__(self, prompt: str, **kwargs):
        """`model(prompt, ...)` is `create_completion`, as in llama-cpp-python."""
        return self.create_completion(prompt, **kwargs)

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, stop=None,
                               stream: bool = False, tools: list | None = None, tool_choice=None, **sampling):
        """OpenAI-shaped chat completion, the prompt rendered from the model's chat template, the
        reply parsed as the server parses it: `reasoning_content`, and `tool_calls` when `tools`
        (OpenAI function specs) are offered. tool_choice: "auto", "none", "required" or
        {"type": "function", "function": {"name": ...}} (the reply then starts a call).
        max_tokens None or <= 0: until end of text or the end of the context, as llama-cpp-python.
        tool_choice None is "auto"; the temperature is 0.2 unless given, llama-cpp-python's chat default.
        `reasoning_budget` (tokens) or `reasoning_effort` ("none", "minimal", "low", ...) bound the
        reply's reasoning: its `</think>` is then forced, after `reasoning_message` if given."""
        tool_choice = "auto" if tool_choice is None else tool_choice
        if "temperature" not in sampling and "temp" not in sampling:
            sampling["temperature"] = 0.2
        check_tools(tools, tool_choice)  # the server's rules: a forced call needs tools, and names one of them
        named = isinstance(tool_choice, dict)
        check_roles(messages)
        offered = tools if tools and tool_choice != "none" else None  # the ones a call may name
        ids = self.chat_tokens(messages, tools=tools or None)  # shown even with "none", as the server shows them
        tail = self.tokenizer.decode_bytes(ids[-64:], special=True).decode("utf-8", "replace")
        in_reasoning, forced = starts_in_reasoning(tail), ""
        if offered is not None and tool_choice != "auto":  # the reply starts with the opening of a call
            forced = ("\n" + END_THINK + "\n" if in_reasoning else "") + forced_call(
                tool_choice["function"]["name"] if named else None)
            ids = ids + self.tokenize(forced, add_bos=False, special=True)
        mtp = sampling.pop("mtp", None)
        budget = _reasoning_budget(sampling.pop("reasoning_budget", None), sampling.pop("reasoning_effort", None))
        message = check_message(sampling.pop("reasoning_message", ""))
        if message and budget is None:
            raise StepstreamError("reasoning_message goes with a reasoning_budget (or a reasoning_effort below medium): "
                                  "without a budget nothing writes it")
        k = _chat_logprobs_k(sampling.pop("logprobs", None), sampling.pop("top_logprobs", None), self.cfg.vocab)
        json_object, grammar = _json_mode(sampling.pop("response_format", None))
        if (json_object or grammar is not None) and offered is not None:
            raise StepstreamError("response_format json_object or json_schema goes without tools (or with tool_choice "
                                  "'none'): the reply must be JSON, with no room for a tool call's markup")
        if forced:  # the call the prompt opened is finished by its grammar (runtime.text.tool_grammar)
            grammar = ToolCallGrammar(callable_tools(offered, tool_choice),
                                      tool_choice["function"]["name"] if named else None)
        elif offered is not None:  # "auto": a call the reply opens is finished by its grammar
            grammar = AutoToolGrammar(offered)
        if k is not None or json_object or grammar is not None or budget is not None:
            return self._chat_as_request(ids, k, (json_object, grammar), max_tokens, stop, stream, mtp, sampling,
                                         callable_tools(offered, tool_choice), in_reasoning, forced, (budget, message))
        pieces = complete(self, ids, sampling_params(**_temp(sampling)), _no_limit(max_tokens), _stops(stop), mtp=mtp)
        return chat_response(self, ids, pieces, stream, tools=callable_tools(offered, tool_choice),
                             in_reasoning=in_reasoning, forced=forced)

    def _chat_as_request(self, ids: list[int], k: int | None, structured: tuple, max_tokens, stop, stream: bool, mtp,
                         sampling: dict, tools, in_reasoning: bool, forced: str, budget: tuple = (None, "")):
        """create_chat_completion with `logprobs` (the reply's tokens' log-probabilities and the k
        likeliest alternatives', in OpenAI's chat shape) or JSON mode, run as a server request
        runs (the same steps and the same reply builder, runtime.generation.replies)."""
        params = sampling_params(**_temp(sampling))
        limit = _no_limit(max_tokens)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)):
            raise StepstreamError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        json_object, grammar = structured  # JSON mode, or a compiled JSON Schema
        req = Request(ids, params, limit, _stops(stop), k, mtp=mtp, json_object=json_object, grammar=grammar,
                      in_reasoning=in_reasoning, reasoning_budget=budget[0], reasoning_message=budget[1])
        req.tools, req.forced = tools, forced  # the budget reads reasoning as the reply's parser reads it
        reply = ChatReply(self.name, len(ids), in_reasoning=in_reasoning, tools=tools, forced=forced)
        steps = run_request(self, req)
        want = k is not None
        if stream:
            def chunks():
                first = reply.first_chunk()
                first["choices"][0]["delta"] = {"role": "assistant"}  # llama-cpp-python's first delta
                yield first
                for step in steps:
                    yield from reply.chunks(step, want)
            return chunks()
        with self.lock:  # whole: never overtaken by another thread's generation
            for step in steps:
                reply.collect(step)
        return api_shape(reply.whole(req.timings, want), req.timings)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                    continue_final: bool = True, limit: int | None = None) -> list[int]:
        """The prompt ids of a conversation, rendered with the model's chat template (with the
        OpenAI function specs `tools`, when given). Control tokens come only from the template:
        special-token text inside a message is tokenized as text. A last assistant message with
        text is continued, as llama-server does (continue_final=False closes it and opens a new
        turn). `limit`: a conversation that must render to more tokens is refused before it is
        tokenized (runtime.base.errors.PromptTooLong)."""
        return chat_ids(self.tokenizer, messages, add_generation_prompt, tools=tools, continue_final=continue_final,
                        limit=limit)

    def _check_tokens_only(self, tokens) -> list[int]:
        ids = np.asarray(tokens)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise StepstreamError("tokens must be a 1-D sequence of integer ids")
        return ids.astype(np.int64).tolist()


class TokenView(Sequence):
    """A list of token ids, read-only: indexing, slices (as lists), len, iteration, equality."""

    __slots__ = ("_ids",)

    def __init__(self, ids: list[int]):
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        return self._ids[i]  # a slice of a list is a new list

    def __iter__(self):
        return iter(self._ids)

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, TokenView)):
            return len(self) == len(other) and all(a == b for a, b in zip(self._ids, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenView({self._ids!r})"


# llama-cpp-python's keywords this API does not act on, with the value at which they change
# nothing: code that passes its full argument list works; a value that would change the
# output is refused by name rather than ignored.
_OFF = {"logprobs": None, "suffix": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0, "logit_bias": None, "grammar": None,
        "logits_processor": None, "stopping_criteria": None, "top_logprobs": None, "functions": None,
        "function_call": None, "response_format": None}
_ANY = ("model", "mirostat_tau", "mirostat_eta", "user")  # a name, or settings of a sampler that is off


class CallableCount(int):
    """An int that is also llama-cpp-python's method of the same name: `model.n_ctx` is the
    context, and `model.n_ctx()`, as llama-cpp-python code calls it, too."""

    def __call__(self) -> int:
        return int(self)


class NotOffered(StepstreamError, AttributeError):
    """A llama-cpp-python method stepstream does not have (hasattr() is False, as for any other)."""


_NOT_OFFERED = {
    "create_embedding": "stepstream does not compute embeddings (Step-3.5 is a generative model; "
                        "llama-cpp-python too needs embedding=True, which runtime.load refuses)",
    "embed": "stepstream does not compute embeddings",
    "set_cache": "the model keeps its KV cache between calls and reuses its longest shared prefix",
}


def _not_offered(name: str):
    raise NotOffered(f"{name}: {_NOT_OFFERED[name]}")


def _flag(name: str, value) -> bool:
    """A boolean option, as llama-cpp-python takes it: True/False, or 0/1."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise StepstreamError(f"{name} must be True or False, got {value!r}")


def _temp(sampling: dict) -> dict:
    """llama-cpp-python's `temp` is `temperature`; its other keywords are dropped where they are
    off (_OFF) and refused where they are not."""
    if "temp" in sampling:
        if "temperature" in sampling:
            raise UnknownOption("give temperature or temp (llama-cpp-python's name for it), not both")
        sampling["temperature"] = sampling.pop("temp")
    t = sampling.get("temperature")
    if isinstance(t, numbers.Real) and not isinstance(t, bool) and t < 0:
        # llama-cpp-python's temp < 0: a draw from the model's whole distribution (softmax and
        # dist, no filter), where 0 is greedy
        sampling.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    for name in _ANY:
        sampling.pop(name, None)
    for name, off in _OFF.items():
        if name not in sampling:
            continue
        value = sampling.pop(name)
        if name == "response_format" and value in ({"type": "text"},):
            continue
        if name == "logit_bias" and value == {}:
            continue
        if name in ("logprobs", "top_logprobs") and value is False:  # a chat's logprobs: a bool, False is off
            continue
        if value != off or type(value) is bool and type(off) is not bool:
            raise StepstreamError(f"{name}={value!r:.80} is not supported by the Python API (only {off!r}, which "
                                  "changes nothing)" + ("; `stepstream serve` returns log-probabilities"
                                                        if name in ("logprobs", "top_logprobs") else ""))
    return sampling


def _json_mode(response_format) -> tuple[bool, object]:
    """(JSON mode, a compiled schema) from `response_format`: None or {"type": "text"} (off),
    {"type": "json_object"} (JSON mode), llama-cpp-python's {"type": "json_object", "schema": S}
    and OpenAI's {"type": "json_schema", "json_schema": {"schema": S}} (the schema's grammar)."""
    from runtime.text.json_schema import JsonSchemaGrammar, grammar_for

    if response_format is None:
        return False, None
    kind = response_format.get("type", "text") if isinstance(response_format, dict) else None
    if kind == "text" or (kind == "json_object" and response_format.get("schema") is None):
        return kind == "json_object", None
    if kind == "json_object":
        return False, JsonSchemaGrammar(response_format["schema"])
    if kind == "json_schema":
        return False, grammar_for(response_format)
    raise StepstreamError(f"response_format={response_format!r:.80} is not supported: {{'type': 'text'}}, "
                          "{'type': 'json_object'} and {'type': 'json_schema', ...} are")


def _chat_logprobs_k(logprobs, top_logprobs, vocab: int) -> int | None:
    """A chat's `logprobs` (bool) and `top_logprobs` (alternatives, 0..vocab) as the request's k:
    None when no log-probabilities are asked for. OpenAI's rules: top_logprobs needs logprobs
    true; logprobs true alone reports the sampled tokens with no alternatives."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise StepstreamError(f"logprobs must be True, False or None in a chat completion, got {logprobs!r:.80}")
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, numbers.Integral)
                                     or not 0 <= top_logprobs <= vocab):
        raise StepstreamError(f"top_logprobs must be None or an integer 0..{vocab}, got {top_logprobs!r:.80}")
    if not logprobs:
        if top_logprobs:
            raise StepstreamError("top_logprobs needs logprobs=True")
        return None
    return int(top_logprobs or 0)


def _reasoning_budget(budget, effort) -> int | None:
    """create_chat_completion's `reasoning_budget` (tokens; None or -1 no limit) or, when that is
    None, `reasoning_effort` ("none", "low", ...: runtime.generation.reasoning_budget)."""
    by_effort = effort_budget(effort)  # checked even beside a budget
    if budget is None:
        return by_effort
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < -1:
        raise StepstreamError(f"reasoning_budget must be an integer >= 0 (tokens), or None or -1 for no limit, "
                              f"got {budget!r:.80}")
    return None if budget == -1 else int(budget)


def _no_limit(max_tokens):
    """llama-cpp-python's completion calls: max_tokens <= 0 means no limit (None); other values,
    wrong types included, go on to generate's checks."""
    if isinstance(max_tokens, numbers.Integral) and not isinstance(max_tokens, bool) and max_tokens <= 0:
        return None
    return max_tokens


def _stops(stop) -> list[str]:
    """The stop strings: None, one string, or a list or tuple of strings (as llama-cpp-python)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise StepstreamError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return list(stop)
