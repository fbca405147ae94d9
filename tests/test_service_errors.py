"""What the service does with bad input and hard conditions: INVALID_ARGUMENT naming the field, deadlines,
cancellation, overload, SIGTERM, bad flags, a port in use, a corrupt model file.

No timing assertions: deadlines and overload are provoked with margins of orders of magnitude.
"""
import importlib.util
import math
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service_fixtures import (ROOT, SERVICE, ServerProcess, assert_healthy, free_port, gen, pb, pb_grpc,
                                    rpcs_counted, scrape, start_server, stopped_early, wait_for_stop)


BAD_GENERATE = [
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)),
    ("top_k", dict(top_k=-1)),
    ("top_k", dict(top_k=1000)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=1e-46)),  # > 0 as a double, 0 in float32, which the sampler runs in
    ("temperature", dict(temperature=1e-46)),
    ("temperature", dict(temperature=1e39)),  # inf in float32
    ("temperature", dict(temperature=101.0)),  # over the maximum, 100
    ("num_samples", dict(num_samples=0)),
    ("num_samples", dict(num_samples=-5)),
    ("num_samples", dict(num_samples=2_000_001)),  # over both --max-samples and --max-stream-samples
    ("max_length", dict(max_length=0)),
    ("max_length", dict(max_length=65)),
    ("prefix", dict(prefix="Zz")),
    ("prefix", dict(prefix="a.b")),
    ("prefix", dict(prefix="abcdef", max_length=3)),
    ("prefix", dict(prefix="\u00e9" * 20_000)),  # echoed in full, the message would outgrow gRPC's status metadata
]


