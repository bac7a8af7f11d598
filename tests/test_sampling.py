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


def full_vocabulary_chain(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The filter chain written over the whole vocabulary, as its definition reads."""
    masked = logits.astype(np.float32, copy=True)
    if p.top_k:
        masked[logits < np.sort(logits)[-p.top_k]] = -np.inf
    if p.top_p < 1.0:
        e = np.exp(masked.astype(np.float64) - masked.max())
        probs = (e / e.sum()).astype(np.float32)
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        masked[order[before >= p.top_p]] = -np.inf
    if p.min_p > 0.0:
        e = np.exp(masked.astype(np.float64) - masked.max())
        probs = (e / e.sum()).astype(np.float32)
        masked[probs < np.float32(p.min_p) * probs.max()] = -np.inf
    e = np.exp(masked.astype(np.float64) / p.temperature - masked.max() / p.temperature)
    return (e / e.sum()).astype(np.float32)


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.9, 0.05), (0, 0.95, 0.0), (7, 1.0, 0.1), (0, 1.0, 0.0)])
def test_the_chain_on_the_candidates_equals_it_on_the_whole_vocabulary(top_k, top_p, min_p):
    """The sampler filters only top-k's survivors (or the finite logits): same tokens kept, same
    probabilities, ties at the k-th value included; -inf logits (a restricted draft vocabulary) stay 0."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(5000) * 3).astype(np.float32)
    logits[rng.choice(5000, 50)] = logits.max()  # ties at the top
    logits[rng.choice(5000, 1000)] = -np.inf
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = Sampler(params).probabilities(logits)
    reference = full_vocabulary_chain(logits, params)
    assert np.array_equal(ours > 0, reference > 0)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_sorts_only_the_prefix_it_needs_and_keeps_the_same_tokens(spread, top_p):
    from edgelm.runtime.sampling import _softmax, _top_p_prefix

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(50000) * spread).astype(np.float32)
    logits[rng.choice(50000, 200)] = np.sort(logits)[-300]  # ties inside the prefix
    probs = _softmax(logits)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    assert _top_p_prefix(probs, top_p).tolist() == order[before < top_p].tolist()


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
