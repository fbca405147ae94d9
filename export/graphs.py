"""ONNX graphs built node by node from the folded weights.

model.onnx:   context int64 (N, block_size) -> logits float32 (N, vocab)
sampler.onnx: the whole autoregressive loop of trainer/sampling.py in Loop nodes, so a batch of names is one
              session run. Every row runs in float32 (the fast path); every step whose uniform came within
              MARGIN of a CDF boundary (or whose top-k / top-p choice came that close, see _filter32) is
              decided again in float64 (_check_stage), and a row where float64 picks another token is
              sampled again in float64 (_exact_stage), so the result equals the float64 specification: in
              float32, torch and ONNX Runtime round matrix products differently (~1e-7) and about one name
              in 20,000 would differ. Finished rows are compacted out every step, so a batch costs about
              N x the mean name length in row-steps.
Built by hand (not traced) so the graph is exactly the documented algorithm and nothing else.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
FLOAT, DOUBLE, INT64, BOOL = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL


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
    emb = b.op("Gather", [weights["wte"], ctx], hint="emb")  # (M, block_size, n_embd)
    x = b.op("Flatten", [emb], axis=1, hint="x")  # (M, block_size * n_embd)
    for i, (W, bias) in enumerate(weights["layers"]):
        h = b.op("Gemm", [x, W, bias], transB=1, hint=f"pre{i}")  # (M, n_hidden)
        x = b.op("Tanh", [h], hint=f"h{i}")
    if transposed:
        return b.op("Gemm", [weights["head_w"], x, weights["head_b_col"]], transB=1, hint="logits_t")  # (vocab, M)
    return b.op("Gemm", [x, weights["head_w"], weights["head_b"]], transB=1, hint="logits")  # (M, vocab)


def weight_inits(b, folded, transposed=False, dtype=np.float32, head_shift=0.0):
    """Register the folded model's tensors as initializers; returns their names. head_shift is subtracted
    from the output bias (in float64, before the cast), so the graph's logits are logits - head_shift."""
    f32 = lambda t: t.detach().cpu().double().numpy().astype(dtype)  # noqa: E731
    bias = f32(folded.lm_head.bias - head_shift)
    return {
        "wte": b.const(f32(folded.wte.weight), "wte"),
        "layers": [(b.const(f32(l.weight), f"W{i}"), b.const(f32(l.bias), f"b{i}")) for i, l in enumerate(folded.linears)],
        "head_w": b.const(f32(folded.lm_head.weight), "head_w"),
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
    return _model(graph, metadata)


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


# Fast rows whose uniform came this close (times temperature) to a CDF boundary are redone in float64.
# float32 vs float64 normalised-CDF differences are ~1e-6 / temperature (at most 1.35e-6 over every context
# in the data, temperatures 0.3-2), so this is a 75-100x safety factor; it sends ~1 name in 25 of the fast
# path to the exact path.
MARGIN = 1e-4


def _filter(b, d, w, V, tag):
    """Zero the weights outside top-k, then outside the top-p nucleus (sampling.filter_weights).

    d, w: (V, M) float64 scaled logits and weights; tag: which per-row settings to read (see _sampling_body).
    Works in (M, V) because TopK sorts along the last axis.
    """
    zero = b.const(np.array(0.0, np.float64))
    ax1 = b.const([1], dtype=np.int64)
    d, w = b.op("Transpose", [d], perm=[1, 0]), b.op("Transpose", [w], perm=[1, 0])  # (M, V)
    kidx, topp = b.op("Gather", [f"kidx{tag}_n1", "rows_in"]), b.op("Gather", [f"topp{tag}_n1", "rows_in"])  # (M, 1)
    ds = b.op("TopK", [d, b.const([V], dtype=np.int64)], outputs=2, axis=1, largest=1, sorted=1)[0]  # (M, V) sorted
    kth = b.op("GatherElements", [ds, kidx], axis=1)  # (M, 1): the k-th largest (the smallest when top_k = 0)
    w = b.op("Where", [b.op("GreaterOrEqual", [d, kth]), w, zero])
    p = b.op("Div", [w, b.op("ReduceSum", [w, ax1], keepdims=1)])  # (M, V)
    ps = b.op("TopK", [p, b.const([V], dtype=np.int64)], outputs=2, axis=1, largest=1, sorted=1)[0]
    before = b.op("Sub", [b.op("CumSum", [ps, b.const(np.array(1, np.int64))]), ps])  # mass of more likely tokens
    inside = b.op("Where", [b.op("Less", [before, topp]), ps, b.const(np.array(1.0, np.float64))])
    pmin = b.op("ReduceMin", [inside, ax1], keepdims=1)  # (M, 1) nucleus threshold
    w = b.op("Where", [b.op("GreaterOrEqual", [p, pmin]), w, zero])
    return b.op("Transpose", [w], perm=[1, 0])  # (V, M)


def _filter32(b, s, wt, temp, V, top_p):
    """Fast-path top-k and top-p (sampling.filter_weights) in float32, with the margins that tell when
    float32 could keep another set of tokens than float64.

    s, wt: (V, M) float32 logits - max and weights exp(s / temperature); temp: (1, M).
    Both filters keep the tokens whose s reaches a threshold: the k-th largest s, and the s of the least
    likely nucleus token (p is increasing in s, so p >= pmin is s >= its s; exact p ties are caught below).
    Margins, any under MARGIN sends the row to the exact path:
    - top-k: the gap between the k-th and (k+1)-th largest s;
    - top-p: how close any sorted token's preceding mass came to top_p (where membership is decided),
      times the temperature as for the CDF margin; and the gap between the s of the nucleus's least
      likely token and the next s (a near-tie in p just outside it is a near-tie in s).
      At top_p 0.9 this rechecks ~1 name in 11 (some step's nucleus boundary falls that close).
    Rows without top-p (top_p 2) have preceding masses <= 1, a distance >= 1 from it: never thin.
    top_p=False: top-k only (a run where no row asks for top-p skips the nucleus's ~20 nodes).
    -> weights (V, M), margin (1, M).
    """
    zero, inf = b.const(np.array(0.0, np.float32)), b.const(np.array(np.inf, np.float32))
    last, one_i = b.const(np.array(V - 1, np.int64)), b.const(np.array(1, np.int64))
    kidx = b.op("Gather", ["kidx32_n1", "rows_in"])  # (M, 1): k - 1, V - 1 without top-k
    ss = b.op("TopK", [b.op("Transpose", [s], perm=[1, 0]), b.const([V], dtype=np.int64)],
              outputs=2, axis=1, largest=1, sorted=1)[0]  # (M, V) sorted, descending
    kth = b.op("GatherElements", [ss, kidx], axis=1)  # (M, 1)
    nxt = b.op("GatherElements", [ss, b.op("Min", [b.op("Add", [kidx, one_i]), last])], axis=1)
    kgap = b.op("Where", [b.op("Less", [kidx, last]), b.op("Sub", [kth, nxt]), inf])  # (M, 1); inf: nothing cut
    thr, margin = kth, kgap  # (M, 1)
    if top_p:  # the nucleus, over the sorted weights: wt's exp(s / temperature) values, zero outside top-k
        ax1 = b.const([1], dtype=np.int64)
        kept = b.op("GreaterOrEqual", [ss, kth])
        tcol = b.op("Transpose", [temp], perm=[1, 0])  # (M, 1)
        ws = b.op("Where", [kept, b.op("Exp", [b.op("Div", [ss, tcol])]), zero])  # (M, V)
        ps = b.op("Div", [ws, b.op("ReduceSum", [ws, ax1], keepdims=1)])
        before = b.op("Sub", [b.op("CumSum", [ps, b.const(np.array(1, np.int64))]), ps])  # mass of more likely tokens
        topp = b.op("Gather", ["topp32_n1", "rows_in"])  # (M, 1); 2 without top-p
        inside = b.op("Cast", [b.op("Less", [before, topp])], to=INT64)
        n_in = b.op("ReduceSum", [inside, ax1], keepdims=1)  # (M, 1) >= 1: the first token is always inside
        s_min = b.op("GatherElements", [ss, b.op("Sub", [n_in, one_i])], axis=1)  # s of the least likely nucleus token
        s_out = b.op("GatherElements", [ss, b.op("Min", [n_in, last])], axis=1)  # s of the most likely token outside
        sgap = b.op("Where", [b.op("Less", [n_in, b.const(np.array(V, np.int64))]), b.op("Sub", [s_min, s_out]), inf])
        near = b.op("ReduceMin", [b.op("Abs", [b.op("Sub", [before, topp])]), ax1], keepdims=1)
        margin = b.op("Min", [kgap, sgap, b.op("Mul", [near, tcol])])  # mass errors scale with 1 / temperature
        thr = b.op("Max", [kth, s_min])
    thr = b.op("Transpose", [thr], perm=[1, 0])  # (1, M)
    return b.op("Where", [b.op("GreaterOrEqual", [s, thr]), wt, zero]), b.op("Transpose", [margin], perm=[1, 0])


def _sampling_body(folded, V, exact, unit_temperature=False, filtered=False, shift=None, top_p=True, tag=None):
    """Loop body: one sampling step for the M still-active rows (trainer/sampling.py, step by step).

    exact=False: the fast path: float32, top-k/top-p when filtered, and each row's margin (how far u * total
    was from the boundaries of the chosen token's CDF interval, relative to total and times the temperature;
    when filtered, at most the filters' margins, see _filter32).
    exact=True: float64, with top-k/top-p when filtered. top_p=False: the fast filtered body does top-k only.
    unit_temperature: every row has temperature 1, so d = s and log(sum(exp(s))) = log(cdf[-1]): two fewer
    passes over (V, M); with a `shift` (logit_shift), the fast path also takes s = logits - shift instead
    of logits - max: four fewer nodes.
    Layout (V, M): a per-row value is a (1, M) row that broadcasts along contiguous memory. Reads per-row
    settings shaped (1, N) / (N, 1), uniforms as (T, 1, N) and the scan-output base (N, 3) from the outer graph,
    named by `tag` (default "32" / "64"): uniforms{tag}_t, temp{tag}_1n, kidx{tag}_n1, topp{tag}_n1, base{tag}.
    Emits one scan output (N, 3) per step: [token, logprob, thin] scattered to the rows' slots, where thin
    is 1.0 when the fast path's margin was under MARGIN (always 0 on the exact path).
    """
    dt, DT = (np.float64, DOUBLE) if exact else (np.float32, FLOAT)
    tag = tag or ("64" if exact else "32")
    b = Builder(f"s{tag}{'_t1' if unit_temperature else ''}{'_f' if filtered else ''}{'' if top_p else 'k'}_")
    assert not (filtered and unit_temperature and not exact), "the fast filtered body handles any temperature"
    static = shift is not None and unit_temperature and not exact
    w = weight_inits(b, folded, transposed=True, dtype=dt, head_shift=shift if static else 0.0)
    i, ctx, rows = "i", "ctx_in", "rows_in"  # ctx (M, block_size) int64, rows (M,) original row ids
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    lt = add_forward(b, w, ctx, transposed=True)  # (V, M)
    u = b.op("Gather", [b.op("Gather", [f"uniforms{tag}_t", i]), rows], axis=1)  # (1, M): u * (1 - 2^-23), or -1
    if static:
        s = lt  # (V, M) logits - shift: bounded, so exp(s) is finite with a max weight >= e^-60
    else:
        # Max over the vocabulary: a (V, 1) MaxPool is as fast as ReduceMax for one row and 2.4x faster for many.
        pooled = b.op("MaxPool", [b.op("Reshape", [lt, b.const([1, 1, V, -1], dtype=np.int64)])], kernel_shape=[V, 1])
        m = b.op("Reshape", [pooled, b.const([1, -1], dtype=np.int64)], hint="m")  # (1, M)
        s = b.op("Sub", [lt, m])  # (V, M) logits - max
    temp = None if unit_temperature else b.op("Gather", [f"temp{tag}_1n", rows], axis=1)  # (1, M)
    d = s if unit_temperature else b.op("Div", [s, temp])
    wt = b.op("Exp", [d])  # (V, M) unnormalised weights, max 1 (or e^+-60 at most with a shift)
    kgap = None
    if filtered and exact:
        wt = _filter(b, d, wt, V, tag)
    elif filtered:
        wt, kgap = _filter32(b, s, wt, temp, V, top_p)
    # Inverse CDF: the count of cdf entries <= x = u * total * (1 - 2^-23) (the factor, folded into the
    # uniforms, keeps x < total, so the pick is always a token with w > 0; u = -1 forces the end token).
    cdf = b.op("CumSum", [wt, b.const(np.array(0, np.int64))])  # (V, M)
    total = b.op("Slice", [cdf, b.const([V - 1], dtype=np.int64), b.const([V], dtype=np.int64), ax0])  # (1, M)
    x = b.op("Mul", [u, total])
    below = b.op("Cast", [b.op("LessOrEqual", [cdf, x])], to=DT)
    tok_f = b.op("ReduceSum", [below, ax0], keepdims=1)  # (1, M) float count
    tok = b.op("Cast", [tok_f], to=INT64, hint="tok")
    # The model's own log-probability of the chosen token (temperature 1, unfiltered).
    sumexp = total if unit_temperature and not exact else b.op("ReduceSum", [b.op("Exp", [s]), ax0], keepdims=1)
    lp = b.op("Sub", [b.op("GatherElements", [s, tok], axis=0), b.op("Log", [sumexp])])  # (1, M)
    if exact:
        thin = b.op("Expand", [b.const(np.array([[0.0]], dt)), b.op("Shape", [lp])])  # (1, M): exact, never rechecked
    else:
        # x lies in [upper - w[tok], upper); a CDF that moves less than the margin can't change the token.
        upper = b.op("GatherElements", [cdf, tok], axis=0)
        lower = b.op("Sub", [upper, b.op("GatherElements", [wt, tok], axis=0)])
        # Abs: a forced end (x < 0) has no lower boundary; its "margin" |x| / total ~ 1 is never thin.
        margin = b.op("Div", [b.op("Abs", [b.op("Min", [b.op("Sub", [x, lower]), b.op("Sub", [upper, x])])]), total])
        if temp is not None:
            margin = b.op("Mul", [margin, temp])  # errors scale with 1 / temperature
        if kgap is not None:
            margin = b.op("Min", [margin, kgap])
        thin = b.op("Cast", [b.op("Less", [margin, b.const(np.array(MARGIN, np.float32))])], to=FLOAT)  # (1, M)
    out = b.op("Concat", [tok_f, lp, thin], axis=0)  # (3, M)
    b.op("ScatterND", [f"base{tag}", b.op("Unsqueeze", [rows, ax1]), b.op("Transpose", [out], perm=[1, 0])],
         outputs=["step_n"])  # (N, 3): rows that finished keep the base [0, 0, 0]
    # A row goes on until it emits the end token (forced at its max_tokens); compact the rest away.
    keep = b.op("Squeeze", [b.op("Greater", [tok, b.const(np.array(0, np.int64))]), ax0])  # (M,)
    tok_col = b.op("Transpose", [tok], perm=[1, 0])  # (M, 1)
    nxt = b.op("Concat", [b.op("Slice", [ctx, ax1, b.const([np.iinfo(np.int64).max], dtype=np.int64), ax1]), tok_col], axis=1)
    b.op("Compress", [nxt, keep], outputs=["ctx_out"], axis=0)
    rows_out = b.op("Compress", [rows, keep], outputs=["rows_out"], axis=0)
    b.op("Greater", [b.op("Size", [rows_out]), b.const(np.array(0, np.int64))], outputs=["cond_out"])
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        b.nodes, f"sample_step_{tag}",
        [vi("i", INT64, []), vi("cond_in", BOOL, []), vi(ctx, INT64, None), vi(rows, INT64, None)],
        [vi("cond_out", BOOL, []), vi("ctx_out", INT64, None), vi("rows_out", INT64, None), vi("step_n", DT, None)],
        b.inits,
    )


