"""The server's prompt cache (runtime.server.prompt_cache) on the shipped model: a conversation
that another request interrupted gets its prompt back from a kept state, with the same bits a
fresh evaluation gives; the budget holds; the memory is counted at load."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from offload.placement import runtime_needs
from runtime.base.errors import StepstreamError
from runtime.cli.demo import model_path
from runtime.generation import request as completion
from runtime.generation.sampling import SamplingParams
from runtime.server.engine import Engine
from runtime.server.prompt_cache import MIN_KEEP, PromptCache


@pytest.fixture(scope="module")
def model():
    return runtime.load(model_path(), n_ctx=2048, prompt_cache="64MiB")


def _ask(model, cache, prompt, n=12):
    cache.prepare(model, prompt)
    req = completion.Request(list(prompt), SamplingParams(temperature=0), n, logprobs=0)
    steps = list(completion.run(model, req))
    return req.timings.cached_n, [lp.token for s in steps for lp in s.logprobs], \
        [lp.logprob for s in steps for lp in s.logprobs]


def test_an_interrupted_conversation_gets_its_prompt_back_with_the_same_bits(model):
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, model.cfg.vocab, n).tolist() for n in (900, 400))
    cache = PromptCache(model.options.prompt_cache)
    model.reset()
    _, reply, _ = _ask(model, cache, a)
    assert _ask(model, cache, b)[0] == 0  # another conversation: the first one is kept first
    assert len(cache.states) == 1 and cache.states[0].tokens[:900] == tuple(a)
    turn2 = a + reply + [7, 8, 9]
    cached, tokens, logprobs = _ask(model, cache, turn2)
    assert cached >= len(a) - 1 and cache.loads == 1  # (the reply's positions reach past the rings' rollback)
    model.reset()  # the reference: the same prompt evaluated from nothing
    fresh = PromptCache(0)
    assert _ask(model, fresh, turn2)[1:] == (tokens, logprobs)
    # and without the prompt cache, the second conversation had cost the first its prompt
    model.reset()
    _ask(model, fresh, a)
    _ask(model, fresh, b)
    assert _ask(model, fresh, turn2)[0] == 0


def test_the_budget_holds_and_newer_states_replace_their_prefixes(model):
    rng = np.random.default_rng(4)
    model.reset()
    convs = [rng.integers(0, model.cfg.vocab, 300).tolist() for _ in range(4)]
    probe = PromptCache(1 << 40)
    _ask(model, probe, convs[0], 2)
    one = model.save_state(checkpoint=True).nbytes
    cache = PromptCache(int(2.5 * one))  # room for two
    for c in convs:
        _ask(model, cache, c, 2)
    assert len(cache.states) == 2 and cache.nbytes <= cache.budget
    assert [s.tokens[:300] for s in cache.states] == [tuple(convs[1]), tuple(convs[2])]  # the oldest went
    _ask(model, cache, convs[2] + [1] * 40, 2)  # back to the third, then on past it
    _ask(model, cache, convs[0], 2)
    assert sum(s.tokens[:300] == tuple(convs[2]) for s in cache.states) == 1  # its longer state replaced it
    small = PromptCache(one // 2)  # a state bigger than the budget is not kept
    _ask(model, small, convs[1], 2)
    _ask(model, small, convs[3], 2)
    assert small.states == [] and small.keeps == 0
    # a request that keeps most of the live cache keeps nothing
    short = PromptCache(1 << 40)
    _ask(model, short, convs[3] + [2] * (MIN_KEEP - 10), 2)
    assert short.keeps == 0


@pytest.mark.parametrize("mtp", [2, 3])
def test_drafting_after_a_loaded_state_gives_the_plain_tokens(model, mtp):
    """A loaded state used to start the MTP heads over, so a drafting request evaluated its whole
    prompt again for them (the cache was no use to a server that drafts); now the heads go on
    from the state's end (Drafter.start_at). Conversations interleaved, each turn's tokens
    against plain greedy decoding of the same prompt from nothing."""
    assert model.n_mtp > 0
    rng = np.random.default_rng(mtp)
    a, b = (rng.integers(0, model.cfg.vocab, n).tolist() for n in (700, 500))
    cache = PromptCache(model.options.prompt_cache)
    model.reset()
    fresh = runtime.load(model_path(), n_ctx=2048)  # the reference: each prompt from nothing, plainly
    history = {"a": a, "b": b}
    for turn, name in enumerate(["a", "b", "a", "b", "a", "a"]):
        prompt = history[name] + rng.integers(0, model.cfg.vocab, 1 + turn).tolist()
        cache.prepare(model, prompt)
        req = completion.Request(list(prompt), SamplingParams(temperature=0), 12, mtp=mtp)
        steps = list(completion.run(model, req))
        text = "".join(s.text for s in steps)
        if turn >= 2:
            assert req.timings.cached_n >= len(history[name]) - 1, (turn, name)
        assert req.timings.draft_n > 0
        fresh.reset()
        want = list(completion.run(fresh, completion.Request(list(prompt), SamplingParams(temperature=0), 12)))
        assert text == "".join(s.text for s in want), (turn, name)
        history[name] = prompt + model.tokenize(text, add_bos=False)[:3]
    assert cache.loads >= 3


def test_the_memory_is_counted_at_load():
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.memory_limit import MemoryLimit
    from runtime.base.options import RuntimeOptions

    cfg = ModelConfig.from_gguf(GGUFModelFile(model_path()))
    limit = MemoryLimit("test", 8 << 30, 8 << 30, 0)
    base, kept = (runtime_needs(cfg, 512, 16, limit, kept=k) for k in (0, 3 << 20))
    assert kept.full - base.full == 3 << 20 and kept.start == base.start
    opts = RuntimeOptions.from_kwargs(prompt_cache="auto")
    assert opts.prompt_cache_bytes(8 << 30) == 1 << 30 and opts.prompt_cache_bytes(128 << 30) == 8 << 30
    assert RuntimeOptions.from_kwargs(prompt_cache="AUTO").prompt_cache == "auto"  # as --cache-ram reads it
    for bad in (-1, True, "lots"):
        with pytest.raises(StepstreamError):
            RuntimeOptions.from_kwargs(prompt_cache=bad)


def test_the_servers_flag():
    import argparse

    from runtime.cli.serve import cache_ram

    assert cache_ram("auto") == "auto" and cache_ram("0") == 0 and cache_ram("512MiB") == 512 << 20
    with pytest.raises(argparse.ArgumentTypeError, match="give a unit"):
        cache_ram("64")  # 64 bytes to the parser, 64 GB to whoever typed it
    with pytest.raises(argparse.ArgumentTypeError, match="0 bytes"):
        cache_ram("0.5")  # was read as 0: the cache turned off in silence (review 90)
    assert cache_ram("AUTO") == "auto"


def test_reusable_is_what_keep_prefix_keeps(model):
    """Model.reusable (which the cache chooses by) against keep_prefix itself, which trims the
    cache, falls back to the rings' checkpoint or to nothing: from the live cache and from a
    state, for prompts that leave the history at every kind of place."""
    rng = np.random.default_rng(9)
    base = rng.integers(0, model.cfg.vocab, 200).tolist()
    model.reset()
    model.eval_prompt(base)
    model.eval(rng.integers(0, model.cfg.vocab, 40).tolist())  # a "reply" past the rings' rollback
    state = model.save_state(checkpoint=True)
    held = list(model.history)
    for cut in (0, 5, 120, 199, 200, 210, 225, 239, 240):
        for tail in ([], [3, 4]):
            prompt = held[:cut] + tail + ([1] if not tail and cut == len(held) else [])
            if len(prompt) < 2:
                continue
            model.load_state(state)
            want = model.reusable(prompt)
            assert model.reusable(prompt, state) == want
            model.reset()
            assert model.reusable(prompt, state) == want
            model.load_state(state)
            assert model.keep_prefix(prompt) == want, (cut, tail)


def test_review_90s_findings(model, capsys):
    """A state bigger than the budget was copied whole before being dropped; the loaded state was
    dropped, so a request that used part of it lost the rest; load_state built the MTP heads'
    caches for a model loaded not to draft; a failing prepare failed the request; mtp_draft right
    after load_state raised KeyError."""
    rng = np.random.default_rng(90)
    a, other = rng.integers(0, model.cfg.vocab, 700).tolist(), rng.integers(0, model.cfg.vocab, 400).tolist()
    model.reset()
    _ask(model, PromptCache(0), a)
    size = model.state_nbytes(checkpoint=True)
    assert size == model.save_state(checkpoint=True).nbytes
    small, copies = PromptCache(size // 2), []
    real = model.save_state
    model.save_state = lambda *args, **kw: copies.append(1) or real(*args, **kw)
    try:
        small.prepare(model, other)
    finally:
        del model.save_state
    assert copies == [] and small.states == [] and "not kept" in capsys.readouterr().err
    # a prompt that shares a kept conversation's prompt but not its reply (a retry, a summary) loads
    # it, and the conversation's next turn still finds all of it
    cache = PromptCache(1 << 30)
    model.reset()
    _, reply, _ = _ask(model, cache, a, 60)
    _ask(model, cache, other)
    _ask(model, cache, a[:-5] + [1, 2])
    assert _ask(model, cache, a + reply + [3])[0] >= len(a) + len(reply) - 16  # (the rings' rollback)
    # the model is loaded with mtp 0 and has never drafted: no heads made by a load
    model.reset()
    model.forget_drafts()
    model.load_state(cache.states[-1])
    assert model._drafter is None
    state = model.save_state(checkpoint=True)
    model.drafter  # noqa: B018 - heads made (as a drafting request makes them)
    model.load_state(state)  # they go on from the state's end, and draft nothing yet (a KeyError before)
    assert model.mtp_draft(5, 2) == []
    # a prepare that fails leaves the request to go on from a reset cache
    engine = Engine(model, prompt_cache=PromptCache(1 << 30))
    engine.prompt_cache.prepare = lambda *args: (_ for _ in ()).throw(MemoryError("no room for a copy"))
    engine._prepare(a)
    assert model.n_past == 0 and "no room for a copy" in capsys.readouterr().err


def test_room_is_made_before_the_copy(model):
    """Review 93: the live cache was copied before older states were dropped, so the kept
    states reached twice the budget for a moment."""
    rng = np.random.default_rng(8)
    convs = [rng.integers(0, model.cfg.vocab, 300).tolist() for _ in range(4)]
    model.reset()
    model.eval_prompt(convs[0])
    one = model.state_nbytes(checkpoint=True)
    cache = PromptCache(int(1.5 * one))  # room for one
    seen = []
    real = model.save_state

    def watched(*args, **kwargs):
        seen.append(cache.nbytes)
        return real(*args, **kwargs)

    model.save_state = watched
    try:
        model.reset()
        for c in convs:
            _ask(model, cache, c, 2)
    finally:
        del model.save_state
    assert len(seen) == 3 and all(n + one <= cache.budget for n in seen), (seen, one, cache.budget)
