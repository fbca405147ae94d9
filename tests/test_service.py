"""The gRPC service end to end: real servers (subprocesses) on 127.0.0.1 with ephemeral ports.

No timing assertions: deadlines and overload are provoked with margins of orders of magnitude.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import gen_proto
from tests.service_fixtures import ROOT, ServerProcess, channel, free_port, model_dir, server, start_server  # noqa: F401

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "namegen.v1.NameGenerator"


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.NameGeneratorStub(channel)


@pytest.fixture(scope="module")
def checkpoint(model_dir):
    """(model, vocab, checkpoint dict) of the served model, for the torch reference."""
    from trainer.checkpoint import load_checkpoint

    path = model_dir / "model.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found: no checkpoint beside the exported model")
    return load_checkpoint(path)


def gen(stub, **kw):
    return stub.Generate(pb.GenerateRequest(**kw), timeout=60)


def names_of(resp):
    return [s.name for s in resp.samples]


def assert_healthy(channel, stub):
    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert len(gen(stub, num_samples=2, seed=1).samples) == 2


# ---- every RPC ----

def test_generate(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    r = gen(stub, num_samples=20, seed=7)
    assert r.seed == 7 and len(r.samples) == 20
    for s in r.samples:
        assert set(s.name) <= set(info.vocab[1:]) and len(s.name) <= 32
        assert s.logprob < 0
    assert names_of(gen(stub, num_samples=20, seed=7)) == names_of(r)  # same seed, same names


def test_generate_defaults_draw_a_seed(stub):
    a, b = gen(stub), gen(stub)
    assert len(a.samples) == 1 and len(b.samples) == 1
    assert a.seed != b.seed  # the server drew (and reported) a fresh seed each time
    assert names_of(gen(stub, seed=a.seed)) == names_of(a)  # the reported seed reproduces the names


def test_generate_options(stub, checkpoint):
    words = set(checkpoint[2]["words"])
    r = gen(stub, num_samples=50, seed=3, prefix="ka", max_length=6, temperature=0.7, top_k=5, top_p=0.9)
    assert all(s.name.startswith("ka") and len(s.name) <= 6 for s in r.samples)
    assert all(s.in_training_data == (s.name in words) for s in r.samples)
    new = gen(stub, num_samples=50, seed=3, only_new=True)
    assert len(new.samples) == 50 and not any(s.in_training_data or s.name in words for s in new.samples)


def test_score(stub, checkpoint):
    from trainer.sampling import score_names

    model, vocab, _ = checkpoint
    names = ["emma", "xq", "a", "olivia", ""]  # "": the model ends the name at once (Generate can return it)
    r = stub.Score(pb.ScoreRequest(names=names), timeout=10)
    ref = score_names(model, names, vocab, model.cfg.block_size)
    assert [s.name for s in r.scores] == names
    for s, (total, per) in zip(r.scores, ref):
        assert len(s.char_logprobs) == len(s.name) + 1
        assert s.logprob == pytest.approx(sum(s.char_logprobs), abs=1e-4)
        assert s.logprob == pytest.approx(total, abs=1e-3)
        assert list(s.char_logprobs) == pytest.approx(per, abs=1e-4)


def test_model_info(stub, model_dir):
    from data.names import sha256_of

    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.vocab.startswith(".") and len(info.vocab) > 20
    assert info.block_size >= 1 and info.config["block_size"] == info.block_size
    assert info.provider == "cpu" and info.num_params > 0
    assert "val_loss" in info.metrics
    assert info.max_samples == 200_000 and info.max_length_limit == 64
    if (model_dir / "model.pt").is_file():
        assert info.checkpoint_sha256 == sha256_of(model_dir / "model.pt")


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)))
    listed = {s.name for s in resp.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


def test_metrics_endpoint(server, stub):
    import urllib.request

    gen(stub, num_samples=3, seed=1)
    (url,) = [line.split()[-1] for line in server.stdout if line.startswith("metrics on ")]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in ('namegen_requests_total{code="OK",method="Generate"}', "namegen_request_latency_seconds_bucket",
                 "namegen_queue_time_seconds_count", "namegen_batch_rows_count", "namegen_batch_requests_count",
                 "namegen_names_generated_total", "namegen_process_peak_rss_bytes"):
        assert name in text, name


def scrape(server, prefix):
    """Sum of the samples of the server's metric lines that start with prefix."""
    import urllib.request

    (url,) = [line.split()[-1] for line in server.stdout if line.startswith("metrics on ")]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def stopped_early(server, method):
    """(DEADLINE_EXCEEDED, CANCELLED): how many of the method's RPCs the server counted as each."""
    return tuple(scrape(server, f'namegen_requests_total{{code="{c}",method="{method}"}}')
                 for c in ("DEADLINE_EXCEEDED", "CANCELLED"))


