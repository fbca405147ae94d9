"""Dynamic batching: concurrent Generate requests share one model run.

One worker coroutine owns the engine. Handlers `await batcher.submit(request, rows)`; the worker
collects queued jobs (small ones first, then round robin) up to `max_batch_rows` rows, runs
`engine.run(parts)` on a single-thread executor (ORT releases the GIL, so the event loop keeps
accepting and answering RPCs meanwhile), and resolves each job's future when it has its names.

Policies, and why:
- No waiting when idle: a lone request is run at once, and when there is no concurrent traffic a
  small one runs right on the loop thread (see _inline). Only when the last run served several
  requests (n) and more arrived during it does the worker gather (_gather_more): it waits for about
  as many to arrive, at most min(max_wait_ms, n x wait_per_request_ms), then goes on while requests
  keep arriving, up to max_wait_ms in all. Under load that is what makes batches: the event loop
  accepts one RPC per pass, so without it a run serves only those accepted during the previous one,
  and every run costs the loop, the server's bottleneck, its hand-offs. At concurrency 64 here a run
  served 3.5 requests with a fixed 1 ms wait, 3.5-11 with a wait for as many as last time, 19-25 now;
  the per-request bound keeps two requests that merely overlapped from waiting long.
- Fairness: a job larger than a batch is served a chunk per run and then goes to the back, behind
  jobs that arrived during the run. Small jobs go ahead of large ones (up to half of each run, see
  service.scheduling), and during a long run those that arrive get express runs on the loop thread
  (see _express_during), so a million names can't hold up a one-name request.
- Determinism: each request draws its uniforms from its own seeded generator in order, so how it is
  chunked or what it is batched with doesn't change its names (the engine guarantees this).
- Bounded memory: the Batcher is an Admission (service.admission), whose bounds submit enforces. A
  stream submits a chunk at a time (one ahead), so it holds about two; a large unary Generate reserves
  all its names (reserve).
- Cancelled jobs are skipped at the next collection and get no more model runs; jobs whose deadline
  passed in the queue fail with DeadlineExceeded.
- max_batch_rows 0 disables batching: every run serves one job (the comparison baseline).
- Score calls (Admission.slot, then score) never wait for Generate's model runs on CPU: small ones are
  scored at once on the loop thread, larger ones one at a time on a thread of their own.
"""
import asyncio
import collections
import contextlib
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from service.admission import Admission
from service.busypoll import BusyPoll, stop_task
from service.scheduling import EXPRESS_AFTER_ROWS, EXPRESS_ROWS, Job, pieces, select, select_express


# Score's cost is counted in model rows: a name's characters and its end token.
SCORE_PIECE_ROWS = 16_384  # a Score call runs in engine calls of about this many rows (cancellable between)
SCORE_INLINE_ROWS = 256  # a Score call of at most this many rows is scored on the loop thread: 0.5-1 ms at
                         # most here (each name costs more than a character)
PROBE_INTERVAL = 0.05  # a lone small run takes the long way at most this often (see Batcher._lone_small_run)
GATHER_IDLE_PASSES = 3  # a gather goes on while requests arrive: it ends after this many loop passes bring none
CONCURRENT_HOLD = 0.2  # seconds that a run of two requests or more keeps the server in "concurrent" mode: several
                       # probe intervals, or moderate concurrency drops out of batching between probes (a 50 ms
                       # hold with 50 ms probes measured ~6% fewer requests/s at concurrency 8)


