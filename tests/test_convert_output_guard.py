"""What the converter refuses to write over, and how it stops on a full or read-only disk.

A review found `--force` replacing the checkpoint's own shard with the GGUF, `--summary-json`
replacing the GGUF just written (or tokenizer.json), a full disk ending in a traceback, and
`--resume --type OTHER` silently discarding hours of an interrupted conversion. The disk cases
run on a real tmpfs (mounted when the tests run as root; skipped otherwise).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from convert import converter
from runtime.cli import main

FTYPE = "q8_0"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "m.gguf"
    converter.convert(tiny_ckpt, out, FTYPE, progress=False)
    return out.read_bytes()


@pytest.mark.parametrize("victim", ["model-00001-of-00002.safetensors", "tokenizer.json", "config.json"])
@pytest.mark.parametrize("via", ["path", "symlink"])
def test_the_output_may_not_be_a_checkpoint_file_even_with_force(tiny_ckpt, tmp_path, capsys, victim, via):
    ckpt = _copy(tiny_ckpt, tmp_path)
    before = {p.name: _md5(p) for p in ckpt.iterdir()}
    out = ckpt / victim
    if via == "symlink":  # a Hugging Face cache snapshot links its files; so may a user's output path
        out = tmp_path / "out.gguf"
        out.symlink_to(ckpt / victim)
    rc = main(["convert", str(ckpt), str(out), "--type", FTYPE, "--no-progress", "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint's own" in err and victim in err, err
    assert {p.name: _md5(p) for p in ckpt.iterdir()} == before


def test_a_previous_gguf_beside_the_checkpoint_may_be_replaced(tiny_ckpt, tmp_path, capsys, reference):
    ckpt = _copy(tiny_ckpt, tmp_path)
    out = ckpt / "model.gguf"
    out.write_bytes(b"an older conversion")
    assert main(["convert", str(ckpt), str(out), "--type", FTYPE, "--no-progress", "--force", "--name", "tiny"]) == 0
    assert out.read_bytes() == reference


@pytest.mark.parametrize("where", ["the output", "tokenizer.json", "an existing file"])
def test_the_summary_json_never_replaces_the_output_or_an_input(tiny_ckpt, tmp_path, capsys, where):
    ckpt = _copy(tiny_ckpt, tmp_path)
    out = tmp_path / "m.gguf"
    summary = {"the output": out, "tokenizer.json": ckpt / "tokenizer.json",
               "an existing file": tmp_path / "notes.json"}[where]
    if where == "an existing file":
        summary.write_text("my notes")
    before = {p.name: _md5(p) for p in ckpt.iterdir()}
    force = ["--force"] if where != "an existing file" else []
    rc = main(["convert", str(ckpt), str(out), "--type", FTYPE, "--no-progress", "--summary-json", str(summary), *force])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists(), "refused before converting"
    assert {p.name: _md5(p) for p in ckpt.iterdir()} == before
    if where == "an existing file":
        assert "already exists" in err and summary.read_text() == "my notes"
        assert main(["convert", str(ckpt), str(out), "--type", FTYPE, "--no-progress", "--summary-json",
                     str(summary), "--force"]) == 0
        assert '"out_path"' in summary.read_text()
    else:
        assert str(summary.name) in err


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 30 MB (root only): mount(8), then umount."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("replacing", [False, True])
def test_an_output_that_cannot_fit_is_refused_before_writing(tiny_ckpt, tmpfs, capsys, monkeypatch, replacing):
    """Refused before the writers' kernels load (a review: --force over an old output found the
    full disk only after them), and an old output replaced with --force stays as it was."""
    if replacing:
        (tmpfs / "m.gguf").write_bytes(b"old" * 3_000_000)  # 9 MB, replaced only by the final rename
    (tmpfs / "filler").write_bytes(b"x" * (16_000_000 if replacing else 25_000_000))  # ~5 MB left for 9.9 MB
    monkeypatch.setattr(converter, "load_writers", lambda *a: pytest.fail("the writers loaded before the check"))
    rc = main(["convert", str(tiny_ckpt), str(tmpfs / "m.gguf"), "--type", "q4_k_m", "--no-progress",
               *(["--force"] if replacing else [])])
    err = capsys.readouterr().err
    assert rc == 2 and "needs" in err and "free" in err, err
    assert sorted(p.name for p in tmpfs.iterdir()) == (["filler", "m.gguf"] if replacing else ["filler"])
    if replacing:
        assert (tmpfs / "m.gguf").read_bytes() == b"old" * 3_000_000


@pytest.mark.parametrize("resume", [False, True])
def test_a_disk_filling_up_mid_conversion_is_one_line_and_resumable(tiny_ckpt, tmpfs, capsys, reference, resume):
    """Another process fills the file system once the .part appears: one line naming the output
    and the error; with --resume the .part is kept, and after space is freed the same command
    finishes to the bytes of an uninterrupted run."""
    out = tmpfs / "m.gguf"

    def fill():
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".part") for p in tmpfs.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.0005)
        with open(tmpfs / "filler", "wb") as f:
            try:
                f.write(b"x" * 30_000_000)
            except OSError as e:
                assert e.errno == errno.ENOSPC

    filler = threading.Thread(target=fill)
    filler.start()
    args = ["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress", *(["--resume"] if resume else [])]
    rc = main(args)
    filler.join()
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "No space left on device" in err, err
    assert "Traceback" not in err and not out.exists()
    parts = sorted(p.name for p in tmpfs.iterdir() if p.name != "filler")
    if not resume:
        assert parts == [], parts
        return
    assert "--resume continues it" in err and len(parts) == 2, parts  # the .part and its record
    (tmpfs / "filler").unlink()
    assert main(args) == 0
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmpfs.iterdir()) == ["m.gguf"]


def test_a_read_only_file_system_is_one_line(tiny_ckpt, tmpfs, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    rc = main(["convert", str(tiny_ckpt), str(tmpfs / "m.gguf"), "--type", FTYPE, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Read-only file system" in err and "Traceback" not in err, err


def test_resume_with_other_options_keeps_the_interrupted_work(tiny_ckpt, tmp_path, capsys, monkeypatch, reference):
    """A conversion stopped with --resume, then resumed with another --type: refused, naming the
    .part and its progress; the same options continue it; --force discards it."""
    out = tmp_path / "m.gguf"
    calls = {"n": 0}
    real = converter.write_tensor

    def stop_at_the_fifth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(converter, "write_tensor", stop_at_the_fifth)
    assert main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress", "--resume"]) == 130
    monkeypatch.setattr(converter, "write_tensor", real)
    assert "--resume continues it" in capsys.readouterr().err
    part = next(p for p in tmp_path.iterdir() if p.name.endswith(".part"))
    # the interrupted run was this process: the part must look like a dead process's
    dead = tmp_path / part.name.replace(f".{os.getpid()}.", ".999999.")
    part.rename(dead)
    Path(str(part) + ".json").rename(Path(str(dead) + ".json"))
    rc = main(["convert", str(tiny_ckpt), str(out), "--type", "q4_k_m", "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and dead.name in err and "4 tensors complete" in err and "--force" in err, err
    assert dead.exists() and not out.exists()
    assert main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress", "--resume"]) == 0
    assert out.read_bytes() == reference


def test_a_fifo_is_never_replaced_and_a_symlink_is_written_through(tiny_ckpt, tmp_path, capsys, reference):
    """`convert --force` made /dev/null (as root), a FIFO or a symlink a regular file (a review's
    finding). A device, FIFO or socket is refused even with --force, for the output and the
    summary; through a symlink the target is written and the link stays, as cp writes."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in ([str(fifo)], [str(tmp_path / "m.gguf"), "--summary-json", str(fifo)]):
        assert main(["convert", str(tiny_ckpt), *args, "--type", FTYPE, "--no-progress", "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(fifo) in err[0] and "is a FIFO" in err[0], err
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "m.gguf").exists()
    disk2 = tmp_path / "disk2"
    disk2.mkdir()
    (disk2 / "m.gguf").write_bytes(b"an older model")
    (disk2 / "s.json").write_text("old summary")
    (tmp_path / "m.gguf").symlink_to(disk2 / "m.gguf")
    (tmp_path / "s.json").symlink_to(disk2 / "s.json")
    assert main(["convert", str(tiny_ckpt), str(tmp_path / "m.gguf"), "--type", FTYPE, "--no-progress", "--force",
                 "--summary-json", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "m.gguf").is_symlink() and (tmp_path / "s.json").is_symlink()
    assert (disk2 / "m.gguf").read_bytes() == reference and '"n_tensors"' in (disk2 / "s.json").read_text()
    assert sorted(p.name for p in disk2.iterdir()) == ["m.gguf", "s.json"]


def test_a_plain_run_keeps_an_interrupted_conversions_work(tiny_ckpt, tmp_path, capsys, monkeypatch, reference):
    """The same command without --resume deleted the .part an interrupted --resume run kept, and
    said nothing (a review's finding; for the real checkpoint up to an hour and a half of work).
    Now it is refused, naming the .part, its progress, --resume and --force; --resume continues
    it; --force discards it."""
    out = tmp_path / "m.gguf"
    calls = {"n": 0}
    real = converter.write_tensor

    def stop_at_the_fifth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(converter, "write_tensor", stop_at_the_fifth)
    assert main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress", "--resume"]) == 130
    monkeypatch.setattr(converter, "write_tensor", real)
    capsys.readouterr()
    part = next(p for p in tmp_path.iterdir() if p.name.endswith(".part"))
    dead = tmp_path / part.name.replace(f".{os.getpid()}.", ".999999.")  # as a dead process's
    part.rename(dead)
    Path(str(part) + ".json").rename(Path(str(dead) + ".json"))
    kept = _md5(dead)
    rc = main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert dead.name in err[0] and "4 tensors complete" in err[0] and "--resume" in err[0] and "--force" in err[0]
    assert _md5(dead) == kept and not out.exists()
    assert main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress", "--force"]) == 0
    assert out.read_bytes() == reference and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("ftype,value", [("f16", 1e5), ("q8_0", -3e38), ("q4_k_m", -3e38), ("q2_k", -3e38)])
def test_values_too_large_for_the_format_are_refused_by_name(tiny_ckpt, tmp_path, capsys, ftype, value):
    """A finite bf16 weight beyond what the format's float16 values or scales hold (65504) was
    written as Inf (f16) or gave Inf/NaN scales (q8_0, q4_k_m: 256 NaN weights after decoding),
    exit 0. Now the tensor is named; bf16 keeps it."""
    import numpy as np

    from convert.safetensors_io import Checkpoint, f32_to_bf16_bits

    ckpt = _copy(tiny_ckpt, tmp_path)
    name = "model.embed_tokens.weight"
    entry = Checkpoint(ckpt).entry(name)
    shard = Checkpoint(ckpt).file_of(name)
    with open(shard, "r+b") as f:
        f.seek(entry.begin + 2 * 1000)
        f.write(f32_to_bf16_bits(np.array([value], np.float32)).tobytes())
    out = tmp_path / "m.gguf"
    rc = main(["convert", str(ckpt), str(out), "--type", ftype, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and name in err and "too large" in err and "RuntimeWarning" not in err, err
    assert not out.exists()
    assert main(["convert", str(ckpt), str(out), "--type", "bf16", "--no-progress"]) == 0


@pytest.mark.parametrize("holds", [True, False])
def test_a_conversion_already_writing_the_output_is_found_at_the_start(tiny_ckpt, tmp_path, capsys, holds):
    """A second conversion to the same output converted everything, then failed at the rename,
    leaving a full-size .part. A live process holding the output's .part open now stops it at the
    start; a live process that merely has the PID of a killed conversion's .part does not."""
    import sys

    out = tmp_path / "m.gguf"
    code = ("import os, sys, time\n"
            "part = sys.argv[1].replace('PID', str(os.getpid()))\n"
            + ("f = open(part, 'wb')\n" if holds else "open(part, 'wb').close()\n")
            + "print('ready', flush=True)\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".m.gguf.PID.part")], stdout=subprocess.PIPE)
    try:
        assert other.stdout.readline().strip() == b"ready"
        rc = main(["convert", str(tiny_ckpt), str(out), "--type", FTYPE, "--no-progress"])
        err = capsys.readouterr().err
        if holds:
            assert rc == 2 and f"process {other.pid}" in err and "writing it now" in err, err
            assert not out.exists()
        else:
            assert rc == 0, err
            assert out.exists()
    finally:
        other.kill()
        other.wait()


def test_a_hugging_face_cache_snapshot_is_named_by_its_repository(tiny_ckpt, tmp_path):
    """general.name was the snapshot's commit directory (`abc123`)."""
    import gguf

    snap = tmp_path / "hub" / "models--stepfun-ai--Step-3.5-Flash" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    shutil.copytree(tiny_ckpt, snap)
    out = tmp_path / "m.gguf"
    converter.convert(snap, out, FTYPE, progress=False)
    field = gguf.GGUFReader(out).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "Step-3.5-Flash"


def test_a_shard_tensor_the_index_does_not_name_is_reported(tiny_ckpt, tmp_path):
    """It was ignored without a word, although every input tensor is said to be accounted for."""
    import json

    import numpy as np

    from convert.safetensors_io import SafetensorsFile

    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = ckpt / "model-00002-of-00002.safetensors"
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8:8 + header_len])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["stray.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]}
    blob = json.dumps(header).encode()
    data = shard.read_bytes()[8 + header_len:]
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + data[:end] + np.zeros(2, np.float32).tobytes())
    assert "stray.weight" in SafetensorsFile(shard).entries
    s = converter.convert(ckpt, tmp_path / "m.gguf", FTYPE, progress=False)
    assert s.skipped["stray.weight (model-00002-of-00002.safetensors)"] == "in a shard, but not named by the index: not read"
    assert "skipped stray.weight" in s.text()


def test_a_record_that_cannot_be_written_leaves_the_last_one_and_no_temporary(tmp_path, monkeypatch):
    """The disk filled while the progress record was being replaced: its `.part.json.tmp` was left
    beside the `.part` (seen once in the test above, when the filler won that race)."""
    from convert import resume

    part = tmp_path / ".m.gguf.1.part"
    part.write_bytes(b"x")
    resume.save(part, resume.Progress("k", 1, 2))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume.os, "fsync", full)
    with pytest.raises(OSError):
        resume.save(part, resume.Progress("k", 2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.gguf.1.part", ".m.gguf.1.part.json"]
    assert resume.load(part) == resume.Progress("k", 1, 2)
