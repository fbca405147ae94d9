"""Closed-loop load generator for the namegen server: `python -m service.loadtest --help`.

    python -m service.loadtest --concurrency 1,8,64 --duration 5 --procs 2
    python -m service.loadtest --rpc stream --names-per-request 100000 --concurrency 1 --requests 3
    python -m service.loadtest --rpc score --names-per-request 8 --concurrency 1,8
    python -m service.loadtest --target 127.0.0.1:50051,127.0.0.1:50052 --concurrency 64

Each step runs `concurrency` in-flight RPCs (each waits for its answer, then sends the next),
split over --procs client processes so that one Python client's CPU isn't what is measured.
The first --warmup seconds of a step are not counted; a step ends after --duration seconds or
--requests counted requests, whichever comes first, and every RPC has a deadline, so a run is
bounded in count and time. Several targets are balanced client-side with gRPC's round_robin.
Score calls score names the server generated for the run (one Generate call before the first step).
Only loopback targets are accepted: this tool is for measuring a local server.
"""
import argparse
import asyncio
import collections
import ipaddress
import itertools
import json
import math
import multiprocessing
import os
import sys
import threading
import time

import grpc

from service import gen_proto

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
MAX_CONCURRENCY = 4096  # in-flight RPCs per step: a load generator, not a flood
SCORE_REQUESTS = 64  # distinct Score requests cycled through (slices of one list of names)


def channel_target(targets):
    """'127.0.0.1:1,127.0.0.1:2' -> a gRPC target (ipv4:... list for round_robin), after a loopback check."""
    hosts = []
    for t in targets.split(","):
        host, sep, port = t.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit():
            raise SystemExit(f"error: target {t!r} is not HOST:PORT")
        try:
            ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            raise SystemExit(f"error: target {t!r}: use a loopback IP address (127.0.0.1)") from None
        if not ip.is_loopback:
            raise SystemExit(f"error: target {t!r} is not a loopback address; this tool only loads a local server")
        port = int(port)
        if not 1 <= port <= 65535:
            raise SystemExit(f"error: target {t!r}: port must be in [1, 65535]")
        hosts.append((ip, port))
    if len(hosts) == 1:
        ip, port = hosts[0]
        return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
    if any(ip.version != 4 for ip, _ in hosts):
        raise SystemExit("error: several targets must all be IPv4 (127.0.0.1:PORT,...)")
    return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in hosts)


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


def _options(cfg):
    options = list(CHANNEL_OPTIONS)
    if cfg["target"].startswith("ipv4:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


async def _run_aio(cfg, concurrency, quota, t_start):
    """asyncio client: `concurrency` coroutines on one channel (cheap per RPC at high concurrency)."""
    tally = Tally(cfg, quota, t_start)
    async with grpc.aio.insecure_channel(cfg["target"], options=_options(cfg)) as channel:
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
    with grpc.insecure_channel(cfg["target"], options=_options(cfg)) as channel:
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
                dt = time.perf_counter() - t0
                with lock:
                    tally.record(counted, dt, n, code, detail)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return tally.result()


def _proc_main(args):
    cfg, concurrency = args[0], args[1]
    client = cfg["client"]
    if client == "auto":  # on 2 cores: blocking calls had the lower latency at 1 in flight, asyncio a
        client = "sync" if concurrency <= 8 else "aio"  # little more throughput at 32 (+6%); even at 8
    if client == "sync":
        return _run_sync(*args)
    return asyncio.run(_run_aio(*args))


def score_names(cfg):
    """Names to score, generated by the server itself, so they are in its vocabulary whatever it was trained
    on: SCORE_REQUESTS requests' worth, at most 10,000 and at most what one Generate may ask for."""
    with grpc.insecure_channel(cfg["target"], options=_options(cfg)) as channel:
        stub, timeout = pb_grpc.NameGeneratorStub(channel), max(30.0, cfg["timeout"])
        try:
            limit = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout).max_samples
            n = min(SCORE_REQUESTS * cfg["names"], 10_000, limit)
            reply = stub.Generate(pb.GenerateRequest(num_samples=n, seed=cfg["seed"] or 0, max_length=cfg["max_length"]),
                                  timeout=timeout)
        except grpc.RpcError as e:
            why = "not reachable" if e.code() == grpc.StatusCode.UNAVAILABLE else e.details()
            raise SystemExit(f"error: cannot get names to score from {cfg['target']}: {e.code().name}: {why}") from None
    return [s.name for s in reply.samples]


