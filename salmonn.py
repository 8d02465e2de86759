"""
SALMONN (Tang et al., 2023, arXiv 2310.13289): a language model given general hearing.

One file holds the whole model:
- a Whisper-style speech encoder (conv stem with stride 2, sinusoidal positions, non-causal
  transformer),
- a BEATs-style audio encoder (patches over the mel spectrogram, transformer, the patches of one
  time step averaged), so that its stream is time-aligned with the speech stream (the official
  code pairs frames differently: docs/salmonn.md),
- a LayerNorm per stream, the two streams concatenated per frame,
- the window-level Q-Former (non-overlapping windows of encoder frames, a few trainable queries per
  window that cross-attend to their window only) and a linear projection to the LLM width,
- an LLM in GPT-2 layout (Hugging Face names), frozen, adapted with LoRA on its query and value
  projections.
The audio tokens replace <SpeechHere> in the paper's prompt
    USER: <Speech><SpeechHere></Speech> {instruction}\\nASSISTANT: {answer}<eot>
and the loss is on the answer tokens only, averaged per example (ours; the official code averages
over all answer tokens of the batch). Ours too: each audio token rescaled to the LLM's token scale
(audio_norm), and clips unpadded (the official code pads each to Whisper's 30 s), their last window
rounded up and masked.

As in the paper, the encoders come pretrained with their own objectives and stay frozen; only the
Q-Former (with the two streams' LayerNorms), its projection and LoRA train. At CPU size each
pretrained part gets a stand-in trained here (config field `stage`, one config each):
  "whisper"    the speech encoder trained as Whisper is, on transcribed audio of its own: a text
               decoder predicts the transcript from the encoder's output (next-token
               cross-entropy), with a CTC head on the encoder alongside
  "beats"      the audio encoder trained to tag the clips' labels (multi-label), as the BEATs
               checkpoint SALMONN uses was fine-tuned on AudioSet tagging
  "llm"        text-only pretraining of the small GPT-2-layout LLM, the stand-in for Vicuna: the
               corpus text plus generic documents that need reading and copying from context
               (spans between tags repeated, reversed, de-duplicated, numbers spelled out) and
               questions about a train clip's transcript shown between the tags (reading_share),
               the abilities SALMONN borrows from Vicuna
and then the paper's three stages:
  "pretrain"   stage 1: transcription and captioning (+ ours: a CTC readout of the audio tokens,
               connect_ctc_weight)
  "instruct"   stage 2: all tasks (transcription, captioning, QA, music description,
               classification, speaker)
  "activation" stage 3: long story-like answers, to undo the task over-fitting of stage 2
Also here: the batch construction from prepared data, beam search / greedy / sampling with a KV
cache, the evaluation metrics (WER, BLEU-4, accuracy, tagging mAP; our own implementations), and
loaders for GPT-2 checkpoints (Hugging Face safetensors / pytorch_model.bin, or any ckpt.pt of ours
that holds the LLM), OpenAI Whisper checkpoints and our own ckpt.pt files holding the encoders.
"""

import hashlib
import itertools
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
import torch.nn.functional as F
from tqdm import tqdm

from fused_attention import attention

# -----------------------------------------------------------------------------
# config

STAGES = ("whisper", "beats", "llm", "pretrain", "instruct", "activation")
ENCODER_STAGES = ("whisper", "beats")  # the pretrained parts' stand-ins
AUDIO_STAGES = ("pretrain", "instruct", "activation")  # the paper's stages 1-3
STAGE_TASKS = {
    "whisper": ("transcription",),
    "pretrain": ("transcription", "captioning"),
    "instruct": ("transcription", "captioning", "qa", "music", "classification", "speaker"),
    "activation": ("story",),
}
ALL_TASKS = ("transcription", "captioning", "qa", "music", "classification", "speaker", "story")

@dataclass
class SALMONNConfig:
    # "whisper" | "beats" | "llm" | "pretrain" | "instruct" | "activation" (see the top)
    stage: str = "pretrain"
    tasks: str = ""                # comma-separated tasks in place of the stage's ("": the stage's)
    # "transcription=2": how often a task is drawn next to the others (1 each by default)
    task_weights: str = ""
    # "corpus": the small BPE stored with the data; "gpt2": GPT-2's (tokenizer.load_tokenizer)
    tokenizer: str = "corpus"
    # from the tokenizer and the data (load_data fills these)
    vocab_size: int = 50257
    n_mels: int = 64
    frame_rate: float = 75.0       # mel frames per second

    max_audio_frames: int = 2250   # 30 s at 75 frames/s (Whisper's limit); longer clips are cut
    # what the speech encoder reads: "mel", the data's log-mel; "whisper", Whisper's own features
    # (80 Slaney bins of 16 kHz audio at 100 frames/s, prepare.py --whisper_mel), which an OpenAI
    # Whisper checkpoint needs
    speech_features: str = "mel"
    speech_frame_rate: float = 75.0  # frames/s of that input (load_data fills it)
    # speech encoder (Whisper-style); its output runs at speech_frame_rate / 2
    speech_n_layer: int = 2
    speech_n_head: int = 4
    speech_n_embd: int = 128
    # 0: the data's n_mels (load_data sets 80 for speech_features="whisper")
    speech_n_mels: int = 0
    # the speech encoder's weights: our stage-"whisper" ckpt.pt or an OpenAI Whisper .pt
    whisper_init: str = ""
    # stage "whisper": the text decoder that trains the encoder (same width and heads)
    whisper_dec_n_layer: int = 2
    whisper_text_ctx: int = 64     # transcripts cut to this - 1 tokens + the start or end token
    ctc_weight: float = 0.6        # the CTC loss's weight next to the decoder's cross-entropy
    # what CTC spells: "tokens" (the BPE), "chars" (CTC_CHARS) or "phonemes". Phonemes are ours:
    # speech in the ~64 sounds espeak-ng spoke it with, which all words share; the other kinds of
    # clip in tokens
    ctc_units: str = "tokens"
    ctc_phonemes: str = ""         # ctc_units="phonemes": the train split's, "|"-joined (load_data)
    # SpecAugment's frequency and time masks per clip (0: none); stage "whisper" only
    spec_augment: int = 0
    # audio encoder (BEATs-style): patches of 2 mel frames (one speech-encoder frame with
    # speech_features="mel") x beats_patch_f mel bins
    beats_n_layer: int = 2
    beats_n_head: int = 4
    beats_n_embd: int = 128
    beats_patch_f: int = 16
    beats_init: str = ""           # the audio encoder's weights: our stage-"beats" ckpt.pt
    tags: str = ""                 # stage "beats": the tag names, "|"-joined (load_data fills it)
    # another prepared corpus whose train clips join these tasks (of the stage's; its val split
    # stays out), as the paper keeps LibriSpeech's ASR in stage 2
    asr_data_dir: str = ""
    asr_tasks: str = "transcription"
    # stages 1-3: the encoders stay as pretrained (the paper); False fine-tunes them
    freeze_encoders: bool = True
    # frozen encoders run once per clip; later batches reuse their output (SALMONN.cached_encoders)
    cache_encoders: bool = True
    # window-level Q-Former
    qformer_n_layer: int = 2
    qformer_n_head: int = 4
    qformer_n_embd: int = 128
    # encoder frames per window: 0.32 s at 37.5/s (0.24 s at 50/s with Whisper's features;
    # paper: 17 at 50/s)
    window_frames: int = 12
    window_queries: int = 1        # trainable queries per window (paper: 1; the stage configs: 2)
    # LLM (GPT-2 layout)
    llm_n_layer: int = 4
    llm_n_head: int = 4
    llm_n_embd: int = 256
    llm_block_size: int = 256
    # HF GPT-2 dir/file or our stage-"llm" ckpt.pt: its sizes replace the llm_* above (load_data),
    # init_pretrained loads it, our checkpoints then hold the weights
    llm_init: str = ""
    # stages 1-3 refuse an LLM that copies fewer of the probe's spans (0: no check); the bar's
    # measurements are in docs/salmonn.md
    llm_probe_min: float = 0.5
    # ours: each audio token rescaled to the token embeddings' RMS (audio_scale); without it they
    # grow ~6x larger in training
    audio_norm: bool = True
    # ours, stages 1-3: the weight of a CTC loss that reads a transcription example's audio tokens
    # as the LLM's tokens and pulls them toward its transcript (connect_ctc_loss; 0: off)
    connect_ctc_weight: float = 0.0
    # that CTC's blank: the last token of " -", the copying documents' dash (load_data fills it)
    dash_token: int = -1
    llm_dropout: float = 0.0       # stage "llm" only: the LLM is frozen in stages 1-3
    # stage "llm": the share of each batch's rows that are copying conversations
    copy_rows: float = 0.5
    # stage "llm": the share of those conversations that ask a train clip's question about its
    # transcript, shown where the audio goes (reading comprehension, as Vicuna brings it; 0: none)
    reading_share: float = 0.0
    # LoRA on the LLM's query and value projections (paper: rank 8, alpha 32, dropout 0.1)
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    dropout: float = 0.0           # encoders, Q-Former and the "whisper" stage's text decoder

# -----------------------------------------------------------------------------
# encoders and Q-Former: one attention module (Whisper's names) for self- and cross-attention

def sinusoids(length, channels, max_timescale=10000):
    """Whisper's sinusoidal position table: [sin | cos] halves."""
    assert channels % 2 == 0
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)

class MultiHeadAttention(nn.Module):
    """Whisper's attention: self-attention over x (causal in the text decoder), or cross-attention
    to kv when forward is given one (kv_dim: its width, when not n_embd). key has no bias, as in
    Whisper."""

    def __init__(self, n_embd, n_head, kv_dim=None):
        super().__init__()
        assert n_embd % n_head == 0
        kv_dim = kv_dim or n_embd
        self.n_head = n_head
        self.query = nn.Linear(n_embd, n_embd)
        self.key = nn.Linear(kv_dim, n_embd, bias=False)
        self.value = nn.Linear(kv_dim, n_embd)
        self.out = nn.Linear(n_embd, n_embd)

    def forward(self, x, kv=None, k_lens=None, causal=False, q_lens=None):
        kv = x if kv is None else kv
        B, Tq, C = x.shape
        Tk, H = kv.size(1), self.n_head
        q = self.query(x).view(B, Tq, H, C // H).transpose(1, 2)
        k = self.key(kv).view(B, Tk, H, C // H).transpose(1, 2)
        v = self.value(kv).view(B, Tk, H, C // H).transpose(1, 2)
        y = attention(q, k, v, causal=causal, k_lens=k_lens, q_lens=q_lens)
        return self.out(y.transpose(1, 2).reshape(B, Tq, C))

class ResidualAttentionBlock(nn.Module):
    """Whisper's block (pre-LN, its parameter names): self-attention, then, in the text decoder
    (cross_attention), attention to the speech encoder's frames, then the MLP."""

    def __init__(self, n_embd, n_head, dropout, cross_attention=False):
        super().__init__()
        self.attn = MultiHeadAttention(n_embd, n_head)
        self.attn_ln = nn.LayerNorm(n_embd)
        self.cross_attn = MultiHeadAttention(n_embd, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_embd) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))
        self.mlp_ln = nn.LayerNorm(n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, lens=None, causal=False, xa=None, xa_lens=None):
        # lens: each row's valid frames. Padding frames are skipped as queries too (they come out
        # zero), not only as keys. xa, xa_lens: the frames cross-attention reads.
        x = x + self.drop(self.attn(self.attn_ln(x), causal=causal, k_lens=lens, q_lens=lens))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_attn_ln(x), xa, k_lens=xa_lens))
        return x + self.drop(self.mlp(self.mlp_ln(x)))

def mask_frames(x, lens):
    """Zero the frames of x (B, T, C) at positions >= lens, so padding never leaks into valid
    frames."""
    keep = torch.arange(x.size(1), device=x.device)[None, :] < lens[:, None]
    return x * keep[..., None].to(x.dtype)

class SpeechEncoder(nn.Module):
    """Whisper's AudioEncoder: conv (k3) + GELU, conv (k3, stride 2) + GELU, + sinusoids, blocks,
    ln_post."""

    def __init__(self, n_mels, n_embd, n_head, n_layer, dropout):
        super().__init__()
        self.n_mels = n_mels
        self.conv1 = nn.Conv1d(n_mels, n_embd, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_embd, n_embd, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_embd, n_head, dropout)
                                     for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_embd)

    def forward(self, mel, lens):
        # mel (B, T, M) with frames >= lens padding; returns (B, ceil(T/2), C) and its lengths
        if mel.size(-1) != self.n_mels:
            raise ValueError(f"the speech encoder reads {self.n_mels} mel bins (speech_n_mels), "
                             f"got {mel.size(-1)} (an OpenAI Whisper encoder needs "
                             f"speech_features='whisper', from prepare.py --whisper_mel)")
        x = mask_frames(mel, lens).transpose(1, 2)
        x = F.gelu(self.conv1(x)).transpose(1, 2)
        # zeros past each clip's end, as conv2's own padding gives a clip alone in its batch
        x = mask_frames(x, lens).transpose(1, 2)
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        enc_lens = (lens + 1) // 2
        x = x + sinusoids(x.size(1), x.size(2)).to(x.device, x.dtype)
        for block in self.blocks:
            x = block(x, enc_lens)
        return self.ln_post(x), enc_lens

