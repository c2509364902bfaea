"""What a training run may choose, without importing PyTorch (the command line's defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 500
    batch: int = 16
    seq: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    mtp_weight: float = 0.3
    mtp_every: int = 4  # MTP heads score every 4th position in training (evaluation scores all)
    bias_rate: float = 1e-3  # router-bias balancing step
    seed: int = 0
    threads: int = 2
    max_corpus_bytes: int = 40_000_000
