"""The sampling spec (trainer/sampling.py) on hand-made distributions."""
import math

import pytest
import torch

from trainer.sampling import filter_weights, inverse_cdf, sampling_weights

LOGITS = torch.log(torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4]]))  # token 1 has probability 0


def weights(temperature=1.0, top_k=0, top_p=1.0):
    _, d, w = sampling_weights(LOGITS, torch.tensor([temperature]))
    return filter_weights(d, w, torch.tensor([top_k]), torch.tensor([top_p]))


def test_inverse_cdf_boundaries():
    w = weights()
    assert inverse_cdf(w, torch.tensor([0.0])).item() == 0
    assert inverse_cdf(w, torch.tensor([0.0999])).item() == 0
    assert inverse_cdf(w, torch.tensor([0.1001])).item() == 2  # skips the zero-probability token 1
    assert inverse_cdf(w, torch.tensor([1 - 2**-24])).item() == 4  # the largest float32 uniform
    # Every pick over a fine grid of u has positive weight, and frequencies match the probabilities.
    u = torch.linspace(0, 1 - 2**-24, 100001)
    tok = inverse_cdf(w.expand(len(u), -1), u)
    assert (w[0, tok] > 0).all()
    freq = torch.bincount(tok, minlength=5).float() / len(u)
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4]), atol=1e-3)


def test_leading_zero_weight_is_skipped_at_u0():
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert inverse_cdf(w, torch.tensor([0.0])).item() == 2


@pytest.mark.parametrize("top_k, kept", [(1, [4]), (2, [3, 4]), (3, [2, 3, 4]), (0, [0, 2, 3, 4]), (99, [0, 2, 3, 4])])
def test_top_k(top_k, kept):
    assert torch.nonzero(weights(top_k=top_k)[0]).flatten().tolist() == kept


@pytest.mark.parametrize("top_p, kept", [(0.01, [4]), (0.39, [4]), (0.41, [3, 4]), (0.69, [3, 4]), (0.75, [2, 3, 4]), (1.0, [0, 2, 3, 4])])
def test_top_p(top_p, kept):
    assert torch.nonzero(weights(top_p=top_p)[0]).flatten().tolist() == kept


def test_top_k_ties_are_kept_together():
    _, d, w = sampling_weights(torch.tensor([[1.0, 2.0, 2.0, 0.5]]), torch.tensor([1.0]))
    assert torch.nonzero(filter_weights(d, w, torch.tensor([1]), torch.tensor([1.0]))[0]).flatten().tolist() == [1, 2]


def test_temperature():
    p = lambda t: (w := weights(temperature=t)[0]) / w.sum()  # noqa: E731
    assert torch.allclose(p(1.0), torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4]), atol=1e-6)
    assert p(0.01)[4] > 0.999  # cold -> argmax
    assert 0.24 < p(100.0)[0] < 0.25 and p(100.0)[1] == 0  # hot -> near uniform over the possible tokens
    assert math.isclose(p(0.5)[4].item(), 0.16 / 0.30, rel_tol=1e-5)  # p ** 2 renormalised


def test_top_p_stops_where_the_mass_reaches_top_p():
    """The nucleus is the fewest most likely tokens whose mass reaches top_p: a mass of exactly top_p is enough."""
    w = torch.tensor([[0.5, 0.5, 1.0]], dtype=torch.float64)  # probabilities 1/4, 1/4, 1/2, exact in binary
    d = torch.log(w)

    def kept(top_p):
        top_p = torch.tensor([top_p], dtype=torch.float64)
        return torch.nonzero(filter_weights(d, w, torch.tensor([0]), top_p)[0]).flatten().tolist()

    assert kept(0.5) == [2]
    assert kept(0.5 + 1e-9) == [0, 1, 2]  # past 1/2: the next token, and its tie with it
