"""Admission to Gradio's queue by client: at most ``limit`` jobs waiting each, taking turns.

``install_client_limits(demo, limit)`` (after ``demo.queue(...)``) puts a ``ClientLimitedQueue`` in
place of the Blocks' queue. Its ``push`` is where Gradio admits a job: ``/queue/join`` (the page and
``gradio_client``) and ``/call/<api_name>`` (the REST API) both call ``blocks._queue.push(body,
request, username)`` before anything waits. There, per client (``components.common.client_identity``:
the signed-in user, else the address the trusted proxy saw, never the session hash):

- a client with ``limit`` queued events waiting (its running ones do not count) is refused with a
  sentence saying when to send again (``pipelines.quotas.pending_refusal``);
- an admitted job goes where its client's turn is (``pipelines.quotas.fair_position``), so a
  visitor's caption waits for one job of each other client, not for everything one client queued.

Unqueued events (``queue=False``: Stop, selections) are neither counted nor refused: ``gradio_client``
sends them through ``/queue/join`` too (the page calls them directly), where they start at once.

Why a Queue subclass: Gradio offers no admission hook. ``max_size`` counts every client together
(one client filled it); an event's ``validator`` runs at admission but has to be added to each event
and answers with 422, which the page paints under an input instead of a toast; a middleware on the
join route would parse the body and find the event a second time and miss nothing the subclass
misses. A refusal here is delivered as the failed completion of the event (as Gradio's own cache hit
in ``push`` delivers a result), so ``gradio_client`` raises ``AppError`` with the sentence and the
page shows an error toast, as for any ``gr.Error``. An HTTP error would not carry it: the client
turns 503 into "Queue is full! Please try again." and 400 or 429 into a bare httpx status error.

Gradio internals this relies on (6.31; ``tests/test_queue_fairness.py`` fails if an upgrade moves them):
``Blocks._queue``, replaced after ``Blocks.queue()`` (routes read it on every request);
``queueing.Queue.__init__`` arguments and attributes of the same names; ``Queue.push(body, request,
username) -> (ok, event id or message, state)``; ``Queue.event_queue_per_concurrency_id`` (``EventQueue
.queue``, the waiting ``Event``s, first to run first); ``Queue.active_jobs`` (running events);
``Event(session_hash, fn, request, username)`` with ``.request``, ``.username``, ``._id``,
``.concurrency_id``; ``Queue.pending_messages_per_session``, ``pending_event_ids_session``,
``pending_message_lock``, ``send_message`` and ``broadcast_estimations``;
``server_messages.ProcessCompletedMessage``, ``utils.error_payload`` and ``route_utils.get_fn``.
"""

from __future__ import annotations

from asyncio import Queue as AsyncQueue
from collections import Counter, OrderedDict
from collections.abc import Callable

import gradio as gr
from gradio import queueing, route_utils
from gradio.server_messages import ProcessCompletedMessage
from gradio.utils import error_payload

from components.common import client_identity
from pipelines.quotas import fair_position, pending_refusal

# Refusals whose completion message no stream has read yet (a client that joins and never listens):
# their ids are dropped from Gradio's per-session bookkeeping past this many, so they cannot pile up.
# As many as Gradio keeps message queues for (its LRU of 2000 sessions).
MAX_UNREAD_REFUSALS = 2000


