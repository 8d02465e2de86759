"""
Pengi (Deshmukh et al., 2023, arXiv 2305.11834): every audio task as text generation.

    audio  -> HTSAT-style encoder -> projection -> L2 norm -> mapper m1 -> LayerNorm, scale
           -> audio prefix (k vectors)
    prompt -> frozen text tower -> text_projection -> projection -> L2 norm -> mapper m2
           -> LayerNorm, scale -> text prefix (k vectors)
    frozen GPT-2 over [audio prefix][text prefix][answer tokens] -> answer

Trainable, as in the official code: the audio encoder and its projection, the text side's
projections (CLIP's text_projection and the projection after it) and the two mappers. The language
model (GPT-2 layout and names) and the text tower are frozen. A `clap` stage can pretrain the two
encoders contrastively first, as Pengi's HTSAT comes from CLAP. The loss is on the answer tokens
and the eot that ends them (not the prefix), averaged per example (ours). Decoding is
length-normalised beam search with a KV cache (beam 5 by default, 3 in the official code's example;
beam 1 is greedy).

Close-ended tasks are scored three ways (the scoring is ours): the generated text must equal the
label, and the candidate labels are ranked by the LM's likelihood of each, raw and calibrated by the
label prior (PMI). The audio embedding (`embed_audio`) feeds a linear probe, as in the paper's
representation study.

Our choices (the paper's sizes are in config/pengi_paper.py):
- a scaled-down HTSAT. A frequency head replaces the mean-pooled embedding Pengi reads
  (AudioEncoder). The position embedding is absolute, not Swin's relative bias. Shifted windows are
  a cyclic roll along time only, without Swin's mask (WindowBlock).
- the mapper outputs are LayerNorm-ed and scaled to the LM's token embeddings (Mapper).
- the text encoder is built from the LM's own embeddings and first layers instead of CLIP's text
  tower: a causal tower pooled at the last token, as CLIP's pools at its end token. It trains with
  the audio encoder in the clap stage.
- the mappers' layers are GPT-2 blocks (the official mapper's have a 2x ReLU MLP).
- an optional contrastive (CLAP) term in stage pengi (`clap_weight`, on in the configs): without
  it an encoder trained from scratch collapses to a constant embedding (Pengi.clap_loss).
"""

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from fused_attention import attention

@dataclass
class PengiConfig:
    # "corpus": the small BPE stored with the data; "gpt2": GPT-2's (tokenizer.load_tokenizer)
    tokenizer: str = "corpus"
    # "clap": contrastive pretraining of both encoders (Pengi's HTSAT comes from CLAP); "pengi": the
    # model itself (the mappers' prefixes into the frozen LM)
    stage: str = "pengi"
    # data (filled by load_data from the tokenizer and meta.json)
    n_mels: int = 64
    vocab_size: int = 0        # the tokenizer's vocab; an llm_init checkpoint must match it
    eot_token: int = -1        # ends every answer
    max_frames: int = 256      # audio input in mel frames (75/s): longer cropped, shorter padded
    # shorter clips: "repeat" (CLAP's and Pengi's repeat-padding) or "silence" (ours: silent
    # frames, so counts and order stay readable)
    pad: str = "repeat"
    # audio encoder: HTSAT-style (Swin over the time-frequency patch grid)
    patch_size: int = 4        # square patches of the (n_mels, frames) spectrogram
    enc_dim: int = 32          # stage-1 width, doubled by each patch merging
    enc_depths: str = "2,2,2"  # blocks per stage; a patch merging between stages
    enc_heads: str = "2,4,8"   # heads per stage
    window: int = 8            # window side in patches (clamped to the grid)
    # shared embedding space of the two encoders (1024 in the paper)
    d_embed: int = 128
    # text encoder for the prompt: frozen in stage pengi (it trains in the clap stage)
    text_n_layer: int = 2
    # copied from the LM: "llm": wte, wpe, the first text_n_layer blocks and ln_f; "embeddings":
    # wte and wpe; "random": nothing
    text_init: str = "llm"
    text_trainable: bool = False  # True (ours): the tower trains in stage pengi too
    # mappers m1 (audio) and m2 (text), ClipCap style
    prefix_len: int = 8        # k per modality (40 in the paper)
    map_n_layer: int = 2
    map_n_head: int = 4
    # language model, GPT-2 layout, frozen (dims are overwritten by llm_init's checkpoint)
    # HF GPT-2 dir/file, or any train.py ckpt.pt holding an LM (salmonn's, pengi's); "" = a random
    # LM (teaches little)
    llm_init: str = ""
    llm_n_layer: int = 4
    llm_n_head: int = 4
    llm_n_embd: int = 128
    llm_block_size: int = 256
    # in the audio encoder, projections and mappers (the LM and the text tower have none)
    dropout: float = 0.1
    # ours: a CLAP-style contrastive term (see Pengi.clap_loss); 0 = the paper's objective alone
    clap_weight: float = 0.0
    clap_temp: float = 0.07
    # tasks: a comma list of caption, metadata, class, qa, music
    tasks: str = "caption,metadata,class,qa,music"
    # ours: how often each task is drawn, "pitch=3,chord=2" (unnamed tasks weigh 1; "" = uniform)
    task_weights: str = ""
    max_prompt_tokens: int = 32
    max_answer_tokens: int = 40

# -----------------------------------------------------------------------------
# Transformer pieces: GPT-2 layout and Hugging Face names, with GPT-2's KV cache. The LM, the text
# tower and the mappers all use this Block. Copies of salmonn.py's (tests/test_copies.py keeps them
# identical); the LoRA is SALMONN's, and here lora_rank is 0: the LM stays frozen as a whole.

