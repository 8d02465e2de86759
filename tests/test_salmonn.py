"""SALMONN: shapes, Q-Former windows, frozen LLM + LoRA, loss masking, checkpoint loading, decoding,
metrics, and a CPU-sized pipeline that learns to transcribe held-out keypad numbers."""

import ctypes
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salmonn
import tokenizer
from salmonn import SALMONN, SALMONNConfig, n_audio_tokens

# most tests build stage 1 from random parts on purpose (test_stage1_without_parts_warns checks it)
pytestmark = pytest.mark.filterwarnings("ignore:salmonn. .*empty, so stage 1")

torch.set_num_threads(min(2, torch.get_num_threads()))

def tiny_config(**kw):
    cfg = dict(vocab_size=61, n_mels=64, speech_n_layer=1, speech_n_head=2, speech_n_embd=32,
               beats_n_layer=1,
               beats_n_head=2, beats_n_embd=16, qformer_n_layer=2, qformer_n_head=2,
               qformer_n_embd=24,
               window_frames=4, window_queries=2, llm_n_layer=2, llm_n_head=2, llm_n_embd=32,
               llm_block_size=64, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
    cfg.update(kw)
    return SALMONNConfig(**cfg)

def random_batch(cfg, lens=(37, 20), T=40, seed=0):
    """Token ids with each clip's audio slots after 3 prompt tokens, answer targets on the last 5
    positions."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    mel = torch.randn(B, max(lens), cfg.n_mels, generator=g)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    audio_mask = torch.zeros(B, T, dtype=torch.bool)
    targets = torch.full((B, T), -1)
    for b, n in enumerate(lens):
        audio_mask[b, 3:3 + n_audio_tokens(n, cfg)] = True
        targets[b, -5:] = torch.randint(0, cfg.vocab_size, (5,), generator=g)
    return dict(idx=idx, targets=targets, mel=mel, mel_lens=torch.tensor(lens),
                audio_mask=audio_mask)

def save_part(model, path):
    """A checkpoint as train.py saves one, the fields *_init reads: weights, model name, config."""
    torch.save({"model": model.state_dict(), "model_name": "salmonn",
                "model_args": asdict(model.config)}, path)

def build(cfg, tok=None):
    """As train.py builds a fresh model: the *_init files' sizes into the config, the model, then
    their weights."""
    salmonn.set_pretrained_dims(cfg)
    m = SALMONN(cfg)
    salmonn.init_pretrained(m, tok)
    return m

class ByteTokenizer:
    """A stand-in for the tiktoken encoding: bytes are tokens, 256 is the end token."""
    eot_token, n_vocab = 256, 257

    def encode(self, text, allowed_special=()):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

class ByteTokenizerEot60(ByteTokenizer):
    """For the tiny configs' 61-token vocab: bytes folded into 0..59, 60 ends."""
    eot_token, n_vocab = 60, 61

    def encode(self, text, allowed_special=()):
        return [b % 60 for b in text.encode()]

# -----------------------------------------------------------------------------
# shapes and the Q-Former

def test_shapes_through_every_part():
    torch.manual_seed(0)
    cfg = tiny_config(cache_encoders=False)  # the encoders see each batch as it is
    m = SALMONN(cfg)
    batch = random_batch(cfg)
    mel, lens = batch["mel"], batch["mel_lens"]
    s, enc_lens = m.speech(mel, lens)
    assert s.shape == (2, 19, 32) and enc_lens.tolist() == [19, 10]  # stride 2: ceil(T / 2)
    a = m.beats(mel, lens)
    assert a.shape == (2, 19, 16)  # patches pooled per time step: aligned with the speech stream
    q, valid = m.qformer(torch.cat([m.ln_speech(s), m.ln_audio(a)], -1), enc_lens)
    assert q.shape == (2, 5 * 2, 24)  # ceil(19 / 4) windows x 2 queries
    assert valid.sum(1).tolist() == [n_audio_tokens(37, cfg), n_audio_tokens(20, cfg)] == [10, 6]
    audio, valid2 = m.encode_audio(mel, lens)
    assert audio.shape == (2, 10, 32) and torch.equal(valid, valid2)
    logits, loss = m(**batch)
    assert logits.shape == (2, 40, 61) and loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(61)) < 0.5  # near uniform at init
    logits, loss = m(batch["idx"], None, mel, lens, batch["audio_mask"])
    assert logits.shape == (2, 1, 61) and loss is None
    # padding changes nothing: the short clip alone gives the same audio tokens
    alone, _ = m.encode_audio(mel[1:, :20], lens[1:])
    assert torch.allclose(alone[0], audio[1, :6], atol=1e-5)

def test_encoders_through_the_triton_kernels_match_pytorch_attention():
    """On a GPU the encoders' padded self-attention runs our Triton kernels (k_lens and q_lens);
    run under Triton's interpreter, they give what PyTorch's attention gives, outputs and
    gradients, padding frames included."""
    from test_fused_attention import skip_if_interpreter_too_old
    script = """
import torch, salmonn, fused_attention as fa
torch.manual_seed(0)
mel, lens = torch.randn(3, 150, 64), torch.tensor([150, 61, 97])
for m in (salmonn.SpeechEncoder(64, 64, 2, 2, 0.0), salmonn.BEATsEncoder(64, 64, 2, 2, 16, 0.0)):
    res = []
    for backend in ("torch", "triton"):
        fa.BACKEND = backend
        m.zero_grad()
        out = m(mel, lens)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        res.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*res):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max())), type(m).__name__
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
                                PYTHONPATH=root), timeout=300)
    if p.returncode != 0:
        skip_if_interpreter_too_old(p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]

@torch.no_grad()
def test_n_audio_tokens_counts_what_the_encoder_gives():
    """n_audio_tokens (the prompt's audio slots) equals the speech encoder's output frames for
    every clip length, odd and even, in windows of window_frames, window_queries each."""
    torch.manual_seed(0)
    cfg = tiny_config()
    m = SALMONN(cfg).eval()
    for T in range(1, 30):
        s, enc_lens = m.speech(torch.randn(1, T, cfg.n_mels), torch.tensor([T]))
        assert s.size(1) == int(enc_lens[0])
        want = -(-s.size(1) // cfg.window_frames) * cfg.window_queries
        assert n_audio_tokens(T, cfg) == want, T

def test_audio_tokens_land_in_the_masked_positions_in_time_order():
    """embed: each row's audio tokens, in time order, fill its masked positions; every other
    position keeps its token embedding."""
    torch.manual_seed(0)
    cfg = tiny_config()
    m = SALMONN(cfg).eval()
    batch = random_batch(cfg)
    with torch.no_grad():
        x = m.embed(batch["idx"], batch["mel"], batch["mel_lens"], batch["audio_mask"])
        audio, valid = m.encode_audio(batch["mel"], batch["mel_lens"])
        tokens = m.llm.wte(batch["idx"])
    for b in range(x.size(0)):
        slots = batch["audio_mask"][b].nonzero().squeeze(1)
        assert torch.equal(x[b, slots], audio[b][valid[b]])
        assert torch.equal(x[b][~batch["audio_mask"][b]], tokens[b][~batch["audio_mask"][b]])

def test_qformer_windows_in_time_order_and_local():
    torch.manual_seed(0)
    cfg = tiny_config(window_frames=4, window_queries=2)
    qf = salmonn.WindowQFormer(cfg, enc_dim=20).eval()
    T = 14  # windows [0,4) [4,8) [8,12) [12,14)
    x = torch.randn(1, T, 20)
    base, valid = qf(x, torch.tensor([T]))
    assert base.shape == (1, 8, 24) and valid.all()
    for w in range(4):
        x2 = x.clone()
        x2[0, 4 * w:min(4 * w + 4, T)] += torch.randn(min(4, T - 4 * w), 20)
        out, _ = qf(x2, torch.tensor([T]))
        changed = (out - base).abs().amax(-1)[0] > 1e-6
        # only window w's two queries, at slots 2w, 2w+1
        assert changed.tolist() == [i // 2 == w for i in range(8)], w
    # frames past the clip's length are never seen; fully padded windows are marked invalid
    x3 = x.clone()
    x3[0, 6:] = 100.0
    out, valid = qf(x3, torch.tensor([6]))
    ref, _ = qf(x[:, :6], torch.tensor([6]))
    assert valid.tolist() == [[True] * 4 + [False] * 4]
    assert torch.allclose(out[:, :4], ref, atol=1e-6)

def test_bad_model_settings_are_refused_naming_them():
    """Each part's heads split its width: a count that does not divide it is a ValueError that
    names the setting, for the parts the stage builds; so are an unknown stage, an odd encoder
    width (its positions are sine and cosine halves) and sizes under their least, which would
    otherwise fail only at the first forward."""
    for field, width in (("qformer", 24), ("llm", 32), ("speech", 32), ("beats", 16)):
        said = f"{field}_n_head=5: must divide {field}_n_embd={width}"
        with pytest.raises(ValueError, match=said):
            SALMONN(tiny_config(**{f"{field}_n_head": 5}))
    SALMONN(tiny_config(stage="llm", qformer_n_head=5))  # stage "llm" has no Q-Former
    for kw, said in (({"stage": "instrct"}, "stage='instrct': must be one of"),
                     # a model built directly, not through load_data
                     ({"speech_features": "Whisper"}, "speech_features='Whisper': must be"),
                     ({"speech_n_embd": 33, "speech_n_head": 3}, "speech_n_embd=33: must be even"),
                     ({"window_queries": 0}, "window_queries=0: must be at least 1"),
                     ({"window_frames": -1}, "window_frames=-1: must be at least 1"),
                     ({"max_audio_frames": 0}, "max_audio_frames=0: must be at least 1"),
                     ({"lora_rank": -1}, "lora_rank=-1: must be at least 0"),
                     ({"copy_rows": 1.5}, "copy_rows=1.5: must be between 0 and 1"),
                     ({"reading_share": -0.1}, "reading_share=-0.1: must be between 0 and 1"),
                     ({"ctc_weight": -1.0}, "ctc_weight=-1.0: must be between 0 and 1"),
                     # (1 - w) * CE + w * CTC: above 1 the decoder's loss would be a reward
                     ({"ctc_weight": 1.5}, "ctc_weight=1.5: must be between 0 and 1"),
                     ({"whisper_text_ctx": 1}, "whisper_text_ctx=1: must be at least 2"),
                     ({"llm_block_size": 0}, "llm_block_size=0: must be at least 1"),
                     ({"connect_ctc_weight": -0.5}, "connect_ctc_weight=-0.5: must be at least 0"),
                     # no layer or no width: a model that trains, saves and cannot answer
                     ({"llm_n_layer": 0}, "llm_n_layer=0: must be at least 1"),
                     ({"qformer_n_layer": 0}, "qformer_n_layer=0: must be at least 1"),
                     ({"speech_n_layer": -2}, "speech_n_layer=-2: must be at least 1"),
                     ({"beats_n_embd": 0}, "beats_n_embd=0: must be at least 1"),
                     ({"qformer_n_embd": 0}, "qformer_n_embd=0: must be at least 1"),
                     ({"whisper_dec_n_layer": 0}, "whisper_dec_n_layer=0: must be at least 1"),
                     ({"beats_patch_f": 0}, "beats_patch_f=0: must be at least 1"),
                     ({"spec_augment": -1}, "spec_augment=-1: must be at least 0")):
        with pytest.raises(ValueError, match=said):
            SALMONN(tiny_config(**kw))
    with pytest.raises(ValueError, match="stage='instrct': must be one of"):
        salmonn.stage_tasks(tiny_config(stage="instrct"))  # load_data's, before the model

# -----------------------------------------------------------------------------
# frozen LLM, LoRA

@pytest.mark.parametrize("freeze_encoders", [True, False])
def test_only_qformer_projection_and_lora_train_unless_encoders_unfrozen(freeze_encoders):
    """Stage-1 steps (train.py's optimizer: AdamW over the requires_grad parameters) leave the LLM's
    base weights and, as in the paper, the encoders bit-identical (and in eval mode, as soon as the
    model is built); LoRA sits on q and v only. freeze_encoders=False trains them."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config(lora_dropout=0.1, dropout=0.1, freeze_encoders=freeze_encoders))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    adapter = ("ln_speech.", "ln_audio.", "qformer.",
               "proj.") + (() if freeze_encoders else ("speech.", "beats."))
    assert all(n.startswith(adapter) or ".lora_" in n for n in trainable)
    assert {n for n in trainable
            if n.startswith("llm.")} == {f"llm.h.{i}.attn.lora_{w}_{ab}" for i in range(2)
                                                              for w in "qv" for ab in "AB"}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-3)
    # frozen: no dropout, from construction on (the encoders' cache keeps the first frames it sees)
    assert m.speech.training != freeze_encoders and m.beats.training != freeze_encoders
    assert m.qformer.training and m.training
    m.train()
    assert m.speech.training != freeze_encoders and m.beats.training != freeze_encoders
    for _ in range(2):
        _, loss = m(**random_batch(m.config))
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen = ("llm.",) + (("speech.", "beats.") if freeze_encoders else ())
    for n, p in m.named_parameters():
        if n.startswith(frozen) and ".lora_" not in n:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
            assert p.grad is None
    for prefix in adapter + tuple(f"llm.h.{i}.attn.lora_{w}" for i in range(2)
                                  for w in ("q_A", "q_B", "v_A", "v_B")):
        assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters()
                   if n.startswith(prefix)), prefix

def test_frozen_encoders_run_once_per_clip():
    """cache_encoders: each clip's frozen-encoder frames are computed once and reused, in any batch
    and row order; loss and gradients equal a model that reruns the encoders, and new encoder
    weights make the model compute them again."""
    torch.manual_seed(0)
    cached = SALMONN(tiny_config())
    plain = SALMONN(tiny_config(cache_encoders=False))
    plain.load_state_dict(cached.state_dict())
    encoded = []  # clips the speech encoder ran on
    cached.speech.register_forward_hook(lambda mod, inp, out: encoded.append(inp[0].size(0)))

    def same(batch, n_encoded):
        encoded.clear()
        for m in (cached, plain):
            m.zero_grad()
            m(**batch)[1].backward()
        assert sum(encoded) == n_encoded
        assert torch.allclose(cached(**batch)[1], plain(**batch)[1], atol=1e-6)
        for (n, a), b in zip(cached.named_parameters(), plain.parameters()):
            if a.requires_grad:
                assert torch.allclose(a.grad, b.grad, atol=1e-6), n

    batch = random_batch(cached.config, lens=(37, 20))
    same(batch, 2)
    same(batch, 0)  # both clips kept
    swapped = {k: v.flip(0) for k, v in batch.items()}  # the other row order, more padding
    swapped["mel"] = F.pad(swapped["mel"], (0, 0, 0, 8))
    same(swapped, 0)
    other = random_batch(cached.config, lens=(37, 30), seed=1)
    mixed = dict(other, mel=torch.cat([batch["mel"][:1], other["mel"][1:]]))  # one seen, one new
    same(mixed, 1)
    assert len(cached.encoder_cache) == 3
    # kept on the host, whatever the model's device (a GPU's memory would not hold a corpus's)
    assert all(t.device.type == "cpu" for frames in cached.encoder_cache.values() for t in frames)
    with torch.no_grad():  # new encoder weights: what was kept is stale
        state = {k: v * 1.1 for k, v in plain.speech.state_dict().items()}
        for m in (cached, plain):
            m.speech.load_state_dict(state)
    same(batch, 2)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_frozen_encoder_cache_stays_on_the_host_of_a_gpu_model():
    """On a GPU the cached frames stay in host memory and each batch's go to the device: the same
    loss as a model that reruns the encoders."""
    torch.manual_seed(0)
    cached = SALMONN(tiny_config()).cuda()
    plain = SALMONN(tiny_config(cache_encoders=False)).cuda()
    plain.load_state_dict(cached.state_dict())
    batch = {k: v.cuda() for k, v in random_batch(cached.config, lens=(37, 20)).items()}
    for _ in range(2):  # computed, then read back
        torch.testing.assert_close(cached(**batch)[1], plain(**batch)[1])
    assert cached.encoder_cache and all(t.device.type == "cpu"
                                        for frames in cached.encoder_cache.values() for t in frames)

def test_lora_scale_scales_the_update():
    """lora_scale (alpha / rank at first) multiplies LoRA's update in every layer: another scale
    changes the outputs of a model whose LoRA is not zero, setting it back restores them, and 0
    gives the base model."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config()).eval()
    for block in m.llm.h:  # B starts at zero; give LoRA something to do
        torch.nn.init.normal_(block.attn.lora_q_B, std=0.5)
        torch.nn.init.normal_(block.attn.lora_v_B, std=0.5)
    batch = random_batch(m.config)
    with torch.no_grad():
        assert m.lora_scale == 2.0  # 8 / 4
        ref, _ = m(**batch)
        m.lora_scale = 1.0
        assert all(block.attn.lora_scale == 1.0 for block in m.llm.h)
        assert not torch.allclose(m(**batch)[0], ref, atol=1e-3)
        m.lora_scale = 2.0
        assert torch.equal(m(**batch)[0], ref)
        m.lora_scale = 0.0  # no LoRA at all: the base model
        base, _ = m(**batch)
        for block in m.llm.h:
            block.attn.lora_rank = 0
        plain, _ = m(**batch)
        assert torch.allclose(base, plain, atol=1e-6) and not torch.allclose(base, ref, atol=1e-3)

def lora_attention_written_out(attn, x, h, s):
    """salmonn.SelfAttention's causal attention by hand: q, k, v from c_attn on x, plus LoRA's s * h
    A^T B^T on q and v (h: the adapters' input), softmax(q k^T / sqrt(d)) v per head, c_proj.
    Returns the output and the per-head keys and values."""
    B, T, C = x.shape
    H = attn.n_head
    W, b = attn.c_attn.weight, attn.c_attn.bias
    q = x @ W[:C].T + b[:C] + s * (h @ attn.lora_q_A.T @ attn.lora_q_B.T)
    k = x @ W[C:2 * C].T + b[C:2 * C]
    v = x @ W[2 * C:].T + b[2 * C:] + s * (h @ attn.lora_v_A.T @ attn.lora_v_B.T)
    heads = lambda t: t.view(B, T, H, C // H).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -float("inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.c_proj.weight.T + attn.c_proj.bias, k, v

def test_lora_updates_q_and_v_by_their_own_adapters():
    """One attention layer written out: q, k, v from c_attn, then q += s * x A_q^T B_q^T and
    v += s * x A_v^T B_v^T (s = alpha / rank, each projection with its own A and B, k untouched),
    causal softmax(q k^T / sqrt(d)) v per head, c_proj. The layer's output and the keys and values
    it caches must equal this."""
    torch.manual_seed(0)
    C, H, r, T = 12, 2, 3, 5
    attn = salmonn.SelfAttention(C, H, lora_rank=r, lora_alpha=6.0).eval()
    with torch.no_grad():  # B starts at zero; every adapter matrix different
        for w in (attn.lora_q_B, attn.lora_v_B):
            torch.nn.init.normal_(w, std=0.5)
    x = torch.randn(2, T, C)
    with torch.no_grad():
        y, (k_cache, v_cache) = attn(x)
        ref, k, v = lora_attention_written_out(attn, x, x, 6.0 / 3)
    torch.testing.assert_close(k_cache, k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_cache, v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)

def test_audio_tokens_scaled_to_the_llms_token_rms():
    """init_pretrained sets audio_scale to the RMS of the LLM's token embeddings (computed here;
    the LLM's embeddings scaled up first, so it is not the init's 0.02), and every audio token
    written into the LLM's input then has that RMS."""
    torch.manual_seed(0)
    cfg = tiny_config()
    salmonn.set_pretrained_dims(cfg)
    m = SALMONN(cfg)
    with torch.no_grad():
        m.llm.wte.weight.mul_(7.0)
    tok_rms = m.llm.wte.weight.detach().double().pow(2).mean().sqrt().item()
    assert 0.1 < tok_rms < 0.2  # about 7 * 0.02
    salmonn.init_pretrained(m)
    assert m.audio_scale.item() == pytest.approx(tok_rms, rel=1e-5)
    m.eval()
    batch = random_batch(cfg)
    with torch.no_grad():
        x = m.embed(batch["idx"], batch["mel"], batch["mel_lens"], batch["audio_mask"])
    audio = x[batch["audio_mask"]]  # (audio tokens, C) as the LLM receives them
    assert len(audio) == 16
    torch.testing.assert_close(audio.pow(2).mean(-1).sqrt(),
                               torch.full((len(audio),), tok_rms), rtol=1e-4, atol=0)

@torch.no_grad()
def test_projection_starts_the_audio_tokens_at_the_token_rms():
    """Without audio_norm the projection's init alone sets the audio tokens' scale: init_pretrained
    draws it so that they start at about the RMS of the LLM's token embeddings (the Q-Former's
    output is LayerNormed, RMS 1 per element), not sqrt(qformer_n_embd) times that."""
    torch.manual_seed(0)
    cfg = tiny_config(audio_norm=False)
    m = SALMONN(cfg)
    m.llm.wte.weight.mul_(7.0)  # not the init's 0.02
    tok_rms = m.llm.wte.weight.pow(2).mean().sqrt().item()
    salmonn.init_pretrained(m)
    m.eval()
    batch = random_batch(cfg)
    tokens, valid = m.encode_audio(batch["mel"], batch["mel_lens"])
    rms = tokens[valid].pow(2).mean().sqrt().item()
    assert 0.7 * tok_rms < rms < 1.4 * tok_rms, (rms, tok_rms)

# -----------------------------------------------------------------------------
# data: loss on the answer only

