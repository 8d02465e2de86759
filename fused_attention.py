"""
Fused attention shared by all three models.

    from fused_attention import attention
    y = attention(q, k, v, causal=False, k_lens=None, sm_scale=None)

q is (B, H, Tq, D), k and v are (B, H, Tk, D). k_lens (optional, integer, shape (B,)) gives the
number of valid keys per batch element: keys at positions >= k_lens[b] are ignored (values are
clamped to [0, Tk]). With causal=True the mask is aligned bottom-right: query i sees keys
j <= i + Tk - Tq (what a KV cache needs). sm_scale defaults to 1/sqrt(D). A query that sees no key
at all returns zeros and passes zero gradient.

Two implementations of the same function:
- "triton": our FlashAttention-2 style kernels (forward + backward) for CUDA tensors in fp16/bf16,
  head dim 16, 32, 64 or 128 (or CPU tensors under Triton's interpreter, TRITON_INTERPRET=1 set
  before this module is imported: how the tests check the kernels without a GPU).
- "torch": PyTorch's scaled_dot_product_attention with the equivalent boolean mask; any device,
  dtype and head dim.
Which one runs: the `backend` keyword, else the module setting BACKEND, which comes from the
environment variable FUSED_ATTENTION=auto|triton|torch (default auto: triton where it applies,
i.e. CUDA + fp16/bf16 + a kernel head dim, torch otherwise; "triton" turns anything the kernels
cannot do into an error). Other settings: FUSED_ATTENTION_AUTOTUNE=0 uses fixed tiles instead of
timing a few per shape, FUSED_ATTENTION_BWD=atomic gets dq by atomic adds (see _flash_backward).
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BACKEND = os.environ.get("FUSED_ATTENTION", "auto")
BWD = os.environ.get("FUSED_ATTENTION_BWD", "split")  # how the triton backward gets dq: "split" or "atomic"

# -----------------------------------------------------------------------------
# checks shared by both paths

def _check(q, k, v, k_lens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"fused_attention.attention: {name} must be a 4-d tensor (B, H, T, D), "
                             f"got {getattr(t, 'shape', type(t))}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"fused_attention.attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"fused_attention.attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fused_attention.attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fused_attention.attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k_lens is not None:
        if not isinstance(k_lens, torch.Tensor) or k_lens.shape != (B,) or k_lens.is_floating_point() or k_lens.is_complex():
            raise ValueError(f"fused_attention.attention: k_lens must be an integer tensor of shape ({B},), "
                             f"got {getattr(k_lens, 'dtype', type(k_lens))} {tuple(getattr(k_lens, 'shape', ()))}")

# -----------------------------------------------------------------------------
# the PyTorch path

def _mask(B, Tq, Tk, causal, k_lens, device):
    """Boolean (B or 1, 1, Tq, Tk) mask, True = may attend; None when nothing is masked."""
    mask = None
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        mask = (j <= i + (Tk - Tq))[None, None]  # bottom-right aligned
    if k_lens is not None:
        valid = torch.arange(Tk, device=device)[None, :] < k_lens.to(device)[:, None]  # (B, Tk)
        valid = valid[:, None, None, :]
        mask = valid if mask is None else (mask & valid)
    return mask

def attention_torch(q, k, v, causal=False, k_lens=None, sm_scale=None):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if causal and Tq == Tk and k_lens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale)
    mask = _mask(B, Tq, Tk, causal, k_lens, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    # rows that see no key: let them attend to everything (finite softmax, no NaN in forward or
    # backward), then zero their output; torch.where sends them zero gradient
    row_ok = mask.any(dim=-1, keepdim=True)  # (B or 1, 1, Tq, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~row_ok, scale=sm_scale)
    return torch.where(row_ok, y, torch.zeros((), dtype=y.dtype, device=y.device))

# -----------------------------------------------------------------------------
# the Triton path: FlashAttention-2 (Dao, 2023) with key lengths and bottom-right causal masking
#
# Notation in the kernels: a query row i sees key column j when j < klen (klen = min(k_lens[b], Tk))
# and, if causal, j <= i + diag with diag = Tk - Tq. Scores are kept in base 2: qk_scale = sm_scale*log2(e),
# so exp becomes exp2 and the saved log-sum-exp (lse) is in base 2 too. Each loop over blocks is split
# into an unmasked part (blocks every row of the tile fully sees) and a masked part (blocks on the
# causal diagonal or across klen); blocks nobody sees (past klen, above the diagonal) are never visited.
# A row that sees no key gets output 0 and lse = +inf, so exp2(s - lse) = 0 for it in the backward.

LOG2E = 1.4426950408889634

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_d,
               klen, diag, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < klen, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < klen, other=0.0)
        else:
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        qk = tl.dot(q, kT) * qk_scale
        if MASKED:
            ok = cols[None, :] < klen
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: no inf - inf
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i

@triton.jit
def _query_tile(KLENS, H, Tq, Tk, HAS_KLENS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which (batch, head, query block) this program owns, and how many keys its batch row has."""
    n_blocks = tl.cdiv(Tq, BLOCK_M)
    block = tl.program_id(0) % n_blocks
    if CAUSAL:  # the last query blocks see the most keys: start them first, for a shorter tail
        block = n_blocks - 1 - block
    off_bh = tl.program_id(0) // n_blocks
    off_b = (off_bh // H).to(tl.int64)
    klen = Tk
    if HAS_KLENS:
        klen = tl.maximum(tl.minimum(tl.load(KLENS + off_b), Tk), 0)
    return block * BLOCK_M, off_bh, off_b, (off_bh % H).to(tl.int64), klen

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KLENS,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                H, Tq, Tk, qk_scale, q_bucket, k_bucket,
                HAS_KLENS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh, off_b, off_h, klen = _query_tile(KLENS, H, Tq, Tk, HAS_KLENS, CAUSAL, BLOCK_M)
    diag = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=offs_m[:, None] < Tq, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # keys [0, full) are seen by every row of this tile, keys [0, hi) by at least one
    if CAUSAL:
        hi = tl.minimum(klen, start_m + BLOCK_M + diag)
        full = tl.maximum(tl.minimum(klen, start_m + 1 + diag), 0)
    else:
        hi = klen
        full = klen
    full = (full // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, full, offs_m, offs_d,
                               klen, diag, qk_scale, False, CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full, hi, offs_m, offs_d,
                               klen, diag, qk_scale, True, CAUSAL, BLOCK_N)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)

