"""The compiled CPU kernels: plane layout, fused dequantize-and-dot on every bit width and group size,
SIMD and portable paths, threads, scattered outputs."""

from __future__ import annotations

import shutil
from contextlib import nullcontext

import pytest
import torch

from edgelm import kernels
from edgelm.compress.quant.modules import PackedWeight
from edgelm.compress.quant.primitives import QuantScheme, compute_params, quantize
from edgelm.kernels import KernelMatrix, QuantizedActivations
from edgelm.kernels.layout import from_planes, planes, to_planes

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="kernels not built (no C compiler)")


def packed(rows: int, cols: int, bits: int, group: int, seed: int = 0, symmetric: bool = False) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scheme = QuantScheme(bits, group, symmetric)
    scale, zero = compute_params(w, scheme)
    return PackedWeight.from_codes(quantize(w, scale, zero, scheme), scale, zero, scheme)


def reference(weight: PackedWeight, qa: QuantizedActivations) -> torch.Tensor:
    """What the kernel computes: the dequantized weight times the dequantized int8 activations."""
    x = (qa.xq.float().view(qa.n_tokens, -1, 32) * qa.dx[..., None]).view(qa.n_tokens, -1)
    return x.double() @ weight.dequantize().double().T


def test_kernels_are_built_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert kernels.available(), "setup.py should have built edgelm.kernels._native with this machine's compiler"
    assert kernels.cpu_path() in ("AVX-512 VNNI", "AVX2", "generic C", "unavailable")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [192, 256, 640])  # a partial quad only, one full quad, both
