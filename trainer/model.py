"""The BatchNorm MLP: embedding -> flatten -> [Linear(no bias) -> BatchNorm1d -> tanh] x n_layers -> Linear."""
import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

TANH_GAIN = 5 / 3  # torch.nn.init.calculate_gain("tanh")
MAX_PARAMS = 10**9  # 4 GB of float32 weights, more again for gradients and optimiser state
# The training examples are (words' characters, block_size) int64: ~120 MB for names.txt at 64, which is
# longer than any name. Unbounded, --block-size 100000 would ask for hundreds of GB before a step.
MAX_BLOCK_SIZE = 64
MAX_BATCH = 2**20


def run_problem(batch_size, seed):
    """The first problem with a run's minibatch size or seed (train and lr_sweep), as a message naming its
    flag, or None."""
    if not 2 <= batch_size <= MAX_BATCH:
        return f"--batch-size must be in [2, {MAX_BATCH:,}] (BatchNorm needs a batch), got {batch_size}"
    if not 0 <= seed < 2**64:
        return f"--seed must be in [0, 2**64 - 1], got {seed}"
    return None


@dataclass
class ModelConfig:
    vocab_size: int = 27
    block_size: int = 3  # characters of context
    n_embd: int = 10  # embedding size per character
    n_hidden: int = 200  # width of each hidden layer
    n_layers: int = 1  # number of Linear-BatchNorm-tanh blocks
    dropout: float = 0.0  # after each tanh, training only (identity in eval, so export ignores it)

    def problem(self):
        """The first setting this model can't be built with, as a message naming its flag, or None."""
        for name in ("block_size", "n_embd", "n_hidden", "n_layers"):
            if getattr(self, name) < 1:
                return f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
        if self.block_size > MAX_BLOCK_SIZE:
            return f"--block-size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}"
        if not 0 <= self.dropout < 1:  # NaN fails too
            return f"--dropout must be in [0, 1), got {self.dropout}"
        V, E, H = self.vocab_size, self.n_embd, self.n_hidden
        n = V * E + self.block_size * E * H + (self.n_layers - 1) * H * H + H * V  # weights, roughly
        if n > MAX_PARAMS:  # (a failed allocation would end in a traceback, or the OOM killer)
            return (f"--block-size, --n-embd, --n-hidden and --n-layers make a model of ~{n:,} parameters; "
                    f"at most {MAX_PARAMS:,}")
        return None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, init: str = "kaiming"):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        layers = []
        fan_in = cfg.block_size * cfg.n_embd
        for _ in range(cfg.n_layers):
            # No bias: BatchNorm's shift (beta) makes it redundant.
            layers += [nn.Linear(fan_in, cfg.n_hidden, bias=False), nn.BatchNorm1d(cfg.n_hidden), nn.Tanh()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            fan_in = cfg.n_hidden
        self.hidden = nn.Sequential(*layers)
        self.lm_head = nn.Linear(fan_in, cfg.vocab_size)
        self.reset_parameters(init)

    def reset_parameters(self, init="kaiming"):
        """'kaiming': N(0, 1) * (5/3) / sqrt(fan_in), the tanh gain keeps pre-activations at unit std.
        'naive': N(0, 1) everywhere, the lecture's saturated-tanh starting point (for comparison plots)."""
        if init not in ("kaiming", "naive"):
            raise ValueError(f"init must be 'kaiming' or 'naive', got {init!r}")
        nn.init.normal_(self.wte.weight)
        for m in self.linears():
            std = TANH_GAIN / math.sqrt(m.in_features) if init == "kaiming" else 1.0
            nn.init.normal_(m.weight, std=std)
        for m in self.batchnorms():
            m.reset_parameters()
        if init == "kaiming":
            # Output layer scaled down so the initial softmax is near uniform (loss ~ log(vocab_size)).
            nn.init.normal_(self.lm_head.weight, std=0.1 / math.sqrt(self.lm_head.in_features))
        else:
            nn.init.normal_(self.lm_head.weight)
        nn.init.zeros_(self.lm_head.bias)

    def linears(self):
        return [m for m in self.hidden if isinstance(m, nn.Linear)]

    def batchnorms(self):
        return [m for m in self.hidden if isinstance(m, nn.BatchNorm1d)]

    def tanhs(self):
        return [m for m in self.hidden if isinstance(m, nn.Tanh)]

    def forward(self, idx):
        # idx: (B, block_size) int64 -> logits (B, vocab_size)
        x = self.wte(idx).flatten(1)  # (B, block_size * n_embd)
        x = self.hidden(x)  # (B, n_hidden)
        return self.lm_head(x)  # (B, vocab_size)

    def loss(self, idx, targets):
        return F.cross_entropy(self(idx), targets)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
