"""Export: BatchNorm folding, ONNX artifacts and metadata, and exact parity of the compiled sampler."""
import copy
import json
import types

import numpy as np
import onnx
import pytest
import torch

from export.fold import float64_reference, fold_batchnorm, max_logit_diff
from export.reference import reference_generate
from service.params import FLOAT32_TINY, MAX_TEMPERATURE, GenerateParams
from trainer.dataset import build_examples, split_words
from trainer.model import MLP, ModelConfig
from trainer.sampling import sample_reference


def test_fold_matches_unfolded_on_val(tiny_checkpoint, splits):
    model, vocab, _ = tiny_checkpoint
    X, _ = build_examples(splits["val"], vocab, model.cfg.block_size)
    assert max_logit_diff(model, fold_batchnorm(model), X) <= 1e-5


def test_fold_deep_model_with_nontrivial_statistics():
    torch.manual_seed(0)
    m = MLP(ModelConfig(n_layers=3, n_hidden=32))
    X = torch.randint(0, 27, (256, 3))
    m.train()
    for bn in m.batchnorms():
        bn.momentum = 0.5
        torch.nn.init.uniform_(bn.weight, 0.5, 2.0)
        torch.nn.init.uniform_(bn.bias, -1, 1)
    for _ in range(3):
        m(X)
    m.batchnorms()[1].eps = 0.3  # a fold that ignored eps (1e-5 by default, too small to show) would be off here
    m.eval()
    assert max_logit_diff(m, fold_batchnorm(m), X) <= 1e-5
    assert not m.training  # folding doesn't change the model's mode
    m.train()
    folded = fold_batchnorm(m)  # running statistics, whatever the mode
    assert m.training and max_logit_diff(m.eval(), folded, X) <= 1e-5


def test_max_logit_diff_covers_every_batch():
    torch.manual_seed(0)
    a = MLP(ModelConfig(n_hidden=8)).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.wte.weight[5] += 1.0  # only contexts with token 5 differ
    X = torch.tensor([[0, 0, 5]] + [[0, 0, 1]] * 9)
    assert max_logit_diff(a, b, X, batch=3) == pytest.approx(max_logit_diff(a, b, X[:1]), rel=1e-5)
    assert max_logit_diff(a, b, X[:1]) > 0.01 and max_logit_diff(a, b, X[1:]) == 0


def test_export_refuses_a_diverged_checkpoint_and_an_unwritable_folder(tiny_model_dir, tmp_path):
    from export.export import export
    from trainer.checkpoint import CheckpointError

    ckpt = torch.load(tiny_model_dir / "model.pt", weights_only=True)
    for bad in ("nan", "inf"):
        ckpt["state_dict"]["lm_head.weight"][0, 0] = float(bad)  # what a run at too high a learning rate leaves
        torch.save(ckpt, tmp_path / "diverged.pt")
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            export(tmp_path / "diverged.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    m = MLP(ModelConfig(n_hidden=8)).eval()
    broken = copy.deepcopy(m)
    broken.lm_head.bias.data[0] = float("nan")
    assert max_logit_diff(m, broken, torch.zeros(4, 3, dtype=torch.long)) == float("inf")  # not passed over

    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="cannot write model.onnx"):
        export(tiny_model_dir / "model.pt", tmp_path / "file" / "sub")


