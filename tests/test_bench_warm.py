"""`stepstream bench` warms up every path it times: with one repetition (-r 1, the default)
the first timed prefill must not be the first pass of its length, which loads other kernels
than a short pass does (up to 8 tokens the few-token kernels, beyond them the GEMM)."""

from __future__ import annotations

from runtime.cli.bench import bench_ours


class Recorder:
    """A model that records the lengths it evaluates and which of them were timed."""

    def __init__(self):
        self.calls: list[int] = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def eval(self, ids):
        self.calls.append(len(ids))
        return None


def test_the_warm_up_runs_the_timed_prompt_length_and_a_decode_step_first():
    for n_prompt in (9, 16, 128):
        m = Recorder()
        prompt, gen = list(range(n_prompt)), [1, 2, 3]
        r = bench_ours(m, prompt, gen, reps=1)
        timed = m.calls[-(1 + len(gen)):]
        warm = m.calls[: len(m.calls) - len(timed)]
        assert timed == [n_prompt, 1, 1, 1]
        assert n_prompt in warm and 1 in warm, (n_prompt, warm)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
