"""One background thread for all model work, with results handed back on the thread that asks for them.

MRML belongs to the main (GUI) thread: jobs get numpy arrays and library prompts, never nodes, and their results
are delivered by :meth:`ModelWorker.deliver`, which the GUI calls (a timer in Slicer, a loop in tests). One thread,
not one per job: torch's intra-op thread pool belongs to the calling thread, and several pools on two cores are
slower (see MemorizingSAMLib.server).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ModelWorker:
    def __init__(
        self,
        on_error: Callable[[BaseException], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="MemorizingSAM")
        self._finished: queue.Queue = queue.Queue()
        self._pending = 0
        self.submitted = 0  # jobs ever submitted (what a test counts to see that nothing was recomputed)
        self.on_error = on_error
        # Called on the worker thread when a job has finished, so that an event loop can schedule deliver() at
        # once instead of polling (the web app: loop.call_soon_threadsafe). It must not touch MRML itself.
        self.wake = wake

    @property
    def busy(self) -> bool:
        """Jobs submitted whose results have not been delivered yet."""
        return self._pending > 0

    def submit(
        self,
        fn: Callable[[], Any],
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> Future:
        """Run ``fn`` on the worker thread; ``on_done(result)`` or ``on_error(exception)`` run in :meth:`deliver`."""
        self._pending += 1
        self.submitted += 1
        future = self._executor.submit(fn)
        future.add_done_callback(lambda f: self._finished_job(f, on_done, on_error))
        return future

    def _finished_job(self, future: Future, on_done, on_error) -> None:
        self._finished.put((future, on_done, on_error))
        if self.wake is not None:
            self.wake()

    def deliver(self, block: bool = False, timeout: float | None = None) -> int:
        """Hand finished jobs' results to their callbacks, on the calling thread; returns how many. ``block``
        waits for at least one when any is pending."""
        n = 0
        while self._pending:
            try:
                future, on_done, on_error = self._finished.get(block=block and n == 0, timeout=timeout)
            except queue.Empty:
                break
            self._pending -= 1
            n += 1
            error = future.exception()
            if error is None:
                if on_done is not None:
                    on_done(future.result())
            elif (on_error or self.on_error) is not None:
                (on_error or self.on_error)(error)
            else:
                raise error
        return n

    def wait(self, timeout: float | None = None) -> None:
        """Until every submitted job has run and its result was delivered (running and queued jobs finish first:
        undo, redo and a volume change call this before touching the session)."""
        while self._pending:
            if not self.deliver(block=True, timeout=timeout):
                raise TimeoutError(f"model work still running after {timeout} s")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker after everything before it, and return its result (or raise its error)."""
        self.wait()
        box: dict = {}

        def done(result):
            box["result"] = result

        def failed(error):
            box["error"] = error

        self.submit(fn, done, failed)
        self.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