def test_export_report_and_fold_check(tiny_model_dir, tiny_checkpoint, splits, tmp_path, monkeypatch):
    """The fold check runs on the whole val split, in float32 as inference runs it, and a fold off by more
    than the tolerance is refused with a one-line error and nothing written."""
    import export.export as ex
    from export.fold import fold_for_export
    from export.graphs import logit_shift

    model, vocab, _ = tiny_checkpoint
    report = ex.main(["--checkpoint", str(tiny_model_dir / "model.pt"), "--out-dir", str(tmp_path / "ok")])
    assert report.val_examples == len(build_examples(splits["val"], vocab, model.cfg.block_size)[0])
    assert 1e-9 < report.fold_max_abs_logit_diff <= ex.FOLD_TOLERANCE  # float32 rounding, not float64's
    assert report.fast_path_logit_shift == logit_shift(fold_for_export(model)) is not None
    ckpt = torch.load(tiny_model_dir / "model.pt", weights_only=True)
    torch.save({**ckpt, "split_seed": 7}, tmp_path / "seed7.pt")  # checked on the split it was trained with
    report = ex.main(["--checkpoint", str(tmp_path / "seed7.pt"), "--out-dir", str(tmp_path / "seed7")])
    val7 = split_words(ckpt["words"], 7)["val"]
    val42 = len(build_examples(splits["val"], vocab, model.cfg.block_size)[0])
    assert report.val_examples == len(build_examples(val7, vocab, model.cfg.block_size)[0]) != val42
    monkeypatch.setattr(ex, "folded_logit_error", lambda *args: 2 * ex.FOLD_TOLERANCE)
    with pytest.raises(SystemExit, match="^error: folding changed the logits by 2.00e-05 > 1e-05; refusing to export$"):
        ex.main(["--checkpoint", str(tiny_model_dir / "model.pt"), "--out-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_onnx_artifacts_and_metadata(tiny_model_dir, tiny_checkpoint):
    model, vocab, ckpt = tiny_checkpoint
    for name in ("model.onnx", "sampler.onnx"):
        m = onnx.load(tiny_model_dir / name)
        onnx.checker.check_model(m, full_check=True)
        props = {p.key: p.value for p in m.metadata_props}
        meta = json.loads(props["namegen"])
        assert meta["vocab"] == vocab.itos and meta["block_size"] == model.cfg.block_size
        assert meta["config"] == ckpt["model_config"] and meta["num_params"] == model.num_params()
        assert meta["metrics"] == {k: v for k, v in ckpt["metrics"].items() if k != "val_curve"}  # (the curve: its plot)
        import hashlib

        assert meta["checkpoint_sha256"] == hashlib.sha256((tiny_model_dir / "model.pt").read_bytes()).hexdigest()
        assert props["words"].split("\n") == ckpt["words"]


def test_onnx_logits_parity(cpu_engine, tiny_checkpoint, splits):
    model, vocab, _ = tiny_checkpoint
    X, _ = build_examples(splits["val"], vocab, model.cfg.block_size)
    got = cpu_engine.logits_model.run(None, {"context": X.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(X).numpy()).max() <= 1e-5


SETTINGS = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=2.0, max_length=6),
    dict(top_k=1),
    dict(top_k=3, temperature=1.3),
    dict(top_p=0.5),
    dict(top_k=10, top_p=0.8, temperature=0.8),
    dict(prefix="mar"),
    dict(prefix="xz", top_k=5),
    dict(prefix="abcdefgh", max_length=9),  # prefix longer than block_size; at most 1 more character
    dict(max_length=1),
    dict(temperature=MAX_TEMPERATURE, top_k=20, top_p=0.5),  # the ends of the temperature range
    dict(temperature=FLOAT32_TINY, prefix="a"),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[json.dumps(s) for s in SETTINGS])
@pytest.mark.parametrize("seed", [0, 12345])
def test_sampler_exact_parity(cpu_engine, tiny_checkpoint, setting, seed):
    model, vocab, ckpt = tiny_checkpoint
    p = GenerateParams(num_samples=400, seed=seed, **setting)
    got = cpu_engine.generate(p)
    ref = reference_generate(model, vocab, p, ckpt["words"])
    assert [s.name for s in got] == [r[0] for r in ref]
    assert np.allclose([s.logprob for s in got], [r[1] for r in ref], atol=1e-4)
    assert all(s.name.startswith(p.prefix) and len(s.name) <= p.max_length for s in got)


def test_top_k_1_is_greedy(cpu_engine, tiny_checkpoint):
    model, vocab, _ = tiny_checkpoint
    for prefix in ("", "k", "jo"):
        ctx = ([0] * model.cfg.block_size + vocab.encode(prefix))[-model.cfg.block_size :]
        name = prefix
        with torch.no_grad():
            for _ in range(32 - len(prefix)):
                ix = model(torch.tensor([ctx])).argmax(1).item()
                if ix == 0:
                    break
                name += vocab.itos[ix]
                ctx = ctx[1:] + [ix]
        got = {s.name for s in cpu_engine.generate(GenerateParams(num_samples=50, seed=3, top_k=1, prefix=prefix))}
        assert got == {name}


def unit_feeds(context, uniforms, max_tokens, top_k=0):
    """sampler.onnx's inputs for rows at temperature 1 without top-p."""
    N = len(context)
    return {"context": np.asarray(context, np.int64), "uniforms": uniforms, "temperature": np.ones(N, np.float32),
            "top_k": np.broadcast_to(np.asarray(top_k, np.int64), (N,)).copy(), "top_p": np.ones(N, np.float32),
            "max_tokens": np.full(N, max_tokens, np.int64)}


def spec(model, feeds):
    """The float64 specification (sampling.sample_reference) on sampler.onnx's inputs -> tokens, logprob."""
    return sample_reference(model, *(torch.from_numpy(feeds[k]) for k in feeds))


def test_sampler_graph_vs_spec_on_random_rows(cpu_engine, tiny_checkpoint):
    """Per-row settings mixed inside one batch, straight through the graph."""
    model, _, _ = tiny_checkpoint
    rng = np.random.default_rng(0)
    N, T = 3000, 12
    feeds = {
        "context": rng.integers(0, 27, (N, model.cfg.block_size)).astype(np.int64),
        "uniforms": rng.random((N, T), dtype=np.float32),
        "temperature": rng.choice([0.3, 1.0, 1.7], N).astype(np.float32),
        "top_k": rng.choice([0, 1, 4, 27, 32], N).astype(np.int64),  # k > V acts as V
        "top_p": rng.choice([1.0, 0.95, 0.3], N).astype(np.float32),
        "max_tokens": rng.integers(0, T + 1, N).astype(np.int64),
    }
    tokens, logprob, rechecked = cpu_engine.sampler.run(None, feeds)
    rt, rl = spec(model, feeds)
    assert (tokens == rt.numpy()).all()
    assert np.allclose(logprob, rl.numpy(), atol=1e-4)
    assert (tokens[feeds["max_tokens"] == 0] == 0).all()
    # Every row runs the fast float32 path first, top-k and top-p ones too; only thin margins are redone.
    top_p = feeds["top_p"] < 1
    assert 0 < rechecked.mean() < 0.2 and rechecked[top_p].mean() < 0.2


def test_top_k_1_at_u_0_takes_the_most_likely_token(cpu_engine, tiny_checkpoint):
    """u = 0 picks the first token with weight > 0: under top_k = 1 that is the argmax, not the end token
    (index 0) that an inverse CDF counting zero weights would give."""
    model, _, _ = tiny_checkpoint
    ctx = np.random.default_rng(2).integers(1, 27, (200, model.cfg.block_size))
    with torch.no_grad():
        argmax = model(torch.from_numpy(ctx)).argmax(1).numpy()
    ctx = ctx[argmax != 0]  # contexts whose most likely next character is a letter
    feeds = unit_feeds(ctx, np.zeros((len(ctx), 2), np.float32), 1, top_k=1)
    tokens, _, _ = cpu_engine.sampler.run(None, feeds)
    assert len(ctx) >= 50 and (tokens[:, 0] == argmax[argmax != 0]).all()
    assert (tokens == spec(model, feeds)[0].numpy()).all()


@pytest.mark.parametrize("N, T", [(0, 6), (0, 1), (3, 1), (1, 0), (3, 0), (20, 0)])
def test_sampler_graph_empty_batch_and_no_characters(cpu_engine, N, T):
    """Edge shapes of the graph's inputs: no rows, a single column (only the forced end token), and no
    columns at all (not even the end token), which always take the compacting loop, at N <= 16 too."""
    feeds = unit_feeds(np.zeros((N, cpu_engine.block_size)), np.full((N, T), 0.5, np.float32), max(T - 1, 0))
    tokens, logprob, rechecked = cpu_engine.sampler.run(None, feeds)
    assert tokens.shape == (N, T) and logprob.shape == rechecked.shape == (N,)
    assert (tokens == 0).all() and not rechecked.any()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1e4])
