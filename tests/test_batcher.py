"""Dynamic batching in-process (the real engine, no gRPC): who gets which model run, express runs beside a
long run, bounds, cancellation, bugs that must fail their jobs rather than hang them, busy polling."""
import asyncio
import time
import types

import pytest

from service.admission import QueueFull
from service.batcher import CONCURRENT_HOLD, GATHER_IDLE_PASSES, PROBE_INTERVAL, Batcher
from service.busypoll import BusyPoll
from service.engine import Engine
from service.params import GenerateParams
from service.samples import Samples
from service.scheduling import EXPRESS_AFTER_ROWS, EXPRESS_ROWS, SMALL_JOB_ROWS
from tests.service_fixtures import CountingEngine, GatedEngine, assert_same_samples, holding, running, submit


def test_batcher_interleaves_big_and_small(engine):
    async def main():
        eng = CountingEngine(engine)
        async with running(Batcher(eng, max_batch_rows=256, max_wait_ms=0, max_queue=100)) as b:
            big = submit(b, eng, 20_000, seed=1)
            await asyncio.sleep(0)
            smalls = [submit(b, eng, 3, seed=10 + i, max_samples=100) for i in range(5)]
            done = await asyncio.gather(*smalls)
            assert all(len(s) == 3 for s in done) and not big.done()  # served between the big one's chunks
            assert len(await big) == 20_000

    asyncio.run(main())


def test_batcher_runs_small_jobs_before_large_ones_queued_earlier(engine):
    """Small jobs go first, up to half a run; the large ones share the rest (so they can't be starved)."""

    async def main():
        eng = CountingEngine(engine)
        async with running(Batcher(eng, max_batch_rows=256, max_wait_ms=0, max_queue=100)) as b:
            jobs = [submit(b, eng, 2000, seed) for seed in (1, 2, 3)]  # queued before any run: large, then small
            jobs += [submit(b, eng, SMALL_JOB_ROWS, seed) for seed in (10, 11, 12)]
            await asyncio.gather(*jobs)
            first = dict(eng.runs[0])
            # Two small jobs fill half the run (a third would pass half), then the oldest large job the rest;
            # in queue order the first run would have been large job 1's alone.
            assert first == {10: SMALL_JOB_ROWS, 11: SMALL_JOB_ROWS, 1: 256 - 2 * SMALL_JOB_ROWS}
            assert (12, SMALL_JOB_ROWS) in eng.runs[1]  # the third at the head of the next run

    asyncio.run(main())


def test_batcher_serves_small_jobs_during_a_long_run(engine):
    """Small jobs that arrive during a long run get express runs at once (several, when more arrive than
    one takes), with their own names; only_new (which may need several runs) waits like any other job."""

    async def main():
        eng = GatedEngine(engine, hold_rows=EXPRESS_AFTER_ROWS)
        async with running(Batcher(eng, max_batch_rows=4096, max_wait_ms=0, max_queue=100)) as b:
            async with holding(b, eng) as big:
                new = submit(b, eng, 1, seed=3, max_samples=100, only_new=True)
                n = EXPRESS_ROWS // SMALL_JOB_ROWS + 1  # one more than an express run takes
                params = [GenerateParams(num_samples=SMALL_JOB_ROWS, seed=10 + i) for i in range(n)]
                small = [b.submit(eng.request(p, 1000), SMALL_JOB_ROWS) for p in params]
                small = await asyncio.wait_for(asyncio.gather(*small), 10)
                assert not big.done() and not new.done()  # the long run is still held (and not yet in eng.runs)
                for got, p in zip(small, params):
                    assert_same_samples(got, engine.generate(p))  # what their seeds give alone
                assert eng.runs == [[(10 + i, SMALL_JOB_ROWS) for i in range(n - 1)], [(10 + n - 1, SMALL_JOB_ROWS)]]
            assert len(await big) == 3000 and len(await new) == 1

    asyncio.run(main())