def wait_for_stop(server, method, before):
    """stopped_early once the server has counted another RPC of the method there (it may lag the client)."""
    deadline = time.monotonic() + 30
    while (now := stopped_early(server, method)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def test_cancelled_stream_stops_drawing(server, channel, stub):
    rows0, ended0 = scrape(server, "namegen_batch_rows_sum"), stopped_early(server, "GenerateStream")
    it = stub.GenerateStream(pb.GenerateRequest(num_samples=2_000_000, seed=3, chunk_size=1000), timeout=120)
    next(it), next(it)
    it.cancel()
    assert wait_for_stop(server, "GenerateStream", ended0) == (ended0[0], ended0[1] + 1)  # far from its deadline
    rows = scrape(server, "namegen_batch_rows_sum") - rows0
    assert 2000 <= rows <= 200_000  # what flow control let it send ahead, far from the 2M asked for
    for i in range(5):  # each gives the worker another round, in which a live stream job would draw again
        gen(stub, num_samples=1, seed=i)
    assert scrape(server, "namegen_batch_rows_sum") - rows0 <= rows + 5 + 1000  # + a chunk that was in flight
    assert_healthy(channel, stub)


# ---- errors ----

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


@pytest.mark.parametrize("kw", [dict(chunk_size=0), dict(chunk_size=50_001)])
def test_stream_invalid_chunk_size(stub, kw):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(pb.GenerateRequest(num_samples=5, **kw), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in e.value.details()


@pytest.mark.parametrize("names", [[], ["emma", "Emma"], ["a b"], ["x"] * 200_001, ["x" * 1_000_001],
                                   ["a" * 20_000 + "!"], ["".join(map(chr, range(0x100, 0x2100)))]])
def test_score_invalid_argument(stub, channel, names):
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(names=names), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "names" in e.value.details()
    assert_healthy(channel, stub)


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


def test_stream_past_its_deadline_counts_as_deadline_exceeded(server, stub, channel):
    """A client that stops reading: flow control holds the server's stream until the deadline cancels it.
    The server sees a cancellation, and counts it under the code the client saw."""
    ended0 = stopped_early(server, "GenerateStream")
    it = stub.GenerateStream(pb.GenerateRequest(num_samples=2_000_000, seed=4, chunk_size=1000), timeout=1.0)
    next(it)
    time.sleep(1.2)
    with pytest.raises(grpc.RpcError) as e:
        for _ in it:
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for_stop(server, "GenerateStream", ended0) == (ended0[0] + 1, ended0[1])
    assert_healthy(channel, stub)


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
            with pytest.raises(grpc.RpcError) as e:
                list(st.GenerateStream(pb.GenerateRequest(num_samples=5), timeout=30))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in e.value.details()
            first.cancel()
            for _ in range(100):  # the server sees the cancellation soon after; then streams are let in again
                try:
                    assert len(list(st.GenerateStream(pb.GenerateRequest(num_samples=5), timeout=30))[0].samples) == 5
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    time.sleep(0.1)
            else:
                raise AssertionError("the cancelled stream still counts against --max-streams")
            assert_healthy(ch, st)
    finally:
        assert s.stop() == 0


# ---- determinism and parity ----

def test_parity_with_torch_reference(stub, checkpoint):
    from export.reference import reference_generate
    from service.params import GenerateParams

    model, vocab, ckpt = checkpoint
    cases = [dict(num_samples=64, seed=11), dict(num_samples=40, seed=12, temperature=0.8, top_k=8, top_p=0.9),
             dict(num_samples=30, seed=13, prefix="mar", max_length=10), dict(num_samples=30, seed=14, only_new=True)]
    for kw in cases:
        got = gen(stub, **kw).samples
        ref = reference_generate(model, vocab, GenerateParams(**kw), words=ckpt["words"])
        assert [s.name for s in got] == [n for n, _ in ref], kw
        assert [s.logprob for s in got] == pytest.approx([lp for _, lp in ref], abs=1e-3), kw


def test_same_seed_regardless_of_batch_composition(stub):
    # The shared server batches at most 512 rows: 1500 names are chunked over several runs, shared with
    # whatever else is queued. Alone vs in a crowd of other requests must give the same names.
    probes = [dict(num_samples=1500, seed=99), dict(num_samples=3, seed=5, top_k=4), dict(num_samples=1, seed=6)]
    alone = [names_of(gen(stub, **kw)) for kw in probes]
    crowd = [pb.GenerateRequest(num_samples=n, seed=1000 + i, temperature=0.5 + i / 20)
             for i, n in enumerate([1, 700, 3, 64, 1, 900, 2, 5] * 3)]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            fut_crowd = [stub.Generate.future(r, timeout=60) for r in crowd]
            fut_probes = [pool.submit(gen, stub, **kw) for kw in probes]
            assert [names_of(f.result()) for f in fut_probes] == alone
            for f in fut_crowd:
                f.result()


def test_stream_100k_in_chunks(stub):
    chunks = list(stub.GenerateStream(pb.GenerateRequest(num_samples=100_000, seed=21, chunk_size=10_000), timeout=120))
    assert sum(len(c.samples) for c in chunks) == 100_000
    assert all(0 < len(c.samples) <= 10_000 for c in chunks) and len(chunks) == 10
    assert {c.seed for c in chunks} == {21}
    first = names_of(gen(stub, num_samples=1200, seed=21))
    assert [s.name for c in chunks[:1] for s in c.samples][:1200] == first  # same order as Generate


@pytest.mark.slow  # ~10-20 s on 2 cores: `make test-all`
def test_stream_a_million_names_in_bounded_memory(server, stub):
    rss_before = scrape(server, "process_resident_memory_bytes")
    count, chunks, seeds = 0, 0, set()
    for c in stub.GenerateStream(pb.GenerateRequest(num_samples=1_000_000, seed=5), timeout=300):
        count, chunks = count + len(c.samples), chunks + 1
        seeds.add(c.seed)
    assert count == 1_000_000 and chunks == 100 and seeds == {5}  # default chunk: 10,000 names
    # Holding the million names at once takes ~210 MiB more (measured: engine.generate of 1M Samples).
    growth = scrape(server, "namegen_process_peak_rss_bytes") - rss_before
    assert growth < 100 * 2**20, f"peak RSS grew {growth / 2**20:.0f} MiB during the stream"


def test_stream_only_new_small_chunks(stub):
    chunks = list(stub.GenerateStream(pb.GenerateRequest(num_samples=250, seed=4, chunk_size=64, only_new=True),
                                      timeout=60))
    assert [len(c.samples) for c in chunks] == [64, 64, 64, 58]
    flat = [s for c in chunks for s in c.samples]
    assert not any(s.in_training_data for s in flat)
    assert [s.name for s in flat] == names_of(gen(stub, num_samples=250, seed=4, only_new=True))


# ---- process lifecycle ----

@pytest.mark.parametrize("loop", ["auto", "asyncio"])  # auto: uvloop where installed
def test_sigterm_drains_in_flight_stream(model_dir, loop):
    s = start_server(model_dir, "--grace", 60, "--event-loop", loop)
    with grpc.insecure_channel(s.target) as ch:
        st = pb_grpc.NameGeneratorStub(ch)
        it = st.GenerateStream(pb.GenerateRequest(num_samples=60_000, seed=2, chunk_size=2_000), timeout=120)
        n = len(next(it).samples)  # the stream is in flight
        s.signal()
        n += sum(len(c.samples) for c in it)  # ... and still completes
    assert n == 60_000
    assert s.wait(60) == 0
    assert any("draining" in line for line in s.stdout)
    uv = importlib.util.find_spec("uvloop") is not None
    assert any(f"event-loop={'uvloop' if uv and loop == 'auto' else 'asyncio'} " in line for line in s.stdout)


@pytest.mark.parametrize("flag, value", [("--threads", -1), ("--max-batch-rows", -5), ("--max-queue", 0),
                                         ("--max-samples", 0), ("--provider", "tpu"), ("--port", "x"),
                                         ("--event-loop", "trio"), ("--port", 70000), ("--metrics-port", -1),
                                         ("--grace", "nan"), ("--max-wait-ms", 1e9), ("--busy-poll-ms", -1),
                                         ("--threads", 1000)])
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


@pytest.mark.parametrize("damage", ["garbage", "truncate", "missing"])
def test_bad_model_file_exits_with_one_line(model_dir, tmp_path, damage):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    sampler = bad / "sampler.onnx"
    if damage == "garbage":
        sampler.write_bytes(b"this is not an onnx model\n" * 10)
    elif damage == "truncate":
        sampler.write_bytes(sampler.read_bytes()[:200])
    else:
        sampler.unlink()
    p = ServerProcess(bad)
    rc = p.wait(60)
    assert rc != 0 and p.port is None
    assert len(p.stderr) == 1 and p.stderr[0].startswith("error: ") and "sampler.onnx" in p.stderr[0], p.stderr


# ---- command-line tools ----

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_client_cli(server, tmp_path):
    r = run_cli("service.client", "--target", server.target, "generate", "-n", "3", "--seed", "5")
    assert r.returncode == 0 and "seed: 5" in r.stdout and len(r.stdout.splitlines()) == 4, r.stderr
    r = run_cli("service.client", "generate", "--target", server.target, "--temperature", "0")
    assert r.returncode == 1 and r.stderr.startswith("error: INVALID_ARGUMENT: temperature") and "Traceback" not in r.stderr
    r = run_cli("service.client", "--target", server.target, "info")
    info = json.loads(r.stdout)  # integers read as integers, not "12097" or 3.0
    assert r.returncode == 0 and isinstance(info["num_params"], int) and isinstance(info["config"]["block_size"], int)
    assert info["num_params"] > 0 and isinstance(info["metrics"]["val_loss"], float)
    r = run_cli("service.client", "--target", server.target, "score", "emma", "")
    emma, empty = r.stdout.splitlines()
    # name, total, then each character's logprob and the end token's
    assert r.returncode == 0 and emma.split()[0] == "emma" and [w[:2] for w in emma.split()[2:]] == ["e:", "m:", "m:", "a:", ".:"]
    assert empty.split()[0] == '""' and empty.split()[2].startswith(".:") and len(empty.split()) == 3, r.stdout
    listed = tmp_path / "names.txt"
    listed.write_text("emma\n\n olivia \n")  # a word list: blank lines skipped, spaces stripped
    r = run_cli("service.client", "--target", server.target, "score", "zoe", "--file", listed)
    assert r.returncode == 0 and [line.split()[0] for line in r.stdout.splitlines()] == ["zoe", "emma", "olivia"], r.stderr


@pytest.mark.parametrize("args, message", [
    (("generate", "--seed", "-5"), "error: --seed -5: out of range"),  # the message's field is uint64
    (("generate", "-n", str(1 << 40)), "error: --num-samples"),
    (("stream", "-n", "3", "--out", "/nonexistent-dir/names.txt"), "error: --out /nonexistent-dir/names.txt: cannot write"),
    (("stream", "-n", "3", "--out", ""), "error: --out '': give a file name"),
    (("generate", "--timeout", "nan"), "error: --timeout nan: give a finite number"),
    (("generate", "--prefix", os.fsdecode(b"\xe9")), "error: --prefix b'\\xe9': not valid UTF-8"),
    (("score", "emma", os.fsdecode(b"\xe9mma")), "error: name b'\\xe9mma': not valid UTF-8"),
    (("score",), "error: give names to score, or --file"),
    (("score", "--file", "/nonexistent-dir/names.txt"), "error: --file /nonexistent-dir/names.txt: cannot read"),
])
def test_client_cli_bad_options(server, args, message):
    r = run_cli("service.client", "--target", server.target, *args)
    assert r.returncode == 1 and r.stderr.startswith(message) and "Traceback" not in r.stderr, r.stderr


def test_client_stream_keeps_the_out_file_until_it_succeeds(server, tmp_path):
    out = tmp_path / "names.txt"
    out.write_text("keep\n")
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "3", "--prefix", "Q", "--out", out)
    assert r.returncode == 1 and "INVALID_ARGUMENT: prefix" in r.stderr and out.read_text() == "keep\n"
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "3", "--seed", "1", "--out", out)
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 3 and list(tmp_path.iterdir()) == [out]
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "3", "--out", "/dev/null")
    assert r.returncode == 0 and "3 names" in r.stderr and not Path("/dev/.null.part").exists()  # not a file: as is


