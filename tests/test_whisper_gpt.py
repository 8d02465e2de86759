"""Whisper-GPT: causality, sizes, learning, KV cache, data windows, metrics, sampling."""

import dataclasses
import glob
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import whisper_gpt as W
from script_runner import run_script, run_scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and several threads thrash on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny(**kw):
    args = dict(block_size=24, vocab_size=50, n_layer=2, n_head=2, n_embd=32, n_mels=8,
                mel_n_layer=1, mel_n_head=2, mel_n_embd=16, mel_dim=8)
    args.update(kw)
    torch.manual_seed(0)
    return W.Model(W.Config(**args)).eval()

def inputs(model, B=2, T=None, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    T = T or c.block_size
    codes = torch.randint(0, c.vocab_size, (B, T), generator=g)
    return codes, torch.randn(B, T, c.n_mels, generator=g)

@pytest.mark.parametrize("use_mel,lag", [(False, 1), (True, 1), (True, 0), (True, 2)])
def test_causal(use_mel, lag):
    """Changing codes or mels at steps > t leaves every output at steps <= t unchanged."""
    model = tiny(use_mel=use_mel, mel_lag=lag)
    codes, mels = inputs(model)
    base, _ = model(codes, mels)
    T = codes.size(1)
    for t in (0, 5, T - 2):
        c2, m2 = codes.clone(), mels.clone()
        c2[:, t + 1:] = torch.randint(0, model.config.vocab_size, c2[:, t + 1:].shape)
        m2[:, t + 1:] = torch.randn_like(m2[:, t + 1:]) * 3
        out, _ = model(c2, m2)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
        # the change is seen later
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)
    # the inputs of step t reach step t: the token at once, the mel frame mel_lag steps later
    t = 7
    c2 = codes.clone()
    c2[:, t] = (c2[:, t] + 1) % model.config.vocab_size
    assert not torch.allclose(model(c2, mels)[0][:, t], base[:, t], atol=1e-4)
    if use_mel:
        m2 = mels.clone()
        m2[:, t] += 3.0
        out, _ = model(codes, m2)
        torch.testing.assert_close(out[:, :t + lag], base[:, :t + lag], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t + lag], base[:, t + lag], atol=1e-4)

def test_fused_input_is_the_token_embedding_then_the_mel_vector():
    """Early fusion lays out [token embedding (n_embd - mel_dim) | mel vector (mel_dim)], each half
    fed by its own input alone: the fused input (read where it enters the dropout, the position
    embedding added) keeps its first n_embd - mel_dim dims when only the mels change and its last
    mel_dim dims when only the codes change, and the change lands in the other half."""
    model = tiny(use_mel=True, mel_lag=0)
    codes, mels = inputs(model)
    seen = []
    model.drop.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    model(codes, mels)
    model(codes, mels + 3.0)
    model((codes + 1) % model.config.vocab_size, mels)
    base, new_mels, new_codes = seen
    w = model.config.n_embd - model.config.mel_dim  # the token embedding's width
    assert base.shape == (2, 24, 32) and model.wte.weight.shape == (50, w)
    torch.testing.assert_close(new_mels[..., :w], base[..., :w], rtol=0, atol=0)
    assert not torch.allclose(new_mels[..., w:], base[..., w:], atol=1e-4)
    torch.testing.assert_close(new_codes[..., w:], base[..., w:], rtol=0, atol=0)
    assert not torch.allclose(new_codes[..., :w], base[..., :w], atol=1e-4)

def config_model_args(name):
    """The model fields a config file sets (block_size, n_layer, ...), as train.py would take
    them."""
    ns = runpy.run_path(os.path.join(ROOT, "config", name))
    keys = {f for f in W.Config.__dataclass_fields__}
    return {k: v for k, v in ns.items() if k in keys}

@pytest.mark.parametrize("name,lo,hi",
                         [("whisper_gpt_s.py", 3.6e6, 3.8e6),        # paper: 3.7M
                          ("whisper_gpt_l.py", 39e6, 41.5e6),        # paper: 40M
                          ("whisper_gpt_hybrid.py", 3.9e6, 4.3e6)])  # paper: 4M (4.1M)
def test_paper_sizes(name, lo, hi):
    args = config_model_args(name)
    with torch.device("meta"):
        n = W.Model(W.Config(**args)).get_num_params()
    assert lo <= n <= hi, f"{name}: {n} parameters"
    assert args["use_mel"] == (name == "whisper_gpt_hybrid.py")

def test_hybrid_has_the_paper_shape():
    args = config_model_args("whisper_gpt_hybrid.py")
    assert args["mel_dim"] == 32 and args.get("n_mels", 64) == 64
    s = config_model_args("whisper_gpt_s.py")
    # the hybrid is the small GPT plus the spectrogram path, not a bigger main decoder
    assert (args["n_layer"], args["n_embd"]) == (s["n_layer"], s["n_embd"])

@pytest.mark.parametrize("use_mel", [False, True])
def test_overfits_a_fixed_batch(use_mel):
    model = tiny(use_mel=use_mel).train()
    codes, mels = inputs(model, B=4)
    targets = torch.roll(codes, -1, dims=1)
    targets[:, -1] = -1  # ignored
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        _, loss = model(codes, mels, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # ~ln(50) at init
    assert loss.item() < 0.1, loss.item()

def reference_generate(model, codes, mels, n, mel_of):
    """Greedy continuation recomputing the whole window at every step (no cache), with the window
    rule of generate(): when full, restart on the last block_size // 2 frames."""
    bs = model.config.block_size
    seq, start = codes, max(0, codes.size(1) - bs)
    for _ in range(n):
        full_mels = torch.cat([mels] + [mel_of(seq[:, j])[:, None]
                                        for j in range(mels.size(1), seq.size(1))], 1)
        logits, _ = model(seq[:, start:], full_mels[:, start:])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        if seq.size(1) - 1 - start >= bs:
            start = seq.size(1) - bs // 2
    return seq

@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("use_mel,lag", [(False, 1), (True, 1), (True, 0), (True, 3)])
def test_kv_cache_generation_equals_full_recompute(use_mel, lag, cuda_graph):
    """cuda_graph: the steps of graphed_step (on a CPU run as they are, uncaptured): the position a
    tensor, the whole window's buffers read with a key length; the window restart refills the
    buffers the step holds."""
    model = tiny(use_mel=use_mel, mel_lag=lag)
    torch.manual_seed(1)
    table = torch.randn(model.config.vocab_size, model.config.n_mels)  # a made-up "mel of a code"
    mel_of = lambda c: table[c]
    calls = []

    def mel_fn(seq, j):  # called once per frame, when frames up to j + lag exist
        calls.append(j)
        assert seq.size(1) >= j + lag + 1
        return mel_of(seq[:, j])

    codes, mels = inputs(model, B=1, T=10)
    mels = mel_of(codes)
    n = 40  # crosses block_size (24): the window restarts once
    out = model.generate(codes, mels if use_mel else None, n, temperature=0,
                         mel_fn=mel_fn if use_mel else None, cuda_graph=cuda_graph)
    ref = reference_generate(model, codes, mels, n, mel_of)
    assert out.shape == (1, 10 + n)
    assert torch.equal(out, ref)
    if use_mel:
        assert calls == list(range(10, 10 + n - 1 - lag))

def test_cuda_graph_steps_sample_a_batch_as_the_kv_cache_does():
    """A batch of 3, sampled with top-k across a window restart: the steps of cuda_graph (uncaptured
    on a CPU) draw the same tokens as the KV cache from the same generator state."""
    model = tiny(use_mel=False)
    codes, _ = inputs(model, B=3, T=7)
    runs = [model.generate(codes, None, 45, temperature=1.0, top_k=10,
                           generator=torch.Generator().manual_seed(5), cuda_graph=graph)
            for graph in (False, True)]
    assert torch.equal(runs[0], runs[1]) and len(set(runs[0][:, 7:].flatten().tolist())) > 10

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("use_mel", [False, True])
def test_cuda_graph_generation_on_a_gpu(use_mel):
    """Captured and replayed: in float32 the tokens of the full recompute (as on the CPU above); in
    bfloat16 (our Triton kernels at head dim 16), each replayed step's logits, at a new position
    every time, those of a full pass over the window so far."""
    model = tiny(use_mel=use_mel, mel_lag=1).cuda()
    table = torch.randn(model.config.vocab_size, model.config.n_mels, device="cuda")
    mel_of = lambda c: table[c]
    codes = torch.randint(0, model.config.vocab_size, (1, 10), device="cuda")
    mels = mel_of(codes) if use_mel else None
    mel_fn = (lambda seq, j: mel_of(seq[:, j])) if use_mel else None
    n = 40  # crosses block_size (24)
    out = model.generate(codes, mels, n, temperature=0, mel_fn=mel_fn, cuda_graph=True)
    ref = reference_generate(model, codes, mel_of(codes), n, mel_of)
    assert torch.equal(out, ref)
    seq, mel_seq = out[:, :16], mel_of(out[:, :16]) if use_mel else None
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        caches = model.new_caches()
        model.logits(seq[:, :10], None if mel_seq is None else mel_seq[:, :10], caches)
        step = None
        for t in range(10, 16):
            new_mel = None if mel_seq is None else mel_seq[:, t:t + 1]
            step = step or model.graphed_step(caches, seq[:, t:t + 1], new_mel, t)
            got = step(seq[:, t:t + 1], new_mel, t).float()
            want = model.logits(seq[:, :t + 1],
                                None if mel_seq is None else mel_seq[:, :t + 1])[:, -1].float()
            assert torch.allclose(got, want, atol=0.02, rtol=0), (t, (got - want).abs().max())

def test_generate_refuses_a_hybrid_batch_bad_prompts_and_negative_settings():
    model = tiny(use_mel=True, mel_lag=1)
    codes, mels = inputs(model, B=2, T=10)
    mel_fn = lambda seq, j: torch.zeros(1, 8)
    with pytest.raises(ValueError, match="one sequence at a time.*a batch of 2"):
        model.generate(codes, mels, 3, mel_fn=mel_fn)
    for T in (8, 11):
        with pytest.raises(ValueError, match=f"{T} prompt mel frames for 10 codes; expected 9 "
                                             f"to 10"):
            model.generate(codes[:1], torch.zeros(1, T, 8), 3, mel_fn=mel_fn)
    # and for either model: an empty prompt, a negative temperature (which would draw the least
    # likely tokens) or top_k, each named
    base = tiny(use_mel=False)
    for kw, said in (({"codes": codes[:1, :0]}, r"codes \(1, 0\): expected a prompt"),
                     ({"temperature": -1.0}, "temperature=-1.0, top_k=None: each must be at"),
                     ({"top_k": -1}, "temperature=1.0, top_k=-1: each must be at least 0")):
        with pytest.raises(ValueError, match=said):
            base.generate(**{"codes": codes[:1], "max_new_tokens": 2, **kw})

def test_hybrid_generate_asks_at_least_one_prompt_mel_frame():
    """A prompt of at most mel_lag codes still needs one mel frame (generate's first step sees a
    zero frame, but the frame shapes come from the prompt's): 0 frames for 1 code is refused with
    the expected range, not left to fail deep inside generate; 1 frame for 1 code is taken."""
    model = tiny(use_mel=True, mel_lag=1)
    codes, _ = inputs(model, B=1, T=1)
    mel_fn = lambda seq, j: torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"0 prompt mel frames for 1 codes; expected 1 to 1 "
                                         r"\(mel_lag=1\)"):
        model.generate(codes, torch.zeros(1, 0, 8), 3, mel_fn=mel_fn)
    assert model.generate(codes, torch.zeros(1, 1, 8), 3, mel_fn=mel_fn).shape == (1, 4)