def _any(b, flags):
    """bool scalar: is any element of the bool tensor `flags` true."""
    return b.op("Greater", [b.op("ReduceMax", [b.op("Cast", [flags], to=INT64)], keepdims=0), b.const(np.array(0, np.int64))])


def _loop_node(body, inputs, out):
    return helper.make_node("Loop", inputs, [out + "_ctx", out + "_rows", out], body=body)


def _dispatch(tree, inputs, out):
    """A Loop node running `tree`'s body: a body, or (condition, tree if false, tree if true), decided by
    If nodes outside the loop (once per run, not per step)."""
    if isinstance(tree, onnx.GraphProto):
        return _loop_node(tree, inputs, out)
    cond, no, yes = tree
    leaf = yes
    while not isinstance(leaf, onnx.GraphProto):
        leaf = leaf[1]
    vi = helper.make_tensor_value_info(out + "_b", leaf.output[3].type.tensor_type.elem_type, None)
    branch = lambda t: helper.make_graph([_dispatch(t, inputs, out + "_b")], out, [], [vi])  # noqa: E731
    return helper.make_node("If", [cond], [out], then_branch=branch(yes), else_branch=branch(no))


def _run_loop(b, tree, ctx0, N, T, hint):
    """Loop over the N rows of ctx0 (N, block_size) -> (steps, N, 3) scan output [token, logprob, thin].

    tree: the loop body, or bodies to choose from once (see _dispatch).
    """
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    rows0 = b.op("Range", [zero, N, one])
    cond0 = b.op("Greater", [N, zero])
    out = b.name(hint)
    b.nodes.append(_dispatch(tree, [T, cond0, ctx0, rows0], out))
    # Reshape: when no step ran (N = 0) ORT leaves the scan output shaped (0, 0, 0).
    steps = b.op("Shape", [out], start=0, end=1)  # (1,)
    shape = b.op("Concat", [steps, b.op("Unsqueeze", [N, zero]), b.const([3], dtype=np.int64)], axis=0)
    return b.op("Reshape", [out, shape])  # (steps, N, 3)


