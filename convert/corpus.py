"""The offline training corpus: the Python standard library's sources on this machine.

Files are taken in sorted path order, so the same Python installation gives the same
corpus; every HELDOUT_EVERY-th file is held out for evaluation.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from runtime.base.errors import StepstreamError

HELDOUT_EVERY = 20
MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. "
    "日本語のテキストも正しく分割されるべきです。東京は日本の首都です。"
    "Ünïcödé àccents, émojis 🙂 and numbers 1234567890. "
    "Привет, мир! Γειά σου κόσμε. 你好，世界。\n"
)


def stdlib_files(recursive: bool = False) -> list[Path]:
    """The standard library's Python sources on this machine, sorted by path (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = root.rglob("*.py") if recursive else root.glob("*.py")
    return sorted(p for p in files if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Python sources of the standard library's top folder, sorted by path, up to max_bytes."""
    texts, total = [MULTILINGUAL * 20], 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def split_corpus(max_bytes: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts), up to max_bytes in all."""
    train, heldout, total = [], [], 0
    for k, path in enumerate(stdlib_files(recursive=True)):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (heldout if k % HELDOUT_EVERY == 0 else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not train or not heldout:
        raise StepstreamError("no Python standard library sources found to train on")
    return train, heldout


def heldout_files() -> list[Path]:
    """The files `split_corpus` holds out."""
    return stdlib_files(recursive=True)[::HELDOUT_EVERY]
