"""The prompt cache's disk tier (serve --cache-dir: runtime/server/disk_states.py and
state_file.py) on the shipped model: a state written and read back is bit for bit the one
saved; a server started again (a new model, a new cache, the same directory) answers a
conversation's next turn from the file with the bits a fresh evaluation gives; damaged files
are refused by name and removed; the budget holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.cli.demo import model_path
from runtime.model import kv_state
from runtime.model import state_file
from runtime.server.disk_states import DiskStates
from runtime.server.prompt_cache import PromptCache
from runtime.model.state_file import StateFileError, read_header, read_state, write
from tests.test_prompt_cache import _ask  # prepare, then one request: (cached, tokens, logprobs)

SHIPPED = Path(model_path())


def _load(**kw):
    return runtime.load(str(SHIPPED), n_ctx=2048, **kw)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_a_written_state_reads_back_bit_for_bit(tmp_path, kv):
    model = _load(cache_type_k=kv, cache_type_v=kv)
    prompt = np.random.default_rng(1).integers(0, model.cfg.vocab, 700).tolist()
    model.eval_prompt(prompt)
    model.eval([5, 6])
    state = model.save_state(checkpoint=True)
    assert state.checkpoint is not None and state.checkpoint.rings
    path = tmp_path / "s.kvstate"
    size = write(path, state, "id")
    assert size == path.stat().st_size and not list(tmp_path.glob(".*tmp"))
    back = read_state(path, read_header(path))
    assert (back.model, back.layout, back.tokens) == (state.model, state.layout, state.tokens)
    assert all(_same(x, y) for a, b in zip(back.slots, state.slots) for x, y in zip(a, b))
    assert back.checkpoint.n_past == state.checkpoint.n_past
    for r, s in zip(back.checkpoint.rings, state.checkpoint.rings):
        assert r.index == s.index and all(_same(getattr(r, f), getattr(s, f)) for f in ("k", "v", "pos", "ks", "vs"))
    # and it loads: the cache then holds what it held
    want = model.eval([7])
    model.reset()
    model.load_state(back)
    assert np.array_equal(model.eval([7]), want)


def test_a_restarted_server_answers_the_next_turn_from_the_file(tmp_path):
    rng = np.random.default_rng(2)
    conv, other = (rng.integers(0, 2000, n).tolist() for n in (900, 400))
    model = _load()
    cache = PromptCache(0, DiskStates(tmp_path, 1 << 30, SHIPPED))  # no RAM tier: straight to disk
    _, reply, _ = _ask(model, cache, conv)
    _ask(model, cache, other)  # it interrupts the conversation: the conversation is written
    assert cache.disk.writes == 1 and len(list(tmp_path.glob("*.kvstate"))) == 1
    cache.persist(model)  # the server stops: the live one too
    assert cache.disk.writes == 2
    with pytest.raises(StepstreamError, match="another server uses it"):  # one server per directory
        DiskStates(tmp_path, 1 << 30, SHIPPED)
    cache.disk.close()
    model.close()

    model = _load()  # started again
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)
    assert len(disk.entries) == 2 and "2 conversations on disk" in disk.describe()
    turn2 = conv + reply + [7, 8, 9]
    cached, tokens, logprobs = _ask(model, PromptCache(0, disk), turn2)
    assert cached >= len(conv) - 1 and disk.reads == 1
    model.reset()
    assert _ask(model, PromptCache(0), turn2) == (0, tokens, logprobs)  # the bits of a fresh evaluation


def test_files_of_another_model_or_layout_are_not_offered(tmp_path):
    model = _load()
    prompt = list(range(10, 600))
    model.eval_prompt(prompt)
    write(tmp_path / "a.kvstate", model.save_state(checkpoint=True), state_file.model_identity(SHIPPED))
    write(tmp_path / "b.kvstate", model.save_state(checkpoint=True), "another.gguf (5 bytes, modified 1)")
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)
    assert [e.path.name for e in disk.entries] == ["a.kvstate"]  # b is left alone, not removed
    assert (tmp_path / "b.kvstate").exists()
    q8 = _load(cache_type_k="q8_0")
    assert disk.usable(kv_state.layout(q8.cache)) == [] and len(disk.usable(kv_state.layout(model.cache))) == 1


def _rewrite_header(path, edit) -> None:
    """The file with its header edited by `edit(header)` and its CRC-32 made right again."""
    import json
    import zlib

    raw = path.read_bytes()
    n = int.from_bytes(raw[16:24], "little")
    header = json.loads(raw[28:28 + n])
    edit(header)
    head = json.dumps(header, separators=(",", ":")).encode()
    data_at = state_file._start(n)
    path.write_bytes(raw[:16] + len(head).to_bytes(8, "little") + zlib.crc32(head).to_bytes(4, "little") + head
                     + b"\0" * (state_file._start(len(head)) - 28 - len(head)) + raw[data_at:])


def test_damaged_files_are_refused_by_name_and_removed(tmp_path, capsys):
    model = _load()
    model.eval_prompt(list(range(10, 600)))
    good = tmp_path / "good.kvstate"
    write(good, model.save_state(checkpoint=True), state_file.model_identity(SHIPPED))
    raw = good.read_bytes()
    cases = {"magic": b"NOT" + raw[3:], "short": raw[:-100], "flipped": raw[:-50] + bytes([raw[-50] ^ 1]) + raw[-49:],
             "header": raw[:40] + bytes([raw[40] ^ 1]) + raw[41:]}  # a flipped bit in the header: its CRC-32
    for name, data in cases.items():
        path = tmp_path / f"{name}.kvstate"
        path.write_bytes(data)
        with pytest.raises(StateFileError, match=name):
            read_state(path, read_header(path))
    # headers that parse but say nonsense (review 92: one disabled the cache for every request)
    edits = {"layout": lambda h: h.update(layout=[1]), "tokens": lambda h: h["tokens"].__setitem__(-1, "x"),
             "huge": lambda h: h["tokens"].__setitem__(0, 10**30), "dtype": lambda h: h["slots"][0][0].update(dtype="|O"),
             "offset": lambda h: h["slots"][0][0].update(offset=-5), "ring": lambda h: h["checkpoint"].update(n_past="3")}
    for name, edit in edits.items():
        path = tmp_path / f"{name}.kvstate"
        path.write_bytes(raw)
        _rewrite_header(path, edit)
        with pytest.raises(StateFileError, match=name):
            read_state(path, read_header(path))
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)  # the unreadable ones are named and removed at the start
    err = capsys.readouterr().err
    assert all(f"{name}.kvstate" in err for name in ["magic", "header", *edits])
    assert sorted(e.path.name for e in disk.entries) == ["flipped.kvstate", "good.kvstate", "short.kvstate"]
    assert sorted(p.name for p in tmp_path.glob("*.kvstate")) == ["flipped.kvstate", "good.kvstate", "short.kvstate"]
    for e in list(disk.entries):
        if e.path.name != "good.kvstate":
            assert disk.get(e) is None and not e.path.exists()
    assert "damaged state file" in capsys.readouterr().err
    state = disk.get(disk.entries[0])
    assert state is not None and isinstance(state.slots[0][0].base, np.ndarray)  # mapped, not read into a copy


def test_a_state_the_model_refuses_is_dropped_and_the_live_cache_kept(tmp_path, capsys):
    """A file that reads but does not load (of another model under this one's name): dropped,
    said, and the request goes on from the live cache (review 92: it reset it, every time)."""
    model = _load()
    conv = list(range(10, 700))
    model.eval_prompt(conv)
    path = tmp_path / "x.kvstate"
    write(path, model.save_state(checkpoint=True), state_file.model_identity(SHIPPED))
    _rewrite_header(path, lambda h: h.update(model="other.gguf (5 bytes)"))
    model.reset()
    model.eval_prompt(list(range(5, 400)))
    cache = PromptCache(0, DiskStates(tmp_path, 1 << 30, SHIPPED))
    assert cache.prepare(model, conv + [1]) == 0 and not path.exists()
    assert "refused and dropped" in capsys.readouterr().err and model.n_past == 395


def test_the_disk_budget_holds_and_newer_files_replace_their_prefixes(tmp_path):
    model = _load()
    rng = np.random.default_rng(5)
    convs = [rng.integers(0, 2000, 400).tolist() for _ in range(4)]
    one = None
    for c in convs[:1]:
        model.reset()
        model.eval_prompt(c)
        one = model.state_nbytes(checkpoint=True)
    disk = DiskStates(tmp_path, int(2.5 * one), SHIPPED)  # room for two
    cache = PromptCache(0, disk)
    model.reset()
    for c in convs:
        _ask(model, cache, c, 2)
    assert len(disk.entries) == 2 and disk.nbytes <= disk.budget
    assert [e.tokens[:400] for e in disk.entries] == [tuple(convs[1]), tuple(convs[2])]  # the oldest went
    assert len(list(tmp_path.glob("*.kvstate"))) == 2
    _ask(model, cache, convs[2] + [1] * 40, 2)  # back to the third (from its file), then on past it
    assert disk.reads == 1
    _ask(model, cache, convs[0], 2)
    assert sum(e.tokens[:400] == tuple(convs[2]) for e in disk.entries) == 1  # its longer file replaced it


def test_serve_writes_the_live_conversation_when_it_stops(tmp_path):
    """`stepstream serve --cache-dir` end to end: a conversation, SIGTERM, the file; a second
    server on the same directory says it holds one, and a bad directory is refused at once."""
    pytest.importorskip("fastapi")
    from tests.helpers.live_server import live_server

    import httpx

    cache_dir = tmp_path / "kv"
    prompt = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 12
    with live_server(SHIPPED, "--cache-dir", str(cache_dir), "--cache-ram", "0") as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200
    assert len(list(cache_dir.glob("*.kvstate"))) == 1
    with live_server(SHIPPED, "--cache-dir", str(cache_dir), "--cache-ram", "0") as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt + "print(fib(10))", "max_tokens": 4,
                                                      "temperature": 0}, timeout=120).json()
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= r["usage"]["prompt_tokens"] - 20
    blocked = tmp_path / "file"
    blocked.write_text("x")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    p = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "-m", str(SHIPPED), "--port", "0",
                        "--cache-dir", str(blocked / "sub")], capture_output=True, env=env, timeout=120)
    assert p.returncode == 2 and "--cache-dir" in p.stderr.decode() and b"Traceback" not in p.stderr


def test_files_are_the_models_run_the_same_way_and_every_file_counts(tmp_path, capsys):
    """Review 92: a state written with float32 activations was loaded under int8 ones (its
    log-probabilities off by 0.1); files of a replaced model were never counted nor removed; a
    file of another cache layout suppressed a write or was replaced across layouts."""
    model = _load()
    conv = list(range(10, 700))
    model.eval_prompt(conv)
    q8 = DiskStates(tmp_path, 1 << 30, SHIPPED, "activations q8")
    q8.put(model.save_state(checkpoint=True))
    q8.close()
    f32 = DiskStates(tmp_path, 1 << 30, SHIPPED, "activations f32")
    assert f32.entries == [] and "and 1 of another model or run" in f32.describe()  # not offered to f32
    f32.close()
    q8 = DiskStates(tmp_path, 1 << 30, SHIPPED, "activations q8")
    # another cache layout's file neither stops a write nor is replaced by a longer state
    kq8 = _load(cache_type_k="q8_0")
    kq8.eval_prompt(conv + [3, 4])
    q8.put(kq8.save_state(checkpoint=True))
    model.eval_prompt(conv + [3])
    q8.put(model.save_state(checkpoint=True))
    # the q8_0-layout file was written beside the f16 one (it was not "held" by it), and the f16
    # one was replaced by its own extension alone
    assert q8.writes == 2 and [len(e.tokens) for e in q8.files] == [len(conv) + 2, len(conv) + 1]  # (reopened)
    assert [e.layout == kv_state.layout(kq8.cache) for e in q8.files] == [True, False]
    assert len(q8.files) == len(list(tmp_path.glob("*.kvstate")))
    # the budget counts every file, whoever wrote it, and evicts the oldest first
    one = max(e.nbytes for e in q8.files)
    q8.close()
    small = DiskStates(tmp_path, int(2.5 * one), SHIPPED, "activations x")
    model.reset()
    model.eval_prompt(list(range(20, 700)))
    small.put(model.save_state(checkpoint=True))
    assert small.nbytes <= small.budget and len(list(tmp_path.glob("*.kvstate"))) == 2


def test_a_failed_write_keeps_the_files_it_would_replace(tmp_path, capsys, monkeypatch):
    model = _load()
    conv = list(range(10, 700))
    model.eval_prompt(conv)
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)
    disk.put(model.save_state(checkpoint=True))
    model.eval_prompt(conv + [5, 6])
    from runtime.server import disk_states

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_states, "write", full)
    disk.put(model.save_state(checkpoint=True))
    disk.put(model.save_state(checkpoint=True))
    assert len(list(tmp_path.glob("*.kvstate"))) == 1 and disk.failures == 2  # the shorter one is kept
    assert capsys.readouterr().err.count("No space left on device") == 1  # said once
    monkeypatch.undo()
    disk.put(model.save_state(checkpoint=True))  # room again: written, and it replaces the shorter one
    assert [e.tokens for e in disk.entries] == [tuple(conv + [5, 6])]
    tiny = DiskStates(tmp_path / "t", 1024, SHIPPED)
    tiny.put(model.save_state(checkpoint=True))
    tiny.put(model.save_state(checkpoint=True))
    assert tiny.files == [] and capsys.readouterr().err.count("--cache-dir-size") == 1


def _held_write(monkeypatch, gate: threading.Event, started: threading.Event):
    """Writes that wait for `gate` (set `started` first): a slow disk, under the test's control."""
    from runtime.server import disk_states

    real = disk_states.write

    def slow(*args):
        started.set()
        assert gate.wait(120), "the test never let the write go"
        return real(*args)

    monkeypatch.setattr(disk_states, "write", slow)


def test_a_kept_conversation_is_written_while_the_model_goes_on(tmp_path, monkeypatch):
    """With a RAM tier, the writer thread writes the conversation's copy: the request that
    interrupted it does not wait for the file (on the real model, about 3 s each time)."""
    gate, started = threading.Event(), threading.Event()
    _held_write(monkeypatch, gate, started)
    rng = np.random.default_rng(8)
    conv, other = (rng.integers(0, 2000, n).tolist() for n in (900, 400))
    model = _load()
    cache = PromptCache(1 << 30, DiskStates(tmp_path, 1 << 30, SHIPPED))
    _ask(model, cache, conv)
    _ask(model, cache, other)  # it interrupts the conversation: kept in RAM, its file still being written
    assert started.wait(60) and cache.keeps == 1 and cache.disk.writes == 0
    assert cache.disk.pending_bytes() == cache.states[0].nbytes and cache._held() == cache.nbytes
    cache.disk.put_later(cache.states[0])  # asked again while waiting: not queued twice
    assert cache.disk.pending_bytes() == cache.states[0].nbytes
    gate.set()
    cache.disk.close()  # the server stops: the writes asked for are done first
    assert cache.disk.writes == 1 and cache.disk.pending_bytes() == 0
    [entry] = cache.disk.entries
    back, ram = cache.disk.get(entry), cache.states[0]
    assert back.tokens == ram.tokens
    assert all(_same(x, y) for a, b in zip(back.slots, ram.slots) for x, y in zip(a, b))
    model.close()


def test_states_waiting_for_the_writer_count_in_the_ram_budget(tmp_path, monkeypatch):
    """A state dropped from RAM while its file is being written holds its memory until then: a
    budget with room for one state waits for the write before copying the next."""
    gate, started = threading.Event(), threading.Event()
    _held_write(monkeypatch, gate, started)
    rng = np.random.default_rng(9)
    a, b, c = (rng.integers(0, 2000, 700).tolist() for _ in range(3))
    model = _load()
    model.eval_prompt(a)
    one = model.state_nbytes(checkpoint=True)
    model.reset()
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)
    cache = PromptCache(int(1.5 * one), disk)  # room for one
    waited = []
    real_flush = disk.flush

    def flush():
        waited.append(disk.pending_bytes())
        gate.set()  # the disk catches up
        real_flush()

    monkeypatch.setattr(disk, "flush", flush)
    _ask(model, cache, a, 2)
    _ask(model, cache, b, 2)  # a kept, its write held
    assert started.wait(60) and waited == [] and cache._held() <= cache.budget
    _ask(model, cache, c, 2)  # b kept: first a's write is waited for, since a and b do not both fit
    assert waited and waited[0] >= one * 0.9
    assert [s.tokens[:700] for s in cache.states] == [tuple(b)] and cache._held() <= cache.budget
    disk.close()
    assert disk.writes == 2