@pytest.mark.parametrize("N", [64, 8], ids=["compacting", "small"])
def test_thin_margin_rows_take_the_exact_path(cpu_engine, tiny_checkpoint, N, temperature):
    """Uniforms placed on either side of a CDF boundary must be rechecked in float64, and match the spec,
    in both loops. At a high temperature too: float32's rounding of the CDF doesn't shrink with it (the
    graph accepts any float32 temperature; the service stops at 100)."""
    model, _, _ = tiny_checkpoint
    ctx = torch.zeros(N, model.cfg.block_size, dtype=torch.long)
    with torch.no_grad():  # float64, like the spec
        cdf = torch.cumsum(torch.softmax(float64_reference(model)(ctx[:1]) / temperature, 1), 1)[0]
    boundary = np.float32(cdf[3].item())
    steps = np.resize(np.arange(-12, 13), N)  # up to 12 float32 steps either side of the boundary
    u = (boundary + steps * np.spacing(boundary)).astype(np.float32)[:, None]
    feeds = {**unit_feeds(ctx.numpy(), u, max_tokens=1), "temperature": np.full(N, temperature, np.float32)}
    tokens, _, rechecked = cpu_engine.sampler.run(None, feeds)
    assert rechecked.all()
    rt, _ = spec(model, feeds)
    assert (tokens == rt.numpy()).all()
    assert set(tokens[:, 0].tolist()) <= {3, 4}


