"""The checkpoint is the single source of truth: weights + model config + vocabulary + metrics + data."""
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from data.files import replacing
from trainer.dataset import Vocab, split_words
from trainer.model import MLP, ModelConfig

KEYS = ("model_config", "vocab", "state_dict", "train_config", "metrics", "split_seed", "words")


class CheckpointError(Exception):
    """A missing or unreadable checkpoint, with a one-line message."""


def save_checkpoint(path, model, vocab, words, split_seed, train_config, metrics):
    ckpt = {
        "model_config": asdict(model.cfg),
        "vocab": vocab.chars,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train_config": asdict(train_config),
        "metrics": metrics,
        "split_seed": split_seed,
        "words": list(words),  # the whole data set: the server marks names it contains as "in training data"
    }
    with replacing(path) as tmp:  # whole or not at all: Ctrl-C while saving keeps the previous checkpoint
        torch.save(ckpt, tmp)


def load_checkpoint(path):
    """-> (model in eval mode on CPU, vocab, checkpoint dict)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file (e.g. {path / 'model.pt'})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; run `make train` first")
    try:
        # torch.load doesn't check the zip's CRCs: a flipped byte in a tensor would load as another weight.
        with zipfile.ZipFile(path) as z:
            if (bad := z.testzip()) is not None:
                raise ValueError(f"CRC mismatch in {bad}: the file is damaged")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if missing := [k for k in KEYS if k not in ckpt]:
            raise ValueError(f"missing {', '.join(missing)}")
        model = MLP(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        vocab = Vocab(ckpt["vocab"])
        if vocab.size != model.cfg.vocab_size or not set("".join(ckpt["words"])) <= set(vocab.chars):
            raise ValueError(f"the vocabulary ({vocab.size} tokens) doesn't fit the model "
                             f"({model.cfg.vocab_size}) or the words")
        split_words(ckpt["words"], ckpt["split_seed"])  # later steps evaluate on its splits
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to the user
        # Every line: load_state_dict names the missing or mis-shaped weights on the lines after its first.
        detail = " ".join(line.strip() for line in str(e).strip().splitlines())
        if len(detail) > 200:
            detail = detail[:200].rsplit(" ", 1)[0] + " ..."
        if "weights_only" in str(e) or "Weights only" in str(e):  # not torch's advice to load it unsafely
            detail = "torch.load(weights_only=True) found more than plain tensors and settings"
        raise CheckpointError(f"{path}: not a readable namegen checkpoint ({type(e).__name__}: {detail}); "
                              "train again (`make train`) or pass the right checkpoint") from None
    model.eval()
    return model, vocab, ckpt