class BEATsEncoder(nn.Module):
    """BEATs-style: patch embedding over (2 frames x patch_f bins) of the mel, a transformer over
    all patches, then the patches of one time step are averaged, giving one vector per 2 mel
    frames (one speech-encoder frame when speech_features="mel")."""

    def __init__(self, n_mels, n_embd, n_head, n_layer, patch_f, dropout):
        super().__init__()
        if n_mels % patch_f:
            raise ValueError(f"beats_patch_f={patch_f} must divide n_mels={n_mels}")
        self.n_mels, self.n_bands = n_mels, n_mels // patch_f
        self.patch_embed = nn.Conv2d(1, n_embd, kernel_size=(2, patch_f), stride=(2, patch_f))
        # which frequency band a patch is
        self.band_emb = nn.Parameter(torch.zeros(self.n_bands, n_embd))
        self.ln_pre = nn.LayerNorm(n_embd)
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_embd, n_head, dropout)
                                     for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_embd)

    def forward(self, mel, lens):
        B, T, M = mel.shape
        mel = mask_frames(mel, lens)
        if T % 2:
            mel = F.pad(mel, (0, 0, 0, 1))
        x = self.patch_embed(mel.unsqueeze(1)).permute(0, 2, 3, 1)  # (B, T2, bands, C)
        T2, C = x.size(1), x.size(3)
        x = x + sinusoids(T2, C).to(x.device, x.dtype)[:, None, :] + self.band_emb
        # time-major: a clip's valid patches are a prefix
        x = self.ln_pre(x.reshape(B, T2 * self.n_bands, C))
        enc_lens = (lens + 1) // 2
        for block in self.blocks:
            x = block(x, enc_lens * self.n_bands)
        return self.ln_post(x).view(B, T2, self.n_bands, C).mean(2)

class QFormerLayer(nn.Module):
    """Self-attention over a window's queries, cross-attention to that window's frames, MLP. Ours:
    pre-LN, and WindowQFormer ends with a LayerNorm (BLIP-2's Q-Former is BERT's post-LN layer)."""

    def __init__(self, n_embd, n_head, enc_dim, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.self_attn = MultiHeadAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.cross_attn = MultiHeadAttention(n_embd, n_head, kv_dim=enc_dim)
        self.ln_3 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, q, frames, k_lens):
        q = q + self.drop(self.self_attn(self.ln_1(q)))
        q = q + self.drop(self.cross_attn(self.ln_2(q), frames, k_lens=k_lens))
        return q + self.drop(self.mlp(self.ln_3(q)))

class WindowQFormer(nn.Module):
    """Cuts the frame sequence into non-overlapping windows; each window's queries see only that
    window. Output: (B, n_windows * n_queries, C) in time order, and which outputs come from real
    (non-padding) frames."""

    def __init__(self, config, enc_dim):
        super().__init__()
        C = config.qformer_n_embd
        self.window = config.window_frames
        self.query = nn.Parameter(torch.randn(config.window_queries, C) * 0.02)
        self.layers = nn.ModuleList([QFormerLayer(C, config.qformer_n_head, enc_dim, config.dropout)
                                     for _ in range(config.qformer_n_layer)])
        self.ln_f = nn.LayerNorm(C)

    def forward(self, x, lens):
        B, T, D = x.shape
        W, nq = self.window, self.query.size(0)
        nW = -(-T // W)
        x = F.pad(x, (0, 0, 0, nW * W - T)).view(B * nW, W, D)  # windows become batch rows
        starts = torch.arange(nW, device=x.device) * W
        # valid frames in each window
        k_lens = (lens[:, None] - starts[None, :]).clamp(0, W).reshape(-1)
        q = self.query.expand(B * nW, nq, -1)
        for layer in self.layers:
            q = layer(q, x, k_lens)
        q = self.ln_f(q).reshape(B, nW * nq, -1)
        valid = (k_lens > 0).view(B, nW, 1).expand(B, nW, nq).reshape(B, nW * nq)
        return q, valid

# how many LLM positions a clip takes: the stem's stride and the Q-Former's windows
def max_speech_frames(config):
    """max_audio_frames (in the data's mel frames) in the speech encoder's input frames."""
    return round(config.max_audio_frames * config.speech_frame_rate / config.frame_rate)

def n_audio_tokens(frames, config):
    """How many LLM input positions a clip of `frames` speech-input frames becomes (one per query
    per window)."""
    frames = min(frames, max_speech_frames(config))
    t2 = (frames + 1) // 2  # the stride-2 stem (kernel 3, padding 1) gives ceil(T / 2) frames
    return -(-t2 // config.window_frames) * config.window_queries

def seconds_of_tokens(n, config):
    """The longest speech that n_audio_tokens turns into at most n positions: whole windows of the
    stem's output frames (2 input frames each), in seconds."""
    return max(n // config.window_queries, 0) * config.window_frames * 2 / config.speech_frame_rate

def n_speech_frames(audio, config):
    """How many frames of a clip the speech encoder reads."""
    return (audio["wmel"] if config.speech_features == "whisper" else audio["mel"]).size(0)

# -----------------------------------------------------------------------------
# stage "whisper": the text decoder and CTC head that train the speech encoder

class TextDecoder(nn.Module):
    """Whisper's TextDecoder: token embedding + learned positions, blocks, ln; logits against the
    token embedding. Only stage "whisper" has it: it is how the speech encoder learns what is
    said."""

    def __init__(self, vocab_size, n_ctx, n_embd, n_head, n_layer, dropout):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.positional_embedding = nn.Parameter(torch.zeros(n_ctx, n_embd))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_embd, n_head, dropout,
                                                            cross_attention=True)
                                     for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)

    def forward(self, tokens, speech, speech_lens):
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.size(1)]
        for block in self.blocks:
            x = block(x, causal=True, xa=speech, xa_lens=speech_lens)
        return self.ln(x) @ self.token_embedding.weight.t()

# CTC on characters: letters are shared by every word, so each is heard far more often than a
# whole-word BPE token (ours; Whisper itself has no CTC head)
CTC_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789'#*"

def ctc_blank(config):
    """The CTC head's blank: the last of its outputs, after the tokens, the characters, or the
    tokens then the phonemes."""
    if config.ctc_units not in ("tokens", "chars", "phonemes"):
        raise ValueError(f"ctc_units must be 'tokens', 'chars' or 'phonemes', got "
                         f"{config.ctc_units!r}")
    if config.ctc_units == "phonemes":
        if not config.ctc_phonemes:
            raise ValueError("ctc_units='phonemes' needs ctc_phonemes, the phoneme inventory "
                             "(load_data fills it from the train split's speech)")
        return config.vocab_size + len(config.ctc_phonemes.split("|"))
    return config.vocab_size if config.ctc_units == "tokens" else len(CTC_CHARS)

def ctc_encode(text):
    """Character ids of a transcript for ctc_units="chars": lower case, other characters left
    out."""
    return [CTC_CHARS.index(ch) for ch in text.lower() if ch in CTC_CHARS]

# -----------------------------------------------------------------------------
# the LLM: GPT-2 layout and Hugging Face names. pengi.py holds the same code (marked copies): LoRA
# on the q and v parts of the fused c_attn is SALMONN's; Pengi's LM has lora_rank=0 and stays frozen
# as a whole.

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

class MLP(nn.Module):

    def __init__(self, n_embd, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu

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

# pengi.py keeps a copy (tests/test_copies.py checks it): a change here must be made there too
def reorder_cache(past, index):
    """The KV cache rows of the beams that survive (index: a tensor of row numbers)."""
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]

def beam_search(step, logp, past, beam, max_new_tokens, eot, length_penalty):
    """Beam search after the prompt. step(tokens (n,), past) -> (log-probs (n, V), past) runs the
    LLM one token on. logp (1, V) is the first step's log-probs, past GPT2's KV cache after the
    prompt. A hypothesis ends at eot (not counted in its length) or at max_new_tokens. Finished
    ones are ranked by total log-prob / length ** length_penalty: 0 ranks by log-prob, 1.0 is
    Hugging Face generate's default. Returns the best one's tokens, without eot."""
    V = logp.size(-1)
    norm = lambda s, n: s / max(1, n) ** length_penalty
    scores = torch.zeros(1, device=logp.device)
    seqs = [[]]
    best = (-float("inf"), [])  # best finished hypothesis (normalised score, tokens)
    for t in range(max_new_tokens):
        cand = (scores[:, None] + logp).view(-1)
        top = cand.topk(min(2 * beam, cand.numel()))
        keep_scores, keep_seqs, src = [], [], []
        for s, i in zip(top.values.tolist(), top.indices.tolist()):
            b, tok = divmod(i, V)
            if tok == eot:
                if norm(s, t) > best[0]:
                    best = (norm(s, t), seqs[b])
            elif t == max_new_tokens - 1:  # out of length: finished too
                if norm(s, t + 1) > best[0]:
                    best = (norm(s, t + 1), seqs[b] + [tok])
            elif len(keep_seqs) < beam:
                keep_scores.append(s)
                keep_seqs.append(seqs[b] + [tok])
                src.append(b)
        if not keep_seqs:
            break
        # log-probs only fall, so a live beam of score s (< 0) can at best reach s / n **
        # length_penalty at its shortest (n = t + 1) or longest (max_new_tokens) end, whichever the
        # penalty's sign favours: once the best finished beats that, nothing can overtake it
        live = max(keep_scores)
        if best[0] >= max(norm(live, t + 1), norm(live, max_new_tokens)):
            break
        scores = torch.tensor(keep_scores, device=logp.device)
        seqs = keep_seqs
        past = reorder_cache(past, torch.tensor(src, device=logp.device))
        logp, past = step(torch.tensor([s[-1] for s in seqs], device=logp.device), past)
    return best[1]

# -----------------------------------------------------------------------------
# the model: which parts exist depends on the stage

def check_config(config):
    """A ValueError naming the setting when the stage's model cannot be built or run: an unknown
    stage or speech input, a part whose head count does not divide its width (attention splits the
    width into equal heads), sizes under their least, dropouts outside [0, 1), shares outside
    [0, 1] and a negative connect_ctc_weight."""
    if config.stage not in STAGES:
        raise ValueError(f"stage={config.stage!r}: must be one of {STAGES}")
    if config.speech_features not in ("mel", "whisper"):
        raise ValueError(f"speech_features={config.speech_features!r}: must be 'mel' or 'whisper'")
    parts = {"whisper": ("speech",), "beats": ("beats",),
             "llm": ("llm",)}.get(config.stage, ("speech", "beats", "qformer", "llm"))
    for part in parts:
        for size in ("n_layer", "n_embd"):
            if getattr(config, f"{part}_{size}") < 1:
                raise ValueError(f"{part}_{size}={getattr(config, f'{part}_{size}')}: must be at "
                                 f"least 1")
        width, heads = getattr(config, f"{part}_n_embd"), getattr(config, f"{part}_n_head")
        if heads < 1 or width % heads:
            raise ValueError(f"{part}_n_head={heads}: must divide {part}_n_embd={width}")
    for part in ("speech", "beats"):  # sinusoidal positions: a sine half and a cosine half
        if part in parts and getattr(config, f"{part}_n_embd") % 2:
            raise ValueError(f"{part}_n_embd={getattr(config, f'{part}_n_embd')}: must be even")
    # whisper_text_ctx: the start or end token and at least one of the transcript's
    for field, least in (("window_frames", 1), ("window_queries", 1), ("max_audio_frames", 1),
                         ("lora_rank", 0), ("whisper_text_ctx", 2), ("llm_block_size", 1),
                         ("whisper_dec_n_layer", 1), ("beats_patch_f", 1), ("speech_n_mels", 0),
                         ("spec_augment", 0)):
        if getattr(config, field) < least:
            raise ValueError(f"{field}={getattr(config, field)}: must be at least {least}")
    for field in ("dropout", "llm_dropout", "lora_dropout"):
        if not 0 <= getattr(config, field) < 1:
            raise ValueError(f"{field}={getattr(config, field)}: must be at least 0 and under 1")
    for field in ("copy_rows", "reading_share", "ctc_weight"):  # shares (ctc_weight: of the loss)
        if not 0 <= getattr(config, field) <= 1:
            raise ValueError(f"{field}={getattr(config, field)}: must be between 0 and 1")
    if config.connect_ctc_weight < 0:  # a term added to the loss
        raise ValueError(f"connect_ctc_weight={config.connect_ctc_weight}: must be at least 0")

def clip_keys(mel, mel_lens, wmel=None, wmel_lens=None):
    """One hash per batch row of its valid input frames: the key of a clip's encoder frames."""
    # one copy to the host per batch, not one per clip
    host = [(x.detach().float().cpu().numpy(), n.tolist())
            for x, n in ((mel, mel_lens), (wmel, wmel_lens)) if x is not None]
    keys = []
    for b in range(mel.size(0)):
        h = hashlib.blake2b()
        for x, n in host:
            h.update(x[b, :n[b]].tobytes())
        keys.append(h.digest())
    return keys

# connect_ctc's logits: an audio token's cosine to each token embedding, times this (a cosine of 1
# against 0 then weighs e^10)
CONNECT_CTC_SCALE = 10.0