def sampler_session(folded, block_size, **kwargs):
    import onnxruntime as ort

    from export.sampler_graph import build_sampler_model

    model = build_sampler_model(folded, block_size, {}, **kwargs)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("loud", [False, True], ids=["shifted", "no-shift"])
def test_small_batches_match_the_compacting_loop_and_the_spec(tiny_checkpoint, loud):
    """Batches of up to SMALL_ROWS rows without top-k / top-p take SmallLoop (no compaction, logprobs and
    margins after the loop): the same tokens and recheck flags as the compacting loop, the spec's tokens;
    at temperature 1 and at per-row temperatures (the smallest float32 one too, where most weights are 0
    and the CDF has flat stretches, with some uniforms 0), with the logit shift and (loud: logits too
    large to bound) without it."""
    from export.fold import fold_for_export
    from export.graphs import logit_shift
    from export.sampler_graph import SMALL_ROWS

    model, _, _ = tiny_checkpoint
    if loud:
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.lm_head.weight.mul_(50)
    B, V, T = model.cfg.block_size, 27, 10
    folded = fold_for_export(model)
    assert (logit_shift(folded) is None) == loud
    small, plain = sampler_session(folded, B), sampler_session(folded, B, small_rows=0)
    rng = np.random.default_rng(5)
    for N in (1, 2, 7, SMALL_ROWS):
        for temperatures in ([1.0], [0.4, 1.0, 1.7], [FLOAT32_TINY, 1.0]):
            for _ in range(20):
                u = rng.random((N, T), dtype=np.float32)
                u[rng.random((N, T)) < 0.2] = 0.0
                feeds = unit_feeds(rng.integers(0, V, (N, B)), u, T - 1)
                feeds["max_tokens"] = rng.integers(0, T, N).astype(np.int64)
                feeds["temperature"] = rng.choice(temperatures, N).astype(np.float32)
                (tok, lp, re), (tok0, lp0, re0) = small.run(None, feeds), plain.run(None, feeds)
                rt, rl = spec(model, feeds)
                assert (tok == rt.numpy()).all() and (tok == tok0).all() and (re == re0).all()
                assert np.allclose(lp, lp0, rtol=0, atol=1e-5) and np.allclose(lp, rl.numpy(), atol=1e-4)