def write_tiny_data(path, clips, n_mels=64, seed=0):
    """A hand-made prepared-data directory (meta.json, mel, clips) in the data contract's format.
    The clips' text is text: the tokenizer is the model's (here ByteTokenizer), not the data's."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    meta = {"sample_rate": 24000, "frame_rate": 75, "hop_length": 320, "n_mels": n_mels, "n_q": 8}
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    for split in ("train", "val"):
        off, rows = 0, []
        for c in clips:
            rows.append({**c, "offset": off})
            off += c["frames"]
        mel = rng.standard_normal((off, n_mels)).astype(np.float16)
        mel.tofile(os.path.join(path, f"{split}_mel.bin"))
        with open(os.path.join(path, f"{split}_clips.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

CLIPS = [
    {"id": "a", "frames": 30, "kind": "morse", "transcript": "sos",
     "caption": "morse code spelling sos.",
     "description": "A tone taps out sos.", "labels": {"class": "morse code"},
     "qa": [{"q": "what word?", "a": "sos"}]},
    {"id": "b", "frames": 55, "kind": "music", "transcript": None, "caption": "a piano plays c4.",
     "description": None, "labels": {"class": "piano"}, "qa": []},
]

def test_evaluate_scores_each_task_on_its_own_answers(tmp_path, monkeypatch):
    """evaluate's plumbing, with the model's answers stubbed: answering every entry with its own
    reference scores perfectly on every task; one constant answer scores what the metrics give on
    the references directly (WER per kind of clip, accuracy, BLEU-4)."""
    clips = CLIPS + [
        {"id": "c", "frames": 40, "kind": "dtmf", "transcript": "one two",
         "caption": "keypad tones dialing one two.", "description": None,
         "labels": {"class": "dtmf tones"}, "qa": [{"q": "what number?", "a": "one two"}]},
        {"id": "d", "frames": 45, "kind": "speech", "transcript": "where is the red kite",
         "caption": "a man asks: where is the red kite?", "description": None,
         "labels": {"class": "speech", "gender": "male", "speaker": "m1"},
         "qa": [{"q": "is the speaker a man or a woman?", "a": "a man"}]}]
    write_tiny_data(tmp_path, clips)
    tok, cfg = ByteTokenizer(), tiny_config(stage="instruct", llm_block_size=160)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    S = data.splits["val"]
    # (the clip's mel, the instruction) -> the reference answer
    key = lambda audio, instruction: (audio["mel"].numpy().tobytes(), instruction)
    oracle = {key(data.clip_audio("val", ci), q or salmonn.INSTRUCTIONS[task][0]): a
              for task in salmonn.ALL_TASKS for ci, q, a in S["entries"][task]}
    assert len(oracle) == sum(len(S["entries"][t]) for t in salmonn.ALL_TASKS)
    m = SALMONN(cfg).eval()
    monkeypatch.setattr(salmonn, "sample", lambda model, tok, audio, prompt, tools, **o:
                        {"text": oracle[key(audio, prompt)]})
    got = salmonn.evaluate(m, data, tok, "val")
    kinds = {S["clips"][ci]["kind"] for ci, _, _ in S["entries"]["transcription"]}
    assert kinds == {"morse", "dtmf", "speech"}
    assert got["wer"] == 0 and all(got[f"wer_{k}"] == 0 for k in kinds)
    assert got["bleu4"] == pytest.approx(1.0) and got["qa_acc"] == 1 and got["cls_acc"] == 1
    assert got["gender_acc"] == 1 and got["n_qa"] == 3 and got["n_transcription"] == 3
    assert all(got[f"qa_acc_{k}"] == 1 for k in kinds)
    monkeypatch.setattr(salmonn, "sample", lambda *a, **o: {"text": "one two"})
    got = salmonn.evaluate(m, data, tok, "val")
    refs = {t: [a for _, _, a in S["entries"][t]] for t in salmonn.ALL_TASKS}
    by_kind = {S["clips"][ci]["kind"]: a for ci, _, a in S["entries"]["transcription"]}
    for k, ref in by_kind.items():
        assert got[f"wer_{k}"] == salmonn.word_error_rate([ref], ["one two"]), k
    assert got["wer_dtmf"] == 0 and got["wer_speech"] == 1.0  # 5 words, 5 errors
    assert got["qa_acc"] == pytest.approx(1 / 3) and got["gender_acc"] == 0
    # per kind of clip: the DTMF question is answered, the Morse and the speech ones are not
    assert (got["qa_acc_dtmf"], got["qa_acc_morse"], got["qa_acc_speech"]) == (1, 0, 0)
    assert got["cls_acc"] == 0
    # one caption for every clip: BLEU-4 of these answers against the references, not the reverse
    piano = "a piano plays c4."
    monkeypatch.setattr(salmonn, "sample", lambda *a, **o: {"text": piano})
    got = salmonn.evaluate(m, data, tok, "val")
    want = salmonn.bleu4([piano] * len(refs["captioning"]), [[r] for r in refs["captioning"]])
    assert 0 < want < 1 and got["bleu4"] == pytest.approx(want)
    swapped = salmonn.bleu4(refs["captioning"], [[piano]] * len(refs["captioning"]))
    assert want != pytest.approx(swapped)
    # evaluate's options reach sample, and max_clips caps every task's entries
    calls = []
    monkeypatch.setattr(salmonn, "sample", lambda *a, **o: calls.append(o) or {"text": piano})
    got = salmonn.evaluate(m, data, tok, "val", beam=2, max_new_tokens=7, lora_scale=1.0,
                           max_clips=1)
    tasks = [t for t in salmonn.ALL_TASKS if S["entries"][t]]
    assert len(S["entries"]["qa"]) > 1 and len(calls) == len(tasks)
    assert ([(o.get("beam"), o.get("max_new_tokens"), o.get("lora_scale")) for o in calls]
            == [(2, 7, 1.0)] * len(tasks))
    assert all(got[f"n_{t}"] == 1 for t in tasks)

def test_no_loss_on_prompt_or_audio(tmp_path):
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    cfg = tiny_config(stage="instruct", llm_block_size=160)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    assert cfg.vocab_size == 257  # the tokenizer's
    batch = salmonn.get_batch(data, "train", 16, np.random.default_rng(0))
    seen = set()
    for b in range(16):
        idx, tg, am = batch["idx"][b], batch["targets"][b], batch["audio_mask"][b]
        n = n_audio_tokens(int(batch["mel_lens"][b]), cfg)
        assert am.sum() == n and batch["mel_lens"][b] in (30, 55)
        assert (tg[am] == -1).all()
        # position `first`'s target is the answer's first token
        first = int((tg != -1).nonzero()[0])
        prompt = tok.decode(idx[:first + 1][~am[:first + 1]].tolist())
        assert prompt.startswith("USER: <Speech></Speech> ") and prompt.endswith("\nASSISTANT:")
        assert (tg[:first] == -1).all() and not am[first:].any()
        answer = tg[tg != -1].tolist()
        assert answer[-1] == tok.eot_token and answer[0] == ord(" ")
        seen.add(tok.decode(answer[:-1]).strip())
        assert torch.equal(idx[first + 1:first + len(answer)], tg[first:first + len(answer) - 1])
    logits, loss = SALMONN(cfg)(**batch)
    # per example first (a one-word label weighs as much as a caption), then over the batch
    tg = batch["targets"]
    ref = torch.stack([F.cross_entropy(logits[b][tg[b] != -1], tg[b][tg[b] != -1])
                       for b in range(16)]).mean()
    assert torch.allclose(loss, ref)
    # not the token mean
    assert not torch.allclose(loss, F.cross_entropy(logits[tg != -1], tg[tg != -1]))
    # Morse spelled
    assert seen <= {"s o s", "sos", "morse code spelling sos.", "a piano plays c4.", "morse code",
                    "piano"}
    assert len(seen) >= 3

def test_task_weights_set_how_often_each_task_is_drawn(tmp_path):
    """task_weights: a task of weight w is drawn w times as often as one of weight 1 (0: never);
    names outside the stage's tasks and bad numbers are errors that name them, and so are tasks or
    weights given to a stage without a task mix."""
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    # CLIPS offer 5 of stage 2's tasks; only transcription answers "s o s" (Morse spelled)
    def share(weights, n=3000):
        data = salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=160,
                                                           task_weights=weights), tok)
        tasks = [t for t in data.tasks if data.splits["train"]["entries"][t]]
        assert len(tasks) == 5
        rng = np.random.default_rng(0)
        answers = []
        for _ in range(n):
            seq, _, n_prompt, _, _ = salmonn.task_example(data, "train", tasks, rng)
            answers.append(tok.decode(seq[n_prompt:]).strip())
        return np.mean([a == "s o s" for a in answers])
    assert abs(share("") - 1 / 5) < 0.03
    assert abs(share("transcription=3") - 3 / 7) < 0.03
    assert abs(share("captioning=2, transcription=0.5") - 0.5 / 6.5) < 0.02
    assert share("transcription=0") == 0
    zero = ",".join(f"{t}=0" for t in ("transcription", "captioning", "qa", "music",
                                       "classification"))
    with pytest.raises(ValueError, match="every task of the mix weighs 0"):
        share(zero + ",speaker=0", n=1)
    with pytest.raises(ValueError, match="leave the train split's tasks .* no weight"):
        share(zero, n=1)  # speaker keeps its weight, but these clips have no speaker
    for spec, msg in (("story=2", "'story' is not a task of the mix"),
                      ("qa", "needs a number"), ("qa=-1", "finite weight >= 0"),
                      ("qa=1,qa=2", "'qa' is named twice")):
        with pytest.raises(ValueError, match=msg):
            salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", task_weights=spec),
                              tok)
    # a list of no task, or of one twice, is named as such (not as a weight of no task)
    for tasks in (",", " ", "qa,qa"):
        with pytest.raises(ValueError, match=f"tasks={tasks!r}: name each task of the mix once"):
            salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", tasks=tasks,
                                                         task_weights="qa=2"), tok)
    # the pretrained parts' stages have no mix to choose
    for stage, setting in (("whisper", dict(tasks="captioning")),
                           ("whisper", dict(task_weights="transcription=2")),
                           ("beats", dict(tasks="qa")), ("llm", dict(task_weights="qa=2"))):
        with pytest.raises(ValueError, match=f"stage '{stage}' has none"):
            salmonn.load_data(str(tmp_path), tiny_config(stage=stage, **setting), tok)

def test_asr_data_dir_adds_transcribed_train_clips(tmp_path, capsys):
    """asr_data_dir: another corpus's transcribed train clips join the transcription task, each read
    from its own corpus's mel array; its untranscribed clips, other tasks and val split stay out,
    and the best constant answer is still this corpus's; asr_tasks adds other tasks' entries (of the
    stage's). Features that differ, or an unknown task, are an error."""
    tok = ByteTokenizer()
    write_tiny_data(tmp_path / "main", CLIPS, seed=0)
    extra = [{"id": "x", "frames": 21, "kind": "dtmf", "transcript": "a b d",
              "caption": "keys.", "labels": {"class": "dtmf"}, "qa": []},
             {"id": "y", "frames": 40, "kind": "music", "transcript": None, "caption": "a flute.",
              "labels": {"class": "flute"}, "qa": []},
             {"id": "z", "frames": 17, "kind": "morse", "transcript": "ab", "caption": "dits.",
              "labels": {"class": "morse code"}, "qa": []}]
    write_tiny_data(tmp_path / "extra", extra, seed=1)
    # a block that holds each clip's longest prompt (load_data checks it)
    plain = salmonn.load_data(str(tmp_path / "main"),
                              tiny_config(stage="instruct", llm_block_size=128), tok)
    extra_cfg = lambda: tiny_config(stage="instruct", asr_data_dir=str(tmp_path / "extra"),
                                    llm_block_size=128)
    capsys.readouterr()
    data = salmonn.load_data(str(tmp_path / "main"), extra_cfg(), tok)
    # said, since the run's first line names only the main corpus
    assert (f"salmonn: 2 train clips of {tmp_path / 'extra'} join the transcription examples "
            f"(asr_data_dir)") in capsys.readouterr().out
    S, P = data.splits["train"], plain.splits["train"]
    got = S["entries"]["transcription"]
    assert got[:len(P["entries"]["transcription"])] == P["entries"]["transcription"]
    added = got[len(P["entries"]["transcription"]):]
    assert [a for _, _, a in added] == ["a b d", "a b"]  # Morse spelled, as the main corpus's
    extra_mel = np.fromfile(tmp_path / "extra" / "train_mel.bin", dtype=np.float16).reshape(-1, 64)
    for (ci, _, _), (start, n) in zip(added, ((0, 21), (61, 17))):
        assert torch.equal(data.clip_mel("train", ci), torch.from_numpy(extra_mel[start:start + n]
                                                                          .astype(np.float32)))
    for ci in range(len(P["clips"])):  # the main corpus's clips still read the main array
        assert torch.equal(data.clip_mel("train", ci), plain.clip_mel("train", ci))
    for task in salmonn.ALL_TASKS[1:]:
        assert S["entries"][task] == P["entries"][task]
    assert data.splits["val"]["entries"] == plain.splits["val"]["entries"]
    # the constant answer of the main corpus's kinds comes from the main corpus alone
    # (the extra corpus's "a b d" would beat every candidate here: 3/9 against 4/9)
    refs = ["a b c", "a y d", "x b d"]
    got = salmonn.transcription_metrics(refs, refs, None, ["dtmf"] * 3, S)
    assert got["const_wer_dtmf"] == pytest.approx(4 / 9)
    # asr_tasks: the tasks the other corpus's clips join, of the stage's; a clip without a
    # transcript joins through its question
    extra[1]["qa"] = [{"q": "which instrument?", "a": "a flute"}]
    write_tiny_data(tmp_path / "extra_qa", extra, seed=1)
    qa_cfg = lambda stage, tasks: tiny_config(stage=stage, asr_data_dir=str(tmp_path / "extra_qa"),
                                              asr_tasks=tasks, llm_block_size=128)
    both = salmonn.load_data(str(tmp_path / "main"), qa_cfg("instruct", "transcription,qa"), tok)
    B = both.splits["train"]
    assert [a for _, _, a in B["entries"]["transcription"]] == \
        [a for _, _, a in S["entries"]["transcription"]]
    qa_added = B["entries"]["qa"][len(P["entries"]["qa"]):]
    assert [(q, a) for _, q, a in qa_added] == [("which instrument?", "a flute")]
    qa_mel = np.fromfile(tmp_path / "extra_qa" / "train_mel.bin", dtype=np.float16).reshape(-1, 64)
    assert torch.equal(both.clip_mel("train", qa_added[0][0]),
                       torch.from_numpy(qa_mel[21:61].astype(np.float32)))
    # stage 1 has no QA task: only transcription joins
    pre = salmonn.load_data(str(tmp_path / "main"), qa_cfg("pretrain", "transcription,qa"), tok)
    assert len(pre.splits["train"]["entries"]["qa"]) == len(P["entries"]["qa"])
    with pytest.raises(ValueError, match="asr_tasks.*karaoke"):
        salmonn.load_data(str(tmp_path / "main"), qa_cfg("instruct", "transcription,karaoke"), tok)
    meta = json.load(open(tmp_path / "extra" / "meta.json"))
    json.dump({**meta, "frame_rate": 50}, open(tmp_path / "extra" / "meta.json", "w"))
    with pytest.raises(ValueError, match="asr_data_dir.*frame_rate"):
        salmonn.load_data(str(tmp_path / "main"), extra_cfg(), tok)
    with pytest.raises(FileNotFoundError, match="asr_data_dir.*meta.json"):
        salmonn.load_data(str(tmp_path / "main"),
                          tiny_config(stage="instruct", asr_data_dir=str(tmp_path / "none")), tok)

@pytest.mark.parametrize("name", ["corpus", "gpt2"])
def test_one_data_dir_serves_both_tokenizers(synth_dir, name):
    """The prepared data is text: the small CPU LLM (corpus BPE) and a GPT-2-vocabulary LLM read the
    same data dir, each with the tokenizer its config names. Prompts and answers decode back to the
    stored text, and the model's vocabulary is the tokenizer's."""
    tok = tokenizer.load_tokenizer(synth_dir, name, offline=True)
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    assert tok.n_vocab == (50257 if name == "gpt2" else meta["tokenizer"]["vocab_size"])
    cfg = tiny_config(stage="instruct", tokenizer=name, vocab_size=0, llm_block_size=256,
                      max_audio_frames=150)
    data = salmonn.load_data(synth_dir, cfg, tok)
    assert cfg.vocab_size == tok.n_vocab
    clips = [json.loads(l) for l in open(os.path.join(synth_dir, "train_clips.jsonl"))]
    stored = {" " + answer for c in clips for task, _, answer in salmonn.task_entries(c)
              if task in data.tasks}
    batch = salmonn.get_batch(data, "train", 8, np.random.default_rng(0))
    answers = set()
    for b in range(8):
        tg, am = batch["targets"][b], batch["audio_mask"][b]
        answer = tg[tg != -1].tolist()
        assert answer[-1] == tok.eot_token
        answers.add(tok.decode(answer[:-1]))
        first = int((tg != -1).nonzero()[0])
        prompt = tok.decode(batch["idx"][b, :first + 1][~am[:first + 1]].tolist())
        assert prompt.startswith("USER: <Speech></Speech> ") and prompt.endswith("\nASSISTANT:")
    assert answers <= stored and len(answers) >= 3
    torch.manual_seed(0)
    logits, loss = SALMONN(cfg)(**batch)
    assert logits.size(-1) == tok.n_vocab and torch.isfinite(loss)

# -----------------------------------------------------------------------------
# checkpoint loading

def hf_gpt2_state(n_layer=2, n_embd=32, n_pos=64, vocab=61, prefix="", seed=0):
    """Random weights with Hugging Face GPT-2's names and Conv1D (in, out) layout, plus its mask
    buffers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    sd = {"wte.weight": r(vocab, n_embd), "wpe.weight": r(n_pos, n_embd),
          "ln_f.weight": 1 + r(n_embd), "ln_f.bias": r(n_embd)}
    for i in range(n_layer):
        h = f"h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(n_embd), h + "ln_1.bias": r(n_embd),
                   h + "ln_2.weight": 1 + r(n_embd),
                   h + "ln_2.bias": r(n_embd), h + "attn.c_attn.weight": r(n_embd, 3 * n_embd),
                   h + "attn.c_attn.bias": r(3 * n_embd),
                   h + "attn.c_proj.weight": r(n_embd, n_embd),
                   h + "attn.c_proj.bias": r(n_embd), h + "mlp.c_fc.weight": r(n_embd, 4 * n_embd),
                   h + "mlp.c_fc.bias": r(4 * n_embd),
                   h + "mlp.c_proj.weight": r(4 * n_embd, n_embd),
                   h + "mlp.c_proj.bias": r(n_embd),
                   h + "attn.bias": torch.tril(torch.ones(1, 1, n_pos, n_pos)),
                   h + "attn.masked_bias": torch.tensor(-1e4)})
    return {prefix + k: v for k, v in sd.items()}

def gpt2_reference(sd, ids, n_head):
    """GPT-2 forward written directly on the HF weights (Conv1D: x @ W + b): the independent
    reference."""
    x = sd["wte.weight"][ids] + sd["wpe.weight"][: ids.size(1)]
    T, C = ids.size(1), x.size(-1)
    ln = lambda x, p: F.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    i = 0
    while f"h.{i}.ln_1.weight" in sd:
        h = f"h.{i}."
        qkv = ln(x, h + "ln_1") @ sd[h + "attn.c_attn.weight"] + sd[h + "attn.c_attn.bias"]
        q, k, v = qkv.split(C, -1)
        heads = lambda t: t.view(1, T, n_head, C // n_head).transpose(1, 2)
        att = (heads(q) @ heads(k).transpose(-1, -2)) / math.sqrt(C // n_head)
        y = att.masked_fill(~mask, -float("inf")).softmax(-1) @ heads(v)
        y = y.transpose(1, 2).reshape(1, T, C)
        x = x + y @ sd[h + "attn.c_proj.weight"] + sd[h + "attn.c_proj.bias"]
        m = F.gelu(ln(x, h + "ln_2") @ sd[h + "mlp.c_fc.weight"] + sd[h + "mlp.c_fc.bias"],
                   approximate="tanh")
        x = x + m @ sd[h + "mlp.c_proj.weight"] + sd[h + "mlp.c_proj.bias"]
        i += 1
    return ln(x, "ln_f") @ sd["wte.weight"].t()

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_gpt2_checkpoint_loading(tmp_path, fmt):
    from safetensors.torch import save_file
    sd = hf_gpt2_state()
    json.dump({"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64, "vocab_size": 61},
              open(tmp_path / "config.json", "w"))
    if fmt == "safetensors":  # as GPT2Model saves it: no prefix
        save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith(".attn.bias")},
                  str(tmp_path / "model.safetensors"))
    else:  # as GPT2LMHeadModel saves it: "transformer." prefix, lm_head tied
        full = {"transformer." + k: v for k, v in sd.items()}
        full["lm_head.weight"] = sd["wte.weight"]
        torch.save(full, tmp_path / "pytorch_model.bin")
    # sizes in the config differ on purpose: the checkpoint's replace them
    cfg = tiny_config(llm_init=str(tmp_path), llm_n_layer=1, llm_n_head=2, llm_n_embd=16,
                      llm_block_size=8)
    m = build(cfg).eval()
    assert (cfg.llm_n_layer, cfg.llm_n_head, cfg.llm_n_embd, cfg.llm_block_size) == (2, 4, 32, 64)
    ours = m.llm.state_dict()
    mapped = 0
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        want = v.t() if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) else v
        assert ours[k].shape == want.shape and torch.equal(ours[k], want), k
        mapped += 1
    assert mapped == len([k for k in ours if ".lora_" not in k and k != "lm_head.weight"])
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        h, _ = m.llm(m.llm.wte(ids))
        assert torch.allclose(m.llm.lm_head(h), gpt2_reference(sd, ids, n_head=4), atol=1e-5)
    # a vocabulary that does not match the data's tokenizer is refused with a clear error
    with pytest.raises(ValueError, match="vocab_size"):
        build(tiny_config(llm_init=str(tmp_path), vocab_size=100))
    # without config.json the number of heads cannot be read from the weights: a clear error, no
    # guess
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build(tiny_config(llm_init=str(tmp_path)))

def test_llm_checkpoint_from_text_pretraining(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(stage="llm", llm_dropout=0.1)
    lm = SALMONN(cfg)
    assert all(p.requires_grad
               for p in lm.parameters()) and set(dict(lm.named_children())) == {"llm"}
    ck = {"model": lm.state_dict(), "model_name": "salmonn", "model_args": asdict(cfg),
          "iter_num": 1, "best_val_loss": 1.0}
    torch.save(ck, tmp_path / "ckpt.pt")
    m = build(tiny_config(llm_init=str(tmp_path / "ckpt.pt"), llm_n_embd=16))
    for k, v in lm.llm.state_dict().items():
        assert torch.equal(m.llm.state_dict()[k], v), k
    assert not any(p.requires_grad for n, p in m.llm.named_parameters() if ".lora_" not in n)

def test_whisper_checkpoint_loading(tmp_path):
    """A checkpoint in OpenAI Whisper's format ("dims", "model_state_dict" with encoder.* names)."""
    torch.manual_seed(0)
    dims = {"n_mels": 80, "n_audio_ctx": 50, "n_audio_state": 32, "n_audio_head": 4,
            "n_audio_layer": 2,
            "n_vocab": 100, "n_text_ctx": 16, "n_text_state": 32, "n_text_head": 4,
            "n_text_layer": 1}
    C = 32
    sd = {"encoder.conv1.weight": torch.randn(C, 80, 3) * 0.1,
          "encoder.conv1.bias": torch.randn(C) * 0.1,
          "encoder.conv2.weight": torch.randn(C, C, 3) * 0.1,
          "encoder.conv2.bias": torch.randn(C) * 0.1,
          "encoder.positional_embedding": salmonn.sinusoids(50, C),
          "encoder.ln_post.weight": torch.rand(C) + 0.5,
          "encoder.ln_post.bias": torch.randn(C) * 0.1,
          "decoder.token_embedding.weight": torch.randn(100, C)}
    for i in range(2):
        b = f"encoder.blocks.{i}."
        for n in ("query", "key", "value", "out"):
            sd[b + f"attn.{n}.weight"] = torch.randn(C, C) * 0.1
            if n != "key":
                sd[b + f"attn.{n}.bias"] = torch.randn(C) * 0.1
        sd.update({b + "attn_ln.weight": torch.rand(C) + 0.5,
                   b + "attn_ln.bias": torch.randn(C) * 0.1,
                   b + "mlp.0.weight": torch.randn(4 * C, C) * 0.1,
                   b + "mlp.0.bias": torch.randn(4 * C) * 0.1,
                   b + "mlp.2.weight": torch.randn(C, 4 * C) * 0.1,
                   b + "mlp.2.bias": torch.randn(C) * 0.1,
                   b + "mlp_ln.weight": torch.rand(C) + 0.5,
                   b + "mlp_ln.bias": torch.randn(C) * 0.1})
    torch.save({"dims": dims, "model_state_dict": sd}, tmp_path / "tiny.pt")
    m = build(tiny_config(whisper_init=str(tmp_path / "tiny.pt"))).eval()
    assert m.speech.conv1.weight.shape == (32, 80, 3) and len(m.speech.blocks) == 2
    ours = m.speech.state_dict()
    assert set(ours) == {k[len("encoder."):] for k in sd
                         if k.startswith("encoder.")} - {"positional_embedding"}
    for k, v in ours.items():
        assert torch.equal(v, sd["encoder." + k]), k
    # Whisper's encoder written out on its own weights (80-bin input, 20 frames -> 10)
    mel = torch.randn(1, 20, 80)
    w = lambda k: sd["encoder." + k]
    heads = lambda t: t.view(1, 10, 4, 8).transpose(1, 2)
    x = F.gelu(F.conv1d(mel.transpose(1, 2), w("conv1.weight"), w("conv1.bias"), padding=1))
    x = F.gelu(F.conv1d(x, w("conv2.weight"), w("conv2.bias"), stride=2, padding=1)).transpose(1, 2)
    x = x + w("positional_embedding")[:10]
    for i in range(2):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (C,), w(b + "attn_ln.weight"), w(b + "attn_ln.bias"))
        q = heads(h @ w(b + "attn.query.weight").t() + w(b + "attn.query.bias"))
        k = heads(h @ w(b + "attn.key.weight").t())
        v = heads(h @ w(b + "attn.value.weight").t() + w(b + "attn.value.bias"))
        y = ((q * 8 ** -0.25) @ (k * 8 ** -0.25).transpose(-1, -2)).softmax(-1) @ v
        y = y.transpose(1, 2).reshape(1, 10, C)
        x = x + y @ w(b + "attn.out.weight").t() + w(b + "attn.out.bias")
        h = F.layer_norm(x, (C,), w(b + "mlp_ln.weight"), w(b + "mlp_ln.bias"))
        hidden = F.gelu(h @ w(b + "mlp.0.weight").t() + w(b + "mlp.0.bias"))
        x = x + hidden @ w(b + "mlp.2.weight").t() + w(b + "mlp.2.bias")
    ref = F.layer_norm(x, (C,), w("ln_post.weight"), w("ln_post.bias"))
    with torch.no_grad():
        out, _ = m.speech(mel, torch.tensor([20]))
    assert torch.allclose(out, ref, atol=1e-5)

