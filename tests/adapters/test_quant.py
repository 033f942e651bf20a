"""NF-k blockwise quantization: codebook, round-trip error bounds, exact storage accounting, bit packing."""

from __future__ import annotations

import math

import pytest
import torch

from lorite.adapters.quant import (
    QLORA_NF4,
    QuantConfig,
    QuantizedTensor,
    config_grid,
    fake_quantize,
    nf_codebook,
    pack_bits,
    quantize,
    quantize_batch,
    storage_bits,
    unpack_bits,
)

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", BITS)
def test_codebook_sorted_in_unit_interval_with_zero_and_ends(bits):
    code = nf_codebook(bits)
    assert code.numel() == 2**bits
    assert torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[-1] == 1
    assert (code == 0).sum() == 1
    # asymmetric as in NF4: 2^{b-1} − 1 negative values, 2^{b-1} positive ones
    assert (code < 0).sum() == 2 ** (bits - 1) - 1 and (code > 0).sum() == 2 ** (bits - 1)


def test_nf4_codebook_matches_the_normal_quantiles():
    from statistics import NormalDist

    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    phi = NormalDist().inv_cdf
    expected = [phi(1 - offset + i * (0.5 - (1 - offset)) / 7) / phi(offset) for i in range(7)]
    assert nf_codebook(4)[:7].tolist() == pytest.approx(expected, abs=1e-6)
    assert nf_codebook(4)[8] == pytest.approx(phi(0.5 + (offset - 0.5) / 8) / phi(offset), abs=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_at_most_half_the_largest_gap_times_the_block_scale(bits):
    """With unquantized (fp32) block scales, each weight is within ½·max gap·s_j of its dequantized value."""
    torch.manual_seed(bits)
    W = torch.randn(48, 80) * torch.logspace(-2, 0, 80)  # columns of very different size
    config = QuantConfig(bits, block_size=32, scale_bits=None, scale_dtype="fp32")
    Q = quantize(W, config).dequantize()
    code = nf_codebook(bits)
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    scales = W.reshape(-1, 32).abs().amax(1, keepdim=True)
    error = (W - Q).reshape(-1, 32).abs()
    assert torch.all(error <= half_gap * scales * (1 + 1e-6) + 1e-12)
    assert torch.all(Q.reshape(-1, 32).abs() <= scales * (1 + 1e-6))


@pytest.mark.parametrize(("bits", "bound"), [(2, 0.60), (3, 0.22), (4, 0.10), (8, 0.006)])
def test_round_trip_relative_error_with_double_quantized_scales(bits, bound):
    torch.manual_seed(0)
    W = 0.02 * torch.randn(256, 192)
    Q = quantize(W, QuantConfig(bits, 64, 8, 256, "fp32")).dequantize()
    relative = float((W - Q).norm() / W.norm())
    assert relative < bound
    if bits < 8:  # one bit fewer is clearly worse
        coarser = quantize(W, QuantConfig(max(2, bits - 1), 64, 8, 256, "fp32")).dequantize()
        assert bits == 2 or relative < 0.8 * float((W - coarser).norm() / W.norm())


def test_bits_per_param_known_cases():
    assert QLORA_NF4.bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)  # 4.127
    assert round(QLORA_NF4.bits_per_param, 3) == 4.127
    assert round(QuantConfig(3, 64, 8, 256, "fp32").bits_per_param, 3) == 3.127
    assert QuantConfig(2, 16, None, 1, "bf16").bits_per_param == 2 + 16 / 16
    assert len(config_grid()) == 432


def test_storage_bits_exact_and_matches_the_packed_bytes():
    # whole blocks and groups: 32768 weights, 512 blocks, 2 groups
    assert storage_bits(32768, QLORA_NF4) == 32768 * 4 + 512 * 8 + 2 * 32 + 32
    # partial last block and group: 100 weights of 3 bits in blocks of 64 → 2 blocks, 1 group
    config = QuantConfig(3, 64, 8, 256, "fp32")
    assert storage_bits(100, config) == 100 * 3 + 2 * 8 + 1 * 32 + 32
    q = quantize(torch.randn(10, 10), config)
    assert q.storage_bits == 380
    assert q.codes.numel() == math.ceil(300 / 8) and q.scale_codes.numel() == 2
    assert q.nbytes == math.ceil(300 / 8) + 2 + 4 + 4
    # no double quantization: codes + fp16 block scales, no offset
    plain = QuantConfig(4, 32, None, 1, "fp16")
    q = quantize(torch.randn(64, 32), plain)
    assert q.storage_bits == 64 * 32 * 4 + 64 * 16 == 8 * q.nbytes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 1000])
def test_pack_unpack_round_trip(bits, count):
    values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([0, 8]), 3)


@pytest.mark.parametrize(
    "config",
    [
        QLORA_NF4,
        QuantConfig(3, 32, 4, 16, "bf16"),
        QuantConfig(2, 16, 2, 64, "fp16"),
        QuantConfig(8, 64, None, 1),
    ],
)
def test_packed_dequantize_equals_fake_quantize_and_batches_are_independent(config):
    torch.manual_seed(1)
    W = torch.randn(3, 40, 24)
    W[1] *= 10
    batch = fake_quantize(W, config, batched=True)
    for i in range(3):
        single = quantize(W[i], config)
        assert torch.equal(single.dequantize(), fake_quantize(W[i], config))
        assert torch.equal(batch[i], single.dequantize())
        assert torch.equal(quantize_batch(W, config)[i].dequantize(), single.dequantize())
    restored = QuantizedTensor.from_tensors(single.tensors(), single.shape, config)
    assert torch.equal(restored.dequantize(torch.bfloat16), single.dequantize(torch.bfloat16))


def test_zero_blocks_and_constant_scales():
    W = torch.zeros(8, 16)
    W[0, 0] = 1.0
    q = quantize(W, QuantConfig(4, 16, 8, 4, "fp32"))
    Q = q.dequantize()
    assert Q[0, 0] == 1.0 and torch.all(Q.flatten()[1:] == 0)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(5)
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantConfig(4, scale_dtype="fp8")
    with pytest.raises(ValueError, match="block_size"):
        QuantConfig(4, block_size=0)
    with pytest.raises(ValueError, match="nan"):
        quantize(torch.tensor([1.0, float("nan")]), QLORA_NF4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_on_gpu_matches_cpu():
    W = torch.randn(64, 48)
    for config in (QLORA_NF4, QuantConfig(3, 32, 4, 64, "bf16")):
        cpu = quantize(W, config)
        gpu = quantize(W.cuda(), config)
        assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
        assert torch.equal(cpu.to("cuda").dequantize().cpu(), cpu.dequantize())
