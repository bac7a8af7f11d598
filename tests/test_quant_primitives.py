"""Quantization arithmetic: packing round-trips, error bounds per bit width, quantized modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
from edgelm.compress.quant.primitives import (QuantScheme, compute_params, dequantize, fake_quantize, pack,
                                              quantize, sqnr_db, unpack)
from edgelm.compress.quant.rtn import rtn_quantize_weight


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 96), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 96 * bits // 8)
    assert torch.equal(unpack(packed, bits, 96), codes)


def test_pack_handles_rows_that_are_not_byte_aligned():
    codes = torch.randint(0, 8, (3, 7), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 3), 3, 7), codes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_error_shrinks_with_bits_and_smaller_groups(symmetric):
    w = torch.randn(64, 256)
    sqnr = {bits: sqnr_db(w, fake_quantize(w, QuantScheme(bits, 64, symmetric))) for bits in (2, 3, 4, 8)}
    # Each extra bit is worth ~6 dB on Gaussian weights.
    assert sqnr[2] < sqnr[3] < sqnr[4] < sqnr[8]
    assert sqnr[4] > 17 and sqnr[8] > 38
    coarse = sqnr_db(w, fake_quantize(w, QuantScheme(4, None, symmetric)))
    assert sqnr_db(w, fake_quantize(w, QuantScheme(4, 32, symmetric))) > coarse


def test_asymmetric_grid_hits_group_extremes_and_zero_exactly():
    w = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    scheme = QuantScheme(bits=4, group_size=4)
    scale, zero = compute_params(w, scheme)
    codes = quantize(w, scale, zero, scheme)
    back = dequantize(codes, scale, zero, 4)
    assert codes.min() == 0 and codes.max() == 15
    assert back[0, 1] == 0.0  # zero is exactly representable (padding, pruned weights)
    torch.testing.assert_close(back[0, [0, 3]], torch.tensor([-1.0, 3.0]), atol=scale.item() / 2, rtol=0)


def test_constant_group_does_not_divide_by_zero():
    w = torch.zeros(2, 8)
    assert torch.equal(fake_quantize(w, QuantScheme(4, 8)), w)


def test_bits_per_weight_accounts_for_scales_and_zeros():
    assert QuantScheme(4, 64).bits_per_weight(640) == pytest.approx(4 + 24 / 64)
    assert QuantScheme(4, 64, symmetric=True).bits_per_weight(640) == pytest.approx(4.25)


def test_quantized_linear_and_embedding_match_their_dequantized_weights():
    torch.manual_seed(0)
    linear = nn.Linear(128, 32, bias=True)
    scheme = QuantScheme(4, 32)
    q = QuantizedLinear(rtn_quantize_weight(linear.weight, scheme), linear.bias)
    x = torch.randn(3, 128)
    torch.testing.assert_close(q(x), x @ q.weight.T + linear.bias)
    assert sqnr_db(linear.weight, q.weight) > 17
    assert q.weight_q.storage_bytes == 32 * 64 + 32 * 4 * 2 + 32 * 4

    table = nn.Embedding(50, 64)
    qe = QuantizedEmbedding(rtn_quantize_weight(table.weight, QuantScheme(8, 32)))
    ids = torch.tensor([[3, 7, 49]])
    torch.testing.assert_close(qe(ids), qe.weight[ids])
    assert sqnr_db(table.weight[ids], qe(ids)) > 38


@pytest.mark.parametrize("bits,factor", [(1, 0.5), (2, 0.6), (3, 0.85), (4, 0.9)])
def test_fitted_grid_beats_the_min_max_grid(bits, factor):
    """Least-squares scales and fractional zero points: at 1-2 bits about half the squared error."""
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    plain = (w - fake_quantize(w, QuantScheme(bits, 64))).pow(2).sum()
    fitted = (w - fake_quantize(w, QuantScheme(bits, 64, fit=True))).pow(2).sum()
    assert fitted < factor * plain


def test_fitted_grid_stores_fp16_zero_points_and_counts_them():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    scheme = QuantScheme(2, 64, fit=True)
    packed = rtn_quantize_weight(w, scheme)
    assert packed.zeros.dtype == torch.float16
    assert packed.zeros.float().frac().abs().sum() > 0  # really fractional
    # What the module stores is exactly the grid fake_quantize describes.
    torch.testing.assert_close(packed.dequantize(), fake_quantize(w, scheme), rtol=0, atol=0)
    assert scheme.bits_per_weight(128) == 2 + 32 / 64
    assert QuantScheme(2, 64).bits_per_weight(128) == 2 + 24 / 64
    with pytest.raises(ValueError, match="symmetric"):
        QuantScheme(4, 64, symmetric=True, fit=True)


def test_fitted_grid_runs_on_the_kernels_as_it_dequantizes():
    from edgelm import kernels

    if not kernels.available():
        pytest.skip("compiled kernels not built")
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    layer = QuantizedLinear(rtn_quantize_weight(w, QuantScheme(3, 32, fit=True)))
    x = torch.randn(3, 256)
    with torch.inference_mode():
        fused = layer(x)  # the kernels' float zero-point path
    reference = x @ layer.weight_q.dequantize().T
    torch.testing.assert_close(fused, reference, rtol=0.02, atol=0.05 * float(reference.abs().mean()))
