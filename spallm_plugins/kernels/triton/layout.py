"""The codes layout the Triton kernels read, and the load-time repack into it (no triton import).

2- and 4-bit codes are read as stored (format v1: ``8 // bits`` codes per byte, little-endian).
Format v1 packs 3-bit codes eight to three bytes, so a code can straddle two bytes; the kernels read
3-bit codes from **bit planes** instead: uint8 ``[out, 3, in / 8]`` whose row ``r`` is, as ``3 * in / 8``
contiguous bytes,

- ``in / 4`` bytes: the low two bits of the row's codes, four per byte (exactly 2-bit format v1), then
- ``in / 8`` bytes: their high bits, eight per byte (little-endian along the row).

The same bytes as format v1 (no memory overhead beyond the copy), and the kernels read both planes
with the 2-bit code path plus one shift. The third dimension tells the layouts apart: format-v1 codes
are 2-D, the planes 3-D. :func:`kernel_codes` is the repack (:meth:`TritonBackend.prepare_weights
<spallm_plugins.kernels.triton.TritonBackend.prepare_weights>`), :func:`format_v1_codes` its exact
inverse. The repack is fixed-shape tensor ops: no host sync, safe inside a CUDA graph.
"""

from __future__ import annotations

import torch

from ...format import pack_codes, unpack_codes

PLANES = 3  # rows of the 3-bit layout's middle dimension: two for the 2-bit plane, one for the 1-bit plane


def _pack_fields(fields: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 ``[rows, n]`` fields (values below ``2**width``) packed ``8 // width`` per byte, little-endian."""
    per_byte = 8 // width
    f = fields.view(fields.shape[0], fields.shape[1] // per_byte, per_byte)
    packed = f[..., 0].clone()
    for i in range(1, per_byte):
        packed |= f[..., i] << (i * width)
    return packed


def _unpack_fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_pack_fields`: uint8 ``[rows, n * width / 8]`` to ``[rows, n]``."""
    mask = (1 << width) - 1
    fields = [(packed >> shift) & mask for shift in range(0, 8, width)]
    return torch.stack(fields, dim=-1).reshape(packed.shape[0], packed.shape[1] * 8 // width)


def kernel_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` in the layout the kernels read: 2/4-bit unchanged; 3-bit format v1 (2-D) repacked into
    bit planes ``[out, 3, in / 8]`` (already-planar 3-bit codes are returned as they are)."""
    if bits != 3 or codes.dim() == 3:
        return codes
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.shape[1] % 3:
        raise ValueError(f"3-bit codes: expected format-v1 uint8 [out, in*3/8], got {codes.dtype} {list(codes.shape)}")
    rows, in_features = codes.shape[0], codes.shape[1] // 3 * 8
    unpacked = unpack_codes(codes.contiguous(), 3)
    low = _pack_fields(unpacked & 3, 2)
    high = _pack_fields(unpacked >> 2, 1)
    return torch.cat([low, high], dim=1).view(rows, PLANES, in_features // 8)


def format_v1_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact inverse of :func:`kernel_codes`: the kernels' layout back to format v1 ``[out, in*bits/8]``."""
    if bits != 3 or codes.dim() == 2:
        return codes
    if codes.dim() != 3 or codes.shape[1] != PLANES:
        raise ValueError(f"3-bit bit planes: expected uint8 [out, {PLANES}, in/8], got {list(codes.shape)}")
    rows, in_features = codes.shape[0], codes.shape[2] * 8
    flat = codes.reshape(rows, PLANES * in_features // 8)
    low = _unpack_fields(flat[:, : in_features // 4], 2)
    high = _unpack_fields(flat[:, in_features // 4 :], 1)
    return pack_codes(low | (high << 2), 3)


def code_columns(codes: torch.Tensor, bits: int) -> int:
    """``in_features`` of ``codes`` in either layout."""
    if codes.dim() == 3:
        return codes.shape[2] * 8
    return codes.shape[1] // 3 * 8 if bits == 3 else codes.shape[1] * 8 // bits