def test_sinusoids_are_whispers_table():
    """sinusoids is OpenAI Whisper's position table, the one an OpenAI encoder's weights were
    trained with: channel i < C/2 of position t is sin(t * 10000 ** (-i / (C/2 - 1))), channel
    C/2 + i its cos (written out here per element: the checkpoint test above takes its table from
    sinusoids itself)."""
    C, T = 8, 50
    got = salmonn.sinusoids(T, C)
    assert got.shape == (T, C)
    for t in range(T):
        for i in range(C // 2):
            angle = t * 10000 ** (-i / (C // 2 - 1))
            assert got[t, i].item() == pytest.approx(math.sin(angle), abs=1e-5), (t, i)
            assert got[t, C // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-5), (t, i)

# -----------------------------------------------------------------------------
# decoding

def test_beam_search_finds_the_best_sequence_on_a_hand_built_model():
    # a Markov model over {0: end, 1: A, 2: B}: greedy takes A (0.6) then must end (total 0.6 * 0.4
    # = 0.24 at best); B (0.4) then end (0.9) = 0.36 is the most probable sequence
    P0 = torch.tensor([0.0, 0.6, 0.4])
    P = {1: torch.tensor([0.4, 0.3, 0.3]), 2: torch.tensor([0.9, 0.05, 0.05])}
    step = lambda toks, state: (torch.stack([P[int(t)] for t in toks]).log(), state)
    greedy = salmonn.beam_search(step, P0.log()[None], [], beam=1, max_new_tokens=5, eot=0,
                                 length_penalty=0.0)
    assert greedy == [1]
    assert salmonn.beam_search(step, P0.log()[None], [], beam=2, max_new_tokens=5, eot=0,
                               length_penalty=0.0) == [2]

def all_logprobs(m, x, vocab, eot, max_new):
    """Log-probability of every possible answer (ending at eot or at max_new tokens), from one full
    forward pass over all vocab ** max_new continuations (no cache)."""
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=max_new)))
    h, _ = m.llm(torch.cat([x.expand(len(seqs), -1, -1), m.llm.wte(seqs[:, :-1])], 1))
    logp = m.llm.lm_head(h[:, x.size(1) - 1:]).log_softmax(-1)
    lp = logp.gather(2, seqs[..., None])[..., 0].cumsum(1)
    best = {}
    for seq, cum in zip(seqs.tolist(), lp.tolist()):
        n = seq.index(eot) + 1 if eot in seq else max_new
        best[tuple(seq[:n - 1] if seq[n - 1] == eot else seq[:n])] = cum[n - 1]
    return best

def test_beam_search_with_kv_cache_is_exact_and_beam_1_is_greedy():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=4)
    m = SALMONN(cfg).eval()
    with torch.no_grad():  # a peaky output distribution so that sequences differ clearly
        m.llm.wte.weight.mul_(40)
        batch = random_batch(cfg, lens=(37,), T=15)
        x = m.embed(batch["idx"], batch["mel"], batch["mel_lens"], batch["audio_mask"])
        scores = all_logprobs(m, x, vocab=4, eot=0, max_new=3)
        best = max(scores, key=scores.get)
        # beam 9 >= 3^2 prefixes keeps every hypothesis: exact
        assert tuple(m.generate(x, 3, eot=0, beam=9, length_penalty=0.0)) == best
        # ranked by log-prob / length (Hugging Face's length_penalty=1.0)
        per_token = {s: lp / max(1, len(s)) for s, lp in scores.items()}  # eot not counted
        assert tuple(m.generate(x, 3, eot=0, beam=9,
                                length_penalty=1.0)) == max(per_token, key=per_token.get)
        # greedy by hand, with full forward passes
        seq = []
        for _ in range(3):
            h, _ = m.llm(torch.cat([x, m.llm.wte(torch.tensor([seq], dtype=torch.long))],
                                   1) if seq else x)
            t = int(m.llm.lm_head(h[:, -1]).argmax())
            if t == 0:
                break
            seq.append(t)
        assert m.generate(x, 3, eot=0, beam=1) == seq
        # beam_search itself with beam 1 is greedy too
        h, past = m.llm(x)
        step = lambda toks, past: (lambda hp: (m.llm.lm_head(hp[0][:, -1]).log_softmax(-1),
                                               hp[1]))(m.llm(m.llm.wte(toks[:, None]), past))
        assert salmonn.beam_search(step, m.llm.lm_head(h[:, -1]).log_softmax(-1), past, 1, 3, 0,
                                   0.0) == seq

def test_sample_options():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    audio = {"mel": torch.randn(50, 64), "codes": torch.zeros(50, 8, dtype=torch.long)}
    with torch.no_grad():
        greedy = salmonn.sample(m, tok, audio, "Transcribe.", None, beam=1,
                                max_new_tokens=8)["text"]
        a = salmonn.sample(m, tok, audio, "Transcribe.", None, beam=1, temperature=1.0, top_k=5,
                           seed=3, max_new_tokens=8)
        b = salmonn.sample(m, tok, audio, "Transcribe.", None, beam=1, temperature=1.0, top_k=5,
                           seed=3, max_new_tokens=8)
        assert a == b and isinstance(greedy, str)
        # top_k=1 leaves one token to draw: sampling at any temperature is greedy decoding
        assert salmonn.sample(m, tok, audio, "Transcribe.", None, beam=1, temperature=5.0,
                              top_k=1, seed=4, max_new_tokens=8)["text"] == greedy
        salmonn.sample(m, tok, audio, None, None, max_new_tokens=4, lora_scale=1.0)
    assert m.lora_scale == 2.0  # 8 / 4: restored after sampling
    with pytest.raises(ValueError, match="unknown options"):
        salmonn.sample(m, tok, audio, None, None, beams=2)
    with pytest.raises(ValueError, match="beam=1"):
        salmonn.sample(m, tok, audio, None, None, temperature=0.7)
    with pytest.raises(ValueError, match=r"top_k=5 limits sampling, which needs beam=1 \(beam=4"):
        salmonn.sample(m, tok, audio, None, None, top_k=5)  # beam search would ignore it
    for bad, said in (({"top_k": -1}, "top_k=-1: must be at least 0"),
                      ({"max_new_tokens": 0}, "max_new_tokens=0: must be at least 1"),
                      ({"beam": 0}, "beam=0: must be at least 1")):
        with pytest.raises(ValueError, match=said):
            salmonn.sample(m, tok, audio, None, None, **bad)
    # a prompt that leaves the answer no room in the LLM's context is refused (it answered ""),
    # as the prompt's fault when the prompt alone leaves none (no clip would fit)
    with pytest.raises(ValueError, match=r"the prompt takes \d+ of the LLM's 128 positions "
                                         r"without the audio, leaving 0 .*shorter prompt$"):
        salmonn.sample(m, tok, audio, "x" * 200, None, beam=1)

def test_options_below_their_least_refused_by_sample_and_evaluate():
    """A negative temperature is refused by sample (with beam=1 it would otherwise decode greedily,
    as if 0 had been asked), and evaluate refuses each of its options below its least before any
    work, naming itself and the option."""
    tok = ByteTokenizer()
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    with pytest.raises(ValueError, match="salmonn sample: temperature=-0.5: must be at least 0"):
        salmonn.sample(m, tok, {"mel": torch.randn(50, 64)}, None, None, beam=1, temperature=-0.5)
    for key, bad, least in (("temperature", -0.5, 0), ("top_k", -1, 0), ("max_new_tokens", 0, 1),
                            ("beam", 0, 1), ("max_clips", -1, 0)):
        with pytest.raises(ValueError, match=re.escape(f"salmonn evaluate: {key}={bad}: must be "
                                                       f"at least {least}")):
            salmonn.evaluate(m, None, tok, "val", **{key: bad})  # no data: refused before reading
    # sampling options beside beam search (EVAL_OPTS' beam 4), which would ignore them
    for key, value in (("temperature", 0.7), ("top_k", 5)):
        with pytest.raises(ValueError, match=f"{key}={value} .*which needs beam=1 \\(beam=4"):
            salmonn.evaluate(m, None, tok, "val", **{key: value})
    # a seed that is not whole (its default None lets eval.py pass any number): it was cut to 1
    with pytest.raises(ValueError, match="salmonn evaluate: seed=1.5: must be a whole number from"):
        salmonn.evaluate(m, None, tok, "val", seed=1.5, beam=1, temperature=0.7)

def test_evaluate_refuses_an_infinite_or_out_of_range_seed_in_one_line():
    """eval.py --seed=1e999 types as inf (a None default takes any number): refused as not whole,
    not an OverflowError traceback from int(inf) in the check itself; so is a seed past a torch
    generator's range (its traceback came after the data had loaded)."""
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    for seed in (float("inf"), float("-inf"), float("nan"), 2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=f"salmonn evaluate: seed={seed}: must be a whole "
                                             f"number from"):
            salmonn.eval_options({"seed": seed, "beam": 1, "temperature": 0.7})

def test_sample_refusing_a_long_clip_says_how_long_a_clip_fits():
    """The longest clip the refusal names fits with the same prompt; one window of frames more
    does not."""
    tok = ByteTokenizer()
    clip = lambda n: {"mel": torch.randn(n, 64), "codes": torch.zeros(n, 8, dtype=torch.long)}
    # the second: its longest clip, 80 frames = 1.067 s, would round up to one that does not fit
    for sizes in ({"llm_block_size": 128}, {"llm_block_size": 80, "window_frames": 4}):
        torch.manual_seed(0)
        c = tiny_config(vocab_size=257, **sizes)
        m = SALMONN(c).eval()
        with pytest.raises(ValueError, match=r"up to [\d.]+ s of audio fits") as e:
            salmonn.sample(m, tok, clip(2000), "Transcribe the audio.", None, beam=1,
                           max_new_tokens=4)
        frames = math.floor(float(re.search(r"up to ([\d.]+) s", str(e.value)).group(1))
                            * c.speech_frame_rate)
        assert frames > 0
        with torch.no_grad():
            salmonn.sample(m, tok, clip(frames), "Transcribe the audio.", None, beam=1,
                           max_new_tokens=4)
        with pytest.raises(ValueError, match="leaving"):
            salmonn.sample(m, tok, clip(frames + 2 * c.window_frames), "Transcribe the audio.",
                           None, beam=1, max_new_tokens=4)

def test_sample_says_when_an_instruction_was_not_trained(capsys):
    """A wording outside INSTRUCTIONS gets a note (the answer may be off); a trained one, the
    default and a question (QA's form) get none."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    audio = {"mel": torch.randn(50, 64), "codes": torch.zeros(50, 8, dtype=torch.long)}
    for prompt, noted in (("Describe the audio.", True), ("Transcribe the audio.", False),
                          (None, False), ("what colour is mentioned?", False)):
        with torch.no_grad():
            salmonn.sample(m, tok, audio, prompt, None, beam=1, max_new_tokens=2)
        out = capsys.readouterr().out
        assert ("not one of the trained instructions" in out) == noted, (prompt, out)
    # a long one is shown cut to 80 characters, not whole
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=512)).eval()
    with torch.no_grad():
        salmonn.sample(m, tok, audio, "Describe it. " * 9, None, beam=1, max_new_tokens=2)
    out = capsys.readouterr().out
    assert f"{('Describe it. ' * 9)[:77] + '...'!r} is not one of the trained" in out, out
    # one too long for the context is refused with its reason alone, not noted first
    with torch.no_grad(), pytest.raises(ValueError, match="give a shorter prompt"):
        salmonn.sample(m, tok, audio, "Describe it. " * 60, None, beam=1, max_new_tokens=2)
    assert "not one of the trained" not in capsys.readouterr().out

@pytest.mark.parametrize("temperature,top_k", [(0.5, 0), (2.0, 0), (0.5, 7), (2.0, 7)])
def test_sampling_draws_from_softmax_of_logits_over_temperature(multinomial_draws, temperature,
                                                                top_k):
    """The distribution each sampled token is drawn from (what generate hands torch.multinomial) is
    softmax(logits / T) of the LLM's next-token logits, computed here by one full forward pass over
    the prompt and the tokens so far; with top_k, that distribution kept on its k most likely
    tokens (0 elsewhere) and renormalised. Catches a temperature that multiplies the logits."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config()).eval()
    with torch.no_grad():
        m.llm.wte.weight.mul_(20)  # logits spread over several units: T matters clearly
        x = m.llm.wte(torch.randint(0, 61, (1, 6)))
    drawn = multinomial_draws
    out = m.generate(x, 6, eot=None, beam=1, temperature=temperature, top_k=top_k,
                     generator=torch.Generator().manual_seed(0))
    assert len(out) == len(drawn) == 6
    for i, (probs, idx) in enumerate(drawn):
        assert out[i] == idx.item()
        with torch.no_grad():
            h, _ = m.llm(torch.cat([x, m.llm.wte(torch.tensor([out[:i]], dtype=torch.long))], 1))
            logits = m.llm.lm_head(h[0, -1]).double()
        p = F.softmax(logits / temperature, dim=-1)
        if top_k:
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[p.argsort(descending=True)[:top_k]] = True
            p = torch.where(keep, p, torch.zeros_like(p))
            p = p / p.sum()
        torch.testing.assert_close(probs[0].double(), p, rtol=1e-4, atol=1e-6)
    # the check has teeth: the temperature changes the distribution a lot here
    gap = F.softmax(logits / temperature, -1) - F.softmax(logits * temperature, -1)
    assert gap.abs().max() > 0.05

class IdTokenizer(ByteTokenizer):
    """ByteTokenizer whose decode writes the ids themselves: different answers never decode
    alike."""

    def decode(self, ids):
        return " ".join(map(str, ids))

def test_sample_lora_scale_option_is_the_scale_decoded_with():
    """sample(lora_scale=0.0) answers what greedy decoding gives with the model's scale set to 0
    by hand (LoRA's B made non-zero first, so the scale matters: the default scale answers
    otherwise), and leaves the model's own scale as it was."""
    torch.manual_seed(0)
    tok = IdTokenizer()
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    for block in m.llm.h:  # large enough to change the greedy answer
        torch.nn.init.normal_(block.attn.lora_q_B, std=2.0)
        torch.nn.init.normal_(block.attn.lora_v_B, std=2.0)
    audio = {"mel": torch.randn(50, 64), "codes": torch.zeros(50, 8, dtype=torch.long)}
    opts = dict(beam=1, max_new_tokens=8)
    assert m.lora_scale == 2.0
    default = salmonn.sample(m, tok, audio, "Transcribe.", None, **opts)["text"]
    m.lora_scale = 0.0
    by_hand = salmonn.sample(m, tok, audio, "Transcribe.", None, **opts)["text"]
    m.lora_scale = 2.0
    assert by_hand != default
    assert salmonn.sample(m, tok, audio, "Transcribe.", None, lora_scale=0.0,
                          **opts)["text"] == by_hand
    assert m.lora_scale == 2.0 and all(b.attn.lora_scale == 2.0 for b in m.llm.h)
    assert salmonn.sample(m, tok, audio, "Transcribe.", None, **opts)["text"] == default
    # a scale that is not a finite number >= 0 is named, in sample and in evaluate
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"salmonn sample: lora_scale={bad}: must be a "
                                             rf"finite number, at least 0"):
            salmonn.sample(m, tok, audio, "Transcribe.", None, lora_scale=bad, **opts)
        with pytest.raises(ValueError, match=rf"salmonn evaluate: lora_scale={bad}: must be a "
                                             rf"finite number, at least 0"):
            salmonn.evaluate(m, None, tok, "val", lora_scale=bad)
    assert m.lora_scale == 2.0
    # the instruction answered comes back: the given one, or without one the captioning one
    assert salmonn.sample(m, tok, audio, "Transcribe.", None, **opts)["prompt"] == "Transcribe."
    no_prompt = salmonn.sample(m, tok, audio, None, None, **opts)
    assert no_prompt["prompt"] == salmonn.INSTRUCTIONS["captioning"][0]
    assert no_prompt["text"] == salmonn.sample(m, tok, audio, no_prompt["prompt"], None,
                                               **opts)["text"]

def test_sample_and_evaluate_run_in_eval_mode(tmp_path, monkeypatch):
    """sample and evaluate answer in eval mode without gradients and restore the mode they found: a
    model left in training mode gives the text and metrics it gives in eval mode."""
    write_tiny_data(tmp_path, CLIPS)
    tok = ByteTokenizer()
    cfg = tiny_config(stage="instruct", llm_block_size=160, dropout=0.5, lora_dropout=0.5)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    torch.manual_seed(0)
    m = SALMONN(cfg)
    for block in m.llm.h:  # B starts at zero; give LoRA (and its dropout) something to do
        torch.nn.init.normal_(block.attn.lora_q_B, std=0.5)
        torch.nn.init.normal_(block.attn.lora_v_B, std=0.5)
    seen = []  # (training, grad enabled) where the answers are generated
    generate, task_answers = m.generate, salmonn.task_answers
    monkeypatch.setattr(m, "generate", lambda *a, **k: seen.append(
        (m.training, torch.is_grad_enabled())) or generate(*a, **k))
    monkeypatch.setattr(salmonn, "task_answers", lambda model, *a: seen.append(
        (model.training, torch.is_grad_enabled())) or task_answers(model, *a))
    audio = data.clip_audio("val", 0)
    opts = dict(max_clips=1, beam=1, max_new_tokens=6)
    m.eval()
    text = salmonn.sample(m, tok, audio, "Transcribe.", None, beam=1, max_new_tokens=12)["text"]
    metrics = salmonn.evaluate(m, data, tok, "val", **opts)
    m.train()
    # the setup: in training mode the Q-Former's dropout changes the audio tokens
    mel, lens = data.clip_mel("val", 0)[None], torch.tensor([30])
    assert not torch.equal(m.encode_audio(mel, lens)[0], m.encode_audio(mel, lens)[0])
    seen.clear()
    for _ in range(3):
        assert salmonn.sample(m, tok, audio, "Transcribe.", None, beam=1,
                              max_new_tokens=12)["text"] == text
    assert salmonn.evaluate(m, data, tok, "val", **opts) == metrics
    assert len(seen) > 3 and set(seen) == {(False, False)}
    # the mode found is restored, the frozen encoders still without dropout
    assert m.training and m.qformer.training and not m.speech.training
    salmonn.evaluate(m.eval(), data, tok, "val", **opts)
    assert not m.training

# -----------------------------------------------------------------------------
# metrics, hand-worked

def test_word_error_rate():
    # one substitution, one deletion
    assert salmonn.edit_distance("a b c d".split(), "a x c".split()) == 2
    assert salmonn.word_error_rate(["a b c d"], ["a x c"]) == 0.5
    assert salmonn.word_error_rate(["a b"], ["a b c d"]) == 1.0  # two insertions over two words
    # case and punctuation ignored
    assert salmonn.word_error_rate(["Hello, World!"], ["hello world"]) == 0.0
    # corpus WER pools edits and words: (2 + 0) / (4 + 2)
    assert salmonn.word_error_rate(["a b c d", "e f"], ["a x c", "e f"]) == pytest.approx(2 / 6)
    assert salmonn.edit_distance([], ["x", "y"]) == 2 and salmonn.edit_distance(["x"], []) == 1