def test_batcher_bug_in_an_express_run_fails_its_jobs(engine):
    class BrokenExpress(GatedEngine):
        def run(self, parts):
            if sum(n for _, n in parts) <= self.hold_rows:
                return None  # a bug between an express run and handing out its names
            return super().run(parts)

    async def main():
        eng = BrokenExpress(engine, hold_rows=EXPRESS_AFTER_ROWS)
        async with running(Batcher(eng, max_batch_rows=4096, max_wait_ms=0, max_queue=100)) as b:
            async with holding(b, eng) as big:
                with pytest.raises(TypeError):  # failed, not left waiting
                    await asyncio.wait_for(submit(b, eng, 1, seed=2, max_samples=100), 10)
            with pytest.raises(TypeError):  # the run in hand fails with it
                await big

    asyncio.run(main())


def test_batcher_without_batching_keeps_queue_order(engine):
    """--max-batch-rows 0, the baseline: one job per run, in queue order (small first would starve a large
    job there), and no express runs (they batch)."""

    async def main():
        eng = GatedEngine(engine, hold_rows=EXPRESS_AFTER_ROWS)
        async with running(Batcher(eng, max_batch_rows=0, max_wait_ms=0, max_queue=100)) as b:
            try:
                jobs = [submit(b, eng, n, seed) for n, seed in ((3000, 1), (1, 2), (1, 3))]
                await eng.held()
                await asyncio.sleep(0.05)
                assert not any(j.done() for j in jobs)  # no express runs beside the large one
            finally:
                eng.release.set()
            await asyncio.gather(*jobs)
            assert eng.runs == [[(1, 3000)], [(2, 1)], [(3, 1)]]  # (the held run is recorded once released)

    asyncio.run(main())


class SlowEngine(CountingEngine):
    """Each run takes `delay` seconds more, on the engine thread: jobs submitted meanwhile arrive during it."""

    delay = 0.0

    def run(self, parts):
        time.sleep(self.delay)
        return super().run(parts)


async def during_a_run_of_three(b, eng, seeds, late):
    """Three jobs submitted at once (one run, held 0.3 s), and `late` submitted during that run, so the worker's
    next step gathers (wanting three). -> the late job's task, once the three are done."""
    eng.delay = 0.3
    three = asyncio.gather(*[submit(b, eng, 2, seed) for seed in seeds])
    await asyncio.sleep(0.1)
    first = submit(b, eng, 2, late)
    await three
    eng.delay = 0.0
    return first


def test_batcher_gathers_as_many_as_the_last_run_served_within_max_wait(engine, monkeypatch):
    """Only when jobs arrived during the last run does the worker wait, at most min(max_wait, wait_per_request
    x as many jobs as that run served), until that many are there, however spread out they arrive; with fewer
    it runs what it has once that time passed; a job of a whole run ends the wait; an idle worker wakes for a
    single job."""

    guard = asyncio.wait_for  # the test's own bound against a hang; the batcher's timed waits are recorded
    waits = []

    async def recorded(awaitable, timeout):
        waits.append(timeout)
        return await guard(awaitable, timeout)

    monkeypatch.setattr(asyncio, "wait_for", recorded)

    async def main():
        eng = SlowEngine(engine)

        # inline_rows 0: even a lone small job goes through the worker, which this test is about
        async with running(Batcher(eng, max_batch_rows=256, max_wait_ms=60_000, inline_rows=0,
                                   wait_per_request_ms=60_000)) as b:
            await asyncio.gather(*[submit(b, eng, 2, seed) for seed in (1, 2, 3)])
            await asyncio.sleep(0.01)  # idle after a run of three: a lone job runs at once, no timed wait
            await guard(submit(b, eng, 2, 4), 10)
            assert eng.runs == [[(1, 2), (2, 2), (3, 2)], [(4, 2)]] and waits == []
            spread = [await during_a_run_of_three(b, eng, (5, 6, 7), 8)]
            for seed in (9, 10):
                await asyncio.sleep(0.05)
                spread.append(submit(b, eng, 2, seed))
            await guard(asyncio.gather(*spread), 10)
            assert eng.runs[2:] == [[(5, 2), (6, 2), (7, 2)], [(8, 2), (9, 2), (10, 2)]] and waits == [60.0]
            first = await during_a_run_of_three(b, eng, (11, 12, 13), 14)
            await asyncio.sleep(0.05)
            await guard(asyncio.gather(first, submit(b, eng, 256, 15)), 10)  # a full run: no more waiting
            assert eng.runs[4:6] == [[(11, 2), (12, 2), (13, 2)], [(14, 2), (15, 254)]] and len(waits) == 2
            b.max_wait = 0.05  # now only one of the three wanted comes: it runs alone after max_wait
            await guard(await during_a_run_of_three(b, eng, (16, 17, 18), 19), 10)
            assert eng.runs[-2:] == [[(16, 2), (17, 2), (18, 2)], [(19, 2)]] and waits[2:] == [0.05]
            b.max_wait, b.wait_per_request = 60.0, 0.02  # the same, bounded by 3 x wait_per_request instead
            await guard(await during_a_run_of_three(b, eng, (21, 22, 23), 24), 10)
            assert eng.runs[-2:] == [[(21, 2), (22, 2), (23, 2)], [(24, 2)]] and waits[3:] == [3 * 0.02]
            await asyncio.sleep(0.01)  # idle again, after a gather that wanted three: one job still wakes it
            await guard(submit(b, eng, 2, 20), 10)
            assert eng.runs[-1] == [(20, 2)]

    asyncio.run(main())