@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                    H, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the softmax-gradient term of every row
    n_blocks = tl.cdiv(Tq, BLOCK_M)
    start_m = (tl.program_id(0) % n_blocks) * BLOCK_M
    off_bh = tl.program_id(0) // n_blocks
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)

@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dt, lo, hi,
                    offs_n, offs_d, Tq, klen, diag, sm_scale, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # works on transposed tiles (keys along rows) so that dk and dv accumulate without transposes
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m < Tq  # rows past Tq load as zeros: with dO = 0 and delta = 0 they add nothing
        qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=rows[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        sT = tl.dot(k, qT) * qk_scale - lse[None, :]
        if MASKED:
            ok = (offs_n[:, None] < klen) & rows[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + diag)
            sT = tl.where(ok, sT, float("-inf"))
        pT = tl.math.exp2(sT)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
        if ATOMIC_DQ:  # this key block's share of dq, added into an fp32 buffer (FlashAttention-2's way)
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k) * sm_scale
            tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=rows[:, None], sem="relaxed")
    return dk, dv

@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, KLENS,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                     H, Tq, Tk, sm_scale, qk_scale, q_bucket, k_bucket,
                     HAS_KLENS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_blocks = tl.cdiv(Tk, BLOCK_N)
    start_n = (tl.program_id(0) % n_blocks) * BLOCK_N
    off_bh = tl.program_id(0) // n_blocks
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    klen = Tk
    if HAS_KLENS:
        klen = tl.maximum(tl.minimum(tl.load(KLENS + off_b), Tk), 0)
    diag = Tk - Tq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < klen
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=cols, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=cols, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    lse_base = LSE + off_bh.to(tl.int64) * Tq
    delta_base = DELTA + off_bh.to(tl.int64) * Tq
    dq_base = DQ + off_bh.to(tl.int64) * Tq * HEAD_DIM  # fp32, contiguous; used with ATOMIC_DQ only
    # query rows [lo, Tq) see some key of this block; rows >= mid see all of it (up to klen)
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0)
        mid = tl.maximum(start_n + BLOCK_N - 1 - diag, lo)
        mid = lo + tl.cdiv(mid - lo, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    # a block wholly past klen is seen by nobody: q_end = 0 makes every loop empty (dk = dv = 0)
    q_end = Tq * tl.minimum(tl.maximum(klen - start_n, 0), 1)
    # a block wholly inside klen needs no mask past the diagonal; one that crosses klen does
    inside = tl.minimum(tl.maximum(klen - start_n - BLOCK_N + 1, 0), 1)
    split = mid + inside * (q_end - mid)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dt,
                             lo, tl.minimum(mid, q_end), offs_n, offs_d, Tq, klen, diag, sm_scale, qk_scale, True, CAUSAL,
                             ATOMIC_DQ, HEAD_DIM, BLOCK_M)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dt,
                             mid, split, offs_n, offs_d, Tq, klen, diag, sm_scale, qk_scale, False, CAUSAL,
                             ATOMIC_DQ, HEAD_DIM, BLOCK_M)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dt,
                             split, q_end, offs_n, offs_d, Tq, klen, diag, sm_scale, qk_scale, True, CAUSAL,
                             ATOMIC_DQ, HEAD_DIM, BLOCK_M)
    dk = dk * sm_scale
    out = offs_n[:, None] < Tk
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=out)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out)

