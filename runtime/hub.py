"""Models from the Hugging Face Hub: `-hf REPO[:QUANT]` (llama.cpp's flag) on run, chat, serve,
bench and perplexity, and `stepstream pull`.

The repository's GGUF files are listed, the model asked for is chosen (a quantization tag such
as Q4_K_S, a split model's parts together), the disk's free space is checked against what is
still to fetch, and the files are fetched into Hugging Face's own cache (HF_HOME, shared with
every tool that uses it) by `huggingface_hub` (a dependency of `tokenizers`): a transfer the
network cuts is taken up again within the run, and a file is renamed into place only once
whole (an interrupted run leaves no partial file: the next one fetches that file again). A
model already in the cache is used without a network (or with HF_HUB_OFFLINE=1). A private or
gated repository needs a token: HF_TOKEN, or `hf auth login`.
"""

from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text

DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's, when -hf names none
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_NOT_MODELS = ("mmproj", "imatrix")  # vision projectors and importance matrices, also .gguf


class HubError(StepstreamError):
    """A repository, a file or a download that cannot give the model asked for."""


@dataclass(frozen=True)
class HubModel:
    """One model of a repository: a GGUF file, or the parts of a split one."""

    name: str  # the file's path in the repository, or a split model's without its part number
    parts: tuple[str, ...]  # paths in the repository, in order
    size: int  # bytes, all parts
    complete: bool = True  # every part of a split model is in the repository


def parse_spec(text: str) -> tuple[str, str | None]:
    """`user/model[:quant]` -> (repository, quantization tag or None)."""
    repo, _, quant = text.partition(":")
    if not _REPO.fullmatch(repo) or ".." in repo:
        raise HubError(f"-hf {text!r}: give a Hugging Face repository as user/model, with a quantization after a "
                       "colon if you like (user/model:Q4_K_S)")
    if _ and not re.fullmatch(r"[A-Za-z0-9._-]+", quant):
        raise HubError(f"-hf {text!r}: the quantization after the colon must be a tag such as Q4_K_S")
    return repo, quant or None


def models(files: dict[str, int]) -> list[HubModel]:
    """The models among a repository's files (path -> size), by name."""
    singles, splits = [], {}
    for path, size in files.items():
        base = PurePosixPath(path).name
        if not base.lower().endswith(".gguf") or any(w in base.lower() for w in _NOT_MODELS):
            continue
        m = _SPLIT.match(base)
        if m is None:
            singles.append(HubModel(path, (path,), size))
        else:
            key = (str(PurePosixPath(path).with_name(m["stem"] + ".gguf")), int(m["count"]))
            splits.setdefault(key, {})[int(m["no"])] = (path, size)
    for (name, count), parts in splits.items():
        ordered = tuple(parts[k][0] for k in sorted(parts))
        singles.append(HubModel(name, ordered, sum(s for _, s in parts.values()),
                                complete=sorted(parts) == list(range(1, count + 1))))
    return sorted(singles, key=lambda m: m.name)


def _tagged(name: str, quant: str) -> bool:
    """Whether a model's path carries the tag, not as part of a longer one (Q4_K is not Q4_K_M)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", name, re.IGNORECASE) is not None


def choose(repo: str, files: dict[str, int], quant: str | None, file: str | None = None) -> HubModel:
    """The model that -hf REPO[:QUANT] (or --hf-file FILE) names among the repository's files."""
    found = models(files)
    listed = ", ".join(f"{m.name} ({size_text(m.size)})" for m in found[:12]) + (" ..." if len(found) > 12 else "")
    if not found:
        raise HubError(f"{repo}: the repository holds no GGUF model file")
    if file is not None:
        picked = [m for m in found if file == m.name or file in m.parts]
        if not picked:
            raise HubError(f"{repo}: no GGUF file {file!r} (its models: {listed})")
    elif quant is not None:
        picked = [m for m in found if _tagged(m.name, quant)]
        if not picked:
            raise HubError(f"{repo}: no model tagged {quant} (its models: {listed})")
    else:
        picked = [m for m in found if _tagged(m.name, DEFAULT_QUANT)] or (found if len(found) == 1 else [])
        if not picked:
            raise HubError(f"{repo}: holds several models and none is {DEFAULT_QUANT}; name one after a colon "
                           f"(-hf {repo}:TAG) or with --hf-file (its models: {listed})")
    if len(picked) > 1:
        names = ", ".join(m.name for m in picked)
        raise HubError(f"{repo}: {len(picked)} models match ({names}); name one with --hf-file")
    model = picked[0]
    if not model.complete:
        raise HubError(f"{repo}: {model.name} is split in parts and some are missing from the repository "
                       f"(it has {', '.join(model.parts)})")
    return model


