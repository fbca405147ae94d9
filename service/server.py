"""gRPC server: `python -m service.server --help`.

Start-up order, and why: load the model first (a missing or corrupt file exits non-zero with one
line, before a port is taken), open the metrics port if asked (a failure there comes before the
gRPC port is announced), bind and start with health NOT_SERVING, warm up, freeze what start-up made
(settle_heap), then SERVING. On SIGTERM/SIGINT/SIGHUP (a closed terminal or ssh session; handled once
the model is loaded, before the port opens, warm-up included): NOT_SERVING (health Watch streams send
it and end), stop accepting, let in-flight RPCs finish within --grace seconds, exit 0. A second signal
cuts the drain short.
"""
import argparse
import asyncio
import gc
import math
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from data.files import cli
from service.batcher import Batcher
from service.engine import MAX_SCORE_CHARS, Engine
from service.health import DrainingHealthServicer
from service.metrics import Metrics, rss_report
from service.servicer import NameGeneratorServicer, add_to_server, pb
from service.session import PROVIDERS, ModelFileError, ProviderError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NameGenerator"].full_name
MiB = 1 << 20
BUSY_POLL_MS = 20.0
INT32_MAX = 2**31 - 1
MAX_THREADS = 64  # each thread holds its own ONNX Runtime session (~9 MB, ~0.1 s to load)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m service.server",
        description="Serve the namegen model over gRPC (namegen.v1.NameGenerator, health, reflection).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model-dir", default="artifacts", help="folder with sampler.onnx and model.onnx")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one")
    ap.add_argument("--provider", choices=PROVIDERS, default="auto",
                    help="ONNX Runtime execution provider; auto = cuda when it loads, else cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads per model run (0 = one per core): a run of 1024+ names is split into row "
                         "shards sampled at once, each on a single-threaded ONNX Runtime session")
    ap.add_argument("--max-batch-rows", type=int, default=4096,
                    help="most names drawn in one model run across batched requests; 0 disables batching")
    ap.add_argument("--no-batching", action="store_true", help="same as --max-batch-rows 0")
    ap.add_argument("--max-wait-ms", type=float, default=10.0,
                    help="under concurrent load, wait at most this long for a batch to fill "
                         "(a lone request never waits); longer waits make larger, cheaper batches")
    ap.add_argument("--wait-per-request-ms", type=float, default=1.0,
                    help="a wait for a batch of n requests lasts at most n times this (and --max-wait-ms): "
                         "under heavy load batches grow, two requests that merely overlapped wait little")
    ap.add_argument("--inline-rows", type=int, default=16,
                    help="without concurrent traffic, a lone request of at most this many names runs on the event "
                         "loop thread instead of the engine thread (saves two thread hand-offs); so are Score calls of "
                         "up to 256 characters, end tokens counted; 0 = neither")
    ap.add_argument("--busy-poll-ms", type=float, default=BUSY_POLL_MS,
                    help="after an RPC, keep the event loop polling this long instead of sleeping, while the server "
                         "is otherwise quiet: one-at-a-time requests then find the CPU awake (costs CPU only "
                         "while requests keep coming); 0 = never")
    ap.add_argument("--max-queue", type=int, default=1024,
                    help="most requests pending (queued or being served); more get RESOURCE_EXHAUSTED")
    ap.add_argument("--max-queue-names", type=int, default=1_000_000,
                    help="most names wanted by the pending requests together (~210 MiB of results); a request "
                         "that would go past it gets RESOURCE_EXHAUSTED, unless nothing else is pending (one "
                         "larger than the bound then runs alone)")
    ap.add_argument("--max-samples", type=int, default=100_000, help="most names per Generate (and per Score)")
    ap.add_argument("--max-stream-samples", type=int, default=10_000_000, help="most names per GenerateStream")
    ap.add_argument("--max-streams", type=int, default=16,
                    help="most GenerateStreams at once (more: RESOURCE_EXHAUSTED); each holds up to two chunks, "
                         "~35 MB at the largest chunk_size, for as long as its client is slow to read")
    ap.add_argument("--stream-stall-s", type=float, default=30.0,
                    help="a GenerateStream whose client takes no message for this long is ended with "
                         "DEADLINE_EXCEEDED, freeing its --max-streams slot (at most --max-streams such streams "
                         "wait on gRPC at once, one message each, until their clients read on or leave); 0 = never")
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port on --host; 0 = off")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds to let in-flight RPCs finish on SIGTERM")
    ap.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                    help="asyncio event loop implementation; auto = uvloop when installed (+3-22%% requests/s at "
                         "concurrency 64 on 2 cores, measured in interleaved pairs), else the standard one")
    args = ap.parse_args(argv)
    if args.no_batching:
        args.max_batch_rows = 0
    minimum = {"max_queue": 1, "max_queue_names": 1, "max_streams": 1, "max_batch_rows": 0, "inline_rows": 0}
    for name, lo in minimum.items():
        if getattr(args, name) < lo:
            ap.error(f"--{name.replace('_', '-')} must be >= {lo}")
    bounds = {"port": (0, 65535), "metrics_port": (0, 65535), "threads": (0, MAX_THREADS),
              "max_wait_ms": (0, 1000), "wait_per_request_ms": (0, 1000), "busy_poll_ms": (0, 1000), "grace": (0, 3600),
              "stream_stall_s": (0, 3600),
              "max_samples": (1, INT32_MAX), "max_stream_samples": (1, INT32_MAX)}  # int32 in ModelInfo and requests
    for name, (lo, hi) in bounds.items():
        if not lo <= getattr(args, name) <= hi:  # NaN fails too
            ap.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(args, name)}")
    return args


