"""The MTP heads on a model: teacher-forced drafts (`mtp_logits`), incremental greedy drafts
kept in step with the trunk's cache (`mtp_draft`, through runtime.model.mtp's Drafter), and the
trunk pass timings the draft-length chooser starts from.

A mixin of runtime.model.model.Model.

Shape legend:  T tokens   H hidden   V vocab
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.model import mtp
from runtime.model.serial import serialized


class MtpHeads:
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

    @property
    def n_mtp(self) -> int:
        """MTP heads this file carries (0: no drafting)."""
        return len(self.weights.nextn)

    @serialized
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

    @serialized
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

    @serialized
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
