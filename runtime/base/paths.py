"""Where an output is written."""

from __future__ import annotations

import os
from pathlib import Path


def written_path(out: str | Path) -> Path:
    """Where an output named `out` is written: through a symlink, its target (as cp and
    llama.cpp's quantizer write through one), so the file lands on the disk the link points to
    and the link stays; otherwise `out` itself. A temporary file goes beside the result, and
    the rename that publishes it replaces the target, not the link."""
    return Path(os.path.realpath(out)) if os.path.islink(out) else Path(out)
