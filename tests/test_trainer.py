"""Trainer: vocabulary, split, BatchNorm semantics, init statistics, and a short run beating the bigram."""
import json
import math

import pytest
import torch

from trainer.bigram import bigram_counts, bigram_nll
from trainer.dataset import Vocab, build_examples, split_words
from trainer.model import MLP, ModelConfig


def test_vocab(vocab, words):
    assert vocab.itos[0] == "." and vocab.size == 27 and vocab.chars == "abcdefghijklmnopqrstuvwxyz"
    assert vocab.decode(vocab.encode("emma")) == "emma"
    assert Vocab.from_words(["ba", "ab"]).itos == ".ab"


def test_split_is_deterministic_and_matches_lecture(words):
    a, b = split_words(words, 42), split_words(words, 42)
    assert a == b
    assert [len(a[k]) for k in ("train", "val", "test")] == [25626, 3203, 3204]
    assert a["train"][:3] == ["yuheng", "diondre", "xavien"]  # random.seed(42); random.shuffle(words)
    assert split_words(words, 1)["train"][:3] != a["train"][:3]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(words)


def test_examples(vocab, splits):
    X, Y = build_examples(splits["train"], vocab, 3)
    assert X.shape == (182625, 3) and Y.shape == (182625,)  # the lecture's Xtr size
    X, Y = build_examples(["ab"], vocab, 2)
    assert X.tolist() == [[0, 0], [0, 1], [1, 2]] and Y.tolist() == [1, 2, 0]


