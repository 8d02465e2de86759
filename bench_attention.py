"""
Benchmark fused_attention.attention against PyTorch's scaled_dot_product_attention on a CUDA GPU;
and, without a GPU, show what the compiler makes of every kernel for an H100.

    python bench_attention.py                  # the full table (takes a few minutes on an H100)
    python bench_attention.py --quick          # a few rows, to check that everything runs
    python bench_attention.py --out=bench.md   # also write the table as markdown
    python bench_attention.py --ptxas          # no GPU: registers, spills, shared memory, MMAs

For each head dim D (64, 128), causal or not, and sequence length T (512 .. 16k), with B*T = 16k
tokens and H*D = 2048 (the FlashAttention-2 paper's setting), bf16, it times forward and
forward+backward of:
  ours    fused_attention's Triton kernels. Padded batches pass k_lens and q_lens, so padding
          query rows are skipped (--q_lens=0: k_lens only, as the H200 table of 2026-12-04 was
          timed). Forward+backward is timed with both ways of getting dq: atomic (atomic adds
          from the dk/dv kernel) and split (a dq kernel of its own); the ratios use the faster.
          Outside this benchmark FUSED_ATTENTION_BWD=auto picks one per head dim.
  flash   SDPA forced to its flash backend, no mask (is_causal for causal). It cannot take a
          padding mask, so on mixed-length batches it computes the whole padded problem (and a
          different answer).
  masked  SDPA given the equivalent boolean mask (causal and/or key padding), PyTorch's choice of
          backend.
"uniform" rows have every sequence at full length; "mixed" rows draw lengths uniformly in [T/4, T]
(none at T = B*T: a mixed batch needs two sequences).
TFLOP/s count the useful work only (pairs of real positions; padding and the masked causal half
excluded), the same count for all three, so the ratios are ratios of speed (> 1: ours is faster).
"max err" is the largest difference between ours and masked SDPA in the forward output. The goals
(docs/fused_attention.md): forward+backward >= 1.0x flash for T >= 1k, D = 64 and 128, causal and
not; >= 1.5x masked on mixed rows.

--ptxas compiles every kernel x head dim x TILES entry x causal/lengths variant for sm_90a through
Triton's own compiler and ptxas, with the JIT's specialisation for 16-byte-aligned tensors and
lengths that are multiples of 16 (what a launch on an H100 with such shapes builds), and prints
registers per thread, spill (stack) bytes, shared memory and the MMA instructions used.
tests/test_fused_attention.py checks the same builds (no spills, shared memory within the limit,
wgmma).
"""

import argparse
import functools
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import configurator

TITLE = "# Attention benchmark (bench_attention.py)"  # the first line of the --out file

def fail(msg):
    configurator.fail("bench_attention.py", msg)

# -----------------------------------------------------------------------------
# ahead-of-time builds for an H100 (sm_90a), no GPU needed

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one program may use on an H100
# lens: False, True (k_lens) or "q" (k_lens and q_lens)
VARIANTS = [(causal, lens) for causal in (False, True) for lens in (False, True, "q")]
# the TILES names; "fwd-pointers" is the forward without tensor descriptors (unaligned inputs,
# pre-Hopper)
TUNED_KERNELS = ("fwd", "fwd-pointers", "decode", "dkdv_atomic", "dkdv", "dq")
FIXED_KERNELS = ("merge", "preprocess")  # one configuration each, no causal / lengths variants

def ptxas_cases(dims=(16, 32, 64, 128), tiles="all"):
    """(kernel, D, causal, lens, tile) of every build: each TILES entry ("default": the first
    only) in each variant; one build of the merge and preprocessing kernels (tile None)."""
    import fused_attention as fa
    cases = []
    for D in dims:
        for name in TUNED_KERNELS:
            for tile in fa._tiles(name.split("-")[0], D)[:None if tiles == "all" else 1]:
                cases += [(name, D, causal, lens, tile) for causal, lens in VARIANTS]
        cases += [(name, D, False, False, None) for name in FIXED_KERNELS]
    return cases

