"""The prompt's progress bar (runtime/cli/prompt_progress.py, `run`): it counts the positions the
prompt's batches evaluate, from the reused ones to the last but one (the last is evaluated with
the first token), and watching the batches changes no token.

Reference: the same completion without the bar; the prompt's length and the cache's reuse."""

from __future__ import annotations

import io

import numpy as np
import pytest

import runtime
from runtime.cli.demo import model_path
from runtime.cli.prompt_progress import PromptProgress
from runtime.generation import complete, sampling_params


@pytest.fixture(scope="module")
def model():
    with runtime.load(model_path(), n_ctx=4096, n_batch=256) as m:
        yield m


def _text(model, ids, progress=None, mtp=0):
    return "".join(p.text for p in complete(model, ids, sampling_params(temperature=0), 12, mtp=mtp,
                                            between_batches=progress))


@pytest.mark.parametrize("mtp", [0, 3])
def test_the_bar_counts_the_batches_and_changes_no_token(model, mtp):
    ids = np.random.default_rng(4).integers(0, model.cfg.vocab, 1500).tolist()
    model.reset()
    want = _text(model, ids, mtp=mtp)
    model.reset()
    seen = []
    out = io.StringIO()
    progress = PromptProgress(model, len(ids), file=out, delay=0, disable=False)
    wrapped = lambda: (seen.append(model.n_past), progress())  # noqa: E731
    assert _text(model, ids, wrapped, mtp=mtp) == want
    progress.close()
    assert seen[0] == 0 and seen[-1] == len(ids) - 1 and seen == sorted(seen)
    assert len(seen) >= len(ids) // 256  # at least once a batch
    assert progress.bar.n == len(ids) - 1 and f"/{len(ids)}" in out.getvalue()
    # a prompt that goes on from the cache: the bar starts at the positions reused
    longer = ids + [5, 6, 7] * 100
    reused = model.reusable(longer)
    assert reused > 1000
    progress = PromptProgress(model, len(longer), file=io.StringIO(), delay=0, disable=False)
    got = _text(model, longer, progress, mtp=mtp)
    model.reset()
    assert got == _text(model, longer, mtp=mtp)
    assert progress.bar.initial == reused and progress.bar.n == len(longer) - 1


def test_not_a_terminal_shows_nothing(model):
    ids = list(range(600))
    model.reset()
    out = io.StringIO()  # not a terminal: tqdm's rule
    progress = PromptProgress(model, len(ids), file=out, delay=0)
    _text(model, ids, progress)
    progress.close()
    assert out.getvalue() == ""


def test_a_chat_shows_each_replys_prompt_and_replies_the_same(model):
    from runtime.generation import SamplingParams
    from runtime.generation.conversation import Conversation

    long_message = " ".join(f"item {i}" for i in range(500))
    replies = {}
    for watched in (False, True):
        model.reset()
        progress = PromptProgress(model, file=io.StringIO(), delay=0, disable=False) if watched else None
        conv = Conversation(model, "You are terse.", SamplingParams(temperature=0.0), max_tokens=8, progress=progress)
        turns = []
        for message in (long_message, "and again"):
            turns.append("".join(p for p in conv.reply(message) if isinstance(p, str)))
            if watched:
                prompt = model.chat_tokens(conv.messages[:-1])  # the reply's prompt
                assert progress.bar.total == len(prompt) and progress.bar.n == len(prompt) - 1
                if message == "and again":  # the first turn's positions were reused
                    assert progress.bar.initial > 1000
        replies[watched] = turns
    assert replies[True] == replies[False]


@pytest.mark.parametrize("terminal", [False, True])
def test_run_echoes_the_prompt_even_when_stopped_before_its_first_token(capsys, monkeypatch, terminal):
    """(review 96) With the echo moved after the bar, a run stopped during its prompt printed no
    prompt. Without a terminal the prompt is echoed at once, as before the bar."""
    import sys

    import runtime.generation
    from runtime.cli import main

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def interrupted(model, ids, *args, between_batches=None, **kw):
        assert not terminal or capsys.readouterr().out == ""  # with a terminal: not yet echoed
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(runtime.generation, "complete", interrupted)
    if terminal:
        monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["run", "-m", str(model_path()), "-p", "def hello(name):", "-n", "4"]) == 130
    assert capsys.readouterr().out == "def hello(name):\n"
