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


def golden_inputs() -> list[np.ndarray]:
    """Gaussian, heavy-tailed and shifted rows, and rows of degenerate sub-blocks (zero, constant,
    one-signed, -0.0, tiny, integer-valued)."""
    rng = np.random.default_rng(2024)
    g = (0.02 * rng.standard_normal((48, 1024))).astype(np.float32)
    t = (0.01 * rng.standard_t(3, (48, 512))).astype(np.float32)
    s = (0.01 * rng.laplace(0.5, 1.0, (48, 768))).astype(np.float32)
    e = rng.standard_normal((48, 256)).astype(np.float32)
    e[:, :32] = 0.0
    e[:, 32:64] = 1.5
    e[:, 64:96] = -np.abs(e[:, 64:96])
    e[:, 96:128] = np.abs(e[:, 96:128])
    e[::3, 128:160] = -0.0
    e[1::4] *= np.float32(1e-6)
    e[2::5] = np.round(e[2::5] * 4)
    e[3::7] = 0.0
    return [g, t, s, e]