@pytest.mark.parametrize("rows_per_run, temperatures", [(None, (1.0, 0.7)), (16, (1.0,)), (16, (1.0, 0.7))])
def test_float64_stages_correct_any_fast_path_error_under_margin(tiny_checkpoint, rows_per_run, temperatures):
    """The float64 check must catch every fast-path decision that could be wrong, not only the ones
    float32 rounding happens to flip. The fast path gets logits off by MARGIN / 3 (gaps between two
    logits then move by under MARGIN; ~5x float32's rounding), and each row's third uniform lies within
    3e-5 of a float64 CDF boundary of its third step, so many rows' fast tokens are wrong from a step
    whose context comes from earlier tokens; the output must still be the spec's. rows_per_run 16:
    16 rows per run, SmallLoop's margins."""
    from export.fold import fold_for_export
    from export.sampler_step import MARGIN

    model, _, _ = tiny_checkpoint
    B, V = model.cfg.block_size, 27
    folded = fold_for_export(model)
    off = copy.deepcopy(folded)
    rng = np.random.default_rng(3)
    with torch.no_grad():
        off.lm_head.bias.add_(torch.from_numpy(rng.choice([-MARGIN / 3, MARGIN / 3], V)))
    N, T = 3000, 4
    temperature = rng.choice(temperatures, N).astype(np.float32)
    feeds = {**unit_feeds(rng.integers(0, V, (N, B)), rng.random((N, T), dtype=np.float32), max_tokens=T - 1),
             "temperature": temperature}
    first, _ = spec(model, {**feeds, "max_tokens": np.full(N, 2, np.int64)})  # the first two tokens
    ctx = torch.cat([torch.from_numpy(feeds["context"]), first[:, :2]], 1)[:, -B:]  # the third step's context
    with torch.no_grad():
        cdf = torch.cumsum(torch.softmax(float64_reference(model)(ctx) / torch.from_numpy(temperature)[:, None].double(), 1), 1)
    j = torch.from_numpy(rng.integers(0, V - 1, N))[:, None]
    near = cdf.gather(1, j)[:, 0].numpy() + rng.uniform(-3e-5, 3e-5, N)
    feeds["uniforms"][:, 2] = np.clip(near, 0, 1 - 1e-7).astype(np.float32)
    sess = sampler_session(folded, B, fast_folded=off)
    step = rows_per_run or N
    runs = [sess.run(None, {k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, N, step)]
    tokens, rechecked = np.concatenate([r[0] for r in runs]), np.concatenate([r[2] for r in runs])
    rt, _ = spec(model, feeds)
    assert (tokens == rt.numpy()).all()
    wrong = (spec(off, feeds)[0] != rt).any(1).numpy()  # rows the offset weights alone would get wrong
    assert wrong.sum() >= 20 and rechecked[wrong].all()


def test_logit_shift_bounds_every_context_and_falls_back(tiny_checkpoint, splits):
    """The static shift (graphs.logit_shift) keeps exp(logits - c) inside float32 for the contexts seen, and
    a model whose logits it can't bound gets the per-row max instead, with the same exact parity."""
    from export.fold import fold_for_export
    from export.graphs import logit_shift

    model, vocab, _ = tiny_checkpoint
    folded = fold_for_export(model)
    c = logit_shift(folded)
    assert c is not None  # so the parity tests above run the shifted fast path
    X, _ = build_examples(splits["val"], vocab, model.cfg.block_size)
    with torch.no_grad():
        logits = folded(X) - c
    assert logits.max() <= 60 and logits.max(dim=1).values.min() >= -60

    # By hand: logits in [0 +- 5] and [10 +- 1], so the largest lies in [max(-5, 9), max(5, 11)] = [9, 11]
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[5.0, 0.0], [0.5, -0.5]]))
        head.bias.copy_(torch.tensor([0.0, 10.0]))
    assert logit_shift(types.SimpleNamespace(linears=[None], lm_head=head)) == pytest.approx(10.0)
    assert logit_shift(types.SimpleNamespace(linears=[None], lm_head=head), limit=0.5) is None  # half-width 1

    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.lm_head.weight.mul_(50)  # logits up to ~50x larger: no shift is provable
    folded = fold_for_export(loud)
    assert logit_shift(folded) is None
    sess = sampler_session(folded, model.cfg.block_size)
    rng = np.random.default_rng(1)
    N, T = 2000, 10
    feeds = unit_feeds(rng.integers(0, 27, (N, model.cfg.block_size)), rng.random((N, T), dtype=np.float32), T - 1)
    tokens, logprob, _ = sess.run(None, feeds)
    rt, rl = spec(loud, feeds)
    assert (tokens == rt.numpy()).all()
    assert np.allclose(logprob, rl.numpy(), atol=1e-4)


