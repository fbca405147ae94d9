"""Train the BatchNorm MLP on a word list, evaluate it, draw the diagnostics, and save the checkpoint.

    python -m trainer.train                    # the lecture's recipe (val ~2.10 in a few minutes on CPU)
    python -m trainer.train --preset better    # wider/deeper, longer context, AdamW + cosine
"""
import argparse
import copy
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm import tqdm

from data.files import cli, write_text
from data.names import DataError, load_words, resolve_data_path
from trainer import bigram, plots
from trainer.checkpoint import save_checkpoint
from trainer.lr_sweep import lr_sweep
from trainer.dataset import Vocab, build_examples, split_words
from trainer.model import MLP, ModelConfig, run_problem
from trainer.sampling import decode_tokens, sample_reference


@dataclass
class TrainConfig:
    steps: int = 200_000
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    schedule: str = "step"  # step: lr, then lr_final from decay_at * steps on | cosine: lr -> lr_final
    lr_final: float = 0.01
    decay_at: float = 0.75  # 0.1 for 150k steps, then 0.01 for the last 50k
    warmup: int = 0  # linear warm-up steps (cosine schedule)
    weight_decay: float = 0.0
    ema: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights (and BN buffers)
    calibrate_bn: bool = True  # at the end, set BatchNorm statistics from the whole training set (eval mode)
    seed: int = 42  # init and minibatch order
    eval_every: int = 10_000
    record_every: int = 100  # update:data ratio sampling

    def lr_at(self, step):
        if self.schedule == "step":
            return self.lr if step < self.decay_at * self.steps else self.lr_final
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * frac))


# The "better" preset stays in the BatchNorm MLP family so it exports and serves through the same pipeline.
PRESETS = {
    # The lecture's recipe, evaluated as an EMA of the weights: batch-32 SGD ends noisy even at lr 0.01, and
    # averaging the last ~10k steps measured val 2.1010 / 2.1005 (seeds 42 / 1) against 2.1055 without.
    "baseline": (ModelConfig(), TrainConfig(ema=0.9999)),
    # Longer context, wider, 2 layers; AdamW + cosine; dropout after each tanh and an EMA of the weights
    # against overfitting (this much model memorises 25k names: train 1.68 vs val 2.00 without them).
    # No BN calibration here: with dropout + EMA it measured worse (45k steps: val 1.9702 with, 1.9680 without).
    # 55k steps: seeds 42 / 1 / 2 gave val 1.9676 / 1.9678 / 1.9674, against 1.9680 / 1.9711 / 1.9729 at 45k.
    "better": (
        ModelConfig(block_size=8, n_embd=32, n_hidden=384, n_layers=2, dropout=0.2),
        TrainConfig(steps=55_000, batch_size=128, optimizer="adamw", lr=3e-3, schedule="cosine",
                    lr_final=3e-5, warmup=500, weight_decay=0.1, ema=0.999, calibrate_bn=False, eval_every=5_000),
    ),
    "tiny": (  # for tests: seconds, still beats the bigram baseline
        ModelConfig(n_hidden=64),
        TrainConfig(steps=3_000, batch_size=64, lr=0.1, lr_final=0.01, eval_every=1_000, record_every=50),
    ),
}


class EMA:
    """An exponential moving average of a model's weights and floating buffers (BatchNorm statistics), as
    torch.optim.swa_utils.AveragedModel(use_buffers=True) keeps it, with the same update function. This
    version keeps the tensor lists instead of regrouping them every step: 15 us per update against 276 us
    for the 12k-parameter baseline, which was 55 s of its 200k steps."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model)
        self._update = get_ema_multi_avg_fn(decay)
        self.updates = 0
        floats = lambda m: [t.detach() for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point()]  # noqa: E731
        self._dst, self._src = floats(self.module), floats(model)

    def update(self, model):
        if self.updates == 0:  # the average starts at the weights after the first step
            torch._foreach_copy_(self._dst, self._src)
        else:
            self._update(self._dst, self._src, None)
        self.updates += 1

    def apply(self):
        """Give the source model the averaged values (its integer step counters stay its own)."""
        torch._foreach_copy_(self._src, self._dst)


def ema_decay(tc):
    """The recipe's EMA decay with its horizon, 1 / (1 - decay) steps, kept to a tenth of the run: a
    1,000-step run with the baseline's 0.9999 would otherwise save mostly its initial weights (val 3.16,
    worse than the bigram)."""
    return max(0.0, min(tc.ema, 1 - 10 / tc.steps))


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


def make_optimizer(model, tc):
    if tc.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    # Decay only the matrices: embedding, Linear weights; never BatchNorm gains/shifts or biases.
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.99))


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


CHOICES = {"optimizer": ("sgd", "adamw"), "schedule": ("step", "cosine")}


def config_error(mc, tc):
    """The first problem with a model config and recipe (flags override them), as a message, or None."""
    if (problem := mc.problem()) is not None:
        return problem
    for name, v in {"steps": tc.steps, "eval_every": tc.eval_every, "record_every": tc.record_every}.items():
        if v < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {v}"
    if (problem := run_problem(tc.batch_size, tc.seed)) is not None:
        return problem
    ranges = {
        "lr": (tc.lr, "> 0", lambda x: 0 < x < math.inf),
        "lr_final": (tc.lr_final, ">= 0", lambda x: 0 <= x < math.inf),
        "decay_at": (tc.decay_at, "in [0, 1]", lambda x: 0 <= x <= 1),
        "warmup": (tc.warmup, ">= 0", lambda x: x >= 0),
        "weight_decay": (tc.weight_decay, ">= 0", lambda x: 0 <= x < math.inf),
        "ema": (tc.ema, "in [0, 1)", lambda x: 0 <= x < 1),
    }
    for name, (v, want, ok) in ranges.items():
        if not ok(v):  # NaN fails every comparison, so it lands here too
            return f"--{name.replace('_', '-')} must be {want}, got {v}"
    return None


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
