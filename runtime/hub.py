"""Models from the Hugging Face Hub: `-hf REPO[:QUANT]` (llama.cpp's flag) on run, chat, serve,
bench and perplexity, `stepstream pull`, and `runtime.from_pretrained` (llama-cpp-python's).

The repository's GGUF files are listed, the model asked for is chosen (a quantization tag such
as Q4_K_S, a split model's parts together), the disk's free space is checked against what is
still to fetch, and the files are fetched into Hugging Face's own cache (HF_HUB_CACHE, shared
with every tool that uses it) by `huggingface_hub`, every part from the one commit: a transfer
the network cuts is taken up again within the run, and a file is renamed into place only once
whole (a run stopped by Ctrl-C leaves no partial file: the next one fetches that file again).
When the Hub cannot list the repository (no network, no answer, HF_HUB_OFFLINE, a refusal) a
model already in the cache is used as it is. A private or gated repository needs a token:
HF_TOKEN, `hf auth login`, or `-hft`.
"""

from __future__ import annotations

import fnmatch
import queue
import re
import shutil
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from runtime.base.errors import StepstreamError
from runtime.base.gguf_header import Truncated, header_end
from runtime.base.memory_limit import size_text

DEFAULTS = ("Q4_K_M", "Q8_0")  # llama.cpp's choice when no tag is given, then its first model
LIST_TIMEOUT_S = 20.0  # the listing's answer (the library sets none: a Hub that never answers hung -hf)
PROBE_TIMEOUT_S = 3.0  # a connection to the Hub's host (without a network the library retries ~20 s)
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"  # the Hub's names: no edge - or ., at most 96
_REPO = re.compile(rf"{_PART}/{_PART}")
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_NOT_MODELS = ("mmproj", "imatrix")  # vision projectors and importance matrices, also .gguf
_SIDECARS = ("mtp-", "eagle3-", "dflash-", "dspark-")  # draft models published beside a model (llama.cpp's list)


class HubError(StepstreamError, ValueError):
    """A repository, a file or a download that cannot give the model asked for (a ValueError
    too, as llama-cpp-python's from_pretrained raises)."""


@dataclass(frozen=True)
class HubModel:
    """One model of a repository: a GGUF file, or the parts of a split one."""

    name: str  # the file's path in the repository, or a split model's without its part number
    parts: tuple[str, ...]  # paths in the repository, in order
    size: int  # bytes, all parts
    complete: bool = True  # every part of a split model is in the repository
    problem: str = ""  # why the loader could not read it, when it could not


def parse_spec(text: str) -> tuple[str, str | None]:
    """`user/model[:quant]` -> (repository, quantization tag or None)."""
    repo, colon, quant = text.partition(":")
    if not _REPO.fullmatch(repo) or "--" in repo or ".." in repo:
        raise HubError(f"{text!r}: give a Hugging Face repository as user/model (letters, digits, - _ and ., at "
                       "most 96 each), with a quantization after a colon if you like (user/model:Q4_K_S)")
    if colon and not re.fullmatch(r"[A-Za-z0-9._-]+", quant):
        raise HubError(f"{text!r}: the quantization after the colon must be a tag such as Q4_K_S")
    return repo, quant or None


def models(files: dict[str, int]) -> list[HubModel]:
    """The models among a repository's files (path -> size), by name."""
    singles, splits = [], {}
    for path, size in files.items():
        base = PurePosixPath(path).name
        low = base.lower()
        if not low.endswith(".gguf") or any(w in low for w in _NOT_MODELS) or low.startswith(_SIDECARS):
            continue
        m = _SPLIT.match(base)
        if m is not None and not base.endswith(f"-{m['no']}-of-{m['count']}.gguf"):  # (-OF-, .GGUF)
            singles.append(HubModel(path, (path,), size, problem=f"{base} is a part of a split model named otherwise "
                                    "than llama.cpp names its parts (-00001-of-00003.gguf), which is how they are "
                                    "found: rename them"))
        elif m is None:
            singles.append(HubModel(path, (path,), size))
        else:
            key = (str(PurePosixPath(path).with_name(m["stem"] + base[-5:])), int(m["count"]))
            splits.setdefault(key, {})[int(m["no"])] = (path, size)
    for (name, count), parts in splits.items():
        ordered = tuple(parts[k][0] for k in sorted(parts))
        singles.append(HubModel(name, ordered, sum(s for _, s in parts.values()),
                                complete=sorted(parts) == list(range(1, count + 1))))
    return sorted(singles, key=lambda m: m.name)


