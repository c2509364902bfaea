"""The server's running totals, as llama-server's `/metrics` exports them (Prometheus text
format, its `llamacpp:` names, so that its dashboards read ours): tokens and seconds of prompt
evaluation and of generation, requests running and waiting, drafts made and accepted.

The engine's worker records each finished request's timings (`record`); the HTTP loop reads a
snapshot (`text`). One lock guards the totals: the two run on different threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Metrics:
    prompt_tokens: int = 0  # prompt tokens evaluated (not those reused from a cache)
    prompt_seconds: float = 0.0
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0
    requests: int = 0  # requests finished (or failed) on the worker
    n_tokens_max: int = 0  # the longest prompt plus reply seen
    drafted: int = 0  # tokens the MTP heads drafted
    accepted: int = 0  # of those, the ones verification kept
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, timings, prompt_len: int) -> None:
        """A request's runtime.generation.request.Timings, once it is over."""
        with self._lock:
            self.prompt_tokens += timings.prompt_n
            self.prompt_seconds += timings.prompt_ms / 1000
            self.predicted_tokens += timings.predicted_n
            self.predicted_seconds += timings.predicted_ms / 1000
            self.requests += 1
            self.n_tokens_max = max(self.n_tokens_max, prompt_len + timings.predicted_n)
            self.drafted += timings.draft_n
            self.accepted += timings.draft_n_accepted

    def text(self, processing: int, deferred: int) -> str:
        """The Prometheus exposition: `processing` requests running, `deferred` waiting."""
        with self._lock:
            rows = [
                ("prompt_tokens_total", "counter", "Number of prompt tokens processed.", self.prompt_tokens),
                ("prompt_seconds_total", "counter", "Prompt process time", self.prompt_seconds),
                ("tokens_predicted_total", "counter", "Number of generation tokens processed.", self.predicted_tokens),
                ("tokens_predicted_seconds_total", "counter", "Predict process time", self.predicted_seconds),
                ("n_tokens_max", "counter", "Largest observed n_tokens.", self.n_tokens_max),
                ("requests_total", "counter", "Requests served.", self.requests),
                ("spec_decode_num_draft_tokens_total", "counter", "Total draft tokens generated.", self.drafted),
                ("spec_decode_num_accepted_tokens_total", "counter", "Total draft tokens accepted.", self.accepted),
                ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
                 _rate(self.prompt_tokens, self.prompt_seconds)),
                ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
                 _rate(self.predicted_tokens, self.predicted_seconds)),
                ("requests_processing", "gauge", "Number of requests processing.", processing),
                ("requests_deferred", "gauge", "Number of requests deferred.", deferred),
            ]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP llamacpp:{name} {help_text}", f"# TYPE llamacpp:{name} {kind}",
                      f"llamacpp:{name} {value!r}"]  # (repr: every digit, so a large counter still moves)
        return "\n".join(lines) + "\n"


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
