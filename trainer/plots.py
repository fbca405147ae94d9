"""Diagnostic figures from makemore part 3 ("Activations & Gradients, BatchNorm").

Every function writes one PNG (dpi 100) and returns its path. What to look for:
  tanh activations      few saturated units (|t| > 0.97 kills the gradient through tanh)
  activation gradients  similar spread in every layer (no vanishing / exploding with depth)
  grad:data ratio       per weight, gradients small relative to the values (~1e-3..1e-2)
  update:data ratio     log10(update std / data std) near -3 while training
"""
import dataclasses
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.files import replacing  # noqa: E402
from trainer.model import MLP  # noqa: E402

SATURATION = 0.97  # |tanh| above this counts as saturated (local gradient 1 - t^2 < 0.06)
DPI = 100
# The files a training run writes under OUT_DIR/plots (trainer/train.py), in the order it writes them.
PLOTS = ("bigram_counts.png", "tanh_activations.png", "activation_gradients.png", "grad_data_ratio.png",
         "update_data_ratio.png", "init_comparison.png", "loss.png", "lr_sweep.png")


# ---------------------------------------------------------------- helpers


def saturation(t):
    """Share of tanh outputs with |t| > SATURATION."""
    return (t.abs() > SATURATION).float().mean().item()


def weight_params(model):
    """(name, parameter) of every 2-D weight: embedding, hidden Linear weights, lm_head weight."""
    return [(n, p) for n, p in model.named_parameters() if p.ndim == 2]


def moving_average(values, k):
    """Centered mean over k neighbours (the window shrinks at the edges); same length as values."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    k = max(1, int(k))
    c = np.concatenate([[0.0], np.cumsum(v)])  # (n + 1,) prefix sums
    i = np.arange(n)
    lo = np.clip(i - k // 2, 0, n)
    hi = np.clip(i + k - k // 2, 0, n)
    return (c[hi] - c[lo]) / (hi - lo)


SWEEP_SMOOTH = 0.05  # moving-average window of the learning-rate sweep, as a fraction of its steps


def smooth_sweep(losses, frac=SWEEP_SMOOTH):
    """The lr sweep's losses smoothed: the curve that lr_sweep.suggest_lr and the plot both read."""
    return moving_average(losses, max(1, round(len(losses) * frac)))


def _hist_line(ax, t, label, bins=50):
    """Line histogram (density) of a tensor, like the lecture's plt.plot(hx[:-1], hy)."""
    hy, hx = torch.histogram(t.detach().float().flatten(), bins=bins, density=True)
    centers = (hx[:-1] + hx[1:]) / 2  # (bins,)
    ax.plot(centers.numpy(), hy.numpy(), label=label)


def save_figure(fig, path):
    """Lay the figure out, write it whole or not at all (data.files.replacing), close it. -> path"""
    path = Path(path)
    fig.tight_layout()
    with replacing(path) as tmp:  # an interrupted write leaves no truncated PNG
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    return path


def _new_axes(title, xlabel, ylabel, figsize=(12, 5)):
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


# ---------------------------------------------------------------- activations and gradients


def _forward_backward(model, X, Y):
    """One train-mode forward/backward; returns the tanh outputs (each (B, n_hidden), .grad set) and the
    2-D weight gradients. Leaves parameter grads and BatchNorm running stats as it found them."""
    outs = []

    def keep(_module, _inputs, out):
        out.retain_grad()  # non-leaf tensors drop .grad unless asked
        outs.append(out)

    bn_state = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in model.batchnorms()]
    hooks = [m.register_forward_hook(keep) for m in model.tanhs()]
    try:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), Y).backward()
        grads = [(n, p.detach().clone(), p.grad.clone()) for n, p in weight_params(model)]
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        # A train-mode forward moves the running mean/var; restore them so plotting doesn't alter the model.
        for bn, state in zip(model.batchnorms(), bn_state):
            bn.load_state_dict(state)
    return outs, grads


def plot_activations(model, X, Y, out_dir):
    """X (B, block_size) int64, Y (B,) int64 -> [tanh_activations.png, activation_gradients.png,
    grad_data_ratio.png] in out_dir. Does not step; the model's mode, grads and BN stats are restored."""
    out_dir = Path(out_dir)
    was_training = model.training
    model.train()  # batch statistics, as during training
    try:
        outs, grads = _forward_backward(model, X, Y)
    finally:
        model.train(was_training)

    fig, ax = _new_axes("activation distribution (tanh outputs)", "tanh output", "density")
    for i, t in enumerate(outs):
        label = f"layer {i} (Tanh): mean {t.mean():+.2f}, std {t.std():.2f}, saturated {100 * saturation(t):.2f}%"
        _hist_line(ax, t, label)
    ax.legend()
    paths = [save_figure(fig, out_dir / "tanh_activations.png")]

    fig, ax = _new_axes("gradient distribution (at tanh outputs)", "gradient", "density")
    for i, t in enumerate(outs):
        g = t.grad  # (B, n_hidden)
        _hist_line(ax, g, f"layer {i} (Tanh): mean {g.mean():+.2e}, std {g.std():.2e}")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "activation_gradients.png"))

    fig, ax = _new_axes("weight gradient distribution", "gradient", "density")
    for name, p, g in grads:
        ratio = (g.std() / p.std()).item()
        _hist_line(ax, g, f"{name} {tuple(p.shape)}: grad:data ratio = {ratio:.2e}")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "grad_data_ratio.png"))
    return paths