def test_batcher_gather_goes_on_while_requests_keep_arriving(engine):
    """After the wait for as many as the last run served, the gather takes what keeps arriving a loop pass
    apart (as from a backlog in gRPC's core), ends once GATHER_IDLE_PASSES passes bring nothing, and never
    goes on past max_wait."""

    async def main():
        eng = SlowEngine(engine)

        async def gathered(b, first, fed, passes_apart, big=None):
            """during_a_run_of_three, then `fed` more jobs submitted `passes_apart` loop passes apart, of 2 names
            each but the big-th, of a whole run. -> the seeds of the late job's run, the one after the three."""
            jobs = [await during_a_run_of_three(b, eng, range(first, first + 3), first + 3)]
            n = len(eng.runs)
            for i, seed in enumerate(range(first + 4, first + 4 + fed)):
                jobs.append(submit(b, eng, b.cap if i == big else 2, seed))
                for _ in range(passes_apart):
                    await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*jobs), 10)
            # (while a long run is on the engine thread, express runs of small jobs may be recorded before it)
            return next(seeds for seeds in ([seed for seed, _ in run] for run in eng.runs[n:]) if first + 3 in seeds)

        # (wait_per_request 20 ms: the fed jobs' last run, fewer than the run before it, waits at most 60 ms)
        async with running(Batcher(eng, max_batch_rows=4096, max_wait_ms=60_000, inline_rows=0,
                                   wait_per_request_ms=20)) as b:
            # A job every pass: the late one and all 30 fed join one run (a wait for three alone ends near three).
            assert await gathered(b, 100, 30, 1) == list(range(103, 134))
            # Arrivals further apart than the idle passes: the gather ends before all of them came.
            assert len(await gathered(b, 200, 10, GATHER_IDLE_PASSES + 3)) < 11
            # A job of a whole run among them: the run goes at once (max_wait is a minute) with those before it.
            assert await gathered(b, 400, 30, 1, big=5) == list(range(403, 410))
            # A job every pass for longer than max_wait: the run goes with those that came within it.
            b.max_wait = 1e-4
            assert len(await gathered(b, 300, 200, 1)) < 201

    asyncio.run(main())


def test_batcher_does_not_wait_for_the_rest_of_a_split_job(engine):
    """A run that served two jobs, one of them only in part, with nothing arriving meanwhile: the rest runs
    at once (no gathering: nothing new is coming), not after max_wait."""

    async def main():
        eng = CountingEngine(engine)
        async with running(Batcher(eng, max_batch_rows=4096, max_wait_ms=60_000, inline_rows=0,
                                   wait_per_request_ms=60_000)) as b:
            await asyncio.wait_for(asyncio.gather(*[submit(b, eng, 3000, seed) for seed in (1, 2)]), 10)
            assert eng.runs == [[(1, 3000), (2, 1096)], [(2, 1904)]]

    asyncio.run(main())


