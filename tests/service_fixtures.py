"""Fixtures and helpers for the service tests (a pytest plugin, loaded by tests/conftest.py): real servers
as subprocesses on 127.0.0.1, stubs, metrics scraping, and engines that record or hold their model runs.

The model comes from tests/conftest.py's session fixture `tiny_model_dir`, or from
$NAMEGEN_TEST_MODEL_DIR when set (to iterate on the service tests against a model you already have).
"""
import contextlib
import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import gen_proto
from service.server_process import ROOT, ServerProcess  # noqa: F401 - ROOT: the tests import it from here

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "namegen.v1.NameGenerator"


@pytest.fixture(scope="session")
def model_dir(request):
    env = os.environ.get("NAMEGEN_TEST_MODEL_DIR")
    if env:
        return Path(env)
    return Path(request.getfixturevalue("tiny_model_dir"))


def start_server(model_dir, *args):
    """A SERVING server subprocess (stop() it when done)."""
    return ServerProcess(model_dir, *args).wait_serving()


def free_port():
    """A port that was free a moment ago (the server has no ephemeral option for --metrics-port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    """The shared server of the module: small batches so that requests get chunked and interleaved."""
    s = start_server(model_dir, "--max-batch-rows", 512, "--max-samples", 200_000,
                     "--max-stream-samples", 2_000_000, "--max-wait-ms", 1, "--metrics-port", free_port())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(server):
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.target, options=options) as ch:
        yield ch


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


def scrape(server, prefix):
    """Sum of the samples of the server's metric lines that start with prefix."""
    import urllib.request

    (url,) = [line.split()[-1] for line in server.stdout if line.startswith("metrics on ")]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def rpcs_counted(server, method, code):
    """How many RPCs of the method the server counted with this status code (its metrics)."""
    return scrape(server, f'namegen_requests_total{{code="{code}",method="{method}"}}')


def stopped_early(server, method):
    """(DEADLINE_EXCEEDED, CANCELLED): how many of the method's RPCs the server counted as each."""
    return tuple(rpcs_counted(server, method, c) for c in ("DEADLINE_EXCEEDED", "CANCELLED"))


def wait_for_stop(server, method, before):
    """stopped_early once the server has counted another RPC of the method there (it may lag the client)."""
    deadline = time.monotonic() + 30
    while (now := stopped_early(server, method)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


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

    async def held(self):
        """Return once a long run is being held (fail, not hang, if none comes within 30 s)."""
        import asyncio

        async def started():
            while not self.started.is_set():
                await asyncio.sleep(0.001)

        await asyncio.wait_for(started(), 30)


@contextlib.asynccontextmanager
async def running(batcher):
    """The batcher started for the body and closed after it, also when an assertion fails."""
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.close()


@contextlib.asynccontextmanager
async def holding(batcher, engine, rows=3000, seed=1):
    """A request of `rows` names (its task is yielded) whose long run the GatedEngine holds on the engine
    thread during the body; released after it, also when an assertion fails."""
    big = submit(batcher, engine, rows, seed)
    try:
        await engine.held()
        yield big
    finally:
        engine.release.set()


def submit(batcher, engine, n, seed, max_samples=10**6, **params):
    """batcher.submit of a fresh request for n names with this seed, as a task (started, not awaited)."""
    import asyncio

    from service.params import GenerateParams

    req = engine.request(GenerateParams(num_samples=n, seed=seed, **params), max_samples)
    return asyncio.ensure_future(batcher.submit(req, n))
