"""One sampling step of trainer/sampling.py as ONNX Loop bodies: the fast float32 path with its margins,
the exact float64 path, and SmallLoop for a few rows. export/sampler_graph.py runs them.
"""
import numpy as np
from onnx import helper

from export.graphs import BOOL, DOUBLE, FLOAT, INT32, INT64, Builder, add_forward, add_mlp, as_array, embed, weight_inits

# Fast-path steps whose uniform came this close (times temperature) to a CDF boundary are checked in float64.
# float32 vs float64 normalised-CDF differences are ~1e-6 / temperature (at most 1.35e-6 over every context
# in the data, temperatures 0.3-2), so this is a 75-100x safety factor. About 1 name in 25 then has a step
# checked in float64 (1 in 9-11 at top_p 0.9); about 1 in 20,000 is sampled again on the exact path.
MARGIN = 1e-4


def _filter(b, d, w, V, tag):
    """Zero the weights outside top-k, then outside the top-p nucleus (sampling.filter_weights).

    d, w: (V, M) float64 scaled logits and weights; tag: which per-row settings to read (see sampling_body).
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
      times min(temperature, 1) as for the CDF margin; and the gap between the s of the nucleus's least
      likely token and the next s (a near-tie in p just outside it is a near-tie in s).
      At top_p 0.9 this rechecks ~1 name in 11 (some step's nucleus boundary falls that close).
    Rows without top-p (top_p 2) have preceding masses <= 1, a distance >= 1 from it: never thin.
    top_p=False: top-k only (a run where no row asks for top-p skips the nucleus's ~26 nodes).
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
        margin = b.op("Min", [kgap, sgap, b.op("Mul", [near, _error_scale(b, tcol)])])
        thr = b.op("Max", [kth, s_min])
    thr = b.op("Transpose", [thr], perm=[1, 0])  # (1, M)
    return b.op("Where", [b.op("GreaterOrEqual", [s, thr]), wt, zero]), b.op("Transpose", [margin], perm=[1, 0])


def _cdf(b, wt, V, axis):
    """Inverse-CDF sampling, part 1: cdf = cumsum(w) along the vocabulary axis, and its last entry."""
    cdf = b.op("CumSum", [wt, b.const(np.array(axis, np.int64))])
    return cdf, b.op("Slice", [cdf, b.const([V - 1], dtype=np.int64), b.const([V], dtype=np.int64), b.const([axis], dtype=np.int64)])


def _pick(b, cdf, x, axis, DT):
    """Part 2: the token is the count of cdf entries <= x = u * total * (1 - 2^-23) (the factor, folded into
    the uniforms, keeps x < total, so the pick is always a token with w > 0; u = -1 forces the end token).
    -> (float count, int64 token), keeping the vocabulary axis as size 1."""
    tok_f = b.op("ReduceSum", [b.op("Cast", [b.op("LessOrEqual", [cdf, x])], to=DT), b.const([axis], dtype=np.int64)], keepdims=1)
    return tok_f, b.op("Cast", [tok_f], to=INT64, hint="tok")


def _logprob(b, s, tok, sumexp, axis):
    """log softmax(s)[tok] with sumexp = sum(exp(s)) along the vocabulary axis."""
    return b.op("Sub", [b.op("GatherElements", [s, tok], axis=axis), b.op("Log", [sumexp])])


def _margin(b, cdf, wt, x, total, tok, axis):
    """How far x was from the chosen token's CDF interval [upper - w[tok], upper), relative to total: a CDF
    that moves less than that can't change the token. Abs: a forced end (x < 0) has no lower boundary;
    its "margin" |x| / total ~ 1 is never thin."""
    upper = b.op("GatherElements", [cdf, tok], axis=axis)
    lower = b.op("Sub", [upper, b.op("GatherElements", [wt, tok], axis=axis)])
    return b.op("Div", [b.op("Abs", [b.op("Min", [b.op("Sub", [x, lower]), b.op("Sub", [upper, x])])]), total])


def _error_scale(b, temp):
    """What a probability margin is multiplied by before it is compared with MARGIN: min(temperature, 1).
    An error in the logits moves the weights exp(s / temperature) by error / temperature, so a low
    temperature needs a wider margin; but float32's own rounding of exp, the CDF and u * total (~1e-7
    relative) does not shrink at a high one, so above 1 the margin stays MARGIN (times temperature, it
    fell under that rounding from ~1e4 on and missed boundaries)."""
    return b.op("Min", [temp, b.const(np.array(1.0, np.float32))])


def _thin(b, margin):
    return b.op("Cast", [b.op("Less", [margin, b.const(np.array(MARGIN, np.float32))])], to=FLOAT)


def _next_context(b, ctx, new, outputs=1, width=1):
    """(M, C) context -> the next step's: drop its first `width` columns (the oldest token), append new (M, width).
    The token ids (M, block_size) with width 1, or SmallLoop's embedded context with width n_embd."""
    ax1 = b.const([1], dtype=np.int64)
    kept = b.op("Slice", [ctx, b.const([width], dtype=np.int64), b.const([np.iinfo(np.int64).max], dtype=np.int64), ax1])
    return b.op("Concat", [kept, new], outputs=outputs, axis=1)


