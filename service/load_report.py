"""The README's load-test table, measured again on this machine: `make load-report`.

    python -m service.load_report --model-dir artifacts
    python -m service.load_report --rows c1,c1-no-poll --rounds 4 --duration 5

For each row: a fresh server (`python -m service.server`, 127.0.0.1, an ephemeral port) with the row's
flags, the load test (`python -m service.loadtest`) against it, SIGTERM, and the server's peak RSS from the
line it prints as it exits. A fresh server per row, so no row inherits another's caches, queues or memory.
The rows run in alternating order over --rounds (forward, then backward), so rows that are compared
(busy polling on or off, batching on or off, the server against one whose Generate does nothing) run in
the same phase of a shared machine, and the report gives each row's range over the rounds. It also prints
the machine's speed probe before and after the run (`python -m timeit "sum(range(10000))"`) and the share
of CPU time the hypervisor took (steal), since on a shared 2-core host these move the numbers more than
most code changes do.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data.files import cli, unwritable, write_text
from service.server_process import ROOT, ServerProcess
from service.session import PROVIDERS


@dataclass(frozen=True)
class Row:
    key: str  # for --rows
    label: str  # the table's first column
    load: tuple  # python -m service.loadtest flags
    server: tuple = ()  # python -m service.server flags beyond --provider
    requests: int = 0  # a fixed request count (the streams), timed by --duration otherwise
    prelude: str = None  # Python run in the server process before its main (ServerProcess's prelude)


# The ceiling row's server: Generate answers one fixed name at once, with no validation, batching or model.
# What is left is Python gRPC, server and load test, on these cores: the bound the real rows run under.
CEILING = """
from service import servicer as _s
_REPLY = _s.pb.GenerateResponse(seed=1, samples=[_s.pb.Sample(name="emma", logprob=-6.5)])
async def _do_nothing(self, request, context):
    return _REPLY