def run_step(cfg, concurrency, pool):
    procs = min(cfg["procs"], concurrency)
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    quotas = [0] * procs
    if cfg["requests"]:
        quotas = [max(1, cfg["requests"] * s // concurrency) for s in shares]
    t_start = time.monotonic() + (1.0 if pool else 0.1)  # time for spawned processes to connect
    jobs = []
    for i, (share, quota) in enumerate(zip(shares, quotas)):
        c = dict(cfg, seed_base=cfg["seed_base"] + i * (1 << 40))  # per-request seeds differ across processes
        jobs.append((c, share, quota, t_start))
    results = pool.map(_proc_main, jobs) if pool else [_proc_main(jobs[0])]
    lat = sorted(x for r in results for x in r["lat"])
    errors, details = collections.Counter(), {}
    for r in results:
        errors.update(r["errors"])
        details = {**r["details"], **details}  # the first process's message for each code
    span = max((r["span"] for r in results), default=0.0) or 1e-9
    n_ok = len(lat)

    def pct(q):  # None (JSON null) when nothing succeeded
        return 1000 * lat[min(n_ok - 1, int(q * n_ok))] if n_ok else None

    return {
        "concurrency": concurrency,
        "requests": n_ok + sum(errors.values()),
        "ok": n_ok,
        "seconds": round(span, 3),
        "rps": n_ok / span,
        "names_per_s": sum(r["names"] for r in results) / span,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": 1000 * lat[-1] if lat else None,
        "errors": dict(errors),
        "error_details": details,
    }


HEADER = f"{'conc':>5} {'requests':>9} {'req/s':>9} {'names/s':>11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  errors"


def row(s):
    errs = ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"
    ms = " ".join(f"{'-' if s[k] is None else format(s[k], '.2f'):>8}" for k in ("p50_ms", "p90_ms", "p99_ms"))
    line = f"{s['concurrency']:>5} {s['requests']:>9} {s['rps']:>9.0f} {s['names_per_s']:>11.0f} {ms}  {errs}"
    # Why requests failed: the first message of each status code, on lines of their own.
    return "\n".join([line] + [f"{'':>6}{k}: {(v or '')[:200]}" for k, v in sorted(s["error_details"].items())])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m service.loadtest",
        description="Closed-loop gRPC load test of the namegen server (loopback targets only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT, or several comma-separated (round_robin)")
    ap.add_argument("--rpc", choices=("generate", "stream", "score"), default="generate",
                    help="Generate, GenerateStream, or Score (of names the server generated)")
    ap.add_argument("--concurrency", default="1", help="in-flight RPCs; a comma list runs a sweep, e.g. 1,8,64")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per step (upper bound)")
    ap.add_argument("--requests", type=int, default=0, help="stop a step after this many measured requests; 0 = by time")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds at the start of each step that are not measured")
    ap.add_argument("--names-per-request", type=int, default=1, help="num_samples of each request (Score: names)")
    ap.add_argument("--chunk-size", type=int, default=10_000, help="GenerateStream chunk size")
    ap.add_argument("--max-length", type=int, default=32, help="max_length of each request")
    ap.add_argument("--only-new", action="store_true", help="set only_new on each request")
    ap.add_argument("--seed", default="per-request",
                    help="'per-request' (a different seed for each request) or an integer used by all requests")
    ap.add_argument("--procs", type=int, default=1, help="client processes to spread the concurrency over")
    ap.add_argument("--client", choices=("auto", "aio", "sync"), default="auto",
                    help="blocking calls from one thread per in-flight RPC, or grpc.aio coroutines; auto = "
                         "threads up to 8 in flight per process (lower latency), asyncio above (cheaper per RPC)")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline of each RPC in seconds")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency: expected integers like 1,8,64, got {args.concurrency!r}")
    if any(not 1 <= c <= MAX_CONCURRENCY for c in args.levels) or not 1 <= args.procs <= 64:
        ap.error(f"--concurrency must be in [1, {MAX_CONCURRENCY}] and --procs in [1, 64]")
    if not 0 < args.duration < math.inf or not 0 <= args.warmup < math.inf or not 0 < args.timeout < math.inf:
        ap.error("--duration and --timeout must be finite and > 0, --warmup finite and >= 0")  # NaN fails too
    int32 = {"names_per_request": 1, "max_length": 1, "chunk_size": 1, "requests": 0}
    for name, lo in int32.items():  # what the request message (int32 fields) can carry; the server checks the rest
        if not lo <= getattr(args, name) < 1 << 31:
            ap.error(f"--{name.replace('_', '-')} must be in [{lo}, 2^31 - 1], got {getattr(args, name)}")
    if args.seed != "per-request":
        try:
            args.seed = int(args.seed)
        except ValueError:
            ap.error("--seed: 'per-request' or an integer")
        if not 0 <= args.seed < 1 << 64:
            ap.error(f"--seed must be in [0, 2^64 - 1], got {args.seed}")
    if args.json and (os.path.isdir(args.json) or not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK)):
        ap.error(f"--json {args.json}: cannot write there")  # found out now, not after the whole run
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = {
        "target": channel_target(args.target),
        "rpc": args.rpc,
        "names": args.names_per_request,
        "chunk_size": args.chunk_size,
        "max_length": args.max_length,
        "only_new": args.only_new,
        "seed": None if args.seed == "per-request" else args.seed,
        "seed_base": int(time.time() * 1000) % (1 << 40),
        "warmup": args.warmup,
        "duration": args.duration,
        "requests": args.requests,
        "timeout": args.timeout,
        "procs": args.procs,
        "client": args.client,
    }
    print(f"# {args.rpc} x{args.names_per_request} names -> {cfg['target']}, procs={args.procs}, "
          f"warmup={args.warmup:g}s, duration<={args.duration:g}s" + (f", requests<={args.requests}" if args.requests else ""))
    if args.rpc == "score":
        cfg["score_names"] = score_names(cfg)
    print(HEADER, flush=True)
    steps = []
    # spawn, not fork: a forked gRPC client is unsafe, and workers must not inherit the parent's state.
    pool = multiprocessing.get_context("spawn").Pool(args.procs) if args.procs > 1 else None
    try:
        for c in args.levels:
            s = run_step(cfg, c, pool)
            steps.append(s)
            print(row(s), flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        if pool:
            pool.terminate()
    if args.json:
        out = {"config": {k: v for k, v in cfg.items() if k not in ("seed_base", "score_names")}, "steps": steps}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if any(s["ok"] == 0 for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