def load_engine(args):
    """The Engine, or exit 2 with a one-line reason (no traceback)."""
    try:
        return Engine(args.model_dir, provider=args.provider, threads=args.threads)
    except (ModelFileError, ProviderError) as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001 - anything the engine didn't classify is still one line
        msg = f"cannot load the model from {args.model_dir}: {type(e).__name__}: {e}"
    first = msg.strip().splitlines()[0] if msg.strip() else "unknown error"
    print(f"error: {first}", file=sys.stderr, flush=True)
    raise SystemExit(2)


async def serve(args, engine):
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    batcher = Batcher(engine, args.max_batch_rows, args.max_wait_ms, args.max_queue, metrics, args.inline_rows,
                      args.max_queue_names, args.busy_poll_ms, args.wait_per_request_ms)
    servicer = NameGeneratorServicer(engine, batcher, metrics, args.max_samples, args.max_stream_samples,
                                     args.max_streams, args.stream_stall_s)
    server = grpc.aio.server(
        options=[
            # A Generate of max_samples names of up to 64 characters, with room to spare; a stream
            # chunk is smaller still. Receives: the largest valid request (1.4 MB for names.txt).
            ("grpc.max_send_message_length", 64 * MiB),
            ("grpc.max_receive_message_length", receive_limit(engine.itos, args.max_samples)),
            ("grpc.so_reuseport", 0),  # a port in use must fail, not silently share
        ]
    )
    # Signals drain from here on, before the port opens (a Ctrl-C while grpc opens it would otherwise leave
    # grpc's tasks complaining as the process ends). Once it is open, RPCs in flight during warm-up drain too.
    stop = asyncio.Event()
    signals = []

    def on_signal(signame):
        signals.append(signame)
        if len(signals) == 1:
            stop.set()
        else:  # second signal: don't wait out the grace period
            print(f"{signame} again: cancelling in-flight RPCs", flush=True)
            loop.create_task(server.stop(0))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig.name)
    add_to_server(servicer, server)
    health = DrainingHealthServicer()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host  # IPv6
    if args.metrics_port:
        try:
            mport = metrics.serve(args.metrics_port, args.host)
        except OSError as e:
            print(f"error: cannot serve metrics on {host}:{args.metrics_port}: {e.strerror}", file=sys.stderr)
            return 1
        print(f"metrics on http://{host}:{mport}/metrics", flush=True)
    why = bind_error(args.host.strip("[]"), args.port)
    try:
        port = 0 if why else server.add_insecure_port(f"{host}:{args.port}")
    except RuntimeError:
        port = 0
    if not port:
        print(f"error: cannot listen on {host}:{args.port} ({why or 'in use or not a local address'})", file=sys.stderr)
        return 1
    await server.start()
    batcher.start()
    print(f"listening on {host}:{port}", flush=True)  # [::1]:port for IPv6, as a client's --target takes it

    metrics.queue_depth.set_function(lambda: batcher.pending)
    try:
        await batcher.call(engine.warmup)
    except Exception as e:  # noqa: BLE001 - a model that loads but can't run: one line, non-zero exit
        print(f"error: warm-up failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        await server.stop(0)
        await batcher.close()
        return 1
    if not stop.is_set():  # a signal during warm-up goes straight to the drain
        settle_heap()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        print(f"serving (provider {engine.provider})", flush=True)
    await stop.wait()
    print(f"{signals[0]}: NOT_SERVING, draining in-flight RPCs (up to {args.grace:g}s)", flush=True)
    await health.enter_graceful_shutdown()
    await server.stop(args.grace)
    await batcher.close()
    print(f"stopped; {rss_report()}", flush=True)
    return 0


def settle_heap():
    """Hide what start-up made (modules, the model's metadata, grpc's and numpy's objects: ~40,000, none of
    them ever garbage) from the garbage collector, which otherwise walks them all at every full collection.
    At concurrency 64 here a full collection, every ~3,000 requests, went from 17-19 ms (a pause every
    request in flight waits out) to 3.5-4.6 ms; throughput moved within the noise (+2% median, 8 of 10 pairs)."""
    gc.collect()
    gc.freeze()


def receive_limit(itos, max_samples):
    """Bytes of the largest request that can be valid: a Score call of MAX_SCORE_CHARS characters in the
    vocabulary's widest UTF-8 form, split over max_samples names (each name's field tag and length take up
    to 3 bytes), plus 64 KiB for everything else (a Generate is ~100 bytes). gRPC refuses a larger message
    (RESOURCE_EXHAUSTED) before it is parsed: when the limit was 16 MiB, 40 concurrent 16 MB Score calls,
    all invalid, took the server from 160 MB to 3.1 GB, most of which it kept."""
    widest = max((len(c.encode()) for c in itos[1:]), default=1)
    return min(INT32_MAX, MAX_SCORE_CHARS * widest + 3 * max_samples + 64 * 1024)


def bind_error(host, port):
    """Why host:port can't be listened on, or None. Checked before grpc tries, whose C core would log
    lines of its own before our one-line error."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: only a listener is in the way
            s.bind(addr)
    except OSError as e:  # socket.gaierror included
        return e.strerror or str(e)
    return None


def loop_factory(choice):
    """(event loop factory or None for asyncio's own, its name) for --event-loop."""
    if choice != "asyncio":
        try:
            import uvloop
            return uvloop.new_event_loop, "uvloop"
        except ImportError:
            if choice == "uvloop":
                sys.exit("error: --event-loop uvloop but uvloop is not installed (pip install uvloop); use auto or asyncio")
    return None, "asyncio"


def main(argv=None):
    args = parse_args(argv)
    factory, args.event_loop = loop_factory(args.event_loop)
    settings = " ".join(f"{k.replace('_', '-')}={v}" for k, v in sorted(vars(args).items()) if k != "no_batching")
    print(f"settings: {settings}", flush=True)
    engine = load_engine(args)
    info = engine.info
    print(
        f"model: {args.model_dir} provider={engine.provider} params={info.num_params} vocab={len(info.vocab)} "
        f"block_size={info.block_size} max_rows={engine.max_rows} sha256={info.checkpoint_sha256[:12]} "
        f"preset={info.metrics.get('preset', '?')} val_loss={info.metrics.get('val_loss', math.nan):.4f}",
        flush=True,
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(args, engine))


if __name__ == "__main__":
    cli(main)  # Ctrl-C while the model loads: one line; once serving, SIGINT drains (serve)