def _tagged(name: str, quant: str) -> bool:
    """Whether a model's path carries the tag, not as part of a longer one (Q4_K is not Q4_K_M)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", name, re.IGNORECASE) is not None


def _named(m: HubModel, pattern: str) -> bool:
    """--hf-file / from_pretrained's filename: a path or a glob (llama-cpp-python's), in any case,
    matching the model's name, one of its parts, or their file names."""
    pattern = pattern.lower()
    return any(fnmatch.fnmatchcase(x.lower(), pattern) or fnmatch.fnmatchcase(PurePosixPath(x).name.lower(), pattern)
               for x in (m.name, *m.parts))


def choose(repo: str, files: dict[str, int], quant: str | None, file: str | None = None) -> HubModel:
    """The model that -hf REPO[:QUANT] (or --hf-file FILE) names among the repository's files.
    Without either: the Q4_K_M model, else the Q8_0 one, else the first (llama.cpp's choice).
    Of several a tag names, the one of the shortest name (Model-Q4_K_M over Model-UD-Q4_K_M)."""
    found = models(files)
    listed = ", ".join(f"{m.name} ({size_text(m.size)})" for m in found[:12]) + (" ..." if len(found) > 12 else "")
    if not found:
        raise HubError(f"{repo}: the repository holds no GGUF model file")
    if file is not None:
        exact = [m for m in found if file in (m.name, *m.parts)]
        picked = exact or [m for m in found if _named(m, file)]
        if not picked:
            raise HubError(f"{repo}: no GGUF file {file!r} (its models: {listed})")
        if len(picked) > 1:  # (a glob of several: named, as llama-cpp-python refuses it)
            raise HubError(f"{repo}: {file!r} matches {len(picked)} models ({', '.join(m.name for m in picked)}); "
                           "name one")
    elif quant is not None:
        picked = [m for m in found if _tagged(m.name, quant)]
        if not picked:
            raise HubError(f"{repo}: no model tagged {quant} (its models: {listed})")
    else:
        picked = next(([m for m in found if _tagged(m.name, q)] for q in DEFAULTS
                       if any(_tagged(m.name, q) for m in found)), found[:1])
    bad = [m for m in picked if m.problem]
    if bad:
        raise HubError(f"{repo}: {bad[0].problem}")
    shortest = min(len(m.name) for m in picked)
    if sum(len(m.name) == shortest for m in picked) > 1:
        names = ", ".join(m.name for m in picked)
        raise HubError(f"{repo}: {len(picked)} models match ({names}); name one with --hf-file")
    model = next(m for m in picked if len(m.name) == shortest)
    if not model.complete:
        raise HubError(f"{repo}: {model.name} is split in parts and some are missing from the repository "
                       f"(it has {', '.join(model.parts)})")
    return model


def _within(fn, seconds: float):
    """fn() on a thread of its own: ("ok", value), ("error", exception) or ("timeout", None)."""
    out: queue.Queue = queue.Queue()

    def call():
        try:
            out.put(("ok", fn()))
        except BaseException as e:  # (handed over: the caller decides)
            out.put(("error", e))

    threading.Thread(target=call, daemon=True, name="stepstream-hub").start()
    try:
        return out.get(timeout=seconds)
    except queue.Empty:
        return "timeout", None


