"""Score: the RPC against the torch reference, its bad inputs, how calls are cut into engine calls, where
they run beside a long model run, and the bound on characters in flight."""
import asyncio
import threading

import grpc
import pytest

from service.admission import SCORE_ROWS_IN_FLIGHT, QueueFull
from service.batcher import SCORE_INLINE_ROWS, SCORE_PIECE_ROWS, Batcher
from service.scheduling import EXPRESS_AFTER_ROWS
from tests.service_fixtures import CountingEngine, GatedEngine, assert_healthy, holding, pb, running


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


@pytest.mark.parametrize("names", [[], ["emma", "Emma"], ["a b"], ["x"] * 200_001, ["x" * 1_000_001],
                                   ["a" * 20_000 + "!"], ["".join(map(chr, range(0x100, 0x2100)))]])
def test_score_invalid_argument(stub, channel, names):
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(names=names), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "names" in e.value.details()
    assert_healthy(channel, stub)


def test_score_at_the_name_limit(stub):
    assert len(stub.Score(pb.ScoreRequest(names=["x"] * 200_000), timeout=60).scores) == 200_000  # --max-samples


def test_score_message_larger_than_any_valid_call(stub, channel):
    """gRPC refuses it before it is parsed (a flood of them can't take the server's memory)."""
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(names=["x" * 2_000_000]), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_healthy(channel, stub)


def test_receive_limit_fits_the_largest_valid_score_calls():
    from service.engine import MAX_SCORE_CHARS, MAX_SCORE_NAME
    from service.server import receive_limit

    for vocab, c in ([".", "a", "b"], "a"), ([".", "a", "\u20ac"], "\u20ac"):  # 1 and 3 bytes in UTF-8
        limit = receive_limit(vocab, 100_000)
        many = pb.ScoreRequest(names=[c * (MAX_SCORE_CHARS // 100_000)] * 100_000).ByteSize()
        long = pb.ScoreRequest(names=[c * MAX_SCORE_NAME] * (MAX_SCORE_CHARS // MAX_SCORE_NAME)).ByteSize()
        assert max(many, long) <= limit < 2 * max(many, long)
    assert receive_limit([".", "a"], 2**31 - 1) == 2**31 - 1  # gRPC's option is an int32


def test_score_in_several_engine_calls(stub, engine):
    letters = "abcdefghij"
    names = [(a + b + c + d) * 3 for a in letters for b in letters for c in letters for d in "aeiou"]  # 5,000 x 12
    assert sum(len(w) + 1 for w in names) > 2 * SCORE_PIECE_ROWS  # served in at least three engine calls
    r = stub.Score(pb.ScoreRequest(names=names), timeout=60)
    assert [s.name for s in r.scores] == names
    assert [s.logprob for s in r.scores] == pytest.approx([t for t, _ in engine.score(names)], abs=1e-5)

    class Counting(CountingEngine):
        calls = []

        def score(self, piece, checked=False):
            self.calls.append(sum(len(w) + 1 for w in piece))
            return self.engine.score(piece, checked)

    async def main():
        async with running(Batcher(counting)) as b:
            return await b.score(names, engine.check_score_names(names))

    counting = Counting(engine)
    scores = asyncio.run(main())
    assert len(counting.calls) >= 3 and max(counting.calls) <= SCORE_PIECE_ROWS
    assert scores == engine.score(names)


@pytest.mark.parametrize("provider, inline_rows", [("cpu", 16), ("cuda", 16), ("cpu", 0)])
def test_batcher_scores_during_a_long_run(engine, provider, inline_rows):
    """On CPU, Score calls don't wait behind a long model run on the engine thread: a small one is scored on
    the loop thread (unless inline runs are turned off), larger ones on the score thread. On a GPU every
    call waits its turn on the engine thread."""
    small, large = ["emma", "zoe"], ["abcdefghij"] * (SCORE_INLINE_ROWS // 11 + 1)
    empty = [""] * (SCORE_INLINE_ROWS + 1)  # no characters, but end tokens to score

    class Recording(GatedEngine):
        threads = {}

        def score(self, names, checked=False):
            self.threads[len(names)] = threading.current_thread().name
            return super().score(names, checked)

    async def main():
        eng = Recording(engine, hold_rows=EXPRESS_AFTER_ROWS)
        eng.provider = provider
        batcher = Batcher(eng, max_batch_rows=4096, max_wait_ms=0, inline_rows=inline_rows)
        async with running(batcher) as b, holding(b, eng) as big:
            calls = [asyncio.ensure_future(b.score(w, engine.check_score_names(w))) for w in (small, large, empty)]
            await asyncio.wait(calls, timeout=10 if provider == "cpu" else 0.2)  # while the long run is held
            assert [c.done() for c in calls] == [provider == "cpu"] * 3 and not big.done()
            eng.release.set()
            got = await asyncio.wait_for(asyncio.gather(*calls), 10)
            assert got == [engine.score(w) for w in (small, large, empty)]
            assert len(await big) == 3000
        inline = provider == "cpu" and inline_rows > 0
        where = [eng.threads[len(w)] for w in (small, large, empty)]
        assert where[0] == (threading.current_thread().name if inline else where[1])
        assert where[1] == where[2] and where[1].startswith("score" if provider == "cpu" else "engine")

    asyncio.run(main())


def test_score_rows_in_flight_count_end_tokens(engine):
    """A Score call costs a model row per character and per end token: calls of empty names are bounded too."""
    assert engine.check_score_names(["", "", "ab"]) == 5
    b = Batcher(engine)
    with b.slot(SCORE_ROWS_IN_FLIGHT - 4):
        with pytest.raises(QueueFull, match="being scored"):
            with b.slot(engine.check_score_names([""] * 5)):
                pass
        with b.slot(engine.check_score_names([""] * 4)):
            assert b.score_rows == SCORE_ROWS_IN_FLIGHT
    assert b.score_rows == 0 and b.pending == 0


def test_score_load_is_bounded(stub, channel, engine):
    names = ["abcdefghij"] * 100_000  # 1,000,000 characters, the most one call may have; each takes seconds
    assert SCORE_ROWS_IN_FLIGHT < 4 * engine.check_score_names(names)
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