def test_bleu4():
    """salmonn.bleu4 is pengi.bleu4 (a marked copy, tests/test_copies.py): hypotheses first, a list
    of references each."""
    bleu = lambda refs, hyps: salmonn.bleu4(hyps, [[r] for r in refs])
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, same length: (0.2) ** (1/4)
    assert bleu(["a b c d f"], ["a b c d e"]) == pytest.approx(0.2 ** 0.25)
    # all precisions 1, hypothesis 4 words against 6: brevity penalty exp(1 - 6/4)
    assert bleu(["a b c d e f"], ["a b c d"]) == pytest.approx(math.exp(-0.5))
    # clipping: "the" counts at most twice; no 4-gram matches -> 0 (no smoothing)
    assert bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == 0.0
    # corpus level: counts pooled over sentences. p1 = 9/10, p2 = 6/8, p3 = 3/6, p4 = 2/4
    got = bleu(["a b c d e", "v w x y z"], ["a b c d e", "v w q y z"])
    assert got == pytest.approx((9 / 10 * 6 / 8 * 3 / 6 * 2 / 4) ** 0.25)

def test_accuracy():
    assert salmonn.accuracy(["Piano", "two", "siren"],
                            ["piano.", "three", "a siren"]) == pytest.approx(1 / 3)

def test_transcription_metrics_per_kind():
    """Each kind's WER (decoder and CTC) pairs that kind's references with their own hypotheses,
    whatever the order of the clips."""
    refs = ["a b", "one two", "c d", "three"]
    kinds = ["speech", "dtmf", "speech", "dtmf"]
    hyps = ["a b", "one two", "c x", "four"]
    ctc = ["a x", "one two", "x x", "three"]
    train = {"entries": {"transcription": []}, "clips": []}
    got = salmonn.transcription_metrics(refs, hyps, ctc, kinds, train)
    assert got["wer"] == pytest.approx(2 / 7)
    assert got["wer_speech"] == pytest.approx(1 / 4) and got["wer_dtmf"] == pytest.approx(1 / 3)
    assert got["ctc_wer_speech"] == pytest.approx(3 / 4) and got["ctc_wer_dtmf"] == 0.0
    assert got["n_speech"] == 2 and got["n_dtmf"] == 2
    # best constant answer per kind, WER over the kind's reference words: speech "a b" to both
    # clips, 0 + 2 edits over 4 words; dtmf "three" (or "one two"), 2 + 0 edits over 3 words
    assert got["const_wer_speech"] == pytest.approx(2 / 4)
    assert got["const_wer_dtmf"] == pytest.approx(2 / 3)

def test_text_perplexity_is_exp_of_the_mean_loss():
    """Stage "llm"'s perplexity: exp of the mean window loss (not the mean of per-window
    perplexities), over successive llm_block_size windows, the next token the target."""
    class WindowLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SALMONNConfig(llm_block_size=4)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, y):
            assert (y[:, :-1] == x[:, 1:]).all()
            return None, x.float().mean() / 4  # a loss that differs per window

    stream = np.arange(15, dtype=np.uint16)  # windows at 0, 4, 8 (the last needs 8..12 + 1)
    losses = [np.arange(s, s + 4).mean() / 4 for s in (0, 4, 8)]
    got = salmonn.text_perplexity(WindowLoss(), stream, 0)
    assert got == pytest.approx(math.exp(np.mean(losses)))
    assert salmonn.text_perplexity(WindowLoss(), stream, 2) == pytest.approx(
        math.exp(np.mean(losses[:2])))
    # 13 tokens still hold the window at 8 (8..11, its last target 12)
    assert salmonn.text_perplexity(WindowLoss(), stream[:13], 0) == pytest.approx(got)
    # llm_block_size + 1 tokens: one window; fewer: no window, named
    assert salmonn.text_perplexity(WindowLoss(), stream[:5], 0) == pytest.approx(
        math.exp(losses[0]))
    with pytest.raises(ValueError, match="the text stream has 4 tokens; perplexity needs more "
                                         "than llm_block_size=4"):
        salmonn.text_perplexity(WindowLoss(), stream[:4], 0)

# -----------------------------------------------------------------------------
# the pretrained parts' stand-ins: stage "whisper" (encoder-decoder + CTC), stage "beats" (tagging),
# and the LLM's copying documents

def test_whisper_stage_trains_the_encoder_with_decoder_and_ctc():
    torch.manual_seed(0)
    cfg = tiny_config(stage="whisper", whisper_dec_n_layer=1, whisper_text_ctx=12, ctc_weight=0.5)
    m = SALMONN(cfg)
    assert set(dict(m.named_children())) == {"speech", "decoder", "ctc_head"}
    lens = torch.tensor([40, 26])
    mel = torch.randn(2, 40, cfg.n_mels)
    idx = torch.tensor([[60, 5, 6, 7, 0], [60, 8, 0, 0, 0]])
    targets = torch.tensor([[5, 6, 7, 60, -1], [8, 60, -1, -1, -1]])
    ctc = torch.tensor([[5, 6, 7, -1], [8, -1, -1, -1]])
    logits, loss = m(idx=idx, targets=targets, ctc_targets=ctc, mel=mel, mel_lens=lens)
    assert logits.shape == (2, 5, cfg.vocab_size)
    # the loss is the weighted sum of the decoder's cross-entropy and CTC, computed here directly
    audio, enc_lens = m.speech(mel, lens)
    ce = F.cross_entropy(m.decoder(idx, audio, enc_lens).reshape(-1, cfg.vocab_size),
                         targets.reshape(-1), ignore_index=-1)
    logp = m.ctc_head(audio).log_softmax(-1).transpose(0, 1)
    ctc_ref = F.ctc_loss(logp, torch.tensor([5, 6, 7, 8]), enc_lens, torch.tensor([3, 1]),
                         blank=cfg.vocab_size)
    assert torch.allclose(loss, 0.5 * ce + 0.5 * ctc_ref, atol=1e-5)
    # the decoder is causal: changing a later token leaves earlier logits alone
    idx2 = idx.clone()
    idx2[0, 3] = 9
    with torch.no_grad():
        a, b = m.decoder(idx, audio, enc_lens), m.decoder(idx2, audio, enc_lens)
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6) and not torch.allclose(a[0, 3], b[0, 3])
    # the encoder learns through both heads: each term alone gives it a gradient, and the model's
    # loss gives it exactly their weighted sum (a head that read a detached encoder output would
    # leave its half out)
    params = list(m.speech.parameters())
    grad = lambda y: torch.cat([g.flatten() for g in
                                torch.autograd.grad(y, params, retain_graph=True,
                                                    allow_unused=True, materialize_grads=True)])
    g_loss, g_ce, g_ctc = grad(loss), grad(ce), grad(ctc_ref)
    want = 0.5 * g_ce + 0.5 * g_ctc
    err = (g_loss - want).norm()
    assert err <= 1e-5 * want.norm()
    assert 0.5 * g_ce.norm() > 1e3 * err and 0.5 * g_ctc.norm() > 1e3 * err
    tok = ByteTokenizerEot60()
    dec, ctc_text = salmonn.whisper_transcribe(m.eval(), tok,
                                               [{"mel": mel[0, :40]}, {"mel": mel[1, :26]}])
    # clip 1 alone, greedy by hand: the decoder's argmax until the end token
    with torch.no_grad():
        audio1, lens1 = m.speech(mel[1:, :26], lens[1:])
        seq = [60]
        while len(seq) < cfg.whisper_text_ctx:
            seq.append(m.decoder(torch.tensor([seq]), audio1, lens1)[0, -1].argmax().item())
            if seq[-1] == 60:
                break
        best = m.ctc_head(audio1)[0].argmax(-1).tolist()
    assert dec[1] == tok.decode([t for t in seq[1:] if t != 60]).strip()
    # CTC's best path: repeats merged, blanks (id 61 = vocab_size) dropped
    assert ctc_text[1] == tok.decode([t for j, t in enumerate(best)
                                      if t != 61 and (j == 0 or t != best[j - 1])]).strip()
    # sample.py on this checkpoint prints both transcripts; it takes no prompt
    out = salmonn.sample(m, tok, {"mel": mel[1, :26]}, None)
    assert out["text"] == f"{dec[1]}\n(CTC head: {ctc_text[1]})"
    with pytest.raises(ValueError, match="no prompt"):
        salmonn.sample(m, tok, {"mel": mel[1, :26]}, "Transcribe.")

@torch.no_grad()
def test_text_decoder_adds_each_positions_learned_embedding():
    """The text decoder adds position t's learned embedding to the token at t: a run of one token
    gives each position its own logits, and changing position 2's embedding changes the logits
    from position 2 on (the decoder is causal), never before."""
    torch.manual_seed(0)
    cfg = tiny_config(stage="whisper", whisper_dec_n_layer=1, whisper_text_ctx=12)
    m = SALMONN(cfg).eval()
    speech, enc_lens = m.speech(torch.randn(1, 30, cfg.n_mels), torch.tensor([30]))
    idx = torch.tensor([[60, 5, 5, 5, 5]])
    a = m.decoder(idx, speech, enc_lens)
    assert not torch.allclose(a[0, 2], a[0, 3], atol=1e-6)
    m.decoder.positional_embedding[2] += torch.randn(cfg.speech_n_embd)
    b = m.decoder(idx, speech, enc_lens)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-3)

