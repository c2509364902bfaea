"""Byte sizes as people write them."""

from __future__ import annotations

import math
import re

from runtime.base.errors import StepstreamError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40, "p": 10**15, "pb": 10**15, "pib": 2**50}
_UNITS.update({k[:-1]: v for k, v in _UNITS.items() if k.endswith("ib")})  # Kubernetes' 6Gi, 512Mi


def parse_bytes(text: str | int | float) -> int:
    """'6GiB' (or Kubernetes' '6Gi'), '512MiB', '1.5G', '800mb' or a plain number of bytes."""
    if isinstance(text, (int, float)):
        if isinstance(text, float) and not math.isfinite(text):  # int() raised ValueError / OverflowError
            raise StepstreamError(f"cannot read {text!r} as a size; give a number of bytes, or e.g. 6GiB")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m[2].lower() not in _UNITS:
        raise StepstreamError(f"cannot read {text!r} as a size; write e.g. 6GiB, 512MiB or 1.5GB")
    return int(float(m[1]) * _UNITS[m[2].lower()])