def test_batchnorm_train_vs_eval_semantics():
    torch.manual_seed(0)
    m = MLP(ModelConfig(n_hidden=16))
    X = torch.randint(0, 27, (64, 3))
    m.train()
    full = m(X)
    # Training mode normalises with batch statistics: a row's logits depend on the other rows ...
    assert not torch.allclose(full[:8], m(X[:8]), atol=1e-4)
    bn = m.batchnorms()[0]
    assert bn.running_mean.abs().sum() > 0  # ... and running statistics were updated
    m.eval()
    running = bn.running_mean.clone()
    # ... eval mode uses running statistics: rows are independent and nothing is updated.
    assert torch.allclose(m(X)[:8], m(X[:8]), atol=1e-6)
    assert torch.equal(bn.running_mean, running)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_kaiming_init_statistics(n_layers):
    """Kaiming: std(W) = (5/3) / sqrt(fan_in). With unit-normal embeddings the first pre-activation std is the
    gain itself (~1.67); later layers take tanh outputs (std ~0.6), so 5/3 brings them back to ~1. The naive
    N(0, 1) init blows pre-activations up by sqrt(fan_in) and saturates the tanh."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_hidden=200, n_layers=n_layers)
    X = torch.randint(0, 27, (4096, 3))

    def stats(init):
        m = MLP(cfg, init=init)
        x, stds, sat = m.wte(X).flatten(1), [], []
        for lin in m.linears():
            h = lin(x)
            x = torch.tanh(h)
            stds.append(h.std().item())
            sat.append((x.abs() > 0.97).float().mean().item())
        return stds, sat

    stds, sat = stats("kaiming")
    assert stds[0] == pytest.approx(5 / 3, rel=0.1)
    assert all(0.8 < s < 1.3 for s in stds[1:]), stds
    assert max(sat) < 0.3  # |h| > 2.1 at std 5/3: ~20% in the first layer, by design
    naive_stds, naive_sat = stats("naive")
    assert min(naive_stds) > 4 and min(naive_sat) > 0.6
    # The scaled-down output layer starts near the uniform distribution: loss ~ log(27).
    m = MLP(cfg)
    assert abs(m.loss(X, torch.randint(0, 27, (4096,))).item() - math.log(27)) < 0.1
    assert not m.lm_head.bias.any()
    with pytest.raises(ValueError, match="init must be"):
        MLP(cfg, init="xavier")


def test_short_training_beats_bigram(tiny_model_dir):
    m = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert m["val_loss"] < m["bigram_val_loss"] - 0.05, m
    assert m["train_loss"] < math.log(27) and m["test_loss"] < m["bigram_test_loss"]
    assert m["steps"] == 3000 and m["train_seconds"] > 0


def test_short_run_with_ema_saves_trained_weights(vocab, splits):
    from trainer.recipe import TrainConfig
    from trainer.train import evaluate, train

    xy = {k: build_examples(splits[k][:2000], vocab, 3) for k in ("train", "val")}
    losses = {}
    for ema in (0.0, 0.9999):  # the baseline's decay, over a run of 300 steps
        torch.manual_seed(0)
        model = MLP(ModelConfig(n_hidden=64))
        train(model, xy, TrainConfig(steps=300, ema=ema, eval_every=300, record_every=100), progress=False)
        losses[ema] = evaluate(model, *xy["val"])
    assert losses[0.0] < 2.8  # trained, well below log(27) = 3.30
    assert losses[0.9999] < losses[0.0] + 0.05, losses  # the average is of trained weights, not of the init


def test_checkpoint_round_trip(tiny_model_dir, tiny_checkpoint, splits):
    from trainer.train import evaluate

    model, vocab, ckpt = tiny_checkpoint
    assert not model.training and vocab.size == 27 and len(ckpt["words"]) == 32033
    X, Y = build_examples(splits["val"], vocab, model.cfg.block_size)
    assert evaluate(model, X, Y) == pytest.approx(ckpt["metrics"]["val_loss"], abs=1e-6)


def test_corrupt_checkpoint(tmp_path, tiny_model_dir):
    import struct
    import zipfile

    from trainer.checkpoint import CheckpointError, load_checkpoint

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="make train"):
        load_checkpoint(tmp_path / "missing.pt")

    # One flipped byte inside a tensor: torch.load alone would read it as another weight.
    good = tiny_model_dir / "model.pt"
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        entry = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 0)
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_len + extra_len] ^= 0xFF
    bad.write_bytes(raw)
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        load_checkpoint(bad)

    # Loadable, but not everything later steps rebuild from.
    ckpt = torch.load(good, weights_only=True)
    for change, match in ((lambda c: c.pop("words"), "missing words"),
                          (lambda c: c.update(vocab=c["vocab"][:-1]), "vocabulary"),
                          (lambda c: c.update(vocab=c["vocab"] + "!"), "vocabulary"),  # 28 tokens, 27 logits
                          (lambda c: c.update(words=c["words"] + ["zoë"]), "vocabulary"),  # a word it can't encode
                          (lambda c: c.update(state_dict={k: v for k, v in c["state_dict"].items()
                                                          if k != "lm_head.bias"}), "state_dict.*lm_head.bias"),
                          (lambda c: c.update(words=["ann", "bo"]), "too few")):
        damaged = dict(ckpt)
        change(damaged)
        torch.save(damaged, bad)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(bad)


PLOTS = ["bigram_counts", "tanh_activations", "activation_gradients", "grad_data_ratio", "update_data_ratio",
         "init_comparison", "loss", "lr_sweep"]


def test_train_cli_writes_artifacts_and_every_plot(tmp_path):
    from trainer.train import main

    metrics = main(["--preset", "tiny", "--steps", "400", "--eval-every", "200", "--record-every", "20",
                    "--out-dir", str(tmp_path), "--no-progress", "--threads", "1", "--split-seed", "7"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "test_loss", "bigram_val_loss", "steps", "train_seconds", "suggested_lr"):
        assert key in saved and saved[key] == metrics[key]
    assert metrics["steps"] == 400 and [s for s, _ in metrics["val_curve"]] == [200, 400]  # flags override the preset
    # The checkpoint records the split it was trained and evaluated on, which export and verify rebuild.
    from trainer.checkpoint import load_checkpoint
    from trainer.train import evaluate

    model, vocab, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["split_seed"] == 7 and ckpt["train_config"]["steps"] == 400
    splits = split_words(ckpt["words"], 7)
    for k in ("train", "val", "test"):  # each loss on its own split, the bigram's fitted on train only
        X, Y = build_examples(splits[k], vocab, model.cfg.block_size)
        assert evaluate(model, X, Y) == pytest.approx(metrics[f"{k}_loss"], abs=1e-6), k
        assert metrics[f"bigram_{k}_loss"] == pytest.approx(
            bigram_nll(bigram_counts(splits["train"], vocab), splits[k], vocab), abs=1e-9), k
    for name in PLOTS:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name


@pytest.mark.parametrize("flag, value", [("--batch-size", "1"), ("--steps", "0"), ("--lr", "nan"), ("--lr", "-0.1"),
                                         ("--ema", "1"), ("--dropout", "1.5"), ("--decay-at", "2"),
                                         ("--n-layers", "0"), ("--optimizer", "adam"), ("--threads", "-1"),
                                         ("--seed", str(2**64)), ("--batch-size", str(2**21)),
                                         ("--n-hidden", "100000000"), ("--block-size", "65"), ("--threads", "257"),
                                         ("--split-seed", "-1"), ("--dropout", "1"), ("--lr", "0"),
                                         ("--lr-final", "-0.01"), ("--weight-decay", "-0.1"), ("--warmup", "-1"),
                                         ("--eval-every", "0"), ("--record-every", "0")])
def test_train_cli_bad_settings_are_usage_errors(flag, value, capsys, tmp_path):
    from trainer.train import main

    # Rejected before any training. (A setting let through would train one step into tmp_path, not the
    # baseline's 200,000 steps into artifacts/.)
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "1", "--out-dir", str(tmp_path), "--no-progress", flag, value, "--no-plots"])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_training_follows_the_schedule_and_marks_samples(monkeypatch):
    """Each step sets the optimizer's lr from the schedule (the last step's is lr_final); the init leaves
    BatchNorm at identity (gain 1, shift 0); AdamW takes the recipe's betas; samples are marked by split."""
    import trainer.train as tr
    from trainer.recipe import TrainConfig, make_optimizer

    made = []
    monkeypatch.setattr(tr, "make_optimizer", lambda m, tc: made.append(make_optimizer(m, tc)) or made[-1])
    torch.manual_seed(0)
    m = MLP(ModelConfig(n_hidden=16))
    assert all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in m.batchnorms())
    X, Y = torch.randint(0, 27, (200, 3)), torch.randint(0, 27, (200,))
    xy = {"train": (X, Y), "val": (X, Y)}
    tr.train(m, xy, TrainConfig(steps=20, lr=0.1, lr_final=0.01, decay_at=0.5, eval_every=20, calibrate_bn=False),
             progress=False)
    assert made[0].param_groups[0]["lr"] == 0.01
    adamw = make_optimizer(m, TrainConfig(optimizer="adamw", weight_decay=0.1))
    assert adamw.defaults["betas"] == (0.9, 0.99) and [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    assert tr.mark_samples(["a", "b", "c", "z"], {"train": ["a"], "val": ["b"], "test": ["c"]}) == [
        ("a", "train"), ("b", "val/test"), ("c", "val/test"), ("z", "new")]


def test_the_ends_of_each_setting_range_are_accepted():
    """The values just inside the ranges whose outsides the test above rejects."""
    from trainer.model import MAX_BATCH, MAX_BLOCK_SIZE
    from trainer.recipe import TrainConfig, config_error

    for mc, tc in [(ModelConfig(block_size=MAX_BLOCK_SIZE), TrainConfig()), (ModelConfig(), TrainConfig(batch_size=2)),
                   (ModelConfig(), TrainConfig(batch_size=MAX_BATCH, seed=2**64 - 1)),
                   (ModelConfig(), TrainConfig(decay_at=1.0, warmup=0, lr_final=0.0, ema=0.0)),
                   (ModelConfig(), TrainConfig(decay_at=0.0, steps=1, eval_every=1, record_every=1))]:
        assert config_error(mc, tc) is None, (mc, tc)


def test_train_cli_unwritable_out_dir_fails_before_training(tmp_path, capsys):
    from trainer.train import main

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out-dir .*cannot write there"):
        main(["--out-dir", str(tmp_path / "file" / "sub"), "--no-plots", "--no-progress"])
    assert "bigram baseline" not in capsys.readouterr().out  # nothing was computed yet


def test_calibrate_batchnorm_sets_exact_statistics():
    from trainer.train import calibrate_batchnorm

    torch.manual_seed(0)
    m = MLP(ModelConfig(n_hidden=16, n_layers=2, dropout=0.3))
    X = torch.randint(0, 27, (5000, 3))
    m.train()
    m(X[:32])  # running statistics from one noisy minibatch, with dropout on
    calibrate_batchnorm(m, X)
    assert not m.training
    with torch.no_grad():
        x = m.wte(X).flatten(1)
        for module in m.hidden:
            if isinstance(module, torch.nn.BatchNorm1d):
                assert torch.allclose(module.running_mean, x.mean(0), atol=1e-5)
                assert torch.allclose(module.running_var, x.var(0), rtol=1e-4)
            x = module(x)  # eval mode: dropout is off, as it will be when serving


def test_ema_matches_torch_averaged_model():
    """trainer.recipe.EMA keeps the same average as torch's AveragedModel(use_buffers=True), only faster."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from trainer.recipe import EMA

    torch.manual_seed(0)
    m = MLP(ModelConfig(n_hidden=16))
    ours, ref = EMA(m, 0.9), AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    X, Y = torch.randint(0, 27, (64, 3)), torch.randint(0, 27, (64,))
    for _ in range(5):
        opt.zero_grad()
        m.loss(X, Y).backward()
        opt.step()
        ours.update(m)
        ref.update_parameters(m)
    theirs = ref.module.state_dict()
    for k, v in ours.module.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, theirs[k]), k
    ours.apply()
    assert torch.equal(m.lm_head.weight, theirs["lm_head.weight"]) and m.batchnorms()[0].num_batches_tracked == 5


def test_model_shape_and_parameter_counts():
    """The lecture's model has 12,097 parameters (no hidden bias: BatchNorm's shift replaces it); the better
    preset's 258,555, with dropout after each tanh."""
    from trainer.recipe import PRESETS

    assert MLP(ModelConfig()).num_params() == 12097
    assert [type(m).__name__ for m in MLP(ModelConfig()).hidden] == ["Linear", "BatchNorm1d", "Tanh"]
    better = MLP(PRESETS["better"][0])
    assert better.num_params() == 258555
    assert [type(m).__name__ for m in better.hidden] == ["Linear", "BatchNorm1d", "Tanh", "Dropout"] * 2
    assert all(m.p == 0.2 for m in better.hidden if isinstance(m, torch.nn.Dropout))


