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
import collections
import ipaddress
import json
import math
import multiprocessing
import signal
import time

import grpc

from data.files import cli, unwritable, write_text
from service import gen_proto

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402
from service.load_workers import SCORE_REQUESTS, channel_options, proc_main  # noqa: E402

MAX_CONCURRENCY = 4096  # in-flight RPCs per step: a load generator, not a flood


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


def check_server(cfg):
    """Before any step, on one channel: exit with one line when no server answers (`make load` before
    `make serve`) instead of printing a table of failed steps. For --rpc score, -> names to score, generated
    by the server itself so that they are in its vocabulary whatever it was trained on: SCORE_REQUESTS
    requests' worth, at most 10,000 and at most what one Generate may ask for."""
    with grpc.insecure_channel(cfg["target"], options=channel_options(cfg)) as channel:
        stub = pb_grpc.NameGeneratorStub(channel)
        try:
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        except grpc.RpcError as e:
            why = ("nothing answers there; start a server first (`make serve`)" if e.code() == grpc.StatusCode.UNAVAILABLE
                   else f"{e.code().name}: {e.details()}")
            raise SystemExit(f"error: no namegen server at {cfg['target']}: {why}") from None
        if cfg["rpc"] != "score":
            return None
        n = min(SCORE_REQUESTS * cfg["names"], 10_000, info.max_samples)
        try:
            reply = stub.Generate(pb.GenerateRequest(num_samples=n, seed=cfg["seed"] or 0, max_length=cfg["max_length"]),
                                  timeout=max(30.0, cfg["timeout"]))
        except grpc.RpcError as e:
            why = "not reachable" if e.code() == grpc.StatusCode.UNAVAILABLE else e.details()
            raise SystemExit(f"error: cannot get names to score from {cfg['target']}: {e.code().name}: {why}") from None
    return [s.name for s in reply.samples]


def run_step(cfg, concurrency, pool):
    procs = min(cfg["procs"], concurrency)
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    quotas = [0] * procs  # 0: no count, the duration ends the step
    if cfg["requests"]:  # split by share, summing to the count (each process at least 1)
        ends = [cfg["requests"] * sum(shares[: i + 1]) // concurrency for i in range(procs)]
        quotas = [max(1, b - a) for a, b in zip([0] + ends, ends)]
    t_start = time.monotonic() + (1.0 if pool else 0.1)  # time for spawned processes to connect
    jobs = []
    for i, (share, quota) in enumerate(zip(shares, quotas)):
        c = dict(cfg, seed_base=cfg["seed_base"] + i * (1 << 40))  # per-request seeds differ across processes
        jobs.append((c, share, quota, t_start))
    results = pool.map(proc_main, jobs) if pool else [proc_main(jobs[0])]
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
    if args.json and (problem := unwritable(args.json, "--json")) is not None:
        ap.error(problem)  # found out now, not after the whole run
    return args


def worker_pool(procs):
    """The client processes (None for one). spawn, not fork: a forked gRPC client is unsafe, and workers must
    not inherit the parent's state. They ignore Ctrl-C, which a terminal sends them too (each would print a
    traceback): the parent stops them, and says "interrupted" once (data.files.cli)."""
    if procs <= 1:
        return None
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept by the spawned interpreters
    try:
        return multiprocessing.get_context("spawn").Pool(procs)
    finally:
        signal.signal(signal.SIGINT, before)


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
    cfg["score_names"] = check_server(cfg)
    print(HEADER, flush=True)
    steps = []
    pool = worker_pool(args.procs)
    try:
        for c in args.levels:
            s = run_step(cfg, c, pool)
            steps.append(s)
            print(row(s), flush=True)
    finally:
        if pool:
            pool.terminate()
    if args.json:
        out = {"config": {k: v for k, v in cfg.items() if k not in ("seed_base", "score_names")}, "steps": steps}
        write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 1 if any(s["ok"] == 0 for s in steps) else 0


if __name__ == "__main__":
    cli(main)