@torch.no_grad()
def test_whisper_transcribe_ctc_reads_each_clips_own_frames():
    """The CTC head's transcript of a clip: the best path over the clip's own speech frames only,
    repeats merged, blanks dropped; a short clip transcribed next to a longer one gives what it
    gives alone. Here a head whose best path is 40, 40, blank, 41, 41, blank, 42, ..."""
    torch.manual_seed(0)
    cfg = tiny_config(stage="whisper", whisper_dec_n_layer=1, whisper_text_ctx=4)
    m = SALMONN(cfg).eval()
    blank = salmonn.ctc_blank(cfg)
    path = torch.tensor([blank if t % 3 == 2 else 40 + t // 3 for t in range(64)])
    del m.ctc_head
    m.ctc_head = lambda s: F.one_hot(path[:s.size(1)], blank + 1).float().expand(s.size(0), -1, -1)
    mels = [torch.randn(40, cfg.n_mels), torch.randn(25, cfg.n_mels)]  # 20 and 13 speech frames
    _, both = salmonn.whisper_transcribe(m, ByteTokenizerEot60(), [{"mel": x} for x in mels])
    _, alone = salmonn.whisper_transcribe(m, ByteTokenizerEot60(), [{"mel": mels[1]}])
    assert both == [bytes(range(40, 47)).decode(), bytes(range(40, 45)).decode()]
    assert alone == both[1:]

@torch.no_grad()
def test_text_decoder_reads_only_its_clips_frames():
    """Stage "whisper": the decoder's cross-attention reads a clip's own encoder frames only: a clip
    padded in a batch next to a longer one gives the logits it gives alone, though the encoder's
    output at the padding positions is far from zero."""
    torch.manual_seed(0)
    cfg = tiny_config(stage="whisper", whisper_dec_n_layer=1, whisper_text_ctx=12)
    m = SALMONN(cfg).eval()
    mel, lens = torch.randn(2, 40, cfg.n_mels), torch.tensor([40, 26])
    idx = torch.tensor([[60, 5, 6, 7], [60, 8, 9, 10]])
    speech, enc_lens = m.speech(mel, lens)
    assert enc_lens.tolist() == [20, 13] and speech[1, 13:].abs().amax() > 0.1
    alone_speech, alone_lens = m.speech(mel[1:, :26], lens[1:])
    torch.testing.assert_close(m.decoder(idx, speech, enc_lens)[1:],
                               m.decoder(idx[1:], alone_speech, alone_lens), rtol=1e-5, atol=1e-5)

def test_whisper_stage_ctc_on_characters(tmp_path):
    # the batch spells each transcript for CTC; the decoder keeps the tokens
    write_tiny_data(tmp_path, CLIPS)
    data = salmonn.load_data(str(tmp_path), tiny_config(stage="whisper", ctc_units="chars"),
                             ByteTokenizer())
    batch = salmonn.get_batch(data, "train", 4, np.random.default_rng(0))
    spelled = [salmonn.CTC_CHARS.index(c) for c in "s o s"]  # Morse transcripts are spelled
    assert batch["ctc_targets"].tolist() == [spelled] * 4
    assert ByteTokenizer().decode(batch["targets"][0, :-1].tolist()) == " s o s"
    torch.manual_seed(0)
    cfg = tiny_config(stage="whisper", whisper_dec_n_layer=1, whisper_text_ctx=12, ctc_weight=0.5,
                      ctc_units="chars")
    m = SALMONN(cfg)
    chars = salmonn.CTC_CHARS
    assert m.ctc_head.out_features == len(chars) + 1  # + the blank, last
    assert salmonn.ctc_encode("Kite, 7#!") == [chars.index(c) for c in "kite 7#"]
    lens = torch.tensor([40, 26])
    mel = torch.randn(2, 40, cfg.n_mels)
    idx = torch.tensor([[60, 5, 6, 7, 0], [60, 8, 0, 0, 0]])
    targets = torch.tensor([[5, 6, 7, 60, -1], [8, 60, -1, -1, -1]])
    spelled = [salmonn.ctc_encode("go on"), salmonn.ctc_encode("up")]
    ctc = torch.tensor([spelled[0], spelled[1] + [-1] * 3])
    _, loss = m(idx=idx, targets=targets, ctc_targets=ctc, mel=mel, mel_lens=lens)
    audio, enc_lens = m.speech(mel, lens)
    ce = F.cross_entropy(m.decoder(idx, audio, enc_lens).reshape(-1, cfg.vocab_size),
                         targets.reshape(-1), ignore_index=-1)
    logp = m.ctc_head(audio).log_softmax(-1).transpose(0, 1)
    ctc_ref = F.ctc_loss(logp, torch.tensor(spelled[0] + spelled[1]), enc_lens,
                         torch.tensor([5, 2]), blank=len(chars))
    assert torch.allclose(loss, 0.5 * ce + 0.5 * ctc_ref, atol=1e-5)
    # best-path decoding: repeats merge, blanks separate and vanish -> characters
    blank = len(chars)
    path = [chars.index("h")] * 3 + [blank, chars.index("i"), blank, chars.index("i"), blank]

    class FixedPath(torch.nn.Module):
        def forward(self, audio):
            out = torch.zeros(audio.size(0), audio.size(1), blank + 1)
            out[:, :, blank] = 1.0
            out[:, torch.arange(len(path)), torch.tensor(path)] = 5.0
            return out
    m.ctc_head = FixedPath()
    _, ctc_text = salmonn.whisper_transcribe(m.eval(), ByteTokenizerEot60(),
                                             [{"mel": mel[0, :40]}])
    assert ctc_text == ["hii"]
    # in a batch, a clip's path ends at its own length: the frames a longer clip pads it with
    # (here "x" from encoder frame 20, the 40-frame clip's end) are not read
    class XAfter20(FixedPath):
        def forward(self, audio):
            out = super().forward(audio)
            out[:, 20:, chars.index("x")] = 9.0
            return out
    m.ctc_head = XAfter20()
    _, ctc_text = salmonn.whisper_transcribe(m.eval(), ByteTokenizerEot60(),
                                             [{"mel": mel[0, :40]}, {"mel": torch.randn(80, 64)}])
    assert ctc_text == ["hii", "hiix"]
    with pytest.raises(ValueError, match="ctc_units must be"):
        SALMONN(tiny_config(stage="whisper", ctc_units="letters"))

def test_espeak_phonemes_are_the_voices_own():
    """synth.phonemes against libespeak-ng's own phoneme string (no separator; espeak-ng -x gives
    the same, e.g. "h@l'oU w'3:ld" for en-us) with the stress marks taken out, and against the
    published en-us mnemonics of "hello"; the voice's accent counts (en-us "tomato" has
    "eI", en-gb "A:")."""
    import synth
    hello = synth.phonemes(["hello world", "where is the red car"], "en-us")
    assert hello[0] == ["h", "@", "l", "oU", " ", "w", "3:", "l", "d"]
    lib = synth.espeak_open()
    try:
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                              ctypes.c_int]
        lib.espeak_SetVoiceByName(b"en-us")
        plain = lib.espeak_TextToPhonemes(ctypes.byref(ctypes.c_char_p(b"where is the red car")),
                                          0, 0).decode()
    finally:
        synth.espeak_close(lib)
    words = [w.replace("'", "").replace(",", "") for w in plain.split()]
    assert salmonn.phoneme_text(hello[1]).replace("_", "").split() == words
    us, gb = synth.phonemes(["tomato"], "en-us+Andy")[0], synth.phonemes(["tomato"],
                                                                         "en-gb-x-rp+m1")[0]
    assert us[:3] == gb[:3] == ["t", "@", "m"] and us[3] == "eI" and gb[3] == "A:"

def test_whisper_stage_ctc_on_phonemes(tmp_path, monkeypatch):
    """ctc_units="phonemes": a speech clip's CTC targets are the phonemes its voice speaks (after
    the token ids), other kinds keep their tokens; the inventory is the train split's and stays in
    the config (the checkpoint); CTC's read-out names the phonemes and speech gets a phoneme
    error rate, checked against a hand count, and in evaluate against each clip's own phonemes
    (CTC's output stubbed: the references exactly, then one phoneme short per clip)."""
    import synth
    speech = [("d", "m1", "where is the red kite"), ("e", "f2", "a blue car")]
    clips = CLIPS + [{"id": i, "frames": 45, "kind": "speech", "transcript": text,
                      "caption": "someone speaks.", "description": None, "qa": [],
                      "labels": {"class": "speech", "gender": synth.SPEAKERS[who][1],
                                 "speaker": who}}
                     for i, who, text in speech]
    write_tiny_data(tmp_path, clips)
    tok, cfg = ByteTokenizerEot60(), tiny_config(stage="whisper", ctc_units="phonemes")
    with pytest.raises(ValueError, match="needs ctc_phonemes"):
        SALMONN(cfg)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    # each clip in its own voice's phonemes (m1 is en-gb, f2 en-us)
    spoken = {i: synth.phonemes([text], synth.SPEAKERS[who][0])[0] for i, who, text in speech}
    inventory = cfg.ctc_phonemes.split("|")
    assert inventory == sorted(set(spoken["d"]) | set(spoken["e"]))
    batch = salmonn.get_batch(data, "train", 16, np.random.default_rng(0))
    rows = {tuple(t for t in row if t >= 0) for row in batch["ctc_targets"].tolist()}
    assert rows == {*(tuple(cfg.vocab_size + inventory.index(p) for p in ph)
                      for ph in spoken.values()),
                    tuple(salmonn.encode_text(tok, " s o s"))}
    m = SALMONN(cfg)
    assert m.ctc_head.out_features == cfg.vocab_size + len(inventory) + 1  # + the blank, last
    again = SALMONN(salmonn.SALMONNConfig(**{**cfg.__dict__}))  # as a checkpoint's config builds
    assert again.ctc_head.out_features == m.ctc_head.out_features
    # read-out: tokens decoded, phonemes "_"-joined within a word
    ids = [cfg.vocab_size + inventory.index(p) for p in spoken["d"]]
    assert salmonn.ctc_text(ids, cfg, tok) == salmonn.phoneme_text(spoken["d"])
    assert salmonn.phoneme_text(["D", "@2", " ", "r", "E", "d"]) == "D_@2 r_E_d"
    # one substitution (d -> t) and one deletion (@2) of 5 phonemes; "D" and "d" differ
    assert salmonn.phoneme_error_rate(["D_@2 r_E_d"], ["D r_E_t"]) == pytest.approx(2 / 5)
    assert salmonn.phoneme_error_rate(["D_@2"], ["d_@2"]) == pytest.approx(1 / 2)
    r = salmonn.evaluate(m.eval(), data, tok, "val")
    assert "ctc_per_speech" in r and "ctc_wer_speech" not in r and "ctc_wer_morse" in r
    # evaluate with CTC's output known: each clip (told by its mel) gets its own phonemes, less
    # `drop` of them at the end (the last words have more than one phoneme), the decoder its
    # transcript
    S = data.splits["val"]
    cis = {S["clips"][ci]["id"]: ci for ci, _, _ in S["entries"]["transcription"]}
    assert sorted(cis) == ["a", "d", "e"]
    by_mel = {data.clip_audio("val", ci)["mel"].numpy().tobytes(): i for i, ci in cis.items()}
    assert len(by_mel) == 3 and all(ph[-2] != " " for ph in spoken.values())
    text = {S["clips"][ci]["id"]: a for ci, _, a in S["entries"]["transcription"]}

    def stub(drop):
        def whisper_transcribe(model, tok, audios, **kw):
            who = [by_mel[a["mel"].numpy().tobytes()] for a in audios]
            return ([text[i] for i in who],
                    [salmonn.phoneme_text(spoken[i][:len(spoken[i]) - drop]) if i in spoken
                     else text[i] for i in who])
        return whisper_transcribe
    monkeypatch.setattr(salmonn, "whisper_transcribe", stub(0))
    r = salmonn.evaluate(m, data, tok, "val")
    assert r["ctc_per_speech"] == 0 and r["ctc_wer_morse"] == 0 and r["wer"] == 0
    assert r["n_speech"] == 2
    # one deletion per clip: corpus-level, the edits over all reference phonemes (not the mean of
    # the clips' rates, which differs: 13 and 6 phonemes)
    n = [sum(p != " " for p in ph) for ph in spoken.values()]
    monkeypatch.setattr(salmonn, "whisper_transcribe", stub(1))
    r = salmonn.evaluate(m, data, tok, "val")
    assert r["ctc_per_speech"] == pytest.approx(len(n) / sum(n))
    assert r["ctc_per_speech"] != pytest.approx(np.mean([1 / k for k in n]))
    assert r["ctc_wer_morse"] == 0 and r["wer"] == 0

def test_whisper_stage_checkpoint_gives_stage_1_its_frozen_encoder(tmp_path):
    """Our stage-"whisper" and stage-"beats" checkpoints load into stage 1 (sizes from the files),
    frozen, and the stage-1 checkpoint is self-contained: it loads, samples and evaluates after the
    earlier files are gone."""
    torch.manual_seed(0)
    w = SALMONN(tiny_config(stage="whisper", speech_n_layer=2, speech_n_embd=16))
    b = SALMONN(tiny_config(stage="beats", beats_n_embd=8, tags="class=a|class=b"))
    for name, mod in (("w.pt", w), ("b.pt", b)):
        save_part(mod, tmp_path / name)
    cfg = tiny_config(whisper_init=str(tmp_path / "w.pt"), beats_init=str(tmp_path / "b.pt"))
    m = build(cfg)
    assert (cfg.speech_n_layer, cfg.speech_n_embd, cfg.beats_n_embd) == (2, 16, 8)
    for k, v in w.speech.state_dict().items():
        assert torch.equal(m.speech.state_dict()[k], v), k
    for k, v in b.beats.state_dict().items():
        assert torch.equal(m.beats.state_dict()[k], v), k
    assert not any(p.requires_grad
                   for p in itertools.chain(m.speech.parameters(), m.beats.parameters()))
    torch.save({"model": m.state_dict(), "model_args": asdict(m.config)}, tmp_path / "stage1.pt")
    # the checkpoint's config names no file to read again: here the encoder's file is replaced by
    # one of other sizes and the beats file is gone, and the checkpoint's sizes stand
    assert (m.config.whisper_init, m.config.beats_init, m.config.llm_init) == ("", "", "")
    w3 = SALMONN(tiny_config(stage="whisper", speech_n_layer=1, speech_n_embd=24))
    save_part(w3, tmp_path / "w.pt")
    os.remove(tmp_path / "b.pt")
    ck = torch.load(tmp_path / "stage1.pt", weights_only=True)
    cfg2 = SALMONNConfig(**ck["model_args"])
    salmonn.set_pretrained_dims(cfg2)  # as load_data does at evaluation
    assert (cfg2.speech_n_layer, cfg2.speech_n_embd, cfg2.beats_n_embd) == (2, 16, 8)
    m2 = SALMONN(cfg2)
    m2.load_state_dict(ck["model"])
    m2.eval()
    batch = random_batch(cfg2)
    with torch.no_grad():
        assert torch.equal(m2(**batch)[1], m.eval()(**batch)[1])
    out = salmonn.sample(m2, ByteTokenizerEot60(), {"mel": torch.randn(30, cfg2.n_mels)},
                         "Transcribe.", None, beam=1, max_new_tokens=4)
    assert isinstance(out["text"], str)
    # training from a config that names a missing file says which
    with pytest.raises(FileNotFoundError, match="beats_init"):
        salmonn.init_pretrained(SALMONN(tiny_config(beats_init=str(tmp_path / "b.pt"))))

def test_encoder_checkpoints_of_other_mel_bins_refused(tmp_path):
    """A whisper_init or beats_init trained on data of another n_mels is refused with a ValueError
    that names the file and both sizes, before any weight is loaded (the shapes' mismatch in
    load_state_dict is a RuntimeError, which train.py does not catch)."""
    torch.manual_seed(0)
    for stage in ("whisper", "beats"):  # on 64-bin data
        mod = SALMONN(tiny_config(stage=stage, tags="class=a|class=b"))
        save_part(mod, tmp_path / f"{stage}.pt")
    w, b = str(tmp_path / "whisper.pt"), str(tmp_path / "beats.pt")
    # stage 1 on 80-bin data
    with pytest.raises(ValueError, match="beats_init=.*beats.pt: its beats encoder reads 64 mel "
                                         "bins, the model built for the data 80"):
        build(tiny_config(n_mels=80, beats_init=b))
    write_tiny_data(tmp_path / "data80", CLIPS, n_mels=80)
    with pytest.raises(ValueError, match="whisper_init=.*whisper.pt: the speech encoder reads 64 "
                                         "mel bins, .*data80 has 80"):
        salmonn.load_data(str(tmp_path / "data80"), tiny_config(whisper_init=w), ByteTokenizer())
    with pytest.raises(ValueError, match="whisper_init=.*whisper.pt: its speech encoder reads 64 "
                                         "mel bins, the model built for the data 80"):
        salmonn.init_pretrained(SALMONN(tiny_config(n_mels=80, whisper_init=w)))
    # on data of their own n_mels both load
    m = build(tiny_config(whisper_init=w, beats_init=b))
    assert torch.equal(m.beats.band_emb, torch.load(b)["model"]["beats.band_emb"])

def test_encoder_checkpoint_missing_a_weight_refused(tmp_path):
    """A whisper_init or beats_init without one of the encoder's weights is refused naming it, not
    loaded with that weight left at its random init."""
    torch.manual_seed(0)
    for stage, part, key in (("whisper", "speech", "ln_post.bias"),
                             ("beats", "beats", "band_emb")):
        mod = SALMONN(tiny_config(stage=stage, tags="class=a|class=b"))
        state = mod.state_dict()
        del state[f"{part}.{key}"]
        path = str(tmp_path / f"{stage}.pt")
        torch.save({"model": state, "model_name": "salmonn", "model_args": asdict(mod.config)},
                   path)
        with pytest.raises(ValueError, match=re.escape(f"{stage}_init={path}: missing ['{key}']")):
            build(tiny_config(**{f"{stage}_init": path}))

def test_whisper_features_drive_the_speech_encoder_and_windows():
    """speech_features="whisper": the speech encoder reads the 100 frames/s Whisper stream, the
    windows count its frames (50/s after the stem), and each speech frame is paired with the
    audio-event frame covering its instant."""
    torch.manual_seed(0)
    cfg = tiny_config(speech_features="whisper", speech_n_mels=80, speech_frame_rate=100.0,
                      frame_rate=75.0)
    m = SALMONN(cfg).eval()
    mel = torch.randn(1, 75, cfg.n_mels)      # 1 s of the data's mel
    wmel = torch.randn(1, 100, 80)            # the same second of Whisper's features
    n = n_audio_tokens(100, cfg)
    assert n == 50 // 4 * 2 + 2               # ceil(50 / window 4) windows x 2 queries
    tokens, valid = m.encode_audio(mel, torch.tensor([75]), wmel, torch.tensor([100]))
    assert tokens.shape[1] == n and valid.all()
    s, _ = m.speech(wmel, torch.tensor([100]))
    a = m.beats(mel, torch.tensor([75]))
    # speech frame i, at i / 50 s, lies in audio-event frame floor(i * 37.5 / 50)
    at = (torch.arange(50) * 0.75).long()
    x = torch.cat([m.ln_speech(s), m.ln_audio(a[:, at])], -1)
    q, _ = m.qformer(x, torch.tensor([50]))
    p = m.proj(q)  # then each audio token rescaled to the LLM's token RMS (audio_scale)
    assert torch.allclose(tokens, p * m.audio_scale / p.pow(2).mean(-1, keepdim=True).sqrt(),
                          atol=1e-5)
    with pytest.raises(ValueError, match="whisper"):
        m.encode_audio(mel, torch.tensor([75]))
    # a clip whose Whisper frames run past its own mel frames (features of another framing): its
    # last speech frames take its own last audio-event frame, not a longer neighbour's padding, so
    # its tokens are the same alone and beside that neighbour
    mels, wmels = torch.randn(2, 75, cfg.n_mels), torch.randn(2, 101, 80)
    lens, wlens = torch.tensor([75, 30]), torch.tensor([101, 41])
    together, valid = m.encode_audio(mels, lens, wmels, wlens)
    alone, valid_alone = m.encode_audio(mels[1:, :30], lens[1:], wmels[1:, :41], wlens[1:])
    assert torch.allclose(together[1][valid[1]], alone[0][valid_alone[0]], atol=1e-5)

def test_beats_stage_tags_and_average_precision():
    torch.manual_seed(0)
    cfg = tiny_config(stage="beats", tags="class=a|class=b|pitch=C4")
    m = SALMONN(cfg)
    assert set(dict(m.named_children())) == {"beats", "tag_head"}
    mel, lens = torch.randn(2, 40, cfg.n_mels), torch.tensor([40, 24])
    tags = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    logits, loss = m(mel=mel, mel_lens=lens, tags=tags)
    assert logits.shape == (2, 3)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, tags))
    # padding never reaches a clip's tags: clip 1 alone gives the same logits
    with torch.no_grad():
        alone, _ = m(mel=mel[1:, :24], mel_lens=lens[1:])
    assert torch.allclose(alone, logits[1:], atol=1e-5)
    # sample.py on this checkpoint: the tags, most likely first, with their probabilities
    out = salmonn.sample(m.eval(), None, {"mel": mel[1, :24]}, None)["text"]
    p = torch.sigmoid(alone[0])
    assert out == "tags: " + ", ".join(f"{cfg.tags.split('|')[i]} ({p[i]:.2f})"
                                       for i in p.argsort(descending=True).tolist())
    # AP: positives ranked 1 and 3 -> (1/1 + 2/3) / 2
    assert salmonn.average_precision(np.array([0.9, 0.8, 0.7, 0.1]),
                                     np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert salmonn.average_precision(np.array([0.5, 0.4]), np.array([0, 0])) is None

@torch.no_grad()
def test_beats_stage_sample_shows_the_five_most_likely_tags():
    """With more than 5 tags, sample.py on a stage-"beats" checkpoint lists the 5 most likely, each
    with its sigmoid probability, most likely first."""
    torch.manual_seed(0)
    names = [f"class=c{i}" for i in range(7)]
    cfg = tiny_config(stage="beats", tags="|".join(names))
    m = SALMONN(cfg).eval()
    mel = torch.randn(30, cfg.n_mels)
    logits, _ = m(mel=mel[None], mel_lens=torch.tensor([30]))
    p = torch.sigmoid(logits[0])
    top = p.argsort(descending=True)[:5].tolist()
    out = salmonn.sample(m, None, {"mel": mel}, None)["text"]
    assert out == "tags: " + ", ".join(f"{names[i]} ({p[i]:.2f})" for i in top)

@torch.no_grad()
def test_audio_token_rms_of_the_clips_own_tokens():
    """audio_token_rms: the RMS over the audio tokens the clips give (each clip encoded alone here,
    so a shorter clip's padding windows are not counted), and the LLM's token and position
    embeddings' RMS."""
    torch.manual_seed(0)
    cfg = tiny_config(audio_norm=False)
    m = SALMONN(cfg).eval()
    mels = [torch.randn(40, cfg.n_mels), torch.randn(9, cfg.n_mels)]
    class Data:
        splits = {"val": {"clips": [{}, {}]}}
        def clip_audio(self, split, ci):
            return {"mel": mels[ci]}
    got = salmonn.audio_token_rms(m, Data(), "val")
    alone = [m.encode_audio(x[None], torch.tensor([len(x)])) for x in mels]
    tokens = torch.cat([t[v] for t, v in alone])
    assert len(tokens) == n_audio_tokens(40, cfg) + n_audio_tokens(9, cfg)
    assert got["audio_rms"] == pytest.approx(tokens.pow(2).mean().sqrt().item(), rel=1e-4)
    assert got["token_rms"] == pytest.approx(m.llm.wte.weight.pow(2).mean().sqrt().item(), rel=1e-5)
    assert got["pos_rms"] == pytest.approx(m.llm.wpe.weight.pow(2).mean().sqrt().item(), rel=1e-5)

def test_beats_stage_learns_to_tag_the_corpus(synth_dir):
    """Stage "beats" trained briefly (400 steps of 16 clips, one band per time step, one thread, ~3
    s) on the built-in corpus: its tags' mAP on the held-out clips rises well above the untrained
    model's, and its class accuracy beats the best constant class (what learning the tags'
    frequencies alone gives) on the training clips by far and on the ~14 held-out ones too (seeds
    0-8: held-out mAP 0.63-0.86 against 0.21-0.46 untrained, class accuracy 0.64-0.79 against
    0.43; on the training clips 0.73-0.92 against 0.29; seed 0 on torch 2.13: 0.64, 0.71, 0.92)."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    cfg = tiny_config(stage="beats", vocab_size=tok.n_vocab, beats_n_embd=32, beats_n_head=4,
                      beats_patch_f=64)
    data = salmonn.load_data(synth_dir, cfg, tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = SALMONN(cfg)
        untrained = salmonn.evaluate(m, data, tok, "val")
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
        rng = np.random.default_rng(0)
        for _ in range(400):
            _, loss = m(**salmonn.get_batch(data, "train", 16, rng))
            opt.zero_grad()
            loss.backward()
            opt.step()
        got = {split: salmonn.evaluate(m, data, tok, split) for split in ("train", "val")}
    finally:
        torch.set_num_threads(threads)

    def best_constant(split):  # the share of the split's most common class
        classes = [c["labels"]["class"] for c in data.splits[split]["clips"]
                   if "class" in (c.get("labels") or {})]
        return Counter(classes).most_common(1)[0][1] / len(classes)
    assert got["val"]["n_clips"] >= 10
    assert got["val"]["tag_map"] > untrained["tag_map"] + 0.15, (untrained, got)
    assert got["val"]["tag_cls_acc"] > best_constant("val") + 0.1, got
    assert got["train"]["tag_cls_acc"] > best_constant("train") + 0.3, got

def test_tagging_metrics_by_hand(monkeypatch):
    """Stage "beats"'s evaluation: mAP over the tags that have a positive, and class accuracy on
    the clips that have a class (a clip without one is not counted wrong)."""
    clips = [{"labels": {"class": "a", "pitch": "C4"}}, {"labels": {"class": "b"}},
             {"labels": {"pitch": "C4"}}, {"labels": {"class": "a"}}]
    tag_index = {"class=a": 0, "class=b": 1, "pitch=C4": 2}
    logits = torch.tensor([[2.0, 1.0, 0.5],   # class a (right)
                           [1.0, 0.0, 0.9],   # class a (wrong: b)
                           [3.0, 0.0, 0.8],   # no class
                           [0.0, 1.0, 0.1]])  # class b (wrong: a)

    class Data:
        splits = {"val": {"clips": clips}}
        n_mels = 4

        def __init__(self):
            self.tag_index = tag_index

        def clip_mel(self, split, ci):
            return torch.full((3, 4), float(ci))  # the clip's index, for the stand-in below

    monkeypatch.setattr(salmonn, "clip_tag_logits",
                        lambda model, mels, n_mels: logits[[int(m[0, 0]) for m in mels]])
    got = salmonn.tagging_metrics(None, Data(), "val", 0)
    ap = [salmonn.average_precision(logits[:, j].numpy(), np.array(col))
          for j, col in enumerate(([1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]))]
    # hand-worked: class=a's positives rank 2 and 4 -> (1/2 + 2/4) / 2; class=b's 3rd (a tie
    # keeps clip order) -> 1/3; pitch's 2nd and 3rd -> (1/2 + 2/3) / 2
    assert ap == pytest.approx([1 / 2, 1 / 3, (1 / 2 + 2 / 3) / 2])
    assert got["tag_map"] == pytest.approx(np.mean(ap))
    assert got["tag_cls_acc"] == pytest.approx(1 / 3) and got["n_clips"] == 4

def copy_probe_model(synth_dir):
    """A tiny stage-"llm" SALMONN, its tokenizer, and span(x): the token ids of the span that the
    copy probe's prompt x (its embeddings) asks to repeat, read back from the embeddings."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    torch.manual_seed(0)
    m = SALMONN(tiny_config(stage="llm", vocab_size=tok.n_vocab, llm_block_size=96))
    pre = len(salmonn.encode_text(tok, salmonn.PROMPT_PREFIX))
    suffix = salmonn.PROMPT_SUFFIX.format(instruction=salmonn.COPY_INSTRUCTIONS["repeat"][0])
    post = len(salmonn.encode_text(tok, suffix))

    def span(x):
        ids = torch.cdist(x[0], m.llm.wte.weight).argmin(-1).tolist()
        return ids[pre:len(ids) - post]
    return m, tok, span

def test_copy_probe_scores_copying(synth_dir):
    """The probe that stage 1 runs on its LLM: 0 for a random LLM, 1 for one that repeats the span
    (a stand-in whose generate returns the span)."""
    m, tok, span = copy_probe_model(synth_dir)
    assert salmonn.copy_probe(m, tok, n=10) == 0.0
    m.generate = lambda x, max_new_tokens, eot, beam: span(x)
    assert salmonn.copy_probe(m, tok, n=10) == 1.0
    words = salmonn.vocab_words(tok)
    assert len(words) > 100 and all(len(tok.encode(" " + w)) == 1 for w in words[:50])

def test_llm_stage_sample_says_it_does_not_hear_the_audio(synth_dir):
    """A stage-"llm" checkpoint is the LLM alone: it continues the prompt template, the same for any
    clip, and says that the audio is not heard."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    torch.manual_seed(0)
    m = SALMONN(tiny_config(stage="llm", vocab_size=tok.n_vocab, llm_block_size=96)).eval()
    texts = [salmonn.sample(m, tok, {"mel": torch.randn(40, 64) * k}, "Describe.", None, beam=1,
                            max_new_tokens=6)["text"] for k in (0.1, 3.0)]
    assert texts[0] == texts[1]
    assert texts[0].startswith("(stage 'llm': the LLM alone, the audio is not heard)\n")

def stream_documents(tok, stream):
    """A stage-"llm" text stream cut at each eot: the documents' token ids (the stream ends with
    one)."""
    stream = list(stream)
    assert stream[-1] == tok.eot_token
    docs, cur = [], []
    for t in stream:
        if t == tok.eot_token:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs

def test_llm_stage_sample_asks_the_template_it_trained_on(tmp_path, monkeypatch):
    """A stage-"llm" checkpoint is asked exactly as its text stream shows the prompt template: the
    LLM's input is the token embeddings of a stream document up to its "ASSISTANT:"."""
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    cfg = tiny_config(stage="llm", vocab_size=257, llm_block_size=200)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    docs = [d for d in stream_documents(tok, data.splits["train"]["stream"])
            if tok.decode(d).startswith(salmonn.PROMPT_PREFIX)]
    assert docs
    torch.manual_seed(0)
    m = SALMONN(cfg).eval()
    seen = []
    monkeypatch.setattr(m, "generate", lambda x, *a, **k: seen.append(x) or [])
    for doc in docs:
        text = tok.decode(doc)
        end = text.index("\nASSISTANT:") + len("\nASSISTANT:")
        instruction = text[len(salmonn.PROMPT_PREFIX + "</Speech> "):text.index("\nASSISTANT:")]
        seen.clear()
        salmonn.sample(m, tok, {"mel": torch.randn(30, 64)}, instruction, None, beam=1)
        with torch.no_grad():
            assert torch.equal(seen[0], m.llm.wte(torch.tensor([doc[:end]]))), text

def runs(flags):
    """The maximal runs of True in a 1-d bool sequence, as (start, end)."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out

def test_spec_augment_masks_within_each_clip():
    """Each clip gets at most n_masks bands of at most max_bins bins over its whole length, and at
    most n_masks stretches of at most max_frames frames over all bins, set to the clip's mean;
    nothing else changes, padding included."""
    g = torch.Generator().manual_seed(0)
    mel, lens = torch.randn(3, 40, 32, generator=g), torch.tensor([40, 25, 30])
    seen_band = seen_stretch = False
    for seed in range(20):
        out = salmonn.spec_augment(mel.clone(), lens, 2, np.random.default_rng(seed))
        for b, n in enumerate(lens.tolist()):
            assert torch.equal(out[b, n:], mel[b, n:])  # padding untouched
            changed = out[b, :n] != mel[b, :n]
            assert torch.allclose(out[b, :n][changed], mel[b, :n].mean().expand(int(changed.sum())))
            stretch = changed.all(1)                   # frames masked over every bin
            band = changed.all(0)                      # bins masked over every frame
            assert torch.equal(changed, stretch[:, None] | band[None, :])
            assert len(runs(band.tolist())) <= 2 and len(runs(stretch.tolist())) <= 2
            # two masks may touch: each run is at most two masks wide
            assert all(e - s <= 2 * 8 for s, e in runs(band.tolist()))
            assert all(e - s <= 2 * 5 for s, e in runs(stretch.tolist()))
            seen_band = seen_band or bool(band.any())
            seen_stretch = seen_stretch or bool(stretch.any())
    assert seen_band and seen_stretch  # both kinds of mask do happen

def test_whisper_batches_augment_training_clips_only(tmp_path):
    write_tiny_data(tmp_path, CLIPS)
    cfg = tiny_config(stage="whisper", spec_augment=2)
    data = salmonn.load_data(str(tmp_path), cfg, ByteTokenizerEot60())
    clip = data.clip_mel("val", 0)
    val = salmonn.get_batch(data, "val", 4, np.random.default_rng(0))
    assert all(torch.equal(val["mel"][b, :len(clip)], clip) for b in range(4))
    train = salmonn.get_batch(data, "train", 4, np.random.default_rng(0))
    tclip = data.clip_mel("train", 0)  # the one transcribed training clip
    assert not all(torch.equal(train["mel"][b, :len(tclip)], tclip) for b in range(4))
    data.config.spec_augment = 0  # the control: unaugmented, every row is that clip
    train = salmonn.get_batch(data, "train", 4, np.random.default_rng(0))
    assert all(torch.equal(train["mel"][b, :len(tclip)], tclip) for b in range(4))

def test_llm_batches_copy_rows_train_on_the_answers_only(synth_dir):
    """Stage "llm": corpus rows predict every next token; copying rows hold whole conversations
    whose targets are the next tokens of the answers and their eot, after each prompt."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    cfg = tiny_config(stage="llm", llm_block_size=96, copy_rows=0.5)
    data = salmonn.load_data(synth_dir, cfg, tok)
    batch = salmonn.get_batch(data, "train", 8, np.random.default_rng(0))
    x, y = batch["idx"], batch["targets"]
    assert (y[:4] != -1).all() and torch.equal(y[:4, :-1], x[:4, 1:])
    for b in range(4, 8):
        target = (y[b] != -1).tolist()
        answers = runs(target)
        assert answers
        for s, e in answers:
            assert tok.decode(x[b, :s + 1].tolist()).endswith("ASSISTANT:")  # after the prompt
            assert torch.equal(y[b, s:e - 1], x[b, s + 1:e])                 # the next tokens
            assert y[b, e - 1] == tok.eot_token                               # then the end
        # between answers: the next conversation's prompt, with no loss on it
        assert not any(target[answers[-1][1]:])

def test_llm_batch_windows_and_their_targets():
    """Stage "llm": a corpus row is a window of llm_block_size tokens and its targets one token on;
    every start but the last possible one is drawn (left out as when the measured LLMs trained), and
    a stream too short is named."""
    T = 4
    for n in (T + 2, T + 3, T + 4):
        stream = np.arange(n, dtype=np.int64)
        data = SimpleNamespace(config=tiny_config(stage="llm", llm_block_size=T, copy_rows=0.0),
                               splits={"train": {"stream": stream}})
        batch = salmonn.llm_batch(data, "train", 200, np.random.default_rng(0))
        starts = batch["idx"][:, 0]
        assert set(starts.tolist()) == set(range(n - T - 1))
        assert torch.equal(batch["idx"], starts[:, None] + torch.arange(T))
        assert torch.equal(batch["targets"], batch["idx"] + 1)
    data.splits["train"]["stream"] = np.arange(T + 1, dtype=np.int64)
    with pytest.raises(ValueError, match="has 5 tokens; it needs more than llm_block_size\\+1=5"):
        salmonn.llm_batch(data, "train", 2, np.random.default_rng(0))

