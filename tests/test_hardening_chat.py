"""`stepstream chat` (issue 12, item 16): how to leave, Ctrl-C stops a reply, context shift.

The first tests drive `stepstream chat` as a real subprocess on the embedded model with
stdin, a real SIGINT and a small --ctx-size. The in-process tests pin down the state: a
Ctrl-C inside the evaluation of a reply's k-th token leaves the model and the conversation
exactly as a reply of max_tokens=k does (the interrupted evaluation is rolled back), so the
next reply is bit-identical; and a shifted conversation keeps its system prompt and fits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numba
import pytest

import runtime
from tests.helpers.faulty_experts import FaultyExperts

EMBEDDED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
LONG = "Write a long story about the sea."  # greedy: 300 tokens without an end-of-text on the embedded model


class Chat:
    """`stepstream chat` in a subprocess, its stdout and stderr collected as they come."""

    def __init__(self, *args: str):
        root = str(Path(runtime.__file__).parents[1])  # the code under test, whatever is installed
        env = {**os.environ, "PYTHONPATH": root, "NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        # Started with SIGINT ignored, as a shell without job control starts background commands (a
        # CI run started with `&`): the chat must still stop a reply on Ctrl-C.
        self.p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "chat", "-m", str(EMBEDDED), "-t", "1", *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, buf: bytearray) -> None:
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    def wait_for(self, what, timeout: float = 240.0) -> None:
        """Until what() is true; fails with both streams when the process ends first or time runs out."""
        end = time.monotonic() + timeout
        while not what():
            assert self.p.poll() is None, f"chat ended ({self.p.returncode}): {self.text()}"
            assert time.monotonic() < end, f"timed out: {self.text()}"
            time.sleep(0.02)

    def send(self, line: str) -> None:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def close(self, timeout: float = 240.0) -> int:
        """Ctrl-D: end of input; the exit status."""
        self.p.stdin.close()
        rc = self.p.wait(timeout)
        for t in self._readers:
            t.join(10)
        return rc

    def text(self) -> str:
        return f"stdout={bytes(self.out).decode(errors='replace')!r} stderr={bytes(self.err).decode(errors='replace')[-2000:]!r}"


def test_says_how_to_leave_and_leaves_at_end_of_input():
    chat = Chat()
    assert chat.close() == 0 and chat.out == b""
    how = [line for line in bytes(chat.err).decode().splitlines() if "/exit" in line]
    assert len(how) == 1 and all(word in how[0] for word in ("/quit", "Ctrl-D", "Ctrl-C stops a reply")), chat.text()


def test_ctrl_c_stops_the_reply_not_the_session():
    chat = Chat("--temp", "0", "-n", "1000", "-c", "2048")
    chat.send(LONG)
    chat.wait_for(lambda: len(chat.out) > 20)  # the reply is streaming
    chat.p.send_signal(signal.SIGINT)
    chat.wait_for(lambda: b"[reply stopped]" in chat.err)
    first = len(chat.out)
    assert chat.out.endswith(b"\n")
    chat.send("and then?")
    chat.wait_for(lambda: len(chat.out) > first + 20)  # the session goes on with the next reply
    chat.p.send_signal(signal.SIGINT)
    chat.wait_for(lambda: chat.err.count(b"[reply stopped]") == 2)
    assert chat.close() == 0, chat.text()
    assert b"Traceback" not in chat.err and b"interrupted" not in chat.err, chat.text()


def test_context_shift_drops_the_oldest_turns_and_goes_on():
    """A 96-token context and ten short exchanges, each reply one line (-r '\\n'): every message gets
    its reply, the oldest turns are dropped with one line each time, the session ends normally."""
    questions = ["hello there", "what is a list?", "how do I sort it", "and reverse it?", "thanks a lot",
                 "what about dicts?", "and sets?", "bye now", "one more", "the last one"]
    chat = Chat("--temp", "0", "-n", "12", "-c", "96", "-r", "\n", "-sys", "Be brief.")
    for q in questions:
        chat.send(q)
    assert chat.close() == 0, chat.text()
    replies = bytes(chat.out).decode().split("\n")
    assert len(replies) == len(questions) + 1 and replies[-1] == "", chat.text()
    shifts = [line for line in bytes(chat.err).decode().splitlines() if line.startswith("[context full (96 tokens)")]
    assert len(shifts) >= 3, chat.text()
    assert all(re.fullmatch(r"\[context full \(96 tokens\): dropped the \d+ oldest messages \(\d+ tokens\); "
                            r"the system prompt and the last \d+ remain\]", s) for s in shifts), shifts
    assert b"error" not in chat.err and b"Traceback" not in chat.err


# ------------------------------------------------------------------ in process


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = numba.get_num_threads()
    numba.set_num_threads(1)  # a shared, busy test machine; see test_hardening_state
    yield
    numba.set_num_threads(before)


def _conversation(*args, **kwargs):
    from runtime.generation import Conversation

    return Conversation(*args, **kwargs)


def _greedy():
    from runtime.generation import sampling_params

    return sampling_params(temperature=0)


def _model():
    m = runtime.load(EMBEDDED, experts="ram", n_ctx=512)
    m.provider = FaultyExperts(m.provider, 2)
    return m


def test_ctrl_c_inside_a_token_equals_stopping_there():
    k = 5
    stopped = _conversation(_model(), "Be brief.", _greedy(), max_tokens=k)
    assert all(isinstance(p, str) for p in stopped.reply(LONG))

    cut = _conversation(_model(), "Be brief.", _greedy(), max_tokens=None)
    # KeyboardInterrupt in block 2 on the n-th expert request: the prompt is requests 1 and 2 (all
    # but its last token, then that token: Model.eval_prompt copies the rings in between), the
    # evaluation of reply token j is request j + 2; so inside reply token k, after it was shown
    cut.model.provider.arm(KeyboardInterrupt(), k + 2)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in cut.reply(LONG):
            shown.append(piece)
    assert cut.model.provider.exc is None  # it fired
    assert cut.messages == stopped.messages and cut.messages[-1]["content"] == "".join(shown) != ""
    assert cut.model.history == stopped.model.history and cut.model.n_past == len(cut.model.history)

    stopped.max_tokens = cut.max_tokens = 8
    assert list(cut.reply("and then?")) == list(stopped.reply("and then?"))
    assert cut.model.history == stopped.model.history


def test_closing_a_reply_keeps_what_was_shown():
    """The CLI closes the reply when Ctrl-C comes while it prints (outside any evaluation)."""
    conv = _conversation(_model(), None, _greedy(), max_tokens=None)
    pieces = conv.reply(LONG)
    shown = [next(pieces) for _ in range(4)]
    pieces.close()
    assert conv.messages == [{"role": "user", "content": LONG}, {"role": "assistant", "content": "".join(shown)}]
    model = conv.model
    assert model.n_past == len(model.history)
    prompt = model.chat_tokens(conv.messages[:1])
    assert model.history[: len(prompt)] == prompt and len(model.history) >= len(prompt) + 3


def test_shifted_conversation_keeps_the_system_prompt_and_fits():
    m = runtime.load(EMBEDDED, experts="ram", n_ctx=80)
    conv = _conversation(m, "Be brief.", _greedy(), max_tokens=10, stops=["\n"])
    notices = []
    for q in ["hello there", "what is a list?", "how do I sort it", "and reverse it?", "thanks a lot"]:
        notices += [p.text for p in conv.reply(q) if not isinstance(p, str)]
        assert conv.messages[0] == {"role": "system", "content": "Be brief."}
        assert [x["role"] for x in conv.messages[1:]] == ["user", "assistant"] * ((len(conv.messages) - 1) // 2)
        assert conv.messages[-2]["content"] == q
        assert len(m.chat_tokens(conv.messages[:-1])) + 10 <= m.n_ctx
    assert notices and all(n.startswith("context full (80 tokens): dropped the 2 oldest messages") for n in notices)


def test_a_reply_that_fills_the_context_after_a_shift_goes_on_then_stops():
    """Without a token limit the reply drops the earlier exchange mid-reply, continues, and stops with
    one line when only the system prompt and its own question are left."""
    m = runtime.load(EMBEDDED, experts="ram", n_ctx=96)
    conv = _conversation(m, "Be brief.", _greedy(), max_tokens=12)
    list(conv.reply("hello there"))
    conv.max_tokens = None
    pieces = list(conv.reply("what is a list?"))
    notes = [i for i, p in enumerate(pieces) if not isinstance(p, str)]
    assert [pieces[i].text.split(":")[0] for i in notes] == ["context full (96 tokens)", "the reply filled the context of 96 tokens"]
    assert notes[0] > 0 and any(isinstance(p, str) for p in pieces[notes[0] + 1 : notes[1]])  # it went on
    assert [x["role"] for x in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[-1]["content"] == "".join(p for p in pieces if isinstance(p, str))


def test_a_message_longer_than_the_context_is_not_sent():
    m = runtime.load(EMBEDDED, experts="ram", n_ctx=48)
    conv = _conversation(m, "Be brief.", _greedy(), max_tokens=4)
    list(conv.reply("hi"))
    before = list(conv.messages)
    pieces = list(conv.reply("word " * 60))
    assert len(pieces) == 1 and not isinstance(pieces[0], str)
    assert re.fullmatch(r"this message needs \d+ tokens with the system prompt, more than the context of 48: not sent "
                        r"\(shorten it, or start with a larger --ctx-size\)", pieces[0].text)
    assert conv.messages == before  # nothing dropped for a message that could not fit anyway
    assert any(isinstance(p, str) for p in conv.reply("hi"))  # and the conversation goes on


def test_a_line_of_another_encoding_is_skipped_under_a_strict_utf8_locale():
    """Under a UTF-8 locale that decodes strictly (en_US.UTF-8), a Latin-1 line raised
    UnicodeDecodeError out of readline: a traceback, exit 1, and the next line never answered.
    The line is named and skipped, as README promises, and the chat goes on."""
    root = str(Path(runtime.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": root, "NUMBA_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "chat", "-m", str(EMBEDDED), "-t", "1", "--temp", "0",
                        "-n", "4", "--stats"], input=b"caf\xe9 ol\xe9\nhello\n", capture_output=True, env=env,
                       timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "[this message is not UTF-8 text (byte 0xe9 at offset 3): not sent]" in err
    assert r.stdout.strip()  # "hello" was answered
    assert re.search(r"^peak RSS \d+ MiB", err, re.M), err  # --stats was ignored by chat


def test_ctrl_c_while_a_message_is_measured_leaves_no_turn_without_a_reply():
    """The message joined the conversation before it was tokenized, outside the block that closes
    a turn: Ctrl-C there left a user turn with no reply, and the next prompt had two user turns in
    a row. Now the conversation is as if the message was never sent."""
    from runtime.generation.conversation import Conversation
    from runtime.generation.sampling import SamplingParams

    model = runtime.load(EMBEDDED, n_threads=1, n_ctx=512)
    conv = Conversation(model, None, SamplingParams(temperature=0.0), max_tokens=4)
    list(conv.reply("first"))
    before = [dict(m) for m in conv.messages]
    real = model.chat_tokens

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model.chat_tokens = interrupted
    with pytest.raises(KeyboardInterrupt):
        list(conv.reply("boom"))
    model.chat_tokens = real
    assert conv.messages == before
    list(conv.reply("next"))
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]


def test_text_a_terminal_cannot_show_is_replaced_not_fatal():
    """On a Latin-1 (or ASCII) terminal a reply character outside its encoding ended the command
    in UnicodeEncodeError and lost the conversation; the command line's stdout now writes "?"."""
    import io

    from runtime.cli import _CheckedStdout

    raw = io.BytesIO()
    latin1 = io.TextIOWrapper(raw, encoding="latin-1")
    out = _CheckedStdout(latin1)
    out.write("café 🙂 – ok")
    out.flush()
    assert raw.getvalue() == "café ? ? ok".encode("latin-1")
