"""The gRPC service end to end, every RPC on a real server (a subprocess on 127.0.0.1, ephemeral port):
answers, health, reflection, metrics, determinism, parity with the torch reference, streaming."""
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.service_fixtures import (SERVICE, assert_healthy, gen, names_of, pb, pb_grpc, rpcs_counted, scrape,
                                    start_server, stopped_early, wait_for_stop)


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
    big = gen(stub, num_samples=5000)  # built in chunks (over UNARY_CHUNK): the seed is reported there too
    assert big.seed != a.seed and names_of(gen(stub, num_samples=5000, seed=big.seed)) == names_of(big)


def test_generate_options(stub, checkpoint):
    words = set(checkpoint[2]["words"])
    r = gen(stub, num_samples=50, seed=3, prefix="ka", max_length=6, temperature=0.7, top_k=5, top_p=0.9)
    assert all(s.name.startswith("ka") and len(s.name) <= 6 for s in r.samples)
    assert all(s.in_training_data == (s.name in words) for s in r.samples)
    new = gen(stub, num_samples=50, seed=3, only_new=True)
    assert len(new.samples) == 50 and not any(s.in_training_data or s.name in words for s in new.samples)


def test_model_info(stub, model_dir):
    from data.names import sha256_of

    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.vocab.startswith(".") and len(info.vocab) > 20
    assert info.block_size >= 1 and info.config["block_size"] == info.block_size
    assert info.provider == "cpu" and info.num_params > 0
    assert "val_loss" in info.metrics
    assert info.max_samples == 200_000 and info.max_stream_samples == 2_000_000 and info.max_length_limit == 64
    if (model_dir / "model.pt").is_file():
        from trainer.checkpoint import load_checkpoint

        assert info.checkpoint_sha256 == sha256_of(model_dir / "model.pt")
        assert info.num_params == load_checkpoint(model_dir / "model.pt")[0].num_params()


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


def test_metrics_count_each_call_under_its_method_and_code(server, stub):
    def counts():
        calls = {(m, c): rpcs_counted(server, m, c)
                 for m in ("Generate", "GenerateStream", "Score") for c in ("OK", "INVALID_ARGUMENT")}
        return calls, scrape(server, "namegen_names_generated_total")

    before, names0 = counts()
    gen(stub, num_samples=3, seed=1)
    list(stub.GenerateStream(pb.GenerateRequest(num_samples=5, seed=1, chunk_size=2), timeout=10))
    stub.Score(pb.ScoreRequest(names=["emma", "ava"]), timeout=10)
    with pytest.raises(grpc.RpcError):
        list(stub.GenerateStream(pb.GenerateRequest(num_samples=5, prefix="Q"), timeout=10))
    after, names1 = counts()
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        ("Generate", "OK"): 1, ("GenerateStream", "OK"): 1, ("Score", "OK"): 1, ("GenerateStream", "INVALID_ARGUMENT"): 1}
    assert names1 - names0 == 3 + 5  # names returned by Generate and GenerateStream, not Score's


def test_cancelled_stream_stops_drawing(server, channel, stub):
    rows0, ended0 = scrape(server, "namegen_batch_rows_sum"), stopped_early(server, "GenerateStream")
    it = stub.GenerateStream(pb.GenerateRequest(num_samples=2_000_000, seed=3, chunk_size=1000), timeout=120)
    next(it), next(it)
    it.cancel()
    assert wait_for_stop(server, "GenerateStream", ended0) == (ended0[0], ended0[1] + 1)  # far from its deadline
    rows = scrape(server, "namegen_batch_rows_sum") - rows0
    # What flow control let it send ahead before the cancel: it grows with the time the client took (~100k
    # rows in 5 s here, as the transport's windows grow), so only "short of the 2M asked for" is certain.
    assert 2000 <= rows < 2_000_000 - 1000
    for i in range(5):  # each gives the worker another round, in which a live stream job would draw again
        gen(stub, num_samples=1, seed=i)
    assert scrape(server, "namegen_batch_rows_sum") - rows0 <= rows + 5 + 1000  # + a chunk that was in flight
    assert_healthy(channel, stub)

# ---- determinism and parity ----


def assert_reference_names(stub, checkpoint, n=1):
    """The served names for a seed are the torch reference sampler's, across options (n: names scale)."""
    from export.reference import reference_generate
    from service.params import GenerateParams

    model, vocab, ckpt = checkpoint
    cases = [dict(num_samples=64 * n, seed=11), dict(num_samples=40 * n, seed=12, temperature=0.8, top_k=8, top_p=0.9),
             dict(num_samples=30 * n, seed=13, prefix="mar", max_length=10),
             dict(num_samples=30 * n, seed=14, only_new=True)]
    for kw in cases:
        got = gen(stub, **kw).samples
        ref = reference_generate(model, vocab, GenerateParams(**kw), words=ckpt["words"])
        assert [s.name for s in got] == [n for n, _ in ref], kw
        assert [s.logprob for s in got] == pytest.approx([lp for _, lp in ref], abs=1e-3), kw


def test_parity_with_torch_reference(stub, checkpoint):
    assert_reference_names(stub, checkpoint)


@pytest.mark.cuda
def test_parity_with_torch_reference_on_cuda(model_dir, checkpoint, cuda_loads):
    if not cuda_loads:
        pytest.skip("no CUDA execution provider loads on this machine")
    server = start_server(model_dir, "--provider", "cuda")  # (its later --provider wins over the fixture's cpu)
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.NameGeneratorStub(ch)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).provider == "cuda"
            assert_reference_names(stub, checkpoint, n=20)
    finally:
        server.stop()


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


def test_stream_default_chunk_size(stub):
    chunks = list(stub.GenerateStream(pb.GenerateRequest(num_samples=25_000, seed=1), timeout=60))
    assert [len(c.samples) for c in chunks] == [10_000, 10_000, 5_000]


def test_stream_100k_in_chunks(server, stub):
    queued0, names0 = scrape(server, "namegen_queue_time_seconds_count"), scrape(server, "namegen_names_generated")
    chunks = list(stub.GenerateStream(pb.GenerateRequest(num_samples=100_000, seed=21, chunk_size=10_000), timeout=120))
    assert sum(len(c.samples) for c in chunks) == 100_000
    # One request's wait in the queue (its first run; not one per chunk), and the names it was sent.
    assert scrape(server, "namegen_queue_time_seconds_count") - queued0 == 1
    assert scrape(server, "namegen_names_generated") - names0 == 100_000
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
