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

from service.engine import Engine, ProviderError
from service.params import DEFAULT_MAX_LENGTH, GenerateParams
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.sampling import sample_reference

T = DEFAULT_MAX_LENGTH + 1  # uniform columns: max_length characters, then the forced end token


def timed(fn, n_names, min_seconds):
    """names/s of fn() (which makes n_names names), repeated for at least min_seconds after one warm-up."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return reps * n_names / dt, dt / reps


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="artifacts", help="folder with model.pt and the ONNX artifacts")
    p.add_argument("--batch-sizes", default="1,64,4096,65536", help="comma-separated batch sizes")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads, and engine threads (row shards sampled at once); 0 = all cores")
    p.add_argument("--providers", default="cpu,cuda", help="engine providers; cuda is skipped where it can't load")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if args.threads < 0 or min(sizes) < 1 or args.min_seconds <= 0:
        p.error("--threads must be >= 0, --batch-sizes >= 1 and --min-seconds > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench: model_dir={args.model_dir} batch_sizes={sizes} min_seconds={args.min_seconds} "
          f"threads={args.threads or 'all'} cores={os.cpu_count()} torch_threads={torch.get_num_threads()} max_length={T - 1}")
    try:
        model, _, ckpt = load_checkpoint(Path(args.model_dir) / "model.pt")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    g = torch.Generator().manual_seed(0)
    res = {"config": ckpt["model_config"], "cores": os.cpu_count(), "results": []}

    def record(method, batch, names_s, seconds):
        res["results"].append({"method": method, "batch": batch, "names_per_s": names_s, "seconds_per_call": seconds})
        print(f"  {method:<28} batch {batch:>6}  {names_s:>12,.0f} names/s  {seconds * 1e3:>10.3f} ms/call", flush=True)

    n = 200
    record("torch one-at-a-time (a)", 1, *timed(lambda: one_at_a_time(model, n, g), n, args.min_seconds))
    for b in sizes:
        args_b = (torch.zeros(b, model.cfg.block_size, dtype=torch.long), torch.rand(b, T, generator=g),
                  torch.ones(b), torch.zeros(b, dtype=torch.long), torch.ones(b), torch.full((b,), T - 1))
        record("torch reference batched (b)", b, *timed(lambda: sample_reference(model, *args_b), b, args.min_seconds))
        record("torch plain batched (b)", b, *timed(lambda: plain_batched(model, b, g), b, args.min_seconds))
    for provider in args.providers.split(","):
        try:
            engine = Engine(args.model_dir, provider=provider, threads=args.threads, max_rows=max(sizes))
        except ProviderError as e:
            print(f"  engine {provider}: skipped ({e})")
            continue
        for b in sizes:
            params = GenerateParams(num_samples=b, seed=1)
            record(f"onnx engine {provider} (c)", b, *timed(lambda: engine.generate(params), b, args.min_seconds))
        lat = []
        one = GenerateParams(num_samples=1, seed=1)
        for _ in range(2000):
            t0 = time.perf_counter()
            engine.generate(one)
            lat.append(time.perf_counter() - t0)
        p50, p99 = np.percentile(lat[100:], [50, 99]) * 1e3
        res["results"].append({"method": f"onnx engine {provider} single-name latency", "p50_ms": p50, "p99_ms": p99})
        print(f"  onnx engine {provider} single-name latency: p50 {p50:.3f} ms  p99 {p99:.3f} ms")

    best = lambda prefix: max((r for r in res["results"] if r["method"].startswith(prefix)), key=lambda r: r["names_per_s"])  # noqa: E731
    a = best("torch one-at-a-time")
    bt = max((r for r in res["results"] if r["method"].startswith("torch") and "batched" in r["method"]), key=lambda r: r["names_per_s"])
    print(f"\nbest torch batched: {bt['method']} at batch {bt['batch']}: {bt['names_per_s']:,.0f} names/s")
    for provider in args.providers.split(","):
        rows = [r for r in res["results"] if r["method"] == f"onnx engine {provider} (c)"]
        if rows:
            e = max(rows, key=lambda r: r["names_per_s"])
            ratios = {"vs_one_at_a_time": e["names_per_s"] / a["names_per_s"], "vs_best_torch_batched": e["names_per_s"] / bt["names_per_s"]}
            res[f"engine_{provider}_best"] = {**e, **ratios}
            print(f"engine {provider} best: batch {e['batch']}: {e['names_per_s']:,.0f} names/s = "
                  f"{ratios['vs_one_at_a_time']:.0f}x one-at-a-time, {ratios['vs_best_torch_batched']:.1f}x best torch batched")
    out = Path(args.model_dir) / "bench.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