def test_sampling_options_and_top_k():
    model = tiny(use_mel=False)
    codes, _ = inputs(model, B=1, T=5)
    g = torch.Generator().manual_seed(0)
    out = model.generate(codes, None, 30, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(out, model.generate(codes, None, 30, temperature=0))  # top_k=1 is greedy
    # a temperature so small that logits / temperature overflows (it raised in multinomial): the
    # draws are greedy's, as the limit T -> 0 is
    tiny_t = model.generate(codes, None, 30, temperature=1e-40, generator=g)
    assert torch.equal(tiny_t, out)
    a = model.generate(codes, None, 30, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(codes, None, 30, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a[0, 5:].tolist())) > 5

@pytest.mark.parametrize("temperature,top_k", [(0.5, None), (2.0, None), (0.5, 7), (2.0, 7)])
def test_sampling_draws_from_softmax_of_logits_over_temperature(multinomial_draws, temperature,
                                                                top_k):
    """The distribution each sampled token is drawn from (what generate hands torch.multinomial) is
    softmax(logits / T) of the model's next-token logits, computed here from one full forward pass
    over the sequence so far; with top_k, that distribution restricted to its k most likely tokens
    and renormalised. Catches a temperature that multiplies the logits instead of dividing."""
    model = tiny(use_mel=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits spread over several units: T matters clearly
    codes, _ = inputs(model, B=1, T=5)
    drawn = multinomial_draws  # (probabilities given, the index drawn)
    out = model.generate(codes, None, 6, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 6
    for i, (probs, idx) in enumerate(drawn):
        with torch.no_grad():
            logits, _ = model(out[:, :5 + i])
        p = F.softmax(logits[0, -1].double() / temperature, dim=-1)
        if top_k:
            top = p.sort(descending=True)
            p = top.values[:top_k] / top.values[:top_k].sum()
            assert out[0, 5 + i] == top.indices[idx[0, 0]]  # the drawn index is the k-th best id
        else:
            assert out[0, 5 + i] == idx[0, 0]
        assert probs.shape == (1, top_k or model.config.vocab_size)
        torch.testing.assert_close(probs[0].double(), p, rtol=1e-4, atol=1e-6)
    # the check has teeth: the temperature changes the distribution a lot here
    assert (F.softmax(logits[0, -1] / temperature, -1)
            - F.softmax(logits[0, -1] * temperature, -1)).abs().max() > 0.05

def test_top_k_above_the_vocabulary_draws_from_every_token(multinomial_draws):
    """top_k larger than the vocabulary (sample's default top_k=50 on a small codebook) means no
    restriction: each draw is from softmax of the full-recompute logits over all vocab_size
    tokens (sorted, as top-k hands them), and the drawn index maps back to its token id."""
    model = tiny(use_mel=False)
    codes, _ = inputs(model, B=1, T=5)
    V = model.config.vocab_size
    out = model.generate(codes, None, 3, temperature=1.0, top_k=V + 30,
                         generator=torch.Generator().manual_seed(0))
    assert len(multinomial_draws) == 3
    for i, (probs, idx) in enumerate(multinomial_draws):
        with torch.no_grad():
            logits, _ = model(out[:, :5 + i])
        top = F.softmax(logits[0, -1].double(), -1).sort(descending=True)
        assert probs.shape == (1, V)
        torch.testing.assert_close(probs[0].double(), top.values, rtol=1e-4, atol=1e-6)
        assert out[0, 5 + i] == top.indices[idx[0, 0]]

class FakeTools:
    """decode: codes (T, k) -> T * 320 samples whose level encodes the code; mel: frame = mean
    level."""

    def __init__(self):
        self.decoded = []

    def decode(self, codes):
        self.decoded.append(tuple(codes.shape))
        return codes[:, 0].float().repeat_interleave(320) / 100

    def mel(self, wav):
        return wav.view(-1, 320).mean(1, keepdim=True).repeat(1, 8).numpy()

    def decoder_stream(self):
        return self.decode   # frame-local: decoding a frame at a time is decoding the whole

@pytest.mark.parametrize("use_mel", [False, True])
def test_sample_interface(use_mel):
    model = tiny(use_mel=use_mel, block_size=32)
    codes = torch.randint(0, 50, (40, 8))
    audio = {"codes": codes, "mel": torch.randn(40, 8)}
    tools = FakeTools()
    out = W.sample(model, None, audio, None, tools, max_new_tokens=20, temperature=0.8, top_k=10,
                   seed=0)
    assert out["codes"].shape == (20, 1) and out["codes"].dtype == torch.long
    again = W.sample(model, None, audio, None, FakeTools(), max_new_tokens=20, temperature=0.8,
                     top_k=10, seed=0)
    assert torch.equal(out["codes"], again["codes"])
    if use_mel:
        # the codec decodes each frame once: the prompt (31 frames of a block of 32) and the first
        # generated frame in the first call (the prompt's last mel_lag mel frames are made from
        # the codes: their windows reach into the first generated frame), then one new frame per
        # call
        assert model.config.mel_lag == 1
        assert len(tools.decoded) == 20 - 1
        assert tools.decoded[0] == (31 + 1, 1) and all(shape == (1, 1)
                                                       for shape in tools.decoded[1:])
    else:
        assert tools.decoded == []
    with pytest.raises(ValueError, match="unknown option"):
        W.sample(model, None, audio, None, tools, beam=4)
    with pytest.raises(ValueError, match="no text prompt"):
        W.sample(model, None, audio, "hello", tools)
    for bad, said in (({"top_k": -5}, "top_k=-5: must be at least 0"),
                      ({"temperature": -1.0}, "temperature=-1.0: must be at least 0"),
                      ({"max_new_tokens": 0}, "max_new_tokens=0: must be at least 1")):
        with pytest.raises(ValueError, match=said):  # top_k=-5 crashed in topk; -1 inverted
            W.sample(model, None, audio, None, tools, **bad)
    if use_mel:  # the codec's stream decoder starts on the prompt, 7 frames at least
        with pytest.raises(ValueError, match="a prompt of 6 frame.* at least 7"):
            W.sample(model, None, audio, None, FakeTools(), prompt_frames=6)
        W.sample(model, None, audio, None, FakeTools(), prompt_frames=7, max_new_tokens=2)

def test_sample_runs_in_eval_mode_and_restores_the_mode():
    """A model with dropout handed over in training mode samples as in eval mode (same seed, same
    codes) and is in training mode again after; one handed over in eval mode stays in it."""
    model = tiny(use_mel=True, block_size=32, dropout=0.5)
    audio = {"codes": torch.randint(0, 50, (40, 8)), "mel": torch.randn(40, 8)}
    want = W.sample(model, None, audio, None, FakeTools(), max_new_tokens=20, seed=0)
    assert not any(m.training for m in model.modules())
    model.train()
    got = W.sample(model, None, audio, None, FakeTools(), max_new_tokens=20, seed=0)
    assert model.training and torch.equal(got["codes"], want["codes"])

def test_incremental_mel_matches_full_decode():
    """sample()'s mel of the newest frame equals the mel of the whole decoded sequence (a
    frame-local fake codec here; the real codec's streaming decode is checked on the prepared corpus
    below)."""
    model = tiny(use_mel=True, mel_lag=1)
    tools = FakeTools()
    seen = []
    orig = model.generate

    def spy(codes, mels, mel_fn, **kwargs):
        def wrapped(seq, j):
            m = mel_fn(seq, j)
            full = tools.mel(tools.decode(seq[0, :, None]))
            seen.append(torch.allclose(m[0], torch.as_tensor(full[j]), atol=1e-6))
            return m
        return orig(codes, mels, mel_fn=wrapped, **kwargs)

    model.generate = spy
    W.sample(model, None, {"codes": torch.randint(0, 50, (10, 8)), "mel": torch.randn(10, 8)}, None,
             tools, max_new_tokens=12, seed=0)
    assert len(seen) == 11 and all(seen)  # the prompt's last frame, then 10 of the new ones

@pytest.mark.parametrize("use_mel,mel_source", [(False, "audio"), (True, "audio"),
                                                 (True, "codebook0")])
def test_sample_prompts_with_the_clips_last_frames_and_continues_as_generate(use_mel, mel_source):
    """The prompt is the clip's last prompt_frames frames of codebook 0 (block_size - 1 by
    default), with the mels the model trained on (the clip's, or those of its codebook 0 decoded
    alone) but for the last mel_lag, whose windows reach past the prompt; the continuation is what
    model.generate gives on that prompt, the hybrid's later mel frames being those of the decoded
    sequence (computed here by decoding it all again, not incrementally)."""
    model = tiny(use_mel=use_mel, block_size=32, mel_lag=1, mel_source=mel_source)
    if use_mel:  # make the mel path count, so that the wrong prompt mels change the argmaxes
        with torch.no_grad():
            model.mel_out.weight.mul_(50)
    g = torch.Generator().manual_seed(7)
    audio = {"codes": torch.randint(0, 50, (40, 8), generator=g),
             "mel": torch.randn(40, 8, generator=g)}
    tools = FakeTools()

    def mel_fn(seq, j):
        return torch.as_tensor(tools.mel(tools.decode(seq[0, :, None])))[j][None]

    clip_mel = audio["mel"]
    if mel_source == "codebook0":
        clip_mel = torch.as_tensor(tools.mel(tools.decode(audio["codes"][:, :1])))
    for prompt_frames, n in ((12, 12), (0, 31)):
        prompt = audio["codes"][-n:, 0][None]
        mels = clip_mel[-n:][:n - 1][None] if use_mel else None
        if mel_source == "audio" and use_mel:  # the clip's own last frame would differ
            leaky = model.generate(prompt, clip_mel[-n:][None], 20, 0, None, mel_fn)
            assert not torch.equal(leaky, model.generate(prompt, mels, 20, 0, None, mel_fn))
        for temperature, top_k in ((0, 0), (0.8, 10)):
            out = W.sample(model, None, audio, None, FakeTools(), max_new_tokens=20,
                           temperature=temperature, top_k=top_k, prompt_frames=prompt_frames,
                           seed=3)
            assert torch.equal(out["prompt_codes"][:, 0], audio["codes"][40 - n:, 0])
            ref = model.generate(prompt, mels, 20, temperature, top_k or None,
                                 mel_fn if use_mel else None, torch.Generator().manual_seed(3))
            assert torch.equal(ref[0, :n], prompt[0])
            assert torch.equal(out["codes"][:, 0], ref[0, n:]), (prompt_frames, temperature)

@pytest.mark.parametrize("use_mel,lag", [(False, 1), (True, 1), (True, 2)])
def test_generate_draws_from_the_full_recompute_of_its_window(multinomial_draws, use_mel, lag):
    """Every distribution generate samples from (what it hands torch.multinomial) equals softmax of
    the last logits of a full forward pass over its window, recomputed here without a cache: the
    window is the last block_size frames of a prompt longer than the context, restarted on the last
    block_size // 2 frames when full; the hybrid's step t sees mel frame t - lag, zeros before the
    window's first frame. The mel path is amplified so that a zeroed or shifted frame moves the
    distribution (greedy argmaxes barely depend on it at init); comparing distributions, not
    argmaxes, catches a window one frame off or a window-start frame dropped."""
    model = tiny(use_mel=use_mel, mel_lag=lag)
    bs = model.config.block_size
    if use_mel:
        with torch.no_grad():
            model.mel_out.weight.mul_(50)
    torch.manual_seed(1)
    table = torch.randn(model.config.vocab_size, model.config.n_mels)  # a made-up "mel of a code"
    codes, _ = inputs(model, B=1, T=bs + 6)  # longer than the context
    mel_fn = lambda seq, j: table[seq[:, j]]
    n = 20  # the window restarts at the first new token, then once more
    out = model.generate(codes, table[codes] if use_mel else None, n, temperature=1.0,
                         mel_fn=mel_fn if use_mel else None,
                         generator=torch.Generator().manual_seed(0))
    assert len(multinomial_draws) == n
    T0, start = codes.size(1), codes.size(1) - bs
    mels = table[out]  # (1, T0 + n, n_mels): every frame's mel, prompt and generated
    restarts = 0
    for i, (probs, idx) in enumerate(multinomial_draws):
        L = T0 + i  # the distribution of token L, from the frames before it
        if L - 1 - start >= bs:
            start, restarts = L - bs // 2, restarts + 1
        with torch.no_grad():
            logits, _ = model(out[:, start:L], mels[:, start:L] if use_mel else None)
        torch.testing.assert_close(probs[0].double(), F.softmax(logits[0, -1].double(), -1),
                                   rtol=1e-4, atol=1e-6)
        assert out[0, L] == idx[0, 0]
    assert restarts == 2

def test_config_bounds_of_mel_lag_and_mel_dim():
    """The hybrid refuses mel_lag >= block_size (every step would see only zeros) and mel_dim >=
    n_embd (no room left for the token embedding), and takes the largest valid values
    (block_size - 1, n_embd - 1): a bound one off either way is caught."""
    with pytest.raises(ValueError,
                       match=r"mel_lag \(24\) must be between 0 and block_size - 1 \(23\)"):
        tiny(mel_lag=24)
    with pytest.raises(ValueError, match=r"mel_dim \(32\) must be between 1 and n_embd - 1 \(31\)"):
        tiny(mel_dim=32)
    for kw in ({"mel_lag": 23}, {"mel_dim": 31}, {"mel_dim": 1}, {"mel_lag": 0}):
        model = tiny(**kw)
        codes, mels = inputs(model)
        assert model(codes, mels)[0].shape == (2, 24, 50)
    tiny(use_mel=False, mel_lag=24, mel_dim=32)  # the token-only model has no mel path to check

def test_dropout_of_one_or_below_zero_is_refused():
    """dropout is a probability below 1: at 1 every activation is zeroed and the model learns
    nothing, below 0 it is no probability. 0 and just under 1 build."""
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"dropout \({bad}\) must be at least 0 and under 1"):
            tiny(dropout=bad)
    for ok in (0.0, 0.99):
        tiny(dropout=ok)

@pytest.mark.parametrize("use_mel", [False, True])
def test_every_parameter_gets_a_gradient(use_mel):
    """One backward pass of the loss reaches every parameter with a non-zero gradient: a term
    dropped from the forward pass (a position embedding not added, a LayerNorm bypassed, ...)
    leaves its parameter without one."""
    model = tiny(use_mel=use_mel).train()
    codes, mels = inputs(model)
    _, loss = model(codes, mels, torch.roll(codes, -1, dims=1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

class MixingTools(FakeTools):
    """FakeTools whose decode mixes all the codebooks it is given (level = their mean / 100), so
    the audio of codebook 0 decoded alone differs from that of all eight."""

    def decode(self, codes):
        self.decoded.append(tuple(codes.shape))
        return codes.float().mean(1).repeat_interleave(320) / 100

def prompt_mels_given(model, audio, tools, **opts):
    """The prompt mels whisper_gpt.sample hands the model's generate, as a list of one."""
    seen, orig = [], model.generate

    def spy(codes, mels, **kwargs):
        seen.append(mels)
        return orig(codes, mels, **kwargs)

    model.generate = spy
    W.sample(model, None, audio, None, tools, seed=0, **opts)
    return seen

@pytest.mark.parametrize("mel_source", ["audio", "codebook0"])
def test_sample_hands_generate_the_prompt_mels_of_its_mel_source(mel_source):
    """The prompt mels sample gives generate, checked against the formula: with mel_source "audio"
    the clip's own mel frames -n .. -mel_lag - 1; with "codebook0" the mel of codebook 0 decoded
    alone, whose frame i is (with MixingTools) code0[i] / 100 in every band; never the mel of all
    eight codebooks decoded."""
    model = tiny(use_mel=True, block_size=32, mel_lag=1, mel_source=mel_source)
    g = torch.Generator().manual_seed(7)
    audio = {"codes": torch.randint(0, 50, (40, 8), generator=g),
             "mel": torch.randn(40, 8, generator=g)}
    n = 12
    seen = prompt_mels_given(model, audio, MixingTools(), max_new_tokens=3, prompt_frames=n)
    if mel_source == "audio":
        want = audio["mel"][40 - n:40 - 1]
    else:
        want = (audio["codes"][40 - n:40 - 1, 0].float() / 100)[:, None].repeat(1, 8)
    assert seen[0].shape == (1, n - 1, 8)
    torch.testing.assert_close(seen[0][0], want, rtol=0, atol=1e-6)

def test_sample_takes_the_codebook0_mels_of_the_whole_clip_decoded():
    """mel_source="codebook0": the prompt's mels are cut from the mel of the whole clip's codebook
    0 decoded, as prepare.codebook0_mels stores them for training. A codec's decoder carries state
    from the frames before the prompt (here a running sum), so the prompt's codes decoded alone
    would give other mels."""
    class RunningSumTools(FakeTools):
        def decode(self, codes):
            self.decoded.append(tuple(codes.shape))
            return (codes[:, 0].float().cumsum(0) / 1000).repeat_interleave(320)

    model = tiny(use_mel=True, block_size=32, mel_lag=1, mel_source="codebook0")
    g = torch.Generator().manual_seed(3)
    audio = {"codes": torch.randint(0, 50, (40, 8), generator=g),
             "mel": torch.randn(40, 8, generator=g)}
    seen = prompt_mels_given(model, audio, RunningSumTools(), max_new_tokens=2, prompt_frames=12)
    running = audio["codes"][:, 0].float().cumsum(0) / 1000  # frame i's level: codes 0..i
    torch.testing.assert_close(seen[0][0], running[28:39, None].repeat(1, 8), rtol=0, atol=1e-6)

def test_sample_refuses_a_prompt_not_longer_than_mel_lag_and_a_cuda_graph_not_a_bool():
    """The hybrid's prompt needs more than mel_lag frames (the last mel_lag frames' mels are made
    from the codes, so at least one is given): with mel_lag=8, 8 frames are refused and 9 taken.
    cuda_graph is True or False: the text "False" (truthy) is refused, not run as a graph."""
    model = tiny(use_mel=True, block_size=32, mel_lag=8)
    audio = {"codes": torch.randint(0, 50, (40, 8)), "mel": torch.randn(40, 8)}
    with pytest.raises(ValueError, match=r"a prompt of 8 frame\(s\); the hybrid needs at least 9"):
        W.sample(model, None, audio, None, FakeTools(), prompt_frames=8, max_new_tokens=2)
    out = W.sample(model, None, audio, None, FakeTools(), prompt_frames=9, max_new_tokens=2)
    assert out["prompt_codes"].shape == (9, 1)
    with pytest.raises(ValueError, match=r"cuda_graph='False': must be True or False"):
        W.sample(model, None, audio, None, FakeTools(), cuda_graph="False")

# -----------------------------------------------------------------------------
# on the prepared corpus (tests/conftest.py builds it once per session)

def test_batches_and_metrics_on_prepared_data(synth_dir):
    cfg = W.Config(block_size=32, n_layer=1, n_head=2, n_embd=32, mel_n_layer=1, mel_n_head=2,
                   mel_n_embd=16, mel_dim=8)
    data = W.load_data(synth_dir, cfg, None)
    meta = data["meta"]
    assert cfg.vocab_size == meta["codebook_size"] and cfg.n_mels == meta["n_mels"]
    assert W.leak_free_lag(meta) <= cfg.mel_lag
    codes = np.fromfile(os.path.join(synth_dir, "train_codes.bin"),
                        dtype=np.uint16).reshape(-1, meta["n_q"])
    mel = np.fromfile(os.path.join(synth_dir, "train_mel.bin"),
                      dtype=np.float16).reshape(-1, meta["n_mels"])
    rng = np.random.default_rng(0)
    b = W.get_batch(data, "train", 4, rng)
    assert (b["codes"].shape == (4, 32) and b["targets"].shape == (4, 32)
            and b["mels"].shape == (4, 32, meta["n_mels"]))
    assert torch.equal(b["codes"][:, 1:], b["targets"][:, :-1])
    for row in range(4):  # each row is a window of the codebook-0 stream with its own mel frames
        starts = [s for s in np.flatnonzero(codes[:len(codes) - 32, 0] == b["codes"][row, 0].item())
                  if np.array_equal(codes[s:s + 33, 0],
                                    np.r_[b["codes"][row].numpy(), b["targets"][row, -1].item()])]
        assert starts, "window not found in train_codes.bin"
        assert any(np.array_equal(mel[s:s + 32].astype(np.float32), b["mels"][row].numpy())
                   for s in starts)
    assert torch.equal(W.get_batch(data, "val", 3, np.random.default_rng(5))["codes"],
                       W.get_batch(data, "val", 3, np.random.default_rng(5))["codes"])
    base = W.Config(block_size=32, use_mel=False, n_layer=1, n_head=2, n_embd=32)
    assert "mels" not in W.get_batch(W.load_data(synth_dir, base, None), "train", 2, rng)
    model = W.Model(cfg).eval()
    m = W.evaluate(model, data, None, "val", max_windows=8)
    assert m["tokens"] == 8 * 32
    assert math.isclose(m["ppl"], math.exp(m["nll"]), rel_tol=1e-9)
    assert 0 <= m["accuracy"] <= 1
    assert abs(m["nll"] - math.log(cfg.vocab_size)) < 0.5  # an untrained model is near uniform
    # a bad option is named alone
    with pytest.raises(ValueError,
                       match=r"^whisper_gpt.evaluate: batch_size=0: must be at least 1$"):
        W.evaluate(model, data, None, "val", batch_size=0)
    with pytest.raises(ValueError, match=r"^whisper_gpt.evaluate: max_windows=-1: must be at least "
                                         r"0 \(0 = all\)$"):
        W.evaluate(model, data, None, "val", max_windows=-1)

def hand_metrics(model, codes, mel, T, n_windows):
    """Summed next-token cross-entropy and argmax hits over windows k = 0 .. n_windows - 1 of
    frames k*T .. k*T + T (T inputs, the T next tokens as targets), one window at a time; the
    hybrid's step t fed mel frame k*T + t - mel_lag (zeros before the window) through logits."""
    lag = model.config.mel_lag
    nll, hits = 0.0, 0
    for k in range(n_windows):
        x = torch.from_numpy(codes[k * T:k * T + T + 1, 0].astype(np.int64))
        inp, tgt = x[:-1][None], x[1:]
        mel_in = None
        if model.config.use_mel:
            mel_in = torch.zeros(1, T, mel.shape[1])
            for t in range(lag, T):
                mel_in[0, t] = torch.from_numpy(mel[k * T + t - lag].astype(np.float32))
        logits = model.logits(inp, mel_in)[0].float()
        nll += F.cross_entropy(logits, tgt, reduction="sum").item()
        hits += (logits.argmax(-1) == tgt).sum().item()
    return nll, hits

@pytest.mark.parametrize("use_mel,lag", [(False, 1), (True, 1), (True, 2)])
def test_evaluate_equals_the_cross_entropy_computed_by_hand(synth_dir, use_mel, lag):
    """Table 1's metrics: evaluate's NLL and accuracy are the mean cross-entropy and argmax hit
    rate of the next token over consecutive windows of block_size + 1 frames of the val split, read
    here straight from val_{codes,mel}.bin. The model is trained a few steps first, so that it hits
    often enough for the accuracy to tell right targets from wrong ones; it has dropout and is
    handed over in training mode: evaluate switches dropout off itself and restores the mode."""
    T = 32
    cfg = W.Config(block_size=T, n_layer=1, n_head=2, n_embd=32, mel_n_layer=1, mel_n_head=2,
                   mel_n_embd=16, mel_dim=8, use_mel=use_mel, mel_lag=lag, dropout=0.3)
    data = W.load_data(synth_dir, cfg, None)
    meta = data["meta"]
    torch.manual_seed(0)
    model = W.Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(30):
        _, loss = model(**W.get_batch(data, "train", 8, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes = np.memmap(os.path.join(synth_dir, "val_codes.bin"), dtype=np.uint16,
                      mode="r").reshape(-1, meta["n_q"])
    mel = np.memmap(os.path.join(synth_dir, "val_mel.bin"), dtype=np.float16,
                    mode="r").reshape(-1, meta["n_mels"])
    n_all = (len(codes) - 1) // T   # every window whose last target is in the split
    with torch.no_grad():
        for opts, n in (({}, n_all), ({"max_windows": 5, "batch_size": 2}, 5)):
            model.eval()
            nll, hits = hand_metrics(model, codes, mel, T, n)
            model.train()
            m = W.evaluate(model, data, None, "val", **opts)
            assert model.training
            assert m["tokens"] == n * T
            assert math.isclose(m["nll"], nll / (n * T), rel_tol=1e-5), (m["nll"], nll / (n * T))
            assert m["accuracy"] == hits / (n * T)
            assert hits >= 5   # trained: the hit count is not trivially 0
            assert math.isclose(m["ppl"], math.exp(nll / (n * T)), rel_tol=1e-5)

def test_leak_free_lag_is_the_smallest_lag_without_look_ahead(synth_dir):
    """leak_free_lag(meta) of the prepared corpus, derived from audio.log_mel itself: changing the
    audio from the end of block t on (samples 320 (t+1) ..) leaves mel frames .. t - lag unchanged
    and changes frame t - lag + 1, so lag is the smallest lag at which step t sees no audio of the
    token it predicts. Then the formula on made-up framings (ceil(look-ahead / hop))."""
    import audio
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    lag = W.leak_free_lag(meta)
    hop = meta["hop_length"]
    assert hop == audio.HOP == 320 and meta["sample_rate"] == 24000
    rng = np.random.default_rng(0)
    wav = rng.uniform(-0.5, 0.5, 12 * hop).astype(np.float32)
    base = audio.log_mel(wav)
    assert base.shape[0] == 12
    for t in range(11):
        w2 = wav.copy()
        w2[hop * (t + 1):] = rng.uniform(-0.5, 0.5, len(w2) - hop * (t + 1))
        changed = np.flatnonzero(np.abs(audio.log_mel(w2) - base).max(1) > 0)
        # frames before the first changed one are untouched: the smallest safe lag is t - (first
        # changed frame - 1)
        assert changed.size and np.array_equal(changed, np.arange(changed[0], 12))
        assert t + 1 - changed[0] == lag, (t, changed[0])
    assert lag == 1    # a frame's 640-sample window reaches 160 samples (half a block) ahead
    # the formula on other framings: ceil(look-ahead / hop), from meta.json's mel.lookahead_samples
    # or else n_fft / 2 - hop / 2
    for ahead, want in ((0, 0), (1, 1), (320, 1), (321, 2), (700, 3)):
        assert W.leak_free_lag({**meta, "mel": {"lookahead_samples": ahead}}) == want, ahead
    assert W.leak_free_lag({"hop_length": 320, "n_fft": 1280}) == 2      # 640 - 160 = 480 ahead
    assert W.leak_free_lag({"hop_length": 320, "n_fft": 320}) == 0       # 160 - 160 = 0 ahead

@pytest.mark.parametrize("codec_kind", ["dct", "data", "dense"])
def test_streaming_decode_and_incremental_mel_equal_the_full_decode(synth_dir, codec_kind):
    """The codec decoding a frame or a few at a time (its layers' state kept) gives the audio of
    decoding the clip at once, for codebook 0 alone and for all eight; and the hybrid's mel of each
    generated frame equals the mel of the whole decoded clip. Codecs: "dct", the default offline
    codec (codec.dct_init, no gradient steps), whose LSTM and residual branches the stream skips
    (exact no-ops), whose shortcuts are the identity and whose upsampling it runs as sparse
    products; "data", the test corpus's (12 gradient steps on its learned parts: nothing to skip);
    "dense", that one with noise on every decoder weight, so that every part runs dense."""
    import audio
    import codec as C
    import sample as S
    tools = S.Tools(synth_dir)
    codec = tools.codec()
    if codec_kind != "data":
        codec = audio.load_codec(synth_dir)  # a copy of its own
        if codec_kind == "dct":
            C.dct_init(codec)
        else:
            torch.manual_seed(0)
            with torch.no_grad():
                for p in codec.decoder.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        tools._codec = codec
    stream = audio.StreamingDecoder(codec)
    stream(torch.as_tensor(S.read_clip(synth_dir, "val", 0)[0]["codes"][:10, :1]))
    skipped = sum(stream.zero.values())
    identity = sum(stream.identity.values())
    sparse = sum(w is not None for w in stream.sparse.values())
    # dct: 1 LSTM and 4 residual branches skipped, 4 identity shortcuts passed through, 4
    # upsampling convs sparse; the test corpus's codec trained the branches and the LSTM
    if codec_kind == "data":  # (its trained branches may be mostly zero, and so sparse)
        assert skipped == 0 and identity == 4 and sparse >= 4
    else:
        assert (skipped, identity, sparse) == {"dct": (5, 4, 4), "dense": (0, 0, 0)}[codec_kind]
    inp, _ = S.read_clip(synth_dir, "val", 0)
    for k in (1, 8):
        codes = inp["codes"][:60, :k]
        full = tools.decode(codes)
        stream = audio.StreamingDecoder(codec)
        pieces, at = [stream(codes[:10])], 10
        while at < 60:                               # one frame, then two, then three, ...
            step = 1 + len(pieces) % 3
            pieces.append(stream(codes[at:at + step]))
            at += step
        parts = torch.cat(pieces)
        assert parts.shape == full.shape == (60 * 320,)
        assert (parts - full).abs().max() < 1e-5 * max(1.0, full.abs().max().item())
    codes = inp["codes"][:60, :1]
    full_wav = tools.decode(codes)
    full_mel = torch.as_tensor(tools.mel(full_wav))
    mel_fn = W.incremental_mel(tools, lag=1)
    for j in range(20, 58):   # as generate calls it: once per frame, when frames up to j + 1 exist
        m = mel_fn(codes[:j + 2, 0][None], j)
        assert (m[0] - full_mel[j]).abs().max() < 1e-4, j
    # under the bfloat16 autocast of sample.py --dtype=bfloat16 on a CPU, the codec and the mel
    # still run in float32
    mel_fn = W.incremental_mel(tools, lag=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (tools.decode(codes) - full_wav).abs().max() < 1e-6
        for j in range(20, 30):
            m = mel_fn(codes[:j + 2, 0][None], j)
            assert m.dtype == torch.float32 and (m[0] - full_mel[j]).abs().max() < 1e-4, j

def test_kind_subsets_hold_exactly_the_frames_of_those_clips(synth_dir):
    """kinds="speech" (Table 1's speech row; the test corpus has no music clip in val, so events
    stand in) gives the speech clips' frames, codes and mels together, in clip order; two kinds give
    their union; an unknown kind is a clear error that lists the kinds there are, when a split is
    read."""
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    for split in ("train", "val"):
        clips = [json.loads(line) for line in open(os.path.join(synth_dir, f"{split}_clips.jsonl"))]
        codes = np.fromfile(os.path.join(synth_dir, f"{split}_codes.bin"),
                            dtype=np.uint16).reshape(-1, meta["n_q"])
        mel = np.fromfile(os.path.join(synth_dir, f"{split}_mel.bin"),
                          dtype=np.float16).reshape(-1, meta["n_mels"])
        for kinds in ("speech", "events", "speech,events"):
            cfg = W.Config(block_size=16, use_mel=True, kinds=kinds)
            sub = W.load_data(synth_dir, cfg, None)[split]
            keep = [c for c in clips if c["kind"] in kinds.split(",")]
            assert keep, f"the test corpus has no {kinds} clip in {split}"
            assert len(sub["codes"]) == sum(c["frames"] for c in keep) == len(sub["mel"])
            at = 0
            for c in keep:
                assert np.array_equal(sub["codes"][at:at + c["frames"]],
                                      codes[c["offset"]:c["offset"] + c["frames"]])
                assert np.array_equal(sub["mel"][at:at + c["frames"]],
                                      mel[c["offset"]:c["offset"] + c["frames"]])
                at += c["frames"]
    speech = W.load_data(synth_dir, W.Config(block_size=16, kinds="speech"), None)["train"]["codes"]
    events = W.load_data(synth_dir, W.Config(block_size=16, kinds="events"), None)["train"]["codes"]
    both = W.load_data(synth_dir, W.Config(block_size=16, kinds="speech,events"),
                       None)["train"]["codes"]
    assert len(both) == len(speech) + len(events)
    odd = W.load_data(synth_dir, W.Config(block_size=16, kinds="speech,podcast"), None)
    for split in ("train", "val"):  # refused when read, as a split too short is
        with pytest.raises(ValueError, match="no clip of kind podcast.*its kinds: .*speech"):
            W.get_batch(odd, split, 1, np.random.default_rng(0))
        with pytest.raises(ValueError, match="no clip of kind podcast"):
            W.evaluate(W.Model(W.Config(block_size=16, n_layer=1, n_head=2, n_embd=64)), odd,
                       None, split)

def test_the_token_only_model_reads_no_mels(synth_dir, tmp_path):
    """use_mel=False: load_data reads no mel file (a corpus without them loads, for any mel_source)
    and the batches are the codes alone; the hybrid refuses that corpus, naming the missing
    file."""
    codes_only = tmp_path / "codes_only"
    codes_only.mkdir()
    for f in os.listdir(synth_dir):
        if "_mel" not in f:
            os.symlink(os.path.join(synth_dir, f), codes_only / f)
    whole = W.load_data(synth_dir, W.Config(block_size=16, use_mel=False, kinds="speech"), None)
    for source in ("audio", "codebook0"):
        cfg = W.Config(block_size=16, use_mel=False, kinds="speech", mel_source=source)
        data = W.load_data(str(codes_only), cfg, None)
        assert data["train"]["mel"] is None
        np.testing.assert_array_equal(data["train"]["codes"], whole["train"]["codes"])
        batch = W.get_batch(data, "train", 2, np.random.default_rng(0))
        assert set(batch) == {"codes", "targets"}
    with pytest.raises(FileNotFoundError, match="train_mel.bin not found"):
        W.load_data(str(codes_only), W.Config(block_size=16), None)

def test_load_data_takes_the_vocabulary_and_mel_bands_of_its_corpus(tmp_path):
    """load_data sets vocab_size and n_mels from meta.json (the test corpus has the defaults, 1024
    codes and 64 bands, so it cannot tell): a corpus of 50 codes and 8 bands gives a model of those
    sizes that evaluates on it. Mels of another frame count than the codes are refused, naming
    both files."""
    n = 40
    meta = {"hop_length": 320, "n_fft": 640, "n_mels": 8, "n_q": 2, "codebook_size": 50,
            "codec": {"name": "test codec", "pretrained": True}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50, (n, 2)).astype(np.uint16).tofile(tmp_path / f"{split}_codes.bin")
        rng.normal(size=(n, 8)).astype(np.float16).tofile(tmp_path / f"{split}_mel.bin")
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, mel_n_layer=1, mel_n_head=2,
                   mel_n_embd=16, mel_dim=8)
    data = W.load_data(str(tmp_path), cfg)
    assert (cfg.vocab_size, cfg.n_mels, cfg.codec_id) == (50, 8, "test codec (pretrained)")
    m = W.evaluate(W.Model(cfg), data, None, "val")
    assert m["tokens"] == (n - 1) // 16 * 16 and abs(m["nll"] - math.log(50)) < 0.5
    rng.normal(size=(n - 1, 8)).astype(np.float16).tofile(tmp_path / "val_mel.bin")
    with pytest.raises(ValueError, match=rf"val_codes.bin has {n} frames but .*val_mel.bin has "
                                         rf"{n - 1}$"):
        W.load_data(str(tmp_path), W.Config(block_size=16))
    # one frame too many is as misaligned as one too few
    rng.normal(size=(n + 1, 8)).astype(np.float16).tofile(tmp_path / "val_mel.bin")
    with pytest.raises(ValueError, match=rf"val_codes.bin has {n} frames but .*val_mel.bin has "
                                         rf"{n + 1}$"):
        W.load_data(str(tmp_path), W.Config(block_size=16))
    # a split with no clips (empty files): read as 0 frames, refused when read, the other split
    # still usable
    for name in ("train_codes.bin", "train_mel.bin"):
        (tmp_path / name).write_bytes(b"")
    rng.normal(size=(n, 8)).astype(np.float16).tofile(tmp_path / "val_mel.bin")
    data = W.load_data(str(tmp_path), W.Config(block_size=16))
    assert W.split_frames(data, "val") == n
    with pytest.raises(ValueError, match=r"split train has 0 frames, fewer than block_size \+ 1"):
        W.split_frames(data, "train")

def save_checkpoint(path, model, data_dir, iter_num=0):
    """A checkpoint of model with the fields eval.py and whisper_gpt_table.py read."""
    torch.save({"model": model.state_dict(), "model_name": "whisper_gpt",
                "model_args": dataclasses.asdict(model.config), "iter_num": iter_num,
                "config": {"data_dir": data_dir}}, path)

def test_eval_on_a_named_subset(synth_dir, tmp_path):
    """eval.py --kinds evaluates a checkpoint on another subset than it was trained on: the token
    count is that subset's, and an unknown kind is a clear error."""
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, use_mel=False, kinds="speech")
    W.load_data(synth_dir, cfg, None)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, W.Model(cfg), synth_dir)
    js = tmp_path / "m.json"
    for kinds in ("", "events"):
        args = [sys.executable, "eval.py", str(ckpt),
                f"--json={js}"] + ([f"--kinds={kinds}"] if kinds else [])
        res = run_script(args, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        row = json.load(open(js))[0]
        assert row["kinds"] == (kinds or "speech")
        sub = W.load_data(synth_dir, W.Config(block_size=16, kinds=kinds or "speech"),
                          None)["val"]["codes"]
        assert row["tokens"] == (len(sub) - 1) // 16 * 16
    res = run_script([sys.executable, "eval.py", str(ckpt), "--kinds=podcast"], cwd=ROOT)
    assert res.returncode == 2 and "podcast" in res.stderr and str(ckpt) in res.stderr

def test_eval_table_mean_and_std_rows(monkeypatch, capsys, tmp_path):
    """eval.py --mean over two runs: the mean row and the standard deviation row are the sample
    mean and the sample standard deviation (n - 1 in the denominator, as over seeds) of each
    metric, computed here by hand; accuracy cells in percent."""
    import eval as E
    monkeypatch.setattr(E, "mean", True)
    rows = [{"run": f"r{i}", "model": "whisper_gpt", "params": 2_000_000, "iters": 5, "data": "d",
             "nll": nll, "accuracy": acc, "ppl": math.exp(nll), "tokens": 64}
            for i, (nll, acc) in enumerate(((1.0, 0.25), (3.0, 0.75)))]
    E.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | params | iters | nll | accuracy | ppl | tokens |"
    assert lines[2] == (f"| r0 | 2.00M | 5 | 1.0000 | 25.00% | {math.e:.4f} | 64 |")

    def sample_std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    ppl = [math.exp(1.0), math.exp(3.0)]
    assert lines[4] == (f"| mean (2 runs) | | | 2.0000 | 50.00% | {sum(ppl) / 2:.4f} | 64.0000 |")
    assert lines[5] == (f"| std (2 runs) | | | {sample_std([1.0, 3.0]):.4f} | "
                        f"{100 * sample_std([0.25, 0.75]):.2f}% | {sample_std(ppl):.4f} | 0.0000 |")
    assert len(lines) == 6
    # --json holds the same two rows after the runs'
    monkeypatch.setattr(E, "json", str(tmp_path / "e.json"))
    E.write_json(rows)
    written = json.load(open(tmp_path / "e.json"))
    assert [r["run"] for r in written] == ["r0", "r1", "mean (2 runs)", "std (2 runs)"]
    assert written[2]["nll"] == 2.0 and abs(written[3]["nll"] - sample_std([1.0, 3.0])) < 1e-12
    # a text column (whisper_gpt's "kinds") is shown per run and left out of the mean and std
    mean_row, std_row = E.mean_rows([{**r, "kinds": "all"} for r in rows])
    assert mean_row["nll"] == 2.0 and "kinds" not in mean_row and "kinds" not in std_row

def test_eval_mean_leaves_out_a_metric_one_run_has_and_big_negative_floats_keep_a_decimal(
        monkeypatch, tmp_path):
    """--mean: a metric that only one run has (None in the other) has no mean nor spread (a sample
    standard deviation needs two values); a float cell is 4 decimals below 100 in size, 1 from
    100 on, negative numbers too. --json replaces a list only if every item is a row."""
    import eval as E
    monkeypatch.setattr(E, "mean", True)
    rows = [{"run": "a", "model": "whisper_gpt", "params": 1, "iters": 1, "data": "d",
             "nll": 1.0, "bleu": 0.5},
            {"run": "b", "model": "whisper_gpt", "params": 1, "iters": 1, "data": "d",
             "nll": 2.0, "bleu": None}]
    mean_row, std_row = E.mean_rows(rows)
    assert mean_row == {"run": "mean (2 runs)", "nll": 1.5}
    assert std_row == {"run": "std (2 runs)", "nll": math.sqrt(0.5)}
    assert E.fmt_cell("nll", -1234.5678) == "-1234.6" and E.fmt_cell("nll", -99.5) == "-99.5000"
    assert E.fmt_cell("nll", 1234.5678) == "1234.6" and E.fmt_cell("nll", None) == "-"
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"run": "a", "nll": 1.0}, {"n_mels": 64}]')
    assert not E.is_results_file(str(mixed))
    mixed.write_text('[{"run": "a", "nll": 1.0}]')
    assert E.is_results_file(str(mixed))

def test_eval_mean_is_over_seeds_of_one_recipe(tmp_path, monkeypatch, capsys):
    """--mean takes runs that differ in their seed only: another setting is refused, named; runs
    started from different weights (each seed's own earlier stage) are seeds of one recipe, but
    not a run from scratch and a run from weights."""
    import eval as E
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, use_mel=False, vocab_size=64)
    paths = []
    for name, seed, lr, start in (("a", 1, 1e-3, "a0/ckpt.pt"), ("b", 2, 1e-3, "b0/ckpt.pt"),
                                  ("c", 3, 5e-3, "c0/ckpt.pt"), ("d", 4, 1e-3, "scratch")):
        path = tmp_path / name / "ckpt.pt"
        path.parent.mkdir()
        torch.save({"model": {}, "model_name": "whisper_gpt", "model_args": dataclasses.asdict(cfg),
                    "iter_num": 0, "config": {"model": "whisper_gpt", "seed": seed,
                                              "learning_rate": lr, "out_dir": name,
                                              "init_from": start}}, path)
        paths.append(str(path))
    monkeypatch.setattr(E, "mean", True)
    monkeypatch.setattr(E, "kinds", "")
    E.check_runs(paths[:2], {})
    for two, said in ((paths[::2], "differ in learning_rate"),
                      ([paths[0], paths[3]], "differ in init_from (one from scratch, one from "
                                             "weights)")):
        with pytest.raises(SystemExit):
            E.check_runs(two, {})
        err = capsys.readouterr().err
        assert f"{two[0]} and {two[1]} {said}" in err, err
    # one run has no mean: refused before any evaluation (it printed the plain table)
    for one in ([paths[0]], [paths[0], os.path.dirname(paths[0])]):  # the second: named twice
        with pytest.raises(SystemExit):
            E.main(["--mean"] + one)
        assert "--mean: 1 run; a mean and a spread need two or more" in capsys.readouterr().err
    # a run named twice (its file, then its folder) is evaluated and averaged once
    assert E.checkpoint_paths([paths[0], os.path.dirname(paths[0]), paths[1]]) == paths[:2]
    assert f"{os.path.join(os.path.dirname(paths[0]), 'ckpt.pt')} is {paths[0]} again" in \
        capsys.readouterr().err
    # and through a link to its folder: the same file
    link = tmp_path / "link"
    os.symlink(os.path.dirname(paths[0]), link)
    assert E.checkpoint_paths([paths[0], str(link)]) == paths[:1]

def test_eval_mean_refuses_runs_of_two_models(tmp_path, monkeypatch, capsys):
    """--mean over a Whisper-GPT run and a Pengi run (each of its own seed) is refused before any
    evaluation, naming both: a mean is over runs of one model and stage."""
    import eval as E
    import pengi
    paths = []
    for name, model, args in (("w", "whisper_gpt", dataclasses.asdict(W.Config())),
                              ("p", "pengi", dataclasses.asdict(pengi.Config()))):
        path = tmp_path / name / "ckpt.pt"
        path.parent.mkdir()
        torch.save({"model": {}, "model_name": model, "model_args": args, "iter_num": 0,
                    "config": {"model": model, "seed": len(paths)}}, path)
        paths.append(str(path))
    monkeypatch.setattr(E, "mean", True)
    monkeypatch.setattr(E, "kinds", "")
    with pytest.raises(SystemExit):
        E.check_runs(paths, {})
    err = capsys.readouterr().err
    assert "--mean: the runs are of 2 models or stages (pengi pengi, whisper_gpt)" in err, err

def test_eval_kinds_all_evaluates_every_clip(synth_dir, tmp_path, monkeypatch):
    """eval.py --kinds=all evaluates a checkpoint trained on one kind on every val clip: the token
    count is that of the whole val split, and the row says "all". --split=train and evaluate()'s
    options (max_windows) reach the evaluation."""
    import eval as E
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, use_mel=False, kinds="speech")
    W.load_data(synth_dir, cfg, None)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, W.Model(cfg), synth_dir)
    for name, value in (("kinds", "all"), ("data_dir", ""), ("device", "cpu"), ("split", "val")):
        monkeypatch.setattr(E, name, value)
    row = E.evaluate_checkpoint(str(ckpt), {})
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    n = os.path.getsize(os.path.join(synth_dir, "val_codes.bin")) // (2 * meta["n_q"])
    assert row["kinds"] == "all" and row["tokens"] == (n - 1) // 16 * 16
    # --split=train evaluates the train split; evaluate()'s options (text, as on the command line)
    # reach it: the first 3 windows of 16 tokens
    n_train = os.path.getsize(os.path.join(synth_dir, "train_codes.bin")) // (2 * meta["n_q"])
    monkeypatch.setattr(E, "split", "train")
    assert n_train != n
    assert E.evaluate_checkpoint(str(ckpt), {})["tokens"] == (n_train - 1) // 16 * 16
    monkeypatch.setattr(E, "split", "val")
    assert E.evaluate_checkpoint(str(ckpt), {"max_windows": "3"})["tokens"] == 3 * 16