def test_llm_text_stream_holds_each_document_once_ended_by_eot(tmp_path):
    """Stage "llm"'s text stream, each document followed by eot: each clip's caption, description
    and transcript, each question with its answer ("Q: ... A: ..."), and for each task the clip
    offers the prompt template with one of that task's instructions (QA: the question), then the
    answer after "ASSISTANT: " (its leading space, as stages 1-3 train the answers)."""
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    data = salmonn.load_data(str(tmp_path), tiny_config(stage="llm", vocab_size=257), tok)
    plain, asked = Counter(), Counter()
    for doc in stream_documents(tok, data.splits["train"]["stream"]):
        text = tok.decode(doc)
        if not text.startswith(salmonn.PROMPT_PREFIX):
            plain[text] += 1
            continue
        head, answer = text.split("\nASSISTANT: ")
        assert head.startswith(salmonn.PROMPT_PREFIX + "</Speech> ")
        instruction = head[len(salmonn.PROMPT_PREFIX + "</Speech> "):]
        task = next((t for t, v in salmonn.INSTRUCTIONS.items() if instruction in v), "qa")
        asked[task, instruction if task == "qa" else None, answer] += 1
    sos, piano = "morse code spelling sos.", "a piano plays c4."
    assert plain == Counter([sos, "A tone taps out sos.", "sos", "Q: what word? A: sos", piano])
    assert asked == Counter([("transcription", None, "s o s"), ("captioning", None, sos),
                             ("qa", "what word?", "sos"), ("classification", None, "morse code"),
                             ("story", None, "A tone taps out sos."),
                             ("captioning", None, piano), ("music", None, piano),
                             ("classification", None, "piano")])

def test_copy_documents_and_morse_spelling():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    words = ["red", "kite", "seven", "lamp"]
    seen = set()
    for _ in range(200):
        prompt, answer = salmonn.copy_document(tok, rng, words)
        text = tok.decode(prompt)
        assert text.startswith(salmonn.PROMPT_PREFIX) and text.endswith("ASSISTANT:")
        span = text[len(salmonn.PROMPT_PREFIX):text.index("</Speech>")].split()
        instruction = text[text.index("</Speech>") + len("</Speech> "):text.index("\n")]
        kind = next(k for k, v in salmonn.COPY_INSTRUCTIONS.items() if instruction in v)
        ans = tok.decode(answer).split()
        if kind == "repeat":
            assert ans == span
        elif kind == "reverse":
            assert ans == span[::-1]
        elif kind == "once":  # repeats merged, dashes dropped
            words_shown = [w for w in span if w != "-"]
            assert ans == [w for i, w in enumerate(words_shown) if i == 0
                           or w != words_shown[i - 1]]
        else:
            assert ans == [salmonn.DIGIT_WORDS[int(d)] for d in span]
        seen.add(kind)
    assert seen == set(salmonn.COPY_INSTRUCTIONS)
    assert salmonn.transcript({"kind": "morse", "transcript": "kite"}) == "k i t e"
    assert salmonn.transcript({"kind": "speech", "transcript": "turn left"}) == "turn left"

def test_reading_documents_ask_what_the_transcript_answers():
    """Stage "llm"'s reading documents: a clip's question about its transcript (Morse spelled, as
    the audio tokens carry it), the transcript where the audio goes in the audio tokens' form
    (words repeated, dashes between), its answer; the question about the voice is left out."""
    clips = [{"kind": "speech", "transcript": "where is the red kite",
              "qa": [{"q": "what colour is mentioned?", "a": "red"},
                     {"q": "is the speaker a man or a woman?", "a": "a man"}]},
             {"kind": "morse", "transcript": "sos",
              "qa": [{"q": "what is the first letter?", "a": "s"}]},
             {"kind": "music", "qa": [{"q": "what instrument is playing?", "a": "piano"}]}]
    reading = salmonn.reading_questions(clips)
    assert reading == [("where is the red kite".split(), "what colour is mentioned?", "red"),
                       (["s", "o", "s"], "what is the first letter?", "s")]
    tok, rng = ByteTokenizer(), np.random.default_rng(0)
    seen = set()
    for _ in range(100):
        prompt, answer = salmonn.copy_document(tok, rng, ["lamp", "kite"], reading,
                                                reading_share=0.5)
        text = tok.decode(prompt)
        instruction = text[text.index("</Speech>") + len("</Speech> "):text.index("\n")]
        span = text[len(salmonn.PROMPT_PREFIX):text.index("</Speech>")].split()
        if instruction in (q for _, q, _ in reading):
            words, _, want = next(r for r in reading if r[1] == instruction)
            shown = [w for w in span if w != "-"]
            assert [w for i, w in enumerate(shown) if i == 0 or w != shown[i - 1]] == words
            assert tok.decode(answer) == " " + want
            seen.add(instruction)
        else:
            seen.add("copy")
    assert seen == {"what colour is mentioned?", "what is the first letter?", "copy"}
    # without a share, the draws are those of the copying documents alone
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert ([salmonn.copy_document(tok, a, ["lamp", "kite"]) for _ in range(20)]
            == [salmonn.copy_document(tok, b, ["lamp", "kite"], reading, 0.0) for _ in range(20)])

