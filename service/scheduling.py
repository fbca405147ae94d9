"""Which queued jobs the next model run serves: the batcher's policies as plain functions over Jobs.

The batcher (service.batcher) owns the queue, the worker and the threads; these functions only choose.
- select: the jobs of a regular run, at most `cap` rows. Small jobs go first, up to half of the run; the
  large ones share the rest, in queue order (round robin, since a served job goes to the back).
- select_express: during a long run, small jobs not in it, for an express run beside it.
Both drop cancelled jobs and fail those whose deadline passed while they waited.
"""
import collections
import time

from service.samples import Samples

SMALL_JOB_ROWS = 64  # a job drawing at most this many rows goes ahead of large ones
EXPRESS_AFTER_ROWS = 1024  # during a run of more rows, small new jobs get express runs
EXPRESS_ROWS = 256  # rows of one express run (on the event loop's thread, which it blocks meanwhile)


class DeadlineExceeded(Exception):
    """The client's deadline passed before the request got its names."""


class Job:
    """A request's wish for its next `want` names, waiting in the batcher's queue."""

    __slots__ = ("request", "want", "samples", "future", "enqueued", "deadline", "cancelled")

    def __init__(self, request, want, future, deadline):
        self.request = request
        self.want = want  # names this job still needs
        self.samples = Samples()  # what it got so far
        self.future = future
        self.enqueued = time.perf_counter()
        self.deadline = deadline  # perf_counter time after which nobody is waiting any more, or None
        self.cancelled = False

    @property
    def owed(self):
        return self.want - len(self.samples)

    def live(self, now):
        """Still wanted? Resolves the job's future when not: a passed deadline fails it, and a job with
        nothing more to draw gets what it has."""
        if self.cancelled or self.future.done():
            return False
        if self.deadline is not None and now > self.deadline:
            self.cancelled = True
            self.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            return False
        if self.owed <= 0 or self.request.done:
            self.future.set_result(self.samples)
            return False
        return True


def job_rows(job, cap):
    """Rows the engine should draw for a job in a run with room for `cap`. only_new draws for the whole
    request (extra, since some names are known ones), up to a batch: a stream's small chunks then don't
    each take a run of their own; the surplus beyond this job's share stays with the job, in order, for
    the next chunk."""
    req = job.request
    return req.rows_wanted(cap, None if req.params.only_new else job.owed)


def select(jobs, cap, batching=True, now=None):
    """-> (parts [(job, rows)], rows, jobs left waiting in order): the next run, at most cap rows.

    Small jobs (at most SMALL_JOB_ROWS rows) go first, up to half the run: a one-name request then
    waits for the run in hand, not for a turn of every large job queued before it (beside four
    20,000-name requests: p50 73-78 ms instead of 100-112 ms). The large jobs share the rest of each
    run, so small traffic can't starve them. Without batching a run serves one job, in queue order
    (small first would starve the large ones there).
    """
    now = time.perf_counter() if now is None else now
    small, large, budget = [], [], cap // 2 if batching else 0
    for job in jobs:
        if not job.live(now):
            continue
        n = job_rows(job, cap)
        if n <= min(SMALL_JOB_ROWS, budget):
            small.append(job)
            budget -= n
        else:
            large.append(job)
    parts, rows, keep = [], 0, collections.deque()
    for job in small + large:
        if rows >= cap or (parts and not batching):
            keep.append(job)
            continue
        n = job_rows(job, cap - rows)
        parts.append((job, n))
        rows += n
    return parts, rows, keep


def select_express(jobs, budget=EXPRESS_ROWS, now=None):
    """-> (parts, rows, the others in order): small jobs for an express run of at most `budget` rows.
    Not only_new, which may need several runs. Jobs that are no longer live are dropped, as select does."""
    now = time.perf_counter() if now is None else now
    parts, rows, rest = [], 0, collections.deque()
    for job in jobs:
        if not job.live(now):
            continue
        owed = job.owed
        if job.request.params.only_new or owed > SMALL_JOB_ROWS or rows + owed > budget:
            rest.append(job)
        else:
            parts.append((job, owed))
            rows += owed
    return parts, rows, rest


def pieces(names, limit):
    """Consecutive runs of names with about `limit` characters (end tokens included) each."""
    piece, size = [], 0
    for w in names:
        if piece and size + len(w) + 1 > limit:
            yield piece
            piece, size = [], 0
        piece.append(w)
        size += len(w) + 1
    if piece:
        yield piece
