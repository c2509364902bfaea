"""One model, one worker thread, a bounded queue of requests served in order.

The HTTP handlers run on uvicorn's event loop; the model runs on the worker thread, one
request at a time, so the KV cache the next request may reuse is always the last request's.
A handler submits a Job and reads its events from an asyncio queue that the worker fills:

    ("step", completion.Step) ...  then  ("done", None)  or  ("error", message)

`submit` refuses at once (Busy) when `queue_size` requests are already waiting, so a burst
of clients gets 503s instead of an unbounded backlog. A job whose client has gone away is
cancelled: skipped if it is still waiting, stopped within one token if it is running.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from dataclasses import dataclass, field

from runtime.base.errors import StepstreamError
from runtime.server import completion


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    request: completion.Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancel.set()


class Engine:
    def __init__(self, model, queue_size: int = 8):
        self.model = model
        self.queue_size = queue_size
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="stepstream-model", daemon=True)
        self.busy = False  # the worker is running a job
        self.served = 0
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, request: completion.Request) -> Job:
        job = Job(request, asyncio.get_running_loop())
        request.cancelled = job.cancel.is_set
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job

    def close(self) -> None:
        try:
            self._jobs.put(None, timeout=1)
        except queue.Full:
            pass

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            self.busy = True
            try:
                for step in completion.run(self.model, job.request):
                    job.emit("step", step)
                job.emit("done")
            except StepstreamError as e:  # the evaluation rolled back: the model is sound
                job.emit("error", str(e))
            except Exception as e:  # a bug: the request fails, the server keeps serving
                print(f"error: request failed: {type(e).__name__}: {e}", file=sys.stderr)
                self.model.reset()
                job.emit("error", f"internal error: {type(e).__name__}")
            finally:
                self.busy = False
                self.served += 1