class Batcher(Admission):
    def __init__(self, engine, max_batch_rows=1024, max_wait_ms=10.0, max_queue=1024, metrics=None, inline_rows=16,
                 max_queue_names=1_000_000, busy_poll_ms=0.0, wait_per_request_ms=1.0):
        super().__init__(max_queue, max_queue_names)
        self.engine = engine
        self.inline_rows = inline_rows
        self._concurrent_until = 0.0  # until then, traffic counts as concurrent: no inline runs
        self._probed_at = float("-inf")  # when a lone small run last took the long way (a probe)
        self._probing = False  # a probe was decided and its run is still to come (see _inline)
        self.batching = max_batch_rows > 0
        # The engine's max_rows keeps one run's memory bounded; batching can only ask for fewer.
        self.cap = min(max_batch_rows, engine.max_rows) if self.batching else engine.max_rows
        # Express runs (see _express_during) batch too, and they are unmeasured on a GPU, where the two
        # runs would share one device (and the loop thread could wait for the long one).
        on_cpu = getattr(engine, "provider", "cpu") != "cuda"
        self.express = self.batching and on_cpu
        self.inline_score_rows = SCORE_INLINE_ROWS if on_cpu and inline_rows else 0  # see score
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.wait_per_request = max(0.0, wait_per_request_ms) / 1000.0  # see _gather_more
        self.metrics = metrics
        self._score_lock = asyncio.Lock()  # Score calls are scored one at a time (see score)
        self._jobs = collections.deque()  # round-robin order of jobs waiting for a run
        self._running = []  # the jobs of the run in hand
        self._incoming = collections.deque()  # submitted since the worker last looked
        self._wake = None
        self._wake_at = 1  # jobs waiting that wake the worker: 1, or a batch's worth while it gathers one
        self._arrived = False  # jobs were submitted since the last run began (a split job's rest isn't one)
        self._task = None
        self._last_batch = 1  # requests served by the previous run
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        # On a GPU, Score stays on the engine thread: beside a model run it would share the device, unmeasured.
        self._score_executor = ThreadPoolExecutor(1, thread_name_prefix="score") if on_cpu else self._executor
        self.busy_poll = BusyPoll(busy_poll_ms, self.quiet)

    def start(self):
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")
        self.busy_poll.start()

    async def close(self):
        """Stop the worker (after the server has drained); fails whatever is still queued."""
        await self.busy_poll.close()
        await stop_task(self._task)
        for job in [*self._running, *self._jobs, *self._incoming]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True)
        self._score_executor.shutdown(wait=True)  # (the same executor on a GPU: a second shutdown is a no-op)

    def quiet(self):
        """Nothing pending or running (a cancelled request's run goes on) and no concurrent traffic lately:
        the loop may busy-poll (see service.busypoll)."""
        return not (self.pending or self._running) and time.perf_counter() >= self._concurrent_until

    async def call(self, fn, *args):
        """Run fn(*args) on the engine's thread (serialised with the model runs): the warm-up."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def score(self, names, rows):
        """engine.score of names that passed engine.check_score_names (`rows`: the count that returned).

        On CPU, scoring never waits behind Generate's model runs (a run of 4,096 rows took ~40 ms here). A
        small call is scored at once on the loop thread, which takes less than two thread hand-offs would
        (unless inline_rows is 0). Larger calls go to the score thread (on a GPU, the engine thread, between
        model runs) one at a time, so that under load they finish one by one rather than all late
        together, each in engine calls of about SCORE_PIECE_ROWS rows (a cancelled call stops
        between them)."""
        if rows <= self.inline_score_rows:
            return self.engine.score(names, True)
        loop = asyncio.get_running_loop()
        async with self._score_lock:
            scores = []
            for piece in pieces(names, SCORE_PIECE_ROWS):
                scores += await loop.run_in_executor(self._score_executor, self.engine.score, piece, True)
            return scores

    async def submit(self, request, rows, timeout=None, admitted=False, reserved=False):
        """The next `rows` names of `request` as Samples (fewer only if the request is done first; a few
        more under only_new, whose draws are sized by the engine).

        timeout: seconds the caller will wait (the RPC's remaining deadline), or None.
        admitted: a later chunk of a stream that was let in already; it isn't turned away mid-way.
        reserved: a chunk of a request that holds a reservation (reserve): admitted and counted there.
        Raises QueueFull, or what engine.run raised for this request (GenerationError, ...).
        """
        want = min(rows, request.remaining)
        if not (admitted or reserved):
            self._admit(want)
        if self._direct_ok(request, rows):
            return self._run_direct(request, rows)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.perf_counter() + timeout
        job = Job(request, want, loop.create_future(), deadline)
        if job.want <= 0:
            return job.samples  # none
        # Pending while queued or served; a reserved chunk is counted by its reservation instead.
        with contextlib.nullcontext() if reserved else self._hold(names=want, check=False):
            self._incoming.append(job)
            self._arrived = True
            if self._waiting() >= self._wake_at or want >= self.cap:  # enough jobs, or a full run in one
                self._wake.set()
            try:
                return await job.future
            finally:
                if not job.future.done():
                    job.cancelled = True  # cancelled / deadline: the worker drops it and runs no more for it

    async def _worker(self):
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not stop all generation
                traceback.print_exc(file=sys.stderr)
                # The jobs of the run in hand (taken off the queue by _collect) fail too: none may hang.
                for job in [*self._running, *self._jobs]:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("internal batching error"))
                self._jobs.clear()
            self._running = []

    async def _step(self):
        """Collect one batch, run it, hand out the names."""
        loop = asyncio.get_running_loop()
        if not self._incoming and not self._jobs:
            self._wake.clear()
            await self._wake.wait()
            await asyncio.sleep(0)  # let the handlers of the same network read enqueue too
        elif self.batching and self.max_wait and self._last_batch > 1 and self._arrived:
            await self._gather_more()
        self._jobs.extend(self._incoming)
        self._incoming.clear()
        parts, rows = self._collect()
        if not parts:
            return
        self._arrived = False
        self._running = [job for job, _ in parts]
        now = time.perf_counter()
        self._began(parts, now)
        work = [(j.request, n) for j, n in parts]
        try:
            if self._inline(parts, rows, now):
                results = self._measured_run(work, rows)
            else:
                run = loop.run_in_executor(self._executor, self._measured_run, work, rows)
                if self.express and rows > EXPRESS_AFTER_ROWS:
                    try:
                        await self._express_during(run)
                    except BaseException:  # shut down (or a bug): nobody will await the run's outcome now
                        run.cancel()
                        raise
                results = await run
        except Exception as e:  # noqa: BLE001 - delivered to the requests it concerns
            self._fail(self._running, e)  # the run's jobs, and those of an express run a bug stopped midway
            return
        self._last_batch = len(parts)
        # Arrivals during the run go before the jobs just served: round robin, new work first.
        self._jobs.extend(self._incoming)
        self._incoming.clear()
        self._deliver(parts, results, self._jobs)

    def _began(self, parts, now):
        """These jobs' run begins: for a request's first run, the end of its time in the queue."""
        for job, _ in parts:
            self._queued(job.request, now - job.enqueued)

    def _queued(self, request, seconds):
        """The queue-time metric, once per request: at its first model run (nothing drawn yet), not at
        every chunk of a stream or a large unary request."""
        if self.metrics and request.drawn == 0:
            self.metrics.queue_time.observe(seconds)

    def _deliver(self, parts, results, requeue):
        """Hand each job its run's names; a job that wants more goes back into `requeue`."""
        for (job, _), samples in zip(parts, results):
            job.samples.extend(samples)
            if job.future.done():  # cancelled while the model ran: its names are dropped
                continue
            if job.request.error:  # e.g. only_new gave up: this request fails, its batch-mates don't
                job.future.set_exception(job.request.error)
            elif job.owed <= 0 or job.request.done:
                job.future.set_result(job.samples)
            else:
                requeue.append(job)

    async def _express_during(self, run):
        """While a long run is on the engine thread, small jobs that arrive are run at once on the loop
        thread (express runs) instead of waiting for it: a run of 4,096 rows took ~40 ms here."""
        while not run.done():
            if self._express():  # more may be waiting than one express run takes
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            woke = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((run, woke), return_when=asyncio.FIRST_COMPLETED)
            finally:
                woke.cancel()

    def _express(self):
        """One express run of small jobs (scheduling.select_express) not in the long run, on the loop
        thread: those queued, then those submitted since. -> whether it ran."""
        now = time.perf_counter()
        parts, rows, self._jobs = select_express(self._jobs, EXPRESS_ROWS, now)
        more, more_rows, self._incoming = select_express(self._incoming, EXPRESS_ROWS - rows, now)
        parts, rows = parts + more, rows + more_rows
        if not parts:
            return False
        self._running += [job for job, _ in parts]
        self._began(parts, now)
        try:
            results = self._measured_run([(j.request, n) for j, n in parts], rows)
        except Exception as e:  # noqa: BLE001
            self._fail([job for job, _ in parts], e)
            return True
        self._deliver(parts, results, self._incoming)
        return True

    def _direct_ok(self, request, rows):
        """An idle server and a small request: nothing could be batched with it, so skip the queue.
        (Not only_new: it may need several runs, which the queue path does.)

        Each hand-off (queue -> worker -> future -> handler) is an event-loop pass, and under grpc.aio
        every pass polls the completion queue; going direct saved ~0.3 ms per request here. Concurrent
        traffic (anything pending, or seen in the last CONCURRENT_HOLD seconds) takes the batching path.
        """
        if self.pending or self._running or self._jobs or self._incoming or request.params.only_new:
            return False
        return self._lone_small_run(rows, time.perf_counter())

    def _lone_small_run(self, rows, now):
        """A run of at most inline_rows rows with no concurrent traffic lately may go on the loop thread. Such a
        run blocks the loop, so requests arriving meanwhile stay invisible: once per PROBE_INTERVAL a request
        takes the long way (the queue, and its run on the engine thread: see _inline), where they show up as
        concurrency, which then holds for CONCURRENT_HOLD. A probe costs its request ~0.4 ms: at concurrency 1
        a 1-name submit took p50 280 us direct and ~700 us as a probe (~2% of the requests). Probing every
        4th request instead (one in three through the queue, as the probe's own run counted) gave concurrency
        1 a p50 0.06-0.16 ms higher in three of five alternating sets (the same in two)."""
        if rows > self.inline_rows or now < self._concurrent_until:
            return False
        if now - self._probed_at >= PROBE_INTERVAL:
            self._probed_at = now
            self._probing = True
            return False
        return True

    def _run_direct(self, request, rows):
        self._queued(request, 0.0)
        (samples,) = self._measured_run([(request, min(rows, request.remaining))], rows)
        return samples

    def _measured_run(self, work, rows):
        """engine.run(work), its size and time recorded (metrics), on whichever thread runs it."""
        t0 = time.perf_counter()
        results = self.engine.run(work)
        if self.metrics:
            self.metrics.observe_batch(rows, len(work), time.perf_counter() - t0)
        return results

    def _inline(self, parts, rows, now):
        """Run this batch on the event-loop thread?

        A lone small request on a server without concurrent traffic: yes, since the two thread
        hand-offs (to the engine thread and back) cost about as much as the run itself. Under
        concurrent traffic, a run that served several requests within CONCURRENT_HOLD: no, the loop
        must keep accepting requests during the run (grpc.aio accepts one RPC per loop pass) so that
        they form the next batch. (A request merely waiting while a lone one runs isn't counted: at
        concurrency 2 the two calls, out of step, then took the queue and the engine thread one at a
        time, and served 15-25% fewer requests/s than inline.)

        An inline run hides concurrency (nothing is accepted meanwhile), so a lone request still goes
        through the queue now and then (see _lone_small_run) and lets waiting requests show up. The
        probe's run goes to the engine thread too: run inline, it gave the loop a pass or two at most,
        too few for an RPC to go from accepted to submitted, and against a fast client (h2load, 64
        streams on one connection) the server never saw the 63 calls waiting in gRPC's core and ran
        nearly every request alone (1.1-2.7 requests a run).
        """
        if len(parts) > 1:
            self._concurrent_until = now + CONCURRENT_HOLD
        inline = len(parts) == 1 and not self._probing and self._lone_small_run(rows, now)
        self._probing = False  # (a probe decided just now is this run's own: it isn't inline either)
        return inline

    async def _gather_more(self):
        """Concurrent traffic: wait until about as many requests as last time arrived, at most
        min(max_wait, wait_per_request x that many); then go on, a loop pass at a time, while requests
        keep arriving: until GATHER_IDLE_PASSES passes bring none, a run's rows are waiting, or max_wait
        has passed since the gather began.

        The first part: submit wakes the worker only once that many are waiting (a wake-up per arrival
        cost the event loop, the server's bottleneck under load, a pass and a wait_for task each), and
        a trickle (two requests that happened to overlap) waits at most a few milliseconds.

        The second part lets batches grow to what the load brings. Waiting for as many as last time
        alone let them grow only by the few arriving between the wake-up and the collection: 3.5-11
        requests a run at concurrency 64 with the load test's client, and 2.4-2.6 with h2load, which
        keeps its 64 calls arriving one at a time. Every run costs the loop its hand-offs, so small runs
        cost throughput. Under such a backlog gRPC hands over an RPC every pass or two, so the gather
        runs to max_wait (19-31 requests a run with either client); without one (concurrency 4-16, the
        other calls on their way back from the client) it ends after a few passes of an idle loop."""
        t_end = time.perf_counter() + self.max_wait
        want = self._last_batch
        if self._waiting() < want and self._rows_waiting() < self.cap:
            self._wake.clear()
            self._wake_at = want
            try:
                await asyncio.wait_for(self._wake.wait(), min(self.max_wait, self.wait_per_request * want))
            except asyncio.TimeoutError:
                pass
            finally:
                self._wake_at = 1
        seen, idle = -1, 0
        while time.perf_counter() < t_end:
            waiting = self._waiting()
            if waiting > seen:  # arrivals (or the first look): only they change the rows waiting
                if self._rows_waiting() >= self.cap:
                    break
                seen, idle = waiting, 0
            elif (idle := idle + 1) >= GATHER_IDLE_PASSES:
                break
            await asyncio.sleep(0)  # one pass of the loop: accepting RPCs, their handlers submitting

    def _waiting(self):
        return len(self._incoming) + len(self._jobs)

    def _rows_waiting(self):
        return sum(j.owed for j in self._incoming) + sum(j.owed for j in self._jobs)

    def _collect(self):
        """Take the next run's jobs off the queue (scheduling.select)."""
        parts, rows, self._jobs = select(self._jobs, self.cap, self.batching)
        return parts, rows

    def _fail(self, jobs, exc):
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