def test_loadtest_cli(server, tmp_path):
    out = tmp_path / "lt.json"
    r = run_cli("service.loadtest", "--target", server.target, "--concurrency", "1,4", "--warmup", "0.1",
                "--duration", "0.5", "--requests", "50", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = json.loads(out.read_text())["steps"]
    assert [s["concurrency"] for s in steps] == [1, 4] and all(s["ok"] > 0 and not s["errors"] for s in steps)


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_loadtest_score(server, tmp_path, client):
    out = tmp_path / "lt.json"
    r = run_cli("service.loadtest", "--target", server.target, "--rpc", "score", "--names-per-request", "3",
                "--concurrency", "2", "--client", client, "--warmup", "0", "--duration", "2", "--requests", "20",
                "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (step,) = json.loads(out.read_text())["steps"]
    assert step["ok"] >= 20 and not step["errors"] and step["names_per_s"] == pytest.approx(3 * step["rps"])


def test_loadtest_score_without_a_server():
    r = run_cli("service.loadtest", "--target", f"127.0.0.1:{free_port()}", "--rpc", "score", "--duration", "1")
    assert r.returncode != 0 and "error: cannot get names to score from" in r.stderr and "UNAVAILABLE" in r.stderr


def test_loadtest_reports_why_requests_failed(server):
    r = run_cli("service.loadtest", "--target", server.target, "--max-length", "65", "--warmup", "0",
                "--duration", "1", "--requests", "5")
    assert r.returncode == 1, r.stdout + r.stderr  # nothing succeeded
    assert "INVALID_ARGUMENT=5" in r.stdout and "INVALID_ARGUMENT: max_length: must be in" in r.stdout


@pytest.mark.parametrize("flag, value", [("--duration", "nan"), ("--warmup", "-5"), ("--timeout", "0"), ("--seed", "-1"),
                                         ("--names-per-request", "99999999999"), ("--requests", "-5"),
                                         ("--json", "/nonexistent-dir/x.json"), ("--target", "127.0.0.1:99999")])
def test_loadtest_bad_options(flag, value, capsys):
    from service.loadtest import main

    with pytest.raises(SystemExit) as exc:
        main([flag, value])
    assert exc.value.code != 0 and flag.lstrip("-") in capsys.readouterr().err + str(exc.value.code)


# ---- the batcher in-process (real engine, no gRPC) ----

class CountingEngine:
    """The real engine, counting rows per request so tests can see who got model runs (runs: each run's
    [(seed, rows)], in order)."""

    def __init__(self, engine):
        self.engine, self.max_rows, self.rows, self.runs = engine, engine.max_rows, {}, []

    def request(self, params, max_samples):
        return self.engine.request(params, max_samples)

    def run(self, parts):
        for req, n in parts:
            self.rows[req.params.seed] = self.rows.get(req.params.seed, 0) + n
        self.runs.append([(req.params.seed, n) for req, n in parts])
        return self.engine.run(parts)

    def score(self, names, checked=False):
        return self.engine.score(names, checked)


@pytest.fixture(scope="module")
def engine(model_dir):
    from service.engine import Engine

    return Engine(model_dir, provider="cpu", threads=1)


def test_batcher_interleaves_big_and_small(engine):
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams

    async def main():
        eng = CountingEngine(engine)
        b = Batcher(eng, max_batch_rows=256, max_wait_ms=0, max_queue=100)
        b.start()
        big_req = eng.request(GenerateParams(num_samples=20_000, seed=1), 10**6)
        big = asyncio.ensure_future(b.submit(big_req, big_req.remaining))
        await asyncio.sleep(0)
        smalls = [asyncio.ensure_future(b.submit(eng.request(GenerateParams(num_samples=3, seed=10 + i), 100), 3))
                  for i in range(5)]
        done = await asyncio.gather(*smalls)
        assert all(len(s) == 3 for s in done) and not big.done()  # served between the big one's chunks
        assert len(await big) == 20_000
        await b.close()

    asyncio.run(main())


def test_batcher_runs_small_jobs_before_large_ones_queued_earlier(engine):
    """Small jobs go first, up to half a run; the large ones share the rest (so they can't be starved)."""
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams
    from service.scheduling import SMALL_JOB_ROWS

    async def main():
        eng = CountingEngine(engine)
        b = Batcher(eng, max_batch_rows=256, max_wait_ms=0, max_queue=100)
        b.start()

        def submit(n, seed):
            req = eng.request(GenerateParams(num_samples=n, seed=seed), 10**6)
            return asyncio.ensure_future(b.submit(req, n))

        jobs = [submit(2000, seed) for seed in (1, 2, 3)]  # queued before any run: large, then small
        jobs += [submit(SMALL_JOB_ROWS, seed) for seed in (10, 11, 12)]
        await asyncio.gather(*jobs)
        first = dict(eng.runs[0])
        # Two small jobs fill half the run (a third would pass half), then the oldest large job the rest;
        # in queue order the first run would have been large job 1's alone.
        assert first == {10: SMALL_JOB_ROWS, 11: SMALL_JOB_ROWS, 1: 256 - 2 * SMALL_JOB_ROWS}
        assert (12, SMALL_JOB_ROWS) in eng.runs[1]  # the third at the head of the next run
        await b.close()

    asyncio.run(main())


def assert_same_samples(got, alone):
    """What a request got beside others equals what it gets alone: the same names, and log-probabilities
    whose last float32 digits may differ (the proto documents this)."""
    assert [(x.name, x.in_training_data) for x in got] == [(x.name, x.in_training_data) for x in alone]
    assert [x.logprob for x in got] == pytest.approx([x.logprob for x in alone], rel=1e-5)


class GatedEngine(CountingEngine):
    """Holds each run of more than `hold_rows` rows until released, so a test can act during a long run."""

    def __init__(self, engine, hold_rows):
        import threading

        super().__init__(engine)
        self.hold_rows, self.started, self.release = hold_rows, threading.Event(), threading.Event()

    def run(self, parts):
        if sum(n for _, n in parts) > self.hold_rows:
            self.started.set()
            self.release.wait(30)
        return super().run(parts)


def test_batcher_serves_small_jobs_during_a_long_run(engine):
    """Small jobs that arrive during a long run get express runs at once (several, when more arrive than
    one takes), with their own names; only_new (which may need several runs) waits like any other job."""
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams
    from service.scheduling import EXPRESS_AFTER_ROWS, EXPRESS_ROWS, SMALL_JOB_ROWS

    async def main():
        eng = GatedEngine(engine, hold_rows=EXPRESS_AFTER_ROWS)
        b = Batcher(eng, max_batch_rows=4096, max_wait_ms=0, max_queue=100)
        b.start()
        try:
            big_req = eng.request(GenerateParams(num_samples=3000, seed=1), 10**6)
            big = asyncio.ensure_future(b.submit(big_req, 3000))
            while not eng.started.is_set():
                await asyncio.sleep(0.001)
            new = asyncio.ensure_future(b.submit(eng.request(GenerateParams(num_samples=1, seed=3, only_new=True), 100), 1))
            n = EXPRESS_ROWS // SMALL_JOB_ROWS + 1  # one more than an express run takes
            params = [GenerateParams(num_samples=SMALL_JOB_ROWS, seed=10 + i) for i in range(n)]
            small = [b.submit(eng.request(p, 1000), SMALL_JOB_ROWS) for p in params]
            small = await asyncio.wait_for(asyncio.gather(*small), 10)
            assert not big.done() and not new.done()  # the long run is still held (and not yet in eng.runs)
            for got, p in zip(small, params):
                assert_same_samples(got, engine.generate(p))  # what their seeds give alone
            assert eng.runs == [[(10 + i, SMALL_JOB_ROWS) for i in range(n - 1)], [(10 + n - 1, SMALL_JOB_ROWS)]]
        finally:
            eng.release.set()
        assert len(await big) == 3000 and len(await new) == 1
        await b.close()

    asyncio.run(main())


def test_batcher_bug_in_an_express_run_fails_its_jobs(engine):
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams
    from service.scheduling import EXPRESS_AFTER_ROWS

    class BrokenExpress(GatedEngine):
        def run(self, parts):
            if sum(n for _, n in parts) <= self.hold_rows:
                return None  # a bug between an express run and handing out its names
            return super().run(parts)

    async def main():
        eng = BrokenExpress(engine, hold_rows=EXPRESS_AFTER_ROWS)
        b = Batcher(eng, max_batch_rows=4096, max_wait_ms=0, max_queue=100)
        b.start()
        try:
            big = asyncio.ensure_future(b.submit(eng.request(GenerateParams(num_samples=3000, seed=1), 10**6), 3000))
            while not eng.started.is_set():
                await asyncio.sleep(0.001)
            with pytest.raises(TypeError):  # failed, not left waiting
                await asyncio.wait_for(b.submit(eng.request(GenerateParams(num_samples=1, seed=2), 100), 1), 10)
        finally:
            eng.release.set()
        with pytest.raises(TypeError):  # the run in hand fails with it
            await big
        await b.close()

    asyncio.run(main())


def test_batcher_without_batching_keeps_queue_order(engine):
    """--max-batch-rows 0, the baseline: one job per run, in queue order (small first would starve a large
    job there), and no express runs (they batch)."""
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams
    from service.scheduling import EXPRESS_AFTER_ROWS

    async def main():
        eng = GatedEngine(engine, hold_rows=EXPRESS_AFTER_ROWS)
        b = Batcher(eng, max_batch_rows=0, max_wait_ms=0, max_queue=100)
        b.start()
        try:
            jobs = [b.submit(eng.request(GenerateParams(num_samples=n, seed=s), 10**6), n)
                    for n, s in ((3000, 1), (1, 2), (1, 3))]
            jobs = [asyncio.ensure_future(j) for j in jobs]
            while not eng.started.is_set():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            assert not any(j.done() for j in jobs)  # no express runs beside the large one
        finally:
            eng.release.set()
        await asyncio.gather(*jobs)
        assert eng.runs == [[(1, 3000)], [(2, 1)], [(3, 1)]]  # (the held run is recorded once released)
        await b.close()

    asyncio.run(main())


def test_batcher_express_runs_beside_a_real_long_run(model_dir):
    """Express runs and a long sharded run really overlapping (two threads in the engine at once): every
    request still gets exactly the names its seed gives alone."""
    import asyncio

    from service.batcher import Batcher
    from service.engine import Engine
    from service.params import GenerateParams

    eng = CountingEngine(Engine(model_dir, provider="cpu", threads=2))

    async def main():
        b = Batcher(eng, max_batch_rows=16384, max_wait_ms=0, max_queue=100)
        b.start()
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
        await b.close()

    asyncio.run(main())


def test_batcher_bounds_pending_names(engine):
    import asyncio

    from service.batcher import Batcher, QueueFull
    from service.params import GenerateParams

    async def main():
        b = Batcher(engine, max_batch_rows=256, max_wait_ms=0, max_queue=100, max_queue_names=5000)
        b.start()
        reqs = [engine.request(GenerateParams(num_samples=3000, seed=s), 10**6) for s in range(3)]
        jobs = [asyncio.ensure_future(b.submit(r, r.remaining)) for r in reqs]  # submitted before any run
        out = await asyncio.gather(*jobs, return_exceptions=True)
        assert len(out[0]) == 3000  # room for 3,000 names, not for 6,000
        assert all(isinstance(e, QueueFull) and "names pending" in str(e) for e in out[1:])
        assert b.pending == 0 and b.pending_names == 0
        again = engine.request(GenerateParams(num_samples=3000, seed=1), 10**6)
        assert len(await b.submit(again, again.remaining)) == 3000  # the queue has emptied: room again
        await b.close()

    asyncio.run(main())


def test_batcher_drops_cancelled_work(engine):
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams

    async def main():
        eng = CountingEngine(engine)
        b = Batcher(eng, max_batch_rows=128, max_wait_ms=0, max_queue=100)
        b.start()
        req = eng.request(GenerateParams(num_samples=100_000, seed=7), 10**6)
        task = asyncio.ensure_future(b.submit(req, req.remaining))
        while eng.rows.get(7, 0) < 256:  # a few runs in
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.pending == 0
        drawn = eng.rows[7]
        small = eng.request(GenerateParams(num_samples=5, seed=8), 100)
        assert len(await b.submit(small, 5)) == 5  # the worker moved on
        assert eng.rows[7] <= drawn + 128  # at most the run in flight when it was cancelled
        await b.close()

    asyncio.run(main())


def test_batcher_bug_fails_the_run_in_hand(engine):
    import asyncio

    from service.batcher import Batcher
    from service.params import GenerateParams

    class Broken(CountingEngine):
        def run(self, parts):
            return None  # a bug between the model run and handing out the names

    async def main():
        b = Batcher(Broken(engine), max_wait_ms=0, inline_rows=0)  # inline_rows 0: through the worker
        b.start()
        req = engine.request(GenerateParams(num_samples=5, seed=1), 100)
        with pytest.raises(RuntimeError, match="internal batching error"):
            await asyncio.wait_for(b.submit(req, 5), 30)  # failed, not left waiting
        await b.close()

    asyncio.run(main())


def test_batcher_slot_counts_towards_the_queue(engine):
    from service.batcher import Batcher, QueueFull

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
    import asyncio

    from service.busypoll import BusyPoll

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
    from service.batcher import Batcher

    b = Batcher(engine, max_queue=4)
    assert b.quiet()
    with b.slot():
        assert not b.quiet()
    assert b.quiet()


def test_score_in_several_engine_calls(stub, engine):
    from service.batcher import SCORE_PIECE_CHARS

    letters = "abcdefghij"
    names = [(a + b + c + d) * 3 for a in letters for b in letters for c in letters for d in "aeiou"]  # 5,000 x 12
    assert sum(len(w) + 1 for w in names) > 2 * SCORE_PIECE_CHARS  # served in at least three engine calls
    r = stub.Score(pb.ScoreRequest(names=names), timeout=60)
    assert [s.name for s in r.scores] == names
    assert [s.logprob for s in r.scores] == pytest.approx([t for t, _ in engine.score(names)], abs=1e-5)

    import asyncio

    from service.batcher import Batcher

    class Counting(CountingEngine):
        calls = []

        def score(self, piece, checked=False):
            self.calls.append(sum(len(w) + 1 for w in piece))
            return self.engine.score(piece, checked)

    async def main():
        b = Batcher(counting)
        try:
            return await b.score(names, sum(map(len, names)))
        finally:
            await b.close()

    counting = Counting(engine)
    scores = asyncio.run(main())
    assert len(counting.calls) >= 3 and max(counting.calls) <= SCORE_PIECE_CHARS
    assert scores == engine.score(names)


@pytest.mark.parametrize("provider, inline_rows", [("cpu", 16), ("cuda", 16), ("cpu", 0)])
def test_batcher_scores_during_a_long_run(engine, provider, inline_rows):
    """On CPU, Score calls don't wait behind a long model run on the engine thread: a small one is scored on
    the loop thread (unless inline runs are turned off), larger ones on the score thread. On a GPU every
    call waits its turn on the engine thread."""
    import asyncio
    import threading

    from service.batcher import SCORE_INLINE_CHARS, Batcher
    from service.params import GenerateParams
    from service.scheduling import EXPRESS_AFTER_ROWS

    small, large = ["emma", "zoe"], ["abcdefghij"] * (SCORE_INLINE_CHARS // 11 + 1)
    empty = [""] * (SCORE_INLINE_CHARS + 1)  # no characters, but end tokens to score

    class Recording(GatedEngine):
        threads = {}

        def score(self, names, checked=False):
            self.threads[len(names)] = threading.current_thread().name
            return super().score(names, checked)

    async def main():
        eng = Recording(engine, hold_rows=EXPRESS_AFTER_ROWS)
        eng.provider = provider
        b = Batcher(eng, max_batch_rows=4096, max_wait_ms=0, inline_rows=inline_rows)
        b.start()
        try:
            big = asyncio.ensure_future(b.submit(eng.request(GenerateParams(num_samples=3000, seed=1), 10**6), 3000))
            while not eng.started.is_set():
                await asyncio.sleep(0.001)
            calls = [asyncio.ensure_future(b.score(names, sum(map(len, names)))) for names in (small, large, empty)]
            await asyncio.wait(calls, timeout=10 if provider == "cpu" else 0.2)  # while the long run is held
            assert [c.done() for c in calls] == [provider == "cpu"] * 3 and not big.done()
            eng.release.set()
            assert await asyncio.wait_for(asyncio.gather(*calls), 10) == [engine.score(w) for w in (small, large, empty)]
            assert len(await big) == 3000
        finally:
            eng.release.set()
            await b.close()
        inline = provider == "cpu" and inline_rows > 0
        where = [eng.threads[len(w)] for w in (small, large, empty)]
        assert where[0] == (threading.current_thread().name if inline else where[1])
        assert where[1] == where[2] and where[1].startswith("score" if provider == "cpu" else "engine")

    asyncio.run(main())


def test_score_load_is_bounded(stub, channel):
    from service.batcher import SCORE_CHARS_IN_FLIGHT

    names = ["abcdefghij"] * 100_000  # 1,000,000 characters, the most one call may have; each takes seconds
    assert SCORE_CHARS_IN_FLIGHT < 4 * 1_000_000
    calls = [stub.Score.future(pb.ScoreRequest(names=names), timeout=120) for _ in range(4)]
    codes = []
    for f in calls:
        try:
            codes.append(len(f.result().scores) == len(names))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "being scored" in e.details(), e.details()
            codes.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert True in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes and False not in codes
    assert_healthy(channel, stub)

