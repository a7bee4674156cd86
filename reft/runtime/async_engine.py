"""The serving loop: `ServingEngine.step()` in one background thread, results to asyncio.

The server's event loop never runs a forward step: it submits requests and aborts through a
locked inbox and awaits per-request outputs on asyncio queues. The engine thread applies the
inbox at each step boundary (so requests join and leave the batch between steps), runs the step
(the backend call releases the GIL) and hands the step's outputs to the event loop in one
`call_soon_threadsafe`, however many requests they are for.
"""
from __future__ import annotations

import asyncio
import threading
import weakref

from ..errors import RequestError
from .serving import Request, RequestOutput, ServingEngine


class Overloaded(RequestError):
    """More sequences in flight than the server admits (running + queued)."""


class AsyncEngine:
    def __init__(self, serving: ServingEngine, max_in_flight: int):
        self.serving = serving
        self.max_in_flight = max_in_flight
        self.in_flight = 0                        # sequences submitted and not finished (event loop only)
        self._cv = threading.Condition()
        self._adds: list[Request] = []
        self._aborts: list[str] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.step_error: str | None = None        # the last unexpected error of the loop itself

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="reft-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- requests (called on the event loop) -------------------------------------------------------
    def submit(self, reqs: list[Request]) -> "RequestStream":
        """Queue the choices of one API request; raises (nothing queued) if they cannot be served."""
        if self.in_flight + len(reqs) > self.max_in_flight:
            raise Overloaded(f"the server is at capacity ({self.max_in_flight} sequences running or queued);"
                             " retry later")
        for r in reqs:
            self.serving.check(r)
        stream = RequestStream(self, [r.id for r in reqs])
        self.in_flight += len(reqs)
        with self._cv:
            self._adds.extend(reqs)
            self._cv.notify()
        return stream

    def _forget(self, ids: set[str]) -> None:
        """Abort what is still pending of a stream that ended early (client gone, error)."""
        if not ids:
            return
        for rid in ids:
            self._queues.pop(rid, None)
        self.in_flight -= len(ids)
        with self._cv:
            self._aborts.extend(ids)
            self._cv.notify()
        ids.clear()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    # --- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        serving = self.serving
        while True:
            with self._cv:
                while not (self._stop or self._adds or self._aborts or serving.has_work):
                    self._cv.wait()
                if self._stop:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            outs = []
            for r in adds:
                try:
                    serving.add(r)
                except Exception as e:  # noqa: BLE001 - checked on submit; a late failure fails the request
                    outs.append(RequestOutput(r.id, finish_reason="error", error=str(e)))
            for rid in aborts:
                serving.abort(rid)   # its consumer is gone: nothing to deliver
            try:
                outs += serving.step()
            except Exception as e:  # noqa: BLE001 - keep serving; fail what was running
                self.step_error = f"{type(e).__name__}: {e}"
                outs += serving.fail_all(self.step_error)
            if outs:
                self._loop.call_soon_threadsafe(self._deliver, outs)


class RequestStream:
    """Async iterator over the outputs of one API request's sequences.

    Closing it, or dropping it unfinished (a response cancelled before it even started reading),
    aborts the sequences still running, so a vanished client never keeps pages busy.
    """

    def __init__(self, engine: AsyncEngine, ids: list[str]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = set(ids)
        self._engine = engine
        for rid in ids:
            engine._queues[rid] = self.queue
        self._finalizer = weakref.finalize(self, engine._forget, self.pending)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.pending:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished and out.request_id in self.pending:
            self.pending.discard(out.request_id)
            self._engine._queues.pop(out.request_id, None)
            self._engine.in_flight -= 1
        return out

    def close(self) -> None:
        self._finalizer()
