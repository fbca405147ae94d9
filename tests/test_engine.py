"""Engine: seeds, batching independence, chunking, only_new, scoring, validation, providers, bad files."""
import math
import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.engine import ONLY_NEW_PROBE, Engine, GenerationError
from service.params import FLOAT32_TINY, MAX_LENGTH_LIMIT, MAX_TEMPERATURE, GenerateParams, InvalidArgument
from service.samples import Samples
from service.session import ModelFileError, ProviderError
from trainer.dataset import build_examples

P = GenerateParams


def names(samples):
    return [s.name for s in samples]


def test_same_seed_same_names_whatever_the_batch(cpu_engine):
    alone = names(cpu_engine.generate(P(num_samples=20, seed=7)))
    assert alone == names(cpu_engine.generate(P(num_samples=20, seed=7)))
    assert alone != names(cpu_engine.generate(P(num_samples=20, seed=8)))
    # Same request split over two runs and mixed with other requests with other settings.
    r = cpu_engine.request(P(num_samples=20, seed=7))
    others = [cpu_engine.request(P(num_samples=30, seed=s, temperature=1.5, top_k=4, prefix="b", max_length=40)) for s in (1, 2)]
    first = cpu_engine.run([(others[0], 30), (r, 5), (others[1], 10)])[1]
    second = cpu_engine.run([(r, 15), (others[1], 20)])[0]
    assert names(first) + names(second) == alone and r.done


def test_a_failing_request_does_not_fail_its_batch(cpu_engine):
    def unrunnable():  # top_p 0 in float32 breaks the graph (1e-46 got there before validation knew float32)
        req = cpu_engine.request(P(num_samples=4, seed=5, top_p=0.5))
        req.row["top_p"] = np.zeros(1, np.float32)
        return req

    with pytest.raises(Exception):  # alone, its run fails and it gets the error
        cpu_engine.run([(unrunnable(), 4)])
    good = [cpu_engine.request(P(num_samples=6, seed=s, temperature=0.8)) for s in (3, 4)]
    bad = unrunnable()
    out = cpu_engine.run([(good[0], 6), (bad, 4), (good[1], 6)])
    assert bad.error is not None and len(out[1]) == 0
    for s, got in zip((3, 4), (out[0], out[2])):  # the batch-mates get the names their seeds determine
        assert names(got) == names(cpu_engine.generate(P(num_samples=6, seed=s, temperature=0.8)))


def test_chunking_is_invisible(tiny_model_dir, cpu_engine):
    small = Engine(tiny_model_dir, provider="cpu", max_rows=7)
    p = P(num_samples=100, seed=5, prefix="a")
    a, b = small.generate(p), cpu_engine.generate(p)
    assert names(a) == names(b) and np.allclose([s.logprob for s in a], [s.logprob for s in b])
    chunks = list(small.generate_iter(p, chunk_size=30))
    assert [len(c) for c in chunks] == [7] * 14 + [2]


@pytest.mark.parametrize("max_shard_rows, runs", [(4096, 3), (20, 5)])  # 3 threads: one shard each, or 5 shards
def test_row_shards_are_invisible(tiny_model_dir, monkeypatch, max_shard_rows, runs):
    import service.engine as engine_mod

    one = Engine(tiny_model_dir, provider="cpu", threads=1)
    three = Engine(tiny_model_dir, provider="cpu", threads=3)
    monkeypatch.setattr(engine_mod, "MIN_SHARD_ROWS", 16)  # so that 100 rows are split
    monkeypatch.setattr(engine_mod, "MAX_SHARD_ROWS", max_shard_rows)
    calls, together = [], threading.Barrier(3, timeout=30)

    def run(*a, _run, _s):  # records which session ran each shard; the first three wait for each other
        calls.append(_s)
        if len(calls) <= 3:  # so each thread's first shard runs beside the others' (a thread can't take two)
            together.wait()
        return _run(*a)

    for s in three._shard_sessions:
        monkeypatch.setattr(s, "run", lambda *a, _run=s.run, _s=s: run(*a, _run=_run, _s=_s))
    p = P(num_samples=100, seed=3, temperature=1.3, max_length=12)
    a, b = one.generate(p), three.generate(p)
    assert len(calls) == runs and len(set(calls[:3])) == 3  # really split, over every thread's session at once
    assert names(a) == names(b) and [s.logprob for s in a] == [s.logprob for s in b]


@pytest.mark.parametrize("max_length", [64, 4])  # 4: most names are cut, and the end token is forced there
def test_logprob_equals_score(cpu_engine, max_length):
    samples = cpu_engine.generate(P(num_samples=50, seed=1, prefix="ma", max_length=max_length))
    assert all(len(s.name) <= max_length for s in samples)
    scores = cpu_engine.score([s.name for s in samples])
    for s, (total, per_char) in zip(samples, scores):
        assert s.logprob == pytest.approx(total, abs=1e-4)
        assert len(per_char) == len(s.name) + 1 and total == pytest.approx(sum(per_char))