def test_batcher_express_runs_beside_a_real_long_run(model_dir):
    """Express runs and a long sharded run really overlapping (two threads in the engine at once): every
    request still gets exactly the names its seed gives alone."""

    eng = CountingEngine(Engine(model_dir, provider="cpu", threads=2))

    async def main():
        async with running(Batcher(eng, max_batch_rows=16384, max_wait_ms=0, max_queue=100)) as b:
            big_params = GenerateParams(num_samples=16384, seed=1)
            big = asyncio.ensure_future(b.submit(eng.request(big_params, 10**6), 16384))
            while not eng.runs:
                await asyncio.sleep(0)
            params = [GenerateParams(num_samples=1 + i % 5, seed=100 + i, temperature=0.5 + i / 10) for i in range(40)]
            small, overlapped = [], 0
            for p in params:
                small.append(await b.submit(eng.request(p, 1000), p.num_samples))
                overlapped += not big.done()
            assert overlapped  # at least one express run went beside the long run
            for got, p in zip(small, params):
                assert_same_samples(got, eng.engine.generate(p))
            assert_same_samples(await big, eng.engine.generate(big_params))

    asyncio.run(main())


def test_batcher_bounds_pending_names(engine):
    async def main():
        b = Batcher(engine, max_batch_rows=256, max_wait_ms=0, max_queue=100, max_queue_names=5000)
        async with running(b):
            jobs = [submit(b, engine, 3000, seed) for seed in range(3)]  # submitted before any run
            out = await asyncio.gather(*jobs, return_exceptions=True)
            assert len(out[0]) == 3000  # room for 3,000 names, not for 6,000
            assert all(isinstance(e, QueueFull) and "names pending" in str(e) for e in out[1:])
            assert b.pending == 0 and b.pending_names == 0
            assert len(await submit(b, engine, 3000, seed=1)) == 3000  # the queue has emptied: room again
            # More names than the bound, on an empty queue: admitted (else it would be refused forever)
            assert len(await submit(b, engine, 7000, seed=2)) == 7000

    asyncio.run(main())


def test_batcher_drops_cancelled_work(engine):
    async def main():
        eng = CountingEngine(engine)
        async with running(Batcher(eng, max_batch_rows=128, max_wait_ms=0, max_queue=100)) as b:
            task = submit(b, eng, 100_000, seed=7)
            for _ in range(30_000):  # a few runs in (30 s at most: a regression fails instead of hanging)
                if eng.rows.get(7, 0) >= 256:
                    break
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert b.pending == 0
            drawn = eng.rows[7]
            assert len(await submit(b, eng, 5, seed=8, max_samples=100)) == 5  # the worker moved on
            assert eng.rows[7] <= drawn + 128  # at most the run in flight when it was cancelled

    asyncio.run(main())


def test_a_cancelled_run_still_keeps_the_server_busy(engine):
    """A cancelled request's run goes on on the engine thread: until it ends the server isn't quiet (no busy
    polling beside it) and a small request doesn't take the direct path (a second run beside it)."""
    async def main():
        eng = GatedEngine(engine, hold_rows=1000)
        async with running(Batcher(eng, max_batch_rows=4096, max_wait_ms=0)) as b, holding(b, eng) as task:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            small = eng.request(GenerateParams(num_samples=1, seed=2), 100)
            assert b.pending == 0 and not b.quiet() and not b._direct_ok(small, 1)

    asyncio.run(main())


def test_batcher_bug_fails_the_run_in_hand(engine):
    class Broken(CountingEngine):
        def run(self, parts):
            return None  # a bug between the model run and handing out the names

    async def main():
        async with running(Batcher(Broken(engine), max_wait_ms=0, inline_rows=0)) as b:  # inline_rows 0: the worker
            with pytest.raises(RuntimeError, match="internal batching error"):
                await asyncio.wait_for(submit(b, engine, 5, seed=1, max_samples=100), 30)  # failed, not left waiting

    asyncio.run(main())


def test_batcher_slot_counts_towards_the_queue(engine):
    b = Batcher(engine, max_queue=1)
    with b.slot():  # a Score call in progress fills a queue of one
        assert b.pending == 1
        with pytest.raises(QueueFull):
            with b.slot():
                pass
    with b.slot():
        pass
    assert b.pending == 0


def test_busy_poll_polls_for_its_window_while_quiet():
    async def main():
        polls, quiet = [], [True]
        bp = BusyPoll(500, lambda: polls.append(1) or quiet[0])  # a window no stall of a busy CI host outlasts
        bp.start()
        await asyncio.sleep(0.05)
        assert not polls  # nothing happened yet: the loop sleeps
        bp.touch()
        await asyncio.sleep(0.02)
        assert polls  # an RPC finished: the loop polls ...
        await asyncio.sleep(0.6)
        n = len(polls)
        await asyncio.sleep(0.05)
        assert len(polls) == n  # ... and sleeps again once the window has passed
        quiet[0] = False  # the server is busy (a run on the engine thread, concurrent traffic): no polling
        bp.touch()
        await asyncio.sleep(0.05)
        assert len(polls) == n + 1
        await bp.close()

    asyncio.run(main())


