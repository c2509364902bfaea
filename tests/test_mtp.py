"""MTP speculative decoding (runtime.model.mtp, runtime.generation.speculative).

Greedy and seeded sampled output must be token-for-token the plain decoder's, on the shipped
trained miniature (drafts mostly accepted) and on the random tiny one (drafts mostly rejected,
rings of window 16 that wrap), in RAM and streaming. The heads' incremental drafts must be
exactly `Model.mtp_logits` of the final sequence wherever the drafts they read were right.
The acceptance rule is checked by a chi-square test against the target distribution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from offload.expert_table import build_expert_table
from runtime.generation import Sampler, SamplingParams
from runtime.generation import speculative as S
from runtime.generation.loop import generate
from runtime.loader import load

SHIPPED = Path(__file__).resolve().parents[1] / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
GREEDY = SamplingParams(temperature=0.0)


class Schedule(S.DraftLength):
    """A chooser that cycles through given draft lengths (drafting after steps without drafts,
    changing k, catching up), so every path is exercised whatever the timings."""

    def __init__(self, n_heads: int, ks):
        super().__init__(n_heads)
        self.ks, self.i = list(ks), 0

    def choose(self, room: int) -> int:
        k = max(0, min(self.ks[self.i % len(self.ks)], room))
        self.i += 1
        self.chosen.append(k)
        return k


def _spec(m, prompt, n, ks, params=GREEDY, stats=None):
    m.reset()
    return list(S.generate(m, prompt, Sampler(params), n, frozenset(), Schedule(m.n_mtp, ks), stats))


def _plain(m, prompt, n, params=GREEDY):
    m.reset()
    return list(generate(m, prompt, Sampler(params), n, stop_at_eog=False, mtp=0))


@pytest.fixture(scope="module")
def shipped():
    m = load(SHIPPED)
    yield m
    m.close()


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    m = load(tiny_gguf("q4_k_m"))
    yield m
    m.close()


def _prompt(m, text="def fibonacci(n):\n    if n < 2:\n"):
    return m.tokenize(text)


KS = [3, 3, 1, 0, 0, 2, 3, 0, 1, 2]


def test_greedy_identity_shipped_in_ram_and_streaming(shipped):
    prompt = _prompt(shipped)
    want = _plain(shipped, prompt, 48)
    info = {}
    assert _spec(shipped, prompt, 48, KS, stats=info) == want
    assert info["tokens_per_pass"] > 1.5  # the trained heads' drafts are mostly accepted
    assert shipped.history == prompt + want[:-1]  # left as plain decoding leaves it
    shipped.reset()
    assert list(shipped.generate(prompt, 48, temperature=0.0, mtp="auto")) == want
    m = load(SHIPPED, mtp=3)  # the load option
    try:
        info = {}
        assert list(generate(m, prompt, Sampler(GREEDY), 48, stop_at_eog=False, stats=info)) == want
        assert info["passes"] < 40
    finally:
        m.close()
    total = build_expert_table(shipped.file, shipped.cfg).total_bytes
    m = load(SHIPPED, ram_budget=int(total * 0.3))
    try:
        assert _spec(m, prompt, 48, KS) == want
        assert m.provider.stats.misses > 0
    finally:
        m.close()


@pytest.mark.parametrize("budget", [None, 0.3])
def test_greedy_identity_random_miniature(tiny, tiny_gguf, budget):
    """Random weights: drafts are nearly always rejected and trimmed; 80 tokens wrap the rings."""
    prompt = list(range(3, 40))
    want = _plain(tiny, prompt, 80)
    m = tiny if budget is None else load(tiny_gguf("q4_k_m"),
                                         ram_budget=int(build_expert_table(tiny.file, tiny.cfg).total_bytes * budget))
    try:
        assert _spec(m, prompt, 80, KS) == want
        assert m.history == prompt + want[:-1]
    finally:
        if m is not tiny:
            m.close()


def test_seeded_sampling_identity(shipped):
    """With the sampler's own draw deciding acceptance, a seeded sampled run is the plain one."""
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repeat_penalty=1.1, seed=7)
    prompt = _prompt(shipped)
    want = _plain(shipped, prompt, 40, params)
    info = {}
    assert _spec(shipped, prompt, 40, [3, 2, 0, 3], params, info) == want
    assert info["tokens_per_pass"] > 1.0