class SALMONN(nn.Module):
    """The parts depend on config.stage:
    whisper     speech, decoder, ctc_head
    beats       beats, tag_head
    llm         llm (all of it trains, no LoRA)
    stages 1-3  speech and beats (frozen unless freeze_encoders=False); ln_speech, ln_audio,
                qformer and proj (these train); llm (frozen; its LoRA trains)"""

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        stage = config.stage
        speech_mels = config.speech_n_mels or config.n_mels
        if stage in ("whisper",) + AUDIO_STAGES:
            self.speech = SpeechEncoder(speech_mels, config.speech_n_embd, config.speech_n_head,
                                        config.speech_n_layer, config.dropout)
        if stage in ("beats",) + AUDIO_STAGES:
            self.beats = BEATsEncoder(config.n_mels, config.beats_n_embd, config.beats_n_head,
                                      config.beats_n_layer, config.beats_patch_f, config.dropout)
        if stage == "whisper":
            self.decoder = TextDecoder(config.vocab_size, config.whisper_text_ctx,
                                       config.speech_n_embd, config.speech_n_head,
                                       config.whisper_dec_n_layer, config.dropout)
            # + the CTC blank, last
            self.ctc_head = nn.Linear(config.speech_n_embd, ctc_blank(config) + 1)
        if stage == "beats":
            if not config.tags:
                raise ValueError("stage beats: config.tags is empty (load_data fills it from the "
                                 "train labels)")
            self.tag_head = nn.Linear(config.beats_n_embd, len(config.tags.split("|")))
        if stage not in ENCODER_STAGES:
            self.llm = GPT2(config.vocab_size, config.llm_n_layer, config.llm_n_head,
                            config.llm_n_embd, config.llm_block_size,
                            dropout=config.llm_dropout if stage == "llm" else 0.0,
                            lora_rank=0 if stage == "llm" else config.lora_rank,
                            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
        if stage in AUDIO_STAGES:
            self.ln_speech = nn.LayerNorm(config.speech_n_embd)
            self.ln_audio = nn.LayerNorm(config.beats_n_embd)
            self.qformer = WindowQFormer(config, config.speech_n_embd + config.beats_n_embd)
            self.proj = nn.Linear(config.qformer_n_embd, config.llm_n_embd)
            # the LLM's token RMS (init_pretrained sets it)
            self.register_buffer("audio_scale", torch.tensor(1.0))
            self.encoder_cache, self.encoder_stamp = {}, None  # see cached_encoders()
        self.apply(self._init_weights)
        if hasattr(self, "llm"):
            # GPT-2's scaled init of the residual projections
            for name, p in self.llm.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.llm_n_layer))
        if hasattr(self, "decoder"):
            nn.init.normal_(self.decoder.positional_embedding, std=0.01)
        if stage in AUDIO_STAGES:
            for name, p in self.llm.named_parameters():
                p.requires_grad = ".lora_" in name  # the LLM is frozen; LoRA trains
            if config.freeze_encoders:  # the paper: Whisper and BEATs stay as pretrained
                for p in itertools.chain(self.speech.parameters(), self.beats.parameters()):
                    p.requires_grad = False
        self.train()  # frozen encoders go to eval mode now, not only at the first .train() call
        n_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        print(f"salmonn ({stage}): {self.get_num_params() / 1e6:.2f}M parameters, "
              f"{n_trainable / 1e6:.2f}M trainable")

    def _init_weights(self, m):
        # convolutions keep PyTorch's default init (as Whisper and BEATs do): at std 0.02 their
        # output would be ~10x smaller than the sinusoidal positions added to it, drowning the audio
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def train(self, mode=True):
        super().train(mode)
        if mode and self.config.freeze_encoders and self.config.stage in AUDIO_STAGES:
            self.speech.eval()  # frozen encoders run as they were pretrained: no dropout
            self.beats.eval()
        return self

    def load_llm(self, state, source):
        """Copy GPT-2-format base weights (our names, nn.Linear layout) into the LLM; every key and
        shape must match."""
        own = {k: v for k, v in self.llm.state_dict().items() if ".lora_" not in k
               and k != "lm_head.weight"}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"llm_init={source}: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, shape mismatch {shapes[:5]}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # lm_head is tied: counted once

    # LoRA's scale (alpha / rank): the paper lowers it at inference to bring back emergent abilities
    @property
    def lora_scale(self):
        return self.llm.h[0].attn.lora_scale if len(self.llm.h) else 0.0

    @lora_scale.setter
    def lora_scale(self, scale):
        for block in self.llm.h:
            block.attn.lora_scale = float(scale)

    # audio -> LLM input embeddings
    def encode_audio(self, mel, mel_lens, wmel=None, wmel_lens=None):
        """mel (B, T, n_mels) and mel_lens (B,), with Whisper's features in wmel, wmel_lens when
        speech_features="whisper" -> audio tokens (B, N, llm_n_embd), and valid (B, N), which of
        them come from the clips' frames."""
        n = self.config.max_audio_frames
        mel, mel_lens = mel[:, :n], mel_lens.clamp(max=n)
        s, enc_lens, a = self.cached_encoders(mel, mel_lens, wmel, wmel_lens)
        # e.g. 50 vs 37.5 frames/s: each speech frame takes the audio-event frame that covers its
        # instant, at most the clip's own last one (past it lies a longer neighbour's padding)
        if self.config.speech_frame_rate != self.config.frame_rate:
            ratio = self.config.frame_rate / self.config.speech_frame_rate
            at = (torch.arange(s.size(1), device=s.device) * ratio).long()
            last = ((mel_lens.to(s.device) + 1) // 2 - 1).clamp(min=0)  # a's valid frames - 1
            at = torch.minimum(at[None], last[:, None])  # (B, N)
            a = a.gather(1, at[..., None].expand(-1, -1, a.size(2)))
        # per frame: speech | audio events
        x = torch.cat([self.ln_speech(s), self.ln_audio(a)], dim=-1)
        q, valid = self.qformer(x, enc_lens)
        tokens = self.proj(q)
        if self.config.audio_norm:
            rms = tokens.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
            tokens = tokens * (self.audio_scale / rms)
        return tokens, valid

    def cached_encoders(self, mel, mel_lens, wmel=None, wmel_lens=None):
        """run_encoders(), once per clip when the encoders are frozen: they give a clip the same
        frames every time. Each clip's frames are kept, keyed by its input features, until the
        encoders' weights change. They are kept on the host, since at real Whisper widths a large
        corpus's frames take tens of GB; a batch's rows go to the device when used."""
        if not (self.config.freeze_encoders and self.config.cache_encoders):
            return self.run_encoders(mel, mel_lens, wmel, wmel_lens)
        # loading weights bumps a tensor's version, .to() makes new tensors
        stamp = [(p.data_ptr(), p._version)
                 for p in itertools.chain(self.speech.parameters(), self.beats.parameters())]
        if stamp != self.encoder_stamp:
            self.encoder_cache, self.encoder_stamp = {}, stamp
        keys = clip_keys(mel, mel_lens, wmel, wmel_lens)
        new = {}  # key -> the first row with it, for clips not seen before
        for b, k in enumerate(keys):
            if k not in self.encoder_cache and k not in new:
                new[k] = b
        if new:
            rows = torch.tensor(list(new.values()), device=mel.device)
            pick = lambda t: None if t is None else t[rows]
            lens = pick(mel_lens)
            s, enc_lens, a = self.run_encoders(pick(mel), lens, pick(wmel), pick(wmel_lens))
            a_lens = (lens + 1) // 2
            for i, k in enumerate(new):
                self.encoder_cache[k] = (s[i, :enc_lens[i]].to("cpu", copy=True),
                                         a[i, :a_lens[i]].to("cpu", copy=True))
        frames = [self.encoder_cache[k] for k in keys]
        s = nn.utils.rnn.pad_sequence([f[0] for f in frames], batch_first=True).to(mel.device)
        a = nn.utils.rnn.pad_sequence([f[1] for f in frames], batch_first=True).to(mel.device)
        enc_lens = torch.tensor([len(f[0]) for f in frames], device=mel.device)
        return s, enc_lens, a

    def run_encoders(self, mel, mel_lens, wmel=None, wmel_lens=None):
        """The speech encoder's frames (B, N, C), their lengths (B,), and the audio encoder's
        frames (B, N', C') (valid: (mel_lens + 1) // 2 of them)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoders):
            s, enc_lens = self.speech_encode(mel, mel_lens, wmel, wmel_lens)
            a = self.beats(mel, mel_lens)
        return s, enc_lens, a

    def speech_encode(self, mel, mel_lens, wmel=None, wmel_lens=None):
        """The speech encoder on its input (the mel, or Whisper's features), cut at
        max_speech_frames (max_audio_frames' duration, in the speech input's frames)."""
        if self.config.speech_features == "whisper":
            if wmel is None:
                raise ValueError("speech_features='whisper': the batch needs Whisper's features "
                                 "(prepare.py --whisper_mel)")
            mel, mel_lens = wmel, wmel_lens
        n = max_speech_frames(self.config)
        return self.speech(mel[:, :n], mel_lens.clamp(max=n))

    def embed(self, idx, mel=None, mel_lens=None, audio_mask=None, wmel=None, wmel_lens=None,
              encoded=None):
        """Token embeddings with the audio tokens written, in time order, where audio_mask is True.
        encoded: encode_audio's (tokens, valid); without it they are made from the mel."""
        x = self.llm.wte(idx)
        if self.config.stage == "llm":
            return x
        if encoded is None:
            encoded = self.encode_audio(mel, mel_lens, wmel, wmel_lens)
        tokens, valid = encoded
        if audio_mask is None:
            raise ValueError(f"salmonn: stage {self.config.stage!r} needs audio_mask, where the "
                             f"audio tokens go in the prompt (build_prompt, task_batch)")
        if not torch.equal(audio_mask.sum(1), valid.sum(1)):
            raise ValueError(f"audio_mask has {audio_mask.sum(1).tolist()} audio positions per "
                             f"row, the clips give {valid.sum(1).tolist()} audio tokens")
        return x.masked_scatter(audio_mask.unsqueeze(-1), tokens[valid].to(x.dtype))

    def forward(self, idx=None, targets=None, mel=None, mel_lens=None, audio_mask=None,
                ctc_targets=None, tags=None, wmel=None, wmel_lens=None, connect_targets=None):
        stage = self.config.stage
        # stage "whisper": the decoder reads the transcript so far and the speech encoder's frames
        if stage == "whisper":
            speech, enc_lens = self.speech_encode(mel, mel_lens, wmel, wmel_lens)
            logits = self.decoder(idx, speech, enc_lens)
            if targets is None:
                return logits[:, [-1]], None
            return logits, self.whisper_loss(logits, targets, speech, enc_lens, ctc_targets)
        if stage == "beats":  # tags from the time-averaged encoder output
            logits = self.tag_logits(mel, mel_lens)
            loss = (None if tags is None
                    else F.binary_cross_entropy_with_logits(logits, tags.float()))
            return logits, loss
        encoded = None  # (tokens, valid)
        if stage != "llm":
            encoded = self.encode_audio(mel, mel_lens, wmel, wmel_lens)
        x = self.embed(idx, audio_mask=audio_mask, encoded=encoded)
        h, _ = self.llm(x)
        if targets is None:
            return self.llm.lm_head(h[:, [-1]]), None
        logits = self.llm.lm_head(h)
        token_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=-1, reduction="none").view(targets.shape)
        # per example first: a one-word label weighs as much as a sentence (tasks share batches), a
        # copying conversation's answers as much as a row of text
        n = (targets >= 0).sum(1)
        per_example = token_loss.sum(1) / n.clamp(min=1)
        loss = per_example[n > 0].mean()
        if self.config.connect_ctc_weight > 0 and connect_targets is not None:
            tokens, valid = encoded
            ctc = self.connect_ctc_loss(tokens, valid, connect_targets)
            loss = loss + self.config.connect_ctc_weight * ctc
        return logits, loss

    def connect_ctc_loss(self, tokens, valid, targets):
        """CTC between the audio tokens, read as the LLM's tokens, and the rows' transcripts, with
        the dash as the blank. tokens (B, N, C); valid (B, N), each row's valid tokens a prefix;
        targets (B, L), padded with -1 (a row of only -1 is not a transcription example). The
        loss is per example, divided by its transcript's length, then averaged."""
        lens = (targets >= 0).sum(1)
        rows = lens > 0
        if not rows.any():
            return tokens.sum() * 0.0
        words = F.normalize(self.llm.wte.weight.float(), dim=-1)
        logits = CONNECT_CTC_SCALE * F.normalize(tokens[rows].float(), dim=-1) @ words.T
        loss = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets[rows].clamp(min=0),
                          valid[rows].sum(1), lens[rows], blank=self.config.dash_token,
                          reduction="none", zero_infinity=True)
        return (loss / lens[rows]).mean()

    def whisper_loss(self, logits, targets, speech, enc_lens, ctc_targets=None):
        """Stage "whisper": the text decoder's cross-entropy, mixed with CTC on the speech
        encoder's frames (weight ctc_weight) when the batch has CTC targets."""
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        if self.config.ctc_weight and ctc_targets is not None:
            # log-probs (T, B, blank + 1), the layout F.ctc_loss takes
            logp = self.ctc_head(speech).float().log_softmax(-1).transpose(0, 1)
            ctc = F.ctc_loss(logp, ctc_targets.clamp(min=0), enc_lens, (ctc_targets >= 0).sum(1),
                             blank=ctc_blank(self.config), zero_infinity=True)
            loss = (1 - self.config.ctc_weight) * loss + self.config.ctc_weight * ctc
        return loss

    def tag_logits(self, mel, mel_lens):
        a = self.beats(mel, mel_lens)
        enc_lens = (mel_lens + 1) // 2
        pooled = mask_frames(a, enc_lens).sum(1) / enc_lens[:, None].clamp(min=1)
        return self.tag_head(pooled)

    # decoding with a KV cache
    @torch.no_grad()
    def generate(self, x, max_new_tokens=200, eot=None, beam=4, temperature=0.0, top_k=0,
                 generator=None, length_penalty=0.0):
        """x: prompt embeddings (1, T, C). Greedy (beam=1, temperature=0), sampling (beam=1,
        temperature>0, optional top_k) or beam search (beam>1; see beam_search for length_penalty).
        Returns the new token ids (without the end token)."""
        max_new_tokens = min(max_new_tokens, self.llm.block_size - x.size(1))
        if max_new_tokens <= 0:
            return []
        h, past = self.llm(x)
        # raw logits first, then step's log-probs: the same argmax and the same softmax(x / T)
        logits = self.llm.lm_head(h[:, -1])

        def step(tokens, past):
            h, past = self.llm(self.llm.wte(tokens[:, None]), past)
            return self.llm.lm_head(h[:, -1]).float().log_softmax(-1), past

        if beam > 1:
            return beam_search(step, logits.float().log_softmax(-1), past, beam, max_new_tokens,
                               eot, length_penalty)
        out = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                tok = torch.multinomial(F.softmax(logits.float(), dim=-1), 1,
                                        generator=generator)[0, 0]
            else:
                tok = logits[0].argmax()
            if eot is not None and tok.item() == eot:
                break
            out.append(tok.item())
            if len(out) == max_new_tokens:
                break
            logits, past = step(tok.view(1), past)
        return out

# the names train.py, sample.py and eval.py use
Config = SALMONNConfig
Model = SALMONN

# -----------------------------------------------------------------------------
# loading the pretrained parts: GPT-2 (Hugging Face or ours), OpenAI Whisper and our encoders.
# train.py calls init_pretrained after load_data. pengi.py keeps copies of read_safetensors,
# load_torch_file and load_llm_state (tests/test_copies.py checks them): a change here must be
# made there too

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

def run_checkpoint(path):
    """A run's folder stands for the ckpt.pt in it (as llm_init and eval.py take one)."""
    inside = os.path.join(path, "ckpt.pt")
    return inside if os.path.isdir(path) and os.path.isfile(inside) else path

