"""Bigram baseline, diagnostic plots and lr sweep: slices of names.txt (conftest fixtures), a tiny model."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import plots
from trainer.bigram import bigram_counts, bigram_nll, bigram_probs, plot_bigram
from trainer.dataset import build_examples
from trainer.lr_sweep import lr_sweep
from trainer.lr_sweep import main as lr_sweep_main
from trainer.model import MLP, ModelConfig

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(block_size=3, n_embd=8, n_hidden=32, n_layers=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: one thread is several times faster than two on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg(vocab):
    return ModelConfig(vocab_size=vocab.size, **TINY)


@pytest.fixture(scope="module")
def batch(splits, vocab):
    """A fixed slice of training examples: X (512, 3), Y (512,)."""
    X, Y = build_examples(splits["train"][:200], vocab, TINY["block_size"])
    return X[:512], Y[:512]


def assert_png(path, min_kb=5):
    path = Path(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_kb * 1024, f"{path} is only {len(data)} bytes"


# ---------------------------------------------------------------- bigram


def test_bigram_counts(splits, vocab):
    train = splits["train"][:1000]
    N = bigram_counts(train, vocab)
    assert N.shape == (vocab.size, vocab.size) and N.dtype == torch.long
    assert N.sum().item() == sum(len(w) + 1 for w in train)
    assert N[0].sum().item() == len(train)  # every word starts after '.'
    assert N[:, 0].sum().item() == len(train)  # ... and ends with '.'
    assert N[0, 0].item() == 0  # no empty words


def test_bigram_nll_band(splits, vocab):
    N = bigram_counts(splits["train"], vocab)
    nll = bigram_nll(N, splits["val"], vocab)
    assert 2.3 < nll < 2.6
    assert 0.0 < nll < math.log(vocab.size)  # worse than perfect, better than uniform
    # Smoothing only pulls probabilities towards uniform, so heavy smoothing is worse on held-out data.
    assert bigram_nll(N, splits["val"], vocab, smoothing=1000.0) > nll


def test_plot_bigram(splits, vocab, tmp_path):
    path = plot_bigram(bigram_counts(splits["train"][:2000], vocab), vocab, tmp_path / "bigram.png")
    assert_png(path, min_kb=50)


# ---------------------------------------------------------------- activations and gradients


@pytest.mark.parametrize("training", [True, False])
def test_plot_activations_restores_state(cfg, batch, tmp_path, training):
    torch.manual_seed(0)
    model = MLP(cfg)
    model.train(training)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    paths = plots.plot_activations(model, *batch, tmp_path)
    assert [Path(p).name for p in paths] == ["tanh_activations.png", "activation_gradients.png",
                                              "grad_data_ratio.png"]
    for p in paths:
        assert_png(p)
    assert model.training is training
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    for k, v in model.state_dict().items():  # no step taken, BN running stats untouched
        assert torch.equal(v, buffers[k]), k


def test_plot_update_ratios(cfg, tmp_path):
    names = [n for n, _ in plots.weight_params(MLP(cfg))]
    assert names == ["wte.weight", "hidden.0.weight", "hidden.3.weight", "lm_head.weight"]
    history = [[-3.5 + 0.01 * i + 0.1 * j for j in range(len(names))] for i in range(50)]  # (50, 4)
    assert_png(plots.plot_update_ratios(history, names, tmp_path / "ud.png"))
    steps = list(range(0, 500, 10))
    assert_png(plots.plot_update_ratios(history, names, tmp_path / "ud_steps.png", steps=steps))


# ---------------------------------------------------------------- initialisation


def test_init_stats_naive_worse_than_kaiming(batch, vocab):
    deep = ModelConfig(vocab_size=vocab.size, block_size=3, n_embd=8, n_hidden=64, n_layers=4)
    naive = plots.init_stats(deep, *batch, init="naive")
    kaiming = plots.init_stats(deep, *batch, init="kaiming")
    assert len(naive["saturation"]) == len(kaiming["saturation"]) == 4
    assert all(n > k for n, k in zip(naive["saturation"], kaiming["saturation"]))
    assert min(naive["saturation"]) > 0.3 and max(kaiming["saturation"]) < 0.3
    assert naive["loss"] > 2 * kaiming["loss"]
    assert abs(kaiming["loss"] - math.log(vocab.size)) < 0.3  # near-uniform softmax at init


def test_plot_init_comparison(cfg, batch, tmp_path):
    assert_png(plots.plot_init_comparison(cfg, *batch, tmp_path / "init.png"))


# ---------------------------------------------------------------- training curves and lr sweep


def test_moving_average():
    assert plots.moving_average([1, 2, 3, 4, 5], 3).tolist() == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert plots.moving_average([1, 2], 10).tolist() == [1.5, 1.5]  # window wider than the data


def test_plot_loss(tmp_path):
    losses = [3.3 * math.exp(-i / 800) + 2.0 for i in range(2500)]  # 2500: not a multiple of the window
    val = ([999, 1999], [2.6, 2.3])
    assert_png(plots.plot_loss(losses, tmp_path / "loss.png", window=1000, val=val))
    assert_png(plots.plot_loss(losses[:10], tmp_path / "short.png", val=()))  # < one window, no val yet


def test_suggested_lr_and_saturation_by_hand():
    from trainer.lr_sweep import BACKOFF, suggest_lr

    # the minimum of the (here unsmoothed) loss, backed off
    assert suggest_lr([0.01, 0.1, 1.0], [3.0, 2.0, 5.0], smooth_frac=0.01) == pytest.approx(0.1 / BACKOFF)
    assert plots.saturation(torch.tensor([-0.99, 0.99, 0.5, -0.5, 0.97, -0.97])) == pytest.approx(2 / 6)  # |t| > 0.97


def test_lr_sweep_short(cfg, splits, vocab, tmp_path):
    X, Y = build_examples(splits["train"][:2000], vocab, cfg.block_size)
    lrs, losses, suggested = lr_sweep(cfg, X, Y, steps=300, lo=1e-3, hi=1.0)
    assert 0 < len(losses) == len(lrs) <= 300
    assert all(math.isfinite(x) for x in losses)
    assert lrs == sorted(lrs)
    assert 1e-3 <= suggested <= 1.0
    assert lr_sweep(cfg, X, Y, steps=300)[1] == losses  # seeded: reproducible
    assert_png(plots.plot_lr_sweep(lrs, losses, tmp_path / "lr.png", suggested=suggested))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.lr_sweep", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_missing_data_exits_2(tmp_path):
    r = run_cli("--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "lr.png"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "lr.png").exists()


def test_cli_small_run(words, tmp_path, capsys):
    # In-process (the subprocess test above already covers `python -m`): saves a torch import.
    data = tmp_path / "words.txt"
    data.write_text("\n".join(words[:500]) + "\n")
    out = tmp_path / "plots" / "lr.png"
    assert lr_sweep_main(["--data", str(data), "--steps", "100", "--n-hidden", "32", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "sweep: 100 steps" in stdout and "suggested learning rate: " in stdout
    assert_png(out)
    data.write_text("ann\nbo\ncy\n")  # too few words to split: the sweep uses them all
    assert lr_sweep_main(["--data", str(data), "--steps", "20", "--n-hidden", "8", "--out", str(out)]) == 0
    assert "3 words, 10 training examples" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--out", "lr.jpg"], ["--out", "."], ["--hi", "inf"], ["--seed", "-1"],
                                  ["--batch-size", str(2**21)]])
def test_cli_bad_options_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:
        lr_sweep_main(args)  # refused before the data is read or the sweep runs
    assert exc.value.code == 2 and args[0] in capsys.readouterr().err


def test_bigram_by_hand():
    from trainer.dataset import Vocab

    vocab = Vocab.from_words(["ab", "b"])  # ".ab"
    N = bigram_counts(["ab", "b"], vocab)
    assert N.tolist() == [[0, 1, 1], [0, 0, 1], [2, 0, 0]]  # N[prev, next]: .a ab b. | .b b.
    P = bigram_probs(N)  # add-one smoothing, each row a distribution over the next character
    assert P[0].tolist() == pytest.approx([1 / 5, 2 / 5, 2 / 5]) and P.sum(1).tolist() == pytest.approx([1, 1, 1])
    # "ab" unsmoothed: P(a | .) = 1/2, P(b | a) = 1, P(. | b) = 1, over 3 characters (the end token included)
    assert bigram_nll(N, ["ab"], vocab, smoothing=0.0) == pytest.approx(math.log(2) / 3)