# Copied from salmonn.SelfAttention
class SelfAttention(nn.Module):
    """GPT-2's attention: one fused c_attn for q, k, v. causal=False serves bidirectional stacks
    (Pengi's mapper); past is a (k, v) pair of (B, n_head, T_past, head_size), the KV cache."""

    def __init__(self, n_embd, n_head, dropout=0.0, lora_rank=0, lora_alpha=32.0, lora_dropout=0.0):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd {n_embd} must be a multiple of n_head {n_head}"
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.lora_rank = lora_rank
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            # A random (as in LoRA / peft), B zero: the adapted model starts equal to the base model
            self.lora_q_A = nn.Parameter(torch.empty(lora_rank, n_embd))
            self.lora_q_B = nn.Parameter(torch.zeros(n_embd, lora_rank))
            self.lora_v_A = nn.Parameter(torch.empty(lora_rank, n_embd))
            self.lora_v_B = nn.Parameter(torch.zeros(n_embd, lora_rank))
            nn.init.kaiming_uniform_(self.lora_q_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_v_A, a=math.sqrt(5))
            self.lora_drop = nn.Dropout(lora_dropout)

    def forward(self, x, causal=True, past=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if self.lora_rank:
            h = self.lora_drop(x)  # one dropout mask for both adapters (peft draws one each)
            q = q + self.lora_scale * (h @ self.lora_q_A.t() @ self.lora_q_B.t())
            v = v + self.lora_scale * (h @ self.lora_v_A.t() @ self.lora_v_B.t())
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # causal is aligned bottom-right: new queries see the cache and themselves
        y = attention(q, k, v, causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)

# Copied from salmonn.MLP
class MLP(nn.Module):

    def __init__(self, n_embd, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu

# Copied from salmonn.Block
class Block(nn.Module):

    def __init__(self, n_embd, n_head, dropout=0.0, lora_rank=0, lora_alpha=32.0, lora_dropout=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, lora_rank, lora_alpha, lora_dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x, causal=True, past=None):
        a, present = self.attn(self.ln_1(x), causal, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present

# Copied from salmonn.GPT2
class GPT2(nn.Module):
    """GPT-2 with Hugging Face's names (wte, wpe, h.{i}..., ln_f), nn.Linear layout, lm_head tied to
    wte."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size, dropout=0.0, lora_rank=0,
                 lora_alpha=32.0, lora_dropout=0.0):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout, lora_rank, lora_alpha, lora_dropout)
                                for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x, past=None):
        """x: input embeddings (B, T, C) without positions; past: the KV cache, one (k, v) per
        layer, from a previous call. Returns the final hidden states (B, T, C) and the new cache."""
        t0 = 0 if past is None else past[0][0].size(2)
        if t0 + x.size(1) > self.block_size:
            raise ValueError(f"sequence of {t0 + x.size(1)} positions exceeds the LM's block_size "
                             f"{self.block_size}")
        x = self.drop(x + self.wpe(torch.arange(t0, t0 + x.size(1), device=x.device)))
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, causal=True, past=None if past is None else past[i])
            presents.append(present)
        return self.ln_f(x), presents

# -----------------------------------------------------------------------------
# Audio encoder: HTSAT-style, scaled down

class WindowBlock(nn.Module):
    """Swin block: attention inside non-overlapping windows of the (freq, time) patch grid, then an
    MLP. Ours: a shifted block (shift=True) rolls the grid cyclically by half a window, along time
    only and without Swin's mask. So the last windows join the input's end to its start. For a
    repeat-padded clip that is close to one more repetition; a silence-padded clip wraps silence;
    a cropped long clip joins two unrelated moments. window: (window_f, window_t) in patches."""

    def __init__(self, dim, n_head, window, shift, dropout):
        super().__init__()
        self.n_head, self.window, self.shift = n_head, window, shift
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # x: (B, Fg, Tg, C)
        B, Fg, Tg, C = x.shape
        wf, wt = self.window
        h = self.ln_1(x)
        if self.shift:  # shifted windows: roll half a window along time (see the class docstring)
            h = torch.roll(h, shifts=-(wt // 2), dims=2)
        # (B, Fg, Tg, C) -> (B * n_windows, wf * wt, C): one row of patches per window
        h = h.view(B, Fg // wf, wf, Tg // wt, wt, C).permute(0, 1, 3, 2, 4, 5)
        h = h.reshape(-1, wf * wt, C)
        q, k, v = self.qkv(h).split(C, dim=2)
        q, k, v = (t.view(t.size(0), -1, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        h = attention(q, k, v).transpose(1, 2).reshape(-1, wf * wt, C)
        # the windows back to (B, Fg, Tg, C)
        h = h.view(B, Fg // wf, Tg // wt, wf, wt, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Fg, Tg, C)
        if self.shift:
            h = torch.roll(h, shifts=wt // 2, dims=2)
        x = x + self.drop(self.proj(h))
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x

class PatchMerging(nn.Module):
    """2x2 neighbouring patches -> one, width doubled (Swin)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):  # (B, Fg, Tg, C) -> (B, Fg/2, Tg/2, 2C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x))

def int_list(config, field):
    """A comma list of positive integers from the config, "2,2,2" -> [2, 2, 2]."""
    value = getattr(config, field)
    try:
        out = [int(x) for x in str(value).split(",")]
    except ValueError:
        raise ValueError(f"{field}={value!r}: must be a comma list of integers, e.g. "
                         f"'2,2'") from None
    if min(out) < 1:
        raise ValueError(f"{field}={value!r}: every entry must be at least 1")
    return out

def stage_windows(config):
    """Per stage: (depth, n_head, (window_f, window_t), (grid_f, grid_t)); a ValueError when the
    windows do not tile the grid or the heads do not divide the stage's width."""
    depths, heads = int_list(config, "enc_depths"), int_list(config, "enc_heads")
    if len(depths) != len(heads):
        raise ValueError(f"enc_depths {config.enc_depths!r} and enc_heads {config.enc_heads!r} "
                         f"differ in length")
    p = config.patch_size
    if config.n_mels % p or config.max_frames % p:
        raise ValueError(f"n_mels {config.n_mels} and max_frames {config.max_frames} must be "
                         f"multiples of patch_size {p}")
    Fg, Tg = config.n_mels // p, config.max_frames // p
    out = []
    for s in range(len(depths)):
        width = config.enc_dim * 2 ** s  # doubled by each patch merging
        if width % heads[s]:
            raise ValueError(f"enc_heads={config.enc_heads!r}: stage {s} is {width} wide "
                             f"(enc_dim={config.enc_dim}, doubled per stage), which {heads[s]} "
                             f"heads do not divide")
        wf, wt = min(config.window, Fg), min(config.window, Tg)
        if Fg % wf or Tg % wt or (s < len(depths) - 1 and (Fg % 2 or Tg % 2)):
            raise ValueError(f"stage {s}: its patch grid {Fg}x{Tg} (n_mels x max_frames / "
                             f"patch_size, halved {s} times) does not tile into {wf}x{wt} windows "
                             f"(or halve); pick other n_mels, max_frames or window")
        out.append((depths[s], heads[s], (wf, wt), (Fg, Tg)))
        Fg, Tg = Fg // 2, Tg // 2
    return out

class AudioEncoder(nn.Module):
    """HTSAT-style: patch_size patches of the mel spectrogram, Swin stages with a patch merging
    between them, the frequency head; (B, T, n_mels) -> (B, out_dim)."""

    def __init__(self, config):
        super().__init__()
        stages = stage_windows(config)
        C, p = config.enc_dim, config.patch_size
        self.patch_embed = nn.Conv2d(1, C, kernel_size=p, stride=p)
        self.patch_norm = nn.LayerNorm(C)
        _, _, _, (Fg, Tg) = stages[0]  # the first stage's patch grid
        self.pos_emb = nn.Parameter(torch.zeros(1, Fg, Tg, C))
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for s, (depth, n_head, window, _) in enumerate(stages):
            self.stages.append(nn.ModuleList([WindowBlock(C, n_head, window, shift=(i % 2 == 1),
                                                          dropout=config.dropout)
                                              for i in range(depth)]))
            if s < len(stages) - 1:
                self.merges.append(PatchMerging(C))
                C *= 2
        self.ln_f = nn.LayerNorm(C)
        # the frequency head: HTSAT's token-semantic conv across all F' frequency rows (as a linear
        # layer), averaged over time (the mean first: the same, the layer being linear). A mean
        # over the grid would lose the pitch (docs/pengi.md)
        _, _, _, (last_rows, _) = stages[-1]  # the last grid's frequency rows
        self.freq_head = nn.Linear(last_rows * C, C)
        self.out_dim = C
        self.mel_shape = (config.max_frames, config.n_mels)  # the input it takes, (frames, n_mels)

    def forward(self, mel):  # (B, T, n_mels) -> (B, out_dim)
        if tuple(mel.shape[1:]) != self.mel_shape:
            raise ValueError(f"pengi: a mel of {tuple(mel.shape[1:])} (frames, n_mels); the audio "
                             f"encoder takes {self.mel_shape} (max_frames, n_mels): fit_frames "
                             f"crops or pads a clip to it")
        # (B, C, F/p, T/p): frequency rows, time columns
        x = self.patch_embed(mel.transpose(1, 2).unsqueeze(1))
        x = self.patch_norm(x.permute(0, 2, 3, 1)) + self.pos_emb
        for s, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x)
            if s < len(self.merges):
                x = self.merges[s](x)
        # (B, F', T', C) -mean over time-> (B, F', C) -flatten-> (B, F' * C) -freq_head-> (B, C)
        return self.freq_head(self.ln_f(x).mean(dim=2).flatten(1))

class Projection(nn.Module):
    """The paper's projection: Linear, GELU, Linear, dropout, residual, LayerNorm."""

    def __init__(self, d_in, d_out, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(d_out)

    def forward(self, x):
        e1 = self.linear1(x)
        e2 = self.drop(self.linear2(F.gelu(e1)))
        return self.ln(e1 + e2)

class TextEncoder(nn.Module):
    """Causal transformer over a text (the prompt for m2; the answer in the contrastive loss),
    pooled at its last token, then CLIP's text_projection (a bias-free linear layer). In stage
    pengi the tower is frozen and text_projection trains, as in the official Pengi code."""

    def __init__(self, config):
        super().__init__()
        C = config.llm_n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.llm_block_size, C)
        self.h = nn.ModuleList([Block(C, config.llm_n_head) for _ in range(config.text_n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.text_projection = nn.Linear(C, C, bias=False)

    def forward(self, text, text_lens):
        T = text.size(1)
        if T > self.wpe.num_embeddings:
            raise ValueError(f"a text of {T} tokens exceeds the text tower's context of "
                             f"{self.wpe.num_embeddings} (llm_block_size)")
        x = self.wte(text) + self.wpe(torch.arange(T, device=text.device))
        for block in self.h:
            x, _ = block(x, causal=True)  # causal, so the padding after each text changes nothing
        x = self.ln_f(x)[torch.arange(x.size(0), device=x.device), text_lens - 1]
        return self.text_projection(x)

class Mapper(nn.Module):
    """ClipCap's transformer mapper. Linear(d_embed -> k*d_lm) gives k vectors. They are
    concatenated with k learned constants and go through a few bidirectional layers (ours: GPT-2
    blocks). The outputs at the constants' positions are the prefix.
    Ours: each output goes through a LayerNorm and a learnable scale that starts at the RMS of the
    LM's token embeddings (Pengi.reset_prefix_scale), so the prefix reaches the frozen LM at the
    size of a word. Without it the prefix is far larger and the frozen LM's answers ignore the
    audio (docs/pengi.md)."""

    def __init__(self, config):
        super().__init__()
        self.k, d = config.prefix_len, config.llm_n_embd
        self.linear = nn.Linear(config.d_embed, self.k * d)
        self.prefix_const = nn.Parameter(torch.randn(self.k, d))
        self.h = nn.ModuleList([Block(d, config.map_n_head, config.dropout)
                                for _ in range(config.map_n_layer)])
        self.ln_out = nn.LayerNorm(d)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, e):  # (B, d_embed) -> (B, k, d_lm)
        x = self.linear(e).view(e.size(0), self.k, -1)
        x = torch.cat([x, self.prefix_const.expand(e.size(0), -1, -1)], dim=1)
        for block in self.h:
            x, _ = block(x, causal=False)
        return self.scale * self.ln_out(x[:, self.k:])

# -----------------------------------------------------------------------------
# Decoding: ClipCap's beam search (Pengi's), for Pengi.generate

# Copied from salmonn.reorder_cache
def reorder_cache(past, index):
    """The KV cache rows of the beams that survive (index: a tensor of row numbers)."""
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]

def clipcap_beam_search(step, logp, past, beam, max_new_tokens, eot, length_penalty):
    """Beam search as ClipCap's and Pengi's code decode, with GPT2's KV cache. Returns the best
    sequence's tokens, without eot.
    step(tokens (n,), past) -> (log-probs (n, V), past); logp (1, V): the first step's log-probs.
    Live beams are ranked at every step by total log-prob / length ** length_penalty, where the
    length counts the eot. A beam that has emitted eot stays in the race with its score frozen. The
    search stops when every beam has ended. salmonn.py's beam_search (Hugging Face's) ranks live
    beams by total log-prob instead; on our captions this one scores well above it
    (docs/pengi.md)."""
    V = logp.size(-1)
    seqs = [[]]
    scores, lengths = torch.zeros(1), torch.zeros(1)
    ended = torch.zeros(1, dtype=torch.bool)
    for t in range(max_new_tokens):
        logp = logp.float().cpu()
        logp[ended] = -math.inf
        logp[ended, eot] = 0.0  # an ended beam has one continuation: itself, unchanged
        cand = scores[:, None] + logp
        new_len = lengths + (~ended).float()
        norm = (cand / new_len[:, None] ** length_penalty).view(-1)
        top = norm.topk(min(beam, int(torch.isfinite(norm).sum()))).indices
        src, tokens = top // V, top % V
        seqs = [seqs[b] if ended[b] else seqs[b] + [k]
                for b, k in zip(src.tolist(), tokens.tolist())]
        scores, lengths = cand.view(-1)[top], new_len[src]
        ended = ended[src] | (tokens == eot)
        if ended.all() or t == max_new_tokens - 1:
            break
        device = past[0][0].device if past else "cpu"
        past = reorder_cache(past, src.to(device))
        logp, past = step(tokens.to(device), past)
    best = (scores / lengths ** length_penalty).argmax().item()
    return [token for token in seqs[best] if token != eot]

# -----------------------------------------------------------------------------
# The model

def check_config(config):
    """A ValueError for a config Pengi cannot build. stage_windows checks the audio encoder's."""
    if config.vocab_size <= 0:
        raise ValueError("pengi: vocab_size is not set (load_data sets it from the tokenizer "
                         "and llm_init)")
    if config.text_init == "llm" and config.text_n_layer > config.llm_n_layer:
        raise ValueError(f"text_n_layer {config.text_n_layer} > llm_n_layer "
                         f"{config.llm_n_layer}: text_init='llm' copies the LM's first layers")
    if config.text_init not in ("llm", "embeddings", "random"):
        raise ValueError(f"text_init must be 'llm', 'embeddings' or 'random', not "
                         f"{config.text_init!r}")
    if config.stage not in ("clap", "pengi"):
        raise ValueError(f"stage must be 'clap' or 'pengi', not {config.stage!r}")
    for field in ("prefix_len", "max_prompt_tokens", "max_answer_tokens", "max_frames",
                  "patch_size", "window", "enc_dim", "d_embed"):
        if getattr(config, field) < 1:
            raise ValueError(f"{field}={getattr(config, field)}: must be at least 1")
    if config.text_n_layer < 0:
        raise ValueError(f"text_n_layer={config.text_n_layer}: must be at least 0")
    if config.map_n_layer < 1:  # with no layer the prefix is the constants alone: no audio
        raise ValueError(f"map_n_layer={config.map_n_layer}: must be at least 1")
    if config.clap_temp <= 0:
        raise ValueError(f"clap_temp={config.clap_temp}: must be above 0")
    if config.clap_weight < 0:
        raise ValueError(f"clap_weight={config.clap_weight}: must be at least 0")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout={config.dropout}: must be at least 0 and under 1")
    for field in ("llm_n_head", "map_n_head"):  # the LM, text tower, mappers: llm_n_embd wide
        heads = getattr(config, field)
        if heads < 1 or config.llm_n_embd % heads:
            raise ValueError(f"{field}={heads}: must divide llm_n_embd={config.llm_n_embd}")

class Pengi(nn.Module):
    """The audio embedding through m1 and the prompt's embedding through m2 give a prefix of 2k
    vectors for the frozen LM, which then reads the answer (forward), writes one (generate) or
    scores candidates (rank_candidates). The stage "clap" trains the two encoders contrastively
    (clap_loss). Built from the config alone; init_pretrained loads the LM (train.py calls it)."""

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.k = config.prefix_len

        self.audio_encoder = AudioEncoder(config)
        self.audio_proj = Projection(self.audio_encoder.out_dim, config.d_embed, config.dropout)
        self.text_encoder = TextEncoder(config)
        # the paper's projection, after the tower's own text_projection (CLIP's)
        self.text_proj = Projection(config.llm_n_embd, config.d_embed, config.dropout)
        self.m1 = Mapper(config)
        self.m2 = Mapper(config)
        self.llm = GPT2(config.vocab_size, config.llm_n_layer, config.llm_n_head, config.llm_n_embd,
                        config.llm_block_size)
        # GPT-2's init (0.02) for the LM and the text tower (init_from_lm below copies the LM into
        # the tower as text_init says; init_pretrained loads the real LM and copies again). The
        # trained parts keep PyTorch's fan-in scaled default: at small widths 0.02 is far below
        # 1/sqrt(fan_in), so the audio signal fades through the mapper and the encoder learns
        # nothing but a constant.
        for module in (self.text_encoder, self.llm):
            module.apply(self._init_weights)
        nn.init.normal_(self.audio_encoder.pos_emb, std=0.02)
        # CLIP's init
        nn.init.normal_(self.text_encoder.text_projection.weight, std=config.llm_n_embd ** -0.5)
        self.init_from_lm()

        for p in self.llm.parameters():
            p.requires_grad = False
        # the tower is frozen unless text_trainable; its text_projection always trains
        for name, p in self.text_encoder.named_parameters():
            p.requires_grad = config.text_trainable or name.startswith("text_projection.")
        if config.stage == "clap":  # CLAP trains both encoders (and their projections) only
            for p in self.text_encoder.parameters():
                p.requires_grad = True
            for p in list(self.m1.parameters()) + list(self.m2.parameters()):
                p.requires_grad = False
        n = sum(p.numel() for p in self.parameters())
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        trained = "audio encoder and projection, text projections, mappers"
        if config.stage == "clap":
            trained = "audio encoder, text tower, both projections"
        elif config.text_trainable:
            trained += ", text tower"
        print(f"pengi: {n / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable ({trained})")

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def init_from_lm(self):
        """After the LM's weights are set: the text tower starts from them (text_init) and the
        prefix scale from their token-embedding RMS."""
        if self.config.text_init in ("llm", "embeddings"):
            t = self.text_encoder
            t.wte.weight.copy_(self.llm.wte.weight)
            t.wpe.weight.copy_(self.llm.wpe.weight)
            if self.config.text_init == "llm":
                for i in range(self.config.text_n_layer):
                    t.h[i].load_state_dict(self.llm.h[i].state_dict())
                t.ln_f.load_state_dict(self.llm.ln_f.state_dict())
        self.reset_prefix_scale()

    @torch.no_grad()
    def reset_prefix_scale(self):
        """m1's and m2's output scale = the RMS of the LM's token embeddings, so a prefix vector
        has a word's norm."""
        rms = self.llm.wte.weight.float().pow(2).mean().sqrt()
        self.m1.scale.fill_(rms)
        self.m2.scale.fill_(rms)

    def train(self, mode=True):
        super().train(mode)
        # frozen parts run in eval mode, as a frozen pretrained model does (neither has dropout
        # today: this keeps it so if one is added)
        self.llm.eval()
        if not (self.config.text_trainable or self.config.stage == "clap"):
            self.text_encoder.eval()
        return self

    def embed_audio(self, mel):
        """(B, T, n_mels) -> (B, d_embed), L2-normalised: the representation the linear probe
        reads."""
        return F.normalize(self.audio_proj(self.audio_encoder(mel)), dim=-1)

    def embed_text(self, text, text_lens):
        """(B, T) token ids -> (B, d_embed), L2-normalised: the prompt's for m2, the answer's in
        clap_loss."""
        return F.normalize(self.text_proj(self.text_encoder(text, text_lens)), dim=-1)

    def prefix(self, mel, prompt, prompt_lens):
        """[audio prefix k][text prefix k]: (B, 2k, d_lm)."""
        return torch.cat([self.m1(self.embed_audio(mel)),
                          self.m2(self.embed_text(prompt, prompt_lens))], dim=1)

    def prefix_norm_ratio(self, prefix):
        """Mean norm of prefix vectors / mean norm of the LM's token embeddings (1 = the LM's own
        scale)."""
        token_norm = self.llm.wte.weight.float().norm(dim=-1).mean()
        return (prefix.float().norm(dim=-1).mean() / token_norm).item()

    def forward(self, mel, prompt, prompt_lens, answer, targets=None):
        """LM input [audio prefix k][text prefix k][answer tokens]. Returns (logits, loss).
        The logits (B, La + 1, V) are those of the positions that predict the answer: the last
        text-prefix position and every answer position. targets (B, La + 1): the answer tokens then
        eot, -1 where padded. The loss is on the answer and its eot, not on the prefix.
        Ours: the loss is the mean over examples of each example's mean token NLL. A mean over all
        tokens would leave the 1-3-token labels almost no weight next to captions
        (docs/pengi.md)."""
        if self.config.stage == "clap" and targets is None:
            raise ValueError("pengi: stage 'clap' needs targets (they mark where each answer ends)")
        audio = self.embed_audio(mel)
        if self.config.stage == "clap":  # contrastive only: (audio, answer text) pairs, no LM
            return None, self.clap_loss(audio, answer, targets, text_grad=True)
        # prefix() written out: clap_weight's loss below reuses the audio embedding
        x = torch.cat([self.m1(audio), self.m2(self.embed_text(prompt, prompt_lens)),
                       self.llm.wte(answer)], dim=1)
        h, _ = self.llm(x)
        logits = self.llm.lm_head(h[:, 2 * self.k - 1:])
        loss = None
        if targets is not None:
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  ignore_index=-1, reduction="none").view(targets.shape)
            mask = (targets != -1).float()
            loss = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
            if self.training and self.config.clap_weight > 0:
                loss = loss + self.config.clap_weight * self.clap_loss(audio, answer, targets)
        return logits, loss

    def clap_loss(self, audio, answer, targets, text_grad=False):
        """CLAP's symmetric InfoNCE between each clip's audio embedding and the text encoder's
        embedding of its answer. Clips in the batch with the same answer are each other's positives.
        stage="clap" trains both encoders with it alone (Pengi's HTSAT comes from CLAP).
        In stage "pengi", clap_weight > 0 adds it in training, the text side fixed (ours): without
        it a scratch encoder trained only through the frozen LM collapses to a constant embedding
        (docs/pengi.md)."""
        # answer tokens without the eot (an empty answer: its pad)
        lens = ((targets != -1).sum(1) - 1).clamp(min=1)
        with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
            text = self.embed_text(answer, lens)
        with torch.no_grad():
            same = (targets[:, None, :] == targets[None, :, :]).all(-1).float()
            same = same / same.sum(1, keepdim=True)
        sim = audio @ text.t() / self.config.clap_temp
        audio_to_text = (same * F.log_softmax(sim, 1)).sum(1).mean()
        text_to_audio = (same * F.log_softmax(sim.t(), 1)).sum(1).mean()
        return -0.5 * (audio_to_text + text_to_audio)

    # --- decoding ----------------------------------------------------------------------

    def last_logp(self, x, past=None):
        """The LM over embeddings x (n, T, d) after the cache -> log-probs of the token after x's
        last (n, V), and the new cache."""
        h, past = self.llm(x, past)
        return F.log_softmax(self.llm.lm_head(h[:, -1]).float(), dim=-1), past

    def next_logp(self, tokens, past):
        """One decoding step: tokens (n,) after the cache -> log-probs of the next token (n, V), new
        cache."""
        return self.last_logp(self.llm.wte(tokens[:, None]), past)

    @torch.no_grad()
    def greedy(self, prefix, max_new_tokens):
        """Batched greedy decoding from prefixes (B, 2k, d). Returns lists of token ids without the
        eot."""
        eot = self.config.eot_token
        logp, past = self.last_logp(prefix)
        B = prefix.size(0)
        out = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            nxt = logp.argmax(dim=-1)
            for b, token in enumerate(nxt.tolist()):  # one copy from the device per step
                if not done[b]:
                    if token == eot:
                        done[b] = True
                    else:
                        out[b].append(token)
            if all(done) or step == max_new_tokens - 1:
                break
            logp, past = self.next_logp(nxt, past)
        return out

    @torch.no_grad()
    def generate(self, mel, prompt, prompt_lens, beam=5, max_new_tokens=30, length_penalty=1.0):
        """Answer token ids for a batch, one list per clip, without the eot. beam 1 decodes
        greedily, batched; a larger beam runs ClipCap's beam search clip by clip. At most as many
        tokens as the LM's block has room for after the prefix."""
        prefix = self.prefix(mel, prompt, prompt_lens)
        max_new_tokens = min(max_new_tokens, self.llm.block_size - prefix.size(1))
        if beam == 1:
            return self.greedy(prefix, max_new_tokens)
        out = []
        for b in range(prefix.size(0)):
            logp, past = self.last_logp(prefix[b:b + 1])
            out.append(clipcap_beam_search(self.next_logp, logp, past, beam, max_new_tokens,
                                           self.config.eot_token, length_penalty))
        return out

    @torch.no_grad()
    def rank_candidates(self, mel, prompt, prompt_lens, candidates):
        """log p(candidate tokens, eot | prefix) for every clip and candidate: (B, n_cand). The
        prefix runs once per clip; the candidates continue from its KV cache in one batch."""
        eot = self.config.eot_token
        if not candidates:
            raise ValueError("rank_candidates: the candidate list is empty")
        if any(len(c) == 0 for c in candidates):
            raise ValueError("rank_candidates: every candidate needs at least one token")
        room, L = self.llm.block_size - 2 * self.k, max(len(c) for c in candidates)
        if L > room:
            raise ValueError(f"rank_candidates: a candidate of {L} tokens; the LM's block "
                             f"({self.llm.block_size}) has room for {room} after the 2 x {self.k} "
                             f"prefix positions")
        prefix = self.prefix(mel, prompt, prompt_lens)
        B, N = prefix.size(0), len(candidates)
        first, past = self.last_logp(prefix)  # predicts each candidate's first token
        cand = torch.full((N, L), eot, dtype=torch.long)
        # what each candidate position predicts: next token or eot
        tgt = torch.full((N, L), -1, dtype=torch.long)
        for j, c in enumerate(candidates):
            cand[j, :len(c)] = torch.tensor(c)
            tgt[j, :len(c)] = torch.tensor(c[1:] + [eot])
        cand, tgt = cand.to(prefix.device), tgt.to(prefix.device)
        past = [(k.repeat_interleave(N, 0), v.repeat_interleave(N, 0)) for k, v in past]
        h, _ = self.llm(self.llm.wte(cand.repeat(B, 1)), past)
        logp = F.log_softmax(self.llm.lm_head(h).float(), dim=-1).view(B, N, L, -1)
        lp = logp.gather(-1, tgt.clamp(min=0)[None, :, :, None].expand(B, -1, -1, 1)).squeeze(-1)
        lp = (lp * (tgt >= 0)).sum(-1)
        return lp + first[:, cand[:, 0]]

# the names train.py, sample.py and eval.py use
Config = PengiConfig
Model = Pengi

# -----------------------------------------------------------------------------
# Loading the LM: a Hugging Face GPT-2 (dir or file) or a train.py ckpt.pt with an LLM (the three
# loaders are copies of salmonn.py's; set_llm_dims and init_pretrained are pengi's)

# Copied from salmonn.read_safetensors
def read_safetensors(path):
    """A .safetensors file: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian tensor bytes. Read here directly (no extra
    dependency)."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
    def corrupt(why):
        return ValueError(f"{path}: not a readable .safetensors file, it is truncated or corrupt "
                          f"({why})")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:  # checked first: a garbage size would be read as gigabytes
            raise corrupt(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # not JSON, or not UTF-8
            raise corrupt(f"its header: {e}") from None
        data = bytearray(f.read())
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (a, b), shape = info["dtype"], info["data_offsets"], info["shape"]
        except (KeyError, TypeError, ValueError) as e:  # an entry without its fields
            raise corrupt(f"tensor {name}: {e!r}") from None
        if dtype not in dtypes:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        dtype = dtypes[dtype]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= a <= b <= len(data) or b - a != math.prod(shape) * itemsize:
            raise corrupt(f"tensor {name}: bytes {a}..{b} of {len(data)} for shape {shape}")
        t = torch.frombuffer(data, dtype=dtype, offset=a,
                             count=(b - a) // itemsize) if b > a else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape).clone()
    return out

# Copied from salmonn.load_torch_file
def load_torch_file(path, field, mmap=False):
    """torch.load of a file a setting names, or a ValueError that names both when it cannot be read
    (empty, truncated or corrupt: torch's own error names neither)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{field}={path}: cannot be read, it is empty, truncated or corrupt "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if not isinstance(ck, dict):  # e.g. a bare tensor saved with torch.save
        raise ValueError(f"{field}={path}: holds a {type(ck).__name__}, not a checkpoint's dict "
                         f"of weights")
    return ck

# Copied from salmonn.load_llm_state
def load_llm_state(path):
    """A GPT-2-format LM from `path`: (a) a Hugging Face GPT-2 directory or weights file
    (model.safetensors or pytorch_model.bin, config.json beside it, keys possibly prefixed
    "transformer.", Conv1D weights stored (in, out)), or (b) a train.py ckpt.pt that holds an LLM
    (keys "llm.<name>": salmonn's stage "llm" and later, or pengi). Returns (state dict in our names
    and nn.Linear layout, without LoRA and without lm_head, which is tied; sizes dict with n_layer,
    n_head, n_embd, block_size, vocab_size)."""
    if os.path.isdir(path):
        names = [n for n in ("model.safetensors", "pytorch_model.bin", "ckpt.pt")
                 if os.path.exists(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"llm_init={path}: the directory holds no model.safetensors, "
                                    f"pytorch_model.bin or ckpt.pt")
        file = os.path.join(path, names[0])
    elif os.path.isfile(path):
        file = path
    else:
        raise FileNotFoundError(f"llm_init={path}: no such file or directory")
    # a train.py ckpt.pt (zip format) is mapped, not read: a caller may only want its sizes
    raw = read_safetensors(file) if file.endswith(".safetensors") else \
        load_torch_file(file, "llm_init", mmap=file.endswith(".pt"))
    # (b) a train.py checkpoint
    if isinstance(raw, dict) and "model" in raw and "model_args" in raw:
        args = raw["model_args"]
        missing = [k for k in ("llm_n_layer", "llm_n_head", "llm_n_embd", "llm_block_size",
                               "vocab_size") if k not in args]
        sd = {k.removeprefix("_orig_mod.")[4:]: v for k, v in raw["model"].items()
              if k.removeprefix("_orig_mod.").startswith("llm.")}
        sd = {k: v for k, v in sd.items() if ".lora_" not in k and not k.startswith("lm_head.")}
        if missing or not sd:
            what = f"its model_args lack {', '.join(missing)}" if missing else "no 'llm.*' weights"
            raise ValueError(f"llm_init={path}: a {raw.get('model_name', 'train.py')} checkpoint "
                             f"without an LLM ({what})")
        if args.get("stage") not in (None, "llm"):
            print(f"llm_init={path}: a checkpoint of stage {args['stage']!r}; taking its LLM's "
                  f"base weights")
        return sd, dict(n_layer=args["llm_n_layer"], n_head=args["llm_n_head"],
                        n_embd=args["llm_n_embd"],
                        block_size=args["llm_block_size"], vocab_size=args["vocab_size"])
    # (a) Hugging Face GPT-2
    sd = {}
    for k, v in raw.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers; lm_head is tied to wte
        conv1d = k.endswith((".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                             ".mlp.c_proj.weight"))
        # Conv1D stores (in, out); nn.Linear wants (out, in)
        sd[k] = v.t().contiguous() if conv1d else v
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ValueError(f"llm_init={file}: not a GPT-2 checkpoint (no wte.weight / wpe.weight)")
    cfg_file = os.path.join(os.path.dirname(file), "config.json")
    if not os.path.exists(cfg_file):  # the fused c_attn does not tell how many heads it has
        raise FileNotFoundError(f"llm_init={path}: {cfg_file} not found; a GPT-2 checkpoint needs "
                                f"its config.json (n_head cannot be read from the weights)")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"llm_init={path}: {cfg_file} is not JSON ({e})") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("n_head"), int):
        raise ValueError(f"llm_init={path}: {cfg_file} has no n_head (a whole number), which the "
                         f"weights do not tell")
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    return sd, dict(n_layer=hf.get("n_layer", n_layer), n_head=hf["n_head"],
                    n_embd=hf.get("n_embd", sd["wte.weight"].size(1)),
                    block_size=hf.get("n_positions", sd["wpe.weight"].size(0)),
                    vocab_size=hf.get("vocab_size", sd["wte.weight"].size(0)))

def set_llm_dims(config):
    """load_data calls this before the model is built: the sizes and vocab of the LM that
    llm_init names replace the config's llm_* fields. A checkpoint's config names no LM, since
    init_pretrained clears llm_init once it has loaded it. A missing file is an error here: the
    config's own sizes would not be the LM's, and the error would come later about them."""
    if not config.llm_init:
        return
    if not os.path.exists(config.llm_init):
        raise FileNotFoundError(f"llm_init={config.llm_init}: no such file or directory (the LM "
                                f"whose sizes and weights Pengi starts from; a Pengi or SALMONN "
                                f"checkpoint holds one too: --llm_init=<its ckpt.pt>)")
    _, dims = load_llm_state(config.llm_init)
    # the LM must read the tokenizer's ids: a larger vocab would be lost when a checkpoint reloads
    # (load_data sets vocab_size from the tokenizer) and could sample ids no tokenizer decodes
    if config.vocab_size and dims["vocab_size"] != config.vocab_size:
        raise ValueError(f"llm_init={config.llm_init}: vocab_size {dims['vocab_size']} != the "
                         f"{config.vocab_size} of tokenizer={config.tokenizer!r}")
    config.vocab_size, config.llm_n_layer = dims["vocab_size"], dims["n_layer"]
    config.llm_n_head = dims["n_head"]
    config.llm_n_embd, config.llm_block_size = dims["n_embd"], dims["block_size"]

def init_pretrained(model, tok=None):
    """train.py calls this on a freshly built model: it loads the LM that config.llm_init names,
    restarts the text tower and the prefix scale from it, then clears llm_init. The model holds the
    LM from then on, so a checkpoint's config names no file for load_data to read again (train.py's
    saved settings keep the path). tok: unused here; salmonn.py's hook probes its LLM with it."""
    config = model.config
    if not config.llm_init:
        warnings.warn("pengi: llm_init is empty, so the frozen LM is random: it teaches little; "
                      "pretrain one (config/salmonn_llm.py) or point llm_init at GPT-2")
        return
    sd, dims = load_llm_state(config.llm_init)
    own = model.llm.state_dict()
    missing = [k for k in own if k not in sd and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"llm_init: {config.llm_init} lacks "
                         f"{missing[:4]}{'...' if len(missing) > 4 else ''}")
    for k in own:
        if k != "lm_head.weight" and sd[k].shape != own[k].shape:
            raise ValueError(f"llm_init: {k} has shape {tuple(sd[k].shape)}, expected "
                             f"{tuple(own[k].shape)} (build the config with load_data or "
                             f"set_llm_dims first)")
    model.llm.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    model.init_from_lm()
    print(f"llm_init: loaded {config.llm_init} ({dims['n_layer']} layers, {dims['n_embd']} wide)")
    config.llm_init = ""

# -----------------------------------------------------------------------------
# Data: tasks from the prepared clips through the paper's templates (and ours for chords)

TASKS = ("caption", "metadata", "class", "qa", "music")  # the names config.tasks may list
PROMPTS = {  # task -> the prompt; music has one prompt per label key
    "caption": "generate audio caption",
    "metadata": "generate metadata",
    "class": "this is a sound of",
    "instrument": "this music note is produced by",
    "pitch": "this music note pitch is",
    "chord": "this music chord is",  # ours: the paper has no chord task
}
QA_PROMPT = "question: "  # + the question, for audio QA
MUSIC_KEYS = ("instrument", "pitch", "chord")  # the music task: one prompt per label

def metadata_text(clip):
    """Our metadata string: the clip's kind, its labels and, where there is one, its transcript."""
    parts = [f"kind: {clip['kind']}"] + [f"{k}: {v}" for k, v in sorted(clip["labels"].items())]
    if clip.get("transcript"):
        parts.append(f"text: {clip['transcript']}")
    return "; ".join(parts)

def mix_tasks(tasks):
    """The task names of the mix, music expanded to its label keys."""
    names = [t for t in TASKS if t != "music" and t in tasks]
    return names + (list(MUSIC_KEYS) if "music" in tasks else [])

def clip_tasks(clip, tasks):
    """All (task, prompt, answer) examples of one clip."""
    out = []
    if "caption" in tasks and clip.get("caption"):
        out.append(("caption", PROMPTS["caption"], clip["caption"]))
    if "metadata" in tasks:
        out.append(("metadata", PROMPTS["metadata"], metadata_text(clip)))
    if "class" in tasks and "class" in clip["labels"]:
        out.append(("class", PROMPTS["class"], clip["labels"]["class"]))
    if "qa" in tasks:
        out += [("qa", QA_PROMPT + qa["q"], qa["a"]) for qa in clip.get("qa", [])]
    if "music" in tasks:
        out += [(key, PROMPTS[key], clip["labels"][key]) for key in MUSIC_KEYS
                if key in clip["labels"]]
    return out

# salmonn.py keeps a copy (tests/test_copies.py checks it): a change here must be made there too
def parse_task_weights(spec, tasks):
    """ "qa=3" -> {"qa": 3.0}, checked against tasks (the names of the tasks in the mix); a task
    not named keeps weight 1."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = (x.strip() for x in item.partition("="))
        if name in weights:
            raise ValueError(f"task_weights: {name!r} is named twice")
        if name not in tasks:
            raise ValueError(f"task_weights: {name!r} is not a task of the mix; choose from "
                             f"{', '.join(tasks)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"task_weights: {item!r} needs a number after '='") from None
        if not (weights[name] >= 0 and math.isfinite(weights[name])):
            raise ValueError(f"task_weights: {item!r} must be a finite weight >= 0")
    if weights and not any(weights.get(t, 1.0) > 0 for t in tasks):
        raise ValueError("task_weights: every task of the mix weighs 0")
    return weights

def task_probabilities(names, weights, split):
    """How often get_batch draws each of the split's tasks (sorted names); None = uniform."""
    if not weights:
        return None
    p = np.array([weights.get(t, 1.0) for t in names])
    if p.sum() == 0:
        raise ValueError(f"task_weights leave the {split} split's tasks {names} no weight")
    return p / p.sum()

def answer_ids(tok, text):
    """An answer tokenized as the LM saw words in running text during pre-training: after a space.
    Both GPT-2's BPE and the corpus BPE have different tokens for "dog" and " dog", and the corpus
    LM saw "ASSISTANT: dog". collate adds the eot that ends it."""
    return tok.encode(" " + text.strip())

def prompt_ids(tok, text):
    """A prompt starts the text tower's input, as a text starts: no leading space."""
    return tok.encode(text)

PAD_MODES = ("repeat", "silence")
MEL_SILENCE = -1.0  # the data's log-mel of silence: the -80 dB floor of audio.log_mel

def fit_frames(x, max_frames, rng=None, pad="repeat"):
    """x (frames, n_mels) to max_frames: cropped (at random with an rng, else from the start) or
    padded, by repeating the clip as CLAP does (pad="repeat") or with silence."""
    if len(x) == 0:
        raise ValueError("empty audio clip")
    if len(x) > max_frames:
        s = int(rng.integers(0, len(x) - max_frames + 1)) if rng is not None else 0
        return x[s:s + max_frames]
    if pad == "silence":
        return np.concatenate([x, np.full((max_frames - len(x), x.shape[1]), MEL_SILENCE,
                                          dtype=x.dtype)])
    reps = -(-max_frames // len(x))  # ceil
    return np.concatenate([x] * reps)[:max_frames]

def clip_mel(mel, clip, max_frames, rng=None, pad="repeat"):
    """One clip's mel from the split's memmap, fitted to max_frames by fit_frames."""
    x = np.asarray(mel[clip["offset"]:clip["offset"] + clip["frames"]], dtype=np.float32)
    return fit_frames(x, max_frames, rng, pad)

def check_data_config(config):
    """The settings load_data reads, checked once the LM's sizes are known: the texts fit the text
    tower's and the LM's context, the tasks are known and each named once, pad is a mode. Returns
    the tasks."""
    for field in ("max_prompt_tokens", "max_answer_tokens"):  # the text tower reads these texts
        if getattr(config, field) > config.llm_block_size:
            raise ValueError(f"{field}={getattr(config, field)} exceeds the text tower's context, "
                             f"the LM's llm_block_size {config.llm_block_size}")
    if config.stage == "pengi" and 2 * config.prefix_len + config.max_answer_tokens > \
            config.llm_block_size:
        raise ValueError(f"2 * prefix_len ({config.prefix_len}) + max_answer_tokens "
                         f"({config.max_answer_tokens}) exceeds the LM's llm_block_size "
                         f"{config.llm_block_size}: the longest answers would not fit")
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"tasks: unknown {sorted(unknown)}; choose from {', '.join(TASKS)}")
    if not tasks or len(set(tasks)) < len(tasks):
        raise ValueError(f"tasks={config.tasks!r}: name each task of the mix once, comma-separated "
                         f"(from {', '.join(TASKS)})")
    if config.pad not in PAD_MODES:
        raise ValueError(f"pad: {config.pad!r} is not one of {', '.join(PAD_MODES)}")
    return tasks

def load_data(data_dir, config, tok):
    """The data dict: both splits' examples grouped by task, with their mel memmaps, and the
    close-ended tasks' candidate labels. Sets n_mels, vocab_size, eot_token and, from llm_init, the
    llm_* sizes on config first."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run prepare.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    config.n_mels = meta["n_mels"]
    # the data is text: the config's tokenizer sets these
    config.vocab_size, config.eot_token = tok.n_vocab, tok.eot_token
    set_llm_dims(config)
    tasks = check_data_config(config)
    data = {"tasks": tasks, "max_frames": config.max_frames, "pad": config.pad,
            "eot_token": tok.eot_token}
    weights = parse_task_weights(config.task_weights, mix_tasks(tasks))
    for split in ("train", "val"):
        mel = np.memmap(os.path.join(data_dir, f"{split}_mel.bin"), dtype=np.float16,
                        mode="r").reshape(-1, meta["n_mels"])
        with open(os.path.join(data_dir, f"{split}_clips.jsonl")) as f:
            clips = [json.loads(line) for line in f if line.strip()]
        if not clips:
            raise ValueError(f"{data_dir}/{split}_clips.jsonl holds no clips")
        by_task = {}  # task -> [(clip index, prompt ids, answer ids)]
        cut = Counter()  # texts longer than their budget: the model learns them cut (and eot there)
        for i, clip in enumerate(clips):
            for task, prompt, answer in clip_tasks(clip, tasks):
                p, a = prompt_ids(tok, prompt), answer_ids(tok, answer)
                cut["answer"] += len(a) > config.max_answer_tokens
                cut["prompt"] += len(p) > config.max_prompt_tokens
                example = (i, p[:config.max_prompt_tokens], a[:config.max_answer_tokens])
                by_task.setdefault(task, []).append(example)
        for what, n in sorted(cut.items()):
            if n:
                print(f"note: {data_dir} {split}: {n} {what}(s) longer than max_{what}_tokens="
                      f"{getattr(config, f'max_{what}_tokens')} are cut to it (the model learns "
                      f"them cut)")
        if not by_task:
            raise ValueError(f"{data_dir}: the {split} split's clips offer none of the tasks "
                             f"{config.tasks!r}")
        if split == "train":  # what the mix holds: data without captions or QA trains less
            none = [t for t in mix_tasks(tasks) if t not in by_task]
            print(f"pengi: {data_dir} train examples: "
                  + ", ".join(f"{t} {len(by_task[t])}" for t in sorted(by_task))
                  + (f"; none for {', '.join(none)}" if none else ""))
            # a folder without labels gives every clip the class "sound" (one label, the same):
            # such a task teaches a constant answer, whatever the audio
            for t in sorted(by_task):
                answers = {tuple(a) for _, _, a in by_task[t]}
                if len(by_task[t]) > 1 and len(answers) == 1:
                    print(f"note: {data_dir} train: every {t} example has the same answer "
                          f"{tok.decode(list(answers.pop())).strip()!r}: the task teaches it "
                          f"whatever the audio")
        # task_p follows the tasks' sorted order, as get_batch's pick does
        data[split] = {"mel": mel, "clips": clips, "by_task": by_task,
                       "task_p": task_probabilities(sorted(by_task), weights, split)}
    # candidate labels for the close-ended tasks, from the training split
    data["candidates"] = {key: sorted({c["labels"][key] for c in data["train"]["clips"]
                                       if key in c["labels"]})
                          for key in ("class",) + MUSIC_KEYS}
    return data

def collate(mels, prompts, answers, eot):
    """Tensors for model(**batch): answers given as input tokens; targets = answer then eot, -1
    beyond."""
    B = len(prompts)
    Lp, La = max(len(p) for p in prompts), max(len(a) for a in answers)
    prompt = torch.full((B, Lp), eot, dtype=torch.long)
    answer = torch.full((B, La), eot, dtype=torch.long)
    targets = torch.full((B, La + 1), -1, dtype=torch.long)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        prompt[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        answer[b, :len(a)] = torch.tensor(a, dtype=torch.long)
        targets[b, :len(a) + 1] = torch.tensor(a + [eot], dtype=torch.long)
    return {"mel": torch.from_numpy(np.stack(mels)), "prompt": prompt,
            "prompt_lens": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "answer": answer, "targets": targets}

def get_batch(data, split, batch_size, rng):
    """The multi-task mix: each example picks a task among those of the split (uniformly, or by
    task_weights), then an example of it."""
    d = data[split]
    tasks, task_p = sorted(d["by_task"]), d["task_p"]
    mels, prompts, answers = [], [], []
    for _ in range(batch_size):
        pick = rng.integers(len(tasks)) if task_p is None else rng.choice(len(tasks), p=task_p)
        ex = d["by_task"][tasks[pick]]
        i, p, a = ex[rng.integers(len(ex))]
        mels.append(clip_mel(d["mel"], d["clips"][i], data["max_frames"],
                             rng if split == "train" else None, data["pad"]))
        prompts.append(p)
        answers.append(a)
    return collate(mels, prompts, answers, data["eot_token"])

# -----------------------------------------------------------------------------
# Evaluation: captioning BLEU-4, audio QA accuracy, close-ended accuracy three ways, linear probe

# salmonn.py keeps a copy (tests/test_copies.py checks it): a change here must be made there too
def normalize_text(s):
    """Lower case, punctuation to spaces (keeping # for sharps and ' for contractions), single
    spaces."""
    return " ".join(re.sub(r"[^\w#' ]+", " ", s.lower()).split())

# salmonn.py keeps a copy (tests/test_copies.py checks it): a change here must be made there too
def bleu4(hypotheses, references):
    """Corpus BLEU-4 (Papineni et al., 2002): clipped n-gram precisions for n = 1..4 summed over the
    corpus, their geometric mean, times the brevity penalty exp(1 - r/c) when c < r (c: hypothesis
    words, r: the closest reference length per hypothesis). hypotheses: list of str; references:
    list of lists of str. No smoothing: a corpus without a single matching 4-gram scores 0."""
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu4: {len(hypotheses)} hypotheses but {len(references)} reference "
                         f"lists")
    matched, total = [0] * 4, [0] * 4
    c_len = r_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = normalize_text(hyp).split()
        rs = [normalize_text(r).split() for r in refs]
        c_len += len(h)
        r_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            h_ngrams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            max_ref = Counter()
            for r in rs:
                for g, c in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                    max_ref[g] = max(max_ref[g], c)
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in h_ngrams.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if c_len == 0 or min(matched) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    bp = 1.0 if c_len >= r_len else math.exp(1 - r_len / c_len)
    return bp * math.exp(log_p)

def _device(model):
    return next(model.parameters()).device

@torch.no_grad()
def clip_embeddings(model, d, idx, max_frames, pad, batch_size=32):
    """(len(idx), d_embed) audio embeddings of the split d's clips idx, on the CPU."""
    out = []
    for s in tqdm(range(0, len(idx), batch_size), desc="pengi: embed clips", unit="batch",
                  leave=False, disable=len(idx) <= 4 * batch_size):  # a bar when it takes a while
        mel = np.stack([clip_mel(d["mel"], d["clips"][i], max_frames, pad=pad)
                        for i in idx[s:s + batch_size]])
        out.append(model.embed_audio(torch.from_numpy(mel).to(_device(model))).float().cpu())
    return torch.cat(out)

def fit_logistic(x, y, n_class, weight_decay=1e-3, max_iter=100):
    """Multinomial logistic regression on standardised features, full-batch L-BFGS (one step of at
    most max_iter iterations). Returns predict(x)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    W = torch.zeros(x.size(1), n_class, requires_grad=True)
    b = torch.zeros(n_class, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y) + weight_decay * (W ** 2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return lambda xq: (((xq - mu) / sd) @ W.detach() + b.detach()).argmax(-1)

def linear_probe(model, data, split="val", key="class", max_clips=2000):
    """The paper's representation study: a linear classifier on frozen audio embeddings of the
    training clips, accuracy on `split`, for any label key of the clips. Labels unseen in training
    count as wrong."""
    classes = sorted({c["labels"][key] for c in data["train"]["clips"] if key in c["labels"]})
    if len(classes) < 2:
        return None
    cls = {c: j for j, c in enumerate(classes)}
    tr = [i for i, c in enumerate(data["train"]["clips"])
          if c["labels"].get(key) in cls][:max_clips]
    ev = [i for i, c in enumerate(data[split]["clips"]) if key in c["labels"]][:max_clips]
    if not tr or not ev:
        return None
    x_tr = clip_embeddings(model, data["train"], tr, data["max_frames"], data["pad"])
    y_tr = torch.tensor([cls[data["train"]["clips"][i]["labels"][key]] for i in tr])
    x_ev = clip_embeddings(model, data[split], ev, data["max_frames"], data["pad"])
    y_ev = torch.tensor([cls.get(data[split]["clips"][i]["labels"][key], -1) for i in ev])
    predict = fit_logistic(x_tr, y_tr, len(classes))
    return (predict(x_ev) == y_ev).float().mean().item()

def qa_probe(model, data, split="val", max_clips=2000):
    """The linear probe for QA (ours): how many answers the audio embedding holds in a linearly
    readable form, whatever the mappers and the LM make of it. Per question, a linear classifier
    from the frozen embedding to the answer is fitted on the training clips' answers and scored on
    the split's. A question with a single answer in training gets that answer. A question or answer
    never seen in training counts as wrong. Uses the first max_clips clips with QA of each split.
    Returns (accuracy, accuracy of each question's most common training answer), or None when
    either split has no QA."""
    def questions(d):
        idx = [i for i, c in enumerate(d["clips"]) if c.get("qa")][:max_clips]
        by_q = {}
        for j, i in enumerate(idx):
            for qa in d["clips"][i]["qa"]:
                by_q.setdefault(qa["q"], []).append((j, normalize_text(qa["a"])))
        return idx, by_q
    tr_idx, tr_q = questions(data["train"])
    ev_idx, ev_q = questions(data[split])
    if not tr_idx or not ev_idx:
        return None
    x_tr = clip_embeddings(model, data["train"], tr_idx, data["max_frames"], data["pad"])
    x_ev = clip_embeddings(model, data[split], ev_idx, data["max_frames"], data["pad"])
    right = constant = total = 0
    for q, asked in ev_q.items():
        total += len(asked)
        if q in tr_q:  # the training clips' most common answer to this question
            usual = Counter(a for _, a in tr_q[q]).most_common(1)[0][0]
            constant += sum(a == usual for _, a in asked)
        answers = sorted({a for _, a in tr_q.get(q, [])})
        if len(answers) == 1:
            right += sum(a == answers[0] for _, a in asked)
        elif answers:
            cls = {a: k for k, a in enumerate(answers)}
            predict = fit_logistic(x_tr[[j for j, _ in tr_q[q]]],
                                   torch.tensor([cls[a] for _, a in tr_q[q]]), len(answers))
            guess = predict(x_ev[[j for j, _ in asked]])
            right += sum(int(g) == cls.get(a, -1) for g, (_, a) in zip(guess.tolist(), asked))
    return right / total, constant / total

def usual_label(data, key):
    """The training split's most common label for key, or None: the constant answer the majority
    baselines give (not the evaluated split's own, which would peek at it)."""
    train = Counter(c["labels"][key] for c in data["train"]["clips"] if key in c["labels"])
    return train.most_common(1)[0][0] if train else None

def majority_acc(data, split, key, max_clips):
    """The accuracy, on the split's first max_clips clips labelled with key, of always answering
    the training split's most common label."""
    usual = usual_label(data, key)
    labels = [c["labels"][key] for c in data[split]["clips"] if key in c["labels"]][:max_clips]
    if usual is None or not labels:
        return 0.0
    return sum(a == usual for a in labels) / len(labels)

def probe_key_list(data, split, keys):
    """The label keys of the comma list keys, each one a label key of the clips or "qa"."""
    keys = [k.strip() for k in str(keys).split(",") if k.strip()]
    known = {k for d in (data["train"], data[split]) for c in d["clips"] for k in c["labels"]}
    unknown = [k for k in keys if k != "qa" and k not in known]
    if unknown:  # a typo would otherwise just leave its column out
        raise ValueError(f"pengi.evaluate: probe_keys: no clip has the label key(s) {unknown}; "
                         f"the clips' keys: {', '.join(sorted(known))}, or qa")
    return keys

def probe_metrics(model, data, split, keys, max_clips):
    """The linear probe's accuracy for each label key in the comma list keys, e.g.
    "class,gender,count". "class" gives probe_acc (the paper's study). Another key gives
    probe_acc_{key} and probe_majority_{key}, the accuracy of always answering the training
    split's most common label. "qa" gives probe_acc_qa and probe_majority_qa, per question
    (qa_probe)."""
    metrics = {}
    for key in probe_key_list(data, split, keys):
        if key == "qa":  # the answers per question (qa_probe)
            got = qa_probe(model, data, split, max_clips)
            if got is not None:
                metrics["probe_acc_qa"], metrics["probe_majority_qa"] = got
            continue
        acc = linear_probe(model, data, split, key, max_clips)
        if acc is None:
            continue
        if key == "class":
            metrics["probe_acc"] = acc
            continue
        metrics[f"probe_acc_{key}"] = acc
        metrics[f"probe_majority_{key}"] = majority_acc(data, split, key, max_clips)
    return metrics

def eval_tasks(data, tasks_opt):
    """The tasks to score: those of the comma list tasks_opt ("" = all) the data was loaded with."""
    known = [t for t in mix_tasks(data["tasks"]) if t != "metadata"]  # metadata is not scored
    wanted = task_names(tasks_opt) or known
    missing = [t for t in wanted if t not in known]
    if missing:
        raise ValueError(f"pengi.evaluate: task(s) {missing} are not among this model's tasks "
                         f"({', '.join(known)}); its config's tasks set what the data offers")
    return wanted

def task_names(tasks_opt):
    """The tasks of the comma list tasks_opt, each one that is scored ([] for "")."""
    wanted = [t.strip() for t in str(tasks_opt).split(",") if t.strip()]
    scored = ("caption", "qa", "class") + MUSIC_KEYS
    bad = [t for t in wanted if t not in scored]
    if bad:
        hint = {"metadata": "metadata is trained but not scored",
                "music": "music is scored as instrument, pitch and chord"}
        why = "; ".join(hint[t] for t in bad if t in hint)
        raise ValueError(f"pengi.evaluate: unknown task(s) {bad}; choose from "
                         f"{', '.join(scored)}" + (f" ({why})" if why else ""))
    return wanted

def eval_batches(model, data, tok, d, examples, bs):
    """[(clip index in the split d, prompt text, answer text)] -> (mel, prompt, prompt_lens) on the
    model's device, bs examples at a time."""
    dev = _device(model)
    bar = tqdm(total=len(examples), desc="pengi: evaluate", unit="example", leave=False,
               disable=len(examples) <= 4 * bs)  # a bar when it takes a while
    for s in range(0, len(examples), bs):
        chunk = examples[s:s + bs]
        mels = [clip_mel(d["mel"], d["clips"][i], data["max_frames"], pad=data["pad"])
                for i, _, _ in chunk]
        prompts = [prompt_ids(tok, p)[:model.config.max_prompt_tokens] for _, p, _ in chunk]
        b = collate(mels, prompts, [[]] * len(chunk), model.config.eot_token)
        yield b["mel"].to(dev), b["prompt"].to(dev), b["prompt_lens"].to(dev)
        bar.update(len(chunk))
    bar.close()

def generate_answers(model, data, tok, d, examples, bs, gen):
    """The model's answer text to each example (generate's options in gen)."""
    out = []
    for mel, prompt, lens in eval_batches(model, data, tok, d, examples, bs):
        out += [tok.decode(t).strip() for t in model.generate(mel, prompt, lens, **gen)]
    return out

def exact_match(hypotheses, examples):
    """Fraction of answers equal to the examples' after normalize_text."""
    return float(np.mean([normalize_text(h) == normalize_text(a)
                          for h, (_, _, a) in zip(hypotheses, examples)]))

def qa_acc_by_kind(hypotheses, examples, clips):
    """qa_acc_{kind}: exact match per clip kind (speech questions about the words need an ear for
    words, which an audio-event encoder does not have)."""
    by_kind = {}
    for h, e in zip(hypotheses, examples):
        by_kind.setdefault(clips[e[0]]["kind"], []).append((h, e))
    return {f"qa_acc_{kind}": exact_match(*zip(*pairs)) for kind, pairs in sorted(by_kind.items())}

def text_metrics(model, data, tok, d, wanted, max_clips, bs, gen):
    """caption_bleu4, qa_acc and qa_acc_{kind} (per kind of clip), where wanted and the split d
    has examples."""
    metrics = {}
    if "caption" in wanted:
        ex = [(i, PROMPTS["caption"], c["caption"]) for i, c in enumerate(d["clips"])
              if c.get("caption")][:max_clips]
        if ex:
            metrics["caption_bleu4"] = bleu4(generate_answers(model, data, tok, d, ex, bs, gen),
                                             [[a] for _, _, a in ex])
    if "qa" in wanted:
        ex = [(i, QA_PROMPT + qa["q"], qa["a"]) for i, c in enumerate(d["clips"])
              for qa in c.get("qa", [])][:max_clips]
        if ex:
            hyps = generate_answers(model, data, tok, d, ex, bs, gen)
            metrics["qa_acc"] = exact_match(hyps, ex)
            metrics.update(qa_acc_by_kind(hyps, ex, d["clips"]))
    return metrics

def candidate_logprobs(model, data, tok, d, examples, bs, cand_ids):
    """(len(examples), len(cand_ids)) LM log-likelihoods of each candidate answer, on the CPU."""
    return torch.cat([model.rank_candidates(mel, p, lens, cand_ids).cpu()
                      for mel, p, lens in eval_batches(model, data, tok, d, examples, bs)])

def top_candidate_acc(scores, cands, labels):
    """Fraction of examples whose highest-scored candidate is their label."""
    return float(np.mean([cands[j] == a for j, a in zip(scores.argmax(-1).tolist(), labels)]))

def pmi_scores(logp, logp_prior):
    """Ranking calibrated by the label prior (PMI, ours):
    log p(c | clip, prompt) - log p(c | prompt). The prior p(c | prompt) is the model's own
    marginal: the mean of p(c | clip', prompt) over M reference clips. It removes the LM's
    preference for some labels whatever the audio. logp: (B, N); logp_prior: (M, N)."""
    return logp - (torch.logsumexp(logp_prior, dim=0) - math.log(logp_prior.size(0)))

def label_metrics(model, data, tok, d, key, max_clips, bs, gen, prior_clips):
    """{key}_acc_gen, _acc_rank, _acc_pmi, _chance and _majority on the split d; {} without two
    candidate labels or any example."""
    cands = data["candidates"].get(key) or []
    ex = [(i, PROMPTS[key], c["labels"][key]) for i, c in enumerate(d["clips"])
          if key in c["labels"]][:max_clips]
    if len(cands) < 2 or not ex:
        return {}
    answers = generate_answers(model, data, tok, d, ex, bs, gen)
    metrics = {f"{key}_acc_gen": exact_match(answers, ex)}
    cand_ids = [answer_ids(tok, c)[:model.config.max_answer_tokens] for c in cands]
    lp = candidate_logprobs(model, data, tok, d, ex, bs, cand_ids)
    ref = [(i, PROMPTS[key], "") for i, c in enumerate(data["train"]["clips"])
           if key in c["labels"]][:prior_clips]
    pmi = pmi_scores(lp, candidate_logprobs(model, data, tok, data["train"], ref, bs, cand_ids))
    labels = [a for _, _, a in ex]
    metrics[f"{key}_acc_rank"] = top_candidate_acc(lp, cands, labels)
    metrics[f"{key}_acc_pmi"] = top_candidate_acc(pmi, cands, labels)
    metrics[f"{key}_chance"] = 1.0 / len(cands)
    metrics[f"{key}_majority"] = exact_match([usual_label(data, key)] * len(ex), ex)
    return metrics

def prefix_norm_metrics(model, data, tok, d, bs):
    """prefix_norm_ratio_audio/_text on the split's first bs clips with the caption prompt."""
    ex = [(i, PROMPTS["caption"], "") for i in range(min(len(d["clips"]), bs))]
    mel, prompt, lens = next(eval_batches(model, data, tok, d, ex, bs))
    pre = model.prefix(mel, prompt, lens)
    return {"prefix_norm_ratio_audio": model.prefix_norm_ratio(pre[:, :model.k]),
            "prefix_norm_ratio_text": model.prefix_norm_ratio(pre[:, model.k:])}

# Copied from salmonn.in_eval_mode
def in_eval_mode(model, fn, *args):
    """fn(*args) with the model in eval mode (no dropout), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        return fn(*args)
    finally:
        model.train(was_training)

EVAL_OPTS = dict(max_clips=200, beam=5, max_new_tokens=30, length_penalty=1.0, batch_size=16,
                 probe=True, probe_keys="class", probe_clips=2000, prior_clips=64, tasks="")

@torch.no_grad()
def evaluate(model, data, tok, split="val", **opts):
    """Paper-style metrics on `split` (the first max_clips examples of each task, 0 = all), in eval
    mode (the model's mode is restored after):
      caption_bleu4
      qa_acc: exact match after normalisation; also per clip kind, qa_acc_{kind}
      {key}_acc_gen, for class and the music labels: the generated text equals the label
      {key}_acc_rank: the label has the highest LM likelihood among the training split's labels
      {key}_acc_pmi: the same, calibrated by the label prior over prior_clips training clips
        (pmi_scores)
      {key}_chance: 1 / number of candidates; {key}_majority: the accuracy of always answering the
        training split's most common label
      probe_acc: linear probe on labels.class, when probe_keys holds class (the default);
        probe_acc_{key} for the other keys in probe_keys; probe_acc_qa for "qa" (probe_metrics);
        next to each but probe_acc, probe_majority_{key} (and _qa): the accuracy of always
        answering the training split's most common label
      prefix_norm_ratio_audio/_text: prefix vector norm / token embedding norm, 1 = the LM's scale
    A clap-stage model (no LM to answer with) gets the probe metrics only.
    opts: max_clips, beam (1 = greedy), max_new_tokens, length_penalty, batch_size, probe,
    probe_keys, probe_clips, prior_clips, tasks (a comma list among caption, qa, class, instrument,
    pitch, chord; "" = all of the data's)."""
    o = eval_options(opts)
    return in_eval_mode(model, _evaluate, model, data, tok, split, o)

def eval_options(opts):
    """evaluate()'s options over their defaults, each checked as far as it can be without the data
    (the task names; a task the model lacks is for eval_tasks): eval.py checks them before any data
    loads."""
    unknown = set(opts) - set(EVAL_OPTS)
    if unknown:
        raise ValueError(f"pengi.evaluate: unknown option(s) {sorted(unknown)}; known: "
                         f"{sorted(EVAL_OPTS)}")
    o = {**EVAL_OPTS, **opts}
    for key, least in (("max_clips", 0), ("beam", 1), ("max_new_tokens", 1), ("batch_size", 1),
                       ("probe_clips", 2), ("prior_clips", 1)):  # a probe fits on 2 clips or more
        if o[key] < least:
            raise ValueError(f"pengi.evaluate: {key}={o[key]}: must be at least {least}")
    task_names(o["tasks"])
    return o

def _evaluate(model, data, tok, split, o):
    if model.config.stage == "clap":  # the encoders alone: the representation study
        return probe_metrics(model, data, split, o["probe_keys"],
                             int(o["probe_clips"])) if o["probe"] else {}
    # max_clips 0: every example (as SALMONN's evaluate reads it)
    max_clips, beam, bs = int(o["max_clips"]) or None, int(o["beam"]), int(o["batch_size"])
    prior_clips = int(o["prior_clips"])
    gen = dict(beam=beam, max_new_tokens=int(o["max_new_tokens"]),
               length_penalty=float(o["length_penalty"]))
    d = data[split]
    wanted = eval_tasks(data, o["tasks"])
    if o["probe"]:  # a typo in probe_keys refused now, not after all the answers are generated
        probe_key_list(data, split, o["probe_keys"])
    metrics = text_metrics(model, data, tok, d, wanted, max_clips, bs, gen)
    for key in [k for k in wanted if k not in ("caption", "qa")]:
        metrics.update(label_metrics(model, data, tok, d, key, max_clips, bs, gen, prior_clips))
    metrics.update(prefix_norm_metrics(model, data, tok, d, bs))
    if o["probe"]:
        metrics.update(probe_metrics(model, data, split, o["probe_keys"], int(o["probe_clips"])))
    return metrics

# -----------------------------------------------------------------------------
# Sampling: sample.py --audio=FILE.wav --prompt="..."

SAMPLE_OPTS = dict(beam=5, max_new_tokens=30, length_penalty=1.0, candidates="")

@torch.no_grad()
def sample(model, tok, audio, prompt, tools, **opts):
    """Answers `prompt` (default "generate audio caption") about the clip.
    Options: beam (default 5, 1 = greedy), max_new_tokens, length_penalty, and candidates: "a|b|c"
    also ranks these labels by likelihood. tools: unused here; sample.py passes it to every model
    file (whisper_gpt decodes codes with it)."""
    unknown = set(opts) - set(SAMPLE_OPTS)
    if unknown:
        raise ValueError(f"pengi.sample: unknown option(s) {sorted(unknown)}; known: "
                         f"{sorted(SAMPLE_OPTS)}")
    if model.config.stage == "clap":
        raise ValueError("pengi.sample: a clap-stage checkpoint embeds audio and text and writes "
                         "no text; Pengi's own stage (config/pengi_synth.py) starts from it")
    o = {**SAMPLE_OPTS, **opts}
    for key in ("beam", "max_new_tokens"):
        if o[key] < 1:
            raise ValueError(f"pengi.sample: {key}={o[key]}: must be at least 1")
    # each label once, in the order given; checked (with their lengths, by rank_candidates) before
    # the answer is generated, not after
    cands = list(dict.fromkeys(c.strip() for c in str(o["candidates"]).split("|") if c.strip()))
    if o["candidates"] and len(cands) < 2:
        named = f"{len(cands)} label" if cands else "no labels"
        raise ValueError(f"pengi.sample: candidates={o['candidates']!r} names {named}; "
                         f"ranking needs two or more, separated by '|' (give 'a|b|c')")
    cfg, dev = model.config, _device(model)
    prompt = prompt or PROMPTS["caption"]
    mel = torch.as_tensor(audio["mel"], dtype=torch.float32).cpu().numpy()
    # sample.py printed the whole input's length: say how much of it the model hears
    if len(mel) > cfg.max_frames:
        print(f"pengi.sample: the model hears the first {cfg.max_frames} of the input's {len(mel)} "
              f"frames (max_frames)")
    mel = torch.from_numpy(fit_frames(mel, cfg.max_frames, pad=cfg.pad))[None].to(dev)
    p = prompt_ids(tok, prompt)
    if not p:
        raise ValueError("pengi.sample: the prompt is empty")
    if len(p) > cfg.max_prompt_tokens:
        raise ValueError(f"pengi.sample: the prompt has {len(p)} tokens, more than the text "
                         f"tower read in training (max_prompt_tokens={cfg.max_prompt_tokens}, "
                         f"where training cut its prompts)")
    # a prompt not trained on (any question is QA's) gets answers of the trained tasks, or none
    # (after the checks: a prompt refused gets its reason alone)
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    if prompt and prompt not in PROMPTS.values() and not prompt.startswith(QA_PROMPT):
        print(f"pengi.sample: {shown!r} is not one of the trained prompts (pengi.PROMPTS, or "
              f"{QA_PROMPT!r} + a question): the answer may be off")
    # a task the checkpoint's last training mix left out (config tasks, or a weight of 0): said
    # too (a run started from another checkpoint may have learned it there)
    mix = mix_tasks([t.strip() for t in cfg.tasks.split(",")])
    weights = parse_task_weights(cfg.task_weights, mix)
    learned = [t for t in mix if weights.get(t, 1.0) > 0]
    task = "qa" if prompt.startswith(QA_PROMPT) else next(
        (t for t, v in PROMPTS.items() if v == prompt), None)
    if task and task not in learned:
        print(f"pengi.sample: {shown!r} asks for the {task!r} task, which this checkpoint's last "
              f"training mix left out (its tasks: {', '.join(learned)}): the answer may be off")
    prompt_t, lens = torch.tensor([p], device=dev), torch.tensor([len(p)], device=dev)
    if cands:  # ranked first: a candidate too long for the LM's block is refused before generating
        lp = model.rank_candidates(mel, prompt_t, lens, [answer_ids(tok, c) for c in cands])[0]
    ids = model.generate(mel, prompt_t, lens, beam=int(o["beam"]),
                         max_new_tokens=int(o["max_new_tokens"]),
                         length_penalty=float(o["length_penalty"]))[0]
    out = {"text": tok.decode(ids).strip(), "prompt": prompt}
    if cands:
        order = lp.argsort(descending=True).tolist()
        out["ranked"] = [(cands[j], round(lp[j].item(), 3)) for j in order]
        out["text"] += ("\nranked by log p(label | audio, prompt): "
                        + ", ".join(f"{c} ({s})" for c, s in out["ranked"]))
    return out