def _listing(repo: str) -> dict[str, int] | None:
    """The repository's files and sizes, or None without a network (or offline)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        return None
    try:
        return {f.path: f.size for f in HfApi().list_repo_tree(repo, recursive=True) if isinstance(f, RepoFile)}
    except GatedRepoError:
        raise HubError(f"{repo}: a gated repository; accept its terms on huggingface.co and give a token "
                       "(HF_TOKEN, or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo}: no such repository on Hugging Face (a private one needs a token: HF_TOKEN, or "
                       "`hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: the repository has no main branch") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status < 500:
            raise HubError(f"{repo}: Hugging Face refused the listing ({status})") from None
        return None  # the Hub is down: what the cache holds may do
    except Exception as e:
        if _unreachable(e):
            return None
        raise


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the Hub's host takes a connection: without a network, the library would retry
    for some 20 s before the cache is used."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _unreachable(e: BaseException) -> bool:
    """A network that is down or a host that does not answer, in any of the HTTP libraries'
    types (httpx's are no OSErrors)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException",
                                                   "OfflineModeIsEnabled"})


def _cached(repo: str) -> dict[str, int]:
    """The files of the repository's newest snapshot in the cache, whole ones only."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    try:
        commit = (root / "refs" / "main").read_text().strip()
    except OSError:
        return {}
    snapshot = root / "snapshots" / commit
    return {p.relative_to(snapshot).as_posix(): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()}


def fetch(spec: str, file: str | None = None, say=print) -> Path:
    """The local path of the model `spec` (user/model[:quant]) names, fetched into the cache as
    needed (a split model: its first part, beside the others). `say` reports what happens."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, quant = parse_spec(spec)
    listed = _listing(repo)
    offline = listed is None
    files = _cached(repo) if offline else listed
    if offline and not files:
        raise HubError(f"{repo}: Hugging Face cannot be reached and the cache ({constants.HF_HUB_CACHE}) holds "
                       "nothing of it")
    model = choose(repo, files, quant, file)
    local = {p: try_to_load_from_cache(repo, p) for p in model.parts}
    missing = [p for p, at in local.items() if not isinstance(at, str)]
    if offline:
        if missing:
            raise HubError(f"{repo}: Hugging Face cannot be reached and the cache holds only part of {model.name}")
        say(f"{repo}: {model.name} ({size_text(model.size)}) from the cache (Hugging Face cannot be reached)")
        return Path(local[model.parts[0]])
    need = sum(files[p] for p in missing)
    if missing:
        cache = Path(constants.HF_HUB_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if need > free:
            raise HubError(f"{repo}: {model.name} needs {size_text(need)} more on disk, and {cache} has "
                           f"{size_text(free)} free (point HF_HOME at a larger disk)")
        say(f"{repo}: fetching {model.name} ({size_text(need)} of {size_text(model.size)}) into {cache}")
    else:
        say(f"{repo}: {model.name} ({size_text(model.size)}) from the cache")
    from huggingface_hub.errors import HfHubHTTPError

    paths = []
    for p in model.parts:  # each checked against the Hub (a file changed there is fetched again)
        try:
            paths.append(Path(hf_hub_download(repo, p)))
        except HfHubHTTPError as e:
            raise HubError(f"{repo}: fetching {p} failed: {str(e).splitlines()[0]} (the files already fetched "
                           "stay in the cache: run it again)") from None
        except Exception as e:
            if not _unreachable(e):
                raise
            raise HubError(f"{repo}: fetching {p} failed: {getattr(e, 'strerror', None) or e} (the files already "
                           "fetched stay in the cache: run it again)") from None
    return paths[0]
