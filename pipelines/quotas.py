"""Fair shares of the one GPU: pending jobs per client, the order they run in, and what one job may cost.

No gradio here: ``components/queue_limits.py`` feeds these functions the clients of the events in
Gradio's queue (``components.common.client_identity``: the signed-in user, else the address the
trusted proxy saw; never the session hash, which a client picks itself).

- ``pending_refusal``: the sentence for a client that already has ``limit`` jobs waiting, else None.
- ``fair_position``: where a new job goes in a queue so that every client gets one turn per round
  (a client's running job is its turn in the current round), instead of first come, first served.
- ``check_job_cost``: a public instance refuses an SD3.5 job that would hold the GPU for minutes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence


def pending_refusal(pending_clients: Iterable[str], client: str, limit: int) -> str | None:
    """The sentence refusing one more job of ``client`` when ``pending_clients`` (one entry per job
    waiting, running ones excluded) already hold ``limit`` of its jobs; None when it may join."""
    waiting = sum(1 for other in pending_clients if other == client)
    if waiting < limit:
        return None
    jobs = "job" if limit == 1 else "jobs"
    return f"You already have {waiting} {jobs} waiting; wait for one to finish, then send this again."


def fair_position(queued_clients: Sequence[str], client: str, running: Mapping[str, int]) -> int:
    """The index in a queue (clients of the waiting jobs, first to run first) for a new job of ``client``.

    Each job's round is how many jobs of its client run or wait ahead of it. The new job goes
    after every job of its round or an earlier one, and before the first job of a later round:
    so a visitor's first job waits for one job of each other client, not for all of their jobs.
    """
    turns = Counter(running)
    new_round = turns[client] + sum(1 for other in queued_clients if other == client)
    for index, other in enumerate(queued_clients):
        if turns[other] > new_round:
            return index
        turns[other] += 1
    return len(queued_clients)


def job_cost(steps: int, images: int, width: int, height: int, default_side: int) -> float:
    """What an SD3.5 job costs, in image-steps at the model's default size (``default_side`` squared):
    denoising time grows with the steps, the images and the pixels of each."""
    return steps * images * (width * height) / (default_side * default_side)


def check_job_cost(steps: int, images: int, width: int, height: int, default_side: int, limit: int | None) -> None:
    """ValueError with a sentence when the job costs more than ``limit`` image-steps (None: no bound)."""
    if limit is None:
        return
    cost = job_cost(steps, images, width, height, default_side)
    if cost <= limit:
        return
    most_steps = int(limit * default_side * default_side // (images * width * height))
    fix = (
        f"use at most {most_steps} steps, or fewer images or a smaller size"
        if most_steps
        else "use fewer images or a smaller size"
    )
    raise ValueError(
        f"{steps} steps x {images} image{'s' if images != 1 else ''} at {width}x{height} cost {cost:g} "
        f"image-steps at {default_side}x{default_side}, and this public instance runs at most {limit} a job; {fix}."
    )
