"""
Tests of fused_attention.attention against plain softmax attention computed in float64.

- the Triton kernels (forward and dq/dk/dv) under Triton's interpreter on the CPU, fp32 and fp16:
  the interpreter is chosen when the kernels are defined (at import), so that part runs in a
  subprocess (this file with --worker) with TRITON_INTERPRET=1, whatever else this process imported;
- the PyTorch path on the same cases, in this process;
- on a CUDA machine, the compiled kernels against PyTorch's SDPA in bf16 and fp16 (skipped otherwise).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (dtype, D, Tq, Tk, causal, k_lens, layout): k_lens "pad" gives batch lengths [Tk, 0, ~Tk/3]
# (full, empty, padded); layout "bthd" makes q, k, v strided views of a (B, T, H, D) tensor.
CASES = []
for causal in (False, True):
    for Tq, Tk in ((17, 17), (1, 100), (100, 17), (129, 129)):
        for k_lens in (None, "pad"):
            CASES.append(("float32", 32, Tq, Tk, causal, k_lens, "bhtd"))
CASES += [
    ("float32", 16, 33, 70, True, "pad", "bhtd"),
    ("float32", 64, 100, 100, True, None, "bthd"),
    ("float32", 64, 1, 1, False, None, "bhtd"),
    ("float32", 128, 17, 129, False, "pad", "bthd"),
    ("float16", 64, 129, 129, True, "pad", "bhtd"),
    ("float16", 64, 1, 100, False, "pad", "bhtd"),
    ("float16", 32, 100, 17, True, None, "bthd"),
    ("float16", 128, 17, 33, True, "pad", "bhtd"),
]

# the backward's other way of getting dq (atomic adds from the dk/dv kernel), on a subset
ATOMIC_CASES = [
    ("float32", 32, 100, 17, True, "pad", "bhtd"),
    ("float32", 32, 1, 100, False, "pad", "bhtd"),
    ("float32", 32, 129, 129, False, None, "bhtd"),
    ("float32", 16, 33, 70, True, "pad", "bhtd"),
    ("float16", 64, 129, 129, True, "pad", "bhtd"),
    ("float16", 32, 100, 17, True, None, "bthd"),
]

def case_id(case):
    dtype, D, Tq, Tk, causal, k_lens, layout = case
    return f"{dtype}-D{D}-q{Tq}-k{Tk}-{'causal' if causal else 'full'}-{k_lens or 'nolens'}-{layout}"

def make_inputs(case, device="cpu", B=3, H=2):
    dtype, D, Tq, Tk, causal, k_lens, layout = case
    g = torch.Generator().manual_seed(Tq * 1000 + Tk * 10 + D + causal)
    def rand(T):
        x = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=getattr(torch, dtype))
        x = x.transpose(1, 2) if layout == "bthd" else x.transpose(1, 2).contiguous()
        return x.requires_grad_()
    q, k, v = rand(Tq), rand(Tk), rand(Tk)
    do = torch.randn(B, H, Tq, D, generator=g).to(device=device, dtype=getattr(torch, dtype))
    lens = None if k_lens is None else torch.tensor([Tk, 0, max(1, Tk // 3)][:B], device=device)
    return q, k, v, do, lens

def reference(q, k, v, causal, k_lens, sm_scale):
    """Softmax attention written out in float64; rows that see no key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    s = (q @ k.transpose(-1, -2)) * sm_scale
    ok = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        ok = ok & (torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tq, device=q.device)[:, None] + Tk - Tq)
    if k_lens is not None:
        ok = ok & (torch.arange(Tk, device=q.device)[None, None, None, :] < k_lens.to(q.device)[:, None, None, None])
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)  # -inf only on empty rows
    e = torch.exp(s - m)
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return p @ v

def errors(case, backend):
    """Max abs error of out, dq, dk, dv against the float64 reference, each divided by max(1, max |ref|)."""
    import fused_attention
    dtype, D, Tq, Tk, causal, k_lens, layout = case
    q, k, v, do, lens = make_inputs(case)
    out = fused_attention.attention(q, k, v, causal=causal, k_lens=lens, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = reference(q, k, v, causal, lens, 1.0 / math.sqrt(D))
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    result = {}
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert x.shape == r.shape and x.dtype == q.dtype, (name, x.shape, x.dtype)
        x, r = x.detach(), r.detach()
        result[name] = float((x.double() - r).abs().max()) / max(1.0, float(r.abs().max()))
        if not torch.isfinite(x).all():
            result[name] = float("inf")
    if lens is not None:  # batch element 1 has no keys at all: exactly zero output and gradients
        result["empty_row_max"] = max(float(x[1].detach().abs().max()) for x in (out, *grads))
    return result

TOL = {"float32": 2e-5, "float16": 5e-3}  # relative to max(1, max |reference|)

def check(case, result):
    assert "error" not in result, result.get("error")
    for name in ("out", "dq", "dk", "dv"):
        assert result[name] < TOL[case[0]], f"{name} error {result[name]:.2e} > {TOL[case[0]]:.0e}"
    if "empty_row_max" in result:
        assert result["empty_row_max"] == 0.0

# -----------------------------------------------------------------------------
# Triton kernels under the interpreter (one subprocess for all cases)

@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, FUSED_ATTENTION="triton")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_interpreter(case, interpreter_results):
    check(case, interpreter_results[case_id(case)])

@pytest.mark.parametrize("case", ATOMIC_CASES, ids=case_id)
def test_triton_interpreter_atomic_dq(case, interpreter_results):
    check(case, interpreter_results["atomic-" + case_id(case)])

# -----------------------------------------------------------------------------
# the PyTorch path, in this process

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_path(case):
    check(case, errors(case, "torch"))