def test_batcher_is_quiet_only_without_pending_work(engine):
    b = Batcher(engine, max_queue=4)
    assert b.quiet()
    with b.slot():
        assert not b.quiet()
    assert b.quiet()


def test_queue_time_is_observed_once_per_request_on_either_path(engine):
    """A request drawn a chunk at a time (a stream) waits in the queue once: its queue time is observed at its
    first run, whether that run went through the queue or straight to the engine (an idle server's small
    runs), and not again at each later chunk."""
    from service.metrics import Metrics

    paths = []

    def noting(path, method):
        def wrapped(*args):
            paths.append(path)
            return method(*args)
        return wrapped

    async def main():
        metrics = Metrics()
        async with running(Batcher(engine, max_batch_rows=256, max_wait_ms=0, metrics=metrics, inline_rows=16)) as b:
            b._run_direct, b._began = noting("direct", b._run_direct), noting("queue", b._began)
            for seed in (1, 2):
                req = engine.request(GenerateParams(num_samples=40, seed=seed), 1000)
                chunks = [await b.submit(req, 4, admitted=True) for _ in range(10)]
                assert sum(map(len, chunks)) == 40
                assert metrics.registry.get_sample_value("namegen_queue_time_seconds_count") == seed

    asyncio.run(main())
    assert len(paths) == 20 and {"direct", "queue"} <= set(paths)  # a path per chunk, and both were taken


def test_jobs_past_their_deadline_or_done_get_no_rows(engine):
    """Both policies fail a job whose deadline passed while it waited (DeadlineExceeded, also when gRPC hasn't
    cancelled it yet), give a job whose request has ended what it has, and run neither."""
    from service.engine import GenerationError
    from service.scheduling import DeadlineExceeded, Job, select, select_express

    async def main():
        loop = asyncio.get_running_loop()

        def job(seed, deadline=None):
            return Job(engine.request(GenerateParams(num_samples=5, seed=seed), 100), 5, loop.create_future(), deadline)

        for choose in (lambda jobs: select(jobs, 256, now=10.0), lambda jobs: select_express(jobs, now=10.0)):
            late, due, ended = job(1, deadline=9.0), job(2, deadline=11.0), job(3)
            ended.request.error = GenerationError("its own run failed")
            parts, rows, rest = choose([late, due, ended])
            assert parts == [(due, 5)] and rows == 5 and not rest
            with pytest.raises(DeadlineExceeded):
                late.future.result()
            assert len(ended.future.result()) == 0

    asyncio.run(main())


def test_a_submit_timeout_fails_the_job_in_the_queue(engine):
    """submit(timeout=...) gives the job a deadline: past it while queued behind a long run, the job fails with
    DeadlineExceeded and gets no model run (gRPC may not have cancelled it yet)."""
    from service.scheduling import DeadlineExceeded

    async def main():
        eng = GatedEngine(engine, hold_rows=1000)
        async with running(Batcher(eng, max_batch_rows=0, max_queue=100)) as b:
            async with holding(b, eng, rows=3000, seed=1) as big:
                late = asyncio.ensure_future(b.submit(engine.request(GenerateParams(num_samples=5, seed=2), 100), 5,
                                                      timeout=0.01))
                await asyncio.sleep(0.05)
            with pytest.raises(DeadlineExceeded):
                await late
            assert len(await big) == 3000 and 2 not in eng.rows

    asyncio.run(main())