def test_plane_layout_round_trips_and_costs_exactly_b_bits(bits, cols):
    codes = torch.randint(0, 1 << bits, (5, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    data = to_planes(codes, bits)
    assert data.shape == (5, cols * bits // 8)
    assert sum(planes(bits)) == bits
    assert torch.equal(from_planes(data, bits, cols), codes)


def test_a_full_quad_stores_its_transposed_vectors():
    """4 bits: byte i of the first 64 holds transposed vectors 0 and 1 at byte i, i.e. codes 64 j + 16 q + b
    and the same + 4 (i = 16 q + 4 j + b); the chunks of a partial quad follow, chunk by chunk."""
    codes = torch.randint(0, 16, (1, 320), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = to_planes(codes, 4)[0]
    for i in (0, 5, 23, 63):
        q, j, b = i // 16, (i // 4) % 4, i % 4
        code = 64 * j + 16 * q + b
        assert data[i] == codes[0, code] | codes[0, code + 4] << 4
        assert data[64 + i] == codes[0, code + 8] | codes[0, code + 12] << 4
    assert data[128 + 3] == codes[0, 256 + 3] | codes[0, 256 + 35] << 4  # the tail chunk's nibble plane


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])
def test_matvec_matches_dequantized_reference(bits, group):
    weight = packed(70, 512, bits, group, seed=bits * 1000 + group)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    qa = QuantizedActivations(x)
    km = KernelMatrix.from_packed(weight)
    assert km.nbytes == weight.storage_bytes
    expected = reference(weight, qa)
    for n_tokens in (1, 3):  # one token streams the codes; several decode each row once
        part = QuantizedActivations(x[:n_tokens])
        got = km.matvec(part).double()
        scale = expected[:n_tokens].abs().max()
        assert (got - expected[:n_tokens]).abs().max() / scale < 1e-5, (bits, group, n_tokens)
    # and the int8 activations cost little against the float product
    exact = x.double() @ weight.dequantize().double().T
    assert (km.matvec(qa).double() - exact).norm() / exact.norm() < 0.02


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols,group", [(640, 32), (640, 16), (4416, 16), (4416, 64)])
def test_a_batch_gives_each_token_its_single_token_result_bit_for_bit(bits, cols, group):
    """One token, 2-8 tokens (rows decoded in registers, long rows by segments) and longer batches (rows
    decoded into a buffer) take different paths through the same arithmetic: speculative verification and
    prefill must reproduce plain decoding exactly. Rows of 640: two full quads and a partial one; of 4416:
    17 full quads and a partial one, more than one segment; groups of 16 take their scales another way.
    37 rows: a last short block."""
    weight = packed(37, cols, bits, group, seed=bits)
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(bits))
    km = KernelMatrix.from_packed(weight)
    single = torch.cat([km.matvec(QuantizedActivations(x[t:t + 1])) for t in range(9)])
    for n in (2, 3, 4, 5, 8, 9):
        assert torch.equal(km.matvec(QuantizedActivations(x[:n])), single[:n]), n
    expected = reference(weight, QuantizedActivations(x))
    assert (single.double() - expected).abs().max() / expected.abs().max() < 1e-5


@needs_kernels
@pytest.mark.parametrize("bits", [5, 8])
def test_symmetric_grids_run_with_their_fixed_zero_point(bits):
    """ggml's Q5_0 / Q8_0 grids (kept losslessly by the `source` step) are symmetric."""
    weight = packed(40, 256, bits, 32, symmetric=True)
    assert kernels.supports(weight.scheme.bits, weight.scheme.group_size, 256, "uint8")
    qa = QuantizedActivations(torch.randn(2, 256, generator=torch.Generator().manual_seed(5)))
    expected = reference(weight, qa)
    got = KernelMatrix.from_packed(weight).matvec(qa).double()
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5


@needs_kernels
@pytest.mark.parametrize("group", [32, 64])
def test_fp16_zero_points_run_too(group):
    """ggml Q4_K grids (kept by the `source` step) have fractional zero points, stored as fp16."""
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (50, 256), dtype=torch.uint8, generator=g)
    scale = torch.rand(50, 256 // group, generator=g) * 0.1 + 0.01
    zero = torch.rand(50, 256 // group, generator=g) * 15
    weight = PackedWeight.from_codes(codes, scale, zero, QuantScheme(4, group), zero_dtype=torch.float16)
    assert kernels.supports(weight.scheme.bits, weight.scheme.group_size, 256, "float16")
    km = KernelMatrix.from_packed(weight)
    qa = QuantizedActivations(torch.randn(3, 256, generator=g))
    expected = reference(weight, qa)
    for path in (kernels.generic_path, None):
        with path() if path else nullcontext():
            got = km.matvec(qa).double()
        assert (got - expected).abs().max() / expected.abs().max() < 1e-5
        single = km.matvec(QuantizedActivations(torch.randn(3, 256, generator=torch.Generator().manual_seed(7))[:1]))
        assert single.shape == (1, 50)


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 128), (8, 64), (6, 16), (5, 64), (1, 32), (2, 16), (7, 128)])
@pytest.mark.parametrize("cols", [640, 1024])  # a partial last quad, and full quads only
def test_portable_path_agrees_with_every_simd_path(bits, group, cols):
    """Each SIMD path this CPU has (AVX-512 VNNI, AVX2) against the portable loop: matvec for one and
    several tokens, and dequantization bit for bit (float32 and bfloat16)."""
    weight = packed(33, cols, bits, group)
    km = KernelMatrix.from_packed(weight)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(2))
    qa = QuantizedActivations(x)
    with kernels.generic_path():
        portable = km.matvec(qa)
        dense = km.dequantize(), km.dequantize(dtype=torch.bfloat16)
    for path in kernels.simd_paths():
        with kernels.limited_path(path):
            fast = km.matvec(qa)
            # the same products, summed in another order: float32 rounding of sums up to ~100
            assert torch.allclose(fast, portable, rtol=1e-5, atol=1e-6 * float(portable.abs().max())), path
            assert torch.equal(km.matvec(QuantizedActivations(x[1:2])), fast[1:2]), path  # alone = in a batch
            assert torch.equal(km.dequantize(), dense[0]), path
            assert torch.equal(km.dequantize(dtype=torch.bfloat16), dense[1]), path


