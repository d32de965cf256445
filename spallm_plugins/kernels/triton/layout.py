"""The codes layout the Triton kernels read, and the load-time repack into it (no triton import).

2- and 4-bit codes are read as stored (format v1: ``8 // bits`` codes per byte, little-endian).
Format v1 packs 3-bit codes eight to three bytes, so a code can straddle two bytes; the kernels read
3-bit codes from **bit planes** instead: uint8 ``[out, 3, in / 8]`` whose row ``r`` is, as ``3 * in / 8``
contiguous bytes,

- ``in / 4`` bytes: the low two bits of the row's codes, four per byte (exactly 2-bit format v1), then
- ``in / 8`` bytes: their high bits, eight per byte (little-endian along the row).

The same bytes as format v1 (no memory overhead beyond the copy), and the kernels read both planes
with the 2-bit code path plus one shift. The third dimension tells the layouts apart: format-v1 codes
are 2-D, the planes 3-D. :func:`kernel_codes` is the repack, :func:`format_v1_codes` its exact
inverse. The repack is fixed-shape tensor ops: no host sync, safe inside a CUDA graph.

**Code words** (4-D, int32), what :meth:`TritonBackend.prepare_weights
<spallm_plugins.kernels.triton.TritonBackend.prepare_weights>` returns where the decode kernel
(:mod:`.lut_gemv_words`) can read them: ``[planes, chunks, KW, out]``, the transpose SqueezeLLM uses
(``[K / 8, N]`` int32 at 4 bits), so a warp reads consecutive rows' words in one 128-byte line and
each thread walks K inside its own rows. A *unit* is ``planes`` words holding ``UNIT_CODES[bits]``
codes (4-bit: one word, 8 codes; 2-bit: one word, 16; 3-bit: three words, 32: no code straddles a
word and no bit is wasted). ``KW`` consecutive units form a chunk of ``KW * UNIT_CODES`` columns, all in
one table group; unit ``j`` of chunk ``c`` holds value ``v`` for column ``c * chunk + v * KW + j``,
so the ``KW`` inputs a thread multiplies with one value slot are contiguous (one vector load). Inside
a unit, value ``v`` sits where a byte-permute (PRMT) selector wants it, four bits apart
(:func:`_pack_unit`). Format-v1 codes are restored exactly by :func:`format_v1_codes`.
"""

from __future__ import annotations

import torch

from ...format import pack_codes, unpack_codes

UNIT_CODES = {2: 16, 3: 32, 4: 8}  # codes per unit of the code-word layout
UNIT_WORDS = {2: 1, 3: 3, 4: 1}  # int32 words per unit (its planes)
CHUNK_UNITS = (4, 2, 1)  # KW, largest first: the widest chunk that tiles a table group (8 spills at 3 bits)
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
    """``codes`` in the layout the byte-wise kernels read: 2/4-bit format v1; 3-bit bit planes
    ``[out, 3, in / 8]`` (already-planar 3-bit codes are returned as they are). Code words (4-D) are
    unpacked first, without a host sync."""
    if codes.dim() == 4:
        fields = _unpack_words(codes, bits)
        if bits != 3:
            return _pack_fields(fields, bits)
        low, high = _pack_fields(fields & 3, 2), _pack_fields(fields >> 2, 1)
        return torch.cat([low, high], dim=1).view(fields.shape[0], PLANES, fields.shape[1] // 8)
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
    """Exact inverse of :func:`kernel_codes` and :func:`code_words`: format v1 ``[out, in*bits/8]``."""
    if codes.dim() == 4:
        return pack_codes(_unpack_words(codes, bits), bits)
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
    """``in_features`` of ``codes`` in any of the layouts."""
    if codes.dim() == 4:
        return codes.shape[1] * codes.shape[2] * UNIT_CODES[bits]
    if codes.dim() == 3:
        return codes.shape[2] * 8
    return codes.shape[1] // 3 * 8 if bits == 3 else codes.shape[1] * 8 // bits


def chunk_units(bits: int, group_size: int) -> int:
    """``KW`` of the code-word layout for ``group_size`` columns per table group: the largest of
    :data:`CHUNK_UNITS` whose chunk tiles the group, 0 when none does (the layout does not apply)."""
    if bits not in UNIT_CODES:
        return 0
    return next((kw for kw in CHUNK_UNITS if group_size % (kw * UNIT_CODES[bits]) == 0), 0)


def code_words(codes: torch.Tensor, bits: int, groups_per_row: int) -> torch.Tensor:
    """Format-v1 (or bit-plane) codes as int32 code words ``[planes, chunks, KW, out]`` (see the module
    docstring). Raises ``ValueError`` when no chunk tiles a table group (:func:`chunk_units` is 0)."""
    fields = unpack_codes(format_v1_codes(codes, bits).contiguous(), bits).to(torch.int64)
    rows, in_features = fields.shape
    kw = chunk_units(bits, in_features // groups_per_row) if in_features % groups_per_row == 0 else 0
    if kw == 0:
        raise ValueError(
            f"{bits}-bit code words: {in_features} columns in {groups_per_row} groups do not split into "
            f"chunks of {UNIT_CODES.get(bits, '?')} codes or a multiple"
        )
    values = UNIT_CODES[bits]
    chunked = fields.view(rows, in_features // (kw * values), values, kw).permute(1, 3, 0, 2)  # [c, KW, out, v]
    words = torch.stack(_pack_unit(chunked, bits))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _pack_unit(values: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """A unit's int64 words from its values (last dimension). 4-bit: value ``v`` in bits ``4v``. 2-bit:
    value ``v`` in bits ``4 (v % 8) + 2 (v // 8)`` (a mask and a shift give two selectors of eight).
    3-bit: values ``8p + i`` (``p < 3``) in bits ``4i..4i+2`` of word ``p``; bit ``p`` of value
    ``24 + i`` in bit ``4i + 3`` of word ``p`` (the fourth selector costs a few logic operations)."""
    if bits == 4:
        return [sum(values[..., v] << (4 * v) for v in range(8))]
    if bits == 2:
        return [sum(values[..., v] << (4 * (v % 8) + 2 * (v // 8)) for v in range(16))]
    words = []
    for p in range(3):
        low = sum(values[..., 8 * p + i] << (4 * i) for i in range(8))
        spare = sum(((values[..., 24 + i] >> p) & 1) << (4 * i + 3) for i in range(8))
        words.append(low | spare)
    return words


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`code_words`' packing: uint8 codes ``[out, in]``."""
    if words.dim() != 4 or words.dtype != torch.int32 or words.shape[0] != UNIT_WORDS.get(bits):
        raise ValueError(
            f"{bits}-bit code words: expected int32 [{UNIT_WORDS.get(bits, '?')}, chunks, KW, out], "
            f"got {words.dtype} {list(words.shape)}"
        )
    rows = words.shape[3]
    w = words  # int32: arithmetic shifts, every field masked below the sign
    if bits == 4:
        values = [(w[0] >> (4 * v)) & 15 for v in range(8)]
    elif bits == 2:
        values = [(w[0] >> (4 * (v % 8) + 2 * (v // 8))) & 3 for v in range(16)]
    else:
        values = [(w[v // 8] >> (4 * (v % 8))) & 7 for v in range(24)]
        values += [sum(((w[p] >> (4 * i + 3)) & 1) << p for p in range(3)) for i in range(8)]
    stacked = torch.stack([v.to(torch.uint8) for v in values], dim=-1)  # [c, KW, out, v]
    return stacked.permute(2, 0, 3, 1).reshape(rows, -1)
