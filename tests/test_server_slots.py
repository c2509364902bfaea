"""llama-server's slot routes (runtime/server/slots.py): a saved KV cache restored into a fresh
server (a restart) spares the next request its prompt and gives the same text; erase empties the
cache; GET /slots shows the slot; bad ids, actions, file names and files are one-line 4xx with
the cache untouched; and llama-server's route aliases (/chat/completions, /models, /v1/health)
answer the openai client given the bare address."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from runtime.loader import load  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
PROMPT = "import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings read from the environment.\"\"\"\n\n" * 6


@contextlib.contextmanager
def _served(save_dir, **kw):
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    model = load(SHIPPED, n_ctx=1024, n_threads=1)
    engine = Engine(model)
    engine.start()
    try:
        with TestClient(create_app(engine, model_name="m", api_key="k", slot_save_path=save_dir, **kw),
                        headers={"Authorization": "Bearer k"}) as client:
            yield client
    finally:
        engine.close()
        model.close()


def _complete(http) -> dict:
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_saved_slot_restored_after_a_restart_spares_the_prompt(tmp_path):
    with _served(tmp_path) as http:
        first = _complete(http)
        n_prompt = first["tokens_evaluated"]
        assert first["timings"]["prompt_n"] == n_prompt  # (an empty cache: all of it evaluated)
        for _ in range(200):  # (the worker's bookkeeping after the reply's last event)
            slots = http.get("/slots").json()
            if not slots[0]["is_processing"]:
                break
            time.sleep(0.01)
        assert len(slots) == 1 and slots[0]["id"] == 0 and slots[0]["is_processing"] is False
        assert slots[0]["n_ctx"] == 1024 and http.get("/slots?fail_on_no_slot=1").status_code == 200
        saved = http.post("/slots/0?action=save", json={"filename": "conv.bin"}).json()
        assert saved["id_slot"] == 0 and saved["filename"] == "conv.bin"
        assert saved["n_saved"] == n_prompt + 12 - 1  # the prompt and the reply but its last token (not evaluated)
        assert saved["n_written"] == (tmp_path / "conv.bin").stat().st_size > 0 and saved["timings"]["save_ms"] > 0
        assert [p.name for p in tmp_path.iterdir()] == ["conv.bin"]  # (no temporary file left)
    with _served(tmp_path) as http:  # a new server, a new model: its cache is empty
        restored = http.post("/slots/0?action=restore", json={"filename": "conv.bin"}).json()
        assert restored["n_restored"] == saved["n_saved"] and restored["n_read"] == saved["n_written"]
        again = _complete(http)
        assert again["content"] == first["content"] and again["timings"]["prompt_n"] == 1  # (the last token's logits)
        erased = http.post("/slots/0?action=erase").json()
        assert erased == {"id_slot": 0, "n_erased": n_prompt + 12 - 1}
        assert _complete(http)["timings"]["prompt_n"] == n_prompt


def test_bad_slot_requests_are_named_and_leave_the_cache(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a state file" * 10)
    with _served(tmp_path) as http:
        _complete(http)
        for url, body, status, words in (
                ("/slots/1?action=save", {"filename": "a"}, 400, "this server has one slot, 0"),
                ("/slots/0?action=load", {"filename": "a"}, 400, "'action' must be save, restore or erase"),
                ("/slots/0?action=save", {"filename": "../a"}, 400, "holds '/'"),
                ("/slots/0?action=save", {"filename": ".."}, 400, "is not a plain file name"),
                ("/slots/0?action=save", {"filename": ".hidden"}, 400, "is not a plain file name"),
                ("/slots/0?action=save", {"filename": "a\u0085b"}, 400, "holds"),
                ("/slots/0?action=save", {"filename": "a" * 201}, 400, "1 to 200 bytes"),
                ("/slots/0?action=save", {}, 400, "filename"),
                ("/slots/0?action=restore", {"filename": "none.bin"}, 400, "no file 'none.bin' in --slot-save-path"),
                ("/slots/0?action=restore", {"filename": "junk.bin"}, 400, "junk.bin")):
            r = http.post(url, json=body)
            assert r.status_code == status and words in r.json()["error"]["message"], (url, body, r.text)
        assert _complete(http)["timings"]["prompt_n"] == 1  # the live cache is still the conversation's
        assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.bin"]
    with _served(None, slots=False) as http:
        r = http.post("/slots/0?action=save", json={"filename": "a"})
        assert r.status_code == 501 and "--slot-save-path" in r.json()["error"]["message"]
        assert http.get("/slots").status_code == 501
        assert http.post("/slots/0?action=erase").json()["n_erased"] == 0  # (erase needs no directory)


def test_llama_servers_route_aliases_answer_the_bare_address(tmp_path):
    openai = pytest.importorskip("openai")
    with _served(None) as http:
        bare = openai.OpenAI(base_url=str(http.base_url).rstrip("/"), api_key="k", http_client=http)
        reply = bare.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert [m.id for m in bare.models.list()] == ["m"]
        assert http.get("/v1/health").json()["status"] == "ok"


def test_serve_refuses_a_slot_save_path_that_is_no_directory(tmp_path, capsys):
    from runtime.cli import main

    assert main(["serve", "-m", str(SHIPPED), "--slot-save-path", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --slot-save-path {tmp_path / 'none'}: not a directory")


def test_a_save_the_server_cannot_write_is_a_500_without_its_paths(tmp_path):
    """(review 100) The save directory gone: a 500 (the server's side, not the request's) naming
    the file as the client named it, not the server's own directory."""
    d = tmp_path / "slots"
    d.mkdir()
    with _served(d) as http:
        _complete(http)
        d.rmdir()
        r = http.post("/slots/0?action=save", json={"filename": "conv.bin"})
        assert r.status_code == 500 and "'conv.bin'" in r.json()["error"]["message"], r.text
        assert str(d) not in r.text
        assert _complete(http)["timings"]["prompt_n"] == 1  # (the model is as it was)


def test_a_restore_keeps_the_live_conversation_in_the_prompt_cache(tmp_path):
    """(review 100) With --cache-ram, the conversation a restore replaces is kept, as before any
    request that would replace it: asked again, it is not evaluated again."""
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.engine import Engine
    from runtime.server.prompt_cache import PromptCache

    model = load(SHIPPED, n_ctx=1024, n_threads=1)
    engine = Engine(model, prompt_cache=PromptCache(64 * 2**20))
    engine.start()
    try:
        with TestClient(create_app(engine, model_name="m", slot_save_path=tmp_path)) as http:
            other = "def main(argv):\n    parser = argparse.ArgumentParser()\n" * 12
            r = http.post("/completion", json={"prompt": other, "n_predict": 4, "temperature": 0}).json()
            http.post("/slots/0?action=save", json={"filename": "other.bin"})
            long = {"prompt": PROMPT * 3, "n_predict": 4, "temperature": 0}  # (past the cache's 256-token floor)
            live = http.post("/completion", json=long).json()  # the live conversation
            assert http.post("/slots/0?action=restore", json={"filename": "other.bin"}).status_code == 200
            again = http.post("/completion", json=long).json()
            assert again["timings"]["prompt_n"] == 1 and live["timings"]["prompt_n"] > 256
            assert again["content"] == live["content"]
            assert r["timings"]["prompt_n"] > 1
    finally:
        engine.close()
        model.close()
