"""Vocabulary, deterministic train/val/test split, and (context -> next char) examples."""
import random
from dataclasses import dataclass

import torch

from data.names import END, DataError


@dataclass
class Vocab:
    """Characters of the data set; index 0 is the start/end token '.'."""

    chars: str  # sorted characters of the data, without END

    @classmethod
    def from_words(cls, words):
        return cls("".join(sorted(set("".join(words)))))

    @property
    def itos(self):
        return END + self.chars

    @property
    def stoi(self):
        return {c: i for i, c in enumerate(self.itos)}

    @property
    def size(self):
        return len(self.chars) + 1

    def encode(self, s):
        stoi = self.stoi
        return [stoi[c] for c in s]

    def decode(self, ids):
        itos = self.itos
        return "".join(itos[i] for i in ids)


def split_words(words, seed=42):
    """80/10/10 split after the lecture's `random.seed(42); random.shuffle(words)`."""
    words = list(words)
    random.Random(seed).shuffle(words)  # same permutation as random.seed(seed); random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    splits = {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}
    empty = [k for k, v in splits.items() if not v]
    if empty:
        raise DataError(f"{len(words)} words are too few for an 80/10/10 train/val/test split ({' and '.join(empty)} "
                        "would be empty); give at least 6")
    return splits


def build_examples(words, vocab, block_size):
    """Every (context, next char) pair: X (M, block_size) int64, Y (M,) int64.

    Each word contributes len(word) + 1 examples; the context starts as block_size end tokens.
    """
    stoi = vocab.stoi
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + END:
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X, dtype=torch.long).view(-1, block_size), torch.tensor(Y, dtype=torch.long)
