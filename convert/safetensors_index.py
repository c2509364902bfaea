"""model.safetensors.index.json: which shard holds each tensor, checked before any shard is opened.

The index is input from anywhere too. Its shard names must stay inside the checkpoint
directory: a name with a `..` component, an absolute path or a drive is refused, so a hostile
index cannot make the converter read another file on the machine. (A shard that is itself a
symbolic link, as in the Hugging Face cache, is fine: the name is what the index controls.)
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from runtime.base.errors import StepstreamError


def _shard_name_problem(shard: str) -> str | None:
    if not shard or "\0" in shard:
        return "is empty or holds a NUL byte"
    if PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive:
        return "is an absolute path"
    if ".." in PurePosixPath(shard.replace("\\", "/")).parts:
        return "climbs out of the checkpoint directory with '..'"
    return None


def read_index(index_path: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), every shard name a path inside the directory."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise StepstreamError(f"{index_path}: not a valid safetensors index (not UTF-8: {e.reason})") from None
    except RecursionError:
        raise StepstreamError(f"{index_path}: not a valid safetensors index (JSON nested too deeply)") from None
    except ValueError as e:
        raise StepstreamError(f"{index_path}: not a valid safetensors index ({e})") from None
    except OSError as e:
        raise StepstreamError(f"{index_path}: cannot read ({e.strerror or e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise StepstreamError(f"{index_path}: not a valid safetensors index (no \"weight_map\" object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise StepstreamError(f"{index_path}: tensor {name!r} is mapped to {shard!r}, not a shard file name")
        problem = _shard_name_problem(shard)
        if problem:
            raise StepstreamError(f"{index_path}: shard name {shard!r} for tensor {name!r} {problem}; "
                                  "shard names must be files inside the checkpoint directory")
    return weight_map
