"""Issue 12, items 10 and 12: the expert reader on other platforms, and under I/O faults.

Platforms are simulated by removing calls from `os` and `fcntl` (monkeypatch): macOS has no
O_DIRECT and no posix_fadvise but fcntl F_NOCACHE; Windows has neither, nor os.preadv or
os.pread. Faults are injected into os.preadv on real files: EIO (transient and lasting),
short counts (also under O_DIRECT, where the rest must stay aligned), O_DIRECT refused at
read time (EINVAL), and a real GGUF copy truncated while the model has it open.
"""

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import offload.direct_io as dio
from offload.direct_io import ALIGN, DirectReader, ReadError, aligned_empty, span_bytes
from runtime.base.errors import StepstreamError
from runtime.loader import load

PROMPT = list(range(3, 3 + 40))


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "experts.bin"
    data = np.random.default_rng(1).integers(0, 256, 5 * ALIGN + 777, dtype=np.uint8)
    data.tofile(path)
    return path, data


def read(reader, path, offset, nbytes):
    return np.array(reader.read(path, offset, nbytes, aligned_empty(span_bytes(nbytes))))


def is_direct(fd) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


# ----------------------------------------------------------------------------- platforms


def as_macos(monkeypatch):
    """No O_DIRECT, no posix_fadvise; fcntl(F_NOCACHE) as on macOS. Returns the F_NOCACHE calls made."""
    calls = []
    real = fcntl.fcntl
    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr(fcntl, "F_NOCACHE", 48, raising=False)

    def fake_fcntl(fd, cmd, arg=0):
        if cmd == 48:
            calls.append((fd, arg))
            return 0
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    return calls


def as_windows(monkeypatch):
    """No O_DIRECT, posix_fadvise, os.preadv, os.pread or fcntl."""
    for name in ("O_DIRECT", "posix_fadvise", "preadv", "pread"):
        monkeypatch.delattr(os, name)
    monkeypatch.setattr(dio, "fcntl", None, raising=False)


def test_macos_reads_with_f_nocache(data_file, monkeypatch):
    path, data = data_file
    calls = as_macos(monkeypatch)
    r = DirectReader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # F_NOCACHE bypasses the page cache: nothing to warn about
        np.testing.assert_array_equal(read(r, path, 1234, 3 * ALIGN), data[1234 : 1234 + 3 * ALIGN])
    assert [arg for _, arg in calls] == [1], "the descriptor must be set F_NOCACHE"
    assert r.platform.describe().startswith("page cache bypass: F_NOCACHE")
    r.close()


def test_windows_reads_with_seek_and_read_and_says_the_page_cache_is_kept(data_file, monkeypatch):
    path, data = data_file
    as_windows(monkeypatch)
    r = DirectReader()
    with pytest.warns(RuntimeWarning, match="no O_DIRECT, F_NOCACHE or posix_fadvise"):
        got = read(r, path, 4000, 2 * ALIGN + 5)
    np.testing.assert_array_equal(got, data[4000 : 4000 + 2 * ALIGN + 5])
    np.testing.assert_array_equal(read(r, path, 5 * ALIGN, 777), data[5 * ALIGN :])  # the file's last bytes
    assert r.platform.positional == "seek"
    r.close()


def test_pread_without_preadv(data_file, monkeypatch):
    path, data = data_file
    monkeypatch.delattr(os, "preadv")
    r = DirectReader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pread fills a buffer of its own: no O_DIRECT to be refused
        np.testing.assert_array_equal(read(r, path, 10, 9000), data[10:9010])
    assert r.platform.positional == "pread"
    r.close()


@pytest.fixture(scope="module")
def q4(tiny_gguf):
    return tiny_gguf("q4_k_m")


@pytest.fixture(scope="module")
def reference(q4):
    m = load(q4)
    try:
        return m.logits(PROMPT), m.placement
    finally:
        m.close()


