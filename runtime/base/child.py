"""The environment of a child process that runs this project's own modules (`python -m
runtime....`, the compile helper, the benchmarks' children, the server under bench-serve).

`python -m` and `python -c` put the working directory first on sys.path, so a `quant.py`,
`runtime/`, `convert.py` or `offload.py` where the user stands shadowed the project's packages
in the child (a review found `stepstream bench-serve` failing with an ImportError from the
user's own quant.py, and the compile helper failing silently). The child gets the project's
root first on PYTHONPATH (it runs from a source checkout too) and PYTHONSAFEPATH=1, with
which Python 3.11 and later leave the working directory out (3.10 ignores it).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # holds runtime/, quant/, offload/, convert/


def child_env(base: dict | None = None, **extra: str) -> dict:
    """A copy of `base` (default: this process's environment) for a child running our modules,
    with `extra` set."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONSAFEPATH"] = "1"
    env.update(extra)
    return env