def test_eval_row_names_the_data_it_evaluated_on(synth_dir, tmp_path, monkeypatch):
    """eval.py --data_dir: the row (and so --json) names the data the run was evaluated on, not
    the data it was trained on."""
    import eval as E
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, use_mel=False, kinds="speech")
    W.load_data(synth_dir, cfg, None)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, W.Model(cfg), str(tmp_path / "trained_on"), iter_num=7)
    for name, value in (("kinds", ""), ("data_dir", synth_dir), ("device", "cpu"),
                        ("split", "val")):
        monkeypatch.setattr(E, name, value)
    row = E.evaluate_checkpoint(str(ckpt), {})
    assert row["data"] == synth_dir and row["kinds"] == "speech" and row["iters"] == 7

def test_eval_ctrl_c_in_a_later_run_keeps_the_rows_of_the_runs_done(synth_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """Ctrl-C while the second of two runs is evaluated: the first run's row is printed (as when a
    later run stops on an error), then the interruption goes on to eval.py's one line; --json is
    not written."""
    import eval as E
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, use_mel=False)
    W.load_data(synth_dir, cfg, None)
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name / "ckpt.pt"))
        save_checkpoint(paths[-1], W.Model(cfg), synth_dir)
    evaluate_checkpoint = E.evaluate_checkpoint

    def ctrl_c_in_b(path, opts):
        if path == paths[1]:
            raise KeyboardInterrupt
        return evaluate_checkpoint(path, opts)
    monkeypatch.setattr(E, "evaluate_checkpoint", ctrl_c_in_b)
    js = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        E.main([*paths, "--device=cpu", "--max_windows=2", f"--json={js}"])
    out, err = capsys.readouterr()
    assert [line.split(" | ")[0] for line in out.splitlines()[2:]] == ["| a"], out
    assert f"the 1 run(s) evaluated before {paths[1]} stopped (no mean, no --json)" in err, err
    assert not js.exists()