def _reachable(endpoint: str) -> bool:
    """Whether the Hub's host takes a connection (through a proxy, the listing alone can say)."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return True
    kind, _ = _within(lambda: socket.create_connection((host, port), PROBE_TIMEOUT_S).close(), PROBE_TIMEOUT_S + 2)
    return kind == "ok"


def _unreachable(e: BaseException) -> bool:
    """A network that is down or a host that does not answer, in any of the HTTP libraries'
    types (httpx's are no OSErrors)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException",
                                                   "OfflineModeIsEnabled"})


def _token_hint(repo: str, what: str) -> HubError:
    return HubError(f"{repo}: {what}; accept its terms on huggingface.co if it is gated, and give a token (HF_TOKEN, "
                    "`hf auth login`, or -hft TOKEN)")


def _listing(repo: str, token: str | None) -> tuple[dict | None, HubError | None, str]:
    """(path -> (size, sha256 or None), None, "") from the Hub; or (None, the error to give when
    the cache cannot stand in, or None, why the Hub was not used)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    if constants.HF_HUB_OFFLINE:
        return None, None, "HF_HUB_OFFLINE is set"
    if not _reachable(constants.ENDPOINT):
        return None, None, f"{constants.ENDPOINT} cannot be reached"

    def tree():
        return {f.path: (f.size, getattr(f.lfs, "sha256", None)) for f in HfApi(token=token).list_repo_tree(
            repo, recursive=True) if isinstance(f, RepoFile)}

    kind, value = _within(tree, LIST_TIMEOUT_S)
    if kind == "ok":
        return value, None, ""
    if kind == "timeout":
        return None, None, f"{constants.ENDPOINT} did not list the repository within {LIST_TIMEOUT_S:.0f} s"
    e = value
    if isinstance(e, KeyboardInterrupt):
        raise e
    if isinstance(e, GatedRepoError):
        return None, _token_hint(repo, "a gated repository"), "the Hub refused the listing"
    if isinstance(e, RepositoryNotFoundError):
        return None, HubError(f"{repo}: no such repository on Hugging Face (a private one needs a token: HF_TOKEN, "
                              "`hf auth login`, or -hft TOKEN)"), "the Hub knows no such repository"
    if isinstance(e, RevisionNotFoundError):
        return None, HubError(f"{repo}: the repository has no main branch"), "the repository has no main branch"
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return None, _token_hint(repo, f"the Hub refused the listing ({status})"), f"the Hub answered {status}"
        return None, HubError(f"{repo}: the Hub refused the listing ({status})"), f"the Hub answered {status}"
    if isinstance(e, ValueError):  # (JSON that is not there: a captive portal's or a proxy's login page)
        return None, HubError(f"{repo}: {constants.ENDPOINT} answered with something other than a listing (a "
                              "network's login page?)"), "the Hub's answer was no listing"
    if _unreachable(e):
        return None, None, f"{constants.ENDPOINT} cannot be reached"
    return None, HubError(f"{repo}: listing the repository failed: {type(e).__name__}: {_first_line(e)}"), \
        "the listing failed"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _repo_dir(repo: str, cache_dir) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def _snapshots(repo: str, cache_dir) -> list[Path]:
    """The repository's snapshots in the cache: main's first, then the newest."""
    root = _repo_dir(repo, cache_dir)
    try:
        main = (root / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    try:
        snaps = [p for p in (root / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(snaps, key=lambda p: (p.name != main, -p.stat().st_mtime))


def _from_cache(repo: str, quant, file, cache_dir) -> tuple[HubModel, Path] | None:
    """The model as a snapshot in the cache holds it whole (all its parts in the one snapshot)."""
    for snap in _snapshots(repo, cache_dir):
        files = {p.relative_to(snap).as_posix(): p.stat().st_size for p in snap.rglob("*") if p.is_file()}
        try:
            model = choose(repo, files, quant, file)
        except HubError:
            continue
        return model, snap / model.parts[0]
    return None


def fetch(spec: str, file: str | None = None, say=print, token: str | None = None, cache_dir=None) -> Path:
    """The local path of the model `spec` (user/model[:quant]) names, fetched into the cache as
    needed (a split model: its first part, beside the others). `say` reports what happens."""
    repo, quant = parse_spec(spec)
    listed, error, why = _listing(repo, token)
    if listed is None:
        cached = _from_cache(repo, quant, file, cache_dir)
        if cached is None:
            if error is not None:
                raise error
            raise HubError(f"{repo}: {why}, and the cache ({_repo_dir(repo, cache_dir).parent}) holds no such model "
                           "of it")
        model, path = cached
        say(f"{repo}: {model.name} ({size_text(model.size)}) from the cache ({why})")
        return path
    model = choose(repo, {p: size for p, (size, _) in listed.items()}, quant, file)
    blobs = _repo_dir(repo, cache_dir) / "blobs"
    missing = [p for p in model.parts if listed[p][1] is None or not (blobs / listed[p][1]).is_file()]
    need = sum(listed[p][0] for p in missing)
    if need:
        cache = _repo_dir(repo, cache_dir).parent
        try:
            cache.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(cache).free
        except OSError as e:
            raise HubError(f"{repo}: the cache directory {cache} cannot be used: {e.strerror or e}") from None
        if need > free:
            raise HubError(f"{repo}: {model.name} needs {size_text(need)} more on disk, and {cache} has "
                           f"{size_text(free)} free (set HF_HUB_CACHE to a directory on a larger disk)")
        say(f"{repo}: fetching {model.name} ({size_text(need)} of {size_text(model.size)}) into {cache}")
    else:
        say(f"{repo}: {model.name} ({size_text(model.size)}) from the cache")
    paths, revision = [], "main"
    for p in model.parts:  # each checked against the Hub: a file changed there is fetched again
        path = _download(repo, p, revision, token, cache_dir)
        # the later parts from the first one's commit: one that lands meanwhile does not split them
        revision = path.parents[len(PurePosixPath(p).parts) - 1].name
        paths.append(path)
    return paths[0]


HEADER_READ = 1 << 20  # the first read of a header; each further one three times what came (the real model's: ~6 MB)
MAX_HEADER = 256 << 20  # a header past this is no model's (the real model's is ~6 MB): refused, not read on
HEADER_DEADLINE_S = 120.0  # all of a model's header reads (a server that trickles bytes does not hang plan)


def fetch_header(spec: str, file: str | None, into: Path, say=print, token: str | None = None) -> Path:
    """The model `spec` names as `plan` reads it, without fetching it: in directory `into`, each
    part's stand-in of its real size holding its header as the Hub has it and a hole for the rest
    (sparse: no disk taken), named as the Hub cache names its files (a file named by its sha256,
    which a profile records, under a link of the part's name); its first part's path returned.
    A model whole in the cache is read from there, and so it is when the Hub cannot list the
    repository."""
    repo, quant = parse_spec(spec)
    listed, error, why = _listing(repo, token)
    if listed is not None:
        model = choose(repo, {p: size for p, (size, _) in listed.items()}, quant, file)
        blobs = _repo_dir(repo, None) / "blobs"
        whole = all(listed[p][1] and (blobs / listed[p][1]).is_file() for p in model.parts)
        cached = _from_cache(repo, None, model.name, None) if whole else None
        if cached is not None and cached[0].parts == model.parts:
            say(f"{repo}: {model.name} ({size_text(model.size)}) from the cache")
            return cached[1]
    else:
        cached = _from_cache(repo, quant, file, None)
        if cached is None:
            if error is not None:
                raise error
            raise HubError(f"{repo}: {why}, and the cache holds no such model of it to plan for")
        say(f"{repo}: {cached[0].name} from the cache ({why})")
        return cached[1]
    import time

    deadline = time.monotonic() + HEADER_DEADLINE_S
    revision, read = "main", 0
    for p in model.parts:
        got, size, want = bytearray(), listed[p][0], min(listed[p][0], HEADER_READ)
        while True:
            size, revision = _read_range(repo, p, revision, want, token, got, deadline, size)
            try:
                end = header_end(got, Path(p), size)
                break
            except Truncated:
                if len(got) >= min(size, MAX_HEADER):
                    raise HubError(f"{repo}: {p}'s GGUF header goes on past "
                                   f"{size_text(len(got))}" + (" (no model's is that long)" if len(got) < size else
                                                               ", to the end of the file")) from None
                want = min(size, MAX_HEADER, len(got) + 3 * len(got))
        read += len(got)
        _stand_in(into, PurePosixPath(p).name, listed[p][1], bytes(got[:end]), size)
    say(f"{repo}: {model.name} ({size_text(model.size)}), read {size_text(read)} of it: its header"
        + ("s" if len(model.parts) > 1 else ""))
    return into / PurePosixPath(model.parts[0]).name


def _stand_in(into: Path, name: str, sha256: str | None, header: bytes, size: int) -> None:
    target = into / (sha256 or name)
    try:
        with open(target, "wb") as f:
            f.write(header)
            f.truncate(size)
        if sha256:
            (into / name).symlink_to(target.name)
    except OSError as e:
        raise HubError(f"the header of {name} cannot be kept in {into} for the plan: {e.strerror or e}") from None


def _read_range(repo: str, path: str, revision: str, stop: int, token, into: bytearray, deadline: float,
                size: int) -> tuple[int, str]:
    """Append the file's bytes from len(into) to stop - 1, at that revision, to `into` (a server
    may send fewer: the rest is asked for again); returns the file's size (as the answer's
    Content-Range says it, else `size`) and the commit the bytes are from."""
    import time

    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    commit = revision
    while len(into) < stop:
        if time.monotonic() > deadline:
            raise HubError(f"{repo}: reading the header of {path} took over {HEADER_DEADLINE_S:.0f} s")
        headers = build_hf_headers(token=token)
        headers["Range"] = f"bytes={len(into)}-{stop - 1}"
        before = len(into)
        try:
            with get_session().stream("GET", hf_hub_url(repo, path, revision=revision), headers=headers,
                                      follow_redirects=True, timeout=LIST_TIMEOUT_S) as r:
                if r.status_code in (401, 403):
                    raise _token_hint(repo, f"the Hub refused {path} ({r.status_code})")
                if r.status_code not in (200, 206):
                    raise HubError(f"{repo}: reading the header of {path} failed: the Hub answered {r.status_code}")
                first = r.history[0] if r.history else r  # (the Hub's answer; a redirect's target is a CDN's)
                commit = first.headers.get("X-Repo-Commit") or commit
                total = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
                if total:
                    size = int(total[1])
                if r.status_code == 200 and before:  # (a server that ignores Range: from byte 0 again)
                    raise HubError(f"{repo}: the Hub sent {path} whole where a range was asked for")
                for chunk in r.iter_bytes():
                    into += chunk[: stop - len(into)]
                    if len(into) >= stop or time.monotonic() > deadline:
                        break
        except HubError:
            raise
        except Exception as e:
            raise HubError(f"{repo}: reading the header of {path} failed: "
                           f"{getattr(e, 'strerror', None) or _first_line(e)}") from None
        if len(into) == before:
            raise HubError(f"{repo}: reading the header of {path} failed: the Hub sent no bytes of it")
        revision = commit
    return size, commit


def _download(repo: str, path: str, revision: str, token, cache_dir) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:
        return Path(hf_hub_download(repo, path, revision=revision, token=token, cache_dir=cache_dir))
    except GatedRepoError:
        raise _token_hint(repo, f"the Hub refused {path} (a gated repository)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise _token_hint(repo, f"the Hub refused {path} ({status})") from None
        raise HubError(f"{repo}: fetching {path} failed: {_first_line(e)} (the files already fetched stay in the "
                       "cache: run it again)") from None
    except Exception as e:  # the network, the disk, Xet's transfers (RuntimeError): one line, never a traceback
        why = getattr(e, "strerror", None) or _first_line(e)
        raise HubError(f"{repo}: fetching {path} failed: {why} (the files already fetched stay in the cache: run it "
                       "again)") from None

