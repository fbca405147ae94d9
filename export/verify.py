"""Parity report: is what ONNX Runtime serves exactly the model that was trained?

    python -m export.verify --model-dir artifacts

1. logits: the unfolded torch eval model in float64 vs the folded float32 torch model and model.onnx on the
   whole val split (max abs diff)
2. names: torch reference sampler vs the compiled sampler (engine) over a grid of seeds, temperatures,
   top_k, top_p and prefixes: the share of identical names (target 100%) and the max logprob difference;
   then small requests (1-16 names), which the sampler runs in its few-row loop.
For each of --providers (default cpu,cuda; CUDA is skipped where it can't load). Exits 1 if a target is
missed, or if no provider could be checked.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data.files import cli, unwritable, write_text
from export.fold import float64_reference, fold_for_export, folded_logit_error
from export.reference import reference_generate
from service.engine import Engine
from service.params import GenerateParams
from service.session import PROVIDER_ADVICE, ModelFileError, ProviderError, provider_list
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.dataset import build_examples, split_words

LOGIT_TOL = 1e-5
MAX_NAMES = 1_000_000  # names per setting: what engine.generate serves in one call by default
GRID = {  # 3 * 2 * 2 * 3 = 36 settings, cycled over seeds
    "temperature": [1.0, 0.6, 1.5],
    "top_k": [0, 5],
    "top_p": [1.0, 0.9],
    "prefix": ["", "a", "mar"],
}


def logits_parity(model, engine, X):
    onnx_logits = np.concatenate([engine.logits_model.run(None, {"context": X[i : i + 16384].numpy()})[0]
                                  for i in range(0, len(X), 16384)])
    with torch.no_grad():
        ref = float64_reference(model)(X).numpy()
    return {"fold_vs_torch": folded_logit_error(model, fold_for_export(model), X),
            "onnx_vs_torch": float(np.abs(onnx_logits - ref).max())}


def compare(model, vocab, words, engine, params):
    """-> (names, identical names, max logprob diff over the identical ones) for one request."""
    got, ref = engine.generate(params), reference_generate(model, vocab, params, words)
    same = [abs(g.logprob - r[1]) for g, r in zip(got, ref) if g.name == r[0]]
    return len(ref), len(same), max(same, default=0.0)


def names_parity(model, vocab, words, engine, names_per_setting, seeds=(0, 1, 2, 3), small_requests=300):
    """The grid, one request of names_per_setting names per setting; then small_requests requests of 1-16
    names without top-k/top-p (the sampler's few-row loop), prefixes and temperatures cycled."""
    rows, total, same, worst_lp = [], 0, 0, 0.0
    settings = [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    for j, s in enumerate(settings):
        p = GenerateParams(num_samples=names_per_setting, seed=seeds[j % len(seeds)] * 1000 + j, **s)
        n, n_same, lp = compare(model, vocab, words, engine, p)
        rows.append({**s, "seed": p.seed, "names": n, "identical": n_same, "max_logprob_diff": lp})
        total, same, worst_lp = total + n, same + n_same, max(worst_lp, lp)
    small = [compare(model, vocab, words, engine, GenerateParams(
        num_samples=1 if i % 2 == 0 else 2 + i % 15, seed=10**6 + i, prefix=GRID["prefix"][i % 3],
        temperature=GRID["temperature"][i // 3 % 3])) for i in range(small_requests)]
    n, n_same, lp = zip(*small)
    small = {"requests": small_requests, "names": sum(n), "identical": sum(n_same), "max_logprob_diff": max(lp)}
    return {"names": total, "identical": same, "share": same / total, "max_logprob_diff": worst_lp, "settings": rows,
            "small_requests": small}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="artifacts", help="folder with model.pt, model.onnx, sampler.onnx")
    p.add_argument("--names-per-setting", type=int, default=300, help="names per grid setting (36 settings)")
    p.add_argument("--providers", default="cpu,cuda", type=provider_list,
                   help="providers to check (auto, cpu, cuda); cuda is skipped where it can't load")
    p.add_argument("--json", default=None, help="write the report here (default: MODEL_DIR/verify.json)")
    args = p.parse_args(argv)
    if not 1 <= args.names_per_setting <= MAX_NAMES:
        p.error(f"--names-per-setting must be in [1, {MAX_NAMES:,}], got {args.names_per_setting}")
    d = Path(args.model_dir)
    out = Path(args.json) if args.json else d / "verify.json"
    if args.json and (problem := unwritable(out, "--json")) is not None:
        p.error(problem)  # found out now, not after the whole check
    print(f"verify: model_dir={args.model_dir} names_per_setting={args.names_per_setting} "
          f"providers={','.join(args.providers)}")
    try:
        model, vocab, ckpt = load_checkpoint(d / "model.pt")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if not args.json and (problem := unwritable(out, "--model-dir")) is not None:  # (it exists: the checkpoint loaded)
        p.error(problem)
    Xva, _ = build_examples(split_words(ckpt["words"], ckpt["split_seed"])["val"], vocab, model.cfg.block_size)
    report, ok = {}, True
    for provider in args.providers:
        try:
            engine = Engine(d, provider=provider, threads=0)
        except ProviderError as e:
            report[provider] = {"skipped": str(e).removesuffix(PROVIDER_ADVICE)}  # (advice naming the server's --provider)
            print(f"[{provider}] skipped: {report[provider]['skipped']}")
            continue
        except ModelFileError as e:
            sys.exit(f"error: {e}")
        lg = logits_parity(model, engine, Xva)
        nm = names_parity(model, vocab, ckpt["words"], engine, args.names_per_setting)
        report[provider] = {"logits": lg, "names": nm}
        print(f"[{provider}] logits max |diff| from the float64 torch model on {len(Xva)} val contexts: "
              f"folded float32 torch {lg['fold_vs_torch']:.2e}, onnx {lg['onnx_vs_torch']:.2e} (tolerance {LOGIT_TOL:g})")
        print(f"[{provider}] names: {nm['identical']}/{nm['names']} identical ({100 * nm['share']:.3f}%) over "
              f"{len(nm['settings'])} settings (temperature {GRID['temperature']}, top_k {GRID['top_k']}, "
              f"top_p {GRID['top_p']}, prefix {GRID['prefix']}); max logprob diff {nm['max_logprob_diff']:.2e}")
        for r in nm["settings"]:
            if r["identical"] != r["names"]:
                print(f"    mismatch: {r}")
        sm = nm["small_requests"]
        print(f"[{provider}] small requests: {sm['identical']}/{sm['names']} names identical over {sm['requests']} requests "
              f"of 1-16 names (temperatures {GRID['temperature']}, no top-k/top-p); max logprob diff {sm['max_logprob_diff']:.2e}")
        ok &= lg["fold_vs_torch"] <= LOGIT_TOL and lg["onnx_vs_torch"] <= LOGIT_TOL and nm["share"] == 1.0
        ok &= sm["identical"] == sm["names"]
    if all("skipped" in r for r in report.values()):  # keep the last real report
        print(f"FAIL: nothing was checked (no provider given could load); {out} left as it was")
        return 1
    try:
        write_text(out, json.dumps(report, indent=2) + "\n")
    except OSError as e:
        sys.exit(f"error: --json {out}: cannot write it ({e.strerror or e})")
    print(f"wrote {out}\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    cli(main)
