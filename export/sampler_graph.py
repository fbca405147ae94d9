"""sampler.onnx: the whole autoregressive loop of trainer/sampling.py in Loop nodes, so a batch of names is
one session run.

Every row runs in float32 first (the fast path, export/sampler_step.py). Every step whose uniform came
within MARGIN of a CDF boundary (or whose top-k / top-p choice came that close) is decided again in
float64 (_check_stage), and a row where float64 picks another token is sampled again in float64
(_exact_stage), so the result equals the float64 specification: in float32, torch and ONNX Runtime round
matrix products differently (~1e-7) and about one name in 20,000 would differ. Finished rows are
compacted out every step, so a batch costs about N x the mean name length in row-steps; batches of a few
rows take SmallLoop instead, where the per-node cost, not the arithmetic, is what counts.
"""
import numpy as np
import onnx
from onnx import helper

from export.graphs import BOOL, DOUBLE, FLOAT, INT64, Builder, logit_shift, make_model
from export.sampler_step import SmallLoop, sampling_body

# Batches of at most this many rows without top-k / top-p take SmallLoop.
SMALL_ROWS = 16


def _any(b, flags):
    """bool scalar: is any element of the bool tensor `flags` true."""
    return b.op("Greater", [b.op("ReduceMax", [b.op("Cast", [flags], to=INT64)], keepdims=0), b.const(np.array(0, np.int64))])


def _loop_node(body, inputs, out):
    return helper.make_node("Loop", inputs, [out + "_ctx", out + "_rows", out], body=body)


def _dispatch(tree, inputs, out):
    """Nodes and initializers computing `out` (steps, N, 3) with a Loop running `tree`'s body: a body, a
    SmallLoop, or (condition, tree if false, tree if true), decided by If nodes outside the loop (once per
    run, not per step)."""
    if isinstance(tree, onnx.GraphProto):
        return [_loop_node(tree, inputs, out)], []
    if isinstance(tree, SmallLoop):
        return tree.build(inputs, out)
    cond, no, yes = tree
    leaf = no
    while isinstance(leaf, tuple):  # the scan output's type: float64 bodies, or float32
        leaf = leaf[1]
    elem = FLOAT if isinstance(leaf, SmallLoop) else leaf.output[3].type.tensor_type.elem_type
    vi = helper.make_tensor_value_info(out + "_b", elem, None)

    def branch(t):
        nodes, inits = _dispatch(t, inputs, out + "_b")
        return helper.make_graph(nodes, out, [], [vi], inits)

    return [helper.make_node("If", [cond], [out], then_branch=branch(yes), else_branch=branch(no))], []


def _run_loop(b, tree, ctx0, N, T, hint):
    """Loop over the N rows of ctx0 (N, block_size) -> (steps, N, 3) scan output [token, logprob, thin].

    tree: the loop body, or bodies to choose from once (see _dispatch).
    """
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    rows0 = b.op("Range", [zero, N, one])
    cond0 = b.op("Greater", [N, zero])
    out = b.name(hint)
    nodes, inits = _dispatch(tree, [T, cond0, ctx0, rows0], out)
    b.nodes += nodes
    b.inits += inits
    # Reshape: when no step ran (N = 0) ORT leaves the scan output shaped (0, 0, 0).
    steps = b.op("Shape", [out], start=0, end=1)  # (1,)
    shape = b.op("Concat", [steps, b.op("Unsqueeze", [N, zero]), b.const([3], dtype=np.int64)], axis=0)
    return b.op("Reshape", [out, shape])  # (steps, N, 3)


def _collect(b, steps, T, thin_out=None):
    """(steps, N, 3) -> tokens (N, T) int64 padded with the end token, logprob (N,) in the steps' dtype; with thin_out
    (the fast path's float32 steps), also the output thin_out (N,) bool: some step's margin was thin, and
    a third result, a bool scalar: any row's was.

    One ReduceSum over the steps, the leading axis, for which ONNX Runtime's ReduceSum has a fast path:
    41 us on (34, 4096) floats here, against 1.1 ms over axes [0, 2] and 0.4 ms for a ReduceMin over
    axis 0; so the recheck flag is a count of thin steps, not a minimum margin. Finished rows add zeros.
    """
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    sums = b.op("ReduceSum", [steps, b.const([0], dtype=np.int64)], keepdims=0)  # (N, 3)
    lp = b.op("Gather", [sums, one], axis=1)  # (N,)
    tok = b.op("Cast", [b.op("Transpose", [b.op("Gather", [steps, zero], axis=2)], perm=[1, 0])], to=INT64)  # (N, steps)
    pads = b.op("Concat", [b.const([0, 0, 0], dtype=np.int64), b.op("Sub", [T, b.op("Shape", [tok], start=1, end=2)])], axis=0)
    padded = b.op("Pad", [tok, pads])
    if not thin_out:
        return padded, lp
    fzero = b.const(np.array(0, np.float32))
    thin = b.op("Gather", [sums, b.const(np.array(2, np.int64))], axis=1)  # (N,) count of thin steps
    b.op("Greater", [thin, fzero], outputs=[thin_out])
    return padded, lp, b.op("Greater", [b.op("ReduceSum", [thin], keepdims=0), fzero])