@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_d,
                  klen, diag, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < klen, other=0.0)
            vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None], mask=cols[None, :] < klen, other=0.0)
        else:
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None])
        s = tl.dot(q, kT) * qk_scale - lse[:, None]
        if MASKED:
            ok = cols[None, :] < klen
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq

@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KLENS,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                   stride_dqb, stride_dqh, stride_dqt,
                   H, Tq, Tk, sm_scale, qk_scale, q_bucket, k_bucket,
                   HAS_KLENS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh, off_b, off_h, klen = _query_tile(KLENS, H, Tq, Tk, HAS_KLENS, CAUSAL, BLOCK_M)
    diag = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < Tq  # rows past Tq: q = dO = 0, lse = delta = 0, so their ds is 0 and nothing is stored
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Tq + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Tq + offs_m, mask=rows, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        hi = tl.minimum(klen, start_m + BLOCK_M + diag)
        full = tl.maximum(tl.minimum(klen, start_m + 1 + diag), 0)
    else:
        hi = klen
        full = klen
    full = (full // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, full, offs_m, offs_d,
                       klen, diag, qk_scale, False, CAUSAL, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, full, hi, offs_m, offs_d,
                       klen, diag, qk_scale, True, CAUSAL, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rows[:, None])

# Triton's interpreter runs kernels on CPU tensors (how the tests check them without a GPU); it is
# chosen when TRITON_INTERPRET=1 is set before this module is imported.
INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)

# Launch configurations: (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel and head
# dim (D <= 64 shares the D = 64 row). No GPU was at hand to time them, so the first entry of each list,
# the fixed default, is the largest tile that ptxas (CUDA 13, sm_90a, bf16, causal + k_lens variant)
# compiles without register spills (forward and dq at D = 128: 4-8 bytes); the others are what the autotuner also times on a GPU, once per
# (D, causal, k_lens, dtype, power-of-two bucket of Tq and Tk). FUSED_ATTENTION_AUTOTUNE=0: defaults only.
TILES = {
    ("fwd", 64): [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3)],
    ("dq", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    ("dq", 128): [(64, 64, 8, 3), (64, 32, 8, 3), (128, 32, 8, 3)],
    ("dkdv", 64): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
    ("dkdv", 128): [(32, 64, 8, 3), (32, 128, 8, 3), (16, 128, 8, 3)],
    ("dkdv_atomic", 64): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
    ("dkdv_atomic", 128): [(16, 64, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3)],
}
# under the interpreter: small tiles, so that short test sequences still cross several blocks
INTERPRETER_TILES = dict(fwd=(32, 32), dq=(32, 16), dkdv=(16, 32), dkdv_atomic=(16, 32))

