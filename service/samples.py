"""Generated names as columns: the engine's result type.

A run of the sampler gives tokens and log-probabilities as arrays; Samples keeps them as three parallel
lists (names, log-probabilities, in-the-training-data flags) instead of an object per name, because at
this model's speed the per-name Python is what a large run spends its serial time on: for 65,536 names,
building a Sample each took ~35 ms on one core here (more when the garbage collector ran meanwhile),
the three lists ~5 ms, while the two cores' sampler run took ~180 ms. Iterating or indexing still gives
Sample objects, built on demand.
"""
from dataclasses import dataclass


@dataclass(slots=True)
class Sample:
    name: str
    logprob: float  # log P(name) under the model: every character and the end token, temperature 1
    in_training_data: bool  # the name is in the word list the model was trained from


class Samples:
    """Parallel lists: names[i] has log-probability logprobs[i] and is in the training data iff
    in_training_data[i]. A sequence of Sample (len, iteration, indexing; a slice is a Samples) that
    grows with extend."""

    __slots__ = ("names", "logprobs", "in_training_data")

    def __init__(self, names=None, logprobs=None, in_training_data=None):
        # Lists are taken as they are (the engine makes them for this; a copy of 65,536 costs ~0.3 ms each).
        self.names, self.logprobs, self.in_training_data = (
            [] if c is None else c if type(c) is list else list(c) for c in (names, logprobs, in_training_data))
        if not len(self.names) == len(self.logprobs) == len(self.in_training_data):
            raise ValueError(f"columns of unequal lengths: {len(self.names)}, {len(self.logprobs)}, "
                             f"{len(self.in_training_data)}")

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return map(Sample, self.names, self.logprobs, self.in_training_data)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Samples(self.names[i], self.logprobs[i], self.in_training_data[i])
        return Sample(self.names[i], self.logprobs[i], self.in_training_data[i])

    def __eq__(self, other):
        return isinstance(other, Samples) and (self.names, self.logprobs, self.in_training_data) == (
            other.names, other.logprobs, other.in_training_data)

    def __repr__(self):
        return f"Samples({len(self)} names: {self.names[:3]!r}{'...' if len(self) > 3 else ''})"

    def rows(self):
        """(name, logprob, in_training_data) tuples, without building Sample objects."""
        return zip(self.names, self.logprobs, self.in_training_data)

    def extend(self, other):
        self.names += other.names
        self.logprobs += other.logprobs
        self.in_training_data += other.in_training_data
        return self

    def where(self, keep):
        """The samples whose flag in `keep` (one per sample) is true."""
        return Samples(*(([x for x, k in zip(col, keep) if k]) for col in
                         (self.names, self.logprobs, self.in_training_data)))