def checkpoint_kind(ck):
    """What a train.py checkpoint holds, for a message: "a salmonn checkpoint of stage 'llm'"."""
    stage = ck["model_args"].get("stage")
    return f"a {ck.get('model_name', 'train.py')} checkpoint" + (f" of stage {stage!r}" if stage
                                                                 else "")

def load_whisper_encoder_state(path):
    """The speech encoder's weights from (a) our stage-"whisper" ckpt.pt (keys "speech.<name>") or
    (b) an OpenAI Whisper checkpoint ({"dims": {...}, "model_state_dict": {...}}, e.g. tiny.pt /
    base.pt). Returns (state dict in SpeechEncoder's names, sizes dict with n_layer, n_head, n_embd,
    n_mels, features). An OpenAI encoder reads Whisper's own features (80 bins of 16 kHz audio at
    100 frames/s): speech_features="whisper"."""
    path = run_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"whisper_init={path}: no such file")
    ck = load_torch_file(path, "whisper_init")
    if "model" in ck and "model_args" in ck:  # (a) ours
        args = ck["model_args"]
        sd = {k[len("speech."):]: v for k, v in ck["model"].items() if k.startswith("speech.")}
        if not sd:
            raise ValueError(f"whisper_init={path}: {checkpoint_kind(ck)} without a speech "
                             f"encoder")
        try:  # speech_n_mels 0: the encoder read that run's data, n_mels bins
            return sd, dict(n_layer=args["speech_n_layer"], n_head=args["speech_n_head"],
                            n_embd=args["speech_n_embd"],
                            n_mels=args["speech_n_mels"] or args["n_mels"],
                            features=args.get("speech_features", "mel"))
        except KeyError as e:
            raise ValueError(f"whisper_init={path}: its model_args lack {e}") from None
    if "dims" not in ck or "model_state_dict" not in ck:
        raise ValueError(f"whisper_init={path}: neither our stage-'whisper' ckpt.pt nor an OpenAI "
                         f"Whisper checkpoint ('dims' and 'model_state_dict')")
    sd = {k[len("encoder."):]: v for k, v in ck["model_state_dict"].items()
          if k.startswith("encoder.")}
    sd.pop("positional_embedding", None)  # the same sinusoids, recomputed for any length
    d = ck["dims"]
    try:
        return sd, dict(n_layer=d["n_audio_layer"], n_head=d["n_audio_head"],
                        n_embd=d["n_audio_state"], n_mels=d["n_mels"], features="whisper")
    except (KeyError, TypeError) as e:
        raise ValueError(f"whisper_init={path}: its 'dims' lack {e}") from None

def load_beats_state(path):
    """The audio encoder's weights from our stage-"beats" ckpt.pt: (state dict in BEATsEncoder's
    names, sizes)."""
    path = run_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"beats_init={path}: no such file")
    ck = load_torch_file(path, "beats_init")
    if "model" not in ck or "model_args" not in ck:
        raise ValueError(f"beats_init={path}: not a train.py checkpoint (needs 'model' and "
                         f"'model_args')")
    args = ck["model_args"]
    sd = {k[len("beats."):]: v for k, v in ck["model"].items() if k.startswith("beats.")}
    if not sd:
        raise ValueError(f"beats_init={path}: {checkpoint_kind(ck)} without an audio encoder")
    try:
        return sd, dict(n_layer=args["beats_n_layer"], n_head=args["beats_n_head"],
                        n_embd=args["beats_n_embd"], patch_f=args["beats_patch_f"],
                        n_mels=args["n_mels"])
    except KeyError as e:
        raise ValueError(f"beats_init={path}: its model_args lack {e}") from None

def set_pretrained_dims(config):
    """load_data's step for the *_init files: their sizes replace the config's, before the model is
    built. A missing file is skipped here; init_pretrained, which training calls, reports it. (A
    checkpoint's config names no such file: init_pretrained clears the fields once loaded.)"""
    if config.llm_init and os.path.exists(config.llm_init) and config.stage not in ENCODER_STAGES:
        _, sizes = load_llm_state(config.llm_init)
        if sizes["vocab_size"] != config.vocab_size:
            raise ValueError(f"llm_init={config.llm_init}: vocab_size {sizes['vocab_size']} != the "
                             f"vocab_size {config.vocab_size} of tokenizer={config.tokenizer!r}")
        config.llm_n_layer, config.llm_n_head = sizes["n_layer"], sizes["n_head"]
        config.llm_n_embd, config.llm_block_size = sizes["n_embd"], sizes["block_size"]
    if config.whisper_init and os.path.exists(config.whisper_init) \
            and config.stage not in ("beats", "llm"):
        _, sizes = load_whisper_encoder_state(config.whisper_init)
        config.speech_n_layer, config.speech_n_head = sizes["n_layer"], sizes["n_head"]
        config.speech_n_embd, config.speech_n_mels = sizes["n_embd"], sizes["n_mels"]
        config.speech_features = sizes["features"]
    if config.beats_init and os.path.exists(config.beats_init) \
            and config.stage not in ("whisper", "llm"):
        _, sizes = load_beats_state(config.beats_init)
        config.beats_n_layer, config.beats_n_head = sizes["n_layer"], sizes["n_head"]
        config.beats_n_embd, config.beats_patch_f = sizes["n_embd"], sizes["patch_f"]

def init_pretrained(model, tok=None):
    """Loads the parts named by config.whisper_init / beats_init / llm_init into a freshly built
    model (train.py calls this). An LLM that audio training starts from must first pass the copy
    probe (llm_probe_min). The audio tokens' scale is set to the LLM's token embeddings'. Then
    the three fields are cleared: the model now holds the weights, so a checkpoint's config names
    no file for load_data to read again (train.py's saved settings keep the paths)."""
    config = model.config
    if config.stage == "pretrain":  # stage 1 (the later stages start from its checkpoint)
        empty = [f for f in ("whisper_init", "beats_init", "llm_init") if not getattr(config, f)]
        if empty:
            warnings.warn(f"salmonn: {', '.join(empty)} empty, so stage 1 trains on random "
                          f"frozen parts (unless init_from holds them) and teaches little; train "
                          f"the stand-ins (config/salmonn_whisper.py, salmonn_beats.py, "
                          f"salmonn_llm.py) or give real weights")
    for field, part, load in (("whisper_init", "speech", load_whisper_encoder_state),
                              ("beats_init", "beats", load_beats_state)):
        path = getattr(config, field)
        if path and hasattr(model, part):
            sd, sizes = load(path)
            # the encoder's input width is the data's, not a size the checkpoint can set
            if sizes["n_mels"] != getattr(model, part).n_mels:
                raise ValueError(f"{field}={path}: its {part} encoder reads {sizes['n_mels']} mel "
                                 f"bins, the model built for the data "
                                 f"{getattr(model, part).n_mels}")
            missing, unexpected = getattr(model, part).load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"{field}={path}: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")
            print(f"{field}: loaded the {part} encoder of {path}")
    loaded_llm = bool(config.llm_init and hasattr(model, "llm"))
    if loaded_llm:
        state, sizes = load_llm_state(config.llm_init)
        model.load_llm(state, config.llm_init)
        print(f"llm_init: loaded {config.llm_init} ({sizes['n_layer']} layers, {sizes['n_embd']} "
              f"wide)")
        if tok is not None and config.stage != "llm" and config.llm_probe_min > 0:
            acc = copy_probe(model, tok)
            print(f"copy probe: the LLM repeats {acc:.0%} of {PROBE_SPANS} unseen word spans "
                  f"between <Speech> tags")
            if acc < config.llm_probe_min:
                raise ValueError(f"llm_init={config.llm_init}: the LLM copies {acc:.0%} of the "
                                 f"probe's spans, below llm_probe_min={config.llm_probe_min}: it "
                                 f"cannot read its input (train it longer with "
                                 f"config/salmonn_llm.py, or set llm_probe_min=0)")
    if hasattr(model, "proj"):
        # the Q-Former's output is LayerNormed (RMS ~1 per element): scale the projection so that
        # the audio tokens start at the token embeddings' RMS, not at GPT-2's init's
        # 0.02 * sqrt(qformer_n_embd); with audio_norm, audio_scale keeps them there. (A model that
        # then takes a checkpoint's weights, init_from, gets both from there.)
        with torch.no_grad():
            tok_rms = model.llm.wte.weight.float().pow(2).mean().sqrt().item()
            nn.init.normal_(model.proj.weight, std=tok_rms / math.sqrt(model.proj.in_features))
            model.audio_scale.fill_(tok_rms)
        if loaded_llm:
            print(f"audio tokens scaled to the token embeddings' RMS {tok_rms:.3f} "
                  f"(position embeddings: "
                  f"{model.llm.wpe.weight.float().pow(2).mean().sqrt().item():.3f})")
    config.whisper_init = config.beats_init = config.llm_init = ""

# -----------------------------------------------------------------------------
# data: prompts and tasks

PROMPT_PREFIX = "USER: <Speech>"
PROMPT_SUFFIX = "</Speech> {instruction}\nASSISTANT:"

# paraphrased instructions per task (QA uses the question itself)
INSTRUCTIONS = {
    "transcription": ["Transcribe the audio.",
                      "Recognize the speech and give me the transcription.",
                      "Write down what is said in this recording.",
                      "What is the message in this audio? Write it out."],
    "captioning": ["Describe the audio in one sentence.",
                   "Please write a short caption for this audio.",
                   "What can you hear? Answer briefly.", "Generate an audio caption."],
    "music": ["Describe this music.", "What is being played in this music clip?",
              "Listen to the music and describe it.",
              "Describe the instrument and notes you hear."],
    "classification": ["What kind of sound is this?", "Classify the sound in this audio.",
                       "Which sound class does this audio belong to?",
                       "Name the type of sound you hear."],
    "speaker": ["Who is speaking?", "Which speaker is this?", "Name the speaker.",
                "Whose voice is this?"],
    "story": ["Tell me a story about this audio.", "Describe the audio in detail.",
              "Write a detailed story based on what you hear.",
              "Listen carefully and describe everything in detail."],
}

def transcript(clip):
    """The transcription target. Morse words are spelled out letter by letter ("k i t e"): the audio
    carries letters, each seen far more often than a word's token (docs/salmonn.md). WER on Morse
    is then a letter error rate."""
    text = clip.get("transcript")
    if text and clip.get("kind") == "morse":
        return " ".join(text.replace(" ", ""))
    return text

def task_entries(clip):
    """(task, instruction or None, answer) triples this clip offers; None: pick a paraphrase at
    random."""
    out = []
    if clip.get("transcript"):
        out.append(("transcription", None, transcript(clip)))
    if clip.get("caption"):
        out.append(("captioning", None, clip["caption"]))
        if clip.get("kind") == "music":
            out.append(("music", None, clip["caption"]))
    for qa in clip.get("qa") or []:
        out.append(("qa", qa["q"], qa["a"]))
    labels = clip.get("labels") or {}
    if labels.get("class"):
        out.append(("classification", None, labels["class"]))
    if labels.get("speaker") and clip.get("kind") == "speech":
        out.append(("speaker", None, labels["speaker"]))
    if clip.get("description"):
        out.append(("story", None, clip["description"]))
    return out

# stage "beats": label keys whose values are tags (free text such as a Morse word or DTMF digits is
# not a tag)
TAG_KEYS = ("class", "instrument", "event", "gender", "speaker", "form", "pitch", "chord", "count")
MIN_TAG_CLIPS = 3  # rarer tags are left out

def clip_tags(clip):
    return [f"{k}={v}" for k, v in (clip.get("labels") or {}).items() if k in TAG_KEYS]

def stage_tasks(config):
    if config.stage not in STAGES:  # (load_data asks before the model is built)
        raise ValueError(f"stage={config.stage!r}: must be one of {STAGES}")
    if (config.tasks or config.task_weights) and config.stage not in AUDIO_STAGES:
        raise ValueError(f"tasks / task_weights ({config.tasks!r} / {config.task_weights!r}) "
                         f"choose the mix of stages 1-3; stage {config.stage!r} has none")
    if config.tasks:
        tasks = tuple(t.strip() for t in config.tasks.split(",") if t.strip())
        bad = [t for t in tasks if t not in ALL_TASKS]
        if bad:
            raise ValueError(f"tasks={config.tasks!r}: unknown {bad}; known: {ALL_TASKS}")
        if not tasks or len(set(tasks)) < len(tasks):
            raise ValueError(f"tasks={config.tasks!r}: name each task of the mix once, "
                             f"comma-separated (known: {ALL_TASKS})")
        return tasks
    return STAGE_TASKS.get(config.stage, ())

def trained_tasks(config):
    """The tasks a checkpoint of stages 1-3 learned: its stage's mix (weights of 0 left out) and
    those of the stages before it, each of which starts from the one before (the init_from of
    config/salmonn_stage*.py; their default mixes assumed)."""
    earlier = AUDIO_STAGES[:AUDIO_STAGES.index(config.stage)]
    weights = parse_task_weights(config.task_weights, stage_tasks(config))
    return ({t for s in earlier for t in STAGE_TASKS[s]}
            | {t for t in stage_tasks(config) if weights.get(t, 1.0) > 0})

# Copied from pengi.parse_task_weights
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

def encode_text(tok, text):
    return tok.encode(text, allowed_special=set())

def build_prompt(tok, instruction, n_audio):
    """Token ids of the prompt with 0 at the audio positions, and the audio mask."""
    pre = encode_text(tok, PROMPT_PREFIX)
    post = encode_text(tok, PROMPT_SUFFIX.format(instruction=instruction))
    ids = pre + [0] * n_audio + post
    mask = [False] * len(pre) + [True] * n_audio + [False] * len(post)
    return ids, mask

# Stage "llm": generic reading-and-copying documents in the prompt's layout, text where the audio
# goes. Vicuna brings this ability to SALMONN; a small LLM trained on the corpus text alone never
# needs to copy, and the audio tokens then cannot reach its answers.
COPY_INSTRUCTIONS = {
    "repeat": ["Repeat the words between the tags.",
               "Say exactly what is written between the tags."],
    "reverse": ["Say the words between the tags in reverse order."],
    # and the transcription instructions: stage 1 then asks for what the LLM already does, each
    # word of the span once
    "once": (["Say each word between the tags once, in order, without the dashes."]
             + INSTRUCTIONS["transcription"]),
    "spell": ["Spell out the digits between the tags in words."],
}
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
PROBE_SPANS = 50

