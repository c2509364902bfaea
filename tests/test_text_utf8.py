"""Text that is no UTF-8 (a Latin-1 terminal, raw bytes on the command line or stdin) gets one
clear line naming the flag and the first bad byte, never a traceback: Python hands undecodable
bytes over as lone surrogates, which the tokenizer refused with a TypeError.

References: Python's strict UTF-8 decoder (where it stops), and real bytes given to a real
`stepstream` process on its command line and stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.text.tokenizer import utf8_problem

EMBEDDED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


def _expected(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        return f"byte 0x{raw[e.start]:02x} at offset {e.start}"


def test_the_first_bad_byte_is_where_the_strict_decoder_stops():
    rng = np.random.default_rng(0)
    cases = [b"caf\xe9", b"\xff\xfe", "héllo wörld".encode() + b"\x80", "日本".encode()[:-1] + b"x", b"plain"]
    cases += [bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8)) for _ in range(300)]
    for raw in cases:
        assert utf8_problem(raw.decode("utf-8", "surrogateescape")) == _expected(raw), raw
    assert utf8_problem("a\ud800b") == "a lone surrogate U+D800 at character 1"


def test_the_tokenizer_refuses_it_with_a_stepstream_error():
    m = runtime.load(EMBEDDED)
    assert m.tokenize("café") == m.tokenize("café".encode().decode("utf-8", "surrogateescape"))
    with pytest.raises(StepstreamError, match=r"not UTF-8 \(byte 0xe9 at offset 3\)"):
        m.tokenize(b"caf\xe9".decode("utf-8", "surrogateescape"))


def _stepstream(args: list, stdin: bytes = b"") -> subprocess.CompletedProcess:
    root = str(Path(runtime.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": root, "NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], input=stdin, capture_output=True,
                          env=env, timeout=600)


def test_run_names_the_flag_and_the_byte():
    r = _stepstream(["run", "-m", str(EMBEDDED), "-t", "1", "-n", "2", "-p", b"caf\xe9"])
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert r.stderr.decode().strip().splitlines()[-1] == \
        "error: -p/--prompt: the text is not UTF-8 (byte 0xe9 at offset 3)"


def test_chat_skips_the_message_and_goes_on():
    r = _stepstream(["chat", "-m", str(EMBEDDED), "-t", "1", "-n", "3", "--temp", "0"], stdin=b"caf\xe9\nhello\n")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "[this message is not UTF-8 text (byte 0xe9 at offset 3): not sent]" in err
    assert r.stdout.strip(), "no reply to the second message"
