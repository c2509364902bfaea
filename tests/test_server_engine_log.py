"""The server's worker says in its log why a request failed: an expert read that failed (a disk
error) reached the client as `generation_failed`, but whoever ran the server saw nothing."""

from __future__ import annotations

import threading
import types

from runtime.base.errors import StepstreamError
from runtime.server import engine


def test_a_failed_generation_is_in_the_servers_log(monkeypatch, capsys):
    message = "m.gguf: read of 36864 bytes at offset 6022688 failed after 4 tries (Input/output error)"

    def failing(model, request):
        raise StepstreamError(message)
        yield  # a generator, as completion.run is

    monkeypatch.setattr(engine.completion, "run", failing)
    model = types.SimpleNamespace(file=types.SimpleNamespace(problem=lambda: None), reset=lambda: None)
    worker = engine.Engine(model)
    events, done = [], threading.Event()

    def emit(kind, value=None):
        events.append((kind, value))
        done.set()

    job = types.SimpleNamespace(cancel=threading.Event(), stream=True, request=None, emit=emit, action=None, group=None)
    thread = worker.start()
    with worker._cond:
        worker._waiting.append(job)
        worker._cond.notify()
    assert done.wait(30)
    worker.close()
    thread.join(30)
    assert events == [("error", (500, "generation_failed", message))]
    assert f"error: request failed: {message}" in capsys.readouterr().err