@pytest.mark.parametrize("which", ["shipped", "tiny", "long prompt"])
def test_drafts_are_the_teacher_forced_heads(shipped, tiny, which):
    """Every draft's logits equal mtp_logits over the final sequence, bit for bit, wherever the
    drafts it read were the tokens that followed. A prompt of more than n_batch tokens: the
    heads fill over it a chunk at a time (they held a whole prompt's activations at once)."""
    m = tiny if which == "tiny" else shipped
    prompt = {"shipped": _prompt(m), "tiny": list(range(5, 30)),
              "long prompt": (_prompt(m) * 20)[: 3 * m.options.n_batch + 5]}[which]
    seen = []
    real = m.drafter.draft

    def spy(pending, k):
        out = real(pending, k)
        seen.append((len(m.drafter.tokens) - 1, list(out), [x.copy() for x in m.drafter.last_logits]))
        return out

    m.drafter.draft = spy
    try:
        gen = _spec(m, prompt, 40, KS)
    finally:
        del m.drafter.draft
    seq = prompt + gen
    ref = m.mtp_logits(seq)
    checked = 0
    for last, drafts, logits in seen:
        for j, row in enumerate(logits):
            if last < ref[j].shape[0] and all(drafts[i] == seq[last + 2 + i] for i in range(j)):
                assert np.array_equal(row, ref[j][last]), (which, last, j)
                checked += 1
    assert checked >= 10


def test_heads_fill_a_long_prompt_n_batch_positions_at_a_time(shipped, monkeypatch):
    """A review saw a 2,668-token prompt OOM-killed under a cgroup cap the placement had sized:
    the heads ran over the whole prompt in one chunk, with every position's activations at once
    (55 MiB over the trunk's peak at hidden 256; GiBs at the real widths)."""
    from runtime.model import mtp

    rows = []
    real = mtp.head_chunk

    def counted(model, j, x, start, kv):
        rows.append(x.shape[0])
        return real(model, j, x, start, kv)

    monkeypatch.setattr(mtp, "head_chunk", counted)
    n = shipped.options.n_batch
    prompt = (_prompt(shipped) * 40)[: 4 * n + 9]
    assert _spec(shipped, prompt, 8, [3]) == _plain(shipped, prompt, 8)
    assert max(rows) <= n and sum(rows) >= 3 * len(prompt) - 6, (max(rows), sum(rows))


def test_rollback_leaves_the_cache_of_a_fresh_model(tiny, tiny_gguf):
    """After verify passes whose drafts were rejected and trimmed, the next logits are
    bit-identical to a fresh model's over the same tokens."""
    prompt = list(range(7, 31))
    gen = _spec(tiny, prompt, 50, [3])
    nxt = tiny.eval([gen[-1]])
    fresh = load(tiny_gguf("q4_k_m"))
    try:
        assert np.array_equal(nxt, fresh.logits(prompt + gen)[-1])
    finally:
        fresh.close()


def test_prompt_reuse_keeps_heads_in_step(shipped):
    """A second prompt extending the first reuses the cache; drafts stay exact (greedy identity)."""
    first = _prompt(shipped)
    a = _spec(shipped, first, 20, [3])
    second = first + a + shipped.tokenize("\n\ndef g(x):\n", add_bos=False)
    got = list(S.generate(shipped, second, Sampler(GREEDY), 30, frozenset(), Schedule(shipped.n_mtp, KS)))
    assert got == _plain(shipped, second, 30)


@pytest.mark.parametrize("again", ["same prompt", "shorter prefix"])
def test_a_prompt_sent_again_after_a_long_generation_still_drafts(shipped, again, monkeypatch):
    """The same prompt sent again (a retried request), or one sharing only part of it, after a
    generation that went further than mtp.MARGIN past it: the heads catch up (every pass drafts,
    as with a fresh model), the text is plain decoding's, and the same prompt is not evaluated
    again. Before the fix, the hidden states the heads needed had been pruned and no head could
    draft for the rest of the generation."""
    from runtime.model import mtp

    first = _prompt(shipped)
    n = mtp.MARGIN + 40
    _spec(shipped, first, n, [1])
    prompt = first if again == "same prompt" else first[:-3] + shipped.tokenize("x", add_bos=False)
    evals = []
    real = shipped.eval
    monkeypatch.setattr(shipped, "eval", lambda toks, **kw: evals.append(len(toks)) or real(toks, **kw))
    stats: dict = {}
    got = list(S.generate(shipped, prompt, Sampler(GREEDY), 30, frozenset(), Schedule(shipped.n_mtp, [1]), stats))
    monkeypatch.undo()
    if again == "same prompt":
        assert evals[0] == 1, f"the prompt was evaluated again: evaluations of {evals[:3]} tokens"
    fresh: dict = {}
    assert got == _spec(shipped, prompt, 30, [1], stats=fresh) == _plain(shipped, prompt, 30)
    assert stats["draft_passes"] == fresh["draft_passes"] > 0, (stats, fresh)


