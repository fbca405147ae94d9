"""Admission: the bounds on what the server holds at once, and RESOURCE_EXHAUSTED beyond them.

Bounded memory: at most max_queue requests, wanting at most max_queue_names names in all, are pending
(queued or being served); Score calls count towards max_queue too, and hold at most SCORE_ROWS_IN_FLIGHT
rows (characters and end tokens) between them. Anything more is turned away with QueueFull, which the
servicer answers as RESOURCE_EXHAUSTED, instead of the queue growing without bound. The Batcher
(service.batcher) is an Admission: it admits a Generate job as it submits it.
"""
import contextlib

# Score rows held at once: two full-size calls (1,000,000 characters in --max-samples 100,000 names).
SCORE_ROWS_IN_FLIGHT = 2_200_000


class QueueFull(Exception):
    """Too many pending requests; the client should back off and retry."""


class Admission:
    def __init__(self, max_queue=1024, max_queue_names=1_000_000):
        self.max_queue = max(1, max_queue)
        self.max_queue_names = max(1, max_queue_names)
        self.pending = 0  # requests admitted and neither finished nor cancelled
        self.pending_names = 0  # names those requests still want: what their results will hold in memory
        self.score_rows = 0  # rows of the Score calls waiting or being scored

    def _admit(self, names):
        """QueueFull unless a request wanting `names` names fits in the queue's bounds."""
        if self.pending >= self.max_queue:
            raise QueueFull(f"server queue is full ({self.max_queue} requests pending); retry later")
        if self.pending_names and self.pending_names + names > self.max_queue_names:
            raise QueueFull(f"server queue is full ({self.pending_names:,} names pending); retry later")

    def slot(self, rows=0):
        """A place in the queue for a Score call of `rows` rows (engine.check_score_names), held while it
        is scored and its reply built: it counts towards max_queue like a Generate job, and while
        SCORE_ROWS_IN_FLIGHT rows are held (names and results, ~40 MB per million), more are turned away."""
        if self.score_rows and self.score_rows + rows > SCORE_ROWS_IN_FLIGHT:
            raise QueueFull(f"{self.score_rows:,} characters (end tokens included) are being scored already; "
                            "retry later")
        return self._hold(rows=rows)

    def reserve(self, names):
        """Admission of a request drawn in several chunks whose names are all held until it ends (a large
        unary Generate builds one reply): it counts as one pending request wanting all its names for its
        whole life, not a chunk at a time. Its chunks are then submitted with reserved=True."""
        return self._hold(names=names)

    @contextlib.contextmanager
    def _hold(self, names=0, rows=0, check=True):
        """One pending request, wanting `names` names and holding `rows` Score rows, while inside.
        check=False: the caller already admitted it (_admit), or it is a later chunk of an admitted stream."""
        if check:
            self._admit(names)
        self.pending += 1
        self.pending_names += names
        self.score_rows += rows
        try:
            yield
        finally:
            self.pending -= 1
            self.pending_names -= names
            self.score_rows -= rows