def _collect(b, steps, T, thin_out=None):
    """(steps, N, 3) -> tokens (N, T) int64 padded with the end token, logprob (N,) float64; with thin_out
    (the fast path's float32 steps), also the output thin_out (N,) bool: some step's margin was thin.

    One ReduceSum over the steps, the leading axis, for which ONNX Runtime's ReduceSum has a fast path:
    41 us on (34, 4096) floats here, against 1.1 ms over axes [0, 2] and 0.4 ms for a ReduceMin over
    axis 0; so the recheck flag is a count of thin steps, not a minimum margin. Finished rows add zeros.
    """
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    sums = b.op("ReduceSum", [steps, b.const([0], dtype=np.int64)], keepdims=0)  # (N, 3)
    lp = b.op("Cast", [b.op("Gather", [sums, one], axis=1)], to=DOUBLE)  # (N,)
    if thin_out:
        thin = b.op("Gather", [sums, b.const(np.array(2, np.int64))], axis=1)  # (N,) count of thin steps
        b.op("Greater", [thin, b.const(np.array(0, np.float32))], outputs=[thin_out])
    tok = b.op("Cast", [b.op("Transpose", [b.op("Gather", [steps, zero], axis=2)], perm=[1, 0])], to=INT64)  # (N, steps)
    pads = b.op("Concat", [b.const([0, 0, 0], dtype=np.int64),
                           b.op("Unsqueeze", [b.op("Sub", [T, b.op("Gather", [b.op("Shape", [tok]), one])]), zero])], axis=0)
    return b.op("Pad", [tok, pads]), lp