def test_eval_kinds_is_refused_for_a_model_without_clip_kinds(tmp_path, monkeypatch, capsys):
    """--kinds names Whisper-GPT's clip subsets: for a model file without them (SALMONN) it is
    refused before any evaluation, naming the checkpoint, rather than ignored."""
    import eval as E
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_name": "salmonn", "model_args": {}, "iter_num": 0,
                "config": {}}, path)
    monkeypatch.setattr(E, "kinds", "music")
    monkeypatch.setattr(E, "mean", False)
    with pytest.raises(SystemExit):
        E.check_runs([str(path)], {})
    assert (f"--kinds=music: {path} is a salmonn model, which has no clip-kind subsets"
            in capsys.readouterr().err)

def test_eval_refuses_an_option_out_of_range_before_any_data_loads(tmp_path, monkeypatch,
                                                                      capsys):
    """An evaluate() option out of range (or a Pengi task that does not exist) stops eval.py in its
    check of the runs, before any data loads, with the line evaluate() itself gives: it was
    refused only once the run's data had loaded and its model was built."""
    import eval as E
    monkeypatch.setattr(E, "kinds", "")
    monkeypatch.setattr(E, "mean", False)
    for model, opts, said in (
            ("whisper_gpt", {"batch_size": "0"}, "whisper_gpt.evaluate: batch_size=0: must be at "
                                                 "least 1"),
            ("pengi", {"beam": "0"}, "pengi.evaluate: beam=0: must be at least 1"),
            ("pengi", {"tasks": "caption,foo"}, "pengi.evaluate: unknown task(s) ['foo']"),
            ("salmonn", {"temperature": "0.5"}, "salmonn.evaluate: temperature=0.5 samples, "
                                                "which needs beam=1 (beam=4 given)")):
        path = tmp_path / model / "ckpt.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save({"model": {}, "model_name": model, "model_args": {}, "iter_num": 0,
                    "config": {"data_dir": str(tmp_path / "no_data")}}, path)
        with pytest.raises(SystemExit):
            E.check_runs([str(path)], opts)
        assert f"eval.py: {path}: {said}" in capsys.readouterr().err, (model, opts)
    # in range: the check passes
    E.check_runs([str(path)], {"temperature": "0.5", "beam": "1"})

def test_eval_json_replaces_only_an_empty_file_or_its_own_results(tmp_path):
    """--json may write over an empty file or eval.py's own results, nothing else."""
    import eval as E
    cases = {"empty.json": b"", "blank.json": b"  \n", "ours.json": b'[{"run": "a", "nll": 1.0}]',
             "list.json": b"[1, 2]", "meta.json": b'{"n_mels": 64}', "ckpt.pt": b"PK\x03\x04..."}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        assert E.is_results_file(str(tmp_path / name)) == (name in ("empty.json", "blank.json",
                                                                      "ours.json")), name

def test_table_continuation_scores_and_references_by_hand(monkeypatch):
    """whisper_gpt_table's continuation metrics on small made-up log-mels (prompt_frames=2,
    new_frames=3), against the formulas: frames 2..4 only; frame-aligned L1 = mean |gen - true|;
    spectrum L1 = mean over bands of |time mean gen - time mean true|; level modulation = the
    population standard deviation over time of each generated frame's mean over bands. The
    frozen reference is the prompt then its last min(prompt_frames, new_frames) frames repeated;
    "another clip's" continuation is the next clip's, not the clip's own."""
    import whisper_gpt_table as WT
    monkeypatch.setattr(WT, "prompt_frames", 2)
    monkeypatch.setattr(WT, "new_frames", 3)
    rng = np.random.default_rng(0)
    true, gen = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    gen[:, 0] += np.arange(6)  # a level that moves over time, unevenly over the bands
    l1 = sum(abs(gen[t, b] - true[t, b]) for t in range(2, 5) for b in range(4)) / 12
    spec = sum(abs(sum(gen[t, b] - true[t, b] for t in range(2, 5)) / 3) for b in range(4)) / 4
    level = [sum(gen[t]) / 4 for t in range(2, 5)]
    mod = math.sqrt(sum((x - sum(level) / 3) ** 2 for x in level) / 3)
    got = WT.continuation_scores(true, gen)
    assert np.allclose(got, (l1, spec, mod), rtol=1e-12), (got, (l1, spec, mod))
    # the prompt's end looped: prompt frames 0, 1, then 0, 1, 0 (fewer prompt frames than new
    # ones) ...
    assert np.array_equal(WT.looped_prompt_end(true), true[[0, 1, 0, 1, 0]])
    # ... and with a longer prompt, its last new_frames frames once: 1, 2, 3 after frames 0..3
    monkeypatch.setattr(WT, "prompt_frames", 4)
    assert np.array_equal(WT.looped_prompt_end(gen), gen[[0, 1, 2, 3, 1, 2, 3]])
    monkeypatch.setattr(WT, "prompt_frames", 2)
    mels = {i: rng.normal(size=(6, 4)) for i in (3, 5, 8)}
    idx = [3, 5, 8]
    ref = WT.reference_scores(mels, idx)
    assert all(s[:2] == (0.0, 0.0) for s in ref["the true continuation"])
    for k, (i, j) in enumerate(((3, 5), (5, 8), (8, 3))):
        assert ref["another clip's true continuation"][k] == WT.continuation_scores(mels[i],
                                                                                    mels[j])
        assert ref["another clip's true continuation"][k][0] > 0.1
    # one clip has no other: no such row (it was the clip against itself, a score of 0)
    assert list(WT.reference_scores(mels, [3])) == ["the true continuation",
                                                    "repeat the prompt's end"]

def test_table_claims_count_the_seeds_where_the_hybrid_is_lower():
    """The claim lines of whisper_gpt_table.table: per seed, NLL hybrid - other; their mean and
    sample standard deviation, and the number of seeds where the hybrid's NLL is lower, here 2 of
    3 by construction."""
    import whisper_gpt_table as WT
    nll = {("hybrid", 1): 2.0, ("s", 1): 2.5, ("hybrid", 2): 2.0, ("s", 2): 2.1,
           ("hybrid", 3): 2.4, ("s", 3): 2.2}
    results = {(m, "speech", s): {"nll": v, "accuracy": 0.3, "ppl": math.exp(v), "wall": None,
                                  "params": 1e6, "iters": 3} for (m, s), v in nll.items()}
    lines = WT.table(results, ["s", "hybrid"], ["speech"], [1, 2, 3], [], "d")
    d = [-0.5, -0.1, 0.2]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    claim = [l for l in lines if l.startswith("- speech: the hybrid beats GPT-S")]
    assert claim == [f"- speech: the hybrid beats GPT-S of its size? NLL Hybrid - GPT-S = "
                     f"{m:+.3f} +- {sd:.3f} (lower in 2 of 3 seeds)"]