def test_a_file_removed_to_make_room_after_it_was_offered_is_passed_over(tmp_path, capsys):
    model = _load()
    rng = np.random.default_rng(10)
    a, b = (rng.integers(0, 2000, 500).tolist() for _ in range(2))
    model.eval_prompt(a)
    disk = DiskStates(tmp_path, int(1.5 * (model.state_nbytes(checkpoint=True) + 64 * 1024)), SHIPPED)
    disk.put(model.save_state(checkpoint=True))
    [offered] = disk.usable(kv_state.layout(model.cache))
    model.reset()
    model.eval_prompt(b)
    disk.put(model.save_state(checkpoint=True))  # room for one: a's file goes
    assert [e.tokens[:500] for e in disk.entries] == [tuple(b)]
    assert disk.get(offered) is None and disk.reads == 0
    assert "removed" not in capsys.readouterr().err  # gone, not damaged: nothing to say
    disk.close()
    model.close()


def _no_wait(monkeypatch, disk, waited: list, gate: threading.Event):
    """Record each flush (and let the held writes go, or the test would hang on a regression)."""
    real = disk.flush

    def flush():
        waited.append(disk.pending_bytes())
        gate.set()
        real()

    monkeypatch.setattr(disk, "flush", flush)


def test_the_worker_waits_for_no_write_where_memory_does_not_need_it(tmp_path, monkeypatch):
    """(review 95) A full RAM tier whose oldest state is already written drops that one rather
    than wait for the newest write; a conversation's next turn found in RAM while its own file is
    being written waits for nothing."""
    gate, started = threading.Event(), threading.Event()
    _held_write(monkeypatch, gate, started)
    rng = np.random.default_rng(11)
    a, b, c, d = (rng.integers(0, 2000, 700).tolist() for _ in range(4))
    model = _load()
    model.eval_prompt(a)
    one = model.state_nbytes(checkpoint=True)
    model.reset()
    disk = DiskStates(tmp_path / "1", 1 << 30, SHIPPED)
    cache = PromptCache(int(2.5 * one), disk)
    gate.set()
    _ask(model, cache, a, 2)
    _ask(model, cache, b, 2)
    disk.flush()  # a kept and written
    gate.clear()
    waited = []
    _no_wait(monkeypatch, disk, waited, gate)
    _ask(model, cache, c, 2)  # b kept, its write held
    _ask(model, cache, d, 2)  # c kept: dropping a (written) makes room
    assert waited == [] and [s.tokens[:700] for s in cache.states] == [tuple(b), tuple(c)]
    assert cache._held() <= cache.budget
    gate.set()
    disk.close()

    model.reset()
    gate.clear()
    disk = DiskStates(tmp_path / "2", 1 << 30, SHIPPED)
    cache = PromptCache(int(1.5 * one), disk)
    waited = []
    _no_wait(monkeypatch, disk, waited, gate)
    _ask(model, cache, a, 2)
    _ask(model, cache, a[:5] + b[:100], 2)  # a title request: a kept, its write held
    assert disk.queued(cache.states[0])
    _ask(model, cache, a + [7, 8, 9], 2)  # a's next turn, from RAM
    assert waited == [] and cache.loads == 1
    gate.set()
    disk.close()
    assert disk.writes == 1
    model.close()


