"""Learning-rate search (makemore part 2): one SGD step per lr on an exponential grid, loss vs lr.

    python -m trainer.lr_sweep [--steps 1000] [--lo 1e-3] [--hi 1] [--out artifacts/plots/lr_sweep.png]
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from data.files import cli, unwritable
from data.names import DataError, load_words, resolve_data_path
from trainer.dataset import Vocab, build_examples, split_words
from trainer.model import MLP, ModelConfig, run_problem
from trainer.plots import SWEEP_SMOOTH, plot_lr_sweep, smooth_sweep

DIVERGED = 4.0  # stop once the loss exceeds this multiple of the lowest loss so far
# The minimum of the smoothed sweep loss marks lrs already near the edge of stability, so we train
# below it. Common rules back off by 3x to 10x; we take 1/3 (the least conservative of them): on
# names.txt with the default model the minimum sits at 0.16..0.3 over seeds, so 1/3 gives 0.05..0.1,
# around the lecture's 0.1, while 1/10 would land at the slow end (0.016..0.03).
BACKOFF = 3.0


def suggest_lr(lrs, losses, smooth_frac=SWEEP_SMOOTH):
    """lr at the minimum of the moving-average loss (window smooth_frac of the sweep), divided by BACKOFF."""
    smooth = smooth_sweep(losses, smooth_frac)
    return lrs[int(smooth.argmin())] / BACKOFF


def lr_sweep(cfg, X, Y, steps=1000, lo=1e-3, hi=1.0, batch_size=32, seed=42):
    """Train a fresh MLP(cfg) one minibatch SGD step per lr, lrs = 10**linspace(log10 lo, log10 hi, steps)
    in increasing order. X (M, block_size) int64, Y (M,) int64.

    Returns (lrs, losses, suggested_lr): the lrs actually tried and their minibatch losses (the sweep
    stops early on divergence), and the suggested lr, clipped to [lo, hi].
    """
    with torch.random.fork_rng(devices=[]):  # reproducible init without touching the caller's RNG
        torch.manual_seed(seed)
        model = MLP(cfg)
    threads = torch.get_num_threads()
    # Steps this small are dominated by thread sync: one thread is several times faster, more so on a
    # busy machine.
    torch.set_num_threads(1)
    try:
        lrs, losses = _sweep(model, X, Y, torch.logspace(math.log10(lo), math.log10(hi), steps).tolist(),
                             batch_size, seed)
    finally:
        torch.set_num_threads(threads)
    if not losses:
        raise RuntimeError("lr sweep: the first loss is not finite; check the data and model config")
    return lrs, losses, min(hi, max(lo, suggest_lr(lrs, losses)))


def _sweep(model, X, Y, grid, batch_size, seed):
    """One SGD step per lr of grid, in order; returns the lrs tried and their minibatch losses."""
    model.train()
    g = torch.Generator().manual_seed(seed)
    lrs, losses = [], []
    for lr in grid:
        ix = torch.randint(0, len(X), (batch_size,), generator=g)  # (batch_size,)
        loss = model.loss(X[ix], Y[ix])
        if not math.isfinite(loss.item()):
            break
        lrs.append(lr)
        losses.append(loss.item())
        if loss.item() > DIVERGED * min(losses):
            break
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return lrs, losses


def parse_args(argv=None):
    d = ModelConfig()
    p = argparse.ArgumentParser(prog="python -m trainer.lr_sweep", description=__doc__.splitlines()[0])
    dflt = " (default: %(default)s)"
    p.add_argument("--data", default=None, help="word list, one word per line (default: names.txt)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="characters of context" + dflt)
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="embedding size per character" + dflt)
    p.add_argument("--n-hidden", type=int, default=d.n_hidden, help="width of each hidden layer" + dflt)
    p.add_argument("--n-layers", type=int, default=d.n_layers, help="Linear-BatchNorm-tanh blocks" + dflt)
    p.add_argument("--steps", type=int, default=1000, help="lrs tried, one SGD step each" + dflt)
    p.add_argument("--lo", type=float, default=1e-3, help="smallest learning rate" + dflt)
    p.add_argument("--hi", type=float, default=1.0, help="largest learning rate" + dflt)
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size" + dflt)
    p.add_argument("--seed", type=int, default=42, help="seed for the model init and minibatches" + dflt)
    p.add_argument("--out", default="artifacts/plots/lr_sweep.png", help="plot file (PNG)" + dflt)
    args = p.parse_args(argv)
    if not 0 < args.lo < args.hi < math.inf:
        p.error(f"need 0 < --lo < --hi < inf, got --lo {args.lo} --hi {args.hi}")
    problem = ModelConfig(block_size=args.block_size, n_embd=args.n_embd, n_hidden=args.n_hidden,
                          n_layers=args.n_layers).problem()
    if problem is not None:
        p.error(problem)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if (problem := run_problem(args.batch_size, args.seed)) is not None:
        p.error(problem)
    out = Path(args.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        p.error(f"--out must name a .png file, got {args.out}")
    if (problem := unwritable(out, "--out", create=True)) is not None:  # found out now, not after the sweep
        p.error(problem)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        path = resolve_data_path(args.data)
        words = load_words(path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vocab = Vocab.from_words(words)
    try:
        train = split_words(words)["train"]
    except DataError:  # too few words to split: sweep on them all
        train = words
    X, Y = build_examples(train, vocab, args.block_size)  # (M, block_size), (M,)
    cfg = ModelConfig(vocab_size=vocab.size, block_size=args.block_size, n_embd=args.n_embd,
                      n_hidden=args.n_hidden, n_layers=args.n_layers)
    print(f"data: {path} ({len(words)} words, {len(X)} training examples, vocab {vocab.size})")
    print(f"model: {cfg}")
    print(f"sweep: {args.steps} steps, lr {args.lo:g} .. {args.hi:g}, batch {args.batch_size}, seed {args.seed}")
    lrs, losses, suggested = lr_sweep(cfg, X, Y, steps=args.steps, lo=args.lo, hi=args.hi,
                                      batch_size=args.batch_size, seed=args.seed)
    if len(losses) < args.steps:
        print(f"stopped at lr {lrs[-1]:.3g} after {len(losses)} steps: the loss diverged")
    print(f"suggested learning rate: {suggested:.3g}")
    try:
        print(f"plot: {plot_lr_sweep(lrs, losses, args.out, suggested=suggested)}")
    except OSError as e:  # what the check up front can't see (a read-only mount, a full disk)
        print(f"error: --out {args.out}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli(main)