@pytest.mark.parametrize("nucleus", [False, True], ids=["top_k", "top_p"])
def test_thin_logit_gap_takes_the_exact_path(cpu_engine, tiny_checkpoint, nucleus):
    """Where the r-th and (r+1)-th largest logits are closer than MARGIN, float32 could order them otherwise
    than float64 and keep another token set, when top-k (k = r) or the top-p nucleus (ending at the r-th
    token) cuts between them; the fast path must hand such rows to the exact path."""
    import itertools

    from export.sampler_step import MARGIN

    model, _, _ = tiny_checkpoint
    B, V = model.cfg.block_size, 27
    ctx = torch.tensor(list(itertools.product(range(V), repeat=B)))  # every context
    with torch.no_grad():
        s = float64_reference(model)(ctx).sort(dim=1, descending=True).values
    gaps = s[:, :-1] - s[:, 1:]  # gap between the (r+1)-th and (r+2)-th largest
    c, r = (gaps < MARGIN / 10).nonzero(as_tuple=True)
    assert len(c) >= 5
    u = np.random.default_rng(0).random((len(c), 2), dtype=np.float32)
    if nucleus:  # top_p halfway into the (r+1)-th token's mass: the nucleus is the r + 1 most likely tokens
        p = torch.softmax(s[c], 1)
        top_p = (torch.cumsum(p, 1).gather(1, r[:, None]) - p.gather(1, r[:, None]) / 2)[:, 0]
        feeds = {**unit_feeds(ctx[c].numpy(), u, max_tokens=1), "top_p": top_p.numpy().astype(np.float32)}
    else:
        feeds = unit_feeds(ctx[c].numpy(), u, max_tokens=1, top_k=(r + 1).numpy())
    tokens, _, rechecked = cpu_engine.sampler.run(None, feeds)
    assert rechecked.all()
    rt, _ = spec(model, feeds)
    assert (tokens == rt.numpy()).all()


@pytest.mark.parametrize("temperature", [1.0, 1e4])
def test_thin_top_p_boundary_takes_the_exact_path(cpu_engine, tiny_checkpoint, temperature):
    """A top_p equal (in float32) to the mass of a context's r most likely tokens puts the nucleus boundary
    within rounding: float32 could keep one token more or less than float64, so the fast path must hand
    the row to the exact path. Rows with top_p well between two masses must not be rechecked."""
    model, _, _ = tiny_checkpoint
    rng = np.random.default_rng(2)
    ctx = rng.integers(0, 27, (300, model.cfg.block_size))
    with torch.no_grad():
        logits = float64_reference(model)(torch.from_numpy(ctx)) / temperature
        ps = torch.softmax(logits, 1).sort(dim=1, descending=True).values
    mass = torch.cumsum(ps, 1)  # (N, V): mass of the r + 1 most likely tokens
    r = torch.from_numpy(rng.integers(0, 5, len(ctx)))
    on = mass.gather(1, r[:, None])[:, 0].numpy().astype(np.float32)  # a boundary, rounded to float32
    between = ((mass.gather(1, r[:, None]) + mass.gather(1, r[:, None] + 1)) / 2)[:, 0].numpy().astype(np.float32)
    ok = (on < 1) & (mass.gather(1, r[:, None] + 1)[:, 0] - mass.gather(1, r[:, None])[:, 0] > 1e-3).numpy()
    ctx, on, between = ctx[ok], on[ok], between[ok]
    assert len(ctx) >= 100
    u = rng.random((len(ctx), 2), dtype=np.float32)
    for top_p, thin in ((on, True), (between, False)):
        feeds = {**unit_feeds(ctx, u, max_tokens=1), "top_p": top_p,
                 "temperature": np.full(len(ctx), temperature, np.float32)}
        tokens, _, rechecked = cpu_engine.sampler.run(None, feeds)
        rt, _ = spec(model, feeds)
        assert (tokens == rt.numpy()).all()
        if thin:
            assert rechecked.all()
        else:  # only a uniform near a CDF boundary (~1 in 25 rows) has these checked in float64
            assert rechecked.mean() < 0.2