def test_table_rows_are_each_models_mean_and_spread_beside_the_papers():
    """whisper_gpt_table.table on made-up metrics of the four models, two seeds: the paper's six
    rows; then per model, in order, the mean +- sample standard deviation over the seeds of NLL,
    accuracy (in %) and PPL, computed here with statistics; the hybrid's second row of its
    as_generating metrics; the claims pair each hybrid with the model they name (GPT-L for the
    second, GPT-S for the codebook-0 hybrid)."""
    import statistics
    import whisper_gpt_table as WT
    models, seeds = ["s", "hybrid", "l", "hybrid_c0"], [1, 2]
    nll = {("s", 1): 2.5, ("s", 2): 2.3, ("hybrid", 1): 2.0, ("hybrid", 2): 2.2,
           ("l", 1): 2.1, ("l", 2): 1.9, ("hybrid_c0", 1): 2.4, ("hybrid_c0", 2): 2.0}
    acc = {k: 0.1 + 0.05 * i for i, k in enumerate(nll)}
    params = {"s": 1.5e6, "hybrid": 1.75e6, "l": 12e6, "hybrid_c0": 1.75e6}
    # training seconds (wall.json): the mean of the runs that have one, as h/m or m/s
    wall = {("l", 1): 3700.0, ("l", 2): 3900.0, ("s", 1): 65.0}
    each = {"l": ", 1h03m each", "s": ", 1m05s each"}
    results = {}
    for (m, s), v in nll.items():
        results[(m, "speech", s)] = {"nll": v, "accuracy": acc[(m, s)], "ppl": math.exp(v),
                                     "wall": wall.get((m, s)), "params": params[m], "iters": 3}
        if m == "hybrid":
            results[(m, "speech", s)]["as_generating"] = {"nll": v + 0.3 * s, "accuracy": 0.05 * s,
                                                          "ppl": math.exp(v + 0.3 * s)}
    lines = WT.table(results, models, ["speech"], seeds, [], "d")
    paper = [l for l in lines if l.startswith("| paper, ")]
    assert len(paper) == 6
    assert paper[0] == "| paper, LibriSpeech | GPT-S | 3.7M | 2.02 | 34.18% | 7.54 | |"

    def cells(xs):
        return statistics.mean(xs), statistics.stdev(xs)
    want = []
    for m, name in (("s", "GPT-S"), ("hybrid", "Hybrid"), ("l", "GPT-L"),
                    ("hybrid_c0", "Hybrid on codebook-0 mels")):
        n, dn = cells([nll[(m, s)] for s in seeds])
        a, da = cells([100 * acc[(m, s)] for s in seeds])
        p, dp = cells([math.exp(nll[(m, s)]) for s in seeds])
        want.append(f"| ours, speech | {name} CPU | {params[m] / 1e6:.2f}M | {n:.3f} +- {dn:.3f} | "
                    f"{a:.2f} +- {da:.2f}% | {p:.2f} +- {dp:.2f} | 2 seeds, 3 it."
                    f"{each.get(m, '')} |")
        if m == "hybrid":
            g = [results[("hybrid", "speech", s)]["as_generating"] for s in seeds]
            n, dn = cells([r["nll"] for r in g])
            a, da = cells([100 * r["accuracy"] for r in g])
            p, dp = cells([r["ppl"] for r in g])
            want.append(f"| ours, speech | Hybrid CPU, given the mels of its codebook 0 (as when "
                        f"generating) | | {n:.3f} +- {dn:.3f} | {a:.2f} +- {da:.2f}% | {p:.2f} +- "
                        f"{dp:.2f} | the same runs |")
    assert [l for l in lines if l.startswith("| ours, ")] == want
    claims = [l for l in lines if l.startswith("- speech: ")]
    for hybrid, other, name in (("hybrid", "l", "GPT-L"), ("hybrid_c0", "s", "GPT-S")):
        m, sd = cells([nll[(hybrid, s)] - nll[(other, s)] for s in seeds])
        wins = sum(nll[(hybrid, s)] < nll[(other, s)] for s in seeds)
        assert any(l.endswith(f"NLL {WT.NAMES[hybrid]} - {name} = {m:+.3f} +- {sd:.3f} (lower "
                              f"in {wins} of 2 seeds)") for l in claims), claims
    assert len(claims) == 3
    # one seed has no spread: the means alone, not "+- 0.000"
    one = WT.table(results, models, ["speech"], [1], [], "d")
    assert (f"| ours, speech | GPT-S CPU | 1.50M | 2.500 | {100 * acc[('s', 1)]:.2f}% | "
            f"{math.exp(2.5):.2f} | 1 seed, 3 it., 1m05s each |") in one, one
    assert f"- speech: the hybrid beats GPT-S of its size? NLL Hybrid - GPT-S = -0.500 (lower in " \
           f"1 of 1 seed)" in one, one
    assert not any("+-" in l for l in one if l.startswith(("| ours", "- speech")))

@pytest.mark.usefixtures("synth_c0")
def test_table_scores_the_hybrid_again_on_its_codebook0_mels(synth_dir, tmp_path):
    """evaluate_run: a hybrid trained on the audio's mels is scored on them, and again
    (as_generating) on the mels of its codebook 0 decoded alone, each equal to evaluate on load_data
    of that mel_source; the mel path and the logits are scaled up so that the two mels give
    clearly different NLLs."""
    import whisper_gpt_table as WT
    cfg = W.Config(block_size=16, n_layer=1, n_head=2, n_embd=32, mel_n_layer=1, mel_n_head=2,
                   mel_n_embd=16, mel_dim=8, kinds="speech")
    W.load_data(synth_dir, cfg)
    torch.manual_seed(0)
    model = W.Model(cfg).eval()
    with torch.no_grad():
        model.mel_out.weight.mul_(300)
        model.lm_head.weight.mul_(30)
    d = tmp_path / "hybrid-speech-s1"
    d.mkdir()
    save_checkpoint(d / "ckpt.pt", model, synth_dir, iter_num=3)
    got, kept = WT.evaluate_run(str(d), synth_dir)
    assert not kept and got["iters"] == 3
    for source, metrics in (("audio", got), ("codebook0", got["as_generating"])):
        config = dataclasses.replace(cfg, mel_source=source)
        want = W.evaluate(model, W.load_data(synth_dir, config), None, "val")
        assert math.isclose(metrics["nll"], want["nll"], rel_tol=1e-6), (source, metrics, want)
    assert abs(got["nll"] - got["as_generating"]["nll"]) > 0.01

def test_codes_of_another_codec_are_refused_and_a_held_out_corpus_of_the_same_codec_evaluates(
        synth_dir, tmp_path):
    """Each corpus fits its own offline codec, so a model's token ids are its training data's
    codec's. eval.py (load_data, also train.py's resume) and sample refuse data of another codec in
    one line; a held-out corpus made with prepare.py --codec_from (all in val) evaluates, its
    one-clip train split refused only when read."""
    import audio as A
    import prepare as P
    import sample as S
    common = ["--clips=24", "--seed=5", "--max_seconds=2.0", "--val_percent=100", "--quiet",
              "--offline", "--codec_report=0", "--kmeans_frames=2048", "--kmeans_iters=2"]
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    P.main(common + [f"--out_dir={same}", f"--codec_from={synth_dir}"])
    P.main(common + [f"--out_dir={other}"])
    # a context longer than the held-out train split's one clip
    cfg = W.Config(block_size=160, n_layer=1, n_head=2, n_embd=32, mel_n_layer=1, mel_n_head=2,
                   mel_n_embd=16, mel_dim=8)
    W.load_data(synth_dir, cfg, None)
    assert cfg.codec_id == A.codec_id(synth_dir) != A.codec_id(other)
    model = W.Model(cfg).eval()
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, synth_dir)
    js = tmp_path / "m.json"
    res = run_script([sys.executable, "eval.py", str(ckpt), f"--data_dir={same}",
                      f"--json={js}"], cwd=ROOT)
    assert res.returncode == 0, res.stderr
    val = W.load_data(same, dataclasses.replace(cfg), None)
    assert json.load(open(js))[0]["tokens"] == (len(val["val"]["codes"]) - 1) // 160 * 160 > 0
    with pytest.raises(ValueError, match="split train has"):
        W.get_batch(val, "train", 1, np.random.default_rng(0))
    res = run_script([sys.executable, "eval.py", str(ckpt), f"--data_dir={other}"], cwd=ROOT)
    assert (res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
            and cfg.codec_id in res.stderr and A.codec_id(other) in res.stderr
            and "--codec_from" in res.stderr), res.stderr
    clip = S.read_clip(other, "val", 0)[0]
    with pytest.raises(ValueError, match="the model learned the codes of"):
        W.sample(model, None, clip, None, S.Tools(other), max_new_tokens=2)
    out = W.sample(model, None, S.read_clip(same, "val", 0)[0], None, S.Tools(same),
                   max_new_tokens=2)
    assert out["codes"].shape == (2, 1)

