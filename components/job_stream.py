"""One relay for every SD3.5 job an event runs: previews and progress to the page while it draws.

    for kind, value in stream_job(lambda on_step: studio.generation(request, on_step=on_step), progress):
        if kind == "preview": yield ... value ...   # a PIL image of the latest step
        else: outcome = value                       # ("done", the job's result)

The job runs in a worker thread, in a copy of the request's context (so ``gr.Info`` notes it
sends reach the page); this generator, in the request's own thread, moves the progress bar and
yields each step's preview. An exception in the job is raised here, in the request's thread,
where ``user_errors`` turns it into a sentence.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator

StepCallback = Callable[[int, int, list | None], None]


def stream_job(
    job: Callable[[StepCallback], object], progress, *, name: str = "sd3-job"
) -> Iterator[tuple[str, object]]:
    """Run ``job(on_step)`` in a worker thread; yield ("preview", image) per step preview, then ("done", result).

    ``progress`` is the event's ``gr.Progress`` (or any callable taking ``((step, total), desc=, unit=)``).
    """
    events: queue.Queue = queue.Queue()

    def work():
        try:
            events.put(("done", job(lambda step, total, previews: events.put(("step", step, total, previews)))))
        except BaseException as error:  # re-raised below, in the request's thread
            events.put(("error", error))

    threading.Thread(target=contextvars.copy_context().run, args=(work,), name=name, daemon=True).start()
    while True:
        event = events.get()
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            yield "done", event[1]
            return
        _, step, total, previews = event
        progress((step, total), desc="denoising", unit="steps")
        if previews:
            yield "preview", previews[0]