def test_the_writer_goes_on_when_the_disk_and_the_log_are_full(tmp_path, monkeypatch):
    """(review 95) A full disk often holds the log too: a write failing with ENOSPC while stderr
    fails as well killed the writer thread, and every later flush (the server's shutdown) hung."""
    from runtime.server import disk_states

    class FullLog:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    def full(*args):
        raise OSError(28, "No space left on device")

    model = _load()
    model.eval_prompt(list(range(10, 400)))
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)
    monkeypatch.setattr(disk_states, "write", full)
    monkeypatch.setattr(sys, "stderr", FullLog())
    assert disk.put(model.save_state(checkpoint=True)) is False  # returns: the writer did not die
    monkeypatch.undo()
    assert disk.put(model.save_state(checkpoint=True)) is True and disk.writes == 1
    disk.close()
    model.close()


def test_a_loaded_states_checkpoint_does_not_hold_its_file(tmp_path):
    """(review 95) The checkpoint stays with the model after a load; as a view of the file's map
    it kept a removed file's blocks on disk, beyond --cache-dir-size."""
    model = _load()
    model.eval_prompt(np.random.default_rng(12).integers(0, 2000, 700).tolist())
    disk = DiskStates(tmp_path, 1 << 30, SHIPPED)
    disk.put(model.save_state(checkpoint=True))
    model.reset()
    [entry] = disk.entries
    state = disk.get(entry)
    assert state.checkpoint is not None
    model.load_state(state)
    del state
    disk.remove(entry)
    import gc

    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(entry.path) not in maps
    disk.close()
    model.close()


def test_persist_says_whether_the_live_conversation_is_on_disk(tmp_path):
    model = _load()
    model.eval_prompt(list(range(10, 400)))
    small = DiskStates(tmp_path, 64 * 1024, SHIPPED)  # too small for it
    assert PromptCache(0, small).persist(model) is False
    small.close()
    disk = DiskStates(tmp_path / "big", 1 << 30, SHIPPED)
    assert PromptCache(0, disk).persist(model) is True
    disk.close()
    model.close()
