"""The checkpoint is the single source of truth: weights + model config + vocabulary + metrics + data."""
from dataclasses import asdict
from pathlib import Path

import torch

from trainer.dataset import Vocab
from trainer.model import MLP, ModelConfig


class CheckpointError(Exception):
    """A missing or unreadable checkpoint, with a one-line message."""


def save_checkpoint(path, model, vocab, words, split_seed, train_config, metrics):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_config": asdict(model.cfg),
            "vocab": vocab.chars,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "train_config": asdict(train_config),
            "metrics": metrics,
            "split_seed": split_seed,
            "words": list(words),  # the whole data set: the server marks names it contains as "in training data"
        },
        path,
    )


def load_checkpoint(path):
    """-> (model in eval mode on CPU, vocab, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; run `make train` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = MLP(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        vocab = Vocab(ckpt["vocab"])
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to the user
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        if "weights_only" in str(e) or "Weights only" in str(e):  # not torch's advice to load it unsafely
            detail = "torch.load(weights_only=True) found more than plain tensors and settings"
        raise CheckpointError(f"{path}: not a readable namegen checkpoint ({type(e).__name__}: {detail})") from None
    model.eval()
    return model, vocab, ckpt
