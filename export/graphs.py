"""ONNX building blocks, built node by node from the folded weights (not traced, so a graph is exactly
the documented algorithm and nothing else), and the logits model:

model.onnx: context int64 (N, block_size) -> logits float32 (N, vocab)

The sampler (sampler.onnx) is built from these in export/sampler_graph.py and export/sampler_step.py.
"""
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
FLOAT, DOUBLE, INT64, BOOL = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
INT32 = TensorProto.INT32


class Builder:
    """Collects nodes and initializers with unique names; `op` returns the output name(s)."""

    def __init__(self, prefix=""):
        self.nodes, self.inits, self.prefix, self.n = [], [], prefix, 0

    def name(self, hint):
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def const(self, value, hint="c", dtype=None):
        arr = np.asarray(value, dtype=dtype)
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type, inputs, outputs=1, hint=None, **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if len(outs) == 1 else outs


def add_forward(b, weights, ctx, transposed=False):
    """Nodes for logits = folded MLP(ctx). ctx: int64 (M, block_size) -> float32 (M, vocab), or (vocab, M)
    when transposed (W_head @ h^T: the sampler's layout, where per-row values broadcast along contiguous rows)."""
    return add_mlp(b, weights, embed(b, weights["wte"], ctx), transposed)


def embed(b, wte, ctx):
    """int64 (M, block_size) context -> its embeddings side by side, (M, block_size * n_embd) in wte's dtype."""
    emb = b.op("Gather", [wte, ctx], hint="emb")  # (M, block_size, n_embd)
    return b.op("Flatten", [emb], axis=1, hint="x")


def add_mlp(b, weights, x, transposed=False):
    """add_forward from the embedded context x (M, block_size * n_embd) on."""
    for i, (W, bias) in enumerate(weights["layers"]):
        h = b.op("Gemm", [x, W, bias], transB=1, hint=f"pre{i}")  # (M, n_hidden)
        x = b.op("Tanh", [h], hint=f"h{i}")
    if transposed:
        return b.op("Gemm", [weights["head_w"], x, weights["head_b_col"]], transB=1, hint="logits_t")  # (vocab, M)
    return b.op("Gemm", [x, weights["head_w"], weights["head_b"]], transB=1, hint="logits")  # (M, vocab)


def as_array(t, dtype=np.float32):
    """A weight tensor as numpy, rounded from float64 to dtype (every graph's weights are made so)."""
    return t.detach().cpu().double().numpy().astype(dtype)


def weight_inits(b, folded, transposed=False, dtype=np.float32, head_shift=0.0):
    """Register the folded model's tensors as initializers; returns their names. head_shift is subtracted
    from the output bias (in float64, before the cast), so the graph's logits are logits - head_shift."""
    arr = partial(as_array, dtype=dtype)
    bias = arr(folded.lm_head.bias - head_shift)
    return {
        "wte": b.const(arr(folded.wte.weight), "wte"),
        "layers": [(b.const(arr(l.weight), f"W{i}"), b.const(arr(l.bias), f"b{i}")) for i, l in enumerate(folded.linears)],
        "head_w": b.const(arr(folded.lm_head.weight), "head_w"),
        # (V, 1) bias for the transposed head, (V,) for the plain one
        "head_b_col" if transposed else "head_b": b.const(bias[:, None] if transposed else bias, "head_b"),
    }


def build_logits_model(folded, block_size, metadata):
    b = Builder()
    w = weight_inits(b, folded)
    b.op("Identity", [add_forward(b, w, "context")], outputs=["logits"])
    V = folded.lm_head.out_features
    graph = helper.make_graph(
        b.nodes, "namegen_logits",
        [helper.make_tensor_value_info("context", INT64, ["N", block_size])],
        [helper.make_tensor_value_info("logits", FLOAT, ["N", V])],
        b.inits,
    )
    return make_model(graph, metadata)


def logit_shift(folded, limit=60.0):
    """A constant c such that exp(logits - c) can neither overflow nor make every weight vanish in float32,
    for any context; None if no such c is provable for this model.

    The head reads tanh outputs in [-1, 1], so logit j lies in b_j +- ||W_j||_1 and the largest logit of any
    context lies in [max_j(b_j - ||W_j||_1), max_j(b_j + ||W_j||_1)]. c is that interval's midpoint; when
    its half-width is <= limit, the largest weight exp(max logit - c) lies in [e^-60, e^60], well inside
    float32. Then the unit-temperature fast path can skip the per-row max (4 nodes per step) and take
    w = exp(logits - c) straight from the head, whose bias carries -c. Weights relative to their sum are
    the same as with the max subtracted, so the tokens and margins are too; below e^-87 a weight rounds
    to 0 in float32, as it already could with the max subtracted, and the margin check covers it.
    """
    if not len(folded.linears):  # the head would read the raw embedding, which is unbounded
        return None
    W, b = folded.lm_head.weight.detach().double(), folded.lm_head.bias.detach().double()
    radius = W.abs().sum(dim=1)  # (V,)
    hi, lo = (b + radius).max().item(), (b - radius).max().item()
    return (hi + lo) / 2 if (hi - lo) / 2 <= limit else None


def make_model(graph, metadata):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="namegen")
    model.ir_version = 9  # what onnxruntime 1.2x+ reads; opset 18
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    return model