def _exact_inputs(b, folded, V, rows, u, tag):
    """Per-row settings for a float64 loop over the batch rows `rows` (R,), registered under `tag` (see
    _sampling_body) from the main graph's; u (steps, R) float32: the loop's uniforms (or -1).
    -> the loop's bodies (see _dispatch): filtered only when one of these rows uses top-k or top-p."""
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    b.op("Expand", [b.const(np.array([[0.0, 0.0, 0.0]], np.float64)),
                    b.op("Concat", [b.op("Shape", [rows]), b.const([3], dtype=np.int64)], axis=0)], outputs=[f"base{tag}"])
    b.op("Unsqueeze", [b.op("Cast", [b.op("Gather", ["temperature", rows])], to=DOUBLE), ax0], outputs=[f"temp{tag}_1n"])  # (1, R)
    b.op("Unsqueeze", [b.op("Mul", [b.op("Cast", [u], to=DOUBLE), b.const(np.array(1 - 2**-23, np.float64))]), ax1],
         outputs=[f"uniforms{tag}_t"])  # (steps, 1, R)
    b.op("Cast", [b.op("Gather", ["topp32_n1", rows])], outputs=[f"topp{tag}_n1"], to=DOUBLE)  # (R, 1)
    b.op("Gather", ["kidx32_n1", rows], outputs=[f"kidx{tag}_n1"])  # (R, 1)
    return (_any(b, b.op("Gather", ["filtered", rows])), _sampling_body(folded, V, exact=True, tag=tag),
            _sampling_body(folded, V, exact=True, filtered=True, tag=tag))


