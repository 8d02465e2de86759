"""
Tests of fused_attention.attention against plain softmax attention computed in float64.

- the Triton kernels (forward with and without tensor descriptors, flash-decoding split + merge, and
  dq/dk/dv with both backwards) under Triton's interpreter on the CPU, fp32 and fp16, with the
  interpreter's small tiles and with every TILES entry: the interpreter is chosen when the kernels
  are defined (at import), so that part runs in a subprocess (this file with --worker) with
  TRITON_INTERPRET=1, whatever else this process imported;
- the PyTorch path on the same cases, in this process;
- the kernels built for an H100 (sm_90a) ahead of time, as the JIT would build them for aligned
  tensors (no GPU needed): no register spills, shared memory within the limit, wgmma. By default
  what an H100 runs by default (forward, decoding, the default backward, their default tiles) at D =
  64 and 128 in the heaviest variants (causal + k_lens, with and without q_lens), ~45 s the first
  time; FUSED_ATTENTION_PTXAS=all builds every kernel x head dim x TILES entry x causal/lengths
  variant (440 builds, 5-30 min the first time). Triton caches builds on disk, so later runs take
  seconds;
- on a CUDA machine, the compiled kernels against PyTorch's SDPA in bf16 and fp16 (skipped
  otherwise).

bf16 is never checked numerically on the CPU: Triton's interpreter computes bf16 tl.dot wrongly,
so a bf16 case there would fail for the interpreter's sake. What can be checked without a GPU is
checked instead: the bf16 build uses the bf16 tensor-core instructions, and it comes from the same
source as the fp16 build (their Triton IR differs in the element type only).
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
import fused_attention  # noqa: E402  (interpreted or compiled as this process's env says)

# (dtype, D, Tq, Tk, causal, k_lens, layout): k_lens "pad" gives batch lengths [Tk, 0, ~Tk/3]
# (full, empty, padded); "padq" those and query lengths [Tq/2 + 1, Tq, ~Tq/3] (rows past them are
# padding); "q" query lengths alone, [0, Tq + 5, Tq/2 + 1] (all padding, clamped to Tq, partial);
# layout "bthd" makes q, k, v strided views of a (B, T, H, D) tensor.
# Tq <= 16 takes the decoding path: with Tk > 32 its keys are split over programs and merged.
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
    # decoding several queries: the diagonal inside the splits
    ("float32", 64, 9, 200, True, "pad", "bthd"),
    # the causal diagonal at Tk - Tq = 1 and 30 (1 and -2 modulo the interpreter's 16- and 32-wide
    # blocks): a tile's last row alone sees the first key of a block, its first row all but the
    # last key of one; an off-by-one in which blocks a tile visits, or which it takes unmasked,
    # shows only on such lengths
    ("float32", 16, 32, 33, True, "pad", "bhtd"),
    ("float32", 16, 32, 62, True, None, "bhtd"),
    ("float16", 64, 129, 129, True, "pad", "bhtd"),
    ("float16", 64, 1, 100, False, "pad", "bhtd"),
    ("float16", 32, 100, 17, True, None, "bthd"),
    ("float16", 128, 17, 33, True, "pad", "bhtd"),
]

# query lengths (q_lens): self-attention over a padded batch, cross-attention, decoding with split
# keys
QLENS_CASES = [
    ("float32", 32, 129, 129, False, "padq", "bhtd"),
    ("float32", 32, 129, 129, True, "padq", "bthd"),
    ("float32", 32, 100, 17, True, "padq", "bhtd"),
    ("float32", 32, 5, 100, False, "padq", "bhtd"),
    ("float16", 64, 129, 129, True, "padq", "bhtd"),
    ("float32", 32, 129, 129, True, "q", "bthd"),
    ("float32", 32, 5, 100, True, "q", "bhtd"),
]

# the other code paths, on a subset: the backward that is not the default at D <= 64 ("atomic": dq
# by atomic adds from the dk/dv kernel) and the forward without tensor descriptors (pointer loads:
# unaligned inputs, GPUs before Hopper)
OTHER_PATH_CASES = [
    ("float32", 32, 100, 17, True, "pad", "bhtd"),
    ("float32", 32, 1, 100, False, "pad", "bhtd"),
    ("float32", 32, 129, 129, False, None, "bhtd"),
    ("float32", 16, 33, 70, True, "pad", "bhtd"),
    ("float16", 64, 129, 129, True, "pad", "bhtd"),
    ("float16", 32, 100, 17, True, None, "bthd"),
    ("float32", 32, 129, 129, True, "padq", "bhtd"),
]

# every TILES entry (the GPU's tiles) under the interpreter: entry i of each kernel's list at once,
# on lengths that cross several 128-blocks and leave ragged ends (one head, to save time); Tq = 1
# for the decoding tiles, whose keys are then split over programs too
TILE_CASES = [("float32", D, Tq, Tk, True, lens, "bthd") for D in (64, 128)
              for Tq, Tk, lens in ((270, 260, "pad"), (1, 700, "pad"), (270, 270, "padq"))]
# entry i of each list (its last where the list is shorter), up to the longest list's last
TILE_INDICES = tuple(range(max(len(tiles) for tiles in fused_attention.TILES.values())))

def case_id(case):
    dtype, D, Tq, Tk, causal, k_lens, layout = case
    return (f"{dtype}-D{D}-q{Tq}-k{Tk}-{'causal' if causal else 'full'}-"
            f"{k_lens or 'nolens'}-{layout}")

def make_inputs(case, device="cpu", B=3, H=2):
    dtype, D, Tq, Tk, causal, k_lens, layout = case
    g = torch.Generator().manual_seed(Tq * 1000 + Tk * 10 + D + causal)
    def rand(T):
        x = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=getattr(torch, dtype))
        x = x.transpose(1, 2) if layout == "bthd" else x.transpose(1, 2).contiguous()
        return x.requires_grad_()
    q, k, v = rand(Tq), rand(Tk), rand(Tk)
    do = torch.randn(B, H, Tq, D, generator=g).to(device=device, dtype=getattr(torch, dtype))
    lens = (None if k_lens in (None, "q") else
            torch.tensor([Tk, 0, max(1, Tk // 3)][:B], device=device))
    return q, k, v, do, lens

def query_lens(case, B=3, device="cpu"):
    """The case's q_lens ("padq" or "q"), else None."""
    Tq, lens = case[2], case[5]
    if lens not in ("padq", "q"):
        return None
    n = [Tq // 2 + 1, Tq, max(1, Tq // 3)] if lens == "padq" else [0, Tq + 5, Tq // 2 + 1]
    return torch.tensor(n[:B], device=device)

def reference(q, k, v, causal, k_lens, sm_scale, q_lens=None):
    """Softmax attention written out in float64; rows that see no key give 0, and so do rows past
    q_lens."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    s = (q @ k.transpose(-1, -2)) * sm_scale
    ok = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        ok = ok & (torch.arange(Tk, device=q.device)[None, :]
                   <= torch.arange(Tq, device=q.device)[:, None] + Tk - Tq)
    if k_lens is not None:
        ok = ok & (torch.arange(Tk, device=q.device)[None, None, None, :]
                   < k_lens.to(q.device)[:, None, None, None])
    if q_lens is not None:
        ok = ok & (torch.arange(Tq, device=q.device)[None, None, :, None]
                   < q_lens.to(q.device)[:, None, None, None])
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)  # -inf only on empty rows
    e = torch.exp(s - m)
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return p @ v

def errors(case, backend, sm_scale=None, H=2):
    """Max abs error of out, dq, dk, dv against the float64 reference, each divided by max(1, max
    |ref|)."""
    dtype, D, Tq, Tk, causal, k_lens, layout = case
    q, k, v, do, lens = make_inputs(case, H=H)
    q_lens = query_lens(case)
    out = fused_attention.attention(q, k, v, causal=causal, k_lens=lens, sm_scale=sm_scale,
                                    backend=backend, q_lens=q_lens)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = reference(q, k, v, causal, lens, 1.0 / math.sqrt(D) if sm_scale is None else sm_scale,
                    q_lens)
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
    if q_lens is not None:  # padding rows: exactly zero output and dq
        result["padding_row_max"] = max(float(x[b, :, n:].detach().abs().sum())
                                        for x in (out, grads[0])
                                        for b, n in enumerate(q_lens.tolist()))
    return result

TOL = {"float32": 2e-5, "float16": 5e-3}  # relative to max(1, max |reference|)

def check(case, result):
    assert "error" not in result, result.get("error")
    for name in ("out", "dq", "dk", "dv"):
        assert result[name] < TOL[case[0]], f"{name} error {result[name]:.2e} > {TOL[case[0]]:.0e}"
    if "empty_row_max" in result:
        assert result["empty_row_max"] == 0.0
    if case[5] in ("padq", "q"):
        assert result["padding_row_max"] == 0.0

# -----------------------------------------------------------------------------
# Triton kernels under the interpreter (one subprocess for all cases)

def skip_if_interpreter_too_old(stderr):
    """Triton 3.6's interpreter (not 3.9's) takes a loop bound computed in a kernel as int() of a
    1-element array, which recent numpy refuses: it cannot run these kernels at all. Such a
    Triton still compiles them for a GPU, where test_gpu_kernel_vs_sdpa checks them."""
    if "only 0-dimensional arrays can be converted to Python scalars" in stderr:
        import numpy
        import triton
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run these kernels with "
                    f"numpy {numpy.__version__} (a loop bound read as int() of a 1-element "
                    f"array); triton 3.9.0's can")

# the interpreter runs the cases in this many processes side by side, one thread each (one under
# pytest -n, whose workers already share the cores: conftest.py sets OMP_NUM_THREADS for them)
WORKERS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2

@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, FUSED_ATTENTION="triton",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               str(i), str(WORKERS)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(WORKERS)]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            skip_if_interpreter_too_old(err)
        assert proc.returncode == 0, err[-3000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_interpreter(case, interpreter_results):
    check(case, interpreter_results[case_id(case)])

@pytest.mark.parametrize("case", QLENS_CASES, ids=case_id)
def test_triton_interpreter_query_lengths(case, interpreter_results):
    check(case, interpreter_results[case_id(case)])

@pytest.mark.parametrize("case", OTHER_PATH_CASES, ids=case_id)
def test_triton_interpreter_other_backward_pointer_forward(case, interpreter_results):
    check(case, interpreter_results["other-" + case_id(case)])

@pytest.mark.parametrize("bwd", ["atomic", "split"])
@pytest.mark.parametrize("index", TILE_INDICES)
@pytest.mark.parametrize("case", TILE_CASES, ids=case_id)
def test_triton_interpreter_gpu_tiles(case, index, bwd, interpreter_results):
    check(case, interpreter_results[f"tiles{index}-{bwd}-" + case_id(case)])

def test_triton_interpreter_negative_scale(interpreter_results):
    # the kernels take the row max on raw scores: a negative scale must still give the softmax of
    # s * scale
    check(CASES[-1], interpreter_results["scale-" + case_id(CASES[-1])])

def nan_in_padding_rows(backend):
    """Largest difference of out, dq, dk, dv when the padding rows of q and dO hold NaN and inf
    instead of zeros: 0.0 if nothing of them leaks."""
    case = ("float32", 32, 40, 40, True, "padq", "bhtd")
    q, k, v, do, lens = make_inputs(case)
    q_lens = query_lens(case)
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        qf, dof = q.detach().clone(), do.clone()
        for b, n in enumerate(q_lens.tolist()):
            qf[b, :, n:], dof[b, :, n:] = fill, fill
        qf.requires_grad_()
        out = fused_attention.attention(qf, k, v, causal=True, k_lens=lens, q_lens=q_lens,
                                        backend=backend)
        results.append([out, *torch.autograd.grad(out, (qf, k, v), dof)])
    return max(float((a - b).detach().abs().max()) if torch.isfinite(b).all() else float("inf")
               for other in results[1:] for a, b in zip(results[0], other))

def test_triton_interpreter_padding_rows_do_not_leak(interpreter_results):
    for bwd in ("atomic", "split"):
        assert interpreter_results[f"nan-padding-{bwd}"] == 0.0, bwd

def test_torch_path_padding_rows_do_not_leak():
    assert nan_in_padding_rows("torch") == 0.0

def nan_in_padding_keys(backend, causal):
    """Largest difference of out, dq, dk, dv when the keys and values past k_lens hold NaN and inf
    instead of zeros: 0.0 if nothing of them leaks (the kernels must not load them at all: a masked
    NaN score, or a zero weight times inf, is still NaN)."""
    q, k, v, do, lens = make_inputs(("float32", 32, 24, 40, causal, "pad", "bhtd"))
    assert any(n < 40 for n in lens.tolist())  # some keys are padding
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        kf, vf = k.detach().clone(), v.detach().clone()
        for b, n in enumerate(lens.tolist()):
            kf[b, :, n:], vf[b, :, n:] = fill, fill
        kf.requires_grad_(), vf.requires_grad_()
        out = fused_attention.attention(q, kf, vf, causal=causal, k_lens=lens, backend=backend)
        results.append([out, *torch.autograd.grad(out, (q, kf, vf), do)])
    return max(float((a - b).detach().abs().max()) if torch.isfinite(b).all() else float("inf")
               for other in results[1:] for a, b in zip(results[0], other))

def test_triton_interpreter_keys_past_k_lens_do_not_leak(interpreter_results):
    # the forward by tensor descriptors and by pointer loads, both backwards
    for key in ("split-tma", "atomic-pointers"):
        for causal in (True, False):
            assert interpreter_results[f"nan-keys-{key}-{causal}"] == 0.0, (key, causal)

@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_keys_past_k_lens_do_not_leak(causal):
    # the kernels never load keys past k_lens; the PyTorch path must ignore them as well, whatever
    # they hold (a KV cache's unwritten buffer, a padded batch)
    assert nan_in_padding_keys("torch", causal) == 0.0

def test_triton_interpreter_key_counts_past_int32(interpreter_results):
    assert interpreter_results["huge-klens"]["max_diff"] < 1e-5

# -----------------------------------------------------------------------------
# the PyTorch path, in this process

@pytest.mark.parametrize("sm_scale", [0.0, -0.2])
@pytest.mark.parametrize("case", [CASES[8], CASES[9]], ids=case_id)
def test_torch_path_scale_zero_or_negative(case, sm_scale):
    # causal, Tq == Tk, without and with k_lens: without, the torch path takes SDPA's is_causal
    # shortcut, which gave NaN for these scales
    check(case, errors(case, "torch", sm_scale))

# causal, no k_lens, 1 < Tq < Tk: several new queries over a cache (bottom-right, not SDPA's
# top-left is_causal)
@pytest.mark.parametrize("case", CASES + QLENS_CASES + [("float32", 32, 9, 40, True, None, "bhtd")],
                         ids=case_id)
def test_torch_path(case):
    check(case, errors(case, "torch"))

@pytest.mark.parametrize("dtype, D", [("float32", 48), ("float16", 32)])
def test_auto_uses_torch_on_cpu_and_matches(dtype, D):
    # D = 48: not a kernel size, fine on the torch path; float16 at D = 32: a kernel dtype and head
    # dim, but CPU tensors, and the kernel needs CUDA
    case = (dtype, D, 20, 31, True, "pad", "bhtd")
    q, k, v, _, lens = make_inputs(case)
    a = fused_attention.attention(q, k, v, causal=True, k_lens=lens, backend="auto")
    b = fused_attention.attention(q, k, v, causal=True, k_lens=lens, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)

def test_auto_takes_the_kernels_only_where_they_apply(monkeypatch):
    """auto's choice on a (faked) CUDA tensor: the kernels for fp16/bf16 at a kernel head dim on an
    Ampere or later GPU; PyTorch's attention on a T4 (sm_75) or V100 (sm_70), for fp32, or for a
    head dim the kernels lack. No GPU needed: q is a stand-in with the attributes auto reads."""
    from types import SimpleNamespace
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        major=capability[0][0], minor=capability[0][1]))
    fake = lambda dtype=torch.bfloat16, D=64: SimpleNamespace(is_cuda=True, dtype=dtype,
                                                               shape=(2, 4, 16, D), device="cuda:0")
    assert fused_attention.kernels_apply(fake())
    assert fused_attention.kernels_apply(fake(torch.float16, 128))
    assert not fused_attention.kernels_apply(fake(torch.float32))
    assert not fused_attention.kernels_apply(fake(D=48))
    capability[0] = (8, 0)
    assert fused_attention.kernels_apply(fake())
    for old in ((7, 5), (7, 0)):
        capability[0] = old
        assert not fused_attention.kernels_apply(fake()) and not fused_attention.kernels_apply(
            fake(torch.float16))

def test_auto_backward_is_split_up_to_head_dim_64_then_atomic(monkeypatch):
    # the choice the H200 timings made (docs/fused_attention.md), and what test_h100_build builds as
    # the default backward; FUSED_ATTENTION_BWD overrides it at every head dim
    monkeypatch.setattr(fused_attention, "BWD", "auto")
    assert [fused_attention._backward_mode(D) for D in fused_attention.HEAD_DIMS] == [
        "split", "split", "split", "atomic"]
    for bwd in ("atomic", "split"):
        monkeypatch.setattr(fused_attention, "BWD", bwd)
        assert {fused_attention._backward_mode(D) for D in fused_attention.HEAD_DIMS} == {bwd}

def test_sm_scale_and_kv_cache_alignment():
    # one new query against a cache of 9 keys, causal: it sees all 9 (bottom-right alignment)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g),
               torch.randn(1, 2, 9, 16, generator=g))
    a = fused_attention.attention(q, k, v, causal=True, sm_scale=0.3, backend="torch")
    b = fused_attention.attention(q, k, v, causal=False, sm_scale=0.3, backend="torch")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, reference(q, k, v, False, None, 0.3).float())

def test_no_keys_gives_zeros_and_zero_gradients():
    q = torch.randn(2, 2, 5, 16)
    q[0, 0, 0, 0] = float("inf")  # q * 0 would make this NaN
    q.requires_grad_()
    k = torch.randn(2, 2, 0, 16, requires_grad=True)
    v = torch.randn(2, 2, 0, 16, requires_grad=True)
    for backend in ("torch", "triton", "auto"):  # answered before any backend runs
        out = fused_attention.attention(q, k, v, causal=True, backend=backend)
        assert (out.shape == q.shape and out.dtype == q.dtype
                and torch.equal(out, torch.zeros_like(out)))
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn(2, 2, 5, 16))
        assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape

def test_bad_input_is_rejected_clearly():
    q = torch.randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fused_attention.attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="4-d"):
        fused_attention.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k_lens"):
        fused_attention.attention(q, q, q, k_lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="k_lens"):
        fused_attention.attention(q, q, q, k_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="boolean"):  # would otherwise pass as lengths 1 and 0
        fused_attention.attention(q, q, q, k_lens=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="q_lens must be an integer tensor of shape"):
        fused_attention.attention(q, q, q, q_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="q_lens holds query counts"):
        fused_attention.attention(q, q, q, q_lens=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="backend"):
        fused_attention.attention(q, q, q, backend="cudnn")
    with pytest.raises(ValueError, match="sm_scale must be a number, got '0.1'"):
        fused_attention.attention(q, q, q, sm_scale="0.1")  # SDPA's TypeError, the kernel's float()
    env = dict(os.environ, FUSED_ATTENTION_TMA="true", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", "import fused_attention"], env=env,
                       capture_output=True, text=True)
    assert p.returncode and "FUSED_ATTENTION_TMA must be 0 or 1, got 'true'" in p.stderr
    env = dict(os.environ, FUSED_ATTENTION_BWD="atomics", PYTHONPATH=ROOT)  # named also on CPU
    p = subprocess.run([sys.executable, "-c", "import fused_attention"], env=env,
                       capture_output=True, text=True)
    assert p.returncode and "FUSED_ATTENTION_BWD must be auto, atomic or split, got 'atomics'" \
        in p.stderr
    x = torch.randn(1, 1, 4, 48)
    with pytest.raises(ValueError, match="head dims"):
        fused_attention.attention(x, x, x, backend="triton")

def test_complex_lengths_are_rejected():
    q = torch.randn(2, 2, 5, 16)
    # a complex tensor is neither floating point nor an integer count: cast to int64 (the kernels'
    # path) it would silently drop its imaginary part
    for name in ("k_lens", "q_lens"):
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=f"{name} must be an integer tensor of shape"):
                fused_attention.attention(q, q, q, backend=backend,
                                          **{name: torch.tensor([3 + 0j, 5 + 0j])})

def test_non_tensor_inputs_are_named_by_their_type():
    """A numpy array (or a list) in place of a tensor: the message names its type, not a shape
    that reads as the one asked for ("must be a 4-d tensor ..., got (2, 2, 5, 16)")."""
    q = torch.randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match=r"q must be a 4-d tensor .*got ndarray \(not a torch "
                                         r"tensor\)"):
        fused_attention.attention(q.numpy(), q, q)
    for lens, kind in ((torch.tensor([3, 4]).numpy(), "ndarray"), ([3, 4], "list")):
        with pytest.raises(ValueError, match=rf"k_lens must be an integer tensor of shape \(2,\), "
                                             rf"got {kind} \(not a torch tensor\)"):
            fused_attention.attention(q, q, q, k_lens=lens)

def test_mismatched_inputs_are_rejected_not_broadcast():
    q = torch.randn(2, 2, 5, 16)
    kv = torch.randn(2, 2, 7, 16)
    # SDPA would broadcast a batch or head count of 1 silently, and fail later on other mismatches
    for bad in (kv[:1], kv[:, :1]):
        with pytest.raises(ValueError, match="must agree in B, H and D"):
            fused_attention.attention(q, bad, bad, backend="torch")
    with pytest.raises(ValueError, match="must agree in B, H and D"):
        fused_attention.attention(q, kv[..., :8], kv[..., :8], backend="torch")
    with pytest.raises(ValueError, match="must share one dtype"):
        fused_attention.attention(q, kv, kv.double(), backend="torch")
    with pytest.raises(ValueError, match="must share one dtype"):
        fused_attention.attention(q, kv.double(), kv, backend="torch")
    # integers: named here, not a matmul's dtype error inside SDPA
    with pytest.raises(ValueError, match="must be floating point, got torch.int64"):
        fused_attention.attention(q.long(), kv.long(), kv.long(), backend="torch")
    # causal must be a bool: "no" would pass as True, None as False
    for bad in ("no", None, 1):
        with pytest.raises(ValueError, match=f"causal must be True or False, got {bad!r}"):
            fused_attention.attention(q, kv, kv, causal=bad, backend="torch")
    # another device (meta tensors: no GPU needed) is named, not left to SDPA's own error
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta, meta"):
        fused_attention.attention(q, kv.to("meta"), kv.to("meta"), backend="torch")
    # True would pass as a scale of 1
    with pytest.raises(ValueError, match="sm_scale must be a number"):
        fused_attention.attention(q, kv, kv, sm_scale=True, backend="torch")
    # NaN passed the sign check and gave zeros, inf gave NaN
    for scale in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="sm_scale must be finite"):
            fused_attention.attention(q, kv, kv, sm_scale=scale, backend="torch")
    empty = torch.randn(2, 2, 5, 0)
    with pytest.raises(ValueError, match="the head dim D of q .* is 0"):
        fused_attention.attention(empty, empty, empty, backend="torch")

def test_triton_interpreter_strided_output_grad_and_narrow_length_dtypes():
    # autograd may hand the backward a gradient whose last dim is not contiguous (here: the output
    # used transposed); the kernels index dO's last dim with stride 1, and q, k, v's (which may
    # come that way too). Also: uint8 key lengths with more keys than a uint8 holds (the clamp to
    # Tk overflowed in the lengths' own dtype)
    script = (
        "import torch, fused_attention as fa, test_fused_attention as t\n"
        "assert fa.INTERPRETED\n"
        "case = ('float32', 32, 17, 40, True, 'pad', 'bhtd')\n"
        "for bwd in ('atomic', 'split'):\n"
        "    fa.BWD = bwd\n"
        "    q, k, v, do, lens = t.make_inputs(case)\n"
        "    w = do.transpose(-1, -2).contiguous()\n"
        "    out = fa.attention(q, k, v, causal=True, k_lens=lens, backend='triton')\n"
        "    grads = torch.autograd.grad((out.transpose(-1, -2) * w).sum(), (q, k, v))\n"
        "    ref = t.reference(q, k, v, True, lens, 32 ** -0.5)\n"
        "    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())\n"
        "    for x, r in zip(grads, ref_grads):\n"
        "        err = float((x.double() - r).abs().max()) / max(1.0, float(r.abs().max()))\n"
        "        assert err < 2e-5, (bwd, err)\n"
        # q, k, v whose head dim is not contiguous (views of (B, H, D, T) tensors)
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 2, 32, T, generator=g).transpose(-1, -2).requires_grad_()\n"
        "           for T in (17, 40, 40))\n"
        "assert q.stride(-1) != 1\n"
        "lens = torch.tensor([40, 13])\n"
        "out = fa.attention(q, k, v, causal=True, k_lens=lens, backend='triton')\n"
        "do = torch.randn(out.shape, generator=g)\n"
        "ref = t.reference(q, k, v, True, lens, 32 ** -0.5)\n"
        "for x, r in zip((out, *torch.autograd.grad(out, (q, k, v), do)),\n"
        "                (ref, *torch.autograd.grad(ref, (q, k, v), do.double()))):\n"
        "    assert float((x.double() - r).abs().max()) < 2e-5 * max(1.0, float(r.abs().max()))\n"
        "q, kv = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 300, 16)\n"
        "lens = torch.tensor([200], dtype=torch.uint8)\n"
        "a = fa.attention(q, kv, kv, k_lens=lens, backend='triton')\n"
        "b = fa.attention(q, kv, kv, k_lens=lens.long(), backend='torch')\n"
        "assert float((a - b).abs().max()) < 1e-5\n"
        # bf16, which the interpreter computes wrongly (by ~1e8 here), is refused, not returned
        "q = torch.randn(1, 1, 32, 16)\n"
        "try:\n"
        "    fa.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend='triton')\n"
        "    raise AssertionError('bf16 ran under the interpreter')\n"
        "except ValueError as e:\n"
        "    assert 'computes bf16 tl.dot wrongly' in str(e), e\n"
        # a scale float32 rounds to 0 gave NaN (0 * a masked -inf): it is the scale 0's uniform
        # average over the keys each query sees
        "q, k, v = (torch.randn(1, 1, 20, 16, generator=g) for _ in range(3))\n"
        "for scale in (1e-46, 0.0):\n"
        "    out = fa.attention(q, k, v, causal=True, sm_scale=scale, backend='triton')\n"
        "    mean = v.cumsum(2) / torch.arange(1, 21).view(1, 1, 20, 1)\n"
        "    assert float((out - mean).abs().max()) < 1e-5, scale\n"
        # a gradient of the gradient was silently zero: now an error
        "q.requires_grad_()\n"
        "gq, = torch.autograd.grad(fa.attention(q, k, v, backend='triton').square().sum(), q,\n"
        "                          create_graph=True)\n"
        "try:\n"
        "    gq.square().sum().backward()\n"
        "    raise AssertionError('a second derivative passed')\n"
        "except RuntimeError as e:\n"
        "    assert 'once_differentiable' in str(e), e\n")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        skip_if_interpreter_too_old(p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]

# -----------------------------------------------------------------------------
# the kernels built for an H100 ahead of time, as the JIT builds them (no GPU needed;
# bench_attention.py --ptxas prints the same builds as a table): catches what the interpreter lets
# through (types across loops and branches, constexpr use) and what only the compiled kernel shows
# (spills, shared memory)

def _aot():
    if fused_attention.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted in this process")
    try:
        import bench_attention
        from triton.runtime.jit import create_function_from_signature  # noqa: F401 (binder)
    except ImportError as e:
        pytest.skip(f"this triton cannot build ahead of time: {e}")
    return bench_attention

def _build_cases():
    import bench_attention
    if os.environ.get("FUSED_ATTENTION_PTXAS") == "all":
        return bench_attention.ptxas_cases()
    # what an H100 runs by default (forward, decoding, the default backward; default tiles) in the
    # heaviest variants (causal + k_lens, causal + k_lens + q_lens), and the fixed kernels
    return [c for c in bench_attention.ptxas_cases((64, 128), tiles="default")
            if c[4] is None or (c[2] and c[3]
                                and c[0] in ("fwd", "decode") + _default_backward(c[1]))]

def _default_backward(D):
    """The kernels of the backward that runs by default at head dim D."""
    return ("dkdv_atomic",) if fused_attention._backward_mode(D) == "atomic" else ("dkdv", "dq")

def _build_id(case):
    name, D, causal, lens, tile = case
    lens = {False: "nolens", True: "klens", "q": "kqlens"}[lens]
    return (f"{name}-D{D}-{'causal' if causal else 'full'}-{lens}-"
            + ("x".join(map(str, tile)) if tile else "fixed"))

@pytest.mark.parametrize("case", _build_cases(), ids=_build_id)
def test_h100_build(case):
    ba = _aot()
    name, D, causal, lens, tile = case
    r = ba.ptxas_report(name, D, causal, lens, tile)
    assert r["spill"] == 0, f"{r['spill']} bytes of register spills ({r['regs']} registers)"
    assert r["smem"] <= ba.SM90_SHARED_LIMIT, f"{r['smem']} bytes of shared memory"
    if name in ("fwd", "decode"):
        assert r["tma"], "the forward's K/V loads do not use the copy engine (cp.async.bulk.tensor)"
    if tile is not None and tile[3] >= 2:
        assert r["cp_async"] or r["tma"], "loads are not pipelined (no cp.async / TMA)"
    default_path = ("fwd", "fwd-pointers") + _default_backward(D)
    if (name in default_path and tile == fused_attention._tiles(name.split("-")[0], D)[0]
            and D >= 64):
        # the default tiles: Hopper's tensor-core instructions for every matmul, none narrower than
        # n32; except the 32-row dQ product of the atomic backward's 32-query tile at D = 128 (wgmma
        # takes 64 rows or more), which takes mma.sync: the faster backward there all the same
        assert r["wgmma"], r["mma_sync"]
        assert not r["mma_sync"] or (name, D) == ("dkdv_atomic", 128), r["mma_sync"]
        assert min(int(shape.split("n")[1].split("k")[0])
                   for shape, _ in r["wgmma"]) >= 32, r["wgmma"]

def test_builds_with_fp64_scales_as_torch_compile_passes_them():
    # a model under torch.compile has Inductor recompile these kernels with its own signature, which
    # types Python floats as fp64: the forward must still build (an fp64 accumulator fails tl.dot),
    # and no kernel may do its softmax arithmetic in fp64 (a fraction of the fp32 rate); the head
    # dim changes nothing of this, so one suffices
    ba = _aot()
    for name in ("fwd", "decode", "dkdv_atomic", "dkdv", "dq"):
        kernel, args, kwargs = ba.recorded_launches(64, "bfloat16", True, "q")[name]
        m, n, warps, stages = fused_attention._tiles(name, 64)[0]
        kwargs = dict(kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
        ptx = ba.compile_for_h100(kernel, args, kwargs, float_type="fp64").asm["ptx"]
        f64 = [line.strip() for line in ptx.splitlines() if "f64" in line]
        assert any(line.startswith(".param .f64") for line in f64), name  # fp64 arguments
        assert all(line.startswith((".param .f64", "cvt.rn.f32.f64")) for line in f64), (name, f64)

def test_builds_ask_for_fma_fusion(monkeypatch):
    # the forward's exp2(qk * scale - m) is one FMA per score only with fusion on, which the kernels
    # ask for rather than take from Triton's default (off from Triton 3.10)
    ba = _aot()
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    kernel, args, kwargs = ba.recorded_launches(64, "bfloat16", True, True)["fwd"]
    m, n, warps, stages = fused_attention._tiles("fwd", 64)[0]
    kwargs = dict(kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    compiled = ba.compile_for_h100(kernel, args, kwargs)
    assert compiled.metadata.enable_fp_fusion and "fma.rn.f32" in compiled.asm["ptx"]

def test_bf16_and_fp16_builds_share_one_source():
    ba = _aot()
    bf16 = ba.ptxas_report("fwd", 64, True, True, None, "bfloat16")
    fp16 = ba.ptxas_report("fwd", 64, True, True, None, "float16")
    assert {t for _, t in bf16["wgmma"]} == {"bf16"} and {t for _, t in fp16["wgmma"]} == {"f16"}
    # one kernel source: the Triton IR of the two builds differs in the element type and nothing
    # else
    strip = lambda ir: [line for line in ir.replace("bf16", "f16").splitlines()
                        if not line.startswith("#loc")]
    assert strip(bf16["ttir"]) == strip(fp16["ttir"])

# -----------------------------------------------------------------------------
# the compiled kernels on a GPU, against SDPA (skipped without CUDA)

# lens: False, True (k_lens) or "q" (k_lens and q_lens)
GPU_CASES = [(D, Tq, Tk, causal, lens) for D in (64, 128)
             for (Tq, Tk) in ((1, 1000), (5, 3000), (1037, 1037), (1037, 2100), (256, 77))
             for causal in (False, True) for lens in (False, True, "q")]

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# tma=False: the forward by pointer loads
@pytest.mark.parametrize("bwd,tma", [("atomic", True), ("split", True), ("split", False)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D,Tq,Tk,causal,lens", GPU_CASES)
def test_gpu_kernel_vs_sdpa(dtype, bwd, tma, D, Tq, Tk, causal, lens, monkeypatch):
    if fused_attention.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted in this process")
    # the default tiles: one compile per variant
    monkeypatch.setattr(fused_attention, "AUTOTUNE", False)
    monkeypatch.setattr(fused_attention, "BWD", bwd)
    monkeypatch.setattr(fused_attention, "TMA", tma)
    case = (dtype, D, Tq, Tk, causal, "pad" if lens else None, "bthd")
    q, k, v, do, k_lens = make_inputs(case, device="cuda", B=4, H=4)
    if k_lens is not None:
        k_lens = torch.tensor([Tk, 0, Tk // 3, 1], device="cuda")
    q_lens = torch.tensor([Tq // 2 + 1, Tq, Tq // 3, 0], device="cuda") if lens == "q" else None
    # the float32 PyTorch path is the reference; SDPA in low precision (with the equivalent mask)
    # shows how much error that precision costs; ours may have at most 2x that, plus a small floor
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = fused_attention.attention(q32, k32, v32, causal=causal, k_lens=k_lens, backend="torch",
                                    q_lens=q_lens)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    ours = fused_attention.attention(q, k, v, causal=causal, k_lens=k_lens, backend="triton",
                                     q_lens=q_lens)
    ours_grads = torch.autograd.grad(ours, (q, k, v), do)
    sdpa = fused_attention.attention(q, k, v, causal=causal, k_lens=k_lens, backend="torch",
                                     q_lens=q_lens)
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), do)
    floor = {"bfloat16": 1e-2, "float16": 2e-3}[dtype]
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), (ours, *ours_grads), (sdpa, *sdpa_grads),
                             (ref, *ref_grads)):
        err_ours = (o.float() - r).abs().max().item()
        err_sdpa = (s.float() - r).abs().max().item()
        tol = 2 * err_sdpa + floor * max(1.0, r.abs().max().item())
        assert err_ours <= tol, (name, err_ours, err_sdpa)

# -----------------------------------------------------------------------------

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    # run by interpreter_results: worker `shard` of `n_shards` runs its share of the cases through
    # the Triton kernels, results as one JSON line
    shard, n_shards = int(sys.argv[2]), int(sys.argv[3])
    assert fused_attention.INTERPRETED, "the worker must run with TRITON_INTERPRET=1"
    # (result prefix, backward, tensor descriptors, cases, tiles, sm_scale, heads)
    small_tiles = dict(fused_attention.INTERPRETER_TILES)
    runs = [("", "auto", True, CASES + QLENS_CASES, small_tiles, None, 2),
            ("other-", "atomic", False, OTHER_PATH_CASES, small_tiles, None, 2),
            ("scale-", "auto", True, CASES[-1:], small_tiles, -0.2, 2)]
    for i in TILE_INDICES:
        for D in (64, 128):
            cases = [c for c in TILE_CASES if c[1] == D]
            kernel_tiles = {name: fused_attention._tiles(name, D) for name in small_tiles}
            tiles = {name: entries[min(i, len(entries) - 1)][:2]
                     for name, entries in kernel_tiles.items()}
            runs += [(f"tiles{i}-{bwd}-", bwd, True, cases, tiles, None, 1)
                     for bwd in ("atomic", "split")]
    results, done, n_keys = {}, {}, 0
    for prefix, bwd, tma, cases, tiles, sm_scale, H in runs:
        (fused_attention.BWD, fused_attention.TMA,
         fused_attention.INTERPRETER_TILES) = bwd, tma, tiles
        for case in cases:
            key = (bwd, tma, case, tuple(sorted(tiles.items())), sm_scale, H)
            # a shorter TILES list repeats its last entry: run each set of tiles once
            if key not in done:
                n_keys += 1
                if n_keys % n_shards != shard:  # another worker's
                    done[key] = None
                    continue
                try:
                    done[key] = errors(case, "triton", sm_scale, H)
                except Exception as e:  # report it against its own case
                    done[key] = {"error": f"{type(e).__name__}: {e}"}
            if done[key] is not None:
                results[prefix + case_id(case)] = done[key]
    if shard:
        print(json.dumps(results))
        sys.exit(0)
    # key counts past 2**31: clamped to Tk before the kernels' int32, as the torch path reads them
    fused_attention.BWD, fused_attention.TMA, fused_attention.INTERPRETER_TILES = "auto", True, \
        small_tiles
    q, k, v, _, _ = make_inputs(("float32", 32, 17, 17, False, "pad", "bhtd"))
    lens = torch.tensor([2**32 + 3, 2**31, 5])
    ours, theirs = (fused_attention.attention(q, k, v, k_lens=lens, backend=b).detach()
                    for b in ("triton", "torch"))
    results["huge-klens"] = {"max_diff": float((ours - theirs).abs().max())}
    for bwd in ("atomic", "split"):
        fused_attention.BWD = bwd
        results[f"nan-padding-{bwd}"] = nan_in_padding_rows("triton")
    for bwd, tma, key in (("split", True, "split-tma"), ("atomic", False, "atomic-pointers")):
        fused_attention.BWD, fused_attention.TMA = bwd, tma
        for causal in (True, False):
            results[f"nan-keys-{key}-{causal}"] = nan_in_padding_keys("triton", causal)
    print(json.dumps(results))