def test_reading_probe_scores_exact_answers_to_the_shown_transcript():
    """reading_probe asks each question with its transcript between the tags (dashes and repeats
    as audio tokens read) and counts exact answers: a stand-in LLM that answers with the first
    word it is shown scores the share of questions whose answer is that word."""
    tok = ByteTokenizer()

    class FirstWord(nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = nn.Module()
            self.llm.wte = nn.Embedding(tok.n_vocab, tok.n_vocab, _weight=torch.eye(tok.n_vocab))

        def generate(self, x, max_new_tokens, eot, beam):
            text = tok.decode(x[0].argmax(-1).tolist())
            span = text[len(salmonn.PROMPT_PREFIX):text.index("</Speech>")].split()
            return tok.encode(" " + next(w for w in span if w != "-")) + [eot]

    reading = [("red kite".split(), "what colour is mentioned?", "red"),
               ("where is the lamp".split(), "what object is mentioned?", "lamp"),
               ("s o s".split(), "what is the first letter?", "S."),
               ("five two".split(), "how many keys are pressed?", "two")]
    model = FirstWord().train()
    assert salmonn.reading_probe(model, tok, reading) == 0.5
    assert salmonn.reading_probe(model, tok, reading, n=1) == 1.0
    assert model.training  # the mode it was in

# -----------------------------------------------------------------------------
# learning: a CPU-sized SALMONN learns to transcribe keypad numbers it has not heard

def test_pipeline_in_miniature_transcribes_held_out_clips(dtmf_dir, tmp_path):
    """The pipeline in miniature, as train.py runs it, on a corpus of keypad numbers
    (tests/conftest.py: ~140 to train on, ~60 held out): stage "whisper" (encoder, decoder and CTC),
    stage "llm" (corpus text and copying conversations), then stage 1 on the frozen encoder and LLM.
    The losses fall, an untrained LLM (which cannot copy) is refused, the encoder stays the
    stage-"whisper" one, and on the held-out clips both the encoder's own CTC and the whole model
    (audio -> Q-Former -> LoRA'd LLM -> text) transcribe far better than the best constant answer
    (torch 2.13, 1200 steps per part: CTC WER 0.0 with seeds 0, 1 and 2 (0.20 with seed 2 after
    800 steps); WER 0.21, 0.20 and 0.21 against 0.84). One thread per process, so that the run is
    the same on every machine; the LLM stage in a second process (~60-110 s in all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline_in_miniature(dtmf_dir, tmp_path)
    finally:
        torch.set_num_threads(threads)

def pipeline_in_miniature(dtmf_dir, tmp_path):
    tok = tokenizer.load_tokenizer(dtmf_dir, "corpus")
    sizes = dict(speech_n_layer=2, speech_n_head=2, speech_n_embd=64, beats_n_layer=1,
                 beats_n_head=2, beats_n_embd=32, qformer_n_layer=1, qformer_n_head=2,
                 qformer_n_embd=64, window_frames=6, llm_n_layer=2, llm_n_head=2, llm_n_embd=64,
                 llm_block_size=96, lora_rank=8, lora_alpha=32.0, lora_dropout=0.0,
                 whisper_dec_n_layer=1, llm_probe_min=0.0, dropout=0.0)

    def train(cfg, iters, path=None):
        data = salmonn.load_data(dtmf_dir, cfg, tok)
        torch.manual_seed(0)
        m = build(cfg, tok)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3,
                                weight_decay=0.0)
        rng, losses = np.random.default_rng(0), []
        m.train()
        for _ in range(iters):
            _, loss = m(**salmonn.get_batch(data, "train", 16, rng))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if path:
            save_part(m, path)
        return m.eval(), data, losses

    def train_llm():
        _, _, losses = train(SALMONNConfig(stage="llm", **sizes), 1200, tmp_path / "llm.pt")
        np.save(tmp_path / "llm_losses.npy", losses)

    # the two parts are independent: the LLM trains in a forked child on the other core (one
    # thread each, so the figures are those of one process training both)
    child = multiprocessing.get_context("fork").Process(target=train_llm)
    child.start()
    try:
        whisper, data, losses = train(SALMONNConfig(stage="whisper", **sizes), 1200,
                                      tmp_path / "whisper.pt")
    finally:
        child.join(timeout=900)  # a hung child fails the test instead of stalling the suite
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0, "the llm stage failed in its child process (its error is above)"
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
    heard = salmonn.evaluate(whisper, data, tok, "val")
    assert heard["ctc_wer_dtmf"] < 0.3 < heard["const_wer_dtmf"] - 0.4, heard
    losses = np.load(tmp_path / "llm_losses.npy")
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    # an LLM that cannot copy (untrained) is refused for stage 1
    torch.manual_seed(0)
    untrained = SALMONN(SALMONNConfig(stage="llm", vocab_size=tok.n_vocab, **sizes))
    save_part(untrained, tmp_path / "llm0.pt")
    with pytest.raises(ValueError, match="copies"):
        build(SALMONNConfig(stage="pretrain", llm_init=str(tmp_path / "llm0.pt"),
                            vocab_size=tok.n_vocab, **{**sizes, "llm_probe_min": 0.5}), tok)
    m, data, losses = train(SALMONNConfig(stage="pretrain", tasks="transcription",
                                          llm_init=str(tmp_path / "llm.pt"),
                                          whisper_init=str(tmp_path / "whisper.pt"), **sizes), 1000)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    # the frozen encoder is the stage-"whisper" one, unchanged
    for k, v in whisper.speech.state_dict().items():
        assert torch.equal(m.speech.state_dict()[k], v), k
    r = salmonn.evaluate(m, data, tok, "val", beam=1)
    assert r["n_dtmf"] >= 50
    assert r["wer_dtmf"] < r["const_wer_dtmf"] - 0.3, (r["wer_dtmf"], r["const_wer_dtmf"])
    # the checkpoint is self-contained: with the parts' files deleted it loads, samples and
    # evaluates to the same figures
    torch.save({"model": m.state_dict(), "model_args": asdict(m.config)}, tmp_path / "stage1.pt")
    os.remove(tmp_path / "whisper.pt")
    os.remove(tmp_path / "llm.pt")
    ck = torch.load(tmp_path / "stage1.pt", weights_only=True)
    cfg = SALMONNConfig(**ck["model_args"])
    again = SALMONN(cfg)
    again.load_state_dict(ck["model"])
    assert salmonn.evaluate(again, salmonn.load_data(dtmf_dir, cfg, tok), tok, "val", beam=1) == r
    clip = data.clip_audio("val", 0)
    assert salmonn.sample(again, tok, clip, "Transcribe the audio.", beam=1) == \
        salmonn.sample(m, tok, clip, "Transcribe the audio.", beam=1)

# -----------------------------------------------------------------------------
# edge cases of the pieces above: every frame heard, clips past max_audio_frames, rows without
# targets, the LLM's context, checkpoints of other stages and sizes, exact beam search

def test_qformer_queries_see_every_frame_of_their_window():
    """Brute force over frames: perturbing any one valid frame changes exactly the queries of the
    window that holds it (frame t: window t // window_frames), the last frame of a full window and
    of a partial one included; a frame past the clip's length changes nothing."""
    torch.manual_seed(0)
    cfg = tiny_config(window_frames=4, window_queries=2)
    qf = salmonn.WindowQFormer(cfg, enc_dim=20).eval()
    T, n = 14, 11  # windows [0,4) [4,8) [8,12) [12,14); frames 11-13 are padding
    x = torch.randn(1, T, 20)
    with torch.no_grad():
        base, _ = qf(x, torch.tensor([n]))
        for t in range(T):
            x2 = x.clone()
            x2[0, t] += 3.0
            changed = ((qf(x2, torch.tensor([n]))[0] - base).abs().amax(-1)[0] > 1e-6).tolist()
            assert changed == [t < n and i // 2 == t // 4 for i in range(8)], t

@torch.no_grad()
def test_encoders_hear_the_last_frame_of_an_odd_length_clip():
    """An odd-length clip's last frame fills half of the encoders' last time step (the stem's stride
    2, BEATs' 2-frame patches): it is a valid frame, so the other time steps attend to it, while the
    padding after it changes nothing."""
    torch.manual_seed(0)
    cfg = tiny_config()
    m = SALMONN(cfg).eval()
    mel, lens = torch.randn(1, 38, cfg.n_mels), torch.tensor([37])
    s, _ = m.speech(mel, lens)
    a = m.beats(mel, lens)
    last, pad = mel.clone(), mel.clone()
    last[0, 36] += 3.0  # the last valid frame
    pad[0, 37] += 3.0   # padding
    assert not torch.allclose(m.speech(last, lens)[0][0, 0], s[0, 0], atol=1e-5)
    assert not torch.allclose(m.beats(last, lens)[0, 0], a[0, 0], atol=1e-5)
    assert torch.allclose(m.speech(pad, lens)[0], s, atol=1e-6)
    assert torch.allclose(m.beats(pad, lens), a, atol=1e-6)

@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("features", ["mel", "whisper"])
@torch.no_grad()
def test_clips_longer_than_max_audio_frames_are_cut(cache, features):
    """encode_audio reads a clip's first max_audio_frames mel frames (max_speech_frames of
    Whisper's features): a longer clip gives n_audio_tokens of its length, the tokens of its cut
    prefix, with the frozen encoders' cache and without."""
    torch.manual_seed(0)
    whisper = features == "whisper"
    extra = dict(speech_features="whisper", speech_n_mels=80, speech_frame_rate=100.0)
    cfg = tiny_config(max_audio_frames=21, cache_encoders=cache, **(extra if whisper else {}))
    m = SALMONN(cfg).eval()
    n, nw = 21, salmonn.max_speech_frames(cfg)  # 21 mel frames; 28 Whisper frames
    mel, wmel = torch.randn(1, 40, cfg.n_mels), torch.randn(1, 53, 80)
    feats = lambda k: dict(wmel=wmel[:, :k], wmel_lens=torch.tensor([k])) if whisper else {}
    long, valid = m.encode_audio(mel, torch.tensor([40]), **feats(53))
    m.encoder_cache.clear()
    cut, valid_cut = m.encode_audio(mel[:, :n], torch.tensor([n]), **feats(nw))
    assert valid.sum() == n_audio_tokens(53 if whisper else 40, cfg) == valid_cut.sum()
    assert long.shape == cut.shape and torch.allclose(long, cut, atol=1e-5)

@torch.no_grad()
def test_audio_encoder_averages_the_bands_of_each_time_step():
    """The audio encoder's frame t is the mean over the frequency bands of its transformer's output
    patches at time step t (patches time-major: step t's bands are patches t * bands to
    (t + 1) * bands - 1), read here from ln_post's output."""
    torch.manual_seed(0)
    cfg = tiny_config(beats_patch_f=16)  # 4 bands
    enc = SALMONN(cfg).beats.eval()
    seen = []
    enc.ln_post.register_forward_hook(lambda mod, inp, out: seen.append(out))
    a = enc(torch.randn(2, 21, cfg.n_mels), torch.tensor([21, 14]))
    patches = seen[0]  # (B, T2 * bands, C)
    assert patches.shape == (2, 11 * 4, 16) and a.shape == (2, 11, 16)
    for t in range(11):
        torch.testing.assert_close(a[:, t], patches[:, 4 * t:4 * t + 4].mean(1))

@torch.no_grad()
def test_audio_encoder_tells_bands_and_time_steps_apart():
    """The audio encoder's patches carry which band (band_emb) and which time step (sinusoids) they
    are. Without them its transformer sees a set of patches: swapping two bands of the input would
    give the same frames, reversing the order of its time steps the same frames reversed. Here
    both change the output."""
    torch.manual_seed(0)
    cfg = tiny_config(beats_patch_f=16)  # 4 bands
    enc = SALMONN(cfg).beats.eval()
    torch.nn.init.normal_(enc.band_emb, std=1.0)  # as trained (it starts at zero)
    mel, lens = torch.randn(1, 20, cfg.n_mels), torch.tensor([20])
    a = enc(mel, lens)
    swapped = torch.cat([mel[..., 16:32], mel[..., :16], mel[..., 32:]], -1)  # bands 0 and 1
    assert not torch.allclose(enc(swapped, lens), a, atol=1e-3)
    # the ten 2-frame time steps in reverse order
    reversed_steps = mel.view(1, 10, 2, cfg.n_mels).flip(1).reshape(1, 20, cfg.n_mels)
    assert not torch.allclose(enc(reversed_steps, lens).flip(1), a, atol=1e-3)

def test_rows_without_targets_do_not_count_in_the_loss():
    """The loss is the mean over the rows that have targets of each row's mean token loss: a row
    without any target (all -1) adds nothing, not a zero."""
    torch.manual_seed(0)
    cfg = tiny_config()
    m = SALMONN(cfg).eval()
    batch = random_batch(cfg, lens=(37, 20, 30))
    batch["targets"][1] = -1
    with torch.no_grad():
        logits, loss = m(**batch)
    tg = batch["targets"]
    ref = torch.stack([F.cross_entropy(logits[b][tg[b] != -1], tg[b][tg[b] != -1])
                       for b in (0, 2)]).mean()
    assert torch.allclose(loss, ref)

def test_lora_dropout_drops_the_adapters_input_only():
    """In training mode lora_dropout drops LoRA's input only: the layer equals the formula of
    test_lora_updates_q_and_v_by_their_own_adapters with dropout(x) (the same random draw) in the
    adapters' x A^T B^T and x itself in c_attn's q, k, v."""
    torch.manual_seed(0)
    C, H, r, T = 12, 2, 3, 5
    attn = salmonn.SelfAttention(C, H, lora_rank=r, lora_alpha=6.0, lora_dropout=0.5).train()
    with torch.no_grad():
        for w in (attn.lora_q_B, attn.lora_v_B):
            torch.nn.init.normal_(w, std=0.5)
    x = torch.randn(2, T, C)
    with torch.no_grad():
        torch.manual_seed(1)
        y, _ = attn(x)
        torch.manual_seed(1)
        h = F.dropout(x, 0.5, training=True)
        assert not torch.equal(h, x)
        ref, _, _ = lora_attention_written_out(attn, x, h, 6.0 / 3)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)

def test_llm_init_from_an_audio_stage_checkpoint_takes_its_base_llm(tmp_path):
    """llm_init may name a stage 1-3 checkpoint: its LLM's base weights load, its LoRA does not
    (the new run's adapters start at zero)."""
    torch.manual_seed(0)
    src = SALMONN(tiny_config(stage="pretrain"))
    for block in src.llm.h:  # trained adapters
        torch.nn.init.normal_(block.attn.lora_q_B, std=0.5)
        torch.nn.init.normal_(block.attn.lora_v_B, std=0.5)
    save_part(src, tmp_path / "stage1.pt")
    cfg = tiny_config(stage="instruct", llm_init=str(tmp_path / "stage1.pt"), llm_n_embd=16)
    m = build(cfg)
    assert cfg.llm_n_embd == 32
    own = m.llm.state_dict()
    for k, v in src.llm.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(own[k], v), k
        elif "_B" in k:
            assert not own[k].any(), k

def test_whisper_stage_checkpoint_on_whisper_features_keeps_its_bins(tmp_path):
    """A stage-"whisper" checkpoint trained on Whisper's features (80 bins) gives stage 1 an
    80-bin speech encoder that reads them, whatever n_mels the data's own mel has (64 here)."""
    torch.manual_seed(0)
    w = SALMONN(tiny_config(stage="whisper", speech_features="whisper", speech_n_mels=80))
    save_part(w, tmp_path / "w.pt")
    _, sizes = salmonn.load_whisper_encoder_state(str(tmp_path / "w.pt"))
    assert (sizes["n_mels"], sizes["features"]) == (80, "whisper")
    cfg = tiny_config(whisper_init=str(tmp_path / "w.pt"))
    m = build(cfg)
    assert (cfg.speech_n_mels, cfg.speech_features, m.speech.n_mels) == (80, "whisper", 80)
    for k, v in w.speech.state_dict().items():
        assert torch.equal(m.speech.state_dict()[k], v), k

def test_a_part_given_as_its_run_folder_or_of_the_wrong_kind(tmp_path):
    """whisper_init and beats_init take a run's folder for its ckpt.pt (as llm_init does); a
    checkpoint without the part is named by its model and stage, and one without an LLM says what
    it lacks."""
    torch.manual_seed(0)
    (tmp_path / "w").mkdir()
    save_part(SALMONN(tiny_config(stage="whisper")), tmp_path / "w" / "ckpt.pt")
    sd, _ = salmonn.load_whisper_encoder_state(str(tmp_path / "w"))
    file_sd, _ = salmonn.load_whisper_encoder_state(str(tmp_path / "w" / "ckpt.pt"))
    assert sd.keys() == file_sd.keys() and all(torch.equal(sd[k], file_sd[k]) for k in sd)
    (tmp_path / "b").mkdir()
    save_part(SALMONN(tiny_config(stage="beats", tags="class=a|class=b")),
              tmp_path / "b" / "ckpt.pt")
    assert salmonn.load_beats_state(str(tmp_path / "b"))[0]
    with pytest.raises(ValueError, match="a salmonn checkpoint of stage 'beats' without a speech"):
        salmonn.load_whisper_encoder_state(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="salmonn checkpoint of stage 'whisper' without an audio"):
        salmonn.load_beats_state(str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"a salmonn checkpoint without an LLM \(no 'llm\.\*' "
                                         r"weights\)"):
        salmonn.load_llm_state(str(tmp_path / "w" / "ckpt.pt"))
    with pytest.raises(FileNotFoundError, match="whisper_init=.*: no such file"):
        salmonn.load_whisper_encoder_state(str(tmp_path))  # a folder without a run

def test_beats_checkpoint_sets_its_patch_height(tmp_path):
    """beats_init's patch height (beats_patch_f, so its number of frequency bands) replaces the
    config's, as its widths do."""
    torch.manual_seed(0)
    b = SALMONN(tiny_config(stage="beats", beats_patch_f=8, tags="class=a|class=b"))
    save_part(b, tmp_path / "b.pt")
    cfg = tiny_config(beats_init=str(tmp_path / "b.pt"))  # beats_patch_f 16 by default
    m = build(cfg)
    assert cfg.beats_patch_f == 8 and m.beats.n_bands == 64 // 8
    for k, v in b.beats.state_dict().items():
        assert torch.equal(m.beats.state_dict()[k], v), k

def test_beam_search_is_exact_when_the_beam_holds_every_prefix():
    """With a beam as wide as the number of unfinished prefixes, beam_search returns the best of all
    answers (ending at eot, which is not counted in the length, or at max_new_tokens) by log-prob /
    max(1, length) ** length_penalty, enumerated here, at length penalties -1, -0.5 (which favour
    short answers), 0, 0.5, 1 and 2. The models: next-token log-probs that depend on the whole
    prefix (kept in the cache that beam_search reorders), random ones and one built so that the best
    answer at penalty 1 grows from the least likely prefix after two tokens, ranked below three
    ended ones. Catches eot counted in the length, ended hypotheses taking live beams' places, and
    an early stop that cuts off a better answer."""
    V, eot, max_new = 4, 0, 3
    prefixes = [p for n in range(max_new) for p in itertools.product(range(1, V), repeat=n)]
    models = []
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        models.append({p: (torch.randn(V, generator=g) * 1.5).log_softmax(-1) for p in prefixes})
    P = lambda *p: torch.tensor(p).log()
    hand = {p: P(.01, .34, .33, .32) if not p else P(.6, .2, .11, .09) if len(p) == 1
            else P(.25, .25, .25, .25) for p in prefixes}
    hand[(3, 3)] = P(.001, .997, .001, .001)  # [3, 3] ranks last after two tokens
    models.append(hand)
    hand_answers = None
    for i, table in enumerate(models):
        def step(tokens, past):
            prefix = torch.cat([past[0][0], tokens[:, None]], 1)
            return torch.stack([table[tuple(p)] for p in prefix.tolist()]), [(prefix, prefix)]
        answers = {}
        for seq in itertools.product(range(V), repeat=max_new):
            lp, out = 0.0, []
            for t in seq:
                lp += table[tuple(out)][t].item()
                if t == eot:
                    break
                out.append(t)
            answers[tuple(out)] = lp
        for penalty in (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0):
            want = max(answers, key=lambda a: answers[a] / max(1, len(a)) ** penalty)
            past = [(torch.zeros(1, 0, dtype=torch.long),) * 2]
            got = salmonn.beam_search(step, table[()][None], past, (V - 1) ** (max_new - 1),
                                      max_new, eot, penalty)
            assert tuple(got) == want, (i, penalty)
        if table is hand:
            hand_answers = answers
    # the hand-built model's best answer at penalty 1 is the one grown from the least likely prefix
    assert max(hand_answers, key=lambda a: hand_answers[a] / max(1, len(a))) == (3, 3, 1)

def test_generate_stops_at_the_llms_context():
    """Asked for more tokens than the LLM's context leaves after the prompt, generate returns as
    many as fit (block_size - prompt length), greedy and beam search alike."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config(stage="llm", llm_block_size=16)).eval()
    with torch.no_grad():
        x = m.llm.wte(torch.randint(1, 61, (1, 12)))
    for beam in (1, 3):
        assert len(m.generate(x, 10, eot=None, beam=beam)) == 16 - 12
    # sample's default max_new_tokens (200) is more than the room left: it answers in that room
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    audio = {"mel": torch.randn(50, 64)}
    ids, _ = salmonn.build_prompt(IdTokenizer(), "Transcribe.", n_audio_tokens(50, m.config))
    assert 16 <= 128 - len(ids) < 200
    out = salmonn.sample(m, IdTokenizer(), audio, "Transcribe.", None, beam=1)["text"]
    assert 0 < len(out.split()) <= 128 - len(ids)

def test_prompt_and_answer_cut_to_the_llms_context(tmp_path):
    """A training row is its prompt and answer cut to llm_block_size + 1 tokens (the inputs and
    targets, one token apart, fill block_size positions); a prompt that leaves no answer token
    inside is refused."""
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    ids, _ = salmonn.build_prompt(tok, "what word?", n_audio_tokens(30, tiny_config()))
    answer = tok.encode(" sos") + [tok.eot_token]  # clip a's only question
    L = len(ids)
    for extra in (0, 2):
        cfg = tiny_config(stage="instruct", tasks="qa", llm_block_size=L + extra)
        data = salmonn.load_data(str(tmp_path), cfg, tok)
        batch = salmonn.get_batch(data, "train", 2, np.random.default_rng(0))
        assert batch["idx"].shape == (2, L + extra)
        for row in batch["targets"].tolist():
            assert [t for t in row if t != -1] == answer[:extra + 1]
        torch.manual_seed(0)  # the LLM takes a row of all its block_size positions
        assert torch.isfinite(SALMONN(cfg)(**batch)[1])
    # refused when the data is loaded, naming the clip (it was at the first batch that drew it)
    with pytest.raises(ValueError, match="train clip a .* leaves no room for an answer"):
        salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", tasks="qa",
                                                     llm_block_size=L - 1), tok)

def test_whisper_batches_cut_transcripts_to_the_decoders_context(tmp_path):
    """Stage "whisper": a transcript is cut to whisper_text_ctx - 1 tokens, so that with the start
    (input) or end (target) token it fills the decoder's whisper_text_ctx positions, and the model
    takes the batch."""
    write_tiny_data(tmp_path, CLIPS)
    tok = ByteTokenizerEot60()
    cfg = tiny_config(stage="whisper", whisper_text_ctx=4, whisper_dec_n_layer=1)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    batch = salmonn.get_batch(data, "train", 2, np.random.default_rng(0))
    text = tok.encode(" s o s")[:3]  # Morse spelled
    assert batch["idx"].tolist() == [[60] + text] * 2
    assert batch["targets"].tolist() == [text + [60]] * 2
    torch.manual_seed(0)
    logits, loss = SALMONN(cfg)(**batch)
    assert logits.shape == (2, 4, 61) and torch.isfinite(loss)

def test_copy_rows_hold_every_whole_conversation_that_fits(monkeypatch):
    """Stage "llm": a copying row packs whole conversations while they fit in T + 1 tokens; with
    conversations of 6 tokens (prompt 3, answer 2, eot), T + 1 = 12 holds two, T + 1 = 11 one."""
    monkeypatch.setattr(salmonn, "copy_document", lambda *args: ([1, 2, 3], [4, 5]))
    data = SimpleNamespace(tok=ByteTokenizer(), copy_words=[], splits={"train": {"reading": []}},
                           config=SimpleNamespace(reading_share=0.0))
    one = [1, 2, 3, 4, 5, 256]
    seq, is_target = salmonn.copy_conversations(data, "train", None, 11)
    assert seq == one * 2 and is_target == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert salmonn.copy_conversations(data, "train", None, 10)[0] == one
    # a split's rows ask about its own transcripts (a val loss on train ones would flatter)
    asked = []
    monkeypatch.setattr(salmonn, "copy_document",
                        lambda tok, rng, words, reading, share: (asked.append(reading),
                                                                 ([1, 2, 3], [4, 5]))[1])
    data.splits = {"train": {"reading": ["train's"]}, "val": {"reading": ["val's"]}}
    salmonn.copy_conversations(data, "val", None, 11)
    assert asked == [["val's"]] * 3

def test_story_words_count_the_models_answers():
    """story_words is the mean length in words of the model's answers (not of the references)."""
    refs, hyps = ["a b c d e", "a b c"], ["one, two", "one two three four"]
    got = salmonn.answer_metrics("story", [(0, None, r) for r in refs], refs, hyps)
    assert got["story_words"] == 3.0
    assert got["story_bleu4"] == salmonn.bleu4(hyps, [[r] for r in refs])

def test_answer_metrics_name_each_task_and_score_the_answers_against_the_references():
    """Each task's figure under its own name: BLEU-4 of the answers against the references for
    captioning and music (the brevity penalty tells the order: an answer shorter than its
    reference is penalised, exp(1 - 6/4) here; swapped, the longer one would not be), exact match
    for classification and speaker."""
    refs, hyps = ["a b c d e f"], ["a b c d"]
    for task, key in (("captioning", "bleu4"), ("music", "music_bleu4")):
        got = salmonn.answer_metrics(task, [(0, None, refs[0])], refs, hyps)
        assert got == pytest.approx({key: math.exp(-0.5)}), task
    refs, hyps = ["piano", "m1", "f2"], ["Piano.", "m1", "m2"]
    for task, key in (("classification", "cls_acc"), ("speaker", "speaker_acc")):
        got = salmonn.answer_metrics(task, [(i, None, r) for i, r in enumerate(refs)], refs, hyps)
        assert got == pytest.approx({key: 2 / 3}), task

def test_spec_augment_can_mask_every_frame():
    """The time masks' starts are drawn over the whole clip: over many draws the first and the
    last valid frame of each clip are masked at some point."""
    g = torch.Generator().manual_seed(0)
    mel, lens = torch.randn(2, 30, 16, generator=g), torch.tensor([30, 20])
    hit = torch.zeros(2, 30, dtype=torch.bool)
    for seed in range(200):
        # time masks only, so a frame changed in every bin is a time mask's
        out = salmonn.spec_augment(mel.clone(), lens, 2, np.random.default_rng(seed), max_bins=0)
        hit |= (out != mel).all(2)
    assert hit[0, 0] and hit[0, 29] and hit[1, 0] and hit[1, 19] and not hit[1, 20:].any()

def test_spec_augment_can_mask_every_bin():
    """The frequency masks' starts are drawn over all the bins: over many draws the lowest and the
    highest bin are each masked at some point."""
    g = torch.Generator().manual_seed(0)
    mel, lens = torch.randn(1, 20, 16, generator=g), torch.tensor([20])
    hit = torch.zeros(16, dtype=torch.bool)
    for seed in range(200):
        # frequency masks only, so a bin changed in every frame is a frequency mask's
        out = salmonn.spec_augment(mel.clone(), lens, 2, np.random.default_rng(seed), max_frames=0)
        hit |= (out != mel)[0].all(0)
    assert hit.all(), hit

def test_spec_augment_bands_and_stretches_reach_their_widths():
    """One band of 0 to max_bins bins and one stretch of 0 to max_frames frames per mask: over many
    draws every width in those ranges, the maxima included, occurs and no wider one."""
    g = torch.Generator().manual_seed(0)
    mel, lens = torch.randn(1, 20, 16, generator=g), torch.tensor([20])
    bands, stretches = set(), set()
    for seed in range(200):
        out = salmonn.spec_augment(mel.clone(), lens, 1, np.random.default_rng(seed), max_bins=4,
                                   max_frames=3)
        changed = out != mel
        bands.add(int(changed[0].all(0).sum()))  # bins changed in every frame: the band
        stretches.add(int(changed[0].all(1).sum()))  # frames changed in every bin: the stretch
    assert bands == {0, 1, 2, 3, 4} and stretches == {0, 1, 2, 3}, (bands, stretches)

def test_task_entries_of_a_clip():
    """The tasks a clip offers, by hand: music captions are music descriptions too, and only a
    speech clip's speaker label makes a speaker task."""
    speech = {"kind": "speech", "transcript": "turn left", "caption": "a man says turn left.",
              "qa": [{"q": "what is said?", "a": "turn left"}], "description": "A man asks.",
              "labels": {"class": "speech", "speaker": "m1", "gender": "male"}}
    assert salmonn.task_entries(speech) == [
        ("transcription", None, "turn left"), ("captioning", None, "a man says turn left."),
        ("qa", "what is said?", "turn left"), ("classification", None, "speech"),
        ("speaker", None, "m1"), ("story", None, "A man asks.")]
    mix = {"kind": "mixture", "caption": "a flute and a voice.",
           "labels": {"class": "mixture", "speaker": "m1"}}
    assert salmonn.task_entries(mix) == [("captioning", None, "a flute and a voice."),
                                         ("classification", None, "mixture")]
    music = {"kind": "music", "caption": "a flute plays."}
    assert salmonn.task_entries(music) == [("captioning", None, "a flute plays."),
                                           ("music", None, "a flute plays.")]

def ctc_by_brute_force(logp, target, blank):
    """-log of the summed probability of every path of len(logp) symbols that collapses (repeats
    merged, then blanks dropped) to target."""
    paths = []
    for path in itertools.product(range(logp.size(1)), repeat=logp.size(0)):
        collapsed = [s for i, s in enumerate(path) if s != blank and (i == 0 or s != path[i - 1])]
        if collapsed == target:
            paths.append(sum(logp[i, s] for i, s in enumerate(path)))
    return -torch.logsumexp(torch.stack(paths), 0)

def test_connect_ctc_loss_against_brute_force():
    """connect_ctc_weight: the audio tokens read as the LLM's tokens (cosine to its token
    embeddings, times CONNECT_CTC_SCALE), CTC with the dash as the blank, per example over its
    transcript's tokens; rows without a transcript add nothing. It is added to the LLM's loss, and
    its gradient reaches the Q-Former and the projection, not the frozen LLM."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=4, dash_token=0, connect_ctc_weight=0.7)
    m = SALMONN(cfg)
    tokens = torch.randn(3, 4, cfg.llm_n_embd)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    targets = torch.tensor([[2, 2], [3, -1], [-1, -1]])  # 2 2: a blank must part the repeat
    logp = (salmonn.CONNECT_CTC_SCALE * F.normalize(tokens, dim=-1)
            @ F.normalize(m.llm.wte.weight, dim=-1).T).log_softmax(-1)
    ref = (ctc_by_brute_force(logp[0], [2, 2], 0) / 2 + ctc_by_brute_force(logp[1, :3], [3], 0)) / 2
    with torch.no_grad():
        assert torch.allclose(m.connect_ctc_loss(tokens, valid, targets), ref, atol=1e-5)
        m.config.dash_token = 1  # the blank is the dash, whichever token that is
        ref1 = (ctc_by_brute_force(logp[0], [2, 2], 1) / 2
                + ctc_by_brute_force(logp[1, :3], [3], 1)) / 2
        assert torch.allclose(m.connect_ctc_loss(tokens, valid, targets), ref1, atol=1e-5)
        m.config.dash_token = 0
    # in forward: the LLM's loss + the weight times it, on the audio tokens the LLM reads
    batch = random_batch(cfg, lens=(37, 20))
    batch["connect_targets"] = torch.tensor([[1, 2, 3], [-1, -1, -1]])
    m.eval()
    _, loss = m(**batch)
    tokens, valid = m.encode_audio(batch["mel"], batch["mel_lens"])
    _, lm_loss = m(**{k: v for k, v in batch.items() if k != "connect_targets"})
    expected = lm_loss + 0.7 * m.connect_ctc_loss(tokens, valid, batch["connect_targets"])
    assert torch.allclose(loss, expected)
    m.zero_grad()
    (loss - lm_loss).backward()
    assert m.proj.weight.grad.abs().sum() > 0 and m.qformer.query.grad.abs().sum() > 0
    assert m.llm.wte.weight.grad is None

def test_connect_targets_are_the_transcripts_of_transcription_rows(tmp_path):
    """Batches of stages 1-3 with connect_ctc_weight carry each transcription row's answer, without
    its end token, as connect_targets, and -1 for the rows of other tasks; the blank is the
    tokenizer's dash."""
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    cfg = tiny_config(stage="pretrain", llm_block_size=160, connect_ctc_weight=1.0)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    assert cfg.dash_token == ord("-")
    batch = salmonn.get_batch(data, "train", 16, np.random.default_rng(0))
    answers = set()
    for b in range(16):
        tg, ct = batch["targets"][b], batch["connect_targets"][b]
        answer = tok.decode(tg[tg != -1][:-1].tolist())
        answers.add(answer)
        if answer == " s o s":  # the Morse clip's transcript, spelled
            assert ct[ct != -1].tolist() == list(b" s o s")
            assert (ct[6:] == -1).all()
        else:  # a caption
            assert (ct == -1).all()
    assert " s o s" in answers and len(answers) >= 2
    assert "connect_targets" not in salmonn.get_batch(
        salmonn.load_data(str(tmp_path), tiny_config(stage="pretrain", llm_block_size=160), tok),
        "train", 4, np.random.default_rng(0))

def test_gender_acc_reads_the_voice_question_only():
    """gender_acc is the accuracy on VOICE_QUESTIONS alone; the corpus's other question about a
    speaker ("what does the speaker say?") is not about the voice."""
    entries = [(0, "what does the speaker say?", "where is the red kite"),
               (1, "is the speaker a man or a woman?", "a man"),
               (2, "is the speaker a man or a woman?", "a woman")]
    refs = [a for _, _, a in entries]
    hyps = ["where is the red kite", "a man", "a man"]
    got = salmonn.answer_metrics("qa", entries, refs, hyps, ["speech"] * 3)
    assert got["qa_acc"] == pytest.approx(2 / 3)
    assert got["gender_acc"] == pytest.approx(1 / 2)

@torch.no_grad()
def test_tags_pool_every_time_step_of_an_odd_length_clip():
    """Stage "beats": a clip's tag logits are tag_head of the mean of all its (frames + 1) // 2
    encoder time steps; the last one of an odd-length clip (half a patch) counts too."""
    torch.manual_seed(0)
    cfg = tiny_config(stage="beats", tags="class=a|class=b|pitch=C4")
    m = SALMONN(cfg).eval()
    mel, lens = torch.randn(2, 38, cfg.n_mels), torch.tensor([37, 38])
    a = m.beats(mel, lens)
    assert a.size(1) == 19
    want = m.tag_head(a.mean(1))  # both clips fill all 19 time steps
    assert torch.allclose(m.tag_logits(mel, lens), want, atol=1e-5)

def test_beats_tags_are_the_labels_of_enough_train_clips(tmp_path):
    """Stage "beats" tags the TAG_KEYS labels that MIN_TAG_CLIPS (3) or more train clips carry,
    sorted; a label of fewer clips is left out, and so is a free-text label (not a TAG_KEYS key)."""
    assert salmonn.MIN_TAG_CLIPS == 3
    labels = ([{"class": "piano", "pitch": "C4"}] * 3 + [{"class": "flute", "pitch": "C4"}] * 2
              + [{"word": "kite"}] * 4)
    clips = [{"id": str(i), "frames": 20, "kind": "music", "labels": lab}
             for i, lab in enumerate(labels)]
    write_tiny_data(tmp_path, clips)
    cfg = tiny_config(stage="beats")
    data = salmonn.load_data(str(tmp_path), cfg, ByteTokenizer())
    assert cfg.tags == "class=piano|pitch=C4"
    assert data.tag_index == {"class=piano": 0, "pitch=C4": 1}

def test_audio_mask_counted_per_row():
    """embed refuses an audio_mask whose rows do not each hold their own clip's audio tokens, also
    when the batch's total is right (masked_scatter would silently move one clip's tokens into
    another row)."""
    torch.manual_seed(0)
    cfg = tiny_config()
    m = SALMONN(cfg).eval()
    batch = random_batch(cfg)  # clips of 37 and 20 frames: 10 and 6 audio tokens
    mask = batch["audio_mask"].clone()
    assert mask.sum(1).tolist() == [10, 6]
    mask[0, 3 + 8:3 + 10] = False  # two of row 0's slots moved to row 1
    mask[1, 3 + 6:3 + 8] = True
    with torch.no_grad(), pytest.raises(ValueError, match=r"audio_mask has \[8, 8\] audio "
                                        r"positions per row, the clips give \[10, 6\]"):
        m.embed(batch["idx"], batch["mel"], batch["mel_lens"], mask)
    # no audio_mask at all, in a stage with audio: named, not an AttributeError
    with torch.no_grad(), pytest.raises(ValueError, match="stage 'pretrain' needs audio_mask"):
        m.embed(batch["idx"], batch["mel"], batch["mel_lens"])

def test_lora_starts_as_the_base_model():
    """LoRA's B starts at zero (peft's init): before training, the adapted LLM gives the base
    LLM's output (lora_scale 0) exactly."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config()).eval()
    x = torch.randn(2, 10, m.config.llm_n_embd)
    with torch.no_grad():
        adapted, _ = m.llm(x)
        m.lora_scale = 0.0
        base, _ = m.llm(x)
    assert torch.equal(adapted, base)

def test_each_stage_trains_on_its_papers_tasks():
    """stage_tasks: the whisper stage transcribes, stage 1 transcribes and captions, stage 2 adds
    QA, music, classification and the speaker, stage 3 tells stories; the beats and llm stages
    have no audio tasks."""
    want = {"whisper": ("transcription",), "pretrain": ("transcription", "captioning"),
            "instruct": ("transcription", "captioning", "qa", "music", "classification",
                         "speaker"),
            "activation": ("story",), "beats": (), "llm": ()}
    for stage, tasks in want.items():
        assert salmonn.stage_tasks(tiny_config(stage=stage, tags="a|b")) == tasks, stage

def test_copy_probe_refuses_extra_words_and_runs_in_eval_mode(synth_dir):
    """copy_probe counts an exact copy of the span only (a span and one word more is no copy), and
    runs the LLM in eval mode, putting the model back in train mode after."""
    m, tok, span = copy_probe_model(synth_dir)
    modes = []

    def copies(extra):  # a stand-in generate: the prompt's span, then extra
        def generate(x, max_new_tokens, eot, beam):
            modes.append(m.training)
            return span(x) + extra
        return generate
    m.train()
    m.generate = copies([])
    assert salmonn.copy_probe(m, tok, n=5) == 1.0
    assert modes and not any(modes) and m.training
    m.generate = copies(salmonn.encode_text(tok, " extra"))
    assert salmonn.copy_probe(m, tok, n=5) == 0.0

def test_new_audio_encoder_weights_refresh_the_encoder_cache():
    """The frozen encoders' cache is stamped with both encoders' weights: new BEATs weights (not
    a rescale, which the LayerNorms after it undo) give the loss of a model without the cache."""
    torch.manual_seed(0)
    cached = SALMONN(tiny_config())
    plain = SALMONN(tiny_config(cache_encoders=False))
    plain.load_state_dict(cached.state_dict())
    batch = random_batch(cached.config, lens=(37, 20))
    cached(**batch)
    with torch.no_grad():
        state = {k: v + 0.1 * torch.randn_like(v) for k, v in plain.beats.state_dict().items()}
        for m in (cached, plain):
            m.beats.load_state_dict(state)
    assert torch.allclose(cached(**batch)[1], plain(**batch)[1], atol=1e-6)

def test_spec_augment_on_a_clip_shorter_than_a_time_mask():
    """A clip of 3 frames (under the 5-frame time mask): masked within its frames, no error, its
    padding untouched."""
    mel, lens = torch.randn(2, 10, 8), torch.tensor([10, 3])
    masked = 0
    for seed in range(50):
        out = salmonn.spec_augment(mel.clone(), lens, 2, np.random.default_rng(seed))
        assert torch.equal(out[1, 3:], mel[1, 3:])
        masked += not torch.equal(out[1, :3], mel[1, :3])
    assert masked > 25  # its 3 frames are masked all the same

def test_edit_distance_counts_a_leading_insertion():
    """Levenshtein distance with insertions before the reference's words: the last "a" kept, the
    first made "c", three "c" inserted."""
    assert salmonn.edit_distance("a a".split(), "c c c c a".split()) == 4

def test_const_wer_candidates_are_this_corpus_train_answers_of_the_kind():
    """The best constant answer is sought among the first 200 of this corpus's (src 0) training
    answers of the kind: not asr_data_dir's clips, not other kinds'. The refs' median "a b" is no
    reference (each is 2 edits from the others, 1 from "a b"), so only a training answer offers
    it: 3 edits over 9 words, else 4 / 9 (a reference)."""
    refs, kinds = ["x a b", "a y b", "a b z"], ["speech"] * 3
    entry = lambda answers: [(ci, None, a) for ci, a in enumerate(answers)]
    metrics = lambda clips, answers: salmonn.transcription_metrics(
        refs, refs, None, kinds, {"clips": clips, "entries": {"transcription": entry(answers)}})
    assert metrics([], [])["const_wer_speech"] == pytest.approx(4 / 9)
    # the 21st training answer of the kind is still among the first 200
    clips = [{"kind": "speech"}] * 21
    assert metrics(clips, ["zz"] * 20 + ["a b"])["const_wer_speech"] == pytest.approx(3 / 9)
    # asr_data_dir's clip (src 1) and another kind's clip offer no candidate
    clips = [{"kind": "speech", "src": 1}, {"kind": "dtmf"}]
    assert metrics(clips, ["a b", "a b"])["const_wer_speech"] == pytest.approx(4 / 9)

def test_bleu4_brevity_penalty_takes_the_closest_reference_length():
    """Several references: r is the length closest to the hypothesis', the shorter on a tie."""
    # hypothesis 4 words, references 6 and 5: r = 5 -> exp(1 - 5/4); precisions all 1
    assert salmonn.bleu4(["a b c d"], [["a b c d e f", "a b c d e"]]) == pytest.approx(
        math.exp(1 - 5 / 4))
    # references 3 and 5, both 1 from 4: r = 3 <= c, no penalty
    assert salmonn.bleu4(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx(1.0)

def test_seconds_of_tokens_is_the_longest_clip_that_fits_brute_force():
    for wf, wq in ((1, 1), (4, 2), (12, 1), (3, 3)):
        cfg = tiny_config(window_frames=wf, window_queries=wq, speech_frame_rate=75.0,
                          max_audio_frames=10000)
        for n in range(0, 16):
            longest = max(f for f in range(0, 400) if n_audio_tokens(f, cfg) <= n)
            assert salmonn.seconds_of_tokens(n, cfg) == pytest.approx(longest / 75.0), (wf, wq, n)

def test_max_speech_frames_rounds_to_the_nearest_frame():
    # 2249 mel frames at 75/s are 2998.67 frames at 100/s: 2999
    cfg = tiny_config(max_audio_frames=2249, frame_rate=75.0, speech_frame_rate=100.0)
    assert salmonn.max_speech_frames(cfg) == 2999

def test_whisper_features_pair_the_last_speech_frames_with_the_clips_last_audio_frame():
    """An odd mel length: the audio encoder gives (len + 1) // 2 frames, and speech frames past
    them take the last of them (index (len + 1) // 2 - 1), not the one before."""
    torch.manual_seed(0)
    cfg = tiny_config(speech_features="whisper", speech_n_mels=80, speech_frame_rate=100.0,
                      frame_rate=75.0)
    m = SALMONN(cfg).eval()
    mel, wmel = torch.randn(1, 21, cfg.n_mels), torch.randn(1, 40, 80)
    with torch.no_grad():
        tokens, _ = m.encode_audio(mel, torch.tensor([21]), wmel, torch.tensor([40]))
        s, _ = m.speech(wmel, torch.tensor([40]))
        a = m.beats(mel, torch.tensor([21]))
        assert a.size(1) == 11
        at = (torch.arange(20) * 0.75).long().clamp(max=10)
        x = torch.cat([m.ln_speech(s), m.ln_audio(a[:, at])], -1)
        q, _ = m.qformer(x, torch.tensor([20]))
        p = m.proj(q)
    assert torch.allclose(tokens, p * m.audio_scale / p.pow(2).mean(-1, keepdim=True).sqrt(),
                          atol=1e-5)

def test_llm_dropout_is_stage_llms_only():
    """llm_dropout applies to stage "llm": in stages 1-3 the frozen LLM runs without dropout, so
    two training-mode passes give the same loss."""
    torch.manual_seed(0)
    cfg = tiny_config(llm_dropout=0.5, lora_dropout=0.0, llm_block_size=64)
    m = SALMONN(cfg).train()
    batch = random_batch(cfg)
    assert torch.equal(m(**batch)[1], m(**batch)[1])

def split_data(tmp_path, train_clips, val_clips):
    """write_tiny_data with different clip records (same frame counts) in the val split."""
    write_tiny_data(tmp_path, train_clips)
    off, rows = 0, []
    for c in val_clips:
        rows.append({**c, "offset": off})
        off += c["frames"]
    with open(os.path.join(tmp_path, "val_clips.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

def test_llm_stage_reading_and_copy_words_come_from_their_own_split(tmp_path, monkeypatch):
    """Stage "llm": each split's reading questions are about its own transcripts, the copying
    words are the train split's, and evaluate's reading probe asks the evaluated split's."""
    clip = lambda text, a: {"id": a, "frames": 30, "kind": "speech", "transcript": text,
                            "qa": [{"q": "what colour?", "a": a}]}
    split_data(tmp_path, [clip("where is the red kite", "red")], [clip("a blue lamp", "blue")])
    tok = ByteTokenizer()
    data = salmonn.load_data(str(tmp_path), tiny_config(stage="llm", vocab_size=257), tok)
    assert data.splits["train"]["reading"] == [("where is the red kite".split(), "what colour?",
                                                "red")]
    assert data.splits["val"]["reading"] == [("a blue lamp".split(), "what colour?", "blue")]
    assert "kite" in data.copy_words and "lamp" not in data.copy_words
    asked = []
    monkeypatch.setattr(salmonn, "text_perplexity", lambda *a: 1.0)
    monkeypatch.setattr(salmonn, "copy_probe", lambda *a: 0.0)
    monkeypatch.setattr(salmonn, "reading_probe", lambda model, tok, reading: asked.append(reading))
    salmonn.evaluate(SALMONN(tiny_config(stage="llm", vocab_size=257)), data, tok, "val")
    assert asked == [data.splits["val"]["reading"]]

def test_task_examples_draw_every_paraphrase_and_skip_tasks_the_split_lacks(tmp_path):
    """Stages 1-3: an example without its own question gets one of its task's paraphrases at
    random (all of them over many draws); a task of the mix without clips in the split is not
    drawn (CLIPS have no speaker)."""
    write_tiny_data(tmp_path, CLIPS)
    tok = ByteTokenizer()
    cfg = tiny_config(stage="instruct", tasks="transcription,speaker", vocab_size=257,
                      llm_block_size=160)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    rng, seen = np.random.default_rng(0), set()
    for _ in range(60):
        seq, _, n_prompt, _, task = salmonn.task_example(data, "train", ["transcription"], rng)
        text = tok.decode(seq[:n_prompt])
        seen.add(text[text.index("</Speech> ") + len("</Speech> "):text.index("\nASSISTANT:")])
    assert seen == set(salmonn.INSTRUCTIONS["transcription"])
    for _ in range(5):
        batch = salmonn.get_batch(data, "train", 8, rng)
        assert batch["idx"].size(0) == 8

def test_load_llm_refuses_a_broadcastable_shape_mismatch():
    """A weight of another shape is refused even when copy_ could broadcast it into place."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config(stage="llm"))
    state = {k: v.clone() for k, v in m.llm.state_dict().items() if k != "lm_head.weight"}
    state["ln_f.bias"] = torch.ones(1)
    with pytest.raises(ValueError, match="shape mismatch.*ln_f.bias"):
        m.load_llm(state, "x")

def test_connect_targets_leave_out_transcripts_cut_by_the_block(tmp_path, monkeypatch):
    """A transcription row whose answer the LLM's block cuts (no eot) gets no connect_targets."""
    monkeypatch.setitem(salmonn.INSTRUCTIONS, "transcription", ["Transcribe the audio."])
    tok = ByteTokenizer()
    write_tiny_data(tmp_path, CLIPS)
    cfg = tiny_config(stage="pretrain", tasks="transcription", llm_block_size=160,
                      connect_ctc_weight=1.0)
    data = salmonn.load_data(str(tmp_path), cfg, tok)
    _, _, n_prompt, _, _ = salmonn.task_example(data, "train", ["transcription"],
                                                np.random.default_rng(0))
    full = salmonn.get_batch(data, "train", 2, np.random.default_rng(0))["connect_targets"]
    assert full[0][full[0] != -1].tolist() == list(b" s o s")
    cfg.llm_block_size = n_prompt + 3  # " s o" of " s o s" + eot
    batch = salmonn.get_batch(data, "train", 2, np.random.default_rng(0))
    assert tok.decode(batch["targets"][0][batch["targets"][0] != -1].tolist()) == " s o"
    assert (batch["connect_targets"] == -1).all()

def test_beats_stage_ignores_a_whisper_init(tmp_path):
    """set_pretrained_dims takes a whisper_init's sizes only in stages with a speech encoder."""
    save_part(SALMONN(tiny_config(stage="whisper", speech_n_embd=64)), tmp_path / "w.pt")
    cfg = tiny_config(stage="beats", whisper_init=str(tmp_path / "w.pt"))
    salmonn.set_pretrained_dims(cfg)
    assert cfg.speech_n_embd == 32
    cfg = tiny_config(stage="pretrain", whisper_init=str(tmp_path / "w.pt"))
    salmonn.set_pretrained_dims(cfg)
    assert cfg.speech_n_embd == 64

def test_whisper_batches_cut_character_ctc_targets_at_twice_the_text_context(tmp_path):
    clips = [{"id": "d", "frames": 45, "kind": "speech", "transcript": "where is the red kite",
              "caption": None, "description": None, "labels": {}, "qa": []}]
    write_tiny_data(tmp_path, clips)
    cfg = tiny_config(stage="whisper", ctc_units="chars", whisper_text_ctx=8, vocab_size=257)
    data = salmonn.load_data(str(tmp_path), cfg, ByteTokenizer())
    ctc = salmonn.get_batch(data, "train", 1, np.random.default_rng(0))["ctc_targets"][0]
    assert ctc.tolist() == salmonn.ctc_encode("where is the red kite")[:16]

def test_average_precision_ranks_tied_scores_in_clip_order():
    """Ties keep the clips' order (a stable sort), also for more clips than numpy's quicksort
    sorts by insertion: brute force, each positive's precision counting the clips before it
    (higher scores, or equal scores earlier)."""
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 3, size=60).astype(float), rng.integers(0, 2, size=60)
    rank = lambda i: sum(s > scores[i] or (s == scores[i] and j <= i) for j, s in enumerate(scores))
    pos = [i for i in range(60) if labels[i]]
    want = np.mean([sum(labels[j] for j in range(60) if rank(j) <= rank(i)) / rank(i)
                    for i in pos])
    assert salmonn.average_precision(scores, labels) == pytest.approx(want)


def test_stage1_without_parts_warns():
    """Stage 1 whose encoders or LLM are not given trains on random frozen parts (as Pengi warns
    of its LM); a later stage, whose parts come from stage 1's checkpoint (init_from), does not
    warn."""
    import warnings
    with pytest.warns(UserWarning, match=r"salmonn: whisper_init, beats_init, llm_init empty, so "
                                         r"stage 1 trains on random frozen parts"):
        salmonn.init_pretrained(SALMONN(tiny_config(stage="pretrain")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        salmonn.init_pretrained(SALMONN(tiny_config(stage="instruct")))

def test_sample_says_when_it_hears_only_the_start_of_a_long_clip(capsys):
    """A clip past max_audio_frames is cut by the speech encoder: sample says so (it transcribed or
    answered the first seconds silently, while sample.py printed the whole length); stage "beats",
    which tags the whole clip, and a clip that fits say nothing."""
    tok = ByteTokenizerEot60()
    torch.manual_seed(0)
    mel = torch.randn(60, 64)
    for stage, kw, opts in (("whisper", dict(whisper_dec_n_layer=1, whisper_text_ctx=4), {}),
                            ("instruct", dict(vocab_size=257, llm_block_size=128),
                             dict(beam=1, max_new_tokens=2))):
        t = ByteTokenizer() if stage == "instruct" else tok
        m = SALMONN(tiny_config(stage=stage, max_audio_frames=40, **kw)).eval()
        cut = salmonn.sample(m, t, {"mel": mel}, None, None, **opts)
        assert (f"salmonn.sample: the model hears the first {40 / 75:.2f} s of the input's "
                f"{60 / 75:.2f} s (max_audio_frames=40)" in capsys.readouterr().out), stage
        # what it heard: the first 40 frames
        assert salmonn.sample(m, t, {"mel": mel[:40]}, None, None, **opts) == cut
        assert "hears the first" not in capsys.readouterr().out
    m = SALMONN(tiny_config(stage="beats", max_audio_frames=40, tags="a|b|c")).eval()
    salmonn.sample(m, tok, {"mel": mel}, None, None)
    assert "hears the first" not in capsys.readouterr().out

def test_encoder_stages_refuse_decoding_options():
    """Stages "whisper" and "beats" answer without the LLM: a decoding option given (temperature,
    beam, max_new_tokens, lora_scale...) is refused naming it, as a prompt is (it was ignored, the
    answer greedy whatever was asked); none given, they answer."""
    torch.manual_seed(0)
    mel = torch.randn(30, 64)
    for stage, kw, does in (("whisper", dict(whisper_dec_n_layer=1, whisper_text_ctx=4),
                             "transcribes the audio greedily"),
                            ("beats", dict(tags="a|b|c"), "tags the audio")):
        m = SALMONN(tiny_config(stage=stage, **kw)).eval()
        for opts in (dict(temperature=5.0, beam=1), dict(max_new_tokens=1), dict(lora_scale=0.0)):
            with pytest.raises(ValueError, match=re.escape(
                    f"salmonn sample: a stage-{stage!r} checkpoint takes no decoding options "
                    f"({', '.join(sorted(opts))} given; it {does})")):
                salmonn.sample(m, ByteTokenizerEot60(), {"mel": mel}, None, None, **opts)
        assert salmonn.sample(m, ByteTokenizerEot60(), {"mel": mel}, None, None)["text"]

def test_llm_stage_refuses_a_lora_scale():
    """Stage "llm" has no LoRA (lora_rank 0 there): lora_scale is refused naming why (it was
    ignored, the answer the same at any scale)."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config(stage="llm", vocab_size=257, llm_block_size=128)).eval()
    with pytest.raises(ValueError, match=re.escape("salmonn sample: lora_scale=0.0: a stage-'llm' "
                                                   "checkpoint has no LoRA")):
        salmonn.sample(m, ByteTokenizer(), {"mel": torch.randn(30, 64)}, None, None, beam=1,
                       max_new_tokens=2, lora_scale=0.0)
    assert salmonn.sample(m, ByteTokenizer(), {"mel": torch.randn(30, 64)}, None, None, beam=1,
                          max_new_tokens=2)["prompt"]

def test_sample_says_when_a_stage_was_not_trained_on_the_task_asked(capsys):
    """A trained instruction (or a question) of a task the checkpoint's stage never learned gets a
    note naming the task and the stage's tasks (a question to stage 1 was answered without one);
    stage 2 learned stage 1's tasks and its own, stage 3 all; a weight of 0 drops a task."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    audio = {"mel": torch.randn(50, 64)}
    stage1, stage2 = "captioning, transcription", "captioning, classification, music, qa, speaker, "
    for stage, weights, prompt, task, learned in (
            ("pretrain", "", "Who is speaking?", "speaker", stage1),
            ("pretrain", "", "what colour is mentioned?", "qa", stage1),
            ("pretrain", "", "Transcribe the audio.", None, None),
            ("instruct", "", "Tell me a story about this audio.", "story",
             stage2 + "transcription"),
            ("instruct", "", "Who is speaking?", None, None),
            ("instruct", "speaker=0", "Who is speaking?", "speaker",
             stage2.replace("speaker, ", "") + "transcription"),
            ("activation", "", "what colour is mentioned?", None, None)):
        m = SALMONN(tiny_config(stage=stage, task_weights=weights, vocab_size=257,
                                llm_block_size=128)).eval()
        salmonn.sample(m, tok, audio, prompt, None, beam=1, max_new_tokens=2)
        out = capsys.readouterr().out
        assert "not one of the trained instructions" not in out
        said = (f"salmonn.sample: {prompt!r} asks for the {task!r} task, which a "
                f"stage-{stage!r} checkpoint was not trained on (its tasks: {learned}): the answer "
                f"may be off")
        assert (said in out) == (task is not None), (stage, weights, prompt, out)

def test_top_k_without_a_temperature_refused():
    """top_k with temperature 0 (the default) decodes greedily, top_k unused: refused, naming why
    (sample.py --beam=1 --top_k=50 gave the greedy answer at every seed); with a temperature it
    samples."""
    torch.manual_seed(0)
    m = SALMONN(tiny_config(vocab_size=257, llm_block_size=128)).eval()
    audio = {"mel": torch.randn(50, 64)}
    with pytest.raises(ValueError, match=re.escape("top_k=5 limits sampling, which needs a "
                                                   "temperature above 0 (temperature=0 decodes "
                                                   "greedily)")):
        salmonn.sample(m, ByteTokenizer(), audio, None, None, beam=1, top_k=5, max_new_tokens=2)
    salmonn.sample(m, ByteTokenizer(), audio, None, None, beam=1, top_k=5, temperature=1.0,
                   max_new_tokens=2)


def test_whisper_stage_notes_transcripts_longer_than_its_text_context(tmp_path, capsys):
    """A folder's long transcripts were cut to whisper_text_ctx - 1 tokens with eot after the cut
    (the decoder learns to stop mid-sentence) without a word: load_data counts them per split."""
    write_tiny_data(tmp_path, CLIPS)
    salmonn.load_data(str(tmp_path), tiny_config(stage="whisper", whisper_text_ctx=4),
                      ByteTokenizer())  # " s o s": 6 bytes, over 3
    out = capsys.readouterr().out
    assert "transcript(s) longer than whisper_text_ctx - 1 = 3 tokens are cut to it" in out
    salmonn.load_data(str(tmp_path), tiny_config(stage="whisper", whisper_text_ctx=64),
                      ByteTokenizer())
    assert "longer than" not in capsys.readouterr().out


def test_a_task_with_one_answer_for_every_clip_is_noted(tmp_path, capsys):
    """A folder without labels gives every clip the class "sound": stage 2 trained and scored
    classification on that constant without a word. load_data names the task and its answer."""
    same = [{**c, "labels": {"class": "sound"}} for c in CLIPS]
    write_tiny_data(tmp_path, same)
    salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=128),
                      ByteTokenizer())
    out = capsys.readouterr().out
    assert (f"note: {tmp_path} train: every classification example has the same answer 'sound'"
            in out)
    assert "captioning example" not in out  # two captions, two answers
    write_tiny_data(tmp_path, CLIPS)
    salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=128),
                      ByteTokenizer())
    assert "the same answer" not in capsys.readouterr().out


def test_answers_longer_than_the_block_are_noted(tmp_path, capsys):
    """A folder's caption longer than llm_block_size less the prompt was cut in every example
    (task_example cuts at the block) without a word: load_data counts them per split."""
    long = [{**CLIPS[0], "caption": "a dog barks " * 20}, CLIPS[1]]
    write_tiny_data(tmp_path, long)
    salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=128),
                      ByteTokenizer())
    out = capsys.readouterr().out
    assert "note: train: 1 answer(s) longer than llm_block_size=128 less the prompt" in out
    assert "note: val: 1 answer(s)" in out
    write_tiny_data(tmp_path, CLIPS)
    salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=128),
                      ByteTokenizer())
    assert "longer than" not in capsys.readouterr().out


