"""One model, one worker, a bounded queue of requests served in order.

The HTTP handlers run on uvicorn's event loop; the model runs on the worker, one request at a
time, so the KV cache the next request may reuse is always the last request's. `stepstream
serve` runs the worker on the main thread (`serve_forever`) and uvicorn on another: Numba's
OpenMP kernels called from a thread other than the main one decode several times slower
(measured on the shipped model with libgomp's default waits: 35 tok/s on a thread against
1,100 on the main thread; with OMP_WAIT_POLICY=PASSIVE, 300-350 on either). `start()` runs the worker on a thread instead, for embedding.
A handler submits a Job and reads its events, which the worker fills in:

    ("step", completion.Step) ...  then  ("done", None)  or  ("error", (status, code, message))

A job may instead be an action, a call on the model between requests (llama-server's slot
save, restore and erase: runtime.server.slots): ("result", its value) or ("error", ...).

Waking the event loop costs the worker a thread switch and the GIL, so events go through a
plain deque and the loop is woken at most once per GAP_S: after taking a batch it comes back
by itself GAP_S later, and only an idle loop is woken by the worker. Tokens that arrive in
between go out together (at a small model's 1,000 tok/s, about 20 per chunk; at the real
model's tens of tok/s, one). The end of a job ("done", "error", a whole reply) cuts the gap
short: otherwise the last tokens would reach the client up to GAP_S late, which at 1,000
tok/s is 10% of a 200-token reply's time.

`submit` refuses at once (Busy) when `queue_size` requests are already waiting, so a burst
of clients gets 503s instead of an unbounded backlog. A job whose client has gone away is
cancelled: skipped if it is still waiting, stopped within one token if it is running.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
from dataclasses import dataclass, field

from runtime.base.errors import StepstreamError
from runtime.generation import request as completion
from runtime.server.metrics import Metrics


GAP_S = 0.02  # the shortest time between two batches of a job's events


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    request: completion.Request | None
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # False: the steps are sent to the handler once, at the end
    cancel: threading.Event = field(default_factory=threading.Event)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _events: collections.deque = field(default_factory=collections.deque)
    _taken: bool = False  # next_events has returned a batch before
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _woken: bool = False  # the loop will look at the events without being woken
    _ended: asyncio.Event = field(default_factory=asyncio.Event)  # the job's last event is queued
    action: object = None  # a job with no request: action(model), run between requests
    group: object = None  # the jobs of one request's choices share a group (Engine.submit_group)

    ENDS = frozenset(("done", "error", "steps", "result"))  # kinds after which the job sends nothing more

    def emit(self, kind: str, value=None) -> None:
        """Worker side: queue an event, waking the loop unless a wake-up is already pending."""
        end = kind in self.ENDS
        with self._lock:
            self._events.append((kind, value))
            if self._woken and not end:
                return
            self._woken = True
        try:
            self.loop.call_soon_threadsafe(self._wake, end)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancel.set()

    async def next_events(self) -> list[tuple[str, object]]:
        """Loop side: every event queued so far (waits for at least one). The first call returns
        as soon as there is an event; later ones not before GAP_S after the previous one, unless
        the job's last event comes first."""
        if self._taken:
            if not self._ended.is_set():
                try:
                    await asyncio.wait_for(self._ended.wait(), GAP_S)
                except asyncio.TimeoutError:
                    pass
            with self._lock:
                self._woken = bool(self._events)  # nothing new: the worker's next event wakes us
        self._taken = True
        if not self._woken:
            await self._ready.wait()
        with self._lock:
            self._ready.clear()
            self._woken = True  # until the gap has passed, the worker need not wake us
            out = list(self._events)
            self._events.clear()
        return out

    def _wake(self, end: bool) -> None:  # on the loop
        self._ready.set()
        if end:
            self._ended.set()