def _keep_fast(tok32, lp32, sfx):
    """If-branch that returns the fast path's results as they are: tokens_{sfx}, logprob_{sfx}."""
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        [helper.make_node("Identity", [tok32], [f"tokens_{sfx}"]), helper.make_node("Cast", [lp32], [f"logprob_{sfx}"], to=FLOAT)],
        f"keep_fast_{sfx}", [], [vi(f"tokens_{sfx}", INT64, None), vi(f"logprob_{sfx}", FLOAT, None)])


def _exact_stage(folded, V, T, tok32, lp32, exact):
    """If-branch: redo the `exact` rows in float64 (with top-k/top-p) and write them over the fast results.

    The E rows are gathered first (context, uniforms, settings), so the loop and everything after it
    is E rows wide, not N; everything only the exact path needs is prepared here, so a batch without
    such rows skips all of it.
    """
    b = Builder("x_")
    ax1, zero = b.const([1], dtype=np.int64), b.const(np.array(0, np.int64))
    ridx = b.op("Reshape", [b.op("NonZero", [exact]), b.const([-1], dtype=np.int64)])  # (E,) rows to redo
    rcol = b.op("Unsqueeze", [ridx, ax1])  # (E, 1)
    E = b.op("Gather", [b.op("Shape", [ridx]), zero])
    bodies = _exact_inputs(b, folded, V, ridx, b.op("Gather", ["u_t", ridx], axis=1), "64")  # uniforms (T, E)
    ctx = b.op("Gather", ["context", ridx])  # (E, block_size)
    tok64, lp64 = _collect(b, _run_loop(b, bodies, ctx, E, T, "exact"), T)
    b.op("ScatterND", [tok32, rcol, tok64], outputs=["tokens_x"])
    b.op("Cast", [b.op("ScatterND", [lp32, rcol, lp64])], outputs=["logprob_x"], to=FLOAT)
    vi = helper.make_tensor_value_info
    return helper.make_graph(b.nodes, "exact_stage", [], [vi("tokens_x", INT64, None), vi("logprob_x", FLOAT, None)], b.inits)