@pytest.mark.parametrize("fault", [None, "grid", "small", "logits"])
def test_verify_passes_exact_parity_and_fails_a_mismatch(tiny_model_dir, tmp_path, monkeypatch, capsys, fault):
    """verify's verdict, on a smaller grid: PASS and exit 0 for the exported model; FAIL with exit 1 when one
    name per top-p setting differs from the torch reference (grid), when one small request's name does
    (small), or when the ONNX logits are off by more than the tolerance (logits)."""
    import functools

    import export.verify as verify

    monkeypatch.setattr(verify, "GRID", {**verify.GRID, "top_k": [0]})  # 18 settings, 9 of them with top_p 0.9
    monkeypatch.setattr(verify, "names_parity", functools.partial(verify.names_parity, small_requests=30))
    torch_reference, logits_parity = verify.reference_generate, verify.logits_parity

    def reference(model, vocab, params, words):
        out = torch_reference(model, vocab, params, words)
        # grid settings have seeds below 10**6, the small requests from 10**6 on (and no top-p)
        if (fault == "grid" and params.top_p < 1) or (fault == "small" and params.seed == 10**6):
            out[-1] = (out[-1][0] + "q", out[-1][1])
        return out

    def logits(*args):
        lg = logits_parity(*args)
        return {**lg, "onnx_vs_torch": 2 * verify.LOGIT_TOL} if fault == "logits" else lg

    monkeypatch.setattr(verify, "reference_generate", reference)
    monkeypatch.setattr(verify, "logits_parity", logits)
    rc = verify.main(["--model-dir", str(tiny_model_dir), "--names-per-setting", "3", "--providers", "cpu",
                      "--json", str(tmp_path / "verify.json")])
    names = json.loads((tmp_path / "verify.json").read_text())["cpu"]["names"]
    small = names["small_requests"]
    assert small["requests"] == 30 and small["identical"] == small["names"] - (fault == "small")
    assert names["names"] == 18 * 3 and names["identical"] == names["names"] - 9 * (fault == "grid")
    assert rc == (1 if fault else 0) and capsys.readouterr().out.endswith("FAIL\n" if fault else "PASS\n")


def test_bench_summary_and_latency_arithmetic(monkeypatch, capsys):
    """The bench's ratios per round (the engine's best batch against the one-at-a-time loop and against the
    best torch batched run, reference sampler included) and its single-name percentiles, on made-up timings."""
    import random

    import export.bench as bench

    a, ref, plain = "torch one-at-a-time (a)", "torch reference batched (b)", "torch plain batched (b)"
    eng = "onnx engine cpu (c)"
    plan = [(a, 1, None, 1), (ref, 64, None, 64), (plain, 64, None, 64), (eng, 1, None, 1), (eng, 64, None, 64)]
    rounds = [({(a, 1): 100, (ref, 64): 2000, (plain, 64): 1000, (eng, 1): 500, (eng, 64): 50_000}, {"cpu": (0.3, 0.5)}),
              ({(a, 1): 200, (ref, 64): 1000, (plain, 64): 4000, (eng, 1): 400, (eng, 64): 40_000}, {"cpu": (0.2, 0.6)})]
    res = bench.summarize(rounds, plan, {"cpu": None}, 2)["engine_cpu"]
    assert res["best_batch"] == 64
    assert res["vs_one_at_a_time"] == {"median": 350.0, "min": 200.0, "max": 500.0}  # 50,000 / 100, 40,000 / 200
    assert res["vs_best_torch_batched"] == {"median": 17.5, "min": 10.0, "max": 25.0}  # / 2,000 (ref), / 4,000
    assert res["single_name_p50_ms"]["median"] == pytest.approx(0.25) and res["single_name_p99_ms"]["max"] == 0.6
    capsys.readouterr()

    durations = [1.0] * 100 + random.Random(0).sample([k / 1000 for k in range(1, 201)], 200)  # warm-up, then 1..200 ms
    clock = iter(np.cumsum([0.0] + [d for x in durations for d in (x, 0.0)]))
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    p50, p99 = bench.single_latency(types.SimpleNamespace(generate=lambda p: None), calls=300)
    assert (p50, p99) == pytest.approx((100.5, 198.01))  # np.percentile of 1..200 ms; the first 100 calls left out


@pytest.mark.parametrize("module, args", [
    ("verify", ["--providers", "cpu,tpu"]), ("verify", ["--providers", ""]), ("verify", ["--names-per-setting", "0"]),
    ("verify", ["--json", "/nonexistent-dir/verify.json"]), ("bench", ["--min-seconds", "nan"]),
    ("bench", ["--providers", "cpu,cpu"]), ("bench", ["--threads", "1000"]), ("bench", ["--batch-sizes", "64,0"]),
])
def test_verify_and_bench_bad_options_are_usage_errors(module, args, capsys):
    """Refused before any work: verify's report file too, which is written at the end of a long check."""
    import importlib

    main = importlib.import_module(f"export.{module}").main
    with pytest.raises(SystemExit) as exc:
        main(args)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    others = {"--threads", "--min-seconds", "--rounds", "--batch-sizes", "--providers"} - {args[0]}
    assert exc.value.code == 2 and args[0] in line and not any(f in line for f in others), line
