"""Decode GEMV over code words (M <= 16, fp16/bf16): no cross-thread traffic in the K loop.

The byte-wise GEMV spends 12.5-16.6 SASS instructions per weight in its K loop on sm90 (about 31 without
the launcher's 16-divisibility specialisation), many of them warp shuffles and barriers of a ``tl.sum``
per tile and code field, with one 16-bit table gather per weight. Here (the pattern of SqueezeLLM's kernel and of
llama.cpp's ``__byte_perm`` lookup):

- codes are the transposed int32 words of :func:`~.layout.code_words`: a warp reads one 128-byte line of
  consecutive rows per word; a thread owns whole rows and walks K in registers;
- each row's table group is held in registers as byte planes (the low bytes of the 16-bit entries in
  one set of words, the high bytes in another), and a weight is looked up with PRMT, which picks four
  bytes out of eight by four 4-bit selectors: 3-bit codes take one PRMT per plane per four weights,
  4-bit two plus a select on the code's top bit (its byte mask comes from PRMT's sign-replicate mode),
  2-bit one;
- the products accumulate in a ``[BLOCK_N, KW]`` fp32 tile, reduced over KW once after the loop; split-K
  partial sums meet in fp32 atomics.

``tests/test_kernels_sass.py`` and ``spallm bench kernels --sass`` compile it for sm90 and count the
loop's instructions. ``EMULATE`` swaps the one inline-asm instruction (PRMT) for integer operations
with its PTX semantics: the Triton interpreter (CPU tests) cannot run inline asm, and everything else
(layout, indexing, the lookup built from PRMTs) is the same code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .layout import UNIT_CODES, UNIT_WORDS
from .tiles import AUTOTUNE_KEY, MAX_REGISTERS, m_bucket

# Four rows per thread (BLOCK_N = 128 * num_warps): the rows share each input load and conversion, and
# a warp's code loads are 128-bit; two rows per thread cost about 6.7 SASS per weight at 4 bits, eight
# exceed 128 registers. MAX_REGISTERS caps ptxas (triton 3.6 took 139 at 3 bits on one warp), so a
# CTA never limits occupancy below 16 warps per SM; tests/test_kernels_sass.py holds every config here
# to the limits, spills included. Split-K spreads a 4096-row layer over enough warps to hide latency.
CONFIGS = [
    triton.Config({"BLOCK_N": 128, "SPLIT_K": 16}, num_warps=1, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 128, "SPLIT_K": 32}, num_warps=1, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 256, "SPLIT_K": 16}, num_warps=2, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 256, "SPLIT_K": 32}, num_warps=2, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 512, "SPLIT_K": 8}, num_warps=4, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 512, "SPLIT_K": 16}, num_warps=4, maxnreg=MAX_REGISTERS),
]
WORDS_DTYPES = (torch.float16, torch.bfloat16)  # 16-bit table entries: two byte planes


@triton.jit
def prmt_emulated(a, b, s):
    """PTX ``prmt.b32`` (default mode) in integer operations: byte ``i`` of the result is byte
    ``s[4i:4i+3]`` of the eight bytes ``b:a``, or its sign bit replicated when ``s[4i+3]`` is set."""
    out = tl.zeros_like(a | b | s)
    for i in tl.static_range(4):
        nibble = (s >> (4 * i)) & 15
        index = nibble & 7
        byte = (tl.where(index < 4, a, b) >> ((index & 3) * 8)) & 255
        byte = tl.where(nibble >= 8, tl.where(byte >= 128, 255, 0), byte)
        out = out | (byte << (8 * i))
    return out


@triton.jit
def prmt(a, b, s, EMULATE: tl.constexpr):
    """``prmt.b32 d, a, b, s`` elementwise (operands broadcast); integer emulation under ``EMULATE``."""
    if EMULATE:
        return prmt_emulated(a, b, s)
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, s], dtype=tl.int32,
                                         is_pure=True, pack=1)  # fmt: skip


@triton.jit
def prmt_const(a, b, SELECTOR: tl.constexpr, EMULATE: tl.constexpr):
    return prmt(a, b, tl.full(a.shape, SELECTOR, tl.int32), EMULATE)


@triton.jit
def plane_word(row, mask_n, q, HIGH: tl.constexpr, EMULATE: tl.constexpr):
    """Word ``q`` of a row's low (or ``HIGH``) byte plane: that byte of table entries ``4q..4q+3``,
    from the entries read as int32 pairs (``row``: ``[BLOCK_N]`` pointers to the group's pairs)."""
    pair0 = tl.load(row + 2 * q, mask=mask_n, other=0)
    pair1 = tl.load(row + 2 * q + 1, mask=mask_n, other=0)
    if HIGH:
        return prmt_const(pair0, pair1, 0x7531, EMULATE)[:, None]
    else:
        return prmt_const(pair0, pair1, 0x6420, EMULATE)[:, None]


@triton.jit
def to_float(half_pair, HIGH: tl.constexpr, FP16: tl.constexpr):
    """The low (or ``HIGH``) 16-bit entry of an int32 as fp32."""
    if FP16:
        bits16 = (half_pair >> 16) if HIGH else half_pair
        return bits16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        if HIGH:
            return (half_pair & -65536).to(tl.float32, bitcast=True)
        else:
            return (half_pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def accumulate_quad(acc, low, high, x_ptrs, KW: tl.constexpr, FP16: tl.constexpr, EMULATE: tl.constexpr):
    """``acc += w_f * x_f`` for four value slots ``f`` whose entries' low and high bytes are the bytes
    of ``low`` and ``high``; slot ``f``'s inputs are the ``KW`` contiguous values at ``x_ptrs + f * KW``."""
    pair01 = prmt_const(low, high, 0x5140, EMULATE)  # entries 0 and 1 as two 16-bit halves
    pair23 = prmt_const(low, high, 0x7362, EMULATE)
    acc += to_float(pair01, False, FP16) * tl.load(x_ptrs).to(tl.float32)[None, :]
    acc += to_float(pair01, True, FP16) * tl.load(x_ptrs + KW).to(tl.float32)[None, :]
    acc += to_float(pair23, False, FP16) * tl.load(x_ptrs + 2 * KW).to(tl.float32)[None, :]
    acc += to_float(pair23, True, FP16) * tl.load(x_ptrs + 3 * KW).to(tl.float32)[None, :]
    return acc


@triton.jit
def quad_bytes(selector, mask, QUAD: tl.constexpr, low0, low1, low2, low3, high0, high1, high2, high3,
               BITS: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """The low and high bytes of the table entries of four value slots: quad ``QUAD`` of ``selector``'s
    eight codes (nibbles, top bit clear). 4-bit: entries 8-15 come from ``low2/3``, ``high2/3``, chosen
    per byte where the code's top bit, read from ``mask`` (the code word), is set."""
    sel = selector >> (16 * QUAD)  # PRMT reads the low four nibbles
    if BITS == 2:
        low = prmt(low0, low0, sel, EMULATE)
        high = prmt(high0, high0, sel, EMULATE)
    else:
        low = prmt(low0, low1, sel, EMULATE)
        high = prmt(high0, high1, sel, EMULATE)
        if BITS == 4:
            # the code's top bit is bit 4i+3 of the word: the sign bit of a byte of word or word << 4
            if QUAD == 0:
                top = prmt_const(mask << 4, mask, 0xD9C8, EMULATE)
            else:
                top = prmt_const(mask << 4, mask, 0xFBEA, EMULATE)
            low = low ^ ((low ^ prmt(low2, low3, sel, EMULATE)) & top)
            high = high ^ ((high ^ prmt(high2, high3, sel, EMULATE)) & top)
    return low, high


@triton.jit
def accumulate_selector(acc, selector, mask, low0, low1, low2, low3, high0, high1, high2, high3, x_ptrs,
                        BITS: tl.constexpr, KW: tl.constexpr, FP16: tl.constexpr,
                        EMULATE: tl.constexpr):  # fmt: skip
    """Eight value slots whose codes are the nibbles of ``selector``, in two quads (:func:`quad_bytes`)."""
    for quad in tl.static_range(2):
        low, high = quad_bytes(selector, mask, quad, low0, low1, low2, low3, high0, high1, high2, high3, BITS,
                               EMULATE)  # fmt: skip
        acc = accumulate_quad(acc, low, high, x_ptrs + 4 * quad * KW, KW, FP16, EMULATE)
    return acc


@triton.jit
def group_planes(tables_ptr, offs_n, mask_n, group, stride_tn, BITS: tl.constexpr, EMULATE: tl.constexpr):
    """Table group ``group`` of each row as byte-plane words ``(low0..3, high0..3)``, ``[BLOCK_N, 1]`` each
    (the words past ``2**bits`` entries repeat word 0)."""
    row = tables_ptr + offs_n * stride_tn + group * ((1 << BITS) // 2)
    low0, high0 = plane_word(row, mask_n, 0, False, EMULATE), plane_word(row, mask_n, 0, True, EMULATE)
    low1, high1, low2, high2, low3, high3 = low0, high0, low0, high0, low0, high0
    if BITS >= 3:
        low1, high1 = plane_word(row, mask_n, 1, False, EMULATE), plane_word(row, mask_n, 1, True, EMULATE)
    if BITS == 4:
        low2, high2 = plane_word(row, mask_n, 2, False, EMULATE), plane_word(row, mask_n, 2, True, EMULATE)
        low3, high3 = plane_word(row, mask_n, 3, False, EMULATE), plane_word(row, mask_n, 3, True, EMULATE)
    return low0, low1, low2, low3, high0, high1, high2, high3


@triton.jit(do_not_specialize=["M_BUCKET"])
def lut_gemv_words_kernel(x_ptr, words_ptr, tables_ptr, slots_ptr, out_ptr, M, N, K, M_BUCKET, S, stride_xm,
                          stride_ts, stride_tn, HAS_SLOTS: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, KW: tl.constexpr, FP16: tl.constexpr,
                          EMULATE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K):  # fmt: skip
    """Program ``(n, k, m)``: rows ``n*BLOCK_N...`` of input row ``m``, chunks of the ``k``-th split.
    ``tables_ptr``: the tables as int32 pairs of entries, ``stride_tn`` pairs per row; with ``HAS_SLOTS``,
    ``S`` table sets ``stride_ts`` pairs apart and row ``m`` reads set ``slots[m]`` (clamped), so mixed
    tenants cost what one does. ``SPLIT_K`` is a run-time argument: it only sizes the splits, so the
    autotuner's split-K variants share one binary."""
    VALUES: tl.constexpr = 32 // BITS if BITS != 3 else 32
    CHUNK: tl.constexpr = KW * VALUES
    CHUNKS_PER_GROUP: tl.constexpr = GROUP_SIZE // CHUNK
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HAS_SLOTS:
        slot = tl.minimum(tl.maximum(tl.load(slots_ptr + m).to(tl.int32), 0), S - 1)
        tables_ptr += slot.to(tl.int64) * stride_ts
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, KW)
    mask_n = offs_n < N
    units = K // VALUES
    chunks = K // CHUNK
    per_split = tl.cdiv(chunks, SPLIT_K)
    c_start = pid_k * per_split
    c_end = tl.minimum(c_start + per_split, chunks)
    acc = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    for g in range(c_start // CHUNKS_PER_GROUP, tl.cdiv(c_end, CHUNKS_PER_GROUP)):
        low0, low1, low2, low3, high0, high1, high2, high3 = group_planes(tables_ptr, offs_n, mask_n, g, stride_tn,
                                                                          BITS, EMULATE)  # fmt: skip
        first = tl.maximum(c_start, g * CHUNKS_PER_GROUP)
        for c in range(first, tl.minimum(c_end, g * CHUNKS_PER_GROUP + CHUNKS_PER_GROUP)):
            word_ptrs = words_ptr + (c * KW + offs_j)[None, :] * N + offs_n[:, None]
            x_ptrs = x_ptr + m * stride_xm + c * CHUNK + offs_j
            acc = accumulate_chunk(acc, word_ptrs, mask_n, units * N, low0, low1, low2, low3, high0, high1, high2,
                                   high3, x_ptrs, BITS, KW, FP16, EMULATE)  # fmt: skip
    tl.atomic_add(out_ptr + m * N + offs_n, tl.sum(acc, axis=1), mask=mask_n)


@triton.jit
def accumulate_chunk(acc, word_ptrs, mask_n, plane_stride, low0, low1, low2, low3, high0, high1, high2, high3,
                     x_ptrs, BITS: tl.constexpr, KW: tl.constexpr, FP16: tl.constexpr,
                     EMULATE: tl.constexpr):  # fmt: skip
    """One chunk: load its words (``[BLOCK_N, KW]`` per plane), turn them into PRMT selectors of eight
    codes each (:func:`~.layout._pack_unit` placed the codes for this), accumulate every value slot."""
    word = tl.load(word_ptrs, mask=mask_n[:, None], other=0)
    tables = (low0, low1, low2, low3, high0, high1, high2, high3)
    if BITS == 4:
        acc = accumulate_selector(acc, word & 0x77777777, word, *tables, x_ptrs, BITS, KW, FP16, EMULATE)
    elif BITS == 2:
        acc = accumulate_selector(acc, word & 0x33333333, word, *tables, x_ptrs, BITS, KW, FP16, EMULATE)
        acc = accumulate_selector(acc, (word >> 2) & 0x33333333, word, *tables, x_ptrs + 8 * KW, BITS, KW, FP16,
                                  EMULATE)  # fmt: skip
    else:
        word1 = tl.load(word_ptrs + plane_stride, mask=mask_n[:, None], other=0)
        word2 = tl.load(word_ptrs + 2 * plane_stride, mask=mask_n[:, None], other=0)
        spare = ((word >> 3) & 0x11111111) | ((word1 >> 2) & 0x22222222) | ((word2 >> 1) & 0x44444444)
        acc = accumulate_selector(acc, word & 0x77777777, word, *tables, x_ptrs, BITS, KW, FP16, EMULATE)
        acc = accumulate_selector(acc, word1 & 0x77777777, word, *tables, x_ptrs + 8 * KW, BITS, KW, FP16, EMULATE)
        acc = accumulate_selector(acc, word2 & 0x77777777, word, *tables, x_ptrs + 16 * KW, BITS, KW, FP16,
                                  EMULATE)  # fmt: skip
        acc = accumulate_selector(acc, spare, word, *tables, x_ptrs + 24 * KW, BITS, KW, FP16, EMULATE)
    return acc


_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, reset_to_zero=["out_ptr"])(lut_gemv_words_kernel)


def check_words(kernel: str, x: torch.Tensor, words: torch.Tensor, bits: int) -> None:
    """Refuse what the code-word kernels cannot read: ``x`` not fp16/bf16, or words not covering its columns."""
    planes, chunks, kw, _ = words.shape
    K = x.shape[1]
    if x.dtype not in WORDS_DTYPES or planes != UNIT_WORDS[bits] or chunks * kw * UNIT_CODES[bits] != K:
        raise ValueError(
            f"{kernel}: x {x.dtype} [M, {K}] with {bits}-bit words {list(words.shape)} "
            f"(expected fp16/bf16 x and int32 [{UNIT_WORDS[bits]}, chunks, KW, out] covering {K} columns)"
        )


def table_pairs(tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tables`` in ``dtype`` read as int32: two 16-bit entries per word, entry ``2i`` in the low half."""
    tables = tables.to(dtype).contiguous()
    if tables.storage_offset() % 2:  # a view into an odd element of a buffer cannot be read as int32 pairs
        tables = tables.clone()
    return tables.view(torch.int32)


def lut_gemv_words(
    x: torch.Tensor,
    words: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16) -> ``[M, N]`` from code words (:func:`~.layout.code_words`).
    ``block=(BLOCK_N, SPLIT_K, num_warps)`` skips autotuning. With ``slots [M]``, ``tables`` are table sets
    ``[S, N, gpr, 2**bits]`` and row ``m`` goes through ``tables[slots[m]]`` (clamped into ``[0, S)``)."""
    check_words("lut_gemv_words", x, words, bits)
    M, K = x.shape
    _, _, kw, N = words.shape
    sets = tables if slots is not None else tables[None]
    groups = sets.shape[2]
    pairs = table_pairs(sets, x.dtype)  # [S, N, groups, 2**bits / 2]
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:  # no program to launch
        return out.to(x.dtype)
    x, words = x.contiguous(), words.contiguous()
    has_slots = slots is not None
    slots = slots.contiguous() if has_slots else pairs  # never read without slots
    args = (x, words, pairs, slots, out, M, N, K, m_bucket(M), pairs.shape[0], x.stride(0), pairs.stride(0),
            pairs.stride(1))  # fmt: skip
    meta = dict(
        HAS_SLOTS=has_slots,
        GROUP_SIZE=K // groups,
        BITS=bits,
        KW=kw,
        FP16=x.dtype == torch.float16,
        EMULATE=interpreting(),
    )
    if block is None and interpreting():
        block = (32, 2, 1)  # the CPU interpreter cannot autotune (no device timer)
    if block is None:
        _autotuned[lambda c: (triton.cdiv(N, c["BLOCK_N"]), c["SPLIT_K"], M)](*args, **meta)
    else:
        grid = (triton.cdiv(N, block[0]), block[1], M)
        limits = {} if interpreting() else {"maxnreg": MAX_REGISTERS}
        lut_gemv_words_kernel[grid](*args, **meta, BLOCK_N=block[0], SPLIT_K=block[1], num_warps=block[2], **limits)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
