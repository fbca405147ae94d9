"""The bigram baseline (makemore part 1): next-character counts given the previous character.

Any model worth training has to beat its val NLL (about 2.45 nats/char on names.txt).
"""
import math

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from data.names import END  # noqa: E402
from trainer.plots import save_figure  # noqa: E402


def _pairs(words, vocab):
    """Yield (prev, next) index pairs of every word wrapped in start/end tokens (len(w) + 1 per word)."""
    stoi = vocab.stoi
    for w in words:
        ids = [stoi[c] for c in END + w + END]
        yield from zip(ids, ids[1:])


def bigram_counts(words, vocab):
    """(V, V) int64 counts N[prev, next]; row 0 holds the first characters (start token '.')."""
    V = vocab.size
    pairs = torch.tensor(list(_pairs(words, vocab)), dtype=torch.long).view(-1, 2)  # (M, 2)
    flat = pairs[:, 0] * V + pairs[:, 1]  # (M,) index into the flattened (V, V) table
    return torch.bincount(flat, minlength=V * V).view(V, V)


def bigram_probs(counts, smoothing=1.0):
    """(V, V) float64 row-normalised probabilities after adding `smoothing` to every count.

    Smoothing keeps unseen pairs (e.g. 'jq') at a finite loss instead of log(0) = -inf.
    """
    P = counts.double() + smoothing  # (V, V)
    return P / P.sum(dim=1, keepdim=True)


def bigram_nll(counts, words, vocab, smoothing=1.0):
    """Mean negative log-likelihood (nats per character, end token included) of `words`."""
    logP = bigram_probs(counts, smoothing).log()  # (V, V)
    pairs = torch.tensor(list(_pairs(words, vocab)), dtype=torch.long).view(-1, 2)  # (M, 2)
    if len(pairs) == 0:
        return math.nan
    return -logP[pairs[:, 0], pairs[:, 1]].mean().item()


def plot_bigram(counts, vocab, path):
    """The lecture's 27x27 frequency map: each cell shows its pair (e.g. 'ab') and its count."""
    itos = vocab.itos
    V = counts.shape[0]
    fig, ax = plt.subplots(figsize=(16, 16))
    ax.imshow(counts.numpy(), cmap="Blues")
    vmax = counts.max().item()
    for i in range(V):
        for j in range(V):
            n = counts[i, j].item()
            # White text on the darkest cells keeps the labels legible.
            color = "white" if n > 0.6 * vmax else "gray"
            ax.text(j, i, itos[i] + itos[j], ha="center", va="bottom", color=color, fontsize=8)
            ax.text(j, i, str(n), ha="center", va="top", color=color, fontsize=7)
    ax.set_xticks(range(V), list(itos), fontsize=9)
    ax.set_yticks(range(V), list(itos), fontsize=9)
    ax.set_xlabel("next character", fontsize=12)
    ax.set_ylabel("previous character", fontsize=12)
    total = counts.sum().item()
    ax.set_title(f"bigram counts ({total:,} pairs; '.' = start/end token)", fontsize=14)
    return save_figure(fig, path)