class ClientLimitedQueue(queueing.Queue):
    """Gradio's queue, admitting at most ``limit`` waiting events per client, in turns by client."""

    def __init__(self, *args, limit: int, identify: Callable[[gr.Request], str] = client_identity, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.identify = identify
        self._admitting: Counter[str] = Counter()  # joins of a client between the check and the append
        self._unread_refusals: OrderedDict[str, str] = OrderedDict()  # event id -> session hash

    @classmethod
    def replacing(cls, queue: queueing.Queue, *, limit: int, **kwargs) -> ClientLimitedQueue:
        """A queue with ``queue``'s settings (as ``Blocks.queue`` made it), admitting by client."""
        return cls(
            live_updates=queue.live_updates,
            concurrency_count=queue.max_thread_count,
            update_intervals=queue.update_intervals,
            max_size=queue.max_size,
            blocks=queue.blocks,
            default_concurrency_limit=queue.default_concurrency_limit,
            limit=limit,
            **kwargs,
        )

    def client_of(self, event: queueing.Event) -> str:
        return self.identify(gr.Request(request=event.request, username=event.username))

    def waiting_clients(self) -> list[str]:
        """The client of each waiting job (a queued event), over every concurrency id."""
        return [
            self.client_of(event)
            for queue in self.event_queue_per_concurrency_id.values()
            for event in queue.queue
            if event.fn.queue
        ]

    async def push(self, body, request, username):
        if body.fn_index is None or not route_utils.get_fn(self.blocks, None, body).queue:
            return await super().push(body=body, request=request, username=username)  # unqueued: not a job
        client = self.identify(gr.Request(request=request, username=username))
        waiting = self.waiting_clients() + [client] * self._admitting[client]
        refusal = pending_refusal(waiting, client, self.limit)
        if refusal is not None:
            return await self._refuse(body, request, username, refusal)
        self._admitting[client] += 1
        try:
            admitted, event_id, state = await super().push(body=body, request=request, username=username)
        finally:
            self._admitting[client] -= 1
            if not self._admitting[client]:
                del self._admitting[client]
        if admitted:
            self._take_turn(event_id, client)
        return admitted, event_id, state

    def _take_turn(self, event_id: str, client: str) -> None:
        """Move the event just appended to its client's turn (see ``pipelines.quotas.fair_position``)."""
        event = self.event_ids_to_events.get(event_id)
        if event is None or event.concurrency_id not in self.event_queue_per_concurrency_id:
            return
        waiting = self.event_queue_per_concurrency_id[event.concurrency_id].queue
        if not waiting or waiting[-1] is not event:
            return  # answered from the cache, or already running
        waiting.pop()
        running = Counter(
            self.client_of(other)
            for job in self.active_jobs
            if job
            for other in job
            if other.concurrency_id == event.concurrency_id
        )
        waiting.insert(fair_position([self.client_of(other) for other in waiting], client, running), event)
        self.broadcast_estimations(event.concurrency_id)  # ranks behind it moved by one

    async def _refuse(self, body, request, username, sentence: str):
        """Answer the join with the event failed at once: the caller gets ``sentence`` as any ``gr.Error``."""
        fn = route_utils.get_fn(self.blocks, None, body)
        event = queueing.Event(body.session_hash, fn, request, username)
        session = event.session_hash  # the client's, or the event id for a REST call without one
        async with self.pending_message_lock:
            if session not in self.pending_messages_per_session:
                self.pending_messages_per_session[session] = AsyncQueue()
            self.pending_event_ids_session.setdefault(session, set()).add(event._id)
        self._remember_unread(event._id, session)
        content = error_payload(gr.Error(sentence, duration=None, print_exception=False), True)
        self.send_message(event, ProcessCompletedMessage(output=content, title="Error", success=False))
        return True, event._id, "success"

    def _remember_unread(self, event_id: str, session: str) -> None:
        self._unread_refusals[event_id] = session
        while len(self._unread_refusals) > MAX_UNREAD_REFUSALS:
            old_id, old_session = self._unread_refusals.popitem(last=False)
            ids = self.pending_event_ids_session.get(old_session)
            if ids is not None:
                ids.discard(old_id)
                if not ids:
                    self.pending_event_ids_session.pop(old_session, None)


def install_client_limits(demo: gr.Blocks, limit: int) -> ClientLimitedQueue:
    """Admit at most ``limit`` waiting jobs per client to ``demo``'s queue, in turns (after ``demo.queue``)."""
    demo._queue = ClientLimitedQueue.replacing(demo._queue, limit=limit)
    return demo._queue
