"""Models from Hugging Face: `-hf USER/MODEL[:QUANT]` and `stepstream pull`, run by the real
`huggingface_hub` against a Hub on 127.0.0.1 (tests/helpers/fake_hub.py, through HF_ENDPOINT),
in a cache of the test's own (HF_HOME): the file a tag names among a repository's (its split
parts together), the text `run -hf` gives against `run -m` on the same file, a fetch stopped
midway that goes on from where it stopped, a cache used without a network, and the refusals
(no such repository, tag or file, a split model missing a part, a disk too small), each one
line and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.hub import HubError, choose, models, parse_spec
from tests.helpers.fake_hub import COMMIT, fake_hub
from tests.helpers.gguf_edit import rewrite

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
RUN = ["-p", "def parse(line):", "-n", "12", "--temp", "0", "-t", "1"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """A repository as people publish them: several quantizations (the mini file under each
    tag), one split in parts in a folder, a vision projector and an importance matrix beside them."""
    d = tmp_path_factory.mktemp("hub")
    rewrite(MODEL, d / "split.gguf", split_max_tensors=40)
    parts = sorted(d.glob("split-*-of-*.gguf"))
    assert len(parts) >= 2
    mini = MODEL.read_bytes()
    files = {"README.md": b"# Mini\n", "Mini-Q4_K_M.gguf": mini, "Mini-Q8_0.gguf": mini,
             "mmproj-Mini-F16.gguf": b"not a model", "Mini.imatrix.gguf": b"not a model"}
    n = len(parts)
    files.update({f"Q4_K_S/Mini-Q4_K_S-{k:05d}-of-{n:05d}.gguf": p.read_bytes() for k, p in enumerate(parts, 1)})
    broken = {"Mini-IQ2_XS-00001-of-00002.gguf": parts[0].read_bytes(), "Mini-BF16.gguf": mini}
    return {"acme/Mini-GGUF": files, "acme/Broken-GGUF": broken}


@pytest.fixture(scope="module")
def want():
    """`run -m` on the file itself: what `run -hf` must print."""
    got = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "-m", str(MODEL), *RUN], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert got.returncode == 0, got.stderr
    return got


def cli(url: str, home: Path, *args: str, wrap: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env.pop("HF_HUB_OFFLINE", None)
    code = f"import sys\n{wrap}\nfrom runtime.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_specs_and_choices():
    assert parse_spec("acme/Mini-GGUF:q4_k_s") == ("acme/Mini-GGUF", "q4_k_s")
    assert parse_spec("acme/Mini-GGUF") == ("acme/Mini-GGUF", None)
    for bad in ("Mini-GGUF", "acme/Mini/GGUF", "acme/../x", "acme/Mini-GGUF:Q4 K", "/Mini", "acme/m--x", "acme/m-",
                "acme/m.", "acme/" + "m" * 97):  # (the Hub's own rules: huggingface_hub raised on the last four)
        with pytest.raises(HubError):
            parse_spec(bad)
    files = {"a/M-Q4_K-00002-of-00002.gguf": 5, "a/M-Q4_K-00001-of-00002.gguf": 7, "M-Q4_K_M.gguf": 3,
             "M-UD-Q4_K_XL.gguf": 4, "M-IQ4_XS.gguf": 2, "mmproj-F16.gguf": 1, "notes.txt": 1}
    found = {m.name: m for m in models(files)}
    assert set(found) == {"a/M-Q4_K.gguf", "M-Q4_K_M.gguf", "M-UD-Q4_K_XL.gguf", "M-IQ4_XS.gguf"}
    assert found["a/M-Q4_K.gguf"].parts == ("a/M-Q4_K-00001-of-00002.gguf", "a/M-Q4_K-00002-of-00002.gguf")
    assert found["a/M-Q4_K.gguf"].size == 12
    # a tag is matched whole and in any case: Q4_K is not Q4_K_M nor UD-Q4_K_XL, IQ4_XS is not Q4_XS
    assert choose("r", files, "q4_k", None).name == "a/M-Q4_K.gguf"
    assert choose("r", files, "Q4_K_M", None).name == "M-Q4_K_M.gguf"
    assert choose("r", files, None, None).name == "M-Q4_K_M.gguf"  # llama.cpp's default
    assert choose("r", files, "UD-Q4_K_XL", None).name == "M-UD-Q4_K_XL.gguf"
    with pytest.raises(HubError, match="no model tagged Q4_XS"):
        choose("r", files, "Q4_XS", None)
    assert choose("r", files, None, "a/M-Q4_K-00002-of-00002.gguf").name == "a/M-Q4_K.gguf"  # a part: its model
    assert choose("r", files, None, "*q4_k_m.GGUF").name == "M-Q4_K_M.gguf"  # a glob, in any case (llama-cpp-python's)
    assert choose("r", files, None, "m-iq4_xs.gguf").name == "M-IQ4_XS.gguf"
    # without a tag, llama.cpp's choice: Q4_K_M, else Q8_0, else the first model
    assert choose("r", {"only.gguf": 9}, None, None).name == "only.gguf"
    assert choose("r", {"a-F16.gguf": 2, "a-Q8_0.gguf": 1}, None, None).name == "a-Q8_0.gguf"
    assert choose("r", {"b-F16.gguf": 2, "a-BF16.gguf": 1}, None, None).name == "a-BF16.gguf"
    # of several models a tag names, the one of the shortest name; of equals, none
    assert choose("r", {"M-UD-Q4_K_M.gguf": 1, "M-Q4_K_M.gguf": 2}, None, None).name == "M-Q4_K_M.gguf"
    assert choose("r", {"m-q4_k_m-imat.gguf": 1, "m-q4_k_m.gguf": 2}, "Q4_K_M", None).name == "m-q4_k_m.gguf"
    with pytest.raises(HubError, match="2 models match"):
        choose("r", {"a-Q8_0.gguf": 1, "b-Q8_0.gguf": 2}, "Q8_0", None)
    # draft models published beside one are no models of it; a split whose parts the loader cannot
    # find by their names (-OF-, .GGUF) is refused before a byte is fetched
    assert [m.name for m in models({"mtp-M.gguf": 1, "eagle3-M.gguf": 1, "M.gguf": 1})] == ["M.gguf"]
    with pytest.raises(HubError, match="named otherwise than llama.cpp names its parts"):
        choose("r", {"M-Q4_K-00001-OF-00002.GGUF": 1, "M-Q4_K-00002-OF-00002.GGUF": 1}, "Q4_K", None)
    # a glob of several models is refused (llama-cpp-python's from_pretrained refuses it)
    with pytest.raises(HubError, match="matches 2 models"):
        choose("r", {"a-Q8_0.gguf": 1, "a-F16.gguf": 2}, None, "*.gguf")


def test_run_hf_is_run_m_on_the_file_it_fetches_then_the_cache(repos, tmp_path, want):
    home = tmp_path / "hf"
    with fake_hub(repos) as (hub, url):
        got = cli(url, home, "run", "-hf", "acme/Mini-GGUF:q8_0", *RUN)
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout
        assert "acme/Mini-GGUF: fetching Mini-Q8_0.gguf (13 MiB of 13 MiB)" in got.stderr
        assert hub.sent == MODEL.stat().st_size
        again = cli(url, home, "pull", "acme/Mini-GGUF:Q8_0")
        assert again.returncode == 0, again.stderr
        assert "Mini-Q8_0.gguf (13 MiB) from the cache" in again.stderr and hub.sent == MODEL.stat().st_size
        path = Path(again.stdout.strip())
        assert path == home / "hub" / "models--acme--Mini-GGUF" / "snapshots" / COMMIT / "Mini-Q8_0.gguf"
        assert path.read_bytes() == MODEL.read_bytes()
    # without the Hub (nothing listens there now), the cache is used as it is, at once
    t = time.monotonic()
    offline = cli(url, home, "run", "-hf", "acme/Mini-GGUF:Q8_0", *RUN)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == want.stdout and f"from the cache ({url} cannot be reached)" in offline.stderr
    assert time.monotonic() - t < 15, offline.stderr
    missing = cli(url, home, "pull", "acme/Mini-GGUF:Q4_K_M")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        f"error: acme/Mini-GGUF: {url} cannot be reached, and the cache ({home / 'hub'}) holds no such model of it")


def test_a_split_model_is_fetched_whole_and_loads(repos, tmp_path, want):
    with fake_hub(repos) as (hub, url):
        got = cli(url, tmp_path / "hf", "run", "-hf", "acme/Mini-GGUF:Q4_K_S", *RUN)
        assert got.returncode == 0, got.stderr
        n = sum(1 for p in repos["acme/Mini-GGUF"] if p.startswith("Q4_K_S/"))
        assert "fetching Q4_K_S/Mini-Q4_K_S.gguf" in got.stderr
        assert hub.sent == sum(len(b) for p, b in repos["acme/Mini-GGUF"].items() if p.startswith("Q4_K_S/"))
        snapshot = tmp_path / "hf" / "hub" / "models--acme--Mini-GGUF" / "snapshots" / COMMIT / "Q4_K_S"
        assert len(list(snapshot.glob(f"Mini-Q4_K_S-*-of-{n:05d}.gguf"))) == n
    assert got.stdout == want.stdout  # (the split copy holds the same tensors)


def test_a_fetch_cut_midway_is_retried_and_one_stopped_leaves_nothing_behind(repos, tmp_path):
    """A transfer the network cuts is taken up again in the same run, from the last 10 MiB the
    library wrote; Ctrl-C stops a fetch at once, with exit status 130, and leaves no partial file
    in the cache (huggingface_hub 2.x keeps none between runs): the next run fetches the file
    whole, and it is the file."""
    home = tmp_path / "hf"
    size = MODEL.stat().st_size
    with fake_hub(repos) as (hub, url):
        hub.cut_after = 11 * 2**20  # the connection drops after 11 MiB
        got = cli(url, home, "pull", "acme/Mini-GGUF:Q8_0")
        assert got.returncode == 0, got.stderr
        assert hub.starts == [0, 10 * 2**20] and hub.sent == 11 * 2**20 + size - 10 * 2**20
        assert Path(got.stdout.strip()).read_bytes() == MODEL.read_bytes()
    home = tmp_path / "hf2"
    with fake_hub(repos) as (hub, url):
        hub.stall_after = 12_000_000  # then the transfer hangs
        env = dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "pull", "acme/Mini-GGUF:Q8_0"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        blobs = home / "hub" / "models--acme--Mini-GGUF" / "blobs"
        deadline = time.monotonic() + 60
        while not (blobs.exists() and any(p.stat().st_size >= 10 * 2**20 for p in blobs.glob("*.incomplete"))):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and err.strip().endswith("interrupted") and not out, err
        assert list(blobs.iterdir()) == [] or all(p.suffix == ".lock" for p in blobs.iterdir())
        hub.stall_after = None
        hub.release.set()
        again = cli(url, home, "pull", "acme/Mini-GGUF:Q8_0")
        assert again.returncode == 0, again.stderr
        assert Path(again.stdout.strip()).read_bytes() == MODEL.read_bytes()


REFUSALS = [
    (["pull", "acme/Nothing"], "error: acme/Nothing: no such repository on Hugging Face (a private one needs a "
                               "token: HF_TOKEN, `hf auth login`, or -hft TOKEN)"),
    (["pull", "acme/Mini-GGUF:Q2_K"], "error: acme/Mini-GGUF: no model tagged Q2_K (its models: "),
    (["pull", "acme/Mini-GGUF", "--hf-file", "Mini-Q5_0.gguf"], "error: acme/Mini-GGUF: no GGUF file 'Mini-Q5_0.gguf'"),
    (["pull", "acme/Broken-GGUF:IQ2_XS"], "error: acme/Broken-GGUF: Mini-IQ2_XS.gguf is split in parts and some are "
                                          "missing from the repository (it has Mini-IQ2_XS-00001-of-00002.gguf)"),
    (["pull", "Mini-GGUF"], "error: 'Mini-GGUF': give a Hugging Face repository as user/model"),
    (["run", "--hf-file", "Mini-Q8_0.gguf", "-m", str(MODEL)], "error: --hf-file goes with -hf (a model on Hugging "
                                                              "Face): give -hf too"),
    (["run", "-hft", "secret", "-m", str(MODEL)], "error: --hf-token goes with -hf"),
    (["run", "-hf", "acme/Mini-GGUF", "-m", str(MODEL)], "argument -m/--model: not allowed with argument -hf/-hfr/--hf-repo"),
]


def test_refusals_are_one_line(repos, tmp_path):
    """Each refusal is one line on stderr and exit status 2, before a byte is fetched (the
    commands run in one process, one after another, as `main` runs them)."""
    import json

    runner = ("import contextlib, io, json\n"
              "out = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        try:\n"
              "            code = main(argv)\n"
              "        except SystemExit as e:\n"
              "            code = e.code\n"
              "    out.append((code, err.getvalue()))\n"
              "print(json.dumps(out))\n"
              "sys.exit(0)\n")
    with fake_hub(repos) as (hub, url):
        got = cli(url, tmp_path / "hf", json.dumps([argv for argv, _ in REFUSALS]), wrap="from runtime.cli import main\n"
                  + runner)
    assert got.returncode == 0, got.stderr
    for (code, err), (argv, message) in zip(json.loads(got.stdout), REFUSALS):
        assert code == 2 and message in err.strip().splitlines()[-1], (argv, err)
        assert "Traceback" not in err
    assert hub.sent == 0


def test_when_the_hub_cannot_list_a_cached_model_is_used(repos, tmp_path):
    """A refused listing (an expired token's 401), one that never comes, a network's login
    page: the model in the cache is used, and why is said; without it, the Hub's refusal is the
    error. A model cached under an older commit than main's is found too."""
    home = tmp_path / "hf"
    fast = "import runtime.hub\nruntime.hub.LIST_TIMEOUT_S = 2"
    with fake_hub(repos) as (hub, url):
        assert cli(url, home, "pull", "acme/Mini-GGUF:Q8_0").returncode == 0
        hub.commit = "a" * 40  # main moves on (a README edited); a later pull caches under the new commit
        assert cli(url, home, "pull", "acme/Mini-GGUF:Q4_K_M").returncode == 0
        for answer, why in (((401, {}, b"{}"), "the Hub answered 401"),
                            ((200, {"Content-Type": "text/html"}, b"<html>log in</html>"),
                             "the Hub's answer was no listing")):
            hub.listing = answer
            sent = hub.sent
            got = cli(url, home, "pull", "acme/Mini-GGUF:Q8_0", wrap=fast)
            assert got.returncode == 0, got.stderr
            assert "Mini-Q8_0.gguf (13 MiB) from the cache (" in got.stderr and why in got.stderr and hub.sent == sent
            assert COMMIT in got.stdout  # the older snapshot's file
            refused = cli(url, home, "pull", "acme/Mini-GGUF:BF16", wrap=fast)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "answered with something other than a listing (a network's login page?)" in refused.stderr
        hub.listing = None
        hub.hang_listing = True
        t = time.monotonic()
        got = cli(url, home, "pull", "acme/Mini-GGUF:Q4_K_M", wrap=fast)
        assert got.returncode == 0 and "did not list the repository within 2 s" in got.stderr, got.stderr
        assert time.monotonic() - t < 30
        hub.release.set()
    offline = cli(url, home, "pull", "acme/Mini-GGUF:Q8_0", wrap="import os\nos.environ['HF_HUB_OFFLINE'] = '1'")
    assert offline.returncode == 0 and "(HF_HUB_OFFLINE is set)" in offline.stderr, offline.stderr


def test_a_split_models_parts_come_from_one_commit(repos, tmp_path):
    """A commit that lands while the parts are fetched (main moves after the first): the rest
    are fetched at the first one's commit, so that they lie beside it and the model loads."""
    with fake_hub(repos) as (hub, url):
        hub.move_after = 1
        got = cli(url, tmp_path / "hf", "run", "-hf", "acme/Mini-GGUF:Q4_K_S", *RUN)
        assert got.returncode == 0, got.stderr
        assert {commit for commit, _ in hub.files_served} == {COMMIT} and len(hub.files_served) > 1


def test_a_gated_repository_asks_for_a_token(repos, tmp_path):
    with fake_hub(repos) as (hub, url):
        hub.gated = True
        got = cli(url, tmp_path / "hf", "pull", "acme/Mini-GGUF:Q8_0")
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert got.stderr.strip().splitlines()[-1] == (
        "error: acme/Mini-GGUF: the Hub refused Mini-Q8_0.gguf (a gated repository); accept its terms on "
        "huggingface.co if it is gated, and give a token (HF_TOKEN, `hf auth login`, or -hft TOKEN)")


def test_a_disk_too_small_is_refused_before_a_byte_is_fetched(repos, tmp_path):
    wrap = ("import shutil, collections; U = collections.namedtuple('U', 'total used free'); "
            "shutil.disk_usage = lambda p: U(10**9, 10**9 - 5_000_000, 5_000_000)")
    with fake_hub(repos) as (hub, url):
        got = cli(url, tmp_path / "hf", "pull", "acme/Mini-GGUF:Q8_0", wrap=wrap)
    assert got.returncode == 2, got.stderr
    assert got.stderr.strip().splitlines()[-1].startswith(
        "error: acme/Mini-GGUF: Mini-Q8_0.gguf needs 13 MiB more on disk, and ")
    assert "free (set HF_HUB_CACHE to a directory on a larger disk)" in got.stderr and hub.sent == 0


def test_from_pretrained_is_llama_cpp_pythons(repos, tmp_path):
    """runtime.from_pretrained(repo_id, filename) as llama-cpp-python's Llama.from_pretrained:
    a glob names the file; the model gives load()'s text on the same file."""
    script = ("import runtime, sys\n"
              "m = runtime.from_pretrained('acme/Mini-GGUF', filename='*q8_0.gguf', n_ctx=128, n_threads=1)\n"
              "ref = runtime.load(sys.argv[1], n_ctx=128, n_threads=1)\n"
              "kw = dict(max_tokens=12, temperature=0)\n"
              "a, b = m('def parse(line):', **kw), ref('def parse(line):', **kw)\n"
              "print(a['choices'][0]['text'] == b['choices'][0]['text'], m.file.path.name)\n"
              "try:\n"
              "    runtime.from_pretrained('acme/Mini-GGUF', 'x.gguf', local_dir='d')\n"
              "except TypeError as e:\n"
              "    print(e)\n"
              "try:\n"
              "    runtime.from_pretrained('acme/Mini-GGUF', '*q8_0*', additional_files=['mmproj-*.gguf'])\n"
              "except ValueError as e:\n"
              "    print(e)\n"
              "s = runtime.from_pretrained('acme/Mini-GGUF', 'q4_k_s/*-00001-of-*', n_ctx=128, n_threads=1,\n"
              "                           additional_files=['*-00002-of-*.gguf'])\n"
              "print(s.file.path.name)\n")
    with fake_hub(repos) as (hub, url):
        env = dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
        got = subprocess.run([sys.executable, "-c", script, str(MODEL)], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == [
        "True Mini-Q8_0.gguf",
        "from_pretrained(local_dir=...) is not supported: the files go to the Hugging Face cache (cache_dir= chooses "
        "it), where a later call finds them",
        "additional_files 'mmproj-*.gguf' names no part of Mini-Q8_0.gguf: a split model's parts are fetched with it, "
        "and other files (an mmproj) are not read here",
        "Mini-Q4_K_S-00001-of-00004.gguf"]


def test_plan_reads_the_headers_alone(repos, tmp_path):
    """plan -hf: the placement and speeds of a model on the Hub before it is fetched, from its
    parts' headers (read in growing ranges, here from 4 KiB), the same plan as the file's own."""
    import json

    args = ["--ram", "4GiB", "--ram-gbps", "20", "--disk-gbps", "2", "--json"]
    local = subprocess.run([sys.executable, "-m", "runtime.cli", "plan", "-m", str(MODEL), *args],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    want = json.loads(local.stdout)
    small = "import runtime.hub\nruntime.hub.HEADER_READ = 4096"
    with fake_hub(repos) as (hub, url):
        got = cli(url, tmp_path / "hf", "plan", "-hf", "acme/Mini-GGUF:Q8_0", *args, wrap=small)
        assert got.returncode == 0, got.stderr
        plan = json.loads(got.stdout)
        assert plan.pop("model") == "Mini-Q8_0.gguf" and {**want, "model": None} == {**plan, "model": None}
        # each read goes on from where the last stopped, four times as far
        assert hub.starts == [0, 4096, 16384, 65536] and hub.sent == 262144
        sent = hub.sent
        split = cli(url, tmp_path / "hf", "plan", "-hf", "acme/Mini-GGUF:Q4_K_S", *args)
        assert split.returncode == 0, split.stderr
        n = sum(1 for p in repos["acme/Mini-GGUF"] if p.startswith("Q4_K_S/"))
        assert hub.sent - sent <= n * 2**20 < MODEL.stat().st_size and "read 4.0 MiB of it: its headers" in split.stderr
        split_plan = json.loads(split.stdout)
        assert {k: split_plan[k] for k in ("n_experts", "resident_bytes", "expert_bytes", "tok_s")} == \
            {k: want[k] for k in ("n_experts", "resident_bytes", "expert_bytes", "tok_s")}
        assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").rglob("*.gguf"))  # nothing kept
        # a model whole in the cache is planned from there, with no read
        assert cli(url, tmp_path / "hf", "pull", "acme/Mini-GGUF:Q8_0").returncode == 0
        sent = hub.sent
        cached = cli(url, tmp_path / "hf", "plan", "-hf", "acme/Mini-GGUF:Q8_0", *args)
        assert cached.returncode == 0 and "Mini-Q8_0.gguf (13 MiB) from the cache" in cached.stderr, cached.stderr
        assert hub.sent == sent and json.loads(cached.stdout)["tok_s"] == want["tok_s"]


def test_a_header_whose_string_runs_past_the_file_is_corrupt_not_short():
    """A string length past the file's end is corrupt at once: taken for a short read, plan -hf
    read on toward the whole file."""
    import struct

    from runtime.base.errors import StepstreamError
    from runtime.base.gguf_header import Truncated, header_end

    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 6) + b"tokens" + struct.pack("<IIQ", 9, 8, 2)
    huge = head + struct.pack("<Q", 2**40) + b"x" * 64
    with pytest.raises(StepstreamError) as e:
        header_end(huge, Path("m.gguf"), 10**11)
    assert not isinstance(e.value, Truncated) and "runs past the end of the file" in str(e.value)
    short = head + struct.pack("<Q", 100) + b"x" * 64  # a string that goes on past the bytes given: more needed
    with pytest.raises(Truncated):
        header_end(short, Path("m.gguf"), 10**11)
