"""
Fused attention shared by all three models.

    from fused_attention import attention
    y = attention(q, k, v, causal=False, k_lens=None, sm_scale=None, q_lens=None)

q is (B, H, Tq, D); k and v are (B, H, Tk, D).
- k_lens (optional, integer, shape (B,)): the number of valid keys per batch element. Keys at
  positions >= k_lens[b] are ignored. Values are clamped to [0, Tk].
- q_lens (optional, likewise): the number of valid queries. Rows at positions >= q_lens[b] are
  padding: they return zeros, pass zero gradient, and the kernels skip them. Self-attention over a
  padded batch passes the same lengths as both.
- causal=True aligns the mask bottom-right: query i sees keys j <= i + Tk - Tq, which is what a KV
  cache needs. Tq and Tk are the padded sizes, whatever the lengths.
- sm_scale defaults to 1/sqrt(D).
A query that sees no key at all returns zeros and passes zero gradient.

Two implementations of the same function:
- "triton": our FlashAttention-2 style kernels (forward, flash-decoding, two backwards) for CUDA
  tensors in fp16/bf16, head dim 16, 32, 64 or 128; first derivatives only. Under Triton's
  interpreter (TRITON_INTERPRET=1 set before this module is imported) they also run on CPU tensors
  in fp16/fp32 (it computes bf16 wrongly): how the tests check them.
- "torch": PyTorch's scaled_dot_product_attention with the equivalent boolean mask; any device,
  dtype and head dim.
Which one runs: the `backend` keyword, else the module setting BACKEND, read from the environment
variable FUSED_ATTENTION=auto|triton|torch. The default, auto, takes triton where it applies (CUDA
on sm_80+, fp16/bf16, a kernel head dim) and torch otherwise; "triton" turns anything the kernels
cannot do into an error. Other settings:
- FUSED_ATTENTION_AUTOTUNE=0 uses fixed tiles instead of timing a few per shape.
- FUSED_ATTENTION_BWD=atomic|split chooses how the backward gets dq. The default, auto, takes a
  kernel of its own for D <= 64 and atomic adds at D = 128 (see _backward_mode).
- FUSED_ATTENTION_TMA=0 keeps the forward off tensor descriptors.
Design notes and the compiled kernels' resource use: docs/fused_attention.md.
"""

import contextlib
import math
import numbers
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

def _check_backend(value):
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"fused_attention: backend (or env FUSED_ATTENTION) must be auto, triton "
                         f"or torch, got {value!r}")

# checked here too, so that a typo in the environment stops a script at once, not at the first
# attention call after its data has loaded
BACKEND = os.environ.get("FUSED_ATTENTION", "auto")
_check_backend(BACKEND)

def _check_bwd(value):
    if value not in ("auto", "atomic", "split"):
        raise ValueError(f"fused_attention: FUSED_ATTENTION_BWD must be auto, atomic or split, got "
                         f"{value!r} (fused_attention.BWD)")

# how the triton backward gets dq: "auto", "atomic" or "split" (checked here for a typo on any
# path, and again when the kernels run, as fused_attention.BWD may be set from Python)
BWD = os.environ.get("FUSED_ATTENTION_BWD", "auto")
_check_bwd(BWD)

def _env_flag(name):
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"fused_attention: {name} must be 0 or 1, got {value!r}")
    return value == "1"

AUTOTUNE = _env_flag("FUSED_ATTENTION_AUTOTUNE")
# 0: the forward loads K/V by pointers everywhere
TMA = _env_flag("FUSED_ATTENTION_TMA")

# -----------------------------------------------------------------------------
# checks shared by both paths

def _not_tensor(x):
    """How a message names a non-tensor: its type (a numpy array's dtype and shape would read as
    the tensor asked for)."""
    return f"{type(x).__name__} (not a torch tensor)"

