"""Sampling throughput, one run, one trained model:

  (a) the seeds' loop: one name at a time, a torch forward + multinomial per character
  (b) batched torch: the reference sampler (the spec), and a plain batched multinomial sampler
  (c) the ONNX Runtime engine on CPU (and CUDA when it loads)
at batch sizes 1, 64, 4096, 65536. Prints names/s and ratios; writes MODEL_DIR/bench.json.

    python -m export.bench --model-dir artifacts
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.files import cli, unwritable, write_text
from service.engine import Engine
from service.params import DEFAULT_MAX_LENGTH, GenerateParams
from service.session import ModelFileError, ProviderError, provider_list
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.sampling import sample_reference

MAX_BATCH = 1 << 20  # names per timed call: 65536 is the largest; memory grows with it
T = DEFAULT_MAX_LENGTH + 1  # uniform columns: max_length characters, then the forced end token


def timed(fn, n_names, min_seconds, warm=True):
    """names/s of fn() (which makes n_names names), repeated for at least min_seconds (after one warm-up call)."""
    if warm:
        fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return reps * n_names / dt, dt / reps


def single_latency(engine, calls=2000):
    """p50, p99 ms of one-name generate calls, back to back (the first 100 not counted)."""
    one, lat = GenerateParams(num_samples=1, seed=1), []
    for _ in range(calls):
        t0 = time.perf_counter()
        engine.generate(one)
        lat.append(time.perf_counter() - t0)
    return tuple(np.percentile(lat[100:], [50, 99]) * 1e3)


@torch.inference_mode()
def one_at_a_time(model, n, g):
    """The lecture's sampling loop: one name at a time, one forward per character."""
    B = model.cfg.block_size
    for _ in range(n):
        context = [0] * B
        while True:
            probs = torch.softmax(model(torch.tensor([context])), dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break


@torch.inference_mode()
def plain_batched(model, n, g):
    """A straightforward fast torch sampler: batched forward + multinomial over the rows still active."""
    ctx = torch.zeros(n, model.cfg.block_size, dtype=torch.long)
    out = torch.zeros(n, T, dtype=torch.long)
    rows = torch.arange(n)
    for t in range(T):
        ix = torch.multinomial(torch.softmax(model(ctx), dim=1), 1, generator=g)  # (M, 1)
        out[rows, t] = ix[:, 0]
        keep = ix[:, 0] != 0
        rows, ctx = rows[keep], torch.cat([ctx[:, 1:], ix], dim=1)[keep]
        if len(rows) == 0:
            break
    return out


def summarize(rounds, plan, engines, n_rounds):
    """Median and range over rounds of every measurement, and of the per-round ratios; printed as a table."""
    spread = lambda xs: {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}  # noqa: E731
    res = {"rounds": n_rounds, "results": []}
    print(f"\nsummary over {n_rounds} round(s): median names/s (min-max)")
    for method, batch, _, _ in plan:
        xs = [speed[(method, batch)] for speed, _ in rounds]
        res["results"].append({"method": method, "batch": batch, "names_per_s": spread(xs), "per_round": xs})
        print(f"  {method:<28} batch {batch:>6}  {np.median(xs):>12,.0f}  ({min(xs):,.0f}-{max(xs):,.0f})")
    for provider in engines:
        engine_keys = [(m, b) for m, b, _, _ in plan if m == f"onnx engine {provider} (c)"]
        torch_keys = [(m, b) for m, b, _, _ in plan if m.startswith("torch") and "batched" in m]
        # Per round: the engine's best batch size against the loop (a) and against the best torch batched run.
        vs_a = [max(s[k] for k in engine_keys) / s[("torch one-at-a-time (a)", 1)] for s, _ in rounds]
        vs_b = [max(s[k] for k in engine_keys) / max(s[k] for k in torch_keys) for s, _ in rounds]
        best = max(engine_keys, key=lambda k: np.median([s[k] for s, _ in rounds]))
        p50s, p99s = [lat[provider][0] for _, lat in rounds], [lat[provider][1] for _, lat in rounds]
        res[f"engine_{provider}"] = {
            "best_batch": best[1], "vs_one_at_a_time": spread(vs_a), "vs_best_torch_batched": spread(vs_b),
            "single_name_p50_ms": spread(p50s), "single_name_p99_ms": spread(p99s),
        }
        print(f"engine {provider}: best batch {best[1]}; per round {min(vs_a):.0f}-{max(vs_a):.0f}x one-at-a-time "
              f"(median {np.median(vs_a):.0f}x), {min(vs_b):.1f}-{max(vs_b):.1f}x best torch batched "
              f"(median {np.median(vs_b):.1f}x); single name p50 {min(p50s):.3f}-{max(p50s):.3f} ms, "
              f"p99 {min(p99s):.3f}-{max(p99s):.3f} ms")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="artifacts", help="folder with model.pt and the ONNX artifacts")
    p.add_argument("--batch-sizes", default="1,64,4096,65536", help="comma-separated batch sizes")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads, and engine threads (row shards sampled at once); 0 = all cores")
    p.add_argument("--providers", default="cpu,cuda", type=provider_list,
                   help="engine providers (auto, cpu, cuda); cuda is skipped where it can't load")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure everything this many times, interleaved; report medians and per-round ratios")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    for ok, flag, want, got in ((0 <= args.threads <= 256, "--threads", "in [0, 256]", args.threads),
                                (all(1 <= b <= MAX_BATCH for b in sizes), "--batch-sizes", f"in [1, {MAX_BATCH:,}] each",
                                 args.batch_sizes),
                                (0 < args.min_seconds <= 600, "--min-seconds", "in (0, 600]", args.min_seconds),
                                (args.rounds >= 1, "--rounds", ">= 1", args.rounds)):
        if not ok:
            p.error(f"{flag} must be {want}, got {got}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench: model_dir={args.model_dir} batch_sizes={sizes} min_seconds={args.min_seconds} "
          f"rounds={args.rounds} threads={args.threads or 'all'} cores={os.cpu_count()} "
          f"torch_threads={torch.get_num_threads()} max_length={T - 1}")
    try:
        model, _, ckpt = load_checkpoint(Path(args.model_dir) / "model.pt")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    out = Path(args.model_dir) / "bench.json"
    if (problem := unwritable(out, "--model-dir")) is not None:
        p.error(problem)  # found out now, not after the whole benchmark
    g = torch.Generator().manual_seed(0)
    engines = {}
    for provider in args.providers:
        try:
            engines[provider] = Engine(args.model_dir, provider=provider, threads=args.threads, max_rows=max(sizes))
        except ProviderError as e:
            print(f"  engine {provider}: skipped ({e})")
        except ModelFileError as e:
            sys.exit(f"error: {e}")

    # Every measurement, in the order of a round. Rounds repeat the whole list, so each method meets the
    # same slow and fast phases of a shared machine, and ratios are taken within a round.
    plan = [("torch one-at-a-time (a)", 1, lambda: one_at_a_time(model, 200, g), 200)]
    for b in sizes:
        args_b = (torch.zeros(b, model.cfg.block_size, dtype=torch.long), torch.rand(b, T, generator=g),
                  torch.ones(b), torch.zeros(b, dtype=torch.long), torch.ones(b), torch.full((b,), T - 1))
        plan.append(("torch reference batched (b)", b, lambda a=args_b: sample_reference(model, *a), b))
        plan.append(("torch plain batched (b)", b, lambda b=b: plain_batched(model, b, g), b))
    for provider, engine in engines.items():
        for b in sizes:
            params = GenerateParams(num_samples=b, seed=1)
            plan.append((f"onnx engine {provider} (c)", b, lambda e=engine, p=params: e.generate(p), b))

    rounds = []  # per round: {(method, batch): names/s}, and single-name latencies per provider
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        speed, lat = {}, {}
        for method, batch, fn, n in plan:
            names_s, seconds = timed(fn, n, args.min_seconds, warm=r == 0)
            speed[(method, batch)] = names_s
            print(f"  {method:<28} batch {batch:>6}  {names_s:>12,.0f} names/s  {seconds * 1e3:>10.3f} ms/call", flush=True)
        for provider, engine in engines.items():
            lat[provider] = single_latency(engine)
            p50, p99 = lat[provider]
            print(f"  onnx engine {provider} single-name latency: p50 {p50:.3f} ms  p99 {p99:.3f} ms")
        rounds.append((speed, lat))
    res = summarize(rounds, plan, engines, args.rounds)
    res.update(config=ckpt["model_config"], cores=os.cpu_count())
    write_text(out, json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    cli(main)