def plot_update_ratios(history, names, path, steps=None):
    """history: one row per recorded step of log10(update std / data std), one value per name."""
    h = np.asarray(history, dtype=np.float64).reshape(len(history), len(names))  # (T, n_weights)
    x = np.arange(len(h)) if steps is None else np.asarray(steps)
    fig, ax = _new_axes("update:data ratio (log10)", "step" if steps is not None else "recorded step",
                        "log10(update std / data std)")
    for j, name in enumerate(names):
        ax.plot(x, h[:, j], label=name)
    ax.axhline(-3, color="k", linestyle="--", label="1e-3 guide")
    ax.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------- initialisation


@torch.no_grad()
def init_stats(cfg, X, Y, init, seed=42):
    """A fresh MLP(cfg, init) -> dict(loss=initial loss of the full model (BN, batch stats),
    saturation=[per layer share], tanh=[per layer (B, n_hidden)]) where the per-layer tanh outputs
    come from a forward WITHOUT BatchNorm: BN renormalises every layer and so hides a bad init."""
    with torch.random.fork_rng(devices=[]):  # fixed seed without touching the caller's RNG
        torch.manual_seed(seed)
        model = MLP(cfg, init=init)
    model.train()
    loss = model.loss(X, Y).item()
    x = model.wte(X).flatten(1)  # (B, block_size * n_embd)
    tanh = []
    for lin in model.linears():
        x = torch.tanh(lin(x))  # (B, n_hidden), BatchNorm skipped on purpose
        tanh.append(x)
    return {"loss": loss, "saturation": [saturation(t) for t in tanh], "tanh": tanh}


def plot_init_comparison(cfg, X, Y, path):
    """Naive N(0, 1) vs Kaiming init side by side, on a stack of at least 4 layers."""
    cfg_deep = dataclasses.replace(cfg, n_layers=max(cfg.n_layers, 4))
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5))
    for ax, init in zip(axes, ("naive", "kaiming")):
        s = init_stats(cfg_deep, X, Y, init)
        for i, (t, sat) in enumerate(zip(s["tanh"], s["saturation"])):
            _hist_line(ax, t, f"layer {i}: std {t.std():.2f}, saturated {100 * sat:.1f}%")
        mean_sat = 100 * sum(s["saturation"]) / len(s["saturation"])
        ax.set_title(f"{init} init: initial loss {s['loss']:.2f} (uniform {math.log(cfg.vocab_size):.2f}), "
                     f"mean saturation {mean_sat:.1f}%")
        ax.set_xlabel("tanh output (forward without BatchNorm)")
        ax.set_ylabel("density")
        ax.legend()
    fig.suptitle(f"tanh activations at initialisation ({cfg_deep.n_layers} layers x {cfg_deep.n_hidden})")
    return save_figure(fig, path)


# ---------------------------------------------------------------- training curves


def plot_loss(steps_losses, path, window=1000, val=None):
    """steps_losses: training loss of every step (index = step). Plots log10 loss averaged over windows
    of `window` steps (the last window may be shorter); val=(steps, mean NLLs) as a second series."""
    logs = np.log10(np.asarray(steps_losses, dtype=np.float64))  # (n,)
    n = len(logs)
    window = max(1, min(window, n))
    starts = np.arange(0, n, window)
    means = [logs[s:s + window].mean() for s in starts]
    centers = [s + (min(s + window, n) - s) / 2 for s in starts]  # plot each mean mid-window
    fig, ax = _new_axes("training loss", "step", "log10 loss")
    ax.plot(centers, means, label=f"train (mean over {window} steps)")
    if val:  # None or () (no val points yet) draws the train curve alone
        vsteps, vloss = val
        ax.plot(vsteps, np.log10(np.asarray(vloss, dtype=np.float64)), "o-", label="val (mean NLL)")
    ax.legend()
    return save_figure(fig, path)


def plot_lr_sweep(lrs, losses, path, suggested=None):
    """Minibatch loss vs log10(lr) of an exponential sweep: raw points light, smoothed curve on top."""
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    smooth = smooth_sweep(y)
    fig, ax = _new_axes("learning-rate sweep (one SGD step per lr)", "log10(learning rate)", "minibatch loss",
                        figsize=(10, 5.5))
    ax.plot(x, y, ".", alpha=0.25, color="tab:blue", label="minibatch loss")
    ax.plot(x, smooth, color="tab:blue", linewidth=2, label="smoothed")
    best = int(np.argmin(smooth))
    ax.plot(x[best], smooth[best], "o", color="tab:red", label=f"smoothed minimum at lr = {10 ** x[best]:.3g}")
    if suggested is not None:
        ax.axvline(math.log10(suggested), color="tab:green", linestyle="--",
                   label=f"suggested lr = {suggested:.3g}")
    ax.set_ylim(min(y.min(), smooth.min()) * 0.95, min(y.max(), 2 * smooth.max()) * 1.02)
    ax.legend()
    return save_figure(fig, path)