def test_evaluate_is_the_mean_nll_in_eval_mode_and_keeps_the_mode():
    from trainer.train import evaluate

    torch.manual_seed(0)
    m = MLP(ModelConfig(n_hidden=16))
    X, Y = torch.randint(0, 27, (1000, 3)), torch.randint(0, 27, (1000,))
    m.train()
    m(X)  # running statistics unlike the batch's own
    m.eval()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(m(X), Y).item()
    m.train()
    assert evaluate(m, X, Y) == pytest.approx(want, rel=1e-6)
    assert evaluate(m, X, Y, batch=64) == pytest.approx(want, rel=1e-6)  # 15 batches of 64 and one of 40
    assert m.training  # evaluating between training steps doesn't leave the model in eval mode
    m.eval()
    evaluate(m, X, Y)
    assert not m.training


def test_lr_schedules():
    from trainer.recipe import PRESETS, TrainConfig

    base = PRESETS["baseline"][1]  # 0.1, then 0.01 from step 150,000 of 200,000
    assert [base.lr_at(s) for s in (0, 149_999, 150_000, 199_999)] == [0.1, 0.1, 0.01, 0.01]
    cos = PRESETS["better"][1]  # linear warm-up over 500 steps, then cosine 3e-3 -> 3e-5 over the rest
    assert cos.lr_at(0) == pytest.approx(3e-3 / 500) and cos.lr_at(499) == pytest.approx(3e-3)
    assert cos.lr_at(500) == pytest.approx(3e-3)
    assert cos.lr_at(500 + (55_000 - 500) // 2) == pytest.approx((3e-3 + 3e-5) / 2)
    assert cos.lr_at(54_999) == pytest.approx(3e-5, rel=1e-3)
    lrs = [cos.lr_at(s) for s in range(500, 55_000, 500)]
    assert lrs == sorted(lrs, reverse=True)
    assert TrainConfig(steps=10, schedule="cosine", lr=1.0, lr_final=0.0).lr_at(0) == 1.0  # no warm-up


def test_ema_horizon_is_at_most_a_tenth_of_the_run():
    from trainer.recipe import TrainConfig, ema_decay

    assert ema_decay(TrainConfig(steps=200_000, ema=0.9999)) == 0.9999
    assert ema_decay(TrainConfig(steps=1000, ema=0.9999)) == pytest.approx(0.99)
    assert ema_decay(TrainConfig(steps=5, ema=0.9999)) == 0.0  # under 10 steps: no average, not a negative decay
    assert ema_decay(TrainConfig(steps=1000, ema=0.0)) == 0.0


def test_train_saves_the_average_and_calibrates_batchnorm(vocab, splits, monkeypatch):
    """train() ends with the EMA's weights and BatchNorm statistics in the model, and its val curve is that of
    the average (the model that is saved), ending at the last step; calibration then sets exact statistics."""
    import trainer.train as tt

    made = []

    class RecordingEMA(tt.EMA):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(tt, "EMA", RecordingEMA)
    xy = {k: build_examples(splits[k][:2000], vocab, 3) for k in ("train", "val")}
    torch.manual_seed(0)
    model = MLP(ModelConfig(n_hidden=32))
    hist = tt.train(model, xy, tt.TrainConfig(steps=100, ema=0.9, calibrate_bn=False, eval_every=60, record_every=50),
                    progress=False)
    (avg,) = made
    assert avg.updates == 100
    theirs = avg.module.state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, theirs[k]), k
    assert [s for s, _ in hist["val"]] == [60, 100]
    assert hist["val"][-1][1] == pytest.approx(tt.evaluate(model, *xy["val"]), abs=1e-6)

    torch.manual_seed(0)
    model = MLP(ModelConfig(n_hidden=32))
    tt.train(model, xy, tt.TrainConfig(steps=100, eval_every=100), progress=False)  # calibrate_bn: the default
    assert not model.training
    bn = model.batchnorms()[0]
    with torch.no_grad():
        h = model.hidden[0](model.wte(xy["train"][0]).flatten(1))
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(0), rtol=1e-4)


def test_adamw_decays_only_the_matrices():
    from trainer.recipe import TrainConfig, make_optimizer

    m = MLP(ModelConfig(n_hidden=16, n_layers=2))
    opt = make_optimizer(m, TrainConfig(optimizer="adamw", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {n for n, p in m.named_parameters() if id(p) in decayed} == {
        "wte.weight", "hidden.0.weight", "hidden.3.weight", "lm_head.weight"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
