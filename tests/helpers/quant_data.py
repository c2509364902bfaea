"""Test weight rows for the quant tests: gaussian, heavy-tailed and with outliers."""

from __future__ import annotations

import numpy as np


def weight_sets(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Named float32 [rows, cols] matrices with the value distributions real checkpoints show."""
    rng = np.random.default_rng(seed)
    outlier = rng.random((rows, cols)) < 0.002
    return {
        "gaussian": (0.02 * rng.standard_normal((rows, cols))).astype(np.float32),
        "heavy_tailed": (0.01 * rng.standard_t(3, (rows, cols))).astype(np.float32),
        "outliers": (0.02 * rng.standard_normal((rows, cols)) * np.where(outlier, 40.0, 1.0)).astype(np.float32),
        "shifted": (0.01 * rng.laplace(0.5, 1.0, (rows, cols))).astype(np.float32),
    }


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))
