"""Triton kernels of the decode path on CUDA (imported only there; runtime.engine falls back to
plain torch without them).

- `qlinear`: y = x @ dequant(W)^T for int8/int4 weights packed the way the ChatGLM-6B int4/int8
  repos store them (int8: one signed byte per weight; int4: two signed nibbles per byte, the
  first weight of the pair in the high nibble; one fp16 scale per output row), for a few rows of
  x (decode: one row per sequence). The packed bytes are read once and never written back as
  fp16, which is what makes int4 read a quarter of fp16's bytes. Optional fused epilogues: bias,
  the tanh gelu, and GLM's residual `residual * alpha + y`.
- `decode_attention`: one new token per sequence: rotary (2D, as GLM) on its query and key,
  key/value written into the static cache at the sequence's length, attention over the cached
  keys plus the new one, all in one launch, reading the lengths from device memory so that one
  CUDA graph serves sequences of any length.

Numerics follow the reference model's roundings where they are cheap to follow (fp16 rounding
of the linear output before gelu/residual, of the scaled query and of the scores), so greedy
decoding stays on the reference's tokens.

Compilation: Triton compiles each kernel specialisation on first use and caches it in
TRITON_CACHE_DIR (default ~/.triton/cache). `python -m runtime.kernels --warm` compiles every
specialisation the engine uses for a model's shapes at deploy time, so that loading the model
compiles nothing.
"""
import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

# Launch settings per weight width: (BLOCK_N, BLOCK_K, num_warps, num_stages, magic, join, dot, words),
# see _tiles. These are the ones the first H200 run (docs/runs/h200-2026-12-05-decode-1.*) measured
# end to end; `bench/gpu_decode.py --sweep` picks them again per GPU. Any setting is correct.
GEMV_CONFIG = {4: (16, 1024, 4, 3, True), 8: (8, 512, 4, 3, True)}
SMALL_BATCH_CONFIG = {4: (64, 128, 4, 3, False), 8: (32, 128, 4, 4, False)}
MAX_ROWS = 16  # rows of x per launch of the tensor-core variant; more rows: caller dequantizes


@triton.jit
def _gelu_tanh(y):
    inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    # tanh(u) = 1 - 2 / (exp(2u) + 1), stable at both ends in float32.
    return 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))


