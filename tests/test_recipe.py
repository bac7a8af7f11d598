"""Recipes: strict parsing with named errors, and RTN applied to a real (tiny) model."""

from __future__ import annotations

import pytest
import torch

from edgelm.compress import RTN, compress, parse_recipe
from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
from edgelm.errors import RecipeError
from edgelm.io.gguf import GGUFFile
from edgelm.models import load_gguf_model
from tests.tiny_gguf import TinyConfig, write_tiny_model


def test_parse_round_trip():
    steps = parse_recipe([{"rtn": {"bits": 3, "group_size": 32, "ignore": ["layers.0.*"]}}])
    assert steps == [RTN(bits=3, group_size=32, ignore=("layers.0.*",))]
    assert parse_recipe([s.to_dict() for s in steps]) == steps
    assert parse_recipe(["rtn"]) == [RTN()]


@pytest.mark.parametrize("recipe, message", [
    ([{"rnt": {}}], "unknown compression method 'rnt' (did you mean 'rtn'?)"),
    ([{"rtn": {"bit": 4}}], "has no field 'bit' (did you mean 'bits'?)"),
    ([{"rtn": {"bits": "4"}}], "field 'bits' must be int"),
    ([{"rtn": {"bits": 7}}], "bits must be one of"),
    ([{"rtn": {"group_size": 48}}], "group_size must be"),
    ([], "non-empty list"),
    ([{"rtn": {}, "gptq": {}}], "one key"),
    ([{"rtn": 4}], "(rtn): its fields must be a mapping"),
    ([{"rtn": ["bits"]}], "(rtn): its fields must be a mapping"),
    ([{"anyprec": {"group_size": 0}}], "anyprec: group_size must be"),
])
def test_bad_recipes_are_named(recipe, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    assert message in str(info.value)


@pytest.mark.parametrize("bits, max_kl", [(8, 1e-3), (4, 0.1)])
def test_rtn_swaps_modules_and_stays_close(tmp_path, bits, max_kl):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    reference = load_gguf_model(GGUFFile(path))
    model = compress(load_gguf_model(GGUFFile(path)), [RTN(bits=bits, group_size=32, ignore=("layers.0.ffn.*",))])
    assert isinstance(model.tok_embeddings, QuantizedEmbedding)
    assert isinstance(model.layers[1].attn.wq, QuantizedLinear)
    assert isinstance(model.layers[0].ffn.w_up, torch.nn.Linear)  # ignored by the glob
    assert model.layers[1].attn.wq.bias is not None  # qwen2 q/k/v biases survive
    ids = torch.randint(0, model.args.vocab_size, (1, 32))
    with torch.inference_mode():
        p = torch.log_softmax(reference(ids), -1)
        q = torch.log_softmax(model(ids), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert 0 < kl < max_kl