def sampling_body(folded, V, exact, unit_temperature=False, filtered=False, shift=None, top_p=True, tag=None):
    """Loop body: one sampling step for the M still-active rows (trainer/sampling.py, step by step).

    exact=False: the fast path: float32, top-k/top-p when filtered, and each row's margin (how far u * total
    was from the boundaries of the chosen token's CDF interval, relative to total and times min(temperature, 1);
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
    cdf, total = _cdf(b, wt, V, 0)  # (V, M), (1, M)
    x = b.op("Mul", [u, total])
    tok_f, tok = _pick(b, cdf, x, 0, DT)  # (1, M)
    # The model's own log-probability of the chosen token (temperature 1, unfiltered).
    sumexp = total if unit_temperature and not exact else b.op("ReduceSum", [b.op("Exp", [s]), ax0], keepdims=1)
    lp = _logprob(b, s, tok, sumexp, 0)  # (1, M)
    if exact:
        thin = b.op("Expand", [b.const(np.array([[0.0]], dt)), b.op("Shape", [lp])])  # (1, M): exact, never rechecked
    else:
        margin = _margin(b, cdf, wt, x, total, tok, 0)
        if temp is not None:
            margin = b.op("Mul", [margin, _error_scale(b, temp)])
        if kgap is not None:
            margin = b.op("Min", [margin, kgap])
        thin = _thin(b, margin)  # (1, M)
    out = b.op("Concat", [tok_f, lp, thin], axis=0)  # (3, M)
    b.op("ScatterND", [f"base{tag}", b.op("Unsqueeze", [rows, ax1]), b.op("Transpose", [out], perm=[1, 0])],
         outputs=["step_n"])  # (N, 3): rows that finished keep the base [0, 0, 0]
    # A row goes on until it emits the end token (forced at its max_tokens); compact the rest away.
    keep = b.op("Squeeze", [b.op("Greater", [tok, b.const(np.array(0, np.int64))]), ax0])  # (M,)
    tok_col = b.op("Transpose", [tok], perm=[1, 0])  # (M, 1)
    b.op("Compress", [_next_context(b, ctx, tok_col), keep], outputs=["ctx_out"], axis=0)
    rows_out = b.op("Compress", [rows, keep], outputs=["rows_out"], axis=0)
    b.op("Greater", [b.op("Size", [rows_out]), b.const(np.array(0, np.int64))], outputs=["cond_out"])
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        b.nodes, f"sample_step_{tag}",
        [vi("i", INT64, []), vi("cond_in", BOOL, []), vi(ctx, INT64, None), vi(rows, INT64, None)],
        [vi("cond_out", BOOL, []), vi("ctx_out", INT64, None), vi("rows_out", INT64, None), vi("step_n", DT, None)],
        b.inits,
    )


class SmallLoop:
    """The fast path for a few rows without top-k or top-p, where ONNX Runtime's ~1 us per node, not
    arithmetic, is the cost: a body of 17 nodes (19 without a logit shift, 20 with per-row temperatures)
    instead of 41-50. It keeps every row to the end instead of compacting (rows that ended carry on and are
    masked out afterwards), works in (N, V), carries the context embedded (each step gathers only the new
    token's embedding, so no Flatten) and counts its token as int32; it emits each step's logits and tokens as
    scan outputs, and the log-probabilities and margins (the formulas of sampling_body) are computed once
    over all the steps after the loop. The result is _run_loop's (steps, N, 3) [token, logprob, thin].
    unit_temperature with a `shift` (logit_shift): s = logits - shift, as in sampling_body; otherwise
    s = logits - max, and the weights are exp(s / each row's temperature)."""

    def __init__(self, folded, V, shift=None, unit_temperature=True):
        self.V, self.unit = V, unit_temperature
        static = unit_temperature and shift is not None
        tag = "small_t1" if unit_temperature else "small"
        self.u, self.temp = f"uniforms32_tn1_{tag}", f"temp32_n1_{tag}"  # (T, N, 1), (N, 1) from build()
        self.wte = as_array(folded.wte.weight)  # (V, n_embd)
        b = Builder(f"s32_{tag}_")
        w = weight_inits(b, folded, head_shift=shift if static else 0.0)
        lt = add_mlp(b, w, "x_in")  # (N, V) from the embedded context (N, block_size * n_embd)
        if not static:  # (N, V) logits - max; else logits - shift, from the head's bias
            lt = b.op("Sub", [lt, b.op("ReduceMax", [lt, b.const([1], dtype=np.int64)], keepdims=1)])
        s = lt
        wt = b.op("Exp", [s if unit_temperature else b.op("Div", [s, self.temp])])
        cdf, total = _cdf(b, wt, V, 1)  # (N, V), (N, 1)
        # _pick's token, count(cdf <= x), summed as int32: one node fewer than _pick's float count, and an
        # index the next context's Gather takes. (int32: ONNX Runtime's CUDA ReduceSum has int32 kernels, maybe no int64.
        # Not an ArgMax of cdf > x: which of its tied maxima a GPU's ArgMax returns is not specified.)
        below = b.op("Cast", [b.op("LessOrEqual", [cdf, b.op("Mul", [b.op("Gather", [self.u, "i"]), total])])], to=INT32)
        tok = b.op("ReduceSum", [below, b.const([1], dtype=np.int64)], keepdims=0, hint="tok")  # (N,) int32
        # alive: 1 until the row's end token (0), then 0; the loop stops when no row is alive.
        b.op("Min", ["alive_in", tok], outputs=["alive_out"])
        b.op("Cast", [b.op("ReduceMax", ["alive_out"], keepdims=0)], outputs=["cond_out"], to=BOOL)
        # The next embedded context: the oldest token's n_embd columns out, the new token's embedding in.
        _next_context(b, "x_in", b.op("Gather", [w["wte"], tok]), outputs=["x_out"], width=self.wte.shape[1])
        vi = helper.make_tensor_value_info
        self.body = helper.make_graph(
            b.nodes, f"sample_step_{tag}",
            [vi("i", INT64, []), vi("cond_in", BOOL, []), vi("x_in", FLOAT, None), vi("alive_in", INT32, None)],
            [vi("cond_out", BOOL, []), vi("x_out", FLOAT, None), vi("alive_out", INT32, None),
             vi(s, FLOAT, None), vi(tok, INT32, None)],
            b.inits,
        )

    def build(self, inputs, out):
        """-> nodes and initializers computing `out` (steps, N, 3). inputs: (T, -, ctx0, -) in the order of
        _run_loop's Loop inputs; the condition and row ids aren't needed: a SmallLoop run has rows and steps
        (see build_sampler_model), and keeps every row."""
        T, _, ctx0, _ = inputs
        b = Builder(out + "_small_")
        ax0, ax2 = b.const([0], dtype=np.int64), b.const([2], dtype=np.int64)
        # The main graph's u32_nt (N, T): the uniforms times _pick's factor, -1 from each row's forced end on.
        b.op("Unsqueeze", [b.op("Transpose", ["u32_nt"], perm=[1, 0]), ax2], outputs=[self.u])  # (T, N, 1)
        if not self.unit:
            b.op("Unsqueeze", ["temperature", b.const([1], dtype=np.int64)], outputs=[self.temp])  # (N, 1)
        x0 = embed(b, b.const(self.wte, "wte"), ctx0)  # (N, block_size * n_embd)
        alive0 = b.op("ConstantOfShape", [b.op("Shape", [ctx0], start=0, end=1)],
                      value=helper.make_tensor("one", INT32, [1], [1]))  # (N,)
        S, K = b.name("s"), b.name("tokens")  # (steps, N, V), (steps, N)
        loop_out = [b.name("x"), b.name("alive"), S, K]
        b.nodes.append(helper.make_node("Loop", [T, b.const(np.array(True)), x0, alive0], loop_out, body=self.body))
        tok = b.op("Unsqueeze", [K, ax2])  # (steps, N, 1) int32
        zero = b.const(np.array(0, np.int32))
        ends = b.op("Cast", [b.op("Equal", [tok, zero])], to=FLOAT)  # (steps, N, 1): 1 at a row's end token
        ended = b.op("CumSum", [ends, b.const(np.array(0, np.int64))], exclusive=1)  # end tokens before each step
        # (steps, N, 1): the row hadn't ended before
        alive = b.op("Cast", [b.op("Equal", [ended, b.const(np.array(0.0, np.float32))])], to=FLOAT)
        wt = b.op("Exp", [S if self.unit else b.op("Div", [S, self.temp])])
        cdf, total = _cdf(b, wt, self.V, 2)  # (steps, N, V), (steps, N, 1)
        u = b.op("Slice", [self.u, ax0, b.op("Shape", [K], start=0, end=1), ax0])  # (steps, N, 1)
        # The model's own log-probability (temperature 1): its own sum of exp(s) unless that is the CDF's total.
        sumexp = total if self.unit else b.op("ReduceSum", [b.op("Exp", [S]), ax2], keepdims=1)
        lp = _logprob(b, S, tok, sumexp, 2)
        margin = _margin(b, cdf, wt, b.op("Mul", [u, total]), total, tok, 2)
        thin = _thin(b, margin if self.unit else b.op("Mul", [margin, _error_scale(b, self.temp)]))
        out3 = b.op("Concat", [b.op("Cast", [tok], to=FLOAT), lp, thin], axis=2)
        b.op("Mul", [out3, alive], outputs=[out])  # (steps, N, 3), ended rows 0
        return b.nodes, b.inits