@triton.jit
def _unpacked(w, BITS: tl.constexpr, MAGIC: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Packed bytes (BLOCK_N, BLOCK_K * BITS / 8) -> weights (BLOCK_N, BLOCK_K) in memory order, as
    fp16 (HALF, for tl.dot) or fp32. MAGIC: int -> float by placing the small unsigned value in
    the mantissa of 1024 (fp16) or 2^23 (fp32) and subtracting, instead of the conversion unit."""
    if MAGIC:
        raw = w.to(tl.int32) & 0xFF
        if BITS == 8:
            if HALF:
                v = ((raw ^ 0x80) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
            else:
                v = ((raw ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            if HALF:
                high = (((raw >> 4) ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
                low = (((raw & 0xF) ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
            else:
                high = (((raw >> 4) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                low = (((raw & 0xF) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            v = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))
    else:
        wide = w.to(tl.int32)
        if BITS == 8:
            v = wide
        else:
            # arithmetic shifts: the high nibble keeps its sign, the low one is sign-extended
            v = tl.reshape(tl.join(wide >> 4, (wide << 28) >> 28), (BLOCK_N, BLOCK_K))
        if HALF:
            v = v.to(tl.float16)
        else:
            v = v.to(tl.float32)
    return v


@triton.jit
def _qlinear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, o_ptr, M, N, row_bytes, alpha,
                    stride_x, stride_r, stride_o,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GELU: tl.constexpr,
                    MAGIC: tl.constexpr, JOIN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    PACKED: tl.constexpr = BLOCK_K * BITS // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, PACKED)
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * row_bytes
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif JOIN:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, PACKED), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for p0 in range(0, row_bytes, PACKED):
        w = tl.load(w_rows + (p0 + offs_p)[None, :])
        if JOIN:
            # Weights unpacked into memory order, so x is read contiguously (one dot, wide loads).
            k0 = p0 * (8 // BITS)
            values = _unpacked(w, BITS, MAGIC, USE_DOT, BLOCK_N, BLOCK_K)
            if USE_DOT:
                xv = tl.load(x_ptr + offs_m[:, None] * stride_x + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
                acc += tl.dot(xv, tl.trans(values))
            else:
                xv = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
                acc += values * xv[None, :]
        elif MAGIC and not USE_DOT:
            # int -> float without the conversion unit (16 results per clock per SM, slower than
            # HBM delivers int4 weights): put the small unsigned value into the mantissa of 2^23
            # with one logic op and subtract 2^23 plus the offset that made it unsigned.
            raw = w.to(tl.int32) & 0xFF
            if BITS == 8:
                value = ((raw ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                xv = tl.load(x_ptr + p0 + offs_p).to(tl.float32)
                acc += value * xv[None, :]
            else:
                high = (((raw >> 4) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                low = (((raw & 0xF) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                k_even = 2 * (p0 + offs_p)
                x_even = tl.load(x_ptr + k_even).to(tl.float32)
                x_odd = tl.load(x_ptr + k_even + 1).to(tl.float32)
                acc += high * x_even[None, :] + low * x_odd[None, :]
        elif BITS == 8:
            if USE_DOT:
                xv = tl.load(x_ptr + offs_m[:, None] * stride_x + (p0 + offs_p)[None, :], mask=m_ok[:, None], other=0.0)
                acc += tl.dot(xv, tl.trans(w.to(tl.float16)))
            else:
                xv = tl.load(x_ptr + p0 + offs_p).to(tl.float32)
                acc += w.to(tl.float32) * xv[None, :]
        else:
            wide = w.to(tl.int32)
            high = wide >> 4               # arithmetic shift keeps the sign of the high nibble
            low = (wide << 28) >> 28       # sign-extend the low nibble
            k_even = 2 * (p0 + offs_p)
            if USE_DOT:
                x_rows = x_ptr + offs_m[:, None] * stride_x
                x_even = tl.load(x_rows + k_even[None, :], mask=m_ok[:, None], other=0.0)
                x_odd = tl.load(x_rows + k_even[None, :] + 1, mask=m_ok[:, None], other=0.0)
                acc += tl.dot(x_even, tl.trans(high.to(tl.float16)))
                acc += tl.dot(x_odd, tl.trans(low.to(tl.float16)))
            else:
                x_even = tl.load(x_ptr + k_even).to(tl.float32)
                x_odd = tl.load(x_ptr + k_even + 1).to(tl.float32)
                acc += high.to(tl.float32) * x_even[None, :] + low.to(tl.float32) * x_odd[None, :]
    if USE_DOT:
        _epilogue(acc, offs_m, m_ok[:, None], offs_n, s_ptr, b_ptr, r_ptr, o_ptr, alpha, stride_r, stride_o,
                  HAS_BIAS, HAS_RES, GELU)
    else:
        rows = tl.zeros((1,), dtype=tl.int32)
        _epilogue(tl.sum(acc, axis=1)[None, :], rows, rows[:, None] < 1, offs_n, s_ptr, b_ptr, r_ptr, o_ptr, alpha,
                  stride_r, stride_o, HAS_BIAS, HAS_RES, GELU)


@triton.jit
def _epilogue(y, rows, row_ok, offs_n, s_ptr, b_ptr, r_ptr, o_ptr, alpha, stride_r, stride_o,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GELU: tl.constexpr):
    # One scale per output row: applied once, after the sum.
    y = y * tl.load(s_ptr + offs_n).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    # The reference rounds the linear layer's output to fp16 before anything else touches it.
    y = y.to(tl.float16).to(tl.float32)
    if GELU:
        y = _gelu_tanh(y)
    if HAS_RES:
        residual = tl.load(r_ptr + rows[:, None] * stride_r + offs_n[None, :], mask=row_ok, other=0.0).to(tl.float32)
        y = (residual * alpha).to(tl.float16).to(tl.float32) + y
    tl.store(o_ptr + rows[:, None] * stride_o + offs_n[None, :], y.to(tl.float16), mask=row_ok)


@triton.jit
def _qlinear_words_kernel(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, o_ptr, row_words, alpha, stride_r, stride_o,
                          BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GELU: tl.constexpr):
    """One row of x: the packed weights read as 32-bit words, every weight taken out of its word
    with one shift and one logic op (no per-byte extraction) and turned into a float by the
    mantissa trick; x is read contiguously as (words, weights per word)."""
    PER: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_W)
    t = tl.arange(0, PER)
    if BITS == 4:
        # Little-endian words: byte b holds weights 2b (high nibble) and 2b+1 (low nibble).
        shift = 4 * (t ^ 1)
    else:
        shift = 8 * t
    # (v & MASK) ^ (2^23 bits | sign bit) is 2^23 + (signed value + offset) as a float32.
    MASK: tl.constexpr = (1 << BITS) - 1
    FLIP: tl.constexpr = 0x4B000000 | (1 << (BITS - 1))
    OFFSET: tl.constexpr = 8388608.0 + (1 << (BITS - 1))
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * row_words
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, row_words, BLOCK_W):
        words = tl.load(w_rows + (w0 + j)[None, :])
        v = ((words[:, :, None] >> shift[None, None, :]) & MASK) ^ FLIP
        v = v.to(tl.float32, bitcast=True) - OFFSET
        xv = tl.load(x_ptr + (w0 + j)[:, None] * PER + t[None, :]).to(tl.float32)
        acc += tl.sum(v * xv[None, :, :], axis=2)
    rows = tl.zeros((1,), dtype=tl.int32)
    _epilogue(tl.sum(acc, axis=1)[None, :], rows, rows[:, None] < 1, offs_n, s_ptr, b_ptr, r_ptr, o_ptr, alpha,
              stride_r, stride_o, HAS_BIAS, HAS_RES, GELU)


def _tiles(M, N, K, bits, config=None):
    """The launch settings for this shape, shrunk to fit small (test) models; None if none fits.
    A setting is (BLOCK_N, BLOCK_K, num_warps, num_stages, magic, join, dot, words): join unpacks
    the weights into memory order; dot uses the tensor cores even for one row (padded to 16);
    words (one row only) reads the weights as 32-bit words (_qlinear_words_kernel)."""
    config = tuple(config or (SMALL_BATCH_CONFIG if M > 1 else GEMV_CONFIG)[bits])
    block_n, block_k, warps, stages, magic, join, dot, words = config + (False,) * (8 - len(config))
    use_dot = M > 1 or dot
    words = words and M == 1
    while block_n > 1 and N % block_n:
        block_n //= 2
    while block_k > 1 and K % block_k:
        block_k //= 2
    # tl.dot needs 16 in every dimension; the GEMV variant wants whole 16-byte rows of packed bytes.
    if block_k * bits // 8 < 16 or (use_dot and not words and block_n < 16):
        return None
    # The even/odd layout has no magic conversion on its tensor-core path.
    return block_n, block_k, warps, stages, magic and (join or not use_dot), join, use_dot and not words, words


def fits(M, N, packed_columns, bits):
    return M <= MAX_ROWS and _tiles(M, N, packed_columns * 8 // bits, bits) is not None


def qlinear(x, weight, scale, bits, bias=None, residual=None, alpha=1.0, gelu=False, config=None, out=None):
    """fp16 (M, K) x packed (N, K*bits/8) -> fp16 (M, N), M <= MAX_ROWS."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"qlinear takes at most {MAX_ROWS} rows, not {M}")
    tiles = _tiles(M, N, K, bits, config)
    if tiles is None:
        raise ValueError(f"shape ({N}, {K}) does not tile for int{bits}")
    block_n, block_k, warps, stages, magic, join, use_dot, words = tiles
    if out is None:
        out = torch.empty(M, N, dtype=torch.float16, device=x.device)
    dummy = out
    grid = (N // block_n, 1)
    if words:
        _qlinear_words_kernel[grid](
            x, weight.view(torch.int32), scale, bias if bias is not None else dummy, residual if residual is not None else dummy, out,
            K * bits // 32, float(alpha), residual.stride(0) if residual is not None else 0, out.stride(0),
            BITS=bits, BLOCK_N=block_n, BLOCK_W=block_k * bits // 32, HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, GELU=gelu, num_warps=warps, num_stages=stages)
        return out
    _qlinear_kernel[grid](
        x, weight, scale, bias if bias is not None else dummy, residual if residual is not None else dummy, out,
        M, N, K * bits // 8, float(alpha), x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        BITS=bits, BLOCK_M=16 if use_dot else 1, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, GELU=gelu, MAGIC=magic, JOIN=join,
        num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _decode_attention_kernel(qkv_ptr, k_cache, v_cache, cos_ptr, sin_ptr, slot_ptr, len_ptr, pos_ptr, bpos_ptr,
                             o_ptr, stride_qkv, stride_slot, stride_head, stride_o, sm_scale,
                             HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    slot = tl.load(slot_ptr + b).to(tl.int64)
    cached = tl.load(len_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    base = qkv_ptr + b * stride_qkv + h * 3 * HEAD_DIM
    # GLM's 2D rotary: the first half of the head turns with the position, the second half with
    # the block position; inside each half, rotate_half pairs element i with i +- HALF/2.
    in_half = d % HALF
    first_quarter = in_half < QUARTER
    partner = tl.where(first_quarter, d + QUARTER, d - QUARTER)
    sign = tl.where(first_quarter, -1.0, 1.0)
    angle_at = tl.where(d < HALF, tl.load(pos_ptr + b), tl.load(bpos_ptr + b))
    cos = tl.load(cos_ptr + angle_at * HALF + in_half).to(tl.float32)
    sin = tl.load(sin_ptr + angle_at * HALF + in_half).to(tl.float32)

    q = tl.load(base + d).to(tl.float32)
    q_pair = tl.load(base + partner).to(tl.float32) * sign
    q = ((q * cos).to(tl.float16).to(tl.float32) + (q_pair * sin).to(tl.float16).to(tl.float32)).to(tl.float16)
    k = tl.load(base + HEAD_DIM + d).to(tl.float32)
    k_pair = tl.load(base + HEAD_DIM + partner).to(tl.float32) * sign
    k = ((k * cos).to(tl.float16).to(tl.float32) + (k_pair * sin).to(tl.float16).to(tl.float32)).to(tl.float16)
    v = tl.load(base + 2 * HEAD_DIM + d)

    head_k = k_cache + slot * stride_slot + h * stride_head
    head_v = v_cache + slot * stride_slot + h * stride_head
    tl.store(head_k + cached * HEAD_DIM + d, k)
    tl.store(head_v + cached * HEAD_DIM + d, v)

    # The reference scales the query in fp16 and gets fp16 scores from its matmul.
    q = (q.to(tl.float32) * sm_scale).to(tl.float16).to(tl.float32)
    # The new token's own key and value come from registers (no read-after-write across threads).
    m_i = (tl.sum(q * k.to(tl.float32), axis=0)).to(tl.float16).to(tl.float32)
    l_i = tl.exp(m_i - m_i)  # 1.0, as a float32 tensor: loop-carried values keep one type
    acc = v.to(tl.float32)
    t = tl.arange(0, BLOCK_T)
    for t0 in range(0, cached, BLOCK_T):
        ok = (t0 + t) < cached
        keys = tl.load(head_k + (t0 + t)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1).to(tl.float16).to(tl.float32)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        correction = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        values = tl.load(head_v + (t0 + t)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * correction + tl.sum(p[:, None] * values.to(tl.float32), axis=0)
        l_i = l_i * correction + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(o_ptr + b * stride_o + h * HEAD_DIM + d, (acc / l_i).to(tl.float16))


@triton.jit
def _split_attention_kernel(qkv_ptr, k_cache, v_cache, cos_ptr, sin_ptr, slot_ptr, len_ptr, pos_ptr, bpos_ptr,
                            part_ptr, stride_qkv, stride_slot, stride_head, sm_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr):
    """Like _decode_attention_kernel, for few sequences: SPLITS programs share one head's keys
    (a single program per head leaves most of the GPU idle at batch 1). Each writes its running
    max, sum and weighted values; _combine_kernel merges them."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    heads = tl.num_programs(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    slot = tl.load(slot_ptr + b).to(tl.int64)
    cached = tl.load(len_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    base = qkv_ptr + b * stride_qkv + h * 3 * HEAD_DIM
    in_half = d % HALF
    first_quarter = in_half < QUARTER
    partner = tl.where(first_quarter, d + QUARTER, d - QUARTER)
    sign = tl.where(first_quarter, -1.0, 1.0)
    angle_at = tl.where(d < HALF, tl.load(pos_ptr + b), tl.load(bpos_ptr + b))
    cos = tl.load(cos_ptr + angle_at * HALF + in_half).to(tl.float32)
    sin = tl.load(sin_ptr + angle_at * HALF + in_half).to(tl.float32)
    q = tl.load(base + d).to(tl.float32)
    q_pair = tl.load(base + partner).to(tl.float32) * sign
    q = ((q * cos).to(tl.float16).to(tl.float32) + (q_pair * sin).to(tl.float16).to(tl.float32)).to(tl.float16)
    k = tl.load(base + HEAD_DIM + d).to(tl.float32)
    k_pair = tl.load(base + HEAD_DIM + partner).to(tl.float32) * sign
    k = ((k * cos).to(tl.float16).to(tl.float32) + (k_pair * sin).to(tl.float16).to(tl.float32)).to(tl.float16)
    v = tl.load(base + 2 * HEAD_DIM + d)
    head_k = k_cache + slot * stride_slot + h * stride_head
    head_v = v_cache + slot * stride_slot + h * stride_head
    last = split == SPLITS - 1
    # The last split owns the new token: it stores its key/value and counts it from registers.
    tl.store(head_k + cached * HEAD_DIM + d, k, mask=(d < HEAD_DIM) & last)
    tl.store(head_v + cached * HEAD_DIM + d, v, mask=(d < HEAD_DIM) & last)
    q = (q.to(tl.float32) * sm_scale).to(tl.float16).to(tl.float32)
    own = (tl.sum(q * k.to(tl.float32), axis=0)).to(tl.float16).to(tl.float32)
    m_i = tl.where(last, own, float("-inf"))
    l_i = tl.where(last, 1.0, 0.0)
    acc = tl.where(last, v.to(tl.float32), 0.0)
    chunk = tl.cdiv(tl.cdiv(cached, SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    stop = tl.minimum(start + chunk, cached)
    t = tl.arange(0, BLOCK_T)
    for t0 in range(start, stop, BLOCK_T):
        ok = (t0 + t) < stop
        keys = tl.load(head_k + (t0 + t)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1).to(tl.float16).to(tl.float32)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        correction = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        values = tl.load(head_v + (t0 + t)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * correction + tl.sum(p[:, None] * values.to(tl.float32), axis=0)
        l_i = l_i * correction + tl.sum(p, axis=0)
        m_i = m_new
    part = part_ptr + ((b * heads + h) * SPLITS + split) * (HEAD_DIM + 2)
    tl.store(part + d, acc)
    tl.store(part + HEAD_DIM, m_i)
    tl.store(part + HEAD_DIM + 1, l_i)


@triton.jit
def _combine_kernel(part_ptr, o_ptr, stride_o, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    part = part_ptr + ((b * heads + h) * SPLITS + s) * (HEAD_DIM + 2)
    m = tl.load(part + HEAD_DIM)
    l = tl.load(part + HEAD_DIM + 1)
    top = tl.max(m, axis=0)  # finite: the last split always holds the new token
    weight = tl.exp(m - top)
    acc = tl.load(part[:, None] + d[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(o_ptr + b * stride_o + h * HEAD_DIM + d, out.to(tl.float16))


ATTENTION_CONFIG = (128, 4, 3)  # (BLOCK_T keys per iteration, num_warps, num_stages)
SPLIT_CONFIG = (64, 4, 3, 4)    # the same plus the number of splits per head
SPLIT_BELOW = 132              # split when fewer (sequence, head) pairs than this: one per SM

SETTINGS_ENV = "CHATGLM_KERNEL_SETTINGS"


def settings() -> dict:
    return {"gemv": {str(b): list(c) for b, c in GEMV_CONFIG.items()},
            "small_batch": {str(b): list(c) for b, c in SMALL_BATCH_CONFIG.items()},
            "attention": list(ATTENTION_CONFIG), "split": list(SPLIT_CONFIG), "split_below": SPLIT_BELOW}


def apply_settings(values: dict) -> None:
    """Launch settings found by a sweep on this GPU (JSON as settings() writes it). The deploy
    warms Triton's cache with the same settings, so that they cost no compile at load."""
    global ATTENTION_CONFIG, SPLIT_CONFIG, SPLIT_BELOW
    for key, table in (("gemv", GEMV_CONFIG), ("small_batch", SMALL_BATCH_CONFIG)):
        for bits, config in values.get(key, {}).items():
            table[int(bits)] = tuple(config)
    ATTENTION_CONFIG = tuple(values.get("attention", ATTENTION_CONFIG))
    SPLIT_CONFIG = tuple(values.get("split", SPLIT_CONFIG))
    SPLIT_BELOW = int(values.get("split_below", SPLIT_BELOW))


if os.environ.get(SETTINGS_ENV):
    apply_settings(json.loads(os.environ[SETTINGS_ENV]))


def split_attention(qkv, k_cache, v_cache, cos, sin, slots, lengths, positions, blocks, num_heads, out=None,
                    config=None):
    """decode_attention with each head's keys shared among several programs (for batch 1-3)."""
    block_t, num_warps, num_stages, splits = config or SPLIT_CONFIG
    batch = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if out is None:
        out = torch.empty(batch, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    parts = torch.empty(batch, num_heads, splits, head_dim + 2, dtype=torch.float32, device=qkv.device)
    _split_attention_kernel[(batch, num_heads, splits)](
        qkv, k_cache, v_cache, cos, sin, slots, lengths, positions, blocks, parts,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), head_dim ** -0.5,
        HEAD_DIM=head_dim, BLOCK_T=block_t, SPLITS=splits, num_warps=num_warps, num_stages=num_stages)
    _combine_kernel[(batch, num_heads)](parts, out, out.stride(0), HEAD_DIM=head_dim, SPLITS=splits, num_warps=4)
    return out


def decode_attention(qkv, k_cache, v_cache, cos, sin, slots, lengths, positions, blocks, num_heads, out=None,
                     config=None):
    """qkv (B, heads*3*head_dim) fp16; caches (slots, heads, max_len, head_dim); cos/sin
    (max_len+1, head_dim/2); slots/lengths/positions/blocks (B,) int32 on the device. Writes each
    row's new key/value at index lengths[b] of its slot and returns (B, heads*head_dim)."""
    block_t, num_warps, num_stages = config or ATTENTION_CONFIG
    batch = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if out is None:
        out = torch.empty(batch, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(batch, num_heads)](
        qkv, k_cache, v_cache, cos, sin, slots, lengths, positions, blocks, out,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), out.stride(0), head_dim ** -0.5,
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=num_warps, num_stages=num_stages)
    return out


# --- deploy-time warm-up -------------------------------------------------------------------------

CHATGLM_6B = dict(hidden_size=4096, inner_hidden_size=16384, num_attention_heads=32)


def warm(hidden_size, inner_hidden_size, num_attention_heads, bits_list=(4, 8), max_rows=MAX_ROWS, device="cuda"):
    """Compile (or load from Triton's cache) every kernel specialisation the engine launches for
    these shapes. Returns the seconds it took per kernel family."""
    timings = {}
    hd = hidden_size // num_attention_heads
    shapes = [(3 * hidden_size, hidden_size, dict(bias=True)),
              (hidden_size, hidden_size, dict(bias=True, residual=True)),
              (inner_hidden_size, hidden_size, dict(bias=True, gelu=True)),
              (hidden_size, inner_hidden_size, dict(bias=True, residual=True))]
    for bits in bits_list:
        start = time.perf_counter()
        for n, k, extra in shapes:
            weight = torch.randint(-128, 127, (n, k * bits // 8), dtype=torch.int8, device=device)
            scale = torch.rand(n, dtype=torch.float16, device=device)
            bias = torch.zeros(n, dtype=torch.float16, device=device) if extra.get("bias") else None
            # Row counts 1 (GEMV variant), 2 and 16 (tensor-core variant): Triton specialises an int
            # argument equal to 1 or divisible by 16, so these three cover every decode batch.
            for rows in (1, 2, MAX_ROWS):
                x = torch.randn(rows, k, dtype=torch.float16, device=device)
                residual = torch.randn(rows, n, dtype=torch.float16, device=device) if extra.get("residual") else None
                qlinear(x, weight, scale, bits, bias=bias, residual=residual, alpha=2.0, gelu=extra.get("gelu", False))
        torch.cuda.synchronize()
        timings[f"int{bits}"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    slots = 2
    cache = torch.zeros(slots, num_attention_heads, 64, hd, dtype=torch.float16, device=device)
    table = torch.zeros(65, hd // 2, dtype=torch.float16, device=device)
    index = torch.zeros(1, dtype=torch.int32, device=device)
    qkv = torch.randn(1, 3 * hidden_size, dtype=torch.float16, device=device)
    decode_attention(qkv, cache, cache.clone(), table, table, index, index, index, index, num_attention_heads)
    split_attention(qkv, cache, cache.clone(), table, table, index, index, index, index, num_attention_heads)
    torch.cuda.synchronize()
    timings["attention"] = round(time.perf_counter() - start, 3)
    return timings


def cache_dir():
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m runtime.kernels", description="Warm Triton's cache for the engine.")
    parser.add_argument("--warm", action="store_true", help="compile every kernel the engine uses (deploy time)")
    parser.add_argument("--config", help="the model's config.json (default: ChatGLM-6B's shapes)")
    parser.add_argument("--bits", default="4,8", help="weight widths to build for, e.g. 4 or 4,8")
    args = parser.parse_args(argv)
    if not args.warm:
        parser.error("nothing to do: give --warm")
    shapes = dict(CHATGLM_6B)
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
        shapes = {key: config[key] for key in shapes}
    before = sum(len(files) for _, _, files in os.walk(cache_dir())) if os.path.isdir(cache_dir()) else 0
    timings = warm(**shapes, bits_list=tuple(int(b) for b in args.bits.split(",") if b))
    after = sum(len(files) for _, _, files in os.walk(cache_dir()))
    print(json.dumps({"cache_dir": cache_dir(), "seconds": timings, "new_cache_files": after - before,
                      "settings": settings(), **shapes}))


if __name__ == "__main__":
    sys.exit(main())