def _tiles(kernel, head_dim):
    return TILES[(kernel, 64 if head_dim <= 64 else 128)]

def _fixed_config(kernel, head_dim):
    if INTERPRETED:
        m, n = INTERPRETER_TILES[kernel]
        return dict(BLOCK_M=m, BLOCK_N=n)
    m, n, w, s = _tiles(kernel, head_dim)[0]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)

def _autotuned(kernel, name, reset_to_zero=None):
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
               for m, n, w, s in sorted(set(TILES[(name, 64)] + TILES[(name, 128)]))]
    def prune(configs, named_args, **kwargs):  # only the tiles listed for this head dim
        keep = _tiles(name, kwargs["HEAD_DIM"])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "HAS_KLENS", "q_bucket", "k_bucket"],
                           prune_configs_by=dict(early_config_prune=prune), reset_to_zero=reset_to_zero)(kernel)

AUTOTUNE = os.environ.get("FUSED_ATTENTION_AUTOTUNE", "1") == "1"
if not INTERPRETED:  # the interpreter takes one configuration only
    _fwd_tuned = _autotuned(_fwd_kernel, "fwd")
    _dq_tuned = _autotuned(_bwd_dq_kernel, "dq")
    _dkdv_tuned = _autotuned(_bwd_dkdv_kernel, "dkdv")
    _dkdv_atomic_tuned = _autotuned(_bwd_dkdv_kernel, "dkdv_atomic", reset_to_zero=["DQ"])  # timing runs add into DQ

# The grid is one-dimensional, (row blocks x B*H) programs with the row block varying fastest, so that
# the programs running at the same time share one head's K and V in L2 (a second grid dimension for
# B*H would be capped at 65535, which batches of many short windows reach).
def _launch(kernel, name, grid_rows, BH, head_dim, args, kwargs):
    """Launch with the tuned or the fixed configuration; grid_rows(meta) is the number of row blocks."""
    if AUTOTUNE and not INTERPRETED:
        tuned = dict(fwd=_fwd_tuned, dq=_dq_tuned, dkdv=_dkdv_tuned, dkdv_atomic=_dkdv_atomic_tuned)[name]
        tuned[lambda meta: (grid_rows(meta) * BH,)](*args, **kwargs)
    else:
        cfg = _fixed_config(name, head_dim)
        kernel[(grid_rows(cfg) * BH,)](*args, **kwargs, **cfg)

def _bucket(n):
    # q_bucket / k_bucket: kernel arguments only the autotuner reads (its key), so that it re-times when a
    # length crosses a power of two, not at every new length (a KV cache grows by one key per step)
    return triton.next_power_of_2(max(int(n), 1))

def _flash_forward(q, k, v, causal, k_lens, sm_scale):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    _launch(_fwd_kernel, "fwd", lambda meta: triton.cdiv(Tq, meta["BLOCK_M"]), B * H, D,
            (q, k, v, o, lse, k_lens if k_lens is not None else lse,
             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
             H, Tq, Tk, sm_scale * LOG2E, _bucket(Tq), _bucket(Tk)),
            dict(HAS_KLENS=k_lens is not None, CAUSAL=causal, HEAD_DIM=D))
    return o, lse

