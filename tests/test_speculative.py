"""Speculative decoding: greedy output identical to plain decoding, sampled tokens distributed as the
target's, acceptance statistics, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import edgelm
from edgelm.compress import RTN, compress
from edgelm.errors import GenerationError
from edgelm.runtime.generate import generate_step
from edgelm.runtime.sampling import Sampler, SamplingParams
from edgelm.runtime.speculative import DraftVocabulary, SpeculativeStats, _accept, speculative_generate_step
from tests.tiny_gguf import TinyConfig, write_tiny_model

GREEDY = SamplingParams(temperature=0)


def count_calls(monkeypatch, owner, name):
    """Counts calls of owner.name (still calling it)."""
    original = getattr(owner, name)

    class Counter:
        calls = 0

    def counted(*args, **kwargs):
        Counter.calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return Counter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny target and a different tiny draft with the same vocabulary."""
    d = tmp_path_factory.mktemp("spec")
    target = write_tiny_model(d / "target.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256, seed=1))
    draft = write_tiny_model(d / "draft.gguf", TinyConfig(arch="qwen2", dim=64, hidden_dim=128, n_layers=2, seed=2))
    return target, draft


def quantized(path):
    """A 4-bit model, which decodes on the compiled step (where the draft vocabulary applies)."""
    model, _ = edgelm.load(str(path))
    compress(model, RTN(bits=4, group_size=32, embedding=True))
    return model


@pytest.mark.parametrize("num_draft,draft_vocab,packed", [(1, None, False), (3, None, False), (5, None, False),
                                                          (3, 40, True), (4, 0, True)])
def test_greedy_output_is_the_targets_own(pair, num_draft, draft_vocab, packed, monkeypatch):
    load = quantized if packed else (lambda path: edgelm.load(str(path))[0])
    target, draft = load(pair[0]), load(pair[1])
    prompt = [1, 17, 42, 99]
    plain = list(generate_step(target, prompt, Sampler(GREEDY), max_tokens=30))
    spec = SpeculativeStats()
    restricted = count_calls(monkeypatch, DraftVocabulary, "logits")
    fast = list(speculative_generate_step(target, draft, prompt, Sampler(GREEDY), max_tokens=30,
                                          num_draft=num_draft, spec_stats=spec, draft_vocab=draft_vocab))
    assert fast == plain
    assert (restricted.calls > 0) == bool(draft_vocab)  # the restricted draft vocabulary ran, or not at all
    assert spec.rounds > 0 and spec.drafted >= spec.accepted >= 0
    assert 0.0 <= spec.acceptance <= 1.0
    assert spec.draft_seconds > 0 and spec.verify_seconds > 0  # every round both proposes and verifies
    assert spec.draft_ms_per_round == pytest.approx(1000 * spec.draft_seconds / spec.rounds)


def test_a_draft_that_is_the_target_is_always_accepted(pair):
    target, _ = edgelm.load(str(pair[0]))
    same, _ = edgelm.load(str(pair[0]))
    spec = SpeculativeStats()
    sampling = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    tokens = list(speculative_generate_step(target, same, [1, 2, 3], Sampler(sampling), max_tokens=25,
                                            num_draft=4, spec_stats=spec))
    assert len(tokens) == 25
    assert spec.acceptance > 0.95 and spec.mean_accepted > 3.5  # p == q: every ratio is 1 (up to rounding)


def _tiered(weight):
    """The same matrix as two row tiers (even and odd rows)."""
    from edgelm.compress.quant.modules import RowTieredWeight

    rows = torch.arange(weight.out_features)
    sets = [rows[rows % 2 == 0], rows[rows % 2 == 1]]
    return RowTieredWeight.from_parts(sets, [weight.select_rows(r) for r in sets])


@pytest.mark.parametrize("arch,tiered", [("qwen2", False), ("qwen2", True), ("gemma3", False)])
def test_draft_vocabulary_scores_its_tokens_as_the_full_output_does(tmp_path, arch, tiered):
    from edgelm.runtime.native import native_decoder

    draft = quantized(write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch=arch, dim=128, hidden_dim=256)))
    head = draft.output if draft.output is not None else draft.tok_embeddings
    if tiered:
        head.weight_q = _tiered(head.weight_q)
    draft.setup_caches(32)
    hidden = native_decoder(draft).final_hidden([1, 17, 42], 0)
    with torch.inference_mode():
        full = draft.logits(torch.from_numpy(hidden)).numpy()
    context = [5, 150, 151, 7]
    vocabulary = DraftVocabulary.build(draft, 64, context)
    restricted = vocabulary.logits(hidden)
    inside = np.zeros(draft.args.vocab_size, dtype=bool)
    inside[:64] = True
    inside[context] = True
    assert np.isneginf(restricted[:, ~inside]).all()
    # The first ids on the kernels as the full output computes them; context ids as float rows (the
    # kernels quantize activations to int8: close, not equal).
    np.testing.assert_allclose(restricted[:, :64], full[:, :64], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(restricted[:, [150, 151]], full[:, [150, 151]], rtol=0.05, atol=0.05)
    vocabulary.add([200, 5])  # a token the context gained, and one it had
    assert np.isfinite(vocabulary.logits(hidden)[:, 200]).all()
    np.testing.assert_allclose(vocabulary.logits(hidden)[:, 200], full[:, 200], rtol=0.05, atol=0.05)
    # New weights (a reload) are not scored with the rows copied from the old ones.
    state = {name: value.clone() for name, value in head.state_dict().items()}
    for name in state:
        if name.endswith("scales"):
            state[name] *= 2
    with torch.inference_mode():  # the kernels' layout was built in inference mode
        head.load_state_dict(state)
        doubled = draft.logits(torch.from_numpy(hidden)).numpy()
    np.testing.assert_allclose(DraftVocabulary.build(draft, 64).logits(hidden)[:, :64], doubled[:, :64],
                               rtol=1e-6, atol=1e-6)


def test_accept_reject_yields_the_target_distribution():
    """The core lemma: d ~ q, accept with min(1, p/q), else draw from max(0, p - q): the result is ~ p."""
    g = torch.Generator().manual_seed(0)
    vocab = 6
    p = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0))
    target_logits = torch.stack([p.log(), p.log()])  # position 0 decides; position 1 would be the bonus
    counts = torch.zeros(vocab)
    trials = 20000
    for _ in range(trials):
        d = sampler.draw(q.numpy())
        counts[_accept(sampler, [d], [q.double().numpy()], target_logits)[0]] += 1
    assert (counts / trials - p).abs().max() < 0.015, (counts / trials, p)
    # and not q's, which differs
    assert (counts / trials - q).abs().max() > 0.05
    # A draft that cannot propose some tokens (a restricted draft vocabulary: q = 0 there) changes nothing.
    q_cut = q.clone()
    q_cut[[1, 4]] = 0
    q_cut /= q_cut.sum()
    counts.zero_()
    for _ in range(trials):
        d = sampler.draw(q_cut.numpy())
        counts[_accept(sampler, [d], [q_cut.double().numpy()], target_logits)[0]] += 1
    assert (counts / trials - p).abs().max() < 0.015, (counts / trials, p)


