"""
Benchmark fused_attention.attention against PyTorch's scaled_dot_product_attention on a CUDA GPU.

    python bench_attention.py                  # the full table (takes a few minutes on an H100)
    python bench_attention.py --quick          # a few rows, to check that everything runs
    python bench_attention.py --out=bench.md   # also write the table as markdown

For each head dim D (64, 128), causal or not, and sequence length T (512 .. 16k), with B*T = 16k tokens
and H*D = 2048 (the FlashAttention-2 paper's setting), bf16, it times forward and forward+backward of:
  ours    fused_attention's Triton kernels (k_lens for padded batches); forward+backward is timed with
          both ways of getting dq (FUSED_ATTENTION_BWD=split: a dq kernel of its own; =atomic: atomic adds
          from the dk/dv kernel), and the ratios use the faster of the two
  flash   SDPA forced to its flash backend, no mask (is_causal for causal); it cannot take a padding
          mask, so on mixed-length batches it computes the whole padded problem (and a different answer)
  masked  SDPA given the equivalent boolean mask (causal and/or key padding), PyTorch's choice of backend
"uniform" rows have every sequence at full length; "mixed" rows draw lengths uniformly in [T/4, T].
TFLOP/s count the useful work only (pairs of real positions; padding and the masked causal half excluded),
the same count for all three, so the ratios are ratios of speed (> 1: ours is faster). "max err" is the
largest difference between ours and masked SDPA in the forward output.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384", help="comma-separated T values")
parser.add_argument("--dims", default="64,128", help="comma-separated head dims")
parser.add_argument("--tokens", type=int, default=16384, help="B*T per row (B = tokens // T, at least 1)")
parser.add_argument("--width", type=int, default=2048, help="H*D per row")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
parser.add_argument("--autotune", type=int, default=1, help="1: let Triton's autotuner pick tiles; 0: fixed tiles")
parser.add_argument("--quick", action="store_true", help="T = 1024, 4096 and D = 64 only")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="", help="also write the table (markdown) to this file")
args = parser.parse_args()

if not torch.cuda.is_available():
    sys.exit("bench_attention.py: no CUDA GPU found; this benchmark times GPU kernels and measured nothing. "
             "Run it on a machine with an NVIDIA GPU.")

import triton
from triton.testing import do_bench
import fused_attention
from fused_attention import attention
fused_attention.AUTOTUNE = bool(args.autotune)

seqlens = [1024, 4096] if args.quick else [int(s) for s in args.seqlens.split(",")]
dims = [64] if args.quick else [int(s) for s in args.dims.split(",")]
dtype = getattr(torch, args.dtype)
device = "cuda"
rng = torch.Generator().manual_seed(args.seed)

def useful_flops(H, D, Tq, lens, causal):
    """Forward matmul FLOPs (QK^T and PV: 4*D per visible query-key pair), summed over the batch."""
    pairs = 0
    for n in lens.tolist():  # self-attention among the first n positions (the rest is padding)
        pairs += n * (n + 1) // 2 if causal else n * n
    return 4 * H * D * pairs

def timeit(fn, backward, q, k, v, do):
    if backward:
        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return do_bench(step, warmup=25, rep=100)  # milliseconds

def bench_row(D, T, causal, mixed):
    H = max(1, args.width // D)
    B = max(1, args.tokens // T)
    if mixed:
        lens = torch.randint(T // 4, T + 1, (B,), generator=rng)
        lens[0] = T  # the padded length really occurs
    else:
        lens = torch.full((B,), T)
    k_lens = lens.to(device)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, D, device=device, dtype=dtype)
    # the boolean mask SDPA needs for the same problem (True = attend)
    mask = (torch.arange(T, device=device)[None, :] < k_lens[:, None])[:, None, None, :]
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    ours = lambda q, k, v: attention(q, k, v, causal=causal, k_lens=k_lens if mixed else None, backend="triton")
    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    masked = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # correctness first: ours vs masked SDPA on the rows that see a key (padded query rows differ:
    # ours attends over the valid keys, SDPA with this mask too; both are ignored by a real loss)
    with torch.no_grad():
        valid_q = (torch.arange(T, device=device)[None, :] < k_lens[:, None])[:, None, :, None]
        err = ((ours(q, k, v) - masked(q, k, v)).float().abs() * valid_q).max().item()
    fl = useful_flops(H, D, T, lens, causal)
    row = dict(D=D, T=T, B=B, H=H, causal=causal, mixed=mixed, err=err)
    for name, fn, backward in (("ours", ours, False), ("flash", flash, False), ("masked", masked, False),
                               ("split", ours, True), ("atomic", ours, True), ("flash", flash, True), ("masked", masked, True)):
        fused_attention.BWD = name if name in ("split", "atomic") else "split"
        try:
            ms = timeit(fn, backward, q, k, v, do)
            row[(name, backward)] = fl * (3.5 if backward else 1.0) / (ms * 1e-3) / 1e12  # bwd = 2.5x fwd
        except torch.cuda.OutOfMemoryError:
            row[(name, backward)] = float("nan")
            torch.cuda.empty_cache()
    del mask, q, k, v, do
    torch.cuda.empty_cache()
    return row

gpu = torch.cuda.get_device_name()
header = (f"GPU: {gpu}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
          f"B*T = {args.tokens}, H*D = {args.width}, autotune {'on' if args.autotune else 'off (fixed tiles)'}")
cols = ["D", "causal", "batch", "T", "B", "fwd ours", "fwd flash", "fwd masked", "ours/flash", "ours/masked",
        "f+b ours split", "f+b ours atomic", "f+b flash", "f+b masked", "best/flash", "best/masked", "max err"]
lines = [header, "", "TFLOP/s (useful work); ratios > 1 mean ours is faster", "",
         "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
print("\n".join(lines), flush=True)
configs = [(D, causal, mixed, T) for D in dims for causal in (False, True) for mixed in (False, True) for T in seqlens
           if not (mixed and args.tokens // T < 2)]  # a mixed batch needs two sequences at least
t0 = time.time()
for i, (D, causal, mixed, T) in enumerate(configs):
    r = bench_row(D, T, causal, mixed)
    f = lambda x: f"{x:.0f}"
    cells = [D, "yes" if causal else "no", "mixed" if mixed else "uniform", T, r["B"]]
    o, fl, m = r[("ours", False)], r[("flash", False)], r[("masked", False)]
    cells += [f(o), f(fl), f(m), f"{o / fl:.2f}", f"{o / m:.2f}"]
    sp, at, fl, m = r[("split", True)], r[("atomic", True)], r[("flash", True)], r[("masked", True)]
    best = max((x for x in (sp, at) if x == x), default=float("nan"))  # skip an OOM (nan)
    cells += [f(sp), f(at), f(fl), f(m), f"{best / fl:.2f}", f"{best / m:.2f}"]
    cells.append(f"{r['err']:.1e}")
    line = "| " + " | ".join(str(c) for c in cells) + " |"
    lines.append(line)
    eta = (time.time() - t0) / (i + 1) * (len(configs) - i - 1)
    print(line, f"  [{i + 1}/{len(configs)}, eta {eta:.0f}s]", flush=True)

if args.autotune:  # which tiles the autotuner picked, per (D, causal, k_lens, Tq bucket, Tk bucket)
    picks = ["", "autotuner picks (BLOCK_M, BLOCK_N, warps, stages):", ""]
    for name, tuned in (("fwd", fused_attention._fwd_tuned), ("dq", fused_attention._dq_tuned),
                        ("dkdv", fused_attention._dkdv_tuned), ("dkdv_atomic", fused_attention._dkdv_atomic_tuned)):
        for key, cfg in tuned.cache.items():
            picks.append(f"- {name} {key[:5]}: {cfg.kwargs['BLOCK_M']}, {cfg.kwargs['BLOCK_N']}, {cfg.num_warps}, {cfg.num_stages}")
    print("\n".join(picks))
    lines += picks

if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