@pytest.mark.parametrize("field,kw", BAD_GENERATE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_GENERATE)])
def test_generate_invalid_argument(stub, channel, field, kw):
    for call in (stub.Generate, lambda req, timeout: list(stub.GenerateStream(req, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GenerateRequest(**kw), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in e.value.details()
    assert_healthy(channel, stub)


def test_generate_over_max_samples(stub):
    with pytest.raises(grpc.RpcError) as e:  # fine for a stream, too many for one message
        gen(stub, num_samples=200_001)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_samples" in e.value.details()


@pytest.mark.parametrize("bad, edge", [(0, 1), (50_001, 50_000)])
def test_stream_invalid_chunk_size(stub, bad, edge):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(pb.GenerateRequest(num_samples=5, chunk_size=bad), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in e.value.details()
    ok = list(stub.GenerateStream(pb.GenerateRequest(num_samples=5, chunk_size=edge), timeout=10))  # the range's end
    assert sum(len(r.samples) for r in ok) == 5


@pytest.mark.parametrize("method, streaming", [("Generate", False), ("GenerateStream", True), ("Score", False),
                                               ("GetModelInfo", False)])
def test_undecodable_request_is_invalid_argument(channel, stub, method, streaming):
    # What a broken or mismatched client sends: bytes that aren't the message (grpc alone says UNKNOWN).
    kind = channel.unary_stream if streaming else channel.unary_unary
    call = kind(f"/namegen.v1.NameGenerator/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        r = call(b"\xff\xff\xff\xff", timeout=10)
        list(r) if streaming else r
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("request: not a valid")
    assert_healthy(channel, stub)


def test_only_new_impossible_is_failed_precondition(stub, channel):
    # The only name of length 4 that starts with "emma" is "emma", a training name: no new one exists.
    with pytest.raises(grpc.RpcError) as e:
        gen(stub, num_samples=1, prefix="emma", max_length=4, only_new=True, seed=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "only_new" in e.value.details()
    assert_healthy(channel, stub)


def test_deadline_exceeded(server, stub, channel):
    # 200k names take seconds; a 20 ms deadline passes long before. The server drops the work, and counts
    # it under the code the client saw.
    rows0, ended0 = scrape(server, "namegen_batch_rows_sum"), stopped_early(server, "Generate")
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(num_samples=200_000, seed=1), timeout=0.02)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for_stop(server, "Generate", ended0) == (ended0[0] + 1, ended0[1])
    rows = scrape(server, "namegen_batch_rows_sum") - rows0
    for i in range(20):  # each gives the worker a round, in which a live job would draw ~511 rows more
        gen(stub, num_samples=1, seed=i)
    assert scrape(server, "namegen_batch_rows_sum") - rows0 <= rows + 20 + 4096  # + a chunk that was in flight
    assert_healthy(channel, stub)


def test_stream_past_its_deadline_is_cancelled(server, stub, channel):
    """A client that stops reading: flow control holds the server's stream until the deadline cancels it,
    and the server counts one stream stopped early. (Which of the two codes it counts depends on timing
    when the server was off the CPU as the request arrived: test_cancelled_code covers the rule.)"""
    ended0 = stopped_early(server, "GenerateStream")
    it = stub.GenerateStream(pb.GenerateRequest(num_samples=2_000_000, seed=4, chunk_size=1000), timeout=3.0)
    next(it)
    time.sleep(3.2)
    with pytest.raises(grpc.RpcError) as e:
        for _ in it:
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline, cancelled = wait_for_stop(server, "GenerateStream", ended0)
    assert deadline + cancelled == sum(ended0) + 1
    assert_healthy(channel, stub)


@pytest.mark.parametrize("left, code", [(0.0, "DEADLINE_EXCEEDED"), (0.005, "DEADLINE_EXCEEDED"),
                                        (100.0, "CANCELLED"), (None, "CANCELLED")])
def test_cancelled_code(left, code):
    from service.servicer import cancelled_code

    class Context:
        def time_remaining(self):
            return left

    assert cancelled_code(Context()) == code


def stream_refused(stub):
    """One 5-name GenerateStream: True if --max-streams turned it away (RESOURCE_EXHAUSTED), False if served."""
    try:
        assert len(list(stub.GenerateStream(pb.GenerateRequest(num_samples=5), timeout=30))[0].samples) == 5
        return False
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in e.details()
        return True


def wait_until_a_stream_is_let_in(stub, within, why):
    deadline = time.monotonic() + within
    while stream_refused(stub):
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def test_overload_gives_resource_exhausted(model_dir):
    s = start_server(model_dir, "--max-queue", 2, "--max-batch-rows", 64, "--max-streams", 1, "--max-queue-names", 30_000)
    try:
        with grpc.insecure_channel(s.target) as ch:
            st = pb_grpc.NameGeneratorStub(ch)
            # 40 requests of 20k names at once against room for 2: most must be turned away.
            futures = [st.Generate.future(pb.GenerateRequest(num_samples=20_000, seed=i), timeout=120) for i in range(40)]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert "queue" in e.details()
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert_healthy(ch, st)

            # A unary Generate holds all its names until it replies, though it is drawn in chunks: two of
            # 20,000 at once don't fit in 30,000 (counting its first chunk alone, both would).
            codes, details = [], []
            for f in [st.Generate.future(pb.GenerateRequest(num_samples=20_000, seed=i), timeout=120) for i in (1, 2)]:
                try:
                    codes.append(len(f.result().samples))
                except grpc.RpcError as e:
                    codes.append(e.code())
                    details.append(e.details())
            assert sorted(codes, key=str) == sorted([20_000, grpc.StatusCode.RESOURCE_EXHAUSTED], key=str), codes
            assert "names pending" in details[0]

            # --max-streams 1: a stream being served (its client reads nothing more) turns a second away.
            big = pb.GenerateRequest(num_samples=1_000_000, chunk_size=1000, seed=1)
            first = st.GenerateStream(big, timeout=120)
            next(first)
            assert stream_refused(st)
            first.cancel()  # the server sees the cancellation soon after; then streams are let in again
            wait_until_a_stream_is_let_in(st, 10, "the cancelled stream still counts against --max-streams")
            assert_healthy(ch, st)
    finally:
        assert s.stop() == 0


def test_a_stalled_stream_is_ended_and_frees_its_slot(model_dir):
    """A client that takes no message for --stream-stall-s loses its stream (DEADLINE_EXCEEDED, naming the flag)
    and its --max-streams slot. gRPC holds such an ended stream until its client reads on or leaves, and at
    most --max-streams of them at once: a second stalled stream keeps its slot until the first is let go."""
    s = start_server(model_dir, "--max-streams", 1, "--stream-stall-s", 0.5, "--max-stream-samples", 5_000_000,
                     "--metrics-port", free_port())
    try:
        with grpc.insecure_channel(s.target) as ch:
            st = pb_grpc.NameGeneratorStub(ch)

            def stalled_stream(seed):  # far more names than gRPC's windows and the sockets hold; no deadline
                it = st.GenerateStream(pb.GenerateRequest(num_samples=5_000_000, chunk_size=1000, seed=seed))
                next(it)
                return it

            first = stalled_stream(1)
            assert stream_refused(st)  # it holds the only slot while the server still writes to it
            # the windows fill, the write waits 0.5 s, the stream ends: the slot is free
            wait_until_a_stream_is_let_in(st, 60, "the stalled stream still holds its slot")
            assert rpcs_counted(s, "GenerateStream", "DEADLINE_EXCEEDED") == 1

            second = stalled_stream(2)  # the first is still held by gRPC (unread): this one keeps its slot
            time.sleep(5)
            assert stream_refused(st)
            with pytest.raises(grpc.RpcError) as e:  # the first client reads on: it gets what was sent, then why
                for _ in first:
                    pass
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-stall-s" in e.value.details()
            # let go of the first: the second is ended in turn
            wait_until_a_stream_is_let_in(st, 60, "a stalled stream kept its slot past the bound")
            second.cancel()
            assert_healthy(ch, st)
    finally:
        assert s.stop() == 0


# ---- process lifecycle ----


@pytest.mark.parametrize("loop, sig", [("auto", signal.SIGTERM), ("asyncio", signal.SIGTERM),  # auto: uvloop if installed
                                       ("auto", signal.SIGHUP)])  # a closed terminal or ssh session
def test_sigterm_drains_in_flight_stream(model_dir, loop, sig):
    """In-flight RPCs finish; health watchers see NOT_SERVING and their Watch ends, so it doesn't hold the
    exit for the whole --grace (60 s here)."""
    s = start_server(model_dir, "--grace", 60, "--event-loop", loop)
    try:
        with grpc.insecure_channel(s.target) as ch:
            st = pb_grpc.NameGeneratorStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            it = st.GenerateStream(pb.GenerateRequest(num_samples=60_000, seed=2, chunk_size=2_000), timeout=120)
            n = len(next(it).samples)  # the stream is in flight
            s.signal(sig)
            n += sum(len(c.samples) for c in it)  # ... and still completes
            assert [r.status for r in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]  # then the Watch ends
        assert n == 60_000
        assert s.wait(40) == 0
    finally:
        s.stop(timeout=5)  # a no-op once it exited; a failure above doesn't leave it running
    assert any("draining" in line for line in s.stdout)
    uv = importlib.util.find_spec("uvloop") is not None
    assert any(f"event-loop={'uvloop' if uv and loop == 'auto' else 'asyncio'} " in line for line in s.stdout)


def test_a_second_signal_cuts_the_drain_short(model_dir):
    """A stream whose client stopped reading would hold the drain for --grace (60 s); a second SIGTERM cancels it."""
    s = start_server(model_dir, "--grace", 60)
    try:
        with grpc.insecure_channel(s.target) as ch:
            it = pb_grpc.NameGeneratorStub(ch).GenerateStream(
                pb.GenerateRequest(num_samples=2_000_000, seed=1, chunk_size=1000), timeout=120)
            next(it)  # in flight; the client reads no more
            s.signal(signal.SIGTERM)
            time.sleep(1)
            s.signal(signal.SIGTERM)
            assert s.wait(20) == 0
    finally:
        s.stop(timeout=5)
    assert any("again: cancelling" in line for line in s.stdout), s.stdout


def warm_up_as(body):
    """A ServerProcess prelude: the engine's warm-up runs `body` (one line of Python) instead."""
    return f"import pathlib, time, service.engine\ndef warmup(self):\n    {body}\nservice.engine.Engine.warmup = warmup"


def warm_up_until(path):
    """A ServerProcess prelude: the engine's warm-up lasts until `path` exists."""
    return warm_up_as(f"while not pathlib.Path({str(path)!r}).exists(): time.sleep(0.01)")


def test_a_signal_during_warm_up_drains_without_serving(model_dir, tmp_path):
    go = tmp_path / "go"
    p = ServerProcess(model_dir, prelude=warm_up_until(go))
    try:
        p.wait_listening()
        p.signal(signal.SIGTERM)
        time.sleep(0.5)
        go.touch()  # the warm-up ends after the signal
        assert p.wait(30) == 0
    finally:
        go.touch()
        p.stop(timeout=5)
    assert not any(line.startswith("serving (provider") for line in p.stdout), p.stdout


@pytest.mark.parametrize("flag, value", [("--threads", -1), ("--max-batch-rows", -5), ("--max-queue", 0),
                                         ("--max-samples", 0), ("--provider", "tpu"), ("--port", "x"),
                                         ("--event-loop", "trio"), ("--port", 70000), ("--metrics-port", -1),
                                         ("--grace", "nan"), ("--max-wait-ms", 1e9), ("--busy-poll-ms", -1), ("--wait-per-request-ms", -1),
                                         ("--threads", 1000), ("--max-samples", 2**31),
                                         ("--max-stream-samples", 2**31), ("--stream-stall-s", -1),
                                         ("--stream-stall-s", "nan")])
def test_bad_server_flags_are_usage_errors(flag, value, capsys):
    from service.server import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args([flag, str(value)])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_port_in_use_is_one_line(server, model_dir):
    r = subprocess.run([sys.executable, "-m", "service.server", "--model-dir", str(model_dir), "--provider", "cpu",
                        "--port", str(server.port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()  # ours alone: grpc's C core doesn't get to log its own
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{server.port} (")
    assert "in use" in lines[0], lines


def test_metrics_port_in_use_fails_before_listening(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p = ServerProcess(model_dir, "--metrics-port", taken.getsockname()[1])
        rc = p.wait(60)
    assert rc == 1 and p.port is None, p.stdout  # never announced a gRPC port it then closed
    assert len(p.stderr) == 1 and p.stderr[0].startswith("error: cannot serve metrics on 127.0.0.1:"), p.stderr


def test_serving_only_after_warm_up_and_a_failed_warm_up_exits_1(model_dir, tmp_path):
    """Health says NOT_SERVING while the model warms up (the port is open already), SERVING after; a model that
    loads but can't run exits 1 with one line."""
    go = tmp_path / "go"
    p = ServerProcess(model_dir, prelude=warm_up_until(go))
    try:
        p.wait_listening()
        with grpc.insecure_channel(p.target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
        go.touch()
        p.wait_serving()
    finally:
        go.touch()  # (a failed assertion above: the warm-up ends, so SIGTERM can drain)
        assert p.stop() == 0
    p = ServerProcess(model_dir, prelude=warm_up_as("raise RuntimeError('no kernel for this op')"))
    assert p.wait(60) == 1
    assert p.stderr[-1] == "error: warm-up failed: RuntimeError: no kernel for this op", p.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncate", "missing", "retrained"])
def test_bad_model_file_exits_with_one_line(model_dir, tmp_path, damage):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    sampler = bad / "sampler.onnx"
    if damage == "retrained":  # a checkpoint beside the graphs that they weren't exported from
        if not (bad / "model.pt").is_file():
            pytest.skip("no checkpoint beside the exported model")
        ckpt = torch.load(bad / "model.pt", weights_only=True)
        ckpt["metrics"]["steps"] += 1
        torch.save(ckpt, bad / "model.pt")
    elif damage == "garbage":
        sampler.write_bytes(b"this is not an onnx model\n" * 10)
    elif damage == "truncate":
        sampler.write_bytes(sampler.read_bytes()[:200])
    else:
        sampler.unlink()
    p = ServerProcess(bad)
    rc = p.wait(60)
    assert rc != 0 and p.port is None
    assert len(p.stderr) == 1 and p.stderr[0].startswith("error: ") and "sampler.onnx" in p.stderr[0], p.stderr
    assert "make export" in p.stderr[0] and ("another checkpoint" in p.stderr[0]) == (damage == "retrained")
