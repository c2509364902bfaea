"""Timing greedy generation with and without MTP drafting (`stepstream bench --mtp`).

The decode rate counts the tokens after the first one over the time after it, so that the
prompt does not enter it; the median of the repetitions is reported, with the figures of the
last one: acceptance per head, tokens per verify pass, the draft length auto settled on, and,
when experts stream, the expert bytes read from disk per generated token.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime.generation import Sampler, SamplingParams
from runtime.generation.loop import generate

SOURCE = Path(__file__).resolve().parents[1] / "generation" / "sampling.py"


def text_prompt(model, n: int) -> list[int]:
    """The first n tokens of a Python source file of this package (realistic text the shipped
    miniature, trained on the standard library, has not seen)."""
    ids = model.tokenize(SOURCE.read_text(encoding="utf-8"))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _disk_bytes(model) -> int | None:
    stats = model.provider.stats
    return None if stats is None else int(stats.bytes_read)  # prefetches included


def bench_generation(model, prompt: list[int], n_gen: int, reps: int, mtp) -> dict:
    rates, info, tokens = [], {}, None
    for _ in range(reps):
        model.reset()
        info = {}
        out, first, b0 = [], None, None
        for tok in generate(model, prompt, Sampler(SamplingParams(temperature=0.0)), n_gen, stop_at_eog=False,
                            mtp=mtp, stats=info):
            out.append(tok)
            if first is None:
                first, b0 = time.perf_counter(), _disk_bytes(model)
        end, b1 = time.perf_counter(), _disk_bytes(model)
        rates.append((len(out) - 1) / (end - first) if len(out) > 1 and end > first else 0.0)
        if tokens is not None and out != tokens:
            raise AssertionError("greedy generation differed between repetitions")
        tokens = out
    return {"mtp": mtp, "n_heads": model.n_mtp, "decode_tok_s": float(np.median(rates)),
            "decode_tok_s_runs": [round(r, 3) for r in rates],
            "acceptance": info.get("acceptance"), "acceptance_estimate": info.get("acceptance_estimate"),
            "drafts_per_head": info.get("drafts_per_head"), "tokens_per_pass": info.get("tokens_per_pass", 1.0),
            "passes": info.get("passes", max(len(tokens) - 1, 0)), "draft_passes": info.get("draft_passes", 0),
            "tokens_per_draft_pass": info.get("tokens_per_draft_pass", 0.0), "settled_k": info.get("settled_k", 0),
            "disk_bytes_per_token": (b1 - b0) / max(len(tokens) - 1, 1) if b0 is not None else None,
            "tokens": tokens}