def _check(q, k, v, k_lens, q_lens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = t.shape if isinstance(t, torch.Tensor) else _not_tensor(t)
            raise ValueError(f"fused_attention.attention: {name} must be a 4-d tensor (B, H, T, "
                             f"D), got {got}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"fused_attention.attention: k and v must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"fused_attention.attention: q {tuple(q.shape)} and k {tuple(k.shape)} "
                         f"must agree in B, H and D")
    if D < 1:
        raise ValueError(f"fused_attention.attention: the head dim D of q {tuple(q.shape)} is 0")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fused_attention.attention: q, k, v must share one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"fused_attention.attention: q, k, v must be floating point, got "
                         f"{q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fused_attention.attention: q, k, v must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    for name, lens, what, T in (("k_lens", k_lens, "key", "Tk"), ("q_lens", q_lens, "query", "Tq")):
        if lens is None:
            continue
        # True/False would pass as 1/0
        if isinstance(lens, torch.Tensor) and lens.dtype == torch.bool:
            raise ValueError(f"fused_attention.attention: {name} holds {what} counts per batch "
                             f"element (integers), got a boolean tensor; for a mask (B, {T}) pass "
                             f"mask.sum(-1) if its valid {what}s come first")
        if not isinstance(lens, torch.Tensor):
            raise ValueError(f"fused_attention.attention: {name} must be an integer tensor of "
                             f"shape ({B},), got {_not_tensor(lens)}")
        if lens.shape != (B,) or lens.is_floating_point() or lens.is_complex():
            raise ValueError(f"fused_attention.attention: {name} must be an integer tensor of "
                             f"shape ({B},), got {lens.dtype} {tuple(lens.shape)}")

# -----------------------------------------------------------------------------
# the PyTorch path

def _mask(Tq, Tk, causal, key_ok, device):
    """Boolean (B or 1, 1, Tq or 1, Tk) mask, True = may attend; None when nothing is masked.
    key_ok: (B, Tk), True for the keys before each batch element's k_lens; or None."""
    mask = None
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        mask = (j <= i + (Tk - Tq))[None, None]  # bottom-right aligned
    if key_ok is not None:
        valid = key_ok[:, None, None, :]
        mask = valid if mask is None else (mask & valid)
    return mask

def attention_torch(q, k, v, causal=False, k_lens=None, sm_scale=None, q_lens=None):
    Tq, Tk = q.shape[2], k.shape[2]
    if q_lens is not None:
        # padding rows: zero queries in (no NaN or inf from them reaches k and v), zeros out, zero
        # gradient; cheaper than a (B, 1, Tq, Tk) mask
        real = (torch.arange(Tq, device=q.device)[None, :]
                < q_lens.to(q.device)[:, None])[:, None, :, None]  # (B, 1, Tq, 1)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        y = attention_torch(torch.where(real, q, zero), k, v, causal, k_lens, sm_scale)
        return torch.where(real, y, zero)
    key_ok = None  # (B, Tk): the keys before each batch element's k_lens
    if k_lens is not None:
        key_ok = torch.arange(Tk, device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        # zero k and v past k_lens, which the kernels never load: masking alone would let a NaN or
        # inf there through (a masked NaN score, or a weight of 0 times inf, is still NaN)
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        k, v = (torch.where(key_ok[:, None, :, None], t, zero) for t in (k, v))
    if causal and k_lens is None and Tq in (1, Tk):
        # Tq == 1 (a KV-cache step) sees every key, and for Tq == Tk SDPA's causal mask (aligned
        # top-left) is the bottom-right one: no mask to build
        return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=sm_scale)
    mask = _mask(Tq, Tk, causal, key_ok, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    # rows that see no key: let them attend to everything (finite softmax, no NaN in forward or
    # backward), then zero their output; torch.where sends them zero gradient
    row_ok = mask.any(dim=-1, keepdim=True)  # (B or 1, 1, Tq or 1, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~row_ok, scale=sm_scale)
    return torch.where(row_ok, y, torch.zeros((), dtype=y.dtype, device=y.device))

# -----------------------------------------------------------------------------
# the Triton path: FlashAttention-2 (Dao, 2023) with key lengths and bottom-right causal masking
#
# Notation in the kernels: a query row i sees key column j when j < klen (klen = k_lens[b] clamped
# to [0, Tk]) and, if causal, j <= i + diag with diag = Tk - Tq. Scores are kept in base 2:
# qk_scale = sm_scale*log2(e) (> 0, see attention), so exp becomes exp2, the GPU's native
# instruction, and the saved log-sum-exp (lse) is in base 2 too. Each loop over blocks is split into
# an unmasked part (blocks every row of the tile fully sees) and a masked part (blocks on the causal
# diagonal or across klen), so that only the few boundary blocks pay for element masks; blocks
# nobody sees (past klen, above the diagonal) are never visited. A row that sees no key gets output
# 0 and lse = +inf, so exp2(s - lse) = 0 for it in the backward.

LOG2E = 1.4426950408889634

@triton.jit
def _length(LENS, off_b, T, HAS_LENS: tl.constexpr):
    """Batch element off_b's number of valid keys (or queries): LENS[off_b] in [0, T], or T."""
    n = T
    if HAS_LENS:
        n = tl.maximum(tl.minimum(tl.load(LENS + off_b), T), 0)
    return n

@triton.jit
def _row_block(n_blocks, H, REVERSE: tl.constexpr):
    """Which (block, batch*head) this program owns, as (block, off_bh, off_b, off_h): the block
    (of query rows; of keys in the dk/dv kernel) varies fastest, so that the programs running at
    the same time share one head's K and V in L2."""
    block = tl.program_id(0) % n_blocks
    if REVERSE:  # causal: the last query blocks see the most keys; start them first (short tail)
        block = n_blocks - 1 - block
    off_bh = tl.program_id(0) // n_blocks
    # int64 offsets: off_b * stride_qb and the like may pass 2**31 elements
    return block, off_bh, (off_bh // H).to(tl.int64), (off_bh % H).to(tl.int64)

@triton.jit
def _key_range(start_m, klen, qlen, diag, CAUSAL: tl.constexpr, HAS_QLENS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key range of the query tile at start_m, as (full, hi).
    Every row of the tile sees all of keys [0, full), so those blocks need no mask; full is a
    multiple of BLOCK_N. Keys [full, hi), the block(s) holding the klen or diagonal boundary, are
    loaded with the mask. Keys past hi are seen by none and never loaded. A tile of padding rows
    only (past qlen) sees no key."""
    if HAS_QLENS:
        klen = tl.where(start_m < qlen, klen, 0)
    if CAUSAL:
        hi = tl.minimum(klen, start_m + BLOCK_M + diag)
        full = tl.maximum(tl.minimum(klen, start_m + 1 + diag), 0)
    else:
        hi = klen
        full = klen
    return (full // BLOCK_N) * BLOCK_N, hi

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, lo, hi, offs_m, offs_d,
               klen, diag, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # One step of the online softmax per key block: m_i is the running row max, l_i the running
    # sum of exp2(s - m_i), acc the running sum of exp2(s - m_i) V. Whenever the max grows, what was
    # summed so far is rescaled by alpha = exp2(m_old - m_new), so one pass over the keys suffices.
    # k_src, v_src: tensor descriptors of this (batch, head)'s keys (TMA), else pointers to its
    # first key.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if TMA:  # the copy engine fills the tile (in shared memory), zeros past klen
            kT = tl.trans(k_src.load([start_n, 0]))
            v = v_src.load([start_n, 0])
        elif MASKED:  # zeros past klen: those keys may lie past Tk or hold NaN (0 * NaN is NaN)
            kT = tl.load(k_src + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=cols[None, :] < klen, other=0.0)
            v = tl.load(v_src + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=cols[:, None] < klen, other=0.0)
        else:
            kT = tl.load(k_src + cols[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_src + cols[:, None] * stride_vt + offs_d[None, :])
        # raw scores: the max is taken on them, so the scale goes into exp2's argument as one FMA
        qk = tl.dot(q, kT)
        if MASKED:
            ok = cols[None, :] < klen
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row that has seen no key yet keeps m = -inf: subtract 0 instead (-inf - -inf is NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)  # rescales the old sums from the old max to the new one
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i

# q_bucket, k_bucket: read only by the autotuner (part of its key; see _bucket)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KLENS, QLENS,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
                stride_vh, stride_vt, stride_os, stride_ob, stride_oh, stride_ot, stride_ls,
                H, Tq, Tk, qk_scale, keys_per_split, q_bucket, k_bucket,
                HAS_KLENS: tl.constexpr, HAS_QLENS: tl.constexpr, CAUSAL: tl.constexpr,
                SPLIT: tl.constexpr,
                TMA: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile passes Python floats as fp64: the softmax statistics must stay fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    block, off_bh, off_b, off_h = _row_block(tl.cdiv(Tq, BLOCK_M), H, CAUSAL)
    klen = _length(KLENS, off_b, Tk, HAS_KLENS)
    start_m = block * BLOCK_M
    diag = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=offs_m[:, None] < Tq, other=0.0)
    k_src = K + off_b * stride_kb + off_h * stride_kh
    v_src = V + off_b * stride_vb + off_h * stride_vh
    # TMA: descriptors of the first klen keys (at least 1, as a descriptor cannot be empty), so the
    # loops need no address math or load masks
    if TMA:
        k_src = tl.make_tensor_descriptor(k_src, shape=[tl.maximum(klen, 1), HEAD_DIM],
                                          strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, shape=[tl.maximum(klen, 1), HEAD_DIM],
                                          strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qlen = _length(QLENS, off_b, Tq, HAS_QLENS)  # rows >= qlen are padding
    full, hi = _key_range(start_m, klen, qlen, diag, CAUSAL, HAS_QLENS, BLOCK_M, BLOCK_N)
    lo = 0
    if SPLIT:  # flash-decoding: this program takes only keys [lo, lo + keys_per_split)
        lo = tl.program_id(1) * keys_per_split
        hi = tl.minimum(hi, lo + keys_per_split)
        full = tl.minimum(tl.maximum(full, lo), hi)
    # unmasked blocks first, then the few on the causal diagonal or across klen with the mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, lo, full,
                               offs_m, offs_d, klen, diag, qk_scale, False, CAUSAL, TMA, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, full, hi,
                               offs_m, offs_d, klen, diag, qk_scale, True, CAUSAL, TMA, BLOCK_N)
    if HAS_QLENS:  # padding rows of a block that also holds real ones: output 0, as if empty
        l_i = tl.where(offs_m < qlen, l_i, 0.0)
        acc = tl.where(offs_m[:, None] < qlen, acc, 0.0)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]  # FlashAttention-2 divides by the sum once, here, not per block
    # lse = m + log2(l) lets the backward recompute P = exp2(s - lse) without a running max, and
    # the merge weigh the splits. A split that saw nothing weighs nothing there (lse = -inf); a row
    # that saw nothing gets lse = +inf, so P = 0 in the backward.
    lse = tl.where(empty, float("-inf") if SPLIT else float("inf"), m_i + tl.math.log2(l_safe))
    split = tl.program_id(1).to(tl.int64)  # 0 without SPLIT
    tl.store(LSE + split * stride_ls + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
    tl.store(O + split * stride_os + off_b * stride_ob + off_h * stride_oh
             + offs_m[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)

@triton.jit
def _merge_kernel(OP, LP, O, LSE, stride_ob, stride_oh, stride_ot, H, Tq, n_splits, stride_ls,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # flash-decoding's second step: out = sum_s 2^(lse_s - lse) out_s with lse = log2 sum_s 2^lse_s,
    # over the splits' partial outputs OP (n_splits, B*H, Tq, D) and lse LP (n_splits, B*H, Tq),
    # both fp32. Each split's output is normalised by its own sum; 2^(lse_s - lse) turns that into
    # its share of the whole row's sum, as the online softmax would have.
    block, off_bh, off_b, off_h = _row_block(tl.cdiv(Tq, BLOCK_M), H, False)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < Tq
    part = off_bh.to(tl.int64) * Tq + offs_m
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(LP + s * stride_ls + part, mask=rows, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)  # rows that no split saw
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for s in range(n_splits):
        w = tl.math.exp2(tl.load(LP + s * stride_ls + part, mask=rows, other=float("-inf")) - m_use)
        o = tl.load(OP + (s * stride_ls + part[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=rows[:, None], other=0.0)
        l += w
        acc += w[:, None] * o
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    tl.store(LSE + part, tl.where(empty, float("inf"), m_use + tl.math.log2(l_safe)), mask=rows)
    tl.store(O + off_b * stride_ob + off_h * stride_oh
             + offs_m[:, None] * stride_ot + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=rows[:, None])

@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                    H, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the softmax-gradient term of every row
    block, off_bh, off_b, off_h = _row_block(tl.cdiv(Tq, BLOCK_M), H, False)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh
                 + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)

@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt,
                    stride_dt, lo, hi, offs_n, offs_d, qlen, klen, diag, sm_scale, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # works on transposed tiles (keys along rows) so that dk and dv accumulate without transposes.
    # With ATOMIC_DQ these are FlashAttention-2's 5 matmuls, exp once per score: S^T = K Q^T, dV +=
    # P^T dO, dP^T = V dO^T, dK += dS^T Q, dQ = dS K (added into an fp32 buffer); without it, the
    # first four.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # rows past qlen (padding, or past Tq) load as zeros: p = 1 there, but with dO = 0 and
        # delta = 0 they add nothing (and padding rows' NaN or inf cannot reach dk, dv)
        rows = offs_m < qlen
        qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=rows[None, :],
                     other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows[:, None],
                     other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        # the forward's lse already normalises: P = exp2(S - lse), with no running max
        sT = tl.dot(k, qT) * qk_scale - lse[None, :]
        if MASKED:
            ok = offs_n[:, None] < klen
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + diag)
            sT = tl.where(ok, sT, float("-inf"))
        pT = tl.math.exp2(sT)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk)
        # every key block adds into the same dq rows, hence atomics (fp32, in no fixed order)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k) * sm_scale
            tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq,
                          mask=rows[:, None], sem="relaxed")
    return dk, dv

# q_bucket, k_bucket: read only by the autotuner (part of its key; see _bucket)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, KLENS, QLENS,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                     H, Tq, Tk, sm_scale, qk_scale, q_bucket, k_bucket,
                     HAS_KLENS: tl.constexpr, HAS_QLENS: tl.constexpr, CAUSAL: tl.constexpr,
                     HEAD_DIM: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    # fp32, as in _fwd_kernel
    sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)
    block, off_bh, off_b, off_h = _row_block(tl.cdiv(Tk, BLOCK_N), H, False)
    klen = _length(KLENS, off_b, Tk, HAS_KLENS)
    qlen = _length(QLENS, off_b, Tq, HAS_QLENS)  # padding rows (past qlen): blocks left out
    start_n = block * BLOCK_N
    diag = Tk - Tq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < klen
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    lse_base = LSE + off_bh.to(tl.int64) * Tq
    delta_base = DELTA + off_bh.to(tl.int64) * Tq
    dq_base = DQ + off_bh.to(tl.int64) * Tq * HEAD_DIM  # fp32, contiguous; used with ATOMIC_DQ only
    # Causal: query rows [lo, Tq) see some key of this block, rows >= mid see all of it (up to
    # klen). mid is rounded up to whole query blocks from lo, so rows [lo, mid) take the mask.
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0)
        mid = tl.maximum(start_n + BLOCK_N - 1 - diag, lo)
        mid = lo + tl.cdiv(mid - lo, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    # A block wholly past klen is seen by nobody: q_end = 0 makes both loops empty (dk = dv = 0).
    # A block that crosses klen needs the mask on every row block; one wholly inside klen only up
    # to mid.
    q_end = tl.where(klen > start_n, qlen, 0)
    mid = tl.where(klen >= start_n + BLOCK_N, tl.minimum(mid, q_end), q_end)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                             stride_qt, stride_dt,
                             lo, mid, offs_n, offs_d, qlen, klen, diag, sm_scale, qk_scale, True,
                             CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_M)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                             stride_qt, stride_dt,
                             mid, q_end, offs_n, offs_d, qlen, klen, diag, sm_scale, qk_scale,
                             False, CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_M)
    # S = sm_scale Q K^T (log2(e) only turned exp into exp2), so dK = sm_scale dS^T Q
    dk = dk * sm_scale
    in_tk = offs_n[:, None] < Tk
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=in_tk)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=in_tk)

@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m,
                  offs_d, klen, diag, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=cols[None, :] < klen, other=0.0)
            vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None],
                         mask=cols[None, :] < klen, other=0.0)
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

# q_bucket, k_bucket: read only by the autotuner (part of its key; see _bucket)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KLENS, QLENS,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                   stride_dqb, stride_dqh, stride_dqt,
                   H, Tq, Tk, sm_scale, qk_scale, q_bucket, k_bucket,
                   HAS_KLENS: tl.constexpr, HAS_QLENS: tl.constexpr, CAUSAL: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the "split" backward's dq: recomputes S = Q K^T and dP = dO V^T per query block, so that
    # each program owns its dq rows and writes them once (no atomics, deterministic)
    # fp32, as in _fwd_kernel
    sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)
    block, off_bh, off_b, off_h = _row_block(tl.cdiv(Tq, BLOCK_M), H, CAUSAL)
    klen = _length(KLENS, off_b, Tk, HAS_KLENS)
    start_m = block * BLOCK_M
    diag = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qlen = _length(QLENS, off_b, Tq, HAS_QLENS)
    # rows past qlen (padding) or Tq load as zeros: ds = 0 there, so padding rows get dq = 0
    rows = offs_m < qlen
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh
                 + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Tq + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Tq + offs_m, mask=rows, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_range(start_m, klen, qlen, diag, CAUSAL, HAS_QLENS, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, full, offs_m,
                       offs_d, klen, diag, qk_scale, False, CAUSAL, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, full, hi,
                       offs_m, offs_d, klen, diag, qk_scale, True, CAUSAL, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < Tq)

# -----------------------------------------------------------------------------
# launching the kernels: tiles, autotuning, the Python side of forward and backward

# Triton's interpreter runs kernels on CPU tensors (how the tests check them without a GPU); it is
# chosen when TRITON_INTERPRET=1 is set before this module is imported.
INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)

# Launch configurations: (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel and head
# dim (D <= 64 shares the D = 64 row). Every entry builds for the H100 without register spills and
# within its shared memory (`python bench_attention.py --ptxas`; docs/fused_attention.md). The
# autotuner times all of a list, once per (D, causal, k_lens, q_lens, dtype, power-of-two bucket of
# Tq and Tk). The first entry is the fixed default (FUSED_ATTENTION_AUTOTUNE=0): the autotuner's
# most frequent pick on an H200 (docs/fused_attention.md), except for "decode", whose tiles were
# not timed. "decode" is the forward for Tq <= DECODE_MAX_Q.
TILES = {
    ("fwd", 64): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2)],
    ("decode", 64): [(16, 128, 4, 3), (16, 64, 4, 3)],
    ("decode", 128): [(16, 128, 4, 2), (16, 64, 4, 3)],
    ("dkdv_atomic", 64): [(64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2)],
    ("dkdv_atomic", 128): [(32, 128, 8, 3), (32, 128, 8, 2)],
    ("dkdv", 64): [(64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2)],
    ("dkdv", 128): [(64, 64, 8, 3), (64, 64, 8, 2)],
    ("dq", 64): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    ("dq", 128): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
}
# under the interpreter: small tiles, so that short test sequences still cross several blocks
INTERPRETER_TILES = dict(fwd=(32, 32), decode=(16, 32), dq=(32, 16), dkdv=(16, 32),
                         dkdv_atomic=(16, 32))
# A forward of at most this many queries (a KV-cache step) is memory-bound and launches few
# programs: it takes 16-row "decode" tiles (wgmma's 64-row minimum would waste work) and splits
# its keys.
DECODE_MAX_Q = 16
# flash-decoding: each split takes a multiple of this many keys, so of every decode tile's BLOCK_N
SPLIT_KEYS = 32 if INTERPRETED else 256
assert INTERPRETED or all(SPLIT_KEYS % n == 0 for (name, _), tiles in TILES.items()
                          if name == "decode" for _, n, _, _ in tiles)
# query rows per program of the merge and of the backward's preprocessing
MERGE_BLOCK, PRE_BLOCK = 16, 64

def _tiles(kernel, head_dim):
    return TILES[(kernel, 64 if head_dim <= 64 else 128)]

def _fixed_config(kernel, head_dim):
    if INTERPRETED:
        m, n = INTERPRETER_TILES[kernel]
        return dict(BLOCK_M=m, BLOCK_N=n)
    m, n, w, s = _tiles(kernel, head_dim)[0]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)

KERNELS = dict(fwd=_fwd_kernel, decode=_fwd_kernel, dkdv_atomic=_bwd_dkdv_kernel,
               dkdv=_bwd_dkdv_kernel, dq=_bwd_dq_kernel)

def _autotuned(name):
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
               for m, n, w, s in sorted(set(TILES[(name, 64)] + TILES[(name, 128)]))]
    def prune(configs, named_args, **kwargs):  # only the tiles listed for this head dim
        keep = _tiles(name, kwargs["HEAD_DIM"])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in keep]
    key = ["HEAD_DIM", "CAUSAL", "HAS_KLENS", "HAS_QLENS", "q_bucket", "k_bucket"]
    key += ["SPLIT", "TMA"] if name in ("fwd", "decode") else []
    zeroed = ["DQ"] if name == "dkdv_atomic" else None  # timing runs add into DQ
    return triton.autotune(configs, key=key, prune_configs_by=dict(early_config_prune=prune),
                           reset_to_zero=zeroed)(KERNELS[name])

# the interpreter takes one config only
TUNED = {} if INTERPRETED else {name: _autotuned(name) for name in KERNELS}

# a list while bench_attention.py records launches for its ahead-of-time builds (see there)
_recorded = None

def _launch(kernel, name, grid, args, kwargs):
    """Launch kernel on grid(meta), a tuple, with the tuned or the fixed tiles of TILES[name].
    With name None, kwargs carry the whole configuration."""
    # ask for FMA fusion rather than take Triton's default (off from Triton 3.10): the forward
    # folds the softmax scale into one FMA per score
    kwargs = dict(kwargs, enable_fp_fusion=True)
    if _recorded is not None:
        _recorded.append((kernel, name, args, kwargs))
    elif name is None:
        kernel[grid(kwargs)](*args, **kwargs)
    elif AUTOTUNE and not INTERPRETED:
        TUNED[name][grid](*args, **kwargs)
    else:
        cfg = _fixed_config(name, kwargs["HEAD_DIM"])
        kernel[grid(cfg)](*args, **kwargs, **cfg)

def _bucket(n):
    # q_bucket / k_bucket: kernel arguments only the autotuner reads (its key), so that it re-times
    # when a length crosses a power of two, not at every new length (a KV cache grows by one key per
    # step)
    return triton.next_power_of_2(max(int(n), 1))

def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM's: what the interpreter and the ahead-of-time build assume

def _use_tma(*tensors):
    """Whether the forward reads K and V through tensor descriptors (Hopper's copy engine, TMA).
    Yes on sm_90 or newer, for 16-byte aligned bases and strides. The interpreter and the
    ahead-of-time build count as sm_90."""
    t = tensors[0]
    if not TMA or (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9):
        return False
    if t.is_cuda:  # descriptors made on the device need scratch memory from an allocator
        from triton.runtime import _allocation
        if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
            triton.set_allocator(lambda size, alignment,
                                 stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return all(x.data_ptr() % 16 == 0
               and all(st * x.element_size() % 16 == 0 for st in x.stride()[:-1]) for x in tensors)

def _key_splits(programs, Tk, device, unit):
    """Flash-decoding: (number of key ranges, keys per range) to cut each query block's keys into.
    A decoding step (Tq = 1) has only B*H programs, too few to fill the GPU. One program per range
    makes about two per SM; a merge then combines the ranges' partial softmaxes. Keys per range
    are a multiple of unit."""
    n = min(triton.cdiv(2 * _sm_count(device), programs), triton.cdiv(Tk, unit))
    if n <= 1:
        return 1, Tk
    per = triton.cdiv(triton.cdiv(Tk, n), unit) * unit
    return triton.cdiv(Tk, per), per

# The grids are one-dimensional over (row blocks x B*H), the row block varying fastest (see
# _row_block; a second grid dimension for B*H would be capped at 65535, which batches of many short
# windows reach); the forward's key splits, when there are any, are the second dimension.
def _flash_forward(q, k, v, causal, k_lens, sm_scale, q_lens):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    name = "decode" if Tq <= DECODE_MAX_Q else "fwd"
    row_blocks = lambda meta: triton.cdiv(Tq, meta["BLOCK_M"])
    splits, per = 1, Tk
    if name == "decode":
        cfg = _fixed_config(name, D)
        # the split length must be a multiple of BLOCK_N: of the fixed one, or (autotuning) of any
        # in TILES
        unit = max(SPLIT_KEYS, cfg["BLOCK_N"])
        splits, per = _key_splits(row_blocks(cfg) * B * H, Tk, q.device, unit)
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    # with key splits the kernel writes fp32 partial results, one slice per split, that
    # _merge_kernel combines
    o_k = o if splits == 1 else torch.empty((splits, B, H, Tq, D), dtype=torch.float32,
                                            device=q.device)
    lse_k = lse if splits == 1 else torch.empty((splits, B, H, Tq), dtype=torch.float32,
                                                device=q.device)
    o_strides = (0, *o.stride()[:3]) if splits == 1 else o_k.stride()[:4]
    # a missing k_lens or q_lens is passed as lse, a placeholder never read (HAS_*LENS=False)
    _launch(_fwd_kernel, name, lambda meta: (row_blocks(meta) * B * H, splits),
            (q, k, v, o_k, lse_k, k_lens if k_lens is not None else lse,
             q_lens if q_lens is not None else lse,
             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2),
             *o_strides, B * H * Tq,  # stride_os (0: no split dimension), ..., stride_ls
             H, Tq, Tk, sm_scale * LOG2E, per, _bucket(Tq), _bucket(Tk)),  # per: keys_per_split
            dict(HAS_KLENS=k_lens is not None, HAS_QLENS=q_lens is not None, CAUSAL=causal,
                 SPLIT=splits > 1, TMA=_use_tma(k, v), HEAD_DIM=D))
    if splits > 1:
        _launch(_merge_kernel, None, lambda meta: (row_blocks(meta) * B * H,),
                (o_k, lse_k, o, lse, o.stride(0), o.stride(1), o.stride(2), H, Tq, splits,
                 B * H * Tq),
                dict(HEAD_DIM=D, BLOCK_M=MERGE_BLOCK))
    return o, lse

def _flash_backward(do, q, k, v, o, lse, causal, k_lens, sm_scale, bwd, q_lens):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    _launch(_bwd_preprocess, None, lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,),
            (o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
             do.stride(2), H, Tq),
            dict(HEAD_DIM=D, BLOCK_M=PRE_BLOCK))
    dk = torch.empty((B, H, Tk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Tk, D), dtype=v.dtype, device=v.device)
    # lse: a placeholder for a missing k_lens or q_lens, as in _flash_forward
    lens_args = (k_lens if k_lens is not None else lse, q_lens if q_lens is not None else lse)
    common = dict(HAS_KLENS=k_lens is not None, HAS_QLENS=q_lens is not None, CAUSAL=causal,
                  HEAD_DIM=D)
    strides_qkvdo = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1),
                     do.stride(2))
    atomic = bwd == "atomic"
    # "atomic": the dk/dv kernel also adds each block's dq into an fp32 buffer (5 matmuls, exp once
    # per score); "split": dq by its own kernel (recomputes QK^T and dO V^T: 7 matmuls in all; no
    # atomics, deterministic)
    # (split: lse stands in for the dq buffer, never read)
    dq_acc = torch.zeros((B, H, Tq, D), dtype=torch.float32, device=q.device) if atomic else lse
    _launch(_bwd_dkdv_kernel, "dkdv_atomic" if atomic else "dkdv",
            lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]) * B * H,),
            (q, k, v, do, dk, dv, dq_acc, lse, delta, *lens_args, *strides_qkvdo,
             dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
             H, Tq, Tk, sm_scale, sm_scale * LOG2E, _bucket(Tq), _bucket(Tk)),
            dict(common, ATOMIC_DQ=atomic))
    if atomic:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    _launch(_bwd_dq_kernel, "dq", lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,),
            (q, k, v, do, dq, lse, delta, *lens_args, *strides_qkvdo,
             dq.stride(0), dq.stride(1), dq.stride(2),
             H, Tq, Tk, sm_scale, sm_scale * LOG2E, _bucket(Tq), _bucket(Tk)), common)
    return dq, dk, dv

def _backward_mode(head_dim):
    """BWD, with "auto" resolved to the faster on an H200 (measured in docs/fused_attention.md).
    At D <= 64 that is split (7 matmuls, no atomics, deterministic). At D = 128 it is atomic
    (FlashAttention-2's 5 matmuls, in 32-query tiles)."""
    return BWD if BWD != "auto" else ("split" if head_dim <= 64 else "atomic")

class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, k_lens, sm_scale, q_lens):
        o, lse = _flash_forward(q, k, v, causal, k_lens, sm_scale, q_lens)
        ctx.save_for_backward(q, k, v, o, lse, k_lens, q_lens)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: an error, not zeros
    def backward(ctx, do):
        q, k, v, o, lse, k_lens, q_lens = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, ctx.causal, k_lens, ctx.sm_scale,
                                     _backward_mode(q.shape[-1]), q_lens)
        return dq, dk, dv, None, None, None, None

HEAD_DIMS = (16, 32, 64, 128)

def attention_triton(q, k, v, causal, k_lens, sm_scale, q_lens):
    """The kernels' path of attention(), which has checked the inputs and made sm_scale > 0."""
    B, H, Tq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"fused_attention: the triton kernel supports head dims {HEAD_DIMS}, got "
                         f"D={D} (use backend='torch' / FUSED_ATTENTION=torch for other sizes)")
    dtypes = (torch.float16, torch.bfloat16,
              torch.float32) if INTERPRETED else (torch.float16, torch.bfloat16)
    if q.dtype not in dtypes:
        raise ValueError(f"fused_attention: the triton kernel takes {dtypes} here, got {q.dtype} "
                         f"(use backend='torch' / FUSED_ATTENTION=torch for other dtypes)")
    if INTERPRETED and q.dtype == torch.bfloat16:  # its results would be wrong by orders of size
        raise ValueError(f"fused_attention: Triton's interpreter (triton {triton.__version__}) "
                         f"computes bf16 tl.dot wrongly; under TRITON_INTERPRET=1 give the kernels "
                         f"float16 or float32 (bf16 runs on a GPU)")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"fused_attention: the triton kernel needs CUDA tensors (got {q.device}); "
                         f"to run it on the CPU set TRITON_INTERPRET=1 before fused_attention is "
                         f"imported")
    _check_bwd(BWD)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # clamped in int64, then cast: a length past 2**31 must not wrap around, nor T overflow a
    # uint8 one
    k_lens, q_lens = (None if lens is None else
                      lens.to(q.device, torch.int64).clamp(0, T).to(torch.int32).contiguous()
                      for lens, T in ((k_lens, k.shape[2]), (q_lens, q.shape[2])))
    # launched on q's GPU, not the current one (a process may use cuda:1 without set_device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _FlashAttention.apply(q, k, v, causal, k_lens, sm_scale, q_lens)

# -----------------------------------------------------------------------------
# the entry point

def kernels_apply(q):
    """Where auto takes the kernels: CUDA, half precision, a kernel head dim, and an Ampere or later
    GPU (sm_80+). The kernels were written and tested for its bf16 tensor cores; an older GPU (a T4,
    a V100) gets PyTorch's attention."""
    # get_device_properties: a constant under torch.compile
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
            and torch.cuda.get_device_properties(q.device).major >= 8)

def attention(q, k, v, *, causal=False, k_lens=None, sm_scale=None, backend=None, q_lens=None):
    """Attention of q (B, H, Tq, D) over k, v (B, H, Tk, D) -> (B, H, Tq, D). See the module
    docstring."""
    _check(q, k, v, k_lens, q_lens)
    if not isinstance(causal, bool):  # "no" or None would pass as True or False
        raise ValueError(f"fused_attention.attention: causal must be True or False, got "
                         f"{causal!r}")
    backend = BACKEND if backend is None else backend
    _check_backend(backend)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise ValueError(f"fused_attention.attention: sm_scale must be a number, got "
                         f"{sm_scale!r}")
    sm_scale = float(sm_scale)
    if not math.isfinite(sm_scale):
        raise ValueError(f"fused_attention.attention: sm_scale must be finite, got {sm_scale}")
    # The kernels take the row max on raw scores, which needs a positive scale, and PyTorch's
    # causal SDPA gives NaN for one that is not. So: the same scores with a positive scale.
    # A negative one negates q; a zero one (or one that float32 rounds to zero, which met a masked
    # score's -inf as 0 * inf = NaN) makes q exact zeros joined to the graph, as below.
    if sm_scale < 0:
        q, sm_scale = -q, -sm_scale
    if sm_scale * LOG2E < torch.finfo(torch.float32).tiny:
        q, sm_scale = torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q, 0.0), 1.0
    if q.numel() == 0 or k.shape[2] == 0:
        # nothing to attend to (or nobody asking): zeros that stay zero whatever q holds (q * 0
        # would turn an inf into NaN), joined to the graph so that q, k and v get (zero) gradients
        return torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q,
                           0.0) + k.sum() + v.sum()
    if backend == "auto":
        backend = "triton" if kernels_apply(q) else "torch"
    if backend == "triton":
        return attention_triton(q, k, v, causal=causal, k_lens=k_lens, sm_scale=sm_scale,
                                q_lens=q_lens)
    return attention_torch(q, k, v, causal=causal, k_lens=k_lens, sm_scale=sm_scale,
                           q_lens=q_lens)
