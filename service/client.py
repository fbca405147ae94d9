"""Command-line client: `python -m service.client {generate,stream,score,info} --help`.

    python -m service.client generate -n 5 --prefix em --seed 7
    python -m service.client stream -n 1000000 --out names.out
    python -m service.client score emma olivia
    python -m service.client info

RPC errors and unusable options print `error: ...` on stderr and exit 1 (no traceback).
"""
import argparse
import json
import math
import sys
import time
import unicodedata
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from data.files import cli
from data.names import DataError, read_lines
from service import gen_proto

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402

# Generate answers up to --max-samples names in one message; gRPC clients accept only 4 MiB by default.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 16 << 20)]
UNARY_TIMEOUT = 30.0  # seconds; a stream has no deadline unless --timeout says so (a big one takes minutes)
TIMEOUT_HELP = f"RPC deadline in seconds (default {UNARY_TIMEOUT:g}; stream: none)"


class UsageError(Exception):
    """An option the request can't carry, or an output file that can't be written."""


def _utf8(value, flag):
    """A command-line string as the request will carry it: undecodable bytes (which Python keeps as
    surrogates) are a usage error, not a traceback from protobuf or grpc."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag} {value.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8 text") from None
    return value


def _text(value, flag):
    """A prefix or a name to send: valid UTF-8, in Unicode NFC as the training words are (data.names)."""
    return unicodedata.normalize("NFC", _utf8(value, flag))


def request_of(args):
    """GenerateRequest with only the options given on the command line set (the rest: server defaults).
    The server validates the values; here only what the message's field types can't hold is refused."""
    req = pb.GenerateRequest()
    for field in ("num_samples", "temperature", "top_k", "top_p", "seed", "prefix", "max_length", "chunk_size"):
        value = getattr(args, field, None)
        if isinstance(value, str):
            value = _text(value, f"--{field.replace('_', '-')}")
        if value is not None:
            try:
                setattr(req, field, value)
            except ValueError:  # protobuf: the value doesn't fit the field's integer type
                unsigned = req.DESCRIPTOR.fields_by_name[field].type == FieldDescriptor.TYPE_UINT64
                limits = "0..2^64-1" if unsigned else "a 32-bit integer"
                raise UsageError(f"--{field.replace('_', '-')} {value}: out of range ({limits})") from None
    if args.only_new:
        req.only_new = True
    return req


def _timeout(args):
    return UNARY_TIMEOUT if args.timeout is None else args.timeout


def cells(text):
    """Terminal columns of text: wide and fullwidth (East Asian) characters take 2; marks that sit on the
    character before them (categories Mn, Me: accents, Thai and Devanagari vowel signs) and format
    characters (Cf: zero-width joiners) take none."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def ljust(text, width):
    """text padded to `width` terminal columns, so names from any word list line up."""
    return text + " " * (width - cells(text))


def cmd_generate(stub, args):
    resp = stub.Generate(request_of(args), timeout=_timeout(args))
    shown = [s.name or '""' for s in resp.samples]  # the model can end a name at once: show it as ""
    width = max(map(cells, shown), default=0)
    for name, s in zip(shown, resp.samples):
        print(f"{ljust(name, width)}  {s.logprob:9.4f}  {'[train]' if s.in_training_data else '[new]'}")
    print(f"seed: {resp.seed}")


def cmd_stream(stub, args):
    req = request_of(args)
    out, part = sys.stdout, None
    if args.out is not None:
        target = Path(_utf8(args.out, "--out"))
        if not args.out or target.is_dir():
            raise UsageError(f"--out {args.out!r}: give a file name")
        # A regular file (or a new one) is written aside and renamed at the end, so a request that fails
        # (a bad option, a dropped connection) leaves an existing file as it was; anything else (/dev/null,
        # a pipe) is written directly. resolve(): a symlink's file is replaced, not the link.
        real = target.resolve()
        if not real.exists() or real.is_file():
            part = real.with_name(f".{real.name}.part")
        try:
            out = open(part or target, "w")
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write ({e.strerror})") from None
    n, chunks, seed, t0 = 0, 0, None, time.perf_counter()
    progress = sys.stderr.isatty()  # a live progress line for people; logs get the summary only
    done = False
    try:
        for resp in stub.GenerateStream(req, timeout=args.timeout):
            out.write("\n".join(s.name for s in resp.samples))
            out.write("\n")
            n += len(resp.samples)
            chunks += 1
            seed = resp.seed
            if progress:
                rate = n / max(time.perf_counter() - t0, 1e-9)
                print(f"\r{n:,}/{args.num_samples:,} names, {rate:,.0f} names/s", end="", file=sys.stderr, flush=True)
        done = True
    finally:
        if out is not sys.stdout:
            out.close()
        if part is not None and not done:
            part.unlink(missing_ok=True)
    if part is not None:
        try:
            part.replace(real)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise UsageError(f"--out {args.out}: cannot write ({e.strerror})") from None
    dt = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    print(f"{n:,} names in {chunks} chunks, {dt:.2f}s ({n / max(dt, 1e-9):,.0f} names/s), seed: {seed}", file=sys.stderr)


