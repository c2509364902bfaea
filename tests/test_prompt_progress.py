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