def _exact_inputs(b, folded, V, rows, u, tag):
    """Per-row settings for a float64 loop over the batch rows `rows` (R,), registered under `tag` (see
    sampling_body) from the check stage's (_filter_settings "32c") and the main graph's; u (steps, R)
    float32: the loop's uniforms (or -1).
    -> the loop's bodies (see _dispatch): filtered only when one of these rows uses top-k or top-p."""
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    b.op("Expand", [b.const(np.array([[0.0, 0.0, 0.0]], np.float64)),
                    b.op("Concat", [b.op("Shape", [rows]), b.const([3], dtype=np.int64)], axis=0)], outputs=[f"base{tag}"])
    b.op("Unsqueeze", [b.op("Cast", [b.op("Gather", ["temperature", rows])], to=DOUBLE), ax0], outputs=[f"temp{tag}_1n"])  # (1, R)
    b.op("Unsqueeze", [b.op("Mul", [b.op("Cast", [u], to=DOUBLE), b.const(np.array(1 - 2**-23, np.float64))]), ax1],
         outputs=[f"uniforms{tag}_t"])  # (steps, 1, R)
    b.op("Cast", [b.op("Gather", ["topp32c_n1", rows])], outputs=[f"topp{tag}_n1"], to=DOUBLE)  # (R, 1)
    b.op("Gather", ["kidx32c_n1", rows], outputs=[f"kidx{tag}_n1"])  # (R, 1)
    return (_any(b, b.op("Gather", ["filtered", rows])), sampling_body(folded, V, exact=True, tag=tag),
            sampling_body(folded, V, exact=True, filtered=True, tag=tag))


def _keep_fast(tok32, lp32, sfx):
    """If-branch that returns the fast path's results as they are: tokens_{sfx}, logprob_{sfx}."""
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        [helper.make_node("Identity", [tok32], [f"tokens_{sfx}"]), helper.make_node("Identity", [lp32], [f"logprob_{sfx}"])],
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
    u = b.op("Transpose", [b.op("Gather", ["u_nt", ridx])], perm=[1, 0])  # (T, E)
    bodies = _exact_inputs(b, folded, V, ridx, u, "64")
    ctx = b.op("Gather", ["context", ridx])  # (E, block_size)
    tok64, lp64 = _collect(b, _run_loop(b, bodies, ctx, E, T, "exact"), T)
    b.op("ScatterND", [tok32, rcol, tok64], outputs=["tokens_x"])
    b.op("ScatterND", [lp32, rcol, b.op("Cast", [lp64], to=FLOAT)], outputs=["logprob_x"])
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
    u = b.op("GatherND", ["u_nt", b.op("Concat", [row_col, t_col], axis=1)])  # (P,) this step's uniform (or -1)
    _filter_settings(b, V, "32c")  # what _exact_inputs reads (here, not in the main graph: see _general_inputs)
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


def _filter_settings(b, V, sfx):
    """The per-row top-k / top-p settings the filtered bodies read, kidx{sfx}_n1 (N, 1): k - 1 (V - 1
    without top-k: the V-th largest keeps all), and topp{sfx}_n1 (N, 1): top_p (2 without top-p, so no
    token is ever outside the nucleus)."""
    one, ax1 = b.const(np.array(1, np.int64)), b.const([1], dtype=np.int64)
    k = b.op("Where", ["use_k", b.op("Min", ["top_k", b.const(np.array(V, np.int64))]), b.const(np.array(V, np.int64))])
    b.op("Unsqueeze", [b.op("Sub", [k, one]), ax1], outputs=[f"kidx{sfx}_n1"])
    topp = b.op("Where", ["use_p", "top_p", b.const(np.array(2.0, np.float32))])
    b.op("Unsqueeze", [topp, ax1], outputs=[f"topp{sfx}_n1"])


def _general_inputs(b, V, N):
    """What the compacting loops (sampling_body) read from the outer graph: the scan-output base32 (N, 3),
    uniforms32_t (T, 1, N), temp32_1n (1, N) and the filter settings. Built in the branch that runs them,
    so a SmallLoop run skips these nodes (at one name, every node counts: ~0.8 us each)."""
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    n3 = b.op("Concat", [b.op("Unsqueeze", [N, ax0]), b.const([3], dtype=np.int64)], axis=0)  # [N, 3]
    b.op("Expand", [b.const(np.array([[0.0, 0.0, 0.0]], np.float32)), n3], outputs=["base32"])  # [token, logprob, thin]
    b.op("Unsqueeze", [b.op("Transpose", ["u32_nt"], perm=[1, 0]), ax1], outputs=["uniforms32_t"])  # (T, 1, N)
    b.op("Unsqueeze", ["temperature", ax0], outputs=["temp32_1n"])
    _filter_settings(b, V, "32")


