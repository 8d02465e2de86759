"""Whisper-GPT: causality, sizes, learning, KV cache, data windows, metrics, sampling."""

import math
import os
import runpy

import numpy as np
import pytest
import torch

import whisper_gpt as W

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
    return torch.randint(0, c.vocab_size, (B, T), generator=g), torch.randn(B, T, c.n_mels, generator=g)

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
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)  # the change is seen later
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

def config_model_args(name):
    """The model fields a config file sets (block_size, n_layer, ...), as train.py would take them."""
    ns = runpy.run_path(os.path.join(ROOT, "config", name))
    keys = {f for f in W.Config.__dataclass_fields__}
    return {k: v for k, v in ns.items() if k in keys}

@pytest.mark.parametrize("name,lo,hi", [("whisper_gpt_s.py", 3.6e6, 3.8e6),      # paper: 3.7M
                                        ("whisper_gpt_l.py", 39e6, 41.5e6),      # paper: 40M
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
        full_mels = torch.cat([mels] + [mel_of(seq[:, j])[:, None] for j in range(mels.size(1), seq.size(1))], 1)
        logits, _ = model(seq[:, start:], full_mels[:, start:])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        if seq.size(1) - 1 - start >= bs:
            start = seq.size(1) - bs // 2
    return seq

@pytest.mark.parametrize("use_mel,lag", [(False, 1), (True, 1), (True, 0), (True, 3)])
def test_kv_cache_generation_equals_full_recompute(use_mel, lag):
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
    out = model.generate(codes, mels if use_mel else None, n, temperature=0, mel_fn=mel_fn if use_mel else None)
    ref = reference_generate(model, codes, mels, n, mel_of)
    assert out.shape == (1, 10 + n)
    assert torch.equal(out, ref)
    if use_mel:
        assert calls == list(range(10, 10 + n - 1 - lag))

def test_sampling_options_and_top_k():
    model = tiny(use_mel=False)
    codes, _ = inputs(model, B=1, T=5)
    g = torch.Generator().manual_seed(0)
    out = model.generate(codes, None, 30, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(out, model.generate(codes, None, 30, temperature=0))  # top_k=1 is greedy
    a = model.generate(codes, None, 30, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(codes, None, 30, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a[0, 5:].tolist())) > 5

class FakeTools:
    """decode: codes (T, k) -> T * 320 samples whose level encodes the code; mel: frame = mean level."""

    def __init__(self):
        self.decoded = []

    def decode(self, codes):
        self.decoded.append(tuple(codes.shape))
        return codes[:, 0].float().repeat_interleave(320) / 100

    def mel(self, wav):
        return wav.view(-1, 320).mean(1, keepdim=True).repeat(1, 8).numpy()

@pytest.mark.parametrize("use_mel", [False, True])
def test_sample_interface(use_mel):
    model = tiny(use_mel=use_mel, block_size=32)
    codes = torch.randint(0, 50, (40, 8))
    audio = {"codes": codes, "mel": torch.randn(40, 8)}
    tools = FakeTools()
    out = W.sample(model, None, audio, None, tools, max_new_tokens=20, temperature=0.8, top_k=10, mel_context=6, seed=0)
    assert out["codes"].shape == (20, 1) and out["codes"].dtype == torch.long
    again = W.sample(model, None, audio, None, FakeTools(), max_new_tokens=20, temperature=0.8, top_k=10, mel_context=6, seed=0)
    assert torch.equal(out["codes"], again["codes"])
    if use_mel:
        # the mel of generated audio comes from decoding only a short recent window per new frame
        assert len(tools.decoded) == 20 - 1 - model.config.mel_lag
        assert all(shape == (6, 1) for shape in tools.decoded)
    else:
        assert tools.decoded == []
    with pytest.raises(ValueError, match="unknown option"):
        W.sample(model, None, audio, None, tools, beam=4)
    with pytest.raises(ValueError, match="no text prompt"):
        W.sample(model, None, audio, "hello", tools)

def test_incremental_mel_matches_full_decode():
    """sample()'s mel of the newest frame (decode a short window) equals the mel of the whole
    decoded sequence, for a decoder/mel with limited context (here: exact)."""
    model = tiny(use_mel=True, mel_lag=1)
    tools = FakeTools()
    seen = []
    orig = model.generate

    def spy(codes, mels, n, temperature, top_k, mel_fn, generator):
        def wrapped(seq, j):
            m = mel_fn(seq, j)
            full = tools.mel(tools.decode(seq[0, :, None]))
            seen.append(torch.allclose(m[0], torch.as_tensor(full[j]), atol=1e-6))
            return m
        return orig(codes, mels, n, temperature, top_k, wrapped, generator)

    model.generate = spy
    W.sample(model, None, {"codes": torch.randint(0, 50, (10, 8)), "mel": torch.randn(10, 8)}, None, tools,
             max_new_tokens=12, mel_context=4, seed=0)
    assert len(seen) == 10 and all(seen)

# -----------------------------------------------------------------------------
# on the prepared corpus (tests/conftest.py builds it once per session)

def test_batches_and_metrics_on_prepared_data(synth_dir):
    cfg = W.Config(block_size=32, n_layer=1, n_head=2, n_embd=32, mel_n_layer=1, mel_n_head=2, mel_n_embd=16, mel_dim=8)
    data = W.load_data(synth_dir, cfg, None)
    meta = data["meta"]
    assert cfg.vocab_size == meta["codebook_size"] and cfg.n_mels == meta["n_mels"]
    assert W.leak_free_lag(meta) <= cfg.mel_lag
    codes = np.fromfile(os.path.join(synth_dir, "train_codes.bin"), dtype=np.uint16).reshape(-1, meta["n_q"])
    mel = np.fromfile(os.path.join(synth_dir, "train_mel.bin"), dtype=np.float16).reshape(-1, meta["n_mels"])
    rng = np.random.default_rng(0)
    b = W.get_batch(data, "train", 4, rng)
    assert b["codes"].shape == (4, 32) and b["targets"].shape == (4, 32) and b["mels"].shape == (4, 32, meta["n_mels"])
    assert torch.equal(b["codes"][:, 1:], b["targets"][:, :-1])
    for row in range(4):  # each row is a window of the codebook-0 stream with its own mel frames
        starts = [s for s in np.flatnonzero(codes[:len(codes) - 32, 0] == b["codes"][row, 0].item())
                  if np.array_equal(codes[s:s + 33, 0], np.r_[b["codes"][row].numpy(), b["targets"][row, -1].item()])]
        assert starts, "window not found in train_codes.bin"
        assert any(np.array_equal(mel[s:s + 32].astype(np.float32), b["mels"][row].numpy()) for s in starts)
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

def test_windowed_decode_gives_the_full_decode_mel(synth_dir):
    """The hybrid's incremental mel (decode the last mel_context frames of codebook 0, take the mel
    frame whose window ends inside them) matches the mel of the whole decoded clip, with the data's codec."""
    import sample as S
    tools = S.Tools(synth_dir)
    inp, _ = S.read_clip(synth_dir, "val", 0)
    codes = inp["codes"][:60, :1]
    full = torch.as_tensor(tools.mel(tools.decode(codes)))
    assert full.shape == (60, 64)
    lag, context = 1, W.SAMPLE_OPTS["mel_context"]
    for j in (30, 45, 57):
        end = j + lag + 1  # codes up to frame j + lag exist when step j + lag needs mel frame j
        s = end - context
        m = torch.as_tensor(tools.mel(tools.decode(codes[s:end])))[j - s]
        # not exact: the codec decoder's LSTM carries state from before the window (0.02 = 0.3 dB of log-mel)
        assert (m - full[j]).abs().max() < 0.02, (j, (m - full[j]).abs().max())