# Copied from pengi.normalize_text
def normalize_text(s):
    """Lower case, punctuation to spaces (keeping # for sharps and ' for contractions), single
    spaces."""
    return " ".join(re.sub(r"[^\w#' ]+", " ", s.lower()).split())

def text_words(text):
    """The words WER, accuracy and the copy probe compare: normalize_text, split."""
    return normalize_text(text).split()

def vocab_words(tok):
    """Whole words the tokenizer has as single tokens (" kite"): a word pool that is not the
    corpus's sentences."""
    words = []
    for i in range(min(tok.n_vocab, 60000)):
        try:
            w = tok.decode([i])
        except Exception:
            continue
        if re.fullmatch(r" [a-z]{3,12}", w):
            words.append(w[1:])
    return words

def span_prompt(tok, words, instruction):
    """The prompt's token ids with the words where the audio goes (encoded apart, as build_prompt
    does)."""
    return (encode_text(tok, PROMPT_PREFIX) + encode_text(tok, " " + " ".join(words))
            + encode_text(tok, PROMPT_SUFFIX.format(instruction=instruction)))

# answered by the voice, not by the words: left out of the reading documents
VOICE_QUESTIONS = ("is the speaker a man or a woman?",)

def reading_questions(clips):
    """Stage "llm": (transcript words, question, answer) of the clips' questions that their
    transcripts answer."""
    return [(transcript(c).split(), qa["q"], qa["a"]) for c in clips if c.get("transcript")
            for qa in c.get("qa") or [] if qa["q"] not in VOICE_QUESTIONS]

def audio_like_span(rng, words):
    """The words as a stretch of audio tokens shows them: each one to three times, with dashes
    around them standing for the tokens of silence."""
    shown = ["-"] * int(rng.integers(0, 3))
    for w in words:
        shown += [w] * int(rng.integers(1, 4)) + ["-"] * int(rng.integers(0, 3))
    return shown

def copy_document(tok, rng, words, reading=(), reading_share=0.0):
    """One document: (prompt ids with a span where the audio would be, answer ids). With reading
    (from reading_questions), a reading_share of documents ask a question about a transcript."""
    if reading_share > 0 and reading and rng.random() < reading_share:
        span, question, answer = reading[rng.integers(len(reading))]
        return (span_prompt(tok, audio_like_span(rng, span), question),
                encode_text(tok, " " + answer))
    kind = ("repeat", "reverse", "once", "spell")[rng.choice(4, p=[0.4, 0.15, 0.3, 0.15])]
    n = int(rng.integers(2, 9))
    if kind == "spell":
        digits = [int(d) for d in rng.integers(0, 10, size=n)]
        shown, answer = [str(d) for d in digits], [DIGIT_WORDS[d] for d in digits]
    else:
        span = []
        while len(span) < n:
            w = words[rng.integers(len(words))]
            if not span or w != span[-1]:
                span.append(w)
        answer = span[::-1] if kind == "reverse" else span
        # "once": each word repeated, between dashes, as a stretch of audio tokens covers a word
        shown = audio_like_span(rng, span) if kind == "once" else span
    instruction = COPY_INSTRUCTIONS[kind][rng.integers(len(COPY_INSTRUCTIONS[kind]))]
    return span_prompt(tok, shown, instruction), encode_text(tok, " " + " ".join(answer))

# pengi.py and whisper_gpt.py keep copies (tests/test_copies.py checks them): a change here must be
# made there too
def in_eval_mode(model, fn, *args):
    """fn(*args) with the model in eval mode (no dropout), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        return fn(*args)
    finally:
        model.train(was_training)

def greedy_text_answer(model, tok, ids, max_new_tokens=24):
    """The LLM's greedy continuation of a text-only prompt (token ids), decoded: the probes'
    answer."""
    x = model.llm.wte(torch.tensor([ids], device=next(model.llm.parameters()).device))
    return tok.decode(model.generate(x, max_new_tokens, tok.eot_token, beam=1))

@torch.no_grad()
def copy_probe(model, tok, n=PROBE_SPANS, seed=12345):
    """Text-only probe: the fraction of n unseen spans that the LLM repeats exactly (greedy) when
    asked to repeat the words between the <Speech> tags. A span is 3-6 of the tokenizer's whole
    words."""
    rng = np.random.default_rng(seed)
    words = vocab_words(tok)

    def hits():
        n_hits = 0
        for _ in range(n):
            span = [words[i]
                    for i in rng.choice(len(words), size=int(rng.integers(3, 7)), replace=False)]
            ids = span_prompt(tok, span, COPY_INSTRUCTIONS["repeat"][0])
            n_hits += text_words(greedy_text_answer(model, tok, ids)) == span
        return n_hits
    return in_eval_mode(model, hits) / n

@torch.no_grad()
def reading_probe(model, tok, reading, n=200, seed=12345):
    """Text-only probe: the fraction of the first n reading questions that the LLM answers exactly
    (greedy). reading: reading_questions' (transcript words, question, answer) triples; the
    transcript goes between the <Speech> tags in the audio tokens' form (audio_like_span)."""
    rng = np.random.default_rng(seed)

    def hits():
        n_hits = 0
        for words, question, answer in reading[:n]:
            ids = span_prompt(tok, audio_like_span(rng, words), question)
            n_hits += text_words(greedy_text_answer(model, tok, ids)) == text_words(answer)
        return n_hits
    return in_eval_mode(model, hits) / max(1, min(n, len(reading)))

# -----------------------------------------------------------------------------
# data: the prepared splits and each stage's batches

def read_split(data_dir, split, meta):
    """A prepared split's clips and its memmapped mel arrays: (clips, mel, wmel); wmel (Whisper's
    own features, prepare.py --whisper_mel) is None when the data has none."""
    clips_path = os.path.join(data_dir, f"{split}_clips.jsonl")
    if not os.path.exists(clips_path):
        raise FileNotFoundError(f"{clips_path}: not found")
    clips = [json.loads(line) for line in open(clips_path) if line.strip()]
    mel = np.memmap(os.path.join(data_dir, f"{split}_mel.bin"), dtype=np.float16,
                    mode="r").reshape(-1, meta["n_mels"])
    wmel = None
    if "whisper_mel" in meta:
        wmel = np.memmap(os.path.join(data_dir, f"{split}_wmel.bin"), dtype=np.float16, mode="r")
        wmel = wmel.reshape(-1, meta["whisper_mel"]["n_mels"])
    return clips, mel, wmel

class SALMONNData:
    """Memmapped mel arrays and clips of both splits, with the task entries (stage "llm": a text
    stream; stage "beats": tag_index, each tag's column). meta: the data's meta.json, which
    load_data read. splits[split] holds:
      clips: the clips' records; clip["src"] (0 if absent) indexes arrays
      arrays: [(mel, wmel)] per corpus (this one first, then asr_data_dir's)
      entries: {task: [(clip index, instruction or None, answer)]}
      stream: the text stream of token ids (stage "llm")
      reading: reading_questions of the split's clips (stage "llm")
      phonemes: {clip index: [phoneme]} of the speech clips (stage "whisper", ctc_units phonemes)"""

    def __init__(self, data_dir, config, tok, meta):
        self.meta, self.tok, self.config = meta, tok, config
        self.n_mels = self.meta["n_mels"]
        self.tasks = stage_tasks(config)
        self.task_weights = parse_task_weights(config.task_weights, self.tasks)
        self.splits = {}
        for split in ("train", "val"):
            clips, mel, wmel = read_split(data_dir, split, self.meta)
            entries = {t: [] for t in ALL_TASKS}
            for ci, clip in enumerate(clips):
                for task, instruction, answer in task_entries(clip):
                    entries[task].append((ci, instruction, answer))
            # arrays: the mel arrays of each corpus a clip may come from (clip["src"], 0 = this one)
            self.splits[split] = dict(clips=clips, arrays=[(mel, wmel)], entries=entries)
        if config.asr_data_dir:
            self.add_clips_of(config.asr_data_dir, config.asr_tasks)
        self.prompt_cache = {}
        if config.stage in ("pretrain", "instruct", "activation"):
            for split in self.splits:
                self.check_room(split)
        # a folder without labels gives every clip the class "sound" (one label, the same): such a
        # task teaches a constant answer, whatever the audio
        for t in self.tasks:
            answers = {a for _, _, a in self.splits["train"]["entries"][t]}
            if len(self.splits["train"]["entries"][t]) > 1 and len(answers) == 1:
                print(f"note: {data_dir} train: every {t} example has the same answer "
                      f"{answers.pop()!r}: the task teaches it whatever the audio")
        if config.stage == "whisper":  # whisper_batch cuts longer transcripts, eot after the cut
            n = config.whisper_text_ctx - 1
            for split, S in self.splits.items():
                cut = sum(len(encode_text(tok, " " + a)) > n
                          for _, _, a in S["entries"]["transcription"])
                if cut:
                    print(f"note: {split}: {cut} transcript(s) longer than whisper_text_ctx - 1 = "
                          f"{n} tokens are cut to it (the decoder learns them cut)")
        if config.stage == "whisper" and config.ctc_units == "phonemes":
            self.add_phonemes()
        if config.stage == "beats":
            # the train split's tags, fixed in the config (and so in every checkpoint)
            if not config.tags:
                counts = Counter(t for c in self.splits["train"]["clips"] for t in clip_tags(c))
                config.tags = "|".join(sorted(t for t, n in counts.items() if n >= MIN_TAG_CLIPS))
            if not config.tags:
                raise ValueError(f"{data_dir}: no labels with {MIN_TAG_CLIPS}+ train clips to tag "
                                 f"({TAG_KEYS})")
            self.tag_index = {t: i for i, t in enumerate(config.tags.split("|"))}
            # a folder without labels tags every clip "class=sound": a tag on every clip is a
            # constant target, whatever the audio
            train = self.splits["train"]["clips"]
            every = [t for t in self.tag_index if len(train) > 1
                     and all(t in clip_tags(c) for c in train)]
            if every:
                print(f"note: {data_dir} train: every clip has the tag(s) {', '.join(every)}: "
                      f"the tagger learns them whatever the audio")
        if config.stage == "llm":
            corpus_words = sorted({w for c in self.splits["train"]["clips"]
                                   for w in text_words(c.get("transcript") or "")})
            self.copy_words = vocab_words(tok) + corpus_words
            for split in ("train", "val"):
                self.splits[split]["stream"] = self.text_stream(self.splits[split]["clips"], split)
                # each split's own transcripts (questions about train ones flatter a val loss)
                self.splits[split]["reading"] = reading_questions(self.splits[split]["clips"])

    def check_room(self, split):
        """Stages 1-3: a clip whose audio tokens and an instruction fill llm_block_size is refused,
        named (it stopped the run with a traceback at whichever step drew it), and the answers
        task_example cuts whatever their clip (longer than the block less the prompt without audio
        or instruction) are counted in a note."""
        config, S = self.config, self.splits[split]
        worst = None  # (prompt positions, clip, instruction)
        for t in self.tasks:
            for ci, instruction, _ in S["entries"][t]:
                clip = S["clips"][ci]
                # the frames task_example's audio has (clip_mel crops the mel)
                frames = clip["wframes"] if config.speech_features == "whisper" else \
                    min(clip["frames"], config.max_audio_frames)
                for ins in [instruction] if instruction is not None else INSTRUCTIONS[t]:
                    n = len(self.prompt(ins, 0)[0]) + n_audio_tokens(frames, config)
                    if worst is None or n > worst[0]:
                        worst = (n, clip, ins)
        if worst and worst[0] >= config.llm_block_size + 1:
            n, clip, ins = worst
            raise ValueError(f"{split} clip {clip['id']} ({clip['frames'] / config.frame_rate:.1f} "
                             f"s) with the instruction {ins!r} makes a prompt of {n} positions, "
                             f"which leaves no room for an answer in llm_block_size="
                             f"{config.llm_block_size}: lower max_audio_frames (now "
                             f"{config.max_audio_frames}) or raise the block size")
        room = config.llm_block_size + 1 - len(self.prompt("", 0)[0])
        cut = sum(len(encode_text(self.tok, " " + a)) + 1 > room
                  for t in self.tasks for _, _, a in S["entries"][t])
        if cut:
            print(f"note: {split}: {cut} answer(s) longer than llm_block_size="
                  f"{config.llm_block_size} less the prompt ({room - 1} tokens) are cut (the model "
                  f"learns them cut)")

    def add_clips_of(self, data_dir, asr_tasks):
        """asr_data_dir: the train clips of another prepared corpus (same features) join the train
        split's entries of the tasks in asr_tasks that the stage trains; its other tasks and its val
        split are left out."""
        names = [t.strip() for t in asr_tasks.split(",") if t.strip()]
        if unknown := sorted(set(names) - set(ALL_TASKS)):
            raise ValueError(f"asr_tasks={asr_tasks!r}: unknown task(s) {unknown}; known: "
                             f"{ALL_TASKS}")
        names = [t for t in names if t in self.tasks]
        if not names:
            return
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"asr_data_dir: {meta_path}: not found (run prepare.py first)")
        meta = json.load(open(meta_path))
        for key in ("sample_rate", "frame_rate", "hop_length", "n_fft", "n_mels", "mel",
                    "whisper_mel"):
            if meta.get(key) != self.meta.get(key):
                raise ValueError(f"asr_data_dir: {data_dir} has {key}={meta.get(key)!r}, the data "
                                 f"{self.meta.get(key)!r}: the features must be the same")
        S = self.splits["train"]
        clips, mel, wmel = read_split(data_dir, "train", meta)
        S["arrays"].append((mel, wmel))
        joined = 0
        for clip in clips:
            entries = [e for e in task_entries(clip) if e[0] in names]
            for task, instruction, answer in entries:
                S["entries"][task].append((len(S["clips"]), instruction, answer))
            if entries:
                S["clips"].append({**clip, "src": len(S["arrays"]) - 1})
                joined += 1
        # said: the run's first line names only the main data_dir
        print(f"salmonn: {joined} train clips of {data_dir} join the {', '.join(names)} examples "
              f"(asr_data_dir)")

    def add_phonemes(self):
        """ctc_units="phonemes": S["phonemes"][clip index] is a speech clip's transcript in the
        phonemes its espeak-ng voice speaks it with ("en-us" for a speaker synth.py does not know,
        e.g. LibriSpeech's). When the config has no inventory yet, it takes the train split's."""
        import synth  # the library the corpus's speech was made with
        for S in self.splits.values():
            by_voice = {}
            for ci, _, answer in S["entries"]["transcription"]:
                clip = S["clips"][ci]
                if clip.get("kind") == "speech":
                    speaker = (clip.get("labels") or {}).get("speaker")
                    voice = synth.SPEAKERS[speaker][0] if speaker in synth.SPEAKERS else "en-us"
                    by_voice.setdefault(voice, []).append((ci, answer))
            S["phonemes"] = {}
            for voice, items in sorted(by_voice.items()):
                try:
                    spoken = synth.phonemes([answer for _, answer in items], voice)
                except synth.SpeechUnavailable as e:
                    raise ValueError(f"ctc_units='phonemes': {e}") from None
                S["phonemes"].update(zip([ci for ci, _ in items], spoken))
        if not self.config.ctc_phonemes:
            found = sorted({p for spoken in self.splits["train"]["phonemes"].values()
                            for p in spoken})
            if not found:
                raise ValueError("ctc_units='phonemes': the train split has no transcribed speech "
                                 "clips to take the phonemes from")
            self.config.ctc_phonemes = "|".join(found)

    def text_stream(self, clips, split):
        """Stage "llm": the corpus text (captions, descriptions, transcripts, QA) and the prompt
        template with the answers (audio left out), each document ended by eot, in a fixed shuffled
        order."""
        rng = np.random.default_rng(0 if split == "train" else 1)
        docs = []
        for clip in clips:
            for field in ("caption", "description", "transcript"):
                if clip.get(field):
                    docs.append(encode_text(self.tok, clip[field]))
            for qa in clip.get("qa") or []:
                docs.append(encode_text(self.tok, f"Q: {qa['q']} A: {qa['a']}"))
            for task, instruction, answer in task_entries(clip):
                if not instruction:
                    instruction = INSTRUCTIONS[task][rng.integers(len(INSTRUCTIONS[task]))]
                prompt = PROMPT_PREFIX + PROMPT_SUFFIX.format(instruction=instruction)
                docs.append(encode_text(self.tok, f"{prompt} {answer}"))
        ids = []
        for i in rng.permutation(len(docs)):
            ids.extend(docs[i])
            ids.append(self.tok.eot_token)
        return np.array(ids, dtype=np.int64)

    def prompt(self, instruction, n_audio):
        key = (instruction, n_audio)
        if key not in self.prompt_cache:
            self.prompt_cache[key] = build_prompt(self.tok, instruction, n_audio)
        return self.prompt_cache[key]

    def clip_mel(self, split, ci):
        clip = self.splits[split]["clips"][ci]
        n = min(clip["frames"], self.config.max_audio_frames)
        mel = self.splits[split]["arrays"][clip.get("src", 0)][0]
        mel = mel[clip["offset"]:clip["offset"] + n]
        return torch.from_numpy(mel.astype(np.float32))

    def clip_audio(self, split, ci):
        """What the encoders read of a clip: {"mel"} and, with speech_features="whisper",
        {"wmel"}."""
        audio = {"mel": self.clip_mel(split, ci)}
        if self.config.speech_features == "whisper":
            clip = self.splits[split]["clips"][ci]
            wmel = self.splits[split]["arrays"][clip.get("src", 0)][1]
            n = min(clip["wframes"], max_speech_frames(self.config))
            frames = wmel[clip["woffset"]:clip["woffset"] + n]
            audio["wmel"] = torch.from_numpy(frames.astype(np.float32))
        return audio