@needs_kernels
def test_activation_quantization_is_the_same_on_every_path():
    """The SIMD path quantizes activations to exactly the portable path's codes, scales and sums (ties
    rounded to even, a zero block, values spanning magnitudes)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 640, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[torch.randint(0, 3, (64, 640), generator=g)]
    x[0, :32] = 0
    x[1, :32] = torch.arange(32) - 15.5
    x[2, :32] = 127.0 / torch.arange(1, 33)
    with kernels.generic_path():
        portable = QuantizedActivations(x)
    for path in kernels.simd_paths():
        with kernels.limited_path(path):
            fast = QuantizedActivations(x)
        for name in ("xq", "dx", "bsum"):
            assert torch.equal(getattr(fast, name), getattr(portable, name)), (path, name)


@needs_kernels
def test_threads_do_not_change_the_result_and_outputs_can_be_scattered():
    weight = packed(4099, 128, 4, 64)  # an odd row count: uneven pieces across threads
    km = KernelMatrix.from_packed(weight)
    qa = QuantizedActivations(torch.randn(1, 128, generator=torch.Generator().manual_seed(3)))
    previous = kernels.threads()
    kernels.set_threads(1)
    try:
        one = km.matvec(qa)
        kernels.set_threads(2)
        two = km.matvec(qa)
    finally:
        kernels.set_threads(previous)
    assert torch.equal(one, two)
    where = torch.randperm(8000, generator=torch.Generator().manual_seed(4))[:4099].to(torch.int32)
    out = torch.full((1, 8000), float("nan"))
    km.matvec(qa, out=out, out_index=where)
    assert torch.equal(out[0, where.long()], one[0])
    assert torch.isnan(out).sum() == 8000 - 4099


@needs_kernels
def test_mismatched_activations_are_refused():
    km = KernelMatrix.from_packed(packed(8, 128, 4, 64))
    with pytest.raises(ValueError, match="128"):
        km.matvec(torch.randn(1, 64))


@needs_kernels
@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_quantized_model_decodes_the_same_on_the_kernels(tmp_path, monkeypatch, arch):
    """Decoding a quantized model (embedding and tied output included) on the kernels gives the logits of
    the dequantizing path up to the int8 activations, and the same greedy tokens."""
    import edgelm
    from edgelm.compress import RTN, compress
    from edgelm.compress.quant import modules
    from edgelm.runtime.generate import generate_step
    from edgelm.runtime.sampling import Sampler, SamplingParams
    from tests.tiny_gguf import TinyConfig, write_tiny_model

    path = write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch=arch, dim=128, hidden_dim=256))
    model, _ = edgelm.load(str(path))
    compress(model, RTN(bits=4, group_size=32, embedding=True))
    prompt = [1, 5, 9, 13]

    def run() -> tuple[list[int], torch.Tensor]:
        model.setup_caches(16)
        try:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))[0, -1]
        finally:
            model.clear_caches()
        return list(generate_step(model, prompt, Sampler(SamplingParams(temperature=0)), max_tokens=8)), logits

    fast_tokens, fast_logits = run()
    monkeypatch.setattr(modules, "KERNEL_MAX_TOKENS", 0)
    float_tokens, float_logits = run()
    assert fast_tokens == float_tokens
    assert (fast_logits - float_logits).norm() / float_logits.norm() < 0.05  # 3 random layers, int8 x
    assert not torch.equal(fast_logits, float_logits)  # the kernels really ran


@needs_kernels
@pytest.mark.parametrize("bits,group", [(1, 64), (2, 256), (3, 128), (4, 32), (5, 32), (6, 16), (7, 64), (8, 128)])
def test_dequantize_is_the_reference_bit_for_bit(bits, group):
    weight = packed(37, 768, bits, group, seed=bits)  # two full quads and a partial one
    km = KernelMatrix.from_packed(weight)
    expected = weight.dequantize()
    assert torch.equal(km.dequantize(), expected)
    assert torch.equal(km.dequantize(dtype=torch.bfloat16, parallel=False), expected.bfloat16())  # round to even
    assert torch.equal(km.dequantize(5, 10), expected[5:15])
    with kernels.generic_path():
        assert torch.equal(km.dequantize(dtype=torch.bfloat16), expected.bfloat16())
    with pytest.raises(ValueError, match="rows 30"):
        km.dequantize(30, 10)


@needs_kernels
def test_batched_matmul_dequantizes_in_blocks_and_scatters(monkeypatch):
    from edgelm.compress.quant import modules
    from edgelm.compress.quant.modules import RowTieredWeight, batched_matmul_dtype

    parts = [packed(300, 128, 4, 32, seed=1), packed(212, 128, 2, 64, seed=2)]
    rows = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    tiered = RowTieredWeight.from_parts([rows[:300].sort().values, rows[300:].sort().values], parts)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(5))  # more tokens than the kernels take
    with torch.no_grad():
        exact = x @ tiered.dequantize().T
        whole = tiered.matmul(x)
        monkeypatch.setattr(modules, "BATCHED_BLOCK_ELEMENTS", 64 * 128)  # 64-row blocks
        blocked = tiered.matmul(x)
        with batched_matmul_dtype(torch.bfloat16):
            fast = tiered.matmul(x)
    assert torch.allclose(whole, exact, rtol=1e-5, atol=1e-5) and torch.equal(blocked, whole)
    assert fast.dtype == torch.float32
    assert (fast - exact).norm() / exact.norm() < 1e-2  # bf16 weights and activations


@needs_kernels
def test_prefill_multiplies_in_the_cpus_fast_dtype(tmp_path):
    """Generation's prefill takes the batched path in bf16 where the CPU has it; evaluation stays float32."""
    import edgelm
    from edgelm.compress import RTN, compress
    from edgelm.runtime.generate import prefill
    from tests.tiny_gguf import TinyConfig, write_tiny_model

    model, _ = edgelm.load(str(write_tiny_model(tmp_path / "m.gguf", TinyConfig(arch="gemma3", dim=128,
                                                                                  hidden_dim=256))))
    compress(model, RTN(bits=4, group_size=32))
    prompt = list(range(3, 43))  # 40 tokens: past the kernels' few-token path
    model.setup_caches(64)
    try:
        fast = prefill(model, prompt)
        with torch.inference_mode():
            # the last position's logits alone, as prefill asks for them (one row: the int8 kernels)
            exact = model(torch.tensor([prompt]), torch.arange(len(prompt)), logits_at=slice(-1, None))[0, -1]
    finally:
        model.clear_caches()
    assert (fast - exact).norm() / exact.norm() < 0.03
    assert torch.equal(fast, exact) == (kernels.batched_dtype() == torch.float32)


@needs_kernels
def test_row_tiers_run_as_one_job_with_each_part_in_its_columns():
    from edgelm.compress.quant.modules import RowTieredWeight

    parts = [packed(300, 128, 8, 32, seed=1), packed(100, 128, 3, 64, seed=2), packed(112, 128, 6, 16, seed=3)]
    order = torch.randperm(512, generator=torch.Generator().manual_seed(6))
    tiered = RowTieredWeight.from_parts([order[:300].sort().values, order[300:400].sort().values,
                                         order[400:].sort().values], parts)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = tiered.matmul(x)
        one_by_one = torch.empty(3, 512)
        qa = QuantizedActivations(x)
        for part, rows in zip(tiered.parts, tiered.rows):
            part.kernel().matvec(qa, out=one_by_one, out_index=rows)
        single = tiered.matmul(x[1:2])
    assert tiered.kernel_parts() is not None
    assert torch.equal(got, one_by_one)  # the same arithmetic per row, whichever job runs it
    assert torch.equal(got[1:2], single)  # and the same for one token as for three
    exact = x.double() @ tiered.dequantize().double().T
    assert (got.double() - exact).norm() / exact.norm() < 0.02