def test_bad_settings_are_refused(pair, tmp_path):
    target, _ = edgelm.load(str(pair[0]))
    draft, _ = edgelm.load(str(pair[1]))
    assert list(speculative_generate_step(target, draft, [1, 2], max_tokens=0)) == []  # as generate_step
    with pytest.raises(GenerationError, match="num-draft"):
        list(speculative_generate_step(target, draft, [1, 2], num_draft=0))
    with pytest.raises(GenerationError, match="draft-vocab"):
        list(speculative_generate_step(target, draft, [1, 2], draft_vocab=-1))
    with pytest.raises(GenerationError, match="its own draft"):  # one object, one KV cache
        list(speculative_generate_step(target, target, [1, 2]))
    other = write_tiny_model(tmp_path / "gemma.gguf", TinyConfig(arch="gemma3"))
    gemma, _ = edgelm.load(str(other))
    with pytest.raises(GenerationError, match="vocabulary"):
        list(speculative_generate_step(target, gemma, [1, 2]))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True)


def test_cli_draft_gives_the_same_greedy_text_and_reports_acceptance(pair, tmp_path):
    common = ["generate", "-m", str(pair[0]), "-p", "hello world", "-n", "20", "--temp", "0"]
    plain = run_cli(*common)
    spec = run_cli(*common, "--draft", str(pair[1]), "--num-draft", "3", "-v")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft tokens accepted" in spec.stderr and "ms + verification" in spec.stderr
    other = write_tiny_model(tmp_path / "gemma.gguf", TinyConfig(arch="gemma3"))
    bad = run_cli(*common, "--draft", str(other))
    assert bad.returncode != 0 and "vocabulary" in bad.stderr and "Traceback" not in bad.stderr
    alone = run_cli(*common, "--draft-vocab", "100")  # nothing to restrict without a draft
    assert alone.returncode != 0 and "--draft" in alone.stderr and "Traceback" not in alone.stderr


