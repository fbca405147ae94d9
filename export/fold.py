"""Fold every BatchNorm into the Linear before it, for inference.

In eval mode BatchNorm is an affine map per feature: y = (x - mean) / sqrt(var + eps) * gamma + beta.
After a Linear (x W^T) that is again a Linear: W' = W * s[:, None], b' = beta - mean * s, s = gamma / sqrt(var + eps).
"""
import copy
import math

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_linear_bn_eval


class FoldedMLP(nn.Module):
    """embedding -> flatten -> [Linear(with bias) -> tanh] x n_layers -> Linear; same logits as MLP.eval()."""

    def __init__(self, wte, linears, lm_head):
        super().__init__()
        self.wte = wte
        self.linears = nn.ModuleList(linears)
        self.lm_head = lm_head

    def forward(self, idx):
        x = self.wte(idx).flatten(1)  # (B, block_size * n_embd)
        for lin in self.linears:
            x = torch.tanh(lin(x))  # (B, n_hidden)
        return self.lm_head(x)  # (B, vocab_size)


@torch.no_grad()
def fold_batchnorm(model):
    """MLP (any mode) -> FoldedMLP using the running statistics. The input model is not modified."""
    was_training = model.training
    model.eval()  # fuse_linear_bn_eval asserts eval mode
    fused = [fuse_linear_bn_eval(lin, bn) for lin, bn in zip(model.linears(), model.batchnorms())]
    model.train(was_training)
    wte = nn.Embedding.from_pretrained(model.wte.weight.detach().clone(), freeze=True)
    return FoldedMLP(wte, fused, copy.deepcopy(model.lm_head)).eval()  # same dtype as the model


def fold_for_export(model):
    """The folded model the ONNX graphs are built from: folded in float64, since the sampler's exact path
    must match the float64 specification to ~1e-15 and float32 folding alone moves logits by ~1e-7."""
    return fold_batchnorm(float64_reference(model))


def float64_reference(model):
    """The unfolded eval model in float64: what the float32 graphs are checked against.

    Not the float32 model itself: with torch 2.13 on this machine, the first float32 forward of the model
    in a fresh process returned tanh outputs up to 9e-5 off for half of the rows (one thread's share) in 3
    runs of 10, which made the 1e-5 check fail at random; in float64, 0 of 12.
    """
    return copy.deepcopy(model).double().eval()


def folded_logit_error(model, folded, X):
    """Max |logit difference| over X between the folded model as the graphs run it (float32) and the
    unfolded eval model in float64: the export's fold check, and verify's "folded" figure."""
    return max_logit_diff(float64_reference(model), copy.deepcopy(folded).float(), X)


@torch.no_grad()
def max_logit_diff(a, b, X, batch=65536):
    """Max |a(X) - b(X)| over all rows of X (both models in eval mode); inf if any logit isn't finite
    (Python's max would pass a NaN over)."""
    worst = 0.0
    for i in range(0, len(X), batch):
        d = (a(X[i : i + batch]) - b(X[i : i + batch])).abs().max().item()
        if not math.isfinite(d):
            return math.inf
        worst = max(worst, d)
    return worst
