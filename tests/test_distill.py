"""White-box distillation of quantization scales lowers KL to the uncompressed model."""

from __future__ import annotations

import pytest
import torch

import edgelm
from edgelm.compress import RTN, DistillScales, compress
from edgelm.compress.calibration import calibration_from_model
from edgelm.errors import RecipeError
from tests.tiny_gguf import TinyConfig, write_tiny_model


def kl(reference, model, tokens):
    with torch.inference_mode():
        p = torch.log_softmax(reference(tokens), -1)
        q = torch.log_softmax(model(tokens), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_distillation_reduces_kl(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    reference, tokenizer = edgelm.load(path)
    calibration = calibration_from_model(reference, tokenizer, n_samples=32, seq_len=48, seed=1)
    held_out = calibration_from_model(reference, tokenizer, n_samples=4, seq_len=48, seed=99).tokens
    seen = calibration.tokens[:4]

    plain, _ = edgelm.load(path)
    compress(plain, [RTN(bits=3, group_size=32)])
    distilled, _ = edgelm.load(path)
    compress(distilled, [RTN(bits=3, group_size=32), DistillScales(steps=60, lr=1e-2, seq_len=48)], calibration)

    # A random-weight model's samples carry little structure to generalize from, so the clear gain is on
    # the calibration text itself; held-out text must still not get worse.
    assert kl(reference, distilled, seen) < 0.7 * kl(reference, plain, seen)
    assert kl(reference, distilled, held_out) < kl(reference, plain, held_out)
    # The result is an ordinary quantized model: same codes, only the fp16 scales moved.
    assert torch.equal(plain.layers[0].attn.wq.weight_q.packed, distilled.layers[0].attn.wq.weight_q.packed)
    assert not torch.equal(plain.layers[0].attn.wq.weight_q.scales, distilled.layers[0].attn.wq.weight_q.scales)
    assert distilled.layers[0].attn.wq.weight_q.scale_gain is None
    assert not hasattr(distilled, "compression_reference")


def test_distill_needs_quantized_layers_and_data(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2"))
    model, tokenizer = edgelm.load(path)
    calibration = calibration_from_model(model, tokenizer, n_samples=2, seq_len=16)
    with pytest.raises(RecipeError, match="after a quantization step"):
        compress(model, [DistillScales(steps=1)], calibration)
    with pytest.raises(RecipeError, match="needs calibration"):
        compress(model, [RTN(), DistillScales(steps=1)], None)
    with pytest.raises(RecipeError, match="uncompressed model"):
        DistillScales(steps=1).apply(model, calibration)


def test_qat_beats_plain_rtn_and_ends_packed(tmp_path):
    from edgelm.compress import QAT
    from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    reference, tokenizer = edgelm.load(path)
    calibration = calibration_from_model(reference, tokenizer, n_samples=32, seq_len=48, seed=1)
    seen = calibration.tokens[:4]
    plain, _ = edgelm.load(path)
    compress(plain, [RTN(bits=3, group_size=32)])
    trained, _ = edgelm.load(path)
    # 120 steps: on this tiny random model 60 steps gained 0-20 % depending on the calibration sample.
    compress(trained, [QAT(bits=3, group_size=32, steps=120, lr=2e-3, seq_len=48)], calibration)
    assert isinstance(trained.layers[0].ffn.w_up, QuantizedLinear)
    assert isinstance(trained.tok_embeddings, QuantizedEmbedding)
    assert trained.norm.weight.requires_grad  # frozen only while training
    # Same storage as RTN at the same scheme, lower divergence from the teacher.
    assert kl(reference, trained, seen) < 0.8 * kl(reference, plain, seen)


def test_black_box_distillation_learns_the_teachers_text(tmp_path):
    from edgelm.compress import BlackBoxDistill

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2", dim=128, hidden_dim=256))
    reference, tokenizer = edgelm.load(path)
    calibration = calibration_from_model(reference, tokenizer, n_samples=16, seq_len=48, seed=1)
    plain, _ = edgelm.load(path)
    compress(plain, [RTN(bits=3, group_size=32)])
    student, _ = edgelm.load(path)
    step = BlackBoxDistill(samples=16, prompt_tokens=8, seq_len=40, steps=60, lr=1e-2, temperature=0.0)
    compress(student, [RTN(bits=3, group_size=32), step], calibration)
    # Greedy teacher text from the same prompts: the student must now imitate it better.
    from edgelm.runtime.generate import generate_step
    from edgelm.runtime.sampling import Sampler, SamplingParams

    prompt = calibration.tokens[0, :8].tolist()
    text = torch.tensor([prompt + list(generate_step(reference, prompt, Sampler(SamplingParams(temperature=0)), 32))])

    def nll(model):
        with torch.inference_mode():
            logits = model(text[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits[0], text[0, 1:]))

    assert nll(student) < 0.9 * nll(plain)


def test_training_device_is_only_a_place_to_run(tmp_path):
    """`device` moves only the training loop: on the CPU it gives the same model as no device, and the
    context it was passed in does not stay on the result. Packed layers, which compute on the CPU only, are
    refused before anything moves; a GPU that is asked for but absent is a one-line error."""
    from edgelm.compress.distill import on_training_device
    from edgelm.errors import DeviceError
    import subprocess
    import sys

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="qwen2"))
    models = []
    for device in (None, "cpu"):
        model, tokenizer = edgelm.load(path)
        calibration = calibration_from_model(model, tokenizer, n_samples=4, seq_len=16, seed=1)
        models.append(compress(model, [RTN(bits=3, group_size=32), DistillScales(steps=3, seq_len=16)],
                               calibration, device=device))
        assert "compression_device" not in models[-1].__dict__
    assert torch.equal(models[0].layers[0].attn.wq.weight_q.scales, models[1].layers[0].attn.wq.weight_q.scales)
    packed, teacher = models[0], edgelm.load(path)[0]
    packed.__dict__["compression_device"] = "cuda"
    with pytest.raises(RecipeError, match="are packed, and packed layers compute on the CPU only"):
        with on_training_device(packed, teacher, "distill"):
            pass
    assert packed.layers[0].attn.wq.weight_q.scales.device.type == "cpu"
    if torch.cuda.is_available():
        return
    with pytest.raises(DeviceError, match="sees no CUDA GPU"):
        compress(teacher, [RTN(bits=4, group_size=32), DistillScales(steps=1, seq_len=16)], calibration,
                 device="cuda")
    done = subprocess.run([sys.executable, "-m", "edgelm", "distill", "-m", str(path), "--teacher", str(path),
                           "--steps", "1", "--device", "cuda", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--device cuda" in done.stderr and not (tmp_path / "out").exists()
