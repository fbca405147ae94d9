"""Export the trained checkpoint: fold BatchNorm, write model.onnx (logits) and sampler.onnx (sampling loop).

    python -m export.export --checkpoint artifacts/model.pt --out-dir artifacts
"""
import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from data.files import cli, replacing
from data.names import sha256_of
from export.fold import fold_for_export, folded_logit_error
from export.graphs import OPSET, build_logits_model, logit_shift
from export.sampler_graph import build_sampler_model
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.dataset import build_examples, split_words

FOLD_TOLERANCE = 1e-5


@dataclass
class ExportReport:
    checkpoint: str
    checkpoint_sha256: str
    fold_max_abs_logit_diff: float  # folded vs unfolded eval model, whole val split
    val_examples: int
    model_onnx: str
    sampler_onnx: str
    opset: int
    fast_path_logit_shift: float | None  # graphs.logit_shift: None = the fast path subtracts each row's max


def metadata(ckpt, sha):
    """What a server needs without the checkpoint. Words go in their own key (newline-joined)."""
    metrics = {k: v for k, v in ckpt["metrics"].items() if k != "val_curve"}
    return {
        "namegen": json.dumps({
            "vocab": "." + ckpt["vocab"],
            "block_size": ckpt["model_config"]["block_size"],
            "config": ckpt["model_config"],
            "metrics": metrics,
            "num_params": metrics.get("num_params", 0),
            "checkpoint_sha256": sha,
        }),
        "words": "\n".join(ckpt["words"]),
    }


def export(checkpoint, out_dir):
    model, vocab, ckpt = load_checkpoint(checkpoint)
    if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointError(f"{checkpoint}: weights that are NaN or infinite (the training diverged); "
                              "train again, e.g. with a lower --lr")
    folded = fold_for_export(model)  # float64; each graph casts to its own dtype
    val = split_words(ckpt["words"], ckpt["split_seed"])["val"]
    Xva, _ = build_examples(val, vocab, model.cfg.block_size)
    diff = folded_logit_error(model, folded, Xva)
    if diff > FOLD_TOLERANCE:
        m, why = ckpt["metrics"], ""
        if m.get("val_loss", 0) > m.get("bigram_val_loss", math.inf):  # huge logits: float32 can't hold 1e-5
            why = (f" (its val loss {m['val_loss']:.4g} is worse than the bigram baseline's "
                   f"{m['bigram_val_loss']:.4g}: the training diverged; train again with a lower --lr)")
        raise RuntimeError(f"folding changed the logits by {diff:.2e} > {FOLD_TOLERANCE:g}; refusing to export{why}")
    sha = sha256_of(checkpoint)
    meta = metadata(ckpt, sha)
    out = Path(out_dir)
    paths = out / "model.onnx", out / "sampler.onnx"
    for path, build in zip(paths, (build_logits_model, build_sampler_model)):
        graph = build(folded, model.cfg.block_size, meta)
        try:
            with replacing(path) as tmp:  # whole or not at all: a half-written graph must not look exported
                onnx.save(graph, tmp)
                onnx.checker.check_model(str(tmp), full_check=True)
        except OSError as e:
            raise RuntimeError(f"--out-dir {out}: cannot write {path.name} there ({e.strerror or e})") from None
    return ExportReport(str(checkpoint), sha, diff, len(Xva), str(paths[0]), str(paths[1]), OPSET, logit_shift(folded))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="artifacts/model.pt", help="trained checkpoint (make train)")
    p.add_argument("--out-dir", default=None,
                   help="where model.onnx and sampler.onnx go (default: the checkpoint's folder, beside it)")
    args = p.parse_args(argv)
    if args.out_dir is None:  # the server and verify look for the graphs beside the checkpoint they came from
        args.out_dir = str(Path(args.checkpoint).parent)
    print(f"export: checkpoint={args.checkpoint} out_dir={args.out_dir}")
    try:
        with torch.no_grad():
            report = export(args.checkpoint, args.out_dir)
    except (CheckpointError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    for k, v in asdict(report).items():
        print(f"  {k}: {v}")
    return report


if __name__ == "__main__":
    cli(main)
