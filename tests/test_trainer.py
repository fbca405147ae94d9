"""Trainer: vocabulary, split, BatchNorm semantics, init statistics, and a short run beating the bigram."""
import json
import math

import pytest
import torch

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


def test_short_training_beats_bigram(tiny_model_dir):
    m = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert m["val_loss"] < m["bigram_val_loss"] - 0.05, m
    assert m["train_loss"] < math.log(27) and m["test_loss"] < m["bigram_test_loss"]
    assert m["steps"] == 3000 and m["train_seconds"] > 0


def test_short_run_with_ema_saves_trained_weights(vocab, splits):
    from trainer.train import TrainConfig, evaluate, train

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
                    "--out-dir", str(tmp_path), "--no-progress", "--threads", "1"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "test_loss", "bigram_val_loss", "steps", "train_seconds", "suggested_lr"):
        assert key in saved and saved[key] == metrics[key]
    for name in PLOTS:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name


@pytest.mark.parametrize("flag, value", [("--batch-size", "1"), ("--steps", "0"), ("--lr", "nan"), ("--lr", "-0.1"),
                                         ("--ema", "1"), ("--dropout", "1.5"), ("--decay-at", "2"),
                                         ("--n-layers", "0"), ("--optimizer", "adam"), ("--threads", "-1"),
                                         ("--seed", str(2**64)), ("--batch-size", str(2**21)),
                                         ("--n-hidden", "100000000"), ("--block-size", "65"), ("--threads", "257"),
                                         ("--split-seed", "-1")])
def test_train_cli_bad_settings_are_usage_errors(flag, value, capsys):
    from trainer.train import main

    with pytest.raises(SystemExit) as exc:
        main([flag, value, "--no-plots"])  # rejected before any training
    assert exc.value.code == 2 and flag in capsys.readouterr().err


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
    """trainer.train.EMA keeps the same average as torch's AveragedModel(use_buffers=True), only faster."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from trainer.train import EMA

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