@pytest.mark.usefixtures("synth_c0")  # the script makes them otherwise, unlocked
def test_table_script_sweeps_resumes_and_writes_the_table(synth_dir, tmp_path):
    """whisper_gpt_table.py on the test corpus, a tiny budget: every (model, kind, seed) run is
    trained on its subset to max_iters; the table has one mean +- std row per kind and model with
    the paper's rows, the claims are checked seed by seed from the runs' own metrics, and again on
    a held-out corpus of the same codec (--test_dir); a second call trains nothing."""
    import prepare as P
    held_out = tmp_path / "held_out"
    P.main(["--clips=40", "--seed=7", "--max_seconds=2.0", "--val_percent=100", "--quiet",
            "--offline", "--codec_report=0", f"--out_dir={held_out}", f"--codec_from={synth_dir}"])
    out = tmp_path / "table.md"
    args = [sys.executable, "whisper_gpt_table.py", "--models=s,hybrid", "--kinds=speech,events",
            "--seeds=1,2", f"--data_dir={synth_dir}",
            f"--out_root={tmp_path / 'runs'}", f"--out={out}", "--continuations=2",
            "--prompt_frames=20",
            "--new_frames=6", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
            "--batch_size=2", "--block_size=16", "--log_interval=1"]
    res = run_script(args + [f"--test_dir={held_out}"], cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 of 8 runs already finished, 8 to train" in res.stdout
    # the minutes after the sweep say where they are: a line per run evaluated, per model continued
    assert f"  evaluated s-speech-s1 on {synth_dir}: NLL " in res.stdout
    assert f"  evaluated hybrid-events-s2 on {held_out}: NLL " in res.stdout
    assert "(16/16, " in res.stdout
    for label in ("speech, GPT-S", "speech, Hybrid", "events, GPT-S", "events, Hybrid"):
        assert f"  continuations {label}: 2/2, " in res.stdout
    # the table is printed before it is written (a failed write loses nothing)
    assert res.stdout.index("| paper, music | Hybrid |") < res.stdout.index(f"wrote {out}")
    # what the sweep echoes of a running job: its log's last "iter i/N ... eta" line
    import whisper_gpt_table as WT
    assert WT.last_iter(str(tmp_path / "runs" / "s-speech-s1")) == "iter 3/3, eta 0m00s"
    results = json.load(open(tmp_path / "runs" / "results.json"))
    assert len(results) == 8
    # the continuations are the first seed's runs' (scores kept in each run), no other seed's
    for model in ("s", "hybrid"):
        assert [len(glob.glob(str(tmp_path / "runs" / f"{model}-speech-s{s}" / "cont-*.json")))
                for s in (1, 2)] == [1, 0], model
    for name, r in results.items():
        ck = torch.load(tmp_path / "runs" / name / "ckpt.pt", map_location="cpu", weights_only=True)
        kind = name.split("-")[1]
        assert (ck["iter_num"] == 3 and ck["model_args"]["kinds"] == kind
                and ck["model_args"]["use_mel"] == name.startswith("hybrid"))
        assert math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-9)
    # two runs scored again here, independently of the script: their own checkpoint, their kind
    for name in ("s-speech-s2", "hybrid-events-s1"):
        ck = torch.load(tmp_path / "runs" / name / "ckpt.pt", map_location="cpu", weights_only=True)
        config = W.Config(**ck["model_args"])
        model = W.Model(config)
        model.load_state_dict(ck["model"])
        got = W.evaluate(model, W.load_data(synth_dir, config), None, "val")
        assert math.isclose(got["nll"], results[name]["nll"], rel_tol=1e-6), (name, got, results)
    text = out.read_text()
    for kind in ("speech", "events"):
        for model in ("GPT-S", "Hybrid"):
            nll = [results[f"{'s' if model == 'GPT-S' else 'hybrid'}-{kind}-s{s}"]["nll"]
                   for s in (1, 2)]
            assert f"| ours, {kind} | {model} CPU |" in text
            assert f"{np.mean(nll):.3f} +- {np.std(nll, ddof=1):.3f}" in text
        d = [results[f"hybrid-{kind}-s{s}"]["nll"] - results[f"s-{kind}-s{s}"]["nll"]
             for s in (1, 2)]
        assert (f"- {kind}: the hybrid beats GPT-S of its size? "
                f"NLL Hybrid - GPT-S = {np.mean(d):+.3f} +- {np.std(d, ddof=1):.3f} (lower in "
                f"{sum(x < 0 for x in d)} of 2 seeds)") in text
        assert (tmp_path / "runs" / "continuations" / f"{kind}.png").stat().st_size > 0
    assert "| paper, music | Hybrid | 4M | 2.52 | 38.47% | 12.43 | |" in text
    assert "another clip's true continuation" in text and "| speech | Hybrid, sampled" in text
    # the hybrids are also scored on the mels of their own codebook 0, which prepare.codebook0_mels
    # made (for the held-out corpus, in the script; synth_dir's the fixture made)
    assert ("| ours, events | Hybrid CPU, given the mels of its codebook 0 "
            "(as when generating) |") in text
    assert (held_out / "val_mel_c0.bin").exists()
    assert "| speech | the true continuation | 0.000 +- 0.000 | 0.000 +- 0.000 |" in text
    # the same runs on the held-out corpus: their own table, from its val clips of each kind
    held = text.split(f"## The same runs on held-out clips ({held_out})")[1].split("## ")[0]
    rest = json.load(open(tmp_path / "runs" / "results_test.json"))
    for kind in ("speech", "events"):
        sub = W.load_data(str(held_out), W.Config(block_size=16, kinds=kind), None)["val"]["codes"]
        assert rest[f"s-{kind}-s1"]["tokens"] == (len(sub) - 1) // 16 * 16
        nll = [rest[f"hybrid-{kind}-s{s}"]["nll"] for s in (1, 2)]
        assert f"{np.mean(nll):.3f} +- {np.std(nll, ddof=1):.3f}" in held
    assert f"(val clips of each kind from {held_out};" in held
    assert f"val clips of {held_out}; every continuation" in text  # continued: the held-out clips
    again = run_script(args + [f"--test_dir={held_out}"], cwd=ROOT)
    assert again.returncode == 0 and "8 of 8 runs already finished, 0 to train" in again.stdout
    # nothing changed: each run's evaluations (on both corpora) and continuations' scores are kept
    # from the first call, the table the same
    assert again.stdout.count("(kept from an earlier call: checkpoint, data and code "
                              "unchanged)") == 16
    for label in ("speech, GPT-S", "speech, Hybrid", "events, GPT-S", "events, Hybrid"):
        assert f"  continuations {label}: 2 kept from an earlier call" in again.stdout
    assert json.load(open(tmp_path / "runs" / "results.json")) == results
    cut = lambda t: t[:t.rindex("(Python ")]  # all but the line of this call's time
    assert cut(out.read_text()) == cut(text)
    # a larger budget is refused, not resumed into: the old runs' learning rate decayed over
    # their 3 iterations, which a 4-iteration run's does not
    more = [a for a in args if not a.startswith(("--models", "--kinds", "--seeds", "--max_iters"))]
    more += ["--models=s", "--kinds=speech", "--seeds=1", "--max_iters=4", "--continuations=0"]
    again = run_script(more, cwd=ROOT)
    assert again.returncode == 2 and (
        f"s-speech-s1: a run to 3 iterations (now at 3), fewer than max_iters=4; a run of 4 decays "
        f"its learning rate over all of them, so this one cannot become it") in again.stderr, \
        again.stderr[-2000:]
    ck = torch.load(tmp_path / "runs" / "s-speech-s1" / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 3
    # runs made with other settings are not tabled as these; bad sweep settings stop at once
    other_codec = tmp_path / "other_codec"
    P.main(["--clips=12", "--max_seconds=1.0", "--quiet", "--offline", "--codec_report=0",
            "--kmeans_frames=1024", "--kmeans_iters=2", f"--out_dir={other_codec}"])
    cases = ((["--learning_rate=0.5"], "learning_rate=0.002 there, 0.5 here"),
             (["--seeds=1,1"], "--seeds=1,1: each at most once"),
             (["--jobs=0"], "--jobs=0: must be at least 1"),
             (["--prompt_frames=0"], "--prompt_frames=0: must be at least 1"),
             (["--seed=5"], "--seed=5: the sweep sets it for each run; use --seeds"),
             ([f"--out_dir={tmp_path}"], "the sweep sets it for each run; use --out_root"),
             (["--always_save_checkpoint=False"], "the table is of each run's last weights"),
             (["--max_iters=2"], "a run to 3 iterations (now at 3), more than max_iters=2"),
             ([f"--data_dir={tmp_path / 'nowhere'}"], f"--data_dir={tmp_path / 'nowhere'}: "),
             (["--always_save_checkpoint=0"], "which a best-only checkpoint does not keep"),
             # train.py's own message, said as this script's in one line
             (["--nope=3"], "whisper_gpt_table.py: --nope=3: unknown setting 'nope': not a "
                            "train.py setting nor a field of whisper_gpt.Config (the settings "
                            "not this script's go to train.py, for every run)\n"),
             ([f"--test_dir={tmp_path / 'nowhere'}"], "meta.json: missing"),
             ([f"--test_dir={other_codec}"], "of another codec than"))
    # training data whose train split is empty: refused before the sweep, not when a run starts
    no_train = tmp_path / "no_train"
    no_train.mkdir()
    for name in os.listdir(synth_dir):
        empty = name.startswith("train_") and name.endswith(".bin")
        if empty or name.startswith("train_clips"):
            (no_train / name).write_bytes(b"")
        else:
            os.symlink(os.path.join(synth_dir, name), no_train / name)
    cases += (([f"--data_dir={no_train}", f"--out_root={tmp_path / 'runs_nt'}"],
               f"--data_dir={no_train}: "),)
    cmds = [more + extra for extra, _ in cases]  # each stops before any work: all side by side
    # a checkpoint whose weights do not fit its own model: one line when the table loads it
    bad = tmp_path / "runs" / "hybrid-events-s2" / "ckpt.pt"
    ck = torch.load(bad, weights_only=True)
    ck["model"].pop(next(iter(ck["model"])))
    torch.save(ck, bad)
    one = [a for a in args if not a.startswith(("--models", "--kinds", "--seeds"))]
    cases += (([], f"{bad}: its weights do not fit the model built for the checkpoint's "
                   f"model_args"),)
    cmds.append(one + ["--models=hybrid", "--kinds=events", "--seeds=2", "--continuations=0"])
    for (extra, said), run in zip(cases, run_scripts(cmds, cwd=ROOT, timeout=300)):
        assert run.returncode == 2 and said in run.stderr, (extra, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, \
            (extra, run.stderr[-2000:])
    assert not (tmp_path / "runs_nt").exists()  # no run was started

def test_table_script_refuses_a_model_it_has_no_name_for(tmp_path):
    """A --models entry must be one of the table's models, not just have a config file: another one
    stops before any work (it has no row name in the table)."""
    (tmp_path / "config").mkdir()
    with open(os.path.join(ROOT, "config", "whisper_gpt_s_cpu.py")) as f:
        text = f.read()
    for name in ("s", "xl"):  # config files for both: only the names tell them apart
        (tmp_path / "config" / f"whisper_gpt_{name}_cpu.py").write_text(text)
    res = run_script([sys.executable, os.path.join(ROOT, "whisper_gpt_table.py"),
                      "--models=s,xl", f"--out_root={tmp_path / 'runs'}"], cwd=tmp_path,
                     timeout=300)
    assert res.returncode == 2 and "--models: no model 'xl'" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    # a device or dtype train.py would refuse in every run (where runs had finished, the table was
    # written saying "device cuda" of runs made on the CPU)
    for arg, said in (("--device=cuda:7", "device='cuda:7': this machine has"),
                      ("--dtype=bf16", "dtype='bf16': expected auto, float32")):
        res = run_script([sys.executable, os.path.join(ROOT, "whisper_gpt_table.py"), "--models=s",
                          arg, f"--out_root={tmp_path / 'runs'}"], cwd=ROOT, timeout=300)
        assert res.returncode == 2 and said in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "runs").exists()

def test_table_script_checks_where_it_writes_before_any_work(tmp_path):
    """--out and --out_root are checked before the sweep, which they would fail after: --out a
    folder (also one still to be made, named with a trailing slash) or under a file, --out_root
    under a file, the default --out (out_root/table1.md) a folder, a file the script did not write
    (a user's notes, left as they are); each stops with one line and nothing is trained or
    written. A --out in folders still to be made passes, as does an empty file or a table the
    script wrote (here the missing --data_dir, checked next, stops them)."""
    (tmp_path / "file").write_text("")
    (tmp_path / "runs" / "table1.md").mkdir(parents=True)
    (tmp_path / "notes.md").write_text("# my notes\n")
    with open(os.path.join(ROOT, "docs", "whisper_gpt_table1.md")) as f:  # a table it wrote
        (tmp_path / "own.md").write_text(f.read())
    new = tmp_path / "new"
    cases = (([f"--out_root={new}", f"--out={tmp_path}"],
              f"--out={tmp_path}: a folder; name the markdown file to write"),
             ([f"--out_root={new}", f"--out={tmp_path / 'file' / 't.md'}"],
              f"--out={tmp_path / 'file' / 't.md'}: {tmp_path / 'file'} is a file, not a folder"),
             ([f"--out_root={tmp_path / 'file' / 'runs'}"],
              f"--out_root={tmp_path / 'file' / 'runs'}: {tmp_path / 'file'} is a file, not a "
              f"folder"),
             ([f"--out_root={tmp_path / 'runs'}"],
              f"--out (default {tmp_path / 'runs' / 'table1.md'}): a folder"),
             ([f"--out_root={new}", f"--out={new / 'newdir'}{os.sep}"],
              f"--out={new / 'newdir'}{os.sep}: a folder; name the markdown file to write"),
             ([f"--out_root={new}", f"--out={new / 'deeper' / 't.md'}"],
              f"--data_dir={tmp_path / 'nowhere'}: "),
             ([f"--out_root={new}", f"--out={tmp_path / 'notes.md'}"],
              f"--out={tmp_path / 'notes.md'}: the file exists and is not a report of "
              f"whisper_gpt_table.py"),
             ([f"--out_root={new}", f"--out={tmp_path / 'file'}"],
              f"--data_dir={tmp_path / 'nowhere'}: "),
             ([f"--out_root={new}", f"--out={tmp_path / 'own.md'}"],
              f"--data_dir={tmp_path / 'nowhere'}: "))
    nowhere = f"--data_dir={tmp_path / 'nowhere'}"
    runs = run_scripts([[sys.executable, "whisper_gpt_table.py", nowhere, *extra]
                        for extra, _ in cases], cwd=ROOT, timeout=300)
    for (extra, said), run in zip(cases, runs):
        assert run.returncode == 2 and said in run.stderr, (extra, run.stderr[-2000:])
        assert len(run.stderr.strip().splitlines()) == 1, (extra, run.stderr[-2000:])
    assert sorted(os.listdir(tmp_path)) == ["file", "notes.md", "own.md", "runs"]
    assert os.listdir(tmp_path / "runs") == ["table1.md"]
    assert (tmp_path / "notes.md").read_text() == "# my notes\n"

def test_table_reads_a_runs_wall_time_or_names_the_file(tmp_path, capsys):
    """wall.json (the seconds a run trained, over the sweeps that trained it): read back, 0 without
    one, and one that is not the sweep's (edited by hand) stops the table in one line naming it."""
    import whisper_gpt_table as WT
    assert WT.read_wall(str(tmp_path)) == 0.0
    WT.write_json(str(tmp_path / "wall.json"), {"seconds": 61.5})
    assert WT.read_wall(str(tmp_path)) == 61.5
    for bad in ('{"seconds": ', '{"secs": 3}', '[]'):
        (tmp_path / "wall.json").write_text(bad)
        with pytest.raises(SystemExit):
            WT.read_wall(str(tmp_path))
        assert f"{tmp_path / 'wall.json'}: not the sweep's record" in capsys.readouterr().err

def test_table_keys_the_code_not_its_comments_or_docstrings(tmp_path):
    """Kept evaluations are keyed by the scoring code: an edited comment or docstring keeps them,
    a changed line of code does not."""
    import whisper_gpt_table as WT

    def digest(text):
        (tmp_path / "m.py").write_text(text)
        WT.code_digest.cache_clear()  # read once per path otherwise
        return WT.code_digest(str(tmp_path / "m.py"))
    base = '"""Module."""\ndef f(x):\n    """Doc."""\n    return x + 1  # one\n'
    same = ('"""Another module text."""\n# a comment\ndef f(x):\n    """Other doc."""\n'
            '    return x + 1  # two\n')
    assert digest(base) == digest(same)
    assert digest(base) != digest(base.replace("x + 1", "x + 2"))
    assert digest(base) == digest(base.replace('    """Doc."""\n', ""))  # a docstring dropped

def test_table_sweep_status_is_each_logs_last_iteration(tmp_path):
    """What the sweep echoes of a running job once a minute: the last "iter i/N ... eta" line of
    its train.log (read from its tail: a long run's log is long), shortened; None before the
    first."""
    import whisper_gpt_table as WT
    assert WT.last_iter(str(tmp_path)) is None
    log = tmp_path / "train.log"
    log.write_text("step 0: train loss 6.1, val loss 6.1\n")
    assert WT.last_iter(str(tmp_path)) is None
    lines = [f"iter {i}/900 | loss 5.1 | lr 1.00e-03 | 10.0 ms/iter | 1.0k tok/s | eta {i}m00s"
             for i in range(1, 301)]
    log.write_text("\n".join(lines + ["step 300: train loss 4.2, val loss 4.3", ""]))
    assert WT.last_iter(str(tmp_path)) == "iter 300/900, eta 300m00s"

def test_bench_scripts_check_their_arguments_before_any_work(tmp_path):
    """bench_whisper_gpt.py and bench_attention.py stop with one line, before any benchmark runs,
    at an --out in a missing folder, a --data_dir without data (bench_whisper_gpt.py's own name on
    it, though the generation part, which reads it, comes after the training part), --dims or
    --seqlens that are not integers, a head dim the kernels do not take, a length below 1."""
    missing = tmp_path / "missing" / "b.md"
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    small = ["bench_whisper_gpt.py", "--iters=1", "--batch_size=1"]
    cases = ((small + ["--part=train", f"--out={missing}"],
              f"bench_whisper_gpt.py: --out={missing}: {missing.parent} does not exist"),
             (small + [f"--data_dir={tmp_path / 'nowhere'}"],
              f"bench_whisper_gpt.py: --data_dir={tmp_path / 'nowhere'}: no meta.json"),
             (small + ["--child=nope"], "bench_whisper_gpt.py: --child=nope: expected one of s, "
                                        "hybrid, l"),
             (["bench_attention.py", "--ptxas", "--dims=abc"],
              "bench_attention.py: --dims=abc: expected integers separated by commas"),
             (["bench_attention.py", "--ptxas", "--tiles=default", "--dims=64,48"],
              "bench_attention.py: --dims=64,48: the kernels take head dims 16, 32, 64, 128 only"),
             (["bench_attention.py", "--seqlens=1024,0"],
              "bench_attention.py: --seqlens=1024,0: each must be at least 1"),
             (["bench_attention.py", "--width=100"],  # 128 would run at D = 128: not what it says
              "bench_attention.py: --width=100: H*D must be a multiple of each head dim (64, 128)"),
             (["bench_attention.py", "--quick", "--tokens=5000"],
              "bench_attention.py: --tokens=5000: B*T must be a multiple of each T (1024, 4096)"),
             (["bench_attention.py", "--ptxas", "--tiles=default", "--dims=16", f"--out={missing}"],
              f"bench_attention.py: --out={missing}: {missing.parent} does not exist"),
             # a file the script did not write is never replaced
             (small + ["--part=train", f"--out={notes}"],
              f"bench_whisper_gpt.py: --out={notes}: the file exists and is not a report of "
              f"bench_whisper_gpt.py"),
             (["bench_attention.py", "--ptxas", "--tiles=default", "--dims=16", f"--out={notes}"],
              f"bench_attention.py: --out={notes}: the file exists and is not a report of "
              f"bench_attention.py"))
    # each stops before any work: all side by side
    runs = run_scripts([[sys.executable, *args] for args, _ in cases], cwd=ROOT, timeout=300)
    for (args, said), run in zip(cases, runs):
        assert run.returncode == 2 and said in run.stderr, (args, run.stderr[-2000:])
        assert len(run.stderr.strip().splitlines()) == 1, (args, run.stderr[-2000:])
    assert os.listdir(tmp_path) == ["notes.md"] and notes.read_text() == "# my notes\n"

def test_bench_attention_refuses_a_token_count_below_1():
    """--tokens=0 or a negative count is a multiple of every T, so it passed the check; on a GPU
    each row then ran one sequence under a header that said B*T = 0 (or -16384)."""
    cases = ((["--tokens=0"], "bench_attention.py: --tokens=0: must be at least 1"),
             (["--quick", "--tokens=-16384"],
              "bench_attention.py: --tokens=-16384: must be at least 1"))
    runs = run_scripts([[sys.executable, "bench_attention.py", *args] for args, _ in cases],
                       cwd=ROOT, timeout=300)
    for (args, said), run in zip(cases, runs):
        assert run.returncode == 2 and run.stderr.strip() == said, (args, run.stderr[-2000:])

def test_bench_attention_switches_take_0_or_1():
    """--autotune and --q_lens are 0 or 1: --autotune=2 ran as on (the header said so), and was
    refused only by the missing GPU here; no option is taken by an abbreviation, and --quick
    takes no list of its own."""
    cases = ((["--autotune=2"], "argument --autotune: invalid choice: 2 (choose from 0, 1)"),
             (["--q_lens=-1"], "argument --q_lens: invalid choice: -1 (choose from 0, 1)"),
             # an abbreviation is refused as prepare.py refuses one (it was taken as --seqlens)
             (["--seq=512"], "unrecognized arguments: --seq=512"),
             # --quick sets both lists: a list given beside it was dropped without a word
             (["--quick", "--dims=128"], "bench_attention.py: --quick runs T = 1024, 4096 and "
                                         "D = 64; leave out --dims, or --quick"))
    runs = run_scripts([[sys.executable, "bench_attention.py", *args] for args, _ in cases],
                       cwd=ROOT, timeout=300)
    for (args, said), run in zip(cases, runs):
        assert run.returncode == 2 and said in run.stderr, (args, run.stderr[-2000:])

def test_bench_attention_header_names_versions_and_load(monkeypatch):
    """bench_attention.py's header (a GPU faked, its rows stand-ins) gives the GPU, the Python,
    torch and triton versions and the load average before the run, as the project asks of a
    benchmark (the load was missing)."""
    import argparse
    import bench_attention
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.25, 0.5, 1.0))
    figures = {(n, b): 1.0 for n in ("ours", "flash", "masked", "atomic", "split")
               for b in (False, True)}
    monkeypatch.setattr(bench_attention, "bench_row",
                        lambda args, D, T, *rest: dict(figures, B=1, err=0.0))
    args = argparse.Namespace(autotune=0, dtype="bfloat16", seed=0, tokens=1024, width=64,
                              q_lens=1, dims=[64], seqlens=[1024])
    header = bench_attention.benchmark(args)[0]
    assert header.startswith(f"GPU: Fake GPU, Python {sys.version.split()[0]}, torch "
                             f"{torch.__version__}, triton "), header
    assert "load average 0.25 at the start" in header, header

