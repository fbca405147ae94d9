"""The sampling algorithm, defined once. This torch code is the specification; export/sampler_graph.py compiles
exactly these steps into one ONNX graph, and tests check that the two give identical tokens.

Per row and step, in float64:
  logits  = model(context)                                   # (N, V)
  s       = logits - max(logits);  d = s / temperature;  w = exp(d)   # unnormalised weights, max 1
  top-k   : keep tokens with d >= the k-th largest d          (k = 0 keeps all; k > V acts as V)
  top-p   : with p = w / sum(w), keep tokens with p >= the smallest p of the nucleus, the fewest most
            likely tokens whose mass reaches top_p (the most likely token is always kept; top_p = 1 keeps all)
  token   = inverse CDF on the supplied uniform u in [0, 1): the count of entries of cdf = cumsum(w) that are
            <= u * (1 - 2^-23) * cdf[-1] (the factor keeps this below cdf[-1] even after rounding, so the
            token always has w > 0, and leading zero weights are skipped at u = 0)
  logprob += s[token] - log(sum(exp(s)))                     # the model's own log P (T = 1, unfiltered)
A row stops after emitting the end token (0). At step max_tokens the end token is forced (u = -1 gives token 0),
so a name is cut at max_tokens characters and its logprob always equals the score of the returned name;
positions after the end hold 0. uniforms needs max_tokens + 1 columns for the forced end to fit.
Filters select by thresholds, not sorted positions, so ties and sort order can't make torch and ONNX differ.

Why float64: torch and ONNX Runtime round float32 matrix products differently (~1e-7), and a uniform that
close to a CDF boundary picks another token (about one name in 20,000). The compiled sampler runs every row in
float32, checks in float64 each step whose uniform (or a filter's threshold) came near a boundary, and samples
again in float64 the rows where that check disagrees (export/sampler_graph.py), so it matches this float64
definition exactly.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F


def sampling_weights(logits, temperature):
    """(N, V) logits, (N,) temperature -> s = logits - max, d = s / temperature, w = exp(d); all (N, V)."""
    s = logits - logits.max(dim=1, keepdim=True).values
    d = s / temperature[:, None]
    return s, d, torch.exp(d)


def filter_weights(d, w, top_k, top_p):
    """Zero the weights of tokens outside top-k and then outside the top-p nucleus. (N, V) -> (N, V)."""
    V = d.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))  # 0 = all = the V-th largest
    kth = torch.sort(d, dim=1, descending=True).values.gather(1, (k - 1)[:, None])  # (N, 1)
    w = torch.where(d >= kth, w, torch.zeros_like(w))
    p = w / w.sum(dim=1, keepdim=True)  # (N, V)
    ps = torch.sort(p, dim=1, descending=True).values
    before = torch.cumsum(ps, dim=1) - ps  # mass of the more likely tokens
    top_p = torch.where(top_p < 1, top_p, torch.full_like(top_p, 2.0))  # >= 1: every token is inside
    pmin = torch.where(before < top_p[:, None], ps, torch.ones_like(ps)).min(dim=1, keepdim=True).values  # (N, 1)
    return torch.where(p >= pmin, w, torch.zeros_like(w))


def inverse_cdf(w, u):
    """(N, V) weights (any scale), (N,) uniforms in [0, 1) -> (N,) int64 token ids."""
    cdf = torch.cumsum(w, dim=1)  # (N, V)
    x = (u * (1 - 2**-23))[:, None] * cdf[:, -1:]  # (N, 1), < cdf[-1] even for the largest float32 u
    return (cdf <= x).sum(dim=1)


@torch.no_grad()
def sample_reference(model, context, uniforms, temperature, top_k, top_p, max_tokens):
    """The reference sampler (a batched torch loop over all T steps).

    context (N, block_size) int64; uniforms (N, T) float32; temperature, top_p (N,) float32;
    top_k, max_tokens (N,) int64, max_tokens < T. Returns tokens (N, T) int64, logprob (N,) float32.
    The model must be in eval mode (running BatchNorm statistics); it runs in float64 here.
    """
    N, T = uniforms.shape
    model = copy.deepcopy(model).double()
    forced = torch.arange(T)[None, :] >= max_tokens[:, None]  # (N, T): the end token from column max_tokens on
    uniforms = torch.where(forced, -1.0, uniforms.double())
    temperature, top_p = temperature.double(), top_p.double()
    tokens = torch.zeros(N, T, dtype=torch.long)
    logprob = torch.zeros(N, dtype=torch.float64)
    active = torch.ones(N, dtype=torch.bool)
    ctx = context.clone()
    filtering = bool((top_k > 0).any() or (top_p < 1).any())  # only an optimisation: k=0, p=1 filter nothing
    for t in range(T):
        if not active.any():
            break
        logits = model(ctx)  # (N, V)
        s, d, w = sampling_weights(logits, temperature)
        if filtering:
            w = filter_weights(d, w, top_k, top_p)
        tok = inverse_cdf(w, uniforms[:, t])
        tok = torch.where(active, tok, torch.zeros_like(tok))
        lp = s.gather(1, tok[:, None])[:, 0] - torch.log(torch.exp(s).sum(dim=1))
        logprob += torch.where(active, lp, torch.zeros_like(lp))
        tokens[:, t] = tok
        active &= tok != 0
        ctx = torch.cat([ctx[:, 1:], tok[:, None]], dim=1)
    return tokens, logprob.float()


def decode_tokens(tokens, vocab, prefix=""):
    """(N, T) token ids -> names: prefix + characters up to the first end token."""
    itos = vocab.itos
    names = []
    for row in np.asarray(tokens):
        (end,) = np.nonzero(row == 0)
        n = end[0] if len(end) else len(row)
        names.append(prefix + "".join(itos[i] for i in row[:n]))
    return names


def prefix_context(prefix, vocab, block_size):
    """The starting context for names that begin with prefix: (block_size,) ids, padded with end tokens."""
    ids = [0] * block_size + vocab.encode(prefix)
    return ids[len(ids) - block_size :]


@torch.no_grad()
def score_names(model, names, vocab, block_size):
    """Log-probability of each name under the model, end token included: list of (total, per_char list)."""
    from trainer.dataset import build_examples

    X, Y = build_examples(names, vocab, block_size)  # (M, block_size), (M,)
    lp = F.log_softmax(model(X), dim=1).gather(1, Y[:, None])[:, 0].tolist()
    out, i = [], 0
    for w in names:
        per = lp[i : i + len(w) + 1]
        i += len(w) + 1
        out.append((sum(per), per))
    return out