@functools.lru_cache(maxsize=None)
def recorded_launches(D, dtype, causal, lens):
    """{kernel name: (kernel, args, kwargs)}: the launches fused_attention makes, recorded instead
    of run. They are one forward and backward (both dq modes, B=2, H=4, T=1024), one decoding step
    (Tq=1 over 4096 keys) and one pointer-path forward ("fwd-pointers"). The tensors are meta
    tensors: their data_ptr() is 0, aligned like the caching allocator's, and they count as an
    H100's (132 SMs, tensor descriptors)."""
    import fused_attention as fa
    B, H, T = 2, 4, 1024
    meta = lambda *shape: torch.empty(*shape, dtype=getattr(torch, dtype), device="meta")
    k_lens = torch.empty(B, dtype=torch.int32, device="meta") if lens else None
    q_lens = k_lens if lens == "q" else None
    q, k, v = meta(B, H, T, D), meta(B, H, T, D), meta(B, H, T, D)
    fa._recorded = recorded = []
    tma = fa.TMA
    try:
        o, lse = fa._flash_forward(q, k, v, causal, k_lens, 0.125, q_lens)
        for bwd in ("atomic", "split"):
            fa._flash_backward(torch.empty_like(q), q, k, v, o, lse, causal, k_lens, 0.125, bwd,
                               q_lens)
        fa._flash_forward(meta(B, H, 1, D), meta(B, H, 4 * T, D), meta(B, H, 4 * T, D), causal,
                          k_lens, 0.125, q_lens)
        fa.TMA = False
        fa._flash_forward(q, k, v, causal, k_lens, 0.125, q_lens)
    finally:
        fa._recorded, fa.TMA = None, tma
    names = dict(_merge_kernel="merge", _bwd_preprocess="preprocess")
    launches = {}
    for kernel, name, args, kwargs in recorded:
        name = name or names[kernel.fn.__name__]
        launches.setdefault(name + ("-pointers" if name == "fwd" and not kwargs["TMA"] else ""),
                            (kernel, args, kwargs))
    return launches