def test_bench_scripts_name_a_bad_fused_attention_setting_in_one_line():
    """A mistyped FUSED_ATTENTION* variable (docs/fused_attention.md) stops either bench script
    with the setting's own message in one line, before any work: it was a traceback, and
    FUSED_ATTENTION itself was read only at the first attention call (in bench_whisper_gpt.py's
    training part, a child's traceback under 'training benchmark of GPT-S failed')."""
    cases = (({"FUSED_ATTENTION_TMA": "true"}, ["bench_attention.py", "--ptxas", "--dims=16"],
              "bench_attention.py: fused_attention: FUSED_ATTENTION_TMA must be 0 or 1, got "
              "'true'"),
             ({"FUSED_ATTENTION": "Torch"}, ["bench_whisper_gpt.py", "--part=train", "--iters=1",
                                             "--batch_size=1"],
              "bench_whisper_gpt.py: fused_attention: backend (or env FUSED_ATTENTION) must be "
              "auto, triton or torch, got 'Torch'"),
             ({"FUSED_ATTENTION_BWD": "atomics"}, ["bench_whisper_gpt.py", "--part=generate"],
              "bench_whisper_gpt.py: fused_attention: FUSED_ATTENTION_BWD must be auto, atomic or "
              "split, got 'atomics'"))
    for env, args, said in cases:
        run = run_script([sys.executable, *args], cwd=ROOT, env=dict(os.environ, **env),
                         timeout=300)
        assert run.returncode == 2 and said in run.stderr, (env, run.stderr[-2000:])
        assert len(run.stderr.strip().splitlines()) == 1, (env, run.stderr[-2000:])

def test_bench_attention_under_the_interpreter_says_so_in_one_line():
    """TRITON_INTERPRET=1 (how the tests run the kernels on a CPU, docs/fused_attention.md) left
    set: --ptxas stopped with an AttributeError traceback from Triton; the GPU benchmark would
    time the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    for args in (["--ptxas", "--tiles=default", "--dims=16"], ["--quick"]):
        run = run_script([sys.executable, "bench_attention.py", *args], cwd=ROOT, env=env,
                         timeout=300)
        assert run.returncode == 2 and run.stderr.strip() == (
            "bench_attention.py: TRITON_INTERPRET=1 is set: the kernels would be Triton's "
            "interpreter's, which builds and times nothing of the GPU's; unset it"), \
            (args, run.stderr[-2000:])

def test_bench_whisper_gpt_reads_its_prompt_clip_before_the_training_part(synth_dir, tmp_path):
    """A val_clips.jsonl that is not JSON (or a clip whose rows are missing) stops
    bench_whisper_gpt.py before its training part, in one line naming the file: the prompt clip
    was read only by the generation part, after minutes of training."""
    data = tmp_path / "data"
    data.mkdir()
    for name in os.listdir(synth_dir):
        if name != "val_clips.jsonl":
            os.symlink(os.path.join(synth_dir, name), data / name)
    (data / "val_clips.jsonl").write_text("{cut short\n")
    run = run_script([sys.executable, "bench_whisper_gpt.py", "--iters=1", "--batch_size=1",
                      f"--data_dir={data}"], cwd=ROOT, timeout=600)
    assert run.returncode == 2 and run.stderr.startswith(
        f"sample.py: {data / 'val_clips.jsonl'}: line 1 is not JSON"), run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1 and "GPT-S" not in run.stdout, run.stdout

@pytest.mark.usefixtures("synth_c0")
def test_codebook0_mels_are_the_mel_of_codebook_0_decoded_alone(synth_dir):
    """prepare.codebook0_mels stores, aligned with the codes, the log-mel of each clip's codebook 0
    decoded alone: what the hybrid computes from its own output while generating;
    mel_source="codebook0" trains and evaluates on it."""
    import sample as S
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    tools = S.Tools(synth_dir)
    mel_c0 = np.fromfile(os.path.join(synth_dir, "val_mel_c0.bin"),
                         dtype=np.float16).reshape(-1, meta["n_mels"])
    assert len(mel_c0) == meta["splits"]["val"]["frames"]
    for i in (0, 3):
        inp, clip = S.read_clip(synth_dir, "val", i)
        want = tools.mel(tools.decode(inp["codes"][:, :1]).numpy())
        got = mel_c0[clip["offset"]:clip["offset"] + clip["frames"]].astype(np.float32)
        assert np.abs(got - want).max() < 2e-3                      # float16 storage
        # and not the mel of the real audio
        assert np.abs(got - inp["mel"].numpy()).mean() > 0.02
    data = W.load_data(synth_dir, W.Config(block_size=16, mel_source="codebook0"), None)
    assert np.array_equal(data["val"]["mel"], mel_c0)
    with pytest.raises(ValueError, match="mel_source='wav'"):
        W.load_data(synth_dir, W.Config(block_size=16, mel_source="wav"), None)

def test_a_split_of_block_size_plus_one_frames_gives_one_window(synth_dir):
    """block_size + 1 frames are the least a split needs (block_size inputs and their next tokens):
    with block_size = frames - 1, get_batch's only window is the whole split; with block_size =
    frames, the split is refused (one window does not fit) when read, by get_batch and evaluate."""
    n = len(W.load_data(synth_dir, W.Config(block_size=16), None)["val"]["codes"])
    data = W.load_data(synth_dir, W.Config(block_size=n - 1, use_mel=False), None)
    codes = np.asarray(data["val"]["codes"][:, 0]).astype(np.int64)
    b = W.get_batch(data, "val", 2, np.random.default_rng(0))
    for row in range(2):
        assert torch.equal(b["codes"][row], torch.from_numpy(codes[:-1]))
        assert torch.equal(b["targets"][row], torch.from_numpy(codes[1:]))
    for kw in ({"use_mel": False}, {}):
        too_long = W.load_data(synth_dir, W.Config(block_size=n, **kw), None)
        with pytest.raises(ValueError, match=f"has {n} frames, fewer than block_size \\+ 1"):
            W.get_batch(too_long, "val", 1, np.random.default_rng(0))
        with pytest.raises(ValueError, match=f"has {n} frames, fewer than block_size \\+ 1"):
            W.evaluate(tiny(), too_long, None, "val")

def test_kinds_are_read_with_spaces_around_the_commas(synth_dir):
    """kinds=" speech , events" (as typed after a comma on a command line) selects the same frames
    as kinds="speech,events"."""
    both = W.load_data(synth_dir, W.Config(block_size=16, kinds="speech,events"), None)
    spaced = W.load_data(synth_dir, W.Config(block_size=16, kinds=" speech , events "), None)
    for split in ("train", "val"):
        assert spaced[split]["unusable"] is None
        assert np.array_equal(spaced[split]["codes"], both[split]["codes"])
        assert np.array_equal(spaced[split]["mel"], both[split]["mel"])

def test_the_hybrid_learns_from_its_mels_what_the_tokens_alone_do_not(synth_dir, tmp_path):
    """The paper's claim in miniature: two models of the same transformer, one given the mel of the
    frame before each step (mel_lag=1) as well, trained alike on the test corpus's speech clips;
    the hybrid's NLL on all of the held-out speech windows is lower by a clear margin (0.23, 0.18,
    0.23 nats with seeds 1, 2, 3, torch 2.13)."""
    common = ["--model=whisper_gpt", f"--data_dir={synth_dir}", "--kinds=speech", "--seed=2",
              "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=16",
              "--max_iters=200", "--eval_interval=200", "--eval_iters=2", "--warmup_iters=20",
              "--learning_rate=3e-3", "--min_lr=3e-4", "--lr_decay_iters=200", "--dropout=0.0"]
    variants = {"tokens": ["--use_mel=False"],
                "hybrid": ["--use_mel=True", "--mel_n_layer=1", "--mel_n_head=2",
                           "--mel_n_embd=32", "--mel_dim=16", "--mel_lag=1"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "train.py", *common, *extra,
                                     f"--out_dir={tmp_path / name}"], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, extra in variants.items()}  # side by side: one thread each
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)  # read as it comes: a full pipe would stall the run
        assert p.returncode == 0, (name, err[-2000:])
    nll = {}
    for name in variants:
        ck = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        model = W.Model(W.Config(**ck["model_args"]))
        model.load_state_dict(ck["model"])
        data = W.load_data(synth_dir, model.config)
        nll[name] = W.evaluate(model, data, None, "val")["nll"]
    assert nll["hybrid"] < nll["tokens"] - 0.1, nll

@pytest.mark.parametrize("use_mel", [False, True])
def test_bench_recomputation_draws_what_the_kv_cache_draws(use_mel):
    """bench_whisper_gpt.py's recomputation does the KV cache's work, no less: from one seed both
    draw the same tokens (top-k 50), across two window restarts, and the hybrid asks for each mel
    frame once, in order, from the same tokens."""
    import bench_whisper_gpt as B
    torch.manual_seed(0)
    model = tiny(use_mel=use_mel, block_size=16, vocab_size=64)
    codes = torch.randint(0, 64, (1, 10))
    mels = torch.randn(1, 10 - model.config.mel_lag, model.config.n_mels) if use_mel else None

    def mel_fn(asked):  # a frame made from the tokens so far, and a record of what was asked
        def fn(seq, j):
            asked.append((j, seq[0, :j + model.config.mel_lag + 1].tolist()))
            return torch.sin(seq[:, j:j + 1].float() * torch.arange(model.config.n_mels))
        return fn
    asked_kv, asked_re = [], []
    kv = model.generate(codes, mels, 40, 1.0, 50, mel_fn(asked_kv) if use_mel else None,
                        torch.Generator().manual_seed(3))
    re = B.generate_recompute(model, codes, mels, 40, mel_fn(asked_re) if use_mel else None,
                              torch.Generator().manual_seed(3))
    assert torch.equal(kv, re), (kv, re)
    assert asked_kv == asked_re and ([j for j, _ in asked_kv] == list(range(9, 9 + 39))
                                     if use_mel else not asked_kv)

def test_bench_training_figures_from_a_known_clock(monkeypatch):
    """bench_whisper_gpt.train_one on a tiny model, its clock replaced: after a warm-up of 10 s,
    iterations of 1, 2 and 6 s give their median, 2 s (not 4, with the warm-up counted), and
    batch * block_size / 2 tokens/s. Its peak memory on a CPU is the process's peak resident
    size, as /proc reports it."""
    import resource
    import types
    import bench_whisper_gpt as B
    # the warm-up starts at 0 and ends at 10 (not read: untimed); then 1, 2 and 6 s
    ticks = iter([0, 10, 11, 11, 13, 13, 19, 25])
    monkeypatch.setattr(B, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(B, "model_config", lambda name: W.Config(
        block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, use_mel=False))
    for name, value in (("batch_size", 2), ("iters", 3), ("device", "cpu")):
        monkeypatch.setattr(B, name, value)
    r = B.train_one("s")
    assert r["s_per_iter"] == 2 and r["tokens_per_s"] == 2 * 8 / 2
    if os.path.exists("/proc/self/status"):  # Linux: the resident peak, in MB
        hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
                   if line.startswith("VmHWM:")) / 1024  # kB -> MB
        assert 0.9 * hwm <= r["peak_mb"], (r["peak_mb"], hwm)
        assert r["peak_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1

def test_bench_whisper_gpt_names_the_device_versions_and_load(monkeypatch):
    """The header of bench_whisper_gpt.py's figures names the CPU (it said "device cpu"), the
    versions, and the load average before the run (the figures swing with what else runs)."""
    import bench_whisper_gpt as B
    monkeypatch.setattr(B, "device", "cpu")
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    line = B.conditions()
    assert f"Python {sys.version.split()[0]}, torch {torch.__version__}" in line, line
    assert "load average 1.50 at the start" in line, line
    if os.path.exists("/proc/cpuinfo"):
        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                      if l.startswith("model name")), "unknown CPU")
        assert f"device cpu ({model})" in line, line

def test_bench_whisper_gpt_reads_its_configs_from_any_folder(tmp_path, monkeypatch):
    """bench_whisper_gpt.py run from another folder (python /path/to/bench_whisper_gpt.py
    --part=train) read config/whisper_gpt_s.py relative to that folder: a FileNotFoundError
    traceback."""
    import bench_whisper_gpt as B
    monkeypatch.chdir(tmp_path)
    assert B.model_config("s").block_size == 256

def bench_generation_on_a_fake_clock(monkeypatch, synth_dir, took, repeats, mel_seconds):
    """bench_whisper_gpt.generate_table's lines, its generation replaced by stand-ins that take
    took[(model, way)]'s seconds per call, in order, on a fake clock, mel_seconds of each hybrid
    call spent in the per-step mel."""
    import types
    import bench_whisper_gpt as B
    now = [0.0]
    monkeypatch.setattr(B, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def mel_fn(seq, j):
        now[0] += mel_seconds
        return None

    def stand_in(way):
        def run(model, codes, mels, n, *args, **kw):
            name = "hybrid" if model.config.use_mel else "s"
            if mels is not None:  # the mel_fn it is given: bench's timed wrapper of ours
                (kw.get("mel_fn") or next(a for a in args if callable(a)))(None, 0)
            now[0] += took[(name, way)].pop(0) - (mel_seconds if mels is not None else 0)
            return torch.cat([codes, torch.zeros(1, n, dtype=codes.dtype)], 1)
        return run
    monkeypatch.setattr(W.Model, "generate", stand_in("kv"))
    monkeypatch.setattr(B, "generate_recompute", stand_in("re"))
    monkeypatch.setattr(W, "incremental_mel", lambda tools, lag: mel_fn)
    monkeypatch.setattr(B, "model_config", lambda name: W.Config(
        block_size=16, vocab_size=1024, n_layer=1, n_head=2, n_embd=16, mel_n_layer=1,
        mel_n_head=2, mel_n_embd=16, mel_dim=8, use_mel=name == "hybrid"))
    for name, value in (("data_dir", synth_dir), ("new_tokens", 10), ("repeats", repeats),
                        ("device", "cpu")):
        monkeypatch.setattr(B, name, value)
    return B.generate_table()

def test_bench_generation_table_from_a_known_clock(synth_dir, monkeypatch):
    """bench_whisper_gpt.generate_table with the generation replaced by stand-ins that take a known
    time on a fake clock (0.5 s of it the per-step mel of the hybrid): each row is the median of
    three repeats, its tokens/s new_tokens over that whole time, its min-max and mel share; the
    summary lines are recomputation's time over the KV cache's and the hybrid's over the token-only
    model's, each of the median runs."""
    # seconds per call, the untimed warm-up calls first (the hybrid's two: one per codec)
    took = {("s", "kv"): [0, 2, 1, 9], ("s", "re"): [30, 20, 40],
            ("hybrid", "kv"): [0, 0, 3, 5, 4, 10, 6, 7], ("hybrid", "re"): [100, 60, 80]}
    lines = bench_generation_on_a_fake_clock(monkeypatch, synth_dir, took, 3, 0.5)
    rows = [l for l in lines if l.startswith("| GPT-S |") or l.startswith("| Hybrid |")]
    assert rows == ["| GPT-S | KV cache | 5.0 | 2.00 | 1.00-9.00 | - |",
                    "| GPT-S | recompute | 0.3 | 30.00 | 20.00-40.00 | - |",
                    "| Hybrid | KV cache | 2.5 | 4.00 | 3.00-5.00 | 0.5 s (12%) |",
                    "| Hybrid | recompute | 0.1 | 80.00 | 60.00-100.00 | 0.5 s (1%) |",
                    "| Hybrid | KV cache, dense codec | 1.4 | 7.00 | 6.00-10.00 | 0.5 s (7%) |"]
    # 10 tokens at 75 frames/s: not "0 s of audio"
    assert lines[0].startswith("Generation (10 new tokens = 0.133 s of audio after a 1 s prompt")
    assert "- GPT-S: KV cache at 15.0x recomputation's speed (goal >= 10x)" in lines
    assert "- Hybrid: KV cache at 20.0x recomputation's speed (goal >= 10x)" in lines
    assert ("- hybrid / token-only decode time, KV cache, per-step mel included: 2.00x (goal <= "
            "2x); with a dense codec (a pretrained EnCodec's cost): 3.50x") in lines

def test_get_batch_draws_every_window_start_and_no_other():
    """Every start from which block_size + 1 frames fit (0 .. n - block_size - 1) is drawn, and
    none past it: with codebook 0 = the frame index, the first code of a window is its start.
    Catches a draw bound one off (the last window never trained on, or a short window)."""
    T, n = 4, 7
    frames = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.uint16)  # (n, n_q=2)
    data = {"block_size": T, "use_mel": False,
            "train": {"codes": frames, "mel": None, "unusable": None}}
    b = W.get_batch(data, "train", 300, np.random.default_rng(0))
    assert set(b["codes"][:, 0].tolist()) == set(range(n - T))
    assert torch.equal(b["codes"], b["codes"][:, :1] + torch.arange(T))
    assert torch.equal(b["targets"], b["codes"] + 1)