def _chi2(counts, p):
    return sps.chisquare(counts, p * counts.sum()).pvalue


def test_acceptance_rule_gives_the_target_distribution():
    rng = np.random.default_rng(1234)
    p = np.array([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    q = np.array([0.10, 0.40, 0.05, 0.25, 0.10, 0.10])
    counts = np.zeros(6)
    for _ in range(20000):
        d = int(rng.choice(6, p=q))
        counts[S.accept_or_resample(p, q, d, rng)[1]] += 1
    assert _chi2(counts, p) > 0.001
    # Negative control: resampling from p instead of norm(max(0, p - q)) on rejection.
    wrong = np.zeros(6)
    for _ in range(20000):
        d = int(rng.choice(6, p=q))
        ok = rng.random() < min(1.0, p[d] / q[d])
        wrong[d if ok else int(rng.choice(6, p=p))] += 1
    assert _chi2(wrong, p) < 0.001


def test_one_hot_drafts_by_the_samplers_draw():
    """Greedy drafts (q one-hot at d): accepting d exactly when the sampler's draw equals it
    accepts with probability p(d), and a rejection is distributed as p without d."""
    logits = np.log(np.array([0.30, 0.05, 0.25, 0.10, 0.20, 0.10], np.float32))
    p = np.exp(logits.astype(np.float64))
    p /= p.sum()
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    d, n = 2, 20000
    rejected = np.zeros(6)
    accepted = 0
    for _ in range(n):
        out = S.verify(sampler, logits[None].repeat(2, 0), [d], [0])
        if len(out) == 2:
            accepted += 1
        else:
            rejected[out[0]] += 1
    assert abs(accepted / n - p[d]) < 4 * np.sqrt(p[d] * (1 - p[d]) / n)
    rest = np.delete(p, d) / np.delete(p, d).sum()
    assert _chi2(np.delete(rejected, d), rest) > 0.001 and rejected[d] == 0


def test_auto_settles_on_no_drafting_with_random_weights(tiny):
    prompt = list(range(3, 20))
    info = {}
    chooser = S.DraftLength(tiny.n_mtp)
    tiny.reset()
    list(S.generate(tiny, prompt, Sampler(GREEDY), 48, frozenset(), chooser, info))
    assert chooser.chosen[-16:] == [0] * 16 and info["settled_k"] == 0
    assert sum(k > 0 for k in chooser.chosen) <= 8  # a few tries, then plain decoding


def test_chooser_from_measurements():
    """The cost model alone: cheap verify passes and good heads draft 3; useless heads draft 0."""
    good = S.DraftLength(3)
    bad = S.DraftLength(3)
    for c, acc in ((good, 1), (bad, 0)):
        c.observe(0, 0, None, 1.0)
        for k in (3, 2, 1) * 5:
            c.observe(k, k if acc else 0, 0.05, 1.0 + 0.1 * k)
    assert good.choose(10) == 3
    assert bad.choose(10) == 0
    assert bad.choose(0) == 0 and good.choose(1) == 1  # room caps k


@pytest.mark.parametrize("where", ["mtp_draft", "eval", "head_chunk"])
def test_interrupt_mid_step_leaves_plain_state(tiny, tiny_gguf, where, monkeypatch):
    """Ctrl-C before a draft, before a verify pass, or inside a head's block: the model holds the
    prompt and the tokens shown but the last (as plain decoding leaves it), its next logits are
    a fresh model's, and generation resumed from there is the plain one (the heads too)."""
    import runtime.model.mtp as mtp_module

    prompt = list(range(9, 33))
    tiny.reset()
    owner = mtp_module if where == "head_chunk" else tiny
    real = getattr(owner, where)
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(owner, where, flaky)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for tok in S.generate(tiny, prompt, Sampler(GREEDY), 40, frozenset(), Schedule(tiny.n_mtp, [2, 3, 1])):
            shown.append(tok)
    monkeypatch.undo()
    assert shown and tiny.history == prompt + shown[:-1]
    d = tiny.drafter  # every head's cache holds exactly its teacher-forced positions
    assert [kv.n for kv in d.kv] == d.filled and d.tokens == tiny.history
    nxt = tiny.eval([shown[-1]])
    fresh = load(tiny_gguf("q4_k_m"))
    try:
        assert np.array_equal(nxt, fresh.logits(prompt + shown)[-1])
    finally:
        fresh.close()
    rest = list(S.generate(tiny, prompt + shown, Sampler(GREEDY), 10, frozenset(), Schedule(tiny.n_mtp, [3])))
    assert shown + rest == _plain(tiny, prompt, len(shown) + 10)


def test_a_draft_not_followed_by_its_token(shipped):
    """A draft whose sampled token the trunk never evaluated (another came, or the same draft
    was asked twice) leaves the heads as a fresh model's: the next drafts' logits are equal."""
    prompt = _prompt(shipped)
    a, b, c = 300, 301, 302

    def drafts_after(steps):
        shipped.reset()
        shipped.eval_prompt(prompt, mtp=True)
        for kind, tok in steps:
            shipped.mtp_draft(tok, 3) if kind == "draft" else shipped.eval([tok])
        return [x.copy() for x in shipped.drafter.last_logits]

    def same(x, y):
        return len(x) == len(y) == 3 and all(np.array_equal(u, v) for u, v in zip(x, y))

    assert same(drafts_after([("draft", a), ("draft", b)]), drafts_after([("draft", b)]))
    assert same(drafts_after([("draft", b), ("draft", b)]), drafts_after([("draft", b)]))
    assert same(drafts_after([("draft", a), ("eval", b), ("draft", c)]), drafts_after([("eval", b), ("draft", c)]))


def test_the_report_gives_measured_acceptance_and_none_for_a_head_that_never_drafted():
    """`bench --mtp auto --json` showed [0.5, 0.5, 0.5], the prior, as if measured; later it showed
    the chooser's decayed estimate (0.67 for one draft accepted out of one) as "acceptance"."""
    from runtime.generation.speculative import DECAY, DraftLength

    d = DraftLength(3)
    assert d.report()["acceptance"] == d.report()["acceptance_estimate"] == [None, None, None]
    d.observe(2, 1, 1e-4, 1e-3)  # two drafts made, the first accepted, the second not
    d.observe(1, 1, 1e-4, 1e-3)  # one draft, accepted
    d.observe(3, 0, 1e-4, 1e-3)  # three drafts, the first rejected: heads 2 and 3 were never judged
    r = d.report()
    assert r["acceptance"] == [round(2 / 3, 4), 0.0, None]
    assert r["drafts_per_head"] == [3, 1, 0]
    h0 = DECAY * (DECAY * (DECAY * 1 + 1) + 1) + 0
    t0 = DECAY * (DECAY * (DECAY * 2 + 1) + 1) + 1
    assert r["acceptance_estimate"] == [round(h0 / t0, 4), round((DECAY * 1 + 0) / (DECAY * 2 + 1), 4), None]


def test_a_forced_draft_length_is_reported_as_settled_even_when_the_end_clips_it():
    """`bench -p 60 -n 4 -c 64 --mtp 3` said "k settled on 0": the room left near the end of the
    context clipped every step's drafts, and the report took the clipped lengths for a choice."""
    from runtime.generation.speculative import DraftLength

    d = DraftLength(3, fixed=3)
    assert [d.choose(room) for room in (0, 1, 0, 0)] == [0, 1, 0, 0]
    assert d.report()["settled_k"] == 3
    assert DraftLength(3, fixed=5).report()["settled_k"] == 3  # no more than the heads


def test_a_long_prompt_keeps_only_a_stretch_of_hidden_states_for_the_heads(tiny_gguf, monkeypatch):
    """With MTP on, every prompt position's trunk state was held until the heads filled after the
    whole prompt (a review: 33-45 MiB against 2 MiB for a 6,000-token prompt at hidden 256; 16
    KiB a token on the real model). The heads now follow the prompt a stretch (8 x n_batch) at a
    time; their drafts are the same bits: the same tokens and the same acceptance as a model
    whose stretch holds the whole prompt."""
    from runtime.model import mtp

    held = []
    real = mtp.Drafter.record

    def spying(self, start, h, ids):
        real(self, start, h, ids)
        held.append(len(self.trunk))

    path = tiny_gguf("q4_k_m")
    small, whole = load(path, n_batch=8, n_ctx=1024), load(path, n_batch=1024, n_ctx=1024)
    try:
        prompt = (list(range(7, 200)) * 8)[:900]
        monkeypatch.setattr(mtp.Drafter, "record", spying)
        runs = {}
        for name, m in (("small", small), ("whole", whole)):
            held.clear()
            stats = {}
            runs[name] = (_spec(m, prompt, 24, [3], stats=stats), stats["drafted"], stats["tokens_per_pass"])
            runs[name + " held"] = max(held)
        assert runs["small"] == runs["whole"]
        assert runs["small held"] <= 8 * 8 + mtp.MARGIN + 8 < len(prompt) <= runs["whole held"]
    finally:
        small.close(), whole.close()


def test_a_generation_that_does_not_draft_keeps_no_states_for_the_heads(shipped):
    """After one drafting call, plain generations kept every trunk hidden state for heads that
    never ran (a review: 2,010 after 2,000 tokens). A plain generation now drops them; the next
    drafting one starts the heads over, with the same tokens as plain decoding."""
    prompt = _prompt(shipped)
    _spec(shipped, prompt, 8, [3])
    assert shipped._drafter is not None
    plain = _plain(shipped, prompt, 60)
    assert shipped._drafter is None
    assert _spec(shipped, prompt, 60, KS) == plain


def test_heads_left_behind_by_auto_restart_with_exact_drafts_and_bounded_states(shipped, monkeypatch):
    """While auto decodes without drafts the heads lag, and every trunk state since was kept (a
    review: up to the whole context, 16 KiB a position on the real model). Sliding-window heads
    now restart (heads + 1) x W positions back once they lag 2 x that: the states held stay
    bounded, the drafts after the restart are the ones heads that never stopped make (their
    windows hold the same keys), and the output is plain decoding's."""
    from runtime.model import mtp

    held, drafts = [], []
    record, draft = mtp.Drafter.record, mtp.Drafter.draft
    monkeypatch.setattr(mtp.Drafter, "record", lambda self, *a: (record(self, *a), held.append(len(self.trunk))))
    monkeypatch.setattr(mtp.Drafter, "draft", lambda self, *a: drafts.append(draft(self, *a)) or drafts[-1])
    prompt = _prompt(shipped)
    ks = [0] * 1300 + [3] * 40
    runs = {}
    for restarts in (True, False):
        if not restarts:
            real_init = mtp.Drafter.__init__

            def no_restart(self, model):
                real_init(self, model)
                self.lag_max = None

            monkeypatch.setattr(mtp.Drafter, "__init__", no_restart)
        held.clear(), drafts.clear()
        shipped.forget_drafts()  # a drafter made now, by the __init__ of this round
        out = _spec(shipped, prompt, len(ks), ks)
        runs[restarts] = (out, list(drafts), max(held))
    keep = (shipped.n_mtp + 1) * shipped.cfg.window
    assert runs[True][0] == runs[False][0] == _plain(shipped, prompt, len(ks))
    assert runs[True][1] == runs[False][1] and len(runs[True][1]) > 10  # the same drafts
    assert runs[True][2] <= 2 * keep + 2 * mtp.MARGIN < 1300 < runs[False][2]
    # what the placement counts for them holds the most that was kept
    from offload.placement import kv_cache_bytes, runtime_needs
    from runtime.base.memory_limit import MemoryLimit

    cfg, n_ctx = shipped.cfg, shipped.n_ctx
    assert runs[True][2] * cfg.hidden * 4 <= mtp.held_state_bytes(cfg, n_ctx, shipped.n_mtp)
    limit = MemoryLimit("cgroup v1", 0, 0, 0)
    heads_kv = kv_cache_bytes(cfg, n_ctx, 16, mtp_heads=shipped.n_mtp) - kv_cache_bytes(cfg, n_ctx, 16)
    assert runtime_needs(cfg, n_ctx, 16, limit, mtp_heads=shipped.n_mtp).full - runtime_needs(cfg, n_ctx, 16, limit).full \
        == heads_kv + mtp.held_state_bytes(cfg, n_ctx, shipped.n_mtp)
