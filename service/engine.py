"""Inference engine: the compiled sampler (sampler.onnx) and the logits model (model.onnx) on ONNX Runtime.

Determinism: each request's uniforms come from its own generator seeded with the request's seed
(params.uniform_stream) and are read row by row in order, so a request's names depend only on its own
parameters, never on how its rows were chunked or which other requests shared the session run.
"""
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.names import DataError, sha256_of
from service.params import GenerateParams, InvalidArgument, clip, outside_vocab, uniform_stream
from service.samples import Samples
from service.session import ModelFileError, cpu_cores, make_session, read_metadata

# A Score call's characters in all: ~1 s of model time on 2 cores. Without a bound, one call of millions of
# characters would hold the scoring thread for many seconds and the reply could outgrow the message limit.
MAX_SCORE_CHARS = 1_000_000
MAX_SCORE_NAME = 10_000  # characters per name: a name is scored in one engine call (~8 ms at this length)
ONLY_NEW_PROBE = 10_000  # draws after which an only_new request finding under 0.5% new names gives up


class GenerationError(Exception):
    """A valid request that can't be satisfied, e.g. only_new found too few new names in its draw budget."""


@dataclass
class ModelInfo:
    vocab: str  # itos: index 0 is the end token '.'
    block_size: int
    config: dict
    metrics: dict
    checkpoint_sha256: str
    provider: str
    num_params: int
    sampler_path: str


# Rows per shard below which a run isn't split across CPU threads (see Engine._sample): 1,024 rows split
# in two measured 1.3x faster on 2 cores; smaller runs are mostly per-run overhead, which splitting repeats.
MIN_SHARD_ROWS = 512
# Rows per shard above which a run is cut into more shards than threads: a (4096, n_hidden) activation
# stays in cache; one 65536-row run measured 1.4x slower per name than 16 of 4096.
MAX_SHARD_ROWS = 4096
# Rows per logits-model run when scoring: (1024, n_hidden) activations stay in cache. On 2 cores, 1,024-row
# runs measured 367 ns per row against 457 at 4,096 and 631 at 16,384 (one thread, medians of 5 rounds).
SCORE_ROWS = 1024


class Request:
    """One validated Generate request, possibly served over several engine runs (chunks, dynamic batches)."""

    def __init__(self, params: GenerateParams, context, prefix_logprob, max_draws):
        self.params = params
        self.T = params.max_tokens + 1  # uniform columns: the characters, then the (forced) end token
        self.rng = uniform_stream(params.seed)
        self.remaining = params.num_samples
        self.drawn = 0
        self.max_draws = max_draws
        # The sampler's per-row inputs for one row of this request (the rows of a run repeat them).
        self.row = {
            "context": np.asarray(context, dtype=np.int64)[None],  # (1, block_size)
            "temperature": np.array([params.temperature], np.float32), "top_k": np.array([params.top_k], np.int64),
            "top_p": np.array([params.top_p], np.float32), "max_tokens": np.array([self.T - 1], np.int64),
        }
        self.prefix_logprob = prefix_logprob
        self.error = None  # what ended this request (a GenerationError, or its own failed run); no other request

    @property
    def done(self):
        return self.remaining == 0 or self.error is not None

    def rows_wanted(self, cap, owed=None):
        """Rows to draw next (at most cap) for `owed` of the names still owed (default: all of them): that
        many, or a little more under only_new, since some names are known ones. Under only_new a run
        also ends at ONLY_NEW_PROBE draws, where a hopeless request is given up."""
        owed = self.remaining if owed is None else min(owed, self.remaining)
        if not self.params.only_new:
            return max(1, min(owed, cap))
        limit = self.max_draws if self.drawn >= ONLY_NEW_PROBE else min(self.max_draws, ONLY_NEW_PROBE)
        return max(1, min(math.ceil(owed * 1.5) + 8, cap, limit - self.drawn))


SAMPLER_INPUTS = frozenset({"context", "uniforms", "temperature", "top_k", "top_p", "max_tokens"})