def _branch(b, out):
    """The nodes of builder b as an If branch whose output is its float32 value `out`."""
    return helper.make_graph(b.nodes, out, [], [helper.make_tensor_value_info(out, FLOAT, None)], b.inits)


def build_sampler_model(folded, block_size, metadata, fast_folded=None, small_rows=SMALL_ROWS):
    """fast_folded: the weights of the float32 fast path (default: folded). The tests give it slightly
    wrong ones, to check that the float64 stages correct any fast-path error under MARGIN.
    small_rows: batches up to this many rows take SmallLoop (0: never; the tests compare)."""
    V = folded.lm_head.out_features
    fast_folded = fast_folded or folded
    b = Builder()
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    ax0, ax1 = b.const([0], dtype=np.int64), b.const([1], dtype=np.int64)
    N = b.op("Gather", [b.op("Shape", ["context"]), zero], hint="N")  # scalar
    T = b.op("Gather", [b.op("Shape", ["uniforms"]), one], hint="T")
    # The end token is forced at column max_tokens: u = -1 there (and after) makes the pick token 0.
    cols = b.op("Unsqueeze", [b.op("Range", [zero, T, one]), ax0])  # (1, T)
    forced = b.op("GreaterOrEqual", [cols, b.op("Unsqueeze", ["max_tokens", ax1])])  # (N, T)
    b.op("Where", [forced, b.const(np.array(-1.0, np.float32)), "uniforms"], outputs=["u_nt"])  # (N, T)
    # What the float32 loops compare: times _pick's factor, once for either kind of loop.
    b.op("Mul", ["u_nt", b.const(np.array(1 - 2**-23, np.float32))], outputs=["u32_nt"])
    t1 = b.op("ReduceMin", [b.op("Cast", [b.op("Equal", ["temperature", b.const(np.array(1.0, np.float32))])], to=INT64)], keepdims=0)
    b.op("Greater", [t1, zero], outputs=["unit_temperature"])
    b.op("Greater", ["top_k", zero], outputs=["use_k"])
    b.op("Less", ["top_p", b.const(np.array(1.0, np.float32))], outputs=["use_p"])
    b.op("Or", ["use_k", "use_p"], outputs=["filtered"])
    any_filtered = _any(b, "filtered")
    # Fast path: every row, float32. Exact path: float64, the rows whose fast run had a thin margin.
    # The fast body is picked once per run: with the filters if a row uses top-k or top-p, else the cheapest.
    shift = logit_shift(fast_folded)
    g = Builder("g_")  # the compacting loops: any batch
    _general_inputs(g, V, N)
    plain = ("unit_temperature", sampling_body(fast_folded, V, exact=False),
             sampling_body(fast_folded, V, exact=False, unit_temperature=True, shift=shift))
    filters = (_any(g, "use_p"), sampling_body(fast_folded, V, exact=False, filtered=True, top_p=False),
               sampling_body(fast_folded, V, exact=False, filtered=True))
    fast = _run_loop(g, (any_filtered, plain, filters), "context", N, T, "fast")
    if small_rows > 0:  # a few rows without top-k or top-p: the small loops (see SmallLoop), in their own branch
        # that skips _general_inputs; N * T > 0: a run without columns takes the compacting loop, whose output
        # _run_loop reshapes (SmallLoop's isn't).
        m = Builder("m_")
        fast_m = m.name("fast")
        nodes, inits = _dispatch(("unit_temperature", SmallLoop(fast_folded, V, unit_temperature=False),
                                  SmallLoop(fast_folded, V, shift=shift)), [T, None, "context", None], fast_m)
        m.nodes += nodes
        m.inits += inits
        small = b.op("And", [b.op("Greater", [b.op("Mul", [N, T]), zero]),
                             b.op("LessOrEqual", [N, b.const(np.array(small_rows, np.int64))])])
        use_small = b.op("And", [small, b.op("Not", [any_filtered])])
        fast = b.op("If", [use_small], then_branch=_branch(m, fast_m), else_branch=_branch(g, fast), hint="fast")
    else:
        b.nodes += g.nodes
        b.inits += g.inits
    tok32, lp32, any_thin = _collect(b, fast, T, thin_out="rechecked")  # rechecked: a thin margin, check in float64
    b.op("If", [any_thin], outputs=["tokens", "logprob"],
         then_branch=_check_stage(folded, V, block_size, T, tok32, lp32, fast), else_branch=_keep_fast(tok32, lp32, "f"))
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        b.nodes, "namegen_sampler",
        [vi("context", INT64, ["N", block_size]), vi("uniforms", FLOAT, ["N", "T"]), vi("temperature", FLOAT, ["N"]),
         vi("top_k", INT64, ["N"]), vi("top_p", FLOAT, ["N"]), vi("max_tokens", INT64, ["N"])],
        [vi("tokens", INT64, ["N", "T"]), vi("logprob", FLOAT, ["N"]), vi("rechecked", BOOL, ["N"])],
        b.inits,
    )
    return make_model(graph, metadata)