class Engine:
    def __init__(self, model, queue_size: int = 8, prompt_cache=None):
        """prompt_cache: a runtime.server.prompt_cache.PromptCache, which keeps conversations'
        KV caches between requests (None: only the live cache is reused)."""
        self.model = model
        self.prompt_cache = prompt_cache
        self._file_reported = False  # the model file's change is said once in the server's log
        self.queue_size = queue_size
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.busy = False  # the worker is running a job
        self._group = None  # the group of the job it runs (its choices still waiting are that request's)
        self._last_group = None  # the group of the last request the model ran
        self.served = 0
        self.decoded = 0  # steps of the running request so far (GET /slots)
        self.metrics = Metrics()  # totals over the requests served (GET /metrics)

    @property
    def waiting(self) -> int:
        """The requests waiting (a request's several choices count once, and not at all while one
        of them runs)."""
        with self._cond:
            return self._requests(j for j in self._waiting if not j.cancel.is_set())

    def _requests(self, jobs) -> int:
        return len({id(j) if j.group is None else id(j.group) for j in jobs
                    if j.group is None or j.group is not self._group})

    def start(self) -> threading.Thread:
        """Run the worker on a thread of its own (slower kernels: see the module's docstring)."""
        thread = threading.Thread(target=self.serve_forever, name="stepstream-model", daemon=True)
        thread.start()
        return thread

    def submit(self, request: completion.Request, stream: bool = True) -> Job:
        """Queue a request, or raise Busy when queue_size requests are waiting (those whose client
        has left do not count: they are dropped here)."""
        return self.submit_group([request], stream)[0]

    def submit_group(self, requests: list[completion.Request], stream: bool = True) -> list[Job]:
        """Queue the requests of one HTTP request's choices (OpenAI's `n`, several prompts) as one:
        they count once against queue_size, and run one after the other with no other request
        between them, so each after the first finds the prompt it shares in the live cache."""
        loop = asyncio.get_running_loop()
        group = object() if len(requests) > 1 else None
        jobs = [Job(r, loop, stream, group=group) for r in requests]
        for job in jobs:
            job.request.cancelled = job.cancel.is_set
        self._queue(jobs)
        return jobs

    def _queue(self, jobs: list[Job]) -> None:
        with self._cond:
            self._waiting = collections.deque(j for j in self._waiting if not j.cancel.is_set())
            if self._closed or self._requests(self._waiting) >= self.queue_size:
                raise Busy
            self._waiting.extend(jobs)
            self._cond.notify()

    def submit_action(self, action) -> Job:
        """Queue `action(model)`, to run between requests (Busy as submit). Its job ends with
        ("result", what it returned), or ("error", (400, "invalid_value", message)) when it raised
        a StepstreamError (the action leaves the model sound)."""
        job = Job(None, asyncio.get_running_loop(), stream=False, action=action)
        self._queue([job])
        return job

    def _act(self, job: Job) -> None:
        self.busy = True
        self.decoded = 0
        try:
            job.emit("result", job.action(self.model))
        except StepstreamError as e:  # the request's (400), or the server's where the error says so
            status = getattr(e, "status", 400)
            job.emit("error", (status, "invalid_value" if status < 500 else "action_failed", str(e)))
        except Exception as e:  # a bug: the model starts again from an empty cache
            print(f"error: slot action failed: {type(e).__name__}: {e}", file=sys.stderr)
            self.model.reset()
            job.emit("error", (500, "internal_error", f"internal error: {type(e).__name__}"))
        finally:
            self.busy = False

    def close(self, reason: str = "the server is shutting down") -> None:
        """Make serve_forever return after the job it is running; waiting jobs end with an error."""
        with self._cond:
            self._closed = True
            dropped, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in dropped:
            job.emit("error", (503, "server_shutting_down", reason))

    def _prepare(self, prompt: list[int]) -> None:
        """The prompt cache's turn: a saving, never a reason to fail the request. When it fails
        (out of memory for a copy, say), the request goes on from a reset cache."""
        try:
            self.prompt_cache.prepare(self.model, prompt)
        except Exception as e:  # (a BaseException, Ctrl-C, goes on up)
            print(f"warning: prompt cache: {type(e).__name__}: {e}; the request goes on without it",
                  file=sys.stderr, flush=True)
            self.model.reset()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            self._group = job.group
            return job

    def serve_forever(self) -> None:
        while (job := self._next()) is not None:
            if job.cancel.is_set():
                continue
            if job.action is not None:
                self._act(job)
                continue
            self.busy = True
            self.decoded = 0
            try:
                # a request's later choices reuse their prompt from the live cache: the choice
                # before them is not kept (it would push other conversations out)
                if self.prompt_cache is not None and (job.group is None or job.group is not self._last_group):
                    self._prepare(job.request.prompt)
                self._last_group = job.group
                if job.stream:
                    for step in completion.run(self.model, job.request):
                        self.decoded += 1
                        job.emit("step", step)
                else:
                    steps = []
                    for step in completion.run(self.model, job.request):
                        self.decoded += 1
                        steps.append(step)
                    job.emit("steps", steps)
                job.emit("done")
            except StepstreamError as e:  # the evaluation rolled back: the model is sound
                if self.model.file.problem() is not None:  # not the request's fault
                    if not self._file_reported:
                        self._file_reported = True
                        print(f"error: {e} (every request fails now, and /health answers 503: restart the server)",
                              file=sys.stderr, flush=True)
                else:  # an expert read that failed (a disk error), say: whoever runs the server must see it
                    print(f"error: request failed: {e}", file=sys.stderr, flush=True)
                job.emit("error", (500, "generation_failed", str(e)))
            except Exception as e:  # a bug: the request fails, the server keeps serving
                print(f"error: request failed: {type(e).__name__}: {e}", file=sys.stderr)
                self.model.reset()
                job.emit("error", (500, "internal_error", f"internal error: {type(e).__name__}"))
            except BaseException:  # Ctrl-C or SIGTERM: this client hears why before the server stops
                job.emit("error", (503, "server_shutting_down", "the server is shutting down"))
                raise
            finally:
                timings = getattr(job.request, "timings", None)
                if timings is not None:  # (a request that never reached the model has none)
                    self.metrics.record(timings, len(job.request.prompt))
                self.busy = False
                self.served += 1