_s.NameGeneratorServicer.Generate = _do_nothing
"""

ROWS = (
    Row("c1", "1-name Generate, concurrency 1", ("--concurrency", "1")),
    Row("c1-no-poll", "the same, `--busy-poll-ms 0`", ("--concurrency", "1"), ("--busy-poll-ms", "0")),
    Row("c1-ceiling", "the same against a do-nothing `Generate` (Python gRPC's round trip)", ("--concurrency", "1"),
        prelude=CEILING),
    Row("c64", "1-name Generate, concurrency 64, dynamic batching", ("--concurrency", "64")),
    Row("c64-no-batching", "the same, `--max-batch-rows 0` (no batching)", ("--concurrency", "64"), ("--max-batch-rows", "0")),
    Row("c64-ceiling", "the same against a do-nothing `Generate` (Python gRPC's ceiling)", ("--concurrency", "64"),
        prelude=CEILING),
    Row("score-c8", "8-name Score, concurrency 8", ("--rpc", "score", "--names-per-request", "8", "--concurrency", "8")),
    Row("10k", "10,000-name Generate, concurrency 1", ("--names-per-request", "10000", "--concurrency", "1")),
    Row("stream-1m", "GenerateStream of 1,000,000 names (two streams)",
        ("--rpc", "stream", "--names-per-request", "1000000", "--concurrency", "1", "--warmup", "0", "--timeout", "300"),
        requests=2),
)
BY_KEY = {r.key: r for r in ROWS}
PEAK_RSS = re.compile(r"peak rss ([0-9.]+) MiB")


class ReportError(Exception):
    """A row that could not be measured at all (the server didn't start, the load test failed): one line."""


def machine_probe():
    """Microseconds per loop of `python -m timeit "sum(range(10000))"` (best of 5), as the README quotes it."""
    t = timeit.Timer("sum(range(10000))")
    number, _ = t.autorange()
    return min(t.repeat(5, number)) / number * 1e6


def cpu_times():
    """(steal, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def steal_share(before, after):
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def measure(row, args):
    """One row once: a fresh server, the load test, the server stopped. -> the load test's step, with
    peak_rss_mib (None if the server didn't print it) and server_rc."""
    server = ServerProcess(Path(args.model_dir).resolve(), *row.server, *args.server_args.split(), provider=args.provider,
                           prelude=row.prelude)
    try:
        server.wait_serving()
    except RuntimeError:
        raise ReportError(f"the server did not start: {server.why_not()}") from None
    if row.requests:  # the streams: a fixed count of long requests, which --requests may only lower
        count, seconds = min(row.requests, args.requests or row.requests), args.stream_seconds
    else:  # the other rows run by time (and --requests, when given)
        count, seconds = args.requests, args.duration
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.json"
            cmd = [sys.executable, "-m", "service.loadtest", "--target", server.target, "--procs", str(args.procs),
                   "--duration", str(seconds), "--warmup", str(args.warmup), "--requests", str(count), "--json", str(out),
                   *row.load]  # last: a row's own --warmup or --timeout wins
            load = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if not out.exists():  # the load test stopped before any step (its one-line error)
                why = (load.stderr.strip() or load.stdout.strip() or f"exit {load.returncode}").splitlines()[-1]
                raise ReportError(f"the load test failed: {why}")
            (step,) = json.loads(out.read_text())["steps"]
    finally:
        rc = server.stop()
    rss = next((float(m.group(1)) for line in server.stdout if (m := PEAK_RSS.search(line))), None)
    return {**step, "peak_rss_mib": rss, "server_rc": rc}


def span(values, fmt=None):
    """'lo-hi' over the rounds (one value: itself); '-' when no round had one. fmt None: a rate, whole
    numbers from 100 up (1,234), two decimals below (a stream's 0.14 requests/s)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    fmt = fmt or (",.0f" if lo >= 100 else ",.2f")
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"


def table(results):
    """Markdown table of every measured row: ranges over its rounds."""
    lines = ["| load | req/s | names/s | p50 ms | p90 ms | p99 ms | errors | server peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in ROWS:
        runs = results.get(row.key)
        if not runs:
            continue
        errors = sum((Counter(r["errors"]) for r in runs), Counter())  # by status code, over the rounds
        cells = [span([r["rps"] for r in runs]), span([r["names_per_s"] for r in runs]),
                 *(span([r[k] for r in runs], ".2f") for k in ("p50_ms", "p90_ms", "p99_ms")),
                 ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "-",
                 span([r["peak_rss_mib"] for r in runs], ".1f")]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failed(runs):
    """Rows whose result can't stand: no request succeeded, or the server didn't exit cleanly on SIGTERM."""
    return [r for r in runs if r["ok"] == 0 or r["server_rc"] != 0]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m service.load_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="artifacts", help="folder with sampler.onnx and model.onnx")
    ap.add_argument("--rows", default=",".join(BY_KEY), help=f"comma-separated rows to measure, of: {', '.join(BY_KEY)}")
    ap.add_argument("--rounds", type=int, default=2, help="times each row is measured, in alternating order")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per row (all but the streams)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each row")
    ap.add_argument("--requests", type=int, default=0, help="also end a row after this many requests (0 = by time)")
    ap.add_argument("--stream-seconds", type=float, default=120.0, help="upper bound on the stream row")
    ap.add_argument("--procs", type=int, default=1,
                    help="load-test client processes (on 2 cores, 1 measured 13%% more requests/s at concurrency 64 than 2)")
    ap.add_argument("--provider", choices=PROVIDERS, default="cpu", help="the servers' --provider")
    ap.add_argument("--server-args", default="", help="more flags for every server, e.g. --server-args='--event-loop asyncio'")
    ap.add_argument("--json", default="artifacts/load_report.json", help="where the results go as JSON")
    args = ap.parse_args(argv)
    unknown = [k for k in args.rows.split(",") if k not in BY_KEY]
    if unknown or not args.rows:
        ap.error(f"--rows: unknown row {', '.join(unknown) or '(none given)'}; the rows are {', '.join(BY_KEY)}")
    args.rows = [BY_KEY[k] for k in dict.fromkeys(args.rows.split(","))]
    if not 1 <= args.rounds <= 100 or not 1 <= args.procs <= 64 or not 0 <= args.requests < 1 << 31:
        ap.error("--rounds must be in [1, 100], --procs in [1, 64] and --requests in [0, 2^31 - 1]")
    for name in ("duration", "warmup", "stream_seconds"):
        v = getattr(args, name)
        if not (0 <= v < math.inf if name == "warmup" else 0 < v < math.inf):  # NaN fails both
            ap.error(f"--{name.replace('_', '-')} must be finite and {'>= 0' if name == 'warmup' else '> 0'}, got {v}")
    if not (Path(args.model_dir) / "sampler.onnx").is_file():
        ap.error(f"--model-dir {args.model_dir}: no sampler.onnx there; run `make export` first")
    if (problem := unwritable(args.json, "--json", create=True)) is not None:
        ap.error(problem)  # found out now, not after the whole run
    return args


def main(argv=None):
    args = parse_args(argv)
    meta = {"model_dir": str(args.model_dir), "provider": args.provider, "rounds": args.rounds, "duration": args.duration,
            "warmup": args.warmup, "procs": args.procs, "requests": args.requests, "server_args": args.server_args,
            "cpus": os.cpu_count()}
    print("load report: " + " ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    probe_before, cpu0, t0 = machine_probe(), cpu_times(), time.monotonic()
    results = {}
    for r in range(args.rounds):
        for row in args.rows if r % 2 == 0 else args.rows[::-1]:
            try:
                step = measure(row, args)
            except ReportError as e:
                print(f"error: {row.key}: {e}", file=sys.stderr)
                return 1
            results.setdefault(row.key, []).append(step)
            print(f"  round {r + 1}/{args.rounds}  {row.key:<16} {step['rps']:>9,.0f} req/s {step['names_per_s']:>11,.0f} names/s"
                  f"  p50 {step['p50_ms'] or math.nan:8.2f} ms  errors {step['errors'] or '-'}"
                  f"  peak rss {step['peak_rss_mib'] or math.nan:.1f} MiB", flush=True)
    steal = steal_share(cpu0, cpu_times())
    machine = {"timeit_us_before": round(probe_before, 1), "timeit_us_after": round(machine_probe(), 1),
               "steal_share": steal, "seconds": round(time.monotonic() - t0, 1)}
    print(f"\nmachine: {os.cpu_count()} CPUs; python -m timeit \"sum(range(10000))\": {machine['timeit_us_before']:.0f} us "
          f"before, {machine['timeit_us_after']:.0f} us after (a plain-Python probe: compare it across runs); steal "
          + ("n/a" if steal is None else f"{100 * steal:.1f}%") + f"; {machine['seconds']:.0f} s in all\n")
    print(table(results))
    write_text(args.json, json.dumps({"config": meta, "machine": machine, "rows": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    bad = [(k, r) for k, runs in results.items() for r in failed(runs)]
    for k, r in bad:
        print(f"error: {k}: " + ("no request succeeded" if r["ok"] == 0 else f"the server exited {r['server_rc']}"),
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    cli(main)