def test_auto_uses_torch_on_cpu_and_matches():
    import fused_attention
    case = ("float32", 48, 20, 31, True, "pad", "bhtd")  # D = 48: not a kernel size, fine on the torch path
    q, k, v, do, lens = make_inputs(case)
    a = fused_attention.attention(q, k, v, causal=True, k_lens=lens, backend="auto")
    b = fused_attention.attention(q, k, v, causal=True, k_lens=lens, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)

def test_sm_scale_and_kv_cache_alignment():
    import fused_attention
    # one new query against a cache of 9 keys, causal: it sees all 9 (bottom-right alignment)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    a = fused_attention.attention(q, k, v, causal=True, sm_scale=0.3, backend="torch")
    b = fused_attention.attention(q, k, v, causal=False, sm_scale=0.3, backend="torch")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, reference(q, k, v, False, None, 0.3).float())

def test_bad_input_is_rejected_clearly():
    import fused_attention
    q = torch.randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fused_attention.attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="4-d"):
        fused_attention.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k_lens"):
        fused_attention.attention(q, q, q, k_lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="k_lens"):
        fused_attention.attention(q, q, q, k_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="backend"):
        fused_attention.attention(q, q, q, backend="cudnn")
    x = torch.randn(1, 1, 4, 48)
    with pytest.raises(ValueError, match="head dims"):
        fused_attention.attention(x, x, x, backend="triton")

# -----------------------------------------------------------------------------
# the kernels through Triton's real compiler (to H100 machine code; no GPU needed): catches what the
# interpreter lets through (types across loops and branches, constexpr use, shared memory limits)

def test_kernels_compile_for_h100():
    import fused_attention as fa
    if fa.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted in this process")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton
    except ImportError as e:
        pytest.skip(f"this triton cannot compile ahead of time: {e}")
    pointers = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    pointers.update(LSE="*fp32", DELTA="*fp32", KLENS="*i32")
    for name, kernel in (("fwd", fa._fwd_kernel), ("dq", fa._bwd_dq_kernel), ("dkdv_atomic", fa._bwd_dkdv_kernel)):
        m, n, warps, stages = fa._tiles(name, 64)[0]
        constexprs = dict(HAS_KLENS=True, CAUSAL=True, HEAD_DIM=64, BLOCK_M=m, BLOCK_N=n)
        if name == "dkdv_atomic":  # covers the split variant too: ATOMIC_DQ only adds code
            constexprs["ATOMIC_DQ"] = True
            pointers["DQ"] = "*fp32"
        signature = {a: "constexpr" if a in constexprs else pointers.get(a, "fp32" if "scale" in a else "i32")
                     for a in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))
        assert "wgmma" in compiled.asm["ptx"], f"{name}: no Hopper tensor-core instructions"
        assert compiled.metadata.shared <= 228 * 1024, f"{name}: {compiled.metadata.shared} bytes of shared memory"

# -----------------------------------------------------------------------------
# the compiled kernels on a GPU, against SDPA (skipped without CUDA)

GPU_CASES = [(D, Tq, Tk, causal, lens) for D in (64, 128) for (Tq, Tk) in ((1, 1000), (1037, 1037), (1037, 2100), (256, 77))
             for causal in (False, True) for lens in (False, True)]

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bwd", ["split", "atomic"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D,Tq,Tk,causal,lens", GPU_CASES)
def test_gpu_kernel_vs_sdpa(dtype, bwd, D, Tq, Tk, causal, lens, monkeypatch):
    import fused_attention
    if fused_attention.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted in this process")
    monkeypatch.setattr(fused_attention, "AUTOTUNE", False)  # the default tiles: one compile per variant
    monkeypatch.setattr(fused_attention, "BWD", bwd)
    case = (dtype, D, Tq, Tk, causal, "pad" if lens else None, "bthd")
    q, k, v, do, k_lens = make_inputs(case, device="cuda", B=4, H=4)
    if k_lens is not None:
        k_lens = torch.tensor([Tk, 0, Tk // 3, 1], device="cuda")
    # the float32 PyTorch path is the reference; SDPA in low precision (with the equivalent mask)
    # shows how much error that precision costs; ours may have at most 2x that, plus a small floor
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = fused_attention.attention(q32, k32, v32, causal=causal, k_lens=k_lens, backend="torch")
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    ours = fused_attention.attention(q, k, v, causal=causal, k_lens=k_lens, backend="triton")
    ours_grads = torch.autograd.grad(ours, (q, k, v), do)
    sdpa = fused_attention.attention(q, k, v, causal=causal, k_lens=k_lens, backend="torch")
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), do)
    floor = {"bfloat16": 1e-2, "float16": 2e-3}[dtype]
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), (ours, *ours_grads), (sdpa, *sdpa_grads), (ref, *ref_grads)):
        err_ours = (o.float() - r).abs().max().item()
        err_sdpa = (s.float() - r).abs().max().item()
        assert err_ours <= 2 * err_sdpa + floor * max(1.0, r.abs().max().item()), (name, err_ours, err_sdpa)

# -----------------------------------------------------------------------------

if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    # run by interpreter_results: every case through the Triton kernels, results as one JSON line
    import fused_attention
    assert fused_attention.INTERPRETED, "the worker must run with TRITON_INTERPRET=1"
    results = {}
    for bwd, cases in (("split", CASES), ("atomic", ATOMIC_CASES)):
        fused_attention.BWD = bwd
        for case in cases:
            name = case_id(case) if bwd == "split" else "atomic-" + case_id(case)
            try:
                results[name] = errors(case, "triton")
            except Exception as e:  # report it against its own case
                results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))