def _names_in(path):
    """The names in a file (or stdin for "-"), one per line as in a training word list (data.names.read_lines)."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(_utf8(path, "--file")).read_bytes()
        return [w for _, w in read_lines(raw, f"--file {path}")]
    except OSError as e:
        raise UsageError(f"--file {path}: cannot read ({e.strerror})") from None
    except DataError as e:
        raise UsageError(str(e)) from None


def cmd_score(stub, args):
    names = [_text(w, "name") for w in args.names] + (_names_in(args.file) if args.file is not None else [])
    if not names:
        raise UsageError("give names to score, or --file")
    resp = stub.Score(pb.ScoreRequest(names=names), timeout=_timeout(args))
    shown = [s.name or '""' for s in resp.scores]  # as generate shows an empty name
    width = max(map(cells, shown))
    for name, s in zip(shown, resp.scores):
        per = " ".join(f"{c}:{lp:.2f}" for c, lp in zip(s.name + ".", s.char_logprobs))
        print(f"{ljust(name, width)}  {s.logprob:9.4f}  {per}")


def cmd_info(stub, args):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=_timeout(args))
    d = json_format.MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    # As people read it: the JSON mapping writes 64-bit integers as strings ("12097"), and a Struct
    # holds every number as a double (27.0).
    for f in info.DESCRIPTOR.fields:
        if f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64) and f.name in d:
            d[f.name] = int(d[f.name])
    for key in ("config", "metrics"):
        d[key] = _whole_numbers(d.get(key, {}))
    print(json.dumps(d, indent=2))


def _whole_numbers(v):
    if isinstance(v, dict):
        return {k: _whole_numbers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_whole_numbers(x) for x in v]
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the subcommand overrides the one before it, an absent one doesn't.
    common.add_argument("--target", default=argparse.SUPPRESS, help="server address (default 127.0.0.1:50051)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=TIMEOUT_HELP)

    ap = argparse.ArgumentParser(prog="python -m service.client", description="namegen gRPC client.")
    ap.add_argument("--target", default="127.0.0.1:50051", help="server address")
    ap.add_argument("--timeout", type=float, default=None, help=TIMEOUT_HELP)
    sub = ap.add_subparsers(dest="command", required=True)

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--prefix", help="names start with this (default: none)")
    sampling.add_argument("--temperature", type=float, help="softmax temperature in (0, 100] (server default 1.0)")
    sampling.add_argument("--top-k", type=int, help="keep the k most likely characters (server default 0 = off)")
    sampling.add_argument("--top-p", type=float, help="nucleus mass in (0, 1] (server default 1 = off)")
    sampling.add_argument("--seed", type=int, help="random seed (default: the server picks one and reports it)")
    sampling.add_argument("--max-length", type=int, help="longest name, prefix included (server default 32)")
    sampling.add_argument("--only-new", action="store_true", help="only names that are not in the training data")

    g = sub.add_parser("generate", parents=[common, sampling], help="generate names in one response")
    g.add_argument("-n", "--num-samples", type=int, default=10, help="how many names (default 10)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stream", parents=[common, sampling], help="generate many names as a stream of chunks")
    s.add_argument("-n", "--num-samples", type=int, default=1000, help="how many names (default 1000)")
    s.add_argument("--chunk-size", type=int, help="names per message (server default 10000)")
    s.add_argument("--out", help="write names here, one per line (default: stdout)")
    s.set_defaults(func=cmd_stream)

    sc = sub.add_parser("score", parents=[common], help="log-probability of names under the model")
    sc.add_argument("names", nargs="*", help="names to score")
    sc.add_argument("--file", help="also score the names in this file, one per line (- = standard input)")
    sc.set_defaults(func=cmd_score)

    i = sub.add_parser("info", parents=[common], help="model and server information")
    i.set_defaults(func=cmd_info)
    return ap.parse_args(argv)


def channel_target(text):
    """--target HOST:PORT -> a gRPC target, checked here: grpc would dial port 443 when the port is left out,
    wrap a port over 65535, and log lines of its own for an empty target. An IPv6 host gets its brackets
    ([::1]:50051, as the server prints it, also taken as ::1:50051)."""
    host, sep, port = text.strip().rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise UsageError(f"--target {text!r}: give HOST:PORT with a port in [1, 65535], e.g. 127.0.0.1:50051")
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") and "/" not in host else f"{host}:{port}"


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.timeout is not None and not 0 < args.timeout < math.inf:  # NaN fails too
            raise UsageError(f"--timeout {args.timeout}: give a finite number of seconds > 0")
        with grpc.insecure_channel(channel_target(_utf8(args.target, "--target")), options=CHANNEL_OPTIONS) as channel:
            args.func(pb_grpc.NameGeneratorStub(channel), args)
    except grpc.RpcError as e:
        hint = " (raise --timeout)" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else ""
        print(f"error: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`
        return 0
    return 0


if __name__ == "__main__":
    cli(main)