def test_score_prefers_real_names(cpu_engine):
    (real, _), (junk, _) = cpu_engine.score(["emma", "qxzqj"])
    assert real > junk and real < 0


def test_only_new_and_training_flag(cpu_engine):
    words = cpu_engine.words
    plain = cpu_engine.generate(P(num_samples=300, seed=2))
    assert all(s.in_training_data == (s.name in words) for s in plain)
    assert any(s.in_training_data for s in plain)
    new = cpu_engine.generate(P(num_samples=300, seed=2, only_new=True))
    assert len(new) == 300 and not any(s.in_training_data for s in new)
    # The new names are the plain stream's new names, in order (same seed, same uniforms).
    assert names(new)[:10] == [s.name for s in plain if not s.in_training_data][:10]


def test_only_new_gives_up_clearly(cpu_engine):
    # "emma" cut at 4 characters is the only name that can come out, and a training name.
    assert cpu_engine.generate(P(num_samples=3, seed=0, prefix="emma", max_length=4))[0].in_training_data
    with pytest.raises(GenerationError, match="only_new: found 0 of 2 new names .*raise temperature or top_k"):
        cpu_engine.generate(P(num_samples=2, seed=0, prefix="emma", max_length=4, only_new=True))


def test_rows_wanted_sizes_each_draw(cpu_engine):
    plain = cpu_engine.request(P(num_samples=20_000, seed=1))
    assert plain.rows_wanted(16_384) == 16_384 and plain.rows_wanted(16_384, owed=64) == 64
    new = cpu_engine.request(P(num_samples=20_000, seed=1, only_new=True))
    assert new.rows_wanted(4096, owed=64) == 104  # 1.5x as many, + 8, since some names are known ones
    assert new.rows_wanted(16_384) == ONLY_NEW_PROBE  # the first draws stop at the probe


def test_only_new_budget_and_give_up_threshold(cpu_engine):
    """100 draws per name (at least the probe's), and at the probe, giving up only under 0.5% new names."""
    assert cpu_engine.request(P(num_samples=1000, seed=1, only_new=True)).max_draws == 100_000
    assert cpu_engine.request(P(num_samples=5, seed=1, only_new=True)).max_draws == ONLY_NEW_PROBE
    for found, hopeless in ((50, False), (49, True)):  # 50 in 10,000 draws is 0.5%
        req = cpu_engine.request(P(num_samples=1000, seed=1, only_new=True))
        req.drawn = ONLY_NEW_PROBE
        new = [f"zq{i}" for i in range(found)]  # (not training names)
        assert len(cpu_engine._accept(req, Samples(new, [0.0] * found, [False] * found))) == found
        assert (req.error is not None) == hopeless


