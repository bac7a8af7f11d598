"""Samplers: each filter keeps exactly what its definition says, seeds reproduce, bad values are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelm.errors import GenerationError
from edgelm.runtime.generate import _split_at_stop
from edgelm.runtime.sampling import Sampler, SamplingParams

LOGITS = torch.log(torch.tensor([0.50, 0.20, 0.15, 0.10, 0.05]))


def kept(**params) -> list[int]:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    probs = Sampler(SamplingParams(**{**base, **params})).probabilities(LOGITS)
    return np.flatnonzero(probs > 0).tolist()


def test_filters_keep_what_they_should():
    assert kept() == [0, 1, 2, 3, 4]
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0]  # the first token alone reaches 0.5
    assert kept(top_p=0.7) == [0, 1]
    assert kept(top_p=0.71) == [0, 1, 2]
    assert kept(min_p=0.3) == [0, 1, 2]  # p >= 0.3 * 0.5
    assert kept(min_p=0.41) == [0]


def test_temperature_sharpens_and_greedy_is_one_hot():
    warm = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)).probabilities(LOGITS)
    cold = Sampler(SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0)).probabilities(LOGITS)
    np.testing.assert_allclose(warm, [0.50, 0.20, 0.15, 0.10, 0.05], rtol=1e-6)
    assert cold[0] > warm[0] and cold[4] < warm[4]
    greedy = Sampler(SamplingParams(temperature=0.0)).probabilities(LOGITS)
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_seed_reproduces_and_draws_follow_the_distribution():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    a = [Sampler(params).sample(LOGITS) for _ in range(5)]
    b = [Sampler(params).sample(LOGITS) for _ in range(5)]
    assert a == b
    sampler = Sampler(params)
    draws = torch.tensor([sampler.sample(LOGITS) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.50, 0.20, 0.15, 0.10, 0.05]), atol=0.03, rtol=0)


def test_repeat_penalty_follows_llama_cpp():
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    logits = torch.tensor([3.0, 2.0, -1.0])
    sampler.accept(0)
    sampler.accept(2)
    np.testing.assert_array_equal(sampler.penalized(logits), [1.5, 2.0, -2.0])
    assert sampler.sample(logits) == 1  # token 0 was penalized below token 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=1.0), dict(repeat_penalty=0.0), dict(repeat_last_n=-2)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(GenerationError):
        SamplingParams(**bad)


def test_stop_strings_are_cut_and_partial_matches_held_back():
    assert _split_at_stop("Hello wor", ["world"]) == ("Hello ", "wor", False)
    assert _split_at_stop("Hello world!", ["world"]) == ("Hello ", "", True)
    assert _split_at_stop("abc", []) == ("abc", "", False)
    assert _split_at_stop("Hello wor", ["world"], final=True) == ("Hello wor", "", False)
    assert _split_at_stop("a\n\nb", ["\n\n", "b"]) == ("a", "", True)


def test_pytorch_and_numpy_logits_sample_alike():
    """The sampler computes in numpy; PyTorch logits are read as they are."""
    params = SamplingParams(temperature=0.9, top_k=3, top_p=0.9, seed=11, repeat_penalty=1.3)
    from_torch, from_numpy = Sampler(params), Sampler(params)
    assert [from_torch.sample(LOGITS) for _ in range(50)] == [from_numpy.sample(LOGITS.numpy()) for _ in range(50)]