def load_data(data_dir, config, tok):
    """The data of data_dir as SALMONNData. Fills the config's data-given fields: here vocab_size,
    n_mels, frame_rate, speech_frame_rate, speech_n_mels and dash_token; set_pretrained_dims the
    sizes of the parts that *_init name; SALMONNData tags (stage "beats") and, through
    add_phonemes, ctc_phonemes."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{data_dir}/meta.json: not found (run prepare.py first)")
    meta = json.load(open(meta_path))
    # the text is stored as text: the config's tokenizer (tok) sets the vocab
    config.vocab_size = tok.n_vocab
    config.n_mels = meta["n_mels"]
    config.frame_rate = float(meta["frame_rate"])
    set_pretrained_dims(config)
    if config.speech_features == "whisper":
        if "whisper_mel" not in meta:
            raise ValueError(f"{data_dir}: speech_features='whisper' (an OpenAI Whisper encoder) "
                             f"needs Whisper's own features: prepare the data with prepare.py "
                             f"--whisper_mel")
        config.speech_frame_rate = float(meta["whisper_mel"]["frame_rate"])
        config.speech_n_mels = config.speech_n_mels or meta["whisper_mel"]["n_mels"]
    elif config.speech_features == "mel":
        config.speech_frame_rate = config.frame_rate
    else:
        raise ValueError(f"speech_features={config.speech_features!r}: must be 'mel' or 'whisper'")
    bins = meta["whisper_mel"]["n_mels"] if config.speech_features == "whisper" else config.n_mels
    if config.stage not in ("beats", "llm") and config.speech_n_mels not in (0, bins):
        source = (f"whisper_init={config.whisper_init}" if config.whisper_init
                  else f"speech_n_mels={config.speech_n_mels}")
        raise ValueError(f"{source}: the speech encoder reads {config.speech_n_mels} mel bins, "
                         f"{data_dir} has {bins}")
    config.dash_token = encode_text(tok, " -")[-1]  # connect_ctc's blank
    return SALMONNData(data_dir, config, tok, meta)

def pad_mels(mels, n_mels):
    mel = torch.zeros(len(mels), max(m.size(0) for m in mels), n_mels)
    for b, m in enumerate(mels):
        mel[b, :m.size(0)] = m
    return mel, torch.tensor([m.size(0) for m in mels])

def collate(audios):
    """A list of clip_audio dicts -> the batch's mel, mel_lens (and wmel, wmel_lens),
    zero-padded."""
    batch = {}
    for key in ("mel", "wmel"):
        if key in audios[0]:
            batch[key], batch[key + "_lens"] = pad_mels([a[key] for a in audios],
                                                        audios[0][key].size(1))
    return batch

def spec_augment(mel, lens, n_masks, rng, max_bins=8, max_frames=5):
    """SpecAugment (Park et al., 2019) in place: n_masks bands of up to max_bins mel bins and
    n_masks stretches of up to max_frames frames (67 ms at 75 frames/s) set to each clip's mean.
    The configs use none: a stretch can hide a whole Morse dot or gap, a band the tone, and Morse
    WER suffered (measured in docs/salmonn.md)."""
    for b in range(mel.size(0)):
        n = int(lens[b])
        fill = mel[b, :n].mean()
        for _ in range(n_masks):
            w = int(rng.integers(0, max_bins + 1))
            f0 = int(rng.integers(0, mel.size(2) - w + 1))
            mel[b, :n, f0:f0 + w] = fill
            w = int(rng.integers(0, min(max_frames, n) + 1))
            t0 = int(rng.integers(0, n - w + 1))
            mel[b, t0:t0 + w] = fill
    return mel

def copy_conversations(data, split, rng, T):
    """A row of stage "llm"'s copying conversations (with reading_share, questions about the
    split's transcripts among them): as many whole ones as fit in T + 1 tokens -> (ids,
    is_target), the answers and their eot the targets."""
    seq, is_target = [], []
    while True:
        prompt, answer = copy_document(data.tok, rng, data.copy_words,
                                       data.splits[split]["reading"], data.config.reading_share)
        if seq and len(seq) + len(prompt) + len(answer) + 1 > T + 1:
            break
        seq += prompt + answer + [data.tok.eot_token]
        is_target += [False] * len(prompt) + [True] * (len(answer) + 1)
    return seq[:T + 1], is_target[:T + 1]

def llm_batch(data, split, batch_size, rng):
    """Stage "llm": rows of corpus text, and rows of copying conversations (loss on the
    answers)."""
    config, stream = data.config, data.splits[split]["stream"]
    T = config.llm_block_size
    if len(stream) <= T + 1:
        raise ValueError(f"{split} text stream has {len(stream)} tokens; it needs more than "
                         f"llm_block_size+1={T + 1}")
    n_copy = round(config.copy_rows * batch_size)
    # a window and its targets, one token on; the last start, len(stream) - T - 1, is never drawn
    # (kept: a seed draws the windows it always drew)
    ix = rng.integers(0, len(stream) - T - 1, size=batch_size - n_copy)
    x = torch.zeros(batch_size, T, dtype=torch.long)
    y = torch.full((batch_size, T), -1, dtype=torch.long)
    if len(ix):
        x[:len(ix)] = torch.from_numpy(np.stack([stream[i:i + T] for i in ix]))
        y[:len(ix)] = torch.from_numpy(np.stack([stream[i + 1:i + 1 + T] for i in ix]))
    for b in range(len(ix), batch_size):
        seq, is_target = copy_conversations(data, split, rng, T)
        x[b, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[b, :len(seq) - 1] = torch.tensor([t if m else -1 for t, m in zip(seq[1:], is_target[1:])])
    return {"idx": x, "targets": y}

def beats_batch(data, split, batch_size, rng):
    """Stage "beats": clips and their tags (multi-hot over data.tag_index)."""
    S = data.splits[split]
    if not S["clips"]:
        raise ValueError(f"{split} split has no clips")
    cis = rng.integers(len(S["clips"]), size=batch_size)
    tags = torch.zeros(batch_size, len(data.tag_index))
    for b, ci in enumerate(cis):
        for t in clip_tags(S["clips"][ci]):
            if t in data.tag_index:
                tags[b, data.tag_index[t]] = 1.0
    mel, mel_lens = pad_mels([data.clip_mel(split, ci) for ci in cis], data.n_mels)
    return {"mel": mel, "mel_lens": mel_lens, "tags": tags}

def whisper_batch(data, split, batch_size, rng):
    """Stage "whisper": transcribed clips. Decoder: eot (as start) + transcript -> transcript +
    eot; CTC: the transcript, in tokens, characters or (speech) phonemes (ctc_units). Training
    clips are SpecAugmented when spec_augment > 0."""
    config, entries = data.config, data.splits[split]["entries"]["transcription"]
    if not entries:
        raise ValueError(f"{split} split has no clips with a transcript")
    picks = [entries[i] for i in rng.integers(len(entries), size=batch_size)]
    ids = [encode_text(data.tok, " " + answer)[:config.whisper_text_ctx - 1]
           for _, _, answer in picks]
    T = max(len(t) for t in ids) + 1
    idx = torch.zeros(batch_size, T, dtype=torch.long)
    targets = torch.full((batch_size, T), -1, dtype=torch.long)
    if config.ctc_units == "chars":
        ctc_ids = [ctc_encode(answer)[:2 * config.whisper_text_ctx] for _, _, answer in picks]
    elif config.ctc_units == "phonemes":
        # phoneme ids follow the tokens'; a phoneme the train split never had is left out
        inventory = {p: config.vocab_size + i
                     for i, p in enumerate(config.ctc_phonemes.split("|"))}
        spoken, n = data.splits[split]["phonemes"], 2 * config.whisper_text_ctx
        ctc_ids = []
        for (ci, _, _), t in zip(picks, ids):
            if ci in spoken:
                ctc_ids.append([inventory[p] for p in spoken[ci] if p in inventory][:n])
            else:  # Morse, DTMF: no phonemes, their tokens
                ctc_ids.append(t)
    else:
        ctc_ids = ids
    ctc = torch.full((batch_size, max(len(t) for t in ctc_ids)), -1, dtype=torch.long)
    for b, (t, c) in enumerate(zip(ids, ctc_ids)):
        idx[b, :len(t) + 1] = torch.tensor([data.tok.eot_token] + t)
        targets[b, :len(t) + 1] = torch.tensor(t + [data.tok.eot_token])
        ctc[b, :len(c)] = torch.tensor(c)
    batch = collate([data.clip_audio(split, ci) for ci, _, _ in picks])
    if split == "train" and config.spec_augment:
        key = "wmel" if config.speech_features == "whisper" else "mel"
        spec_augment(batch[key], batch[key + "_lens"], config.spec_augment, rng)
    return {"idx": idx, "targets": targets, "ctc_targets": ctc, **batch}

def task_example(data, split, tasks, rng):
    """One example of stages 1-3. It draws a task (uniformly, or as task_weights says), then a clip
    of that task, and an instruction: the clip's own question, else a paraphrase at random.
    Returns (prompt + answer ids, audio mask, prompt length, the clip's audio, the task)."""
    config, entries = data.config, data.splits[split]["entries"]
    if data.task_weights:
        p = np.array([data.task_weights.get(t, 1.0) for t in tasks])
        if p.sum() == 0:
            raise ValueError(f"task_weights={config.task_weights!r} leave the {split} split's "
                             f"tasks {tasks} no weight")
        task = tasks[rng.choice(len(tasks), p=p / p.sum())]
    else:
        task = tasks[rng.integers(len(tasks))]
    ci, instruction, answer = entries[task][rng.integers(len(entries[task]))]
    if instruction is None:
        instruction = INSTRUCTIONS[task][rng.integers(len(INSTRUCTIONS[task]))]
    audio = data.clip_audio(split, ci)
    ids, mask = data.prompt(instruction, n_audio_tokens(n_speech_frames(audio, config), config))
    ans = encode_text(data.tok, " " + answer) + [data.tok.eot_token]
    seq = (ids + ans)[:config.llm_block_size + 1]
    if len(seq) <= len(ids):
        raise ValueError(f"prompt of {len(ids)} positions leaves no room for an answer in "
                         f"llm_block_size={config.llm_block_size}: lower max_audio_frames or "
                         f"raise the block size")
    return seq, mask, len(ids), audio, task

def task_batch(data, split, batch_size, rng):
    """Stages 1-3: prompts with the clips' audio slots, and answers (the loss on these only)."""
    tasks = [t for t in data.tasks if data.splits[split]["entries"][t]]
    if not tasks:
        raise ValueError(f"{split} split has no clips for the tasks {data.tasks}")
    rows = [task_example(data, split, tasks, rng) for _ in range(batch_size)]
    T = max(len(seq) for seq, _, _, _, _ in rows) - 1
    idx = torch.zeros(batch_size, T, dtype=torch.long)
    targets = torch.full((batch_size, T), -1, dtype=torch.long)
    audio_mask = torch.zeros(batch_size, T, dtype=torch.bool)
    for b, (seq, mask, n_prompt, _, _) in enumerate(rows):
        s = torch.tensor(seq)
        idx[b, :len(seq) - 1] = s[:-1]
        targets[b, n_prompt - 1:len(seq) - 1] = s[n_prompt:]  # the answer (and its eot) only
        audio_mask[b, :len(mask)] = torch.tensor(mask)
    batch = {"idx": idx, "targets": targets, "audio_mask": audio_mask,
             **collate([audio for _, _, _, audio, _ in rows])}
    if data.config.connect_ctc_weight > 0:
        # the transcripts, without their eot, for connect_ctc_loss: only those not cut by the
        # LLM's block (their eot is there) and without the dash, which is that CTC's blank
        answers = [seq[n_prompt:-1] if task == "transcription" and seq[-1] == data.tok.eot_token
                   and data.config.dash_token not in seq[n_prompt:-1] else []
                   for seq, _, n_prompt, _, task in rows]
        batch["connect_targets"] = torch.full((batch_size, max(map(len, answers)) or 1), -1,
                                              dtype=torch.long)
        for b, ans in enumerate(answers):
            batch["connect_targets"][b, :len(ans)] = torch.tensor(ans, dtype=torch.long)
    return batch

def get_batch(data, split, batch_size, rng):
    """A training batch of the config's stage from the split, drawn with rng (a numpy
    Generator)."""
    stage = data.config.stage
    if stage == "llm":
        return llm_batch(data, split, batch_size, rng)
    if stage == "beats":
        return beats_batch(data, split, batch_size, rng)
    if stage == "whisper":
        return whisper_batch(data, split, batch_size, rng)
    return task_batch(data, split, batch_size, rng)

# -----------------------------------------------------------------------------
# sampling and evaluation

def clip_tag_logits(model, mels, n_mels):
    """Stage "beats": the tag logits of a list of (frames, n_mels) mels, padded into one batch on
    the model's device; (clips, tags) on the host."""
    device = next(model.parameters()).device
    mel, lens = pad_mels(mels, n_mels)
    return model.tag_logits(mel.to(device), lens.to(device)).float().cpu()

def ctc_text(ids, config, tok):
    """CTC's output ids (blanks and repeats gone) as text: tokens decoded, characters joined;
    phonemes as espeak-ng writes them with a separator, "_" between the phonemes of a word
    ("D_@2 r_E_d"), so that they can be told apart again."""
    if config.ctc_units == "chars":
        return "".join(CTC_CHARS[i] for i in ids).strip()
    if config.ctc_units == "tokens":
        return tok.decode(ids).strip()
    phonemes = config.ctc_phonemes.split("|")
    parts = []
    for is_phoneme, run in itertools.groupby(ids, key=lambda i: i >= config.vocab_size):
        run = list(run)
        parts.append(phoneme_text([phonemes[i - config.vocab_size] for i in run]) if is_phoneme
                     else tok.decode(run))
    return " ".join(p.strip() for p in parts if p.strip())

def phoneme_text(phonemes):
    """["D", "@2", " ", "r", "E", "d"] -> "D_@2 r_E_d" (what ctc_text shows; " " between words)."""
    return " ".join("_".join(word) for is_space, word
                    in itertools.groupby(phonemes, lambda p: p == " ") if not is_space)

@torch.no_grad()
def whisper_transcribe(model, tok, audios, batch_size=32):
    """Stage "whisper": greedy transcripts from the text decoder, and from the CTC head (best path,
    repeats merged, blanks dropped), for a list of clip_audio dicts."""
    device = next(model.parameters()).device
    dec_out, ctc_out = [], []
    # a progress bar only when it takes a while
    for i in tqdm(range(0, len(audios), batch_size), desc="salmonn: transcribe", unit="batch",
                  leave=False, disable=len(audios) <= 4 * batch_size):
        batch = {k: v.to(device) for k, v in collate(audios[i:i + batch_size]).items()}
        speech, enc_lens = model.speech_encode(**batch)
        B = speech.size(0)
        seq = torch.full((B, 1), tok.eot_token, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(model.config.whisper_text_ctx - 1):
            nxt = model.decoder(seq, speech, enc_lens)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.eot_token), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == tok.eot_token
            if done.all():
                break
        for row in seq[:, 1:].tolist():
            row = row[:row.index(tok.eot_token)] if tok.eot_token in row else row
            dec_out.append(tok.decode(row).strip())
        best = model.ctc_head(speech).argmax(-1)
        blank = ctc_blank(model.config)
        for b in range(B):
            path = best[b, :enc_lens[b]].tolist()
            ids = [t for j, t in enumerate(path) if t != blank and (j == 0 or t != path[j - 1])]
            ctc_out.append(ctc_text(ids, model.config, tok))
    return dec_out, ctc_out

SAMPLE_OPTS = {"beam": 4, "temperature": 0.0, "top_k": 0, "max_new_tokens": 200,
               "lora_scale": None, "seed": None, "length_penalty": 0.0}

@torch.no_grad()
def sample(model, tok, audio, prompt, tools=None, **opts):
    """The model's answer to an instruction about a clip, as {"text", "prompt"}.

    audio: {"mel": (T, n_mels), ...}. prompt: the instruction (None: the captioning instruction).
    tools: sample.py's shared interface (whisper_gpt decodes codes with it), unused here.
    Options:
      beam            4; 1 = greedy or sampling
      length_penalty  0 ranks beams by log-prob; 1.0 by log-prob / length (Hugging Face
                      generate's default, which makes our small models loop to max_new_tokens)
      temperature     0 = greedy; > 0 samples, which needs beam=1
      top_k           sampling from the k likeliest tokens (0: all), with beam=1
      max_new_tokens (200), seed
      lora_scale      the paper lowers it from 4.0 to 2.0 to bring back emergent abilities
    The encoders' stages answer without the LLM: "whisper" with its text decoder's (greedy) and
    CTC head's transcripts, "beats" with the 5 most likely tags; they take no prompt and none of
    the options above. Runs in eval mode without gradients, then restores the model's mode."""
    unknown = sorted(set(opts) - set(SAMPLE_OPTS))
    if unknown:
        raise ValueError(f"salmonn sample: unknown options {unknown}; known: {sorted(SAMPLE_OPTS)}")
    given = sorted(k for k, v in opts.items() if v is not None)
    stage = model.config.stage
    if stage in ENCODER_STAGES and given:  # they would be ignored, as a prompt would (refused too)
        does = "transcribes the audio greedily" if stage == "whisper" else "tags the audio"
        raise ValueError(f"salmonn sample: a stage-{stage!r} checkpoint takes no decoding options "
                         f"({', '.join(given)} given; it {does})")
    o = {**SAMPLE_OPTS, **{k: v for k, v in opts.items() if v is not None}}
    if stage == "llm" and o["lora_scale"] is not None:  # it would be ignored
        raise ValueError(f"salmonn sample: lora_scale={o['lora_scale']}: a stage-'llm' checkpoint "
                         f"has no LoRA (the LLM alone, trained whole)")
    beam, temperature = int(o["beam"]), float(o["temperature"])
    for key, least in (("beam", 1), ("temperature", 0), ("top_k", 0), ("max_new_tokens", 1)):
        if o[key] < least:
            raise ValueError(f"salmonn sample: {key}={o[key]}: must be at least {least}")
    check_decoding(o)
    check_lora_scale("salmonn sample", o["lora_scale"])
    return in_eval_mode(model, _sample, model, tok, audio, prompt, o, beam, temperature)

def check_decoding(o):
    """Sampling (temperature, top_k) needs beam=1: beam search would ignore them; top_k needs a
    temperature above 0: greedy decoding would ignore it."""
    beam = int(o["beam"])
    if float(o["temperature"]) > 0 and beam > 1:
        raise ValueError(f"temperature={o['temperature']} samples, which needs beam=1 (beam={beam} "
                         f"given)")
    if o["top_k"] > 0 and beam > 1:
        raise ValueError(f"top_k={o['top_k']} limits sampling, which needs beam=1 (beam={beam} "
                         f"given)")
    if o["top_k"] > 0 and float(o["temperature"]) == 0:  # greedy decoding would ignore it
        raise ValueError(f"top_k={o['top_k']} limits sampling, which needs a temperature above 0 "
                         f"(temperature=0 decodes greedily)")

def check_lora_scale(where, scale):
    """The LoRA scale an answer is decoded with: None (the model's), or a finite number >= 0."""
    if scale is not None and not 0 <= float(scale) < math.inf:
        raise ValueError(f"{where}: lora_scale={scale}: must be a finite number, at least 0 (0 "
                         f"is the LLM without LoRA; the paper lowers 4 to 2 to bring back the "
                         f"abilities task over-fitting hides)")

def say_audio_cut(model, audio):
    """sample.py printed the whole input's length: say when the model hears only its start (the
    speech encoder reads max_audio_frames' duration; stage "beats" tags the whole clip), as
    pengi.sample does."""
    c = model.config
    if c.stage not in ("llm", "beats") and n_speech_frames(audio, c) > max_speech_frames(c):
        heard = c.max_audio_frames / c.frame_rate
        given = n_speech_frames(audio, c) / c.speech_frame_rate
        print(f"salmonn.sample: the model hears the first {heard:.2f} s of the input's {given:.2f} "
              f"s (max_audio_frames={c.max_audio_frames})")

def encoder_stage_answer(model, tok, feats, prompt):
    """What the encoders' stand-ins were trained to output: stage "whisper" its text decoder's and
    CTC head's transcripts, stage "beats" the 5 most likely tags."""
    stage = model.config.stage
    if prompt:
        raise ValueError(f"salmonn sample: a stage-{stage!r} checkpoint takes no prompt (it "
                         f"{'transcribes' if stage == 'whisper' else 'tags'} the audio)")
    if stage == "whisper":
        say_audio_cut(model, feats)
        dec, ctc = whisper_transcribe(model, tok, [feats])
        return {"text": f"{dec[0]}\n(CTC head: {ctc[0]})"}
    probs = torch.sigmoid(clip_tag_logits(model, [feats["mel"]], model.config.n_mels)[0])
    tags = model.config.tags.split("|")
    top = probs.topk(min(5, len(tags)))
    return {"text": "tags: " + ", ".join(f"{tags[i]} ({p:.2f})" for p, i
                                        in zip(top.values.tolist(), top.indices.tolist()))}

def check_answer_room(model, x, mask, max_new_tokens):
    """A ValueError when the prompt x (1, T, C), with its audio positions (mask; None in stage
    "llm"), leaves the answer fewer than min(max_new_tokens, 16) positions of the LLM's context:
    it names what to shorten, and how much audio would fit."""
    room, least = model.llm.block_size - x.size(1), min(max_new_tokens, 16)
    if room >= least:
        return
    if mask is None:
        raise ValueError(f"salmonn sample: the prompt takes {x.size(1)} of the LLM's "
                         f"{model.llm.block_size} positions, leaving {max(room, 0)} for the "
                         f"answer: give a shorter prompt")
    n_audio = sum(mask)
    if room + n_audio < least:  # the prompt alone is too long
        raise ValueError(f"salmonn sample: the prompt takes {x.size(1) - n_audio} of the "
                         f"LLM's {model.llm.block_size} positions without the audio, leaving "
                         f"{max(room + n_audio, 0)} for audio and answer: give a shorter "
                         f"prompt")
    # the longest clip that would fit: whole windows of speech frames, rounded down (a length
    # printed rounded up would not fit)
    fits = math.floor(seconds_of_tokens(room + n_audio - least, model.config) * 100) / 100
    raise ValueError(f"salmonn sample: the prompt and the audio take {x.size(1)} of the LLM's "
                     f"{model.llm.block_size} positions, leaving {max(room, 0)} for the "
                     f"answer: give a shorter clip or prompt (the audio takes {n_audio} of "
                     f"them; with this prompt, up to {fits:.2f} s of audio fits)")

def _sample(model, tok, audio, prompt, o, beam, temperature):
    device = next(model.parameters()).device
    stage = model.config.stage
    if (stage not in ("llm", "beats") and model.config.speech_features == "whisper"
            and "wmel" not in audio):
        raise ValueError("speech_features='whisper': audio needs 'wmel', Whisper's features "
                         "(audio.whisper_log_mel)")
    feats = {k: v.float() for k, v in audio.items() if k in ("mel", "wmel")}
    if stage in ENCODER_STAGES:
        return encoder_stage_answer(model, tok, feats, prompt)
    instruction = prompt if prompt else INSTRUCTIONS["captioning"][0]
    if stage == "llm":  # text only: continue the prompt template
        ids = encode_text(tok, f"{PROMPT_PREFIX}{PROMPT_SUFFIX.format(instruction=instruction)}")
        x, mask = model.llm.wte(torch.tensor([ids], device=device)), None
    else:
        ids, mask = build_prompt(tok, instruction,
                                 n_audio_tokens(n_speech_frames(audio, model.config), model.config))
        batch = {k: v.to(device) for k, v in collate([feats]).items()}
        x = model.embed(torch.tensor([ids], device=device),
                        audio_mask=torch.tensor([mask], device=device), **batch)
    check_answer_room(model, x, mask, int(o["max_new_tokens"]))  # not even a short answer fits?
    say_audio_cut(model, audio)  # (after the checks: a clip refused gets its reason alone)
    # an instruction not trained on (a question is QA's) is answered less reliably: said
    # (after the checks: a prompt refused gets its reason alone)
    task = next((t for t, v in INSTRUCTIONS.items() if prompt in v), None)
    task = task or ("qa" if prompt and prompt.rstrip().endswith("?") else None)
    shown = prompt if not prompt or len(prompt) <= 80 else prompt[:77] + "..."
    if prompt and stage != "llm" and task is None:
        print(f"salmonn.sample: {shown!r} is not one of the trained instructions (e.g. "
              f"{INSTRUCTIONS['transcription'][0]!r}, {INSTRUCTIONS['captioning'][0]!r}; all in "
              f"salmonn.INSTRUCTIONS, docs/salmonn.md): the answer may be off")
    elif prompt and stage in AUDIO_STAGES and task not in trained_tasks(model.config):
        # e.g. a question to stage 1, which learned transcription and captioning alone
        learned = ", ".join(sorted(trained_tasks(model.config)))
        print(f"salmonn.sample: {shown!r} asks for the {task!r} task, which a stage-{stage!r} "
              f"checkpoint was not trained on (its tasks: {learned}): the answer may be off")
    generator = None
    if o["seed"] is not None:
        generator = torch.Generator(device=device).manual_seed(int(o["seed"]))
    old_scale = model.lora_scale
    if o["lora_scale"] is not None:
        model.lora_scale = float(o["lora_scale"])
    try:
        out = model.generate(x, int(o["max_new_tokens"]), tok.eot_token, beam, temperature,
                             int(o["top_k"]), generator, float(o["length_penalty"]))
    finally:
        model.lora_scale = old_scale
    answer = tok.decode(out).strip()
    if stage == "llm":  # say so: sample.py has just named the clip
        answer = f"(stage 'llm': the LLM alone, the audio is not heard)\n{answer}"
    return {"text": answer, "prompt": instruction}

def edit_distance(ref, hyp):
    """Levenshtein distance between two word lists (substitutions, deletions, insertions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]

def word_error_rate(refs, hyps):
    """Corpus WER: total word edits / total reference words (after lower-casing and dropping
    punctuation)."""
    edits = sum(edit_distance(text_words(r), text_words(h)) for r, h in zip(refs, hyps))
    return edits / max(1, sum(len(text_words(r)) for r in refs))

def phoneme_error_rate(refs, hyps):
    """As word_error_rate, over the phonemes of phoneme_text strings (case and marks kept: "D" and
    "d" are two phonemes; word boundaries not counted)."""
    split = lambda text: re.split(r"[ _]+", text.strip()) if text.strip() else []
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps))
    return edits / max(1, sum(len(split(r)) for r in refs))

# Copied from pengi.bleu4
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

def accuracy(refs, hyps):
    """Exact match after lower-casing and dropping punctuation."""
    return sum(text_words(r) == text_words(h) for r, h in zip(refs, hyps)) / max(1, len(refs))

def best_constant_wer(refs, candidates):
    """The WER of the best single answer given to every clip, over the candidates (e.g. every
    training answer and word): what a model that ignores the audio can reach."""
    refs = [text_words(r) for r in refs]
    total = max(1, sum(len(r) for r in refs))
    return min(sum(edit_distance(r, text_words(c)) for r in refs) / total for c in set(candidates))

def average_precision(scores, labels):
    """AP of one tag: the mean over its positives of the precision at each positive's rank."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    if hits.sum() == 0:
        return None
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())

