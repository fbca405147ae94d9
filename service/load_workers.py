"""The load test's client processes: each runs its share of a step's in-flight RPCs and tallies them.

service.loadtest plans the steps and prints them; a step's share of the concurrency runs here, in a
process of its own (spawned), as threads making blocking calls (lowest latency at low concurrency) or as
grpc.aio coroutines (cheaper per RPC at high concurrency). Every RPC has a deadline, and a step ends
after its duration or its request quota, so a worker always returns.
"""
import asyncio
import collections
import itertools
import threading
import time

import grpc

from service import gen_proto

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
SCORE_REQUESTS = 64  # distinct Score requests cycled through (slices of one list of names)


def channel_options(cfg):
    """The channel's options: a larger receive limit, and round_robin over several targets."""
    options = list(CHANNEL_OPTIONS)
    if cfg["target"].startswith("ipv4:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


class Tally:
    """One client process's measurements: latencies of OK requests, errors by code, names received."""

    def __init__(self, cfg, quota, t_start):
        self.win_start = t_start + cfg["warmup"]
        self.win_end = self.win_start + cfg["duration"]
        self.quota = quota
        self.lat, self.errors, self.names, self.started = [], collections.Counter(), 0, 0
        self.details = {}  # status code -> the first error message seen with it
        self.last_end = self.win_start
        base = dict(num_samples=cfg["names"], max_length=cfg["max_length"])
        if cfg["rpc"] == "stream":
            base["chunk_size"] = cfg["chunk_size"]
        if cfg["only_new"]:
            base["only_new"] = True
        # self.make() -> the next request: Score requests in turn, one fixed request, or one per seed
        if cfg["rpc"] == "score":  # consecutive slices of the names (wrapping around), as many as there are names for
            names, n = cfg["score_names"], cfg["names"]
            slices = range(max(1, min(SCORE_REQUESTS, len(names) // n)))
            self.make = itertools.cycle([pb.ScoreRequest(names=[names[(k * n + j) % len(names)] for j in range(n)])
                                         for k in slices]).__next__
        elif cfg["seed"] is not None:
            self.make = itertools.repeat(pb.GenerateRequest(seed=cfg["seed"], **base)).__next__
        else:
            seeds = iter(range(cfg["seed_base"], 1 << 62))
            self.make = lambda: pb.GenerateRequest(seed=next(seeds), **base)

    def next(self):
        """(request, counted) for the next call, or None when the step is over."""
        now = time.monotonic()
        if now >= self.win_end or (self.quota and self.started >= self.quota):
            return None
        counted = now >= self.win_start
        self.started += counted
        return self.make(), counted

    def record(self, counted, seconds, names, code, detail=None):
        if not counted:
            return
        self.last_end = max(self.last_end, time.monotonic())
        if code is None:
            self.lat.append(seconds)
            self.names += names
        else:
            self.errors[code] += 1
            self.details.setdefault(code, detail)

    def result(self):
        # A step that ended by --requests is shorter than --duration: rates use the time actually used.
        span = min(self.last_end, self.win_end) - self.win_start
        return {"lat": self.lat, "errors": dict(self.errors), "details": self.details, "names": self.names, "span": span}


def _unreachable(cfg):
    """A step's result when the channel never became ready."""
    return {"lat": [], "errors": {"UNAVAILABLE": 1}, "details": {"UNAVAILABLE": f"{cfg['target']} not reachable"},
            "names": 0, "span": 0.0}


def _sync_call(stub, rpc, timeout):
    """request -> names in the reply, for the blocking client."""
    if rpc == "stream":
        return lambda req: sum(len(resp.samples) for resp in stub.GenerateStream(req, timeout=timeout))
    if rpc == "score":
        return lambda req: len(stub.Score(req, timeout=timeout).scores)
    return lambda req: len(stub.Generate(req, timeout=timeout).samples)


def _aio_call(stub, rpc, timeout):
    """request -> names in the reply, for the asyncio client."""
    async def stream(req):
        n = 0
        async for resp in stub.GenerateStream(req, timeout=timeout):
            n += len(resp.samples)
        return n

    async def score(req):
        return len((await stub.Score(req, timeout=timeout)).scores)

    async def generate(req):
        return len((await stub.Generate(req, timeout=timeout)).samples)

    return {"stream": stream, "score": score, "generate": generate}[rpc]


async def _run_aio(cfg, concurrency, quota, t_start):
    """asyncio client: `concurrency` coroutines on one channel (cheap per RPC at high concurrency)."""
    tally = Tally(cfg, quota, t_start)
    async with grpc.aio.insecure_channel(cfg["target"], options=channel_options(cfg)) as channel:
        stub = pb_grpc.NameGeneratorStub(channel)
        try:
            await asyncio.wait_for(channel.channel_ready(), max(1.0, t_start - time.monotonic() + 5))
        except asyncio.TimeoutError:
            return _unreachable(cfg)
        call = _aio_call(stub, cfg["rpc"], cfg["timeout"])

        async def worker():
            while (item := tally.next()) is not None:
                req, counted = item
                t0 = time.perf_counter()
                n, code, detail = 0, None, None
                try:
                    n = await call(req)
                except grpc.aio.AioRpcError as e:
                    code, detail = e.code().name, e.details()
                tally.record(counted, time.perf_counter() - t0, n, code, detail)

        await asyncio.sleep(max(0.0, t_start - time.monotonic()))  # all processes start together
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally.result()


def _run_sync(cfg, concurrency, quota, t_start):
    """Blocking client, one thread per in-flight RPC: the lowest latency at low concurrency."""
    tally = Tally(cfg, quota, t_start)
    lock = threading.Lock()  # Tally isn't thread-safe; the lock is uncontended next to an RPC
    with grpc.insecure_channel(cfg["target"], options=channel_options(cfg)) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=max(1.0, t_start - time.monotonic() + 5))
        except grpc.FutureTimeoutError:
            return _unreachable(cfg)
        stub = pb_grpc.NameGeneratorStub(channel)
        call = _sync_call(stub, cfg["rpc"], cfg["timeout"])

        def worker():
            time.sleep(max(0.0, t_start - time.monotonic()))
            while True:
                with lock:
                    item = tally.next()
                if item is None:
                    return
                req, counted = item
                t0 = time.perf_counter()
                n, code, detail = 0, None, None
                try:
                    n = call(req)
                except grpc.RpcError as e:
                    code, detail = e.code().name, e.details()
                except ValueError:  # "Cannot invoke RPC on closed channel": the step was interrupted (Ctrl-C)
                    return
                dt = time.perf_counter() - t0
                with lock:
                    tally.record(counted, dt, n, code, detail)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return tally.result()


def proc_main(args):
    """One client process's part of a step: (cfg, concurrency, quota, t_start) -> Tally.result()."""
    cfg, concurrency = args[0], args[1]
    client = cfg["client"]
    if client == "auto":  # on 2 cores: blocking calls had the lower latency at 1 in flight, asyncio a
        client = "sync" if concurrency <= 8 else "aio"  # little more throughput at 32 (+6%); even at 8
    if client == "sync":
        return _run_sync(*args)
    return asyncio.run(_run_aio(*args))