def _check_pair(sampler, sampler_path, meta, logits_model, logits_path):
    """ModelFileError unless the two files are a sampler and a logits graph exported from one checkpoint
    (files from two exports, or one copied over the other, would otherwise fail only at warm-up)."""
    if {i.name for i in sampler.get_inputs()} != SAMPLER_INPUTS:
        raise ModelFileError(f"{sampler_path}: not a namegen sampler graph; run `make export`")
    if [i.name for i in logits_model.get_inputs()] != ["context"]:
        raise ModelFileError(f"{logits_path}: not a namegen logits graph; run `make export`")
    other = read_metadata(logits_model, logits_path, words=False).get("checkpoint_sha256")
    if not other:  # two files without it would otherwise match each other
        raise ModelFileError(f"{logits_path}: no checkpoint_sha256 in its metadata; run `make export` again")
    if other != meta.get("checkpoint_sha256"):
        raise ModelFileError(f"{sampler_path} and {logits_path} were exported from different checkpoints; "
                             "run `make export` again")
    # The metadata the server decodes with must describe these graphs: (N, block_size) in, (N, vocab) out.
    context = [next(i for i in g.get_inputs() if i.name == "context").shape[1] for g in (sampler, logits_model)]
    V = logits_model.get_outputs()[0].shape[1]
    if context != [meta["block_size"]] * 2 or V != len(meta["vocab"]):
        raise ModelFileError(f"{sampler_path}: its metadata (block_size {meta['block_size']}, {len(meta['vocab'])} "
                             f"characters) doesn't match the graphs (context {context}, {V} logits); run `make export`")


def _check_checkpoint(checkpoint, sampler_path, meta):
    """ModelFileError if a checkpoint beside the graphs isn't the one they were exported from (retrained, or
    restored with an old timestamp, so that make didn't re-export): serving and verifying would use another
    model than the folder's checkpoint says. Without a checkpoint there (a deployed copy), nothing to check."""
    if not checkpoint.is_file():
        return
    try:
        sha = sha256_of(checkpoint)
    except DataError as e:
        raise ModelFileError(str(e)) from None
    if sha != meta.get("checkpoint_sha256"):
        raise ModelFileError(f"{sampler_path} was exported from another checkpoint than {checkpoint} (sha256 "
                             f"{str(meta.get('checkpoint_sha256'))[:12]}..., that file's is {sha[:12]}...); run `make export`")


