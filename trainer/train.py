"""Train the BatchNorm MLP on a word list, evaluate it, draw the diagnostics, and save the checkpoint.

    python -m trainer.train                    # the lecture's recipe (val ~2.10 in a few minutes on CPU)
    python -m trainer.train --preset better    # wider/deeper, longer context, AdamW + cosine
"""
import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from data.files import cli, write_text
from data.names import DataError, load_words, resolve_data_path
from trainer import bigram, plots
from trainer.checkpoint import save_checkpoint
from trainer.lr_sweep import lr_sweep
from trainer.dataset import Vocab, build_examples, split_words
from trainer.model import MLP, ModelConfig
from trainer.recipe import CHOICES, EMA, PRESETS, TrainConfig, config_error, ema_decay, make_optimizer
from trainer.sampling import decode_tokens, sample_reference


@torch.no_grad()
def evaluate(model, X, Y, batch=65536):
    """Mean NLL (nats per character) over a whole split, in eval mode (running BatchNorm statistics)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(X), batch):
        total += torch.nn.functional.cross_entropy(model(X[i : i + batch]), Y[i : i + batch], reduction="sum").item()
    model.train(was_training)
    return total / len(X)


def train(model, splits_xy, tc, device="cpu", progress=True):
    """Minibatch training. Returns a history dict: per-step losses, periodic val losses, update:data ratios."""
    Xtr, Ytr = (t.to(device) for t in splits_xy["train"])
    Xva, Yva = (t.to(device) for t in splits_xy["val"])
    model.to(device).train()
    opt = make_optimizer(model, tc)
    weights = plots.weight_params(model)  # every 2-D weight: (name, parameter)
    g = torch.Generator(device=device).manual_seed(tc.seed)
    # The averaged copy smooths out the last steps' noise; its BatchNorm running statistics are averaged too.
    avg = EMA(model, ema_decay(tc)) if tc.ema else None
    evaluated = avg.module if avg else model
    hist = {"loss": [], "val": [], "ud": [], "ud_steps": [], "ud_names": [n for n, _ in weights]}
    bar = tqdm(range(tc.steps), disable=not progress, mininterval=1.0, desc="train", unit="step")
    for step in bar:
        lr = tc.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(0, len(Xtr), (tc.batch_size,), generator=g, device=device)
        loss = model.loss(Xtr[ix], Ytr[ix])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % tc.record_every == 0:
            before = [p.detach().clone() for _, p in weights]
        opt.step()
        if avg:
            avg.update(model)
        hist["loss"].append(loss.item())
        if step % tc.record_every == 0:
            # update:data = std of the actual change / std of the weights (log10; ~-3 is healthy)
            with torch.no_grad():
                hist["ud"].append([((p - b).std() / p.std()).log10().item() for (_, p), b in zip(weights, before)])
            hist["ud_steps"].append(step)
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            val = evaluate(evaluated, Xva, Yva)
            hist["val"].append((step + 1, val))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.4f}", lr=f"{lr:.2g}")
            if not progress:
                print(f"step {step + 1:7d}/{tc.steps}  loss {loss.item():.4f}  val {val:.4f}  lr {lr:.3g}")
    if avg:
        avg.apply()
    if tc.calibrate_bn:
        calibrate_batchnorm(model, Xtr)
    model.cpu().eval()
    return hist


@torch.no_grad()
def calibrate_batchnorm(model, X, batch=65536):
    """Set every BatchNorm's running mean/variance to its input's exact statistics over X, in eval mode.

    The running averages (momentum 0.1) mostly reflect the last few dozen minibatches, and with dropout
    they were collected with dropout on; the lecture calibrates on the whole training set instead.
    """
    model.eval()
    x = torch.cat([model.wte(X[i : i + batch]).flatten(1) for i in range(0, len(X), batch)])  # (M, block_size * n_embd)
    for module in model.hidden:
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(x.mean(0))
            module.running_var.copy_(x.var(0))  # unbiased, as BatchNorm stores it
        x = module(x)


def mark_samples(names, splits):
    where = {w: "train" for w in splits["train"]}
    where.update({w: "val/test" for w in splits["val"] + splits["test"]})
    return [(n, where.get(n, "new")) for n in names]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="word list, one per line (default: names.txt, checksum-verified)")
    p.add_argument("--preset", default="baseline", choices=sorted(PRESETS), help="model + recipe preset")
    p.add_argument("--out-dir", default="artifacts", help="where model.pt, metrics.json and plots/ go")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="training device")
    p.add_argument("--split-seed", type=int, default=42, help="seed of the 80/10/10 shuffle (lecture: 42)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = 1 for batches <= 64, else torch's default)")
    p.add_argument("--no-plots", action="store_true", help="skip the diagnostic figures")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    for i, (cls, what) in enumerate(((ModelConfig, "model"), (TrainConfig, "recipe"))):  # every field can be overridden
        for f in fields(cls):
            if f.name != "vocab_size":  # derived from the data
                kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
                if f.name in CHOICES:
                    kind["choices"] = CHOICES[f.name]
                by_preset = ", ".join(f"{k} {getattr(v[i], f.name)}" for k, v in PRESETS.items())
                p.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{what} ({by_preset})", **kind)
    args = p.parse_args(argv)

    try:
        data_path = resolve_data_path(args.data)
        words = load_words(data_path)
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device (this torch build or machine has none); use --device cpu")

    mc, tc = PRESETS[args.preset]
    vocab = Vocab.from_words(words)
    given = lambda cfg: {f.name: v for f in fields(cfg) if (v := getattr(args, f.name, None)) is not None}  # noqa: E731
    mc = replace(mc, **given(mc), vocab_size=vocab.size)
    tc = replace(tc, **given(tc))
    if (problem := config_error(mc, tc)) is not None:
        p.error(problem)
    if tc.ema and ema_decay(tc) != tc.ema:
        print(f"note: EMA decay {tc.ema:g} -> {ema_decay(tc):g}, a horizon of at most a tenth of {tc.steps} steps")
        tc = replace(tc, ema=ema_decay(tc))  # the recipe saved in the checkpoint is the one used
    if args.split_seed < 0:  # random.Random(-1) would shuffle as Random(1) does
        p.error(f"--split-seed must be >= 0, got {args.split_seed}")
    # Small batches gain nothing from a second thread (0.6 ms/step either way on 2 idle cores) and lose a
    # lot when the cores are shared; larger batches use torch's default.
    if not 0 <= args.threads <= 256:  # torch crashes on absurd counts (100,000: a segfault)
        p.error(f"--threads must be in [0, 256], got {args.threads}")
    threads = args.threads or (1 if tc.batch_size <= 64 else torch.get_num_threads())
    torch.set_num_threads(threads)
    try:
        splits = split_words(words, args.split_seed)
    except DataError as e:
        sys.exit(f"error: {data_path}: {e}")
    xy = {k: build_examples(v, vocab, mc.block_size) for k, v in splits.items()}
    torch.manual_seed(tc.seed)
    model = MLP(mc)
    print(f"data: {data_path} ({len(words)} words, vocab {vocab.size}: {vocab.itos!r})")
    print("split: " + ", ".join(f"{k} {len(v)} words / {len(xy[k][0])} examples" for k, v in splits.items()))
    print(f"model: {asdict(mc)} -> {model.num_params():,} parameters")
    print(f"recipe ({args.preset}): {asdict(tc)}  device={args.device} threads={torch.get_num_threads()}")

    out = Path(args.out_dir)
    try:  # before training: an unwritable output folder must not cost a whole run
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        sys.exit(f"error: --out-dir {out}: cannot write there ({e.strerror or e})")

    counts = bigram.bigram_counts(splits["train"], vocab)
    base = {k: bigram.bigram_nll(counts, splits[k], vocab) for k in ("train", "val", "test")}
    print("bigram baseline: " + "  ".join(f"{k} {v:.4f}" for k, v in base.items()))

    t0 = time.time()
    hist = train(model, xy, tc, device=args.device, progress=not args.no_progress)
    wall = time.time() - t0
    losses = {k: evaluate(model, *xy[k]) for k in ("train", "val", "test")}
    metrics = {
        **{f"{k}_loss": v for k, v in losses.items()},
        **{f"bigram_{k}_loss": v for k, v in base.items()},
        "steps": tc.steps,
        "train_seconds": round(wall, 2),
        "steps_per_second": round(tc.steps / wall, 1),
        "num_params": model.num_params(),
        "preset": args.preset,
        "data": str(data_path),
        "val_curve": hist["val"],
    }
    print(f"trained {tc.steps} steps in {wall:.1f}s ({tc.steps / wall:.0f} steps/s)")
    print("loss (nats/char): " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    if not all(map(math.isfinite, losses.values())):
        print("warning: the training diverged (a loss is NaN or infinite) and the export will refuse this "
              "checkpoint; train again with a lower --lr", file=sys.stderr)
    elif losses["val"] > base["val"]:
        print(f"warning: val loss {losses['val']:.4f} is worse than the bigram baseline's {base['val']:.4f}: "
              "too few steps, or a learning rate so high that training diverged (try a lower --lr)", file=sys.stderr)

    if not args.no_plots:
        # The lecture's learning-rate search on this architecture (a fresh model, 1,000 SGD steps).
        *sweep, metrics["suggested_lr"] = lr_sweep(mc, *xy["train"], seed=tc.seed)
        print(f"learning-rate sweep: suggested lr {metrics['suggested_lr']:.3g} (this recipe: {tc.optimizer} lr {tc.lr:g})")

    # The last run's metrics and plots go first (under --no-plots too): a run stopped from here on leaves
    # files missing, never another model's beside this one.
    for old in ["metrics.json", *(Path("plots") / name for name in plots.PLOTS)]:
        (out / old).unlink(missing_ok=True)
    save_checkpoint(out / "model.pt", model, vocab, words, args.split_seed, tc, metrics)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")

    # 20 samples, marked as makemore does. Uniforms from a fixed seed: the same names every run.
    g = torch.Generator().manual_seed(tc.seed)
    n, T = 20, 33
    tokens, _ = sample_reference(
        model, torch.zeros(n, mc.block_size, dtype=torch.long), torch.rand(n, T, generator=g),
        torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), torch.full((n,), T - 1),
    )
    print("samples:")
    for name, where in mark_samples(decode_tokens(tokens, vocab), splits):
        shown = name or '""'  # the model can end a name at once
        print(f"  {shown:<16} {where}")

    if not args.no_plots:
        pdir = out / "plots"
        pdir.mkdir(parents=True, exist_ok=True)
        Xtr, Ytr = xy["train"]
        ix = torch.randint(0, len(Xtr), (1024,), generator=torch.Generator().manual_seed(0))
        written = [
            bigram.plot_bigram(counts, vocab, pdir / "bigram_counts.png"),
            *plots.plot_activations(model, Xtr[ix], Ytr[ix], pdir),
            plots.plot_update_ratios(hist["ud"], hist["ud_names"], pdir / "update_data_ratio.png", steps=hist["ud_steps"]),
            plots.plot_init_comparison(mc, Xtr[ix], Ytr[ix], pdir / "init_comparison.png"),
            plots.plot_loss(hist["loss"], pdir / "loss.png", window=max(1, min(1000, tc.steps // 100)),
                            val=tuple(zip(*hist["val"]))),
        ]
        written.append(plots.plot_lr_sweep(*sweep, pdir / "lr_sweep.png", suggested=metrics["suggested_lr"]))
        print("plots: " + ", ".join(str(p) for p in written))
    return metrics


if __name__ == "__main__":
    cli(main)
