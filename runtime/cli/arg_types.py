"""The command line's argparse types: each returns the value or raises ArgumentTypeError, which
argparse turns into one line naming the flag and the value, before anything loads."""

from __future__ import annotations

import argparse
import math

from runtime.base.errors import StepstreamError
from runtime.generation.reasoning_budget import check_message


def _parse(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind: type, ok, need: str, name: str):
    def parse(text: str):
        value = _parse(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{need}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in some of its own messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "must be a positive integer", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, "must be 0 or more", "non_negative_int")
token_limit = _checked(int, lambda v: v == -1 or v >= 1,
                       "must be a positive count of tokens, or -1 for until end of text or context", "token_limit")
temperature = _checked(float, lambda v: v >= 0, "must be 0 (greedy) or more", "temperature")
top_k = _checked(int, lambda v: v >= 0, "must be 0 (off) or more", "top_k")
top_p = _checked(float, lambda v: 0 <= v <= 1, "must be in [0, 1], 1 = off, 0 = the most likely token alone", "top_p")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "must be in [0, 1]", "unit_interval")
share = _checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]", "share")
positive_float = _checked(float, lambda v: v > 0, "must be more than 0", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, "must be 0 or more", "non_negative_float")
penalty = _checked(float, lambda v: math.isfinite(v), "must be a finite number", "penalty")
chunk_count = _checked(int, lambda v: v == -1 or v >= 1, "must be a positive number of chunks, or -1 for all",
                       "chunk_count")


def mtp_choice(text: str) -> int | str:
    """--mtp: auto, or a draft length 0..3."""
    if text == "auto":
        return text
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"must be auto or a draft length 0..3, got {text}")
    return int(text)


def seed(text: str) -> int | None:
    """A random seed: 0 or more, or -1 for a random one (llama.cpp's convention)."""
    value = _parse(int, text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 0 or more, or -1 for a random seed, got {text}")
    return None if value == -1 else value


def repeat_window(text: str) -> int:
    """--repeat-last-n: 0 or more tokens, or -1 for the whole context (llama.cpp's convention)."""
    value = _parse(int, text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 0 or more, or -1 for the whole context, got {text}")
    return 2**31 - 1 if value == -1 else value  # more than any context holds


def size_arg(text: str) -> int:
    """A size flag (--max-body): 64GiB, 512MiB, 1.5GB or plain bytes; argparse names the flag in
    the error."""
    from runtime.base.units import parse_bytes

    try:
        value = parse_bytes(text)
    except StepstreamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative, got {text}")
    return value


def memory_arg(text: str) -> int:
    """A memory size flag (--ram-budget, plan's --ram and --vram): as size_arg, but a plain number
    under 1 MiB is refused rather than read as bytes (`--ram 64` means 64 GB to whoever typed it)."""
    value = size_arg(text)
    if 0 < value < 2**20 and text.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text} would be {value} bytes; give a unit, e.g. {text}GiB or {text}GB")
    return value


def gbps(text: str) -> float:
    """plan's --disk-gbps and --ram-gbps: a rate in offload.plan's range (read when a rate is
    given, so that the other commands do not import the planner)."""
    from offload.plan import GBPS_RANGE

    lo, hi = GBPS_RANGE
    value = _parse(float, text)
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be a rate in GB/s from {lo:g} to {hi:,.0f}, got {text}")
    return value


def budget_arg(text: str) -> int:
    """--ram-budget: a memory size above 0."""
    value = memory_arg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a positive size, e.g. 6GiB, got 0")
    return value


def gpu_budget_arg(text: str) -> int | str:
    """--gpu-budget: auto, or a memory size above 0."""
    return "auto" if text.strip().lower() == "auto" else budget_arg(text)


def cache_type(text: str) -> str:
    """--cache-type-k / --cache-type-v: a KV cache type, as llama.cpp names them."""
    from runtime.base.options import KV_TYPE_BYTES

    if text not in KV_TYPE_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a KV cache type; choose {', '.join(KV_TYPE_BYTES)}")
    return text


def budget_message(text: str) -> str:
    try:
        return check_message(text)
    except StepstreamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def reasoning_budget(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens, or -1 for no limit, got {text!r}") \
            from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 for no limit, got {value}")
    return value
