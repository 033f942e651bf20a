"""NF-k blockwise quantization with double-quantized block scales, packed into compact integer storage.

The scheme of LQ-LoRA (Guo et al., arXiv 2311.12023, §3.1 and App. A), which generalises QLoRA's NF4
(Dettmers et al., arXiv 2305.14314) to any bit width ``b`` (``QuantConfig.bits``):

* **Codebook.** With δ = ½(1/30 + 1/32) and ``offset`` = 1 − δ, take the quantile levels
  ``linspace(1 − offset, ½, 2^{b−1}) ∪ linspace(½, offset, 2^{b−1} + 1)`` (½ once) — 2^b levels — and map
  them through the standard normal quantile Φ⁻¹, divided by Φ⁻¹(offset): 2^b sorted values in [−1, 1]
  holding −1, 0 and 1 (:func:`nf_codebook`).
* **Level 1.** The flattened matrix is cut into blocks of ``B0`` weights (``block_size``); block ``j`` has the
  absmax scale ``s_j = max |w|`` and each weight stores the index of the codebook value nearest to
  ``w / ŝ_j`` (``ŝ_j`` the scale as stored, see below), i.e. the representable value ``code[k]·ŝ_j``
  nearest to ``w``.
* **Level 2 (double quantization).** The scales minus their global minimum ``s_min`` are quantized to
  ``b0``-bit unsigned integers (``scale_bits``) with one absmax ``s2`` per group of ``B1`` scales
  (``scale_block_size``), stored in format ``b1`` (``scale_dtype``: fp32, fp16 or bf16):
  ``ŝ_j = s_min + q_j / (2^{b0} − 1) · s2``. With ``scale_bits=None`` the scales are stored in ``b1``
  directly (no double quantization).
* **Storage.** ``b + b0/B0 + b1/(B0·B1)`` bits per parameter (:attr:`QuantConfig.bits_per_param`), e.g.
  4.127 for QLoRA's NF4 (b=4, b0=8, b1=32, B0=64, B1=256); :func:`storage_bits` counts a given matrix
  exactly (partial last blocks and the fp32 ``s_min`` included), and :class:`QuantizedTensor` holds
  exactly that many bits, packed into ``uint8`` (:func:`pack_bits`).

Everything is plain torch on whatever device the input lives on (CPU or GPU); no custom kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "fp32": (torch.float32, 32),
    "fp16": (torch.float16, 16),
    "bf16": (torch.bfloat16, 16),
}
OFFSET_BITS = 32  # the global scale offset s_min, stored once per matrix in fp32


@dataclass(frozen=True)
class QuantConfig:
    """One NF-k storage format (the spec's ``(b, b0, b1, B0, B1)``).

    Attributes:
        bits: ``b``, bits per weight (2, 3, 4 or 8).
        block_size: ``B0``, weights per level-1 absmax block.
        scale_bits: ``b0``, bits per level-1 scale (2, 3, 4 or 8); ``None``: no double quantization, the
            level-1 scales are stored in ``scale_dtype``.
        scale_block_size: ``B1``, level-1 scales per level-2 absmax group (unused without double
            quantization).
        scale_dtype: ``b1``, the float format of the level-2 scales (or of the level-1 scales without
            double quantization): ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    """

    bits: int = 4
    block_size: int = 64
    scale_bits: int | None = 8
    scale_block_size: int = 256
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.scale_bits is not None and self.scale_bits not in SUPPORTED_BITS:
            raise ValueError(f"scale_bits must be one of {SUPPORTED_BITS} or None, got {self.scale_bits!r}")
        for label, size in (("block_size", self.block_size), ("scale_block_size", self.scale_block_size)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{label} must be a positive integer, got {size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )

    @property
    def scale_dtype_bits(self) -> int:
        return SCALE_DTYPES[self.scale_dtype][1]

    @property
    def bits_per_param(self) -> float:
        """``b + b0/B0 + b1/(B0·B1)`` (``b + b1/B0`` without double quantization); the one fp32 offset per
        matrix is left out here and counted by :func:`storage_bits`."""
        if self.scale_bits is None:
            return self.bits + self.scale_dtype_bits / self.block_size
        return (
            self.bits
            + self.scale_bits / self.block_size
            + self.scale_dtype_bits / (self.block_size * self.scale_block_size)
        )

    @property
    def name(self) -> str:
        """A short stable label, e.g. ``nf4-b64-s8x256-fp32`` (``nf4-b64-fp16`` without double quant)."""
        if self.scale_bits is None:
            return f"nf{self.bits}-b{self.block_size}-{self.scale_dtype}"
        return (
            f"nf{self.bits}-b{self.block_size}-s{self.scale_bits}x{self.scale_block_size}-{self.scale_dtype}"
        )

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "scale_bits": self.scale_bits,
            "scale_block_size": self.scale_block_size,
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        return cls(**data)


QLORA_NF4 = QuantConfig(4, 64, 8, 256, "fp32")  # 4.127 bits per parameter


def config_grid(
    bits=(2, 3, 4, 8),
    scale_bits=(2, 3, 4, 8),
    scale_dtypes=("bf16", "fp16", "fp32"),
    block_sizes=(16, 32, 64),
    scale_block_sizes=(16, 64, 256),
) -> list[QuantConfig]:
    """Every combination; the defaults are the paper's 4·4·3·3·3 = 432 configs."""
    return [
        QuantConfig(bits=b, block_size=b0_block, scale_bits=b_0, scale_block_size=b1_block, scale_dtype=b_1)
        for b in bits
        for b_0 in scale_bits
        for b_1 in scale_dtypes
        for b0_block in block_sizes
        for b1_block in scale_block_sizes
    ]


def n_blocks(numel: int, config: QuantConfig) -> int:
    return -(-numel // config.block_size)


def n_groups(numel: int, config: QuantConfig) -> int:
    return -(-n_blocks(numel, config) // config.scale_block_size)


def storage_bits(numel: int, config: QuantConfig) -> int:
    """Exact bits :class:`QuantizedTensor` stores for ``numel`` weights (packing into whole bytes aside):
    ``numel·b`` codes, ``⌈numel/B0⌉·b0`` scale codes, ``⌈⌈numel/B0⌉/B1⌉·b1`` level-2 scales and the fp32
    offset; without double quantization ``numel·b + ⌈numel/B0⌉·b1``."""
    blocks = n_blocks(numel, config)
    if config.scale_bits is None:
        return numel * config.bits + blocks * config.scale_dtype_bits
    return (
        numel * config.bits
        + blocks * config.scale_bits
        + n_groups(numel, config) * config.scale_dtype_bits
        + OFFSET_BITS
    )


@functools.cache
def _codebook64(bits: int) -> torch.Tensor:
    delta = 0.5 * (1 / 30 + 1 / 32)
    offset = 1 - delta
    half = 2 ** (bits - 1)
    negative = torch.linspace(1 - offset, 0.5, half, dtype=torch.float64)
    positive = torch.linspace(0.5, offset, half + 1, dtype=torch.float64)[1:]  # 0.5 once
    levels = torch.cat([negative, positive])
    values = torch.special.ndtri(levels) / torch.special.ndtri(torch.tensor(offset, dtype=torch.float64))
    values[half - 1] = 0.0  # Φ⁻¹(½) is 0 up to rounding; make it exact
    return values


_CODEBOOKS: dict[tuple[int, torch.device], torch.Tensor] = {}


def nf_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2^``bits`` sorted NF values in [−1, 1] (−1, 0 and 1 included), float32, on ``device`` (kept
    per device, so dequantizing in a forward pass copies nothing to the GPU). Do not modify it in place."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    device = torch.device(device if device is not None else "cpu")
    key = (bits, device)
    if key not in _CODEBOOKS:
        _CODEBOOKS[key] = _codebook64(bits).to(device=device, dtype=torch.float32)
    return _CODEBOOKS[key]


# ------------------------------------------------------------------------------------------ bit packing
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2^bits)`` (any shape, read flattened) into ``⌈n·bits/8⌉`` uint8 bytes,
    least significant bits first; :func:`unpack_bits` inverts it."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = values.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to be packed in {bits} bits")
    device = flat.device
    if 8 % bits == 0:  # whole codes per byte: 8/bits of them side by side
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte)
        shifts = torch.arange(per_byte, device=device, dtype=torch.int32) * bits
        return (flat << shifts).sum(1).to(torch.uint8)
    # codes straddle bytes (3 bits): lay out the bit stream, then group it by 8
    stream = ((flat[:, None] >> torch.arange(bits, device=device, dtype=torch.int32)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8)
    return (stream << torch.arange(8, device=device, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit integers of ``packed`` (from :func:`pack_bits`), as int64."""
    if packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {count} values of {bits} bits")
    data = packed.reshape(-1).to(torch.int32)
    device = data.device
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=device, dtype=torch.int32) * bits
        return ((data[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count].long()
    stream = ((data[:, None] >> torch.arange(8, device=device, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: count * bits].view(count, bits).long()
    return (stream << torch.arange(bits, device=device)).sum(1)


# ------------------------------------------------------------------------------------------ quantize
@dataclass
class _Assignment:
    """Unpacked result of quantizing a batch of ``k`` tensors (one per row): what :class:`QuantizedTensor`
    packs, plus the decoded scales."""

    codes: torch.Tensor  # (k, numel) int64 codebook indices
    scale_codes: torch.Tensor | None  # (k, n_blocks) int64 b0-bit codes, or None without double quant
    scales: torch.Tensor  # level-2 scales (k, n_groups) in b1, or level-1 scales (k, n_blocks) in b1
    scale_offset: torch.Tensor  # (k, 1) fp32 s_min (0 without double quant)
    block_scales: torch.Tensor  # (k, n_blocks) fp32 ŝ_j as stored


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` (k, n) with zero columns appended up to a multiple of ``multiple``."""
    pad = (-x.shape[1]) % multiple
    return torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1) if pad else x


def _decode_block_scales(
    config: QuantConfig, scale_codes: torch.Tensor | None, scales: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """``ŝ_j = s_min + q_j/(2^{b0} − 1)·s2_{g(j)}`` (or the stored scales without double quantization);
    all arguments carry a leading batch dimension."""
    if scale_codes is None:
        return scales.float()
    group_scale = scales.float().repeat_interleave(config.scale_block_size, dim=1)[:, : scale_codes.shape[1]]
    return offset.float() + scale_codes.float() / (2**config.scale_bits - 1) * group_scale


def _assign(flat: torch.Tensor, config: QuantConfig) -> _Assignment:
    """Quantize every row of ``flat`` (k, numel) as one tensor of its own."""
    flat = flat.detach().float()
    numel = flat.shape[1]
    blocks = _pad_to(flat, config.block_size).view(flat.shape[0], -1, config.block_size)
    absmax = blocks.abs().amax(2)  # s_j, (k, n_blocks); nan and inf propagate into it
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantize a tensor with inf or nan entries")
    dtype = SCALE_DTYPES[config.scale_dtype][0]
    if config.scale_bits is None:
        scales = absmax.to(dtype)
        scale_codes, offset = None, flat.new_zeros(flat.shape[0], 1)
    else:
        offset = absmax.amin(1, keepdim=True)
        shifted = absmax - offset
        grouped = _pad_to(shifted, config.scale_block_size).view(flat.shape[0], -1, config.scale_block_size)
        scales = grouped.amax(2).to(dtype)  # s2, stored in b1
        group_scale = scales.float().repeat_interleave(config.scale_block_size, dim=1)[:, : shifted.shape[1]]
        levels = 2**config.scale_bits - 1
        ratio = torch.where(group_scale > 0, shifted / group_scale.clamp_min(1e-30), 0.0)
        scale_codes = torch.round(ratio * levels).clamp_(0, levels).long()
    if not torch.isfinite(scales.float()).all():
        raise ValueError(f"block scales overflow {config.scale_dtype}; use a wider scale_dtype")
    block_scales = _decode_block_scales(config, scale_codes, scales, offset)
    codebook = nf_codebook(config.bits, flat.device)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    normalized = blocks / block_scales.clamp_min(1e-30)[:, :, None]  # ŝ_j = 0: every code decodes to 0
    codes = torch.bucketize(normalized.view(flat.shape[0], -1)[:, :numel], midpoints)
    return _Assignment(codes, scale_codes, scales, offset, block_scales)


def _expand(codes: torch.Tensor, block_scales: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``code[k]·ŝ_j`` for codes (k, numel) and scales (k, n_blocks): (k, numel) float32."""
    values = nf_codebook(config.bits, codes.device)[codes]
    scale = block_scales.repeat_interleave(config.block_size, dim=1)[:, : codes.shape[1]]
    return values * scale


def fake_quantize(weight: torch.Tensor, config: QuantConfig, batched: bool = False) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in float32 without packing (the decomposition's inner step).

    With ``batched``, ``weight[i]`` are quantized as separate tensors (each its own blocks, offset and
    level-2 groups), in one pass.
    """
    flat = weight.reshape(weight.shape[0] if batched else 1, -1)
    assigned = _assign(flat, config)
    return _expand(assigned.codes, assigned.block_scales, config).view(weight.shape)


@dataclass
class QuantizedTensor:
    """A tensor in NF-k storage: packed codes and scales (see the module docstring).

    Attributes:
        shape: the original shape.
        config: the storage format.
        codes: ``uint8``, ``⌈numel·b/8⌉`` bytes of packed codebook indices.
        scale_codes: ``uint8``, ``⌈n_blocks·b0/8⌉`` bytes of packed level-1 scale codes (``None`` without
            double quantization).
        scales: the level-2 scales ``s2`` (one per group of B1 blocks) in ``b1`` — or, without double
            quantization, the level-1 scales.
        scale_offset: ``(1,)`` float32 ``s_min``.
    """

    shape: tuple[int, ...]
    config: QuantConfig
    codes: torch.Tensor
    scale_codes: torch.Tensor | None
    scales: torch.Tensor
    scale_offset: torch.Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def storage_bits(self) -> int:
        """Bits of information stored (:func:`storage_bits`)."""
        return storage_bits(self.numel, self.config)

    @property
    def bits_per_param(self) -> float:
        return self.storage_bits / self.numel

    @property
    def nbytes(self) -> int:
        """Bytes actually held (each packed component rounded up to whole bytes)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def block_scales(self) -> torch.Tensor:
        """The decoded level-1 scales ``ŝ_j`` (float32)."""
        count = n_blocks(self.numel, self.config)
        scale_codes = (
            None
            if self.scale_codes is None
            else unpack_bits(self.scale_codes, self.config.scale_bits, count)[None]  # type: ignore[arg-type]
        )
        return _decode_block_scales(self.config, scale_codes, self.scales[None], self.scale_offset[None])[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``code[k]·ŝ_j`` for every weight, reshaped, on this tensor's device, in ``dtype``."""
        codes = unpack_bits(self.codes, self.config.bits, self.numel)[None]
        return _expand(codes, self.block_scales()[None], self.config).view(self.shape).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return QuantizedTensor.from_tensors(moved, self.shape, self.config)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a safetensors file holds)."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.scale_codes is not None:  # s_min exists only with double quantization
            out["scale_codes"] = self.scale_codes
            out["scale_offset"] = self.scale_offset
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], config: QuantConfig
    ) -> QuantizedTensor:
        expected = {"codes", "scales"} | ({"scale_codes", "scale_offset"} if config.scale_bits else set())
        missing = expected - set(tensors)
        if missing:
            raise ValueError(f"quantized tensor of config {config.name} lacks {sorted(missing)}")
        numel = math.prod(shape)
        if tensors["codes"].numel() != -(-numel * config.bits // 8):
            raise ValueError(
                f"{tensors['codes'].numel()} code bytes do not fit shape {tuple(shape)} at {config.bits} bits"
            )
        return cls(
            tuple(shape),
            config,
            tensors["codes"],
            tensors["scale_codes"] if config.scale_bits else None,
            tensors["scales"],
            tensors["scale_offset"]
            if config.scale_bits
            else tensors["scales"].new_zeros(1, dtype=torch.float32),
        )


def _pack(assigned: _Assignment, row: int, shape: tuple[int, ...], config: QuantConfig) -> QuantizedTensor:
    scale_codes = assigned.scale_codes
    return QuantizedTensor(
        tuple(shape),
        config,
        pack_bits(assigned.codes[row], config.bits),
        None if scale_codes is None else pack_bits(scale_codes[row], config.scale_bits),  # type: ignore[arg-type]
        assigned.scales[row].contiguous(),
        assigned.scale_offset[row].float().contiguous(),
    )


def quantize(weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Quantize ``weight`` (any shape, any float dtype, any device) to NF-k storage ``config``."""
    return _pack(_assign(weight.reshape(1, -1), config), 0, tuple(weight.shape), config)


def quantize_batch(weights: torch.Tensor, config: QuantConfig) -> list[QuantizedTensor]:
    """:func:`quantize` of every ``weights[i]`` (each its own blocks, offset and groups), in one pass."""
    assigned = _assign(weights.reshape(weights.shape[0], -1), config)
    return [_pack(assigned, i, tuple(weights.shape[1:]), config) for i in range(weights.shape[0])]


__all__ = [
    "QLORA_NF4",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "QuantConfig",
    "QuantizedTensor",
    "config_grid",
    "fake_quantize",
    "nf_codebook",
    "pack_bits",
    "quantize",
    "quantize_batch",
    "storage_bits",
    "unpack_bits",
]
