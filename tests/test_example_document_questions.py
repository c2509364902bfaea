"""examples/document_questions.py as a user runs it: the document is evaluated once, its KV cache
written to a state file that the next run loads; each question evaluates only its own tokens;
the answers are the ones a fresh evaluation of document + question gives; bad input is one line
and exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import runtime

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
EXAMPLE = ROOT / "examples" / "document_questions.py"
QUESTIONS = ["What does it return?", "Which module is imported?"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), str(MODEL), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_the_document_is_evaluated_once_and_each_question_alone(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((ROOT / "runtime" / "model" / "serial.py").read_text() * 3)
    first = _run(str(doc), *QUESTIONS, "-n", "8", "-c", "4096")
    assert first.returncode == 0, first.stderr
    n = int(re.search(r"document: (\d+) tokens, 0 from nothing", first.stderr).group(1))
    assert Path(str(doc) + ".kvstate").exists()
    second = _run(str(doc), *QUESTIONS, "-n", "8", "-c", "4096")
    assert second.returncode == 0 and f"{n - 1} from {doc}.kvstate" in second.stderr, second.stderr
    evaluated = [(int(a), int(b)) for a, b in re.findall(r"\[(\d+) of (\d+) prompt tokens evaluated", second.stderr)]
    assert len(evaluated) == 2 and all(e == total - n for e, total in evaluated), second.stderr  # the question alone
    assert first.stdout == second.stdout
    answers = [block.split("\n", 1)[1].strip() for block in second.stdout.split("\n> ")[1:]]
    with runtime.load(str(MODEL), n_ctx=4096) as m:  # the reference: document + question from nothing
        ids = m.tokenize(doc.read_text() + "\n\n")
        assert len(answers) == len(QUESTIONS)
        for q, got in zip(QUESTIONS, answers):
            m.reset()
            want = m.create_completion(ids + m.tokenize(f"Question: {q}\nAnswer:", add_bos=False), max_tokens=8,
                                       temperature=0)["choices"][0]["text"].strip()
            assert got == want


def test_bad_input_is_one_line(tmp_path):
    r = _run(str(tmp_path / "missing.txt"), "q")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in r.stderr
    big = tmp_path / "big.txt"
    big.write_text("word " * 3000)
    r = _run(str(big), "q", "-c", "1024")
    assert r.returncode == 2 and "give a larger -c" in r.stderr