def _check_stage(folded, V, bs, T, tok32, lp32, steps32):
    """If-branch for a batch with rechecked rows: decide each thin step again in float64.

    A step whose margin wasn't thin picked the float64 token, so a row's fast tokens are the exact ones
    if float64 picks the same token at each of its thin steps, from the context its fast tokens give
    there. So every thin (row, step) pair is redone as one float64 step (the exact body, one iteration,
    P pairs wide) instead of whole names; only rows where some pair picks another token (about one
    name in 20,000) are sampled again in float64 from the start (_exact_stage).
    steps32: the fast loop's (steps, N, 3) scan output [token, logprob, thin].
    """
    b = Builder("c_")
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    zero, one, two = (b.const(np.array(v, np.int64)) for v in (0, 1, 2))
    ridx = b.op("Reshape", [b.op("NonZero", ["rechecked"]), b.const([-1], dtype=np.int64)])  # (E,)
    thin = b.op("Gather", [b.op("Gather", [steps32, ridx], axis=1), two], axis=2)  # (steps, E)
    pairs = b.op("NonZero", [thin])  # (2, P): [step, e]
    t = b.op("Gather", [pairs, zero])  # (P,)
    row = b.op("Gather", [ridx, b.op("Gather", [pairs, one])])  # (P,)
    t_col, row_col = b.op("Unsqueeze", [t, ax1]), b.op("Unsqueeze", [row, ax1])  # (P, 1)
    # The context at step t: columns t .. t + bs - 1 of [initial context, tokens].
    seq = b.op("Concat", [b.op("Gather", ["context", row]), b.op("Gather", [tok32, row])], axis=1)  # (P, bs + T)
    ctx = b.op("GatherElements", [seq, b.op("Add", [t_col, b.const(np.arange(bs)[None, :], dtype=np.int64)])], axis=1)
    P = b.op("Gather", [b.op("Shape", [t]), zero])
    u = b.op("GatherND", ["u_t", b.op("Concat", [t_col, row_col], axis=1)])  # (P,) this step's uniform (or -1)
    bodies = _exact_inputs(b, folded, V, row, b.op("Unsqueeze", [u, ax0]), "64c")  # uniforms (1, P): one step
    step = _run_loop(b, bodies, ctx, P, one, "check")  # (1, P, 3)
    tok64 = b.op("Cast", [b.op("Reshape", [b.op("Gather", [step, zero], axis=2), b.const([-1], dtype=np.int64)])], to=INT64)
    other = b.op("Not", [b.op("Equal", [tok64, b.op("GatherND", [tok32, b.op("Concat", [row_col, t_col], axis=1)])])])
    # The rows with another token somewhere (a row may have several pairs) as an (N,) mask.
    bad = b.op("Compress", [row, other], axis=0)
    zeros = b.op("ConstantOfShape", [b.op("Shape", ["rechecked"])], value=helper.make_tensor("v", FLOAT, [1], [0.0]))
    flags = b.op("ScatterND", [zeros, b.op("Unsqueeze", [bad, ax1]), b.op("Expand", [b.const(np.array(1.0, np.float32)), b.op("Shape", [bad])])])
    full = b.op("Greater", [flags, b.const(np.array(0, np.float32))], hint="full")  # (N,)
    b.op("If", [_any(b, full)], outputs=["tokens_c", "logprob_c"],
         then_branch=_exact_stage(folded, V, T, tok32, lp32, full), else_branch=_keep_fast(tok32, lp32, "k"))
    vi = helper.make_tensor_value_info
    return helper.make_graph(b.nodes, "check_stage", [], [vi("tokens_c", INT64, None), vi("logprob_c", FLOAT, None)], b.inits)