def compile_for_h100(kernel, args, kwargs, float_type="fp32"):
    """What kernel[grid](*args, **kwargs) would compile on an H100, built here without a driver.
    The JIT's own binder gives the argument types and its specialisation (pointers 16-byte
    aligned, integers divisible by 16, ints equal to 1 as constants). Then triton.compile runs for
    the sm_90 target (Triton and ptxas). float_type: the type of the float arguments. The JIT
    passes Python floats as fp32; torch.compile's Inductor, which recompiles the kernels of a
    compiled model, passes them as fp64."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    signature = {k: float_type if t == "fp32" else t for k, t in signature.items()}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)

# the tensor-core instructions in the PTX, as (shape, input type)
WGMMA = r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)\."
MMA_SYNC = r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.f32\.(\w+)\."

@functools.lru_cache(maxsize=None)
def ptxas_report(name, D, causal, lens, tile, dtype="bfloat16"):
    """Resource use of one build, read from its cubin (cuobjdump) and PTX. Triton caches the builds
    on disk (TRITON_CACHE_DIR, default ~/.triton/cache), so a second run only reads them back."""
    import triton
    import fused_attention as fa
    kernel, args, kwargs = recorded_launches(D, dtype, causal, lens)[name]
    if tile is None and name in TUNED_KERNELS:
        tile = fa._tiles(name.split("-")[0], D)[0]
    if tile is not None:
        m, n, warps, stages = tile
        kwargs = dict(kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    compiled = compile_for_h100(kernel, args, kwargs)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    ptx = compiled.asm["ptx"]
    return dict(
        regs=int(res["REG"]),
        # the stack frame: these kernels have no local arrays, so it is spills
        spill=int(res["STACK"]) + int(res["LOCAL"]),
        smem=compiled.metadata.shared + int(res["SHARED"]),  # dynamic (pipeline buffers) + static
        wgmma=sorted(set(re.findall(WGMMA, ptx))),
        mma_sync=sorted(set(re.findall(MMA_SYNC, ptx))),
        cp_async="cp.async" in ptx, tma="cp.async.bulk.tensor" in ptx,
        ttir=compiled.asm["ttir"], ptx=ptx)

def ptxas_table(cases, dtype="bfloat16"):
    cols = ["kernel", "D", "causal", "lengths", "tile (M x N, warps, stages)", "regs", "spill B",
            "smem KiB", "wgmma", "mma.sync", "TMA"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)
    shapes = lambda xs: " ".join(sorted({shape for shape, _ in xs})) or "-"
    flag = lambda b: "yes" if b else "no"
    t0 = time.time()
    for i, (name, D, causal, lens, tile) in enumerate(cases):
        r = ptxas_report(name, D, causal, lens, tile, dtype)
        tile_s = "-" if tile is None else f"{tile[0]} x {tile[1]}, {tile[2]}, {tile[3]}"
        cells = [name, D, "-" if tile is None else flag(causal),
                 "-" if tile is None else {False: "-", True: "k", "q": "k, q"}[lens], tile_s,
                 r["regs"], r["spill"], f"{r['smem'] / 1024:.1f}", shapes(r["wgmma"]),
                 shapes(r["mma_sync"]), flag(r["tma"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        # 440 builds with --tiles=all: minutes, the first time
        eta = (time.time() - t0) / (i + 1) * (len(cases) - i - 1)
        print(lines[-1], f"  [{i + 1}/{len(cases)}, eta {eta:.0f}s]", flush=True)
    return lines

# -----------------------------------------------------------------------------
# the GPU benchmark

def useful_flops(H, D, lens, causal):
    """Forward matmul FLOPs (QK^T and PV: 4*D per visible query-key pair), summed over the batch."""
    pairs = 0
    for n in lens.tolist():  # self-attention among the first n positions (the rest is padding)
        pairs += n * (n + 1) // 2 if causal else n * n
    return 4 * H * D * pairs

def timeit(fn, backward, q, k, v, do):
    from triton.testing import do_bench
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

def bench_row(args, D, T, causal, mixed, rng, dtype):
    import fused_attention
    from fused_attention import attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = "cuda"
    H = max(1, args.width // D)
    B = max(1, args.tokens // T)
    if mixed:
        lens = torch.randint(T // 4, T + 1, (B,), generator=rng)
        lens[0] = T  # the padded length really occurs
    else:
        lens = torch.full((B,), T)
    k_lens = lens.to(device)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn(B, H, T, D, device=device, dtype=dtype)
    # the boolean mask SDPA needs for the same problem (True = attend)
    mask = (torch.arange(T, device=device)[None, :] < k_lens[:, None])[:, None, None, :]
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    ours = lambda q, k, v: attention(q, k, v, causal=causal, k_lens=k_lens if mixed else None,
                                     q_lens=k_lens if mixed and args.q_lens else None,
                                     backend="triton")
    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    masked = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # correctness first: ours vs masked SDPA on the real rows (padding query rows differ: ours are
    # zeros with q_lens, SDPA attends over the valid keys; a real loss ignores both)
    with torch.no_grad():
        valid_q = (torch.arange(T, device=device)[None, :] < k_lens[:, None])[:, None, :, None]
        err = ((ours(q, k, v) - masked(q, k, v)).float().abs() * valid_q).max().item()
    flops = useful_flops(H, D, lens, causal)
    row = dict(D=D, T=T, B=B, causal=causal, mixed=mixed, err=err)
    for name, fn, backward in (("ours", ours, False), ("flash", flash, False),
                               ("masked", masked, False),
                               ("atomic", ours, True), ("split", ours, True),
                               ("flash", flash, True), ("masked", masked, True)):
        if name in ("atomic", "split"):  # which way ours' backward gets dq
            fused_attention.BWD = name
        try:
            ms = timeit(fn, backward, q, k, v, do)
            # forward + backward: 3.5x the forward's FLOPs (FlashAttention-2's count: backward 2.5x)
            row[(name, backward)] = flops * (3.5 if backward else 1.0) / (ms * 1e-3) / 1e12
        except torch.cuda.OutOfMemoryError:
            row[(name, backward)] = float("nan")
            torch.cuda.empty_cache()
    del mask, q, k, v, do
    torch.cuda.empty_cache()
    return row

def benchmark(args):
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py: no CUDA GPU found; this benchmark times GPU kernels and "
                 "measured nothing. Run it on a machine with an NVIDIA GPU (or use --ptxas, which "
                 "needs none).")
    import triton
    import fused_attention
    fused_attention.AUTOTUNE = bool(args.autotune)
    dtype = getattr(torch, args.dtype)
    rng = torch.Generator().manual_seed(args.seed)
    gpu = torch.cuda.get_device_name()
    # the load before the run: what else was running (the host's 1-minute load average)
    load = f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load unknown"
    header = (f"GPU: {gpu}, Python {sys.version.split()[0]}, torch {torch.__version__}, triton "
              f"{triton.__version__}, {load} at the start, {args.dtype}, "
              f"B*T = {args.tokens}, H*D = {args.width}, autotune "
              f"{'on' if args.autotune else 'off (fixed tiles)'}, mixed rows with "
              f"{'k_lens and q_lens' if args.q_lens else 'k_lens only'}")
    cols = ["D", "causal", "batch", "T", "B", "fwd ours", "fwd flash", "fwd masked", "ours/flash",
            "ours/masked",
            "f+b ours atomic", "f+b ours split", "f+b flash", "f+b masked", "best/flash",
            "best/masked", "max err"]
    lines = [header, "", "TFLOP/s (useful work); ratios > 1 mean ours is faster", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)
    configs = [(D, causal, mixed, T) for D in args.dims for causal in (False, True)
               for mixed in (False, True) for T in args.seqlens
               if not (mixed and args.tokens // T < 2)]  # a mixed batch needs two sequences
    tflops = lambda x: f"{x:.0f}"
    t0 = time.time()
    for i, (D, causal, mixed, T) in enumerate(configs):
        r = bench_row(args, D, T, causal, mixed, rng, dtype)
        cells = [D, "yes" if causal else "no", "mixed" if mixed else "uniform", T, r["B"]]
        fwd = {n: r[(n, False)] for n in ("ours", "flash", "masked")}  # TFLOP/s
        fb = {n: r[(n, True)] for n in ("atomic", "split", "flash", "masked")}
        cells += [tflops(fwd["ours"]), tflops(fwd["flash"]), tflops(fwd["masked"]),
                  f"{fwd['ours'] / fwd['flash']:.2f}", f"{fwd['ours'] / fwd['masked']:.2f}"]
        # skip an OOM (nan)
        best = max((x for x in (fb["atomic"], fb["split"]) if not math.isnan(x)),
                   default=float("nan"))
        cells += [tflops(fb["atomic"]), tflops(fb["split"]), tflops(fb["flash"]),
                  tflops(fb["masked"]),
                  f"{best / fb['flash']:.2f}", f"{best / fb['masked']:.2f}"]
        cells.append(f"{r['err']:.1e}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        eta = (time.time() - t0) / (i + 1) * (len(configs) - i - 1)
        print(lines[-1], f"  [{i + 1}/{len(configs)}, eta {eta:.0f}s]", flush=True)
    # which tiles the autotuner picked, per (D, causal, k_lens, q_lens, Tq bucket, Tk bucket)
    if args.autotune:
        picks = ["", "autotuner picks (BLOCK_M, BLOCK_N, warps, stages):", ""]
        for name, tuned in fused_attention.TUNED.items():
            for key, cfg in tuned.cache.items():
                picks.append(f"- {name} {key[:6]}: {cfg.kwargs['BLOCK_M']}, "
                             f"{cfg.kwargs['BLOCK_N']}, {cfg.num_warps}, {cfg.num_stages}")
        print("\n".join(picks))
        lines += picks
    return lines

def main():
    # --help: the whole docstring (columns, goals, --ptxas), laid out as written
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --seq=512 is a typo, not --seqlens
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384",
                        help="comma-separated T values (default %(default)s)")
    parser.add_argument("--dims", default=None,
                        help="comma-separated head dims (default 64,128; --ptxas: 16,32,64,128)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="B*T per row, a multiple of each T (B = tokens // T; default "
                             "%(default)s)")
    parser.add_argument("--width", type=int, default=2048, help="H*D per row (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="default %(default)s")
    # 0 or 1 only: 2 (or -1) would pass as on, and a header that says "on" would hide the typo
    parser.add_argument("--autotune", type=int, default=1, choices=(0, 1),
                        help="1: let Triton's autotuner pick tiles; 0: fixed tiles (default "
                             "%(default)s)")
    parser.add_argument("--quick", action="store_true", help="T = 1024, 4096 and D = 64 only")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--q_lens", type=int, default=1, choices=(0, 1),
                        help="mixed rows: 1: ours skips the padding queries (q_lens); 0: k_lens "
                             "only (default %(default)s)")
    parser.add_argument("--out", default="", help="also write the table (markdown) to this file")
    parser.add_argument("--ptxas", action="store_true",
                        help="no GPU: build every kernel for an H100, print its resource use")
    parser.add_argument("--tiles", default="all", choices=["all", "default"],
                        help="--ptxas: every TILES entry or the defaults (default %(default)s)")
    args = parser.parse_args()
    # before any build or timing: a bad one would stop the run with a traceback
    try:
        from fused_attention import HEAD_DIMS, INTERPRETED  # reads the FUSED_ATTENTION* variables
    except ValueError as e:  # one of them mistyped
        fail(str(e))
    if INTERPRETED:  # left set from running the kernels on a CPU: no compiler, no GPU kernels
        fail("TRITON_INTERPRET=1 is set: the kernels would be Triton's interpreter's, which "
             "builds and times nothing of the GPU's; unset it")
    for name in ("seqlens", "dims"):
        text = getattr(args, name)
        try:
            setattr(args, name, None if text is None else [int(s) for s in text.split(",")])
        except ValueError:
            fail(f"--{name}={text}: expected integers separated by commas")
    if min(args.seqlens) < 1:
        fail(f"--seqlens={','.join(map(str, args.seqlens))}: each must be at least 1")
    if args.dims and set(args.dims) - set(HEAD_DIMS):
        fail(f"--dims={','.join(map(str, args.dims))}: the kernels take head dims "
             f"{', '.join(map(str, HEAD_DIMS))} only")
    if not args.ptxas:
        if args.quick:
            given = [a.split("=")[0] for a in sys.argv[1:] if a.startswith(("--seqlens", "--dims"))]
            if given:  # --quick sets both: the ones given would be dropped without a word
                fail(f"--quick runs T = 1024, 4096 and D = 64; leave out {' and '.join(given)}, "
                     f"or --quick")
            args.seqlens, args.dims = [1024, 4096], [64]
        args.dims = args.dims or [64, 128]
        # the header states B*T and H*D: each row must run exactly those (0 or a negative count
        # is a multiple of everything, and a row would run B = 1 under it)
        for name in ("tokens", "width"):
            if getattr(args, name) < 1:
                fail(f"--{name}={getattr(args, name)}: must be at least 1")
        if any(args.width % D for D in args.dims):
            fail(f"--width={args.width}: H*D must be a multiple of each head dim "
                 f"({', '.join(map(str, args.dims))})")
        if any(args.tokens % T for T in args.seqlens):
            fail(f"--tokens={args.tokens}: B*T must be a multiple of each T "
                 f"({', '.join(map(str, args.seqlens))})")
    if args.out:
        configurator.check_out_file("bench_attention.py", args.out, TITLE)
    if args.ptxas:
        import triton
        dims = args.dims or [16, 32, 64, 128]
        lines = [f"sm_90a builds (H100), {args.dtype}, triton {triton.__version__}, torch "
                 f"{torch.__version__}, aligned tensors, lengths multiples of 16; no GPU involved",
                 ""]
        print("\n".join(lines), flush=True)
        lines += ptxas_table(ptxas_cases(dims, args.tiles), args.dtype)
    else:
        lines = benchmark(args)
    if args.out:
        configurator.write_report("bench_attention.py", args.out, [TITLE, ""] + lines)

if __name__ == "__main__":
    # Ctrl-C: one line, not a traceback (--out is written at the end; finished builds stay in
    # Triton's cache)
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(
        "\nbench_attention.py: interrupted; nothing was written"))
    main()