def test_beats_stage_notes_a_tag_every_clip_has(tmp_path, capsys):
    """A folder without labels tags every clip "class=sound": the beats stage trained that one
    always-on tag without a word. load_data names it; tags that vary stay quiet."""
    same = [{**c, "labels": {"class": "sound"}} for c in CLIPS]
    write_tiny_data(tmp_path, same)
    salmonn.load_data(str(tmp_path), tiny_config(stage="beats", tags="class=sound"),
                      ByteTokenizer())
    assert (f"note: {tmp_path} train: every clip has the tag(s) class=sound"
            in capsys.readouterr().out)
    write_tiny_data(tmp_path, CLIPS)
    salmonn.load_data(str(tmp_path),
                      tiny_config(stage="beats", tags="class=morse code|class=piano"),
                      ByteTokenizer())
    assert "every clip has" not in capsys.readouterr().out


def test_a_clip_too_long_for_the_block_is_named_before_training(tmp_path):
    """A folder's 28 s clip made a prompt (audio tokens + instruction) that filled llm_block_size:
    the run stopped with a traceback at whichever step first drew it, naming no clip. load_data
    names the clip, its duration and the instruction; the clips that fit load."""
    write_tiny_data(tmp_path, CLIPS + [{**CLIPS[1], "id": "long", "frames": 400}])
    with pytest.raises(ValueError, match=r"train clip long \(5.3 s\) with the instruction '.+' "
                                         r"makes a prompt of \d+ positions, which leaves no room "
                                         r"for an answer in llm_block_size=128: lower "
                                         r"max_audio_frames \(now 2250\)"):
        salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=128),
                          ByteTokenizer())
    salmonn.load_data(str(tmp_path), tiny_config(stage="instruct", llm_block_size=128,
                                                 max_audio_frames=60), ByteTokenizer())
