"""Request parameters and their validation: one error type whose message names the field."""
import math
import secrets
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

MAX_LENGTH_LIMIT = 64  # longest name (prefix included) a request may ask for
DEFAULT_MAX_LENGTH = 32  # names.txt's longest name has 15 characters
SEED_LIMIT = 2**64
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, ~1.2e-38
# Highest temperature: at 100 the trained model's most and least likely letters are within a factor of
# 1.17 for every context (nearly uniform). Far above it (from ~1e9), float64 rounds the weights
# exp(s / temperature) of letters whose logits differ by a float32 step to one value: top-p's ties in
# probability then stop being ties in the logits, and the fast path would keep another nucleus.
MAX_TEMPERATURE = 100.0


class InvalidArgument(ValueError):
    """A request parameter is out of range. `field` names it; str(e) is the user-facing message."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class GenerateParams:
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1 = no nucleus filtering
    seed: Optional[int] = None  # None = draw one; the resolved seed is returned so results can be reproduced
    prefix: str = ""
    max_length: int = DEFAULT_MAX_LENGTH  # characters, prefix included
    only_new: bool = False  # skip names that are in the data set the model was trained from

    def validate(self, itos, max_samples):
        """Checked copy with the seed resolved. itos: the vocabulary, index 0 = end token."""
        V = len(itos)
        _int("num_samples", self.num_samples, 1, max_samples)
        # The sampler runs in float32: a value that float32 rounds to 0 (1e-46) would be a different
        # request (top_p 0 even breaks the graph), so both are checked as float32 holds them.
        t = self.temperature
        if not _float32_ok(t, MAX_TEMPERATURE):
            raise InvalidArgument("temperature", f"must be a number in (0, {MAX_TEMPERATURE:g}] (at least "
                                                 f"{FLOAT32_TINY:.5g} as float32, the sampler's type), got {t!r}")
        _int("top_k", self.top_k, 0, V, "(0 disables top-k)")
        p = self.top_p
        if not _float32_ok(p, 1.0):
            raise InvalidArgument("top_p", f"must be in (0, 1] (at least {FLOAT32_TINY:.5g}), got {p!r}")
        _int("max_length", self.max_length, 1, MAX_LENGTH_LIMIT)
        if not isinstance(self.prefix, str):
            raise InvalidArgument("prefix", f"must be a string, got {type(self.prefix).__name__}")
        bad = outside_vocab(self.prefix, itos)
        if bad:
            raise InvalidArgument("prefix", f"characters {clip(bad)!r} are not in the vocabulary {clip(itos[1:])!r}")
        if len(self.prefix) > self.max_length:
            raise InvalidArgument("prefix", f"has {len(self.prefix)} characters, more than max_length={self.max_length}")
        seed = self.seed
        if seed is None:
            seed = secrets.randbits(63)
        _int("seed", seed, 0, SEED_LIMIT - 1)
        if not isinstance(self.only_new, bool):
            raise InvalidArgument("only_new", f"must be a bool, got {self.only_new!r}")
        return replace(self, seed=int(seed), temperature=float(t), top_p=float(p))

    @property
    def max_tokens(self):
        """Characters that fit after the prefix. The sampler forces the end token after them, so a name
        that reaches max_length is cut there (and its logprob is the score of the name as returned)."""
        return self.max_length - len(self.prefix)


def outside_vocab(text, itos):
    """The characters of text that the vocabulary (itos[1:]; itos[0] is the end token) lacks, sorted."""
    return "".join(sorted(set(text).difference(itos[1:])))


def clip(text, n=40):
    """User input echoed in an error message, cut short: a long one would outgrow gRPC's 16 KiB status
    metadata (and come back as RESOURCE_EXHAUSTED instead of the error)."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def _float32_ok(x, hi):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x > hi:
        return False
    return float(np.float32(x)) >= FLOAT32_TINY  # what the sampler gets: not 0 or a denormal


def _int(field, value, lo, hi, note=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must be in [{lo}, {hi}] {note}".rstrip() + f", got {value}")



def uniform_stream(seed):
    """A request's source of uniforms: PCG64 seeded with the request's seed, read row by row in order as
    generator.random((n, T), dtype=float32). Reading rows in order makes a row's numbers independent of how
    the request is chunked or batched. (Engine and torch reference both draw from here.)"""
    return np.random.Generator(np.random.PCG64(seed))