def first_n(xs, n):
    """The first n of xs (n = 0: all of them)."""
    return xs[:n] if n else xs

def text_perplexity(model, stream, max_windows):
    """Stage "llm": perplexity over the stream's successive llm_block_size windows (max_windows >
    0: the first max_windows)."""
    T, device = model.config.llm_block_size, next(model.parameters()).device
    if len(stream) <= T:  # a window and its targets, one token on
        raise ValueError(f"salmonn: the text stream has {len(stream)} tokens; perplexity needs "
                         f"more than llm_block_size={T}")
    losses = []
    for i in first_n(range(0, len(stream) - T, T), max_windows):
        x = torch.from_numpy(stream[i:i + T][None]).to(device)
        y = torch.from_numpy(stream[i + 1:i + 1 + T][None]).to(device)
        losses.append(model(x, y)[1].item())
    return float(math.exp(np.mean(losses)))

def tagging_metrics(model, data, split, max_clips):
    """Stage "beats": the tags' mean average precision, and the accuracy of the top-scored class
    tag on the clips that have one (tag_cls_acc; stages 1-3's cls_acc is the LLM's answers')."""
    S = data.splits[split]
    clips = first_n(list(range(len(S["clips"]))), max_clips)
    logits = torch.cat([clip_tag_logits(model, [data.clip_mel(split, ci) for ci in clips[i:i + 32]],
                                        data.n_mels)
                        for i in range(0, len(clips), 32)]).numpy()
    labels = np.zeros_like(logits)
    for r, ci in enumerate(clips):
        for t in clip_tags(S["clips"][ci]):
            if t in data.tag_index:
                labels[r, data.tag_index[t]] = 1
    aps = [ap for j in range(labels.shape[1])
           if (ap := average_precision(logits[:, j], labels[:, j])) is not None]
    cls = [j for t, j in data.tag_index.items() if t.startswith("class=")]
    has_cls = labels[:, cls].sum(1) > 0
    cls_acc = None  # no class tags in the data, or no evaluated clip with one
    if has_cls.any():
        top_cls = np.array(cls)[logits[:, cls].argmax(1)]
        cls_acc = float((labels[np.arange(len(clips)), top_cls][has_cls]).mean())
    return {"tag_map": float(np.mean(aps)), "tag_cls_acc": cls_acc, "n_clips": len(clips)}