def test_residual_projections_start_scaled_by_their_own_stacks_depth():
    """GPT-2's init, as the model file says: every Linear and Embedding N(0, 0.02), but each
    residual projection (c_proj) 0.02 / sqrt(2 * layers of its own stack): n_layer for the main
    decoder, mel_n_layer for the mel decoder; mel_out 0.02 / sqrt(mel_n_embd). Measured on large
    enough matrices (>= 16k weights: the std is known to ~1 %; mel_out's 2k to ~2 %)."""
    torch.manual_seed(0)
    c = W.Config(block_size=8, vocab_size=256, n_layer=3, n_head=2, n_embd=128, n_mels=8,
                 mel_n_layer=1, mel_n_head=2, mel_n_embd=128, mel_dim=16)
    model = W.Model(c)
    for name, p in model.named_parameters():
        if p.dim() < 2 or p.numel() < 16384:
            continue
        if name.endswith("c_proj.weight"):
            layers = c.mel_n_layer if name.startswith("mel_") else c.n_layer
            want = 0.02 / math.sqrt(2 * layers)
        else:
            want = 0.02
        assert abs(p.std().item() / want - 1) < 0.05, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.05 * want, name
    # mel_out is smaller (16 x 128 = 2048 weights: its std known to ~2 %)
    w = model.mel_out.weight
    assert w.numel() == 2048 and abs(w.std().item() / (0.02 / math.sqrt(c.mel_n_embd)) - 1) < 0.1

def test_load_data_warns_when_mel_lag_is_below_the_leak_free_lag(synth_dir, capsys):
    """load_data warns about the leaky alignment exactly when the hybrid's mel_lag is below
    leak_free_lag(meta) (step t would see audio of the token it predicts); not at that lag or
    above, and never for the token-only model."""
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    needed = W.leak_free_lag(meta)
    assert needed >= 1  # the test corpus's framing looks ahead: mel_lag=0 leaks
    for use_mel, lag in [(True, l) for l in range(needed + 2)] + [(False, 0)]:
        W.load_data(synth_dir, W.Config(block_size=32, use_mel=use_mel, mel_lag=lag), None)
        warned = "warning: mel_lag=" in capsys.readouterr().out
        assert warned == (use_mel and lag < needed), (use_mel, lag, needed)

def test_eval_mean_rows_leave_out_a_metric_that_fewer_than_two_runs_have(monkeypatch, capsys):
    """A metric one run has and the other does not (or has as None): no mean or spread of it, "-"
    in those rows, and the metrics both have are averaged as usual."""
    import eval as E
    monkeypatch.setattr(E, "mean", True)
    rows = [{"run": "a", "model": "m", "params": 1e6, "iters": 1, "data": "d", "nll": 1.0,
             "bleu": 0.5, "wer": None},
            {"run": "b", "model": "m", "params": 1e6, "iters": 1, "data": "d", "nll": 2.0,
             "wer": 0.25}]
    means = E.mean_rows(rows)
    assert [sorted(r) for r in means] == [["nll", "run"], ["nll", "run"]]
    assert means[0]["nll"] == 1.5 and abs(means[1]["nll"] - math.sqrt(0.5)) < 1e-12
    E.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == "| mean (2 runs) | | | 1.5000 | - | - |"

def test_eval_cells_of_large_values_take_one_decimal():
    """fmt_cell: a float of 100 or more (an untrained model's perplexity) to one decimal, below
    that to four; accuracy in percent; an int as it is; None as "-"."""
    import eval as E
    assert E.fmt_cell("ppl", 1023.98765) == "1024.0"
    assert E.fmt_cell("ppl", -250.25) == "-250.2"
    assert E.fmt_cell("ppl", 99.99994) == "99.9999"
    assert E.fmt_cell("accuracy", 0.123456) == "12.35%"
    assert E.fmt_cell("tokens", 4096) == "4096" and E.fmt_cell("nll", None) == "-"

def test_table_evaluation_key_follows_checkpoint_and_data(tmp_path):
    """A kept evaluation is reused only for the same checkpoint file and the same data: a
    re-prepared corpus (another meta.json) or other codebook-0 mels in the same folder, or a new
    checkpoint, is another key. (Within one call of the script each file is read once, hence the
    cache_clear: a new call is a new process.)"""
    import whisper_gpt_table as WT
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    (run / "ckpt.pt").write_bytes(b"weights")
    (data / "meta.json").write_text('{"n_mels": 64}')

    def key():
        WT.file_digest.cache_clear()
        return WT.evaluation_key(str(run), str(data))
    first = key()
    assert key() == first
    (data / "meta.json").write_text('{"n_mels": 80}')
    second = key()
    assert second != first
    (data / "val_mel_c0.bin").write_bytes(b"\0" * 8)
    third = key()
    assert third != second
    (data / "val_mel_c0.bin").write_bytes(b"\1" * 8)
    assert key() != third
    fourth = key()
    (run / "ckpt.pt").write_bytes(b"other weights")
    assert key() != fourth

def test_table_sweep_resumes_a_run_stopped_before_its_max_iters(tmp_path, monkeypatch, capsys):
    """whisper_gpt_table.sweep on a run at its max_iters (skipped) and the same recipe's run
    stopped short of it (an interrupted sweep): the stopped one is trained again with
    --init_from=resume, not tabled half-trained. Finished runs asked for more iterations are
    refused where the learning rate decays until max_iters, resumed where it does not. train.py is
    not run: the processes the sweep starts are recorded."""
    import train
    import whisper_gpt_table as WT
    monkeypatch.setattr(WT, "out_root", str(tmp_path))
    monkeypatch.setattr(WT, "data_dir", "data/synth")
    runs = [("s", "speech", 1), ("s", "speech", 2)]

    def saved(model, kind, seed, extra=()):
        d = WT.run_dir(model, kind, seed)
        return train.load_settings([f"config/whisper_gpt_{model}_cpu.py", f"--out_dir={d}",
                                    "--data_dir=data/synth", f"--kinds={kind}", f"--seed={seed}",
                                    "--device=cpu", *extra, "--always_save_checkpoint=True"])[0]
    max_iters = saved(*runs[0])["max_iters"]
    at = {WT.run_dir(*runs[0]): max_iters, WT.run_dir(*runs[1]): max_iters - 1}
    monkeypatch.setattr(WT, "checkpoint_state",
                        lambda d: (at[d], saved(*next(r for r in runs if WT.run_dir(*r) == d))))
    started = []

    class Done:
        returncode = 0

        def __init__(self, cmd, **kw):
            started.append(cmd)

        def poll(self):
            return 0
    monkeypatch.setattr(WT.subprocess, "Popen", Done)
    monkeypatch.chdir(ROOT)
    WT.sweep(runs, [])
    assert "1 of 2 runs already finished, 1 to train" in capsys.readouterr().out
    assert len(started) == 1
    assert f"--out_dir={WT.run_dir(*runs[1])}" in started[0] and "--init_from=resume" in started[0]
    # both finished at max_iters, asked for one more: refused while the learning rate decays
    # until max_iters, resumed when it does not depend on it
    at = {d: max_iters for d in at}
    for extra, resumed in (([], False), (["--decay_lr=False"], True),
                           (["--lr_decay_iters=10"], True)):
        monkeypatch.setattr(WT, "checkpoint_state", lambda d: (at[d], saved(
            *next(r for r in runs if WT.run_dir(*r) == d), extra)))
        started.clear()
        more = extra + [f"--max_iters={max_iters + 1}"]
        if resumed:
            WT.sweep(runs, more)
            assert len(started) == 2 and all("--init_from=resume" in c for c in started)
        else:
            with pytest.raises(SystemExit):
                WT.sweep(runs, more)
            assert "fewer than max_iters" in capsys.readouterr().err

def test_table_sweep_adds_a_resumed_runs_earlier_wall_time_and_starts_gpt_l_first(
        tmp_path, monkeypatch):
    """wall.json counts a run's training over every sweep that trained it: a run with 100 s from
    an earlier (interrupted) sweep ends with those 100 s and this sweep's, a new run with this
    sweep's only. GPT-L's runs, the longest, start first (the sweep ends sooner). train.py is not
    run: the processes the sweep starts are recorded, and end at once."""
    import whisper_gpt_table as WT
    monkeypatch.setattr(WT, "out_root", str(tmp_path))
    monkeypatch.setattr(WT, "jobs", 1)
    monkeypatch.setattr(WT, "checkpoint_state", lambda d: None)
    monkeypatch.setattr(WT.time, "sleep", lambda s: None)
    started = []

    class Done:
        returncode = 0

        def __init__(self, cmd, **kw):
            started.append(next(a for a in cmd if a.startswith("--out_dir=")))

        def poll(self):
            return 0
    monkeypatch.setattr(WT.subprocess, "Popen", Done)
    runs = [("s", "speech", 1), ("l", "speech", 1), ("hybrid", "speech", 1)]
    earlier = WT.run_dir("s", "speech", 1)
    os.makedirs(earlier)
    WT.write_json(os.path.join(earlier, "wall.json"), {"seconds": 100.0})
    WT.sweep(runs, [])
    assert started == [f"--out_dir={WT.run_dir(*r)}" for r in (runs[1], runs[0], runs[2])]
    assert 100 - 1e-3 <= WT.read_wall(earlier) < 130
    assert 0 <= WT.read_wall(WT.run_dir("hybrid", "speech", 1)) < 30

def test_table_paper_rows_are_the_papers_table_1():
    """The six paper rows as Verma (2024) Table 1 prints them; where the paper's PPL is exp(NLL)
    to its two decimals (all rows but LibriSpeech's hybrid), so is the row's."""
    import whisper_gpt_table as WT
    lines = WT.table({}, [], [], [], [], "d")
    assert [l for l in lines if l.startswith("| paper, ")] == [
        "| paper, LibriSpeech | GPT-S | 3.7M | 2.02 | 34.18% | 7.54 | |",
        "| paper, LibriSpeech | GPT-L | 40M | 1.94 | 34.82% | 6.96 | |",
        "| paper, LibriSpeech | Hybrid | 4M | 1.93 | 35.05% | 6.96 | |",
        "| paper, music | GPT-S | 3.7M | 2.78 | 34.96% | 16.12 | |",
        "| paper, music | GPT-L | 40M | 2.77 | 35.72% | 15.96 | |",
        "| paper, music | Hybrid | 4M | 2.52 | 38.47% | 12.43 | |"]
    for kind, model, _, nll, _, ppl in WT.PAPER:
        if (kind, model) != ("LibriSpeech", "Hybrid"):
            assert abs(math.exp(nll) - ppl) < 0.02, (kind, model)

def test_table_times_are_minutes_and_seconds_below_an_hour_hours_and_minutes_from_one():
    import whisper_gpt_table as WT
    assert [WT.fmt_time(s) for s in (0, 59.9, 61, 3599, 3600, 3661, 90000)] == [
        "0m00s", "0m59s", "1m01s", "59m59s", "1h00m", "1h01m", "25h00m"]

def test_table_claims_a_tie_is_not_a_win():
    """A seed where the hybrid's NLL equals the other model's is not counted as lower."""
    import whisper_gpt_table as WT
    results = {(m, "speech", 1): {"nll": 2.0, "accuracy": 0.3, "ppl": math.exp(2.0), "wall": None,
                                  "params": 1e6, "iters": 3} for m in ("s", "hybrid")}
    lines = WT.table(results, ["s", "hybrid"], ["speech"], [1], [], "d")
    assert ("- speech: the hybrid beats GPT-S of its size? NLL Hybrid - GPT-S = +0.000 (lower in "
            "0 of 1 seed)") in lines, lines

def test_table_evaluation_key_follows_each_scoring_code_file(tmp_path, monkeypatch):
    """A kept evaluation is redone when any of the code that scores it changes: the model file,
    its attention, the data contract, and this script itself."""
    import whisper_gpt_table as WT
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    (run / "ckpt.pt").write_bytes(b"weights")
    (data / "meta.json").write_text('{"n_mels": 64}')
    changed = [None]
    monkeypatch.setattr(WT, "code_digest", lambda p: "new" if os.path.basename(p) == changed[0]
                        else "old")
    base = WT.evaluation_key(str(run), str(data))
    for name in ("whisper_gpt.py", "fused_attention.py", "audio.py", "whisper_gpt_table.py"):
        changed[0] = name
        assert WT.evaluation_key(str(run), str(data)) != base, name

def test_bench_attention_counts_the_visible_query_key_pairs():
    """useful_flops: 4*D FLOPs per head per (query, key) pair a query sees, counted here pair by
    pair: all n*n of a row of n positions, or the n(n+1)/2 with key <= query when causal."""
    import bench_attention as BA
    lens = torch.tensor([3, 1, 4])
    for causal in (False, True):
        pairs = sum(1 for n in lens.tolist() for i in range(n) for j in range(n)
                    if j <= i or not causal)
        assert BA.useful_flops(2, 8, lens, causal) == 4 * 2 * 8 * pairs, causal

def test_bench_attention_rows_are_ours_over_theirs(monkeypatch):
    """bench_attention.benchmark with the GPU timings replaced by known TFLOP/s: each row's ratios
    are ours over FlashAttention's and over masked SDPA's (> 1: ours is faster), the backward's
    from the faster of atomic and split (an OOM's nan skipped); a mixed batch needs two sequences,
    so at B*T = T there are no mixed rows."""
    import argparse
    import fused_attention
    import bench_attention as BA
    monkeypatch.setattr(fused_attention, "AUTOTUNE", fused_attention.AUTOTUNE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    tflops = {("ours", False): 200.0, ("flash", False): 100.0, ("masked", False): 50.0,
              ("atomic", True): 150.0, ("split", True): float("nan"), ("flash", True): 100.0,
              ("masked", True): 300.0}
    monkeypatch.setattr(BA, "bench_row", lambda args, D, T, causal, mixed, rng, dtype: dict(
        tflops, B=args.tokens // T, err=1e-3))
    args = argparse.Namespace(dims=[64], seqlens=[1024], tokens=1024, width=128,
                              dtype="bfloat16", autotune=0, seed=0, q_lens=1)
    rows = [l for l in BA.benchmark(args) if l.startswith("| 64 |")]
    assert rows == [f"| 64 | {c} | uniform | 1024 | 1 | 200 | 100 | 50 | 2.00 | 4.00 | 150 | nan "
                    f"| 100 | 300 | 1.50 | 0.50 | 1.0e-03 |" for c in ("no", "yes")]

def test_scripts_refuse_bad_counts_and_lists_before_any_work(tmp_path):
    """One line, exit 2, before any work: an empty or repeated entry of the table's lists, a
    hybrid's prompt shorter than the codec decoder's first conv (7 frames), bench_whisper_gpt.py's
    --repeats below 1 or an unknown --part, bench_attention.py's --width below 1."""
    nowhere = f"--data_dir={tmp_path / 'nowhere'}"
    table = ["whisper_gpt_table.py", nowhere, f"--out_root={tmp_path / 'runs'}"]
    cases = ((table + ["--kinds=speech,"], "whisper_gpt_table.py: --kinds=speech,: each at most "
                                           "once, none empty"),
             (table + ["--models=s,hybrid", "--prompt_frames=6"],
              "whisper_gpt_table.py: --prompt_frames=6: must be at least 7"),
             (["bench_whisper_gpt.py", "--repeats=0", nowhere],
              "bench_whisper_gpt.py: --repeats=0: must be at least 1"),
             (["bench_whisper_gpt.py", "--part=nope", nowhere],
              "bench_whisper_gpt.py: --part=nope: expected all, train or generate"),
             (["bench_attention.py", "--width=0"],
              "bench_attention.py: --width=0: must be at least 1"))
    runs = run_scripts([[sys.executable, *args] for args, _ in cases], cwd=ROOT, timeout=300)
    for (args, said), run in zip(cases, runs):
        assert run.returncode == 2 and said in run.stderr, (args, run.stderr[-2000:])
        assert len(run.stderr.strip().splitlines()) == 1, (args, run.stderr[-2000:])
    assert not (tmp_path / "runs").exists()

def test_bench_generation_an_even_number_of_repeats_reports_the_faster_middle_run(
        synth_dir, monkeypatch):
    """With two repeats each row's time is the faster one (the lower of the two middle runs), as
    the docstring says, not the slower."""
    # seconds per call, the untimed warm-up calls first (the hybrid's two: one per codec)
    took = {("s", "kv"): [0, 2, 1], ("s", "re"): [30, 20],
            ("hybrid", "kv"): [0, 0, 3, 5, 10, 6], ("hybrid", "re"): [100, 60]}
    lines = bench_generation_on_a_fake_clock(monkeypatch, synth_dir, took, 2, 0.0)
    assert "| GPT-S | KV cache | 10.0 | 1.00 | 1.00-2.00 | - |" in lines, lines
    assert ("| Hybrid | KV cache, dense codec | 1.7 | 6.00 | 6.00-10.00 | 0.0 s (0%) |"
            in lines), lines