def test_self_speculative_draft_from_an_any_precision_directory(tmp_path):
    """--draft N: the same any-precision store at N bits drafts for the model at --bits."""
    from edgelm.compress import compress
    from edgelm.compress.quant.anyprec import AnyPrecision
    from edgelm.io.artifact import save_artifact

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    model, tokenizer = edgelm.load(path)
    compress(model, [AnyPrecision(max_bits=8, min_bits=3, bits=8, group_size=32)])
    store = save_artifact(model, tokenizer, tmp_path / "ap")
    common = ["generate", "-m", str(store), "--bits", "8", "-p", "hello", "-n", "16", "--temp", "0"]
    plain = run_cli(*common)
    spec = run_cli(*common, "--draft", "3", "-v")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and "draft tokens accepted" in spec.stderr
    not_a_store = run_cli("generate", "-m", str(path), "-p", "hello", "-n", "4", "--draft", "3")
    assert not_a_store.returncode == 1 and "needs an any-precision model directory" in not_a_store.stderr


@pytest.fixture(scope="module")
def engine_pair(pair, tmp_path_factory):
    """The pair as 4-bit model directories, which run on the kernels alone."""
    from edgelm.io.artifact import save_artifact
    from edgelm.runtime.engine import unsupported_reason

    d = tmp_path_factory.mktemp("spec-dirs")
    paths = []
    for path, name in zip(pair, ("target", "draft")):
        _, tokenizer = edgelm.load(str(path))
        paths.append(save_artifact(quantized(path), tokenizer, d / name))
        assert unsupported_reason(paths[-1]) is None
    return paths


def test_a_tiered_engine_drafts_for_itself_from_a_restricted_vocabulary(tmp_path, monkeypatch):
    """A twin of the target drafts (so nearly every draft passes) from 64 of the vocabulary's ids, its output
    matrix in two row tiers (as mixed precision stores gemma-3-270m's)."""
    from edgelm.runtime.engine import KernelEngine
    from tests.test_engine import tiny_directory

    path = tiny_directory(tmp_path, "gemma3", tiered=True)
    target, twin = KernelEngine.load(path), KernelEngine.load(path)
    prompt = [2, 17, 42, 99]
    plain = list(generate_step(target, prompt, Sampler(GREEDY), max_tokens=30))
    restricted = count_calls(monkeypatch, DraftVocabulary, "logits")
    spec, whole = SpeculativeStats(), SpeculativeStats()
    assert list(speculative_generate_step(target, twin, prompt, Sampler(GREEDY), max_tokens=30, num_draft=3,
                                          spec_stats=spec, draft_vocab=64)) == plain
    assert restricted.calls > 0
    assert list(speculative_generate_step(target, twin, prompt, Sampler(GREEDY), max_tokens=30, num_draft=3,
                                          spec_stats=whole, draft_vocab=0)) == plain
    assert whole.acceptance > 0.9  # the twin agrees with the target
    inside = np.zeros(target.args.vocab_size, dtype=bool)
    inside[:64] = True
    inside[prompt] = True
    # Drafts fail only where the target's token was not yet among the draft's candidates.
    assert spec.acceptance >= whole.acceptance - np.mean(~inside[plain]) - 0.1


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_engines_speculate_with_the_engines_greedy_text(engine_pair, draft_vocab):
    from edgelm.runtime.engine import KernelEngine

    target, draft = (KernelEngine.load(path) for path in engine_pair)
    prompt = [1, 17, 42, 99]
    plain = list(generate_step(target, prompt, Sampler(GREEDY), max_tokens=30))
    spec = SpeculativeStats()
    fast = list(speculative_generate_step(target, draft, prompt, Sampler(GREEDY), max_tokens=30, num_draft=3,
                                          spec_stats=spec, draft_vocab=draft_vocab))
    assert fast == plain and spec.rounds > 0
    if draft_vocab:
        vocabulary = DraftVocabulary.build(draft, draft_vocab, prompt)
        assert vocabulary is not None and vocabulary.members.sum() < draft.args.vocab_size
    # A PyTorch draft for an engine target works too.
    torch_draft, _ = edgelm.load(str(engine_pair[1]))
    mixed = list(speculative_generate_step(target, torch_draft, prompt, Sampler(GREEDY), max_tokens=30,
                                           num_draft=3, draft_vocab=draft_vocab))
    assert mixed == plain


def test_cli_draft_keeps_the_text_of_a_model_directory(engine_pair):
    """`generate -m DIR` runs on the kernels alone; with --draft the target must still decode that way."""
    common = ["generate", "-m", str(engine_pair[0]), "-p", "hello world", "-n", "24", "--temp", "0"]
    plain = run_cli(*common)
    spec = run_cli(*common, "--draft", str(engine_pair[1]), "--num-draft", "3", "--draft-vocab", "40", "-v")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft tokens accepted" in spec.stderr
