"""Returning to the end of the last prompt after a reply longer than the rings' rollback.

The reference is the same model evaluating the same prompt the same way and then the new
suffix directly, never having generated the reply: restoring the checkpoint must leave the
cache exactly as that model's, so the logits are equal bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.loader import load

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


@pytest.fixture(scope="module")
def model():
    return load(MODEL, n_ctx=1024)


def _ids(model, n, seed):
    return np.random.default_rng(seed).integers(4, model.cfg.vocab, n).tolist()


@pytest.mark.parametrize("prompt_len,reply_len", [(40, 30), (200, 150), (300, 17), (300, 18)])
def test_restored_cache_equals_one_that_never_saw_the_reply(model, prompt_len, reply_len):
    assert reply_len > model.options.rollback  # trim alone cannot undo the reply
    prompt, reply, new = _ids(model, prompt_len, 1), _ids(model, reply_len, 2), _ids(model, 25, 3)
    model.reset()
    _, kept = model.eval_prompt(prompt)
    assert kept == 0
    for tok in reply:  # generated one token at a time, as a server does
        model.eval([tok])
    logits, kept = model.eval_prompt(prompt + new)  # the next turn dropped the reply
    # the checkpoint sits before the prompt's last token (so a repeated prompt can return to it);
    # a reply within the rings' reach is trimmed instead, keeping the whole prompt
    # (the ring of 128 + 16 slots still sees back to the prompt's end: never wrapped, or wrapped by
    # at most rollback + 1)
    trims = prompt_len + reply_len <= 128 + 16 or reply_len <= 16 + 1
    assert kept == (prompt_len if trims else prompt_len - 1)
    assert model.history == prompt + new
    model.reset()
    model.eval_prompt(prompt)
    want = model.eval(new)
    assert np.array_equal(logits, want)


def test_a_trim_below_the_checkpoint_forgets_it(model):
    """After trim goes below the checkpoint, the positions it covered may change: restoring it
    would bring back keys of tokens that are no longer there."""
    prompt, other, reply = _ids(model, 120, 4), _ids(model, 10, 5), _ids(model, 40, 6)
    model.reset()
    model.eval_prompt(prompt)  # checkpoint at 120
    model.trim(5)  # below it
    model.eval(other)  # positions 115..124 now hold other tokens
    for tok in reply:
        model.eval([tok])
    logits, kept = model.eval_prompt(prompt[:115] + other + [9, 10, 11])
    assert kept == 0  # the reply is past the rollback and there is no valid checkpoint to return to
    model.reset()
    assert np.array_equal(logits, model.eval(prompt[:115] + other + [9, 10, 11]))


def test_a_repeated_prompt_returns_to_the_checkpoint(model):
    """A retried request: the same prompt after a long reply shares all but the last token
    (evaluated again for its logits), which is where the checkpoint is."""
    prompt, reply = _ids(model, 150, 10), _ids(model, 60, 11)
    model.reset()
    first, _ = model.eval_prompt(prompt)
    for tok in reply:
        model.eval([tok])
    again, kept = model.eval_prompt(prompt)
    assert kept == len(prompt) - 1 and np.array_equal(again, first)


def test_nothing_shared_starts_again(model):
    model.reset()
    model.eval_prompt(_ids(model, 50, 8))
    _, kept = model.eval_prompt(_ids(model, 50, 9))
    assert kept == 0
