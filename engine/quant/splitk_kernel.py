"""A split-K Triton matmul of activations by GPTQ's packed integer weights: y = x @ W.T.

Why our own: the decode step reads every weight once per token, so its speed is the weights' bytes
over the bandwidth the kernel streams them at. tinygemm keeps a second copy of the codes and falls
back to dequantizing beyond 16 rows, gemlite was slower still on the H200 (benchmarks/RESULTS.md),
and Marlin needs an nvcc build on each machine. These kernels are short enough to read and are
tuned on the H200's own shapes (benchmarks/quant_matmul.py --sweep).

Two kernels: `splitk_gptq_gemv` for 1-4 rows a program, on the CUDA cores (its docstring; 4-bit
codes under bf16 go through packed bf16x2 PTX there), and `splitk_gptq_matmul` for 16 rows or
more, on the tensor cores (below).

The weights stay in the checkpoint's layout, so nothing is repacked into tiles:
- `qweight` int32 [K / p, N], p = 32 // bits codes a word: input row p*i+j in bits bits*j.. of row i;
- `scales` [K / group, N] in the activations' dtype; `zeros` uint8 [K / group, N];
- w[k, n] = scales[g, n] * (code[k, n] - zeros[g, n]), with g = k // group.

Each program multiplies a BLOCK_M x BLOCK_K slice of x by a BLOCK_K x BLOCK_N tile of codes,
unpacked in registers, on the tensor cores, for one 1/SPLIT_K share of K. The zero point and scale
come out of the dot product, once per output and group, not once per weight:
    sum_k x[m, k] * s[n] * (c[k, n] - z[n]) = s[n] * (sum_k x[m, k] * c[k, n] - z[n] * sum_k x[m, k]).
For 4-bit codes under bf16 activations the unpacking needs no conversion either: a code c OR'ed
into the bits of bf16 128.0 (0x4300) is the bf16 number 128 + c, so the tile holds 128 + c and
128 joins the zero point (Marlin's trick). fp16 uses 1024.0 (0x6400), exact for 8-bit codes too.

Shares of K add into the output with atomics, so the output must start at zero; one share
(split_k = 1) stores it. A few rows split K into many shares so that every SM streams weights;
many rows split it into few or none. The output is float32 (splitk_linear.py's launcher): adding
shares in bf16 rounded each share's sum once more, so the result was 3-4 times further from the
dequantized weights than cuBLAS's, and the order the shares finished in moved it at bf16's
precision; in float32 that order moves only float32's last bits. The layer casts the output to the
activations' dtype, which torch.compile fuses into the elementwise kernel that reads it next
(rotary, the residual add, SiLU).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M", "split_k"])  # one build for any row count and share count
def splitk_gptq_matmul(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, split_k,
    BITS: tl.constexpr, GROUP: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M)). BLOCK_K divides GROUP and K % GROUP == 0.
    MAGIC: the bit pattern of MAGIC_BASE in x's dtype (0: convert the codes instead). ATOMIC: add
    into out (which holds zeros) rather than store; needed when split_k > 1."""
    PACK: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N

    tiles = K // BLOCK_K
    per_share = tl.cdiv(tiles, split_k)
    first = pid_k * per_share
    last = tl.minimum(first + per_share, tiles)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    # Each word once: [BLOCK_K / PACK, BLOCK_N] words, unpacked to [BLOCK_K / PACK, PACK, BLOCK_N] codes
    # and laid out as BLOCK_K rows (row PACK*i+j is word row i's bits BITS*j..).
    q_ptrs = qweight_ptr + tl.arange(0, BLOCK_K // PACK)[:, None] * N + offs_n[None, :]
    shifts = (tl.arange(0, PACK) * BITS)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        packed = tl.load(q_ptrs + (k0 // PACK) * N, mask=n_mask[None, :], other=0)
        codes = tl.reshape((packed[:, None, :] >> shifts) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
        if MAGIC:
            weights = (codes | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)  # MAGIC_BASE + code
        else:
            weights = codes.to(x.dtype)
        group = k0 // GROUP
        scales = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zeros = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0).to(tl.float32) + MAGIC_BASE
        row_sums = tl.sum(x.to(tl.float32), axis=1)
        dot = tl.dot(x, weights)
        acc += (dot - row_sums[:, None] * zeros[None, :]) * scales[None, :]

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["M", "split_k"])
def splitk_gptq_gemv(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, split_k,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_WORDS: tl.constexpr, PAIRS: tl.constexpr,
):
    """Up to 4 rows of x per program, without the tensor cores: grid (cdiv(N, BLOCK_N), split_k,
    cdiv(M, ROWS)). A tile is BLOCK_WORDS rows of words (BLOCK_WORDS * 32 / BITS inputs, within one
    group); each word's codes are decoded once for the program's rows.

    Two ways to decode, neither with a conversion instruction (which runs at a quarter of the rate):
    - PAIRS (4 bits, bf16, CUDA: see _BF16_PAIRS): two codes a register, decoded, offset and
      multiplied in packed bf16 arithmetic, which issues about half the instructions a code.
    - Otherwise one code a float32: shifted into the top BITS of its mantissa and OR'ed into the bits
      of 1.0, it reads 1 + c / 2**BITS. So sum_k x * c = 2**BITS * (sum_k x * that - sum_k x), and
      2**BITS joins the zero point. This is the road for 8 bits, fp16 and Triton's interpreter
      (which runs no PTX).
    The products stay in a [BLOCK_WORDS, BLOCK_N] accumulator per row, summed over the words once,
    after the loop."""
    PACK: tl.constexpr = 32 // BITS
    SCALE: tl.constexpr = 1 << BITS
    TOP: tl.constexpr = 23 - BITS  # where a code's lowest bit goes in the float's mantissa
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.program_id(2) * ROWS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.arange(0, BLOCK_WORDS)
    n_mask = offs_n < N

    tiles = K // (BLOCK_WORDS * PACK)
    per_share = tl.cdiv(tiles, split_k)
    first = pid_k * per_share
    last = tl.minimum(first + per_share, tiles)

    acc0 = tl.zeros((BLOCK_WORDS, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_WORDS, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_WORDS, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_WORDS, BLOCK_N), dtype=tl.float32)
    for tile in range(first, last):
        w0 = tile * BLOCK_WORDS
        packed = tl.load(qweight_ptr + (w0 + words)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        group = (w0 * PACK) // GROUP
        scales = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zeros = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0)
        if PAIRS:
            d0, d1, d2, d3 = _bf16_pairs(packed, zeros)
            acc0 = _pairs_row(acc0, d0, d1, d2, d3, x_ptr, row0, M, stride_xm, w0, words, scales)
            if ROWS > 1:
                acc1 = _pairs_row(acc1, d0, d1, d2, d3, x_ptr, row0 + 1, M, stride_xm, w0, words, scales)
            if ROWS > 2:
                acc2 = _pairs_row(acc2, d0, d1, d2, d3, x_ptr, row0 + 2, M, stride_xm, w0, words, scales)
                acc3 = _pairs_row(acc3, d0, d1, d2, d3, x_ptr, row0 + 3, M, stride_xm, w0, words, scales)
        else:
            zeros = zeros.to(tl.float32) + SCALE
            acc0 = _gemv_row(acc0, packed, x_ptr, row0, M, stride_xm, w0, words, scales, zeros, BITS, PACK, SCALE,
                             TOP)
            if ROWS > 1:
                acc1 = _gemv_row(acc1, packed, x_ptr, row0 + 1, M, stride_xm, w0, words, scales, zeros, BITS, PACK,
                                 SCALE, TOP)
            if ROWS > 2:
                acc2 = _gemv_row(acc2, packed, x_ptr, row0 + 2, M, stride_xm, w0, words, scales, zeros, BITS, PACK,
                                 SCALE, TOP)
                acc3 = _gemv_row(acc3, packed, x_ptr, row0 + 3, M, stride_xm, w0, words, scales, zeros, BITS, PACK,
                                 SCALE, TOP)

    _gemv_store(acc0, row0, M, pid_k, offs_n, n_mask, bias_ptr, out_ptr, stride_om, HAS_BIAS, ATOMIC)
    if ROWS > 1:
        _gemv_store(acc1, row0 + 1, M, pid_k, offs_n, n_mask, bias_ptr, out_ptr, stride_om, HAS_BIAS, ATOMIC)
    if ROWS > 2:
        _gemv_store(acc2, row0 + 2, M, pid_k, offs_n, n_mask, bias_ptr, out_ptr, stride_om, HAS_BIAS, ATOMIC)
        _gemv_store(acc3, row0 + 3, M, pid_k, offs_n, n_mask, bias_ptr, out_ptr, stride_om, HAS_BIAS, ATOMIC)


@triton.jit
def _gemv_row(acc, packed, x_ptr, row, M, stride_xm, w0, words, scales, zeros,
              BITS: tl.constexpr, PACK: tl.constexpr, SCALE: tl.constexpr, TOP: tl.constexpr):
    """acc plus one row's products with a tile of words (see splitk_gptq_gemv); a row past M adds 0."""
    part = tl.zeros(acc.shape, dtype=tl.float32)
    row_sums = tl.zeros((acc.shape[0],), dtype=tl.float32)
    x_row = x_ptr + row * stride_xm + (w0 + words) * PACK
    in_rows = (words * 0 + row) < M
    for j in tl.static_range(PACK):
        x = tl.load(x_row + j, mask=in_rows, other=0.0).to(tl.float32)
        if BITS * j <= TOP:
            moved = packed << (TOP - BITS * j)
        else:
            moved = packed >> (BITS * j - TOP)
        ones = (moved & (((1 << BITS) - 1) << TOP)) | 0x3F800000  # 1 + code / SCALE
        part += x[:, None] * ones.to(tl.float32, bitcast=True)
        row_sums += x
    return acc + (SCALE * part - row_sums[:, None] * zeros[None, :]) * scales[None, :]


# PAIRS (4-bit codes, bf16 activations, CUDA): two codes a 32-bit register. One word's eight codes
# become four bf16x2 registers (codes s and s + 4 of the word, s = 0..3) with one shift and one
# LOP3 each: a code OR'ed into bf16 128.0 reads 128 + c, exactly, and a packed FMA takes 128 + z off
# (exact too: whole numbers below 256). So each register holds the pair (c - z) and nothing is
# converted. Triton has no packed bf16 arithmetic, hence the PTX.
_BF16_PAIRS = tl.constexpr("""{
.reg .b32 s, one;
mov.b32 one, 0x3F803F80;
lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $0, $0, one, $5;
shr.u32 s, $4, 4;
lop3.b32 $1, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $1, $1, one, $5;
shr.u32 s, $4, 8;
lop3.b32 $2, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $2, $2, one, $5;
shr.u32 s, $4, 12;
lop3.b32 $3, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $3, $3, one, $5;
}""")

# The word's eight products with x in four packed FMAs, each half summing four in bf16, then the
# two halves widened to float32 (a bf16 is a float32's top 16 bits) and added: one float32 a word.
_BF16_PAIRS_DOT = tl.constexpr("""{
.reg .b32 p, lo, hi, nz;
mov.b32 nz, 0x80008000;
fma.rn.bf16x2 p, $1, $5, nz;
fma.rn.bf16x2 p, $2, $6, p;
fma.rn.bf16x2 p, $3, $7, p;
fma.rn.bf16x2 p, $4, $8, p;
shl.b32 lo, p, 16;
and.b32 hi, p, 0xFFFF0000;
add.f32 $0, lo, hi;
}""")


@triton.jit
def _bf16_pairs(packed, zeros):
    """The four bf16x2 registers (c - z) of each word of `packed` [words, n]; zeros: bytes [n]."""
    negative = (-(zeros.to(tl.float32) + 128.0)).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.inline_asm_elementwise(_BF16_PAIRS, "=r,=r,=r,=r,r,r", [packed, (negative | (negative << 16))[None, :]],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _pairs_row(acc, d0, d1, d2, d3, x_ptr, row, M, stride_xm, w0, words, scales):
    """acc plus one row's products with the words' decoded pairs; a row past M adds 0. The products
    of a word sum in bf16 (four a half), where the other path sums in float32: about bf16's own
    rounding more (benchmarks/RESULTS.md has the error)."""
    x_row = x_ptr + row * stride_xm + (w0 + words) * 8
    in_rows = (words * 0 + row) < M
    part = tl.inline_asm_elementwise(
        _BF16_PAIRS_DOT, "=r,r,r,r,r,r,r,r,r",
        [d0, d1, d2, d3, _x_pair(x_row, 0, in_rows)[:, None], _x_pair(x_row, 1, in_rows)[:, None],
         _x_pair(x_row, 2, in_rows)[:, None], _x_pair(x_row, 3, in_rows)[:, None]],
        dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    return acc + part * scales[None, :]


@triton.jit
def _x_pair(x_row, s: tl.constexpr, in_rows):
    """bf16x2 (x[8w + s], x[8w + s + 4]) for each word w, matching the pairs of _BF16_PAIRS."""
    low = tl.load(x_row + s, mask=in_rows, other=0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = tl.load(x_row + s + 4, mask=in_rows, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
    return low | (high << 16)


@triton.jit
def _gemv_store(acc, row, M, pid_k, offs_n, n_mask, bias_ptr, out_ptr, stride_om,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    total = tl.sum(acc, axis=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        total += tl.where(pid_k == 0, 1.0, 0.0) * bias
    mask = n_mask & ((offs_n * 0 + row) < M)
    out_ptrs = out_ptr + row * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