def test_stream_chunks_draw_one_ahead_and_stop_drawing_when_closed():
    """The servicer's stream feed: chunk k+1 is drawn while chunk k is sent, and a closed stream (the client went
    away) cancels its pending draw instead of leaving it to run. A fake batcher counts the draws."""
    from service.servicer import NameGeneratorServicer

    class FakeBatcher:
        calls = cancelled = 0

        async def submit(self, req, rows, timeout, admitted=False, reserved=False):
            self.calls += 1
            if self.calls > 2:  # the third draw hangs until cancelled
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            req.remaining -= rows
            return Samples(["x"] * rows, [-1.0] * rows, [False] * rows)

    class Req:
        remaining = 50
        done = property(lambda self: self.remaining <= 0)

    async def main():
        servicer = NameGeneratorServicer.__new__(NameGeneratorServicer)  # (only its batcher is used)
        servicer.batcher = b = FakeBatcher()
        chunks = servicer._chunks(Req(), 10, types.SimpleNamespace(time_remaining=lambda: None))
        assert len(await chunks.__anext__()) == 10
        await asyncio.sleep(0.01)
        assert b.calls == 2  # the second chunk is drawn while the first is sent
        assert len(await chunks.__anext__()) == 10
        await asyncio.sleep(0.01)
        assert b.calls == 3
        await chunks.aclose()
        await asyncio.sleep(0.01)
        assert b.cancelled == 1

    asyncio.run(main())


def test_metrics_by_method_and_code():
    from service.metrics import Metrics

    m = Metrics()
    for code in ("OK", "OK", "INVALID_ARGUMENT"):
        m.observe_rpc("Generate", code, 0.003)
    m.observe_rpc("Score", "OK", 0.001)
    m.observe_batch(100, 3, 0.01)
    get = m.registry.get_sample_value
    assert get("namegen_requests_total", {"method": "Generate", "code": "OK"}) == 2
    assert get("namegen_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"}) == 1
    assert get("namegen_requests_total", {"method": "Score", "code": "OK"}) == 1
    assert get("namegen_errors_total", {"method": "Generate", "code": "INVALID_ARGUMENT"}) == 1
    assert get("namegen_errors_total", {"method": "Generate", "code": "OK"}) is None  # OK is no error
    assert get("namegen_request_latency_seconds_count", {"method": "Generate"}) == 3
    assert get("namegen_batch_rows_sum") == 100 and get("namegen_batch_requests_sum") == 3
    assert get("namegen_model_run_seconds_count") == 1
    assert get("namegen_process_peak_rss_bytes") >= get("process_resident_memory_bytes") > 0  # both in bytes


def test_lone_small_runs_probe_for_concurrency_once_per_interval(engine):
    """Without concurrent traffic a small run may go on the loop thread, except one per PROBE_INTERVAL (the first
    included), which takes the queue so that waiting requests show up; concurrency seen keeps every run off the
    loop thread for CONCURRENT_HOLD."""
    b = Batcher(engine, inline_rows=16)
    t = 100.0
    assert not b._lone_small_run(1, t)  # the first probes
    assert all(b._lone_small_run(16, t + dt) for dt in (0.0, 0.001, PROBE_INTERVAL * 0.99))
    assert not b._lone_small_run(17, t + 0.001)  # more rows than inline_rows: never on the loop thread
    t += PROBE_INTERVAL + 1e-6
    assert not b._lone_small_run(1, t) and b._lone_small_run(1, t + 0.001)  # the next probe, then inline again
    two = [(object(), 1), (object(), 1)]
    assert not b._inline(two, 2, t)  # two requests in one run: concurrent traffic
    assert not any(b._lone_small_run(1, t + dt) for dt in (0.001, PROBE_INTERVAL, CONCURRENT_HOLD * 0.99))
    t += CONCURRENT_HOLD + 1e-6
    assert not b._lone_small_run(1, t) and b._lone_small_run(1, t + 0.001)  # quiet again: a probe, then inline


def test_a_probes_run_leaves_the_loop_thread_free(engine):
    """The run of a request that went the long way as a probe isn't inline (the loop accepts RPCs meanwhile),
    and neither is one that probes in _inline itself; the lone runs after them are, also with a request waiting."""
    b = Batcher(engine, inline_rows=16)
    one = [(object(), 1)]
    t = 100.0
    assert not b._lone_small_run(1, t)  # submit's probe: the request goes through the queue
    assert not b._inline(one, 1, t + 0.001)  # ... and its run to the engine thread
    assert b._inline(one, 1, t + 0.002)  # the next lone run is inline again
    t += PROBE_INTERVAL + 1e-6
    assert not b._inline(one, 1, t)  # a probe decided in _inline: this run, not the next
    assert b._inline(one, 1, t + 0.001)
    b.pending = 2  # another request waiting while a lone one runs isn't concurrent traffic by itself
    assert b._inline(one, 1, t + 0.002) and b._lone_small_run(1, t + 0.003)