def build_sampler_model(folded, block_size, metadata, fast_folded=None):
    """fast_folded: the weights of the float32 fast path (default: folded). The tests give it slightly
    wrong ones, to check that the float64 stages correct any fast-path error under MARGIN."""
    V = folded.lm_head.out_features
    fast_folded = fast_folded or folded
    b = Builder()
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    N = b.op("Gather", [b.op("Shape", ["context"]), zero], hint="N")  # scalar
    T = b.op("Gather", [b.op("Shape", ["uniforms"]), one], hint="T")
    b.op("Concat", [b.op("Unsqueeze", [N, zero]), b.const([3], dtype=np.int64)], axis=0, outputs=["N3"])  # [N, 3]
    b.op("Expand", [b.const(np.array([[0.0, 0.0, 0.0]], np.float32)), "N3"], outputs=["base32"])  # [token, logprob, thin]
    # The end token is forced at column max_tokens: u = -1 there (and after) makes the pick token 0.
    cols = b.op("Unsqueeze", [b.op("Range", [zero, T, one]), ax0])  # (1, T)
    forced = b.op("GreaterOrEqual", [cols, b.op("Unsqueeze", ["max_tokens", ax1])])  # (N, T)
    b.op("Transpose", [b.op("Where", [forced, b.const(np.array(-1.0, np.float32)), "uniforms"])], perm=[1, 0], outputs=["u_t"])  # (T, N)
    b.op("Unsqueeze", [b.op("Mul", ["u_t", b.const(np.array(1 - 2**-23, np.float32))]), ax1], outputs=["uniforms32_t"])  # (T, 1, N)
    b.op("Unsqueeze", ["temperature", ax0], outputs=["temp32_1n"])
    t1 = b.op("ReduceMin", [b.op("Cast", [b.op("Equal", ["temperature", b.const(np.array(1.0, np.float32))])], to=INT64)], keepdims=0)
    b.op("Greater", [t1, zero], outputs=["unit_temperature"])
    b.op("Greater", ["top_k", zero], outputs=["use_k"])
    b.op("Less", ["top_p", b.const(np.array(1.0, np.float32))], outputs=["use_p"])
    b.op("Or", ["use_k", "use_p"], outputs=["filtered"])
    # top_k = 0 keeps all: the threshold is then the V-th largest.
    k = b.op("Where", ["use_k", b.op("Min", ["top_k", b.const(np.array(V, np.int64))]), b.const(np.array(V, np.int64))])
    b.op("Unsqueeze", [b.op("Sub", [k, one]), ax1], outputs=["kidx32_n1"])  # (N, 1)
    # Fast path: every row, float32. Exact path: float64, the rows whose fast run had a thin margin.
    # The fast body is picked once per run: with the filters if a row uses top-k or top-p, else the cheapest.
    # top_p >= 1 means 2, so no token is ever outside the nucleus.
    b.op("Unsqueeze", [b.op("Where", ["use_p", "top_p", b.const(np.array(2.0, np.float32))]), ax1], outputs=["topp32_n1"])
    plain = ("unit_temperature", _sampling_body(fast_folded, V, exact=False),
             _sampling_body(fast_folded, V, exact=False, unit_temperature=True, shift=logit_shift(fast_folded)))
    filters = (_any(b, "use_p"), _sampling_body(fast_folded, V, exact=False, filtered=True, top_p=False),
               _sampling_body(fast_folded, V, exact=False, filtered=True))
    fast = _run_loop(b, (_any(b, "filtered"), plain, filters), "context", N, T, "fast")
    tok32, lp32 = _collect(b, fast, T, thin_out="rechecked")  # rechecked: a thin margin, check in float64
    b.op("If", [_any(b, "rechecked")], outputs=["tokens", "logprob"],
         then_branch=_check_stage(folded, V, block_size, T, tok32, lp32, fast), else_branch=_keep_fast(tok32, lp32, "f"))
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        b.nodes, "namegen_sampler",
        [vi("context", INT64, ["N", block_size]), vi("uniforms", FLOAT, ["N", "T"]), vi("temperature", FLOAT, ["N"]),
         vi("top_k", INT64, ["N"]), vi("top_p", FLOAT, ["N"]), vi("max_tokens", INT64, ["N"])],
        [vi("tokens", INT64, ["N", "T"]), vi("logprob", FLOAT, ["N"]), vi("rechecked", BOOL, ["N"])],
        b.inits,
    )
    return _model(graph, metadata)


def _model(graph, metadata):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="namegen")
    model.ir_version = 9  # what onnxruntime 1.2x+ reads; opset 18
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    return model