def _flash_backward(do, q, k, v, o, lse, causal, k_lens, sm_scale):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    pre_block = 64
    _bwd_preprocess[(triton.cdiv(Tq, pre_block) * B * H,)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Tq, HEAD_DIM=D, BLOCK_M=pre_block)
    dk = torch.empty((B, H, Tk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Tk, D), dtype=v.dtype, device=v.device)
    klens_arg = k_lens if k_lens is not None else lse
    common = dict(HAS_KLENS=k_lens is not None, CAUSAL=causal, HEAD_DIM=D)
    strides_qkvdo = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    atomic = BWD == "atomic"
    # "split": dq by its own kernel (recomputes QK^T and dO V^T: 7 matmuls in all, no atomics);
    # "atomic": the dk/dv kernel also adds each block's dq into an fp32 buffer (5 matmuls, atomics)
    dq_acc = torch.zeros((B, H, Tq, D), dtype=torch.float32, device=q.device) if atomic else lse
    _launch(_bwd_dkdv_kernel, "dkdv_atomic" if atomic else "dkdv", lambda meta: triton.cdiv(Tk, meta["BLOCK_N"]), B * H, D,
            (q, k, v, do, dk, dv, dq_acc, lse, delta, klens_arg, *strides_qkvdo,
             dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
             H, Tq, Tk, sm_scale, sm_scale * LOG2E, _bucket(Tq), _bucket(Tk)), dict(common, ATOMIC_DQ=atomic))
    if atomic:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    _launch(_bwd_dq_kernel, "dq", lambda meta: triton.cdiv(Tq, meta["BLOCK_M"]), B * H, D,
            (q, k, v, do, dq, lse, delta, klens_arg, *strides_qkvdo,
             dq.stride(0), dq.stride(1), dq.stride(2),
             H, Tq, Tk, sm_scale, sm_scale * LOG2E, _bucket(Tq), _bucket(Tk)), common)
    return dq, dk, dv

class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, k_lens, sm_scale):
        o, lse = _flash_forward(q, k, v, causal, k_lens, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, k_lens)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, k_lens = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, ctx.causal, k_lens, ctx.sm_scale)
        return dq, dk, dv, None, None, None

HEAD_DIMS = (16, 32, 64, 128)

def attention_triton(q, k, v, causal=False, k_lens=None, sm_scale=None):
    B, H, Tq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"fused_attention: the triton kernel supports head dims {HEAD_DIMS}, got D={D} "
                         f"(use backend='torch' / FUSED_ATTENTION=torch for other sizes)")
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if INTERPRETED else (torch.float16, torch.bfloat16)
    if q.dtype not in dtypes:
        raise ValueError(f"fused_attention: the triton kernel takes {dtypes} here, got {q.dtype} "
                         f"(use backend='torch' / FUSED_ATTENTION=torch for other dtypes)")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"fused_attention: the triton kernel needs CUDA tensors (got {q.device}); to run it on "
                         f"the CPU set TRITON_INTERPRET=1 before fused_attention is imported")
    if BWD not in ("split", "atomic"):
        raise ValueError(f"fused_attention: FUSED_ATTENTION_BWD (fused_attention.BWD) must be split or atomic, got {BWD!r}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k_lens is not None:
        k_lens = k_lens.to(device=q.device, dtype=torch.int32).contiguous()
    return _FlashAttention.apply(q, k, v, causal, k_lens, float(sm_scale))

# -----------------------------------------------------------------------------
# the entry point

def attention(q, k, v, *, causal=False, k_lens=None, sm_scale=None, backend=None):
    """Attention of q (B, H, Tq, D) over k, v (B, H, Tk, D) -> (B, H, Tq, D). See the module docstring."""
    _check(q, k, v, k_lens)
    backend = backend or BACKEND
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"fused_attention: backend (or env FUSED_ATTENTION) must be auto, triton or torch, got {backend!r}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to attend to (or nobody asking): zeros
        return q * 0.0
    if backend == "auto":
        # the kernel where it pays: CUDA, half precision, a supported head dim; PyTorch otherwise
        use_triton = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        return attention_triton(q, k, v, causal=causal, k_lens=k_lens, sm_scale=sm_scale)
    return attention_torch(q, k, v, causal=causal, k_lens=k_lens, sm_scale=sm_scale)