def audio_token_rms(model, data, split):
    """The audio tokens' RMS (per element) on the split's first 32 clips, next to the LLM's token
    and position embeddings' (the scale the LLM was trained on)."""
    rms = lambda t: float(t.detach().float().pow(2).mean().sqrt())
    device = next(model.parameters()).device
    clips = [data.clip_audio(split, ci) for ci in range(min(32, len(data.splits[split]["clips"])))]
    batch = {k: v.to(device) for k, v in collate(clips).items()}
    tokens, valid = model.encode_audio(**batch)
    return dict(audio_rms=rms(tokens[valid]), token_rms=rms(model.llm.wte.weight),
                pos_rms=rms(model.llm.wpe.weight))

def task_answers(model, tok, data, split, task, entries, o):
    """The model's answers to a task's entries (each clip's own question, else the task's first
    instruction) -> (answers, None); stage "whisper": (decoder transcripts, CTC transcripts)."""
    if model.config.stage == "whisper":
        return whisper_transcribe(model, tok, [data.clip_audio(split, ci) for ci, _, _ in entries])
    # sample's options, as evaluate was given them (EVAL_OPTS holds every one of SAMPLE_OPTS)
    sample_opts = {k: o[k] for k in SAMPLE_OPTS}
    hyps = [sample(model, tok, data.clip_audio(split, ci), instruction or INSTRUCTIONS[task][0],
                   tools=None, **sample_opts)["text"]
            for ci, instruction, _ in tqdm(entries, desc=f"salmonn: {task}", unit="example",
                                           leave=False, disable=len(entries) < 50)]
    return hyps, None

def transcription_metrics(refs, hyps, ctc_hyps, kinds, train_split, ctc_phoneme_refs=None):
    """WER overall and per kind of clip (speech, morse, dtmf). Next to each kind's WER: that of the
    best constant answer among the first 200 of this corpus's training answers of the kind, the
    first 200 evaluated references of the kind, and every word of all the kind's training answers
    and evaluated references.
    With ctc_hyps (stage "whisper"): CTC's WER per kind too. For speech whose CTC spells phonemes
    (ctc_phoneme_refs: the rows' phoneme_text), its phoneme error rate instead, ctc_per_speech."""
    results = {"wer": word_error_rate(refs, hyps)}
    for kind in sorted(set(kinds)):
        of_kind = lambda xs: [x for x, k in zip(xs, kinds) if k == kind]
        r, h = of_kind(refs), of_kind(hyps)
        clips = train_split["clips"]
        cands = [a for ci, _, a in train_split["entries"]["transcription"]  # this corpus's (src 0)
                 if clips[ci].get("kind") == kind and not clips[ci].get("src")]
        cands = cands[:200] + r[:200] + [w for a in cands + r for w in text_words(a)]
        results[f"wer_{kind}"] = word_error_rate(r, h)
        results[f"n_{kind}"] = len(r)
        results[f"const_wer_{kind}"] = best_constant_wer(r, cands)
        if ctc_hyps is not None and kind == "speech" and ctc_phoneme_refs is not None:
            results["ctc_per_speech"] = phoneme_error_rate(of_kind(ctc_phoneme_refs),
                                                           of_kind(ctc_hyps))
        elif ctc_hyps is not None:
            results[f"ctc_wer_{kind}"] = word_error_rate(r, of_kind(ctc_hyps))
    return results

def answer_metrics(task, entries, refs, hyps, kinds=None):
    """The other tasks' metrics. BLEU-4 for captioning, music and story (story: also the answers'
    mean length in words). Exact-match accuracy for classification, speaker and qa; for qa also
    qa_acc_{kind} per kind of clip (kinds: each entry's), and gender_acc on the questions about
    the speaker's sex."""
    if task == "captioning":
        return {"bleu4": bleu4(hyps, [[r] for r in refs])}
    if task == "music":
        return {"music_bleu4": bleu4(hyps, [[r] for r in refs])}
    if task == "qa":
        results = {"qa_acc": accuracy(refs, hyps)}
        for kind in sorted({k for k in kinds or [] if k}):  # which kinds of sound are answered
            of_kind = [i for i, k in enumerate(kinds) if k == kind]
            results[f"qa_acc_{kind}"] = accuracy([refs[i] for i in of_kind],
                                                 [hyps[i] for i in of_kind])
        gender = [i for i, (_, q, _) in enumerate(entries) if q in VOICE_QUESTIONS]
        if gender:
            results["gender_acc"] = accuracy([refs[i] for i in gender],
                                             [hyps[i] for i in gender])
        return results
    if task == "classification":
        return {"cls_acc": accuracy(refs, hyps)}
    if task == "speaker":
        return {"speaker_acc": accuracy(refs, hyps)}
    if task == "story":
        return {"story_bleu4": bleu4(hyps, [[r] for r in refs]),
                "story_words": float(np.mean([len(text_words(h)) for h in hyps]))}
    return {}

EVAL_OPTS = {"beam": 4, "max_new_tokens": 200, "lora_scale": None, "max_clips": 0,
             "temperature": 0.0, "top_k": 0, "seed": None, "length_penalty": 0.0}

@torch.no_grad()
def evaluate(model, data, tok, split="val", **opts):
    """Paper-style metrics on the split, each task asked with its first instruction paraphrase
    (QA: the clip's own question). max_clips > 0 evaluates the first max_clips entries of each
    task. Runs in eval mode without gradients, then restores the model's mode.
    Stages 1-3: transcription's WER per kind (speech, morse, dtmf) next to the best constant
    answer's (transcription_metrics); bleu4 (captioning), music_bleu4, qa_acc (with qa_acc_{kind}
    and gender_acc), cls_acc, speaker_acc, story_bleu4 and story_words (the story answers' mean
    length, the sign of activation); n_<task>: how many examples each figure rests on.
    Stage "llm": text perplexity (max_clips: the first max_clips text windows), the copy probe and
    the reading probe (the split's questions about its transcripts).
    Stage "whisper": WER per kind from the decoder and from CTC.
    Stage "beats": tagging mAP and class accuracy."""
    o = eval_options(opts)
    return in_eval_mode(model, _evaluate, model, data, tok, split, o)

def eval_options(opts):
    """evaluate()'s options over their defaults, each checked: eval.py checks them too, before any
    data loads."""
    unknown = sorted(set(opts) - set(EVAL_OPTS))
    if unknown:
        raise ValueError(f"salmonn evaluate: unknown options {unknown}; known: {sorted(EVAL_OPTS)}")
    o = {**EVAL_OPTS, **{k: v for k, v in opts.items() if v is not None}}
    for key, least in (("max_clips", 0), ("beam", 1), ("temperature", 0), ("top_k", 0),
                       ("max_new_tokens", 1)):
        if o[key] < least:
            raise ValueError(f"salmonn evaluate: {key}={o[key]}: must be at least {least}")
    check_decoding(o)
    check_lora_scale("salmonn evaluate", o["lora_scale"])
    # its default None lets any number through eval.py's typing: 1.5 would be seeded as 1, and
    # int() of 1e999 (inf) or a seed past torch's range fails with a traceback
    if o["seed"] is not None and not (float(o["seed"]).is_integer()
                                      and -2**63 <= int(o["seed"]) < 2**64):
        raise ValueError(f"salmonn evaluate: seed={o['seed']}: must be a whole number from -2**63 "
                         f"to 2**64 - 1 (a torch generator's seed)")
    return o

def _evaluate(model, data, tok, split, o):
    S, stage = data.splits[split], model.config.stage
    if stage == "llm":
        return {"text_ppl": text_perplexity(model, S["stream"], o["max_clips"]),
                "copy_acc": copy_probe(model, tok),
                "reading_acc": reading_probe(model, tok, S["reading"])}
    if stage == "beats":
        return tagging_metrics(model, data, split, o["max_clips"])
    results = {}
    if stage not in ENCODER_STAGES:  # the audio tokens' scale next to what the LLM was trained on
        results.update(audio_token_rms(model, data, split))
    for task in ALL_TASKS:
        entries = first_n(S["entries"][task], o["max_clips"])
        if not entries or (stage == "whisper" and task != "transcription"):
            continue
        refs = [answer for _, _, answer in entries]
        hyps, ctc_hyps = task_answers(model, tok, data, split, task, entries, o)
        results[f"n_{task}"] = len(entries)
        kinds = [S["clips"][ci].get("kind") for ci, _, _ in entries]
        if task == "transcription":
            phoneme_refs = None
            if ctc_hyps is not None and "phonemes" in S:
                phoneme_refs = [phoneme_text(S["phonemes"][ci]) if ci in S["phonemes"] else None
                                for ci, _, _ in entries]
            results.update(transcription_metrics(refs, hyps, ctc_hyps, kinds,
                                                 data.splits["train"], phoneme_refs))
        else:
            results.update(answer_metrics(task, entries, refs, hyps, kinds))
    return results