class Engine:
    """threads: CPU threads for one run (0 = one per core). A run of at least 2 x MIN_SHARD_ROWS rows is
    split into contiguous row shards sampled at once, each thread on its own single-threaded session (see
    _sample); the uniforms are drawn before the split, so sharding never changes a name. CUDA runs aren't split.
    """

    def __init__(self, model_dir="artifacts", provider="auto", threads=0, max_rows=16384):
        model_dir = Path(model_dir)
        sampler_path, logits_path = model_dir / "sampler.onnx", model_dir / "model.onnx"
        for p in (sampler_path, logits_path):
            if not p.is_file():
                raise ModelFileError(f"{p}: not found; run `make export` (or pass the right --model-dir)")
        self.sampler, self.provider = make_session(sampler_path, provider)
        self.logits_model, _ = make_session(logits_path, self.provider)
        self.threads = 1 if self.provider == "cuda" else max(1, threads or cpu_cores())
        # A session per thread: at 64-512 rows, concurrent runs of one session were 1.3-1.8x slower than
        # runs of separate sessions.
        self._shard_sessions = [self.sampler] + [make_session(sampler_path, "cpu")[0] for _ in range(self.threads - 1)]
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="shard") if self.threads > 1 else None
        meta = read_metadata(self.sampler, sampler_path)
        _check_pair(self.sampler, sampler_path, meta, self.logits_model, logits_path)
        _check_checkpoint(model_dir / "model.pt", sampler_path, meta)
        self.itos = meta["vocab"]
        self.block_size = int(meta["block_size"])
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.words = frozenset(meta["words"])
        self.max_rows = max_rows
        # Token id -> code point, end token -> NUL: an (N, T) token array viewed as '<U{T}' strings decodes
        # every row at once, since numpy drops trailing NULs.
        self._codes = np.array([0] + [ord(c) for c in self.itos[1:]], dtype=np.uint32)
        self.info = ModelInfo(
            vocab=self.itos, block_size=self.block_size, config=meta.get("config", {}), metrics=meta.get("metrics", {}),
            checkpoint_sha256=meta.get("checkpoint_sha256", ""), provider=self.provider,
            num_params=int(meta.get("num_params", 0)), sampler_path=str(sampler_path),
        )

    # ---- generation ----
    def request(self, params: GenerateParams, max_samples=1_000_000) -> Request:
        params = params.validate(self.itos, max_samples)
        ids = [0] * self.block_size + [self.stoi[c] for c in params.prefix]
        prefix_lp = self._char_logprobs([params.prefix], end=False)[0].sum() if params.prefix else 0.0
        max_draws = max(ONLY_NEW_PROBE, 100 * params.num_samples) if params.only_new else params.num_samples
        return Request(params, ids[len(ids) - self.block_size :], float(prefix_lp), max_draws)

    def run(self, parts):
        """One sampler run over n rows from each (request, n) part. -> accepted Samples per part.

        A request that exhausts its only_new draw budget gets request.error; the others are unaffected.
        Two threads may run at once (the batcher's express runs do) if their requests differ: ORT sessions
        allow concurrent runs, and the engine keeps no other state between runs.
        """
        if len(parts) == 1:  # the common case, without the copies: a lone 1-row request feeds its own arrays
            (req, n), = parts
            feed = {k: np.repeat(a, n, axis=0) if n > 1 else a for k, a in req.row.items()}
            feed["uniforms"] = req.rng.random((n, req.T), dtype=np.float32)  # its next n rows, in order
            req.drawn += n
        else:
            counts = [n for _, n in parts]
            feed = {k: np.repeat(np.concatenate([r.row[k] for r, _ in parts]), counts, axis=0) for k in parts[0][0].row}
            T = max(r.T for r, _ in parts)
            feed["uniforms"] = uni = np.empty((sum(counts), T), np.float32)  # columns past a row's forced end are never read
            i = 0
            for req, n in parts:
                uni[i : i + n, : req.T] = req.rng.random((n, req.T), dtype=np.float32)  # each request's next n rows
                req.drawn += n
                i += n
        try:
            drawn = self._sample(feed)
        except Exception:  # noqa: BLE001 - a lone request gets the error; a batch is split (below)
            if len(parts) == 1:
                raise
            return self._run_apart(parts, feed)
        if len(parts) == 1:
            return [self._accept(parts[0][0], drawn)]
        out, i = [], 0
        for req, n in parts:
            out.append(self._accept(req, drawn[i : i + n]))
            i += n
        return out

    def _run_apart(self, parts, feed):
        """A batched run that failed, again one request at a time from the rows already drawn: an error
        (a request that validation let through and the graph can't run) stays with the request that
        caused it, as its request.error, and its batch-mates still get the names their seeds determine."""
        out, i = [], 0
        for req, n in parts:
            try:
                out.append(self._accept(req, self._sample({k: a[i : i + n] for k, a in feed.items()})))
            except Exception as e:  # noqa: BLE001 - delivered to this request only
                req.error = e
                out.append(Samples())
            i += n
        return out

    def _sample(self, feed):
        """sampler.onnx on the feed's rows -> their Samples (before any prefix: see _accept).

        The rows are cut into contiguous shards of MIN_SHARD_ROWS to MAX_SHARD_ROWS; the threads, each on
        its own session, take the next shard whenever they are free (ORT releases the GIL, so they run at
        once), and the outputs are joined in row order. Each thread makes its own shards' Samples
        (_decoded), so that Python overlaps the other threads' model runs instead of following them all:
        65,536 rows on 2 threads took ~60-90 ms of Python after a ~190 ms run, on one core.
        """
        n = len(feed["uniforms"])
        # A GPU wants the whole run at once (self.threads is 1 there).
        shards = 1 if self.provider == "cuda" else max(min(self.threads, n // MIN_SHARD_ROWS), -(-n // MAX_SHARD_ROWS), 1)
        if shards == 1:
            return self._decoded(self.sampler, feed)
        bounds = [n * j // shards for j in range(shards + 1)]
        todo = iter(range(shards))  # shared: next() on it is atomic under the GIL

        def worker(j):  # -> [(shard index, Samples)] for the shards thread j took
            sess = self._shard_sessions[j]
            return [(i, self._decoded(sess, {k: a[bounds[i] : bounds[i + 1]] for k, a in feed.items()})) for i in todo]

        k = min(self.threads, shards)
        rest = [self._pool.submit(worker, j) for j in range(1, k)]
        outs = dict(worker(0) + [pair for f in rest for pair in f.result()])  # thread 0 is the caller's
        drawn = Samples()
        for i in range(shards):
            drawn.extend(outs[i])
        return drawn

    def _decoded(self, sess, feed):
        """One session run -> its Samples. (The third output, rows rechecked in float64, isn't used.)"""
        tokens, logprob, _ = sess.run(None, feed)
        return self._samples(self.decode(tokens), logprob.tolist())  # float32 -> Python floats, exactly

    def _accept(self, req, samples):
        """The Samples one request drew in a run -> those it gets: with its prefix, up to what it still owes."""
        if req.params.prefix:  # the graph sampled what follows the prefix
            prefix, lp = req.params.prefix, req.prefix_logprob
            samples = self._samples([prefix + s for s in samples.names], [x + lp for x in samples.logprobs])
        if req.params.only_new:
            samples = samples.where([not k for k in samples.in_training_data])
        if len(samples) > req.remaining:
            samples = samples[: req.remaining]
        req.remaining -= len(samples)
        found = req.params.num_samples - req.remaining
        # The budget is 100 draws per name: a request finding under 0.5% new names in its first
        # ONLY_NEW_PROBE draws can't meet it, so it stops there rather than after up to 1e9 draws.
        hopeless = req.drawn == ONLY_NEW_PROBE and found * 200 < req.drawn
        if req.remaining and (req.drawn >= req.max_draws or hopeless):
            req.error = GenerationError(
                f"only_new: found {found} of {req.params.num_samples} new names in {req.drawn} draws; "
                "raise temperature or top_k, or ask for fewer"
            )
        return samples

    def _samples(self, names, logprobs):
        """Samples of these names and log-probabilities, each name looked up in the training data."""
        return Samples(names, logprobs, list(map(self.words.__contains__, names)))

    def decode(self, tokens):
        """(N, T) token ids -> N strings (up to the first end token)."""
        codes = np.ascontiguousarray(self._codes[tokens])  # (N, T) uint32
        return codes.view(f"<U{tokens.shape[1]}").ravel().tolist()

    def generate_iter(self, params, chunk_size=None, max_samples=1_000_000):
        req = self.request(params, max_samples)
        chunk = min(chunk_size or self.max_rows, self.max_rows)
        while not req.done:
            samples = self.run([(req, req.rows_wanted(chunk))])[0]
            if req.error:
                raise req.error
            yield samples

    def generate(self, params, max_samples=1_000_000):
        out = Samples()
        for chunk in self.generate_iter(params, max_samples=max_samples):
            out.extend(chunk)
        return out

    # ---- scoring ----
    def _char_logprobs(self, names, end=True):
        """log P(char | context) for every character of each name (and the end token), one name after
        another. -> ((sum of lens,) float64, (len(names),) int64 lens: each name's count of targets)."""
        B, start = self.block_size, self.itos[0]
        # Every name as B start tokens + its characters (+ the end token), all in one flat array: a
        # target's context is the length-B window just before it. (Names can't contain the start token.)
        text = "".join(start * B + w + (start if end else "") for w in names)
        flat = np.fromiter(map(self.stoi.__getitem__, text), np.int64, len(text))
        lens = np.fromiter(map(len, names), np.int64, len(names)) + end  # targets per name
        blocks = np.cumsum(B + lens) - (B + lens)  # where each name's block starts in flat
        # (T,) window start of every target: name i's j-th target has its context at blocks[i] + j
        first = np.repeat(blocks - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
        ctx = flat[first[:, None] + np.arange(B)]  # (T, B)
        tgt = flat[first + B]  # (T,)
        lp = np.empty(len(tgt), np.float64)
        for i in range(0, len(tgt), SCORE_ROWS):
            logits = self.logits_model.run(None, {"context": ctx[i : i + SCORE_ROWS]})[0].astype(np.float64)
            m = logits.max(1, keepdims=True)
            logz = m[:, 0] + np.log(np.exp(logits - m).sum(1))
            lp[i : i + SCORE_ROWS] = np.take_along_axis(logits, tgt[i : i + SCORE_ROWS, None], 1)[:, 0] - logz
        return lp, lens

    def check_score_names(self, names):
        """Every check of a Score call, in passes that run at C speed (~10 ms per million characters), so
        that a server can make them before the call queues. -> the call's model rows: its characters and
        one end token per name (what scoring it costs, in time and memory)."""
        if not names:
            raise InvalidArgument("names", "give at least one name")
        total = sum(map(len, names))
        if total > MAX_SCORE_CHARS:
            raise InvalidArgument("names", f"at most {MAX_SCORE_CHARS:,} characters in all per call, got {total:,}; "
                                           "split them over several calls")
        longest = max(map(len, names))
        if longest > MAX_SCORE_NAME:
            raise InvalidArgument("names", f"at most {MAX_SCORE_NAME:,} characters per name, got {longest:,}")
        if outside_vocab("".join(names), self.itos):  # "" is a name too: the model can end one at once
            w, bad = next((w, bad) for w in names if (bad := outside_vocab(w, self.itos)))
            raise InvalidArgument("names", f"{clip(w)!r} has characters {clip(bad)!r} "
                                           f"outside the vocabulary {clip(self.itos[1:])!r}")
        return total + len(names)

    def score(self, names, checked=False):
        """-> [(total logprob, per-character logprobs incl. the end token)] for each name.
        checked: check_score_names already passed on these names (or a list they come from)."""
        if not checked:
            self.check_score_names(names)
        lp, lens = self._char_logprobs(names)
        # Per name: the sum and the list, cut from one array and one list (not a numpy call per name).
        ends = np.cumsum(lens)
        totals = np.add.reduceat(lp, ends - lens).tolist()  # every lens >= 1: the end token
        flat = lp.tolist()
        return [(total, flat[e - n : e]) for total, e, n in zip(totals, ends.tolist(), lens.tolist())]

    def warmup(self):
        """Run every path once so the first real request doesn't pay for lazy initialisation."""
        self.generate(GenerateParams(num_samples=64, seed=0))
        self.generate(GenerateParams(num_samples=2, seed=0, top_k=3, top_p=0.9))
        self.score(["a"])