@pytest.mark.parametrize("platform", ["macos", "windows"])
def test_streaming_on_another_platform_gives_the_same_logits(q4, reference, monkeypatch, platform):
    logits, _ = reference
    calls = as_macos(monkeypatch) if platform == "macos" else as_windows(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = load(q4, ram_budget=600_000)
        try:
            assert np.array_equal(m.logits(PROMPT), logits)
            assert m.provider.stats.misses > 0
        finally:
            m.close()
    if platform == "macos":
        assert calls, "the model's files must be read with F_NOCACHE"


# ----------------------------------------------------------------------------- faults


def test_transient_eio_is_retried(data_file, monkeypatch):
    path, data = data_file
    real, failures = os.preadv, [2]

    def flaky(fd, bufs, offset):
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    monkeypatch.setattr(dio, "RETRY_PAUSE_S", 0.001, raising=False)
    r = DirectReader()
    np.testing.assert_array_equal(read(r, path, 100, 5000), data[100:5100])
    assert r.retries == 2
    r.close()


def test_lasting_eio_names_file_offset_and_tries(data_file, monkeypatch):
    path, _ = data_file

    def broken(fd, bufs, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    monkeypatch.setattr(dio, "RETRY_PAUSE_S", 0.001, raising=False)
    r = DirectReader()
    with pytest.raises(ReadError, match=rf"{path}: read of 5000 bytes at offset 100 failed after 4 tries "
                                         r"\(Input/output error\)"):
        read(r, path, 100, 5000)
    r.close()


@pytest.mark.parametrize("direct", [True, False])
def test_short_counts_are_continued(data_file, monkeypatch, direct):
    """preadv fills and returns fewer bytes than asked (1000 or 5000, never a block multiple)."""
    path, data = data_file
    real, counts = os.preadv, []

    def short(fd, bufs, offset):
        view = bufs[0]
        n = real(fd, [view], offset)  # the real read (aligned under O_DIRECT) ...
        keep = min(n, 1000 if len(counts) % 2 else 5000)
        view[keep:n] = bytes(n - keep)  # ... of which only `keep` bytes arrive
        counts.append(keep)
        if direct:
            assert is_direct(fd)
        return keep

    monkeypatch.setattr(os, "preadv", short)
    r = DirectReader(direct=direct)
    np.testing.assert_array_equal(read(r, path, 300, 4 * ALIGN + 100), data[300 : 300 + 4 * ALIGN + 100])
    assert len(counts) > 2
    r.close()


def test_o_direct_refused_at_read_time_goes_on_buffered(data_file, monkeypatch):
    path, data = data_file
    real = os.preadv

    def refusing(fd, bufs, offset):
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", refusing)
    r = DirectReader()
    with pytest.warns(RuntimeWarning, match="refuses O_DIRECT reads"):
        np.testing.assert_array_equal(read(r, path, 5, 8000), data[5:8005])
    np.testing.assert_array_equal(read(r, path, 9000, 100), data[9000:9100])  # stays buffered, no new warning
    assert r.fallback_paths == [path]
    r.close()


def test_a_truncated_file_says_how_large_it_is_now(data_file):
    path, _ = data_file
    r = DirectReader()
    read(r, path, 0, 100)  # opened
    os.truncate(path, 3 * ALIGN + 10)
    with pytest.raises(ReadError, match=rf"{path}: read of 5000 bytes at offset 9000 came back short \(3298 bytes\); "
                                         rf"the file is truncated \(it holds {3 * ALIGN + 10} bytes, the expert ends "
                                         rf"at byte 14000\)"):
        read(r, path, 9000, 5000)
    r.close()


def test_a_gguf_truncated_while_the_model_has_it_open(q4, reference, tmp_path):
    """A real GGUF copy cut in the middle of the last MoE layer's experts while the model streams
    from it: a clear error naming the file and an offset, never a traceback or a wrong answer."""
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(q4, copy)
    m = load(copy, ram_budget=600_000, prefetch=False)
    try:
        assert np.array_equal(m.logits(PROMPT), reference[0])
        table = m.provider.table
        last = table.layers[max(table.layers)]
        cut = last.extents(last.n_expert // 2)[0].offset + 100
        embed = m.file.tensor("token_embd.weight")
        assert embed.offset + embed.data.nbytes <= cut, "the mapped embedding must stay whole"
        # cut by another process, as a user's truncate would (this one holds a read lease on the
        # file, and its own truncate(2) would be interrupted by the lease's signal: EINTR)
        subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], int(sys.argv[2]))",
                        str(copy), str(cut)], check=True, timeout=60)
        with pytest.raises(StepstreamError) as err:  # seen before the evaluation reads anything
            m.logits(PROMPT)
        assert str(err.value).startswith(f"{copy}: the file changed on disk while the model was loaded (it is {cut} "
                                         f"bytes, it was "), str(err.value)
        # A cut that comes during an evaluation, after that check: the expert reads name it.
        m.file.check_unchanged = lambda: None
        with pytest.raises(StepstreamError) as err:
            for _ in range(3):  # the cache evicts, so the cut experts are read again
                m.logits(PROMPT)
        msg = str(err.value)
        assert str(copy) in msg and "at offset" in msg and f"it holds {cut} bytes" in msg, msg
    finally:
        m.close()


def test_every_expert_read_is_size_checked(q4, reference):
    class Shortchanging(DirectReader):
        def read(self, path, offset, nbytes, buf):
            return super().read(path, offset, nbytes, buf)[:-1]

    m = load(q4, ram_budget=600_000, prefetch=False)
    try:
        assert m.provider.cache.resident_bytes() == 0, "nothing read yet"
        m.provider.reader = Shortchanging()
        with pytest.raises(StepstreamError, match=rf"{q4}: read of \d+ bytes at offset \d+ returned \d+ bytes"):
            m.logits(PROMPT)
    finally:
        m.close()


def test_reads_without_direct_io_stay_in_the_page_cache(data_file, monkeypatch):
    """--no-direct-io promises reads "through the page cache", but every read was dropped from it
    (posix_fadvise DONTNEED), pages other processes had cached included. Dropping stays the
    stand-in for O_DIRECT alone: where the filesystem refuses O_DIRECT."""
    path, data = data_file
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice) or real(fd, off, n, advice))
    plain = DirectReader(direct=False)
    np.testing.assert_array_equal(read(plain, path, 5, 8000), data[5:8005])
    assert os.POSIX_FADV_DONTNEED not in advised and not is_direct(plain._file(path).fd)
    plain.close()
    monkeypatch.setattr(os, "O_DIRECT", 0o40000000)  # a flag the open below refuses: O_DIRECT "unsupported"
    real_open = os.open

    def refusing(p, flags, *args):
        if flags & 0o40000000:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    stand_in = DirectReader(direct=True)
    with pytest.warns(RuntimeWarning, match="refuses O_DIRECT"):
        np.testing.assert_array_equal(read(stand_in, path, 5, 8000), data[5:8005])
    assert os.POSIX_FADV_DONTNEED in advised
    stand_in.close()


def test_a_part_is_reopened_through_the_descriptor_held_since_load(data_file, tmp_path):
    """The reader opens the file the model loaded, not whatever the path names now."""
    path, data = data_file
    held = os.open(path, os.O_RDONLY)
    try:
        other = tmp_path / "other.bin"
        other.write_bytes(b"x" * len(data))
        os.replace(other, path)  # a new file renamed over the loaded one
        r = DirectReader(held={path: held})
        np.testing.assert_array_equal(read(r, path, 5, 8000), data[5:8005])
        r.close()
    finally:
        os.close(held)
