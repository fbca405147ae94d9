"""The torch reference generator: the same request semantics as service/engine.py, computed with torch.

Same seed -> the same uniform rows (service.params.uniform_stream, read in order) -> trainer.sampling.sample_reference (the spec).
"""
import numpy as np
import torch

from service.params import GenerateParams, uniform_stream
from trainer.sampling import decode_tokens, prefix_context, sample_reference, score_names


def reference_generate(model, vocab, params: GenerateParams, words=(), chunk=16384):
    """-> [(name, logprob)] for a request, exactly as the engine should serve it. model: MLP in eval mode."""
    params = params.validate(vocab.itos, max_samples=10**9)
    T, B = params.max_tokens + 1, model.cfg.block_size  # the characters, then the (forced) end token
    ctx = torch.tensor(prefix_context(params.prefix, vocab, B))
    prefix_lp = 0.0
    if params.prefix:  # log P(prefix) = score of prefix + '.' minus the end token's term
        prefix_lp = sum(score_names(model, [params.prefix], vocab, B)[0][1][:-1])
    words, out, rng = set(words), [], uniform_stream(params.seed)
    while len(out) < params.num_samples:
        n = min(chunk, params.num_samples - len(out)) if not params.only_new else chunk
        u = torch.from_numpy(rng.random((n, T), dtype=np.float32))
        tokens, lp = sample_reference(
            model, ctx.expand(n, B), u, torch.full((n,), params.temperature), torch.full((n,), params.top_k),
            torch.full((n,), params.top_p), torch.full((n,), params.max_tokens),
        )
        for name, l in zip(decode_tokens(tokens.numpy(), vocab, params.prefix), lp.tolist()):
            if not (params.only_new and name in words):
                out.append((name, l + prefix_lp))
    return out[: params.num_samples]