def test_only_new_hopeless_request_stops_early(cpu_engine):
    # "emma" cut at 4 characters is a training name, and no other name can come out: 0% new. The budget
    # would allow 100 draws per name (500,000 here); the request stops at the probe instead.
    with pytest.raises(GenerationError, match=f"found 0 of 5000 new names in {ONLY_NEW_PROBE} draws"):
        cpu_engine.generate(P(num_samples=5000, seed=0, prefix="emma", max_length=4, only_new=True))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=10**7), "num_samples"),
        (dict(num_samples=1.5), "num_samples"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=28), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_p=1e-46), "top_p"),  # > 0, but 0 in float32, where the sampler runs
        (dict(temperature=1e-46), "temperature"),
        (dict(temperature=1e39), "temperature"),  # inf in float32
        (dict(temperature=100.5), "temperature"),  # over MAX_TEMPERATURE
        (dict(temperature=1e-40), "temperature"),  # a float32 denormal
        (dict(top_p=1e-40), "top_p"),
        (dict(temperature=True), "temperature"),
        (dict(only_new="yes"), "only_new"),
        (dict(prefix="Ab"), "prefix"),
        (dict(prefix="a.b"), "prefix"),
        (dict(prefix=["a"]), "prefix"),  # (a Python caller's mistake: the proto only carries strings)
        (dict(prefix="abcdef", max_length=5), "prefix"),
        (dict(max_length=0), "max_length"),
        (dict(max_length=MAX_LENGTH_LIMIT + 1), "max_length"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
    ],
)
def test_invalid_arguments_name_the_field(cpu_engine, kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        cpu_engine.request(P(**kwargs), max_samples=1_000_000)
    assert e.value.field == field and str(e.value).startswith(field + ":")
    with pytest.raises(InvalidArgument, match="num_samples"):  # the server's --max-samples
        cpu_engine.request(P(num_samples=6), max_samples=5)


def test_boundary_values_are_accepted(cpu_engine):
    """The ends of each documented range are valid requests (the invalid ones above lie just outside them)."""
    V = len(cpu_engine.itos)
    for kwargs in (dict(top_k=V), dict(top_p=1.0), dict(temperature=MAX_TEMPERATURE), dict(temperature=FLOAT32_TINY),
                   dict(seed=0), dict(seed=2**64 - 1), dict(num_samples=5), dict(max_length=MAX_LENGTH_LIMIT),
                   dict(prefix="emma", max_length=4)):
        assert cpu_engine.request(P(**kwargs), max_samples=5).params.seed is not None, kwargs


def test_invalid_argument_messages_stay_short(cpu_engine):
    """Echoed input is clipped: a message over gRPC's 16 KiB status metadata would reach the client as
    RESOURCE_EXHAUSTED instead of the error."""
    many = "".join(map(chr, range(0x100, 0x4100)))  # 16,384 distinct characters outside the vocabulary
    with pytest.raises(InvalidArgument) as e:
        cpu_engine.request(P(prefix=many, max_length=MAX_LENGTH_LIMIT), max_samples=5)
    assert e.value.field == "prefix" and len(str(e.value).encode()) < 1000


def test_invalid_score_names(cpu_engine):
    from service.engine import MAX_SCORE_CHARS, MAX_SCORE_NAME

    for bad in ([], ["Emma"], ["em.ma"], ["ab"] * (MAX_SCORE_CHARS // 2 + 1), ["a" * (MAX_SCORE_NAME + 1)],
                ["emma"] * 1000 + ["zoe!"]):
        with pytest.raises(InvalidArgument, match="names"):
            cpu_engine.score(bad)
    assert len(cpu_engine.score(["a" * MAX_SCORE_NAME])[0][1]) == MAX_SCORE_NAME + 1  # the limits themselves pass
    assert cpu_engine.check_score_names(["ab"] * (MAX_SCORE_CHARS // 2)) == MAX_SCORE_CHARS * 3 // 2


def test_sessions_run_single_threaded_and_read_an_empty_word_list(tiny_model_dir):
    import types

    from service.session import make_session, read_metadata

    opts = make_session(tiny_model_dir / "model.onnx", "cpu")[0].get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1  # row shards run in parallel instead
    meta = types.SimpleNamespace(custom_metadata_map={"namegen": '{"vocab": ".ab", "block_size": 3}', "words": ""})
    assert read_metadata(types.SimpleNamespace(get_modelmeta=lambda: meta), "x")["words"] == []  # not [""]


def test_random_seed_is_reported(cpu_engine):
    r = cpu_engine.request(P(num_samples=3))
    assert r.params.seed is not None
    again = cpu_engine.generate(P(num_samples=3, seed=r.params.seed))
    assert names(cpu_engine.run([(r, 3)])[0]) == names(again)


def test_missing_and_corrupt_model_files(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFileError, match="not found"):
        Engine(tmp_path)
    for name in ("sampler.onnx", "model.onnx"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    (tmp_path / "sampler.onnx").write_bytes(b"\x08\x01garbage" * 100)
    with pytest.raises(ModelFileError, match="sampler.onnx"):
        Engine(tmp_path, provider="cpu")


def test_mismatched_model_files(tmp_path, tiny_model_dir):
    import json

    import onnx

    (tmp_path / "sampler.onnx").write_bytes((tiny_model_dir / "model.onnx").read_bytes())  # one copied over the other
    (tmp_path / "model.onnx").write_bytes((tiny_model_dir / "model.onnx").read_bytes())
    with pytest.raises(ModelFileError, match="sampler.onnx: not a namegen sampler graph"):
        Engine(tmp_path, provider="cpu")
    m = onnx.load(tiny_model_dir / "model.onnx")  # from another export: another checkpoint's sha256
    prop = next(p for p in m.metadata_props if p.key == "namegen")
    prop.value = json.dumps(dict(json.loads(prop.value), checkpoint_sha256="0" * 64))
    onnx.save(m, tmp_path / "model.onnx")
    (tmp_path / "sampler.onnx").write_bytes((tiny_model_dir / "sampler.onnx").read_bytes())
    with pytest.raises(ModelFileError, match="different checkpoints"):
        Engine(tmp_path, provider="cpu")
    for name in ("model.onnx", "sampler.onnx"):  # neither says which checkpoint it came from
        m = onnx.load(tiny_model_dir / name)
        prop = next(p for p in m.metadata_props if p.key == "namegen")
        prop.value = json.dumps({k: v for k, v in json.loads(prop.value).items() if k != "checkpoint_sha256"})
        onnx.save(m, tmp_path / name)
    with pytest.raises(ModelFileError, match="no checkpoint_sha256"):
        Engine(tmp_path, provider="cpu")
    (tmp_path / "model.onnx").write_bytes((tiny_model_dir / "model.onnx").read_bytes())
    m = onnx.load(tiny_model_dir / "sampler.onnx")  # metadata that doesn't describe the graphs
    for key, value in (("vocab", list(".abc")), ("block_size", 5)):
        prop = next(p for p in m.metadata_props if p.key == "namegen")
        good = prop.value
        prop.value = json.dumps({**json.loads(good), key: value})
        onnx.save(m, tmp_path / "sampler.onnx")
        with pytest.raises(ModelFileError, match="doesn't match the graphs"):
            Engine(tmp_path, provider="cpu")
        prop.value = good


def test_provider_selection(tiny_model_dir):
    assert Engine(tiny_model_dir, provider="cpu").provider == "cpu"
    auto = Engine(tiny_model_dir, provider="auto")
    assert auto.provider in ("cpu", "cuda")
    if auto.provider == "cpu":
        # No usable CUDA here: asking for it is a clear error, never a silent fallback.
        with pytest.raises(ProviderError, match="provider=cuda"):
            Engine(tiny_model_dir, provider="cuda")
    with pytest.raises(ProviderError, match="auto, cpu or cuda"):
        Engine(tiny_model_dir, provider="tpu")


def test_auto_warns_when_cuda_fails_to_load(tiny_model_dir, monkeypatch, caplog):
    """A machine with an NVIDIA driver where ORT's CUDA provider still fails to load (no cuDNN, say): auto
    serves on CPU and warns; cuda is the clear error. Here the driver is pretended."""
    from service import session

    monkeypatch.setattr(session, "_nvidia_driver_present", lambda: True)
    auto = Engine(tiny_model_dir, provider="auto")
    if auto.provider == "cuda":
        pytest.skip("CUDA loads here")
    assert any(r.levelname == "WARNING" and "did not load" in r.getMessage() for r in caplog.records)
    with pytest.raises(ProviderError, match="provider=cuda but ONNX Runtime's CUDA execution provider did not load"):
        Engine(tiny_model_dir, provider="cuda")


def test_cuda_is_asked_for_float32_matrix_products(tiny_model_dir, monkeypatch):
    """ORT's CUDA provider defaults to TF32 matrix products on Ampere and newer GPUs, which broke parity on
    an H100 (logits 4.95e-3 from torch). The session asks for use_tf32=0. Here CUDA is pretended."""
    from service import session

    asked, real = [], ort.InferenceSession

    def recording(path, so, providers):
        asked.append(providers)
        return real(path, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(session, "_nvidia_driver_present", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(ort, "InferenceSession", recording)
    session.make_session(tiny_model_dir / "model.onnx", provider="auto")
    assert asked == [[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]]


@pytest.mark.cuda
def test_cuda_parity(tiny_model_dir, tiny_checkpoint, splits, cuda_loads):
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not cuda_loads:
        pytest.skip("no CUDA execution provider loads on this machine")
    from export.reference import reference_generate

    model, vocab, ckpt = tiny_checkpoint
    gpu = Engine(tiny_model_dir, provider="cuda")
    X, _ = build_examples(splits["val"], vocab, model.cfg.block_size)
    with torch.no_grad():  # the float32 tolerance (TF32 put the baseline 4.95e-3 off on an H100)
        assert np.abs(gpu.logits_model.run(None, {"context": X.numpy()})[0] - model(X).numpy()).max() <= 1e-5
    for setting in (dict(), dict(temperature=0.7, top_k=5, prefix="ma"), dict(top_p=0.9)):
        p = P(num_samples=2000, seed=11, **setting)
        assert names(gpu.generate(p)) == [n for n, _ in reference_generate(model, vocab, p, ckpt["words"])]
    # Runs of 1-16 rows take the small loop, whose kernels differ from the compacting loop's.
    for seed in range(60):
        p = P(num_samples=1 + seed % 16, seed=seed, temperature=(1.0, 0.6, 1.5)[seed % 3])
        assert names(gpu.generate(p)) == [n for n, _ in reference_generate(model, vocab, p, ckpt["words"])]


def test_prefix_filling_max_length(cpu_engine):
    got = cpu_engine.generate(P(num_samples=3, seed=0, prefix="anna", max_length=4))
    assert names(got) == ["anna"] * 3
    assert got[0].logprob == pytest.approx(cpu_engine.score(["anna"])[0][0], abs=1e-4)  # the end is forced there
